//! Helpers for equivalence tests (ours, and yours when you check a port against slabformer):
//! models whose every term shows in the outputs and gradients.

use burn::module::Module;
use burn::tensor::{Distribution, Tensor};

use crate::state::map_float_tensors;

/// `module` with every parameter and buffer moved off its initial value: BatchNorm statistics,
/// RepBN α, norm affines, biases, positional encodings and class tokens random, and the other
/// weights (timm's 0.02-std init gives tiny activations) scaled by `weight_scale`, so that
/// activations are O(1) and a small error in any op shows in the logits. Draws come from burn's
/// generator; seed the device first for a reproducible model.
pub fn randomized<M: Module>(module: M, weight_scale: f64) -> M {
    map_float_tensors(module, |key, t| {
        let n = t.dims()[0];
        let uniform = |lo, hi| Tensor::<1>::random([n], Distribution::Uniform(lo, hi), &t.device());
        let is_norm_weight = key.ends_with("weight") && (key.contains("norm") || key.contains(".bn."));
        Some(if key.ends_with("running_var") {
            uniform(0.5, 2.0)
        } else if is_norm_weight {
            uniform(0.5, 1.5)
        } else if key.ends_with("weight") {
            t.mul_scalar(weight_scale)
        } else {
            // Biases, BatchNorm means, α, positional encodings, class tokens, FLatten's scale.
            uniform(-0.5, 0.5)
        })
    })
}
