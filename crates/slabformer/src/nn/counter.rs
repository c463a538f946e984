//! An integer buffer that a forward pass may advance: PRepBN's `warm`/`iter`/`total_step` and
//! BatchNorm's `num_batches_tracked`.
//!
//! burn's forward takes `&self`, and its own running statistics use shared interior state
//! ([`burn::module::RunningState`]); a counter does the same with a plain `i64`, so advancing it
//! costs no tensor work. It is visited as an int parameter of shape `[1]`, which is how it reaches
//! checkpoints and the state-dict I/O under its official key name.

use std::sync::{Arc, Mutex};

use burn::module::{
    Content, Devices, Module, ModuleDisplay, ModuleDisplayDefault, ModuleMapper, ModuleVisitor,
    Param, ParamId,
};
use burn::tensor::{Device, Int, Tensor, TensorData};

#[derive(Clone, Debug)]
pub struct Counter {
    id: ParamId,
    value: Arc<Mutex<i64>>,
    device: Device,
}

impl Counter {
    pub fn new(value: i64, device: &Device) -> Self {
        Self::with_id(ParamId::new(), value, device)
    }

    fn with_id(id: ParamId, value: i64, device: &Device) -> Self {
        Self {
            id,
            value: Arc::new(Mutex::new(value)),
            device: device.clone(),
        }
    }

    /// The id its key is found under (see `state::keys_by_id`).
    pub(crate) fn id(&self) -> ParamId {
        self.id
    }

    pub fn get(&self) -> i64 {
        *self.value.lock().expect("counter lock poisoned")
    }

    pub fn set(&self, value: i64) {
        *self.value.lock().expect("counter lock poisoned") = value;
    }

    /// A detached copy with its own storage (what `valid()`/`train()` hand out).
    fn snapshot(&self, device: &Device) -> Self {
        Self::with_id(self.id, self.get(), device)
    }

    fn as_param(&self) -> Param<Tensor<1, Int>> {
        let data = TensorData::new(vec![self.get()], [1]);
        Param::initialized(self.id, Tensor::<1, Int>::from_data(data, &self.device))
    }
}

impl Module for Counter {
    fn collect_devices(&self, mut devices: Devices) -> Devices {
        if !devices.contains(&self.device) {
            devices.push(self.device.clone());
        }
        devices
    }

    fn fork(self, device: &Device) -> Self {
        self.snapshot(device)
    }

    fn to_device(self, device: &Device) -> Self {
        self.snapshot(device)
    }

    fn train(self) -> Self {
        self.snapshot(&self.device.clone())
    }

    fn valid(&self) -> Self {
        self.snapshot(&self.device.clone().without_autodiff())
    }

    fn materialize(self) -> Self {
        self
    }

    fn visit<V: ModuleVisitor>(&self, visitor: &mut V) {
        visitor.visit_int(&self.as_param());
    }

    fn map<M: ModuleMapper>(self, mapper: &mut M) -> Self {
        let mapped = mapper.map_int(self.as_param());
        let value = mapped
            .val()
            .into_data()
            .convert::<i64>()
            .as_slice::<i64>()
            .expect("int buffer converts to i64")[0];
        Self::with_id(mapped.id, value, &self.device)
    }
}

impl ModuleDisplayDefault for Counter {
    fn content(&self, content: Content) -> Option<Content> {
        content.add_formatted(&format!("Counter({})", self.get())).optional()
    }
}

impl ModuleDisplay for Counter {}
