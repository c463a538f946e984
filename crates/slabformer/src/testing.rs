//! Helpers for equivalence tests (ours, and yours when you check a port against slabformer):
//! models whose every term shows in the outputs and gradients.

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use crate::models::{ImageConfig, ModelFamily};
use crate::state::{StateDict, Values, host_f32, map_float_tensors};

/// `module` with every parameter and buffer redrawn, so that activations are O(1) and a small
/// error in any op shows in the logits: BatchNorm variances in [0.5, 2], norm scales (the 1-D
/// weights) in [0.5, 1.5], matrices from their init's distribution scaled by `weight_scale` (linear
/// N(0, 0.02), conv N(0, 1/(3·fan_in)) — timm's small init alone gives tiny activations), and
/// biases, BatchNorm means, α, positional encodings, class tokens and bias tables in [−0.5, 0.5].
/// Each tensor comes from its own generator keyed by `seed` and its key, so a model is the same
/// in every run whatever other threads draw meanwhile (burn's generator is process-wide).
pub fn randomized<M: Module>(module: M, weight_scale: f64, seed: u64) -> M {
    let shapes = crate::state::collect_state(&module);
    map_float_tensors(module, |key, t| {
        if key.ends_with("attn_mask") {
            return None; // a constant of the architecture (Swin's shifted windows)
        }
        let shape = &shapes.get(key).expect("a key of the module").shape;
        let n = t.dims()[0];
        let mut rng = crate::data::derived_rng(&[seed, key_hash(key)]);
        let values: Vec<f32> = if key.ends_with("running_var") {
            uniform(&mut rng, n, 0.5, 2.0)
        } else if key.ends_with("weight") && shape.len() == 1 {
            uniform(&mut rng, n, 0.5, 1.5)
        } else if key.ends_with("weight") {
            let init_std = match shape.len() {
                2 => 0.02,
                // burn's conv init: Kaiming uniform with gain 1/√3 over fan_in = n / out.
                4 => (3.0 * (n / shape[0]) as f64).powf(-0.5),
                _ => panic!("randomized: no init rule for `{key}` of shape {shape:?}"),
            };
            normal(&mut rng, n, (weight_scale * init_std) as f32)
        } else {
            uniform(&mut rng, n, -0.5, 0.5)
        };
        Some(Tensor::from_data(TensorData::new(values, [n]), &t.device()))
    })
}

/// A tensor of N(0, 1) draws from a generator keyed by `seed` alone (see [`randomized`]).
pub fn standard_normal<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let values = normal(&mut crate::data::derived_rng(&[seed, 0x5EED_1A7A]), n, 1.0);
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn key_hash(key: &str) -> u64 {
    // FNV-1a: stable across runs and platforms, unlike std's hasher.
    key.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

fn uniform(rng: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn normal(rng: &mut impl Rng, n: usize, std: f32) -> Vec<f32> {
    let dist = Normal::new(0.0, std).expect("a finite std");
    (0..n).map(|_| dist.sample(rng)).collect()
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
pub fn randomized_model<F: ModelFamily>(config: &F::Config, seed: u64, device: &Device) -> F {
    let weight_scale = if config.folds() { 3.0 } else { 6.0 };
    randomized(F::init(config, device).expect("a valid test config"), weight_scale, seed)
}

/// `config` with its PRepBN norms (if any) past warm-up and part-way through a 4-call decay, as
/// the trainer tests take them: both branches run (λ between 0 and 1) and the counters advance.
pub fn mid_prepbn_decay<F: ModelFamily>(mut config: F::Config) -> F::Config {
    if let Some(schedule) = F::prepbn_schedule(&mut config) {
        (schedule.warm, schedule.total) = (0, 4);
    }
    config
}

/// `batch` random images of `config`'s input size, drawn from `seed`.
fn images(config: &dyn ImageConfig, batch: usize, seed: u64, device: &Device) -> Tensor<4> {
    let [h, w] = config.input_size();
    standard_normal([batch, config.in_chans(), h, w], seed, device)
}

/// The CPU runtime of a [`randomized_model`] drawn with `seed` — its trained form's plan and,
/// where the norms fold, the fused model — equals the burn forward at batch 1 and 3 (within
/// 1e-4·max + 1e-5), with three threads splitting one image's rows and windows unevenly.
pub fn check_runtime_against_burn<F: ModelFamily>(config: &F::Config, seed: u64) {
    use crate::runtime::CpuModel;
    let device = Device::flex();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
    let model: F = randomized_model(config, seed, &device);
    let batches = [images(config, 1, seed + 1, &device), images(config, 3, seed + 2, &device)];
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
    let model: F = randomized_model(config, seed, &device);
    let x = images(config, batch, seed + 1, &device);
    let weight = standard_normal([batch, config.num_classes()], seed + 2, &device);
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
