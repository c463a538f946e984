//! Micro-benchmarks of the CPU runtime's kernels and of whole forwards, so regressions show:
//! `cargo bench -p slabformer` (criterion; reports land in target/criterion).

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use slabformer::models::VitConfig;
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::runtime::kernels::{self, MatMut, MatRef};
use slabformer::runtime::{CpuAttention, CpuVit};
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
    group.bench_function("bias_gelu 197x768", |b| b.iter(|| kernels::bias_gelu(black_box(&mut hidden), &bias)));
    let mut scores = values(197 * 197);
    group.throughput(Throughput::Elements(scores.len() as u64));
    group.bench_function("softmax_rows 197x197", |b| b.iter(|| kernels::softmax_rows(black_box(&mut scores), 197)));
    let (x, weight, ln_bias) = (values(197 * 192), values(192), values(192));
    let mut normed = vec![0.0; x.len()];
    group.throughput(Throughput::Elements(x.len() as u64));
    group.bench_function("layer_norm 197x192", |b| b.iter(|| kernels::layer_norm(&x, &mut normed, &weight, &ln_bias, 1e-6)));
    // SLA's depthwise conv: 5×5 over the 14×14 grid, 192 channels, v read from the qkv buffer.
    let (qkv, taps, dwc_bias) = (values(196 * 576), values(25 * 192), values(192));
    let mut out = vec![0.0; 196 * 192];
    group.throughput(Throughput::Elements(out.len() as u64));
    group.bench_function("depthwise_conv 14x14x192 k5", |b| {
        let conv = kernels::DepthwiseConv { taps: &taps, bias: &dwc_bias, grid: [14, 14], kernel: 5 };
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

/// Whole deploy forwards at 224², batch 1 and 8.
fn models(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("forward");
    group.sample_size(10);
    for (name, config) in [("deit_tiny", VitConfig::deit_tiny()), ("slab_deit_tiny", VitConfig::slab_deit_tiny())] {
        let runtime = CpuVit::new(&config.init(&device).unwrap()).unwrap();
        for batch in [1, 8] {
            let images: Vec<f32> = Tensor::<4>::random([batch, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device).into_data().try_to_vec().unwrap();
            group.throughput(Throughput::Elements(batch as u64));
            group.bench_function(BenchmarkId::new(name, batch), |b| b.iter(|| runtime.forward(&images, batch).unwrap()));
        }
    }
    group.finish();
}

criterion_group!(benches, gemm, row_kernels, attention, models);
criterion_main!(benches);
