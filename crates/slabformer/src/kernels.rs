//! The runtime's kernels on row-major `f32` slices: GEMM (the `gemm` crate) on strided views, and
//! the elementwise and row operations around it, compiled for AVX-512 and AVX2 + FMA and picked
//! at run time, with a portable fallback.

use gemm::Parallelism;

/// Compiles `$body` three times (AVX-512, AVX2 + FMA, baseline) and dispatches on what the CPU
/// has. The body is plain Rust over slices, which LLVM vectorizes for the enabled features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn portable($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) {
                    portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: the features this version was compiled for are present.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

/// A read-only matrix view into a slice: element (i, j) at `offset + i·row_stride + j·col_stride`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, row_stride: cols, col_stride: 1 }
    }

    /// Columns `[start, start + cols)` of every row of a row-major matrix with `row_stride`.
    pub fn columns(data: &'a [f32], rows: usize, row_stride: usize, start: usize, cols: usize) -> Self {
        Self { data, offset: start, rows, cols, row_stride, col_stride: 1 }
    }

    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matrix view ends at {last}, past its slice of {}", self.data.len());
        }
    }
}

/// A writable matrix view; see [`MatRef`].
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatMut<'a> {
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self { data, offset: 0, rows, cols, row_stride: cols }
    }

    pub fn columns(data: &'a mut [f32], rows: usize, row_stride: usize, start: usize, cols: usize) -> Self {
        Self { data, offset: start, rows, cols, row_stride }
    }
}

/// `dst = accumulate·dst + scale·lhs·rhs` on the calling thread (callers split rows over threads).
pub fn matmul(dst: MatMut<'_>, lhs: MatRef<'_>, rhs: MatRef<'_>, accumulate: bool, scale: f32) {
    // gemm copies the weight matrix into a packed layout on every call unless the call is
    // narrow; our (in, out) weights are already in the layout its kernel reads, so let it read
    // them in place (a process-wide setting of the crate, results unchanged). Measured here:
    // SLAB-DeiT-T batch 1 13.1–13.3 → 12.2–12.6 ms, batch 32 430 → 401 ms (fastest of 100 and 8
    // calls, alternating runs); training steps and burn's own matmuls unchanged within noise.
    static UNPACKED_WEIGHTS: std::sync::Once = std::sync::Once::new();
    UNPACKED_WEIGHTS.call_once(|| gemm::set_lhs_packing_threshold_single_thread(256));
    assert_eq!(lhs.cols, rhs.rows, "inner dimensions");
    assert_eq!((dst.rows, dst.cols), (lhs.rows, rhs.cols), "output shape");
    lhs.check();
    rhs.check();
    MatRef { data: dst.data, offset: dst.offset, rows: dst.rows, cols: dst.cols, row_stride: dst.row_stride, col_stride: 1 }.check();
    // SAFETY: every view was checked to lie inside its slice; `dst` is borrowed mutably, so it
    // aliases neither input.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr().add(dst.offset),
            1,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

multiversion! {
    /// Every row of `x` (row length `bias.len()`) plus `bias`.
    pub fn add_bias(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }
}

multiversion! {
    /// `x = gelu(x + bias)` row by row, GELU with the exact erf form.
    pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}

multiversion! {
    /// `dst[i] += src[i]`.
    pub fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

/// Reductions in 16 independent lanes: a float sum in one accumulator is a serial chain that
/// LLVM may not reorder, so it would not vectorize.
const LANES: usize = 16;

#[inline(always)]
fn reduce(x: &[f32], init: f32, map: impl Fn(f32) -> f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = op(*a, map(v));
        }
    }
    let mut total = acc.into_iter().fold(init, &op);
    for &v in tail {
        total = op(total, map(v));
    }
    total
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |v| v, |a, b| a + b)
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, &x), &y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.into_iter().sum::<f32>() + ta.iter().zip(tb).map(|(x, y)| x * y).sum::<f32>()
}

multiversion! {
    /// LayerNorm of each row of `x` (row length `weight.len()`) into `out`; two-pass variance
    /// like PyTorch.
    pub fn layer_norm(x: &[f32], out: &mut [f32], weight: &[f32], bias: &[f32], eps: f32) {
        let c = weight.len();
        for (row, out) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let mean = sum(row) / c as f32;
            let var = reduce(row, 0.0, |v| (v - mean) * (v - mean), |a, b| a + b) / c as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, v), w), b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

multiversion! {
    /// Softmax of each row (length `cols`) in place.
    pub fn softmax_rows(x: &mut [f32], cols: usize) {
        for row in x.chunks_exact_mut(cols) {
            let max = reduce(row, f32::NEG_INFINITY, |v| v, f32::max);
            for v in row.iter_mut() {
                *v = exp(*v - max);
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
    /// Sum of the rows of a matrix with `row_stride`, over columns `[start, start + out.len())`.
    pub fn column_sums(x: &[f32], rows: usize, row_stride: usize, start: usize, out: &mut [f32]) {
        out.fill(0.0);
        let c = out.len();
        for r in 0..rows {
            let row = &x[r * row_stride + start..r * row_stride + start + c];
            for (o, v) in out.iter_mut().zip(row) {
                *o += v;
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

/// ln Σ exp(row) in f64, shifted by the row's maximum so that it cannot overflow.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() + max as f64
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

// ---- Training kernels: the forward pieces whose results the backward pass keeps, and the
// backward passes of the row operations.

multiversion! {
    /// `pre += bias` and `act = gelu(pre)` row by row: fc1 keeps its pre-activation for the
    /// backward pass.
    pub fn bias_gelu_keep(pre: &mut [f32], act: &mut [f32], bias: &[f32]) {
        for (row, out) in pre.chunks_exact_mut(bias.len()).zip(act.chunks_exact_mut(bias.len())) {
            for ((v, o), b) in row.iter_mut().zip(out.iter_mut()).zip(bias) {
                *v += b;
                *o = gelu(*v);
            }
        }
    }
}

multiversion! {
    /// `grad *= gelu'(pre)`, with gelu'(x) = Φ(x) + x·φ(x).
    pub fn gelu_backward(pre: &[f32], grad: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (g, &x) in grad.iter_mut().zip(pre) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *g *= cdf + x * pdf;
        }
    }
}

multiversion! {
    /// Each row's mean and 1/sqrt(var + eps) (biased variance, two passes) into `stats`, two
    /// values per row.
    pub fn row_stats(x: &[f32], c: usize, eps: f32, stats: &mut [f32]) {
        for (row, s) in x.chunks_exact(c).zip(stats.chunks_exact_mut(2)) {
            let mean = sum(row) / c as f32;
            let var = reduce(row, 0.0, |v| (v - mean) * (v - mean), |a, b| a + b) / c as f32;
            s[0] = mean;
            s[1] = 1.0 / (var + eps).sqrt();
        }
    }
}

multiversion! {
    /// `out[ch] = Σ_rows (x[row, ch] − mean[ch])²` (rows of `mean.len()` values).
    pub fn column_square_deviations(x: &[f32], mean: &[f32], out: &mut [f32]) {
        out.fill(0.0);
        for row in x.chunks_exact(mean.len()) {
            for ((o, v), m) in out.iter_mut().zip(row).zip(mean) {
                *o += (v - m) * (v - m);
            }
        }
    }
}

/// The two branches a training-mode norm mixes, `y = ln_weight·LN(x) + bn_weight·RepBN(x)`;
/// an absent branch is not computed.
#[derive(Clone, Copy, Debug)]
pub struct NormTerms<'a> {
    /// Per-row (mean, 1/std), LN weight and bias, and the branch's weight λ.
    pub ln: Option<(&'a [f32], &'a [f32], &'a [f32], f32)>,
    /// Per-channel BN mean and 1/std, γ, β, α, and the branch's weight 1 − λ.
    pub bn: Option<BnTerms<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct BnTerms<'a> {
    pub mean: &'a [f32],
    pub inv_std: &'a [f32],
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub alpha: f32,
    pub weight: f32,
}

multiversion! {
    /// `out = ln_weight·((x − m)·r·w + b) + bn_weight·((x − μ)·s·γ + β + α·x)` row by row.
    pub fn norm_apply(x: &[f32], out: &mut [f32], c: usize, terms: NormTerms<'_>) {
        for (row_index, (row, o)) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)).enumerate() {
            o.fill(0.0);
            if let Some((stats, w, b, weight)) = terms.ln {
                let (mean, inv) = (stats[2 * row_index], stats[2 * row_index + 1]);
                for (((o, v), w), b) in o.iter_mut().zip(row).zip(w).zip(b) {
                    *o = weight * ((v - mean) * inv * w + b);
                }
            }
            if let Some(bn) = terms.bn {
                for (((((o, v), m), s), g), b) in o.iter_mut().zip(row).zip(bn.mean).zip(bn.inv_std).zip(bn.gamma).zip(bn.beta) {
                    *o += bn.weight * ((v - m) * s * g + b + bn.alpha * v);
                }
            }
        }
    }
}

multiversion! {
    /// A norm's backward reductions over a block of rows, added into `sums` (3C + 1 values):
    /// Σ dy, Σ dy·x̂_ln, Σ dy·x̂_bn per channel and Σ dy·x over everything (x̂ the normalized
    /// input of each branch). dy is the gradient of the norm's output, unweighted.
    pub fn norm_backward_sums(x: &[f32], dy: &[f32], terms: NormTerms<'_>, sums: &mut [f32]) {
        let c = (sums.len() - 1) / 3;
        let (dy_sum, rest) = sums.split_at_mut(c);
        let (dy_ln, rest) = rest.split_at_mut(c);
        let (dy_bn, dy_x) = rest.split_at_mut(c);
        let mut dot_x = 0.0f32;
        for (row_index, (row, g)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).enumerate() {
            for (s, g) in dy_sum.iter_mut().zip(g) {
                *s += g;
            }
            if let Some((stats, ..)) = terms.ln {
                let (mean, inv) = (stats[2 * row_index], stats[2 * row_index + 1]);
                for ((s, g), v) in dy_ln.iter_mut().zip(g).zip(row) {
                    *s += g * (v - mean) * inv;
                }
            }
            if let Some(bn) = terms.bn {
                for ((((s, g), v), m), i) in dy_bn.iter_mut().zip(g).zip(row).zip(bn.mean).zip(bn.inv_std) {
                    *s += g * (v - m) * i;
                }
                dot_x += dot(g, row);
            }
        }
        dy_x[0] += dot_x;
    }
}

multiversion! {
    /// `dx += ∂y/∂x · dy` for the norm of [`norm_apply`]: the LN branch per row, the BN branch
    /// with the batch sums `bn_sums` = (Σ dy, Σ dy·x̂_bn) per channel over all `count` rows.
    pub fn norm_backward_apply(x: &[f32], dy: &[f32], dx: &mut [f32], c: usize, terms: NormTerms<'_>, bn_sums: (&[f32], &[f32]), count: usize) {
        let inv_count = 1.0 / count as f32;
        for (row_index, ((row, g), d)) in x.chunks_exact(c).zip(dy.chunks_exact(c)).zip(dx.chunks_exact_mut(c)).enumerate() {
            if let Some((stats, w, _, weight)) = terms.ln {
                let (mean, inv) = (stats[2 * row_index], stats[2 * row_index + 1]);
                // g_w = dy·w; dx = r·(g_w − mean(g_w) − x̂·mean(g_w·x̂))
                let mut sum_g = 0.0f32;
                let mut sum_gx = 0.0f32;
                for ((g, w), v) in g.iter().zip(w).zip(row) {
                    let gw = g * w;
                    sum_g += gw;
                    sum_gx += gw * (v - mean) * inv;
                }
                let (mean_g, mean_gx) = (sum_g / c as f32, sum_gx / c as f32);
                for (((d, g), w), v) in d.iter_mut().zip(g).zip(w).zip(row) {
                    let xhat = (v - mean) * inv;
                    *d += weight * inv * (g * w - mean_g - xhat * mean_gx);
                }
            }
            if let Some(bn) = terms.bn {
                let (dy_sum, dy_xhat) = bn_sums;
                for (((((((d, g), v), m), s), gamma), ds), dxh) in
                    d.iter_mut().zip(g).zip(row).zip(bn.mean).zip(bn.inv_std).zip(bn.gamma).zip(dy_sum).zip(dy_xhat)
                {
                    let xhat = (v - m) * s;
                    *d += bn.weight * (gamma * s * (g - ds * inv_count - xhat * dxh * inv_count) + bn.alpha * g);
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

/// e^x in f32, written so LLVM vectorizes it: 2^n · e^r with |r| ≤ ln2/2 and a degree-6
/// polynomial (Cephes `expf` coefficients), relative error ~1e-7. Inputs are clamped to the
/// normal range.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e_r = p * r * r + r + 1.0;
    // 2^n without a float→int conversion: adding 127 + 2²³ leaves n + 127 (< 2⁹) in the low
    // mantissa bits, which the shift moves into the exponent field.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    e_r * scale
}

/// erf(x) in f32 as a rational function of x on [-4, 4] (±1 beyond, where f32 erf rounds to ±1),
/// odd numerator of degree 13 over an even denominator of degree 8: branch-free, so it
/// vectorizes; absolute error below 1e-6 (tested against f64).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_600_1e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_2e-3;
    q = q * x2 - 1.426_473_9e-2;
    x * p / q
}

/// GELU(x) = x/2 · (1 + erf(x/√2)), PyTorch's default (exact) form.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // Abramowitz–Stegun 7.1.28-free reference: the series/continued fraction is overkill
        // here; integrate exp(-t²) with Simpson's rule on a fine grid (error ≪ 1e-9).
        let n = 20_000;
        let h = x / n as f64;
        let f = |t: f64| (-t * t).exp();
        let mut s = f(0.0) + f(x);
        for i in 1..n {
            s += f(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        s * h / 3.0 * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_and_gelu_match_f64_references() {
        let mut worst: f64 = 0.0;
        for i in -700..=700 {
            let x = i as f32 / 100.0;
            let err = (erf(x) as f64 - erf64(x as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "erf max abs error {worst}");
        for i in -800..=800 {
            let x = i as f32 / 100.0;
            let want = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            let got = gelu(x) as f64;
            assert!((got - want).abs() <= 1e-6 * (1.0 + want.abs()), "gelu({x}) = {got}, want {want}");
        }
        // The vectorized slice version agrees with the scalar one (any dispatch path).
        let mut v: Vec<f32> = (-50..50).map(|i| i as f32 / 7.0).collect();
        let want: Vec<f32> = v.iter().map(|&x| gelu(x + 0.5)).collect();
        bias_gelu(&mut v, &[0.5; 10]);
        assert_eq!(v, want);
    }

    #[test]
    fn exp_has_float_accuracy_over_its_range() {
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
        }
        assert_eq!(exp(-1000.0), exp(-87.3));
        assert!(exp(-1000.0) > 0.0 && exp(-1000.0) < 1e-37);
    }

    #[test]
    fn row_kernels_match_naive_forms() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut s = x.clone();
        softmax_rows(&mut s, 6);
        for (row, srow) in x.chunks(6).zip(s.chunks(6)) {
            let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
            for (&v, &p) in row.iter().zip(srow) {
                assert!(((v as f64).exp() / z - p as f64).abs() < 1e-7);
            }
        }
        let (w, b) = ([1.0, 2.0, 0.5, -1.0, 1.5, 0.0], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
        let mut y = vec![0.0; 24];
        layer_norm(&x, &mut y, &w, &b, 1e-6);
        for (row, yrow) in x.chunks(6).zip(y.chunks(6)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / 6.0;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / 6.0;
            for k in 0..6 {
                let want = (row[k] as f64 - mean) / (var + 1e-6).sqrt() * w[k] as f64 + b[k] as f64;
                assert!((yrow[k] as f64 - want).abs() < 1e-5, "{} vs {want}", yrow[k]);
            }
        }
    }

    #[test]
    fn strided_matmul_equals_naive_product() {
        // lhs: columns 2..5 of a 4×7 matrix; rhs: the transpose of columns 1..4 of a 5×6 one.
        let a: Vec<f32> = (0..28).map(|i| (i % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..30).map(|i| (i % 7) as f32 * 0.5).collect();
        let lhs = MatRef::columns(&a, 4, 7, 2, 3);
        let rhs = MatRef::columns(&b, 5, 6, 1, 3).t(); // 3×5
        let mut out = vec![1.0; 4 * 9];
        matmul(MatMut::columns(&mut out, 4, 9, 2, 5), lhs, rhs, true, 2.0);
        for i in 0..4 {
            for j in 0..9 {
                let want = if (2..7).contains(&j) {
                    1.0 + 2.0 * (0..3).map(|k| a[i * 7 + 2 + k] * b[(j - 2) * 6 + 1 + k]).sum::<f32>()
                } else {
                    1.0
                };
                assert_eq!(out[i * 9 + j], want, "({i}, {j})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past its slice")]
    fn views_outside_their_slice_are_refused() {
        let a = vec![0.0; 10];
        let mut out = vec![0.0; 9];
        matmul(MatMut::new(&mut out, 3, 3), MatRef::new(&a, 3, 4), MatRef::new(&a, 4, 3), false, 1.0);
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
