//! Whole models against the official code's tensors (../shared/golden).

mod common;

use burn::module::Module;
use burn::tensor::Tensor;
use common::*;
use slabformer::models::VitConfig;
use slabformer::nn::set_training;
use slabformer::state::{collect_grads, collect_state, load_state};

#[test]
fn slab_deit_tiny_matches_official_train_step_and_eval() {
    let (g, config) = golden_with_config("slab_deit_tiny");
    let device = autodiff();
    let model = slab_deit_config(&config).init(&device).unwrap();
    let (model, _) = load_state(model, &g.subset("param"), false).unwrap();
    assert_counters("loaded", &collect_state(&model), config.field("initial_counters"));

    let images: Tensor<4> = g.tensor("input.x", &device).unwrap().require_grad();
    let logits = model.try_forward(images.clone()).unwrap();
    let weight: Tensor<2> = g.tensor("input.loss_weight", &device).unwrap();
    let grads = logits.clone().mul(weight).sum().backward();
    assert_tensor("train logits", logits, &g, "output.train", Tol::Output);
    assert_grads("slab_deit_tiny", &collect_grads(&model, &grads), &g.subset("grad"));
    let (shape, v) = tensor_values(images.grad(&grads).unwrap());
    let w = g.get("grad.input").unwrap();
    assert_close("grad [input]", &shape, &v, &w.shape, &values_of(w), Tol::Grad);
    assert_state("after train", &collect_state(&model), &g.subset("state_after_train"), Tol::Output);

    let model = set_training(model, false);
    let logits = model.forward(g.tensor("input.x", &device).unwrap());
    assert_tensor("eval logits", logits, &g, "output.eval", Tol::Output);

    // The same eval on a plain (no-autodiff) device, as inference runs.
    let inference = model.valid();
    let logits = inference.forward(g.tensor("input.x", &plain()).unwrap());
    assert_tensor("inference logits", logits, &g, "output.eval", Tol::Output);
}

#[test]
#[should_panic(expected = "golden `slab_deit_tiny`: metadata `config` has no `ctor.embed_dim`")]
fn a_golden_config_without_a_constructor_field_is_refused_by_name() {
    let (_, config) = golden_with_config("slab_deit_tiny");
    slab_deit_config(&config.edited(|json| {
        json["ctor"].as_object_mut().unwrap().remove("embed_dim");
    }));
}

#[test]
#[should_panic(expected = "`norm_layer.norm1` = \"LayerNorm\" is not `LayerNorm(eps=<number>)`")]
fn a_golden_norm_layer_without_its_eps_is_refused_by_name() {
    let (_, config) = golden_with_config("slab_deit_tiny");
    slab_deit_config(&config.edited(|json| json["norm_layer"]["norm1"] = "LayerNorm".into()));
}

#[test]
fn official_checkpoint_imports_and_reproduces_logits_trained_and_fused() {
    let dir = golden_dir().join("checkpoints");
    let state = slabformer::deploy::import::read_pytorch(&dir.join("slab_deit_tiny_official.pth"))
        .unwrap_or_else(|e| panic!("import failed: {e}"));
    let g = slabformer::state::StateDict::read_safetensors(&dir.join("slab_deit_tiny_official_logits.safetensors")).unwrap();
    let device = plain();
    let model = VitConfig::slab_deit_tiny().init(&device).unwrap();
    let (model, report) = load_state(model, &state, false).unwrap();
    assert_eq!(report.loaded, state.len());
    let images = g.tensor::<4>("input.x", &device).unwrap();
    assert_tensor("imported eval logits", model.forward(images.clone()), &g, "output.eval", Tol::Output);
    let deploy = model.fuse().unwrap();
    assert_tensor("fused eval logits", deploy.forward(images), &g, "output.eval", Tol::Output);
}

#[test]
fn a_truncated_official_checkpoint_is_refused() {
    let bytes = std::fs::read(golden_dir().join("checkpoints/slab_deit_tiny_official.pth")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = slabformer::deploy::import::read_pytorch(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.pth"), "{err}");
}

/// The fast path (CPU trainer and runtime) against the official SLAB-DeiT-T train step and eval.
#[test]
fn cpu_trainer_and_runtime_match_the_official_slab_deit_tiny() {
    let (g, metadata) = golden_with_config("slab_deit_tiny");
    let config = slab_deit_config(&metadata);
    check_fast_path_against_golden::<slabformer::models::VisionTransformer>("slab_deit_tiny", &g, &config, Some(metadata.field("initial_counters")));
}
