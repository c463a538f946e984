//! The attention kinds' row kernels: softmax and ReLU/L weights and their backward, SLA's feature
//! maps and normaliser, and the depthwise conv on V (AVX-512 kernel where the CPU has it).

use crate::kernels::{dot, exp, multiversion, reduce, sum};

/// Scores this far below their row's maximum get weight exactly 0. e^−70 ≈ 4e−31 is lost in any
/// row sum (≥ 1) at f32 precision; kept, such weights (every pair across Swin's −100 region mask)
/// turn subnormal once divided by the sum, and each product that reads a subnormal costs ~100
/// cycles: measured 3× on Swin-T stage 1's shifted windows.
const NEGLIGIBLE_GAP: f32 = -70.0;

multiversion! {
    /// Softmax of each row (length `cols`) in place; see [`NEGLIGIBLE_GAP`].
    pub fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            let max = reduce(row, f32::NEG_INFINITY, |v| v, f32::max);
            for v in row.iter_mut() {
                let gap = *v - max;
                *v = if gap < NEGLIGIBLE_GAP { 0.0 } else { exp(gap) };
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// `x = max(x · scale, 0)`.
    pub fn scaled_relu(x: &mut [f32], scale: f32) {
        for v in x.iter_mut() {
            *v = (*v * scale).max(0.0);
        }
    }
}

multiversion! {
    /// SLA's feature maps in place on (T, 3C) qkv rows: q ← ReLU(q), k ← ReLU(k + pe_t).
    pub fn sla_feature_maps(qkv: &mut [f32], positional_encoding: &[f32], c: usize) {
        for (row, pe) in qkv.chunks_exact_mut(3 * c).zip(positional_encoding.chunks_exact(c)) {
            let (q, rest) = row.split_at_mut(c);
            for v in q.iter_mut() {
                *v = v.max(0.0);
            }
            for (v, p) in rest[..c].iter_mut().zip(pe) {
                *v = (*v + p).max(0.0);
            }
        }
    }
}


multiversion! {
    /// Linear-attention normaliser for one head: each row segment `out[t, start..start + d]` is
    /// divided by `q_t · k_sum + eps`, with `q_t = q[t, q_start..q_start + d]`.
    pub fn normalize_rows(
        rows: usize,
        out: &mut [f32],
        out_stride: usize,
        start: usize,
        q: &[f32],
        q_stride: usize,
        q_start: usize,
        k_sum: &[f32],
        eps: f32,
    ) {
        let d = k_sum.len();
        for t in 0..rows {
            let q_row = &q[t * q_stride + q_start..t * q_stride + q_start + d];
            let denominator = dot(q_row, k_sum) + eps;
            let inv = 1.0 / denominator;
            for v in &mut out[t * out_stride + start..t * out_stride + start + d] {
                *v *= inv;
            }
        }
    }
}

/// A depthwise k×k convolution (stride 1, zero "same" padding) over a token grid whose tokens are
/// row-major with their channels contiguous; `taps[(i·k + j)·C + ch]` is channel ch's weight at
/// kernel offset (i, j).
#[derive(Clone, Copy, Debug)]
pub struct DepthwiseConv<'a> {
    pub taps: &'a [f32],
    pub bias: &'a [f32],
    pub grid: [usize; 2],
    pub kernel: usize,
}

/// SLA's depthwise conv over head_dim `d` channels, shared by every head, laid out for
/// [`DepthwiseConv`] over all `c` channels: weight (d, k·k) → taps (k·k, c), bias (d) → (c),
/// channel ch taking channel ch mod d.
pub fn tile_over_heads(weight: &[f32], bias: &[f32], c: usize, kernel: usize) -> (Vec<f32>, Vec<f32>) {
    let (d, taps) = (bias.len(), kernel * kernel);
    let tiled = (0..taps).flat_map(|tap| (0..c).map(move |ch| weight[(ch % d) * taps + tap])).collect();
    (tiled, (0..c).map(|ch| bias[ch % d]).collect())
}


impl DepthwiseConv<'_> {
    /// `out[t, ch] += bias[ch] + Σ taps[i·k + j][ch] · x[t + (i - k/2, j - k/2), ch]` for the
    /// output tokens `first_token..` that `out` holds, where x is the columns `[start, start + C)`
    /// of a matrix with `x_stride`. Vectorized over channels; with AVX-512 and channels in blocks
    /// of 16, each block accumulates every tap in a register.
    pub fn add_to(&self, x: &[f32], x_stride: usize, start: usize, out: &mut [f32], first_token: usize) {
        let c = self.bias.len();
        let tokens = self.grid[0] * self.grid[1];
        let k = self.kernel;
        assert!(out.len().is_multiple_of(c) && first_token + out.len() / c <= tokens, "output tokens outside the grid");
        assert!(self.taps.len() >= k * k * c, "taps for a {k}×{k} kernel over {c} channels");
        assert!(tokens == 0 || x.len() >= (tokens - 1) * x_stride + start + c, "input rows shorter than the grid");
        #[cfg(target_arch = "x86_64")]
        if c.is_multiple_of(16) && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the asserts above bound every load and store.
            unsafe { depthwise_conv_add_avx512(self, x, x_stride, start, out, first_token) };
            return;
        }
        depthwise_conv_add_portable(self, x, x_stride, start, out, first_token);
    }

    /// For an output token: its grid (row, column) and the input rows and columns its window
    /// covers inside the grid.
    #[inline(always)]
    fn window(&self, token: usize) -> (usize, usize, std::ops::Range<usize>, std::ops::Range<usize>) {
        let ([rows, cols], pad) = (self.grid, self.kernel / 2);
        let (r, col) = (token / cols, token % cols);
        (r, col, r.saturating_sub(pad)..(r + pad + 1).min(rows), col.saturating_sub(pad)..(col + pad + 1).min(cols))
    }

    /// Offset of the weights for input (i, j) seen from output (r, col).
    #[inline(always)]
    fn tap(&self, r: usize, col: usize, i: usize, j: usize) -> usize {
        let pad = self.kernel / 2;
        ((i + pad - r) * self.kernel + (j + pad - col)) * self.bias.len()
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn depthwise_conv_add_avx512(conv: &DepthwiseConv<'_>, x: &[f32], x_stride: usize, start: usize, out: &mut [f32], first_token: usize) {
    use std::arch::x86_64::*;
    let c = conv.bias.len();
    let cols = conv.grid[1];
    for (index, o) in out.chunks_exact_mut(c).enumerate() {
        let (r, col, window_rows, window_cols) = conv.window(first_token + index);
        for base in (0..c).step_by(16) {
            // SAFETY (all pointer arithmetic): base + 16 ≤ c; tap < k²·c and src ≤ (tokens − 1)·
            // x_stride + start + c − 16, as `add_to` asserted.
            unsafe {
                let mut acc = _mm512_add_ps(_mm512_loadu_ps(o.as_ptr().add(base)), _mm512_loadu_ps(conv.bias.as_ptr().add(base)));
                for i in window_rows.clone() {
                    for j in window_cols.clone() {
                        let tap = conv.tap(r, col, i, j) + base;
                        let src = (i * cols + j) * x_stride + start + base;
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(conv.taps.as_ptr().add(tap)), _mm512_loadu_ps(x.as_ptr().add(src)), acc);
                    }
                }
                _mm512_storeu_ps(o.as_mut_ptr().add(base), acc);
            }
        }
    }
}

multiversion! {
    /// [`DepthwiseConv::add_to`] for any channel count and CPU.
    fn depthwise_conv_add_portable(conv: &DepthwiseConv<'_>, x: &[f32], x_stride: usize, start: usize, out: &mut [f32], first_token: usize) {
        let c = conv.bias.len();
        let cols = conv.grid[1];
        for (index, o) in out.chunks_exact_mut(c).enumerate() {
            let (r, col, window_rows, window_cols) = conv.window(first_token + index);
            for (v, b) in o.iter_mut().zip(conv.bias) {
                *v += b;
            }
            for i in window_rows {
                for j in window_cols.clone() {
                    let tap = conv.tap(r, col, i, j);
                    let src = (i * cols + j) * x_stride + start;
                    for ((v, w), s) in o.iter_mut().zip(&conv.taps[tap..tap + c]).zip(&x[src..src + c]) {
                        *v += w * s;
                    }
                }
            }
        }
    }
}

impl DepthwiseConv<'_> {
    /// The backward pass of [`add_to`](Self::add_to) over a whole grid: `dx += convᵀ(dout)` into
    /// the columns `[dx_start, dx_start + C)` of `dx`, and every tap's weight gradient into
    /// `dtaps` (same layout as `taps`). The bias gradient is the column sum of `dout`.
    pub fn backward(&self, dout: &[f32], x: &[f32], x_stride: usize, start: usize, dx: &mut [f32], dx_stride: usize, dx_start: usize, dtaps: &mut [f32]) {
        let c = self.bias.len();
        let tokens = self.grid[0] * self.grid[1];
        let k = self.kernel;
        assert_eq!(dout.len(), tokens * c, "output gradient for every grid token");
        assert!(dtaps.len() >= k * k * c && self.taps.len() >= k * k * c, "taps for a {k}×{k} kernel over {c} channels");
        assert!(x.len() >= (tokens - 1) * x_stride + start + c && dx.len() >= (tokens - 1) * dx_stride + dx_start + c, "input rows shorter than the grid");
        depthwise_conv_backward(self, dout, x, x_stride, start, dx, dx_stride, dx_start, dtaps);
    }
}

multiversion! {
    fn depthwise_conv_backward(conv: &DepthwiseConv<'_>, dout: &[f32], x: &[f32], x_stride: usize, start: usize, dx: &mut [f32], dx_stride: usize, dx_start: usize, dtaps: &mut [f32]) {
        let c = conv.bias.len();
        let cols = conv.grid[1];
        for (token, g) in dout.chunks_exact(c).enumerate() {
            let (r, col, window_rows, window_cols) = conv.window(token);
            for i in window_rows {
                for j in window_cols.clone() {
                    let tap = conv.tap(r, col, i, j);
                    let input = i * cols + j;
                    let src = &x[input * x_stride + start..input * x_stride + start + c];
                    for ((dt, g), s) in dtaps[tap..tap + c].iter_mut().zip(g).zip(src) {
                        *dt += g * s;
                    }
                    let dst = &mut dx[input * dx_stride + dx_start..input * dx_stride + dx_start + c];
                    for ((d, g), w) in dst.iter_mut().zip(g).zip(&conv.taps[tap..tap + c]) {
                        *d += g * w;
                    }
                }
            }
        }
    }
}


multiversion! {
    /// Softmax backward in place: each row of `grad` (length `cols`) becomes
    /// `p ⊙ (grad − Σ grad·p)` for the probabilities `p` of that row.
    pub fn softmax_backward_rows(p: &[f32], grad: &mut [f32], cols: usize) {
        for (p, g) in p.chunks_exact(cols).zip(grad.chunks_exact_mut(cols)) {
            let s = dot(p, g);
            for (g, p) in g.iter_mut().zip(p) {
                *g = p * (*g - s);
            }
        }
    }
}

multiversion! {
    /// `grad = grad·scale` where `out > 0`, else 0: the backward of `out = max(x·scale, 0)`.
    pub fn relu_backward(out: &[f32], grad: &mut [f32], scale: f32) {
        for (g, o) in grad.iter_mut().zip(out) {
            *g = if *o > 0.0 { *g * scale } else { 0.0 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_rows_matches_the_naive_form() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut s = x.clone();
        softmax_rows(&mut s, 6);
        for (row, srow) in x.chunks(6).zip(s.chunks(6)) {
            let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            for (&v, &p) in row.iter().zip(srow) {
                assert!(((v as f64).exp() / z - p as f64).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn softmax_gives_far_below_the_maximum_exactly_zero() {
        // A shifted Swin window's row: the region mask puts −100 on the other regions' pairs.
        let mut row = vec![0.5, -99.5, 1.0, -100.0, 0.0, -30.0];
        softmax_rows(&mut row, 6);
        assert_eq!((row[1], row[3]), (0.0, 0.0));
        assert!(row.iter().all(|v| *v == 0.0 || v.is_normal()), "{row:?}");
        assert!(row[5] > 0.0 && (row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn depthwise_conv_matches_direct_sum() {
        // 3 channels: the portable kernel; 32: the AVX-512 one where the CPU has it.
        for (c, stride, start) in [(3, 4, 1), (32, 40, 5)] {
            let (rows, cols, k) = (4, 5, 3);
            let x: Vec<f32> = (0..rows * cols * stride).map(|i| ((i * 13) % 9) as f32 - 4.0).collect();
            let taps: Vec<f32> = (0..k * k * c).map(|i| ((i * 5) % 7) as f32 * 0.25).collect();
            let bias: Vec<f32> = (0..c).map(|i| (i % 4) as f32 - 1.5).collect();
            let conv = DepthwiseConv { taps: &taps, bias: &bias, grid: [rows, cols], kernel: k };
            let mut out = vec![0.0; rows * cols * c];
            conv.add_to(&x, stride, start, &mut out, 0);
            // The same tokens computed in two blocks, as the threads split them.
            let mut split = vec![0.0; rows * cols * c];
            let (head, tail) = split.split_at_mut(7 * c);
            conv.add_to(&x, stride, start, head, 0);
            conv.add_to(&x, stride, start, tail, 7);
            assert_eq!(split, out);
            for r in 0..rows as isize {
                for q in 0..cols as isize {
                    for ch in 0..c {
                        let mut want = bias[ch];
                        for i in -1..=1isize {
                            for j in -1..=1isize {
                                let (rr, qq) = (r + i, q + j);
                                if rr >= 0 && qq >= 0 && rr < rows as isize && qq < cols as isize {
                                    let tap = (((i + 1) * 3 + j + 1) as usize) * c + ch;
                                    want += taps[tap] * x[(rr as usize * cols + qq as usize) * stride + start + ch];
                                }
                            }
                        }
                        let got = out[(r as usize * cols + q as usize) * c + ch];
                        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "c {c}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
