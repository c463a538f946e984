//! State dicts under the official PyTorch key names: read and write safetensors, apply a dict to
//! a module, and collect a module's parameters, buffers or gradients back into one.
//!
//! Keys are the module paths that `#[derive(Module)]` reports, with two adjustments that make
//! them the PyTorch keys: enum variants (our `Norm`/`Attention` kinds) add no path component, and
//! `Linear` weights are transposed, since burn stores them `[in, out]` and PyTorch `[out, in]`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use std::collections::HashMap;
use burn::tensor::{Gradients, Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Tensor values as stored in a state dict: float parameters/buffers and integer counters.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateTensor {
    pub shape: Vec<usize>,
    pub values: Values,
}

impl StateTensor {
    pub fn f32(shape: Vec<usize>, values: Vec<f32>) -> Self {
        Self {
            shape,
            values: Values::F32(values),
        }
    }

    fn dtype_name(&self) -> &'static str {
        match self.values {
            Values::F32(_) => "f32",
            Values::I64(_) => "i64",
        }
    }
}

/// An ordered map from official key to tensor, remembering where it came from for error messages.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    pub origin: String,
    pub metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, StateTensor>,
}

impl StateDict {
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            ..Default::default()
        }
    }

    pub fn read_safetensors(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes, path.display().to_string())
    }

    pub fn from_safetensors_bytes(bytes: &[u8], origin: String) -> Result<Self> {
        let format_error = |reason: String| Error::Format {
            origin: origin.clone(),
            reason: format!("not a readable safetensors file: {reason}"),
        };
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| format_error(e.to_string()))?;
        let file = SafeTensors::deserialize(bytes).map_err(|e| format_error(e.to_string()))?;
        let mut dict = StateDict::new(origin.clone());
        if let Some(meta) = header.metadata() {
            dict.metadata = meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        }
        for (name, view) in file.tensors() {
            let raw = view.data();
            let values = match view.dtype() {
                Dtype::F32 => Values::F32(le_chunks::<4>(raw).map(f32::from_le_bytes).collect()),
                Dtype::F64 => Values::F32(
                    le_chunks::<8>(raw)
                        .map(|b| f64::from_le_bytes(b) as f32)
                        .collect(),
                ),
                Dtype::I64 => Values::I64(le_chunks::<8>(raw).map(i64::from_le_bytes).collect()),
                Dtype::I32 => Values::I64(
                    le_chunks::<4>(raw)
                        .map(|b| i32::from_le_bytes(b) as i64)
                        .collect(),
                ),
                other => {
                    return Err(Error::DType {
                        origin,
                        key: name,
                        expected: "F32, F64, I32 or I64",
                        found: format!("{other:?}"),
                    });
                }
            };
            dict.tensors.insert(
                name,
                StateTensor {
                    shape: view.shape().to_vec(),
                    values,
                },
            );
        }
        Ok(dict)
    }

    /// Serializes to safetensors bytes (F32 and I64), with the given metadata header.
    pub fn to_safetensors_bytes(&self) -> Result<Vec<u8>> {
        let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                let (dtype, data) = match &t.values {
                    Values::F32(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    Values::I64(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                };
                (k.clone(), dtype, t.shape.clone(), data)
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (k, dtype, shape, data) in &bytes {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map_err(|e| Error::Format {
                    origin: self.origin.clone(),
                    reason: format!("cannot write safetensors: {k}: {e}"),
                })?;
            views.push((k.clone(), view));
        }
        let metadata = (!self.metadata.is_empty())
            .then(|| self.metadata.clone().into_iter().collect());
        safetensors::tensor::serialize(views, metadata).map_err(|e| Error::Format {
            origin: self.origin.clone(),
            reason: format!("cannot write safetensors: {e}"),
        })
    }

    /// The tensors whose key starts with `prefix.`, with that prefix removed
    /// (`param.`, `grad.`, `state_after_train.` in the golden files).
    pub fn subset(&self, prefix: &str) -> StateDict {
        let dotted = format!("{prefix}.");
        StateDict {
            origin: format!("{} [{prefix}.*]", self.origin),
            metadata: self.metadata.clone(),
            tensors: self
                .tensors
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(&dotted).map(|s| (s.to_string(), t.clone())))
                .collect(),
        }
    }

    pub fn insert(&mut self, key: impl Into<String>, tensor: StateTensor) {
        self.tensors.insert(key.into(), tensor);
    }

    pub fn get(&self, key: &str) -> Result<&StateTensor> {
        self.tensors.get(key).ok_or_else(|| Error::MissingKey {
            origin: self.origin.clone(),
            key: key.to_string(),
        })
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &StateTensor)> {
        self.tensors.iter()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// A float tensor of rank `D` on `device`.
    pub fn tensor<const D: usize>(&self, key: &str, device: &burn::tensor::Device) -> Result<Tensor<D>> {
        let t = self.get(key)?;
        let Values::F32(values) = &t.values else {
            return Err(Error::DType {
                origin: self.origin.clone(),
                key: key.to_string(),
                expected: "a float type",
                found: t.dtype_name().to_string(),
            });
        };
        if t.shape.len() != D {
            return Err(Error::Format {
                origin: self.origin.clone(),
                reason: format!("`{key}` has shape {:?}, expected a rank-{D} tensor", t.shape),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(values.clone(), t.shape.clone()),
            device,
        ))
    }
}

/// Little-endian `N`-byte words of `raw`.
pub(crate) fn le_chunks<const N: usize>(raw: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    raw.chunks_exact(N)
        .map(|c| <[u8; N]>::try_from(c).expect("chunk of N bytes"))
}

/// Tracks the module path during a traversal and turns it into the official key.
#[derive(Default)]
struct KeyPath {
    /// `(name, container type of the parent)`; enum variants are kept but skipped in the key.
    stack: Vec<(String, String)>,
}

impl KeyPath {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.stack.push((name.to_string(), container_type.to_string()));
    }

    fn exit(&mut self) {
        self.stack.pop();
    }

    fn key(&self) -> String {
        self.stack
            .iter()
            .filter(|(_, container)| !container.starts_with("Enum:"))
            .map(|(name, _)| sequential_index(name))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// burn's `Linear` keeps its weight as `[in, out]`; PyTorch files hold `[out, in]`.
    fn is_linear_weight(&self) -> bool {
        matches!(self.stack.last(), Some((name, container)) if name == "weight" && container == "Struct:Linear")
    }
}

/// A field named `_<digits>` stands for the PyTorch `nn.Sequential` index `<digits>` (CSWin's
/// `stage1_conv_embed.0` / `.2`), which a Rust field name cannot be.
fn sequential_index(name: &str) -> &str {
    match name.strip_prefix('_') {
        Some(index) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => index,
        _ => name,
    }
}

pub(crate) fn transpose_2d(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c];
        }
    }
    out
}

/// A float tensor's values on the host, row-major, as f32.
pub fn host_f32<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().convert::<f32>().try_to_vec::<f32>().expect("float tensor converts to f32")
}

fn float_state<const D: usize>(tensor: Tensor<D>, linear_weight: bool) -> StateTensor {
    let shape = tensor.dims().to_vec();
    let values = host_f32(tensor);
    if linear_weight && D == 2 {
        let (rows, cols) = (shape[0], shape[1]);
        StateTensor::f32(vec![cols, rows], transpose_2d(&values, rows, cols))
    } else {
        StateTensor::f32(shape, values)
    }
}

/// Counters are scalar buffers in PyTorch (shape `[]`); ours are `[1]`.
fn int_state<const D: usize>(tensor: Tensor<D, Int>) -> StateTensor {
    let shape = tensor.dims().to_vec();
    let values = tensor
        .into_data()
        .convert::<i64>()
        .try_to_vec::<i64>()
        .expect("int tensor converts to i64");
    let shape = if shape == [1] { vec![] } else { shape };
    StateTensor {
        shape,
        values: Values::I64(values),
    }
}

/// What a load did, for reports (`import` prints it).
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loaded: usize,
    /// File keys that matched nothing, when unexpected keys are allowed.
    pub unused: Vec<String>,
}

struct Loader<'a> {
    dict: &'a StateDict,
    path: KeyPath,
    used: BTreeSet<String>,
    missing: Vec<String>,
    errors: Vec<Error>,
}

impl Loader<'_> {
    fn shape_error(&self, key: &str, expected: Vec<usize>, found: &[usize]) -> Error {
        Error::ShapeMismatch {
            origin: self.dict.origin.clone(),
            key: key.to_string(),
            expected,
            found: found.to_vec(),
        }
    }

    fn lookup(&mut self, key: &str) -> Option<&StateTensor> {
        match self.dict.tensors.get(key) {
            Some(t) => {
                self.used.insert(key.to_string());
                Some(t)
            }
            None => {
                self.missing.push(key.to_string());
                None
            }
        }
    }
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key();
        let linear_weight = self.path.is_linear_weight();
        let Some(found) = self.lookup(&key).cloned() else {
            return param;
        };
        let Values::F32(values) = found.values else {
            self.errors.push(Error::DType {
                origin: self.dict.origin.clone(),
                key,
                expected: "a float type",
                found: found.dtype_name().to_string(),
            });
            return param;
        };
        let ours = param.lazy_shape().dims::<D>().to_vec();
        let file_view: Vec<usize> = if linear_weight {
            ours.iter().rev().copied().collect()
        } else {
            ours.clone()
        };
        if found.shape != file_view {
            let error = self.shape_error(&key, file_view, &found.shape);
            self.errors.push(error);
            return param;
        }
        let values = if linear_weight {
            transpose_2d(&values, found.shape[0], found.shape[1])
        } else {
            values
        };
        let device = param.lazy_device();
        let tensor = Tensor::<D>::from_data(TensorData::new(values, ours), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }

    fn map_int<const D: usize>(&mut self, param: Param<Tensor<D, Int>>) -> Param<Tensor<D, Int>> {
        let key = self.path.key();
        let Some(found) = self.lookup(&key).cloned() else {
            return param;
        };
        let ours = param.lazy_shape().dims::<D>().to_vec();
        let scalar_match = ours == [1] && found.shape.is_empty();
        let Values::I64(values) = found.values else {
            self.errors.push(Error::DType {
                origin: self.dict.origin.clone(),
                key,
                expected: "an integer type",
                found: "f32".to_string(),
            });
            return param;
        };
        if found.shape != ours && !scalar_match {
            let error = self.shape_error(&key, ours, &found.shape);
            self.errors.push(error);
            return param;
        }
        // burn's integer tensors hold 32 bits here: a wider value would panic in the cast.
        if let Some(bad) = values.iter().find(|&&v| i32::try_from(v).is_err()) {
            self.errors.push(Error::Format {
                origin: self.dict.origin.clone(),
                reason: format!("`{key}` holds {bad}, beyond the 32-bit integers of a buffer"),
            });
            return param;
        }
        let device = param.lazy_device();
        let tensor = Tensor::<D, Int>::from_data(TensorData::new(values, ours), &device);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Applies `dict` to `module`. Every parameter and buffer of the module must be in the dict with
/// the right shape; with `allow_unused = false` every key of the dict must also be used.
/// All problems are reported together, by key.
pub fn load_state<M: Module>(module: M, dict: &StateDict, allow_unused: bool) -> Result<(M, LoadReport)> {
    let mut loader = Loader {
        dict,
        path: KeyPath::default(),
        used: BTreeSet::new(),
        missing: Vec::new(),
        errors: Vec::new(),
    };
    let module = module.map(&mut loader);
    let unused: Vec<String> = dict
        .keys()
        .filter(|k| !loader.used.contains(*k))
        .cloned()
        .collect();
    let mut errors = loader.errors;
    if !loader.missing.is_empty() {
        errors.push(Error::MissingKeys {
            origin: dict.origin.clone(),
            count: loader.missing.len(),
            keys: loader.missing.join(", "),
        });
    }
    if !unused.is_empty() && !allow_unused {
        errors.push(Error::UnexpectedKeys {
            origin: dict.origin.clone(),
            count: unused.len(),
            keys: unused.join(", "),
        });
    }
    // One problem is reported as itself; several together, so a foreign file is explained at once.
    if errors.len() == 1 {
        return Err(errors.remove(0));
    }
    if !errors.is_empty() {
        let prefix = format!("{}: ", dict.origin);
        return Err(Error::StateMismatch {
            origin: dict.origin.clone(),
            problems: errors.iter().map(|e| e.to_string().trim_start_matches(&prefix).to_string()).collect(),
        });
    }
    Ok((
        module,
        LoadReport {
            loaded: loader.used.len(),
            unused,
        },
    ))
}

struct Collector<'a> {
    path: KeyPath,
    grads: Option<&'a Gradients>,
    dict: StateDict,
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = match self.grads {
            None => Some(param.val()),
            Some(grads) => param.val().grad(grads),
        };
        if let Some(tensor) = tensor {
            let key = self.path.key();
            self.dict.insert(key, float_state(tensor, self.path.is_linear_weight()));
        }
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
        if self.grads.is_none() {
            self.dict.insert(self.path.key(), int_state(param.val()));
        }
    }
}

/// The module's full state (parameters and buffers) under official keys.
pub fn collect_state<M: Module>(module: &M) -> StateDict {
    let mut collector = Collector {
        path: KeyPath::default(),
        grads: None,
        dict: StateDict::new("model"),
    };
    module.visit(&mut collector);
    collector.dict
}

/// The gradients of every parameter that received one, under official keys.
pub fn collect_grads<M: Module>(module: &M, grads: &Gradients) -> StateDict {
    let mut collector = Collector {
        path: KeyPath::default(),
        grads: Some(grads),
        dict: StateDict::new("gradients"),
    };
    module.visit(&mut collector);
    collector.dict
}

/// A parameter's or buffer's official key, and whether burn keeps it transposed (Linear weights
/// are `[in, out]` in burn, `[out, in]` in PyTorch).
pub(crate) struct OfficialKey {
    pub key: String,
    pub linear_weight: bool,
}

/// Every float parameter's and buffer's official key, in the order the module visits them
/// (input to head).
pub fn keys_in_order<M: Module>(module: &M) -> Vec<String> {
    struct Order {
        path: KeyPath,
        keys: Vec<String>,
    }
    impl ModuleVisitor for Order {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, _param: &Param<Tensor<D>>) {
            self.keys.push(self.path.key());
        }
    }
    let mut visitor = Order { path: KeyPath::default(), keys: Vec::new() };
    module.visit(&mut visitor);
    visitor.keys
}

/// Every parameter's and buffer's official key, by its id: how the fast path names what it
/// lowered from a module without building keys itself; and how many float values the module
/// holds.
pub(crate) fn keys_by_id<M: Module>(module: &M) -> (HashMap<ParamId, OfficialKey>, usize) {
    struct Keys {
        path: KeyPath,
        keys: HashMap<ParamId, OfficialKey>,
        floats: usize,
    }
    impl ModuleVisitor for Keys {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.keys.insert(param.id, OfficialKey { key: self.path.key(), linear_weight: self.path.is_linear_weight() });
            self.floats += param.lazy_shape().num_elements();
        }
        fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, Int>>) {
            self.keys.insert(param.id, OfficialKey { key: self.path.key(), linear_weight: false });
        }
    }
    let mut visitor = Keys { path: KeyPath::default(), keys: HashMap::new(), floats: 0 };
    module.visit(&mut visitor);
    (visitor.keys, visitor.floats)
}

/// BatchNorm running statistics and Swin's shifted-window mask are float buffers, not parameters.
pub fn is_buffer_key(key: &str) -> bool {
    key.ends_with("running_mean") || key.ends_with("running_var") || key.ends_with("attn_mask") || key.ends_with(".pad")
}

struct ParamCounter {
    path: KeyPath,
    count: usize,
}

impl ModuleVisitor for ParamCounter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !is_buffer_key(&self.path.key()) {
            self.count += param.lazy_shape().num_elements();
        }
    }
}

/// Trainable parameters (float tensors less BatchNorm running statistics), the count the papers
/// report. burn's `num_params` also counts the running statistics.
pub fn trainable_param_count<M: Module>(module: &M) -> usize {
    let mut counter = ParamCounter {
        path: KeyPath::default(),
        count: 0,
    };
    module.visit(&mut counter);
    counter.count
}

/// Float tensors of a module by official key, flattened and without autodiff: parameters and
/// buffers (`grads = None`) or gradients. Unlike [`collect_state`] this stays on the device, in
/// burn's layout (Linear weights `[in, out]`), for optimizer and EMA arithmetic.
pub fn float_tensors<M: Module>(module: &M, grads: Option<&Gradients>) -> BTreeMap<String, Tensor<1>> {
    struct Flat<'a> {
        path: KeyPath,
        grads: Option<&'a Gradients>,
        out: BTreeMap<String, Tensor<1>>,
    }
    impl ModuleVisitor for Flat<'_> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let tensor = match self.grads {
                None => Some(param.val()),
                Some(grads) => param.val().grad(grads),
            };
            if let Some(t) = tensor {
                let n = t.shape().num_elements();
                self.out.insert(self.path.key(), t.without_autodiff().reshape([n]));
            }
        }
    }
    let mut flat = Flat { path: KeyPath::default(), grads, out: BTreeMap::new() };
    module.visit(&mut flat);
    flat.out
}

/// Replaces float parameters/buffers by key: `update(key, current)` gets the flattened value
/// without autodiff and returns the new one, or `None` to keep it. Gradient tracking and device
/// stay as they were.
pub fn map_float_tensors<M: Module>(module: M, update: impl FnMut(&str, Tensor<1>) -> Option<Tensor<1>>) -> M {
    struct Update<F> {
        path: KeyPath,
        update: F,
    }
    impl<F: FnMut(&str, Tensor<1>) -> Option<Tensor<1>>> ModuleMapper for Update<F> {
        fn enter_module(&mut self, name: &str, container_type: &str) {
            self.path.enter(name, container_type);
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.exit();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let key = self.path.key();
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let flat = tensor.clone().without_autodiff().reshape([shape.num_elements()]);
            let tensor = match (self.update)(&key, flat) {
                None => tensor,
                Some(new) => {
                    let new = new.reshape(shape);
                    match (tensor.is_autodiff(), tensor.is_require_grad()) {
                        (true, true) => new.autodiff().require_grad(),
                        (true, false) => new.autodiff(),
                        (false, _) => new,
                    }
                }
            };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut Update { path: KeyPath::default(), update })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::VitConfig;
    use crate::nn::norm::LinearNorm;
    use crate::nn::schedule::{Decay, PrepbnSchedule};
    use burn::tensor::Device;

    fn tiny() -> VitConfig {
        VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 1, num_heads: 2, num_classes: 3, ..VitConfig::slab_deit_tiny() }
    }

    #[test]
    fn state_round_trips_through_safetensors_bytes() {
        let device = Device::flex();
        let model = tiny().init(&device).unwrap();
        let state = collect_state(&model);
        assert!(state.contains("blocks.0.norm1.norm2.bn.running_var"));
        assert!(state.contains("blocks.0.attn.qkv.weight"));
        assert_eq!(state.get("blocks.0.attn.qkv.weight").unwrap().shape, vec![36, 12]);
        assert_eq!(state.get("norm.iter").unwrap().shape, Vec::<usize>::new());
        let bytes = state.to_safetensors_bytes().unwrap();
        let read = StateDict::from_safetensors_bytes(&bytes, "memory".into()).unwrap();
        let fresh = tiny().init(&device).unwrap();
        let (loaded, report) = load_state(fresh, &read, false).unwrap();
        assert_eq!(report.loaded, state.len());
        let again = collect_state(&loaded);
        for (key, t) in state.iter() {
            assert_eq!(again.get(key).unwrap(), t, "{key}");
        }
    }

    #[test]
    fn prepbn_counters_survive_a_round_trip_and_continue_the_sequence() {
        let device = Device::flex().autodiff();
        let schedule = PrepbnSchedule { warm: 1, total: 5, r0: 1.0, decay: Decay::Linear };
        let norm = LinearNorm::new(4, 1e-6, 1e-5, schedule, &device);
        let x = Tensor::<3>::ones([2, 3, 4], &device);
        for _ in 0..3 {
            let _ = norm.forward(x.clone());
        }
        let saved = StateDict::from_safetensors_bytes(&collect_state(&norm).to_safetensors_bytes().unwrap(), "memory".into()).unwrap();
        let (restored, _) = load_state(LinearNorm::new(4, 1e-6, 1e-5, schedule, &device), &saved, false).unwrap();
        for call in 3..8 {
            assert_eq!(restored.next_phase(), schedule.phase(call));
            assert_eq!(restored.next_phase(), norm.next_phase());
            let _ = restored.forward(x.clone());
            let _ = norm.forward(x.clone());
        }
    }

    #[test]
    fn load_errors_name_the_key_and_shapes() {
        let device = Device::flex();
        let state = collect_state(&tiny().init(&device).unwrap());

        let mut missing = StateDict::new("missing.safetensors");
        for (k, t) in state.iter().filter(|(k, _)| k.as_str() != "head.bias") {
            missing.insert(k.clone(), t.clone());
        }
        let err = load_state(tiny().init(&device).unwrap(), &missing, false).unwrap_err().to_string();
        assert!(err.contains("head.bias") && err.contains("missing.safetensors"), "{err}");

        let mut wrong = state.clone();
        wrong.insert("head.weight", StateTensor::f32(vec![4, 12], vec![0.0; 48]));
        let err = load_state(tiny().init(&device).unwrap(), &wrong, false).unwrap_err().to_string();
        assert!(err.contains("head.weight") && err.contains("[3, 12]") && err.contains("[4, 12]"), "{err}");

        let mut extra = state.clone();
        extra.insert("blocks.7.attn.qkv.weight", StateTensor::f32(vec![1], vec![0.0]));
        let err = load_state(tiny().init(&device).unwrap(), &extra, false).unwrap_err().to_string();
        assert!(err.contains("blocks.7.attn.qkv.weight"), "{err}");
        assert!(load_state(tiny().init(&device).unwrap(), &extra, true).is_ok());

        let mut int_for_float = state.clone();
        int_for_float.insert("pos_embed", StateTensor { shape: vec![1, 16, 12], values: Values::I64(vec![0; 192]) });
        let err = load_state(tiny().init(&device).unwrap(), &int_for_float, false).unwrap_err().to_string();
        assert!(err.contains("pos_embed"), "{err}");

        // A LayerNorm-only model is not a SLAB model: RepBN keys are unexpected, PRepBN keys missing.
        let deit = VitConfig { norm: crate::nn::norm::NormKind::layer_norm(1e-6), ..tiny() };
        assert!(load_state(deit.init(&device).unwrap(), &state, false).is_err());
    }

    #[test]
    fn corrupt_files_are_clear_errors() {
        let device = Device::flex();
        let bytes = collect_state(&tiny().init(&device).unwrap()).to_safetensors_bytes().unwrap();
        for cut in [0, 7, 20, bytes.len() / 2, bytes.len() - 1] {
            let err = StateDict::from_safetensors_bytes(&bytes[..cut], "cut.safetensors".into()).unwrap_err();
            assert!(err.to_string().contains("cut.safetensors"), "{err}");
        }
        let err = StateDict::read_safetensors(std::path::Path::new("/nonexistent/model.safetensors")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/model.safetensors"), "{err}");
    }
}
