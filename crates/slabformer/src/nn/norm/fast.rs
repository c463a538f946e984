//! The norms on the fast path: LayerNorm, RepBN and PRepBN lowered from their burn modules
//! ([`FastNorm::lower`]). Inference normalizes with LayerNorm or RepBN's eval-mode affine map;
//! training computes batch statistics, updates the running ones and the PRepBN counters exactly
//! as one training-mode call of the burn layer does, and has its backward written out.

use rayon::prelude::*;

use super::{BatchNorm, LayerNorm, Norm, RepBN};
use crate::error::{Error, Result};
use super::kernels::{self as norm_kernels, BnTerms, NormTerms};
use crate::kernels;
use crate::nn::lower::{Layout, ParamTable, Slot, row_block, set_f32, set_i64};
use crate::nn::schedule::{Decay, Phase};
use crate::state::{StateDict, host_f32};

struct LnParams {
    weight: Slot,
    bias: Slot,
    eps: f32,
}

impl LnParams {
    fn lower(norm: &LayerNorm, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { weight: table.add(&norm.weight, Layout::Official)?, bias: table.add(&norm.bias, Layout::Official)?, eps: norm.eps as f32 })
    }
}

struct BnParams {
    /// RepBN's α; None for a plain BatchNorm (α = 0).
    alpha: Option<Slot>,
    gamma: Slot,
    beta: Slot,
    eps: f32,
    momentum: f32,
    /// The BatchNorm's key prefix (`….bn`), for its buffers.
    prefix: String,
    running_mean: Vec<f32>,
    running_var: Vec<f32>,
    tracked: i64,
}

impl BnParams {
    fn lower(rep: &RepBN, table: &mut ParamTable) -> Result<Self> {
        let alpha = table.add(&rep.alpha, Layout::Official)?;
        Ok(Self { alpha: Some(alpha), ..Self::lower_batch_norm(&rep.bn, table)? })
    }

    fn lower_batch_norm(bn: &BatchNorm, table: &mut ParamTable) -> Result<Self> {
        let prefix = table.prefix_of(&bn.weight)?;
        Ok(Self {
            alpha: None,
            gamma: table.add(&bn.weight, Layout::Official)?,
            beta: table.add(&bn.bias, Layout::Official)?,
            eps: bn.eps as f32,
            momentum: bn.momentum as f32,
            running_mean: host_f32(bn.running_mean.value_sync()),
            running_var: host_f32(bn.running_var.value_sync()),
            tracked: bn.num_batches_tracked.get(),
            prefix,
        })
    }

    fn alpha(&self, p: &[f32]) -> f32 {
        self.alpha.map_or(0.0, |slot| p[slot.offset])
    }
}

/// The PRepBN counters (`warm`, `iter`, `total_step`) of one LinearNorm, with their keys.
struct Counters {
    keys: [String; 3],
    warm: i64,
    iter: i64,
    total: i64,
    r0: f64,
    decay: Decay,
}

impl Counters {
    /// What the next training-mode call computes, as the official `LinearNorm` decides it.
    fn phase(&self) -> Phase {
        Phase::of_counters(self.warm, self.iter, self.total, self.r0, self.decay)
    }
}

/// LayerNorm, RepBN or PRepBN (both, mixed by the counters' λ).
pub struct FastNorm {
    ln: Option<LnParams>,
    bn: Option<BnParams>,
    counters: Option<Counters>,
}

/// What a norm's forward left for its backward: the branch weights of that call and the
/// statistics it normalized with.
#[derive(Default)]
pub struct NormCache {
    ln_weight: Option<f32>,
    bn_weight: Option<f32>,
    /// (mean, 1/std) per row.
    row_stats: Vec<f32>,
    bn_mean: Vec<f32>,
    bn_inv_std: Vec<f32>,
    alpha: f32,
}

impl FastNorm {
    pub fn lower(norm: &Norm, table: &mut ParamTable) -> Result<Self> {
        Ok(match norm {
            Norm::LayerNorm(ln) => Self { ln: Some(LnParams::lower(ln, table)?), bn: None, counters: None },
            Norm::RepBN(rep) => Self { ln: None, bn: Some(BnParams::lower(rep, table)?), counters: None },
            Norm::LinearNorm(n) => {
                let keys = [table.key_of(n.warm.id())?.to_string(), table.key_of(n.iter.id())?.to_string(), table.key_of(n.total_step.id())?.to_string()];
                Self {
                    ln: Some(LnParams::lower(&n.norm1, table)?),
                    bn: Some(BnParams::lower(&n.norm2, table)?),
                    counters: Some(Counters { keys, warm: n.warm.get(), iter: n.iter.get(), total: n.total_step.get(), r0: n.r0, decay: n.decay }),
                }
            }
        })
    }

    /// A plain BatchNorm over (rows, C): BatchNorm1d over tokens, or BatchNorm2d over the
    /// (H·W, C) raster rows of conv feature maps.
    pub fn lower_batch_norm(norm: &BatchNorm, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { ln: None, bn: Some(BnParams::lower_batch_norm(norm, table)?), counters: None })
    }

    /// A LayerNorm on its own (qk-norm of attention heads).
    pub fn lower_layer_norm(norm: &LayerNorm, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { ln: Some(LnParams::lower(norm, table)?), bn: None, counters: None })
    }

    /// The eval-mode norm of the rows of `x` into `out`, on this thread: LayerNorm, or RepBN with
    /// its running statistics (PRepBN evaluates as its RepBN).
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32]) {
        match (&self.bn, &self.ln) {
            (Some(bn), _) => {
                let inv_std: Vec<f32> = bn.running_var.iter().map(|v| 1.0 / (v + bn.eps).sqrt()).collect();
                let terms = BnTerms { mean: &bn.running_mean, inv_std: &inv_std, gamma: &p[bn.gamma.range()], beta: &p[bn.beta.range()], alpha: bn.alpha(p), weight: 1.0 };
                norm_kernels::norm_apply(x, out, inv_std.len(), NormTerms { ln: None, bn: Some(terms) });
            }
            (None, Some(ln)) => norm_kernels::layer_norm(x, out, &p[ln.weight.range()], &p[ln.bias.range()], ln.eps),
            (None, None) => unreachable!("a norm has a LayerNorm or a BatchNorm"),
        }
    }

    /// The branch weights (LN, RepBN) of the next training-mode call, advancing the counters as
    /// the official `LinearNorm` does when `advance` (off for the extra micro-batches of an
    /// accumulated step, as the burn trainer does).
    fn next_weights(&mut self, advance: bool) -> (Option<f32>, Option<f32>) {
        let Some(counters) = &mut self.counters else {
            return (self.ln.as_ref().map(|_| 1.0), self.bn.as_ref().map(|_| 1.0));
        };
        match counters.phase() {
            Phase::Warm => {
                if advance {
                    counters.warm -= 1;
                }
                (Some(1.0), None)
            }
            Phase::RepBn => (None, Some(1.0)),
            Phase::Mix(lambda) => {
                if counters.iter > 0 && advance {
                    counters.iter -= 1;
                }
                (Some(lambda), Some(1.0 - lambda))
            }
        }
    }

    /// What the next training-mode call computes (PRepBN only).
    pub fn phase(&self) -> Option<Phase> {
        Some(self.counters.as_ref()?.phase())
    }

    fn terms<'a>(&'a self, p: &'a [f32], cache: &'a NormCache, first_row: usize, rows: usize) -> NormTerms<'a> {
        NormTerms {
            ln: match (&self.ln, cache.ln_weight) {
                (Some(ln), Some(weight)) => Some((&cache.row_stats[2 * first_row..2 * (first_row + rows)], &p[ln.weight.range()], &p[ln.bias.range()], weight)),
                _ => None,
            },
            bn: match (&self.bn, cache.bn_weight) {
                (Some(bn), Some(weight)) => Some(BnTerms {
                    mean: &cache.bn_mean,
                    inv_std: &cache.bn_inv_std,
                    gamma: &p[bn.gamma.range()],
                    beta: &p[bn.beta.range()],
                    alpha: cache.alpha,
                    weight,
                }),
                _ => None,
            },
        }
    }

    /// `out = norm(x)` over (rows, c), with batch statistics; updates the running statistics
    /// and counters like one training-mode call of the burn layer.
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32], cache: &mut NormCache, c: usize, advance: bool) -> Result<()> {
        let rows = x.len() / c;
        let per = row_block(rows);
        let (ln_weight, bn_weight) = self.next_weights(advance);
        (cache.ln_weight, cache.bn_weight) = (ln_weight, bn_weight);
        if let (Some(ln), Some(_)) = (&self.ln, ln_weight) {
            cache.row_stats.resize(2 * rows, 0.0);
            cache.row_stats.par_chunks_mut(2 * per).zip(x.par_chunks(per * c)).for_each(|(s, x)| norm_kernels::row_stats(x, c, ln.eps, s));
        }
        if let (Some(bn), Some(_)) = (&mut self.bn, bn_weight) {
            if rows < 2 {
                return Err(Error::InputShape { layer: "norm", expected: "at least 2 tokens in the batch for BatchNorm statistics".into(), found: vec![rows, c] });
            }
            let sums = |f: &(dyn Fn(&[f32], &mut [f32]) + Sync)| -> Vec<f32> {
                let mut partials = vec![0.0; rows.div_ceil(per) * c];
                partials.par_chunks_mut(c).zip(x.par_chunks(per * c)).for_each(|(out, x)| f(x, out));
                let mut total = vec![0.0; c];
                partials.chunks(c).for_each(|p| kernels::add_assign(&mut total, p));
                total
            };
            let mean: Vec<f32> = sums(&|x, out| kernels::column_sums(x, x.len() / c, c, 0, out)).into_iter().map(|s| s / rows as f32).collect();
            let var: Vec<f32> = sums(&|x, out| norm_kernels::column_square_deviations(x, &mean, out)).into_iter().map(|s| s / rows as f32).collect();
            let (m, unbiased) = (bn.momentum, rows as f32 / (rows as f32 - 1.0));
            for ch in 0..c {
                bn.running_mean[ch] = bn.running_mean[ch] * (1.0 - m) + mean[ch] * m;
                bn.running_var[ch] = bn.running_var[ch] * (1.0 - m) + var[ch] * (m * unbiased);
            }
            bn.tracked += 1;
            cache.bn_inv_std = var.iter().map(|v| 1.0 / (v + bn.eps).sqrt()).collect();
            cache.bn_mean = mean;
            cache.alpha = bn.alpha(p);
        }
        let this = &*self;
        out.par_chunks_mut(per * c).zip(x.par_chunks(per * c)).enumerate().for_each(|(i, (o, x))| {
            norm_kernels::norm_apply(x, o, c, this.terms(p, cache, i * per, x.len() / c));
        });
        Ok(())
    }

    /// `dx += ∂norm/∂x · dy` and the norm's parameter gradients into `g`.
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32], cache: &NormCache, c: usize) {
        let rows = x.len() / c;
        let per = row_block(rows);
        let width = 3 * c + 1;
        let mut partials = vec![0.0; rows.div_ceil(per) * width];
        partials.par_chunks_mut(width).zip(x.par_chunks(per * c)).zip(dy.par_chunks(per * c)).enumerate().for_each(|(i, ((s, x), dy))| {
            norm_kernels::norm_backward_sums(x, dy, self.terms(p, cache, i * per, x.len() / c), s);
        });
        let mut sums = vec![0.0; width];
        partials.chunks(width).for_each(|s| kernels::add_assign(&mut sums, s));
        let (dy_sum, dy_ln, dy_bn, dy_x) = (&sums[..c], &sums[c..2 * c], &sums[2 * c..3 * c], sums[3 * c]);
        if let (Some(ln), Some(weight)) = (&self.ln, cache.ln_weight) {
            g[ln.weight.range()].iter_mut().zip(dy_ln).for_each(|(g, s)| *g += weight * s);
            g[ln.bias.range()].iter_mut().zip(dy_sum).for_each(|(g, s)| *g += weight * s);
        }
        if let (Some(bn), Some(weight)) = (&self.bn, cache.bn_weight) {
            g[bn.gamma.range()].iter_mut().zip(dy_bn).for_each(|(g, s)| *g += weight * s);
            g[bn.beta.range()].iter_mut().zip(dy_sum).for_each(|(g, s)| *g += weight * s);
            if let Some(alpha) = bn.alpha {
                g[alpha.offset] += weight * dy_x;
            }
        }
        dx.par_chunks_mut(per * c).zip(x.par_chunks(per * c)).zip(dy.par_chunks(per * c)).enumerate().for_each(|(i, ((dx, x), dy))| {
            norm_kernels::norm_backward_apply(x, dy, dx, c, self.terms(p, cache, i * per, x.len() / c), (dy_sum, dy_bn), rows);
        });
    }

    /// The running statistics and counters, into a state dict under their official keys.
    pub fn write_buffers(&self, state: &mut StateDict) {
        if let Some(bn) = &self.bn {
            set_f32(state, &format!("{}.running_mean", bn.prefix), &bn.running_mean);
            set_f32(state, &format!("{}.running_var", bn.prefix), &bn.running_var);
            set_i64(state, &format!("{}.num_batches_tracked", bn.prefix), bn.tracked);
        }
        if let Some(counters) = &self.counters {
            for (key, value) in counters.keys.iter().zip([counters.warm, counters.iter, counters.total]) {
                set_i64(state, key, value);
            }
        }
    }
}
