//! Layers against tensors made with the official SLAB code (../shared/golden): outputs, updated
//! state (BatchNorm statistics, PRepBN counters) and gradients.

mod common;

use burn::tensor::Tensor;
use common::*;
use slabformer::nn::attention::{AttentionConfig, AttentionKind};
use slabformer::nn::norm::{LinearNorm, RepBN, RepBnInit};
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
    let (g, config) = golden_with_config("repbn");
    config.expect_class("models.prepbn.RepBN");
    let device = autodiff();
    let module = RepBN::new(config.usize("ctor.channels"), config.f64("bn.eps"), RepBnInit::Vision, &device);
    let (module, _) = load_state(module, &g.subset("param"), false).unwrap();

    check_step("repbn train", &module, &g, "input.x", "output.train", "grad", |m, x| m.forward(x));
    assert_state("repbn step 1", &collect_state(&module), &g.subset("state_after_step1"), Tol::Output);

    // The extra train forwards are steps 2, 3, …, after the first one above.
    let steps = numbered_keys(&g, "input.x_step");
    let extra = config.usize("n_extra_train_steps");
    assert_eq!(steps, (2..2 + extra).collect::<Vec<_>>(), "repbn: input.x_step* keys vs n_extra_train_steps");
    for step in steps {
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
    let (g, config) = golden_with_config("linearnorm");
    config.expect_class("models.prepbn.LinearNorm");
    assert_eq!(config.str("ctor.norm2"), "RepBN", "linearnorm: norm2");
    let device = autodiff();
    let (ln_eps, schedule) = config.linear_norm("ctor");
    let module = LinearNorm::new(config.usize("ctor.dim"), ln_eps, VISION_BN_EPS, schedule, &device);
    let trace = config.array("counter_trace");
    // The file starts from the official constructor's counters (warm, iter = step): so must we.
    assert_counters("linearnorm as constructed", &collect_state(&module), &trace[0]["before"]);
    let (module, _) = load_state(module, &g.subset("param"), false).unwrap();

    let calls = numbered_keys(&g, "input.x_t");
    assert_eq!(calls, (0..config.usize("n_train_calls")).collect::<Vec<_>>(), "linearnorm: input.x_t* keys vs n_train_calls");
    assert_eq!(calls.len(), trace.len(), "linearnorm: one counter_trace entry per call");
    for (t, expected) in calls.into_iter().zip(trace) {
        let name = format!("linearnorm t{t}");
        assert_counters(&format!("{name} before"), &collect_state(&module), &expected["before"]);
        check_step(&name, &module, &g, &format!("input.x_t{t}"), &format!("output.train_t{t}"), &format!("grad.t{t}"), |m, x| m.forward(x));
        let state = collect_state(&module);
        assert_counters(&format!("{name} after"), &state, &expected["after"]);
        assert_state(&name, &state, &g.subset(&format!("state_after_t{t}")), Tol::Output);
    }
    let module = set_training(module, false);
    let out = module.forward(g.tensor("input.x_eval", &device).unwrap());
    assert_tensor("linearnorm eval", out, &g, "output.eval", Tol::Output);
}

/// The SLA of `config`'s `ctor` on the token grid of the golden input `(B, N, C)`.
fn sla_config(config: &GoldenConfig, g: &slabformer::state::StateDict) -> AttentionConfig {
    let dim = config.usize("ctor.dim");
    let input = &g.get("input.x").unwrap().shape;
    assert_eq!(input.last(), Some(&dim), "input.x {input:?} has not ctor.dim = {dim} channels");
    AttentionConfig {
        dim,
        num_heads: config.usize("ctor.num_heads"),
        qkv_bias: config.bool("ctor.qkv_bias"),
        // slab_deit's attention hard-codes its 5×5 DWC.
        kind: AttentionKind::sla(),
        grid: Some(square_grid(input[1])),
    }
}

#[test]
fn sla_matches_official_deit_attention() {
    let (g, config) = golden_with_config("sla_deit");
    config.expect_class("models.slab_deit.Attention");
    let device = autodiff();
    let (attention, _) = load_state(sla_config(&config, &g).init(&device), &g.subset("param"), false).unwrap();
    check_step("sla", &attention, &g, "input.x", "output.y", "grad", |m, x| m.forward(x));
}

#[test]
fn slab_deit_block_matches_official_train_and_eval() {
    let (g, config) = golden_with_config("slab_deit_block");
    config.expect_class("models.slab_deit.Block");
    let device = autodiff();
    let attention = sla_config(&config, &g);
    let mlp_hidden = (attention.dim as f64 * config.f64("ctor.mlp_ratio")) as usize;
    let norm = config.prepbn_norm("norm_layer");
    let block = slabformer::models::vit::Block::new(&norm, &attention, mlp_hidden, config.f64("ctor.drop_path"), &device);
    let (block, _) = load_state(block, &g.subset("param"), false).unwrap();
    assert_counters("block loaded", &collect_state(&block), config.field("initial_counters"));

    check_step("block train", &block, &g, "input.x", "output.train", "grad", |m, x| m.forward(x));
    assert_state("block after train", &collect_state(&block), &g.subset("state_after_train"), Tol::Output);

    let block = set_training(block, false);
    let out = block.forward(g.tensor("input.x", &device).unwrap());
    assert_tensor("block eval", out, &g, "output.eval", Tol::Output);
}
