//! Training configuration: TOML files and named presets. Every field has a default (documented
//! beside it); unknown keys and invalid values are errors that name the key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::data::augment::{AugmentConfig, MixConfig};
use crate::data::sampler::{BatchSampler, MultiScaleConfig};
use crate::error::{Error, Result};
use crate::memory;
use crate::models::{self, AnyConfig};
use crate::nn::attention::AttentionKind;
use crate::nn::schedule::Decay;
use super::optim::LrSchedule;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSpec,
    #[serde(default)]
    pub data: DataConfig,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub prepbn: PrepbnConfig,
    #[serde(default)]
    pub augment: AugmentConfig,
    #[serde(default)]
    pub mix: MixConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
}

/// A model preset plus overrides of its fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// A name from `slabformer info` (required).
    pub preset: String,
    /// Fields of the preset's config to replace, by their names in that config (`embed_dim = 64`,
    /// `attention = { kind = "focused", power = 2.0, kernel_size = 5 }`); a name the family's
    /// config lacks is an error naming it.
    #[serde(flatten)]
    pub overrides: BTreeMap<String, toml::Value>,
}

impl ModelSpec {
    pub fn new(preset: &str) -> Self {
        Self { preset: preset.into(), overrides: BTreeMap::new() }
    }

    /// Overrides `field` with `value`.
    pub fn set(&mut self, field: &str, value: impl Into<toml::Value>) {
        self.overrides.insert(field.into(), value.into());
    }

    /// [`set`](Self::set), for building a spec.
    pub fn with(mut self, field: &str, value: impl Into<toml::Value>) -> Self {
        self.set(field, value);
        self
    }

    /// The preset with the overrides applied (the PRepBN T is set by the trainer).
    pub fn config(&self) -> Result<AnyConfig> {
        let preset = models::preset(&self.preset)?;
        let overrides = self
            .overrides
            .iter()
            .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v).map_err(|e| Error::Config(format!("model.{k}: {e}")))?)))
            .collect::<Result<serde_json::Map<_, _>>>()?;
        let config = preset.with_overrides(&overrides).map_err(|e| Error::Config(format!("[model] of preset `{}`: {e}", self.preset)))?;
        config.check_sizes().map_err(|e| Error::Config(format!("[model] of preset `{}`: model.{}", self.preset, e.to_string().trim_start_matches("invalid config: "))))?;
        Ok(config)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dataset {
    /// Raw idx files of Fashion-MNIST in `root` (train and t10k).
    FashionMnist,
    /// `root/<class>/<image>` for training and `eval_root/<class>/<image>` for evaluation.
    Folder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Default `fashion-mnist`.
    pub dataset: Dataset,
    /// Default `data/fashion-mnist`.
    pub root: PathBuf,
    /// Evaluation folder for `dataset = "folder"`.
    pub eval_root: Option<PathBuf>,
    /// Use only the first N images of each class (small real subsets; default: all).
    pub train_per_class: Option<usize>,
    pub eval_per_class: Option<usize>,
    /// Variable-resolution training batches, Apple ml-cvnets' multi-scale sampler (default off:
    /// every batch `run.batch_size` images of the model's `img_size`).
    pub multi_scale: Option<MultiScaleConfig>,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dataset: Dataset::FashionMnist,
            root: PathBuf::from("data/fashion-mnist"),
            eval_root: None,
            train_per_class: None,
            eval_per_class: None,
            multi_scale: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Epochs of the cosine schedule (default 300).
    pub epochs: u64,
    /// Images per optimizer step (default 1024).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (default 1); `batch_size` must divide evenly.
    pub accum_steps: usize,
    /// Default 256.
    pub eval_batch_size: usize,
    /// Final BatchNorm re-calibration epochs: parameters frozen, statistics re-estimated, no
    /// mixing (default 10, as the paper).
    pub recalibrate_epochs: u64,
    /// Exponential moving average of the weights (default off; e.g. 0.9998).
    pub ema_decay: Option<f64>,
    /// Seed of data order, augmentation, mixing and drop-path (default 0).
    pub seed: u64,
    /// Stop after this many optimizer steps (default: the full schedule); for smoke runs.
    pub max_steps: Option<u64>,
    /// What runs the training steps (default `auto`).
    pub engine: TrainEngine,
    /// What a non-finite loss or gradient norm does (default `stop`).
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: the run stops after this many skipped steps in a row
    /// (default 5).
    pub max_skips_in_a_row: u64,
}

/// What a step whose loss or gradient norm is NaN or ∞ does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// The run stops with an error naming the step and the last healthy checkpoint.
    #[default]
    Stop,
    /// The step is not taken: its batches are dropped and the state before it (weights,
    /// statistics, counters, optimizer moments, EMA) is restored; the run goes on with the next
    /// batches and stops after `max_skips_in_a_row` skips in a row.
    Skip,
}

/// What runs the training steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TrainEngine {
    /// The CPU runtime's trainer where it trains the model (the DeiT family with softmax,
    /// ReLU/L or SLA attention), burn otherwise.
    #[default]
    Auto,
    /// The CPU runtime's trainer ([`crate::runtime::CpuTrainer`]); an error where it does not
    /// cover the run.
    Cpu,
    /// burn autodiff on the flex backend.
    Burn,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            epochs: 300,
            batch_size: 1024,
            accum_steps: 1,
            eval_batch_size: 256,
            recalibrate_epochs: 10,
            ema_decay: None,
            seed: 0,
            max_steps: None,
            engine: TrainEngine::Auto,
            on_nonfinite: OnNonFinite::Stop,
            max_skips_in_a_row: 5,
        }
    }
}

pub use crate::optim::OptimConfig;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Linear warm-up epochs (default 20).
    pub warmup_epochs: f64,
    /// Warm-up start and final learning rates per 512 images (defaults 5e-7, 5e-6).
    pub warmup_lr: f64,
    pub min_lr: f64,
    /// Extra epochs at `min_lr` after the cosine (default 0).
    pub cooldown_epochs: u64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { warmup_epochs: 20.0, warmup_lr: 5e-7, min_lr: 5e-6, cooldown_epochs: 0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrepbnConfig {
    /// Decay steps T, in optimizer steps: default 0.8 × the run's steps; 0 = pure RepBN. Must not
    /// exceed the run (training would end with λ > 0 while eval uses pure RepBN).
    pub steps: Option<u64>,
    /// Pure-LayerNorm steps before the decay (default 0).
    pub warm: u64,
    /// Default 1.0.
    pub r0: f64,
    /// Default linear.
    pub decay: Decay,
}

impl Default for PrepbnConfig {
    fn default() -> Self {
        Self { steps: None, warm: 0, r0: 1.0, decay: Decay::Linear }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Also checkpoint every N ≥ 1 optimizer steps (default: only at epoch ends).
    pub every_steps: Option<u64>,
    /// Checkpoints kept (default 3).
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: None, keep: 3 }
    }
}

/// Most epochs (training and cooldown) of a multi-scale run: their batches are planned up front.
pub const MAX_MULTI_SCALE_EPOCHS: u64 = 10_000;

/// The optimizer steps of each epoch: the same every epoch with one image size; with
/// `data.multi_scale`, as many as the batches that epoch's draws of sizes make.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochSteps {
    sampler: BatchSampler,
    train_len: usize,
    seed: u64,
    accum: usize,
}

impl EpochSteps {
    pub fn sampler(&self) -> &BatchSampler {
        &self.sampler
    }

    /// Optimizer steps of `epoch`.
    pub fn of(&self, epoch: u64) -> u64 {
        (self.sampler.batches_in_epoch(self.train_len, self.seed, epoch) / self.accum) as u64
    }

    /// Steps of the first `epochs` epochs, a fractional part counting that share of the next
    /// epoch's (rounded).
    pub fn before(&self, epochs: f64) -> u64 {
        if let [_] = self.sampler.scales() {
            return (epochs * self.of(0) as f64).round() as u64;
        }
        let whole = epochs.floor() as u64;
        (0..whole).map(|e| self.of(e)).sum::<u64>() + ((epochs - whole as f64) * self.of(whole) as f64).round() as u64
    }
}

/// What validation says about a config beyond hard errors.
#[derive(Debug, Default)]
pub struct Validated {
    pub model: Option<AnyConfig>,
    pub warnings: Vec<String>,
}

/// Every leaf of `config` by dotted key (arrays are leaves), as TOML writes it.
fn flat_keys(config: &TrainConfig) -> BTreeMap<String, String> {
    fn walk(value: &toml::Value, key: &str, out: &mut BTreeMap<String, String>) {
        match value {
            toml::Value::Table(table) => table.iter().for_each(|(k, v)| walk(v, &if key.is_empty() { k.clone() } else { format!("{key}.{k}") }, out)),
            leaf => {
                out.insert(key.to_string(), leaf.to_string());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&toml::Value::try_from(config).expect("config serializes"), "", &mut out);
    out
}

/// The first non-finite float under `value`, with its dotted key (`optim.betas[1]`).
fn non_finite(value: &toml::Value, key: &str) -> Option<(String, f64)> {
    match value {
        toml::Value::Float(f) if !f.is_finite() => Some((key.to_string(), *f)),
        toml::Value::Array(items) => items.iter().enumerate().find_map(|(i, v)| non_finite(v, &format!("{key}[{i}]"))),
        toml::Value::Table(table) => table.iter().find_map(|(k, v)| non_finite(v, &if key.is_empty() { k.clone() } else { format!("{key}.{k}") })),
        _ => None,
    }
}

impl TrainConfig {
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        // Read as a TOML table first: it refuses integers beyond TOML's i64 range (with their
        // line), which the typed reader would take into u64 fields that cannot be written back
        // (checkpoints store the config as TOML).
        text.parse::<toml::Table>().map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    /// Micro-batch size.
    pub fn micro_batch(&self) -> usize {
        self.run.batch_size / self.run.accum_steps.max(1)
    }

    /// How the training epochs of a model of `img_size` are cut into (micro-)batches.
    pub fn batch_sampler(&self, img_size: usize) -> BatchSampler {
        match &self.data.multi_scale {
            Some(multi_scale) => BatchSampler::multi_scale(multi_scale, img_size, self.run.batch_size),
            None => BatchSampler::fixed(img_size, self.micro_batch()),
        }
    }

    /// The optimizer steps of each epoch over `train_len` images for a model of `img_size`.
    pub fn epoch_steps(&self, train_len: usize, img_size: usize) -> EpochSteps {
        EpochSteps { sampler: self.batch_sampler(img_size), train_len, seed: self.run.seed, accum: self.run.accum_steps.max(1) }
    }

    /// Optimizer steps of the whole run (cosine + cooldown), before `max_steps`.
    pub fn total_steps(&self, steps: &EpochSteps) -> u64 {
        steps.before((self.run.epochs + self.schedule.cooldown_epochs) as f64)
    }

    /// The learning rate by optimizer step: warm-up over the steps of the first
    /// `schedule.warmup_epochs`, the cosine over those of the `run.epochs`.
    pub fn lr_schedule(&self, steps: &EpochSteps) -> LrSchedule {
        LrSchedule::from_steps(&self.optim, &self.schedule, self.run.batch_size, steps.before(self.schedule.warmup_epochs), steps.before(self.run.epochs as f64))
    }

    /// `[data.multi_scale]` against the run and the model: the ranges, every size the model
    /// takes (its family says which), batches that fit the training set, no accumulation.
    fn check_multi_scale(&self, multi_scale: &MultiScaleConfig, model: &AnyConfig, train_len: usize, warnings: &mut Vec<String>) -> Result<()> {
        let err = |m: String| Err(Error::Config(m));
        let image = model.image();
        multi_scale.validate(image.img_size())?;
        if self.run.accum_steps > 1 {
            return err(format!(
                "run.accum_steps = {} with data.multi_scale: accumulation splits one fixed batch, multi-scale batches vary in size (use run.accum_steps = 1)",
                self.run.accum_steps
            ));
        }
        let epochs = self.run.epochs + self.schedule.cooldown_epochs;
        if epochs > MAX_MULTI_SCALE_EPOCHS {
            return err(format!("data.multi_scale plans every epoch's batches up front: run.epochs + schedule.cooldown_epochs = {epochs} exceeds {MAX_MULTI_SCALE_EPOCHS}"));
        }
        // The warm-up's steps are counted epoch plan by epoch plan too.
        if self.schedule.warmup_epochs > epochs as f64 {
            return err(format!("schedule.warmup_epochs = {} with data.multi_scale: longer than the run's {epochs} epochs", self.schedule.warmup_epochs));
        }
        for scale in self.batch_sampler(image.img_size()).scales() {
            let side = scale.size;
            if let Err(e) = image.takes_size(side) {
                let why = match e {
                    Error::Config(m) => m,
                    other => other.to_string(),
                };
                return err(format!(
                    "data.multi_scale: model `{}` ({} family) cannot train on {side}×{side} images: {why}",
                    self.model.preset,
                    model.family()
                ));
            }
            if scale.batch > train_len {
                return err(format!("data.multi_scale: the {side}×{side} batch of {} images exceeds the {train_len} training images", scale.batch));
            }
        }
        if !self.augment.random_resized_crop {
            warnings.push(
                "data.multi_scale with augment.random_resized_crop = false: the padded crop takes size×size windows without rescaling, so small sizes see part of \
                 each image and large ones zero borders"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks every field and resolves the model with its PRepBN T for a training set of
    /// `train_len` images.
    pub fn resolve(&self, train_len: usize) -> Result<Validated> {
        let err = |m: String| Err(Error::Config(m));
        // Every float of the config (optim, schedule, prepbn, augment, mix, run, model
        // overrides) in one walk: NaN passes every range check below.
        let tree = toml::Value::try_from(self).expect("config serializes");
        if let Some((key, value)) = non_finite(&tree, "") {
            return err(format!("{key} = {value} is not a finite number"));
        }
        for (key, value) in [("data.train_per_class", self.data.train_per_class), ("data.eval_per_class", self.data.eval_per_class)] {
            if value == Some(0) {
                return err(format!("{key} must be ≥ 1 (leave it out to use every image)"));
            }
        }
        if self.checkpoint.every_steps == Some(0) {
            return err("checkpoint.every_steps must be ≥ 1 (leave it out to checkpoint at epoch ends only)".into());
        }
        let r = &self.run;
        if r.batch_size == 0 || r.accum_steps == 0 || !r.batch_size.is_multiple_of(r.accum_steps) {
            return err(format!("run.batch_size ({}) must be a positive multiple of run.accum_steps ({})", r.batch_size, r.accum_steps));
        }
        if r.max_skips_in_a_row == 0 {
            return err("run.max_skips_in_a_row must be ≥ 1".into());
        }
        if r.epochs == 0 || r.eval_batch_size == 0 {
            return err("run.epochs and run.eval_batch_size must be > 0".into());
        }
        if train_len < r.batch_size {
            return err(format!("run.batch_size {} exceeds the {train_len} training images", r.batch_size));
        }
        if let Some(d) = r.ema_decay
            && !(0.0..1.0).contains(&d)
        {
            return err(format!("run.ema_decay must lie in [0, 1), got {d}"));
        }
        let o = &self.optim;
        if !(o.lr > 0.0 && o.lr.is_finite()) || o.weight_decay < 0.0 || o.eps <= 0.0 {
            return err("optim.lr must be > 0, optim.weight_decay ≥ 0 and optim.eps > 0".into());
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return err(format!("optim.betas must lie in [0, 1), got {:?}", o.betas));
        }
        if o.clip_grad.is_some_and(|c| c <= 0.0) {
            return err("optim.clip_grad must be > 0 (leave it out to disable clipping)".into());
        }
        let s = &self.schedule;
        if s.warmup_epochs < 0.0 || s.warmup_lr < 0.0 || s.min_lr < 0.0 {
            return err("schedule values must be ≥ 0".into());
        }
        self.augment.validate(self.model.config()?.image().in_chans())?;
        self.mix.validate()?;
        if self.checkpoint.keep == 0 {
            return err("checkpoint.keep must be ≥ 1".into());
        }

        let mut model = self.model.config()?;
        let mut warnings = Vec::new();
        if let Some(multi_scale) = &self.data.multi_scale {
            self.check_multi_scale(multi_scale, &model, train_len, &mut warnings)?;
        }
        let steps = self.epoch_steps(train_len, model.image().img_size());
        let total = self.run.max_steps.unwrap_or(u64::MAX).min(self.total_steps(&steps));
        if let Some(schedule) = model.prepbn_schedule() {
            let t = self.prepbn.steps.unwrap_or((total as f64 * 0.8).round() as u64);
            if t + self.prepbn.warm > total {
                return err(format!(
                    "prepbn.steps T = {t} (+ warm {}) exceeds the {total} optimizer steps of this run: training would end with λ > 0 \
                     while evaluation uses pure RepBN. Use T ≤ {total} (default 0.8 × steps = {}), or 0 for pure RepBN",
                    self.prepbn.warm,
                    (total as f64 * 0.8).round() as u64
                ));
            }
            if t > 0 && t < total / 2 {
                warnings.push(format!(
                    "prepbn.steps T = {t} is below half of the run ({total} steps): removing LayerNorm early has been reported to \
                     diverge to NaN; 0.8 × steps = {} is the stable choice",
                    (total as f64 * 0.8).round() as u64
                ));
            }
            if !(0.0..=1.0).contains(&self.prepbn.r0) {
                return err(format!("prepbn.r0 must lie in [0, 1], got {}", self.prepbn.r0));
            }
            schedule.total = t;
            schedule.warm = self.prepbn.warm;
            schedule.r0 = self.prepbn.r0;
            schedule.decay = self.prepbn.decay;
        } else if self.prepbn.steps.is_some() {
            warnings.push(format!("prepbn.steps is set but model `{}` has no PRepBN norm; ignored", self.model.preset));
        }
        model.image().validate()?;
        // The CPU trainer's weights beside burn's, gradients, two AdamW moments, and the EMA.
        let copies = 5 + u64::from(self.run.ema_decay.is_some());
        if let Some(why) = memory::params_too_big(model.param_count(), copies, "weights twice, gradients, 2 AdamW moments, EMA") {
            let overrides: Vec<String> = self.model.overrides.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            return err(format!("[model] preset `{}` with {}: {why}", self.model.preset, overrides.join(", ")));
        }
        Ok(Validated { model: Some(model), warnings })
    }

    /// The keys a resumed run may change, with a warning: they steer the steps to come and
    /// leave the steps already taken valid. Any other change is refused.
    pub const RESUME_OVERRIDES: &[&str] = &["optim.lr", "optim.clip_grad", "run.epochs", "run.on_nonfinite", "run.max_skips_in_a_row"];

    /// How `self` (the config a resume was started with) differs from `stored` (the run's):
    /// `Ok` with one warning per changed key of [`RESUME_OVERRIDES`](Self::RESUME_OVERRIDES), or
    /// `Err` with the other keys that differ.
    pub fn resume_changes(&self, stored: &TrainConfig) -> std::result::Result<Vec<String>, Vec<String>> {
        let (ours, theirs) = (flat_keys(self), flat_keys(stored));
        let keys: std::collections::BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
        let unset = "(unset)".to_string();
        let (mut allowed, mut refused) = (Vec::new(), Vec::new());
        for key in keys {
            let (now, before) = (ours.get(key).unwrap_or(&unset), theirs.get(key).unwrap_or(&unset));
            if now == before {
                continue;
            }
            let line = format!("{key} = {now} (the run was started with {before})");
            if Self::RESUME_OVERRIDES.contains(&key.as_str()) {
                allowed.push(format!("resuming with {line}"));
            } else {
                refused.push(line);
            }
        }
        if refused.is_empty() { Ok(allowed) } else { Err(refused) }
    }

    /// The names [`preset`](Self::preset) knows.
    pub const PRESETS: &[&str] = &["fashion-slab", "fashion-slab-swin", "fashion-slab-pvt", "fashion-mobilevit", "imagenet-slab-deit-tiny", "imagenet-deit-tiny"];

    /// Named training presets.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "fashion-slab" => Ok(Self::fashion_slab()),
            "fashion-slab-swin" => Ok(Self::fashion_slab_swin()),
            "fashion-slab-pvt" => Ok(Self::fashion_slab_pvt()),
            "fashion-mobilevit" => Ok(Self::fashion_mobilevit()),
            "imagenet-slab-deit-tiny" => Ok(Self::imagenet("slab_deit_tiny")),
            "imagenet-deit-tiny" => Ok(Self::imagenet("deit_tiny")),
            other => Err(Error::Config(format!(
                "unknown training preset `{other}`; known: {}",
                Self::PRESETS.join(", ")
            ))),
        }
    }

    /// The paper's ImageNet-1K recipe (SPEC §5.1) for a DeiT-family preset; point `data` at an
    /// image folder.
    pub fn imagenet(preset: &str) -> Self {
        Self {
            model: ModelSpec::new(preset),
            data: DataConfig { dataset: Dataset::Folder, root: "data/imagenet/train".into(), eval_root: Some("data/imagenet/val".into()), ..Default::default() },
            run: RunConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            prepbn: PrepbnConfig::default(),
            augment: AugmentConfig::default(),
            mix: MixConfig { mixup_alpha: 0.8, cutmix_alpha: 1.0, ..Default::default() },
            checkpoint: CheckpointConfig::default(),
        }
    }

    /// The quickstart: a small SLAB-DeiT (PRepBN + SLA, patch 4 on 28×28) on Fashion-MNIST.
    pub fn fashion_slab() -> Self {
        Self {
            model: ModelSpec::new("slab_deit_tiny")
                .with("img_size", 28)
                .with("patch_size", 4)
                .with("in_chans", 1)
                .with("num_classes", 10)
                .with("embed_dim", 64)
                .with("depth", 4)
                .with("num_heads", 2)
                .with("mlp_ratio", 2.0)
                .with("drop_path_rate", 0.0),
            data: DataConfig::default(),
            run: RunConfig { epochs: 4, batch_size: 128, recalibrate_epochs: 1, ..Default::default() },
            // 3e-3 after the batch/512 scaling: a 4-epoch schedule needs a brisk rate.
            optim: OptimConfig { lr: 1.2e-2, clip_grad: Some(5.0), ..Default::default() },
            schedule: ScheduleConfig { warmup_epochs: 0.5, warmup_lr: 1e-5, min_lr: 1e-5, cooldown_epochs: 0 },
            prepbn: PrepbnConfig::default(),
            augment: AugmentConfig {
                random_resized_crop: false,
                crop_padding: 0,
                hflip: 0.5,
                mean: vec![0.2860],
                std: vec![0.3530],
                ..Default::default()
            },
            mix: MixConfig { label_smoothing: 0.1, ..Default::default() },
            checkpoint: CheckpointConfig::default(),
        }
    }
}

impl TrainConfig {
    /// A small SLAB-Swin on Fashion-MNIST (28², patch 2): stage 1 SLA over the whole 14×14 map,
    /// stage 2 softmax windows of 7×7 on 7×7 tokens, PRepBN everywhere — the layout of the paper's
    /// SLAB-Swin-T at a size that trains on 2 cores. The rest of the recipe is the quickstart's.
    pub fn fashion_slab_swin() -> Self {
        let model = ModelSpec::new("slab_swin_tiny")
            .with("img_size", vec![28, 28])
            .with("patch_size", 2)
            .with("in_chans", 1)
            .with("num_classes", 10)
            .with("embed_dim", 32)
            .with("depths", vec![2, 2])
            .with("num_heads", vec![2, 4])
            .with("attention", toml::Value::try_from([AttentionKind::sla(), AttentionKind::Softmax]).expect("attention kinds serialize"))
            .with("window_size", 7)
            .with("linear_window_size", 14)
            .with("mlp_ratio", 2.0)
            .with("drop_path_rate", 0.0);
        Self { model, ..Self::fashion_slab() }
    }

    /// A small SLAB-PVT on Fashion-MNIST, resized to 32² (grids 8, 4, 2, 1 after the patch-4
    /// stem and the three 2×2 stage embeddings): SLA in every stage, PRepBN everywhere.
    pub fn fashion_slab_pvt() -> Self {
        let model = ModelSpec::new("slab_pvt_tiny")
            .with("img_size", vec![32, 32])
            .with("patch_size", 4)
            .with("in_chans", 1)
            .with("num_classes", 10)
            .with("embed_dims", vec![32, 48, 64, 96])
            .with("num_heads", vec![1, 2, 2, 4])
            .with("mlp_ratios", vec![2.0, 2.0, 2.0, 2.0])
            .with("depths", vec![1, 1, 1, 1])
            .with("drop_path_rate", 0.0);
        let quickstart = Self::fashion_slab();
        // The 28² images resized to 32² alike for training and evaluation: the whole image,
        // never a crop of it.
        let augment = AugmentConfig { random_resized_crop: true, scale: [1.0, 1.0], ratio: [1.0, 1.0], eval_crop: 1.0, ..quickstart.augment.clone() };
        Self { model, augment, ..quickstart }
    }

    /// MobileViT-XXS on Fashion-MNIST resized to 32²: timm's widths and depths, the last stage
    /// at stride 1 so its MobileViT block still sees whole 2×2 patches (a 2×2 map, not 1×1).
    /// The recipe and the resize are the PVT preset's.
    pub fn fashion_mobilevit() -> Self {
        let mut stages = crate::models::MobileVitConfig::mobilevit_xxs().stages;
        if let Some(crate::models::mobilevit::StageConfig::Mobilevit { stride, .. }) = stages.last_mut() {
            *stride = 1;
        }
        let model = ModelSpec::new("mobilevit_xxs")
            .with("img_size", 32)
            .with("in_chans", 1)
            .with("num_classes", 10)
            .with("stages", toml::Value::try_from(stages).expect("stage recipes serialize"))
            .with("drop_path_rate", 0.0);
        Self { model, ..Self::fashion_slab_pvt() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::norm::NormKind;

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let err = TrainConfig::from_toml("[model]\npreset = \"slab_deit_tiny\"\n[run]\nepochz = 3\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("epochz") && err.contains("x.toml"), "{err}");
        let err = TrainConfig::from_toml("[run]\nepochs = 3\n", "x.toml").unwrap_err().to_string();
        assert!(err.contains("model"), "{err}");
        let mut c = TrainConfig::fashion_slab();
        c.run.batch_size = 100;
        c.run.accum_steps = 3;
        assert!(c.resolve(60_000).unwrap_err().to_string().contains("accum_steps"));
        let mut c = TrainConfig::fashion_slab();
        c.model.preset = "nope".into();
        assert!(c.resolve(60_000).unwrap_err().to_string().contains("nope"));
        let err = TrainConfig::from_toml("[model]\npreset = \"slab_deit_tiny\"\nembed_dimm = 8\n", "x.toml").unwrap().resolve(60_000).unwrap_err().to_string();
        assert!(err.contains("`embed_dimm` is not a field of vit configs") && err.contains("embed_dim,"), "{err}");
        let err = TrainConfig::from_toml("[model]\npreset = \"slab_deit_tiny\"\ndepth = \"two\"\n", "x.toml").unwrap().resolve(60_000).unwrap_err().to_string();
        assert!(err.contains("slab_deit_tiny") && err.contains("two"), "{err}");
    }

    #[test]
    fn every_training_preset_resolves() {
        for name in TrainConfig::PRESETS {
            let config = TrainConfig::preset(name).unwrap();
            let model = config.resolve(60_000).unwrap_or_else(|e| panic!("{name}: {e}")).model.unwrap();
            assert_eq!(model.image().input_size()[0], model.image().input_size()[1], "{name}");
            assert_eq!(TrainConfig::from_toml(&config.to_toml(), name).unwrap(), config, "{name}");
        }
        assert!(matches!(TrainConfig::preset("fashion-slab-swin").unwrap().model.config().unwrap(), AnyConfig::Swin(_)));
        assert!(matches!(TrainConfig::preset("fashion-slab-pvt").unwrap().model.config().unwrap(), AnyConfig::Pvt(_)));
        assert!(matches!(TrainConfig::preset("fashion-mobilevit").unwrap().model.config().unwrap(), AnyConfig::Mobilevit(_)));
        assert!(TrainConfig::preset("nope").unwrap_err().to_string().contains("fashion-slab-swin"));
    }

    #[test]
    fn overrides_reach_every_config_field() {
        let text = "[model]\npreset = \"flatten_deit_tiny\"\nembed_dim = 96\nmlp_ratio = 2\nattention = { kind = \"focused\", power = 2.0, kernel_size = 3 }\n";
        let Some(AnyConfig::Vit(model)) = TrainConfig::from_toml(text, "x.toml").unwrap().model.config().ok() else { panic!("a ViT") };
        assert_eq!((model.embed_dim, model.mlp_ratio), (96, 2.0));
        assert_eq!(model.attention, AttentionKind::Focused { power: 2.0, kernel_size: 3 });
    }

    #[test]
    fn toml_round_trips_and_defaults_fill_in() {
        let c = TrainConfig::fashion_slab();
        assert_eq!(TrainConfig::from_toml(&c.to_toml(), "rt").unwrap(), c);
        let minimal = TrainConfig::from_toml("[model]\npreset = \"deit_tiny\"\n", "m").unwrap();
        assert_eq!(minimal.run, RunConfig::default());
        assert_eq!(minimal.optim, OptimConfig::default());
    }

    #[test]
    fn multi_scale_reads_plans_epochs_and_is_checked_by_key() {
        let text = "[model]\npreset = \"mobilevit_xxs\"\n[data.multi_scale]\nmin_size = 160\nmax_size = 320\n";
        let c = TrainConfig::from_toml(text, "m.toml").unwrap();
        assert_eq!(c.data.multi_scale, Some(MultiScaleConfig { min_size: 160, max_size: 320, max_scales: 5, divisor: 32 }));
        assert_eq!(TrainConfig::from_toml(&c.to_toml(), "rt").unwrap(), c);
        let err = TrainConfig::from_toml(&text.replace("min_size", "min_sizes"), "m.toml").unwrap_err().to_string();
        assert!(err.contains("min_sizes"), "{err}");

        // ImageNet-1K with the default batch 1024 at 256².
        let len = 1_281_167;
        assert!(c.resolve(len).unwrap().warnings.is_empty());
        let steps = c.epoch_steps(len, 256);
        let batches: Vec<usize> = steps.sampler().scales().iter().map(|s| s.batch).collect();
        assert_eq!(batches, vec![2621, 1820, 1024, 809, 655]);
        let per_epoch: Vec<u64> = (0..310).map(|e| steps.of(e)).collect();
        assert!(per_epoch.iter().any(|&n| n != per_epoch[0]), "every epoch drew the same number of batches");
        assert!(per_epoch.iter().all(|&n| (800..1100).contains(&n)), "{per_epoch:?}");
        assert_eq!(c.total_steps(&steps), per_epoch[..300].iter().sum::<u64>());
        let lr = c.lr_schedule(&steps);
        assert_eq!((lr.warmup_steps, lr.cosine_steps), (per_epoch[..20].iter().sum(), per_epoch[..300].iter().sum()));
        assert_eq!(steps.before(20.5), per_epoch[..20].iter().sum::<u64>() + (per_epoch[20] as f64 * 0.5).round() as u64);
        // One image size: the fixed-batch numbers as before.
        let fixed = TrainConfig::fashion_slab();
        let fixed_steps = fixed.epoch_steps(60_000, 28);
        assert_eq!((fixed_steps.of(0), fixed_steps.of(3), fixed_steps.before(0.5)), (468, 468, 234));

        let refused = |edit: &dyn Fn(&mut TrainConfig), len: usize, keys: &[&str]| {
            let mut bad = c.clone();
            edit(&mut bad);
            let err = bad.resolve(len).unwrap_err().to_string();
            assert!(keys.iter().all(|k| err.contains(k)), "{keys:?}: {err}");
        };
        // Families sized for one input (position embeddings, fixed attention grids) are refused
        // by family; MobileViT, v2 and Mobile-Former take every size.
        refused(&|c| c.model.preset = "deit_tiny".into(), len, &["data.multi_scale", "`deit_tiny` (vit family)", "160×160", "224×224"]);
        refused(&|c| c.model.preset = "efficientformer_l1".into(), len, &["data.multi_scale", "efficientformer family"]);
        for preset in ["mobilevitv2_050", "mobile_former_26m"] {
            let mut ok = c.clone();
            ok.model.preset = preset.into();
            ok.data.multi_scale = Some(MultiScaleConfig { min_size: 128, max_size: 320, max_scales: 5, divisor: 32 });
            ok.resolve(len).unwrap_or_else(|e| panic!("{preset}: {e}"));
        }
        refused(&|c| c.run.accum_steps = 2, len, &["run.accum_steps = 2", "data.multi_scale"]);
        refused(&|c| c.data.multi_scale.as_mut().unwrap().max_size = 240, len, &["data.multi_scale.min_size", "img_size 256"]);
        refused(&|c| c.data.multi_scale.as_mut().unwrap().divisor = 0, len, &["data.multi_scale.divisor"]);
        refused(&|_| {}, 2000, &["data.multi_scale", "160×160 batch of 2621", "2000 training images"]);
        refused(&|c| c.run.epochs = 1 << 40, len, &["data.multi_scale", "run.epochs"]);
        refused(&|c| c.schedule.warmup_epochs = 1e12, len, &["data.multi_scale", "schedule.warmup_epochs"]);
        let mut padded = c.clone();
        padded.augment.random_resized_crop = false;
        assert!(padded.resolve(len).unwrap().warnings[0].contains("augment.random_resized_crop"));
    }

    #[test]
    fn prepbn_steps_default_to_eight_tenths_and_are_checked() {
        let c = TrainConfig::fashion_slab();
        let total = c.total_steps(&c.epoch_steps(60_000, 28)); // 468 steps × 4 epochs
        assert_eq!(total, 1872);
        let Some(AnyConfig::Vit(model)) = c.resolve(60_000).unwrap().model else { panic!("a ViT") };
        let NormKind::Prepbn { schedule, .. } = model.norm else { panic!("PRepBN") };
        assert_eq!(schedule.total, 1498);
        let mut long = c.clone();
        long.prepbn.steps = Some(total + 1);
        let err = long.resolve(60_000).unwrap_err().to_string();
        assert!(err.contains("λ > 0") && err.contains("1872"), "{err}");
        let mut short = c.clone();
        short.prepbn.steps = Some(100);
        assert!(short.resolve(60_000).unwrap().warnings[0].contains("NaN"));
        let mut pure = c;
        pure.prepbn.steps = Some(0);
        let Some(AnyConfig::Vit(model)) = pure.resolve(60_000).unwrap().model else { panic!("a ViT") };
        assert!(matches!(model.norm, NormKind::Prepbn { schedule, .. } if schedule.total == 0));
    }
}
