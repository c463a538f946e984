//! CSWin's cross-shaped window attention (official `slab_cswin.py`: `LePEAttention`,
//! `SimplifiedLinearAttention`; FLatten-CSWin's `FocusedLinearAttention`).
//!
//! A CSWin block projects its tokens with one `qkv` Linear and splits the q, k, v channels into
//! one or two branches (`attns.{j}`). A branch attends inside windows of H_sp × W_sp tokens of the
//! square token map: with two branches, vertical stripes (H_sp = resolution, W_sp = split) on the
//! first half of the channels and horizontal ones (H_sp = split, W_sp = resolution) on the second;
//! with one (the last stage, or split = resolution), the whole map. Every branch adds LePE, a
//! depthwise 3×3 conv `get_v` of v run on each window as its own zero-padded image. The branch is
//! softmax attention, or SLA / FLatten linear attention (the kinds of `nn::attention`, with their
//! positional encoding on k and their DWC on v, both per window) plus LePE. The branches' outputs
//! are concatenated on the channels; `qkv` and `proj` belong to the block (official keys).

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor};

use super::{AttentionKind, FeatureMap, onnx, linear_attention_core, linear_attention_eps, linear_core_macs, merge_heads, shared_depthwise, split_heads};
use crate::deploy::onnx::{Graph, attr_int};
use crate::error::{Error, Result};

/// One branch: its share of the block's channels and heads, and its window (rows, cols).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BranchLayout {
    pub dim: usize,
    pub num_heads: usize,
    pub window: [usize; 2],
}

/// What a block's cross-shaped attention is built from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CrossShapedConfig {
    /// The block's channels (all branches together).
    pub dim: usize,
    pub num_heads: usize,
    /// Side of the square token map.
    pub resolution: usize,
    /// Stripe width; equal to `resolution`, it makes one global branch.
    pub split: usize,
    /// One global branch whatever `split` (the official last stage ignores its split size).
    pub last_stage: bool,
    /// `Softmax` (LePE attention), `Sla` or `Focused` (linear attention + LePE).
    pub kind: AttentionKind,
}

impl CrossShapedConfig {
    /// The official branch rule: one branch over all channels and heads on the whole map in the
    /// last stage or when the split equals the resolution, else two of half the channels and
    /// heads, vertical stripes then horizontal ones.
    pub fn branches(&self) -> Vec<BranchLayout> {
        let (r, s) = (self.resolution, self.split);
        if self.global() {
            vec![BranchLayout { dim: self.dim, num_heads: self.num_heads, window: [r, r] }]
        } else {
            let (dim, num_heads) = (self.dim / 2, self.num_heads / 2);
            vec![BranchLayout { dim, num_heads, window: [r, s] }, BranchLayout { dim, num_heads, window: [s, r] }]
        }
    }

    fn global(&self) -> bool {
        self.last_stage || self.split == self.resolution
    }

    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Config(msg));
        let kernel = match self.kind {
            AttentionKind::Softmax => None,
            AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => Some(kernel_size),
            AttentionKind::ReluL { .. } => return err("cross-shaped attention is softmax, SLA or FLatten (ReLU/L has no CSWin form)".into()),
        };
        if kernel.is_some_and(|k| k % 2 == 0) {
            return err(format!("linear attention DWC kernel_size must be odd, got {kernel:?}"));
        }
        if let AttentionKind::Focused { power, .. } = self.kind {
            if !(power.is_finite() && power > 0.0) {
                return err(format!("focusing power must be > 0, got {power}"));
            }
            // FLatten-CSWin reshapes a branch's windows back to (B, L, heads, d): with stripes it
            // mixes the windows of an image, which only the global window leaves well defined.
            if !self.global() {
                return err(format!("FLatten cross-shaped attention needs one global window (split {} = resolution {})", self.split, self.resolution));
            }
        }
        if self.resolution == 0 || self.split == 0 || (!self.global() && !self.resolution.is_multiple_of(self.split)) {
            return err(format!("stripe width {} must be > 0 and divide the {r}×{r} token map", self.split, r = self.resolution));
        }
        for branch in self.branches() {
            if branch.num_heads == 0 || branch.dim == 0 || !branch.dim.is_multiple_of(branch.num_heads) {
                return err(format!(
                    "a {}-branch CSWin block of {} channels and {} heads gives branches of {} channels and {} heads: channels must be a positive multiple of heads",
                    self.branches().len(),
                    self.dim,
                    self.num_heads,
                    branch.dim,
                    branch.num_heads
                ));
            }
        }
        if !self.global() && (!self.dim.is_multiple_of(2) || !self.num_heads.is_multiple_of(2)) {
            return err(format!("two-branch CSWin blocks halve channels and heads: {} and {} must be even", self.dim, self.num_heads));
        }
        Ok(())
    }

    /// The branches (`attns`), PyTorch's default init for the convs, zeros for the positional
    /// encodings and FLatten's θ, as the official code.
    pub fn init(&self, device: &Device) -> Vec<CrossShapedBranch> {
        let resolution = self.resolution;
        self.branches()
            .into_iter()
            .map(|b| {
                let get_v = depthwise(b.dim, 3, device);
                match self.kind {
                    AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                        let feature_map = match self.kind {
                            AttentionKind::Focused { power, .. } => FeatureMap::Focused { power },
                            _ => FeatureMap::Relu,
                        };
                        let [rows, cols] = b.window;
                        CrossShapedBranch::Linear(LinearLepeAttention {
                            get_v,
                            dwc: depthwise(b.dim / b.num_heads, kernel_size, device),
                            scale: Initializer::Zeros.init([1, 1, b.dim], device),
                            positional_encoding: Initializer::Zeros.init([1, rows * cols, b.dim], device),
                            num_heads: b.num_heads,
                            window: b.window,
                            resolution,
                            feature_map,
                        })
                    }
                    _ => CrossShapedBranch::Lepe(LepeAttention { get_v, num_heads: b.num_heads, window: b.window, resolution }),
                }
            })
            .collect()
    }

    /// Trainable parameters of the branches (the block's `qkv` and `proj` not included). SLA
    /// counts its unused `scale`, a parameter of the official module.
    pub fn param_count(&self) -> usize {
        self.branches()
            .iter()
            .map(|b| {
                let lepe = b.dim * 9 + b.dim;
                let d = b.dim / b.num_heads;
                match self.kind {
                    AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                        lepe + d * kernel_size * kernel_size + d + b.dim + b.window[0] * b.window[1] * b.dim
                    }
                    _ => lepe,
                }
            })
            .sum()
    }

    /// Multiply-accumulates of the branches over one image's resolution² tokens: attention cores
    /// per window, DWC and LePE.
    pub fn macs(&self) -> u64 {
        let n = (self.resolution * self.resolution) as u64;
        self.branches()
            .iter()
            .map(|b| {
                let (c, h) = (b.dim as u64, b.num_heads as u64);
                let d = c / h;
                let window = (b.window[0] * b.window[1]) as u64;
                let windows = n / window;
                let lepe = n * c * 9;
                match self.kind {
                    AttentionKind::Sla { kernel_size } | AttentionKind::Focused { kernel_size, .. } => {
                        let k2 = (kernel_size * kernel_size) as u64;
                        windows * h * linear_core_macs(window, d) + h * n * d * k2 + lepe
                    }
                    _ => windows * h * 2 * window * window * d + lepe, // QKᵀ and A·V per window
                }
            })
            .sum()
    }
}

/// A depthwise k×k conv with bias, zero padding k/2 (PyTorch's default init).
fn depthwise(channels: usize, kernel: usize, device: &Device) -> Conv2d {
    let pad = kernel / 2;
    Conv2dConfig::new([channels, channels], [kernel, kernel])
        .with_groups(channels)
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .init(device)
}

/// One branch of a CSWin block; adds no component to parameter keys.
#[derive(Module, Debug)]
pub enum CrossShapedBranch {
    Lepe(LepeAttention),
    Linear(LinearLepeAttention),
}

impl CrossShapedBranch {
    /// (B, N, dim) q, k, v of this branch's channels → (B, N, dim).
    pub fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        match self {
            CrossShapedBranch::Lepe(a) => a.forward(q, k, v),
            CrossShapedBranch::Linear(a) => a.forward(q, k, v),
        }
    }

    /// The channels of q (and k, v) this branch reads.
    pub fn dim(&self) -> usize {
        match self {
            CrossShapedBranch::Lepe(a) => a.get_v.weight.dims()[0],
            CrossShapedBranch::Linear(a) => a.get_v.weight.dims()[0],
        }
    }
}

/// Softmax attention in windows, plus LePE: `softmax(q·d^-½·kᵀ)·v + get_v(v)`.
#[derive(Module, Debug)]
pub struct LepeAttention {
    /// Depthwise 3×3 over the branch's channels, run per window.
    pub get_v: Conv2d,
    pub num_heads: usize,
    /// (H_sp, W_sp).
    pub window: [usize; 2],
    pub resolution: usize,
}

impl LepeAttention {
    pub fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let (h, r) = (self.num_heads, self.resolution);
        let [q, k, v] = [q, k, v].map(|t| img2windows(t, r, self.window)); // (B', H_sp·W_sp, C)
        let d = q.dims()[2] / h;
        let lepe = split_heads(lepe(&self.get_v, v.clone(), self.window), h); // (B', h, N_w, d)
        let q = split_heads(q, h).mul_scalar((d as f64).powf(-0.5));
        let scores = q.matmul(split_heads(k, h).swap_dims(2, 3)); // (B', h, N_w, N_w)
        let out = softmax(scores, 3).matmul(split_heads(v, h)).add(lepe);
        windows2img(merge_heads(out), r, self.window) // (B, N, C)
    }
}

/// SLA (or FLatten) in windows, plus LePE: `k += positional_encoding`, φ(q), φ(k), the
/// linear-attention core per head, `+ dwc(v)` (d channels shared by the heads) `+ get_v(v)`.
#[derive(Module, Debug)]
pub struct LinearLepeAttention {
    pub get_v: Conv2d,
    pub dwc: Conv2d,
    /// (1, 1, C): FLatten's θ (scale = softplus(θ)). SLA keeps it, unused, as the official module
    /// does (its gradient is zero).
    pub scale: Param<Tensor<3>>,
    /// (1, H_sp·W_sp, C), added to k in every window.
    pub positional_encoding: Param<Tensor<3>>,
    pub num_heads: usize,
    pub window: [usize; 2],
    pub resolution: usize,
    #[module(skip)]
    pub feature_map: FeatureMap,
}

impl LinearLepeAttention {
    pub fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let (h, r) = (self.num_heads, self.resolution);
        let [q, k, v] = [q, k, v].map(|t| img2windows(t, r, self.window)); // (B', N_w, C)
        let n = q.dims()[1];
        let k = k.add(self.positional_encoding.val());
        let (q, k) = self.feature_map.apply(q, k, Some(self.scale.val()));
        let eps = linear_attention_eps(self.feature_map, n);
        let lepe = split_heads(lepe(&self.get_v, v.clone(), self.window), h);
        let v = split_heads(v, h); // (B', h, N_w, d)
        let out = linear_attention_core(split_heads(q, h), split_heads(k, h), v.clone(), eps);
        let out = out.add(shared_depthwise(&self.dwc, v, self.window)).add(lepe);
        windows2img(merge_heads(out), r, self.window)
    }
}

/// LePE: `get_v` on each window's v (B', N_w, C) as its own (C, H_sp, W_sp) image → (B', N_w, C).
fn lepe(get_v: &Conv2d, v: Tensor<3>, [rows, cols]: [usize; 2]) -> Tensor<3> {
    let [windows, n, c] = v.dims();
    let image = v.swap_dims(1, 2).reshape([windows, c, rows, cols]);
    get_v.forward(image).reshape([windows, c, n]).swap_dims(1, 2)
}

/// (B, R·R, C) row-major tokens of an R×R map → (B·nH·nW, H_sp·W_sp, C): windows ordered (image,
/// window row, window col), tokens row-major inside a window (official `img2windows`).
pub fn img2windows(x: Tensor<3>, resolution: usize, [rows, cols]: [usize; 2]) -> Tensor<3> {
    let [b, _, c] = x.dims();
    let (nh, nw) = (resolution / rows, resolution / cols);
    x.reshape([b, nh, rows, nw, cols, c])
        .permute([0, 1, 3, 2, 4, 5]) // (B, nH, nW, H_sp, W_sp, C)
        .reshape([b * nh * nw, rows * cols, c])
}

/// The inverse of [`img2windows`] (official `windows2img`).
pub fn windows2img(x: Tensor<3>, resolution: usize, [rows, cols]: [usize; 2]) -> Tensor<3> {
    let [windows, _, c] = x.dims();
    let (nh, nw) = (resolution / rows, resolution / cols);
    x.reshape([windows / (nh * nw), nh, nw, rows, cols, c])
        .permute([0, 1, 3, 2, 4, 5]) // (B, nH, H_sp, nW, W_sp, C)
        .reshape([windows / (nh * nw), resolution * resolution, c])
}

/// The attention of a CSWin block between its `qkv` and `proj`: (B, N, 3C) laid out [q | k | v]
/// → (B, N, C). Branch j reads its run of channels of q, k and v; outputs are concatenated.
pub fn cross_shaped_attention(qkv: Tensor<3>, branches: &[CrossShapedBranch]) -> Tensor<3> {
    let [b, n, three_c] = qkv.dims();
    let c = three_c / 3;
    let qkv = qkv.reshape([b, n, 3, c]); // (B, N, 3, C)
    let mut start = 0;
    let outputs = branches
        .iter()
        .map(|branch| {
            let dim = branch.dim();
            let part = |i: usize| qkv.clone().narrow(2, i, 1).narrow(3, start, dim).reshape([b, n, dim]);
            let out = branch.forward(part(0), part(1), part(2));
            start += dim;
            out
        })
        .collect();
    Tensor::cat(outputs, 2)
}

// ---- ONNX, op for op as the forwards above.

/// (B, R·R, C) → (B·nH·nW, H_sp·W_sp, C), as [`img2windows`].
fn img2windows_onnx(g: &mut Graph, x: &str, resolution: usize, [rows, cols]: [usize; 2], c: usize) -> String {
    let (nh, nw) = ((resolution / rows) as i64, (resolution / cols) as i64);
    let x = g.reshape(x, &[-1, nh, rows as i64, nw, cols as i64, c as i64]);
    let x = g.transpose(&x, &[0, 1, 3, 2, 4, 5]);
    g.reshape(&x, &[-1, (rows * cols) as i64, c as i64])
}

/// The inverse, as [`windows2img`].
fn windows2img_onnx(g: &mut Graph, x: &str, resolution: usize, [rows, cols]: [usize; 2], c: usize) -> String {
    let (nh, nw) = ((resolution / rows) as i64, (resolution / cols) as i64);
    let x = g.reshape(x, &[-1, nh, nw, rows as i64, cols as i64, c as i64]);
    let x = g.transpose(&x, &[0, 1, 3, 2, 4, 5]);
    g.reshape(&x, &[-1, (resolution * resolution) as i64, c as i64])
}

/// LePE of windows (B', N_w, C), split into heads: (B', h, N_w, d).
fn lepe_onnx(g: &mut Graph, get_v: &Conv2d, v: &str, [rows, cols]: [usize; 2], c: usize, h: usize) -> String {
    let n = rows * cols;
    let image = g.transpose(v, &[0, 2, 1]);
    let image = g.reshape(&image, &[-1, c as i64, rows as i64, cols as i64]);
    let conv = g.conv(&image, get_v, 1);
    let conv = g.reshape(&conv, &[-1, c as i64, n as i64]);
    let conv = g.transpose(&conv, &[0, 2, 1]);
    g.split_heads(&conv, n, h, c / h)
}

impl CrossShapedBranch {
    /// This branch on its (B, N, dim) q, k, v in the graph → (B, N, dim).
    fn to_onnx(&self, g: &mut Graph, [q, k, v]: [&str; 3]) -> Result<String> {
        let (h, r, window) = match self {
            CrossShapedBranch::Lepe(a) => (a.num_heads, a.resolution, a.window),
            CrossShapedBranch::Linear(a) => (a.num_heads, a.resolution, a.window),
        };
        let c = self.dim();
        let (n, d) = (window[0] * window[1], c / h);
        let [q, k, v] = [q, k, v].map(|t| img2windows_onnx(g, t, r, window, c)); // (B', N_w, C)
        let lepe = lepe_onnx(g, self.get_v(), &v, window, c, h);
        let out = match self {
            CrossShapedBranch::Lepe(_) => {
                let (q, k, v) = (g.split_heads(&q, n, h, d), g.split_heads(&k, n, h, d), g.split_heads(&v, n, h, d));
                let q = g.binary_scalar("Mul", &q, (d as f64).powf(-0.5) as f32);
                let kt = g.transpose(&k, &[0, 1, 3, 2]);
                let scores = g.op("MatMul", &[&q, &kt], vec![]);
                let weights = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
                g.op("MatMul", &[&weights, &v], vec![])
            }
            CrossShapedBranch::Linear(a) => {
                let pos = g.param("positional_encoding", &a.positional_encoding);
                let k = g.op("Add", &[&k, &pos], vec![]);
                let (q, k) = match a.feature_map {
                    FeatureMap::Relu => (g.op("Relu", &[&q], vec![]), g.op("Relu", &[&k], vec![])),
                    FeatureMap::Focused { power } => {
                        let theta = g.param("focus_scale", &a.scale);
                        let scale = g.op("Softplus", &[&theta], vec![]);
                        (onnx::focus(g, &q, &scale, power), onnx::focus(g, &k, &scale, power))
                    }
                };
                let eps = linear_attention_eps(a.feature_map, n) as f32;
                let (q, k, v) = (g.split_heads(&q, n, h, d), g.split_heads(&k, n, h, d), g.split_heads(&v, n, h, d));
                let out = onnx::linear_core(g, &q, &k, &v, [n, n], d, eps);
                let conv = onnx::depthwise_on_grid(g, &a.dwc, &v, window, h, d);
                g.op("Add", &[&out, &conv], vec![])
            }
        };
        let out = g.op("Add", &[&out, &lepe], vec![]);
        let merged = g.merge_heads(&out, n, c);
        Ok(windows2img_onnx(g, &merged, r, window, c))
    }

    fn get_v(&self) -> &Conv2d {
        match self {
            CrossShapedBranch::Lepe(a) => &a.get_v,
            CrossShapedBranch::Linear(a) => &a.get_v,
        }
    }
}

/// [`cross_shaped_attention`] in the graph: `qkv` names the (B, N, 3C) projection output.
pub fn cross_shaped_attention_onnx(g: &mut Graph, qkv: &str, branches: &[CrossShapedBranch]) -> Result<String> {
    let c: usize = branches.iter().map(CrossShapedBranch::dim).sum();
    let qkv = g.reshape(qkv, &[0, -1, 3, c as i64]); // (B, N, 3, C)
    let parts = [0, 1, 2].map(|i| g.gather(&qkv, i, 2)); // each (B, N, C)
    let mut start = 0;
    let mut outputs = Vec::new();
    for branch in branches {
        let dim = branch.dim();
        let (starts, ends, axes) = (g.ints("starts", &[start as i64]), g.ints("ends", &[(start + dim) as i64]), g.ints("axes", &[2]));
        let [q, k, v] = [0, 1, 2].map(|i| g.op("Slice", &[&parts[i], &starts, &ends, &axes], vec![]));
        outputs.push(branch.to_onnx(g, [&q, &k, &v])?);
        start += dim;
    }
    Ok(match outputs.as_slice() {
        [one] => one.clone(),
        _ => {
            let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
            g.op("Concat", &refs, vec![attr_int("axis", 2)])
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn max_abs<const D: usize>(t: Tensor<D>) -> f32 {
        values(t.abs().max())[0]
    }

    #[test]
    fn windows_follow_the_official_order_and_invert() {
        let device = Device::flex();
        // One image, a 4×4 map, channel value = token index: vertical stripes of width 2.
        let x = Tensor::<1, burn::tensor::Int>::arange(0..16, &device).float().reshape([1, 16, 1]);
        let w = img2windows(x.clone(), 4, [4, 2]);
        assert_eq!(w.dims(), [2, 8, 1]);
        // Window 0 is columns 0–1 of every row, row-major inside; window 1 columns 2–3.
        assert_eq!(values(w.clone()), [0., 1., 4., 5., 8., 9., 12., 13., 2., 3., 6., 7., 10., 11., 14., 15.]);
        assert_eq!(values(windows2img(w, 4, [4, 2])), values(x.clone()));
        let h = img2windows(x.clone(), 4, [2, 4]);
        assert_eq!(values(h.clone())[..8], [0., 1., 2., 3., 4., 5., 6., 7.]);
        assert_eq!(values(windows2img(h, 4, [2, 4])), values(x));
    }

    #[test]
    fn branch_rule_matches_the_official_layout() {
        let config = |resolution, split, last_stage| CrossShapedConfig { dim: 32, num_heads: 4, resolution, split, last_stage, kind: AttentionKind::Softmax };
        // golden/README.md slab_cswin_tiny: stage 3 (4×4, split 2) has two branches, stage 4 one.
        assert_eq!(
            config(4, 2, false).branches(),
            [BranchLayout { dim: 16, num_heads: 2, window: [4, 2] }, BranchLayout { dim: 16, num_heads: 2, window: [2, 4] }]
        );
        assert_eq!(config(4, 2, true).branches(), [BranchLayout { dim: 32, num_heads: 4, window: [4, 4] }]);
        assert_eq!(config(4, 4, false).branches().len(), 1);
        assert!(config(6, 4, false).validate().is_err());
        assert!(CrossShapedConfig { num_heads: 3, ..config(4, 2, false) }.validate().is_err());
        assert!(CrossShapedConfig { kind: AttentionKind::focused(), ..config(4, 2, false) }.validate().is_err());
        assert!(CrossShapedConfig { kind: AttentionKind::focused(), ..config(4, 4, false) }.validate().is_ok());
        assert!(CrossShapedConfig { kind: AttentionKind::ReluL { qk_norm: false, gated: false }, ..config(4, 4, false) }.validate().is_err());
    }

    #[test]
    fn stripes_attend_only_inside_their_window() {
        // Changing one token moves only the outputs of the windows that hold it: with the vertical
        // branch on channels [:C/2] and the horizontal one on [C/2:], a token of column 0, row 0
        // reaches columns 0–1 through the first half and rows 0–1 through the second.
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla()] {
            let config = CrossShapedConfig { dim: 8, num_heads: 2, resolution: 4, split: 2, last_stage: false, kind };
            let branches = config.init(&device);
            // Positive q: a ReLU query of zeros would see no key at all (only the local convs).
            let qkv = Tensor::<3>::random([1, 16, 24], Distribution::Uniform(0.1, 1.0), &device);
            let bumped = qkv.clone().slice_assign([0..1, 0..1, 0..24], Tensor::ones([1, 1, 24], &device).mul_scalar(3.0));
            let delta = cross_shaped_attention(bumped, &branches).sub(cross_shaped_attention(qkv, &branches)).abs();
            let delta = values(delta); // (16 tokens, 8 channels)
            for token in 0..16 {
                let (row, col) = (token / 4, token % 4);
                let moved = |channels: std::ops::Range<usize>| channels.into_iter().any(|ch| delta[token * 8 + ch] > 1e-6);
                assert_eq!(moved(0..4), col < 2, "{kind:?}: vertical stripe, token {token}");
                assert_eq!(moved(4..8), row < 2, "{kind:?}: horizontal stripe, token {token}");
            }
        }
    }

    #[test]
    fn lepe_runs_on_each_window_as_its_own_padded_image() {
        // A global window's LePE is the conv of the whole map; with stripes the conv does not
        // reach across a stripe border.
        let device = Device::flex();
        let conv = depthwise(2, 3, &device);
        let v = crate::testing::standard_normal([1, 16, 2], 7, &device);
        let whole = lepe(&conv, v.clone(), [4, 4]);
        let image = v.clone().swap_dims(1, 2).reshape([1, 2, 4, 4]);
        let want = conv.forward(image).reshape([1, 2, 16]).swap_dims(1, 2);
        assert!(max_abs(whole.clone().sub(want)) < 1e-6);
        let striped = windows2img(lepe(&conv, img2windows(v, 4, [4, 2]), [4, 2]), 4, [4, 2]);
        assert!(max_abs(striped.sub(whole)) > 1e-3);
    }

    #[test]
    fn counts_follow_the_built_branches() {
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla(), AttentionKind::focused()] {
            for (resolution, split, last_stage) in [(8, 2, false), (8, 8, false), (4, 1, true)] {
                let config = CrossShapedConfig { dim: 16, num_heads: 4, resolution, split, last_stage, kind };
                if config.validate().is_err() {
                    continue; // FLatten with stripes
                }
                let branches = config.init(&device);
                let counted: usize = branches.iter().map(crate::state::trainable_param_count).sum();
                assert_eq!(counted, config.param_count(), "{config:?}");
                let qkv = crate::testing::standard_normal([2, resolution * resolution, 48], 8, &device);
                assert_eq!(cross_shaped_attention(qkv, &branches).dims(), [2, resolution * resolution, 16]);
            }
        }
    }
}
