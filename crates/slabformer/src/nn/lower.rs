//! Lowering: a burn module tree read into the fast path's one flat parameter buffer.
//!
//! Each layer kind lowers itself (`FastLinear::lower(&Linear, …)`, `FastNorm::lower(&Norm, …)`,
//! …) by handing its own `Param`s to a [`ParamTable`]; the table finds their official keys by
//! parameter id, so no key is ever spelled out twice. The table keeps every tensor in the layout
//! its kernels read and converts back to the official layout (gradients, state dicts) and to
//! burn's (optimizer moments) on the way out.

use std::collections::HashMap;
use std::ops::Range;

use burn::module::{Module, Param, ParamId};
use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::state::{OfficialKey, StateDict, StateTensor, Values, host_f32, keys_by_id, transpose_2d};

/// One tensor's place in the flat buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub offset: usize,
    pub len: usize,
}

impl Slot {
    pub fn range(self) -> Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// How a tensor is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// As the official state dict holds it.
    Official,
    /// As the transpose of the official (rows, rest) matrix: Linear weights (out, in) and patch
    /// convs (C, C_in·p·p) are kept (in, out) for the GEMM.
    Transposed,
    /// A conv weight (C_out, C_in, kh, kw) kept as the (kh·kw·C_in, C_out) matrix whose rows run
    /// tap by tap, channels inside: the im2col rows of (H·W, C) raster rows are then whole
    /// pixels copied side by side.
    TapsMajor,
}

/// Our layout as the official tensor viewed as (a, b, c), kept as (c, b, a): a transpose is
/// (rows, 1, cols), a tap-major conv weight (C_out, C_in, kh·kw).
fn reversed_dims(layout: Layout, shape: &[usize]) -> Option<[usize; 3]> {
    match layout {
        Layout::Official => None,
        Layout::Transposed => Some([shape[0], 1, shape[1..].iter().product()]),
        Layout::TapsMajor => Some([shape[0], shape[1], shape[2..].iter().product()]),
    }
}

/// `values` of shape (a, b, c) as their (c, b, a) permutation.
fn reverse_3d(values: &[f32], [a, b, c]: [usize; 3]) -> Vec<f32> {
    if b == 1 {
        return transpose_2d(values, a, c);
    }
    let mut out = vec![0.0; values.len()];
    for i in 0..a {
        for j in 0..b {
            for k in 0..c {
                out[(k * b + j) * a + i] = values[(i * b + j) * c + k];
            }
        }
    }
    out
}

pub struct ParamInfo {
    pub key: String,
    /// The official shape.
    pub shape: Vec<usize>,
    pub slot: Slot,
    /// The official tensor viewed as (a, b, c) that this slot holds as (c, b, a), if it does
    /// ([`Layout::Transposed`], [`Layout::TapsMajor`]).
    reversed: Option<[usize; 3]>,
    /// Whether burn keeps the tensor as we do (Linear weights are (in, out) in burn too).
    burn_layout_is_ours: bool,
    /// False for parameters the forward never reads (the class token of mean-pooled models):
    /// like PyTorch, the optimizer leaves them alone.
    pub trained: bool,
}

/// The flat parameter buffer and where each lowered tensor lives in it.
pub struct ParamTable {
    pub infos: Vec<ParamInfo>,
    pub values: Vec<f32>,
    keys: HashMap<ParamId, OfficialKey>,
}

impl ParamTable {
    /// An empty table for lowering `module`'s layers.
    pub fn for_module<M: Module>(module: &M) -> Self {
        let (keys, floats) = keys_by_id(module);
        // Sized once: growing a buffer of the whole model by doubling would briefly hold up to
        // three times its size.
        Self { infos: Vec::new(), values: Vec::with_capacity(floats), keys }
    }

    fn official_key(&self, id: ParamId) -> Result<&OfficialKey> {
        self.keys.get(&id).ok_or_else(|| Error::Unsupported {
            what: "a layer whose parameter is not part of the lowered module".into(),
            path: "the fast path",
        })
    }

    /// The official key of a parameter or buffer of the module.
    pub fn key_of(&self, id: ParamId) -> Result<&str> {
        Ok(&self.official_key(id)?.key)
    }

    /// The module path a parameter lives under (`blocks.0.norm1.bn` for `….bn.weight`).
    pub fn prefix_of<const D: usize>(&self, param: &Param<Tensor<D>>) -> Result<String> {
        let key = self.key_of(param.id)?;
        Ok(key.rsplit_once('.').map_or(String::new(), |(prefix, _)| prefix.to_string()))
    }

    /// Adds a parameter, in `layout`, read from the module's tensor.
    pub fn add<const D: usize>(&mut self, param: &Param<Tensor<D>>, layout: Layout) -> Result<Slot> {
        let official = self.official_key(param.id)?;
        let (key, linear_weight) = (official.key.clone(), official.linear_weight);
        let burn_dims = param.lazy_shape().dims::<D>().to_vec();
        let values = host_f32(param.val());
        let slot = Slot { offset: self.values.len(), len: values.len() };
        // The official tensor: burn keeps Linear weights as its transpose.
        let shape = if linear_weight { vec![burn_dims[1], burn_dims[0]] } else { burn_dims };
        if layout == Layout::TapsMajor && shape.len() != 4 {
            return Err(Error::Unsupported { what: format!("`{key}` of shape {shape:?} kept as a conv weight"), path: "the fast CPU path" });
        }
        let reversed = reversed_dims(layout, &shape);
        let burn_layout_is_ours = linear_weight == reversed.is_some();
        match (linear_weight, reversed) {
            // burn's [in, out] is already the transpose of the official matrix.
            (true, Some(_)) => self.values.extend(values),
            (true, None) => self.values.extend(transpose_2d(&values, shape[1], shape[0])),
            (false, Some(dims)) => self.values.extend(reverse_3d(&values, dims)),
            (false, None) => self.values.extend(values),
        }
        self.infos.push(ParamInfo { key, shape, slot, reversed, burn_layout_is_ours, trained: true });
        Ok(slot)
    }

    /// `len` zeros that belong to no parameter (the bias of a Linear without one).
    pub fn zeros(&mut self, len: usize) -> Slot {
        let slot = Slot { offset: self.values.len(), len };
        self.values.resize(self.values.len() + len, 0.0);
        slot
    }

    /// Marks the parameter in `slot` as never read by the forward.
    pub fn untrained(&mut self, slot: Slot) {
        if let Some(info) = self.infos.iter_mut().find(|i| i.slot == slot) {
            info.trained = false;
        }
    }

    /// Values of this parameter's slot in `buffer`, flattened in burn's layout (how burn's
    /// AdamW stores its moments).
    pub fn burn_flat(&self, info: &ParamInfo, buffer: &[f32]) -> Vec<f32> {
        if info.burn_layout_is_ours { buffer[info.slot.range()].to_vec() } else { self.official(info, buffer) }
    }

    /// The inverse of [`burn_flat`](Self::burn_flat), into `buffer`.
    pub fn set_from_burn_flat(&self, info: &ParamInfo, values: &[f32], buffer: &mut [f32]) {
        let dst = &mut buffer[info.slot.range()];
        match (info.burn_layout_is_ours, info.reversed) {
            (false, Some(dims)) => dst.copy_from_slice(&reverse_3d(values, dims)),
            _ => dst.copy_from_slice(values),
        }
    }

    /// The parameter's values in `buffer` (the parameters or their gradients), official layout.
    pub fn official(&self, info: &ParamInfo, buffer: &[f32]) -> Vec<f32> {
        let values = &buffer[info.slot.range()];
        match info.reversed {
            Some([a, b, c]) => reverse_3d(values, [c, b, a]),
            None => values.to_vec(),
        }
    }

    /// The lowered module's full state under the official keys: `template` (the module's state
    /// as `collect_state` gave it) with this table's parameters from `values`; `buffers` then
    /// writes the layers' buffers (statistics, counters).
    pub fn state_with(&self, values: &[f32], template: &StateDict, origin: &str, buffers: impl FnOnce(&mut StateDict)) -> StateDict {
        let mut dict = template.clone();
        dict.origin = origin.into();
        for info in &self.infos {
            dict.insert(info.key.clone(), StateTensor::f32(info.shape.clone(), self.official(info, values)));
        }
        buffers(&mut dict);
        dict
    }
}

pub(crate) fn float_values(state: &StateDict, key: &str, len: usize) -> Result<Vec<f32>> {
    match &state.get(key)?.values {
        Values::F32(v) if v.len() == len => Ok(v.clone()),
        Values::F32(v) => Err(Error::ShapeMismatch { origin: state.origin.clone(), key: key.into(), expected: vec![len], found: vec![v.len()] }),
        Values::I64(_) => Err(Error::DType { origin: state.origin.clone(), key: key.into(), expected: "f32", found: "i64".into() }),
    }
}

/// Replaces a template tensor's values, keeping its shape.
pub(crate) fn set_f32(state: &mut StateDict, key: &str, values: &[f32]) {
    let shape = state.get(key).map(|t| t.shape.clone()).unwrap_or_else(|_| vec![values.len()]);
    state.insert(key, StateTensor::f32(shape, values.to_vec()));
}

pub(crate) fn set_i64(state: &mut StateDict, key: &str, value: i64) {
    let shape = state.get(key).map(|t| t.shape.clone()).unwrap_or_default();
    let len = shape.iter().product::<usize>().max(1);
    state.insert(key, StateTensor { shape, values: Values::I64(vec![value; len]) });
}

/// Rows per parallel task for row-local work over `rows` rows: about 256 (small enough to stay in
/// cache, large enough for the GEMM to run at speed), in a multiple of the thread count of
/// blocks so that every thread gets the same share.
pub fn row_block(rows: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let blocks = threads * (rows as f64 / (threads * 256) as f64).round().max(1.0) as usize;
    rows.div_ceil(blocks).max(1)
}

/// `v` resized to `len` (the activation buffers are reused from step to step).
pub fn sized(v: &mut Vec<f32>, len: usize) -> &mut Vec<f32> {
    v.resize(len, 0.0);
    v
}

/// Runs `f` on every job, in parallel when there is more than one (a layer's share of one
/// image's work split over `parts` threads; one job runs on the calling thread).
pub fn for_each_part<T: Send>(jobs: Vec<T>, f: impl Fn(T) + Sync + Send) {
    use rayon::prelude::*;
    if jobs.len() == 1 {
        jobs.into_iter().for_each(f);
    } else {
        jobs.into_par_iter().for_each(f);
    }
}
