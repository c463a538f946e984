//! Normalizations over the channels of token tensors `(B, N, C)`: LayerNorm, BatchNorm over
//! tokens, RepBN and the progressive LN→RepBN mix (PRepBN, the official `LinearNorm`).

use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::Initializer;
use burn::tensor::module::{batch_norm, batch_norm_train, layer_norm};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub mod fast;
pub mod kernels;

pub use fast::{FastNorm, NormCache};

use super::counter::Counter;
use super::is_training;
use super::schedule::{Decay, Phase, PrepbnSchedule};
use crate::deploy::onnx::{Graph, ToOnnx, attr_float, attr_int};
use crate::error::{Error, Result, check_tokens};

/// LayerNorm over the last axis (biased variance), `weight`/`bias` as in PyTorch.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(channels: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Ones.init([channels], device),
            bias: Initializer::Zeros.init([channels], device),
            eps,
        }
    }

    pub fn channels(&self) -> usize {
        self.weight.lazy_shape()[0]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        layer_norm(x, self.weight.val(), Some(self.bias.val()), self.eps)
    }
}

/// LayerNorm over the last axis.
impl ToOnnx for LayerNorm {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let scale = g.param("ln_weight", &self.weight);
        let bias = g.param("ln_bias", &self.bias);
        Ok(g.op("LayerNormalization", &[x, &scale, &bias], vec![attr_int("axis", -1), attr_float("epsilon", self.eps as f32)]))
    }
}

/// PyTorch `BatchNorm1d` applied to tokens: per channel, statistics over all B·N tokens.
///
/// Training mode normalizes with the biased batch variance and folds the *unbiased* one into
/// `running_var` with `momentum`; eval mode uses the running statistics.
#[derive(Module, Debug)]
pub struct BatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
    pub num_batches_tracked: Counter,
    pub training: Param<Flag>,
    pub eps: f64,
    pub momentum: f64,
}

impl BatchNorm {
    pub fn new(channels: usize, eps: f64, momentum: f64, affine_init: f64, device: &Device) -> Self {
        Self {
            weight: Initializer::Constant { value: affine_init }.init([channels], device),
            bias: Initializer::Zeros.init([channels], device),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            num_batches_tracked: Counter::new(0, device),
            training: Param::from_bool(true),
            eps,
            momentum,
        }
    }

    pub fn channels(&self) -> usize {
        self.weight.lazy_shape()[0]
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let tokens = x.reshape([b * n, c]); // (B·N, C): batch_norm's [batch, channels] layout
        let y = if is_training(&self.training, &tokens) {
            self.forward_train(tokens)
        } else {
            self.forward_eval(tokens)
        };
        y.reshape([b, n, c])
    }

    /// BatchNorm2d: (B, C, H, W) planes, statistics per channel over B·H·W.
    pub fn forward_planes(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2); // (B, H·W, C)
        self.forward(tokens).swap_dims(1, 2).reshape([b, c, h, w])
    }

    /// The eval-mode map as `(a, b)` with `y = a ⊙ x + b`, for folding into a neighbour.
    pub fn eval_affine(&self) -> (Tensor<1>, Tensor<1>) {
        let (scale, mean) = self.eval_scale_and_mean();
        (scale.clone(), self.bias.val().sub(scale.mul(mean)))
    }

    fn forward_eval(&self, tokens: Tensor<2>) -> Tensor<2> {
        let device = tokens.device();
        batch_norm(
            tokens,
            self.weight.val(),
            self.bias.val(),
            self.running_mean.value().to_device(&device),
            self.running_var.value().to_device(&device),
            self.eps,
        )
    }

    fn forward_train(&self, tokens: Tensor<2>) -> Tensor<2> {
        let count = tokens.dims()[0];
        assert!(count > 1, "BatchNorm needs more than one token per channel in training");
        let device = tokens.device();
        let out = batch_norm_train(tokens, self.weight.val(), self.bias.val(), self.eps);
        let unbiased = count as f64 / (count as f64 - 1.0);
        let m = self.momentum;
        let mean = self.running_mean.value_sync().to_device(&device);
        let var = self.running_var.value_sync().to_device(&device);
        let mean = mean.mul_scalar(1.0 - m).add(out.mean.mul_scalar(m));
        let var = var
            .mul_scalar(1.0 - m)
            .add(out.variance.mul_scalar(m * unbiased));
        self.running_mean.update(mean.detach());
        self.running_var.update(var.detach());
        // RunningState parks an update per thread until synced; sync now so that state dicts
        // and checkpoints taken right after this call see it.
        self.running_mean.value_sync();
        self.running_var.value_sync();
        self.num_batches_tracked.set(self.num_batches_tracked.get() + 1);
        out.output
    }

    /// `γ / sqrt(running_var + ε)` and `running_mean`: the eval-mode map is
    /// `scale·(x − mean) + β`.
    fn eval_scale_and_mean(&self) -> (Tensor<1>, Tensor<1>) {
        let scale = self
            .weight
            .val()
            .div(self.running_var.value_sync().add_scalar(self.eps).sqrt());
        (scale, self.running_mean.value_sync())
    }
}

/// How RepBN is initialised: the vision models start as BN(x) + x, the LLaMA model as 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RepBnInit {
    /// α = 1, BN γ = 1, β = 0.
    #[default]
    Vision,
    /// α = 0, BN γ = 0, β = 0 (the output is exactly 0 at init).
    Llama,
}

/// RepBN(x) = BN(x) + α·x with one learnable scalar α (`alpha`).
#[derive(Module, Debug)]
pub struct RepBN {
    pub alpha: Param<Tensor<1>>,
    pub bn: BatchNorm,
}

impl RepBN {
    pub fn new(channels: usize, eps: f64, init: RepBnInit, device: &Device) -> Self {
        let (alpha, gamma) = match init {
            RepBnInit::Vision => (1.0, 1.0),
            RepBnInit::Llama => (0.0, 0.0),
        };
        Self {
            alpha: Initializer::Constant { value: alpha }.init([1], device),
            bn: BatchNorm::new(channels, eps, 0.1, gamma, device),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let alpha = self.alpha.val().reshape([1, 1, 1]);
        self.bn.forward(x.clone()).add(x.mul(alpha))
    }

    /// The eval-mode map as a per-channel affine `a ⊙ x + b` (SPEC §2.4):
    /// `a = γ/sqrt(v+ε) + α`, `b = β − γ·μ/sqrt(v+ε)`. Fusion folds exactly this.
    pub fn affine(&self) -> (Tensor<1>, Tensor<1>) {
        let (scale, mean) = self.bn.eval_scale_and_mean();
        let a = scale.clone().add(self.alpha.val());
        let b = self.bn.bias.val().sub(scale.mul(mean));
        (a, b)
    }
}

/// Progressive LN → RepBN (`LinearNorm` in the official code): λ·LN(x) + (1−λ)·RepBN(x) in
/// training, RepBN alone in eval.
///
/// The counters are the official buffers and advance exactly when the official ones do: once
/// per training-mode forward of this layer; `warm` first, then `iter` (λ = r0·iter/total_step,
/// taken before the decrement). See SPEC §2.5.
#[derive(Module, Debug)]
pub struct LinearNorm {
    pub norm1: LayerNorm,
    pub norm2: RepBN,
    pub warm: Counter,
    pub iter: Counter,
    pub total_step: Counter,
    pub training: Param<Flag>,
    /// Off for the extra micro-batches of an accumulated step (see `set_counter_advance`).
    pub advance: Param<Flag>,
    pub r0: f64,
    #[module(skip)]
    pub decay: Decay,
}

impl LinearNorm {
    /// Built only for `schedule.total > 0`; T = 0 is a plain [`RepBN`] (see [`NormKind::init`]).
    pub fn new(channels: usize, ln_eps: f64, bn_eps: f64, schedule: PrepbnSchedule, device: &Device) -> Self {
        assert!(schedule.total > 0, "LinearNorm with T = 0 is a RepBN");
        Self {
            norm1: LayerNorm::new(channels, ln_eps, device),
            norm2: RepBN::new(channels, bn_eps, RepBnInit::Vision, device),
            warm: Counter::new(schedule.warm as i64, device),
            iter: Counter::new(schedule.total as i64, device),
            total_step: Counter::new(schedule.total as i64, device),
            training: Param::from_bool(true),
            advance: Param::from_bool(true),
            r0: schedule.r0,
            decay: schedule.decay,
        }
    }

    /// What the next training-mode call will compute, from the counters (advances nothing).
    pub fn next_phase(&self) -> Phase {
        Phase::of_counters(self.warm.get(), self.iter.get(), self.total_step.get(), self.r0, self.decay)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if !is_training(&self.training, &x) {
            return self.norm2.forward(x);
        }
        let phase = self.next_phase();
        match phase {
            Phase::Warm => {
                if self.advance.is_enabled() {
                    self.warm.set(self.warm.get() - 1);
                }
                self.norm1.forward(x)
            }
            Phase::RepBn => self.norm2.forward(x),
            Phase::Mix(lambda) => {
                let iter = self.iter.get();
                if iter > 0 && self.advance.is_enabled() {
                    self.iter.set(iter - 1);
                }
                let ln = self.norm1.forward(x.clone()).mul_scalar(lambda);
                let rep = self.norm2.forward(x).mul_scalar(1.0f32 - lambda);
                ln.add(rep)
            }
        }
    }
}

/// The eval-mode norm. RepBN and PRepBN are exported folded into the next Linear (the deploy
/// model), so only LayerNorm is emitted as an op.
impl ToOnnx for Norm {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        match self {
            Norm::LayerNorm(n) => n.to_onnx(g, x),
            Norm::RepBN(_) | Norm::LinearNorm(_) => Err(Error::Unsupported { what: "an unfused RepBN/PRepBN (export the fused model)".into(), path: "ONNX export" }),
        }
    }
}

/// Which normalization a model uses everywhere it has one (SPEC §2.6).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NormKind {
    LayerNorm {
        eps: f64,
    },
    /// Pure RepBN (the paper's "T = 0").
    RepBn {
        eps: f64,
    },
    /// Progressive LN → RepBN; `schedule.total == 0` builds a pure RepBN.
    Prepbn {
        ln_eps: f64,
        bn_eps: f64,
        schedule: PrepbnSchedule,
    },
}

impl NormKind {
    pub fn layer_norm(eps: f64) -> Self {
        NormKind::LayerNorm { eps }
    }

    pub fn repbn() -> Self {
        NormKind::RepBn { eps: 1e-5 }
    }

    /// The official vision PRepBN: linear decay over `total` calls, no warm-up, r0 = 1.
    pub fn prepbn(ln_eps: f64, total: u64) -> Self {
        NormKind::Prepbn {
            ln_eps,
            bn_eps: 1e-5,
            schedule: PrepbnSchedule {
                warm: 0,
                total,
                r0: 1.0,
                decay: Decay::Linear,
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::Config(format!("norm {name} must be finite and > 0, got {v}")))
            }
        };
        match *self {
            NormKind::LayerNorm { eps } | NormKind::RepBn { eps } => positive("eps", eps),
            NormKind::Prepbn { ln_eps, bn_eps, schedule } => {
                positive("ln_eps", ln_eps)?;
                positive("bn_eps", bn_eps)?;
                if !(schedule.r0.is_finite() && (0.0..=1.0).contains(&schedule.r0)) {
                    return Err(Error::Config(format!(
                        "norm schedule r0 must lie in [0, 1], got {}",
                        schedule.r0
                    )));
                }
                Ok(())
            }
        }
    }

    /// Whether the eval-mode norm is an affine map that folds into a neighbouring layer (RepBN,
    /// PRepBN); LayerNorm computes its statistics online.
    pub fn folds(&self) -> bool {
        !matches!(self, NormKind::LayerNorm { .. })
    }

    pub fn init(&self, channels: usize, device: &Device) -> Norm {
        match *self {
            NormKind::LayerNorm { eps } => Norm::LayerNorm(LayerNorm::new(channels, eps, device)),
            NormKind::RepBn { eps } => Norm::RepBN(RepBN::new(channels, eps, RepBnInit::Vision, device)),
            NormKind::Prepbn { bn_eps, schedule, .. } if schedule.total == 0 => {
                Norm::RepBN(RepBN::new(channels, bn_eps, RepBnInit::Vision, device))
            }
            NormKind::Prepbn { ln_eps, bn_eps, schedule } => {
                Norm::LinearNorm(LinearNorm::new(channels, ln_eps, bn_eps, schedule, device))
            }
        }
    }

    /// Trainable parameters of one such norm over `channels`.
    pub fn param_count(&self, channels: usize) -> usize {
        match *self {
            NormKind::LayerNorm { .. } => 2 * channels,
            NormKind::RepBn { .. } => 2 * channels + 1,
            NormKind::Prepbn { schedule, .. } if schedule.total == 0 => 2 * channels + 1,
            NormKind::Prepbn { .. } => 4 * channels + 1,
        }
    }
}

/// A norm layer of any kind; adds no component to parameter keys.
#[derive(Module, Debug)]
pub enum Norm {
    LayerNorm(LayerNorm),
    RepBN(RepBN),
    LinearNorm(LinearNorm),
}

impl Norm {
    pub fn channels(&self) -> usize {
        match self {
            Norm::LayerNorm(n) => n.channels(),
            Norm::RepBN(n) => n.bn.channels(),
            Norm::LinearNorm(n) => n.norm1.channels(),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        match self {
            Norm::LayerNorm(n) => n.forward(x),
            Norm::RepBN(n) => n.forward(x),
            Norm::LinearNorm(n) => n.forward(x),
        }
    }

    /// The eval-mode map as `(a, b)` with `y = a ⊙ x + b`, for folding into a neighbour; an
    /// error for LayerNorm, whose statistics are computed online and cannot be folded.
    pub fn eval_affine(&self) -> Result<(Tensor<1>, Tensor<1>)> {
        match self {
            Norm::LayerNorm(_) => Err(Error::Config("LayerNorm models have no foldable norms: only RepBN/PRepBN models re-parameterize".into())),
            Norm::RepBN(n) => Ok(n.affine()),
            Norm::LinearNorm(n) => Ok(n.norm2.affine()),
        }
    }

    /// [`forward`](Self::forward) after checking the input is `(B, N, C)` with this norm's C.
    pub fn try_forward(&self, x: Tensor<3>) -> Result<Tensor<3>> {
        check_tokens("norm", x.dims(), None, self.channels())?;
        let [b, n, _] = x.dims();
        let uses_batch_stats = match self {
            Norm::LayerNorm(_) => false,
            Norm::RepBN(n) => is_training(&n.bn.training, &x),
            Norm::LinearNorm(l) => is_training(&l.training, &x) && l.next_phase() != Phase::Warm,
        };
        if uses_batch_stats && b * n < 2 {
            return Err(Error::InputShape {
                layer: "norm",
                expected: "at least 2 tokens in the batch for BatchNorm statistics".into(),
                found: vec![b, n, self.channels()],
            });
        }
        Ok(self.forward(x))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::nn::set_training;
    use burn::tensor::Distribution;

    fn autodiff() -> Device {
        Device::flex().autodiff()
    }

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        values(a.sub(b).abs().max())[0]
    }

    fn random(shape: [usize; 3], device: &Device) -> Tensor<3> {
        Tensor::random(shape, Distribution::Normal(0.5, 2.0), device)
    }

    /// Random running statistics and affine parameters (α = 0.37), so eval-mode maps are
    /// non-trivial.
    pub(crate) fn randomized_repbn(channels: usize, device: &Device) -> RepBN {
        let mut rep = RepBN::new(channels, 1e-5, RepBnInit::Vision, device);
        let uniform = |lo, hi| Tensor::<1>::random([channels], Distribution::Uniform(lo, hi), device);
        rep.alpha = Param::from_tensor(Tensor::from_floats([0.37], device));
        rep.bn.weight = Param::from_tensor(uniform(0.5, 1.5));
        rep.bn.bias = Param::from_tensor(uniform(-0.5, 0.5));
        rep.bn.running_mean = RunningState::new(uniform(-1.0, 1.0));
        rep.bn.running_var = RunningState::new(uniform(0.5, 2.0));
        rep
    }

    #[test]
    fn batch_norm_training_normalizes_and_updates_unbiased_running_stats() {
        let device = autodiff();
        let bn = BatchNorm::new(8, 1e-5, 0.1, 1.0, &device);
        let x = random([3, 5, 8], &device);
        let y = bn.forward(x.clone());
        let flat = y.reshape([15, 8]);
        let mean = flat.clone().mean_dim(0);
        let var = flat.clone().sub(mean.clone()).powf_scalar(2.0).mean_dim(0);
        assert!(values(mean).iter().all(|m| m.abs() < 1e-4));
        assert!(values(var).iter().all(|v| (v - 1.0).abs() < 1e-3));

        let xs = x.reshape([15, 8]);
        let batch_mean = xs.clone().mean_dim(0).reshape([8]);
        let unbiased = xs.sub(batch_mean.clone().reshape([1, 8])).powf_scalar(2.0).sum_dim(0).reshape([8]).div_scalar(14.0);
        let want_mean = batch_mean.mul_scalar(0.1);
        let want_var = unbiased.mul_scalar(0.1).add_scalar(0.9);
        assert!(max_abs_diff(bn.running_mean.value_sync(), want_mean) < 1e-5);
        assert!(max_abs_diff(bn.running_var.value_sync(), want_var) < 1e-5);
        assert_eq!(bn.num_batches_tracked.get(), 1);
    }

    #[test]
    fn repbn_eval_is_its_affine_form_and_lemma_4_1_holds() {
        let device = Device::flex();
        let rep = randomized_repbn(6, &device);
        let x = random([2, 7, 6], &device);
        let y = rep.forward(x.clone()); // plain device: eval mode
        let (a, b) = rep.affine();
        let affine = x.clone().mul(a.reshape([1, 1, 6])).add(b.reshape([1, 1, 6]));
        assert!(max_abs_diff(y.clone(), affine) < 1e-5);

        // Lemma 4.1: RepBN(x; μ, σ, γ, β) = BN(x; μ, σ, γ + ησ, β + ημ).
        let eta = 0.37;
        let sigma = rep.bn.running_var.value().add_scalar(1e-5).sqrt();
        let mu = rep.bn.running_mean.value();
        let mut plain_bn = BatchNorm::new(6, 1e-5, 0.1, 1.0, &device);
        plain_bn.weight = Param::from_tensor(rep.bn.weight.val().add(sigma.mul_scalar(eta)));
        plain_bn.bias = Param::from_tensor(rep.bn.bias.val().add(mu.clone().mul_scalar(eta)));
        plain_bn.running_mean = RunningState::new(mu);
        plain_bn.running_var = RunningState::new(rep.bn.running_var.value());
        assert!(max_abs_diff(y, plain_bn.forward(x)) < 1e-5);
    }

    #[test]
    fn llama_repbn_starts_at_exactly_zero() {
        let device = autodiff();
        let rep = RepBN::new(8, 1e-6, RepBnInit::Llama, &device);
        let out = rep.forward(random([2, 4, 8], &device));
        assert!(values(out).iter().all(|v| *v == 0.0));
    }

    #[test]
    fn prepbn_counters_follow_the_schedule_and_eval_is_repbn() {
        let device = autodiff();
        let schedule = PrepbnSchedule { warm: 3, total: 4, r0: 1.0, decay: Decay::Linear };
        let norm = LinearNorm::new(8, 1e-6, 1e-5, schedule, &device);
        let initial_mean = values(norm.norm2.bn.running_mean.value_sync());
        let x = random([2, 5, 8], &device);
        for call in 0..10 {
            assert_eq!(norm.next_phase(), schedule.phase(call), "call {call}");
            let phase = norm.next_phase();
            let out = values(norm.forward(x.clone()));
            if call < 3 {
                // Warm-up: LayerNorm only, BatchNorm statistics untouched.
                assert_eq!(phase, Phase::Warm);
                assert_eq!(values(norm.norm2.bn.running_mean.value_sync()), initial_mean);
            }
            if matches!(phase, Phase::Warm | Phase::Mix(1.0)) {
                assert_eq!(out, values(norm.norm1.forward(x.clone())));
            }
            // An eval call in between advances nothing and is RepBN with running statistics.
            let snapshot = (norm.warm.get(), norm.iter.get());
            let e = set_training(norm.clone(), false).forward(x.clone());
            assert_eq!((norm.warm.get(), norm.iter.get()), snapshot);
            let rep_eval = set_training(norm.norm2.clone(), false).forward(x.clone());
            assert_eq!(values(e), values(rep_eval));
        }
        assert_eq!(norm.next_phase(), Phase::Mix(0.0));
    }

    #[test]
    fn prepbn_at_lambda_zero_is_repbn_exactly() {
        let device = autodiff();
        let schedule = PrepbnSchedule { warm: 0, total: 1, r0: 1.0, decay: Decay::Linear };
        let norm = LinearNorm::new(8, 1e-6, 1e-5, schedule, &device);
        let x = random([2, 5, 8], &device);
        let _ = norm.forward(x.clone()); // λ = 1, iter → 0
        assert_eq!(norm.next_phase(), Phase::Mix(0.0));
        let twin = norm.norm2.clone(); // shares the running statistics
        let want = RepBN {
            alpha: twin.alpha.clone(),
            bn: BatchNorm::new(8, 1e-5, 0.1, 1.0, &device),
        }
        .forward(x.clone());
        let got = norm.forward(x);
        assert!(max_abs_diff(got, want) < 1e-6);
    }

    #[test]
    fn zero_total_builds_pure_repbn() {
        let device = autodiff();
        let norm = NormKind::prepbn(1e-6, 0).init(8, &device);
        assert!(matches!(norm, Norm::RepBN(_)));
        let out = norm.forward(random([2, 3, 8], &device));
        assert!(values(out).iter().all(|v| v.is_finite()));
        assert_eq!(NormKind::prepbn(1e-6, 0).param_count(8), 17);
    }

    #[test]
    fn norm_rejects_wrong_width_and_single_token_batches() {
        let device = autodiff();
        let norm = NormKind::repbn().init(8, &device);
        let err = norm.try_forward(random([2, 3, 7], &device)).unwrap_err();
        assert!(err.to_string().contains("[2, 3, 7]"), "{err}");
        assert!(norm.try_forward(random([1, 1, 8], &device)).is_err());
        assert!(NormKind::layer_norm(1e-6).init(8, &device).try_forward(random([1, 1, 8], &device)).is_ok());
    }

    #[test]
    fn layer_norm_rows_have_zero_mean_unit_variance() {
        let device = Device::flex();
        let ln = LayerNorm::new(64, 1e-6, &device);
        let y = ln.forward(random([2, 10, 64], &device));
        let mean = y.clone().mean_dim(2);
        let var = y.sub(mean.clone()).powf_scalar(2.0).mean_dim(2);
        assert!(values(mean).iter().all(|m| m.abs() < 1e-5));
        assert!(values(var).iter().all(|v| (v - 1.0).abs() < 1e-4));
    }
}
