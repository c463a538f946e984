//! Mobile-Former against the authors' classes (github.com/AAboys/MobileFormer, `mobile_former.py`,
//! `dna_blocks.py`; ../shared/golden/zoo/mobile_former_tiny.safetensors): the model built from
//! the file's `ctor`, its derived block layout against the file's `layout`, the authors' state
//! loaded strictly, a train-mode step (logits, the gradient of every parameter and of the image,
//! the BatchNorm statistics after it), eval logits, and the fused model's eval logits.

mod common;

use burn::tensor::Tensor;
use common::*;
use serde_json::Value;
use slabformer::models::mobile_former::{BlockArgs, BlockKind, MobileFormerConfig};
use slabformer::nn::set_training;
use slabformer::state::{StateDict, collect_grads, collect_state, load_state};

const CASE: &str = "zoo/mobile_former_tiny";

fn golden_file() -> (StateDict, GoldenConfig) {
    let g = StateDict::read_safetensors(&golden_dir().join(format!("{CASE}.safetensors"))).unwrap();
    let config = GoldenConfig::of(CASE, &g);
    config.expect_class("mobile_former.MobileFormer (github.com/AAboys/MobileFormer)");
    (g, config)
}

/// The settings our model fixes (those of every official preset) must be the file's.
fn check_fixed_settings(config: &GoldenConfig) {
    let fixed: [(&str, Value); 16] = [
        ("gbr_type", "attn".into()),
        ("gbr_dynamic", serde_json::json!([true, false, false])),
        ("gbr_ffn", true.into()),
        ("gbr_norm", "post".into()),
        ("gbr_before_skip", false.into()),
        ("gbr_drop", serde_json::json!([0.0, 0.0])),
        ("se_flag", serde_json::json!([2, 0, 2, 0])),
        ("hyper_token_id", 0.into()),
        ("cls_token_num", 1.into()),
        ("last_act", "relu".into()),
        ("dw_conv", "dw".into()),
        ("kernel_size", serde_json::json!([3, 3])),
        ("remove_proj_local", true.into()),
        ("drop_rate", 0.0.into()),
        ("drop_path_rate", 0.0.into()),
        ("cnn_drop_path_rate", 0.0.into()),
    ];
    for (key, want) in fixed {
        let found = config.field(&format!("ctor.{key}"));
        let same = match (found.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b,
            _ => *found == want,
        };
        assert!(same, "golden `{CASE}`: ctor.{key} = {found}, our Mobile-Former fixes {want}");
    }
}

/// `MobileFormer(**ctor)`; the image side is the file's input (the authors' `img_size` only
/// sizes the unused 'mlp' bridge, ours is the input size `try_forward` checks).
fn config_of(config: &GoldenConfig) -> MobileFormerConfig {
    check_fixed_settings(config);
    let shape: Vec<usize> = config.array("input_shape").iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(shape[2], shape[3], "golden `{CASE}`: input {shape:?} is not square");
    let block_args: Vec<BlockArgs> = serde_json::from_value(config.field("ctor.block_args").clone())
        .unwrap_or_else(|e| panic!("golden `{CASE}`: ctor.block_args: {e}"));
    MobileFormerConfig {
        img_size: shape[2],
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        block_args,
        width_mult: config.f64("ctor.width_mult"),
        stem_chs: config.usize("ctor.stem_chs"),
        num_features: config.usize("ctor.num_features"),
        token_num: config.usize("ctor.token_num"),
        token_dim: config.usize("ctor.token_dim"),
        group_num: config.usize("ctor.group_num"),
        hyper_reduction_ratio: config.usize("ctor.hyper_reduction_ratio"),
        attn_num_heads: config.usize("ctor.attn_num_heads"),
        last_exp: config.usize("ctor.last_exp"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
    }
}

fn pair(v: &Value) -> [usize; 2] {
    let a = v.as_array().unwrap_or_else(|| panic!("{v} is not a pair"));
    [a[0].as_u64().unwrap() as usize, a[1].as_u64().unwrap() as usize]
}

#[test]
fn derived_layout_is_the_authors() {
    let (_, metadata) = golden_file();
    let config = config_of(&metadata);
    let ours = config.layout();
    let theirs = metadata.array("layout");
    assert_eq!(ours.len(), theirs.len(), "blocks");
    for (i, (b, want)) in ours.iter().zip(theirs).enumerate() {
        let name = want["module"].as_str().unwrap();
        assert_eq!(name, format!("features.{i}"));
        let conv_only = want["conv_only"].as_bool().unwrap();
        let kind = match (want["class"].as_str().unwrap(), conv_only) {
            (_, true) => BlockKind::ConvOnly,
            ("DnaBlock3", false) => BlockKind::Dna3,
            ("DnaBlock", false) => BlockKind::Dna,
            (other, _) => panic!("{name}: class {other}"),
        };
        assert_eq!(b.kind, kind, "{name}");
        let u = |k: &str| want[k].as_u64().unwrap_or_else(|| panic!("{name}: no `{k}`")) as usize;
        assert_eq!((b.inp, b.oup, b.stride), (u("inp"), u("oup"), u("stride")), "{name}");
        assert_eq!(b.identity, want["identity"].as_bool().unwrap(), "{name}");
        assert_eq!((b.in_grid, b.out_grid), (pair(&want["in_res"]), pair(&want["out_res"])), "{name}");
        match kind {
            BlockKind::Dna3 => assert_eq!((b.hidden1, b.hidden2), (u("hidden1"), u("hidden2")), "{name}"),
            _ => assert_eq!(b.hidden1, u("hidden"), "{name}"),
        }
    }
}

#[test]
fn authors_state_loads_strictly_and_counts_match() {
    let (g, metadata) = golden_file();
    let config = config_of(&metadata);
    let (model, _) = load_state(config.init(&plain()).unwrap(), &g.subset("param"), false).unwrap();
    assert_eq!(config.param_count(), metadata.usize("n_params"));
    assert_eq!(slabformer::state::trainable_param_count(&model), metadata.usize("n_params"));
}

#[test]
fn train_step_gradients_state_eval_and_fused_match_the_authors() {
    let (g, metadata) = golden_file();
    let config = config_of(&metadata);
    let device = autodiff();
    let (model, _) = load_state(config.init(&device).unwrap(), &g.subset("param"), false).unwrap();

    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.try_forward(images.clone()).unwrap();
    assert_tensor("mobile-former train logits", logits.clone(), &g, "output.train", Tol::Output);
    let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = logits.mul(weight).sum().backward();
    // The README's mathematically zero gradients (global_local.k.bias, classifier.fc.0.bias,
    // local_global.layer_norm.bias) are stored as round-off ≤ 5e-5: the absolute term of the
    // gradient tolerance covers them.
    assert_grads("mobile-former", &collect_grads(&model, &grads), &g.subset("grad"));
    let (shape, v) = tensor_values(images.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close("mobile-former grad [input]", &shape, &v, &w.shape, &values_of(w), Tol::Grad);

    let want_after = g.subset("state_after_train");
    let ours = collect_state(&model);
    let mut buffers = StateDict::new("ours");
    for (key, t) in ours.iter().filter(|(k, _)| k.contains("running_") || k.ends_with("num_batches_tracked")) {
        buffers.insert(key.clone(), t.clone());
    }
    assert_eq!(buffers.len(), want_after.len(), "BatchNorm buffers");
    assert_state("mobile-former after train", &buffers, &want_after, Tol::Output);

    let model = set_training(model, false);
    let x = |device| g.tensor::<4>("input.x", &device).unwrap();
    assert_tensor("mobile-former eval", model.forward(x(autodiff())), &g, "output.eval", Tol::Output);
    let deploy = model.fuse().unwrap();
    assert!(!collect_state(&deploy).keys().any(|k| k.contains("running_")), "fused model keeps a BatchNorm");
    assert_tensor("mobile-former fused eval", deploy.forward(x(plain())), &g, "output.eval", Tol::Output);
}

#[test]
#[should_panic(expected = "ctor.gbr_ffn")]
fn a_file_with_settings_we_fix_otherwise_is_refused_by_name() {
    let (_, metadata) = golden_file();
    config_of(&metadata.edited(|json| json["ctor"]["gbr_ffn"] = false.into()));
}

#[test]
fn presets_are_registered() {
    for name in ["mobile_former_26m", "mobile_former_52m", "mobile_former_96m", "mobile_former_151m", "mobile_former_214m", "mobile_former_294m", "mobile_former_508m"] {
        let config = slabformer::models::preset(name).unwrap();
        assert_eq!(config.family(), "mobile_former");
        assert_eq!(config.image().input_size(), [224, 224]);
    }
}
