//! Layers. Each is a `#[derive(Module)]` struct whose field names are the official PyTorch
//! parameter names, built from a small config by `init(device)`.

pub mod attention;
pub mod counter;
pub mod drop_path;
pub mod mlp;
pub mod norm;
pub mod patch_embed;
pub mod schedule;

use burn::module::{Flag, Module, ModuleMapper, Param};
use burn::tensor::Tensor;

/// Whether a layer with this flag takes its training path for this input: burn's convention, a
/// training forward needs both an autodiff device and an enabled training flag.
pub(crate) fn is_training<const D: usize>(flag: &Param<Flag>, input: &Tensor<D>) -> bool {
    flag.is_enabled() && input.device().is_autodiff()
}

struct TrainingFlags(bool);

impl ModuleMapper for TrainingFlags {
    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        flag.with_value(self.0)
    }
}

/// Sets every training flag (BatchNorm statistics, PRepBN counters, drop-path) without touching
/// gradients: `set_training(model, false)` on an autodiff device is PyTorch's `model.eval()` with
/// autograd still on.
pub fn set_training<M: Module>(module: M, training: bool) -> M {
    module.map(&mut TrainingFlags(training))
}
