//! Faults a hostile but realistic user meets (issue 12): two trainings on one folder, headers
//! that ask for more memory than exists, NaN in configs, runs killed before their first
//! checkpoint or between writes, leftovers of killed writes, outputs that are not files.
//! Each test failed on the code before its fix.

use std::path::{Path, PathBuf};

use slabformer::data::fetch::fetch_fashion_mnist;
use slabformer::deploy::model_file::{MODEL_KEY, Preprocess, model_bytes, read_model_file};
use slabformer::models::{AnyConfig, ModelFamily, VisionTransformer, VitConfig};
use slabformer::state::StateDict;
use slabformer::train::config::TrainConfig;
use slabformer::train::metrics::Metrics;
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

/// A tiny SLAB-DeiT on 20 images per class, batch 20: 10 steps per epoch, 2 epochs, a
/// checkpoint every 7 steps and at each epoch end.
fn tiny_config() -> TrainConfig {
    let mut c = TrainConfig::fashion_slab();
    c.data.root = fashion_root();
    c.data.train_per_class = Some(20);
    c.data.eval_per_class = Some(5);
    c.model.set("embed_dim", 16);
    c.model.set("depth", 1);
    c.model.set("num_heads", 2);
    c.run.batch_size = 20;
    c.run.epochs = 2;
    c.run.recalibrate_epochs = 1;
    c.run.eval_batch_size = 50;
    c.optim.lr = 0.12;
    c.schedule.warmup_epochs = 0.3;
    c.checkpoint.every_steps = Some(7);
    c
}

fn options(dir: &Path) -> TrainOptions {
    TrainOptions { run_dir: dir.to_path_buf(), resume: false, progress: false, interrupt_after: None }
}

fn metrics(dir: &Path) -> Metrics {
    let path = dir.join("metrics.csv");
    Metrics::from_csv(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

#[test]
fn a_run_folder_held_by_another_training_is_refused_naming_it_and_the_holder() {
    let config = tiny_config();
    let data = load_datasets(&config).unwrap();
    let run = tempfile::tempdir().unwrap();
    // Another process holds the folder: flock locks conflict between open files, in one
    // process too.
    let lock = std::fs::File::create(run.path().join(".lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(run.path().join(".lock"), "pid 4242 on somehost\n").unwrap();
    let err = train(&config, &data, &options(run.path())).unwrap_err().to_string();
    assert!(err.contains(&run.path().display().to_string()) && err.contains("pid 4242"), "{err}");
    assert!(!run.path().join("config.toml").exists(), "nothing written into a folder another run holds");
    // Released (closed, as on exit or kill): the run goes ahead.
    drop(lock);
    train(&config, &data, &options(run.path())).unwrap();
}

#[test]
fn configs_that_cannot_fit_in_memory_are_refused_before_allocating() {
    let mut config = tiny_config();
    config.model.set("embed_dim", 1_000_000);
    config.model.set("num_heads", 1);
    let err = config.resolve(200).unwrap_err().to_string();
    assert!(err.contains("embed_dim = 1000000") && err.contains("bytes"), "{err}");

    // A model file of a tiny model whose header claims a huge one.
    let dir = tempfile::tempdir().unwrap();
    let tiny = VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 1, num_heads: 2, num_classes: 3, ..VitConfig::slab_deit_tiny() };
    let model = VisionTransformer::init(&tiny, &burn::tensor::Device::flex()).unwrap();
    let bytes = model_bytes(&model, &Preprocess::imagenet(3)).unwrap();
    let mut dict = StateDict::from_safetensors_bytes(&bytes, "m".into()).unwrap();
    let huge = AnyConfig::Vit(VitConfig { embed_dim: 1_000_000, depth: 1000, num_heads: 1, ..tiny });
    dict.metadata.insert(MODEL_KEY.into(), serde_json::to_string(&huge).unwrap());
    let path = dir.path().join("huge.safetensors");
    std::fs::write(&path, dict.to_safetensors_bytes().unwrap()).unwrap();
    let err = read_model_file(&path).err().expect("refused").to_string();
    assert!(err.contains("huge.safetensors") && err.contains("parameters"), "{err}");
}

#[test]
fn non_finite_floats_and_zero_counts_in_configs_are_errors_naming_the_key() {
    let cases: Vec<(&str, Box<dyn Fn(&mut TrainConfig)>)> = vec![
        ("optim.weight_decay", Box::new(|c| c.optim.weight_decay = f64::NAN)),
        ("optim.clip_grad", Box::new(|c| c.optim.clip_grad = Some(f64::NAN))),
        ("optim.betas", Box::new(|c| c.optim.betas[1] = f64::NAN)),
        ("schedule.min_lr", Box::new(|c| c.schedule.min_lr = f64::NAN)),
        ("schedule.warmup_epochs", Box::new(|c| c.schedule.warmup_epochs = f64::INFINITY)),
        ("prepbn.r0", Box::new(|c| c.prepbn.r0 = f64::NAN)),
        ("mix.label_smoothing", Box::new(|c| c.mix.label_smoothing = f64::NAN)),
        ("run.ema_decay", Box::new(|c| c.run.ema_decay = Some(f64::NAN))),
        ("model.mlp_ratio", Box::new(|c| c.model.set("mlp_ratio", f64::NAN))),
        ("data.eval_per_class", Box::new(|c| c.data.eval_per_class = Some(0))),
        ("data.train_per_class", Box::new(|c| c.data.train_per_class = Some(0))),
        ("checkpoint.every_steps", Box::new(|c| c.checkpoint.every_steps = Some(0))),
    ];
    for (key, break_it) in cases {
        let mut config = tiny_config();
        break_it(&mut config);
        let err = config.resolve(200).err().unwrap_or_else(|| panic!("{key}: accepted")).to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
    // An augment float, through TOML as a user writes it.
    let text = format!("{}\n", tiny_config().to_toml()).replace("hflip = 0.5", "hflip = nan");
    let err = TrainConfig::from_toml(&text, "x.toml").unwrap().resolve(200).unwrap_err().to_string();
    assert!(err.contains("augment.hflip"), "{err}");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_zero() {
    let config = tiny_config();
    let data = load_datasets(&config).unwrap();
    let straight = tempfile::tempdir().unwrap();
    train(&config, &data, &options(straight.path())).unwrap();
    // What a kill before step 7 leaves: the stored config and no checkpoint.
    let run = tempfile::tempdir().unwrap();
    let err = train(&config, &data, &TrainOptions { interrupt_after: Some(3), ..options(run.path()) }).unwrap_err().to_string();
    assert!(err.contains("interrupted after step 3"), "{err}");
    assert!(slabformer::train::checkpoint::latest(run.path()).is_none());
    let summary = train(&config, &data, &TrainOptions { resume: true, ..options(run.path()) }).unwrap();
    assert_eq!(summary.steps, 20);
    let read = |dir: &Path| StateDict::read_safetensors(&dir.join("model.safetensors")).unwrap();
    let (a, b) = (read(straight.path()), read(run.path()));
    for (key, t) in a.iter() {
        assert_eq!(b.get(key).unwrap(), t, "`{key}`");
    }
    let steps: Vec<u64> = metrics(run.path()).steps.iter().map(|r| r.step).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
    // Another config than the stored one is refused as for a checkpoint.
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("config.toml"), config.to_toml()).unwrap();
    let mut changed = config.clone();
    changed.optim.lr *= 2.0;
    let err = train(&changed, &data, &TrainOptions { resume: true, ..options(other.path()) }).unwrap_err().to_string();
    assert!(err.contains("another training config"), "{err}");
}

#[test]
fn metric_rows_after_the_last_checkpoint_survive_and_resume_adds_no_duplicates() {
    let config = tiny_config();
    let data = load_datasets(&config).unwrap();
    let run = tempfile::tempdir().unwrap();
    // Stopped after step 9, two steps past the checkpoint of step 7: those rows are on disk.
    train(&config, &data, &TrainOptions { interrupt_after: Some(9), ..options(run.path()) }).unwrap_err();
    let on_disk: Vec<u64> = metrics(run.path()).steps.iter().map(|r| r.step).collect();
    assert_eq!(on_disk, (1..=9).collect::<Vec<_>>(), "every step's row is written as it is taken");
    train(&config, &data, &TrainOptions { resume: true, ..options(run.path()) }).unwrap();
    let done = metrics(run.path());
    assert_eq!(done.steps.iter().map(|r| r.step).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    // Resuming the finished run changes nothing in its record.
    let before = std::fs::read_to_string(run.path().join("metrics.csv")).unwrap();
    train(&config, &data, &TrainOptions { resume: true, ..options(run.path()) }).unwrap();
    assert_eq!(std::fs::read_to_string(run.path().join("metrics.csv")).unwrap(), before);
    assert_eq!(done.evals.len(), metrics(run.path()).evals.len());
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    [dir.to_path_buf(), dir.join("checkpoints")]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().contains(".tmp-"))
        .collect()
}

#[test]
fn leftovers_of_killed_writes_are_removed_on_resume_and_after_a_run() {
    let config = tiny_config();
    let data = load_datasets(&config).unwrap();
    let run = tempfile::tempdir().unwrap();
    train(&config, &data, &TrainOptions { interrupt_after: Some(8), ..options(run.path()) }).unwrap_err();
    // What writes killed between create and rename leave (names of `files::write_atomic`).
    for leftover in ["checkpoints/.step-000000014.tmp-99999-0.safetensors", ".metrics.tmp-99999-1.csv", ".training.tmp-99999-2.png"] {
        std::fs::write(run.path().join(leftover), b"half").unwrap();
    }
    assert_eq!(temp_files(run.path()).len(), 3);
    train(&config, &data, &TrainOptions { resume: true, ..options(run.path()) }).unwrap();
    assert_eq!(temp_files(run.path()), Vec::<PathBuf>::new());
}

#[test]
fn outputs_and_missing_files_get_plain_messages() {
    use slabformer::files::check_new;
    // Device nodes and folders are never replaced, even with --overwrite.
    for target in ["/dev/null", "/tmp"] {
        let err = check_new(Path::new(target), true).unwrap_err().to_string();
        assert!(err.contains(target) && err.contains("not a regular file"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let existing = dir.path().join("m.safetensors");
    std::fs::write(&existing, b"x").unwrap();
    check_new(&existing, true).unwrap();
    let err = check_new(&existing, false).unwrap_err().to_string();
    assert!(err.contains("not overwriting") && !err.contains("invalid config"), "{err}");
    // A missing file is "no such file", once.
    let missing = dir.path().join("missing.safetensors");
    for err in [
        StateDict::read_safetensors(&missing).unwrap_err().to_string(),
        slabformer::deploy::import::read_pytorch(&missing.with_extension("pth")).unwrap_err().to_string(),
    ] {
        assert!(err.contains("missing.") && err.contains("no such file") && !err.contains("entity not found"), "{err}");
    }
    // A file that is neither a zip (torch.save) nor a pickle says what import expected.
    let text = dir.path().join("notes.pth");
    std::fs::write(&text, "just some text, not a checkpoint\n").unwrap();
    let err = slabformer::deploy::import::read_pytorch(&text).unwrap_err().to_string();
    assert!(err.contains("notes.pth") && err.contains("expected") && !err.contains("safetensors"), "{err}");
}
