//! Augmentation of byte images (C, H, W) into normalized floats, and batch-level mixup/cutmix
//! with label smoothing into soft targets.

use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Per-image augmentation and normalization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random crop of the output size after zero padding by this many pixels (0: off).
    pub crop_padding: usize,
    /// Random-resized-crop (area scale and aspect ratio ranges) instead of the padded crop.
    pub random_resized_crop: bool,
    pub scale: [f64; 2],
    pub ratio: [f64; 2],
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Evaluation center-crop fraction of the shorter side (the 0.875 convention).
    pub eval_crop: f64,
    /// Per-channel mean and std of pixels in [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            crop_padding: 0,
            random_resized_crop: true,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: 0.5,
            eval_crop: 0.875,
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }
}

/// Batch mixing: mixup, cutmix and label smoothing (timm's batch mode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MixConfig {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// With both enabled, the probability of cutmix rather than mixup.
    pub switch_prob: f64,
    pub label_smoothing: f64,
}

impl Default for MixConfig {
    fn default() -> Self {
        Self { mixup_alpha: 0.0, cutmix_alpha: 0.0, prob: 1.0, switch_prob: 0.5, label_smoothing: 0.1 }
    }
}

impl AugmentConfig {
    pub fn validate(&self, channels: usize) -> Result<()> {
        let err = |m: String| Err(Error::Config(format!("augment.{m}")));
        if self.mean.len() != channels || self.std.len() != channels {
            return err(format!("mean/std need {channels} values (one per channel), got {}/{}", self.mean.len(), self.std.len()));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return err("std values must be > 0".into());
        }
        if !(0.0..=1.0).contains(&self.hflip) {
            return err(format!("hflip is a probability, got {}", self.hflip));
        }
        if !(self.scale[0] > 0.0 && self.scale[0] <= self.scale[1] && self.scale[1] <= 1.0) {
            return err(format!("scale must satisfy 0 < min ≤ max ≤ 1, got {:?}", self.scale));
        }
        if !(self.ratio[0] > 0.0 && self.ratio[0] <= self.ratio[1]) {
            return err(format!("ratio must satisfy 0 < min ≤ max, got {:?}", self.ratio));
        }
        if !(self.eval_crop > 0.0 && self.eval_crop <= 1.0) {
            return err(format!("eval_crop must lie in (0, 1], got {}", self.eval_crop));
        }
        Ok(())
    }

    /// The side images are stored at so that the evaluation crop yields `size` (the whole image
    /// when `eval_crop` is 1).
    pub fn stored_size(&self, size: usize) -> usize {
        (size as f64 / self.eval_crop).round() as usize
    }

    /// A training view of `src` into `out` (C × size × size floats).
    pub fn train_view(&self, src: &[u8], dims: [usize; 3], size: usize, rng: &mut impl Rng, out: &mut [f32]) {
        let [_, h, w] = dims;
        let region = if self.random_resized_crop {
            random_resized_box(h, w, self.scale, self.ratio, rng)
        } else {
            // Zero-pad by p, then take a size×size window: offsets in [−p, (h − size) + p].
            let p = self.crop_padding as i64;
            let dy = rng.random_range(-p..=(h as i64 - size as i64 + p).max(-p));
            let dx = rng.random_range(-p..=(w as i64 - size as i64 + p).max(-p));
            [dy as f64, dx as f64, size as f64, size as f64]
        };
        let flip = rng.random_bool(self.hflip);
        self.sample(src, dims, region, flip, size, out);
    }

    /// The evaluation view: a center crop of `eval_crop` of the shorter side (the whole image when
    /// it already has the output size).
    pub fn eval_view(&self, src: &[u8], dims: [usize; 3], size: usize, out: &mut [f32]) {
        let [_, h, w] = dims;
        let region = if h == size && w == size {
            [0.0, 0.0, size as f64, size as f64]
        } else {
            let side = h.min(w) as f64 * self.eval_crop;
            [(h as f64 - side) / 2.0, (w as f64 - side) / 2.0, side, side]
        };
        self.sample(src, dims, region, false, size, out);
    }

    /// Resamples `region = [top, left, height, width]` of `src` to size×size (bilinear; exact
    /// copies when the region is an integer-aligned window of the output size), zero outside the
    /// image, then normalizes.
    fn sample(&self, src: &[u8], [c, h, w]: [usize; 3], region: [f64; 4], flip: bool, size: usize, out: &mut [f32]) {
        let [top, left, rh, rw] = region;
        let (sy, sx) = (rh / size as f64, rw / size as f64);
        let pixel = |ch: usize, y: i64, x: i64| -> f32 {
            if y < 0 || x < 0 || y >= h as i64 || x >= w as i64 {
                0.0
            } else {
                src[ch * h * w + y as usize * w + x as usize] as f32
            }
        };
        for ch in 0..c {
            let (mean, std) = (self.mean[ch], self.std[ch]);
            for oy in 0..size {
                let y = top + (oy as f64 + 0.5) * sy - 0.5;
                let (y0, fy) = (y.floor(), (y - y.floor()) as f32);
                for ox in 0..size {
                    let ox_src = if flip { size - 1 - ox } else { ox };
                    let x = left + (ox_src as f64 + 0.5) * sx - 0.5;
                    let (x0, fx) = (x.floor(), (x - x.floor()) as f32);
                    let (y0i, x0i) = (y0 as i64, x0 as i64);
                    let mut v = pixel(ch, y0i, x0i) * (1.0 - fy) * (1.0 - fx);
                    if fx > 0.0 {
                        v += pixel(ch, y0i, x0i + 1) * (1.0 - fy) * fx;
                    }
                    if fy > 0.0 {
                        v += pixel(ch, y0i + 1, x0i) * fy * (1.0 - fx);
                        if fx > 0.0 {
                            v += pixel(ch, y0i + 1, x0i + 1) * fy * fx;
                        }
                    }
                    out[ch * size * size + oy * size + ox] = (v / 255.0 - mean) / std;
                }
            }
        }
    }
}

/// torchvision's RandomResizedCrop box: 10 tries at a random area and log-uniform aspect ratio,
/// then the center crop clamped to the ratio range.
fn random_resized_box(h: usize, w: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut impl Rng) -> [f64; 4] {
    let area = (h * w) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let aspect = if log_lo < log_hi { rng.random_range(log_lo..log_hi).exp() } else { ratio[0] };
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w as f64 && ch <= h as f64 {
            let top = rng.random_range(0..=(h - ch as usize)) as f64;
            let left = rng.random_range(0..=(w - cw as usize)) as f64;
            return [top, left, ch, cw];
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio[0] {
        ((w as f64 / ratio[0]).round(), w as f64)
    } else if in_ratio > ratio[1] {
        (h as f64, (h as f64 * ratio[1]).round())
    } else {
        (h as f64, w as f64)
    };
    [((h as f64 - ch) / 2.0).floor(), ((w as f64 - cw) / 2.0).floor(), ch, cw]
}

impl MixConfig {
    pub fn validate(&self) -> Result<()> {
        let check = |name: &str, v: f64, ok: bool| if ok { Ok(()) } else { Err(Error::Config(format!("mix.{name} out of range: {v}"))) };
        check("mixup_alpha", self.mixup_alpha, self.mixup_alpha >= 0.0)?;
        check("cutmix_alpha", self.cutmix_alpha, self.cutmix_alpha >= 0.0)?;
        check("prob", self.prob, (0.0..=1.0).contains(&self.prob))?;
        check("switch_prob", self.switch_prob, (0.0..=1.0).contains(&self.switch_prob))?;
        check("label_smoothing", self.label_smoothing, (0.0..1.0).contains(&self.label_smoothing))
    }

    pub fn enabled(&self) -> bool {
        self.prob > 0.0 && (self.mixup_alpha > 0.0 || self.cutmix_alpha > 0.0)
    }

    /// Smoothed one-hot targets (B × classes).
    pub fn smooth_targets(&self, labels: &[u32], classes: usize) -> Vec<f32> {
        let off = (self.label_smoothing / classes as f64) as f32;
        let on = 1.0 - self.label_smoothing as f32 + off;
        let mut targets = vec![off; labels.len() * classes];
        for (i, &l) in labels.iter().enumerate() {
            targets[i * classes + l as usize] = on;
        }
        targets
    }

    /// Mixes a batch in place (each sample with the batch reversed, as timm's batch mode) and
    /// returns the soft targets.
    pub fn mix(&self, images: &mut [f32], labels: &[u32], [c, h, w]: [usize; 3], classes: usize, rng: &mut impl Rng) -> Vec<f32> {
        let smooth = self.smooth_targets(labels, classes);
        if !self.enabled() || !rng.random_bool(self.prob) {
            return smooth;
        }
        let b = labels.len();
        let per = c * h * w;
        let use_cutmix = match (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0) {
            (true, true) => rng.random_bool(self.switch_prob),
            (_, cutmix) => cutmix,
        };
        let alpha = if use_cutmix { self.cutmix_alpha } else { self.mixup_alpha };
        let mut lam = Beta::new(alpha, alpha).expect("alpha > 0").sample(rng);
        let source = images.to_vec();
        if use_cutmix {
            let cut = (1.0 - lam).sqrt();
            let (ch, cw) = ((h as f64 * cut) as usize, (w as f64 * cut) as usize);
            let cy = rng.random_range(0..h);
            let cx = rng.random_range(0..w);
            let (y0, y1) = (cy.saturating_sub(ch / 2), (cy + ch / 2).min(h));
            let (x0, x1) = (cx.saturating_sub(cw / 2), (cx + cw / 2).min(w));
            for i in 0..b {
                let j = b - 1 - i;
                for k in 0..c {
                    for y in y0..y1 {
                        let row = k * h * w + y * w;
                        images[i * per + row + x0..i * per + row + x1]
                            .copy_from_slice(&source[j * per + row + x0..j * per + row + x1]);
                    }
                }
            }
            lam = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / (h * w) as f64;
        } else {
            let l = lam as f32;
            for i in 0..b {
                let j = b - 1 - i;
                for (dst, (&a, &other)) in images[i * per..(i + 1) * per]
                    .iter_mut()
                    .zip(source[i * per..(i + 1) * per].iter().zip(&source[j * per..(j + 1) * per]))
                {
                    *dst = a * l + other * (1.0 - l);
                }
            }
        }
        let l = lam as f32;
        (0..b)
            .flat_map(|i| {
                let j = b - 1 - i;
                (0..classes).map(move |k| (i, j, k))
            })
            .map(|(i, j, k)| smooth[i * classes + k] * l + smooth[j * classes + k] * (1.0 - l))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::derived_rng;

    fn config() -> AugmentConfig {
        AugmentConfig { mean: vec![0.0], std: vec![1.0], random_resized_crop: false, crop_padding: 2, hflip: 0.0, ..Default::default() }
    }

    #[test]
    fn padded_crops_are_shifted_copies_and_eval_is_identity() {
        let src: Vec<u8> = (0..16).map(|v| v * 10).collect();
        let mut out = vec![0.0; 16];
        config().eval_view(&src, [1, 4, 4], 4, &mut out);
        let want: Vec<f32> = src.iter().map(|&v| v as f32 / 255.0).collect();
        assert_eq!(out, want);
        let mut rng = derived_rng(&[7]);
        for _ in 0..20 {
            config().train_view(&src, [1, 4, 4], 4, &mut rng, &mut out);
            // Every value is a source pixel or padding.
            assert!(out.iter().all(|v| *v == 0.0 || want.contains(v)));
        }
        let flip = AugmentConfig { crop_padding: 0, hflip: 1.0, ..config() };
        flip.train_view(&src, [1, 4, 4], 4, &mut rng, &mut out);
        assert_eq!(out[0], want[3]);
        assert_eq!(out[7], want[4]);
    }

    #[test]
    fn random_resized_crop_stays_inside_and_normalizes() {
        let aug = AugmentConfig { mean: vec![0.5; 3], std: vec![0.25; 3], ..Default::default() };
        let src = vec![255u8; 3 * 20 * 30];
        let mut out = vec![0.0; 3 * 8 * 8];
        let mut rng = derived_rng(&[1]);
        for _ in 0..50 {
            aug.train_view(&src, [3, 20, 30], 8, &mut rng, &mut out);
            assert!(out.iter().all(|v| (v - 2.0).abs() < 1e-5), "{out:?}");
        }
    }

    #[test]
    fn mixing_keeps_targets_distributions_and_smoothing_is_exact() {
        let mix = MixConfig { mixup_alpha: 0.8, cutmix_alpha: 1.0, ..Default::default() };
        let labels = [0, 1, 2, 1];
        let smooth = mix.smooth_targets(&labels, 3);
        assert!((smooth[0] - (0.9 + 0.1 / 3.0)).abs() < 1e-6);
        let mut rng = derived_rng(&[3]);
        for _ in 0..20 {
            let mut images: Vec<f32> = (0..4 * 2 * 5 * 5).map(|v| v as f32).collect();
            let targets = mix.mix(&mut images, &labels, [2, 5, 5], 3, &mut rng);
            for row in targets.chunks(3) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
                assert!(row.iter().all(|t| *t >= 0.0));
            }
        }
        assert!(MixConfig { prob: 1.5, ..mix }.validate().is_err());
    }
}
