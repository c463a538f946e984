//! The PVT family against tensors made with the official SLAB code (../shared/golden): the
//! SLAB-PVT attention layer (`sla_pvt`) and a whole tiny SLAB-PVT (`slab_pvt_tiny`), every module
//! built from the file's metadata.

mod common;

use burn::module::Module;
use burn::tensor::Tensor;
use common::*;
use slabformer::models::PvtConfig;
use slabformer::nn::attention::AttentionKind;
use slabformer::nn::attention::spatial_reduction::SrAttentionConfig;
use slabformer::nn::set_training;
use slabformer::state::{StateDict, collect_grads, collect_state, load_state};

/// The official `slab_pvt.SimplifiedLinearAttention` of a golden file: sizes from `ctor`, the
/// token grid from `HW`, the reduction's norm from `norm_layer`.
fn sla_pvt_config(config: &GoldenConfig) -> SrAttentionConfig {
    config.expect_class("models.slab_pvt.SimplifiedLinearAttention");
    let hw = config.array("HW");
    let dim = |i: usize| hw[i].as_u64().unwrap_or_else(|| panic!("HW {hw:?} is not two integers")) as usize;
    let grid = [dim(0), dim(1)];
    assert_eq!(config.usize("ctor.num_patches"), grid[0] * grid[1], "ctor.num_patches vs HW");
    SrAttentionConfig {
        dim: config.usize("ctor.dim"),
        num_heads: config.usize("ctor.num_heads"),
        qkv_bias: config.bool("ctor.qkv_bias"),
        kind: AttentionKind::Sla { kernel_size: config.usize("ctor.kernel_size") },
        sr_ratio: config.usize("ctor.sr_ratio"),
        grid,
        norm: config.prepbn_norm("norm_layer"),
    }
}

/// Four integers of the list at `path`.
fn four(config: &GoldenConfig, path: &str) -> [usize; 4] {
    let values: Vec<usize> = config.array(path).iter().map(|v| v.as_u64().unwrap_or_else(|| panic!("`{path}` holds {v}, not an integer")) as usize).collect();
    values.try_into().unwrap_or_else(|v: Vec<usize>| panic!("`{path}` has {} entries, not 4", v.len()))
}

/// The official `slab_pvt.PyramidVisionTransformer` of a golden file: sizes from `ctor`; each
/// stage's attention from `attn_type` ('L' SLA with `kernel_size`, 'S' softmax) and its reduction
/// from `la_sr_ratios` ('L') or `sr_ratios` ('S'); the PRepBN from `norm_layer`.
fn slab_pvt_config(config: &GoldenConfig) -> PvtConfig {
    config.expect_class("models.slab_pvt.PyramidVisionTransformer");
    assert_eq!(config.usize("ctor.num_stages"), 4, "only four-stage PVTs exist");
    let attn_type: Vec<char> = config.str("ctor.attn_type").chars().collect();
    let la_sr: Vec<usize> = config.str("ctor.la_sr_ratios").chars().map(|c| c.to_digit(10).expect("la_sr_ratios are digits") as usize).collect();
    assert_eq!((attn_type.len(), la_sr.len()), (4, 4), "attn_type / la_sr_ratios need one entry per stage");
    let sr = four(config, "ctor.sr_ratios");
    let kernel_size = config.usize("ctor.kernel_size");
    let stage = |i: usize| match attn_type[i] {
        'L' => (AttentionKind::Sla { kernel_size }, la_sr[i]),
        'S' => (AttentionKind::Softmax, sr[i]),
        other => panic!("attn_type letter {other:?}"),
    };
    let stages = [0, 1, 2, 3].map(stage);
    let mlp_ratios: Vec<f64> = config.array("ctor.mlp_ratios").iter().map(|v| v.as_f64().expect("mlp_ratios are numbers")).collect();
    let img = config.usize("ctor.img_size");
    PvtConfig {
        img_size: [img, img],
        patch_size: config.usize("ctor.patch_size"),
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        embed_dims: four(config, "ctor.embed_dims"),
        num_heads: four(config, "ctor.num_heads"),
        mlp_ratios: mlp_ratios.try_into().expect("four mlp_ratios"),
        depths: four(config, "ctor.depths"),
        sr_ratios: stages.map(|s| s.1),
        attention: stages.map(|s| s.0),
        qkv_bias: config.bool("ctor.qkv_bias"),
        norm: config.prepbn_norm("norm_layer"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
        unused_final_norm: false,
    }
}

fn assert_input_grad(name: &str, input: &Tensor<3>, grads: &burn::tensor::Gradients, g: &StateDict) {
    let (shape, v) = tensor_values(input.grad(grads).expect("input gradient"));
    let w = g.get("grad.input").unwrap();
    assert_close(&format!("{name} grad [input]"), &shape, &v, &w.shape, &values_of(w), Tol::Grad);
}

#[test]
fn sla_pvt_matches_official_reduced_attention() {
    let (g, config) = golden_with_config("sla_pvt");
    let device = autodiff();
    let attention = sla_pvt_config(&config).init(&device);
    let (attention, _) = load_state(attention, &g.subset("param"), false).unwrap();
    let attention = set_training(attention, config.str("mode") == "train");
    let x: Tensor<3> = g.tensor("input.x", &device).unwrap().require_grad();
    let y = attention.try_forward(x.clone()).unwrap();
    let weight: Tensor<3> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = y.clone().mul(weight).sum().backward();
    assert_tensor("sla_pvt", y, &g, "output.y", Tol::Output);
    assert_grads("sla_pvt", &collect_grads(&attention, &grads), &g.subset("grad"));
    assert_input_grad("sla_pvt", &x, &grads, &g);
    // An eval forward leaves the reduction norm's statistics and counters alone.
    assert_state("sla_pvt after", &collect_state(&attention), &g.subset("param"), Tol::Output);
}

#[test]
fn slab_pvt_tiny_matches_official_train_step_and_eval() {
    let (g, config) = golden_with_config("slab_pvt_tiny");
    let device = autodiff();
    let model = slab_pvt_config(&config).init(&device).unwrap();
    let (model, _) = load_state(model, &g.subset("param"), false).unwrap();
    assert_counters("loaded", &collect_state(&model), config.field("initial_counters"));

    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.try_forward(images.clone()).unwrap();
    let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = logits.clone().mul(weight).sum().backward();
    assert_tensor("train logits", logits, &g, "output.train", Tol::Output);
    assert_grads("slab_pvt_tiny", &collect_grads(&model, &grads), &g.subset("grad"));
    let (shape, v) = tensor_values(images.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close("grad [input]", &shape, &v, &w.shape, &values_of(w), Tol::Grad);
    assert_state("after train", &collect_state(&model), &g.subset("state_after_train"), Tol::Output);

    let model = set_training(model, false);
    let logits = model.forward(g.tensor("input.x", &device).unwrap());
    assert_tensor("eval logits", logits, &g, "output.eval", Tol::Output);

    // Inference without autodiff, unfused and fused, gives the same eval logits.
    let inference = model.valid();
    let x = g.tensor::<4>("input.x", &plain()).unwrap();
    assert_tensor("inference logits", inference.forward(x.clone()), &g, "output.eval", Tol::Output);
    let deploy = model.fuse().unwrap();
    assert_tensor("fused logits", deploy.try_forward(x).unwrap(), &g, "output.eval", Tol::Output);
}

#[test]
#[should_panic(expected = "golden `slab_pvt_tiny`: metadata `config` has no `ctor.la_sr_ratios`")]
fn a_pvt_golden_config_without_its_reductions_is_refused_by_name() {
    let (_, config) = golden_with_config("slab_pvt_tiny");
    slab_pvt_config(&config.edited(|json| {
        json["ctor"].as_object_mut().unwrap().remove("la_sr_ratios");
    }));
}

/// The CPU trainer (the PVT plan on the fast path) loaded from the official state: the same
/// train-mode logits, gradients of every parameter and state after the step (statistics and
/// counters) as the official code; then the CPU runtime's eval logits, unfused and fused.
#[test]
fn cpu_trainer_and_runtime_match_the_official_slab_pvt_tiny() {
    let (g, metadata) = golden_with_config("slab_pvt_tiny");
    let config = slab_pvt_config(&metadata);
    check_fast_path_against_golden::<slabformer::models::PyramidVisionTransformer>("slab_pvt_tiny", &g, &config, Some(metadata.field("initial_counters")));
}
