//! The attention kinds on the fast path, lowered from their burn modules: softmax and ReLU/L over
//! each head's (T, T) scores, and SLA (ReLU feature maps, positional encoding on K, KᵀV first,
//! the depthwise conv on V shared by the heads).
//!
//! Layout: one sequence's tokens as a row-major (T, C) matrix and qkv as (T, 3C); heads are column
//! blocks read through strided GEMM views, so there are no head split/merge copies. Inference
//! works on row blocks of one sequence in two passes (keys first, then queries), training on the
//! whole batch with every activation its backward needs kept.

use rayon::prelude::*;

use super::{Attention, FeatureMap, Score};
use crate::error::{Error, Result};
use crate::kernels::{self, DepthwiseConv, MatMut, MatRef, matmul};
use crate::nn::linear::FastLinear;
use crate::nn::lower::{Layout, ParamTable, Slot, sized};

/// SLA's normaliser epsilon (`q·Σk + ε`), as in the official code.
pub const SLA_EPS: f32 = 1e-6;

/// How the layer mixes its tokens.
pub enum Mixer {
    /// Softmax or ReLU/L over each head's (T, T) scores.
    Dot { score: Score },
    /// SLA: ReLU feature maps, positional encoding on K, depthwise conv on V.
    Sla { positional_encoding: Slot, dwc_weight: Slot, dwc_bias: Slot, kernel: usize, grid: [usize; 2] },
}

/// An attention layer on the fast path: qkv → mixer → proj.
pub struct FastAttention {
    pub qkv: FastLinear,
    pub mixer: Mixer,
    pub proj: FastLinear,
    pub heads: usize,
}

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct AttentionActivations {
    /// (R, 3C); for SLA, q and k after their feature maps.
    qkv: Vec<f32>,
    /// (B, heads, T, T) attention weights (softmax / ReLU-L).
    probs: Vec<f32>,
    /// SLA: per image every head's φ(K)ᵀV (heads·d·d), Σφ(k) (C), normalisers (T, heads) and the
    /// normalized attention output without the conv (R, C).
    kv: Vec<f32>,
    k_sum: Vec<f32>,
    den: Vec<f32>,
    attn: Vec<f32>,
    /// (R, C) heads side by side, before proj.
    mixed: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct AttentionScratch {
    dmixed: Vec<f32>,
    dqkv: Vec<f32>,
    partials: Vec<f32>,
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported { what: what.into(), path: "the fast CPU path" }
}

impl FastAttention {
    pub fn lower(attn: &Attention, table: &mut ParamTable) -> Result<Self> {
        match attn {
            Attention::Dot(a) => {
                if a.q_norm.is_some() || a.gate.is_some() {
                    return Err(unsupported("qk-norm or gated ReLU attention"));
                }
                Ok(Self { qkv: FastLinear::lower(&a.qkv, table)?, mixer: Mixer::Dot { score: a.score }, proj: FastLinear::lower(&a.proj, table)?, heads: a.num_heads })
            }
            Attention::Linear(a) => {
                if a.feature_map != FeatureMap::Relu {
                    return Err(unsupported("focused linear attention (FLatten)"));
                }
                let qkv = FastLinear::lower(&a.qkv, table)?;
                let positional_encoding = table.add(&a.positional_encoding, Layout::Official)?;
                let dwc_weight = table.add(&a.dwc.weight, Layout::Official)?;
                let dwc_bias = match &a.dwc.bias {
                    Some(b) => table.add(b, Layout::Official)?,
                    None => table.zeros(a.dwc.weight.dims()[0]),
                };
                let kernel = a.dwc.weight.dims()[2];
                let mixer = Mixer::Sla { positional_encoding, dwc_weight, dwc_bias, kernel, grid: a.grid };
                Ok(Self { qkv, mixer, proj: FastLinear::lower(&a.proj, table)?, heads: a.num_heads })
            }
        }
    }

    pub fn dim(&self) -> usize {
        self.qkv.inputs
    }

    /// The tokens this layer is fixed to (SLA's grid), if any.
    pub fn grid(&self) -> Option<[usize; 2]> {
        match self.mixer {
            Mixer::Dot { .. } => None,
            Mixer::Sla { grid, .. } => Some(grid),
        }
    }

    /// Whether the layer forms (T, T) score matrices.
    pub fn has_scores(&self) -> bool {
        matches!(self.mixer, Mixer::Dot { .. })
    }

    /// SLA's depthwise conv taps and bias tiled over the heads (the kernels' layout).
    pub fn tiled_conv(&self, p: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let Mixer::Sla { dwc_weight, dwc_bias, kernel, .. } = &self.mixer else { return None };
        Some(kernels::tile_over_heads(&p[dwc_weight.range()], &p[dwc_bias.range()], self.dim(), *kernel))
    }

    /// The depthwise conv over tiled taps (see [`tiled_conv`](Self::tiled_conv)); SLA only.
    pub fn conv_view<'a>(&self, taps: &'a [f32], bias: &'a [f32]) -> Option<DepthwiseConv<'a>> {
        match self.mixer {
            Mixer::Sla { kernel, grid, .. } => Some(DepthwiseConv { taps, bias, grid, kernel }),
            Mixer::Dot { .. } => None,
        }
    }

    /// Inference, first pass over a block of rows starting at token `first`: qkv of `input`
    /// into `qkv` (rows, 3C); SLA: the feature maps, then this block's Σk into `k_sum` (C) and
    /// every head's KᵀV into `kv` (heads·d·d).
    pub fn infer_keys(&self, p: &[f32], first: usize, input: &[f32], qkv: &mut [f32], k_sum: &mut [f32], kv: &mut [f32]) {
        let c = self.dim();
        let d = c / self.heads;
        let rows = qkv.len() / (3 * c);
        self.qkv.apply(p, input, qkv); // (rows, 3C)
        if let Mixer::Sla { positional_encoding, .. } = &self.mixer {
            kernels::sla_feature_maps(qkv, &p[positional_encoding.range()][first * c..], c);
            kernels::column_sums(qkv, rows, 3 * c, c, k_sum);
            for h in 0..self.heads {
                let k = MatRef::columns(qkv, rows, 3 * c, c + h * d, d);
                let v = MatRef::columns(qkv, rows, 3 * c, 2 * c + h * d, d);
                matmul(MatMut::new(&mut kv[h * d * d..(h + 1) * d * d], d, d), k.t(), v, false, 1.0); // (d, d)
            }
        }
    }

    /// Inference, second pass: the attention of the query rows `first..` that `mixed` holds over
    /// all T keys of `qkv` (T, 3C), heads side by side in `mixed`; `scores` is (rows, T) scratch
    /// for the dot kinds, `conv` SLA's tiled depthwise conv.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_queries<'a>(&self, first: usize, qkv: &'a [f32], k_sum: &[f32], kv: &[f32], conv: Option<&DepthwiseConv<'_>>, mixed: &mut [f32], scores: &mut [f32]) {
        let c = self.dim();
        let d = c / self.heads;
        let t = qkv.len() / (3 * c);
        let rows = mixed.len() / c;
        let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
        let rows_of = |m: MatRef<'a>| MatRef { offset: m.offset + first * m.row_stride, rows, ..m };
        match &self.mixer {
            Mixer::Dot { score } => {
                let scale = (d as f32).powf(-0.5);
                for h in 0..self.heads {
                    let (q, k, v) = (column(h * d), column(c + h * d), column(2 * c + h * d));
                    matmul(MatMut::new(scores, rows, t), rows_of(q), k.t(), false, scale); // (rows, T)
                    match score {
                        Score::Softmax => kernels::softmax_rows(scores, t),
                        Score::ReluOverLength => kernels::scaled_relu(scores, 1.0 / t as f32),
                    }
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), MatRef::new(scores, rows, t), v, false, 1.0);
                }
            }
            Mixer::Sla { .. } => {
                for h in 0..self.heads {
                    let kv = MatRef::new(&kv[h * d * d..(h + 1) * d * d], d, d);
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), rows_of(column(h * d)), kv, false, 1.0);
                    kernels::normalize_rows(rows, mixed, c, h * d, &qkv[first * 3 * c..], 3 * c, h * d, &k_sum[h * d..(h + 1) * d], SLA_EPS);
                }
                conv.expect("SLA has its tiled conv").add_to(qkv, 3 * c, 2 * c, mixed, first);
            }
        }
    }

    /// Training forward of `batch` sequences of `t` tokens: `out (+)= attn(x)` (`accumulate`:
    /// add to what `out` holds, a residual), keeping the activations.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut AttentionActivations, batch: usize, t: usize, accumulate: bool) {
        let c = self.dim();
        let (heads, d, rows) = (self.heads, c / self.heads, batch * t);
        self.qkv.forward(p, x, sized(&mut a.qkv, rows * 3 * c), false); // (R, 3C)
        sized(&mut a.mixed, rows * c);
        match &self.mixer {
            Mixer::Dot { score } => {
                let scale = (d as f32).powf(-0.5);
                let probs = sized(&mut a.probs, batch * heads * t * t);
                probs.par_chunks_mut(heads * t * t).zip(a.qkv.par_chunks(t * 3 * c)).zip(a.mixed.par_chunks_mut(t * c)).for_each(|((probs, qkv), mixed)| {
                    let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
                    for (h, p) in probs.chunks_exact_mut(t * t).enumerate() {
                        matmul(MatMut::new(p, t, t), column(h * d), column(c + h * d).t(), false, scale); // (T, T)
                        match score {
                            Score::Softmax => kernels::softmax_rows(p, t),
                            Score::ReluOverLength => kernels::scaled_relu(p, 1.0 / t as f32),
                        }
                        matmul(MatMut::columns(mixed, t, c, h * d, d), MatRef::new(p, t, t), column(2 * c + h * d), false, 1.0);
                    }
                });
            }
            Mixer::Sla { positional_encoding, kernel, grid, .. } => {
                let (taps, bias) = self.tiled_conv(p).expect("SLA mixer");
                let conv = DepthwiseConv { taps: &taps, bias: &bias, grid: *grid, kernel: *kernel };
                let pe = &p[positional_encoding.range()];
                let (kv, k_sum, den, attn) = (sized(&mut a.kv, batch * heads * d * d), sized(&mut a.k_sum, batch * c), sized(&mut a.den, rows * heads), sized(&mut a.attn, rows * c));
                a.qkv
                    .par_chunks_mut(t * 3 * c)
                    .zip(a.mixed.par_chunks_mut(t * c))
                    .zip(attn.par_chunks_mut(t * c))
                    .zip(kv.par_chunks_mut(heads * d * d))
                    .zip(k_sum.par_chunks_mut(c))
                    .zip(den.par_chunks_mut(t * heads))
                    .for_each(|(((((qkv, mixed), attn), kv), k_sum), den)| {
                        kernels::sla_feature_maps(qkv, pe, c);
                        kernels::column_sums(qkv, t, 3 * c, c, k_sum);
                        let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
                        for h in 0..heads {
                            let kv = &mut kv[h * d * d..(h + 1) * d * d];
                            matmul(MatMut::new(kv, d, d), column(c + h * d).t(), column(2 * c + h * d), false, 1.0); // (d, d)
                            matmul(MatMut::columns(attn, t, c, h * d, d), column(h * d), MatRef::new(kv, d, d), false, 1.0);
                            let k_sum = &k_sum[h * d..(h + 1) * d];
                            for row in 0..t {
                                let q = &qkv[row * 3 * c + h * d..row * 3 * c + (h + 1) * d];
                                let denominator = q.iter().zip(k_sum).map(|(q, k)| q * k).sum::<f32>() + SLA_EPS;
                                den[row * heads + h] = denominator;
                                attn[row * c + h * d..row * c + (h + 1) * d].iter_mut().for_each(|v| *v /= denominator);
                            }
                        }
                        mixed.copy_from_slice(attn);
                        conv.add_to(qkv, 3 * c, 2 * c, mixed, 0);
                    });
            }
        }
        self.proj.forward(p, &a.mixed, out, accumulate);
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the parameter gradients into `g`, for the
    /// activations of the last [`forward`](Self::forward) on `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &AttentionActivations, dy: &[f32], dx: &mut [f32], s: &mut AttentionScratch, batch: usize, t: usize) {
        let c = self.dim();
        let (heads, d, rows) = (self.heads, c / self.heads, batch * t);
        self.proj.backward_input(p, dy, sized(&mut s.dmixed, rows * c), |_, _| {});
        self.proj.backward_params(g, &a.mixed, dy, &mut s.partials);
        let dqkv = sized(&mut s.dqkv, rows * 3 * c);
        match &self.mixer {
            Mixer::Dot { score } => {
                let scale = (d as f32).powf(-0.5);
                dqkv.par_chunks_mut(t * 3 * c)
                    .zip(a.qkv.par_chunks(t * 3 * c))
                    .zip(a.probs.par_chunks(heads * t * t))
                    .zip(s.dmixed.par_chunks(t * c))
                    .for_each_init(
                        || vec![0.0; t * t],
                        |dp, (((dqkv, qkv), probs), dmixed)| {
                            let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
                            for (h, p) in probs.chunks_exact(t * t).enumerate() {
                                let d_out = MatRef::columns(dmixed, t, c, h * d, d);
                                matmul(MatMut::new(dp, t, t), d_out, column(2 * c + h * d).t(), false, 1.0); // dP = dO·Vᵀ
                                matmul(MatMut::columns(dqkv, t, 3 * c, 2 * c + h * d, d), MatRef::new(p, t, t).t(), d_out, false, 1.0); // dV = Pᵀ·dO
                                match score {
                                    Score::Softmax => kernels::softmax_backward_rows(p, dp, t),
                                    Score::ReluOverLength => kernels::relu_backward(p, dp, 1.0 / t as f32),
                                }
                                matmul(MatMut::columns(dqkv, t, 3 * c, h * d, d), MatRef::new(dp, t, t), column(c + h * d), false, scale); // dQ = s·dS·K
                                matmul(MatMut::columns(dqkv, t, 3 * c, c + h * d, d), MatRef::new(dp, t, t).t(), column(h * d), false, scale); // dK = s·dSᵀ·Q
                            }
                        },
                    );
            }
            Mixer::Sla { positional_encoding, dwc_weight, dwc_bias, kernel, grid } => {
                let (taps, bias) = self.tiled_conv(p).expect("SLA mixer");
                let conv = DepthwiseConv { taps: &taps, bias: &bias, grid: *grid, kernel: *kernel };
                let conv_width = kernel * kernel * c + c;
                let partials = sized(&mut s.partials, batch * conv_width);
                dqkv.par_chunks_mut(t * 3 * c)
                    .zip(partials.par_chunks_mut(conv_width))
                    .zip(a.qkv.par_chunks(t * 3 * c))
                    .zip(a.attn.par_chunks(t * c))
                    .zip(a.kv.par_chunks(heads * d * d))
                    .zip(a.k_sum.par_chunks(c))
                    .zip(a.den.par_chunks(t * heads))
                    .zip(s.dmixed.par_chunks(t * c))
                    .for_each(|(((((((dqkv, partial), qkv), attn), kv), k_sum), den), dmixed)| {
                        sla_backward(SlaImage { qkv, attn, kv, k_sum, den, dmixed }, dqkv, partial, &conv, heads, t);
                    });
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
                // The positional encoding was added to k before its ReLU: its gradient is dk summed
                // over the images.
                let dqkv = &*dqkv;
                g[positional_encoding.range()].par_chunks_mut(c).enumerate().for_each(|(token, ge)| {
                    for image in 0..batch {
                        let row = (image * t + token) * 3 * c;
                        kernels::add_assign(ge, &dqkv[row + c..row + 2 * c]);
                    }
                });
            }
        }
        self.qkv.backward_input(p, &s.dqkv, dx, |_, _| {});
        self.qkv.backward_params(g, x, &s.dqkv, &mut s.partials);
    }
}

/// One image's SLA activations.
struct SlaImage<'a> {
    qkv: &'a [f32],
    attn: &'a [f32],
    kv: &'a [f32],
    k_sum: &'a [f32],
    den: &'a [f32],
    dmixed: &'a [f32],
}

/// SLA backward for one image: `dqkv` (T, 3C) from `dmixed`, and this image's conv tap and bias
/// gradients (tiled layout) into `partial`.
fn sla_backward(a: SlaImage<'_>, dqkv: &mut [f32], partial: &mut [f32], conv: &DepthwiseConv<'_>, heads: usize, t: usize) {
    let c = a.k_sum.len();
    let d = c / heads;
    dqkv.fill(0.0);
    partial.fill(0.0);
    let (dtaps, dbias) = partial.split_at_mut(conv.kernel * conv.kernel * c);
    // The conv on v: dv = convᵀ(dO), tap and bias gradients.
    conv.backward(a.dmixed, a.qkv, 3 * c, 2 * c, dqkv, 3 * c, 2 * c, dtaps);
    kernels::column_sums(a.dmixed, t, c, 0, dbias);
    let mut dnum = vec![0.0; t * d];
    let mut dden = vec![0.0; t];
    let mut dkv = vec![0.0; d * d];
    let column = |start: usize| MatRef::columns(a.qkv, t, 3 * c, start, d);
    for h in 0..heads {
        let cols = h * d..(h + 1) * d;
        // o = num / den: dnum = dO / den, dden = −dO·o / den.
        for row in 0..t {
            let den = a.den[row * heads + h];
            let d_out = &a.dmixed[row * c + cols.start..row * c + cols.end];
            let out = &a.attn[row * c + cols.start..row * c + cols.end];
            dden[row] = -d_out.iter().zip(out).map(|(g, o)| g * o).sum::<f32>() / den;
            dnum[row * d..(row + 1) * d].iter_mut().zip(d_out).for_each(|(n, g)| *n = g / den);
        }
        let kv = MatRef::new(&a.kv[h * d * d..(h + 1) * d * d], d, d);
        let k_sum = &a.k_sum[cols.clone()];
        // num = φ(q)·KV: dφ(q) = dnum·KVᵀ + dden·Σk, dKV = φ(Q)ᵀ·dnum.
        matmul(MatMut::columns(dqkv, t, 3 * c, h * d, d), MatRef::new(&dnum, t, d), kv.t(), false, 1.0);
        matmul(MatMut::new(&mut dkv, d, d), column(h * d).t(), MatRef::new(&dnum, t, d), false, 1.0);
        let mut dk_sum = vec![0.0f32; d];
        for row in 0..t {
            let q = &a.qkv[row * 3 * c + h * d..row * 3 * c + (h + 1) * d];
            let dq = &mut dqkv[row * 3 * c + h * d..row * 3 * c + (h + 1) * d];
            dq.iter_mut().zip(k_sum).for_each(|(g, k)| *g += dden[row] * k);
            dk_sum.iter_mut().zip(q).for_each(|(s, q)| *s += dden[row] * q);
        }
        // KV = φ(K)ᵀ·V: dφ(K) = V·dKVᵀ (+ dΣk on every row), dV += φ(K)·dKV.
        matmul(MatMut::columns(dqkv, t, 3 * c, c + h * d, d), column(2 * c + h * d), MatRef::new(&dkv, d, d).t(), false, 1.0);
        matmul(MatMut::columns(dqkv, t, 3 * c, 2 * c + h * d, d), column(c + h * d), MatRef::new(&dkv, d, d), true, 1.0);
        for row in 0..t {
            let dk = &mut dqkv[row * 3 * c + c + h * d..row * 3 * c + c + (h + 1) * d];
            kernels::add_assign(dk, &dk_sum);
        }
    }
    // The feature maps: ReLU on q and on k + pe (kept after the ReLU in qkv).
    for row in 0..t {
        let base = row * 3 * c;
        kernels::relu_backward(&a.qkv[base..base + 2 * c], &mut dqkv[base..base + 2 * c], 1.0);
    }
}
