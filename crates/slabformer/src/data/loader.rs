//! Batches from an [`ImageSet`], built on a worker thread that stays a few batches ahead of
//! training. Order and augmentation are functions of `(seed, epoch, index)`, so a run resumed
//! mid-epoch gets the same batches.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use rand::seq::SliceRandom;

use super::augment::{AugmentConfig, MixConfig};
use super::sampler::BatchSampler;
use super::{ImageSet, derived_rng};

/// Batches kept ready ahead of the consumer.
const PREFETCH: usize = 3;
const MIX_STREAM: u64 = 0x004D_4958;

pub struct Batch {
    /// B × C × size × size, normalized.
    pub images: Vec<f32>,
    /// The image side (the model's, or the one a multi-scale batch drew).
    pub size: usize,
    /// B × classes soft targets (smoothing/mixing applied); empty for evaluation batches.
    pub targets: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// The sample order of one training epoch.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut derived_rng(&[seed, epoch]));
    order
}

pub struct Loader {
    receiver: Option<Receiver<Batch>>,
    worker: Option<JoinHandle<()>>,
}

/// What a training epoch's worker needs.
pub struct TrainEpoch {
    pub set: Arc<ImageSet>,
    pub augment: Arc<AugmentConfig>,
    /// `None`: no mixing or smoothing (BN re-calibration).
    pub mix: Option<Arc<MixConfig>>,
    /// The image sides and batch sizes of the epoch's batches.
    pub sampler: BatchSampler,
    pub seed: u64,
    pub epoch: u64,
    /// Batches of this epoch already consumed (resume).
    pub skip: usize,
}

impl Loader {
    pub fn train(job: TrainEpoch) -> Self {
        Self::spawn(move |send| {
            let set = &job.set;
            let order = epoch_order(set.len(), job.seed, job.epoch);
            let dims = [set.channels, set.height, set.width];
            let plan = job.sampler.epoch_batches(set.len(), job.seed, job.epoch);
            for (index, planned) in plan.into_iter().enumerate().skip(job.skip) {
                let (size, start) = (planned.scale.size, planned.start);
                let per = set.channels * size * size;
                let picks = &order[start..start + planned.scale.batch];
                let mut images = vec![0.0f32; picks.len() * per];
                for (slot, &sample) in picks.iter().enumerate() {
                    let position = (start + slot) as u64;
                    let mut rng = derived_rng(&[job.seed, job.epoch, position]);
                    job.augment.train_view(set.image(sample), dims, size, &mut rng, &mut images[slot * per..(slot + 1) * per]);
                }
                let labels: Vec<u32> = picks.iter().map(|&i| set.labels[i]).collect();
                let targets = match &job.mix {
                    Some(mix) => {
                        let mut rng = derived_rng(&[job.seed, job.epoch, index as u64, MIX_STREAM]);
                        mix.mix(&mut images, &labels, [set.channels, size, size], set.classes.len(), &mut rng)
                    }
                    None => Vec::new(),
                };
                if !send(Batch { images, size, targets, labels }) {
                    return;
                }
            }
        })
    }

    /// Every sample once, in order, with the evaluation view.
    pub fn eval(set: Arc<ImageSet>, augment: Arc<AugmentConfig>, size: usize, batch: usize) -> Self {
        Self::spawn(move |send| {
            let dims = [set.channels, set.height, set.width];
            let per = set.channels * size * size;
            for start in (0..set.len()).step_by(batch) {
                let end = (start + batch).min(set.len());
                let mut images = vec![0.0f32; (end - start) * per];
                for (slot, sample) in (start..end).enumerate() {
                    augment.eval_view(set.image(sample), dims, size, &mut images[slot * per..(slot + 1) * per]);
                }
                if !send(Batch { images, size, targets: Vec::new(), labels: set.labels[start..end].to_vec() }) {
                    return;
                }
            }
        })
    }

    fn spawn(work: impl FnOnce(&dyn Fn(Batch) -> bool) + Send + 'static) -> Self {
        let (sender, receiver) = sync_channel(PREFETCH);
        let worker = std::thread::Builder::new()
            .name("slabformer-loader".into())
            .spawn(move || work(&|batch| sender.send(batch).is_ok()))
            .expect("spawn loader thread");
        Self { receiver: Some(receiver), worker: Some(worker) }
    }
}

impl Iterator for Loader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing the channel ends the worker at its next send.
        self.receiver.take();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Arc<ImageSet> {
        Arc::new(ImageSet {
            images: (0..20u8).flat_map(|i| [i; 4]).collect(),
            labels: (0..20).map(|i| i % 2).collect(),
            channels: 1,
            height: 2,
            width: 2,
            classes: vec!["a".into(), "b".into()],
        })
    }

    fn epoch(skip: usize) -> TrainEpoch {
        TrainEpoch {
            set: set(),
            augment: Arc::new(AugmentConfig { random_resized_crop: false, crop_padding: 1, mean: vec![0.0], std: vec![1.0], ..Default::default() }),
            mix: Some(Arc::new(MixConfig::default())),
            sampler: BatchSampler::fixed(2, 3),
            seed: 5,
            epoch: 2,
            skip,
        }
    }

    #[test]
    fn resumed_epochs_replay_the_same_batches() {
        let full: Vec<Batch> = Loader::train(epoch(0)).collect();
        assert_eq!(full.len(), 6); // 20 / 3, last partial batch dropped
        let resumed: Vec<Batch> = Loader::train(epoch(4)).collect();
        assert_eq!(resumed.len(), 2);
        for (a, b) in full[4..].iter().zip(&resumed) {
            assert_eq!(a.images, b.images);
            assert_eq!(a.targets, b.targets);
            assert_eq!(a.labels, b.labels);
        }
        assert_ne!(epoch_order(20, 5, 2), epoch_order(20, 5, 3));
    }

    #[test]
    fn multi_scale_batches_follow_the_epoch_plan_and_resume_alike() {
        use crate::data::sampler::MultiScaleConfig;
        // Sides 2, 3, 4 around the base 2 with 3 images: batches of 3, 1 and 1.
        let sampler = BatchSampler::multi_scale(&MultiScaleConfig { min_size: 2, max_size: 4, max_scales: 3, divisor: 1 }, 2, 3);
        assert_eq!(sampler.scales().iter().map(|s| (s.size, s.batch)).collect::<Vec<_>>(), vec![(2, 3), (3, 1), (4, 1)]);
        // Mixing draws per batch index: a resumed epoch has to count its batches from the start.
        let mix = Arc::new(MixConfig { mixup_alpha: 0.8, cutmix_alpha: 1.0, ..Default::default() });
        let job = |skip| TrainEpoch { sampler: sampler.clone(), mix: Some(mix.clone()), ..epoch(skip) };
        let full: Vec<Batch> = Loader::train(job(0)).collect();
        let plan = sampler.epoch_batches(20, 5, 2);
        assert_eq!(full.len(), plan.len());
        let order = epoch_order(20, 5, 2);
        for (b, p) in full.iter().zip(&plan) {
            assert_eq!((b.size, b.len(), b.images.len()), (p.scale.size, p.scale.batch, p.scale.batch * p.scale.size * p.scale.size));
            let want: Vec<u32> = order[p.start..p.start + p.scale.batch].iter().map(|&i| i as u32 % 2).collect();
            assert_eq!(b.labels, want);
        }
        assert!(full.iter().any(|b| b.size != full[0].size), "one size drawn throughout");
        let resumed: Vec<Batch> = Loader::train(job(3)).collect();
        assert_eq!(resumed.len(), full.len() - 3);
        for (a, b) in full[3..].iter().zip(&resumed) {
            assert_eq!((a.size, &a.images, &a.targets, &a.labels), (b.size, &b.images, &b.targets, &b.labels));
        }
    }

    #[test]
    fn eval_covers_every_sample_once_and_dropping_stops_the_worker() {
        let batches: Vec<Batch> = Loader::eval(set(), Arc::new(AugmentConfig { mean: vec![0.0], std: vec![1.0], ..Default::default() }), 2, 8).collect();
        assert_eq!(batches.iter().map(Batch::len).collect::<Vec<_>>(), vec![8, 8, 4]);
        let mut loader = Loader::train(epoch(0));
        let _ = loader.next();
        drop(loader); // must not hang
    }
}
