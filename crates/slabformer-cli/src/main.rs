//! The `slabformer` command line.

use std::time::Instant;

use anyhow::{Context, Result};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Device, Distribution, Int, Tensor};
use clap::{Parser, Subcommand};
use slabformer::models::{self, VitConfig};
use slabformer::nn::norm::Norm;
use slabformer::state::trainable_param_count;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// The main job: the preset table and a smoke run of SLAB-DeiT-T.
    Quickstart,
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info { model: None } => print_presets(),
        Command::Info { model: Some(name) } => describe(&name)?,
        Command::Smoke { model, batch } => smoke(&model, batch)?,
        Command::Quickstart => {
            print_presets();
            println!();
            smoke("slab_deit_tiny", 2)?;
        }
    }
    Ok(())
}

fn print_presets() {
    println!("| model | params | GFLOPs (MACs) | input | description |");
    println!("|---|---:|---:|---|---|");
    for preset in models::presets() {
        let config = (preset.config)();
        println!(
            "| {} | {:.2} M | {:.3} | {}² | {} |",
            preset.name,
            config.param_count() as f64 / 1e6,
            config.macs() as f64 / 1e9,
            config.img_size,
            preset.summary
        );
    }
}

fn describe(name: &str) -> Result<()> {
    let config = models::preset(name)?;
    let model = config.init(&Device::flex())?;
    println!("model:      {name}");
    println!("params:     {} ({:.2} M)", trainable_param_count(&model), trainable_param_count(&model) as f64 / 1e6);
    println!("GFLOPs:     {:.3} (multiply-accumulates at {}², batch 1)", config.macs() as f64 / 1e9, config.img_size);
    println!("tokens:     {} ({}×{} patches of {}²)", config.num_tokens(), config.grid()[0], config.grid()[1], config.patch_size);
    println!("config:     {}", serde_json::to_string_pretty(&config)?);
    Ok(())
}

fn smoke(name: &str, batch: usize) -> Result<()> {
    let config: VitConfig = models::preset(name)?;
    let device = Device::flex().autodiff();
    let model = config.init(&device)?;
    let images = Tensor::<4>::random([batch, config.in_chans, config.img_size, config.img_size], Distribution::Normal(0.0, 1.0), &device);
    let labels = Tensor::<1, Int>::from_data(
        (0..batch as i64).map(|i| i % config.num_classes as i64).collect::<Vec<_>>().as_slice(),
        &device,
    );
    let start = Instant::now();
    let logits = model.try_forward(images).context("forward")?;
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
    let lambda = match &model.blocks[0].norm1 {
        Norm::LinearNorm(n) => format!("{:.4} (next call)", n.next_phase().lambda()),
        Norm::RepBN(_) => "0 (pure RepBN)".into(),
        Norm::LayerNorm(_) => "1 (LayerNorm)".into(),
    };
    println!("smoke run of {name}: batch {batch}, logits {:?}", logits.dims());
    println!("  loss {loss_value:.4}, gradient norm {grad_norm:.4}, PRepBN λ {lambda}");
    println!("  forward {forward_s:.3} s, forward + backward {total_s:.3} s on {} threads", std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(())
}
