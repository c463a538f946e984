//! Training on a small real subset of Fashion-MNIST: the loss falls, the logged schedules are
//! the schedule functions, resume is bit-exact, and bad input stops with a clear error.
//!
//! The data comes from the project's own fetch (Debian package, sha256-checked) into
//! `$SLABFORMER_DATA` (default `data/fashion-mnist` in the repository).

use std::path::PathBuf;

use slabformer::data::fetch::fetch_fashion_mnist;
use slabformer::nn::attention::AttentionKind;
use slabformer::nn::schedule::{Decay, PrepbnSchedule};
use slabformer::data::augment::AugmentConfig;
use slabformer::data::sampler::MultiScaleConfig;
use slabformer::models::mobilevit::StageConfig;
use slabformer::train::config::{ModelSpec, RunConfig, TrainConfig, TrainEngine};
use slabformer::train::metrics::Metrics;
use slabformer::train::optim::LrSchedule;
use slabformer::train::{TrainOptions, load_datasets, train};

fn fashion_root() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = match std::env::var_os("SLABFORMER_DATA") {
        Some(p) => root.join(p),
        None => root.join("data/fashion-mnist"),
    };
    fetch_fashion_mnist(&dir).unwrap_or_else(|e| panic!("Fashion-MNIST is needed for this test and could not be fetched: {e}"));
    dir
}

/// A tiny SLAB-DeiT on 20 images per class, batch 20: 10 steps per epoch.
fn small_config() -> TrainConfig {
    let mut c = TrainConfig::fashion_slab();
    c.data.root = fashion_root();
    c.data.train_per_class = Some(20);
    c.data.eval_per_class = Some(10);
    c.model.set("embed_dim", 16);
    c.model.set("depth", 2);
    c.model.set("num_heads", 2);
    c.run.batch_size = 20;
    c.run.epochs = 3;
    c.run.recalibrate_epochs = 1;
    c.run.eval_batch_size = 50;
    c.optim.lr = 0.12; // 4.7e-3 after the batch/512 scaling
    c.schedule.warmup_epochs = 0.3;
    c
}

fn options(dir: &std::path::Path) -> TrainOptions {
    TrainOptions { run_dir: dir.to_path_buf(), resume: false, progress: false, interrupt_after: None }
}

fn metrics(dir: &std::path::Path) -> Metrics {
    let path = dir.join("metrics.csv");
    Metrics::from_csv(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

#[test]
fn loss_falls_and_logged_schedules_are_the_schedule_functions() {
    let config = small_config();
    let data = load_datasets(&config).unwrap();
    assert_eq!((data.train.len(), data.eval.len()), (200, 100));
    let run = tempfile::tempdir().unwrap();
    let summary = train(&config, &data, &options(run.path())).unwrap();
    assert_eq!(summary.steps, 30);
    assert_eq!(summary.engine, "cpu", "run.engine = auto picks the CPU trainer for this run");
    let m = metrics(run.path());
    assert_eq!(m.steps.len(), 30);
    let first: f64 = m.steps[..5].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    let last: f64 = m.steps[25..].iter().map(|r| r.loss).sum::<f64>() / 5.0;
    assert!(last < first - 0.1, "loss did not fall: {first:.3} → {last:.3}");

    // λ and lr as logged equal the closed forms (T = 0.8 × 30 = 24 steps).
    let schedule = PrepbnSchedule { warm: 0, total: 24, r0: 1.0, decay: Decay::Linear };
    let lr = LrSchedule::new(&config.optim, &config.schedule, config.run.batch_size, 10, config.run.epochs);
    for row in &m.steps {
        let t = row.step - 1;
        assert!((row.lambda.unwrap() - schedule.lambda(t) as f64).abs() < 1e-6, "λ at step {t}");
        // metrics.csv keeps 7 significant digits of the rate.
        assert!((row.lr - lr.at(t)).abs() <= 1e-6 * lr.at(t), "lr at step {t}: {} vs {}", row.lr, lr.at(t));
    }
    // Evaluations each epoch plus the re-calibration epoch, each also of the fused deploy model,
    // which agrees with the model it was folded from (at most one of 100 images differs).
    let labels: Vec<&str> = m.evals.iter().map(|e| e.model.as_str()).collect();
    assert_eq!(labels, vec!["model", "fused", "model", "fused", "model", "fused", "recalibrated", "fused"]);
    for pair in m.evals.chunks(2) {
        assert!((pair[0].top1 - pair[1].top1).abs() <= 1.0, "{pair:?}");
    }
    let fused = summary.fused_eval.as_ref().expect("a PRepBN model fuses");
    assert!((fused.top1 - summary.final_eval.top1).abs() <= 1.0);
    assert!(run.path().join("training.png").exists());
    assert!(run.path().join("model.safetensors").exists());
    // A finished run folder is never overwritten.
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("not overwriting"), "{err}");
}

/// Trains `config` straight through and again interrupted after step 7 then resumed: every
/// parameter, buffer and logged loss must be bit-for-bit equal. Returns the engine that ran and
/// the losses of the straight run.
fn assert_resume_is_exact(config: &TrainConfig) -> (&'static str, Vec<f64>) {
    assert_resume_after_is_exact(config, 7)
}

/// [`assert_resume_is_exact`], interrupted after step `interrupt`.
fn assert_resume_after_is_exact(config: &TrainConfig, interrupt: u64) -> (&'static str, Vec<f64>) {
    let data = load_datasets(config).unwrap();
    let straight = tempfile::tempdir().unwrap();
    let engine = train(config, &data, &options(straight.path())).unwrap().engine;

    let resumed = tempfile::tempdir().unwrap();
    let interrupted = TrainOptions { interrupt_after: Some(interrupt), ..options(resumed.path()) };
    let err = train(config, &data, &interrupted).unwrap_err().to_string();
    assert!(err.contains(&format!("interrupted after step {interrupt}")), "{err}");
    // Beyond the resume overrides (lr, clip_grad, epochs, …), another config is refused.
    let mut other = config.clone();
    other.optim.weight_decay *= 2.0;
    let err = train(&other, &data, &TrainOptions { resume: true, ..options(resumed.path()) }).unwrap_err().to_string();
    assert!(err.contains("another training config") && err.contains("optim.weight_decay"), "{err}");
    train(config, &data, &TrainOptions { resume: true, ..options(resumed.path()) }).unwrap();

    // Every parameter and buffer bit for bit (safetensors orders its metadata map freely, so the
    // files themselves are compared by content).
    let read = |dir: &std::path::Path| slabformer::state::StateDict::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let (a, b) = (read(straight.path()), read(resumed.path()));
    assert_eq!(a.len(), b.len());
    for (key, t) in a.iter() {
        assert_eq!(b.get(key).unwrap(), t, "`{key}` differs between the straight and the resumed run");
    }
    assert_eq!(a.metadata, b.metadata);
    let (ma, mb) = (metrics(straight.path()), metrics(resumed.path()));
    let losses: Vec<f64> = ma.steps.iter().map(|r| r.loss).collect();
    assert_eq!(losses, mb.steps.iter().map(|r| r.loss).collect::<Vec<_>>());
    (engine, losses)
}

/// Stochastic depth, mixing, accumulation, the EMA and mid-epoch checkpoints.
fn everything_config(engine: TrainEngine) -> TrainConfig {
    let mut config = small_config();
    config.model.set("drop_path_rate", 0.1);
    config.mix.mixup_alpha = 0.8;
    config.mix.cutmix_alpha = 1.0;
    config.run.accum_steps = 2;
    config.run.ema_decay = Some(0.9);
    config.run.epochs = 2;
    config.run.engine = engine;
    config.checkpoint.every_steps = Some(7);
    config
}

#[test]
fn interrupted_and_resumed_run_equals_the_straight_run_bit_for_bit() {
    assert_eq!(assert_resume_is_exact(&everything_config(TrainEngine::Burn)).0, "burn");
}

#[test]
fn interrupted_and_resumed_cpu_trainer_run_equals_the_straight_run_bit_for_bit() {
    // The CPU trainer's weights, statistics, counters and AdamW moments go through the
    // checkpoint and come back exactly.
    assert_eq!(assert_resume_is_exact(&everything_config(TrainEngine::Cpu)).0, "cpu");
}

#[test]
fn auto_takes_the_fast_path_for_every_deit_family_kind_and_says_why_not_otherwise() {
    // FLatten (LayerNorm: no fused evaluation) and ReLU/L with qk-norm run on the CPU trainer.
    let mut config = small_config();
    config.run.epochs = 1;
    config.run.recalibrate_epochs = 0;
    config.prepbn.steps = None;
    let data = load_datasets(&config).unwrap();
    for preset in ["flatten_deit_tiny", "relu_vit_tiny"] {
        config.model.preset = preset.into();
        let run = tempfile::tempdir().unwrap();
        let summary = train(&config, &data, &options(run.path())).unwrap();
        assert_eq!(summary.engine, "cpu", "{preset}");
        assert!(summary.notes.iter().all(|n| !n.contains("burn autodiff")), "{preset}: {:?}", summary.notes);
        assert!(summary.notes.iter().any(|n| n.contains("no fused evaluation")), "{preset}: {:?}", summary.notes);
    }
    // A focusing power above 6 (normalized by the row maximum) is not on the fast path: `cpu`
    // refuses it by name, `auto` trains on burn and says why.
    config.model.preset = "flatten_deit_tiny".into();
    config.model.set("attention", toml::Value::try_from(AttentionKind::Focused { power: 8.0, kernel_size: 3 }).unwrap());
    config.run.engine = TrainEngine::Cpu;
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("fast CPU path") && err.contains("power 8"), "{err}");
    config.run.engine = TrainEngine::Auto;
    let summary = train(&config, &data, &options(run.path())).unwrap();
    assert_eq!(summary.engine, "burn");
    assert!(summary.notes.iter().any(|n| n.contains("burn autodiff") && n.contains("power 8")), "{:?}", summary.notes);
}

#[test]
fn divergence_stops_with_the_step_and_the_likely_cause() {
    let mut config = small_config();
    config.optim.lr = 1e6;
    config.optim.clip_grad = None;
    config.schedule.warmup_epochs = 0.0;
    let data = load_datasets(&config).unwrap();
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("at step") && err.contains("learning rate") && err.contains("prepbn.steps"), "{err}");
    assert!(err.contains("Last healthy checkpoint") || err.contains("No healthy checkpoint yet"), "{err}");
    // Nothing was written after the divergence: every checkpoint present is a complete one.
    for path in slabformer::train::checkpoint::list(run.path()) {
        slabformer::train::checkpoint::load(&path).unwrap();
    }
}

#[test]
fn missing_data_and_bad_configs_are_clear_errors() {
    let mut config = small_config();
    config.data.root = PathBuf::from("/nonexistent/fashion");
    let err = load_datasets(&config).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/fashion") && err.contains("data fetch"), "{err}");

    let mut config = small_config();
    config.model.set("num_classes", 7);
    let data = load_datasets(&small_config()).unwrap();
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("10 classes") && err.contains("num_classes"), "{err}");

    let mut config = small_config();
    config.prepbn.steps = Some(1000);
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("prepbn.steps") && err.contains("λ > 0"), "{err}");
}

/// The hierarchical and mobile families' Fashion-MNIST presets, shrunk to the small run of these tests.
fn small_hierarchical(preset: &str) -> TrainConfig {
    let base = small_config();
    let mut c = TrainConfig::preset(preset).unwrap();
    c.data = base.data;
    c.run = RunConfig { epochs: 2, ..base.run };
    c.optim = base.optim;
    c.schedule = base.schedule;
    c
}

#[test]
fn swin_pvt_and_mobilevit_presets_train_fuse_and_resume_bit_for_bit() {
    for preset in ["fashion-slab-swin", "fashion-slab-pvt", "fashion-mobilevit"] {
        let config = small_hierarchical(preset);
        let data = load_datasets(&config).unwrap();
        let run = tempfile::tempdir().unwrap();
        let summary = train(&config, &data, &options(run.path())).unwrap();
        let m = metrics(run.path());
        let (first, last) = (m.steps[..5].iter().map(|r| r.loss).sum::<f64>() / 5.0, m.steps[15..].iter().map(|r| r.loss).sum::<f64>() / 5.0);
        assert!(last < first - 0.05, "{preset}: loss did not fall: {first:.3} → {last:.3}");
        // Every family here is on the fast path: `auto` picks the CPU trainer.
        assert_eq!(summary.engine, "cpu", "{preset}: {:?}", summary.notes);
        let fused = summary.fused_eval.as_ref().expect("PRepBN and BatchNorm models fuse");
        assert!((fused.top1 - summary.final_eval.top1).abs() <= 1.0, "{preset}: {fused:?} vs {:?}", summary.final_eval);
        let mut resumable = config.clone();
        resumable.run.recalibrate_epochs = 0;
        resumable.checkpoint.every_steps = Some(7);
        assert_resume_is_exact(&resumable);
    }
}

/// A tiny MobileViT v1 (three stages; whole 2×2 patches at every multiple of 16) on the small
/// subset, with ml-cvnets' multi-scale batches around 32²: sides 16, 32 and 48 with 80, 20 and
/// 8 images. Fashion-MNIST's 28² images are resized whole to each side.
fn multi_scale_config(engine: TrainEngine) -> TrainConfig {
    let mut c = small_config();
    let ir = StageConfig::Ir { width: 8, depth: 1, stride: 1, bottle_ratio: 2.0 };
    let vit = |width| StageConfig::Mobilevit { width, depth: 1, stride: 2, bottle_ratio: 2.0, transformer_dim: width, transformer_depth: 1, patch_size: 2 };
    c.model = ModelSpec::new("mobilevit_xxs")
        .with("img_size", 32)
        .with("in_chans", 1)
        .with("num_classes", 10)
        .with("stem_chs", 8)
        .with("num_features", 32)
        .with("stages", toml::Value::try_from(vec![ir, vit(16), vit(24)]).unwrap());
    c.data.multi_scale = Some(MultiScaleConfig { min_size: 16, max_size: 48, max_scales: 3, divisor: 16 });
    c.augment = AugmentConfig { random_resized_crop: true, scale: [1.0, 1.0], ratio: [1.0, 1.0], eval_crop: 1.0, ..c.augment };
    c.run.epochs = 2;
    c.run.engine = engine;
    c.checkpoint.every_steps = Some(3);
    c
}

#[test]
fn multi_scale_mobilevit_trains_alike_on_both_engines_and_resumes_bit_for_bit() {
    let config = multi_scale_config(TrainEngine::Cpu);
    let data = load_datasets(&config).unwrap();
    let steps = config.epoch_steps(data.train.len(), 32);
    let scales: Vec<(usize, usize)> = steps.sampler().scales().iter().map(|s| (s.size, s.batch)).collect();
    assert_eq!(scales, vec![(16, 80), (32, 20), (48, 8)]);
    let per_epoch = [steps.of(0), steps.of(1)];
    // The run stops at a checkpoint inside the second epoch; the epochs drew several sizes.
    let interrupt = (per_epoch[0] + 1..per_epoch[0] + per_epoch[1]).find(|s| s % 3 == 0).unwrap_or_else(|| panic!("no mid-epoch checkpoint in epoch 2: {per_epoch:?}"));
    for epoch in 0..2 {
        let plan = steps.sampler().epoch_batches(data.train.len(), config.run.seed, epoch);
        assert!(plan.iter().any(|b| b.scale != plan[0].scale), "epoch {epoch}: one size only");
    }

    let run = tempfile::tempdir().unwrap();
    let summary = train(&config, &data, &options(run.path())).unwrap();
    assert_eq!(summary.engine, "cpu", "{:?}", summary.notes);
    assert_eq!(summary.steps, per_epoch.iter().sum::<u64>());
    let m = metrics(run.path());
    let lr = config.lr_schedule(&steps);
    assert_eq!(m.steps.len() as u64, summary.steps);
    for row in &m.steps {
        assert!((row.lr - lr.at(row.step - 1)).abs() <= 1e-6 * row.lr, "lr at step {}", row.step);
    }
    assert!(summary.fused_eval.is_some(), "the fused model is evaluated at the base size");

    let (cpu, cpu_losses) = assert_resume_after_is_exact(&config, interrupt);
    let (burn, burn_losses) = assert_resume_after_is_exact(&multi_scale_config(TrainEngine::Burn), interrupt);
    assert_eq!((cpu, burn), ("cpu", "burn"));
    assert_eq!(cpu_losses, m.steps.iter().map(|r| r.loss).collect::<Vec<_>>());
    for (step, (a, b)) in cpu_losses.iter().zip(&burn_losses).enumerate() {
        assert!((a - b).abs() <= 1e-3 * b.abs() + 1e-4, "step {}: cpu loss {a}, burn {b}", step + 1);
    }
}

#[test]
fn multi_scale_sizes_the_model_or_the_cpu_trainer_cannot_take_are_refused_by_name() {
    // DeiT's position embeddings are sized for its img_size: refused by key and family.
    let mut config = small_config();
    config.data.multi_scale = Some(MultiScaleConfig { min_size: 16, max_size: 48, max_scales: 3, divisor: 16 });
    let data = load_datasets(&config).unwrap();
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("data.multi_scale") && err.contains("vit family") && err.contains("16×16"), "{err}");

    // At 24² the tiny MobileViT's last block sees a 3×3 map, which burn resizes into whole
    // patches and the fast path does not take: `cpu` refuses it by name, `auto` trains on burn
    // and says why.
    let mut config = multi_scale_config(TrainEngine::Cpu);
    config.data.multi_scale = Some(MultiScaleConfig { min_size: 24, max_size: 40, max_scales: 3, divisor: 8 });
    config.run.max_steps = Some(2);
    config.run.recalibrate_epochs = 0;
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains("multi-scale batches of 24×24 images") && err.contains("3×3 map"), "{err}");
    config.run.engine = TrainEngine::Auto;
    let summary = train(&config, &data, &options(run.path())).unwrap();
    assert_eq!((summary.engine, summary.steps), ("burn", 2));
    assert!(summary.notes.iter().any(|n| n.contains("burn autodiff") && n.contains("multi-scale batches of 24×24")), "{:?}", summary.notes);
}
