//! MobileViT v1 and v2 against timm's `ByobNet` (../shared/golden/zoo): every module is built
//! from the file's metadata (`byob`, the ByoModelCfg recipe, and `ctor`), timm's state loads
//! strictly, and a train step (logits, the gradient of every parameter and of the image, the
//! BatchNorm buffers after it), the eval logits and the BN-folded deploy model's logits match.

mod common;

use burn::tensor::Tensor;
use common::*;
use slabformer::models::MobileVitConfig;
use slabformer::models::mobilevit::StageConfig;
use slabformer::nn::set_training;
use slabformer::state::{StateDict, collect_grads, collect_state, load_state};

fn zoo(case: &str) -> (StateDict, GoldenConfig) {
    let name = format!("zoo/{case}");
    let g = StateDict::read_safetensors(&golden_dir().join(format!("{name}.safetensors"))).unwrap_or_else(|e| panic!("{name}: {e}"));
    let config = GoldenConfig::of(&name, &g);
    (g, config)
}

/// timm's `ByobNet(cfg, **ctor)` of a zoo file: the stage recipes are the `byob.blocks` entries
/// as they are (timm's `c`, `d`, `s`, `br`, … read by the config's serde aliases).
fn timm_mobilevit_config(config: &GoldenConfig) -> MobileVitConfig {
    config.expect_class("timm.models.byobnet.ByobNet");
    assert_eq!(config.str("ctor.global_pool"), "avg", "golden: timm head pooling");
    assert_eq!(config.f64("ctor.drop_rate"), 0.0, "golden: the head has no dropout here");
    let input: Vec<usize> = config.array("input_shape").iter().map(|v| v.as_u64().expect("input_shape holds sizes") as usize).collect();
    assert_eq!(input[2], input[3], "golden: square images");
    let stages = config
        .array("byob.blocks")
        .iter()
        .map(|b| serde_json::from_value::<StageConfig>(b.clone()).unwrap_or_else(|e| panic!("golden: byob block {b} is not a stage recipe: {e}")))
        .collect();
    MobileVitConfig {
        img_size: input[2],
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        stem_chs: config.usize("byob.stem_chs"),
        stages,
        num_features: config.usize("byob.num_features"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
    }
}

fn check_against_timm(case: &str) {
    let (g, metadata) = zoo(case);
    let config = timm_mobilevit_config(&metadata);
    assert_eq!(config.param_count(), metadata.usize("n_params"), "{case}: parameters from the config vs timm's count");
    let device = autodiff();
    let (model, _) = load_state(config.init(&device).unwrap(), &g.subset("param"), false).unwrap();

    // Train step: logits, every gradient, the image's gradient.
    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.try_forward(images.clone()).unwrap();
    assert_tensor(&format!("{case} train logits"), logits.clone(), &g, "output.train", Tol::Output);
    let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = logits.mul(weight).sum().backward();
    let want_grads = g.subset("grad");
    let ours_grads = collect_grads(&model, &grads);
    assert_grads(case, &ours_grads, &want_grads);
    assert_eq!(ours_grads.len() + 1, want_grads.len(), "{case}: a gradient for every parameter and the input");
    let (shape, v) = tensor_values(images.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close(&format!("{case} grad [input]"), &shape, &v, &w.shape, &values_of(w), Tol::Grad);

    // The BatchNorm buffers after it (running statistics, num_batches_tracked exactly).
    let after = g.subset("state_after_train");
    let buffers = buffers_of(&collect_state(&model));
    assert_eq!(buffers.len(), after.len(), "{case}: buffers in our state vs the file's");
    assert_state(&format!("{case} after train"), &buffers, &after, Tol::Output);

    // Eval with the updated statistics, trained and BN-folded forms.
    let model = set_training(model, false);
    assert_tensor(&format!("{case} eval"), model.forward(g.tensor("input.x", &device).unwrap()), &g, "output.eval", Tol::Output);
    let deploy = model.fuse().unwrap();
    assert!(!collect_state(&deploy).keys().any(|k| k.contains(".bn.")), "{case}: a BatchNorm is left in the deploy model");
    assert_tensor(&format!("{case} fused eval"), deploy.try_forward(g.tensor("input.x", &plain()).unwrap()).unwrap(), &g, "output.eval", Tol::Output);
}

#[test]
fn mobilevit_v1_matches_timm_train_step_state_and_eval() {
    check_against_timm("mobilevit_xxs");
}

#[test]
fn cpu_trainer_and_runtime_match_timm_mobilevit_v1() {
    let (g, metadata) = zoo("mobilevit_xxs");
    check_fast_path_against_golden::<slabformer::models::MobileVit>("mobilevit_xxs", &g, &timm_mobilevit_config(&metadata), None);
}

#[test]
fn mobilevit_v2_matches_timm_train_step_state_and_eval() {
    check_against_timm("mobilevitv2_050");
}

#[test]
#[should_panic(expected = "is not a stage recipe")]
fn a_recipe_with_a_field_we_do_not_model_is_refused() {
    let (_, config) = zoo("mobilevit_xxs");
    timm_mobilevit_config(&config.edited(|json| {
        json["byob"]["blocks"][2]["gs"] = serde_json::json!(1);
    }));
}
