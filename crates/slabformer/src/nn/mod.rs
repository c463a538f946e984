//! Layers. Each is a `#[derive(Module)]` struct whose field names are the official PyTorch
//! parameter names, built from a small config by `init(device)`.

pub mod attention;
pub mod attention_bias;
pub mod conv;
pub mod conv_norm;
pub mod conv_norm_fast;
pub mod counter;
pub mod drop_path;
pub mod fuse;
pub mod group_norm;
#[cfg(test)]
mod harness;
pub mod layer_scale;
pub mod linear;
pub mod loss;
pub mod lower;
pub mod meta3d_attention;
pub mod mlp;
pub mod norm;
pub mod normed_patch_embed;
pub mod patch_embed;
pub mod patch_merge;
pub mod pool;
pub mod schedule;

use burn::module::{Flag, Module, ModuleMapper, Param};
use burn::tensor::Tensor;

/// Whether a layer with this flag takes its training path for this input: burn's convention, a
/// training forward needs both an autodiff device and an enabled training flag.
pub(crate) fn is_training<const D: usize>(flag: &Param<Flag>, input: &Tensor<D>) -> bool {
    flag.is_enabled() && input.device().is_autodiff()
}

/// Sets flags by (owning struct, field name); `decide` returns `None` to leave one alone.
struct FlagSetter<F> {
    stack: Vec<(String, String)>,
    decide: F,
}

impl<F: FnMut(&str, &str) -> Option<bool>> ModuleMapper for FlagSetter<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.stack.push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.stack.pop();
    }

    fn map_flag(&mut self, flag: Param<Flag>) -> Param<Flag> {
        let (name, container) = self.stack.last().map(|(n, c)| (n.as_str(), c.as_str())).unwrap_or(("", ""));
        match (self.decide)(container, name) {
            Some(value) => flag.with_value(value),
            None => flag,
        }
    }
}

fn set_flags<M: Module>(module: M, decide: impl FnMut(&str, &str) -> Option<bool>) -> M {
    module.map(&mut FlagSetter { stack: Vec::new(), decide })
}

/// Sets every training flag (BatchNorm statistics, PRepBN counters, drop-path) without touching
/// gradients: `set_training(model, false)` on an autodiff device is PyTorch's `model.eval()` with
/// autograd still on.
pub fn set_training<M: Module>(module: M, training: bool) -> M {
    set_flags(module, |_, name| (name == "training").then_some(training))
}

/// The BatchNorm re-calibration mode (SPEC §2.7): everything in eval (PRepBN → pure RepBN,
/// drop-path off) except BatchNorm, which normalizes with batch statistics and updates its
/// running ones.
pub fn recalibration_mode<M: Module>(module: M) -> M {
    set_flags(module, |container, name| (name == "training").then_some(container == "Struct:BatchNorm"))
}

/// Whether training-mode forwards advance the PRepBN counters. With gradient accumulation the
/// trainer lets only the first micro-batch of each optimizer step advance them, so λ follows
/// optimizer steps (SPEC §2.5, note 1).
pub fn set_counter_advance<M: Module>(module: M, advance: bool) -> M {
    set_flags(module, |_, name| (name == "advance").then_some(advance))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::VitConfig;
    use crate::state::{Values, collect_state, is_buffer_key};
    use burn::tensor::Device;

    #[test]
    fn recalibration_changes_only_batchnorm_statistics() {
        // SPEC §7.1 item 9.
        let device = Device::flex().autodiff();
        let config = VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 2, num_heads: 2, num_classes: 3, drop_path_rate: 0.2, ..VitConfig::slab_deit_tiny() };
        let model = config.init(&device).unwrap();
        let before = collect_state(&model);
        let recal = recalibration_mode(model.no_grad());
        let images = crate::testing::standard_normal([4, 3, 16, 16], 26, &device);
        let _ = recal.forward(images);
        let after = collect_state(&recal);
        for (key, was) in before.iter() {
            let now = after.get(key).unwrap();
            if is_buffer_key(key) {
                assert_ne!(now, was, "{key} was not re-estimated");
            } else if key.ends_with("num_batches_tracked") {
                assert_eq!(now.values, Values::I64(vec![1]), "{key}");
            } else {
                assert_eq!(now, was, "{key} changed during re-calibration");
            }
        }
    }
}
