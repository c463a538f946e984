//! Spatial-reduction attention (PVT's SRA, SLAB-PVT's SLA, FLatten-PVT) on the fast path,
//! lowered from [`SpatialReductionAttention`]: queries from the N = H·W token rows, keys and
//! values from those rows (R = 1) or from `norm(sr(x))` on the grid reduced R× per axis (the
//! conv as a GEMM over im2col rows of the token grid, [`FastConv`]).
//!
//! Layout: one image's queries are (N, C) rows, its keys and values (N_r, 2C) rows (k, then v);
//! heads are column blocks read through strided GEMM views. The kernels are the attention kinds'
//! (`kernels.rs`: softmax rows, the SLA normaliser, the depthwise conv on V) and the feature
//! maps of `fast.rs`; what differs from [`FastAttention`](super::FastAttention) is that queries
//! and keys have different row counts, so the cores here index them separately.
//!
//! Inference of one image runs in passes over row blocks, as the plan's walk calls them:
//! [`infer_rows`](FastSrAttention::infer_rows) (queries, and without reduction the keys and
//! values with each block's Σk, KᵀV), [`infer_reduce`](FastSrAttention::infer_reduce) (with
//! reduction: the reduced rows' keys and values, which read the whole token grid), then
//! [`infer_queries`](FastSrAttention::infer_queries).

use rayon::prelude::*;

use super::fast::{Feature, focus, focus_backward, sigmoid, softplus};
use super::kernels::{self as attention_kernels, DepthwiseConv};
use super::spatial_reduction::{Core, SpatialReductionAttention, interpolation};
use super::{FeatureMap, linear_attention_eps};
use crate::error::{Error, Result};
use crate::kernels::{self, MatMut, MatRef, matmul};
use crate::nn::conv::{FastConv, Source};
use crate::nn::linear::FastLinear;
use crate::nn::lower::{Layout, ParamTable, Slot, row_block, sized};
use crate::nn::norm::{FastNorm, NormCache};

/// The key/value reduction: the R×R stride-R conv over the token grid and its norm (absent
/// once folded into `kv`).
pub struct Reduction {
    pub sr: FastConv,
    pub norm: Option<FastNorm>,
}

/// v (N_r tokens) linearly interpolated along the token axis to the N query tokens:
/// output token i is `(1 − w_i)·v[lower_i] + w_i·v[upper_i]`.
pub struct Interpolation {
    lower: Vec<usize>,
    upper: Vec<usize>,
    weight: Vec<f32>,
}

impl Interpolation {
    fn new(n_in: usize, n_out: usize) -> Self {
        let (lower, upper, weight) = interpolation(n_in, n_out);
        Self { lower: lower.into_iter().map(|i| i as usize).collect(), upper: upper.into_iter().map(|i| i as usize).collect(), weight }
    }

    /// Output tokens `first..` (as many as `out` holds, C each) from the columns
    /// `[start, start + C)` of `v` rows with `stride`.
    fn apply(&self, v: &[f32], stride: usize, start: usize, first: usize, out: &mut [f32], c: usize) {
        for (i, row) in out.chunks_exact_mut(c).enumerate() {
            let (lo, hi, w) = (self.lower[first + i], self.upper[first + i], self.weight[first + i]);
            let (a, b) = (&v[lo * stride + start..lo * stride + start + c], &v[hi * stride + start..hi * stride + start + c]);
            row.iter_mut().zip(a).zip(b).for_each(|((o, a), b)| *o = (1.0 - w) * a + w * b);
        }
    }

    /// Its transpose: `dout` (N, C) added back into the columns `[start, start + C)` of `dv`.
    fn backward_add(&self, dout: &[f32], dv: &mut [f32], stride: usize, start: usize, c: usize) {
        for (i, g) in dout.chunks_exact(c).enumerate() {
            let (lo, hi, w) = (self.lower[i], self.upper[i], self.weight[i]);
            dv[lo * stride + start..lo * stride + start + c].iter_mut().zip(g).for_each(|(d, g)| *d += (1.0 - w) * g);
            dv[hi * stride + start..hi * stride + start + c].iter_mut().zip(g).for_each(|(d, g)| *d += w * g);
        }
    }
}

/// How the queries meet the keys.
pub enum SrMixer {
    /// softmax(QKᵀ/√d)·V over the N_r keys.
    Softmax,
    /// SLA / FLatten: feature maps, the positional encoding on the N_r keys, the depthwise conv
    /// on v (interpolated back to N tokens when reduced).
    Linear { feature: Feature, eps: f32, positional_encoding: Slot, dwc_weight: Slot, dwc_bias: Slot, kernel: usize, interpolation: Option<Interpolation> },
}

/// A spatial-reduction attention layer on the fast path: q, (sr → norm) → kv, mixer, proj.
pub struct FastSrAttention {
    pub q: FastLinear,
    pub kv: FastLinear,
    pub proj: FastLinear,
    pub heads: usize,
    pub reduction: Option<Reduction>,
    pub mixer: SrMixer,
    /// The query tokens' grid and the number of keys N_r.
    grid: [usize; 2],
    keys: usize,
}

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct SrActivations {
    /// (B·N, C) queries, after the feature map for the linear kinds.
    q: Vec<f32>,
    /// With reduction: the im2col rows (B·N_r, C·R²), the conv output and its normed form
    /// (B·N_r, C), the norm's statistics.
    patches: Vec<f32>,
    reduced: Vec<f32>,
    normed: Vec<f32>,
    norm: NormCache,
    /// (B·N_r, 2C): k (after the feature map for the linear kinds), v.
    kv: Vec<f32>,
    /// Softmax: (B, heads, N, N_r) attention weights.
    probs: Vec<f32>,
    /// Linear: per image every head's φ(K)ᵀV (heads·d·d), Σφ(k) (C), the normalisers (N, heads)
    /// and the normalized output without the conv (B·N, C).
    state: Vec<f32>,
    k_sum: Vec<f32>,
    den: Vec<f32>,
    attn: Vec<f32>,
    /// Linear with reduction: v interpolated to (B·N, C), the conv's input.
    v_full: Vec<f32>,
    /// FLatten: q and k + pe before the feature map, and softplus(θ) of this forward.
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    scale: Vec<f32>,
    /// (B·N, C) heads side by side, before proj.
    mixed: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct SrScratch {
    dmixed: Vec<f32>,
    dq: Vec<f32>,
    dkv: Vec<f32>,
    dsource: Vec<f32>,
    dreduced: Vec<f32>,
    dpatches: Vec<f32>,
    partials: Vec<f32>,
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported { what: what.into(), path: "the fast CPU path" }
}

impl FastSrAttention {
    pub fn lower(attn: &SpatialReductionAttention, table: &mut ParamTable) -> Result<Self> {
        let q = FastLinear::lower(&attn.q, table)?;
        let kv = FastLinear::lower(&attn.kv, table)?;
        let proj = FastLinear::lower(&attn.proj, table)?;
        let grid = attn.grid;
        let n = grid[0] * grid[1];
        let reduction = match &attn.sr {
            Some(sr) => Some(Reduction { sr: FastConv::lower(sr, Source::Rows, table)?, norm: attn.norm.as_ref().map(|n| FastNorm::lower(n, table)).transpose()? }),
            None => None,
        };
        let keys = reduction.as_ref().map_or(n, |r| {
            let [rows, cols] = r.sr.out_grid(grid);
            rows * cols
        });
        let mixer = match attn.core {
            Core::Softmax => SrMixer::Softmax,
            Core::Linear(feature_map) => {
                let feature = match feature_map {
                    FeatureMap::Relu => Feature::Relu,
                    FeatureMap::Focused { power } if power <= 6.0 => {
                        let theta = attn.scale.as_ref().ok_or_else(|| unsupported("focused attention without its scale"))?;
                        Feature::Focused { power: power as f32, theta: table.add(theta, Layout::Official)? }
                    }
                    FeatureMap::Focused { power } => return Err(unsupported(&format!("focused attention with power {power} > 6 (normalized by the row maximum)"))),
                };
                let pe = attn.positional_encoding.as_ref().ok_or_else(|| unsupported("linear attention without its positional encoding"))?;
                let dwc = attn.dwc.as_ref().ok_or_else(|| unsupported("linear attention without its depthwise conv"))?;
                let positional_encoding = table.add(pe, Layout::Official)?;
                let dwc_weight = table.add(&dwc.weight, Layout::Official)?;
                let dwc_bias = match &dwc.bias {
                    Some(b) => table.add(b, Layout::Official)?,
                    None => table.zeros(dwc.weight.dims()[0]),
                };
                let eps = linear_attention_eps(feature_map, keys) as f32;
                // The official code interpolates exactly when it reduced.
                let interpolation = reduction.is_some().then(|| Interpolation::new(keys, n));
                SrMixer::Linear { feature, eps, positional_encoding, dwc_weight, dwc_bias, kernel: dwc.weight.dims()[2], interpolation }
            }
        };
        Ok(Self { q, kv, proj, heads: attn.num_heads, reduction, mixer, grid, keys })
    }

    pub fn dim(&self) -> usize {
        self.q.inputs
    }

    /// Query tokens N.
    pub fn tokens(&self) -> usize {
        self.grid[0] * self.grid[1]
    }

    /// Key tokens N_r.
    pub fn keys(&self) -> usize {
        self.keys
    }

    pub fn has_scores(&self) -> bool {
        matches!(self.mixer, SrMixer::Softmax)
    }

    pub fn reduces(&self) -> bool {
        self.reduction.is_some()
    }

    /// Values of one reduction im2col row (0 without reduction).
    pub fn patch_len(&self) -> usize {
        self.reduction.as_ref().map_or(0, |r| r.sr.patch_len())
    }

    /// Whether v is interpolated to the query tokens before the conv.
    pub fn interpolates(&self) -> bool {
        matches!(self.mixer, SrMixer::Linear { interpolation: Some(_), .. })
    }

    /// The reduction's norm, if it has one.
    pub fn norm(&self) -> Option<&FastNorm> {
        self.reduction.as_ref()?.norm.as_ref()
    }

    /// The depthwise conv's taps and bias tiled over the heads (the kernels' layout); linear
    /// kinds only.
    pub fn tiled_conv(&self, p: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let SrMixer::Linear { dwc_weight, dwc_bias, kernel, .. } = &self.mixer else { return None };
        Some(attention_kernels::tile_over_heads(&p[dwc_weight.range()], &p[dwc_bias.range()], self.dim(), *kernel))
    }

    /// The depthwise conv over tiled taps (see [`tiled_conv`](Self::tiled_conv)).
    pub fn conv_view<'a>(&self, taps: &'a [f32], bias: &'a [f32]) -> Option<DepthwiseConv<'a>> {
        match self.mixer {
            SrMixer::Linear { kernel, .. } => Some(DepthwiseConv { taps, bias, grid: self.grid, kernel }),
            SrMixer::Softmax => None,
        }
    }

    /// Inference, first pass over the query rows `first..` of `input` (the layer's input rows):
    /// their queries into `q` (rows, C), through the feature map for the linear kinds; without
    /// reduction also their keys and values into `kv_rows` (rows, 2C) and, for the linear
    /// kinds, this block's Σk into `k_sum` (C) and KᵀV into `state` (heads·d·d). With
    /// reduction `kv_rows` is empty and [`infer_reduce`](Self::infer_reduce) makes them.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_rows(&self, p: &[f32], first: usize, input: &[f32], q: &mut [f32], kv_rows: &mut [f32], k_sum: &mut [f32], state: &mut [f32]) {
        self.q.apply(p, input, q);
        self.query_feature(p, q);
        if self.reduction.is_none() {
            self.kv.apply(p, input, kv_rows);
            self.key_state(p, first, kv_rows, k_sum, state);
        }
    }

    /// Inference with reduction: the reduced rows `first..` (as many as `kv_rows` holds, 2C
    /// each) from the whole (N, C) `input` grid: im2col into `patches`, the conv into
    /// `reduced`, its norm into `normed`, then kv and (linear kinds) this block's Σk and KᵀV.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_reduce(&self, p: &[f32], first: usize, input: &[f32], patches: &mut [f32], reduced: &mut [f32], normed: &mut [f32], kv_rows: &mut [f32], k_sum: &mut [f32], state: &mut [f32]) {
        let red = self.reduction.as_ref().expect("a reducing layer");
        red.sr.im2col(input, self.grid, first, patches);
        red.sr.proj.apply(p, patches, reduced);
        let source: &[f32] = match &red.norm {
            Some(norm) => {
                norm.infer(p, reduced, normed);
                normed
            }
            None => reduced,
        };
        self.kv.apply(p, source, kv_rows);
        self.key_state(p, first, kv_rows, k_sum, state);
    }

    /// Inference, between the passes (linear kinds with reduction): the query tokens `first..`
    /// of v interpolated from all N_r `kv_rows` into `v_full`.
    pub fn infer_values(&self, kv_rows: &[f32], first: usize, v_full: &mut [f32]) {
        if let SrMixer::Linear { interpolation: Some(interp), .. } = &self.mixer {
            interp.apply(kv_rows, 2 * self.dim(), self.dim(), first, v_full, self.dim());
        }
    }

    /// Inference, last pass: the attention of the query rows `first..` in `q` over all N_r keys
    /// of `kv_rows` (N_r, 2C) into `mixed` (rows, C); `scores` is (rows, N_r) scratch for
    /// softmax; the linear kinds add the tiled `conv` over `v_full` (interpolated v, (N, C)) or
    /// over v itself.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_queries(&self, first: usize, q: &[f32], kv_rows: &[f32], k_sum: &[f32], state: &[f32], conv: Option<&DepthwiseConv<'_>>, v_full: &[f32], mixed: &mut [f32], scores: &mut [f32]) {
        let c = self.dim();
        let (d, n_r, rows) = (c / self.heads, self.keys, mixed.len() / c);
        match &self.mixer {
            SrMixer::Softmax => {
                let scale = (d as f32).powf(-0.5);
                for h in 0..self.heads {
                    let (k, v) = (MatRef::columns(kv_rows, n_r, 2 * c, h * d, d), MatRef::columns(kv_rows, n_r, 2 * c, c + h * d, d));
                    matmul(MatMut::new(scores, rows, n_r), MatRef::columns(q, rows, c, h * d, d), k.t(), false, scale); // (rows, N_r)
                    attention_kernels::softmax_rows(scores, n_r);
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), MatRef::new(scores, rows, n_r), v, false, 1.0);
                }
            }
            SrMixer::Linear { eps, interpolation, .. } => {
                for h in 0..self.heads {
                    let kv = MatRef::new(&state[h * d * d..(h + 1) * d * d], d, d);
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), MatRef::columns(q, rows, c, h * d, d), kv, false, 1.0);
                    attention_kernels::normalize_rows(rows, mixed, c, h * d, q, c, h * d, &k_sum[h * d..(h + 1) * d], *eps);
                }
                let conv = conv.expect("linear attention has its tiled conv");
                match interpolation {
                    Some(_) => conv.add_to(v_full, c, 0, mixed, first),
                    None => conv.add_to(kv_rows, 2 * c, c, mixed, first),
                }
            }
        }
    }

    /// q ← φ(q) in place (linear kinds).
    fn query_feature(&self, p: &[f32], q: &mut [f32]) {
        let c = self.dim();
        match &self.mixer {
            SrMixer::Linear { feature: Feature::Relu, .. } => q.iter_mut().for_each(|v| *v = v.max(0.0)),
            SrMixer::Linear { feature: Feature::Focused { power, theta }, .. } => {
                let scale = softplus(&p[theta.range()]);
                q.chunks_exact_mut(c).for_each(|row| focus(row, &scale, *power));
            }
            SrMixer::Softmax => {}
        }
    }

    /// k ← φ(k + pe) for the key rows `first..` of `kv_rows`, then their Σk and every head's
    /// KᵀV (linear kinds; nothing for softmax).
    fn key_state(&self, p: &[f32], first: usize, kv_rows: &mut [f32], k_sum: &mut [f32], state: &mut [f32]) {
        let SrMixer::Linear { feature, positional_encoding, .. } = &self.mixer else { return };
        let c = self.dim();
        let (d, rows) = (c / self.heads, kv_rows.len() / (2 * c));
        let pe = &p[positional_encoding.range()][first * c..];
        let scale = match feature {
            Feature::Focused { theta, .. } => softplus(&p[theta.range()]),
            Feature::Relu => Vec::new(),
        };
        for (row, pe) in kv_rows.chunks_exact_mut(2 * c).zip(pe.chunks_exact(c)) {
            let k = &mut row[..c];
            k.iter_mut().zip(pe).for_each(|(k, e)| *k += e);
            match feature {
                Feature::Relu => k.iter_mut().for_each(|v| *v = v.max(0.0)),
                Feature::Focused { power, .. } => focus(k, &scale, *power),
            }
        }
        kernels::column_sums(kv_rows, rows, 2 * c, 0, k_sum);
        for h in 0..self.heads {
            let (k, v) = (MatRef::columns(kv_rows, rows, 2 * c, h * d, d), MatRef::columns(kv_rows, rows, 2 * c, c + h * d, d));
            matmul(MatMut::new(&mut state[h * d * d..(h + 1) * d * d], d, d), k.t(), v, false, 1.0); // (d, d)
        }
    }

    /// Training forward of `batch` images' (N, C) rows: `out (+)= attn(x)` (`accumulate`: add to
    /// what `out` holds, a residual), keeping the activations; the reduction's norm uses batch
    /// statistics and advances its counters like the burn layer (the counters only with
    /// `advance`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut SrActivations, batch: usize, advance: bool, accumulate: bool) -> Result<()> {
        let c = self.dim();
        let (heads, d, t, n_r, grid) = (self.heads, c / self.heads, self.tokens(), self.keys, self.grid);
        let rows = batch * t;
        self.q.forward(p, x, sized(&mut a.q, rows * c), false);
        if let Some(red) = &mut self.reduction {
            red.sr.im2col_batch(x, grid, batch, sized(&mut a.patches, batch * n_r * red.sr.patch_len()));
            red.sr.proj.forward(p, &a.patches, sized(&mut a.reduced, batch * n_r * c), false); // (B·N_r, C)
            if let Some(norm) = &mut red.norm {
                norm.forward(p, &a.reduced, sized(&mut a.normed, batch * n_r * c), &mut a.norm, c, advance)?;
            }
        }
        let source: &[f32] = match &self.reduction {
            Some(Reduction { norm: Some(_), .. }) => &a.normed,
            Some(Reduction { norm: None, .. }) => &a.reduced,
            None => x,
        };
        self.kv.forward(p, source, sized(&mut a.kv, batch * n_r * 2 * c), false); // (B·N_r, 2C)
        sized(&mut a.mixed, rows * c);
        match &self.mixer {
            SrMixer::Softmax => {
                let scale = (d as f32).powf(-0.5);
                let probs = sized(&mut a.probs, batch * heads * t * n_r);
                probs.par_chunks_mut(heads * t * n_r).zip(a.q.par_chunks(t * c)).zip(a.kv.par_chunks(n_r * 2 * c)).zip(a.mixed.par_chunks_mut(t * c)).for_each(|(((probs, q), kv), mixed)| {
                    for (h, p) in probs.chunks_exact_mut(t * n_r).enumerate() {
                        let (k, v) = (MatRef::columns(kv, n_r, 2 * c, h * d, d), MatRef::columns(kv, n_r, 2 * c, c + h * d, d));
                        matmul(MatMut::new(p, t, n_r), MatRef::columns(q, t, c, h * d, d), k.t(), false, scale); // (N, N_r)
                        attention_kernels::softmax_rows(p, n_r);
                        matmul(MatMut::columns(mixed, t, c, h * d, d), MatRef::new(p, t, n_r), v, false, 1.0);
                    }
                });
            }
            SrMixer::Linear { feature, eps, positional_encoding, kernel, interpolation, .. } => {
                let (taps, bias) = self.tiled_conv(p).expect("linear mixer");
                let conv = DepthwiseConv { taps: &taps, bias: &bias, grid, kernel: *kernel };
                let (pe, eps) = (&p[positional_encoding.range()], *eps);
                if let Feature::Focused { theta, .. } = feature {
                    a.scale = softplus(&p[theta.range()]);
                    sized(&mut a.q_pre, rows * c).copy_from_slice(&a.q);
                    let k_pre = sized(&mut a.k_pre, batch * n_r * c);
                    k_pre.par_chunks_mut(n_r * c).zip(a.kv.par_chunks(n_r * 2 * c)).for_each(|(pre, kv)| {
                        for ((pre, row), pe) in pre.chunks_exact_mut(c).zip(kv.chunks_exact(2 * c)).zip(pe.chunks_exact(c)) {
                            pre.iter_mut().zip(&row[..c]).zip(pe).for_each(|((p, k), e)| *p = k + e);
                        }
                    });
                }
                let (state, k_sum, den, attn) = (sized(&mut a.state, batch * heads * d * d), sized(&mut a.k_sum, batch * c), sized(&mut a.den, rows * heads), sized(&mut a.attn, rows * c));
                let v_full = sized(&mut a.v_full, if interpolation.is_some() { rows * c } else { 0 });
                let scale = &a.scale;
                // One (N, C) block of interpolated v per image, or an empty one.
                let v_blocks: Vec<&mut [f32]> = if interpolation.is_some() { v_full.chunks_mut(t * c).collect() } else { (0..batch).map(|_| <&mut [f32]>::default()).collect() };
                a.q.par_chunks_mut(t * c)
                    .zip(a.kv.par_chunks_mut(n_r * 2 * c))
                    .zip(a.mixed.par_chunks_mut(t * c))
                    .zip(attn.par_chunks_mut(t * c))
                    .zip(state.par_chunks_mut(heads * d * d))
                    .zip(k_sum.par_chunks_mut(c))
                    .zip(den.par_chunks_mut(t * heads))
                    .zip(v_blocks)
                    .for_each(|(((((((q, kv), mixed), attn), state), k_sum), den), v_full)| {
                        for (row, pe) in kv.chunks_exact_mut(2 * c).zip(pe.chunks_exact(c)) {
                            row[..c].iter_mut().zip(pe).for_each(|(k, e)| *k += e);
                        }
                        match feature {
                            Feature::Relu => {
                                q.iter_mut().for_each(|v| *v = v.max(0.0));
                                kv.chunks_exact_mut(2 * c).for_each(|row| row[..c].iter_mut().for_each(|v| *v = v.max(0.0)));
                            }
                            Feature::Focused { power, .. } => {
                                q.chunks_exact_mut(c).for_each(|row| focus(row, scale, *power));
                                kv.chunks_exact_mut(2 * c).for_each(|row| focus(&mut row[..c], scale, *power));
                            }
                        }
                        kernels::column_sums(kv, n_r, 2 * c, 0, k_sum);
                        for h in 0..heads {
                            let s = &mut state[h * d * d..(h + 1) * d * d];
                            matmul(MatMut::new(s, d, d), MatRef::columns(kv, n_r, 2 * c, h * d, d).t(), MatRef::columns(kv, n_r, 2 * c, c + h * d, d), false, 1.0);
                            matmul(MatMut::columns(attn, t, c, h * d, d), MatRef::columns(q, t, c, h * d, d), MatRef::new(s, d, d), false, 1.0);
                            let k_sum = &k_sum[h * d..(h + 1) * d];
                            for row in 0..t {
                                let q = &q[row * c + h * d..row * c + (h + 1) * d];
                                let denominator = kernels::dot(q, k_sum) + eps;
                                den[row * heads + h] = denominator;
                                attn[row * c + h * d..row * c + (h + 1) * d].iter_mut().for_each(|v| *v /= denominator);
                            }
                        }
                        mixed.copy_from_slice(attn);
                        match interpolation {
                            Some(interp) => {
                                interp.apply(kv, 2 * c, c, 0, v_full, c);
                                conv.add_to(v_full, c, 0, mixed, 0);
                            }
                            None => conv.add_to(kv, 2 * c, c, mixed, 0),
                        }
                    });
            }
        }
        self.proj.forward(p, &a.mixed, out, accumulate);
        Ok(())
    }

    /// The linear kinds' normalisers `φ(q)·Σφ(k) + ε` of the last training forward, (B·N, heads).
    #[cfg(test)]
    pub(crate) fn normalisers<'a>(&self, a: &'a SrActivations) -> &'a [f32] {
        &a.den
    }

    /// The rows kv reads: the normed (or plain) reduced rows, or x itself.
    fn source<'a>(&self, x: &'a [f32], a: &'a SrActivations) -> &'a [f32] {
        match &self.reduction {
            Some(Reduction { norm: Some(_), .. }) => &a.normed,
            Some(Reduction { norm: None, .. }) => &a.reduced,
            None => x,
        }
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the parameter gradients into `g`, for the
    /// activations of the last [`forward`](Self::forward) on `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &SrActivations, dy: &[f32], dx: &mut [f32], s: &mut SrScratch, batch: usize) {
        let c = self.dim();
        let (heads, d, t, n_r) = (self.heads, c / self.heads, self.tokens(), self.keys);
        let rows = batch * t;
        self.proj.backward_input(p, dy, sized(&mut s.dmixed, rows * c), |_, _| {});
        self.proj.backward_params(g, &a.mixed, dy, &mut s.partials);
        let dq = sized(&mut s.dq, rows * c);
        let dkv = sized(&mut s.dkv, batch * n_r * 2 * c);
        dq.fill(0.0);
        dkv.fill(0.0);
        match &self.mixer {
            SrMixer::Softmax => {
                let scale = (d as f32).powf(-0.5);
                dq.par_chunks_mut(t * c)
                    .zip(dkv.par_chunks_mut(n_r * 2 * c))
                    .zip(a.q.par_chunks(t * c))
                    .zip(a.kv.par_chunks(n_r * 2 * c))
                    .zip(a.probs.par_chunks(heads * t * n_r))
                    .zip(s.dmixed.par_chunks(t * c))
                    .for_each_init(
                        || vec![0.0; t * n_r],
                        |dp, (((((dq, dkv), q), kv), probs), dmixed)| {
                            for (h, p) in probs.chunks_exact(t * n_r).enumerate() {
                                let d_out = MatRef::columns(dmixed, t, c, h * d, d);
                                let (k, v) = (MatRef::columns(kv, n_r, 2 * c, h * d, d), MatRef::columns(kv, n_r, 2 * c, c + h * d, d));
                                matmul(MatMut::new(dp, t, n_r), d_out, v.t(), false, 1.0); // dP = dO·Vᵀ
                                matmul(MatMut::columns(dkv, n_r, 2 * c, c + h * d, d), MatRef::new(p, t, n_r).t(), d_out, false, 1.0); // dV = Pᵀ·dO
                                attention_kernels::softmax_backward_rows(p, dp, n_r);
                                matmul(MatMut::columns(dq, t, c, h * d, d), MatRef::new(dp, t, n_r), k, false, scale); // dQ = s·dS·K
                                matmul(MatMut::columns(dkv, n_r, 2 * c, h * d, d), MatRef::new(dp, t, n_r).t(), MatRef::columns(q, t, c, h * d, d), false, scale); // dK = s·dSᵀ·Q
                            }
                        },
                    );
            }
            SrMixer::Linear { feature, positional_encoding, dwc_weight, dwc_bias, kernel, interpolation, .. } => {
                let (taps, bias) = self.tiled_conv(p).expect("linear mixer");
                let conv = DepthwiseConv { taps: &taps, bias: &bias, grid: self.grid, kernel: *kernel };
                let conv_width = kernel * kernel * c + c;
                let partials = sized(&mut s.partials, batch * conv_width);
                let v_blocks: Vec<&[f32]> = if interpolation.is_some() { a.v_full.chunks(t * c).collect() } else { vec![&[]; batch] };
                dq.par_chunks_mut(t * c)
                    .zip(dkv.par_chunks_mut(n_r * 2 * c))
                    .zip(partials.par_chunks_mut(conv_width))
                    .zip(a.q.par_chunks(t * c))
                    .zip(a.kv.par_chunks(n_r * 2 * c))
                    .zip(a.attn.par_chunks(t * c))
                    .zip(a.state.par_chunks(heads * d * d))
                    .zip(a.k_sum.par_chunks(c))
                    .zip(a.den.par_chunks(t * heads))
                    .zip(s.dmixed.par_chunks(t * c))
                    .zip(v_blocks)
                    .for_each(|((((((((((dq, dkv), partial), q), kv), attn), state), k_sum), den), dmixed), v_full)| {
                        partial.fill(0.0);
                        let (dtaps, dbias) = partial.split_at_mut(kernel * kernel * c);
                        // The conv on v (interpolated or not): dv, tap and bias gradients.
                        match interpolation {
                            Some(interp) => {
                                let mut dv_full = vec![0.0; t * c];
                                conv.backward(dmixed, v_full, c, 0, &mut dv_full, c, 0, dtaps);
                                interp.backward_add(&dv_full, dkv, 2 * c, c, c);
                            }
                            None => conv.backward(dmixed, kv, 2 * c, c, dkv, 2 * c, c, dtaps),
                        }
                        kernels::column_sums(dmixed, t, c, 0, dbias);
                        let image = LinearImage { q, kv, attn, state, k_sum, den, dmixed };
                        linear_core_backward(&image, dq, dkv, heads, t, n_r);
                    });
                // The feature maps, from the gradient of their outputs to that of q and k + pe.
                match feature {
                    Feature::Relu => {
                        let per = row_block(rows);
                        dq.par_chunks_mut(per * c).zip(a.q.par_chunks(per * c)).for_each(|(dq, q)| attention_kernels::relu_backward(q, dq, 1.0));
                        dkv.par_chunks_mut(n_r * 2 * c).zip(a.kv.par_chunks(n_r * 2 * c)).for_each(|(dkv, kv)| {
                            dkv.chunks_exact_mut(2 * c).zip(kv.chunks_exact(2 * c)).for_each(|(dk, k)| attention_kernels::relu_backward(&k[..c], &mut dk[..c], 1.0));
                        });
                    }
                    Feature::Focused { power, theta } => {
                        let scale = &a.scale;
                        let mut dscale = vec![0.0f32; c];
                        for (dq, pre) in dq.chunks_exact_mut(c).zip(a.q_pre.chunks_exact(c)) {
                            focus_backward(pre, dq, scale, *power, &mut dscale);
                        }
                        for (dk, pre) in dkv.chunks_exact_mut(2 * c).zip(a.k_pre.chunks_exact(c)) {
                            focus_backward(pre, &mut dk[..c], scale, *power, &mut dscale);
                        }
                        let theta_values = &p[theta.range()];
                        g[theta.range()].iter_mut().zip(&dscale).zip(theta_values).for_each(|((gt, ds), th)| *gt += ds * sigmoid(*th)); // softplus' = sigmoid
                    }
                }
                // Conv weights: the per-image tiled gradients, folded back onto the d shared channels.
                let taps_n = kernel * kernel;
                let mut total = vec![0.0; conv_width];
                partials.chunks(conv_width).for_each(|p| kernels::add_assign(&mut total, p));
                let (dtaps, dbias) = total.split_at(taps_n * c);
                let gw = &mut g[dwc_weight.range()];
                for tap in 0..taps_n {
                    for ch in 0..c {
                        gw[(ch % d) * taps_n + tap] += dtaps[tap * c + ch];
                    }
                }
                let gb = &mut g[dwc_bias.range()];
                for ch in 0..c {
                    gb[ch % d] += dbias[ch];
                }
                // The positional encoding was added to k before its feature map: dk summed over the images.
                let dkv = &*dkv;
                g[positional_encoding.range()].par_chunks_mut(c).enumerate().for_each(|(token, ge)| {
                    for image in 0..batch {
                        let row = (image * n_r + token) * 2 * c;
                        kernels::add_assign(ge, &dkv[row..row + c]);
                    }
                });
            }
        }
        // kv's input, then q's: dx = dq·Wqᵀ + ∂(kv path).
        let source = self.source(x, a);
        let dsource = sized(&mut s.dsource, batch * n_r * c);
        self.kv.backward_input(p, &s.dkv, dsource, |_, _| {});
        self.kv.backward_params(g, source, &s.dkv, &mut s.partials);
        self.q.backward_input(p, &s.dq, dx, |_, _| {});
        self.q.backward_params(g, x, &s.dq, &mut s.partials);
        match &self.reduction {
            Some(red) => {
                let dreduced: &[f32] = match &red.norm {
                    Some(norm) => {
                        let dreduced = sized(&mut s.dreduced, batch * n_r * c);
                        dreduced.fill(0.0);
                        norm.backward(p, g, &a.reduced, &s.dsource, dreduced, &a.norm, c); // adds into dreduced
                        &s.dreduced
                    }
                    None => &s.dsource,
                };
                red.sr.proj.backward_params(g, &a.patches, dreduced, &mut s.partials);
                let dpatches = sized(&mut s.dpatches, a.patches.len());
                red.sr.proj.backward_input(p, dreduced, dpatches, |_, _| {});
                let len = n_r * red.sr.patch_len();
                dx.par_chunks_mut(t * c).zip(dpatches.par_chunks(len)).for_each(|(dx, dp)| red.sr.col2im_add(dp, self.grid, dx));
            }
            None => kernels::add_assign(dx, &s.dsource),
        }
    }
}

/// One image's linear-attention activations: φ(q) (N, C), φ(k) and v (N_r, 2C), the normalized
/// output without the conv (N, C), every head's φ(K)ᵀV, Σφ(k), the normalisers (N, heads), the
/// output gradient (N, C).
struct LinearImage<'a> {
    q: &'a [f32],
    kv: &'a [f32],
    attn: &'a [f32],
    state: &'a [f32],
    k_sum: &'a [f32],
    den: &'a [f32],
    dmixed: &'a [f32],
}

/// The linear-attention core's backward for one image: into `dq` (N, C) the gradient of φ(q),
/// into `dkv`'s k columns that of φ(k) and added to its v columns that of v.
fn linear_core_backward(a: &LinearImage<'_>, dq: &mut [f32], dkv: &mut [f32], heads: usize, t: usize, n_r: usize) {
    let c = a.k_sum.len();
    let d = c / heads;
    let mut dnum = vec![0.0; t * d];
    let mut dden = vec![0.0; t];
    let mut dstate = vec![0.0; d * d];
    for h in 0..heads {
        let cols = h * d..(h + 1) * d;
        // o = num / den: dnum = dO / den, dden = −dO·o / den.
        for row in 0..t {
            let den = a.den[row * heads + h];
            let (d_out, out) = (&a.dmixed[row * c + cols.start..row * c + cols.end], &a.attn[row * c + cols.start..row * c + cols.end]);
            dden[row] = -kernels::dot(d_out, out) / den;
            dnum[row * d..(row + 1) * d].iter_mut().zip(d_out).for_each(|(n, g)| *n = g / den);
        }
        let state = MatRef::new(&a.state[h * d * d..(h + 1) * d * d], d, d);
        let k_sum = &a.k_sum[cols.clone()];
        // num = φ(q)·S: dφ(q) = dnum·Sᵀ + dden·Σk, dS = φ(Q)ᵀ·dnum.
        matmul(MatMut::columns(dq, t, c, h * d, d), MatRef::new(&dnum, t, d), state.t(), false, 1.0);
        matmul(MatMut::new(&mut dstate, d, d), MatRef::columns(a.q, t, c, h * d, d).t(), MatRef::new(&dnum, t, d), false, 1.0);
        let mut dk_sum = vec![0.0f32; d];
        for row in 0..t {
            let q = &a.q[row * c + cols.start..row * c + cols.end];
            dq[row * c + cols.start..row * c + cols.end].iter_mut().zip(k_sum).for_each(|(g, k)| *g += dden[row] * k);
            dk_sum.iter_mut().zip(q).for_each(|(s, q)| *s += dden[row] * q);
        }
        // S = φ(K)ᵀ·V: dφ(K) = V·dSᵀ (+ dΣk on every row), dV += φ(K)·dS.
        let (k, v) = (MatRef::columns(a.kv, n_r, 2 * c, h * d, d), MatRef::columns(a.kv, n_r, 2 * c, c + h * d, d));
        matmul(MatMut::columns(dkv, n_r, 2 * c, h * d, d), v, MatRef::new(&dstate, d, d).t(), false, 1.0);
        matmul(MatMut::columns(dkv, n_r, 2 * c, c + h * d, d), k, MatRef::new(&dstate, d, d), true, 1.0);
        for row in 0..n_r {
            kernels::add_assign(&mut dkv[row * 2 * c + cols.start..row * 2 * c + cols.end], &dk_sum);
        }
    }
}
