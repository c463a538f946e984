//! Helpers for equivalence tests (ours, and yours when you check a port against slabformer):
//! models whose every term shows in the outputs and gradients.

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};

use crate::models::{ImageConfig, ModelFamily};
use crate::state::{StateDict, Values, host_f32, map_float_tensors};

/// `module` with every parameter and buffer moved off its initial value: BatchNorm statistics,
/// RepBN α, norm affines, biases, positional encodings and class tokens random, and the other
/// weights (timm's 0.02-std init gives tiny activations) scaled by `weight_scale`, so that
/// activations are O(1) and a small error in any op shows in the logits. Draws come from burn's
/// generator; seed the device first for a reproducible model.
pub fn randomized<M: Module>(module: M, weight_scale: f64) -> M {
    map_float_tensors(module, |key, t| {
        let n = t.dims()[0];
        let uniform = |lo, hi| Tensor::<1>::random([n], Distribution::Uniform(lo, hi), &t.device());
        let is_norm_weight = key.ends_with("weight") && (key.contains("norm") || key.contains(".bn."));
        if key.ends_with("attn_mask") {
            return None; // a constant of the architecture (Swin's shifted windows)
        }
        Some(if key.ends_with("running_var") {
            uniform(0.5, 2.0)
        } else if is_norm_weight {
            uniform(0.5, 1.5)
        } else if key.ends_with("weight") {
            t.mul_scalar(weight_scale)
        } else {
            // Biases, BatchNorm means, α, positional encodings, class tokens, FLatten's scale.
            uniform(-0.5, 0.5)
        })
    })
}

/// `f` with burn's generator seeded with `seed` on `device`, under a lock: the generator is
/// process-wide, so tests drawing in parallel threads would otherwise interleave their draws and
/// be different every run.
pub fn seeded<R>(seed: u64, device: &Device, f: impl FnOnce() -> R) -> R {
    static DRAWS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = DRAWS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    device.seed(seed);
    f()
}

/// `max|ours − want| ≤ abs + rel·max|want|`, naming the worst element otherwise (NaN fails).
pub fn assert_near(what: &str, ours: &[f32], want: &[f32], rel: f32, abs: f32) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (worst, diff) = ours.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0.0f32), |w, (i, d)| if d > w.1 || d.is_nan() { (i, d) } else { w });
    assert!(diff <= rel * scale + abs, "{what}: max |Δ| = {diff:.3e} (scale {scale:.3e}) at {worst}: ours {}, want {}", ours[worst], want[worst]);
}

/// A float tensor's values; `what` names it when it is an integer tensor.
pub fn floats<'a>(what: &str, values: &'a Values) -> &'a [f32] {
    match values {
        Values::F32(v) => v,
        Values::I64(_) => panic!("{what}: an int tensor where a float one belongs"),
    }
}

/// Every tensor of `want` in `ours`: integer tensors (counters) exactly, floats by [`assert_near`].
pub fn assert_states_near(what: &str, ours: &StateDict, want: &StateDict, rel: f32, abs: f32) {
    for (key, w) in want.iter() {
        let o = ours.get(key).unwrap_or_else(|_| panic!("{what}: `{key}` missing"));
        let what = format!("{what} `{key}`");
        match (&o.values, &w.values) {
            (Values::I64(a), Values::I64(b)) => assert_eq!(a, b, "{what}"),
            (a, b) => assert_near(&what, floats(&what, a), floats(&what, b), rel, abs),
        }
    }
}

/// A model of `config` whose every op shows in the logits ([`randomized`]); BatchNorm models take
/// smaller weights (their fixed statistics do not rescale activations).
pub fn randomized_model<F: ModelFamily>(config: &F::Config, device: &Device) -> F {
    let weight_scale = if config.folds() { 3.0 } else { 6.0 };
    randomized(F::init(config, device).expect("a valid test config"), weight_scale)
}

/// `config` with its PRepBN norms (if any) past warm-up and part-way through a 4-call decay, as
/// the trainer tests take them: both branches run (λ between 0 and 1) and the counters advance.
pub fn mid_prepbn_decay<F: ModelFamily>(mut config: F::Config) -> F::Config {
    if let Some(schedule) = F::prepbn_schedule(&mut config) {
        (schedule.warm, schedule.total) = (0, 4);
    }
    config
}

/// `batch` random images of `config`'s input size.
fn images(config: &dyn ImageConfig, batch: usize, device: &Device) -> Tensor<4> {
    let [h, w] = config.input_size();
    Tensor::random([batch, config.in_chans(), h, w], Distribution::Normal(0.0, 1.0), device)
}

/// The CPU runtime of a [`randomized_model`] drawn with `seed` — its trained form's plan and,
/// where the norms fold, the fused model — equals the burn forward at batch 1 and 3 (within
/// 1e-4·max + 1e-5), with three threads splitting one image's rows and windows unevenly.
pub fn check_runtime_against_burn<F: ModelFamily>(config: &F::Config, seed: u64) {
    use crate::runtime::CpuModel;
    let device = Device::flex();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
    let (model, batches) = seeded(seed, &device, || {
        let model: F = randomized_model(config, &device);
        (model, [images(config, 1, &device), images(config, 3, &device)])
    });
    let mut runtimes = vec![("trained form", CpuModel::from_plan(model.lower().expect("the model lowers")).expect("a classifier plan"))];
    if config.folds() {
        runtimes.push(("fused", CpuModel::new(&model).expect("the fused model lowers")));
    }
    for images in batches {
        let batch = images.dims()[0];
        let want = host_f32(model.logits(images.clone()));
        for (form, runtime) in &runtimes {
            let got = pool.install(|| host_f32(runtime.forward_tensor(images.clone()).expect("the runtime runs")));
            assert_near(&format!("{config:?} {form} batch {batch}"), &got, &want, 1e-4, 1e-5);
        }
    }
}

/// One training step of the CPU trainer against burn autodiff on a [`randomized_model`] drawn
/// with `seed` (the same model and images every run): logits, the gradient of every parameter
/// (within `1e-4·max + grad_abs`: the family says what its kinds' rounding needs), and the
/// state after the forward (BatchNorm statistics, PRepBN counters exactly). With
/// `drop_path_seed`, both draw their stochastic-depth masks from it.
pub fn check_trainer_against_burn<F: ModelFamily>(config: &F::Config, seed: u64, drop_path_seed: Option<u64>, grad_abs: f32) {
    use crate::runtime::{CpuTrainer, ForwardOptions};
    use crate::state::{collect_grads, collect_state};
    let device = Device::flex().autodiff();
    let batch = 3;
    let (model, x, weight) = seeded(seed, &device, || {
        let model: F = randomized_model(config, &device);
        let x = images(config, batch, &device);
        let weight = Tensor::<2>::random([batch, config.num_classes()], Distribution::Normal(0.0, 1.0), &device);
        (model, x, weight)
    });
    let mut trainer = CpuTrainer::new(&model, Default::default()).expect("the model lowers for training");
    let drop_path_seed = drop_path_seed.unwrap_or(0);
    let logits = crate::nn::drop_path::with_seed(drop_path_seed, || model.logits(x.clone()));
    let grads = logits.clone().mul(weight.clone()).sum().backward();
    let options = ForwardOptions { drop_path_seed, advance_counters: true };
    let ours = trainer.forward_with(&host_f32(x), batch, options).expect("the trainer's forward runs");
    assert_near(&format!("{config:?}: logits"), &ours, &host_f32(logits), 1e-4, 1e-6);
    trainer.backward(&host_f32(weight)).expect("the trainer's backward runs");
    let want = collect_grads(&model, &grads);
    let ours = trainer.gradients();
    assert_eq!(ours.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "parameters with a gradient");
    assert_states_near(&format!("{config:?}: gradient"), &ours, &want, 1e-4, grad_abs);
    assert_states_near(&format!("{config:?}: state after the forward"), &trainer.state(), &collect_state(&model), 1e-5, 1e-6);
}
