//! PVT's attention over a token grid with spatially reduced keys and values (SPEC §3.3, §3.4
//! item 8). Queries come from all N = H·W tokens; keys and values from the grid reduced by a
//! stride-R, R×R conv (`sr`) and a norm when R > 1, from all tokens when R = 1. Separate `q` and
//! `kv` projections, as the official PVT code has them.
//!
//! * softmax (PVT v1 SRA): softmax(QKᵀ/√d)·V over the N/R² reduced tokens.
//! * SLA / FLatten (SLAB-PVT, FLatten-PVT): the linear-attention core and feature maps of
//!   [`LinearAttention`](super::LinearAttention), the positional encoding added to the N/R²
//!   reduced keys, and v linearly interpolated along the token axis back to N
//!   (`F.interpolate(mode='linear', align_corners=False)`) before the shared depthwise conv.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, PaddingConfig2d};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::{AttentionConfig, AttentionKind, FeatureMap, linear_attention_core, linear_attention_eps, linear_order, merge_heads, onnx, shared_depthwise, split_heads};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int};
use crate::error::{Error, Result, check_tokens};
use crate::nn::fuse::{fold_into_next_conv, fold_into_next_linear};
use crate::nn::linear::linear;
use crate::nn::norm::{Norm, NormKind};

/// What a spatial-reduction attention layer is built from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SrAttentionConfig {
    pub dim: usize,
    pub num_heads: usize,
    pub qkv_bias: bool,
    /// Softmax, SLA or FLatten.
    pub kind: AttentionKind,
    /// R: keys and values come from the grid reduced R× along each axis (1: no reduction).
    pub sr_ratio: usize,
    /// Token grid (rows, cols) of the input.
    pub grid: [usize; 2],
    /// The norm after the reduction conv (only built when `sr_ratio > 1`).
    pub norm: NormKind,
}

impl SrAttentionConfig {
    /// Grid of the keys and values: the conv's floor(H/R) × floor(W/R).
    pub fn reduced_grid(&self) -> [usize; 2] {
        let r = self.sr_ratio.max(1);
        [self.grid[0] / r, self.grid[1] / r]
    }

    fn tokens(&self) -> usize {
        self.grid[0] * self.grid[1]
    }

    fn reduced_tokens(&self) -> usize {
        let [rows, cols] = self.reduced_grid();
        rows * cols
    }

    pub fn validate(&self) -> Result<()> {
        if matches!(self.kind, AttentionKind::ReluL { .. }) {
            return Err(Error::Config("spatial-reduction attention is softmax, SLA or FLatten, not ReLU/L".into()));
        }
        AttentionConfig { dim: self.dim, num_heads: self.num_heads, qkv_bias: self.qkv_bias, kind: self.kind, grid: Some(self.grid) }.validate()?;
        if self.sr_ratio == 0 {
            return Err(Error::Config("sr_ratio must be ≥ 1".into()));
        }
        if self.reduced_tokens() == 0 {
            return Err(Error::Config(format!(
                "sr_ratio {} reduces the {:?} token grid to nothing",
                self.sr_ratio, self.grid
            )));
        }
        self.norm.validate()
    }

    /// Built unchecked; [`validate`](Self::validate) first (the family's `init` does).
    pub fn init(&self, device: &Device) -> SpatialReductionAttention {
        let (c, r) = (self.dim, self.sr_ratio);
        let head_dim = c / self.num_heads;
        let reduce = r > 1;
        let core = match self.kind {
            AttentionKind::Sla { .. } => Core::Linear(FeatureMap::Relu),
            AttentionKind::Focused { power, .. } => Core::Linear(FeatureMap::Focused { power }),
            _ => Core::Softmax,
        };
        let dwc = match self.kind {
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                let pad = kernel_size / 2;
                Some(
                    Conv2dConfig::new([head_dim, head_dim], [kernel_size, kernel_size])
                        .with_groups(head_dim)
                        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                        .init(device),
                )
            }
            _ => None,
        };
        SpatialReductionAttention {
            q: linear(c, c, self.qkv_bias, device),
            kv: linear(c, 2 * c, self.qkv_bias, device),
            proj: linear(c, c, true, device),
            sr: reduce.then(|| Conv2dConfig::new([c, c], [r, r]).with_stride([r, r]).init(device)),
            norm: reduce.then(|| self.norm.init(c, device)),
            positional_encoding: matches!(core, Core::Linear(_))
                .then(|| Initializer::Zeros.init([1, self.reduced_tokens(), c], device)),
            dwc,
            scale: matches!(core, Core::Linear(FeatureMap::Focused { .. })).then(|| Initializer::Zeros.init([1, 1, c], device)),
            num_heads: self.num_heads,
            grid: self.grid,
            core,
        }
    }

    /// Trainable parameters.
    pub fn param_count(&self) -> usize {
        let (c, r) = (self.dim, self.sr_ratio);
        let d = c / self.num_heads;
        let bias = usize::from(self.qkv_bias);
        let projections = c * c + bias * c + 2 * c * c + bias * 2 * c + c * c + c;
        let reduction = if r > 1 { c * c * r * r + c + self.norm.param_count(c) } else { 0 };
        let linear = match self.kind {
            AttentionKind::Sla { kernel_size } => self.reduced_tokens() * c + d * kernel_size * kernel_size + d,
            AttentionKind::Focused { kernel_size, .. } => self.reduced_tokens() * c + d * kernel_size * kernel_size + d + c,
            _ => 0,
        };
        projections + reduction + linear
    }

    /// Multiply-accumulates of one forward over one image's N tokens.
    pub fn macs(&self) -> u64 {
        let (n, n_r) = (self.tokens() as u64, self.reduced_tokens() as u64);
        let (c, h, r) = (self.dim as u64, self.num_heads as u64, self.sr_ratio as u64);
        let d = c / h;
        let projections = n * c * c + n_r * c * 2 * c + n * c * c; // q, kv, proj
        let reduction = if r > 1 { n_r * c * c * r * r } else { 0 };
        let core = match self.kind {
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                let products = if linear_order(n as usize, n_r as usize, d as usize, d as usize) {
                    n_r * d * d + n * d * d // KᵀV, Q·(KᵀV)
                } else {
                    2 * n * n_r * d // QKᵀ, (QKᵀ)·V
                };
                let normaliser = n_r * d + n * d;
                h * (products + normaliser + n * d * (kernel_size * kernel_size) as u64)
            }
            _ => 2 * n * n_r * c, // QKᵀ and AV over all heads
        };
        projections + reduction + core
    }
}

/// How the queries meet the (reduced) keys.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Core {
    /// softmax(QKᵀ/√d)·V.
    Softmax,
    /// The linear-attention core with this feature map, plus the depthwise conv on V.
    Linear(FeatureMap),
}

/// Attention with spatially reduced keys and values; field names are the official keys
/// (`q`, `kv`, `proj`, `sr`, `norm`, `positional_encoding`, `dwc`, FLatten's `scale`).
#[derive(Module, Debug)]
pub struct SpatialReductionAttention {
    pub q: Linear,
    pub kv: Linear,
    pub proj: Linear,
    /// R×R stride-R conv over the token grid, when R > 1.
    pub sr: Option<Conv2d>,
    /// The norm after `sr`; absent without reduction and once folded into `kv`.
    pub norm: Option<Norm>,
    /// Linear kinds: (1, N/R², C), added to the reduced keys before the feature map.
    pub positional_encoding: Option<Param<Tensor<3>>>,
    /// Linear kinds: depthwise conv over head_dim channels, shared by every head.
    pub dwc: Option<Conv2d>,
    /// FLatten's per-channel θ, scale = softplus(θ).
    pub scale: Option<Param<Tensor<3>>>,
    pub num_heads: usize,
    pub grid: [usize; 2],
    #[module(skip)]
    pub core: Core,
}

impl SpatialReductionAttention {
    /// (B, N, C) → (B, N, C), N = the grid's tokens.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [_, n, c] = x.dims();
        let h = self.num_heads;
        let q = self.q.forward(x.clone()); // (B, N, C)
        let (k, v) = self.keys_values(x); // each (B, N_r, C)
        let keys = k.dims()[1];
        let out = match self.core {
            Core::Softmax => {
                let d = c / h;
                let scores = split_heads(q, h)
                    .matmul(split_heads(k, h).swap_dims(2, 3))
                    .mul_scalar((d as f64).powf(-0.5)); // (B, h, N, N_r)
                softmax(scores, 3).matmul(split_heads(v, h)) // (B, h, N, d)
            }
            Core::Linear(feature_map) => {
                let pos = self.positional_encoding.as_ref().expect("linear attention has a positional encoding");
                let k = k.add(pos.val());
                let (q, k) = feature_map.apply(q, k, self.scale.as_ref().map(Param::val));
                let v = split_heads(v, h); // (B, h, N_r, d)
                let eps = linear_attention_eps(feature_map, keys);
                let out = linear_attention_core(split_heads(q, h), split_heads(k, h), v.clone(), eps); // (B, h, N, d)
                // The official code interpolates exactly when it reduced (sr_ratio > 1).
                let v = if self.sr.is_some() { interpolate_tokens(v, n) } else { v }; // (B, h, N, d)
                let dwc = self.dwc.as_ref().expect("linear attention has a depthwise conv");
                out.add(shared_depthwise(dwc, v, self.grid))
            }
        };
        self.proj.forward(merge_heads(out))
    }

    /// k and v (B, N_r, C): from `norm(sr(x))` on the reduced grid, or from x itself.
    fn keys_values(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let [b, _, c] = x.dims();
        let source = match &self.sr {
            Some(sr) => {
                let [rows, cols] = self.grid;
                let image = x.swap_dims(1, 2).reshape([b, c, rows, cols]); // (B, C, H, W)
                let reduced = sr.forward(image); // (B, C, H/R, W/R)
                let [_, _, hr, wr] = reduced.dims();
                let tokens = reduced.reshape([b, c, hr * wr]).swap_dims(1, 2); // (B, N_r, C)
                match &self.norm {
                    Some(norm) => norm.forward(tokens),
                    None => tokens,
                }
            }
            None => x,
        };
        let keys = source.dims()[1];
        let kv = self.kv.forward(source).reshape([b, keys, 2, c]); // (B, N_r, 2, C): k, then v
        let [k, v] = [0, 1].map(|i| kv.clone().narrow(2, i, 1).reshape([b, keys, c]));
        (k, v)
    }

    pub fn dim(&self) -> usize {
        self.q.weight.lazy_shape()[0]
    }

    /// Tokens the layer is built for.
    pub fn tokens(&self) -> usize {
        self.grid[0] * self.grid[1]
    }

    /// [`forward`](Self::forward) after checking the input is (B > 0, N, C).
    pub fn try_forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        check_tokens("spatial-reduction attention", x.dims(), Some(self.tokens()), self.dim())?;
        Ok(self.forward(x))
    }

    /// The fuse rule of a preceding norm: `attn(a ⊙ x + b)` as one attention, the affine folded
    /// into every layer that reads the input: `q`, and `sr` (when reducing) or `kv`.
    pub fn fold_input(&self, a: Tensor<1>, b: Tensor<1>) -> Result<Self> {
        let q = fold_into_next_linear(&self.q, a.clone(), b.clone());
        let (sr, kv) = match &self.sr {
            Some(sr) => {
                let folded = fold_into_next_conv(sr, a, b).ok_or_else(|| Error::Unsupported { what: "a padded or grouped reduction conv".into(), path: "fuse" })?;
                (Some(folded), self.kv.clone())
            }
            None => (None, fold_into_next_linear(&self.kv, a, b)),
        };
        Ok(Self { q, kv, sr, ..self.clone() })
    }

    /// The reduction's norm folded into `kv` (the norm is gone); unchanged without one.
    pub fn fuse(&self) -> Result<Self> {
        let Some(norm) = &self.norm else {
            return Ok(self.clone());
        };
        let (a, b) = norm.eval_affine()?;
        Ok(Self { kv: fold_into_next_linear(&self.kv, a, b), norm: None, ..self.clone() })
    }
}

/// v (B, h, n, d) → (B, h, N, d) linearly interpolated along the tokens, as PyTorch's
/// `F.interpolate(mode='linear', align_corners=False)` computes it (f32 source positions
/// `(i + ½)·n/N − ½`, clamped at 0, the last token repeated at the end).
fn interpolate_tokens(v: Tensor<4>, n_out: usize) -> Tensor<4> {
    let (lower, upper, weight) = interpolation(v.dims()[2], n_out);
    let device = v.device();
    let index = |ids: Vec<i64>| Tensor::<1, Int>::from_data(TensorData::new(ids, [n_out]), &device);
    let upper_weight = Tensor::<4>::from_data(TensorData::new(weight, [1, 1, n_out, 1]), &device);
    let lower_weight = upper_weight.clone().neg().add_scalar(1.0);
    let below = v.clone().select(2, index(lower)).mul(lower_weight);
    below.add(v.select(2, index(upper)).mul(upper_weight))
}

/// Output token i of the interpolation from `n_in` to `n_out` tokens is
/// `(1 − w_i)·v[lower_i] + w_i·v[upper_i]`: (lower, upper, w).
pub(super) fn interpolation(n_in: usize, n_out: usize) -> (Vec<i64>, Vec<i64>, Vec<f32>) {
    let scale = n_in as f32 / n_out as f32;
    let mut lower = Vec::with_capacity(n_out);
    let mut upper = Vec::with_capacity(n_out);
    let mut weight = Vec::with_capacity(n_out);
    for i in 0..n_out {
        let source = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (source as usize).min(n_in - 1);
        lower.push(i0 as i64);
        upper.push((i0 + usize::from(i0 + 1 < n_in)) as i64);
        weight.push((source - i0 as f32).clamp(0.0, 1.0));
    }
    (lower, upper, weight)
}

/// Op for op as [`SpatialReductionAttention::forward`].
impl ToOnnx for SpatialReductionAttention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let [rows, cols] = self.grid;
        let n = rows * cols;
        let (c, h) = (self.dim(), self.num_heads);
        let d = c / h;
        let q = self.q.to_onnx(g, x)?; // (B, N, C)
        let (source, keys) = match &self.sr {
            Some(sr) => {
                let image = g.transpose(x, &[0, 2, 1]);
                let image = g.reshape(&image, &[0, c as i64, rows as i64, cols as i64]); // (B, C, H, W)
                let reduced = g.conv(&image, sr, 0); // (B, C, H/R, W/R)
                let reduced = g.reshape(&reduced, &[0, c as i64, -1]);
                let tokens = g.transpose(&reduced, &[0, 2, 1]); // (B, N_r, C)
                let tokens = match &self.norm {
                    Some(norm) => norm.to_onnx(g, &tokens)?,
                    None => tokens,
                };
                (tokens, (rows / sr.stride[0]) * (cols / sr.stride[1]))
            }
            None => (x.to_string(), n),
        };
        let kv = self.kv.to_onnx(g, &source)?;
        let kv = g.reshape(&kv, &[0, keys as i64, 2, c as i64]);
        let (k, v) = (g.gather(&kv, 0, 2), g.gather(&kv, 1, 2)); // (B, N_r, C)
        let out = match self.core {
            Core::Softmax => {
                let (q, k, v) = (g.split_heads(&q, n, h, d), g.split_heads(&k, keys, h, d), g.split_heads(&v, keys, h, d));
                let kt = g.transpose(&k, &[0, 1, 3, 2]);
                let scores = g.op("MatMul", &[&q, &kt], vec![]);
                let scores = g.binary_scalar("Mul", &scores, (d as f64).powf(-0.5) as f32);
                let weights = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
                g.op("MatMul", &[&weights, &v], vec![]) // (B, h, N, d)
            }
            Core::Linear(map) => {
                let pos = g.param("positional_encoding", self.positional_encoding.as_ref().expect("linear attention has a positional encoding"));
                let k = g.op("Add", &[&k, &pos], vec![]);
                let (q, k) = onnx::feature_map(g, map, self.scale.as_ref(), &q, &k);
                let (q, k, v) = (g.split_heads(&q, n, h, d), g.split_heads(&k, keys, h, d), g.split_heads(&v, keys, h, d));
                let out = onnx::linear_core(g, &q, &k, &v, [n, keys], d, linear_attention_eps(map, keys) as f32);
                let v = if self.sr.is_some() {
                    let (lower, upper, weight) = interpolation(keys, n);
                    let (lower, upper) = (g.ints("lower", &lower), g.ints("upper", &upper));
                    let lower_weight: Vec<f32> = weight.iter().map(|w| 1.0 - w).collect();
                    let lower_weight = g.floats("lower_weight", vec![1, 1, n as i64, 1], &lower_weight);
                    let upper_weight = g.floats("upper_weight", vec![1, 1, n as i64, 1], &weight);
                    let below = g.op("Gather", &[&v, &lower], vec![attr_int("axis", 2)]);
                    let below = g.op("Mul", &[&below, &lower_weight], vec![]);
                    let above = g.op("Gather", &[&v, &upper], vec![attr_int("axis", 2)]);
                    let above = g.op("Mul", &[&above, &upper_weight], vec![]);
                    g.op("Add", &[&below, &above], vec![]) // (B, h, N, d)
                } else {
                    v
                };
                let dwc = self.dwc.as_ref().expect("linear attention has a depthwise conv");
                let conv = onnx::depthwise_on_grid(g, dwc, &v, self.grid, h, d);
                g.op("Add", &[&out, &conv], vec![])
            }
        };
        let merged = g.merge_heads(&out, n, c);
        self.proj.to_onnx(g, &merged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::{Attention, LinearAttention};
    use crate::state::trainable_param_count;
    

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn max_abs<const D: usize>(t: Tensor<D>) -> f32 {
        values(t.abs().max())[0]
    }

    fn config(kind: AttentionKind, sr_ratio: usize, grid: [usize; 2]) -> SrAttentionConfig {
        SrAttentionConfig { dim: 24, num_heads: 2, qkv_bias: true, kind, sr_ratio, grid, norm: NormKind::repbn() }
    }

    #[test]
    fn token_interpolation_matches_pytorch_linear_without_corner_alignment() {
        let device = Device::flex();
        // F.interpolate([0, 1], size=4, mode='linear') = [0, 0.25, 0.75, 1].
        let v = Tensor::<4>::from_floats([[[[0.0], [1.0]]]], &device);
        assert_eq!(values(interpolate_tokens(v, 4)), [0.0, 0.25, 0.75, 1.0]);
        // [0, 1, 2] → 7 tokens: sources (i + ½)·3/7 − ½ clamped at 0.
        let v = Tensor::<4>::from_floats([[[[0.0], [1.0], [2.0]]]], &device);
        let want: Vec<f32> = (0..7).map(|i| ((i as f32 + 0.5) * 3.0 / 7.0 - 0.5).clamp(0.0, 2.0)).collect();
        let got = values(interpolate_tokens(v.clone(), 7));
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{got:?} vs {want:?}");
        assert_eq!(values(interpolate_tokens(v, 3)), [0.0, 1.0, 2.0]);
    }

    /// The R = 1 layer with `q`/`kv` equals the fused-`qkv` layer of the same kind.
    #[test]
    fn without_reduction_it_is_the_attention_of_the_same_kind_with_split_projections() {
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla(), AttentionKind::focused()] {
            let sr = crate::testing::randomized(config(kind, 1, [4, 5]).init(&device), 20.0, 5);
            let mut reference = AttentionConfig { dim: 24, num_heads: 2, qkv_bias: true, kind, grid: Some([4, 5]) }.init(&device);
            let weight = Tensor::cat(vec![sr.q.weight.val(), sr.kv.weight.val()], 1); // (in, 3C)
            let bias = Tensor::cat(vec![sr.q.bias.as_ref().unwrap().val(), sr.kv.bias.as_ref().unwrap().val()], 0);
            let qkv = Linear { weight: Param::from_tensor(weight), bias: Some(Param::from_tensor(bias)) };
            match &mut reference {
                Attention::Dot(a) => {
                    a.qkv = qkv;
                    a.proj = sr.proj.clone();
                }
                Attention::Linear(a) => {
                    *a = LinearAttention {
                        qkv,
                        proj: sr.proj.clone(),
                        positional_encoding: sr.positional_encoding.clone().unwrap(),
                        dwc: sr.dwc.clone().unwrap(),
                        scale: sr.scale.clone(),
                        ..a.clone()
                    }
                }
            }
            let x = crate::testing::standard_normal([2, 20, 24], 13, &device);
            let want = reference.forward(x.clone());
            let diff = max_abs(sr.forward(x).sub(want.clone()));
            assert!(diff <= 1e-5 * max_abs(want).max(1.0), "{kind:?}: {diff}");
        }
    }

    #[test]
    fn reduction_shrinks_the_keys_and_the_interpolated_values_feed_the_conv() {
        let device = Device::flex();
        let attn = config(AttentionKind::sla(), 2, [6, 4]).init(&device);
        assert_eq!(attn.positional_encoding.as_ref().unwrap().dims(), [1, 6, 24]);
        assert_eq!(attn.sr.as_ref().unwrap().weight.dims(), [24, 24, 2, 2]);
        let x = crate::testing::standard_normal([2, 24, 24], 14, &device);
        let (k, v) = attn.keys_values(x.clone());
        assert_eq!(k.dims(), [2, 6, 24]);
        assert_eq!(v.dims(), [2, 6, 24]);
        assert_eq!(attn.try_forward(x).unwrap().dims(), [2, 24, 24]);
    }

    #[test]
    fn parameters_match_the_count_and_the_official_keys() {
        let device = Device::flex();
        let prepbn = NormKind::prepbn(1e-6, 100);
        for kind in [AttentionKind::Softmax, AttentionKind::sla(), AttentionKind::focused()] {
            for r in [1, 2, 4] {
                let cfg = SrAttentionConfig { norm: prepbn, ..config(kind, r, [8, 8]) };
                let attn = cfg.init(&device);
                assert_eq!(trainable_param_count(&attn), cfg.param_count(), "{kind:?} R = {r}");
                let keys: Vec<String> = crate::state::collect_state(&attn).keys().cloned().collect();
                assert_eq!(keys.iter().any(|k| k == "sr.weight"), r > 1);
                assert_eq!(keys.iter().any(|k| k == "norm.norm2.bn.running_mean"), r > 1);
                assert_eq!(keys.iter().any(|k| k == "norm.iter"), r > 1);
                assert_eq!(keys.iter().any(|k| k == "dwc.weight"), kind != AttentionKind::Softmax);
                assert_eq!(keys.iter().any(|k| k == "scale"), kind == AttentionKind::focused());
                for key in ["q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"] {
                    assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
                }
            }
        }
    }

    #[test]
    fn folded_norms_leave_the_eval_output_unchanged() {
        // SPEC §2.8 F1 into q and into sr (R > 1) or kv (R = 1), and the reduction norm into kv.
        use crate::nn::norm::tests::randomized_repbn;
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla(), AttentionKind::focused()] {
            for r in [1, 2] {
                let cfg = SrAttentionConfig { norm: NormKind::prepbn(1e-6, 100), ..config(kind, r, [6, 4]) };
                let attn = crate::testing::randomized(cfg.init(&device), 10.0, 5);
                let input_norm = randomized_repbn(24, &device);
                let x = crate::testing::standard_normal([3, 24, 24], 15, &device);
                let want = attn.forward(input_norm.forward(x.clone()));
                let (a, b) = input_norm.affine();
                let fused = attn.fuse().unwrap().fold_input(a, b).unwrap();
                assert!(fused.norm.is_none());
                let diff = max_abs(fused.forward(x).sub(want.clone()));
                assert!(diff <= 1e-4 * max_abs(want).max(1.0), "{kind:?} R = {r}: {diff}");
            }
        }
        let layer_norm = SrAttentionConfig { norm: NormKind::layer_norm(1e-6), ..config(AttentionKind::Softmax, 2, [4, 4]) };
        assert!(layer_norm.init(&device).fuse().is_err());
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let device = Device::flex();
        let good = config(AttentionKind::sla(), 2, [4, 4]);
        good.validate().unwrap();
        let bad = [
            SrAttentionConfig { num_heads: 5, ..good },
            SrAttentionConfig { sr_ratio: 0, ..good },
            SrAttentionConfig { sr_ratio: 8, ..good },
            SrAttentionConfig { kind: AttentionKind::Sla { kernel_size: 4 }, ..good },
            SrAttentionConfig { kind: AttentionKind::ReluL { qk_norm: false, gated: false }, ..good },
            SrAttentionConfig { norm: NormKind::layer_norm(0.0), ..good },
        ];
        for cfg in bad {
            assert!(cfg.validate().is_err(), "{cfg:?}");
        }
        let attn = good.init(&device);
        let err = attn.try_forward(Tensor::zeros([1, 15, 24], &device)).unwrap_err();
        assert!(err.to_string().contains("[1, 15, 24]"), "{err}");
        assert!(attn.try_forward(Tensor::zeros([1, 16, 20], &device)).is_err());
    }
}
