//! Helpers for equivalence tests (ours, and yours when you check a port against slabformer):
//! models whose every term shows in the outputs and gradients.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};

use crate::state::{StateDict, Values, map_float_tensors};

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
        if key.ends_with("attn_mask") {
            return None; // a constant of the architecture (Swin's shifted windows)
        }
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

/// `f` with burn's generator seeded with `seed` on `device`, under a lock: the generator is
/// process-wide, so tests drawing in parallel threads would otherwise interleave their draws and
/// be different every run.
pub fn seeded<R>(seed: u64, device: &Device, f: impl FnOnce() -> R) -> R {
    static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = DRAWS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    f()
}

/// `max|ours − want| ≤ abs + rel·max|want|`, naming the worst element otherwise (NaN fails).
pub fn assert_near(what: &str, ours: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (worst, diff) = ours.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0.0f32), |w, (i, d)| if d > w.1 || d.is_nan() { (i, d) } else { w });
    assert!(diff <= rel * scale + abs, "{what}: max |Δ| = {diff:.3e} (scale {scale:.3e}) at {worst}: ours {}, want {}", ours[worst], want[worst]);
}

/// A float tensor's values; `what` names it when it is an integer tensor.
pub fn floats<'a>(what: &str, values: &'a Values) -> &'a [f32] {
    match values {
        Values::F32(v) => v,
        Values::I64(_) => panic!("{what}: an int tensor where a float one belongs"),
    }
}

/// Every tensor of `want` in `ours`: integer tensors (counters) exactly, floats by [`assert_near`].
pub fn assert_states_near(what: &str, ours: &StateDict, want: &StateDict, rel: f32, abs: f32) {
    for (key, w) in want.iter() {
        let o = ours.get(key).unwrap_or_else(|_| panic!("{what}: `{key}` missing"));
        let what = format!("{what} `{key}`");
        match (&o.values, &w.values) {
            (Values::I64(a), Values::I64(b)) => assert_eq!(a, b, "{what}"),
            (a, b) => assert_near(&what, floats(&what, a), floats(&what, b), rel, abs),
        }
    }
}
