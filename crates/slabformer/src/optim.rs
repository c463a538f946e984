//! The one optimizer both training engines step with: AdamW (PyTorch semantics, decoupled
//! weight decay, the official no-decay rule) and clipping by the global gradient norm, over flat
//! `f32` slices. The CPU trainer runs it on its parameter buffer, the burn engine on each
//! parameter's host copy.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Base learning rate per 512 images (default 5e-4 → 1e-3 at batch 1024).
    pub lr: f64,
    /// Default 0.05.
    pub weight_decay: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    /// Gradient clipping by global norm (default 5.0; none when absent).
    pub clip_grad: Option<f64>,
    /// Key suffixes without weight decay, besides every 1-D tensor (norm weights, biases, α).
    /// Default: `pos_embed`, `cls_token`, `positional_encoding`, `relative_position_bias_table`
    /// (Swin's, as its official `no_weight_decay_keywords`). (The official script decays the SLA
    /// `positional_encoding`; drop it from this list to match. PVT's `pos_embed1`…`pos_embed4`
    /// match none of these names and are decayed, as the official PVT, whose list holds only
    /// `cls_token`.)
    pub no_decay: Vec<String>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            weight_decay: 0.05,
            betas: [0.9, 0.999],
            eps: 1e-8,
            clip_grad: Some(5.0),
            no_decay: vec!["pos_embed".into(), "cls_token".into(), "positional_encoding".into(), "relative_position_bias_table".into(), "attention_biases".into()],
        }
    }
}

/// Whether the parameter `key` of tensor rank `rank` gets weight decay: tensors of rank ≥ 2 that
/// are not biases or listed in `no_decay`.
pub fn decays(config: &OptimConfig, key: &str, rank: usize) -> bool {
    rank >= 2 && !key.ends_with(".bias") && !config.no_decay.iter().any(|s| key == s || key.ends_with(&format!(".{s}")))
}

/// The factor that clips gradients of global norm `norm` to `config.clip_grad` (1 when they
/// are within it or clipping is off), as PyTorch's `clip_grad_norm_` computes it.
pub fn clip_coefficient(config: &OptimConfig, norm: f64) -> f64 {
    match config.clip_grad {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

/// The global L2 norm of gradient slices (accumulated in f64).
pub fn global_norm<'a>(grads: impl IntoIterator<Item = &'a [f32]>) -> f64 {
    grads.into_iter().map(|g| g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).sum::<f64>().sqrt()
}

/// One AdamW step's constants (step count `t`, learning rate `lr`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    b1: f32,
    b2: f32,
    /// lr / (1 − β1ᵗ).
    step: f32,
    /// 1 / (1 − β2ᵗ).
    inv_bias2: f32,
    eps: f32,
    /// 1 − lr·weight_decay.
    decayed: f32,
}

impl AdamWStep {
    pub fn new(config: &OptimConfig, t: u64, lr: f64) -> Self {
        let [b1, b2] = config.betas;
        let t = t as i32;
        let (bias1, bias2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        Self { b1: b1 as f32, b2: b2 as f32, step: (lr / bias1) as f32, inv_bias2: (1.0 / bias2) as f32, eps: config.eps as f32, decayed: (1.0 - lr * config.weight_decay) as f32 }
    }

    /// Updates one parameter's values `w` from its gradient `g` and moments `m`, `v`.
    pub fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decays: bool) {
        let keep = if decays { self.decayed } else { 1.0 };
        let (b1, b2) = (self.b1, self.b2);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w = *w * keep - self.step * *m / ((*v * self.inv_bias2).sqrt() + self.eps);
        }
    }
}
