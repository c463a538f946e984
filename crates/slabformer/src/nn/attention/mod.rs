//! Attention kinds over tokens `(B, N, C)`.
//!
//! * [`DotAttention`]: softmax MHSA (DeiT) and ReLU(QKᵀ/√d)/L (Wortsman et al.) with optional
//!   qk-LayerNorm and gating: one N×N score matrix, two ways to turn it into weights.
//! * [`LinearAttention`]: SLA (SLAB) and FLatten focused linear attention: a positive feature map,
//!   the linear-attention core (KᵀV or QKᵀ first, chosen by cost), plus a depthwise conv on V
//!   shared by all heads. They differ only in the feature map and the normaliser's ε.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, PaddingConfig2d};
use burn::tensor::Tensor;
use burn::tensor::activation::{relu, softmax, softplus};
use burn::tensor::Device;
use serde::{Deserialize, Serialize};

pub mod cross_shaped;
pub mod cross_shaped_fast;
pub mod fast;
pub mod kernels;
mod onnx;
pub mod spatial_reduction;
pub mod spatial_reduction_fast;
pub mod window;
pub mod window_fast;

pub use fast::{AttentionActivations, AttentionScratch, FastAttention};

use super::fuse::fold_into_next_linear;
use super::linear::linear;
use super::norm::LayerNorm;
use crate::error::{Error, Result, check_tokens};

/// Which attention a block uses (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttentionKind {
    /// softmax(QKᵀ/√d)·V.
    Softmax,
    /// ReLU(QKᵀ/√d)/L·V, optionally with LayerNorm on q and k (per head) and an output gate.
    ReluL { qk_norm: bool, gated: bool },
    /// SLAB's simplified linear attention: ReLU kernels, positional encoding on K, DWC on V.
    Sla { kernel_size: usize },
    /// FLatten focused linear attention (focusing power p, learnable softplus scale).
    Focused { power: f64, kernel_size: usize },
}

impl AttentionKind {
    pub fn sla() -> Self {
        AttentionKind::Sla { kernel_size: 5 }
    }

    pub fn focused() -> Self {
        AttentionKind::Focused {
            power: 3.0,
            kernel_size: 5,
        }
    }

    /// Linear attention needs the tokens on a square-or-rectangular grid (DWC, positional
    /// encoding): no extra tokens such as a class token.
    pub fn needs_grid(&self) -> bool {
        matches!(self, AttentionKind::Sla { .. } | AttentionKind::Focused { .. })
    }
}

/// What an attention layer is built from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    pub dim: usize,
    pub num_heads: usize,
    pub qkv_bias: bool,
    pub kind: AttentionKind,
    /// Token grid (rows, cols); required by the linear kinds, whose N is fixed by it.
    pub grid: Option<[usize; 2]>,
}

impl AttentionConfig {
    pub fn validate(&self) -> Result<()> {
        if self.num_heads == 0 || !self.dim.is_multiple_of(self.num_heads) {
            return Err(Error::Config(format!(
                "attention dim {} is not divisible by num_heads {}",
                self.dim, self.num_heads
            )));
        }
        match self.kind {
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                if kernel_size % 2 == 0 {
                    return Err(Error::Config(format!(
                        "linear attention DWC kernel_size must be odd, got {kernel_size}"
                    )));
                }
                if self.grid.is_none() {
                    return Err(Error::Config(
                        "linear attention needs a token grid (no class token)".into(),
                    ));
                }
            }
            _ => {}
        }
        if let AttentionKind::Focused { power, .. } = self.kind
            && !(power.is_finite() && power > 0.0)
        {
            return Err(Error::Config(format!("focusing power must be > 0, got {power}")));
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Attention {
        let dim = self.dim;
        let head_dim = dim / self.num_heads;
        let qkv = linear(dim, 3 * dim, self.qkv_bias, device);
        let proj = linear(dim, dim, true, device);
        match self.kind {
            AttentionKind::Softmax | AttentionKind::ReluL { .. } => {
                let (qk_norm, gated, score) = match self.kind {
                    AttentionKind::ReluL { qk_norm, gated } => (qk_norm, gated, Score::ReluOverLength),
                    _ => (false, false, Score::Softmax),
                };
                let norm = || qk_norm.then(|| LayerNorm::new(head_dim, 1e-6, device));
                Attention::Dot(DotAttention {
                    qkv,
                    q_norm: norm(),
                    k_norm: norm(),
                    gate: gated.then(|| linear(dim, dim, true, device)),
                    proj,
                    num_heads: self.num_heads,
                    score,
                })
            }
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                let [rows, cols] = self.grid.expect("validated: linear attention has a grid");
                let pad = kernel_size / 2;
                let (feature_map, scale) = match self.kind {
                    AttentionKind::Focused { power, .. } => (
                        FeatureMap::Focused { power },
                        Some(Initializer::Zeros.init([1, 1, dim], device)),
                    ),
                    _ => (FeatureMap::Relu, None),
                };
                Attention::Linear(LinearAttention {
                    qkv,
                    proj,
                    positional_encoding: Initializer::Zeros.init([1, rows * cols, dim], device),
                    dwc: Conv2dConfig::new([head_dim, head_dim], [kernel_size, kernel_size])
                        .with_groups(head_dim)
                        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                        .init(device),
                    scale,
                    num_heads: self.num_heads,
                    grid: [rows, cols],
                    feature_map,
                })
            }
        }
    }

    /// Trainable parameters.
    pub fn param_count(&self) -> usize {
        let c = self.dim;
        let d = c / self.num_heads;
        let projections = c * 3 * c + if self.qkv_bias { 3 * c } else { 0 } + c * c + c;
        match self.kind {
            AttentionKind::Softmax => projections,
            AttentionKind::ReluL { qk_norm, gated } => {
                projections
                    + if qk_norm { 4 * d } else { 0 }
                    + if gated { c * c + c } else { 0 }
            }
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                let [rows, cols] = self.grid.unwrap_or([0, 0]);
                let scale = if matches!(self.kind, AttentionKind::Focused { .. }) { c } else { 0 };
                projections + rows * cols * c + d * kernel_size * kernel_size + d + scale
            }
        }
    }

    /// Multiply-accumulates of one forward over `n` tokens (one image), the papers' FLOPs.
    pub fn macs(&self, n: usize) -> u64 {
        let (n, c, h) = (n as u64, self.dim as u64, self.num_heads as u64);
        let d = c / h;
        let projections = n * c * 3 * c + n * c * c;
        match self.kind {
            AttentionKind::Softmax => projections + 2 * n * n * c,
            AttentionKind::ReluL { gated, .. } => {
                projections + 2 * n * n * c + if gated { n * c * c } else { 0 }
            }
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                let k2 = (kernel_size * kernel_size) as u64;
                projections + h * linear_core_macs(n, d) + h * n * d * k2
            }
        }
    }
}

/// Multiply-accumulates of one head's linear-attention core over `n` tokens of width `d`, in the
/// order [`linear_attention_core`] takes.
pub fn linear_core_macs(n: u64, d: u64) -> u64 {
    if linear_order(n as usize, n as usize, d as usize, d as usize) {
        2 * n * d * d + 2 * n * d // KᵀV, Q·(KᵀV), normaliser
    } else {
        2 * n * n * d + 2 * n * d // QKᵀ, (QKᵀ)·V, normaliser
    }
}

/// An attention layer of any kind; adds no component to parameter keys.
#[derive(Module, Debug)]
pub enum Attention {
    Dot(DotAttention),
    Linear(LinearAttention),
}

impl Attention {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Attention::Dot(a) => a.forward(x),
            Attention::Linear(a) => a.forward(x),
        }
    }

    pub fn dim(&self) -> usize {
        self.qkv().weight.lazy_shape()[0]
    }

    /// The input projection.
    pub fn qkv(&self) -> &Linear {
        match self {
            Attention::Dot(a) => &a.qkv,
            Attention::Linear(a) => &a.qkv,
        }
    }

    /// The fuse rule of a preceding norm: `attn(a ⊙ x + b)` as one attention, the affine folded
    /// into every Linear that reads the input (qkv, and the gate of gated ReLU attention).
    pub fn fold_input(&self, a: Tensor<1>, b: Tensor<1>) -> Self {
        match self {
            Attention::Dot(attn) => Attention::Dot(DotAttention {
                qkv: fold_into_next_linear(&attn.qkv, a.clone(), b.clone()),
                gate: attn.gate.as_ref().map(|gate| fold_into_next_linear(gate, a, b)),
                ..attn.clone()
            }),
            Attention::Linear(attn) => Attention::Linear(LinearAttention { qkv: fold_into_next_linear(&attn.qkv, a, b), ..attn.clone() }),
        }
    }

    /// Tokens this layer is fixed to (linear kinds), if any.
    pub fn tokens(&self) -> Option<usize> {
        match self {
            Attention::Dot(_) => None,
            Attention::Linear(a) => Some(a.grid[0] * a.grid[1]),
        }
    }

    /// [`forward`](Self::forward) after checking the input shape.
    pub fn try_forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        check_tokens("attention", x.dims(), self.tokens(), self.dim())?;
        Ok(self.forward(x))
    }
}

/// How scores become attention weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    Softmax,
    /// ReLU(s)/L, L = number of keys.
    ReluOverLength,
}

/// Attention that forms the N×N score matrix: softmax or ReLU/L.
#[derive(Module, Debug)]
pub struct DotAttention {
    pub qkv: Linear,
    pub q_norm: Option<LayerNorm>,
    pub k_norm: Option<LayerNorm>,
    pub gate: Option<Linear>,
    pub proj: Linear,
    pub num_heads: usize,
    #[module(skip)]
    pub score: Score,
}

impl DotAttention {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.num_heads;
        let d = c / h;
        let qkv = self.qkv.forward(x.clone()).reshape([b, n, 3, h, d]); // (B, N, 3, h, d)
        let [q, k, v] = split_qkv_heads(qkv); // each (B, h, N, d)
        let q = match &self.q_norm {
            Some(norm) => norm.forward(q),
            None => q,
        };
        let k = match &self.k_norm {
            Some(norm) => norm.forward(k),
            None => k,
        };
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar((d as f64).powf(-0.5)); // (B, h, N, N)
        let weights = match self.score {
            Score::Softmax => softmax(scores, 3),
            Score::ReluOverLength => relu(scores).div_scalar(n as f64),
        };
        let out = merge_heads(weights.matmul(v)); // (B, N, C)
        let out = match &self.gate {
            Some(gate) => out.mul(gate.forward(x)),
            None => out,
        };
        self.proj.forward(out)
    }
}

/// (B, N, 3, h, d) → q, k, v as (B, h, N, d).
fn split_qkv_heads(qkv: Tensor<5>) -> [Tensor<4>; 3] {
    let [b, n, _, h, d] = qkv.dims();
    [0, 1, 2].map(|i| {
        qkv.clone()
            .narrow(2, i, 1)
            .reshape([b, n, h, d])
            .swap_dims(1, 2)
    })
}

/// (B, N, C) → (B, h, N, d): channel j belongs to head j / d.
pub(super) fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// (B, h, N, d) → (B, N, h·d).
pub(super) fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// The positive feature map φ of a linear attention.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FeatureMap {
    /// φ(x) = ReLU(x) (SLA).
    Relu,
    /// FLatten: φ(x) = f_p((ReLU(x) + 1e-6) / softplus(θ)), f_p(x) = x^p·‖x‖/‖x^p‖.
    Focused { power: f64 },
}

/// SLA and FLatten: linear attention with a positional encoding on K and a depthwise conv on V.
#[derive(Module, Debug)]
pub struct LinearAttention {
    pub qkv: Linear,
    pub proj: Linear,
    /// (1, N, C), added to k before the feature map.
    pub positional_encoding: Param<Tensor<3>>,
    /// Depthwise conv over head_dim channels, shared by every head.
    pub dwc: Conv2d,
    /// FLatten's per-channel θ, scale = softplus(θ); absent for SLA.
    pub scale: Option<Param<Tensor<3>>>,
    pub num_heads: usize,
    pub grid: [usize; 2],
    #[module(skip)]
    pub feature_map: FeatureMap,
}

impl LinearAttention {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let h = self.num_heads;
        let qkv = self.qkv.forward(x).reshape([b, n, 3, c]); // (B, N, 3, C)
        let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(2, i, 1).reshape([b, n, c]));
        let k = k.add(self.positional_encoding.val());
        let eps = linear_attention_eps(self.feature_map, n);
        let (q, k) = self.feature_map.apply(q, k, self.scale.as_ref().map(Param::val));
        let v = split_heads(v, h); // (B, h, N, d)
        let out = linear_attention_core(split_heads(q, h), split_heads(k, h), v.clone(), eps);
        let out = out.add(self.depthwise_branch(v)); // (B, h, N, d)
        self.proj.forward(merge_heads(out))
    }

    /// DWC(V) on the token grid.
    fn depthwise_branch(&self, v: Tensor<4>) -> Tensor<4> {
        shared_depthwise(&self.dwc, v, self.grid)
    }
}

impl FeatureMap {
    /// φ(q), φ(k) of (B, N, C) queries and keys (k with its positional encoding added). `theta`
    /// is FLatten's (1, 1, C) scale parameter; ReLU ignores it.
    pub fn apply(self, q: Tensor<3>, k: Tensor<3>, theta: Option<Tensor<3>>) -> (Tensor<3>, Tensor<3>) {
        match self {
            FeatureMap::Relu => (relu(q), relu(k)),
            FeatureMap::Focused { power } => {
                let scale = softplus(theta.expect("focused attention has a scale"), 1.0); // (1, 1, C)
                let focus = |t: Tensor<3>| focus_power(relu(t).add_scalar(FOCUS_OFFSET).div(scale.clone()), power);
                (focus(q), focus(k))
            }
        }
    }
}

/// DWC(V): each head's v of (B, h, N, d) as a d-channel image on the (rows, cols) grid, tokens
/// row-major, one depthwise conv shared by every head.
pub fn shared_depthwise(dwc: &Conv2d, v: Tensor<4>, [rows, cols]: [usize; 2]) -> Tensor<4> {
    let [b, h, n, d] = v.dims();
    let image = v.reshape([b * h, n, d]).swap_dims(1, 2).reshape([b * h, d, rows, cols]); // (B·h, d, rows, cols)
    let conv = dwc.forward(image);
    conv.reshape([b * h, d, n]).swap_dims(1, 2).reshape([b, h, n, d])
}

/// FLatten's offset inside its feature map, `ReLU(x) + 1e-6`, before the scale.
pub const FOCUS_OFFSET: f64 = 1e-6;

/// The linear-attention normaliser's ε: SLA's `q·Σk + 1e-6`; FLatten normalises with the mean of
/// k, which is the sum form with ε scaled by the N keys.
pub fn linear_attention_eps(feature_map: FeatureMap, keys: usize) -> f64 {
    match feature_map {
        FeatureMap::Relu => 1e-6,
        FeatureMap::Focused { .. } => 1e-6 * keys as f64,
    }
}

/// f_p(x) = x^p / ‖x^p‖ · ‖x‖ over the channel axis (x > 0). Powers above 6 are taken of x/max(x)
/// first, as FLatten does, to stay in range.
fn focus_power(x: Tensor<3>, power: f64) -> Tensor<3> {
    let norm = x.clone().powf_scalar(2.0).sum_dim(2).sqrt(); // (B, N, 1)
    let x = if power <= 6.0 {
        x
    } else {
        let max = x.clone().max_dim(2);
        x.div(max)
    };
    let xp = x.powf_scalar(power);
    let norm_p = xp.clone().powf_scalar(2.0).sum_dim(2).sqrt();
    xp.div(norm_p).mul(norm)
}

/// Whether K·V first (`d_k × d_v` state) is cheaper than Q·Kᵀ first (`N_q × N_k` matrix), the
/// official rule: `n_q·n_k·(c + d) > c·d·(n_q + n_k)`.
pub fn linear_order(n_q: usize, n_k: usize, c: usize, d: usize) -> bool {
    n_q * n_k * (c + d) > c * d * (n_q + n_k)
}

/// out_i = Σ_j (q_i·k_j) v_j / (q_i·Σ_j k_j + ε) for q, k, v of shape (B, h, N, d), evaluated in
/// whichever order costs less; both orders are the same sum.
pub fn linear_attention_core(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, eps: f64) -> Tensor<4> {
    let [_, _, n_q, c] = q.dims();
    let [_, _, n_k, d] = v.dims();
    linear_attention_core_ordered(q, k, v, eps, linear_order(n_q, n_k, c, d))
}

/// The core in a chosen order (`kv_first`: Q·(KᵀV); otherwise (QKᵀ)·V).
pub fn linear_attention_core_ordered(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    eps: f64,
    kv_first: bool,
) -> Tensor<4> {
    let k_sum = k.clone().sum_dim(2); // (B, h, 1, c)
    let denominator = q.clone().mul(k_sum).sum_dim(3).add_scalar(eps); // (B, h, N, 1)
    let numerator = if kv_first {
        q.matmul(k.swap_dims(2, 3).matmul(v)) // (B, h, N, c)·(B, h, c, d)
    } else {
        q.matmul(k.swap_dims(2, 3)).matmul(v) // (B, h, N, N)·(B, h, N, d)
    };
    numerator.div(denominator)
}

#[cfg(test)]
mod tests {
    use super::*;
    

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn max_abs<const D: usize>(t: Tensor<D>) -> f32 {
        values(t.abs().max())[0]
    }

    fn positive(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
        relu(crate::testing::standard_normal(shape, seed, device))
    }

    #[test]
    fn order_rule_matches_spec() {
        // SPEC §7.3 item 16 (c = d = 64).
        assert!(!linear_order(49, 49, 64, 64));
        assert!(!linear_order(64, 64, 64, 64)); // a tie is not "greater"
        assert!(linear_order(65, 65, 64, 64));
        assert!(linear_order(196, 196, 64, 64));
    }

    #[test]
    fn both_orders_compute_the_same_attention() {
        let device = Device::flex();
        for n in [16, 49, 64, 65, 196, 3136] {
            for d in [32, 64] {
                let [q, k, v] = [0, 1, 2].map(|i| positive([1, 2, n, d], 50 + i, &device));
                let kv_first = linear_attention_core_ordered(q.clone(), k.clone(), v.clone(), 1e-6, true);
                let qk_first = linear_attention_core_ordered(q, k, v, 1e-6, false);
                let scale = max_abs(qk_first.clone());
                let diff = max_abs(kv_first.sub(qk_first));
                assert!(diff <= 1e-5 * scale, "n={n} d={d}: {diff} vs scale {scale}");
            }
        }
    }

    #[test]
    fn sla_cost_is_linear_in_tokens_and_softmax_quadratic() {
        let config = |kind| AttentionConfig { dim: 192, num_heads: 3, qkv_bias: true, kind, grid: Some([32, 32]) };
        let sla = config(AttentionKind::sla());
        let softmax = config(AttentionKind::Softmax);
        // Attention cores only (projections are linear in N for both).
        let core = |c: &AttentionConfig, n: usize| c.macs(n) - 4 * (n * 192 * 192) as u64;
        for n in [1024, 2048, 4096] {
            assert_eq!(core(&sla, 2 * n), 2 * core(&sla, n), "SLA core at N = {n}");
            assert_eq!(core(&softmax, 2 * n), 4 * core(&softmax, n), "softmax core at N = {n}");
        }
        // DeiT-T layer (h = 3, d = 64, N = 196): linear order, 2·N·d² + 2·N·d per head (+ DWC).
        let deit = AttentionConfig { grid: Some([14, 14]), ..sla };
        let per_head = 2 * 196 * 64 * 64 + 2 * 196 * 64;
        assert_eq!(core(&deit, 196), 3 * (per_head + 25 * 196 * 64));
    }

    #[test]
    fn zero_query_rows_give_only_the_conv_term_without_nan() {
        let device = Device::flex();
        let mut q = positive([1, 1, 16, 8], 53, &device);
        q = q.slice_assign([0..1, 0..1, 0..1, 0..8], Tensor::zeros([1, 1, 1, 8], &device));
        let out = linear_attention_core(q, positive([1, 1, 16, 8], 54, &device), positive([1, 1, 16, 8], 55, &device), 1e-6);
        let row0 = values(out.clone().narrow(2, 0, 1));
        assert!(row0.iter().all(|v| *v == 0.0));
        assert!(values(out).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn dwc_is_shared_across_heads() {
        let device = Device::flex();
        for heads in [1, 2, 4] {
            let config = AttentionConfig { dim: 64, num_heads: heads, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([4, 4]) };
            let Attention::Linear(attn) = config.init(&device) else { panic!("SLA is linear") };
            let d = 64 / heads;
            assert_eq!(attn.dwc.weight.dims(), [d, 1, 5, 5]);
            // Permuting heads permutes the DWC outputs the same way.
            let v = crate::testing::standard_normal([1, heads, 16, d], 16, &device);
            let out = attn.depthwise_branch(v.clone());
            let flipped = attn.depthwise_branch(v.flip([1]));
            assert!(max_abs(out.flip([1]).sub(flipped)) < 1e-6);
        }
    }

    #[test]
    fn focusing_keeps_the_norm_and_softplus_zero_is_ln2() {
        let device = Device::flex();
        let x = relu(crate::testing::standard_normal([2, 5, 16], 17, &device)).add_scalar(1e-6);
        for p in [3.0, 8.0] {
            let f = focus_power(x.clone(), p);
            let norm_x = x.clone().powf_scalar(2.0).sum_dim(2).sqrt();
            let norm_f = f.powf_scalar(2.0).sum_dim(2).sqrt();
            assert!(max_abs(norm_f.sub(norm_x.clone()).div(norm_x)) < 1e-5);
        }
        let s = values(softplus(Tensor::<1>::zeros([1], &device), 1.0))[0];
        assert!((s - std::f32::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn focused_attention_is_a_positive_row_normalised_weighting() {
        let device = Device::flex();
        let config = AttentionConfig { dim: 32, num_heads: 2, qkv_bias: true, kind: AttentionKind::focused(), grid: Some([4, 4]) };
        let Attention::Linear(attn) = config.init(&device) else { panic!("FLatten is linear") };
        let x = crate::testing::standard_normal([2, 16, 32], 18, &device);
        let qkv = attn.qkv.forward(x).reshape([2, 16, 3, 32]);
        let theta = attn.scale.as_ref().unwrap().val();
        let scale = softplus(theta, 1.0);
        let feature = |i: usize| {
            let t = qkv.clone().narrow(2, i, 1).reshape([2, 16, 32]);
            split_heads(focus_power(relu(t).add_scalar(1e-6).div(scale.clone()), 3.0), 2)
        };
        let (q, k) = (feature(0), feature(1));
        // Attention weights of the quadratic form: A_ij = q_i·k_j / Σ_j q_i·k_j.
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3));
        assert!(values(scores.clone()).iter().all(|s| *s > 0.0));
        let weights = scores.clone().div(scores.sum_dim(3));
        let ones = Tensor::<4>::ones([2, 2, 16, 1], &device);
        // Rows sum to one; the ε (FLatten: N·1e-6) only guards zero rows, so leave it out here.
        let row_sums = linear_attention_core(q.clone(), k.clone(), ones, 0.0);
        assert!(max_abs(row_sums.sub_scalar(1.0)) < 1e-5);
        // The linear form equals the quadratic one.
        let v = crate::testing::standard_normal([2, 2, 16, 16], 19, &device);
        let linear_form = linear_attention_core_ordered(q, k, v.clone(), 0.0, true);
        assert!(max_abs(linear_form.sub(weights.matmul(v))) < 1e-4);
    }

    #[test]
    fn relu_over_length_rows_sum_to_one_over_sqrt_two_pi() {
        // SPEC §7.3 item 21: q, k ~ N(0, 1), s = q·k/√d → mean_i Σ_j ReLU(s_ij)/L → 1/√(2π).
        let device = Device::flex();
        let (l, d) = (4096, 64);
        let q = crate::testing::standard_normal([1, 1, l, d], 20, &device);
        let k = crate::testing::standard_normal([1, 1, l, d], 21, &device);
        let s = q.matmul(k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        let row_sums = relu(s.clone()).div_scalar(l as f64).sum_dim(3);
        let mean = values(row_sums.mean())[0];
        assert!((mean - 0.398_942).abs() < 0.01, "{mean}");
        let softmax_sums = softmax(s, 3).sum_dim(3);
        assert!(max_abs(softmax_sums.sub_scalar(1.0)) < 1e-5);
    }

    #[test]
    fn relu_attention_with_qk_norm_and_gate_has_the_extra_parameters() {
        let device = Device::flex();
        let config = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind: AttentionKind::ReluL { qk_norm: true, gated: true }, grid: None };
        let attn = config.init(&device);
        assert_eq!(crate::state::trainable_param_count(&attn), config.param_count());
        let x = crate::testing::standard_normal([2, 10, 48], 22, &device);
        assert_eq!(attn.try_forward(x).unwrap().dims(), [2, 10, 48]);
        let keys: Vec<String> = crate::state::collect_state(&attn).keys().cloned().collect();
        for key in ["q_norm.weight", "k_norm.bias", "gate.weight", "qkv.weight", "proj.bias"] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
    }

    #[test]
    fn attention_rejects_wrong_shapes_and_configs() {
        let device = Device::flex();
        let sla = AttentionConfig { dim: 32, num_heads: 2, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([4, 4]) };
        let attn = sla.init(&device);
        let err = attn.try_forward(Tensor::zeros([1, 15, 32], &device)).unwrap_err();
        assert!(err.to_string().contains("[1, 15, 32]"), "{err}");
        assert!(attn.try_forward(Tensor::zeros([1, 16, 30], &device)).is_err());
        assert!(AttentionConfig { num_heads: 3, ..sla }.validate().is_err());
        assert!(AttentionConfig { grid: None, ..sla }.validate().is_err());
        assert!(AttentionConfig { kind: AttentionKind::Sla { kernel_size: 4 }, ..sla }.validate().is_err());
    }
}
