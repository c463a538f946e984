//! `slabformer bench`: slabformer beside PyTorch eager and ONNX Runtime, same machine, same run.
//!
//! Every case runs in a process of its own (`slabformer bench-case`, `bench/torch_bench.py`,
//! `bench/ort_bench.py`), so each reports its own peak resident memory; each warms up, then times
//! `repeats` calls and reports the median and the range.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use serde::{Deserialize, Serialize};
use slabformer::models::{self, AnyConfig, ImageClassifier, ImageConfig, ModelFamily};
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::runtime::{CpuAttention, CpuModel, CpuTrainer};
use slabformer::state::host_f32;
use slabformer::optim::OptimConfig;
use slabformer::train::optim::{AdamW, param_ranks};

/// The models the bench compares at 224²: the T model of every family, plain and SLAB.
pub const MODELS: [&str; 9] = ["deit_tiny", "prepbn_deit_tiny", "slab_deit_tiny", "pvt_tiny", "slab_pvt_tiny", "swin_tiny", "slab_swin_tiny", "cswin_tiny", "slab_cswin_tiny"];
const SWEEP_TOKENS: [usize; 4] = [196, 784, 3136, 12544];
/// Input sides of the SLAB-Swin-T resolution sweep.
const SWEEP_SIDES: [usize; 4] = [224, 448, 896, 1344];

/// What one timed case reports (the JSON line every engine prints).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Measured {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub peak_rss_mib: f64,
}

/// One case, run in this process by `slabformer bench-case`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// The CPU inference runtime on the deploy form.
    Runtime,
    /// The burn flex forward of the deploy form.
    Burn,
    /// A training step on the CPU runtime's trainer: forward, cross-entropy, backward, AdamW.
    Train,
    /// The same step with burn autodiff and burn-tensor AdamW (the trainer before the runtime's).
    BurnTrain,
    /// One SLA layer (C = 192, 3 heads) on `batch` tokens.
    SlaAttention,
    /// One softmax attention layer (C = 192, 3 heads) on `batch` tokens.
    SoftmaxAttention,
}

fn time(warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<Measured> {
    for _ in 0..warmup {
        f()?;
    }
    let mut ms = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        f()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(Measured { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1], peak_rss_mib: peak_rss_mib() })
}

/// The process's peak resident set (VmHWM), MiB; NaN where /proc is missing.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn random(dims: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(dims, Distribution::Normal(0.0, 1.0), device)
}

/// `field=value` pairs (values in JSON: `img_size=[448,448]`) as config overrides.
pub fn parse_overrides(sets: &[String]) -> Result<serde_json::Map<String, serde_json::Value>> {
    sets.iter()
        .map(|set| {
            let (field, value) = set.split_once('=').with_context(|| format!("`--set {set}`: expected field=value"))?;
            let value = serde_json::from_str(value.trim()).with_context(|| format!("`--set {set}`: the value is not JSON (numbers, [lists], \"strings\")"))?;
            Ok((field.trim().to_string(), value))
        })
        .collect()
}

/// A model preset, or the model of a training preset (`fashion-slab`: the quickstart's), with
/// `overrides` of its config's fields.
fn model_config(name: &str, overrides: &[String]) -> Result<AnyConfig> {
    let config = match models::preset(name) {
        Ok(config) => config,
        Err(_) => {
            let training = slabformer::train::config::TrainConfig::preset(name).with_context(|| format!("`{name}` is neither a model nor a training preset"))?;
            // The model does not depend on the data set size; ImageNet's keeps every preset's T within its run.
            training.resolve(1_281_167)?.model.with_context(|| format!("training preset `{name}` names no model"))?
        }
    };
    let config = config.with_overrides(&parse_overrides(overrides)?)?;
    // Sizes first: a huge depth would make the counts below loop for ever.
    config.check_sizes()?;
    config.image().validate()?;
    Ok(config)
}

/// `batch` random images of the model's input size, (B, C, H, W).
fn image_dims(config: &dyn ImageConfig, batch: usize) -> [usize; 4] {
    let [h, w] = config.input_size();
    [batch, config.in_chans(), h, w]
}

/// Runs one case here and returns its measurement (`slabformer bench-case`).
pub fn run_case(engine: Engine, model: &str, overrides: &[String], batch: usize, warmup: usize, repeats: usize) -> Result<Measured> {
    let device = Device::flex();
    if let Engine::SlaAttention | Engine::SoftmaxAttention = engine {
        let side = (batch as f64).sqrt() as usize;
        ensure!(side * side == batch, "the attention sweep needs a square token count, got {batch}");
        let kind = if engine == Engine::SlaAttention { AttentionKind::sla() } else { AttentionKind::Softmax };
        let config = AttentionConfig { dim: 192, num_heads: 3, qkv_bias: true, kind, grid: Some([side, side]) };
        let layer = CpuAttention::new(&config.init(&device))?;
        let tokens = host_f32(Tensor::<2>::random([batch, 192], Distribution::Normal(0.0, 1.0), &device));
        return time(warmup, repeats, || layer.forward(&tokens).map(drop).map_err(Into::into));
    }
    let config = model_config(model, overrides)?;
    let dims = image_dims(config.image(), batch);
    let classes = config.image().num_classes();
    slabformer::with_family!(config, |F, config| match engine {
        Engine::Runtime => {
            let runtime = CpuModel::new::<F>(&F::init(&config, &device)?)?;
            let images = host_f32(random(dims, &device));
            time(warmup, repeats, || runtime.forward(&images, batch).map(drop).map_err(Into::into))
        }
        Engine::Burn => {
            let trained = F::init(&config, &device)?;
            let x = random(dims, &device);
            if config.folds() {
                let deploy = trained.fuse()?;
                time(warmup, repeats, || Ok(drop(deploy.logits(x.clone()).into_data())))
            } else {
                let trained = trained.valid();
                time(warmup, repeats, || Ok(drop(trained.logits(x.clone()).into_data())))
            }
        }
        Engine::Train => {
            let mut trainer = CpuTrainer::new(&F::init(&config, &device)?, OptimConfig::default())?;
            let images = host_f32(random(dims, &device));
            let targets: Vec<f32> = (0..batch * classes).map(|i| if i % classes == (i / classes) % classes { 1.0 } else { 0.0 }).collect();
            time(warmup, repeats, || trainer.train_step(&images, &targets, batch, 1e-3).map(drop).map_err(Into::into))
        }
        Engine::BurnTrain => {
            let device = device.autodiff();
            let mut model = F::init(&config, &device)?;
            let x = random(dims, &device);
            let labels = Tensor::<1, Int>::from_data((0..batch as i64).map(|i| i % classes as i64).collect::<Vec<_>>().as_slice(), &device);
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            let ranks = param_ranks(&model);
            let mut optimizer = AdamW::new(OptimConfig::default());
            time(warmup, repeats, || {
                let loss = loss_fn.forward(model.logits(x.clone()), labels.clone());
                let backward = loss.backward();
                let grads = slabformer::state::float_tensors(&model, Some(&backward)).into_iter().map(|(key, g)| (key, host_f32(g))).collect();
                model = optimizer.step(model.clone(), &grads, &ranks, 1e-3);
                Ok(())
            })
        }
        Engine::SlaAttention | Engine::SoftmaxAttention => unreachable!("handled above"),
    })
}

/// Where the Python side lives, which interpreter runs it and which peers it has.
struct Peers {
    python: PathBuf,
    scripts: PathBuf,
    torch: Option<String>,
    onnx_runtime: Option<String>,
    openvino: Option<String>,
}

fn parse(out: std::process::Output, what: &str) -> Result<Measured> {
    ensure!(out.status.success(), "{what} failed: {}", last_line(&String::from_utf8_lossy(&out.stderr)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{what} printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line}"))
}

/// The last non-empty line of a child's stderr: its error, without the traceback above it.
fn last_line(stderr: &str) -> &str {
    stderr.lines().rev().map(str::trim).find(|l| !l.is_empty()).unwrap_or("(no message)")
}

/// A case of ours in a fresh process, so its peak memory is its own.
fn ours(engine: Engine, model: &str, overrides: &[String], batch: usize, warmup: usize, repeats: usize) -> Result<Measured> {
    let exe = std::env::current_exe()?;
    let engine_name = clap::ValueEnum::to_possible_value(&engine).expect("engines have names").get_name().to_string();
    let mut command = Command::new(exe);
    command.args(["bench-case", "--engine", &engine_name, "--model", model]);
    for set in overrides {
        command.args(["--set", set]);
    }
    let out = command.args(["--batch", &batch.to_string(), "--warmup", &warmup.to_string(), "--repeats", &repeats.to_string()]).output()?;
    parse(out, &format!("slabformer {engine_name} {model} batch {batch}"))
}

/// The OpenVINO CPU plugin's precisions the bench runs: its default, and f32.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OvPrecision {
    Default,
    F32,
}

impl Peers {
    fn new(python: &Path) -> Self {
        let version = |probe: &str| {
            Command::new(python)
                .args(["-c", probe])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        Peers {
            python: python.to_path_buf(),
            scripts: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench"),
            torch: version("import torch, timm; print(f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads), timm {timm.__version__}')"),
            onnx_runtime: version("import onnxruntime; print(f'ONNX Runtime {onnxruntime.__version__}')"),
            openvino: version("import openvino; print(f'OpenVINO {openvino.__version__}')"),
        }
    }

    fn describe(&self) -> String {
        let missing = |what: &str| format!("no {what} in {}", self.python.display());
        format!(
            "{}; {}; {}",
            self.torch.clone().unwrap_or_else(|| missing("PyTorch/timm")),
            self.onnx_runtime.clone().unwrap_or_else(|| missing("onnxruntime")),
            self.openvino.clone().unwrap_or_else(|| missing("openvino")),
        )
    }

    fn run(&self, script: &str, args: &[String], what: &str) -> Result<Measured> {
        let out = Command::new(&self.python).arg(self.scripts.join(script)).args(args).output().with_context(|| format!("running {}", self.python.display()))?;
        parse(out, what)
    }

    fn torch(&self, model: &str, side: usize, batch: usize, mode: &str, warmup: usize, repeats: usize) -> Option<Result<Measured>> {
        self.torch.as_ref()?;
        let args = [model.to_string(), batch.to_string(), mode.into(), warmup.to_string(), repeats.to_string(), side.to_string()];
        Some(self.run("torch_bench.py", &args, &format!("PyTorch {mode} {model} batch {batch}")))
    }

    fn onnx_runtime(&self, onnx: &Path, dims: [usize; 4], warmup: usize, repeats: usize) -> Option<Result<Measured>> {
        self.onnx_runtime.as_ref()?;
        let mut args = vec![onnx.display().to_string()];
        args.extend(dims.iter().chain(&[warmup, repeats]).map(|v| v.to_string()));
        Some(self.run("ort_bench.py", &args, &format!("ONNX Runtime {} batch {}", onnx.display(), dims[0])))
    }

    fn openvino(&self, onnx: &Path, dims: [usize; 4], warmup: usize, repeats: usize, precision: OvPrecision) -> Option<Result<(Measured, String)>> {
        self.openvino.as_ref()?;
        let mut args = vec![onnx.display().to_string()];
        args.extend(dims.iter().chain(&[warmup, repeats]).map(|v| v.to_string()));
        args.push(if precision == OvPrecision::F32 { "f32" } else { "default" }.into());
        let what = format!("OpenVINO {} batch {}", onnx.display(), dims[0]);
        let out = match Command::new(&self.python).arg(self.scripts.join("ov_bench.py")).args(&args).output() {
            Ok(out) => out,
            Err(e) => return Some(Err(e.into())),
        };
        let precision = String::from_utf8_lossy(&out.stdout)
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("precision")?.as_str().map(String::from))
            .unwrap_or_default();
        Some(parse(out, &what).map(|m| (m, precision)))
    }
}

/// The machine's FP32 peak, measured: every logical core runs independent FMA chains (AVX-512
/// where present, else AVX2) for ~0.3 s; FLOP = 2 per lane per FMA.
pub fn measured_peak_gflops() -> (f64, &'static str) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (per_thread, isa): (fn(u64) -> f64, &str) = peak::kernel();
    let iterations = 20_000_000;
    let start = Instant::now();
    let flops: f64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(move || per_thread(iterations))).collect();
        handles.into_iter().map(|h| h.join().expect("peak thread")).sum()
    });
    (flops / start.elapsed().as_secs_f64() / 1e9, isa)
}

mod peak {
    /// Each call: `iterations` rounds of 12 independent vector FMAs; returns the FLOPs done.
    pub fn kernel() -> (fn(u64) -> f64, &'static str) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return (|n| unsafe { avx512(n) }, "AVX-512");
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                return (|n| unsafe { avx2(n) }, "AVX2+FMA");
            }
        }
        (scalar, "scalar")
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iterations: u64) -> f64 {
        use std::arch::x86_64::*;
        let mut acc = [_mm512_set1_ps(0.0); 12];
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        for _ in 0..iterations {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (iterations * 12 * 16 * 2) as f64
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iterations: u64) -> f64 {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_set1_ps(0.0); 12];
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        for _ in 0..iterations {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (iterations * 12 * 8 * 2) as f64
    }

    fn scalar(iterations: u64) -> f64 {
        let mut acc = [0f32; 12];
        for _ in 0..iterations {
            for v in acc.iter_mut() {
                *v = v.mul_add(0.999_999, 1e-7);
            }
        }
        std::hint::black_box(acc);
        (iterations * 12 * 2) as f64
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn time_cell(m: &Measured, batch: usize) -> String {
    format!("{:.1} ms [{:.1}–{:.1}] · {:.0} img/s", m.median_ms, m.min_ms, m.max_ms, batch as f64 * 1e3 / m.median_ms)
}

fn cell(m: Option<&Measured>, batch: usize) -> String {
    m.map_or("n/a".into(), |m| time_cell(m, batch))
}

fn mib(m: Option<&Measured>) -> String {
    m.map_or("–".into(), |m| format!("{:.0}", m.peak_rss_mib))
}

pub struct Options<'a> {
    pub repeats: usize,
    pub python: Option<&'a Path>,
    /// Presets to compare (default [`MODELS`]).
    pub models: &'a [String],
    /// Also time the burn forward and autodiff step (the generic path the runtime replaces).
    pub burn: bool,
    /// Where to draw the one-layer SLA-vs-softmax sweep; skipped without it.
    pub plot: Option<&'a Path>,
    /// Where to draw the SLAB-Swin-T resolution sweep; skipped without it.
    pub swin_plot: Option<&'a Path>,
}

/// Cases that could not run, with why: the report lists them under its tables.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    /// The measurement, or `None` with the error noted (a missing fast path or peer model does
    /// not stop the other cases).
    fn attempt<T>(&mut self, result: Option<Result<T>>) -> Option<T> {
        match result? {
            Ok(value) => Some(value),
            Err(e) => {
                eprintln!("bench: {e:#}");
                self.0.push(format!("{e:#}"));
                None
            }
        }
    }

    fn markdown(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        let mut out = String::from("\nNot measured (n/a above):\n\n");
        for note in &self.0 {
            out.push_str(&format!("- {}\n", note.replace('\n', " ")));
        }
        out
    }
}

/// The ONNX graph of `config`'s deploy form (RepBN/PRepBN models fused, LayerNorm ones as they
/// are), random weights.
fn export_onnx(config: &AnyConfig, path: &Path) -> Result<()> {
    use slabformer::deploy::onnx::export_classifier;
    let device = Device::flex();
    slabformer::with_family!(config, |F, c| {
        let model = F::init(c, &device)?;
        if c.folds() { export_classifier(&model.fuse()?, path, false)? } else { export_classifier(&model, path, false)? }
    });
    Ok(())
}

/// Runs the comparison and returns it as a Markdown report.
pub fn run(options: &Options) -> Result<String> {
    let repeats = options.repeats.max(1);
    let peers = options.python.map(Peers::new);
    let dir = tempfile::tempdir()?;
    let (peak, isa) = measured_peak_gflops();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut notes = Notes::default();
    // The command as it ran (`bash bench/compare.sh` runs it with the pinned peers of bench/.venv).
    let command: Vec<String> = std::iter::once("slabformer".to_string()).chain(std::env::args().skip(1)).collect();
    let mut out = format!("# Benchmarks\n\nMade by `{}` (`bash bench/compare.sh` makes the pinned peers of bench/.venv and runs the default set); rerun it to measure your machine.\n\n", command.join(" "));
    out.push_str(&format!(
        "Machine: {} · {threads} logical cores · FP32 peak {peak:.0} GFLOP/s, measured: every core runs 12 independent {isa} FMA chains (2 FLOP per lane), \
         the most dense float math these cores do. slabformer {} (runtime and trainer on {threads} rayon threads; the burn {} columns are the generic path they replace). {}.\n\n\
         Each case runs in its own process: warm-up, then the median of {repeats} timed calls [min–max]; memory is that process's peak resident set (VmHWM), interpreter included for the Python peers. \
         Ratios are slabformer's time over the peer's: below 1 slabformer is faster. \"fastest f32 peer\" is the fastest of PyTorch eager, ONNX Runtime and OpenVINO with f32 inference; \
         OpenVINO's default precision is its CPU plugin's choice (bf16 where the cores have AMX), reported beside it.\n\n",
        cpu_name(),
        env!("CARGO_PKG_VERSION"),
        "0.22.1 flex",
        peers.as_ref().map_or_else(|| "No Python peers (give --python)".to_string(), Peers::describe),
    ));
    out.push_str("## Inference (deploy form, random weights, each preset's input size: 224² for the default models)\n\n");
    out.push_str(
        "| model | batch | slabformer | PyTorch eager | ONNX Runtime | OpenVINO f32 | OpenVINO default | / fastest f32 peer | / OpenVINO default | slabformer GFLOP/s (% of peak) | burn forward |\n\
         |---|---:|---|---|---|---|---|---:|---:|---:|---|\n",
    );
    let mut memory = String::from("| model | batch | slabformer | PyTorch eager | ONNX Runtime | OpenVINO f32 | OpenVINO default |\n|---|---:|---:|---:|---:|---:|---:|\n");
    let mut configs = Vec::new();
    for name in options.models {
        let config = model_config(name, &[])?;
        let onnx = dir.path().join(format!("{name}.onnx"));
        let exported = notes.attempt(Some(export_onnx(&config, &onnx).with_context(|| format!("{name}: ONNX export")))).is_some();
        let macs = config.macs();
        for batch in [1, 32] {
            let warmup = if batch == 1 { 5 } else { 1 };
            let dims = image_dims(config.image(), batch);
            eprintln!("bench: {name} batch {batch}");
            let runtime = notes.attempt(Some(ours(Engine::Runtime, name, &[], batch, warmup, repeats)));
            let burn = if options.burn { notes.attempt(Some(ours(Engine::Burn, name, &[], batch, warmup.min(1), repeats.min(if batch == 1 { 5 } else { 3 })))) } else { None };
            let peer = |f: &dyn Fn(&Peers) -> Option<Result<Measured>>| peers.as_ref().and_then(f);
            let torch = notes.attempt(peer(&|p| p.torch(name, config.image().img_size(), batch, "infer", warmup, repeats)));
            let ort = if exported { notes.attempt(peer(&|p| p.onnx_runtime(&onnx, dims, warmup, repeats))) } else { None };
            let ov_f32 = if exported { notes.attempt(peers.as_ref().and_then(|p| p.openvino(&onnx, dims, warmup, repeats, OvPrecision::F32))) } else { None };
            let ov_default = if exported { notes.attempt(peers.as_ref().and_then(|p| p.openvino(&onnx, dims, warmup, repeats, OvPrecision::Default))) } else { None };
            let fastest_f32 = [torch.as_ref(), ort.as_ref(), ov_f32.as_ref().map(|(m, _)| m)].into_iter().flatten().min_by(|a, b| a.median_ms.total_cmp(&b.median_ms)).copied();
            let ratio_to = |peer: Option<&Measured>| match (runtime.as_ref(), peer) {
                (Some(ours), Some(theirs)) => format!("{:.2}×", ours.median_ms / theirs.median_ms),
                _ => "–".into(),
            };
            let efficiency = runtime.as_ref().map_or("–".into(), |r| {
                let gflops = 2.0 * macs as f64 * batch as f64 / (r.median_ms * 1e-3) / 1e9;
                format!("{gflops:.0} ({:.0} %)", 100.0 * gflops / peak)
            });
            let ov_default_cell = ov_default.as_ref().map_or("n/a".into(), |(m, precision)| format!("{} ({precision})", time_cell(m, batch)));
            out.push_str(&format!(
                "| {name} | {batch} | {} | {} | {} | {} | {ov_default_cell} | {} | {} | {efficiency} | {} |\n",
                cell(runtime.as_ref(), batch),
                cell(torch.as_ref(), batch),
                cell(ort.as_ref(), batch),
                cell(ov_f32.as_ref().map(|(m, _)| m), batch),
                ratio_to(fastest_f32.as_ref()),
                ratio_to(ov_default.as_ref().map(|(m, _)| m)),
                if options.burn { cell(burn.as_ref(), batch) } else { "–".into() },
            ));
            memory.push_str(&format!(
                "| {name} | {batch} | {} | {} | {} | {} | {} |\n",
                mib(runtime.as_ref()),
                mib(torch.as_ref()),
                mib(ort.as_ref()),
                mib(ov_f32.as_ref().map(|(m, _)| m)),
                mib(ov_default.as_ref().map(|(m, _)| m)),
            ));
        }
        configs.push((name, macs, config.image().img_size()));
    }
    out.push_str("\nPeak memory (MiB):\n\n");
    out.push_str(&memory);
    out.push_str("\n## Training step (batch 32, each preset's input size: forward, cross-entropy, backward, AdamW)\n\n");
    out.push_str("| model | slabformer | PyTorch eager | / PyTorch | slabformer GFLOP/s (3 × forward) | peak MiB slabformer / PyTorch | burn autodiff |\n|---|---|---|---:|---:|---|---|\n");
    for (name, macs, side) in configs {
        eprintln!("bench: {name} training step");
        let step = notes.attempt(Some(ours(Engine::Train, name, &[], 32, 1, repeats.min(5))));
        let burn = if options.burn { notes.attempt(Some(ours(Engine::BurnTrain, name, &[], 32, 1, repeats.min(3)))) } else { None };
        let torch = notes.attempt(peers.as_ref().and_then(|p| p.torch(name, side, 32, "train", 1, repeats.min(5))));
        let efficiency = step.as_ref().map_or("–".into(), |s| {
            let gflops = 3.0 * 2.0 * macs as f64 * 32.0 / (s.median_ms * 1e-3) / 1e9;
            format!("{gflops:.0} ({:.0} %)", 100.0 * gflops / peak)
        });
        let ratio = match (step.as_ref(), torch.as_ref()) {
            (Some(ours), Some(theirs)) => format!("{:.2}×", ours.median_ms / theirs.median_ms),
            _ => "–".into(),
        };
        out.push_str(&format!(
            "| {name} | {} | {} | {ratio} | {efficiency} | {} / {} | {} |\n",
            cell(step.as_ref(), 32),
            cell(torch.as_ref(), 32),
            mib(step.as_ref()),
            mib(torch.as_ref()),
            if options.burn { cell(burn.as_ref(), 32) } else { "–".into() },
        ));
    }
    out.push_str(&notes.markdown());
    if let Some(plot) = options.plot {
        out.push_str(&attention_sweep(plot, repeats)?);
    }
    if let Some(plot) = options.swin_plot {
        out.push_str(&swin_sweep(plot, repeats)?);
    }
    Ok(out)
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned())
}

/// SLA vs softmax attention, one layer (C = 192, 3 heads, batch 1), as tokens grow.
fn attention_sweep(plot: &Path, repeats: usize) -> Result<String> {
    let mut out = format!(
        "\n## Attention scaling: SLA vs softmax (one layer, C = 192, 3 heads, batch 1, slabformer runtime)\n\n![scaling]({})\n\n\
         | tokens (grid) | SLA | softmax | softmax / SLA time | SLA peak MiB | softmax peak MiB |\n|---:|---|---|---:|---:|---:|\n",
        file_name(plot)
    );
    let (mut sla_points, mut softmax_points) = (Vec::new(), Vec::new());
    for tokens in SWEEP_TOKENS {
        eprintln!("bench: attention sweep, {tokens} tokens");
        let reps = if tokens > 5000 { repeats.min(3) } else { repeats };
        let sla = ours(Engine::SlaAttention, "-", &[], tokens, 1, reps)?;
        let softmax = ours(Engine::SoftmaxAttention, "-", &[], tokens, 1, reps)?;
        let side = (tokens as f64).sqrt() as usize;
        out.push_str(&format!(
            "| {tokens} ({side}²) | {:.2} ms | {:.2} ms | {:.1}× | {:.0} | {:.0} |\n",
            sla.median_ms, softmax.median_ms, softmax.median_ms / sla.median_ms, sla.peak_rss_mib, softmax.peak_rss_mib
        ));
        sla_points.push((tokens as f64, sla));
        softmax_points.push((tokens as f64, softmax));
    }
    draw_sweep(plot, "tokens", &[("SLA".into(), sla_points), ("softmax".into(), softmax_points)])?;
    Ok(out)
}

/// One line of the SLAB-Swin-T sweep: a preset and the overrides that make it at side `s`.
struct SwinVariant {
    label: &'static str,
    model: &'static str,
    overrides: fn(usize) -> Vec<String>,
}

const SWIN_VARIANTS: [SwinVariant; 3] = [
    SwinVariant { label: "SLA in 56² windows (SLAB-Swin-T as released)", model: "slab_swin_tiny", overrides: |s| vec![format!("img_size=[{s},{s}]")] },
    SwinVariant {
        label: "SLA over the whole map (global)",
        model: "slab_swin_tiny",
        overrides: |s| vec![format!("img_size=[{s},{s}]"), format!("linear_window_size={}", s / 4)],
    },
    SwinVariant { label: "softmax in 7² windows (PRepBN-Swin-T)", model: "prepbn_swin_tiny", overrides: |s| vec![format!("img_size=[{s},{s}]")] },
];

/// SLAB-Swin-T's linear-attention stages against window softmax as the input grows (deploy
/// form, batch 1, slabformer runtime): the paper's case for linear attention in dense-prediction
/// backbones.
fn swin_sweep(plot: &Path, repeats: usize) -> Result<String> {
    let mut out = format!(
        "\n## Resolution scaling: SLA vs window attention in SLAB-Swin-T (deploy form, batch 1, slabformer runtime)\n\n\
         Stages 1–2 of SLAB-Swin-T run SLA over windows of 56 tokens a side (the whole map at 224²); the global variant makes that window the whole stage map at every size; \
         PRepBN-Swin-T is the same network with softmax attention in 7² windows in every stage.\n\n![resolution scaling]({})\n\n\
         | input | {} |\n|---:|{}\n",
        file_name(plot),
        SWIN_VARIANTS.iter().map(|v| format!("{} ms · MiB", v.label)).collect::<Vec<_>>().join(" | "),
        "---:|".repeat(SWIN_VARIANTS.len()),
    );
    let mut notes = Notes::default();
    let mut series: Vec<(String, Vec<(f64, Measured)>)> = SWIN_VARIANTS.iter().map(|v| (v.label.to_string(), Vec::new())).collect();
    for side in SWEEP_SIDES {
        let mut row = format!("| {side}² |");
        for (variant, (_, points)) in SWIN_VARIANTS.iter().zip(series.iter_mut()) {
            eprintln!("bench: resolution sweep, {} at {side}²", variant.model);
            let reps = if side > 448 { repeats.min(3) } else { repeats };
            let overrides = (variant.overrides)(side);
            let measured = notes.attempt(Some(ours(Engine::Runtime, variant.model, &overrides, 1, 1, reps).with_context(|| format!("{} at {side}²", variant.label))));
            row.push_str(&match &measured {
                Some(m) => format!(" {:.0} ms · {:.0} |", m.median_ms, m.peak_rss_mib),
                None => " n/a |".into(),
            });
            if let Some(m) = measured {
                points.push((side as f64, m));
            }
        }
        out.push_str(&row);
        out.push('\n');
    }
    out.push_str(&notes.markdown());
    series.retain(|(_, points)| !points.is_empty());
    ensure!(!series.is_empty(), "the resolution sweep measured nothing");
    draw_sweep(plot, "input side (pixels)", &series)?;
    Ok(out)
}

/// A sweep as two log-log panels (latency, peak memory), one line per series, written
/// atomically.
fn draw_sweep(path: &Path, x_desc: &str, series: &[(String, Vec<(f64, Measured)>)]) -> slabformer::error::Result<()> {
    slabformer::files::write_atomic_with(path, "plotting", |tmp| draw_sweep_panels(tmp, x_desc, series).map_err(|e| e.to_string()))
}

fn draw_sweep_panels(path: &Path, x_desc: &str, series: &[(String, Vec<(f64, Measured)>)]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    const COLORS: [RGBColor; 4] = [BLUE, RED, RGBColor(0, 140, 60), RGBColor(200, 120, 0)];
    {
        let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, 2));
        let xs: Vec<f64> = series.iter().flat_map(|(_, points)| points.iter().map(|(x, _)| *x)).collect();
        let (x_lo, x_hi) = xs.iter().fold((f64::INFINITY, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let panel = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, title: &str, unit: &str, pick: fn(&Measured) -> f64| -> std::result::Result<(), Box<dyn std::error::Error>> {
            let values = series.iter().flat_map(|(_, points)| points.iter().map(|(_, m)| pick(m)));
            let (lo, hi) = values.fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 22))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d((x_lo * 0.8..x_hi * 1.25).log_scale(), ((lo * 0.7).max(1e-3)..hi * 1.5).log_scale())?;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(unit)
                .disable_x_mesh()
                .y_labels(6)
                // The measured points are labelled below, at their own x.
                .x_label_formatter(&|_| String::new())
                .y_label_formatter(&|v| format!("{v:.0}"))
                .light_line_style(WHITE)
                .draw()?;
            let mut ticks: Vec<f64> = xs.clone();
            ticks.sort_by(f64::total_cmp);
            ticks.dedup();
            for x in ticks {
                chart.draw_series(std::iter::once(Text::new(format!("{x:.0}"), (x, (lo * 0.75).max(1e-3)), ("sans-serif", 14))))?;
            }
            for ((name, points), color) in series.iter().zip(COLORS.iter().cycle()) {
                let line: Vec<(f64, f64)> = points.iter().map(|(x, m)| (*x, pick(m))).collect();
                let color = *color;
                chart
                    .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))?
                    .label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                chart.draw_series(line.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
            }
            chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            Ok(())
        };
        panel(&panels[0], "latency (log-log)", "ms", |m| m.median_ms)?;
        panel(&panels[1], "peak memory of the process (log-log)", "MiB", |m| m.peak_rss_mib)?;
        root.present()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_reach_the_config_and_bad_ones_are_named() {
        let config = model_config("slab_swin_tiny", &["img_size=[448, 448]".into(), "linear_window_size = 112".into()]).unwrap();
        let AnyConfig::Swin(swin) = &config else { panic!("a Swin preset") };
        assert_eq!((swin.img_size, swin.linear_window_size), ([448, 448], 112));
        // A case runs what it was given: the sweep's 1344² model is 36× the 224² one's work.
        let base = model_config("slab_swin_tiny", &[]).unwrap().macs();
        let big = model_config("slab_swin_tiny", &["img_size=[1344,1344]".into()]).unwrap().macs();
        assert!(big > 30 * base, "{big} vs {base}");
        for (set, named) in [("img_size", "field=value"), ("img_size=[448,", "not JSON"), ("no_such_field=1", "no_such_field"), ("window_size=0", "window"), ("depths=[9223372036854775807,2,2,2]", "depths")] {
            let err = format!("{:#}", model_config("slab_swin_tiny", &[set.into()]).unwrap_err());
            assert!(err.contains(named), "{set}: {err}");
        }
    }

    #[test]
    fn failed_cases_are_listed_not_fatal() {
        let mut notes = Notes::default();
        assert_eq!(notes.attempt(Some(Ok(3))), Some(3));
        assert_eq!(notes.attempt::<i32>(None), None, "an absent peer is no failure");
        assert_eq!(notes.attempt::<i32>(Some(Err(anyhow::anyhow!("no fast path for X")))), None);
        assert_eq!(notes.markdown(), "\nNot measured (n/a above):\n\n- no fast path for X\n");
    }

    #[test]
    fn the_sweep_plot_is_drawn_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.png");
        let m = |ms: f64, mib: f64| Measured { median_ms: ms, min_ms: ms, max_ms: ms, peak_rss_mib: mib };
        let sla = SWEEP_TOKENS.iter().map(|&n| (n as f64, m(n as f64 / 300.0, 20.0 + n as f64 / 100.0))).collect();
        let softmax = SWEEP_TOKENS.iter().map(|&n| (n as f64, m((n * n) as f64 / 1.5e5, 20.0 + (n * n) as f64 / 2.5e5))).collect();
        draw_sweep(&path, "tokens", &[("SLA".into(), sla), ("softmax".into(), softmax)]).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }
}
