//! How a training epoch is cut into batches: one image size and batch size, or Apple ml-cvnets'
//! variable-batch multi-scale sampler (MobileViT, SPEC §5.4): every batch draws its image side
//! uniformly from a few sizes and takes as many images as keep the pixels per batch about those
//! of the base size. Like the rest of the data, the plan of an epoch is a function of
//! `(seed, epoch)`, so its steps are known up front (schedules, progress) and a resumed run sees
//! the same batches.

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::derived_rng;
use crate::error::{Error, Result};
use crate::models::mobile_former::make_divisible;

const SCALE_STREAM: u64 = 0x0053_4341;

/// `[data.multi_scale]`: ml-cvnets' `variable_batch_sampler` for square images. The base size is
/// the model's `img_size` and the base batch `run.batch_size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiScaleConfig {
    /// Smallest and largest image side of the candidates (required; ml-cvnets' MobileViT
    /// ImageNet config: 160 and 320 around the base 256).
    pub min_size: usize,
    pub max_size: usize,
    /// Sides spread evenly over `min_size..=max_size` before rounding (default 5).
    #[serde(default = "default_max_scales")]
    pub max_scales: usize,
    /// Every side is rounded to a multiple of this (default 32, the stride of five
    /// down-samplings).
    #[serde(default = "default_divisor")]
    pub divisor: usize,
}

fn default_max_scales() -> usize {
    5
}

fn default_divisor() -> usize {
    32
}

/// Most candidate sides before rounding.
pub const MAX_SCALES: usize = 1024;

impl MultiScaleConfig {
    /// The config's own ranges; what the model takes is the trainer's check.
    pub fn validate(&self, base: usize) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("data.multi_scale.{m}")));
        if self.min_size == 0 || self.min_size > self.max_size || self.max_size > crate::models::MAX_CONFIG_SIZE as usize {
            return err(format!("min_size ({}) and max_size ({}) must satisfy 1 ≤ min_size ≤ max_size ≤ {}", self.min_size, self.max_size, crate::models::MAX_CONFIG_SIZE));
        }
        if !(self.min_size..=self.max_size).contains(&base) {
            return err(format!(
                "min_size ({}) … max_size ({}) must hold the base size, the model's img_size {base} (the batch size run.batch_size is the base size's)",
                self.min_size, self.max_size
            ));
        }
        if !(1..=MAX_SCALES).contains(&self.max_scales) {
            return err(format!("max_scales must lie in 1..={MAX_SCALES}, got {}", self.max_scales));
        }
        if self.divisor == 0 || self.divisor > self.max_size {
            return err(format!("divisor must lie in 1..=max_size ({}), got {}", self.max_size, self.divisor));
        }
        Ok(())
    }

    /// ml-cvnets' `image_batch_pairs` for square sides: `linspace(min, max, max_scales)` and the
    /// base side, each rounded by `make_divisible(v, divisor)`, duplicates removed, sorted; each
    /// side's batch `max(1, int(round(base²·base_batch / side², 2)))` — the hundredths rounded,
    /// then truncated (256², 128 → 160² takes 327 images, not 328).
    pub fn scales(&self, base: usize, base_batch: usize) -> Vec<Scale> {
        let (lo, hi, n) = (self.min_size as f64, self.max_size as f64, self.max_scales);
        // numpy's linspace: start + i·step, the last one exactly stop.
        let step = if n > 1 { (hi - lo) / (n - 1) as f64 } else { 0.0 };
        let mut sizes: Vec<usize> = (0..n).map(|i| if i + 1 == n && n > 1 { hi } else { lo + i as f64 * step }).chain([base as f64]).map(|v| make_divisible(v, self.divisor)).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let pixels = (base * base) as u128 * base_batch as u128;
        sizes
            .into_iter()
            .map(|size| {
                let area = (size * size) as u128;
                // round(pixels / area, 2) in exact arithmetic (half up), then int().
                let hundredths = (200 * pixels + area) / (2 * area);
                Scale { size, batch: ((hundredths / 100) as usize).max(1) }
            })
            .collect()
    }
}

/// An image side and how many images a batch of that side holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale {
    pub size: usize,
    pub batch: usize,
}

/// One batch of an epoch: its scale and where its images start in the epoch's sample order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedBatch {
    pub scale: Scale,
    pub start: usize,
}

/// How every epoch is cut into batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSampler {
    /// Sorted by size; one for fixed-size batches.
    scales: Vec<Scale>,
}

impl BatchSampler {
    /// Every batch `batch` images of `size`².
    pub fn fixed(size: usize, batch: usize) -> Self {
        Self { scales: vec![Scale { size, batch }] }
    }

    /// ml-cvnets' variable-batch sampler around `base`² with `base_batch` images.
    pub fn multi_scale(config: &MultiScaleConfig, base: usize, base_batch: usize) -> Self {
        Self { scales: config.scales(base, base_batch) }
    }

    pub fn scales(&self) -> &[Scale] {
        &self.scales
    }

    /// The batches of `epoch` over `len` samples, in order: batch i draws its scale uniformly
    /// from `(seed, epoch, i)` and takes the next `scale.batch` samples of the epoch order; the
    /// last batch is dropped when too few samples are left for it (as timm drops the last
    /// partial batch; ml-cvnets instead fills it up from the start of the order).
    pub fn epoch_batches(&self, len: usize, seed: u64, epoch: u64) -> Vec<PlannedBatch> {
        if let [scale] = self.scales[..] {
            return (0..len / scale.batch).map(|i| PlannedBatch { scale, start: i * scale.batch }).collect();
        }
        let mut batches = Vec::new();
        let mut start = 0;
        loop {
            let pick = derived_rng(&[seed, epoch, batches.len() as u64, SCALE_STREAM]).random_range(0..self.scales.len());
            let scale = self.scales[pick];
            if start + scale.batch > len {
                return batches;
            }
            batches.push(PlannedBatch { scale, start });
            start += scale.batch;
        }
    }

    /// `epoch_batches(..).len()`, without building them for one scale.
    pub fn batches_in_epoch(&self, len: usize, seed: u64, epoch: u64) -> usize {
        match self.scales[..] {
            [scale] => len / scale.batch,
            _ => self.epoch_batches(len, seed, epoch).len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mobilevit_s() -> MultiScaleConfig {
        MultiScaleConfig { min_size: 160, max_size: 320, max_scales: 5, divisor: 32 }
    }

    #[test]
    fn ml_cvnets_mobilevit_imagenet_scales_are_spec_item_29() {
        // SPEC §7 item 29: base 256², batch 128, 160–320, 5 scales, divisor 32.
        let scales = mobilevit_s().scales(256, 128);
        let pairs: Vec<(usize, usize)> = scales.iter().map(|s| (s.size, s.batch)).collect();
        assert_eq!(pairs, vec![(160, 327), (192, 227), (256, 128), (288, 101), (320, 81)]);
        // The paper's formula b_t = floor(b·H_n·W_n / (H_t·W_t)) with b = 128 at 320² (item 29's
        // other half) is this rule with the largest size as the base.
        let paper = mobilevit_s().scales(320, 128);
        let floor: Vec<usize> = [160usize, 192, 256, 288, 320].iter().map(|s| 128 * 320 * 320 / (s * s)).collect();
        assert_eq!(floor, vec![512, 355, 200, 158, 128]);
        assert_eq!(paper.iter().map(|s| s.batch).collect::<Vec<_>>(), floor);
    }

    #[test]
    fn candidates_follow_make_divisible_and_the_base_joins_them() {
        // linspace(100, 300, 4) = 100, 166.7, 233.3, 300 → 96, 160, 224, 288 (÷ 32) with the
        // base 200 → 192; 166.7 + 16 = 182.7 → 160, not below 0.9·166.7.
        let c = MultiScaleConfig { min_size: 100, max_size: 300, max_scales: 4, divisor: 32 };
        let sizes: Vec<usize> = c.scales(200, 10).iter().map(|s| s.size).collect();
        assert_eq!(sizes, vec![96, 160, 192, 224, 288]);
        // One scale: the minimum and the base. A batch never drops below one image.
        let one = MultiScaleConfig { min_size: 64, max_size: 64, max_scales: 1, divisor: 8 }.scales(64, 3);
        assert_eq!(one, vec![Scale { size: 64, batch: 3 }]);
        let huge = MultiScaleConfig { min_size: 8, max_size: 512, max_scales: 2, divisor: 8 }.scales(8, 1);
        assert_eq!(huge.last(), Some(&Scale { size: 512, batch: 1 }));
    }

    #[test]
    fn bad_ranges_are_refused_by_key() {
        for (c, key) in [
            (MultiScaleConfig { min_size: 300, ..mobilevit_s() }, "min_size"),
            (MultiScaleConfig { min_size: 0, ..mobilevit_s() }, "min_size"),
            (MultiScaleConfig { max_size: 224, ..mobilevit_s() }, "img_size 256"),
            (MultiScaleConfig { max_scales: 0, ..mobilevit_s() }, "max_scales"),
            (MultiScaleConfig { divisor: 0, ..mobilevit_s() }, "divisor"),
        ] {
            let err = c.validate(256).unwrap_err().to_string();
            assert!(err.contains("data.multi_scale.") && err.contains(key), "{c:?}: {err}");
        }
        mobilevit_s().validate(256).unwrap();
    }

    #[test]
    fn epoch_plans_are_deterministic_cover_samples_at_most_once_and_vary_by_epoch() {
        let sampler = BatchSampler::multi_scale(&mobilevit_s(), 256, 128);
        let len = 50_000;
        let plan = sampler.epoch_batches(len, 7, 3);
        assert_eq!(plan, sampler.epoch_batches(len, 7, 3));
        assert_eq!(plan.len(), sampler.batches_in_epoch(len, 7, 3));
        // Consecutive, disjoint ranges of the epoch order; what is left fits no more batch of
        // the size drawn next.
        let mut next = 0;
        for b in &plan {
            assert_eq!(b.start, next);
            assert!(sampler.scales().contains(&b.scale));
            next += b.scale.batch;
        }
        assert!(next <= len && len - next < 327, "{next} of {len}");
        // Every size gets drawn, and another epoch or seed draws another plan.
        for scale in sampler.scales() {
            assert!(plan.iter().any(|b| b.scale == *scale), "{scale:?} never drawn");
        }
        assert_ne!(plan, sampler.epoch_batches(len, 7, 4));
        assert_ne!(plan, sampler.epoch_batches(len, 8, 3));
        // One scale: consecutive full batches, the last partial one dropped.
        let fixed = BatchSampler::fixed(32, 3);
        assert_eq!(fixed.epoch_batches(20, 1, 1).iter().map(|b| b.start).collect::<Vec<_>>(), vec![0, 3, 6, 9, 12, 15]);
        assert_eq!(fixed.batches_in_epoch(20, 1, 1), 6);
    }
}
