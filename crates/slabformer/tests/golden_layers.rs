//! Layers against tensors made with the official SLAB code (../shared/golden): outputs, updated
//! state (BatchNorm statistics, PRepBN counters) and gradients.

mod common;

use burn::tensor::Tensor;
use common::*;
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::nn::norm::{LinearNorm, NormKind, RepBN, RepBnInit};
use slabformer::nn::schedule::{Decay, PrepbnSchedule};
use slabformer::nn::set_training;
use slabformer::state::{collect_grads, collect_state, load_state};

/// One forward + backward of `loss = Σ out ⊙ loss_weight`, checking output and gradients.
fn check_step<M, F>(name: &str, module: &M, g: &slabformer::state::StateDict, input_key: &str, output_key: &str, grad_prefix: &str, forward: F)
where
    M: burn::module::Module,
    F: Fn(&M, Tensor<3>) -> Tensor<3>,
{
    let device = autodiff();
    let x: Tensor<3> = g.tensor(input_key, &device).unwrap().require_grad();
    let out = forward(module, x.clone());
    let weight: Tensor<3> = g.tensor("input.loss_weight", &device).unwrap();
    let loss = out.clone().mul(weight).sum();
    let grads = loss.backward();
    assert_tensor(name, out, g, output_key, Tol::Output);
    let want = g.subset(grad_prefix);
    assert_grads(name, &collect_grads(module, &grads), &want);
    let (shape, v) = tensor_values(x.grad(&grads).expect("input gradient"));
    let w = want.get("input").unwrap();
    assert_close(&format!("{name} grad [input]"), &shape, &v, &w.shape, &values_of(w), Tol::Grad);
}

#[test]
fn repbn_matches_official() {
    let g = golden("repbn");
    let device = autodiff();
    let module = RepBN::new(16, 1e-5, RepBnInit::Vision, &device);
    let (module, _) = load_state(module, &g.subset("param"), false).unwrap();

    check_step("repbn train", &module, &g, "input.x", "output.train", "grad", |m, x| m.forward(x));
    assert_state("repbn step 1", &collect_state(&module), &g.subset("state_after_step1"), Tol::Output);

    for step in 2..=4 {
        let x = g.tensor(&format!("input.x_step{step}"), &device).unwrap();
        let out = module.forward(x);
        assert_tensor("repbn train", out, &g, &format!("output.train_step{step}"), Tol::Output);
    }
    assert_state("repbn after train", &collect_state(&module), &g.subset("state_after_train"), Tol::Output);

    let module = set_training(module, false);
    check_step("repbn eval", &module, &g, "input.x_eval", "output.eval", "grad_eval", |m, x| m.forward(x));
    // Eval leaves the statistics alone.
    assert_state("repbn after eval", &collect_state(&module), &g.subset("state_after_train"), Tol::Output);
}

#[test]
fn linear_norm_matches_official_counters_outputs_and_grads() {
    let g = golden("linearnorm");
    let device = autodiff();
    let schedule = PrepbnSchedule { warm: 2, total: 4, r0: 1.0, decay: Decay::Linear };
    let module = LinearNorm::new(16, 1e-6, 1e-5, schedule, &device);
    let (module, _) = load_state(module, &g.subset("param"), false).unwrap();

    for t in 0..8 {
        let name = format!("linearnorm t{t}");
        check_step(&name, &module, &g, &format!("input.x_t{t}"), &format!("output.train_t{t}"), &format!("grad.t{t}"), |m, x| m.forward(x));
        assert_state(&name, &collect_state(&module), &g.subset(&format!("state_after_t{t}")), Tol::Output);
    }
    let module = set_training(module, false);
    let out = module.forward(g.tensor("input.x_eval", &device).unwrap());
    assert_tensor("linearnorm eval", out, &g, "output.eval", Tol::Output);
}

#[test]
fn sla_matches_official_deit_attention() {
    let g = golden("sla_deit");
    let device = autodiff();
    let config = AttentionConfig { dim: 32, num_heads: 2, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([14, 14]) };
    let (attention, _) = load_state(config.init(&device), &g.subset("param"), false).unwrap();
    check_step("sla", &attention, &g, "input.x", "output.y", "grad", |m, x| m.forward(x));
}

#[test]
fn slab_deit_block_matches_official_train_and_eval() {
    let g = golden("slab_deit_block");
    let device = autodiff();
    let attention = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([14, 14]) };
    let block = slabformer::models::vit::Block::new(&NormKind::prepbn(1e-6, 60_000), &attention, 192, 0.0, &device);
    let (block, _) = load_state(block, &g.subset("param"), false).unwrap();

    check_step("block train", &block, &g, "input.x", "output.train", "grad", |m, x| m.forward(x));
    assert_state("block after train", &collect_state(&block), &g.subset("state_after_train"), Tol::Output);

    let block = set_training(block, false);
    let out = block.forward(g.tensor("input.x", &device).unwrap());
    assert_tensor("block eval", out, &g, "output.eval", Tol::Output);
}
