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
use slabformer::models::{self, AnyConfig, VitConfig};
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::runtime::{CpuAttention, CpuModel, CpuTrainer};
use slabformer::state::host_f32;
use slabformer::optim::OptimConfig;
use slabformer::train::optim::{AdamW, param_ranks};

const MODELS: [&str; 3] = ["deit_tiny", "prepbn_deit_tiny", "slab_deit_tiny"];
const SWEEP_TOKENS: [usize; 4] = [196, 784, 3136, 12544];

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

/// A model preset, or the model of a training preset (`fashion-slab`: the quickstart's).
fn model_config(name: &str) -> Result<VitConfig> {
    let config = match models::preset(name) {
        Ok(config) => config,
        Err(_) => {
            let training = slabformer::train::config::TrainConfig::preset(name).with_context(|| format!("`{name}` is neither a model nor a training preset"))?;
            // The model does not depend on the data set size; ImageNet's keeps every preset's T within its run.
            training.resolve(1_281_167)?.model.with_context(|| format!("training preset `{name}` names no model"))?
        }
    };
    vit_config(name, config)
}

/// The bench compares the DeiT family with its peers (the official classes in `bench/`).
fn vit_config(name: &str, config: AnyConfig) -> Result<VitConfig> {
    match config {
        AnyConfig::Vit(c) => Ok(c),
        other => anyhow::bail!("`{name}` is a {} model: the bench covers the DeiT family so far", other.family()),
    }
}

/// Runs one case here and returns its measurement (`slabformer bench-case`).
pub fn run_case(engine: Engine, model: &str, batch: usize, warmup: usize, repeats: usize) -> Result<Measured> {
    let device = Device::flex();
    match engine {
        Engine::Runtime => {
            let config = model_config(model)?;
            let runtime = CpuModel::new(&config.init(&device)?)?;
            let images = host_f32(random([batch, config.in_chans, config.img_size, config.img_size], &device));
            time(warmup, repeats, || runtime.forward(&images, batch).map(drop).map_err(Into::into))
        }
        Engine::Burn => {
            let config = model_config(model)?;
            let trained = config.init(&device)?;
            let x = random([batch, config.in_chans, config.img_size, config.img_size], &device);
            match trained.fuse() {
                Ok(deploy) => time(warmup, repeats, || Ok(drop(deploy.forward(x.clone()).into_data()))),
                Err(_) => {
                    let trained = trained.valid();
                    time(warmup, repeats, || Ok(drop(trained.forward(x.clone()).into_data())))
                }
            }
        }
        Engine::Train => {
            let config = model_config(model)?;
            let mut trainer = CpuTrainer::new(&config.init(&device)?, OptimConfig::default())?;
            let images = host_f32(random([batch, config.in_chans, config.img_size, config.img_size], &device));
            let classes = config.num_classes;
            let targets: Vec<f32> = (0..batch * classes).map(|i| if i % classes == (i / classes) % classes { 1.0 } else { 0.0 }).collect();
            time(warmup, repeats, || trainer.train_step(&images, &targets, batch, 1e-3).map(drop).map_err(Into::into))
        }
        Engine::BurnTrain => {
            let config = model_config(model)?;
            let device = device.autodiff();
            let mut model = config.init(&device)?;
            let x = random([batch, config.in_chans, config.img_size, config.img_size], &device);
            let labels = Tensor::<1, Int>::from_data((0..batch as i64).map(|i| i % config.num_classes as i64).collect::<Vec<_>>().as_slice(), &device);
            let loss_fn = CrossEntropyLossConfig::new().init(&device);
            let ranks = param_ranks(&model);
            let mut optimizer = AdamW::new(OptimConfig::default());
            time(warmup, repeats, || {
                let loss = loss_fn.forward(model.forward(x.clone()), labels.clone());
                let backward = loss.backward();
                let grads = slabformer::state::float_tensors(&model, Some(&backward)).into_iter().map(|(key, g)| (key, host_f32(g))).collect();
                model = optimizer.step(model.clone(), &grads, &ranks, 1e-3);
                Ok(())
            })
        }
        Engine::SlaAttention | Engine::SoftmaxAttention => {
            let side = (batch as f64).sqrt() as usize;
            ensure!(side * side == batch, "the attention sweep needs a square token count, got {batch}");
            let kind = if engine == Engine::SlaAttention { AttentionKind::sla() } else { AttentionKind::Softmax };
            let config = AttentionConfig { dim: 192, num_heads: 3, qkv_bias: true, kind, grid: Some([side, side]) };
            let layer = CpuAttention::new(&config.init(&device))?;
            let tokens = host_f32(Tensor::<2>::random([batch, 192], Distribution::Normal(0.0, 1.0), &device));
            time(warmup, repeats, || layer.forward(&tokens).map(drop).map_err(Into::into))
        }
    }
}

/// Where the Python side lives, which interpreter runs it and which peers it has.
struct Peers {
    python: PathBuf,
    scripts: PathBuf,
    torch: Option<String>,
    onnx_runtime: Option<String>,
}

fn parse(out: std::process::Output, what: &str) -> Result<Measured> {
    ensure!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim_end());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).with_context(|| format!("{what} printed no result"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed {line}"))
}

/// A case of ours in a fresh process, so its peak memory is its own.
fn ours(engine: Engine, model: &str, batch: usize, warmup: usize, repeats: usize) -> Result<Measured> {
    let exe = std::env::current_exe()?;
    let engine_name = clap::ValueEnum::to_possible_value(&engine).expect("engines have names").get_name().to_string();
    let out = Command::new(exe)
        .args(["bench-case", "--engine", &engine_name, "--model", model])
        .args(["--batch", &batch.to_string(), "--warmup", &warmup.to_string(), "--repeats", &repeats.to_string()])
        .output()?;
    parse(out, &format!("slabformer {engine_name} {model} batch {batch}"))
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
        }
    }

    fn describe(&self) -> String {
        let missing = |what: &str| format!("no {what} in {}", self.python.display());
        format!(
            "{}; {}",
            self.torch.clone().unwrap_or_else(|| missing("PyTorch/timm")),
            self.onnx_runtime.clone().unwrap_or_else(|| missing("onnxruntime"))
        )
    }

    fn torch(&self, model: &str, batch: usize, mode: &str, warmup: usize, repeats: usize) -> Result<Option<Measured>> {
        if self.torch.is_none() {
            return Ok(None);
        }
        let out = Command::new(&self.python)
            .arg(self.scripts.join("torch_bench.py"))
            .args([model, &batch.to_string(), mode, &warmup.to_string(), &repeats.to_string()])
            .output()
            .with_context(|| format!("running {}", self.python.display()))?;
        parse(out, &format!("PyTorch {mode} {model} batch {batch}")).map(Some)
    }

    fn onnx_runtime(&self, onnx: &Path, config: &VitConfig, batch: usize, warmup: usize, repeats: usize) -> Result<Option<Measured>> {
        if self.onnx_runtime.is_none() {
            return Ok(None);
        }
        let out = Command::new(&self.python)
            .arg(self.scripts.join("ort_bench.py"))
            .arg(onnx)
            .args([batch, config.in_chans, config.img_size, warmup, repeats].map(|v| v.to_string()))
            .output()
            .with_context(|| format!("running {}", self.python.display()))?;
        parse(out, &format!("ONNX Runtime {} batch {batch}", onnx.display())).map(Some)
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

fn ratio(ours: &Measured, theirs: Option<&Measured>) -> String {
    theirs.map_or("–".into(), |t| format!("{:.2}×", ours.median_ms / t.median_ms))
}

fn cell(m: Option<&Measured>, batch: usize) -> String {
    m.map_or("–".into(), |m| time_cell(m, batch))
}

fn mib(m: Option<&Measured>) -> String {
    m.map_or("–".into(), |m| format!("{:.0}", m.peak_rss_mib))
}

pub struct Options<'a> {
    pub repeats: usize,
    pub python: Option<&'a Path>,
    /// Where to draw the attention sweep; the sweep is skipped without it.
    pub plot: Option<&'a Path>,
}

/// Runs the comparison and returns it as a Markdown report.
pub fn run(options: &Options) -> Result<String> {
    let repeats = options.repeats.max(1);
    let peers = options.python.map(Peers::new);
    let dir = tempfile::tempdir()?;
    let (peak, isa) = measured_peak_gflops();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = String::from("# Benchmarks\n\nMade by `bash bench/compare.sh` (`slabformer bench` with the pinned peers of bench/.venv); rerun it to measure your machine.\n\n");
    out.push_str(&format!(
        "Machine: {} · {threads} logical cores · FP32 peak {peak:.0} GFLOP/s, measured: every core runs 12 independent {isa} FMA chains (2 FLOP per lane), \
         the most dense float math these cores do. slabformer {} (runtime and trainer on {threads} rayon threads; the burn {} columns are the generic path they replace). {}.\n\n\
         Each case runs in its own process: warm-up, then the median of {repeats} timed calls [min–max]; memory is that process's peak resident set (VmHWM), interpreter included for the Python peers. \
         Ratios are slabformer's time over the peer's: below 1 slabformer is faster.\n\n",
        cpu_name(),
        env!("CARGO_PKG_VERSION"),
        "0.22.1 flex",
        peers.as_ref().map_or_else(|| "No Python peers (give --python)".to_string(), Peers::describe),
    ));
    out.push_str("## Inference (deploy form, 224², random weights)\n\n");
    out.push_str("| model | batch | slabformer | PyTorch eager | ONNX Runtime | / PyTorch | / ORT | slabformer GFLOP/s (% of peak) | burn forward (before the runtime) |\n|---|---:|---|---|---|---:|---:|---:|---|\n");
    let mut memory = String::from("| model | batch | slabformer | PyTorch eager | ONNX Runtime |\n|---|---:|---:|---:|---:|\n");
    for name in MODELS {
        let config = vit_config(name, models::preset(name)?)?;
        let onnx = dir.path().join(format!("{name}.onnx"));
        slabformer::deploy::onnx::export_model(&config.init(&Device::flex())?, &onnx, false)?;
        for batch in [1, 32] {
            let warmup = if batch == 1 { 5 } else { 1 };
            eprintln!("bench: {name} batch {batch}");
            let runtime = ours(Engine::Runtime, name, batch, warmup, repeats)?;
            let burn = ours(Engine::Burn, name, batch, warmup.min(2), repeats.min(5))?;
            let torch = peers.as_ref().map(|p| p.torch(name, batch, "infer", warmup, repeats)).transpose()?.flatten();
            let ort = peers.as_ref().map(|p| p.onnx_runtime(&onnx, &config, batch, warmup, repeats)).transpose()?.flatten();
            let gflops = 2.0 * config.macs() as f64 * batch as f64 / (runtime.median_ms * 1e-3) / 1e9;
            out.push_str(&format!(
                "| {name} | {batch} | {} | {} | {} | {} | {} | {gflops:.0} ({:.0} %) | {} |\n",
                time_cell(&runtime, batch),
                cell(torch.as_ref(), batch),
                cell(ort.as_ref(), batch),
                ratio(&runtime, torch.as_ref()),
                ratio(&runtime, ort.as_ref()),
                100.0 * gflops / peak,
                time_cell(&burn, batch),
            ));
            memory.push_str(&format!("| {name} | {batch} | {:.0} | {} | {} |\n", runtime.peak_rss_mib, mib(torch.as_ref()), mib(ort.as_ref())));
        }
    }
    out.push_str("\nPeak memory (MiB):\n\n");
    out.push_str(&memory);
    out.push_str("\n## Training step (batch 32, 224²: forward, cross-entropy, backward, AdamW)\n\n");
    out.push_str("| model | slabformer | PyTorch eager | / PyTorch | slabformer GFLOP/s (3 × forward) | peak MiB slabformer / PyTorch | burn autodiff (before the trainer) |\n|---|---|---|---:|---:|---|---|\n");
    for name in MODELS {
        let config = vit_config(name, models::preset(name)?)?;
        eprintln!("bench: {name} training step");
        let step = ours(Engine::Train, name, 32, 1, repeats.min(5))?;
        let burn = ours(Engine::BurnTrain, name, 32, 1, repeats.min(3))?;
        let torch = peers.as_ref().map(|p| p.torch(name, 32, "train", 1, repeats.min(5))).transpose()?.flatten();
        let gflops = 3.0 * 2.0 * config.macs() as f64 * 32.0 / (step.median_ms * 1e-3) / 1e9;
        out.push_str(&format!(
            "| {name} | {} | {} | {} | {gflops:.0} ({:.0} %) | {:.0} / {} | {} |\n",
            time_cell(&step, 32),
            cell(torch.as_ref(), 32),
            ratio(&step, torch.as_ref()),
            100.0 * gflops / peak,
            step.peak_rss_mib,
            mib(torch.as_ref()),
            time_cell(&burn, 32),
        ));
    }
    if let Some(plot) = options.plot {
        out.push_str(&sweep(plot, repeats)?);
    }
    Ok(out)
}

/// SLA vs softmax attention, one layer (C = 192, 3 heads, batch 1), as tokens grow.
fn sweep(plot: &Path, repeats: usize) -> Result<String> {
    let mut out = format!(
        "\n## Attention scaling: SLA vs softmax (one layer, C = 192, 3 heads, batch 1, slabformer runtime)\n\n![scaling]({})\n\n\
         | tokens (grid) | SLA | softmax | softmax / SLA time | SLA peak MiB | softmax peak MiB |\n|---:|---|---|---:|---:|---:|\n",
        plot.file_name().map_or_else(|| plot.display().to_string(), |f| f.to_string_lossy().into_owned())
    );
    let mut points = Vec::new();
    for tokens in SWEEP_TOKENS {
        eprintln!("bench: attention sweep, {tokens} tokens");
        let reps = if tokens > 5000 { repeats.min(3) } else { repeats };
        let sla = ours(Engine::SlaAttention, "-", tokens, 1, reps)?;
        let softmax = ours(Engine::SoftmaxAttention, "-", tokens, 1, reps)?;
        let side = (tokens as f64).sqrt() as usize;
        out.push_str(&format!(
            "| {tokens} ({side}²) | {:.2} ms | {:.2} ms | {:.1}× | {:.0} | {:.0} |\n",
            sla.median_ms, softmax.median_ms, softmax.median_ms / sla.median_ms, sla.peak_rss_mib, softmax.peak_rss_mib
        ));
        points.push((tokens, sla, softmax));
    }
    draw_sweep(plot, &points)?;
    Ok(out)
}

/// The sweep as two log-log panels (latency, peak memory), written atomically.
fn draw_sweep(path: &Path, points: &[(usize, Measured, Measured)]) -> slabformer::error::Result<()> {
    slabformer::files::write_atomic_with(path, "plotting", |tmp| draw_sweep_panels(tmp, points).map_err(|e| e.to_string()))
}

fn draw_sweep_panels(path: &Path, points: &[(usize, Measured, Measured)]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    {
        let root = BitMapBackend::new(path, (1200, 500)).into_drawing_area();
        root.fill(&WHITE)?;
        let panels = root.split_evenly((1, 2));
        let panel = |area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, title: &str, unit: &str, pick: fn(&Measured) -> f64| -> std::result::Result<(), Box<dyn std::error::Error>> {
            let xs = (points[0].0 as f64 * 0.8)..(points[points.len() - 1].0 as f64 * 1.25);
            let values = points.iter().flat_map(|(_, a, b)| [pick(a), pick(b)]);
            let (lo, hi) = values.fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 22))
                .margin(14)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(xs.log_scale(), ((lo * 0.7).max(1e-3)..hi * 1.5).log_scale())?;
            chart
                .configure_mesh()
                .x_desc("tokens")
                .y_desc(unit)
                .x_labels(4)
                .y_labels(6)
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .light_line_style(WHITE)
                .draw()?;
            for (n, _, _) in points {
                let label = Text::new(format!("{n}"), (*n as f64, (lo * 0.75).max(1e-3)), ("sans-serif", 14));
                chart.draw_series(std::iter::once(label))?;
            }
            for (name, color, pick_one) in [("SLA", BLUE, true), ("softmax", RED, false)] {
                let series: Vec<(f64, f64)> = points.iter().map(|(n, a, b)| (*n as f64, pick(if pick_one { a } else { b }))).collect();
                chart
                    .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
                chart.draw_series(series.into_iter().map(|p| Circle::new(p, 4, color.filled())))?;
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
    fn the_sweep_plot_is_drawn_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sweep.png");
        let m = |ms: f64, mib: f64| Measured { median_ms: ms, min_ms: ms, max_ms: ms, peak_rss_mib: mib };
        let points: Vec<_> = SWEEP_TOKENS.iter().map(|&n| (n, m(n as f64 / 300.0, 20.0 + n as f64 / 100.0), m((n * n) as f64 / 1.5e5, 20.0 + (n * n) as f64 / 2.5e5))).collect();
        draw_sweep(&path, &points).unwrap();
        let png = std::fs::read(&path).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }
}
