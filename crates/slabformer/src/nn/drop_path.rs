//! Stochastic depth: in training, drop a sample's residual branch with probability `rate` and
//! scale the kept ones by 1/(1 − rate).
//!
//! Masks come from a generator the caller seeds for the current step ([`with_seed`]), so a run is
//! reproducible and resumable whatever else draws random numbers in the process (burn's own
//! generator is process-wide). Without one, burn's generator is used.

use std::cell::RefCell;

use burn::module::{Flag, Module, Param};
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

use super::is_training;

thread_local! {
    static STEP_RNG: RefCell<Option<Pcg64>> = const { RefCell::new(None) };
}

/// Runs `f` with drop-path masks drawn from a generator seeded with `seed` (on this thread).
pub fn with_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    let previous = STEP_RNG.with(|rng| rng.replace(Some(step_rng(seed))));
    let result = f();
    STEP_RNG.with(|rng| *rng.borrow_mut() = previous);
    result
}

/// One step's generator for the masks, as [`with_seed`] seeds it.
pub fn step_rng(seed: u64) -> Pcg64 {
    Pcg64::seed_from_u64(seed)
}

/// `batch` per-sample factors: 0 (dropped, probability `rate`) or 1/(1 − rate). Shared with the
/// CPU trainer, so both draw the same masks from the same generator.
pub fn draw_mask(rng: &mut Pcg64, batch: usize, rate: f64) -> Vec<f32> {
    let keep = 1.0 - rate;
    (0..batch).map(|_| if rng.random_bool(keep) { (1.0 / keep) as f32 } else { 0.0 }).collect()
}

#[derive(Module, Debug)]
pub struct DropPath {
    pub rate: f64,
    pub training: Param<Flag>,
}

impl DropPath {
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            training: Param::from_bool(true),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if self.rate <= 0.0 || !is_training(&self.training, &x) {
            return x;
        }
        let keep = 1.0 - self.rate;
        let [b, _, _] = x.dims();
        let device = x.device();
        let drawn: Option<Vec<f32>> = STEP_RNG.with(|rng| rng.borrow_mut().as_mut().map(|rng| draw_mask(rng, b, self.rate)));
        let mask = match drawn {
            Some(values) => Tensor::<3>::from_data(TensorData::new(values, [b, 1, 1]), &device),
            None => Tensor::<3>::random([b, 1, 1], Distribution::Bernoulli(keep), &device).div_scalar(keep),
        };
        x.mul(mask)
    }

    /// [`forward`](Self::forward) on a (B, C, H, W) branch: one draw per image.
    pub fn forward_planes(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        self.forward(x.reshape([b, c, h * w])).reshape([b, c, h, w])
    }
}

/// The fast path's drop-path residual: `out[image rows] = residual + mask[image]·out` (`out`
/// holds the branch's output).
pub fn add_masked_branch(residual: &[f32], out: &mut [f32], mask: &[f32]) {
    use rayon::prelude::*;
    let per_image = out.len() / mask.len();
    out.par_chunks_mut(per_image).zip(residual.par_chunks(per_image)).zip(mask.par_iter()).for_each(|((o, r), &m)| {
        o.iter_mut().zip(r).for_each(|(o, r)| *o = r + m * *o);
    });
}

/// Its backward: the branch's output gradient, `dx` scaled by each image's factor, into `out`.
pub fn masked_gradient<'a>(dx: &[f32], mask: &[f32], out: &'a mut Vec<f32>) -> &'a [f32] {
    use rayon::prelude::*;
    let per_image = dx.len() / mask.len();
    let out = crate::nn::lower::sized(out, dx.len());
    out.par_chunks_mut(per_image).zip(dx.par_chunks(per_image)).zip(mask.par_iter()).for_each(|((o, d), &m)| {
        o.iter_mut().zip(d).for_each(|(o, d)| *o = m * d);
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    #[test]
    fn seeded_masks_repeat_and_scale_kept_samples() {
        let device = Device::flex().autodiff();
        let drop = DropPath::new(0.5);
        let x = Tensor::<3>::ones([64, 2, 3], &device);
        let a: Vec<f32> = with_seed(7, || drop.forward(x.clone())).into_data().try_to_vec().unwrap();
        let b: Vec<f32> = with_seed(7, || drop.forward(x.clone())).into_data().try_to_vec().unwrap();
        let c: Vec<f32> = with_seed(8, || drop.forward(x.clone())).into_data().try_to_vec().unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|v| *v == 0.0 || *v == 2.0));
        let kept = a.iter().filter(|v| **v == 2.0).count() / 6;
        assert!((16..=48).contains(&kept), "{kept} of 64 kept");
        // Off outside training.
        let plain = Tensor::<3>::ones([4, 2, 3], &Device::flex());
        assert_eq!(drop.forward(plain.clone()).into_data(), plain.into_data());
    }
}
