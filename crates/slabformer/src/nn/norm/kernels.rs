//! The norms' row kernels: LayerNorm, the training-mode LN/RepBN mix and its backward.

use crate::kernels::{dot, multiversion, reduce, sum};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_the_naive_form() {
        let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
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

}
