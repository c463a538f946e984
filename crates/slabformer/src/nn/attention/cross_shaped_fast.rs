//! CSWin's cross-shaped window attention on the fast path ([`FastCrossShapedAttention`]),
//! lowered from a block's `qkv`, its branches (`attns`, [`CrossShapedBranch`]) and `proj`.
//!
//! Layout: an image's tokens are (R·R, C) raster rows. `qkv` is one GEMM over them; each branch
//! then gathers its q, k, v channels in *window order* — its windows row-major, each window's
//! H_sp·W_sp tokens row-major — so a window is a contiguous (N_w, 3·C_b) block laid out
//! [q | k | v] like a whole sequence's qkv: the heads are strided column views (no split or merge
//! copies), the softmax or linear-attention core of `nn::attention::fast` runs on it unchanged,
//! and both depthwise convs (LePE's `get_v` over the branch's channels, the linear kinds' DWC
//! over head_dim channels shared by the heads) are the existing "same"-padded kernel on the
//! window's own grid, which is exactly "each window is its own zero-padded image". The branches'
//! window-order outputs are gathered back into raster rows, side by side on the channels, for
//! `proj`. The window ↔ raster maps are computed once, at lowering.
//!
//! Windows are independent: training splits every branch's windows of the whole batch over the
//! threads; inference splits one image's windows over its `parts` (a global window — the SLA
//! stages, the last stage — runs on one thread; qkv and proj, most of the block, still split
//! their rows).

use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use rayon::prelude::*;

use super::cross_shaped::CrossShapedBranch;
use super::fast::{Feature, LinearImage, focus_backward, linear_core_backward, linear_core_forward, sigmoid, softplus};
use super::kernels::{self as attention_kernels, DepthwiseConv, tile_over_heads};
use super::{FeatureMap, linear_attention_eps};
use super::window_fast::window_order_of;
use crate::error::{Error, Result};
use crate::kernels::{self, MatMut, MatRef, matmul};
use crate::nn::linear::FastLinear;
use crate::nn::lower::{Layout, ParamTable, Slot, for_each_part, row_block, sized};

/// A depthwise k×k conv (stride 1, "same" zero padding) as the table holds it: weight
/// (channels, 1, k, k) official, bias (channels).
#[derive(Clone, Copy)]
struct Depthwise {
    weight: Slot,
    bias: Slot,
    kernel: usize,
}

/// A branch's token mixer inside each window.
enum Mixer {
    /// `softmax(q·d^-½·kᵀ)·v`.
    Softmax,
    /// SLA / FLatten: feature maps, `k += positional_encoding` first, the normalized core, the
    /// DWC over head_dim channels shared by the heads.
    Linear { feature: Feature, eps: f32, positional_encoding: Slot, dwc: Depthwise },
}

/// One branch: its channels `offset..offset + dim` of q, k and v, its windows, its mixer + LePE.
struct Branch {
    offset: usize,
    dim: usize,
    heads: usize,
    /// (H_sp, W_sp).
    window: [usize; 2],
    lepe: Depthwise,
    mixer: Mixer,
    /// Window-order position (R² of them) → raster token of the image.
    source: Vec<u32>,
    /// Raster token → its window-order position.
    position: Vec<u32>,
}

/// The per-window buffers of a branch, in this order (sizes from [`Branch::sizes`]).
const QKV: usize = 0; // (N_w, 3·C_b) window-order q | k | v (q, k after the feature maps)
const OUT: usize = 1; // (N_w, C_b) the branch's output
const PROBS: usize = 2; // softmax: (heads, N_w, N_w) weights
const KV: usize = 3; // linear: (heads, d, d) φ(K)ᵀV
const KSUM: usize = 4; // linear: (C_b) Σφ(k)
const DEN: usize = 5; // linear: (N_w, heads) normalisers
const ATTN: usize = 6; // linear: (N_w, C_b) normalized core output before the convs
const PRE: usize = 7; // FLatten: (N_w, 2·C_b) q and k + pe before the feature map
const BUFFERS: usize = 8;

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct CrossShapedActivations {
    /// (B·R², 3C) raster.
    qkv: Vec<f32>,
    /// Per branch, the [`BUFFERS`] of all its windows over the batch.
    branches: Vec<[Vec<f32>; BUFFERS]>,
    /// (B·R², C) the branches' outputs side by side, raster: proj's input.
    mixed: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct CrossShapedScratch {
    dmixed: Vec<f32>,
    dqkv: Vec<f32>,
    /// Per branch: the output gradient and then the qkv gradient in window order.
    dout: Vec<Vec<f32>>,
    dwindows: Vec<Vec<f32>>,
    /// Per task: a branch's parameter-gradient partials.
    partials: Vec<f32>,
    window_scratch: Vec<f32>,
}

/// Reusable inference buffers for one image.
#[derive(Default)]
pub struct CrossShapedInferScratch {
    /// (R², 3C) raster.
    qkv: Vec<f32>,
    /// (R², 3·C_b) one branch's q, k, v in window order.
    windows: Vec<f32>,
    /// The branches' window-order outputs back to back: branch b's (R², C_b) at R²·offset_b.
    out: Vec<f32>,
    /// Per part: one window's buffers after [`OUT`].
    temps: Vec<f32>,
    /// (R², C) proj's input rows, raster.
    rows: Vec<f32>,
}

/// A branch's conv taps tiled for [`DepthwiseConv`] and FLatten's softplus(θ), from the current
/// parameters.
struct Tiles {
    lepe: (Vec<f32>, Vec<f32>),
    dwc: Option<(Vec<f32>, Vec<f32>)>,
    scale: Vec<f32>,
}

fn unsupported(what: String) -> Error {
    Error::Unsupported { what, path: "the fast CPU path" }
}

fn config_error(what: String) -> Error {
    Error::Config(format!("cross-shaped attention on the fast path: {what}"))
}

fn lower_depthwise(conv: &Conv2d, channels: usize, what: &str, table: &mut ParamTable) -> Result<Depthwise> {
    let dims = conv.weight.dims();
    let kernel = dims[2];
    let pad = kernel / 2;
    let same = matches!(conv.padding, PaddingConfig2d::Explicit(t, l, b, r) if [t, l, b, r] == [pad; 4]);
    if dims != [channels, 1, kernel, kernel] || kernel.is_multiple_of(2) || conv.groups != channels || conv.stride != [1, 1] || conv.dilation != [1, 1] || !same {
        return Err(unsupported(format!("{what}: a conv of weight {dims:?}, groups {}, stride {:?}, padding {:?} (a depthwise odd k×k, stride 1, padding k/2 over {channels} channels)", conv.groups, conv.stride, conv.padding)));
    }
    let weight = table.add(&conv.weight, Layout::Official)?;
    let bias = match &conv.bias {
        Some(b) => table.add(b, Layout::Official)?,
        None => table.zeros(channels),
    };
    Ok(Depthwise { weight, bias, kernel })
}

/// Takes the first `n` values off `rest`.
fn take<'a>(rest: &mut &'a mut [f32], n: usize) -> &'a mut [f32] {
    let (head, tail) = std::mem::take(rest).split_at_mut(n);
    *rest = tail;
    head
}

/// Splits `bufs` into `count` consecutive per-window groups of `sizes`.
fn split_windows(bufs: [&mut [f32]; BUFFERS], sizes: [usize; BUFFERS], count: usize) -> Vec<[&mut [f32]; BUFFERS]> {
    let mut rest = bufs;
    (0..count).map(|_| std::array::from_fn(|i| take(&mut rest[i], sizes[i]))).collect()
}

impl Branch {
    fn window_tokens(&self) -> usize {
        self.window[0] * self.window[1]
    }

    fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Values per window of each of the [`BUFFERS`].
    fn sizes(&self) -> [usize; BUFFERS] {
        let (n, cb, heads, d) = (self.window_tokens(), self.dim, self.heads, self.head_dim());
        let mut sizes = [0; BUFFERS];
        (sizes[QKV], sizes[OUT]) = (n * 3 * cb, n * cb);
        match &self.mixer {
            Mixer::Softmax => sizes[PROBS] = heads * n * n,
            Mixer::Linear { feature, .. } => {
                (sizes[KV], sizes[KSUM], sizes[DEN], sizes[ATTN]) = (heads * d * d, cb, n * heads, n * cb);
                if let Feature::Focused { .. } = feature {
                    sizes[PRE] = n * 2 * cb;
                }
            }
        }
        sizes
    }

    fn tiles(&self, p: &[f32]) -> Tiles {
        let tile = |conv: &Depthwise, d: usize| {
            let (weight, bias) = (&p[conv.weight.range()], &p[conv.bias.range()]);
            debug_assert_eq!(bias.len(), d);
            tile_over_heads(weight, bias, self.dim, conv.kernel)
        };
        let (dwc, scale) = match &self.mixer {
            Mixer::Softmax => (None, Vec::new()),
            Mixer::Linear { feature, dwc, .. } => (
                Some(tile(dwc, self.head_dim())),
                match feature {
                    Feature::Focused { theta, .. } => softplus(&p[theta.range()]),
                    Feature::Relu => Vec::new(),
                },
            ),
        };
        Tiles { lepe: tile(&self.lepe, self.dim), dwc, scale }
    }

    fn lepe_conv<'a>(&self, tiles: &'a Tiles) -> DepthwiseConv<'a> {
        DepthwiseConv { taps: &tiles.lepe.0, bias: &tiles.lepe.1, grid: self.window, kernel: self.lepe.kernel }
    }

    fn dwc_conv<'a>(&self, tiles: &'a Tiles, dwc: &Depthwise) -> DepthwiseConv<'a> {
        let (taps, bias) = tiles.dwc.as_ref().expect("linear branches tile their DWC");
        DepthwiseConv { taps, bias, grid: self.window, kernel: dwc.kernel }
    }

    /// Window-order rows `first..` (counted over the batch) of this branch's q, k, v channels,
    /// gathered from the (B·R², 3C) raster `qkv` into `out` (rows of 3·C_b).
    fn gather_qkv(&self, qkv: &[f32], c: usize, first: usize, out: &mut [f32]) {
        let (cb, n) = (self.dim, self.source.len());
        for (k, row) in out.chunks_exact_mut(3 * cb).enumerate() {
            let (image, at) = ((first + k) / n, (first + k) % n);
            let src = &qkv[(image * n + self.source[at] as usize) * 3 * c..][..3 * c];
            for part in 0..3 {
                row[part * cb..(part + 1) * cb].copy_from_slice(&src[part * c + self.offset..part * c + self.offset + cb]);
            }
        }
    }

    /// Window-order rows `first..` of this branch's channels of the (B·R², C) raster `x`.
    fn gather_columns(&self, x: &[f32], c: usize, first: usize, out: &mut [f32]) {
        let (cb, n) = (self.dim, self.source.len());
        for (k, row) in out.chunks_exact_mut(cb).enumerate() {
            let (image, at) = ((first + k) / n, (first + k) % n);
            let src = (image * n + self.source[at] as usize) * c + self.offset;
            row.copy_from_slice(&x[src..src + cb]);
        }
    }

    /// One window's forward on its buffers: attention + (DWC) + LePE into `OUT`, what the
    /// backward needs in the others.
    fn window_forward(&self, p: &[f32], tiles: &Tiles, bufs: [&mut [f32]; BUFFERS]) {
        let (cb, n, heads) = (self.dim, self.window_tokens(), self.heads);
        let d = self.head_dim();
        let [qkv, out, probs, kv, k_sum, den, attn, pre] = bufs;
        match &self.mixer {
            Mixer::Softmax => {
                let qkv: &[f32] = qkv;
                let scale = (d as f32).powf(-0.5);
                let column = |start: usize| MatRef::columns(qkv, n, 3 * cb, start, d);
                for (h, w) in probs.chunks_exact_mut(n * n).enumerate() {
                    matmul(MatMut::new(w, n, n), column(h * d), column(cb + h * d).t(), false, scale); // s·QKᵀ
                    attention_kernels::softmax_rows(w, n);
                    matmul(MatMut::columns(out, n, cb, h * d, d), MatRef::new(w, n, n), column(2 * cb + h * d), false, 1.0); // (N_w, d)
                }
            }
            Mixer::Linear { feature, eps, positional_encoding, dwc } => {
                let pe = &p[positional_encoding.range()];
                if let Feature::Focused { .. } = feature {
                    // q and k + pe, the feature maps' inputs, for the backward pass.
                    for ((pre, row), pe) in pre.chunks_exact_mut(2 * cb).zip(qkv.chunks_exact(3 * cb)).zip(pe.chunks_exact(cb)) {
                        pre[..cb].copy_from_slice(&row[..cb]);
                        pre[cb..].iter_mut().zip(&row[cb..2 * cb]).zip(pe).for_each(|((p, k), e)| *p = k + e);
                    }
                }
                linear_core_forward(qkv, pe, feature, &tiles.scale, *eps, heads, kv, k_sum, den, attn);
                out.copy_from_slice(attn);
                self.dwc_conv(tiles, dwc).add_to(qkv, 3 * cb, 2 * cb, out, 0);
            }
        }
        self.lepe_conv(tiles).add_to(qkv, 3 * cb, 2 * cb, out, 0);
    }

    /// Values of a task's gradient partial: LePE taps and bias, then (linear) the DWC's, the
    /// positional encoding's and FLatten's scale's.
    fn partial_width(&self) -> usize {
        let (cb, n) = (self.dim, self.window_tokens());
        let lepe = self.lepe.kernel * self.lepe.kernel * cb + cb;
        match &self.mixer {
            Mixer::Softmax => lepe,
            Mixer::Linear { dwc, .. } => lepe + dwc.kernel * dwc.kernel * cb + cb + n * cb + cb,
        }
    }

    /// One window's backward from `dout` (N_w, C_b): `dqkv` (N_w, 3·C_b) overwritten, the
    /// parameter gradients added into `partial`; `scratch` holds at least N_w² + C_b values
    /// (softmax) or the DWC's taps and bias (linear).
    #[allow(clippy::too_many_arguments)]
    fn window_backward(&self, tiles: &Tiles, acts: &[Vec<f32>; BUFFERS], window: usize, dout: &[f32], dqkv: &mut [f32], partial: &mut [f32], scratch: &mut [f32]) {
        let (cb, n, heads) = (self.dim, self.window_tokens(), self.heads);
        let d = self.head_dim();
        let sizes = self.sizes();
        let buf = |i: usize| &acts[i][window * sizes[i]..(window + 1) * sizes[i]];
        let qkv = buf(QKV);
        let lepe_taps = self.lepe.kernel * self.lepe.kernel * cb;
        let (lepe_partial, rest) = partial.split_at_mut(lepe_taps + cb);
        let column = |start: usize| MatRef::columns(qkv, n, 3 * cb, start, d);
        match &self.mixer {
            Mixer::Softmax => {
                let scale = (d as f32).powf(-0.5);
                let dp = &mut scratch[..n * n];
                for (h, p) in buf(PROBS).chunks_exact(n * n).enumerate() {
                    let d_out = MatRef::columns(dout, n, cb, h * d, d);
                    matmul(MatMut::new(dp, n, n), d_out, column(2 * cb + h * d).t(), false, 1.0); // dP = dO·Vᵀ
                    matmul(MatMut::columns(dqkv, n, 3 * cb, 2 * cb + h * d, d), MatRef::new(p, n, n).t(), d_out, false, 1.0); // dV = Pᵀ·dO
                    attention_kernels::softmax_backward_rows(p, dp, n); // dS
                    matmul(MatMut::columns(dqkv, n, 3 * cb, h * d, d), MatRef::new(dp, n, n), column(cb + h * d), false, scale); // dQ = s·dS·K
                    matmul(MatMut::columns(dqkv, n, 3 * cb, cb + h * d, d), MatRef::new(dp, n, n).t(), column(h * d), false, scale); // dK = s·dSᵀ·Q
                }
            }
            Mixer::Linear { feature, dwc, .. } => {
                let dwc_width = dwc.kernel * dwc.kernel * cb + cb;
                let window_dwc = &mut scratch[..dwc_width];
                let image = LinearImage { qkv, attn: buf(ATTN), kv: buf(KV), k_sum: buf(KSUM), den: buf(DEN), dmixed: dout };
                linear_core_backward(image, dqkv, window_dwc, &self.dwc_conv(tiles, dwc), heads, n); // overwrites dqkv
                let (dwc_partial, rest) = rest.split_at_mut(dwc_width);
                kernels::add_assign(dwc_partial, window_dwc);
                let (dpe, dscale) = rest.split_at_mut(n * cb);
                // The feature maps, from the gradient of their outputs to that of q and k + pe.
                match feature {
                    Feature::Relu => {
                        for (dq, q) in dqkv.chunks_exact_mut(3 * cb).zip(qkv.chunks_exact(3 * cb)) {
                            attention_kernels::relu_backward(&q[..2 * cb], &mut dq[..2 * cb], 1.0);
                        }
                    }
                    Feature::Focused { power, .. } => {
                        for (dq, pre) in dqkv.chunks_exact_mut(3 * cb).zip(buf(PRE).chunks_exact(2 * cb)) {
                            focus_backward(&pre[..cb], &mut dq[..cb], &tiles.scale, *power, dscale);
                            focus_backward(&pre[cb..], &mut dq[cb..2 * cb], &tiles.scale, *power, dscale);
                        }
                    }
                }
                // The positional encoding was added to k in every window.
                for (ge, dq) in dpe.chunks_exact_mut(cb).zip(dqkv.chunks_exact(3 * cb)) {
                    kernels::add_assign(ge, &dq[cb..2 * cb]);
                }
            }
        }
        // LePE on v: dv += convᵀ(dO), its taps' and bias' gradients.
        let (dtaps, dbias) = lepe_partial.split_at_mut(lepe_taps);
        self.lepe_conv(tiles).backward(dout, qkv, 3 * cb, 2 * cb, dqkv, 3 * cb, 2 * cb, dtaps);
        let end = scratch.len();
        let bias_sum = &mut scratch[end - cb..];
        kernels::column_sums(dout, n, cb, 0, bias_sum);
        kernels::add_assign(dbias, bias_sum);
    }

    /// The tasks' summed `partials` into the parameter gradients `g`, in the official layouts.
    fn add_gradients(&self, p: &[f32], g: &mut [f32], partials: &[f32]) {
        let width = self.partial_width();
        let mut total = vec![0.0; width];
        partials.chunks_exact(width).for_each(|part| kernels::add_assign(&mut total, part));
        // Tiled (k², C_b) taps and (C_b) bias folded back onto a conv's `d` channels.
        let fold = |g: &mut [f32], conv: &Depthwise, d: usize, grads: &[f32]| {
            let taps = conv.kernel * conv.kernel;
            let (dtaps, dbias) = grads.split_at(taps * self.dim);
            let gw = &mut g[conv.weight.range()];
            for tap in 0..taps {
                for ch in 0..self.dim {
                    gw[(ch % d) * taps + tap] += dtaps[tap * self.dim + ch];
                }
            }
            let gb = &mut g[conv.bias.range()];
            for ch in 0..self.dim {
                gb[ch % d] += dbias[ch];
            }
        };
        let lepe_width = self.lepe.kernel * self.lepe.kernel * self.dim + self.dim;
        fold(g, &self.lepe, self.dim, &total[..lepe_width]);
        if let Mixer::Linear { feature, positional_encoding, dwc, .. } = &self.mixer {
            let dwc_width = dwc.kernel * dwc.kernel * self.dim + self.dim;
            let rest = &total[lepe_width..];
            fold(g, dwc, self.head_dim(), &rest[..dwc_width]);
            let (dpe, dscale) = rest[dwc_width..].split_at(positional_encoding.len);
            kernels::add_assign(&mut g[positional_encoding.range()], dpe);
            if let Feature::Focused { theta, .. } = feature {
                let theta_values = &p[theta.range()];
                for ((gt, ds), th) in g[theta.range()].iter_mut().zip(dscale).zip(theta_values) {
                    *gt += ds * sigmoid(*th); // softplus' = sigmoid
                }
            }
        }
    }
}


/// The cross-shaped attention of one CSWin block on the fast path: `qkv`, the branches, `proj`.
pub struct FastCrossShapedAttention {
    pub qkv: FastLinear,
    pub proj: FastLinear,
    branches: Vec<Branch>,
    resolution: usize,
}

impl FastCrossShapedAttention {
    pub fn lower(qkv: &Linear, attns: &[CrossShapedBranch], proj: &Linear, table: &mut ParamTable) -> Result<Self> {
        let qkv = FastLinear::lower(qkv, table)?;
        let c = qkv.inputs;
        if qkv.outputs != 3 * c {
            return Err(config_error(format!("qkv maps {c} channels to {}, not 3·{c}", qkv.outputs)));
        }
        let mut branches = Vec::with_capacity(attns.len());
        let (mut offset, mut resolution) = (0, None);
        for (j, branch) in attns.iter().enumerate() {
            let dim = branch.dim();
            let (get_v, heads, window, r, linear) = match branch {
                CrossShapedBranch::Lepe(a) => (&a.get_v, a.num_heads, a.window, a.resolution, None),
                CrossShapedBranch::Linear(a) => (&a.get_v, a.num_heads, a.window, a.resolution, Some(a)),
            };
            let [rows, cols] = window;
            if heads == 0 || !dim.is_multiple_of(heads) || rows == 0 || cols == 0 || !r.is_multiple_of(rows) || !r.is_multiple_of(cols) || *resolution.get_or_insert(r) != r {
                return Err(config_error(format!("branch {j}: {dim} channels, {heads} heads, {rows}×{cols} windows of a {r}×{r} map")));
            }
            let n = rows * cols;
            let lepe = lower_depthwise(get_v, dim, "LePE (get_v)", table)?;
            let mixer = match linear {
                None => Mixer::Softmax,
                Some(a) => {
                    let feature = match a.feature_map {
                        FeatureMap::Relu => {
                            // Unused by SLA (the official module keeps it): not trained.
                            let scale = table.add(&a.scale, Layout::Official)?;
                            table.untrained(scale);
                            Feature::Relu
                        }
                        FeatureMap::Focused { power } if power <= 6.0 => Feature::Focused { power: power as f32, theta: table.add(&a.scale, Layout::Official)? },
                        FeatureMap::Focused { power } => return Err(unsupported(format!("focused attention with power {power} > 6 (normalized by the row maximum)"))),
                    };
                    let pe_dims = a.positional_encoding.dims();
                    if pe_dims != [1, n, dim] {
                        return Err(config_error(format!("branch {j}: positional_encoding is {pe_dims:?}, expected [1, {n}, {dim}]")));
                    }
                    let positional_encoding = table.add(&a.positional_encoding, Layout::Official)?;
                    let dwc = lower_depthwise(&a.dwc, dim / heads, "the linear attention's DWC", table)?;
                    Mixer::Linear { feature, eps: linear_attention_eps(a.feature_map, n) as f32, positional_encoding, dwc }
                }
            };
            let (source, position) = window_order_of([r, r], [r, r], window, 0); // the stripes tile the map: no padding
            branches.push(Branch { offset, dim, heads, window, lepe, mixer, source, position });
            offset += dim;
        }
        let proj = FastLinear::lower(proj, table)?;
        if branches.is_empty() || offset != c || proj.inputs != c || proj.outputs != c {
            return Err(config_error(format!("branches of {offset} channels between qkv of {c} and proj {} → {}", proj.inputs, proj.outputs)));
        }
        Ok(Self { qkv, proj, branches, resolution: resolution.expect("a branch") })
    }

    pub fn dim(&self) -> usize {
        self.qkv.inputs
    }

    /// Tokens of an image, R².
    pub fn tokens(&self) -> usize {
        self.resolution * self.resolution
    }

    /// Raster rows `first..` (counted over the batch) of proj's input: each branch's output row
    /// (`out(b)`, window order over the batch) in its channels.
    fn gather_mixed<'a>(&self, out: impl Fn(usize) -> &'a [f32], first: usize, rows: &mut [f32]) {
        let (c, t) = (self.dim(), self.tokens());
        for (k, row) in rows.chunks_exact_mut(c).enumerate() {
            let (image, token) = ((first + k) / t, (first + k) % t);
            for (j, b) in self.branches.iter().enumerate() {
                let src = (image * t + b.position[token] as usize) * b.dim;
                row[b.offset..b.offset + b.dim].copy_from_slice(&out(j)[src..src + b.dim]);
            }
        }
    }

    /// Inference on one image: `out += attn(x)` for its (R², C) raster rows, `parts` threads
    /// sharing the work (on this thread when 1). Both passes of
    /// [`infer_mix`](Self::infer_mix) and [`infer_project`](Self::infer_project).
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], s: &mut CrossShapedInferScratch, parts: usize) {
        self.infer_mix(p, x, s, parts);
        self.infer_project(p, out, s, parts);
    }

    /// Inference, first pass: qkv of the image `x` (R², C) in row blocks, then every branch's
    /// windows, split over `parts` threads, into `s`. After it `x` is no longer read, so a block
    /// without a norm may pass its residual stream as `x` here and as `out` to `infer_project`.
    pub fn infer_mix(&self, p: &[f32], x: &[f32], s: &mut CrossShapedInferScratch, parts: usize) {
        let (c, t) = (self.dim(), self.tokens());
        assert_eq!(x.len(), t * c, "one image's (R², C) rows");
        let per = t.div_ceil(parts.clamp(1, t));
        let CrossShapedInferScratch { qkv, windows, out, temps, .. } = s;
        let jobs: Vec<_> = x.chunks(per * c).zip(sized(qkv, t * 3 * c).chunks_mut(per * 3 * c)).collect();
        for_each_part(jobs, |(x, qkv)| self.qkv.apply(p, x, qkv)); // (R², 3C)
        let qkv: &[f32] = qkv;
        let out = sized(out, t * c);
        for b in &self.branches {
            let (cb, n) = (b.dim, b.window_tokens());
            let tiles = b.tiles(p);
            let staging = sized(windows, t * 3 * cb);
            let jobs: Vec<_> = staging.chunks_mut(per * 3 * cb).enumerate().collect();
            for_each_part(jobs, |(i, block)| b.gather_qkv(qkv, c, i * per, block));
            let count = t / n;
            let window_parts = parts.clamp(1, count);
            let per_part = count.div_ceil(window_parts);
            let sizes = b.sizes();
            let temp: usize = sizes[OUT + 1..].iter().sum();
            let jobs: Vec<_> = staging
                .chunks_mut(per_part * n * 3 * cb)
                .zip(out[t * b.offset..t * (b.offset + cb)].chunks_mut(per_part * n * cb))
                .zip(sized(temps, window_parts * temp).chunks_mut(temp.max(1)))
                .collect();
            for_each_part(jobs, |((staging, out), temp)| {
                for (qkv, out) in staging.chunks_exact_mut(n * 3 * cb).zip(out.chunks_exact_mut(n * cb)) {
                    let mut rest = &mut temp[..];
                    let [probs, kv, k_sum, den, attn, pre] = std::array::from_fn(|i| take(&mut rest, sizes[OUT + 1 + i]));
                    b.window_forward(p, &tiles, [qkv, out, probs, kv, k_sum, den, attn, pre]);
                }
            });
        }
    }

    /// Inference, second pass: `out += proj(mixed)` for the image's (R², C) raster rows, their
    /// row blocks split over `parts` threads.
    pub fn infer_project(&self, p: &[f32], out: &mut [f32], s: &mut CrossShapedInferScratch, parts: usize) {
        let (c, t) = (self.dim(), self.tokens());
        assert_eq!(out.len(), t * c, "one image's (R², C) rows");
        let per = t.div_ceil(parts.clamp(1, t));
        let mixed = &s.out;
        let branch_out = |j: usize| {
            let b = &self.branches[j];
            &mixed[t * b.offset..t * (b.offset + b.dim)]
        };
        let jobs: Vec<_> = out.chunks_mut(per * c).zip(sized(&mut s.rows, t * c).chunks_mut(per * c)).enumerate().collect();
        for_each_part(jobs, |(i, (out, rows))| {
            self.gather_mixed(branch_out, i * per, rows);
            self.proj.apply_residual(p, rows, out);
        });
    }

    /// Training forward of `batch` images' (B·R², C) raster rows: `out (+)= attn(x)`
    /// (`accumulate`: add to what `out` holds, a residual), keeping the activations.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut CrossShapedActivations, batch: usize, accumulate: bool) -> Result<()> {
        let (c, t) = (self.dim(), self.tokens());
        if batch == 0 || x.len() != batch * t * c || out.len() != x.len() {
            return Err(Error::InputShape { layer: "cross-shaped attention", expected: format!("{batch} × ({r}·{r}, {c}) rows in and out", r = self.resolution), found: vec![x.len(), out.len()] });
        }
        let rows = batch * t;
        self.qkv.forward(p, x, sized(&mut a.qkv, rows * 3 * c), false); // (B·R², 3C)
        a.branches.resize_with(self.branches.len(), Default::default);
        let per = row_block(rows);
        for (b, bufs) in self.branches.iter().zip(&mut a.branches) {
            let tiles = b.tiles(p);
            let sizes = b.sizes();
            let count = rows / b.window_tokens();
            for (buf, size) in bufs.iter_mut().zip(sizes) {
                sized(buf, count * size);
            }
            let qkv = &a.qkv;
            bufs[QKV].par_chunks_mut(per * 3 * b.dim).enumerate().for_each(|(i, block)| b.gather_qkv(qkv, c, i * per, block));
            let windows = split_windows(bufs.each_mut().map(|v| v.as_mut_slice()), sizes, count);
            windows.into_par_iter().for_each(|w| b.window_forward(p, &tiles, w));
        }
        let branches = &a.branches;
        sized(&mut a.mixed, rows * c).par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.gather_mixed(|j| branches[j][OUT].as_slice(), i * per, block));
        self.proj.forward(p, &a.mixed, out, accumulate);
        Ok(())
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the gradients of qkv, the branches' convs,
    /// positional encodings and scales, and proj added into `g`, for the activations of the
    /// last [`forward`](Self::forward) of `batch` images on `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &CrossShapedActivations, dy: &[f32], dx: &mut [f32], s: &mut CrossShapedScratch, batch: usize) {
        let (c, t) = (self.dim(), self.tokens());
        let rows = batch * t;
        let per = row_block(rows);
        self.proj.backward_params(g, &a.mixed, dy, &mut s.partials);
        self.proj.backward_input(p, dy, sized(&mut s.dmixed, rows * c), |_, _| {});
        s.dout.resize_with(self.branches.len(), Vec::new);
        s.dwindows.resize_with(self.branches.len(), Vec::new);
        for (j, b) in self.branches.iter().enumerate() {
            let (cb, n) = (b.dim, b.window_tokens());
            let tiles = b.tiles(p);
            let dmixed = &s.dmixed;
            let dout = sized(&mut s.dout[j], rows * cb);
            dout.par_chunks_mut(per * cb).enumerate().for_each(|(i, block)| b.gather_columns(dmixed, c, i * per, block));
            let dout: &[f32] = dout;
            let count = rows / n;
            let tasks = rayon::current_num_threads().clamp(1, count);
            let per_task = count.div_ceil(tasks);
            let used = count.div_ceil(per_task);
            let width = b.partial_width();
            let partials = sized(&mut s.partials, used * width);
            partials.fill(0.0);
            let scratch_width = match &b.mixer {
                Mixer::Softmax => n * n + cb,
                Mixer::Linear { dwc, .. } => dwc.kernel * dwc.kernel * cb + cb + cb,
            };
            let scratch = sized(&mut s.window_scratch, used * scratch_width);
            let acts = &a.branches[j];
            sized(&mut s.dwindows[j], rows * 3 * cb)
                .par_chunks_mut(per_task * n * 3 * cb)
                .zip(partials.par_chunks_mut(width))
                .zip(scratch.par_chunks_mut(scratch_width))
                .enumerate()
                .for_each(|(i, ((dqkv, partial), scratch))| {
                    for (k, dqkv) in dqkv.chunks_exact_mut(n * 3 * cb).enumerate() {
                        let w = i * per_task + k;
                        b.window_backward(&tiles, acts, w, &dout[w * n * cb..(w + 1) * n * cb], dqkv, partial, scratch);
                    }
                });
            b.add_gradients(p, g, partials);
        }
        // Back to raster rows: every branch's q, k, v gradients into its channels.
        let dwindows = &s.dwindows;
        sized(&mut s.dqkv, rows * 3 * c).par_chunks_mut(per * 3 * c).enumerate().for_each(|(i, block)| {
            for (k, row) in block.chunks_exact_mut(3 * c).enumerate() {
                let (image, token) = ((i * per + k) / t, (i * per + k) % t);
                for (b, dw) in self.branches.iter().zip(dwindows) {
                    let cb = b.dim;
                    let src = &dw[(image * t + b.position[token] as usize) * 3 * cb..][..3 * cb];
                    for part in 0..3 {
                        row[part * c + b.offset..part * c + b.offset + cb].copy_from_slice(&src[part * cb..(part + 1) * cb]);
                    }
                }
            }
        });
        self.qkv.backward_params(g, x, &s.dqkv, &mut s.partials);
        self.qkv.backward_input(p, &s.dqkv, dx, |_, _| {});
    }
}
