//! The Swin family against the official SLAB code's tensors (../shared/golden) and timm's
//! (../shared/golden/zoo): SLA over a Swin window, PRepBN-Swin (RepBN, window attention; train,
//! state, eval, the official merge), SLAB-Swin (PRepBN, SLA + window attention; train, gradients,
//! state, eval) and timm's LayerNorm Swin (train, gradients, eval, its recomputed buffers). Every
//! module is built from the file's metadata.

mod common;

use burn::module::Module;
use burn::tensor::Tensor;
use common::*;
use slabformer::models::swin::{FinalNormFold, SwinAttention, SwinConfig, SwinFuse, SwinLayout, SwinTransformer};
use slabformer::nn::attention::{Attention, AttentionConfig, AttentionKind};
use slabformer::nn::norm::NormKind;
use slabformer::nn::set_training;
use slabformer::state::{StateDict, collect_grads, collect_state, load_state};

/// timm's and the official Swin's LayerNorm: `nn.LayerNorm`'s default eps (the files say so in
/// their notes; no eps field is stored).
const TORCH_LAYER_NORM_EPS: f64 = 1e-5;

fn usizes(config: &GoldenConfig, path: &str) -> Vec<usize> {
    config
        .array(path)
        .iter()
        .map(|v| v.as_u64().unwrap_or_else(|| panic!("`{path}` holds {v}, not a non-negative integer")) as usize)
        .collect()
}

/// The sizes every Swin constructor shares, from `ctor`.
fn swin_sizes(config: &GoldenConfig, layout: SwinLayout, norm: NormKind) -> SwinConfig {
    let depths = usizes(config, "ctor.depths");
    let stages = depths.len();
    let window = config.usize("ctor.window_size");
    SwinConfig {
        img_size: [config.usize("ctor.img_size"); 2],
        patch_size: config.usize("ctor.patch_size"),
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        embed_dim: config.usize("ctor.embed_dim"),
        depths,
        num_heads: usizes(config, "ctor.num_heads"),
        attention: vec![AttentionKind::Softmax; stages],
        window_size: window,
        linear_window_size: window,
        mlp_ratio: config.f64("ctor.mlp_ratio"),
        qkv_bias: config.bool("ctor.qkv_bias"),
        norm,
        patch_norm: true,
        drop_path_rate: config.f64("ctor.drop_path_rate"),
        layout,
    }
}

/// `models.swin_transformer.SwinTransformer` (PRepBN-Swin: RepBN, softmax window attention) or
/// `models.slab_swin.SlabSwinTransformer` (PRepBN, `attn_type` per stage) of a golden file.
fn official_swin_config(config: &GoldenConfig) -> SwinConfig {
    assert!(!config.bool("ctor.ape"), "absolute position embeddings are not part of the Swin presets");
    let class = config.str("class");
    let mut swin = match class {
        "models.swin_transformer.SwinTransformer" => {
            let norm = config.str("norm_layer");
            assert!(norm.starts_with("RepBN"), "golden: norm_layer {norm:?} is not the class default RepBN");
            swin_sizes(config, SwinLayout::Official, NormKind::RepBn { eps: VISION_BN_EPS })
        }
        "models.slab_swin.SlabSwinTransformer" => {
            let mut swin = swin_sizes(config, SwinLayout::Official, config.prepbn_norm("norm_layer"));
            let pattern = config.str("ctor.attn_type");
            assert_eq!(pattern.len(), swin.depths.len(), "golden: attn_type {pattern:?} needs one letter per stage");
            let sla = AttentionKind::Sla { kernel_size: config.usize("ctor.kernel_size") };
            swin.attention = pattern
                .chars()
                .map(|t| match t {
                    'L' => sla,
                    'S' => AttentionKind::Softmax,
                    other => panic!("golden: attn_type letter {other:?} is not L or S"),
                })
                .collect();
            // The official rule: 'L' blocks take `window_size`, 'S' blocks 7 (12 beyond 56).
            swin.window_size = if swin.linear_window_size <= 56 { 7 } else { 12 };
            swin
        }
        other => panic!("golden: {other} is not an official Swin class"),
    };
    swin.patch_norm = config.bool("ctor.patch_norm");
    swin
}

/// `timm.models.swin_transformer.SwinTransformer` of a zoo file: LayerNorm, timm's keys.
fn timm_swin_config(config: &GoldenConfig) -> SwinConfig {
    config.expect_class("timm.models.swin_transformer.SwinTransformer");
    assert_eq!(config.str("ctor.global_pool"), "avg", "golden: timm head pooling");
    swin_sizes(config, SwinLayout::Timm, NormKind::LayerNorm { eps: TORCH_LAYER_NORM_EPS })
}

/// Builds `config`'s model on the autodiff device and loads `param.*` strictly; the buffers we
/// construct must equal the file's.
fn load_official(g: &StateDict, config: &SwinConfig) -> SwinTransformer {
    let model = config.init(&autodiff()).unwrap();
    let params = g.subset("param");
    let ours = collect_state(&model);
    let buffers = |k: &String| k.ends_with("relative_position_index") || k.ends_with("attn_mask");
    let mut checked = 0;
    for key in ours.keys().filter(|k| buffers(k)) {
        let want = params.get(key).unwrap_or_else(|_| panic!("golden has no buffer `{key}`"));
        assert_eq!(ours.get(key).unwrap(), want, "constructed buffer `{key}`");
        checked += 1;
    }
    assert_eq!(checked, params.keys().filter(|k| buffers(k)).count(), "buffers in the file vs ours");
    load_state(model, &params, false).unwrap().0
}

/// One train-mode forward and, for files with gradients, the backward of
/// `loss = Σ logits ⊙ loss_weight`: logits and the gradient of every parameter and of the image.
fn check_train_step(name: &str, model: &SwinTransformer, g: &StateDict, with_grads: bool) {
    let device = autodiff();
    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.try_forward(images.clone()).unwrap();
    assert_tensor(&format!("{name} train logits"), logits.clone(), g, "output.train", Tol::Output);
    if with_grads {
        let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
        let grads = logits.mul(weight).sum().backward();
        assert_grads(name, &collect_grads(model, &grads), &g.subset("grad"));
        let (shape, v) = tensor_values(images.grad(&grads).unwrap());
        let w = g.get("grad.input").unwrap();
        assert_close(&format!("{name} grad [input]"), &shape, &v, &w.shape, &values_of(w), Tol::Grad);
    }
}

#[test]
fn sla_matches_official_swin_window_attention() {
    let (g, config) = golden_with_config("sla_swin");
    config.expect_class("models.slab_swin.SimplifiedLinearAttention");
    let window = usizes(&config, "ctor.window_size");
    let attention = AttentionConfig {
        dim: config.usize("ctor.dim"),
        num_heads: config.usize("ctor.num_heads"),
        qkv_bias: config.bool("ctor.qkv_bias"),
        kind: AttentionKind::Sla { kernel_size: config.usize("ctor.kernel_size") },
        grid: Some([window[0], window[1]]),
    };
    let device = autodiff();
    let (attention, _) = load_state(attention.init(&device), &g.subset("param"), false).unwrap();
    assert!(matches!(attention, Attention::Linear(_)));
    let x: Tensor<3> = g.tensor("input.x", &device).unwrap().require_grad();
    let out = attention.try_forward(x.clone()).unwrap();
    let weight: Tensor<3> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = out.clone().mul(weight).sum().backward();
    assert_tensor("sla_swin", out, &g, "output.y", Tol::Output);
    assert_grads("sla_swin", &collect_grads(&attention, &grads), &g.subset("grad"));
    let (shape, v) = tensor_values(x.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close("sla_swin grad [input]", &shape, &v, &w.shape, &values_of(w), Tol::Grad);
}

#[test]
fn prepbn_swin_matches_official_train_eval_and_merge() {
    let (g, metadata) = golden_with_config("prepbn_swin_tiny");
    metadata.expect_class("models.swin_transformer.SwinTransformer");
    let config = official_swin_config(&metadata);
    let model = load_official(&g, &config);

    // The file has no gradients (its procedure runs no backward).
    check_train_step("prepbn_swin", &model, &g, false);
    assert_state("prepbn_swin after train", &collect_state(&model), &g.subset("state_after_train"), Tol::Output);

    let model = set_training(model, false);
    let x = |device| g.tensor::<4>("input.x", &device).unwrap();
    assert_tensor("prepbn_swin eval", model.forward(x(autodiff())), &g, "output.eval", Tol::Output);

    // Ours is exact: it matches the eval outputs and the official merge with the α·c term restored.
    for how in [SwinFuse::EXACT, SwinFuse { final_norm: FinalNormFold::LastStage, official_patch_embed: false }] {
        let deploy = model.fuse_with(how).unwrap();
        let logits = deploy.try_forward(x(plain())).unwrap();
        assert_tensor(&format!("{how:?} vs eval"), logits.clone(), &g, "output.eval", Tol::Output);
        assert_tensor(&format!("{how:?} vs corrected merge"), logits, &g, "output.eval_fused_corrected", Tol::Output);
    }
    // The official merge, bias omission included, reproduces its logits and its fused state.
    let official = model.fuse_with(SwinFuse::OFFICIAL).unwrap();
    assert_tensor("official merge", official.forward(x(plain())), &g, "output.eval_fused_official", Tol::Output);
    assert_state("official merge state", &collect_state(&official), &g.subset("fused"), Tol::Output);
}

#[test]
fn slab_swin_matches_official_train_step_and_eval() {
    let (g, metadata) = golden_with_config("slab_swin_tiny");
    metadata.expect_class("models.slab_swin.SlabSwinTransformer");
    let config = official_swin_config(&metadata);
    let model = load_official(&g, &config);
    assert_counters("loaded", &collect_state(&model), metadata.field("initial_counters"));
    // The 'L' stages are SLA, the 'S' ones window attention, as the file's attn_type says.
    for (stage, kind) in model.layers.iter().zip(&config.attention) {
        let linear = matches!(stage.blocks[0].attn, SwinAttention::Linear(_));
        assert_eq!(linear, kind.needs_grid());
    }

    check_train_step("slab_swin", &model, &g, true);
    assert_state("slab_swin after train", &collect_state(&model), &g.subset("state_after_train"), Tol::Output);

    let model = set_training(model, false);
    assert_tensor("slab_swin eval", model.forward(g.tensor("input.x", &autodiff()).unwrap()), &g, "output.eval", Tol::Output);
    let inference = model.valid();
    let images = g.tensor::<4>("input.x", &plain()).unwrap();
    assert_tensor("slab_swin inference", inference.forward(images.clone()), &g, "output.eval", Tol::Output);
    assert_tensor("slab_swin fused", inference.fuse().unwrap().forward(images), &g, "output.eval", Tol::Output);
}

#[test]
fn timm_swin_matches_train_gradients_eval_and_buffers() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/swin_tiny_small.safetensors")).unwrap();
    let metadata = GoldenConfig::of("zoo/swin_tiny_small", &g);
    let config = timm_swin_config(&metadata);
    let device = autodiff();
    // timm's buffers are non-persistent: the file's state has none, and a strict load must pass.
    let (model, _) = load_state(config.init(&device).unwrap(), &g.subset("param"), false).unwrap();

    // Our recomputed buffers equal the ones timm built (stored as `buffer.*` for this check).
    let buffers = g.subset("buffer");
    let mut checked = 0;
    for (s, stage) in model.layers.iter().enumerate() {
        for (i, block) in stage.blocks.iter().enumerate() {
            let SwinAttention::Window(attn) = &block.attn else { panic!("timm Swin is window attention") };
            let index = attn.relative_position_index.tensor().into_data().convert::<i64>().try_to_vec::<i64>().unwrap();
            let want = buffers.get(&format!("layers.{s}.blocks.{i}.attn.relative_position_index")).unwrap();
            assert_eq!(values_of(want), index.iter().map(|&v| v as f64).collect::<Vec<_>>(), "index of layers.{s}.blocks.{i}");
            checked += 1;
            let key = format!("layers.{s}.blocks.{i}.attn_mask");
            match (&block.attn_mask, buffers.get(&key)) {
                (Some(mask), Ok(_)) => {
                    assert_tensor(&key, mask.tensor(), &buffers, &key, Tol::Output);
                    checked += 1;
                }
                (None, Err(_)) => {}
                (ours, theirs) => panic!("{key}: ours {}, timm's {}", ours.is_some(), theirs.is_ok()),
            }
        }
    }
    assert_eq!(checked, buffers.len(), "every timm buffer checked");

    check_train_step("timm swin", &model, &g, true);
    let model = set_training(model, false);
    assert_tensor("timm swin eval", model.forward(g.tensor("input.x", &device).unwrap()), &g, "output.eval", Tol::Output);
}

#[test]
#[should_panic(expected = "golden `slab_swin_tiny`: metadata `config` has no `ctor.attn_type`")]
fn a_slab_swin_config_without_its_attention_pattern_is_refused_by_name() {
    let (_, config) = golden_with_config("slab_swin_tiny");
    official_swin_config(&config.edited(|json| {
        json["ctor"].as_object_mut().unwrap().remove("attn_type");
    }));
}

/// The CPU trainer (the Swin plan on the fast path) loaded from the official SLAB-Swin state:
/// the same train-mode logits, gradients of every parameter and state after the step
/// (statistics and counters) as the official code; then the CPU runtime's eval logits, unfused
/// and fused.
#[test]
fn cpu_trainer_and_runtime_match_the_official_slab_swin_tiny() {
    let (g, metadata) = golden_with_config("slab_swin_tiny");
    let config = official_swin_config(&metadata);
    check_fast_path_against_golden::<SwinTransformer>("slab_swin_tiny", &g, &config, Some(metadata.field("initial_counters")));
}

/// The same for timm's key layout (downsample at the start of a stage, `head.fc`, recomputed
/// buffers) with LayerNorm: train logits and every parameter's gradient, then the eval logits.
#[test]
fn cpu_trainer_and_runtime_match_timm_swin() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/swin_tiny_small.safetensors")).unwrap();
    let config = timm_swin_config(&GoldenConfig::of("zoo/swin_tiny_small", &g));
    check_fast_path_against_golden::<SwinTransformer>("timm swin", &g, &config, None);
}
