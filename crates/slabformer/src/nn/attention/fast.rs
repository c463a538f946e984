//! The attention kinds on the fast path, lowered from their burn modules: softmax and ReLU/L over
//! each head's (T, T) scores (ReLU/L optionally with per-head qk-LayerNorm and an output gate),
//! and the linear kinds SLA and FLatten (a positive feature map, positional encoding on K, KᵀV
//! first, the depthwise conv on V shared by the heads).
//!
//! Layout: one sequence's tokens as a row-major (T, C) matrix and qkv as (T, 3C); heads are column
//! blocks read through strided GEMM views, so there are no head split/merge copies. Inference
//! works on row blocks of one sequence in two passes (keys first, then queries), training on the
//! whole batch with every activation its backward needs kept.

use rayon::prelude::*;

use super::{Attention, FOCUS_OFFSET, FeatureMap, Score, linear_attention_eps};
use crate::error::{Error, Result};
use super::kernels::{self as attention_kernels, DepthwiseConv};
use crate::kernels::{self, MatMut, MatRef, matmul};
use crate::nn::linear::FastLinear;
use crate::nn::lower::{Layout, ParamTable, Slot, row_block, sized};
use crate::nn::norm::{FastNorm, NormCache};

/// The positive feature map of a linear kind.
#[derive(Clone, Copy, Debug)]
pub enum Feature {
    /// SLA: φ(x) = ReLU(x).
    Relu,
    /// FLatten: φ(x) = f_p((ReLU(x) + offset) / softplus(θ)) over the channel axis.
    Focused { power: f32, theta: Slot },
}

/// How the layer mixes its tokens.
pub enum Mixer {
    /// Softmax or ReLU/L over each head's (T, T) scores.
    Dot { score: Score },
    /// SLA / FLatten: feature maps, positional encoding on K, depthwise conv on V.
    Linear { feature: Feature, eps: f32, positional_encoding: Slot, dwc_weight: Slot, dwc_bias: Slot, kernel: usize, grid: [usize; 2] },
}

/// An attention layer on the fast path: qkv → (qk-norm) → mixer → (gate) → proj.
pub struct FastAttention {
    pub qkv: FastLinear,
    pub mixer: Mixer,
    pub proj: FastLinear,
    pub heads: usize,
    /// Per-head LayerNorms over q and over k (ReLU/L with qk-norm).
    qk_norm: Option<(FastNorm, FastNorm)>,
    /// The output gate: heads' output ⊙ gate(x), before proj.
    gate: Option<FastLinear>,
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
    /// (R, C) heads side by side, before proj (after the gate).
    mixed: Vec<f32>,
    /// qk-norm: q and k before their LayerNorms, each (R, C), and the norms' statistics.
    q_pre: Vec<f32>,
    k_pre: Vec<f32>,
    q_norm: NormCache,
    k_norm: NormCache,
    /// Gate: the gate's output and the heads' output before it, each (R, C).
    gate: Vec<f32>,
    ungated: Vec<f32>,
    /// FLatten: q and k + pe before the feature map, (R, 2C).
    pre_feature: Vec<f32>,
    /// FLatten: softplus(θ) of this forward.
    scale: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct AttentionScratch {
    dmixed: Vec<f32>,
    dqkv: Vec<f32>,
    partials: Vec<f32>,
    /// qk-norm: one of q/k's gradients, contiguous, before and after its norm's backward.
    dnormed: Vec<f32>,
    dpre: Vec<f32>,
    /// Gate: the gradient of the gate's output and of its input.
    dgate: Vec<f32>,
    dgate_input: Vec<f32>,
}

fn unsupported(what: &str) -> Error {
    Error::Unsupported { what: what.into(), path: "the fast CPU path" }
}

impl FastAttention {
    pub fn lower(attn: &Attention, table: &mut ParamTable) -> Result<Self> {
        match attn {
            Attention::Dot(a) => {
                let qkv = FastLinear::lower(&a.qkv, table)?;
                let qk_norm = match (&a.q_norm, &a.k_norm) {
                    (Some(q), Some(k)) => Some((FastNorm::lower_layer_norm(q, table)?, FastNorm::lower_layer_norm(k, table)?)),
                    (None, None) => None,
                    _ => return Err(unsupported("a LayerNorm on only one of q and k")),
                };
                let gate = a.gate.as_ref().map(|g| FastLinear::lower(g, table)).transpose()?;
                Ok(Self { qkv, mixer: Mixer::Dot { score: a.score }, proj: FastLinear::lower(&a.proj, table)?, heads: a.num_heads, qk_norm, gate })
            }
            Attention::Linear(a) => {
                let qkv = FastLinear::lower(&a.qkv, table)?;
                let feature = match a.feature_map {
                    FeatureMap::Relu => Feature::Relu,
                    FeatureMap::Focused { power } if power <= 6.0 => {
                        let theta = a.scale.as_ref().ok_or_else(|| unsupported("focused attention without its scale"))?;
                        Feature::Focused { power: power as f32, theta: table.add(theta, Layout::Official)? }
                    }
                    FeatureMap::Focused { power } => return Err(unsupported(&format!("focused attention with power {power} > 6 (normalized by the row maximum)"))),
                };
                let positional_encoding = table.add(&a.positional_encoding, Layout::Official)?;
                let dwc_weight = table.add(&a.dwc.weight, Layout::Official)?;
                let dwc_bias = match &a.dwc.bias {
                    Some(b) => table.add(b, Layout::Official)?,
                    None => table.zeros(a.dwc.weight.dims()[0]),
                };
                let kernel = a.dwc.weight.dims()[2];
                let eps = linear_attention_eps(a.feature_map, a.grid[0] * a.grid[1]) as f32;
                let mixer = Mixer::Linear { feature, eps, positional_encoding, dwc_weight, dwc_bias, kernel, grid: a.grid };
                Ok(Self { qkv, mixer, proj: FastLinear::lower(&a.proj, table)?, heads: a.num_heads, qk_norm: None, gate: None })
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
            Mixer::Linear { grid, .. } => Some(grid),
        }
    }

    /// Whether the layer forms (T, T) score matrices.
    pub fn has_scores(&self) -> bool {
        matches!(self.mixer, Mixer::Dot { .. })
    }

    /// SLA's depthwise conv taps and bias tiled over the heads (the kernels' layout).
    pub fn tiled_conv(&self, p: &[f32]) -> Option<(Vec<f32>, Vec<f32>)> {
        let Mixer::Linear { dwc_weight, dwc_bias, kernel, .. } = &self.mixer else { return None };
        Some(attention_kernels::tile_over_heads(&p[dwc_weight.range()], &p[dwc_bias.range()], self.dim(), *kernel))
    }

    /// The depthwise conv over tiled taps (see [`tiled_conv`](Self::tiled_conv)); SLA only.
    pub fn conv_view<'a>(&self, taps: &'a [f32], bias: &'a [f32]) -> Option<DepthwiseConv<'a>> {
        match self.mixer {
            Mixer::Linear { kernel, grid, .. } => Some(DepthwiseConv { taps, bias, grid, kernel }),
            Mixer::Dot { .. } => None,
        }
    }

    pub fn has_gate(&self) -> bool {
        self.gate.is_some()
    }

    /// Inference, first pass over a block of rows starting at token `first`: qkv of `input`
    /// into `qkv` (rows, 3C), q and k normalized (qk-norm) or through the feature maps (linear
    /// kinds), then this block's Σk into `k_sum` (C) and every head's KᵀV into `kv` (heads·d·d).
    pub fn infer_keys(&self, p: &[f32], first: usize, input: &[f32], qkv: &mut [f32], k_sum: &mut [f32], kv: &mut [f32]) {
        let c = self.dim();
        let d = c / self.heads;
        let rows = qkv.len() / (3 * c);
        self.qkv.apply(p, input, qkv); // (rows, 3C)
        if let Some((q_norm, k_norm)) = &self.qk_norm {
            let mut row_copy = vec![0.0; c];
            for row in qkv.chunks_exact_mut(3 * c) {
                for (norm, start) in [(q_norm, 0), (k_norm, c)] {
                    row_copy.copy_from_slice(&row[start..start + c]);
                    norm.infer(p, &row_copy, &mut row[start..start + c]); // per head: rows of d
                }
            }
        }
        if let Mixer::Linear { feature, positional_encoding, .. } = &self.mixer {
            let pe = &p[positional_encoding.range()][first * c..];
            match feature {
                Feature::Relu => attention_kernels::sla_feature_maps(qkv, pe, c),
                Feature::Focused { power, theta } => {
                    let scale = softplus(&p[theta.range()]);
                    for (row, pe) in qkv.chunks_exact_mut(3 * c).zip(pe.chunks_exact(c)) {
                        let (q, rest) = row.split_at_mut(c);
                        focus(q, &scale, *power);
                        rest[..c].iter_mut().zip(pe).for_each(|(k, p)| *k += p);
                        focus(&mut rest[..c], &scale, *power);
                    }
                }
            }
            kernels::column_sums(qkv, rows, 3 * c, c, k_sum);
            for h in 0..self.heads {
                let k = MatRef::columns(qkv, rows, 3 * c, c + h * d, d);
                let v = MatRef::columns(qkv, rows, 3 * c, 2 * c + h * d, d);
                matmul(MatMut::new(&mut kv[h * d * d..(h + 1) * d * d], d, d), k.t(), v, false, 1.0); // (d, d)
            }
        }
    }

    /// Inference, second pass: the attention of the query rows `first..` that `mixed` holds over
    /// all T keys of `qkv` (T, 3C), heads side by side in `mixed`, gated by `gate(input)` when
    /// the layer has a gate (`input`: the layer's input rows, `gate_out` scratch of the same
    /// size); `scores` is (rows, T) scratch for the dot kinds, `conv` the linear kinds' tiled
    /// depthwise conv.
    #[allow(clippy::too_many_arguments)]
    pub fn infer_queries<'a>(&self, p: &[f32], first: usize, qkv: &'a [f32], k_sum: &[f32], kv: &[f32], conv: Option<&DepthwiseConv<'_>>, input: &[f32], mixed: &mut [f32], gate_out: &mut [f32], scores: &mut [f32]) {
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
                        Score::Softmax => attention_kernels::softmax_rows(scores, t),
                        Score::ReluOverLength => attention_kernels::scaled_relu(scores, 1.0 / t as f32),
                    }
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), MatRef::new(scores, rows, t), v, false, 1.0);
                }
            }
            Mixer::Linear { eps, .. } => {
                for h in 0..self.heads {
                    let kv = MatRef::new(&kv[h * d * d..(h + 1) * d * d], d, d);
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), rows_of(column(h * d)), kv, false, 1.0);
                    attention_kernels::normalize_rows(rows, mixed, c, h * d, &qkv[first * 3 * c..], 3 * c, h * d, &k_sum[h * d..(h + 1) * d], *eps);
                }
                conv.expect("linear attention has its tiled conv").add_to(qkv, 3 * c, 2 * c, mixed, first);
            }
        }
        if let Some(gate) = &self.gate {
            let gate_out = &mut gate_out[..rows * c];
            gate.apply(p, input, gate_out);
            mixed.iter_mut().zip(gate_out.iter()).for_each(|(m, g)| *m *= g);
        }
    }

    /// Training forward of `batch` sequences of `t` tokens: `out (+)= attn(x)` (`accumulate`:
    /// add to what `out` holds, a residual), keeping the activations.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut AttentionActivations, batch: usize, t: usize, accumulate: bool) -> Result<()> {
        let c = self.dim();
        let (heads, d, rows) = (self.heads, c / self.heads, batch * t);
        self.qkv.forward(p, x, sized(&mut a.qkv, rows * 3 * c), false); // (R, 3C)
        if let Some((q_norm, k_norm)) = &mut self.qk_norm {
            for (norm, start, pre, cache) in [(q_norm, 0, &mut a.q_pre, &mut a.q_norm), (k_norm, c, &mut a.k_pre, &mut a.k_norm)] {
                gather_columns(&a.qkv, 3 * c, start, sized(pre, rows * c));
                let mut normed = vec![0.0; rows * c];
                norm.forward(p, pre, &mut normed, cache, d, true)?; // (R·heads, d) rows
                scatter_columns(&normed, &mut a.qkv, 3 * c, start);
            }
        }
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
                            Score::Softmax => attention_kernels::softmax_rows(p, t),
                            Score::ReluOverLength => attention_kernels::scaled_relu(p, 1.0 / t as f32),
                        }
                        matmul(MatMut::columns(mixed, t, c, h * d, d), MatRef::new(p, t, t), column(2 * c + h * d), false, 1.0);
                    }
                });
            }
            Mixer::Linear { feature, eps, positional_encoding, kernel, grid, .. } => {
                let (taps, bias) = self.tiled_conv(p).expect("linear mixer");
                let conv = DepthwiseConv { taps: &taps, bias: &bias, grid: *grid, kernel: *kernel };
                let pe = &p[positional_encoding.range()];
                let eps = *eps;
                if let Feature::Focused { theta, .. } = feature {
                    a.scale = softplus(&p[theta.range()]);
                    // q and k + pe, the feature maps' inputs, for the backward pass.
                    let pre = sized(&mut a.pre_feature, rows * 2 * c);
                    pre.par_chunks_mut(t * 2 * c).zip(a.qkv.par_chunks(t * 3 * c)).for_each(|(pre, qkv)| {
                        for ((pre, row), pe) in pre.chunks_exact_mut(2 * c).zip(qkv.chunks_exact(3 * c)).zip(pe.chunks_exact(c)) {
                            pre[..c].copy_from_slice(&row[..c]);
                            pre[c..].iter_mut().zip(&row[c..2 * c]).zip(pe).for_each(|((p, k), e)| *p = k + e);
                        }
                    });
                }
                let (kv, k_sum, den, attn) = (sized(&mut a.kv, batch * heads * d * d), sized(&mut a.k_sum, batch * c), sized(&mut a.den, rows * heads), sized(&mut a.attn, rows * c));
                let scale = &a.scale;
                a.qkv
                    .par_chunks_mut(t * 3 * c)
                    .zip(a.mixed.par_chunks_mut(t * c))
                    .zip(attn.par_chunks_mut(t * c))
                    .zip(kv.par_chunks_mut(heads * d * d))
                    .zip(k_sum.par_chunks_mut(c))
                    .zip(den.par_chunks_mut(t * heads))
                    .for_each(|(((((qkv, mixed), attn), kv), k_sum), den)| {
                        linear_core_forward(qkv, pe, feature, scale, eps, heads, kv, k_sum, den, attn);
                        mixed.copy_from_slice(attn);
                        conv.add_to(qkv, 3 * c, 2 * c, mixed, 0);
                    });
            }
        }
        if let Some(gate) = &self.gate {
            gate.forward(p, x, sized(&mut a.gate, rows * c), false);
            sized(&mut a.ungated, rows * c).copy_from_slice(&a.mixed);
            a.mixed.par_chunks_mut(t * c).zip(a.gate.par_chunks(t * c)).for_each(|(m, g)| m.iter_mut().zip(g).for_each(|(m, g)| *m *= g));
        }
        self.proj.forward(p, &a.mixed, out, accumulate);
        Ok(())
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the parameter gradients into `g`, for the
    /// activations of the last [`forward`](Self::forward) on `x`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &AttentionActivations, dy: &[f32], dx: &mut [f32], s: &mut AttentionScratch, batch: usize, t: usize) {
        let c = self.dim();
        let (heads, d, rows) = (self.heads, c / self.heads, batch * t);
        self.proj.backward_input(p, dy, sized(&mut s.dmixed, rows * c), |_, _| {});
        self.proj.backward_params(g, &a.mixed, dy, &mut s.partials);
        if self.gate.is_some() {
            // mixed = ungated ⊙ gate: the gate's output gets dmixed ⊙ ungated, the heads dmixed ⊙ gate.
            let dgate = sized(&mut s.dgate, rows * c);
            dgate.par_chunks_mut(t * c).zip(s.dmixed.par_chunks(t * c)).zip(a.ungated.par_chunks(t * c)).for_each(|((o, d), u)| o.iter_mut().zip(d).zip(u).for_each(|((o, d), u)| *o = d * u));
            s.dmixed.par_chunks_mut(t * c).zip(a.gate.par_chunks(t * c)).for_each(|(d, g)| d.iter_mut().zip(g).for_each(|(d, g)| *d *= g));
        }
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
                                    Score::Softmax => attention_kernels::softmax_backward_rows(p, dp, t),
                                    Score::ReluOverLength => attention_kernels::relu_backward(p, dp, 1.0 / t as f32),
                                }
                                matmul(MatMut::columns(dqkv, t, 3 * c, h * d, d), MatRef::new(dp, t, t), column(c + h * d), false, scale); // dQ = s·dS·K
                                matmul(MatMut::columns(dqkv, t, 3 * c, c + h * d, d), MatRef::new(dp, t, t).t(), column(h * d), false, scale); // dK = s·dSᵀ·Q
                            }
                        },
                    );
                if let Some((q_norm, k_norm)) = &self.qk_norm {
                    for (norm, start, pre, cache) in [(q_norm, 0, &a.q_pre, &a.q_norm), (k_norm, c, &a.k_pre, &a.k_norm)] {
                        gather_columns(dqkv, 3 * c, start, sized(&mut s.dnormed, rows * c));
                        let dpre = sized(&mut s.dpre, rows * c);
                        dpre.fill(0.0);
                        norm.backward(p, g, pre, &s.dnormed, dpre, cache, d);
                        scatter_columns(dpre, dqkv, 3 * c, start);
                    }
                }
            }
            Mixer::Linear { feature, positional_encoding, dwc_weight, dwc_bias, kernel, grid, .. } => {
                let (taps, bias) = self.tiled_conv(p).expect("linear mixer");
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
                        linear_core_backward(LinearImage { qkv, attn, kv, k_sum, den, dmixed }, dqkv, partial, &conv, heads, t);
                    });
                // The feature maps, from the gradient of their outputs to that of q and k + pe.
                match feature {
                    Feature::Relu => dqkv.par_chunks_mut(t * 3 * c).zip(a.qkv.par_chunks(t * 3 * c)).for_each(|(dq, q)| {
                        for (dq, q) in dq.chunks_exact_mut(3 * c).zip(q.chunks_exact(3 * c)) {
                            attention_kernels::relu_backward(&q[..2 * c], &mut dq[..2 * c], 1.0);
                        }
                    }),
                    Feature::Focused { power, theta } => {
                        // Per row: dq, dk through f_p and the scale; the scale's gradient summed.
                        let scale = &a.scale;
                        let per = row_block(rows);
                        let mut dscale_parts = vec![0.0f32; rows.div_ceil(per) * c];
                        dscale_parts.par_chunks_mut(c).zip(dqkv.par_chunks_mut(per * 3 * c)).zip(a.pre_feature.par_chunks(per * 2 * c)).for_each(|((dscale, dqkv), pre)| {
                            for (dq, pre) in dqkv.chunks_exact_mut(3 * c).zip(pre.chunks_exact(2 * c)) {
                                focus_backward(&pre[..c], &mut dq[..c], scale, *power, dscale);
                                focus_backward(&pre[c..], &mut dq[c..2 * c], scale, *power, dscale);
                            }
                        });
                        let theta_values = &p[theta.range()];
                        let gt = &mut g[theta.range()];
                        for part in dscale_parts.chunks(c) {
                            for ((gt, ds), th) in gt.iter_mut().zip(part).zip(theta_values) {
                                *gt += ds * sigmoid(*th); // softplus' = sigmoid
                            }
                        }
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
                // The positional encoding was added to k before its feature map: its gradient is
                // dk summed over the images.
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
        if let Some(gate) = &self.gate {
            gate.backward_input(p, &s.dgate, sized(&mut s.dgate_input, rows * c), |_, _| {});
            kernels::add_assign(dx, &s.dgate_input);
            gate.backward_params(g, x, &s.dgate, &mut s.partials);
        }
    }
}

/// Columns `[start, start + C)` of a matrix with `stride` into the contiguous (rows, C) `out`.
fn gather_columns(m: &[f32], stride: usize, start: usize, out: &mut [f32]) {
    let rows = m.len() / stride;
    let (c, per) = (out.len() / rows, row_block(rows));
    out.par_chunks_mut(per * c).zip(m.par_chunks(per * stride)).for_each(|(o, m)| {
        o.chunks_exact_mut(c).zip(m.chunks_exact(stride)).for_each(|(o, row)| o.copy_from_slice(&row[start..start + c]));
    });
}

/// The inverse of [`gather_columns`].
fn scatter_columns(src: &[f32], m: &mut [f32], stride: usize, start: usize) {
    let rows = m.len() / stride;
    let (c, per) = (src.len() / rows, row_block(rows));
    m.par_chunks_mut(per * stride).zip(src.par_chunks(per * c)).for_each(|(m, s)| {
        m.chunks_exact_mut(stride).zip(s.chunks_exact(c)).for_each(|(row, s)| row[start..start + c].copy_from_slice(s));
    });
}

/// softplus(θ) = ln(1 + e^θ), per channel, as PyTorch computes it (linear above 20).
pub(super) fn softplus(theta: &[f32]) -> Vec<f32> {
    theta.iter().map(|&x| if x > 20.0 { x } else { x.exp().ln_1p() }).collect()
}

pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// FLatten's feature map in place on one row of C channels:
/// u = (ReLU(x) + offset) / s, φ = u^p · ‖u‖ / ‖u^p‖.
pub(super) fn focus(x: &mut [f32], scale: &[f32], power: f32) {
    x.iter_mut().zip(scale).for_each(|(v, s)| *v = (v.max(0.0) + FOCUS_OFFSET as f32) / s);
    let norm = x.iter().map(|u| u * u).sum::<f32>().sqrt();
    x.iter_mut().for_each(|u| *u = u.powf(power));
    let norm_p = x.iter().map(|w| w * w).sum::<f32>().sqrt();
    let factor = norm / norm_p;
    x.iter_mut().for_each(|w| *w *= factor);
}

/// The backward of [`focus`] for one row: `grad` (∂L/∂φ) becomes ∂L/∂x given the row's input
/// `pre`; the scale's gradient is added into `dscale`. With a = ‖u‖ and ŵ = u^p / ‖u^p‖ (φ = a·ŵ),
/// s = ∂L/∂φ · ŵ: ∂L/∂u = p·a·(ŵ/u)·(∂L/∂φ − s·ŵ) + s·u/a. Written with ŵ rather than ‖u^p‖³,
/// which underflows f32 for rows of tiny u.
pub(super) fn focus_backward(pre: &[f32], grad: &mut [f32], scale: &[f32], power: f32, dscale: &mut [f32]) {
    let offset = FOCUS_OFFSET as f32;
    let u: Vec<f32> = pre.iter().zip(scale).map(|(v, s)| (v.max(0.0) + offset) / s).collect();
    let a = u.iter().map(|u| u * u).sum::<f32>().sqrt();
    let mut w: Vec<f32> = u.iter().map(|u| u.powf(power)).collect();
    let b = w.iter().map(|w| w * w).sum::<f32>().sqrt();
    w.iter_mut().for_each(|w| *w /= b); // ŵ
    let along = grad.iter().zip(&w).map(|(g, w)| g * w).sum::<f32>();
    for (((((g, &u), &w), &x), s), ds) in grad.iter_mut().zip(&u).zip(&w).zip(pre).zip(scale).zip(dscale.iter_mut()) {
        let du = power * a * (w / u) * (*g - along * w) + along * u / a;
        *ds -= du * u / s; // u = r / s
        *g = if x > 0.0 { du / s } else { 0.0 };
    }
}

/// The linear kinds' core on one sequence (an image, or one CSWin window) of (t, 3c) qkv rows:
/// the feature maps in place (k with the positional encoding `pe` (t, c) added first; `scale` is
/// FLatten's softplus(θ), empty for SLA), Σφ(k) into `k_sum` (c), every head's φ(K)ᵀV into `kv`
/// (heads·d·d), the normalisers into `den` (t, heads) and the normalized output into `attn`
/// (t, c); the conv on V is the caller's.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_core_forward(qkv: &mut [f32], pe: &[f32], feature: &Feature, scale: &[f32], eps: f32, heads: usize, kv: &mut [f32], k_sum: &mut [f32], den: &mut [f32], attn: &mut [f32]) {
    let c = k_sum.len();
    let (d, t) = (c / heads, attn.len() / c);
    match feature {
        Feature::Relu => attention_kernels::sla_feature_maps(qkv, pe, c),
        Feature::Focused { power, .. } => {
            for (row, pe) in qkv.chunks_exact_mut(3 * c).zip(pe.chunks_exact(c)) {
                let (q, rest) = row.split_at_mut(c);
                focus(q, scale, *power);
                rest[..c].iter_mut().zip(pe).for_each(|(k, p)| *k += p);
                focus(&mut rest[..c], scale, *power);
            }
        }
    }
    kernels::column_sums(qkv, t, 3 * c, c, k_sum);
    let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
    for h in 0..heads {
        let kv = &mut kv[h * d * d..(h + 1) * d * d];
        matmul(MatMut::new(kv, d, d), column(c + h * d).t(), column(2 * c + h * d), false, 1.0); // (d, d)
        matmul(MatMut::columns(attn, t, c, h * d, d), column(h * d), MatRef::new(kv, d, d), false, 1.0);
        let k_sum = &k_sum[h * d..(h + 1) * d];
        for row in 0..t {
            let q = &qkv[row * 3 * c + h * d..row * 3 * c + (h + 1) * d];
            let denominator = q.iter().zip(k_sum).map(|(q, k)| q * k).sum::<f32>() + eps;
            den[row * heads + h] = denominator;
            attn[row * c + h * d..row * c + (h + 1) * d].iter_mut().for_each(|v| *v /= denominator);
        }
    }
}

/// One image's (or CSWin window's) linear-attention activations.
pub(super) struct LinearImage<'a> {
    pub qkv: &'a [f32],
    pub attn: &'a [f32],
    pub kv: &'a [f32],
    pub k_sum: &'a [f32],
    pub den: &'a [f32],
    pub dmixed: &'a [f32],
}

/// The linear-attention core's backward for one image: `dqkv` (T, 3C) from `dmixed` (q and k as
/// the gradients of the feature maps' outputs), and this image's conv tap and bias gradients
/// (tiled layout) into `partial`.
pub(super) fn linear_core_backward(a: LinearImage<'_>, dqkv: &mut [f32], partial: &mut [f32], conv: &DepthwiseConv<'_>, heads: usize, t: usize) {
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
}
