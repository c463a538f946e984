//! EfficientFormer v1 and EfficientFormer-V2 against timm 0.9.16's tensors
//! (../shared/golden/zoo/efficientformer_tiny, efficientformerv2_tiny): the model built from
//! the file's `ctor`, `param.*` loaded strictly, the train-mode logits, the gradient of every
//! parameter and of the image, the BatchNorm state after that step (counters exactly), the
//! eval logits with that state, and the fused (BatchNorm-free) model's eval logits.

mod common;

use burn::module::Module;
use burn::tensor::Tensor;
use common::*;
use slabformer::models::efficientformer::{EfficientFormer, EfficientFormerConfig};
use slabformer::models::efficientformer_v2::{EfficientFormerV2, EfficientFormerV2Config};
use slabformer::nn::set_training;
use slabformer::state::{StateDict, collect_grads, collect_state, load_state};

fn usizes(config: &GoldenConfig, path: &str) -> Vec<usize> {
    config.array(path).iter().map(|v| v.as_u64().unwrap_or_else(|| panic!("`{path}` holds {v}, not a non-negative integer")) as usize).collect()
}

/// The file's input side (timm's EfficientFormer has no img_size argument: it is fixed by the
/// attention; V2 takes `img_size`, which the input must equal).
fn input_side(config: &GoldenConfig) -> usize {
    let shape = usizes(config, "input_shape");
    assert_eq!(shape[2], shape[3], "golden: square images");
    shape[2]
}

fn v1_config(config: &GoldenConfig) -> EfficientFormerConfig {
    config.expect_class("timm.models.efficientformer.EfficientFormer");
    assert_eq!(config.str("ctor.global_pool"), "avg", "golden: timm head pooling");
    EfficientFormerConfig {
        img_size: input_side(config),
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        depths: usizes(config, "ctor.depths"),
        embed_dims: usizes(config, "ctor.embed_dims"),
        num_vit: config.usize("ctor.num_vit"),
        mlp_ratio: config.f64("ctor.mlp_ratios"),
        pool_size: config.usize("ctor.pool_size"),
        layer_scale_init_value: config.f64("ctor.layer_scale_init_value"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
    }
}

fn v2_config(config: &GoldenConfig) -> EfficientFormerV2Config {
    config.expect_class("timm.models.efficientformer_v2.EfficientFormerV2");
    assert_eq!(config.str("ctor.global_pool"), "avg", "golden: timm head pooling");
    assert_eq!(config.str("ctor.act_layer"), "gelu", "golden: the V2 presets' activation");
    assert_eq!(config.str("ctor.norm_layer"), "batchnorm2d", "golden: the V2 presets' norm");
    assert!(config.bool("ctor.distillation"), "golden: timm's V2 head always has head_dist");
    let depths = usizes(config, "ctor.depths");
    // timm's to_ntuple: a number is every block's ratio, a list gives one per block.
    let mlp_ratios = config
        .array("ctor.mlp_ratios")
        .iter()
        .zip(&depths)
        .map(|(r, &d)| match r.as_array() {
            Some(list) => list.iter().map(|v| v.as_f64().expect("a ratio")).collect(),
            None => vec![r.as_f64().expect("a ratio"); d],
        })
        .collect();
    let img_size = config.usize("ctor.img_size");
    assert_eq!(img_size, input_side(config), "golden: V2 runs at its img_size");
    EfficientFormerV2Config {
        img_size,
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        depths,
        embed_dims: usizes(config, "ctor.embed_dims"),
        mlp_ratios,
        num_vit: config.usize("ctor.num_vit"),
        layer_scale_init_value: config.f64("ctor.layer_scale_init_value"),
        norm_eps: config.f64("ctor.norm_eps"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
    }
}

/// The train step, the state after it, eval and fused eval of a model loaded from `g`.
fn check_against_golden<M: Module + slabformer::models::ImageClassifier>(name: &str, model: M, g: &StateDict, fused: impl Fn(&M) -> Tensor<2>) {
    let device = autodiff();
    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.logits(images.clone());
    assert_tensor(&format!("{name} train logits"), logits.clone(), g, "output.train", Tol::Output);
    let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = logits.mul(weight).sum().backward();
    let want_grads = g.subset("grad");
    let ours = collect_grads(&model, &grads);
    assert_eq!(ours.len() + 1, want_grads.len(), "{name}: one gradient per parameter, and the image's");
    assert_grads(name, &ours, &want_grads);
    let (shape, v) = tensor_values(images.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close(&format!("{name} grad [input]"), &shape, &v, &w.shape, &values_of(w), Tol::Grad);

    assert_state(&format!("{name} state after train"), &buffers_of(&collect_state(&model)), &g.subset("state_after_train"), Tol::Output);

    let model = set_training(model, false);
    let images: Tensor<4> = g.tensor("input.x", &device).unwrap();
    assert_tensor(&format!("{name} eval logits"), model.logits(images), g, "output.eval", Tol::Output);
    assert_tensor(&format!("{name} fused eval logits"), fused(&model), g, "output.eval", Tol::Output);
}

#[test]
fn timm_efficientformer_matches_train_gradients_state_eval_and_fused() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/efficientformer_tiny.safetensors")).unwrap();
    let config = v1_config(&GoldenConfig::of("zoo/efficientformer_tiny", &g));
    let metadata = GoldenConfig::of("zoo/efficientformer_tiny", &g);
    assert_eq!(config.param_count(), metadata.usize("n_params"), "param_count vs timm's");
    let params = g.subset("param");
    let model = config.init(&autodiff()).unwrap();
    // The persistent attention_bias_idxs we construct equal timm's.
    let ours = collect_state(&model);
    let idx: Vec<_> = ours.keys().filter(|k| k.ends_with("attention_bias_idxs")).collect();
    assert_eq!(idx.len(), params.keys().filter(|k| k.ends_with("attention_bias_idxs")).count());
    for key in idx {
        assert_eq!(ours.get(key).unwrap(), params.get(key).unwrap(), "constructed `{key}`");
    }
    let (model, report) = load_state(model, &params, false).unwrap();
    assert_eq!(report.loaded, params.len());
    let images = g.tensor("input.x", &plain()).unwrap();
    check_against_golden("timm efficientformer", model, &g, |m: &EfficientFormer| m.valid().fuse().unwrap().forward(images.clone()));
}

#[test]
fn cpu_trainer_and_runtime_match_timm_efficientformer() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/efficientformer_tiny.safetensors")).unwrap();
    let config = v1_config(&GoldenConfig::of("zoo/efficientformer_tiny", &g));
    check_fast_path_against_golden::<EfficientFormer>("efficientformer_tiny", &g, &config, None);
}

#[test]
fn timm_efficientformer_v2_matches_train_gradients_state_eval_and_fused() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/efficientformerv2_tiny.safetensors")).unwrap();
    let metadata = GoldenConfig::of("zoo/efficientformerv2_tiny", &g);
    let config = v2_config(&metadata);
    assert_eq!(config.param_count(), metadata.usize("n_params"), "param_count vs timm's");
    let params = g.subset("param");
    // The index buffers are non-persistent in V2: none in the file, and a strict load passes.
    let (model, _) = load_state(config.init(&autodiff()).unwrap(), &params, false).unwrap();

    // Our recomputed indices equal the ones timm built (stored as `buffer.*`).
    let file_buffers = g.subset("buffer");
    let mut checked = 0;
    let index_of = |t: Tensor<2, burn::tensor::Int>| t.into_data().convert::<i64>().try_to_vec::<i64>().unwrap().into_iter().map(|v| v as f64).collect::<Vec<_>>();
    for (s, stage) in model.stages.iter().enumerate() {
        if let Some(attn) = stage.downsample.as_ref().and_then(|d| d.attn.as_ref()) {
            let want = file_buffers.get(&format!("stages.{s}.downsample.attn.attention_bias_idxs")).unwrap();
            assert_eq!(index_of(attn.attention_bias_idxs.clone()), values_of(want), "stage {s} downsample index");
            checked += 1;
        }
        for (i, block) in stage.blocks.iter().enumerate() {
            if let Some(mixer) = &block.token_mixer {
                let want = file_buffers.get(&format!("stages.{s}.blocks.{i}.token_mixer.attention_bias_idxs")).unwrap();
                assert_eq!(index_of(mixer.attention_bias_idxs.clone()), values_of(want), "stages.{s}.blocks.{i} index");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, file_buffers.len(), "every timm buffer checked");
    let images = g.tensor("input.x", &plain()).unwrap();
    check_against_golden("timm efficientformer_v2", model, &g, |m: &EfficientFormerV2| m.valid().fuse().unwrap().forward(images.clone()));
}

#[test]
#[should_panic(expected = "metadata `config` has no `ctor.num_vit`")]
fn a_config_without_num_vit_is_refused_by_name() {
    let g = StateDict::read_safetensors(&golden_dir().join("zoo/efficientformer_tiny.safetensors")).unwrap();
    let config = GoldenConfig::of("zoo/efficientformer_tiny", &g);
    v1_config(&config.edited(|json| {
        json["ctor"].as_object_mut().unwrap().remove("num_vit");
    }));
}
