//! Shared helpers for the golden tests: where the golden folder is, and tolerant comparisons that
//! name the worst element when they fail.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use serde_json::Value;
use slabformer::models::VitConfig;
use slabformer::nn::norm::NormKind;
use slabformer::nn::schedule::{Decay, PrepbnSchedule};
use slabformer::state::{StateDict, StateTensor, Values};

/// `$SLABFORMER_GOLDEN`, or `../shared/golden` beside the workspace. Relative paths are taken from
/// the workspace root. A missing folder fails the test: the golden checks are never skipped.
pub fn golden_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = match std::env::var_os("SLABFORMER_GOLDEN") {
        Some(p) => root.join(p),
        None => root.join("../shared/golden"),
    };
    assert!(
        dir.is_dir(),
        "golden folder {} not found: put the shared folder beside the repository or set SLABFORMER_GOLDEN",
        dir.display()
    );
    dir
}

pub fn golden(case: &str) -> StateDict {
    let path = golden_dir().join(format!("{case}.safetensors"));
    StateDict::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("golden case `{case}` is unreadable: {e}"))
}

/// A golden file's tensors and its `config` metadata.
pub fn golden_with_config(case: &str) -> (StateDict, GoldenConfig) {
    let g = golden(case);
    let config = GoldenConfig::of(case, &g);
    (g, config)
}

/// The `config` JSON in a golden file's safetensors metadata (official constructor arguments, norm
/// layer, counters, what was run; `_configs.json` only collects these). Every accessor panics naming
/// the file and the field, so a set lacking one fails clearly.
pub struct GoldenConfig {
    case: String,
    json: Value,
}

/// BatchNorm eps of the official vision RepBN; the files describe only the LayerNorm of a LinearNorm.
pub const VISION_BN_EPS: f64 = 1e-5;

impl GoldenConfig {
    pub fn of(case: &str, golden: &StateDict) -> Self {
        let text = golden
            .metadata
            .get("config")
            .unwrap_or_else(|| panic!("golden `{case}` has no `config` in its safetensors metadata"));
        let json = serde_json::from_str(text).unwrap_or_else(|e| panic!("golden `{case}`: metadata `config` is not JSON: {e}"));
        Self { case: case.into(), json }
    }

    /// A copy with `edit` applied, to test how a malformed config is refused.
    pub fn edited(&self, edit: impl FnOnce(&mut Value)) -> Self {
        let mut json = self.json.clone();
        edit(&mut json);
        Self { case: self.case.clone(), json }
    }

    /// The value at a dotted path such as `ctor.embed_dim`.
    pub fn field(&self, path: &str) -> &Value {
        path.split('.')
            .try_fold(&self.json, |v, k| v.get(k))
            .unwrap_or_else(|| panic!("golden `{}`: metadata `config` has no `{path}`", self.case))
    }

    fn typed<'a, T>(&'a self, path: &str, what: &str, get: impl FnOnce(&'a Value) -> Option<T>) -> T {
        let v = self.field(path);
        get(v).unwrap_or_else(|| panic!("golden `{}`: metadata `{path}` = {v} is not {what}", self.case))
    }

    pub fn usize(&self, path: &str) -> usize {
        self.typed(path, "a non-negative integer", |v| v.as_u64().map(|n| n as usize))
    }

    pub fn f64(&self, path: &str) -> f64 {
        self.typed(path, "a number", Value::as_f64)
    }

    pub fn bool(&self, path: &str) -> bool {
        self.typed(path, "a boolean", Value::as_bool)
    }

    pub fn str(&self, path: &str) -> &str {
        self.typed(path, "a string", Value::as_str)
    }

    pub fn array(&self, path: &str) -> &[Value] {
        self.typed(path, "an array", |v| v.as_array().map(Vec::as_slice))
    }

    /// Guards against a file of another module under an expected name.
    pub fn expect_class(&self, class: &str) {
        assert_eq!(self.str("class"), class, "golden `{}` is not of the expected official class", self.case);
    }

    /// The LinearNorm described at `path` (`norm1` "LayerNorm(eps=…)", `warm`, `step`, `r0`):
    /// its LayerNorm eps and schedule (linear decay, as the official `LinearNorm`).
    pub fn linear_norm(&self, path: &str) -> (f64, PrepbnSchedule) {
        let norm1_path = format!("{path}.norm1");
        let norm1 = self.str(&norm1_path);
        let ln_eps = norm1
            .strip_prefix("LayerNorm(eps=")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|eps| eps.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("golden `{}`: metadata `{norm1_path}` = {norm1:?} is not `LayerNorm(eps=<number>)`", self.case));
        let schedule = PrepbnSchedule {
            warm: self.usize(&format!("{path}.warm")) as u64,
            total: self.usize(&format!("{path}.step")) as u64,
            r0: self.f64(&format!("{path}.r0")),
            decay: Decay::Linear,
        };
        (ln_eps, schedule)
    }

    pub fn prepbn_norm(&self, path: &str) -> NormKind {
        let (ln_eps, schedule) = self.linear_norm(path);
        NormKind::Prepbn { ln_eps, bn_eps: VISION_BN_EPS, schedule }
    }
}

/// The official `slab_deit.VisionTransformer` of a golden file: sizes from `ctor`, the PRepBN from
/// `norm_layer`; SLA and mean pooling as in SLAB-DeiT.
pub fn slab_deit_config(config: &GoldenConfig) -> VitConfig {
    config.expect_class("models.slab_deit.VisionTransformer");
    VitConfig {
        img_size: config.usize("ctor.img_size"),
        patch_size: config.usize("ctor.patch_size"),
        in_chans: config.usize("ctor.in_chans"),
        num_classes: config.usize("ctor.num_classes"),
        embed_dim: config.usize("ctor.embed_dim"),
        depth: config.usize("ctor.depth"),
        num_heads: config.usize("ctor.num_heads"),
        mlp_ratio: config.f64("ctor.mlp_ratio"),
        qkv_bias: config.bool("ctor.qkv_bias"),
        drop_path_rate: config.f64("ctor.drop_path_rate"),
        norm: config.prepbn_norm("norm_layer"),
        ..VitConfig::slab_deit_tiny()
    }
}

/// The (rows, cols) grid of `tokens` row-major tokens; the official SLA maps are square.
pub fn square_grid(tokens: usize) -> [usize; 2] {
    let side = (tokens as f64).sqrt().round() as usize;
    assert_eq!(side * side, tokens, "{tokens} tokens are not a square grid");
    [side, side]
}

/// The numbers `n` of the keys `<prefix><n>` in `g`, ascending.
pub fn numbered_keys(g: &StateDict, prefix: &str) -> Vec<usize> {
    let mut numbers: Vec<usize> = g.keys().filter_map(|k| k.strip_prefix(prefix)?.parse().ok()).collect();
    numbers.sort_unstable();
    numbers
}

/// Every PRepBN counter of `state` named in `counters` (a metadata object such as
/// `{"warm": 0, "iter": 30000}`) has that value, and `state` has at least one of each.
pub fn assert_counters(name: &str, state: &StateDict, counters: &Value) {
    let counters = counters.as_object().unwrap_or_else(|| panic!("{name}: counters {counters} are not an object"));
    for (counter, want) in counters {
        let want = want.as_i64().unwrap_or_else(|| panic!("{name}: counter `{counter}` = {want} is not an integer"));
        let suffix = format!(".{counter}");
        let found: Vec<_> = state.iter().filter(|(k, _)| *k == counter || k.ends_with(&suffix)).collect();
        assert!(!found.is_empty(), "{name}: no `{counter}` counter in our state");
        for (key, t) in found {
            assert_eq!(t.values, Values::I64(vec![want]), "{name}: counter `{key}`");
        }
    }
}

pub fn plain() -> Device {
    Device::flex()
}

pub fn autodiff() -> Device {
    Device::flex().autodiff()
}

pub fn values_of(t: &StateTensor) -> Vec<f64> {
    match &t.values {
        Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Values::I64(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

pub fn tensor_values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f64>) {
    let shape = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    (shape, v.into_iter().map(|x| x as f64).collect())
}

#[derive(Clone, Copy)]
pub enum Tol {
    /// `max|a−b| ≤ 1e-4 + 1e-4·max|b|` (outputs, state).
    Output,
    /// `max|a−b| ≤ 1e-3 + 1e-4·max|b|` (gradients).
    Grad,
}

/// Compares `ours` against `want` with the golden README's tolerance; panics naming the worst
/// element.
pub fn assert_close(name: &str, shape: &[usize], ours: &[f64], want_shape: &[usize], want: &[f64], tol: Tol) {
    let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    assert_eq!(
        squeeze(shape),
        squeeze(want_shape),
        "{name}: shape {shape:?} vs golden {want_shape:?}"
    );
    assert_eq!(ours.len(), want.len(), "{name}: element count");
    let max_ref = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let bound = match tol {
        Tol::Output => 1e-4 + 1e-4 * max_ref,
        Tol::Grad => 1e-3 + 1e-4 * max_ref,
    };
    let (worst, diff) = ours
        .iter()
        .zip(want)
        .map(|(a, b)| if a.is_nan() || b.is_nan() { f64::INFINITY } else { (a - b).abs() })
        .enumerate()
        .fold((0, 0.0f64), |(wi, wd), (i, d)| if d > wd { (i, d) } else { (wi, wd) });
    assert!(
        diff <= bound,
        "{name}: max |Δ| = {diff:.3e} > {bound:.3e} at flat index {worst} (ours {}, golden {})",
        ours[worst],
        want[worst]
    );
}

pub fn assert_tensor<const D: usize>(name: &str, ours: Tensor<D>, golden: &StateDict, key: &str, tol: Tol) {
    let want = golden.get(key).unwrap();
    let (shape, v) = tensor_values(ours);
    assert_close(&format!("{name} [{key}]"), &shape, &v, &want.shape, &values_of(want), tol);
}

/// Every tensor of `want` must be in `ours` (same key) and close; integer buffers exactly equal.
/// Keys in `ours` that `want` lacks are an error too: names must mirror the official ones.
pub fn assert_state(name: &str, ours: &StateDict, want: &StateDict, tol: Tol) {
    let extra: Vec<_> = ours.keys().filter(|k| !want.contains(k)).collect();
    assert!(extra.is_empty(), "{name}: keys not in the golden state: {extra:?}");
    for (key, w) in want.iter() {
        let o = ours
            .get(key)
            .unwrap_or_else(|_| panic!("{name}: no `{key}` in our state"));
        match (&o.values, &w.values) {
            (Values::I64(a), Values::I64(b)) => {
                assert_eq!(a, b, "{name}: integer buffer `{key}`");
                assert_eq!(o.shape, w.shape, "{name}: shape of `{key}`");
            }
            _ => assert_close(&format!("{name} [{key}]"), &o.shape, &values_of(o), &w.shape, &values_of(w), tol),
        }
    }
}

/// Gradients: a parameter that got none must have an all-zero golden gradient.
pub fn assert_grads(name: &str, ours: &StateDict, want: &StateDict) {
    for (key, w) in want.iter() {
        if key == "input" {
            continue;
        }
        match ours.get(key) {
            Ok(o) => assert_close(&format!("{name} grad [{key}]"), &o.shape, &values_of(o), &w.shape, &values_of(w), Tol::Grad),
            Err(_) => {
                let max = values_of(w).iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(max == 0.0, "{name}: no gradient for `{key}`, golden max |grad| {max}");
            }
        }
    }
}

/// The buffers of a state (running statistics and every integer tensor: num_batches_tracked,
/// counters, EfficientFormer's persistent bias index), as timm's BatchNorm models' files hold
/// them after a train step.
pub fn buffers_of(state: &StateDict) -> StateDict {
    let mut buffers = StateDict::new("ours");
    for (key, t) in state.iter().filter(|(k, t)| slabformer::state::is_buffer_key(k) || matches!(t.values, Values::I64(_))) {
        buffers.insert(key.clone(), t.clone());
    }
    buffers
}

/// A golden file's images and loss weight as flat f32 rows, and its batch.
pub fn train_inputs(g: &StateDict) -> (Vec<f32>, Vec<f32>, usize) {
    let f32s = |key: &str| match &g.get(key).unwrap_or_else(|_| panic!("the golden file has no `{key}`")).values {
        Values::F32(v) => v.clone(),
        Values::I64(_) => panic!("{key} is not f32"),
    };
    (f32s("input.x"), f32s("input.loss_weight"), g.get("input.x").unwrap().shape[0])
}

/// The fast path against a golden train step: the CPU trainer loaded from the file's `param.*`
/// (its counters `initial_counters`, where the file states them) gives the official train-mode
/// logits, the gradient of every parameter and the state after the step (statistics and counters,
/// where the file holds it); then the CPU runtime's eval logits equal the official ones, from
/// the trained form's plan and, where the norms fold, the fused model. Returns the trainer's
/// gradients for the family's own checks.
pub fn check_fast_path_against_golden<F: slabformer::models::ModelFamily>(name: &str, g: &StateDict, config: &F::Config, initial_counters: Option<&Value>) -> StateDict {
    use slabformer::models::ImageConfig;
    use slabformer::runtime::{CpuModel, CpuTrainer};
    let mut trainer = CpuTrainer::from_state::<F>(config, &g.subset("param"), Default::default()).unwrap();
    if let Some(counters) = initial_counters {
        assert_counters(&format!("{name}: trainer loaded"), &trainer.state(), counters);
    }
    let (x, loss_weight, batch) = train_inputs(g);
    let classes = config.num_classes();
    let as_f64 = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let logits = trainer.forward(&x, batch).unwrap();
    let want = g.get("output.train").unwrap();
    assert_close(&format!("{name}: trainer logits"), &[batch, classes], &as_f64(&logits), &want.shape, &values_of(want), Tol::Output);
    // loss = Σ logits ⊙ w, so ∂loss/∂logits = w.
    trainer.backward(&loss_weight).unwrap();
    let gradients = trainer.gradients();
    assert_grads(&format!("{name}: cpu trainer"), &gradients, &g.subset("grad"));
    // timm's LayerNorm models' files hold no state after the step (no buffer changes in it); its
    // BatchNorm models' hold the buffers only.
    let after = g.subset("state_after_train");
    if after.keys().next().is_some() {
        let state = if after.keys().any(|k| k.ends_with(".weight")) { trainer.state() } else { buffers_of(&trainer.state()) };
        assert_state(&format!("{name}: cpu trainer after train"), &state, &after, Tol::Output);
    }

    let model: F = trainer.apply_to(F::init(config, &plain()).unwrap()).unwrap();
    let mut runtimes = vec![("unfused", CpuModel::from_plan(model.lower().unwrap()).unwrap())];
    if config.folds() {
        runtimes.push(("fused", CpuModel::new(&model).unwrap()));
    }
    let want = g.get("output.eval").unwrap();
    for (form, runtime) in runtimes {
        let eval = runtime.forward(&x, batch).unwrap();
        assert_close(&format!("{name}: {form} runtime eval logits"), &[batch, classes], &as_f64(&eval), &want.shape, &values_of(want), Tol::Output);
    }
    gradients
}
