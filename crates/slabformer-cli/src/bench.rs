//! `slabformer bench`: slabformer beside ONNX Runtime (on slabformer's own ONNX export), same
//! machine, same run. Warm-up, then median and spread over repeats.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use slabformer::models::{self, VitConfig};

#[derive(Clone, Copy)]
pub struct Stats {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

fn time(warmup: usize, repeats: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut ms: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    Stats { median_ms: ms[ms.len() / 2], min_ms: ms[0], max_ms: ms[ms.len() - 1] }
}

fn images(config: &VitConfig, batch: usize, device: &Device) -> Tensor<4> {
    Tensor::random([batch, config.in_chans, config.img_size, config.img_size], Distribution::Normal(0.0, 1.0), device)
}

/// Inference of the deploy form (fused where the norms fold), forcing the result each time.
fn slabformer_inference(config: &VitConfig, batch: usize, warmup: usize, repeats: usize) -> Result<Stats> {
    let device = Device::flex();
    let model = config.init(&device)?;
    let x = images(config, batch, &device);
    Ok(match model.fuse() {
        Ok(deploy) => time(warmup, repeats, || {
            let _ = deploy.forward(x.clone()).into_data();
        }),
        Err(_) => {
            let model = model.valid();
            time(warmup, repeats, || {
                let _ = model.forward(x.clone()).into_data();
            })
        }
    })
}

fn slabformer_train_step(config: &VitConfig, batch: usize, warmup: usize, repeats: usize) -> Result<Stats> {
    let device = Device::flex().autodiff();
    let model = config.init(&device)?;
    let x = images(config, batch, &device);
    let labels = Tensor::<1, Int>::from_data((0..batch as i64).map(|i| i % config.num_classes as i64).collect::<Vec<_>>().as_slice(), &device);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    Ok(time(warmup, repeats, || {
        let loss = loss_fn.forward(model.forward(x.clone()), labels.clone());
        let grads = loss.backward();
        let _ = slabformer::state::float_tensors(&model, Some(&grads));
    }))
}

fn onnx_runtime(python: &Path, config: &VitConfig, dir: &Path, name: &str, batch: usize, warmup: usize, repeats: usize) -> Result<Option<Stats>> {
    let Ok(deploy) = config.init(&Device::flex())?.fuse() else {
        return Ok(None); // LayerNorm models have no deploy form to export
    };
    let path = dir.join(format!("{name}.onnx"));
    if !path.exists() {
        slabformer::deploy::onnx::export(&deploy, &path, false)?;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bench/ort_bench.py");
    let out = Command::new(python)
        .arg(script)
        .arg(&path)
        .args([batch, config.in_chans, config.img_size, warmup, repeats].map(|v| v.to_string()))
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    anyhow::ensure!(out.status.success(), "ONNX Runtime failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Vec<f64> = String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|s| s.parse().ok()).collect();
    anyhow::ensure!(v.len() == 3, "unexpected ONNX Runtime output");
    Ok(Some(Stats { median_ms: v[0], min_ms: v[1], max_ms: v[2] }))
}

fn cell(s: Stats, batch: usize) -> String {
    format!("{:.1} ms ({:.1}–{:.1}), {:.0} img/s", s.median_ms, s.min_ms, s.max_ms, batch as f64 * 1e3 / s.median_ms)
}

/// Runs the comparison and returns it as a Markdown report.
pub fn run(repeats: usize, python: Option<&Path>) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let mut out = String::new();
    out.push_str(&format!(
        "Machine: {} logical cores ({}). slabformer: burn flex CPU backend, deploy (fused) form where the norms fold. \
         ONNX Runtime: CPU provider on slabformer's exported ONNX. Times are medians over {repeats} repeats after warm-up (range in brackets).\n\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::env::consts::ARCH
    ));
    out.push_str("| model | batch | slabformer | ONNX Runtime | slabformer / ORT time |\n|---|---:|---|---|---:|\n");
    for name in ["deit_tiny", "prepbn_deit_tiny", "slab_deit_tiny"] {
        let config = models::preset(name)?;
        for batch in [1, 32] {
            let warmup = if batch == 1 { 3 } else { 1 };
            let ours = slabformer_inference(&config, batch, warmup, repeats)?;
            let ort = match python {
                Some(p) => onnx_runtime(p, &config, dir.path(), name, batch, warmup, repeats)?,
                None => None,
            };
            let (ort_cell, ratio) = match ort {
                Some(o) => (cell(o, batch), format!("{:.2}×", ours.median_ms / o.median_ms)),
                None => ("–".into(), "–".into()),
            };
            out.push_str(&format!("| {name} | {batch} | {} | {ort_cell} | {ratio} |\n", cell(ours, batch)));
        }
    }
    out.push_str("\n| model | training step, batch 32 (forward + backward + gradients) |\n|---|---|\n");
    for name in ["deit_tiny", "prepbn_deit_tiny", "slab_deit_tiny"] {
        let config = models::preset(name)?;
        let step = slabformer_train_step(&config, 32, 1, repeats.min(5))?;
        out.push_str(&format!("| {name} | {} |\n", cell(step, 32)));
    }
    Ok(out)
}
