//! [`CpuTrainer`]: training steps on a model's plan (`crate::plan`), for every family whose
//! trained form lowers into one.
//!
//! The batch is one row-major (B·T, C) matrix per activation. The forward pass keeps every
//! activation its backward pass needs (llm.c style); each layer kind's backward is written out in
//! its home in `nn`, the order of the steps in the model's plan. AdamW and clipping are the shared
//! [`crate::optim`] over one flat parameter buffer. BatchNorm statistics, PRepBN counters and
//! the optimizer follow the burn model and the official code exactly: the gradients are tested
//! against the official code's (golden) and burn autodiff's, and the state goes back to a burn
//! model under the official keys ([`CpuTrainer::state`]).

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::ModelFamily;
use crate::plan::{Plan, Scratch, TrainActivations};
use crate::nn::loss::cross_entropy;
use crate::nn::lower::{ParamInfo, float_values};
use crate::nn::schedule::Phase;
use crate::optim::{AdamWStep, OptimConfig, clip_coefficient, decays, global_norm};
use crate::state::{StateDict, StateTensor, collect_state, load_state};

/// Per-call settings of [`CpuTrainer::forward_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOptions {
    /// Seeds this forward's drop-path masks (drawn like `nn::drop_path::with_seed` draws them).
    pub drop_path_seed: u64,
    /// Whether the PRepBN counters advance (off for the extra micro-batches of an accumulated
    /// step).
    pub advance_counters: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self { drop_path_seed: 0, advance_counters: true }
    }
}

/// What one [`CpuTrainer::train_step`] reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    /// Mean cross-entropy over the batch.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// Trains a DeiT-family model (DeiT, PRepBN-DeiT, SLAB-DeiT: LayerNorm, RepBN or PRepBN;
/// softmax, ReLU/L or SLA attention; class token or mean pool) on the CPU: forward, backward and
/// AdamW written out over flat buffers. One [`train_step`](Self::train_step) is one optimizer
/// step on one batch, with the semantics of the burn trainer (AdamW with the official no-decay
/// rule, gradient clipping, BatchNorm statistics and PRepBN counters advanced once).
pub struct CpuTrainer {
    model: Plan,
    classes: usize,
    optim: OptimConfig,
    /// Per parameter of the table: whether it gets weight decay.
    decays: Vec<bool>,
    grads: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// Optimizer steps taken (bias correction).
    steps: u64,
    acts: TrainActivations,
    scratch: Scratch,
    /// Whether the last forward's activations are still unused by a backward pass.
    pending_backward: bool,
    /// The state the trainer was built from: keys, shapes and anything it does not train.
    template: StateDict,
}

impl CpuTrainer {
    pub fn new<F: ModelFamily>(model: &F, optim: OptimConfig) -> Result<Self> {
        let template = collect_state(model);
        let classes = model.image_config().num_classes();
        let model = model.lower()?;
        if model.classes() != Some(classes) {
            return Err(Error::Unsupported { what: "a plan that does not end in the classifier head".into(), path: "the CPU trainer" });
        }
        let n = model.table.values.len();
        let decays = model.table.infos.iter().map(|i| decays(&optim, &i.key, i.shape.len().max(1))).collect();
        Ok(Self {
            model,
            classes,
            optim,
            decays,
            grads: vec![0.0; n],
            exp_avg: vec![0.0; n],
            exp_avg_sq: vec![0.0; n],
            steps: 0,
            acts: TrainActivations::default(),
            scratch: Scratch::default(),
            pending_backward: false,
            template,
        })
    }

    /// From a full state dict under the official keys (parameters, BatchNorm buffers, PRepBN
    /// counters), as `collect_state` writes it or a golden file holds it.
    pub fn from_state<F: ModelFamily>(config: &F::Config, state: &StateDict, optim: OptimConfig) -> Result<Self> {
        let model = F::init(config, &burn::tensor::Device::flex())?;
        let (model, _) = load_state(model, state, false)?;
        Self::new(&model, optim)
    }

    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Trains on `side`×`side` images from the next forward on (multi-scale batches): the same
    /// parameters, statistics and moments, the steps re-targeted at the new grid.
    /// `Error::Unsupported` where the plan is sized for one input; the trainer is then unchanged.
    /// The activations of a forward at another size are no longer back-propagated.
    pub fn set_input_size(&mut self, side: usize) -> Result<()> {
        if self.model.input().map(|(_, grid)| grid) != Some([side; 2]) {
            self.model.set_input_grid([side; 2])?;
            self.pending_backward = false;
        }
        Ok(())
    }

    /// Training-mode forward of `batch` row-major (B, C, H, W) images → (B, classes) logits,
    /// keeping the activations for [`backward`](Self::backward). Advances BatchNorm statistics
    /// and PRepBN counters like one training-mode forward of the burn model; drop-path masks
    /// (if the model has stochastic depth) come from seed 0.
    pub fn forward(&mut self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        self.forward_with(images, batch, ForwardOptions::default())
    }

    /// [`forward`](Self::forward) with the step's drop-path seed and whether the PRepBN counters
    /// advance (as burn's `drop_path::with_seed` and `set_counter_advance` set them).
    pub fn forward_with(&mut self, images: &[f32], batch: usize, options: ForwardOptions) -> Result<Vec<f32>> {
        let logits = self.model.train_forward(images, batch, &mut self.acts, options.drop_path_seed, options.advance_counters)?;
        self.pending_backward = true;
        Ok(logits)
    }

    /// Back-propagates `dlogits` = ∂L/∂logits (B, classes) through the last forward pass,
    /// adding every parameter's gradient into the gradient buffer.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        let batch = self.acts.batch;
        let classes = self.classes;
        if !self.pending_backward {
            return Err(Error::Training("backward needs a forward pass first (one backward per forward)".into()));
        }
        if dlogits.len() != batch * classes {
            return Err(Error::InputShape { layer: "vision transformer backward", expected: format!("({batch}, {classes}) logit gradients"), found: vec![dlogits.len()] });
        }
        self.pending_backward = false;
        self.model.train_backward(dlogits, &self.acts, &mut self.grads, &mut self.scratch);
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.grads.par_chunks_mut(1 << 16).for_each(|g| g.fill(0.0));
    }

    /// One optimizer step on one batch: forward (drop-path seeded with the step count),
    /// soft-target cross-entropy (targets (B, classes), rows summing to 1), backward, gradient
    /// clipping, AdamW at learning rate `lr`. A non-finite loss or gradient norm is an error and
    /// leaves the parameters as they were.
    pub fn train_step(&mut self, images: &[f32], targets: &[f32], batch: usize, lr: f64) -> Result<StepReport> {
        self.zero_grads();
        let logits = self.forward_with(images, batch, ForwardOptions { drop_path_seed: self.steps, advance_counters: true })?;
        if targets.len() != logits.len() {
            return Err(Error::InputShape { layer: "cross-entropy", expected: format!("({batch}, {}) targets", self.classes), found: vec![targets.len()] });
        }
        let (loss, dlogits) = cross_entropy(&logits, targets, self.classes);
        if !loss.is_finite() {
            return Err(Error::Training(format!("the loss is {loss} at optimizer step {}", self.steps + 1)));
        }
        self.backward(&dlogits)?;
        let grad_norm = self.clip_grads();
        if !grad_norm.is_finite() {
            return Err(Error::Training(format!("the gradient norm is {grad_norm} at optimizer step {}", self.steps + 1)));
        }
        self.adamw(lr);
        Ok(StepReport { loss, grad_norm })
    }

    fn trained(&self) -> impl Iterator<Item = &ParamInfo> {
        self.model.table.infos.iter().filter(|i| i.trained)
    }

    /// Clips the gradients to the configured global norm; returns the norm before clipping.
    pub fn clip_grads(&mut self) -> f64 {
        let norm = global_norm(self.trained().map(|i| &self.grads[i.slot.range()]));
        let coef = clip_coefficient(&self.optim, norm) as f32;
        if coef < 1.0 {
            self.grads.par_chunks_mut(1 << 16).for_each(|g| g.iter_mut().for_each(|v| *v *= coef));
        }
        norm
    }

    /// One AdamW step (PyTorch semantics, decoupled weight decay) over every trained parameter.
    pub fn adamw(&mut self, lr: f64) {
        self.steps += 1;
        let update = AdamWStep::new(&self.optim, self.steps, lr);
        const CHUNK: usize = 1 << 14;
        for (info, &decays) in self.model.table.infos.iter().zip(&self.decays).filter(|(i, _)| i.trained) {
            let range = info.slot.range();
            self.model.table.values[range.clone()]
                .par_chunks_mut(CHUNK)
                .zip(self.grads[range.clone()].par_chunks(CHUNK))
                .zip(self.exp_avg[range.clone()].par_chunks_mut(CHUNK))
                .zip(self.exp_avg_sq[range].par_chunks_mut(CHUNK))
                .for_each(|(((w, g), m), v)| update.apply(w, g, m, v, decays));
        }
    }

    /// The gradients accumulated since the last [`zero_grads`](Self::zero_grads), under the
    /// official keys and shapes.
    pub fn gradients(&self) -> StateDict {
        let mut dict = StateDict::new("gradients");
        for info in self.trained() {
            dict.insert(info.key.clone(), StateTensor::f32(info.shape.clone(), self.model.table.official(info, &self.grads)));
        }
        dict
    }

    /// The model's full state under the official keys: parameters, BatchNorm statistics, PRepBN
    /// counters; `load_state` puts it into a burn model.
    pub fn state(&self) -> StateDict {
        self.model.state_with(&self.model.table.values, &self.template, "CPU trainer")
    }

    /// The AdamW moments as burn's [`AdamW::state`](crate::train::optim::AdamW::state) writes
    /// them (`optim.exp_avg.<key>`, `optim.exp_avg_sq.<key>`, flattened in burn's layout), so a
    /// checkpoint reads the same whichever engine wrote it. Empty before the first step.
    pub fn optimizer_state(&self) -> StateDict {
        let mut dict = StateDict::new("optimizer");
        if self.steps == 0 {
            return dict;
        }
        for info in self.trained() {
            for (prefix, buffer) in [("optim.exp_avg", &self.exp_avg), ("optim.exp_avg_sq", &self.exp_avg_sq)] {
                dict.insert(format!("{prefix}.{}", info.key), StateTensor::f32(vec![info.slot.len], self.model.table.burn_flat(info, buffer)));
            }
        }
        dict
    }

    /// Restores the moments written by [`optimizer_state`](Self::optimizer_state) (or burn's
    /// AdamW) after `steps` optimizer steps.
    pub fn load_optimizer_state(&mut self, dict: &StateDict, steps: u64) -> Result<()> {
        self.steps = steps;
        if steps == 0 {
            return Ok(());
        }
        let table = &self.model.table;
        for info in table.infos.iter().filter(|i| i.trained) {
            for (prefix, buffer) in [("optim.exp_avg", &mut self.exp_avg), ("optim.exp_avg_sq", &mut self.exp_avg_sq)] {
                let values = float_values(dict, &format!("{prefix}.{}", info.key), info.slot.len)?;
                table.set_from_burn_flat(info, &values, buffer);
            }
        }
        Ok(())
    }

    /// Optimizer steps taken (AdamW's bias-correction count).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// What the next training-mode call of the first block's norm computes (PRepBN models only),
    /// as [`VisionTransformer::prepbn_phase`] tells for the burn model.
    pub fn prepbn_phase(&self) -> Option<Phase> {
        self.model.prepbn_phase()
    }

    /// `model` with this trainer's state.
    pub fn apply_to<M: burn::module::Module>(&self, model: M) -> Result<M> {
        load_state(model, &self.state(), false).map(|(model, _)| model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Int, Tensor};
    use crate::state::{collect_grads, float_tensors};
    use crate::models::vit::Pool;
    use crate::models::{VisionTransformer, VitConfig};
    use crate::nn::attention::AttentionKind;
    use crate::nn::loss::soft_cross_entropy;
    use crate::nn::norm::NormKind;
    use crate::state::collect_state;
    use crate::testing::{assert_near, assert_states_near, floats};
    use crate::train::optim::{AdamW, param_ranks};

    fn small(norm: NormKind, attention: AttentionKind, pool: Pool) -> VitConfig {
        VitConfig {
            img_size: 48,
            patch_size: 8,
            in_chans: 3,
            num_classes: 10,
            embed_dim: 48,
            depth: 2,
            num_heads: 3,
            mlp_ratio: 4.0,
            qkv_bias: true,
            norm,
            attention,
            pool,
            drop_path_rate: 0.0,
        }
    }

    fn randomized(config: &VitConfig, device: &Device) -> VisionTransformer {
        crate::testing::randomized(config.init(device).unwrap(), 5.0, 1)
    }

    fn images(config: &VitConfig, batch: usize, seed: u64, device: &Device) -> Tensor<4> {
        crate::testing::standard_normal([batch, config.in_chans, config.img_size, config.img_size], seed, device)
    }

    /// Forward, backward and state against burn autodiff on the same model and images.
    fn check_against_burn(config: VitConfig) {
        let device = Device::flex().autodiff();
        let model = randomized(&config, &device);
        let mut trainer = CpuTrainer::new(&model, OptimConfig::default()).unwrap();
        let batch = 3;
        let x = images(&config, batch, 10, &device);
        let logits = model.forward(x.clone());
        let weight = crate::testing::standard_normal([batch, config.num_classes], 2, &device);
        let grads = logits.clone().mul(weight.clone()).sum().backward();

        let ours = trainer.forward(&crate::state::host_f32(x), batch).unwrap();
        assert_near("logits", &ours, &crate::state::host_f32(logits), 1e-4, 1e-6);
        trainer.backward(&crate::state::host_f32(weight)).unwrap();
        let want = collect_grads(&model, &grads);
        let ours = trainer.gradients();
        let keys: Vec<&String> = ours.keys().collect();
        assert_eq!(keys, want.keys().collect::<Vec<_>>(), "parameters with a gradient");
        // Bias gradients are sums over every token of terms much larger than the sum: allow
        // their cancellation error (the golden tolerance allows 1e-3).
        assert_states_near("gradient", &ours, &want, 1e-4, 1e-5);
        assert_states_near("state after the forward", &trainer.state(), &collect_state(&model), 1e-5, 1e-6);
    }

    #[test]
    fn layer_norm_softmax_class_token_matches_burn_autodiff() {
        check_against_burn(small(NormKind::layer_norm(1e-6), AttentionKind::Softmax, Pool::ClassToken));
    }

    #[test]
    fn repbn_relu_attention_matches_burn_autodiff() {
        check_against_burn(small(NormKind::repbn(), AttentionKind::ReluL { qk_norm: false, gated: false }, Pool::ClassToken));
    }

    #[test]
    fn layer_norm_relu_attention_with_qk_norm_and_gate_matches_burn_autodiff() {
        check_against_burn(small(NormKind::layer_norm(1e-6), AttentionKind::ReluL { qk_norm: true, gated: true }, Pool::ClassToken));
    }

    #[test]
    fn flatten_focused_attention_matches_burn_autodiff() {
        check_against_burn(small(NormKind::repbn(), AttentionKind::focused(), Pool::Mean));
    }

    #[test]
    fn prepbn_sla_mean_pool_matches_burn_autodiff() {
        // λ = 0.5: both branches, and the counters advance.
        let mut config = small(NormKind::prepbn(1e-6, 4), AttentionKind::sla(), Pool::Mean);
        if let NormKind::Prepbn { schedule, .. } = &mut config.norm {
            schedule.warm = 0;
        }
        check_against_burn(config);
    }

    /// Three optimizer steps beside the burn trainer's (soft cross-entropy, clipping, AdamW with
    /// the no-decay rule): the same losses and the same weights after.
    #[test]
    fn train_steps_match_the_burn_trainer() {
        // Several steps compound every difference, so the model has to be one whose gradients
        // are smooth in the weights: with SLA's ReLU feature maps a kink crossed on one side only
        // changed a gradient element outright and AdamW turned that into a weight ±lr apart
        // (seen: 8.7e-4 on a positional encoding, 1 run in ~75). Softmax attention, GELU and
        // the norms are smooth; SLA's backward is checked by the single-pass tests.
        let config = small(NormKind::prepbn(1e-6, 2), AttentionKind::Softmax, Pool::ClassToken);
        let device = Device::flex().autodiff();
        let mut model = randomized(&config, &device);
        // AdamW divides by sqrt(v) + eps: with the default eps (1e-8) a gradient at rounding level
        // (|g| ~ 1e-7) gets a full lr-sized step whose sign is the rounding's (seen: 2.6e-5 apart).
        // eps = 1e-4 keeps those steps proportional to g while every real gradient still gets
        // AdamW's normalized step. Weight decay 0.5 at lr 1e-2 makes a 10 % error in the decay
        // move weights by 5e-4 per step, far outside the bound below.
        let (lr, weight_decay) = (1e-2, 0.5);
        let optim = OptimConfig { clip_grad: Some(1.0), eps: 1e-4, weight_decay, ..OptimConfig::default() };
        let mut trainer = CpuTrainer::new(&model, optim.clone()).unwrap();
        let mut adamw = AdamW::new(optim);
        let ranks = param_ranks(&model);
        let batch = 4;
        for step in 0..3 {
            let x = images(&config, batch, 20 + step as u64, &device);
            let labels: Vec<i64> = (0..batch as i64).map(|i| (i * 3 + step) % 10).collect();
            let targets = Tensor::<1, Int>::from_data(labels.as_slice(), &device).one_hot::<2>(config.num_classes).float();
            let loss = soft_cross_entropy(model.forward(x.clone()), targets.clone());
            let want_loss: f32 = loss.clone().into_scalar();
            let mut grads = float_tensors(&model, Some(&loss.backward())).into_iter().map(|(k, g)| (k, crate::state::host_f32(g))).collect();
            let want_norm = adamw.clip(&mut grads);
            model = adamw.step(model, &grads, &ranks, lr);

            let report = trainer.train_step(&crate::state::host_f32(x), &crate::state::host_f32(targets), batch, lr).unwrap();
            assert!((report.loss - want_loss as f64).abs() < 1e-5, "step {step}: loss {} vs {want_loss}", report.loss);
            assert!((report.grad_norm - want_norm).abs() < 1e-4 * want_norm, "step {step}: grad norm {} vs {want_norm}", report.grad_norm);
        }
        assert_states_near("state after three steps", &trainer.state(), &collect_state(&model), 1e-5, 2e-5);
        let applied = trainer.apply_to(config.init(&device).unwrap()).unwrap();
        assert_states_near("state loaded into a burn model", &collect_state(&applied), &trainer.state(), 0.0, 0.0);
    }

    /// One accumulated step of two micro-batches with stochastic depth beside burn: the same masks
    /// from the same seeds, the counters advancing on the first micro-batch only, the gradients
    /// summed.
    #[test]
    fn drop_path_and_accumulation_match_burn_autodiff() {
        let config = VitConfig { depth: 3, drop_path_rate: 0.5, ..small(NormKind::prepbn(1e-6, 4), AttentionKind::Softmax, Pool::ClassToken) };
        let device = Device::flex().autodiff();
        let mut model = randomized(&config, &device);
        let mut trainer = CpuTrainer::new(&model, OptimConfig::default()).unwrap();
        let batch = 4;
        let mut want = StateDict::new("burn");
        for m in 0..2u64 {
            let x = images(&config, batch, 30 + m, &device);
            let weight = crate::testing::standard_normal([batch, config.num_classes], 40 + m, &device);
            model = crate::nn::set_counter_advance(model, m == 0);
            let logits = crate::nn::drop_path::with_seed(100 + m, || model.forward(x.clone()));
            let grads = collect_grads(&model, &logits.clone().mul(weight.clone()).sum().backward());
            for (key, g) in grads.iter() {
                let sum = match want.get(key) {
                    Ok(prev) => floats(key, &prev.values).iter().zip(floats(key, &g.values)).map(|(a, b)| a + b).collect(),
                    Err(_) => floats(key, &g.values).to_vec(),
                };
                want.insert(key.clone(), StateTensor::f32(g.shape.clone(), sum));
            }
            let options = ForwardOptions { drop_path_seed: 100 + m, advance_counters: m == 0 };
            let ours = trainer.forward_with(&crate::state::host_f32(x), batch, options).unwrap();
            assert_near(&format!("logits of micro-batch {m}"), &ours, &crate::state::host_f32(logits), 1e-4, 1e-6);
            trainer.backward(&crate::state::host_f32(weight)).unwrap();
        }
        assert_states_near("accumulated gradient", &trainer.gradients(), &want, 1e-4, 1e-5);
        assert_states_near("state after the step", &trainer.state(), &collect_state(&model), 1e-5, 1e-6);
    }

    #[test]
    fn unsupported_models_and_bad_inputs_are_refused() {
        let device = Device::flex();
        let sharp = small(NormKind::layer_norm(1e-6), AttentionKind::Focused { power: 8.0, kernel_size: 3 }, Pool::Mean);
        let err = CpuTrainer::new(&sharp.init(&device).unwrap(), OptimConfig::default()).err().expect("refused");
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("power 8"), "{err}");
        let config = small(NormKind::repbn(), AttentionKind::Softmax, Pool::ClassToken);
        let mut trainer = CpuTrainer::new(&config.init(&device).unwrap(), OptimConfig::default()).unwrap();
        assert!(trainer.backward(&[0.0; 10]).is_err(), "backward before forward");
        // Token plans are sized for one input (position embeddings): no multi-scale batches.
        trainer.set_input_size(48).unwrap();
        let err = trainer.set_input_size(64).err().expect("another size").to_string();
        assert!(err.contains("multi-scale batches"), "{err}");
        let err = trainer.forward(&[0.0; 5], 1).err().expect("wrong image size").to_string();
        assert!(err.contains("48, 48"), "{err}");
        trainer.forward(&vec![0.5; 2 * 3 * 48 * 48], 2).unwrap();
        let err = trainer.backward(&[0.0; 10]).err().expect("logit gradients of one image for two").to_string();
        assert!(err.contains("(2, 10)"), "{err}");
        let err = trainer.train_step(&vec![0.5; 3 * 48 * 48], &[0.1; 9], 1, 1e-3).err().expect("targets of the wrong size").to_string();
        assert!(err.contains("targets"), "{err}");
        // A state made for another model names the first tensor that does not fit.
        let other = VitConfig { embed_dim: 24, ..config.clone() };
        let err = CpuTrainer::from_state::<VisionTransformer>(&config, &collect_state(&other.init(&device).unwrap()), OptimConfig::default()).err().expect("foreign state").to_string();
        assert!(err.contains("patch_embed.proj.weight") && err.contains("[48, 3, 8, 8]"), "{err}");
    }
}
