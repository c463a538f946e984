//! Micro-benchmarks of the CPU runtime's kernels, whole forwards and training steps, so
//! regressions show:
//! `cargo bench -p slabformer` (criterion; reports land in target/criterion).

use burn::tensor::Device;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slabformer::models::{self, ModelFamily, VitConfig};
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::kernels::{self, MatMut, MatRef};
use slabformer::nn::attention::kernels as attention_kernels;
use slabformer::nn::mlp;
use slabformer::nn::norm::kernels as norm_kernels;
use slabformer::runtime::{CpuAttention, CpuTrainer, CpuModel};
use slabformer::optim::OptimConfig;
use std::hint::black_box;

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect()
}

/// DeiT-T's GEMMs for one image (197 tokens): qkv, fc1, fc2.
fn gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    for (m, k, n) in [(197, 192, 576), (197, 192, 768), (197, 768, 192)] {
        let (a, b) = (values(m * k), values(k * n));
        let mut out = vec![0.0; m * n];
        group.throughput(Throughput::Elements((2 * m * k * n) as u64)); // FLOPs
        group.bench_function(BenchmarkId::from_parameter(format!("{m}x{k}x{n}")), |bench| {
            bench.iter(|| kernels::matmul(MatMut::new(&mut out, m, n), MatRef::new(&a, m, k), MatRef::new(&b, k, n), false, 1.0))
        });
    }
    group.finish();
}

/// The elementwise and row kernels around the GEMMs, at DeiT-T sizes.
fn row_kernels(c: &mut Criterion) {
    let mut group = c.benchmark_group("kernels");
    let bias = values(768);
    let mut hidden = values(197 * 768);
    group.throughput(Throughput::Elements(hidden.len() as u64));
    group.bench_function("bias_gelu 197x768", |b| b.iter(|| mlp::bias_gelu(black_box(&mut hidden), &bias)));
    let mut scores = values(197 * 197);
    group.throughput(Throughput::Elements(scores.len() as u64));
    group.bench_function("softmax_rows 197x197", |b| b.iter(|| attention_kernels::softmax_rows(black_box(&mut scores), 197)));
    let (x, weight, ln_bias) = (values(197 * 192), values(192), values(192));
    let mut normed = vec![0.0; x.len()];
    group.throughput(Throughput::Elements(x.len() as u64));
    group.bench_function("layer_norm 197x192", |b| b.iter(|| norm_kernels::layer_norm(&x, &mut normed, &weight, &ln_bias, 1e-6)));
    // SLA's depthwise conv: 5×5 over the 14×14 grid, 192 channels, v read from the qkv buffer.
    let (qkv, taps, dwc_bias) = (values(196 * 576), values(25 * 192), values(192));
    let mut out = vec![0.0; 196 * 192];
    group.throughput(Throughput::Elements(out.len() as u64));
    group.bench_function("depthwise_conv 14x14x192 k5", |b| {
        let conv = attention_kernels::DepthwiseConv { taps: &taps, bias: &dwc_bias, grid: [14, 14], kernel: 5 };
        b.iter(|| conv.add_to(&qkv, 576, 384, &mut out, 0))
    });
    group.finish();
}

/// One attention layer (C = 192, 3 heads) as tokens grow: where SLA's O(N) wins.
fn attention(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("attention");
    group.sample_size(10);
    for tokens in [196, 784, 3136] {
        let side = (tokens as f64).sqrt() as usize;
        let x = values(tokens * 192);
        for (name, kind) in [("sla", AttentionKind::sla()), ("softmax", AttentionKind::Softmax)] {
            let config = AttentionConfig { dim: 192, num_heads: 3, qkv_bias: true, kind, grid: Some([side, side]) };
            let layer = CpuAttention::new(&config.init(&device)).unwrap();
            group.bench_function(BenchmarkId::new(name, tokens), |b| b.iter(|| layer.forward(&x).unwrap()));
        }
    }
    group.finish();
}

/// Whole deploy forwards at 224²: the DeiTs at batch 1 and 8, the hierarchical SLAB backbones
/// (spatial-reduction, window and cross-shaped attention) at batch 1.
fn models(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for (name, batches) in [("deit_tiny", &[1, 8][..]), ("slab_deit_tiny", &[1, 8]), ("slab_pvt_tiny", &[1]), ("slab_swin_tiny", &[1]), ("slab_cswin_tiny", &[1])] {
        let config = models::preset(name).unwrap();
        let runtime = slabformer::with_family!(&config, |F, c| CpuModel::new::<F>(&F::init(c, &device).unwrap()).unwrap());
        for &batch in batches {
            let images: Vec<f32> = slabformer::testing::standard_normal([batch, 3, 224, 224], 38, &device).into_data().try_to_vec().unwrap();
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(name, batch), |b| b.iter(|| runtime.forward(&images, batch).unwrap()));
        }
    }
    group.finish();
}

/// The training kernels' backward passes at DeiT-T sizes (8 images' rows where whole-batch), and
/// whole training steps (forward, cross-entropy, backward, AdamW) at batch 8.
fn training(c: &mut Criterion) {
    let mut group = c.benchmark_group("training");
    let rows = 8 * 197;
    let (pre, mut grad) = (values(rows * 768), values(rows * 768));
    group.throughput(Throughput::Elements(pre.len() as u64));
    group.bench_function("gelu_backward 1576x768", |b| b.iter(|| mlp::gelu_backward(&pre, black_box(&mut grad))));
    // A PRepBN at λ = 0.5: both branches' backward sums, then the input gradient.
    let (x, dy, stats) = (values(rows * 192), values(rows * 192), values(2 * rows).iter().map(|v| v.abs() + 0.5).collect::<Vec<_>>());
    let (w, beta, mean, inv_std) = (values(192), values(192), values(192), vec![1.2; 192]);
    let terms = norm_kernels::NormTerms {
        ln: Some((&stats, &w, &beta, 0.5)),
        bn: Some(norm_kernels::BnTerms { mean: &mean, inv_std: &inv_std, gamma: &w, beta: &beta, alpha: 0.7, weight: 0.5 }),
    };
    let mut sums = vec![0.0; 3 * 192 + 1];
    let mut dx = vec![0.0; x.len()];
    group.throughput(Throughput::Elements(x.len() as u64));
    group.bench_function("norm_backward 1576x192", |b| {
        b.iter(|| {
            norm_kernels::norm_backward_sums(&x, &dy, terms, &mut sums);
            norm_kernels::norm_backward_apply(&x, &dy, black_box(&mut dx), 192, terms, (&sums[..192], &sums[384..576]), rows);
        })
    });
    let mut scores = values(197 * 197);
    let probs = values(197 * 197);
    group.throughput(Throughput::Elements(scores.len() as u64));
    group.bench_function("softmax_backward_rows 197x197", |b| b.iter(|| attention_kernels::softmax_backward_rows(&probs, black_box(&mut scores), 197)));
    let (qkv, taps, dwc_bias, d_out) = (values(196 * 576), values(25 * 192), values(192), values(196 * 192));
    let (mut dqkv, mut dtaps) = (vec![0.0; 196 * 576], vec![0.0; 25 * 192]);
    group.throughput(Throughput::Elements(d_out.len() as u64));
    group.bench_function("depthwise_conv_backward 14x14x192 k5", |b| {
        let conv = attention_kernels::DepthwiseConv { taps: &taps, bias: &dwc_bias, grid: [14, 14], kernel: 5 };
        b.iter(|| conv.backward(&d_out, &qkv, 576, 384, &mut dqkv, 576, 384, &mut dtaps))
    });
    group.sample_size(10);
    let device = Device::flex();
    let batch = 8;
    for (name, config) in [("deit_tiny", VitConfig::deit_tiny()), ("slab_deit_tiny", VitConfig::slab_deit_tiny())] {
        let mut trainer = CpuTrainer::new(&config.init(&device).unwrap(), OptimConfig::default()).unwrap();
        let images: Vec<f32> = slabformer::testing::standard_normal([batch, 3, 224, 224], 39, &device).into_data().try_to_vec().unwrap();
        let targets: Vec<f32> = (0..batch * 1000).map(|i| if i % 1000 == i / 1000 { 1.0 } else { 0.0 }).collect();
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(BenchmarkId::new(format!("step {name}"), batch), |b| b.iter(|| trainer.train_step(&images, &targets, batch, 1e-4).unwrap()));
        if name == "deit_tiny" {
            // The training schedule's forward alone (layer by layer over the batch, activations
            // kept), against `forward/deit_tiny/8`, the inference schedule of the same layers.
            group.bench_function(BenchmarkId::new(format!("forward {name}"), batch), |b| b.iter(|| trainer.forward(&images, batch).unwrap()));
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, row_kernels, attention, models, training);
criterion_main!(benches);
