//! The shared kernels on row-major `f32` slices: GEMM (the `gemm` crate) on strided views, the
//! [`multiversion!`] compiler of row kernels (AVX-512, AVX2 + FMA, picked at run time, with a
//! portable fallback), lane-parallel reductions, exp, erf and GELU. A layer kind's own kernels
//! live in its home in `nn` (norms in `nn::norm::kernels`, attention in
//! `nn::attention::kernels`, the MLP's GELU epilogues in `nn::mlp`).

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
pub(crate) use multiversion;

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
pub(crate) fn reduce(x: &[f32], init: f32, map: impl Fn(f32) -> f32, op: impl Fn(f32, f32) -> f32) -> f32 {
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
pub(crate) fn sum(x: &[f32]) -> f32 {
    reduce(x, 0.0, |v| v, |a, b| a + b)
}

#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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

/// ln Σ exp(row) in f64, shifted by the row's maximum so that it cannot overflow.
pub fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|v| ((v - max) as f64).exp()).sum::<f64>().ln() + max as f64
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
thread_local! {
    /// Each thread's intermediate buffers, kept between calls so a hot loop allocates (and
    /// zeroes) nothing; see [`with_scratch`].
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch. The contents are whatever an earlier
/// call left: `f` writes before it reads. Nested calls (and other tasks rayon runs on this
/// thread meanwhile) get buffers of their own.
pub fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = f(&mut buffer[..len]);
    SCRATCH.with(|s| s.borrow_mut().push(buffer));
    result
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

}
