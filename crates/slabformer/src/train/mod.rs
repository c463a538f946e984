//! Training: the SLAB recipe (SPEC §5) on an image set, with evaluation, metrics, plots,
//! checkpoints and exact resume.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optim;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;

use self::checkpoint::Position;
use self::config::{Dataset, OnNonFinite, TrainConfig, TrainEngine};
use self::metrics::{EvalRow, Metrics, StepRow};
use self::optim::{AdamW, Ema, param_ranks};
use crate::data::augment::AugmentConfig;
use crate::deploy::model_file::{Preprocess, save_model};
use crate::data::loader::{Batch, Loader, TrainEpoch};
use crate::data::sampler::BatchSampler;
use crate::data::{ImageSet, Split, derived_rng, fashion_mnist, image_folder};
use crate::error::{Error, Result};
use crate::models::{ImageClassifier, ImageConfig, ModelFamily};
use crate::nn::{drop_path, recalibration_mode, set_counter_advance};
use crate::nn::loss::cross_entropy;
use crate::runtime::{CpuModel, CpuTrainer, ForwardOptions};
use crate::state::{StateDict, Values, collect_state, float_tensors, host_f32, keys_in_order, load_state};

pub struct Datasets {
    pub train: Arc<ImageSet>,
    pub eval: Arc<ImageSet>,
}

/// The training and evaluation sets a config names.
pub fn load_datasets(config: &TrainConfig) -> Result<Datasets> {
    let model = config.model.config()?;
    let (train, eval) = match config.data.dataset {
        Dataset::FashionMnist => (fashion_mnist(&config.data.root, Split::Train)?, fashion_mnist(&config.data.root, Split::Test)?),
        Dataset::Folder => {
            let eval_root = config
                .data
                .eval_root
                .as_ref()
                .ok_or_else(|| Error::Config("data.eval_root is required for dataset = \"folder\"".into()))?;
            // Keep a margin around the crop: images are stored at img_size / eval_crop.
            let load = config.augment.stored_size(model.image().img_size());
            (image_folder(&config.data.root, load)?, image_folder(eval_root, load)?)
        }
    };
    let subset = |set: ImageSet, per_class: Option<usize>| match per_class {
        Some(n) => set.balanced_subset(n),
        None => set,
    };
    Ok(Datasets {
        train: Arc::new(subset(train, config.data.train_per_class)),
        eval: Arc::new(subset(eval, config.data.eval_per_class)),
    })
}

pub struct TrainOptions {
    pub run_dir: PathBuf,
    pub resume: bool,
    pub progress: bool,
    /// Stop right after this optimizer step and its checkpoint, as an interrupted run would
    /// (used to test resume; `None` runs to the end).
    pub interrupt_after: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct Summary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub seconds: f64,
    pub warnings: Vec<String>,
    /// The final evaluation of the trained (and re-calibrated) model.
    pub final_eval: EvalRow,
    /// The same for its fused deploy form (RepBN/PRepBN models).
    pub fused_eval: Option<EvalRow>,
    pub model_path: PathBuf,
    /// What ran the training steps: "cpu" (the runtime's trainer) or "burn".
    pub engine: &'static str,
    /// Why a fast path was not taken: the burn engine instead of the CPU trainer, or the fused
    /// model evaluated with burn or not at all.
    pub notes: Vec<String>,
    /// One line per step skipped for a non-finite loss or gradient (`on_nonfinite = "skip"`).
    pub skipped: Vec<String>,
}

/// Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` on `set` (evaluation view).
pub fn evaluate<M: ImageClassifier>(model: &M, set: &Arc<ImageSet>, augment: &AugmentConfig, batch: usize) -> EvalRow {
    let inference = model.valid();
    let device = Device::flex();
    let [channels, size] = [set.channels, model.image_config().img_size()];
    evaluate_logits(size, model.image_config().num_classes(), set, augment, batch, |images, n| {
        let x = Tensor::<4>::from_data(TensorData::new(images, [n, channels, size, size]), &device);
        host_f32(inference.logits(x))
    })
}

/// [`evaluate`] with the CPU runtime (the deploy model's fast path).
pub fn evaluate_runtime(runtime: &CpuModel, set: &Arc<ImageSet>, augment: &AugmentConfig, batch: usize) -> EvalRow {
    evaluate_logits(runtime.img_size(), runtime.num_classes(), set, augment, batch, |images, n| {
        runtime.forward(&images, n).expect("the loader yields images of the model's size")
    })
}

fn evaluate_logits(img_size: usize, classes: usize, set: &Arc<ImageSet>, augment: &AugmentConfig, batch: usize, logits_of: impl Fn(Vec<f32>, usize) -> Vec<f32>) -> EvalRow {
    let (mut top1, mut top5, mut loss, mut seen) = (0usize, 0usize, 0.0f64, 0usize);
    for b in Loader::eval(set.clone(), Arc::new(augment.clone()), img_size, batch) {
        let n = b.len();
        let logits = logits_of(b.images, n);
        for (row, &label) in logits.chunks(classes).zip(&b.labels) {
            loss += crate::kernels::log_sum_exp(row) - row[label as usize] as f64;
            let rank = row.iter().filter(|&&v| v > row[label as usize]).count();
            top1 += usize::from(rank == 0);
            top5 += usize::from(rank < 5);
        }
        seen += n;
    }
    let pct = |k: usize| 100.0 * k as f64 / seen.max(1) as f64;
    EvalRow { step: 0, epoch: 0, model: "model".into(), top1: pct(top1), top5: pct(top5), loss: loss / seen.max(1) as f64 }
}

/// How a BN re-calibration epoch treats a batch that leaves a non-finite statistic behind.
struct RecalibrationPolicy<'k> {
    /// `on_nonfinite = "skip"`: restore the statistics before the batch and go on.
    skip: bool,
    max_skips_in_a_row: u64,
    /// Model order, for naming the first norm that went non-finite.
    key_order: &'k [String],
}

/// One BN re-calibration epoch (SPEC §2.7): `batches` through `model` in re-calibration mode,
/// each batch's statistics checked after it. A non-finite statistic stops the epoch (an error
/// naming the batch and the first norm) or, under "skip", is undone with the batch dropped (one
/// line each in the second result), until `max_skips_in_a_row` in a row stop it.
fn recalibrate_epoch<M: ImageClassifier>(mut model: M, batches: impl IntoIterator<Item = Batch>, channels: usize, device: &Device, policy: &RecalibrationPolicy) -> std::result::Result<(M, Vec<String>), String> {
    let mut skipped = Vec::new();
    let mut in_a_row = 0u64;
    for (index, batch) in batches.into_iter().enumerate() {
        let (n, size) = (batch.len(), batch.size);
        let before = policy.skip.then(|| collect_state(&model));
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, [n, channels, size, size]), device);
        let _ = model.logits(x);
        let state = collect_state(&model);
        let non_finite = policy.key_order.iter().filter(|k| crate::state::is_buffer_key(k)).find_map(|k| match state.get(k).ok().map(|t| &t.values) {
            Some(Values::F32(v)) => v.iter().find(|x| !x.is_finite()).map(|&x| (k, x)),
            _ => None,
        });
        let Some((key, value)) = non_finite else {
            in_a_row = 0;
            continue;
        };
        let what = format!("batch {} left `{key}` = {value}: the norm's input activations are non-finite at these weights", index + 1);
        let Some(before) = before else { return Err(what) };
        in_a_row += 1;
        if in_a_row >= policy.max_skips_in_a_row {
            return Err(format!("{in_a_row} batches in a row were skipped (run.max_skips_in_a_row = {}); the last: {what}", policy.max_skips_in_a_row));
        }
        model = load_state(model, &before, false).map_err(|e| e.to_string())?.0;
        skipped.push(format!("skipped {what}; the statistics before it are restored ({in_a_row} in a row, at most {})", policy.max_skips_in_a_row));
    }
    Ok((model, skipped))
}

fn prefixed(prefix: &str, dict: StateDict, into: &mut StateDict) {
    for (key, t) in dict.iter() {
        into.insert(format!("{prefix}{key}"), t.clone());
    }
}

/// burn's generator is process-wide: seed it and draw every initial weight under one lock, so
/// runs in parallel threads (tests) still start from the same weights for the same seed.
fn initial_model<F: ModelFamily>(config: &F::Config, device: &Device, seed: u64) -> Result<F> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INIT.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    let model = F::init(config, device)?;
    let _ = float_tensors(&model, None); // materializes the lazily initialized parameters
    Ok(model)
}

fn drop_path_seed(seed: u64, step: u64, micro: usize) -> u64 {
    derived_rng(&[seed, step, micro as u64, 0xD809]).random()
}

struct Run<'a, F: ModelFamily> {
    config: &'a TrainConfig,
    data: &'a Datasets,
    dir: PathBuf,
    device: Device,
    model: F,
    /// The CPU runtime's trainer when it runs the steps: it then holds the current weights,
    /// statistics, counters and optimizer moments, and `model` is brought up to date from it
    /// before anything reads `model` (evaluation, checkpoints, re-calibration).
    cpu: Option<Box<CpuTrainer>>,
    optimizer: AdamW,
    ema: Option<Ema>,
    metrics: Metrics,
    position: Position,
    config_toml: String,
    last_checkpoint: Option<PathBuf>,
    /// The latest evaluation of the current weights and of their fused form.
    last_eval: Option<(EvalRow, Option<EvalRow>)>,
    /// How the fused deploy model is evaluated.
    fused_eval: FusedEval,
    /// The newest checkpoint known to be healthy and its step (see [`is_healthy`](Run::is_healthy)).
    healthy: Option<(PathBuf, u64)>,
    /// `position.skipped` at the last checkpoint: a skip since then makes the next one unhealthy.
    skipped_at_checkpoint: u64,
    skips_in_a_row: u64,
    skip_log: Vec<String>,
    /// Parameter and buffer keys in model order (input to head), for naming the first tensor
    /// that became non-finite.
    key_order: Vec<String>,
}

/// What one optimizer step came to.
enum StepOutcome {
    /// Loss and gradient norm (before clipping).
    Done(f64, f64),
    /// `what` ("the loss", "the gradient norm") was `value`; `detail` says where, as far as
    /// known.
    NonFinite { what: &'static str, value: f64, detail: String },
}

/// The training state before a step, restored when `on_nonfinite = "skip"` drops the step.
struct Snapshot {
    model: StateDict,
    optimizer: StateDict,
    optimizer_steps: u64,
    ema: Option<StateDict>,
}

/// A checkpoint is healthy when no step since the previous one was skipped and the last step's
/// loss is finite and at most this many times the mean loss of the last [`HEALTHY_WINDOW`] steps.
const HEALTHY_FACTOR: f64 = 2.0;
const HEALTHY_WINDOW: usize = 100;

fn first_non_finite<'a, 'b>(order: &'a [String], values: impl Fn(&str) -> Option<&'b [f32]>) -> (Option<&'a String>, usize) {
    let bad: Vec<&String> = order.iter().filter(|k| values(k).is_some_and(|v| v.iter().any(|x| !x.is_finite()))).collect();
    (bad.first().copied(), bad.len())
}

/// How the deploy model (norms folded away) is evaluated after each epoch: an independent check
/// of fusing, and of the CPU runtime against the burn forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FusedEval {
    Runtime,
    Burn,
    /// LayerNorm models have no deploy form.
    None,
}

/// How this model's fused form can be evaluated, and a note for the user when it is not on the
/// CPU runtime.
fn fused_eval_for<F: ModelFamily>(model: &F) -> Result<(FusedEval, Option<String>)> {
    if !model.image_config().folds() {
        return Ok((FusedEval::None, Some("no fused evaluation: LayerNorm models have no re-parameterized form".into())));
    }
    match CpuModel::from_deploy::<F>(&model.fuse()?) {
        Ok(_) => Ok((FusedEval::Runtime, None)),
        Err(e @ Error::Unsupported { .. }) => Ok((FusedEval::Burn, Some(format!("the fused model is evaluated with burn, not the CPU runtime: {e}")))),
        Err(e) => Err(e),
    }
}

impl<F: ModelFamily> Run<'_, F> {
    /// One optimizer step on the CPU trainer, as the burn path below takes it: per micro-batch
    /// forward (seeded drop-path, counters advancing on the first only), soft-target
    /// cross-entropy / accum, backward; then clipping, AdamW, the EMA. Returns the loss and the
    /// gradient norm before clipping.
    fn cpu_step(&mut self, micro_batches: &[Batch], classes: usize, lr: f64) -> Result<StepOutcome> {
        let accum = micro_batches.len();
        let step = self.position.step;
        let seed = self.config.run.seed;
        let cpu = self.cpu.as_mut().expect("the CPU trainer runs the steps");
        cpu.zero_grads();
        let mut loss_sum = 0.0;
        for (m, batch) in micro_batches.iter().enumerate() {
            let options = ForwardOptions { drop_path_seed: drop_path_seed(seed, step, m), advance_counters: m == 0 };
            cpu.set_input_size(batch.size)?;
            let logits = cpu.forward_with(&batch.images, batch.len(), options)?;
            let (loss, mut dlogits) = cross_entropy(&logits, &batch.targets, classes);
            let loss = loss / accum as f64;
            if !loss.is_finite() {
                return Ok(StepOutcome::NonFinite { what: "the loss", value: loss, detail: self.locate_non_finite(None, false) });
            }
            if accum > 1 {
                dlogits.iter_mut().for_each(|g| *g /= accum as f32);
            }
            cpu.backward(&dlogits)?;
            loss_sum += loss;
        }
        let grad_norm = cpu.clip_grads();
        if !grad_norm.is_finite() {
            return Ok(StepOutcome::NonFinite { what: "the gradient norm", value: grad_norm, detail: self.locate_non_finite(None, true) });
        }
        cpu.adamw(lr);
        if self.ema.is_some() {
            self.sync_model()?;
            self.ema.as_mut().expect("checked").update(&self.model);
        }
        Ok(StepOutcome::Done(loss_sum, grad_norm))
    }

    /// Where the state went non-finite, as far as it can be told after the fact: the first
    /// weight tensor (model order) holding NaN/∞, and with `gradients` the first gradient
    /// (`burn_grads` on the burn engine; the CPU trainer's own otherwise).
    fn locate_non_finite(&self, burn_grads: Option<&BTreeMap<String, Vec<f32>>>, gradients: bool) -> String {
        let weights = match &self.cpu {
            Some(cpu) => cpu.state(),
            None => collect_state(&self.model),
        };
        fn floats<'d>(dict: &'d StateDict, key: &str) -> Option<&'d [f32]> {
            match dict.get(key).ok().map(|t| &t.values) {
                Some(Values::F32(v)) => Some(v.as_slice()),
                _ => None,
            }
        }
        // Parameters first; then the BatchNorm statistics, which this step's forward updated: the
        // first non-finite one (model order) names the first norm whose input activations were
        // non-finite.
        let (params, buffers): (Vec<String>, Vec<String>) = self.key_order.iter().cloned().partition(|k| !crate::state::is_buffer_key(k));
        let (first, count) = first_non_finite(&params, |k| floats(&weights, k));
        let mut parts = vec![match first {
            Some(key) => format!("non-finite weights in {count} tensor(s), first `{key}`"),
            None => "the weights are finite".into(),
        }];
        if let (Some(key), _) = first_non_finite(&buffers, |k| floats(&weights, k)) {
            parts.push(format!("the first layer with non-finite activations: the norm of `{key}`"));
        } else if !gradients && first.is_none() {
            parts.push("an activation overflowed in the forward pass".into());
        }
        if gradients {
            let cpu_grads = match (&self.cpu, burn_grads) {
                (Some(cpu), None) => Some(cpu.gradients()),
                _ => None,
            };
            let (first, count) = match (burn_grads, &cpu_grads) {
                (Some(g), _) => first_non_finite(&self.key_order, |k| g.get(k).map(Vec::as_slice)),
                (None, Some(d)) => first_non_finite(&self.key_order, |k| floats(d, k)),
                (None, None) => (None, 0),
            };
            parts.push(match first {
                Some(key) => format!("non-finite gradients in {count} tensor(s), first (from the input) `{key}`"),
                None => "the gradients are finite (their norm overflowed)".into(),
            });
        }
        parts.join("; ")
    }

    /// The first BatchNorm statistic (model order) that is NaN or ∞, with its value: a step
    /// can end with a finite loss and overflowed statistics (a variance of squares past f32).
    fn non_finite_statistics(&self) -> Option<(String, f64)> {
        let state = match &self.cpu {
            Some(cpu) => cpu.state(),
            None => collect_state(&self.model),
        };
        self.key_order.iter().filter(|k| crate::state::is_buffer_key(k)).find_map(|k| match state.get(k).ok().map(|t| &t.values) {
            Some(Values::F32(v)) => v.iter().find(|x| !x.is_finite()).map(|&x| (k.clone(), f64::from(x))),
            _ => None,
        })
    }

    fn snapshot(&self) -> Snapshot {
        let (model, optimizer, optimizer_steps) = match &self.cpu {
            Some(cpu) => (cpu.state(), cpu.optimizer_state(), cpu.steps()),
            None => (collect_state(&self.model), self.optimizer.state(), self.optimizer.steps),
        };
        Snapshot { model, optimizer, optimizer_steps, ema: self.ema.as_ref().map(Ema::state) }
    }

    /// Puts the state of `snapshot` back, on whichever engine runs the steps: as a resume from a
    /// checkpoint does, so it is exact.
    fn restore_snapshot(&mut self, snapshot: &Snapshot) -> Result<()> {
        self.model = load_state(self.model.clone(), &snapshot.model, false)?.0;
        match &mut self.cpu {
            Some(cpu) => {
                **cpu = CpuTrainer::new(&self.model, self.config.optim.clone())?;
                cpu.load_optimizer_state(&snapshot.optimizer, snapshot.optimizer_steps)?;
            }
            None => self.optimizer.load_state(&snapshot.optimizer, snapshot.optimizer_steps)?,
        }
        if let (Some(ema), Some(state)) = (&mut self.ema, &snapshot.ema) {
            ema.load_state(state, &self.device.clone().without_autodiff())?;
        }
        Ok(())
    }

    /// See [`HEALTHY_FACTOR`].
    fn is_healthy(&self) -> bool {
        if self.position.skipped != self.skipped_at_checkpoint {
            return false;
        }
        let rows = &self.metrics.steps;
        if self.non_finite_statistics().is_some() {
            return false;
        }
        let Some(last) = rows.last() else { return true };
        let window = &rows[rows.len().saturating_sub(HEALTHY_WINDOW)..];
        let mean = window.iter().map(|r| r.loss).sum::<f64>() / window.len() as f64;
        last.loss.is_finite() && last.grad_norm.is_finite() && last.loss <= HEALTHY_FACTOR * mean
    }

    /// `model` := the CPU trainer's state, when it runs the steps.
    fn sync_model(&mut self) -> Result<()> {
        if let Some(cpu) = &self.cpu {
            self.model = cpu.apply_to(self.model.clone())?;
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<()> {
        self.sync_model()?;
        let mut dict = StateDict::new("checkpoint");
        prefixed("model.", collect_state(&self.model), &mut dict);
        let optimizer = match &self.cpu {
            Some(cpu) => cpu.optimizer_state(),
            None => self.optimizer.state(),
        };
        prefixed("", optimizer, &mut dict);
        if let Some(ema) = &self.ema {
            prefixed("", ema.state(), &mut dict);
        }
        // The rows up to this step reach the disk before the checkpoint that covers them.
        self.metrics.sync()?;
        let path = checkpoint::save(&self.dir, dict, self.position, &self.config_toml, self.config.checkpoint.keep)?;
        if self.is_healthy() {
            self.healthy = Some((checkpoint::mark_healthy(&self.dir, &path)?, self.position.step));
        }
        self.skipped_at_checkpoint = self.position.skipped;
        self.last_checkpoint = Some(path);
        self.metrics.plot(&self.dir.join("training.png"))
    }

    /// Refuses to continue a run stored with another config (`stored`, read from `origin`),
    /// except for the keys of [`TrainConfig::RESUME_OVERRIDES`]: a warning per changed one.
    fn check_stored_config(&self, stored: &str, origin: &Path) -> Result<Vec<String>> {
        // Compared as configs, not as text: a run written before a field existed reads it as its
        // default.
        let stored = TrainConfig::from_toml(stored, &origin.display().to_string())?;
        self.config.resume_changes(&stored).map_err(|refused| {
            Error::Config(format!(
                "{} was written with another training config ({}); resume with that config (it is stored in the run folder); a resume may change only {}",
                origin.display(),
                refused.join(", "),
                TrainConfig::RESUME_OVERRIDES.join(", ")
            ))
        })
    }

    /// Continues the run's `metrics.csv` from `position`: rows after it (written after the
    /// checkpoint, before the run stopped) are dropped, as the run redoes them.
    fn continue_metrics(&mut self, position: Position) -> Result<()> {
        let csv = self.dir.join("metrics.csv");
        if csv.exists() {
            let text = std::fs::read_to_string(&csv).map_err(|source| Error::Io { path: csv.clone(), source })?;
            self.metrics = Metrics::from_csv(&text, &csv)?;
            self.metrics.truncate_after(position.step, position.epoch);
        }
        self.metrics.open_log(&self.dir)
    }

    fn restore(&mut self, path: &Path) -> Result<Vec<String>> {
        let (dict, position, stored_config) = checkpoint::load(path)?;
        let warnings = self.check_stored_config(&stored_config, path)?;
        let model = self.model.clone();
        self.model = load_state(model, &dict.subset("model"), false)?.0;
        let inner = self.device.clone().without_autodiff();
        self.optimizer.load_state(&dict, position.optimizer_steps())?;
        if let Some(cpu) = &mut self.cpu {
            **cpu = CpuTrainer::new(&self.model, self.config.optim.clone())?;
            cpu.load_optimizer_state(&dict, position.optimizer_steps())?;
        }
        if let Some(ema) = &mut self.ema {
            ema.load_state(&dict, &inner)?;
        }
        self.continue_metrics(position)?;
        self.position = position;
        self.skipped_at_checkpoint = position.skipped;
        self.last_checkpoint = Some(path.to_path_buf());
        let healthy = checkpoint::healthy_path(&self.dir);
        self.healthy = checkpoint::position_of(&healthy).ok().map(|p| (healthy, p.step));
        Ok(warnings)
    }

    /// The error of a non-finite step `step` (1-based); `skips`: the run stopped after that many
    /// skipped steps in a row.
    fn nan_error(&self, step: u64, what: &str, value: f64, detail: &str, lr: f64, lambda: Option<f64>, skips: Option<u64>) -> Error {
        let mut config = self.model.config().clone();
        let t = match F::prepbn_schedule(&mut config) {
            Some(schedule) => format!(
                "; or the PRepBN decay is too short (prepbn.steps T = {}, λ = {}): LayerNorm removed too early diverges, try T ≈ 0.8 × the run",
                schedule.total,
                lambda.map_or("-".into(), |l| format!("{l:.4}"))
            ),
            None => String::new(),
        };
        let healthy = match &self.healthy {
            Some((path, at)) => {
                let newer = self.last_checkpoint.as_ref().filter(|_| *at != self.position.step);
                format!(
                    "Last healthy checkpoint: {} (step {at}){}",
                    path.display(),
                    newer.map_or(String::new(), |p| format!("; the newer {} may already hold diverging weights", p.display()))
                )
            }
            None => "No healthy checkpoint yet".into(),
        };
        let stopped = skips.map_or(String::new(), |k| format!("{k} steps in a row were skipped (run.max_skips_in_a_row = {k}); "));
        Error::Training(format!(
            "{stopped}{what} is {value} at step {step} (epoch {}): {detail}. {healthy}. Likely cause: the learning rate is too high (lr {lr:.3e} at this step, optim.lr = {}){t}",
            self.position.epoch + 1,
            self.config.optim.lr,
        ))
    }

    /// Evaluates the model, its fused form and its EMA; `record` puts the rows into the metrics
    /// (not for the evaluation of a resumed run that had nothing left to do: its rows are there).
    fn evaluate_all(&mut self, label: &str, record: bool) -> Result<EvalRow> {
        self.sync_model()?;
        let cfg = self.config;
        let mut rows = Vec::new();
        let mut row = evaluate(&self.model, &self.data.eval, &cfg.augment, cfg.run.eval_batch_size);
        (row.step, row.epoch, row.model) = (self.position.step, self.position.epoch, label.into());
        rows.push(row.clone());
        let fused = match self.fused_eval {
            FusedEval::None => None,
            FusedEval::Runtime => Some(evaluate_runtime(&CpuModel::from_deploy::<F>(&self.model.fuse()?)?, &self.data.eval, &cfg.augment, cfg.run.eval_batch_size)),
            FusedEval::Burn => Some(evaluate(&self.model.fuse()?, &self.data.eval, &cfg.augment, cfg.run.eval_batch_size)),
        }
        .map(|mut f| {
            (f.step, f.epoch, f.model) = (self.position.step, self.position.epoch, "fused".into());
            f
        });
        rows.extend(fused.clone());
        if let Some(ema) = &self.ema {
            let averaged = ema.apply(self.model.clone());
            let mut e = evaluate(&averaged, &self.data.eval, &cfg.augment, cfg.run.eval_batch_size);
            (e.step, e.epoch, e.model) = (self.position.step, self.position.epoch, "ema".into());
            rows.push(e);
        }
        if record {
            for r in rows {
                self.metrics.record_eval(r)?;
            }
        }
        self.last_eval = Some((row.clone(), fused));
        Ok(row)
    }
}

/// The CPU runtime's trainer for this run, when `run.engine` picks it (see [`TrainEngine`]), and
/// a note saying why not when `auto` falls back to burn. It has to take every image side of
/// `sampler` (multi-scale batches).
fn cpu_trainer<F: ModelFamily>(config: &TrainConfig, model: &F, sampler: &BatchSampler) -> Result<(Option<CpuTrainer>, Option<String>)> {
    let trainer = || -> Result<CpuTrainer> {
        let mut trainer = CpuTrainer::new(model, config.optim.clone())?;
        for scale in sampler.scales() {
            trainer.set_input_size(scale.size).map_err(|e| match e {
                Error::Unsupported { what, path } => Error::Unsupported { what: format!("multi-scale batches of {0}×{0} images ({what})", scale.size), path },
                other => other,
            })?;
        }
        trainer.set_input_size(model.image_config().img_size())?;
        Ok(trainer)
    };
    match config.run.engine {
        TrainEngine::Burn => Ok((None, None)),
        TrainEngine::Auto => match trainer() {
            Ok(trainer) => Ok((Some(trainer), None)),
            Err(e @ Error::Unsupported { .. }) => Ok((None, Some(format!("training steps run on burn autodiff: {e}")))),
            Err(e) => Err(e),
        },
        TrainEngine::Cpu => Ok((Some(trainer()?), None)),
    }
}

/// Trains `config` on `data` into `options.run_dir` (or continues the run there).
pub fn train(config: &TrainConfig, data: &Datasets, options: &TrainOptions) -> Result<Summary> {
    let started = Instant::now();
    let train_len = data.train.len();
    let resolved = config.resolve(train_len)?;
    let model_config = resolved.model.expect("resolve gives the model");
    let image = model_config.image();
    if let [h, w] = image.input_size()
        && h != w
    {
        return Err(Error::Config(format!("training and evaluation take square images; the model's input is {h}×{w} (set model.img_size to one size)")));
    }
    if data.train.channels != image.in_chans() || data.eval.channels != image.in_chans() {
        return Err(Error::Config(format!("the data has {} channels, the model expects {}", data.train.channels, image.in_chans())));
    }
    if data.train.classes.len() != image.num_classes() {
        return Err(Error::Config(format!("the data has {} classes, the model has {} outputs (model.num_classes)", data.train.classes.len(), image.num_classes())));
    }
    crate::with_family!(model_config, |Family, c| train_family::<Family>(config, data, options, &c, resolved.warnings, started))
}

/// Plain progress lines where the bar is hidden: every this many steps, or sooner when this
/// many seconds passed since the last one.
const PLAIN_EVERY_STEPS: u64 = 50;
const PLAIN_EVERY_SECONDS: f64 = 10.0;

/// Removes what writes killed between create and rename left in the run folder and its
/// checkpoints (the folder is locked: no write of another run is under way).
fn remove_leftovers(dir: &Path) {
    crate::files::remove_temp_files(dir);
    crate::files::remove_temp_files(&checkpoint::checkpoint_dir(dir));
}

/// [`train`] for one family's model.
fn train_family<F: ModelFamily>(config: &TrainConfig, data: &Datasets, options: &TrainOptions, model_config: &F::Config, mut warnings: Vec<String>, started: Instant) -> Result<Summary> {
    let train_len = data.train.len();
    let dir = options.run_dir.clone();
    // Held until this function returns (or the process ends, killed or not): a second training on
    // the folder stops here, naming the holder.
    let _lock = crate::files::RunLock::acquire(&dir)?;
    let holds_run = std::fs::read_dir(&dir).map(|d| d.flatten().any(|e| e.file_name() != crate::files::LOCK_FILE)).unwrap_or(false);
    if !options.resume && holds_run {
        return Err(Error::Output { path: dir.clone(), reason: "already holds a run; not overwriting it (use --resume, or another --out)".into() });
    }
    remove_leftovers(&dir);
    let device = Device::flex().autodiff();
    let model: F = initial_model::<F>(model_config, &device, config.run.seed)?;
    let ranks = param_ranks(&model);
    let ema = config.run.ema_decay.map(|d| Ema::new(d, &model));
    let epoch_steps = config.epoch_steps(train_len, model_config.img_size());
    let (cpu, engine_note) = cpu_trainer(config, &model, epoch_steps.sampler())?;
    let cpu = cpu.map(Box::new);
    let engine = if cpu.is_some() { "cpu" } else { "burn" };
    let (fused_eval, fused_note) = fused_eval_for(&model)?;
    let key_order = keys_in_order(&model);
    let notes: Vec<String> = engine_note.into_iter().chain(fused_note).collect();
    let mut run = Run {
        config,
        data,
        dir: dir.clone(),
        device: device.clone(),
        cpu,
        model,
        optimizer: AdamW::new(config.optim.clone()),
        ema,
        metrics: Metrics::default(),
        position: Position::default(),
        config_toml: config.to_toml(),
        last_checkpoint: None,
        last_eval: None,
        fused_eval,
        healthy: None,
        skipped_at_checkpoint: 0,
        skips_in_a_row: 0,
        skip_log: Vec::new(),
        key_order,
    };
    let stored_config = dir.join("config.toml");
    let resolve_warnings = warnings.len();
    match (options.resume, checkpoint::latest(&dir)) {
        (true, Some(latest)) => warnings.extend(run.restore(&latest)?),
        // Stopped before its first checkpoint: it starts over, with the config it was started with.
        (true, None) if stored_config.exists() => {
            let text = std::fs::read_to_string(&stored_config).map_err(|source| Error::Io { path: stored_config.clone(), source })?;
            warnings.extend(run.check_stored_config(&text, &stored_config)?);
            run.continue_metrics(Position::default())?;
        }
        (true, None) => {
            return Err(Error::Config(format!(
                "nothing to resume in {}: no checkpoint under {} and no config.toml",
                dir.display(),
                checkpoint::checkpoint_dir(&dir).display()
            )));
        }
        (false, _) => {
            crate::files::write_atomic(&stored_config, run.config_toml.as_bytes())?;
            run.metrics.open_log(&dir)?;
        }
    }
    // A resume with overrides goes on with the new config: the stored one says so from here.
    if options.resume && !warnings.is_empty() && stored_config.exists() {
        crate::files::write_atomic(&stored_config, run.config_toml.as_bytes())?;
    }
    let skip_policy = config.run.on_nonfinite == OnNonFinite::Skip;

    let train_epochs = config.run.epochs + config.schedule.cooldown_epochs;
    let total_steps = config.run.max_steps.unwrap_or(u64::MAX).min(config.total_steps(&epoch_steps));
    let schedule = config.lr_schedule(&epoch_steps);
    let (accum, size) = (config.run.accum_steps, model_config.img_size());
    let (channels, classes) = (data.train.channels, model_config.num_classes());
    let augment = Arc::new(config.augment.clone());
    let mix = Arc::new(config.mix.clone());
    let recal_epochs = config.run.recalibrate_epochs;

    let bar = if options.progress { ProgressBar::new(total_steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{bar:28.cyan/blue} {pos}/{len} steps [{elapsed_precise} < {eta_precise}] {msg}")
            .expect("valid template"),
    );
    bar.set_position(run.position.step);
    // Lines above the bar; printed plainly where the bar is hidden (output not a terminal), so a
    // log file still gets them.
    let say = |line: String| match (options.progress, bar.is_hidden()) {
        (false, _) => {}
        (true, true) => println!("{line}"),
        (true, false) => bar.println(line),
    };
    notes.iter().for_each(|n| say(format!("note: {n}")));
    warnings[resolve_warnings..].iter().for_each(|w| say(format!("warning: {w}")));
    let mut last_plain = Instant::now();

    while run.position.epoch < train_epochs && run.position.step < total_steps {
        let epoch = run.position.epoch;
        let steps_per_epoch = epoch_steps.of(epoch);
        let mut loader = Loader::train(TrainEpoch {
            set: data.train.clone(),
            augment: augment.clone(),
            mix: Some(mix.clone()),
            sampler: epoch_steps.sampler().clone(),
            seed: config.run.seed,
            epoch,
            skip: run.position.step_in_epoch as usize * accum,
        });
        while run.position.step_in_epoch < steps_per_epoch && run.position.step < total_steps {
            let step_started = Instant::now();
            let lr = schedule.at(run.position.step);
            let lambda = match &run.cpu {
                Some(cpu) => cpu.prepbn_phase(),
                None => run.model.prepbn_phase(),
            }
            .map(|p| p.lambda() as f64);
            // The step's batches are taken before it runs: a skipped step drops all of them.
            let micro_batches: Vec<Batch> = (0..accum).map(|_| loader.next().expect("the loader yields every batch of the epoch")).collect();
            let images = micro_batches.iter().map(Batch::len).sum::<usize>();
            let snapshot = skip_policy.then(|| run.snapshot());
            let outcome = if run.cpu.is_some() {
                run.cpu_step(&micro_batches, classes, lr)?
            } else {
                'step: {
                let mut grads: BTreeMap<String, Vec<f32>> = BTreeMap::new();
                let mut loss_sum = 0.0;
                for (m, batch) in micro_batches.into_iter().enumerate() {
                    if accum > 1 {
                        run.model = set_counter_advance(run.model.clone(), m == 0);
                    }
                    let (n, side) = (batch.len(), batch.size);
                    let x = Tensor::<4>::from_data(TensorData::new(batch.images, [n, channels, side, side]), &device);
                    let logits = drop_path::with_seed(drop_path_seed(config.run.seed, run.position.step, m), || run.model.logits(x));
                    // The loss and ∂loss/∂logits of the shared cross-entropy; autodiff takes it
                    // from there through Σ logits ⊙ ∂loss/∂logits.
                    let (loss, mut dlogits) = cross_entropy(&host_f32(logits.clone()), &batch.targets, classes);
                    let loss = loss / accum as f64;
                    if !loss.is_finite() {
                        break 'step StepOutcome::NonFinite { what: "the loss", value: loss, detail: run.locate_non_finite(None, false) };
                    }
                    if accum > 1 {
                        dlogits.iter_mut().for_each(|g| *g /= accum as f32);
                    }
                    let dlogits = Tensor::<2>::from_data(TensorData::new(dlogits, [n, classes]), &device);
                    let backward = logits.mul(dlogits).sum().backward();
                    loss_sum += loss;
                    for (key, g) in float_tensors(&run.model, Some(&backward)) {
                        let g = host_f32(g);
                        match grads.get_mut(&key) {
                            Some(sum) => sum.iter_mut().zip(&g).for_each(|(s, g)| *s += g),
                            None => {
                                grads.insert(key, g);
                            }
                        }
                    }
                }
                let grad_norm = run.optimizer.clip(&mut grads);
                if !grad_norm.is_finite() {
                    break 'step StepOutcome::NonFinite { what: "the gradient norm", value: grad_norm, detail: run.locate_non_finite(Some(&grads), true) };
                }
                run.model = run.optimizer.step(run.model.clone(), &grads, &ranks, lr);
                if let Some(ema) = &mut run.ema {
                    ema.update(&run.model);
                }
                StepOutcome::Done(loss_sum, grad_norm)
                }
            };
            let step = run.position.step + 1;
            // Under "skip", a step that left non-finite statistics behind is dropped as well.
            let outcome = match outcome {
                StepOutcome::Done(..) if skip_policy => match run.non_finite_statistics() {
                    Some((key, value)) => StepOutcome::NonFinite {
                        what: "a BatchNorm statistic",
                        value,
                        detail: format!("the first layer with non-finite activations: the norm of `{key}`"),
                    },
                    None => outcome,
                },
                _ => outcome,
            };
            match outcome {
                StepOutcome::Done(loss_sum, grad_norm) => {
                    run.skips_in_a_row = 0;
                    run.position.step += 1;
                    run.position.step_in_epoch += 1;
                    let images_per_s = images as f64 / step_started.elapsed().as_secs_f64();
                    run.metrics.record_step(StepRow { step, epoch, loss: loss_sum, lr, lambda, grad_norm, images_per_s })?;
                    let status = format!("epoch {} loss {loss_sum:.4} lr {lr:.2e} λ {} {images_per_s:.0} img/s", epoch + 1, lambda.map_or("-".into(), |l| format!("{l:.3}")));
                    // Where the bar is hidden (a log file, CI), a plain line now and then instead.
                    if options.progress && bar.is_hidden() && (step.is_multiple_of(PLAIN_EVERY_STEPS) || last_plain.elapsed().as_secs_f64() >= PLAIN_EVERY_SECONDS) {
                        println!("step {step}/{total_steps}: {status}");
                        last_plain = Instant::now();
                    }
                    bar.set_message(status);
                }
                StepOutcome::NonFinite { what, value, detail } => {
                    let Some(snapshot) = snapshot else {
                        return Err(run.nan_error(step, what, value, &detail, lr, lambda, None));
                    };
                    run.restore_snapshot(&snapshot)?;
                    run.skips_in_a_row += 1;
                    if run.skips_in_a_row >= config.run.max_skips_in_a_row {
                        return Err(run.nan_error(step, what, value, &detail, lr, lambda, Some(run.skips_in_a_row)));
                    }
                    // The step counts (its batches are consumed, the schedule moves on); no
                    // metrics row: nothing was trained.
                    run.position.step += 1;
                    run.position.step_in_epoch += 1;
                    run.position.skipped += 1;
                    let line = format!(
                        "skipped step {step} (epoch {}): {what} is {value}: {detail}; the state before it is restored ({} in a row, at most {})",
                        epoch + 1,
                        run.skips_in_a_row,
                        config.run.max_skips_in_a_row
                    );
                    say(format!("warning: {line}"));
                    run.skip_log.push(line);
                }
            }
            bar.set_position(run.position.step);
            if config.checkpoint.every_steps.is_some_and(|n| run.position.step.is_multiple_of(n)) && run.position.step_in_epoch < steps_per_epoch {
                run.checkpoint()?;
            }
            if options.interrupt_after == Some(run.position.step) {
                return Err(Error::Training(format!("interrupted after step {}", run.position.step)));
            }
        }
        drop(loader);
        if run.position.step_in_epoch == steps_per_epoch {
            run.position.epoch += 1;
            run.position.step_in_epoch = 0;
        }
        let row = run.evaluate_all("model", true)?;
        say(format!(
            "epoch {:>3}: top-1 {:.2} %, top-5 {:.2} %, eval loss {:.4}, step {}",
            epoch + 1,
            row.top1,
            row.top5,
            row.loss,
            run.position.step
        ));
        run.checkpoint()?;
    }
    bar.finish_and_clear();
    // Re-calibration and the final save work on the burn model from here.
    run.sync_model()?;
    run.cpu = None;

    // BatchNorm re-calibration (SPEC §2.7): frozen parameters, statistics re-estimated with the
    // training augmentation and no mixing.
    let finished_training = run.position.epoch >= train_epochs;
    if finished_training && recal_epochs > 0 && run.position.epoch < train_epochs + recal_epochs {
        let mut model = recalibration_mode(run.model.clone().no_grad());
        while run.position.epoch < train_epochs + recal_epochs {
            // At the evaluation size, as the statistics serve evaluation.
            let loader = Loader::train(TrainEpoch {
                set: data.train.clone(),
                augment: augment.clone(),
                mix: None,
                sampler: BatchSampler::fixed(size, config.run.batch_size),
                seed: config.run.seed,
                epoch: run.position.epoch,
                skip: 0,
            });
            let recal_epoch = run.position.epoch - train_epochs + 1;
            let policy = RecalibrationPolicy { skip: skip_policy, max_skips_in_a_row: config.run.max_skips_in_a_row, key_order: &run.key_order };
            let (recalibrated, skipped) = recalibrate_epoch(model, loader, channels, &device, &policy).map_err(|failure| {
                let trained = match &run.last_checkpoint {
                    Some(path) => format!("the trained model (statistics not re-calibrated) is in {}", path.display()),
                    None => "no checkpoint holds the trained model".into(),
                };
                Error::Training(format!(
                    "BN re-calibration epoch {recal_epoch}/{recal_epochs}: {failure}; {trained}. Set run.recalibrate_epochs = 0 to keep the trained statistics{}",
                    if skip_policy { "" } else { ", or run.on_nonfinite = \"skip\" to drop such batches" }
                ))
            })?;
            model = recalibrated;
            for line in skipped {
                let line = format!("BN re-calibration epoch {recal_epoch}: {line}");
                if options.progress {
                    println!("warning: {line}");
                }
                run.skip_log.push(line);
            }
            run.position.epoch += 1;
            run.model = model.clone();
            let row = run.evaluate_all("recalibrated", true)?;
            if options.progress {
                println!("BN re-calibration epoch {}/{recal_epochs}: top-1 {:.2} %, top-5 {:.2} %", run.position.epoch - train_epochs, row.top1, row.top5);
            }
            run.checkpoint()?;
        }
    }

    // Every training or re-calibration pass ends with an evaluation of the weights it left; only a
    // resumed run that had nothing left to do evaluates here.
    let (final_eval, fused_eval) = match run.last_eval.take() {
        Some(evals) => evals,
        None => {
            run.evaluate_all("final", false)?;
            run.last_eval.take().expect("evaluate_all records its evaluation")
        }
    };
    let model_path = dir.join("model.safetensors");
    let preprocess = Preprocess {
        mean: config.augment.mean.clone(),
        std: config.augment.std.clone(),
        eval_crop: config.augment.eval_crop,
        classes: data.train.classes.clone(),
    };
    save_model(&model_path, &run.model, &preprocess, true)?;
    run.metrics.sync()?;
    run.metrics.plot(&dir.join("training.png"))?;
    remove_leftovers(&dir);
    Ok(Summary { run_dir: dir, steps: run.position.step, seconds: started.elapsed().as_secs_f64(), warnings, final_eval, fused_eval, model_path, engine, notes, skipped: run.skip_log })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::VitConfig;
    use crate::state::{StateTensor, map_float_tensors};

    /// A tiny RepBN ViT in re-calibration mode, its keys, and two batches of normal images.
    fn recalibration_case(poisoned: bool) -> (crate::models::VisionTransformer, Vec<String>, Vec<Batch>) {
        let device = Device::flex();
        let config = VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 2, num_heads: 2, num_classes: 3, ..VitConfig::slab_deit_tiny() };
        let mut model = burn::module::Module::no_grad(config.init(&device.clone().autodiff()).unwrap());
        if poisoned {
            // Activations beyond f32 from the first layer on: every norm's statistics overflow.
            model = map_float_tensors(model, |key, t| key.starts_with("patch_embed.proj.weight").then(|| t.mul_scalar(1e30)));
        }
        let keys = keys_in_order(&model);
        (recalibration_mode(model), keys, batches())
    }

    fn batches() -> Vec<Batch> {
        let device = Device::flex();
        (0..2u64)
            .map(|i| Batch { images: host_f32(crate::testing::standard_normal([4, 3, 16, 16], 40 + i, &device)), size: 16, targets: Vec::new(), labels: vec![0; 4] })
            .collect()
    }

    fn statistics(model: &impl burn::module::Module) -> Vec<(String, StateTensor)> {
        collect_state(model).iter().filter(|(k, _)| crate::state::is_buffer_key(k)).map(|(k, t)| (k.clone(), t.clone())).collect()
    }

    #[test]
    fn recalibration_stops_on_non_finite_statistics_or_skips_the_batch_restoring_them() {
        let device = Device::flex();
        let (model, keys, batches) = recalibration_case(false);
        let before = statistics(&model);
        let policy = RecalibrationPolicy { skip: false, max_skips_in_a_row: 5, key_order: &keys };
        let (recalibrated, skipped) = recalibrate_epoch(model, batches, 3, &device, &policy).unwrap();
        assert!(skipped.is_empty());
        assert_ne!(statistics(&recalibrated), before, "the statistics were not re-estimated");

        // "stop": the first batch, naming the first norm in model order.
        let (model, keys, batches) = recalibration_case(true);
        let first_norm = keys.iter().find(|k| crate::state::is_buffer_key(k)).unwrap().rsplit_once('.').unwrap().0.to_string();
        let policy = RecalibrationPolicy { skip: false, max_skips_in_a_row: 5, key_order: &keys };
        let err = recalibrate_epoch(model, batches, 3, &device, &policy).err().unwrap();
        assert!(err.starts_with(&format!("batch 1 left `{first_norm}.running_")), "{err}");

        // "skip": both batches dropped, the statistics as before; with a streak of 2 allowed, stopped.
        let (model, keys, batches) = recalibration_case(true);
        let before = statistics(&model);
        let policy = RecalibrationPolicy { skip: true, max_skips_in_a_row: 3, key_order: &keys };
        let (kept, skipped) = recalibrate_epoch(model, batches, 3, &device, &policy).unwrap();
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped[1].starts_with("skipped batch 2 left `") && skipped[1].ends_with("(2 in a row, at most 3)"), "{skipped:?}");
        assert_eq!(statistics(&kept), before);
        let (model, keys, batches) = recalibration_case(true);
        let policy = RecalibrationPolicy { skip: true, max_skips_in_a_row: 2, key_order: &keys };
        let err = recalibrate_epoch(model, batches, 3, &device, &policy).err().unwrap();
        assert!(err.starts_with("2 batches in a row were skipped (run.max_skips_in_a_row = 2); the last: batch 2 left"), "{err}");
    }
}
