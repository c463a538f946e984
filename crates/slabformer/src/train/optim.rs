//! AdamW (PyTorch semantics, decoupled weight decay) with the no-decay rule of the official
//! script, global-norm gradient clipping, the per-iteration cosine schedule with linear warm-up
//! (timm), and an exponential moving average of the weights.
//!
//! State is kept keyed by official parameter name, so a checkpoint stores it as plain tensors
//! and a resumed run continues bit for bit.

use std::collections::BTreeMap;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

use super::config::{OptimConfig, ScheduleConfig};
use crate::optim::{AdamWStep, clip_coefficient, decays, global_norm};
use crate::error::{Error, Result};
use crate::state::{StateDict, StateTensor, Values, float_tensors, host_f32, is_buffer_key, map_float_tensors};

/// Learning rate at optimizer step `t`, timm's `CosineLRScheduler` with `warmup_prefix = false`
/// (t counted from 0, warm-up included in the cosine) and a cooldown at `min_lr`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub lr: f64,
    pub warmup_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    /// Steps of the cosine (`epochs × steps per epoch`).
    pub cosine_steps: u64,
}

impl LrSchedule {
    /// Rates scaled by `batch / 512` as the official script does, epochs of `steps_per_epoch`.
    pub fn new(optim: &OptimConfig, schedule: &ScheduleConfig, batch: usize, steps_per_epoch: u64, epochs: u64) -> Self {
        Self::from_steps(optim, schedule, batch, (schedule.warmup_epochs * steps_per_epoch as f64).round() as u64, epochs * steps_per_epoch)
    }

    /// [`new`](Self::new) with the warm-up and cosine lengths in steps (epochs of varying steps:
    /// multi-scale batches).
    pub fn from_steps(optim: &OptimConfig, schedule: &ScheduleConfig, batch: usize, warmup_steps: u64, cosine_steps: u64) -> Self {
        let scale = batch as f64 / 512.0;
        Self { lr: optim.lr * scale, warmup_lr: schedule.warmup_lr * scale, min_lr: schedule.min_lr * scale, warmup_steps, cosine_steps }
    }

    pub fn at(&self, t: u64) -> f64 {
        if t < self.warmup_steps {
            self.warmup_lr + t as f64 * (self.lr - self.warmup_lr) / self.warmup_steps as f64
        } else if t < self.cosine_steps {
            let progress = t as f64 / self.cosine_steps as f64;
            self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        } else {
            self.min_lr
        }
    }
}

/// The burn engine's AdamW: the shared update rule ([`crate::optim::AdamWStep`]) on a host copy of
/// each parameter, moments keyed by official parameter name.
pub struct AdamW {
    config: OptimConfig,
    /// Optimizer steps taken (PyTorch's `step`, for bias correction).
    pub steps: u64,
    exp_avg: BTreeMap<String, Vec<f32>>,
    exp_avg_sq: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    pub fn new(config: OptimConfig) -> Self {
        Self { config, steps: 0, exp_avg: BTreeMap::new(), exp_avg_sq: BTreeMap::new() }
    }

    /// Weight decay applies to tensors of rank ≥ 2 that are not biases or listed in `no_decay`.
    pub fn decays(&self, key: &str, rank: usize) -> bool {
        decays(&self.config, key, rank)
    }

    /// Clips `grads` in place to the configured global norm; returns the norm before clipping.
    pub fn clip(&self, grads: &mut BTreeMap<String, Vec<f32>>) -> f64 {
        let norm = global_norm(grads.values().map(Vec::as_slice));
        let coef = clip_coefficient(&self.config, norm);
        if coef < 1.0 {
            grads.values_mut().for_each(|g| g.iter_mut().for_each(|v| *v *= coef as f32));
        }
        norm
    }

    /// One AdamW step over every parameter that has a gradient. `ranks` gives each key's tensor
    /// rank (the decay rule needs it; the state is flat).
    pub fn step<M: Module>(&mut self, model: M, grads: &BTreeMap<String, Vec<f32>>, ranks: &BTreeMap<String, usize>, lr: f64) -> M {
        self.steps += 1;
        let update = AdamWStep::new(&self.config, self.steps, lr);
        let (config, exp_avg, exp_avg_sq) = (&self.config, &mut self.exp_avg, &mut self.exp_avg_sq);
        map_float_tensors(model, |key, param| {
            let grad = grads.get(key)?;
            let device = param.device();
            let mut values = host_f32(param);
            let m = exp_avg.entry(key.to_string()).or_insert_with(|| vec![0.0; values.len()]);
            let v = exp_avg_sq.entry(key.to_string()).or_insert_with(|| vec![0.0; values.len()]);
            let rank = ranks.get(key).copied().unwrap_or(1);
            update.apply(&mut values, grad, m, v, decays(config, key, rank));
            let n = values.len();
            Some(Tensor::from_data(TensorData::new(values, [n]), &device))
        })
    }

    /// The moments under `optim.exp_avg.<key>` / `optim.exp_avg_sq.<key>`.
    pub fn state(&self) -> StateDict {
        let mut dict = StateDict::new("optimizer");
        for (prefix, map) in [("optim.exp_avg", &self.exp_avg), ("optim.exp_avg_sq", &self.exp_avg_sq)] {
            for (key, values) in map {
                dict.insert(format!("{prefix}.{key}"), StateTensor::f32(vec![values.len()], values.clone()));
            }
        }
        dict
    }

    pub fn load_state(&mut self, dict: &StateDict, steps: u64) -> Result<()> {
        self.steps = steps;
        for (prefix, map) in [("optim.exp_avg", &mut self.exp_avg), ("optim.exp_avg_sq", &mut self.exp_avg_sq)] {
            map.clear();
            for (key, t) in dict.subset(prefix).iter() {
                let Values::F32(values) = &t.values else {
                    return Err(Error::DType { origin: dict.origin.clone(), key: format!("{prefix}.{key}"), expected: "f32", found: "i64".into() });
                };
                map.insert(key.clone(), values.clone());
            }
        }
        Ok(())
    }
}

/// Each float parameter's rank, by key (for the decay rule).
pub fn param_ranks<M: Module>(model: &M) -> BTreeMap<String, usize> {
    crate::state::collect_state(model)
        .iter()
        .filter(|(k, t)| !is_buffer_key(k) && matches!(t.values, Values::F32(_)))
        .map(|(k, t)| (k.clone(), t.shape.len().max(1)))
        .collect()
}

fn host(t: Tensor<1>) -> StateTensor {
    let n = t.dims()[0];
    StateTensor::f32(vec![n], host_f32(t))
}

fn device_tensor(t: &StateTensor, key: &str, device: &Device) -> Result<Tensor<1>> {
    match &t.values {
        Values::F32(v) => Ok(Tensor::from_data(TensorData::new(v.clone(), [v.len()]), device)),
        Values::I64(_) => Err(Error::DType { origin: "checkpoint".into(), key: key.into(), expected: "f32", found: "i64".into() }),
    }
}

/// Exponential moving average of every float tensor (parameters and BatchNorm statistics).
pub struct Ema {
    pub decay: f64,
    shadow: BTreeMap<String, Tensor<1>>,
}

impl Ema {
    pub fn new<M: Module>(decay: f64, model: &M) -> Self {
        Self { decay, shadow: float_tensors(model, None) }
    }

    pub fn update<M: Module>(&mut self, model: &M) {
        let d = self.decay;
        for (key, current) in float_tensors(model, None) {
            let next = match self.shadow.remove(&key) {
                Some(s) => s.mul_scalar(d).add(current.mul_scalar(1.0 - d)),
                None => current,
            };
            self.shadow.insert(key, next);
        }
    }

    /// `model` with the averaged weights.
    pub fn apply<M: Module>(&self, model: M) -> M {
        map_float_tensors(model, |key, current| self.shadow.get(key).map(|s| s.clone().to_device(&current.device())))
    }

    pub fn state(&self) -> StateDict {
        let mut dict = StateDict::new("ema");
        for (key, t) in &self.shadow {
            dict.insert(format!("ema.{key}"), host(t.clone()));
        }
        dict
    }

    pub fn load_state(&mut self, dict: &StateDict, device: &Device) -> Result<()> {
        for (key, t) in dict.subset("ema").iter() {
            self.shadow.insert(key.clone(), device_tensor(t, key, device)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lr_schedule_matches_the_official_config() {
        // SPEC §7.4 item 30: BASE 5e-4, WARMUP 5e-7, MIN 5e-6 at batch 1024; 1252 it/epoch,
        // warm-up 20 epochs, 300 epochs.
        let optim = OptimConfig::default();
        let schedule = ScheduleConfig::default();
        let s = LrSchedule::new(&optim, &schedule, 1024, 1252, 300);
        assert_eq!(s.warmup_steps, 25_040);
        assert_eq!(s.cosine_steps, 375_600);
        assert!((s.at(0) - 1e-6).abs() < 1e-15);
        assert!((s.at(12_520) - (1e-6 + 12_520.0 * (1e-3 - 1e-6) / 25_040.0)).abs() < 1e-15);
        assert!((s.at(25_040) - 9.892e-4).abs() < 1e-7, "{}", s.at(25_040));
        assert!(s.at(25_039) > s.at(25_040)); // the small drop at the warm-up boundary
        assert!((s.at(375_600) - 1e-5).abs() < 1e-15);
        assert!((s.at(400_000) - 1e-5).abs() < 1e-15);
    }

    #[test]
    fn adamw_matches_pytorch_on_a_scalar_problem() {
        // Hand-computed PyTorch AdamW (lr 0.1, wd 0.5, betas (0.9, 0.999), eps 1e-8) for
        // p0 = [1.0, -2.0] (rank 2 → decayed), grads g1 = [0.5, 0.5], g2 = [-1.0, 2.0].
        let device = Device::flex();
        let model = burn::module::Param::from_tensor(Tensor::<2>::from_floats([[1.0, -2.0]], &device));
        let mut opt = AdamW::new(OptimConfig { weight_decay: 0.5, clip_grad: None, no_decay: vec![], ..Default::default() });
        let ranks = BTreeMap::from([(String::new(), 2)]);
        let grads = |g: [f32; 2]| BTreeMap::from([(String::new(), g.to_vec())]);
        let model = opt.step(model, &grads([0.5, 0.5]), &ranks, 0.1);
        let model = opt.step(model, &grads([-1.0, 2.0]), &ranks, 0.1);
        let got = model.val().into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
        // Reference values from the PyTorch update rule, step by step in f64.
        let reference = |p0: f64, g: [f64; 2]| {
            let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
            for (t, gi) in g.iter().enumerate() {
                let t = t as i32 + 1;
                p *= 1.0 - 0.1 * 0.5;
                m = 0.9 * m + 0.1 * gi;
                v = 0.999 * v + 0.001 * gi * gi;
                let (mh, vh) = (m / (1.0 - 0.9f64.powi(t)), v / (1.0 - 0.999f64.powi(t)));
                p -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
            p
        };
        let want = [reference(1.0, [0.5, -1.0]), reference(-2.0, [0.5, 2.0])];
        // f32 arithmetic against f64: a few ulps (ulp(2) = 2.4e-7); a wrong bias correction or
        // decay is off by ~1e-2.
        for (g, w) in got.iter().zip(want) {
            assert!((*g as f64 - w).abs() <= 2e-6 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn decay_rule_skips_vectors_biases_and_listed_embeddings() {
        let opt = AdamW::new(OptimConfig::default());
        assert!(opt.decays("blocks.0.attn.qkv.weight", 2));
        assert!(opt.decays("patch_embed.proj.weight", 4));
        assert!(!opt.decays("blocks.0.norm1.norm2.alpha", 1));
        assert!(!opt.decays("blocks.0.norm1.norm1.weight", 1));
        assert!(!opt.decays("head.bias", 1));
        assert!(!opt.decays("pos_embed", 3));
        assert!(!opt.decays("layers.0.blocks.1.attn.relative_position_bias_table", 2)); // Swin's, as the official keywords
        assert!(opt.decays("pos_embed1", 3)); // PVT's stage embeddings, as the official list
        assert!(!opt.decays("cls_token", 3));
        assert!(!opt.decays("blocks.3.attn.positional_encoding", 3));
        // EfficientFormer's attention biases, as timm's `no_weight_decay`.
        assert!(!opt.decays("stages.3.blocks.4.token_mixer.attention_biases", 2));
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let opt = AdamW::new(OptimConfig { clip_grad: Some(1.0), ..Default::default() });
        let mut grads = BTreeMap::from([("a".to_string(), vec![3.0, 0.0]), ("b".to_string(), vec![4.0])]);
        assert!((opt.clip(&mut grads) - 5.0).abs() < 1e-6);
        assert!((global_norm(grads.values().map(Vec::as_slice)) - 1.0).abs() < 1e-5);
    }
}
