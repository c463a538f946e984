//! One test harness for every layer kind: on random sizes (odd ones included), the fast
//! training forward and backward equal burn autodiff (`loss = Σ out ⊙ dy`) in the output, the
//! input gradient, every parameter gradient (by official key) and the buffers after the call,
//! and the fast inference form equals burn's eval-mode forward. A kind plugs in as a
//! [`LayerCase`]; a variant of one (another attention kind, a norm phase) is one more test line.
//!
//! Every value (sizes, parameters, inputs, `dy`) comes from one seeded `Pcg64`, not burn's
//! process-wide generator, which tests elsewhere in the crate draw from without a lock: a run
//! is the same whatever runs beside it.

use std::fmt::Debug;

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;

use super::attention::cross_shaped::{CrossShapedBranch, CrossShapedConfig, cross_shaped_attention, img2windows};
use super::attention::cross_shaped_fast::{CrossShapedActivations, CrossShapedInferScratch, CrossShapedScratch, FastCrossShapedAttention};
use super::attention::spatial_reduction::{SpatialReductionAttention, SrAttentionConfig};
use super::attention::spatial_reduction_fast::{FastSrAttention, SrActivations, SrScratch};
use super::attention::window::{MaskBuffer, WindowAttention, WindowGrid};
use super::attention::window_fast::{FastWindowAttention, FastWindowedLinear, WindowAttentionActivations, WindowAttentionScratch, WindowInferScratch, WindowedLinearActivations, WindowedLinearInferScratch, WindowedLinearScratch};
use super::attention::{Attention, AttentionActivations, AttentionConfig, AttentionKind, AttentionScratch, FastAttention, FeatureMap, LinearAttention};
use super::conv::{FastConv, Source};
use super::conv_norm::{Activation, ConvAct, ConvNormAct, ConvShape};
use super::conv_norm_fast::{ConvNormActCache, FastConvNormAct};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use super::fuse::fold_into_next_linear;
use super::linear::{FastDistilledHead, FastLinear, linear};
use super::loss::{cross_entropy, soft_cross_entropy};
use super::lower::ParamTable;
use super::meta3d_attention::{FastMeta3dAttention, Meta3dActivations, Meta3dAttention};
use super::mlp::{FastMlp, Mlp, MlpActivations};
use super::norm::{FastNorm, LayerNorm, LinearNorm, Norm, NormCache, NormKind, RepBN, RepBnInit};
use super::patch_embed::{FastPatchEmbed, PatchEmbed};
use super::patch_merge::{DeployPatchMerging, FastPatchMerging, PatchMergeActivations, PatchMergeScratch, PatchMerging};
use super::schedule::{Decay, PrepbnSchedule};
use super::{set_counter_advance, set_training};
use crate::kernels;
use crate::testing::{assert_near, assert_states_near, floats};
use crate::state::{StateDict, collect_grads, collect_state, host_f32, map_float_tensors};

const SEED: u64 = 0x5EED;

/// Random shapes per test: a handful, small, so the whole file runs in seconds on two cores.
const SHAPES: usize = 10;

/// `|ours − want| ≤ ABS + REL·max|want|` elementwise; the fast kernels sum in other orders than
/// burn's, so this allows f32 rounding of sums of O(1) terms and nothing near a real error
/// (the smallest mutation the harness is shown to catch is a 1 % change of one term).
const ABS: f32 = 1e-5;
const REL: f32 = 1e-4;

/// One layer kind at one set of sizes.
trait LayerCase: Debug {
    /// The burn module (the reference).
    type Layer: Module + Clone;
    /// Its fast form.
    type Fast;

    /// The layer at these sizes; the harness then redraws every float in it ([`randomized`]).
    fn build(&self, device: &Device, rng: &mut Pcg64) -> Self::Layer;

    /// A flat input for `layer`.
    fn input(&self, layer: &Self::Layer, rng: &mut Pcg64) -> Vec<f32>;

    /// burn's forward of the flat input, flattened.
    fn reference(&self, layer: &Self::Layer, x: Tensor<1>) -> Tensor<1>;

    fn lower(&self, layer: &Self::Layer, table: &mut ParamTable) -> Self::Fast;

    /// The fast training forward of `x`, then its backward of `dy` with the parameter gradients
    /// into `g`: the output and the input gradient (`None` for a kind that computes none).
    fn train(&self, fast: &mut Self::Fast, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>);

    /// The buffers (statistics, counters) the training forward left, under their keys.
    fn write_buffers(&self, _fast: &Self::Fast, _state: &mut StateDict) {}

    /// The fast inference form's output, for kinds that have one.
    fn infer(&self, _fast: &Self::Fast, _p: &[f32], _x: &[f32]) -> Option<Vec<f32>> {
        None
    }
}

fn uniform(rng: &mut Pcg64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

fn normal(rng: &mut Pcg64, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let dist = Normal::new(mean, std).expect("finite std");
    (0..n).map(|_| dist.sample(rng)).collect()
}

fn pick<T: Copy>(rng: &mut Pcg64, choices: &[T]) -> T {
    *choices.choose(rng).expect("choices")
}

fn flat(values: &[f32], device: &Device) -> Tensor<1> {
    Tensor::from_data(TensorData::new(values.to_vec(), [values.len()]), device)
}

/// Every float parameter and buffer redrawn so each term of each formula matters: running
/// variances in [0.5, 2], norm scales in [0.5, 1.5], RepBN's α in [0.2, 0.8], matrices and
/// convs N(0, 1/fan_in) (O(1) activations), everything else (biases, running means, positional
/// encodings) in [−1, 1].
fn randomized<M: Module>(layer: M, rng: &mut Pcg64) -> M {
    let official = collect_state(&layer);
    map_float_tensors(layer, |key, t| {
        let n = t.dims()[0];
        let shape = &official.get(key).expect("a key of the layer").shape;
        let values = if key.ends_with("running_var") {
            uniform(rng, n, 0.5, 2.0)
        } else if key.ends_with("alpha") {
            uniform(rng, n, 0.2, 0.8)
        } else if key.ends_with("weight") && shape.len() == 1 {
            uniform(rng, n, 0.5, 1.5)
        } else if key.ends_with("weight") {
            let fan_in = n / shape[0]; // official (out, in, …)
            normal(rng, n, 0.0, (fan_in as f32).powf(-0.5))
        } else {
            uniform(rng, n, -1.0, 1.0)
        };
        Some(flat(&values, &t.device()))
    })
}

/// `max|ours − want| ≤ ABS + REL·max|want|`, naming the worst element otherwise.
fn assert_close(what: &str, ours: &[f32], want: &[f32]) {
    assert_near(what, ours, want, REL, ABS);
}

/// [`SHAPES`] cases from `draw`, each checked against burn.
fn check<C: LayerCase>(mut draw: impl FnMut(&mut Pcg64) -> C) {
    let mut rng = Pcg64::seed_from_u64(SEED);
    for _ in 0..SHAPES {
        let case = draw(&mut rng);
        check_case(&case, &mut rng);
    }
}

fn check_case<C: LayerCase>(case: &C, rng: &mut Pcg64) {
    let what = format!("{case:?}");
    let device = Device::flex().autodiff();
    let layer = randomized(case.build(&device, rng), rng);
    // Lowered first: burn's training forward moves the statistics and counters it shares.
    let mut table = ParamTable::for_module(&layer);
    let mut fast = case.lower(&layer, &mut table);

    let x_values = case.input(&layer, rng);
    let x = flat(&x_values, &device).require_grad();
    let out = case.reference(&layer, x.clone());
    let want_out = host_f32(out.clone());
    let dy = normal(rng, want_out.len(), 0.0, 1.0);
    let grads = out.mul(flat(&dy, &device)).sum().backward();
    let want_grads = collect_grads(&layer, &grads);

    let mut g = vec![0.0; table.values.len()];
    let (out, dx) = case.train(&mut fast, &table.values, &x_values, &dy, &mut g);
    assert_close(&format!("{what}: output"), &out, &want_out);
    if let Some(dx) = dx {
        assert_close(&format!("{what}: input gradient"), &dx, &host_f32(x.grad(&grads).expect("x is a leaf")));
    }
    for key in want_grads.keys() {
        assert!(table.infos.iter().any(|i| &i.key == key), "{what}: burn has a gradient of `{key}`, the fast form none");
    }
    for info in &table.infos {
        let ours = table.official(info, &g);
        match want_grads.get(&info.key) {
            Ok(want) => assert_close(&format!("{what}: gradient `{}`", info.key), &ours, floats(&what, &want.values)),
            // burn gives none to a parameter this call did not read (the RepBN branch in warm-up).
            Err(_) => assert!(ours.iter().all(|v| *v == 0.0), "{what}: `{}` is unused but has a fast gradient", info.key),
        }
    }
    let ours = table.state_with(&table.values, &collect_state(&layer), "fast", |state| case.write_buffers(&fast, state));
    assert_states_near(&format!("{what}: state after the call"), &ours, &collect_state(&layer), REL, ABS);

    if let Some(ours) = case.infer(&fast, &table.values, &x_values) {
        let want = case.reference(&set_training(layer.clone(), false), flat(&x_values, &device));
        assert_close(&format!("{what}: inference"), &ours, &host_f32(want));
    }
}

/// Token counts with odd ones and a single token.
const TOKENS: [usize; 4] = [1, 3, 5, 7];
/// Widths with odd ones.
const WIDTHS: [usize; 4] = [4, 9, 12, 15];

#[derive(Debug)]
struct LinearCase {
    rows: usize,
    inputs: usize,
    outputs: usize,
    bias: bool,
}

impl LinearCase {
    fn draw(rng: &mut Pcg64, bias: bool) -> Self {
        Self { rows: pick(rng, &[1, 2, 5, 13]), inputs: pick(rng, &[1, 4, 9, 15]), outputs: pick(rng, &[1, 7, 12, 13]), bias }
    }
}

impl LayerCase for LinearCase {
    type Layer = Linear;
    type Fast = FastLinear;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Linear {
        linear(self.inputs, self.outputs, self.bias, device)
    }

    fn input(&self, _layer: &Linear, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.rows * self.inputs, 0.0, 1.0)
    }

    fn reference(&self, layer: &Linear, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.rows, self.inputs])).reshape([self.rows * self.outputs])
    }

    fn lower(&self, layer: &Linear, table: &mut ParamTable) -> FastLinear {
        FastLinear::lower(layer, table).expect("a Linear lowers")
    }

    fn train(&self, fast: &mut FastLinear, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; self.rows * self.outputs];
        fast.forward(p, x, &mut out, false);
        let mut dx = vec![0.0; x.len()];
        fast.backward_input(p, dy, &mut dx, |_, _| {});
        fast.backward_params(g, x, dy, &mut Vec::new());
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastLinear, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; self.rows * self.outputs];
        fast.apply(p, x, &mut out);
        Some(out)
    }
}

/// EfficientFormer's two heads averaged, as one module for the harness.
#[derive(Module, Debug)]
struct DistilledHeads {
    head: Linear,
    head_dist: Linear,
}

#[derive(Debug)]
struct DistilledHeadCase {
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl LayerCase for DistilledHeadCase {
    type Layer = DistilledHeads;
    type Fast = FastDistilledHead;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> DistilledHeads {
        DistilledHeads { head: linear(self.inputs, self.outputs, true, device), head_dist: linear(self.inputs, self.outputs, true, device) }
    }

    fn input(&self, _layer: &DistilledHeads, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.rows * self.inputs, 0.0, 1.0)
    }

    fn reference(&self, layer: &DistilledHeads, x: Tensor<1>) -> Tensor<1> {
        let x = x.reshape([self.rows, self.inputs]);
        layer.head.forward(x.clone()).add(layer.head_dist.forward(x)).div_scalar(2.0).reshape([self.rows * self.outputs])
    }

    fn lower(&self, layer: &DistilledHeads, table: &mut ParamTable) -> FastDistilledHead {
        FastDistilledHead::lower(&layer.head, &layer.head_dist, table).expect("two heads of one shape lower")
    }

    fn train(&self, fast: &mut FastDistilledHead, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; self.rows * self.outputs];
        fast.forward(p, x, &mut out);
        let mut dx = vec![f32::NAN; x.len()]; // overwritten
        fast.backward(p, g, x, dy, &mut dx, &mut Vec::new());
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastDistilledHead, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; self.rows * self.outputs];
        out.chunks_mut(self.outputs).zip(x.chunks(self.inputs)).for_each(|(o, x)| fast.apply(p, x, o));
        Some(out)
    }
}

/// Which norm, and for PRepBN the phase its counters are in.
#[derive(Clone, Copy, Debug)]
enum NormVariant {
    LayerNorm,
    RepBn,
    /// LayerNorm only, `warm` counting down.
    PrepbnWarm,
    /// λ = ⌊T/2⌋/T ≈ ½, both branches.
    PrepbnMixing,
    /// λ = 0 with the decay over: the LayerNorm branch still runs, weighted 0.
    PrepbnLambdaZero,
}

#[derive(Debug)]
struct NormCase {
    variant: NormVariant,
    batch: usize,
    tokens: usize,
    channels: usize,
    /// PRepBN's counters before the call: warm, iter, total_step.
    counters: Option<[i64; 3]>,
    /// Whether PRepBN's counters advance (off for the extra micro-batches of a step).
    advance: bool,
}

impl NormCase {
    fn draw(rng: &mut Pcg64, variant: NormVariant) -> Self {
        // BatchNorm needs two tokens; three keep its batch variance away from 0.
        let (batch, tokens, channels) = (pick(rng, &[1, 2, 3]), pick(rng, &[3, 5, 7]), pick(rng, &WIDTHS));
        let total = pick(rng, &[5, 7, 8]);
        let counters = match variant {
            NormVariant::LayerNorm | NormVariant::RepBn => None,
            NormVariant::PrepbnWarm => Some([pick(rng, &[1, 2]), total, total]),
            NormVariant::PrepbnMixing => Some([0, total / 2, total]),
            NormVariant::PrepbnLambdaZero => Some([0, 0, total]),
        };
        Self { variant, batch, tokens, channels, counters, advance: rng.random_bool(0.5) }
    }

    fn rows(&self) -> usize {
        self.batch * self.tokens
    }
}

impl LayerCase for NormCase {
    type Layer = Norm;
    type Fast = FastNorm;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Norm {
        match (self.variant, self.counters) {
            (NormVariant::LayerNorm, _) => Norm::LayerNorm(LayerNorm::new(self.channels, 1e-6, device)),
            (NormVariant::RepBn, _) => Norm::RepBN(RepBN::new(self.channels, 1e-5, RepBnInit::Vision, device)),
            (_, counters) => {
                let [warm, iter, total] = counters.expect("PRepBN has counters");
                let schedule = PrepbnSchedule { warm: 0, total: 1, r0: 1.0, decay: Decay::Linear };
                let norm = LinearNorm::new(self.channels, 1e-6, 1e-5, schedule, device);
                norm.warm.set(warm);
                norm.iter.set(iter);
                norm.total_step.set(total);
                Norm::LinearNorm(set_counter_advance(norm, self.advance))
            }
        }
    }

    fn input(&self, _layer: &Norm, rng: &mut Pcg64) -> Vec<f32> {
        // Off-centre, so the means matter.
        normal(rng, self.rows() * self.channels, 0.5, 1.5)
    }

    fn reference(&self, layer: &Norm, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.tokens, self.channels])).reshape([self.rows() * self.channels])
    }

    fn lower(&self, layer: &Norm, table: &mut ParamTable) -> FastNorm {
        FastNorm::lower(layer, table).expect("a norm lowers")
    }

    fn train(&self, fast: &mut FastNorm, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; x.len()];
        let mut cache = NormCache::default();
        fast.forward(p, x, &mut out, &mut cache, self.channels, self.advance).expect("enough tokens");
        let mut dx = vec![0.0; x.len()]; // the backward adds into it
        fast.backward(p, g, x, dy, &mut dx, &cache, self.channels);
        (out, Some(dx))
    }

    fn write_buffers(&self, fast: &FastNorm, state: &mut StateDict) {
        fast.write_buffers(state);
    }

    fn infer(&self, fast: &FastNorm, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; x.len()];
        fast.infer(p, x, &mut out);
        Some(out)
    }
}

#[derive(Debug)]
struct MlpCase {
    rows: usize,
    dim: usize,
    hidden: usize,
}

impl MlpCase {
    fn draw(rng: &mut Pcg64) -> Self {
        Self { rows: pick(rng, &[1, 6, 7]), dim: pick(rng, &WIDTHS), hidden: pick(rng, &[5, 13, 16]) }
    }
}

impl LayerCase for MlpCase {
    type Layer = Mlp;
    type Fast = FastMlp;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Mlp {
        Mlp::new(self.dim, self.hidden, device)
    }

    fn input(&self, _layer: &Mlp, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.rows * self.dim, 0.0, 1.0)
    }

    fn reference(&self, layer: &Mlp, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.rows, self.dim])).reshape([self.rows * self.dim])
    }

    fn lower(&self, layer: &Mlp, table: &mut ParamTable) -> FastMlp {
        FastMlp::lower(layer, table).expect("an MLP lowers")
    }

    fn train(&self, fast: &mut FastMlp, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; x.len()];
        let mut acts = MlpActivations::default();
        fast.forward(p, x, &mut out, &mut acts, false);
        let mut dx = vec![0.0; x.len()];
        fast.backward(p, g, x, &acts, dy, &mut dx, &mut Vec::new(), &mut Vec::new());
        (out, Some(dx))
    }

    /// The inference form is residual (`x += mlp(x)`): the branch is what it added.
    fn infer(&self, fast: &FastMlp, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut hidden = vec![0.0; self.rows * self.hidden];
        fast.infer_hidden(p, x, &mut hidden);
        let mut residual = x.to_vec();
        fast.infer_residual(p, &hidden, &mut residual);
        Some(residual.iter().zip(x).map(|(r, x)| r - x).collect())
    }
}

#[derive(Debug)]
struct Meta3dAttentionCase {
    batch: usize,
    dim: usize,
    heads: usize,
    key_dim: usize,
    attn_ratio: usize,
    /// The token grid's side (N = resolution²).
    resolution: usize,
}

impl Meta3dAttentionCase {
    fn draw(rng: &mut Pcg64) -> Self {
        Self { batch: pick(rng, &[1, 2, 3]), dim: pick(rng, &WIDTHS), heads: pick(rng, &[1, 3]), key_dim: pick(rng, &[2, 5]), attn_ratio: pick(rng, &[1, 4]), resolution: pick(rng, &[1, 2, 3]) }
    }

    fn tokens(&self) -> usize {
        self.resolution * self.resolution
    }
}

impl LayerCase for Meta3dAttentionCase {
    type Layer = Meta3dAttention;
    type Fast = FastMeta3dAttention;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Meta3dAttention {
        Meta3dAttention::new(self.dim, self.heads, self.key_dim, self.attn_ratio, self.resolution, device)
    }

    fn input(&self, _layer: &Meta3dAttention, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.batch * self.tokens() * self.dim, 0.0, 1.0)
    }

    fn reference(&self, layer: &Meta3dAttention, x: Tensor<1>) -> Tensor<1> {
        let n = self.batch * self.tokens() * self.dim;
        layer.forward(x.reshape([self.batch, self.tokens(), self.dim])).reshape([n])
    }

    fn lower(&self, layer: &Meta3dAttention, table: &mut ParamTable) -> FastMeta3dAttention {
        FastMeta3dAttention::lower(layer, table).expect("a Meta3D attention lowers")
    }

    fn train(&self, fast: &mut FastMeta3dAttention, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; x.len()];
        let mut acts = Meta3dActivations::default();
        fast.forward(p, x, &mut out, &mut acts, self.batch);
        let mut dx = vec![f32::NAN; x.len()]; // overwritten
        fast.backward(p, g, x, &acts, dy, &mut dx);
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastMeta3dAttention, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let per = self.tokens() * self.dim;
        let mut out = vec![0.0; x.len()];
        out.chunks_mut(per).zip(x.chunks(per)).for_each(|(o, x)| fast.infer(p, x, o));
        Some(out)
    }
}

/// See [`AttentionCase::well_conditioned`].
const MIN_SLA_NORMALISER: f32 = 0.1;

#[derive(Debug)]
struct AttentionCase {
    kind: AttentionKind,
    batch: usize,
    heads: usize,
    head_dim: usize,
    qkv_bias: bool,
    /// SLA's token grid.
    grid: Option<[usize; 2]>,
    tokens: usize,
    /// Row blocks of the two-pass inference.
    parts: usize,
}

impl AttentionCase {
    fn draw(rng: &mut Pcg64, kind: AttentionKind) -> Self {
        let grid = kind.needs_grid().then(|| pick(rng, &[[3, 5], [5, 3], [2, 2], [1, 4]]));
        let tokens = grid.map_or_else(|| pick(rng, &TOKENS), |[rows, cols]| rows * cols);
        Self {
            kind,
            batch: pick(rng, &[1, 2]),
            heads: pick(rng, &[1, 3]),
            head_dim: pick(rng, &[3, 4, 5]),
            qkv_bias: rng.random_bool(0.5),
            grid,
            tokens,
            parts: pick(rng, &[1, 2, 3]),
        }
    }

    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn len(&self) -> usize {
        self.batch * self.tokens * self.dim()
    }

    /// Whether SLA's normaliser less its ε, `φ(q)·Σφ(k)`, is in every row and head either 0
    /// (φ(q) = 0: the row is the conv term alone) or at least [`MIN_SLA_NORMALISER`]. In
    /// between, the output depends only on the direction of φ(q), its gradient is a difference
    /// of two terms ∝ 1/normaliser, and either implementation's f32 rounding of it exceeds any
    /// useful tolerance (a one-ulp change of x moves it as much).
    fn well_conditioned(&self, layer: &Attention, x: &[f32]) -> bool {
        match layer {
            Attention::Linear(sla) => {
                let x = flat(x, &sla.qkv.weight.val().device()).reshape([self.batch, self.tokens, self.dim()]);
                sla_well_conditioned(sla, x)
            }
            Attention::Dot(_) => true, // no normaliser
        }
    }
}

/// [`AttentionCase::well_conditioned`] for a linear attention's input sequences (B, T, C); true
/// for FLatten, which will need its own criterion.
fn sla_well_conditioned(sla: &LinearAttention, x: Tensor<3>) -> bool {
    if sla.feature_map != FeatureMap::Relu {
        return true;
    }
    let ([b, t, c], h) = (x.dims(), sla.num_heads);
    let qkv = sla.qkv.forward(x).reshape([b, t, 3, c]);
    let part = |i: usize| qkv.clone().narrow(2, i, 1).reshape([b, t, c]);
    let q = relu(part(0)).reshape([b, t, h, c / h]);
    let k = relu(part(1).add(sla.positional_encoding.val())).reshape([b, t, h, c / h]);
    let normalisers = host_f32(q.mul(k.sum_dim(1)).sum_dim(3));
    normalisers.iter().all(|&n| n == 0.0 || n >= MIN_SLA_NORMALISER)
}

impl LayerCase for AttentionCase {
    type Layer = Attention;
    type Fast = FastAttention;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Self::Layer {
        AttentionConfig { dim: self.dim(), num_heads: self.heads, qkv_bias: self.qkv_bias, kind: self.kind, grid: self.grid }.init(device)
    }

    fn input(&self, layer: &Attention, rng: &mut Pcg64) -> Vec<f32> {
        loop {
            let x = normal(rng, self.len(), 0.0, 1.0);
            if self.well_conditioned(layer, &x) {
                return x;
            }
        }
    }

    fn reference(&self, layer: &Self::Layer, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.tokens, self.dim()])).reshape([self.len()])
    }

    fn lower(&self, layer: &Self::Layer, table: &mut ParamTable) -> FastAttention {
        FastAttention::lower(layer, table).expect("the attention kind lowers")
    }

    fn train(&self, fast: &mut FastAttention, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; x.len()];
        let mut acts = AttentionActivations::default();
        fast.forward(p, x, &mut out, &mut acts, self.batch, self.tokens, false).expect("the training forward runs");
        let mut dx = vec![0.0; x.len()];
        fast.backward(p, g, x, &acts, dy, &mut dx, &mut AttentionScratch::default(), self.batch, self.tokens);
        (out, Some(dx))
    }

    /// Each sequence in two passes over `parts` row blocks, as the inference engine runs it: keys
    /// (each block's Σk and KᵀV summed), then queries.
    fn infer(&self, fast: &FastAttention, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let (t, c) = (self.tokens, self.dim());
        let per = t.div_ceil(self.parts);
        let tiled = fast.tiled_conv(p);
        let conv = tiled.as_ref().and_then(|(taps, bias)| fast.conv_view(taps, bias));
        let mut out = vec![0.0; x.len()];
        for (x, out) in x.chunks(t * c).zip(out.chunks_mut(t * c)) {
            let mut qkv = vec![0.0; t * 3 * c];
            let (mut k_sum, mut kv) = (vec![0.0; c], vec![0.0; c * self.head_dim]);
            for (i, (x, qkv)) in x.chunks(per * c).zip(qkv.chunks_mut(per * 3 * c)).enumerate() {
                let (mut block_k_sum, mut block_kv) = (vec![0.0; c], vec![0.0; c * self.head_dim]);
                fast.infer_keys(p, i * per, x, qkv, &mut block_k_sum, &mut block_kv);
                kernels::add_assign(&mut k_sum, &block_k_sum);
                kernels::add_assign(&mut kv, &block_kv);
            }
            let mut mixed = vec![0.0; t * c];
            for (i, (mixed, x)) in mixed.chunks_mut(per * c).zip(x.chunks(per * c)).enumerate() {
                let (mut scores, mut gate) = (vec![0.0; mixed.len() / c * t], vec![0.0; mixed.len()]);
                fast.infer_queries(p, i * per, &qkv, &k_sum, &kv, conv.as_ref(), x, mixed, &mut gate, &mut scores);
            }
            fast.proj.apply(p, &mixed, out);
        }
        Some(out)
    }
}

#[derive(Debug)]
struct SrAttentionCase {
    kind: AttentionKind,
    batch: usize,
    heads: usize,
    head_dim: usize,
    qkv_bias: bool,
    grid: [usize; 2],
    sr_ratio: usize,
    /// The reduction's norm (R > 1): RepBN (batch statistics) or LayerNorm.
    repbn: bool,
    /// Row blocks of the inference passes.
    parts: usize,
}

impl SrAttentionCase {
    fn draw(rng: &mut Pcg64, kind: AttentionKind) -> Self {
        // Two images at least: the reduction's BatchNorm needs two rows when N_r is 1.
        let (batch, heads, head_dim, qkv_bias) = (pick(rng, &[2, 3]), pick(rng, &[1, 3]), pick(rng, &[3, 4, 5]), rng.random_bool(0.5));
        let grid = pick(rng, &[[4, 6], [5, 3], [3, 7], [6, 4]]);
        // SLA's normalizer 1/(q·Σk + 1e-6) over one or two reduced keys leaves gradients that
        // move by 1e-5 when the input moves by an ulp (burn against itself): no f32 comparison
        // holds there, so SLA gets four keys at least.
        let sr_ratio = loop {
            let ratio = pick(rng, &[1, 2, 3]);
            if !matches!(kind, AttentionKind::Sla { .. }) || (grid[0] / ratio) * (grid[1] / ratio) >= 4 {
                break ratio;
            }
        };
        Self { kind, batch, heads, head_dim, qkv_bias, grid, sr_ratio, repbn: rng.random_bool(0.5), parts: pick(rng, &[1, 2, 3]) }
    }

    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn tokens(&self) -> usize {
        self.grid[0] * self.grid[1]
    }

    fn len(&self) -> usize {
        self.batch * self.tokens() * self.dim()
    }
}

impl LayerCase for SrAttentionCase {
    type Layer = SpatialReductionAttention;
    type Fast = FastSrAttention;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> SpatialReductionAttention {
        let norm = if self.repbn { NormKind::repbn() } else { NormKind::layer_norm(1e-6) };
        let config = SrAttentionConfig { dim: self.dim(), num_heads: self.heads, qkv_bias: self.qkv_bias, kind: self.kind, sr_ratio: self.sr_ratio, grid: self.grid, norm };
        config.validate().expect("a valid case");
        config.init(device)
    }

    /// For SLA an input whose normalisers are 0 or at least [`MIN_SLA_NORMALISER`] (see
    /// [`AttentionCase::well_conditioned`]), probed on a second lowering of the layer (whose
    /// statistics are its own copy).
    fn input(&self, layer: &SpatialReductionAttention, rng: &mut Pcg64) -> Vec<f32> {
        loop {
            let x = normal(rng, self.len(), 0.0, 1.0);
            if !matches!(self.kind, AttentionKind::Sla { .. }) {
                return x;
            }
            let mut table = ParamTable::for_module(layer);
            let mut probe = FastSrAttention::lower(layer, &mut table).expect("the layer lowers");
            let (mut out, mut acts) = (vec![0.0; x.len()], SrActivations::default());
            probe.forward(&table.values, &x, &mut out, &mut acts, self.batch, false, false).expect("the forward runs");
            if probe.normalisers(&acts).iter().all(|&n| n - 1e-6 <= 0.0 || n >= MIN_SLA_NORMALISER) {
                return x;
            }
        }
    }

    fn reference(&self, layer: &SpatialReductionAttention, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.tokens(), self.dim()])).reshape([self.len()])
    }

    fn lower(&self, layer: &SpatialReductionAttention, table: &mut ParamTable) -> FastSrAttention {
        FastSrAttention::lower(layer, table).expect("the attention kind lowers")
    }

    fn train(&self, fast: &mut FastSrAttention, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; x.len()];
        let mut acts = SrActivations::default();
        fast.forward(p, x, &mut out, &mut acts, self.batch, true, false).expect("the training forward runs");
        let mut dx = vec![0.0; x.len()];
        fast.backward(p, g, x, &acts, dy, &mut dx, &mut SrScratch::default(), self.batch);
        (out, Some(dx))
    }

    fn write_buffers(&self, fast: &FastSrAttention, state: &mut StateDict) {
        if let Some(norm) = fast.norm() {
            norm.write_buffers(state);
        }
    }

    /// Each image in the plan's passes over `parts` row blocks: query rows (and unreduced keys),
    /// reduced keys, the partial sums added, v interpolated, then the queries.
    fn infer(&self, fast: &FastSrAttention, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let (t, c, n_r) = (self.tokens(), self.dim(), fast.keys());
        let (per, per_r, len) = (t.div_ceil(self.parts), n_r.div_ceil(self.parts), fast.patch_len());
        let tiled = fast.tiled_conv(p);
        let conv = tiled.as_ref().and_then(|(taps, bias)| fast.conv_view(taps, bias));
        let state_len = c * self.head_dim;
        let mut out = vec![0.0; x.len()];
        for (x, out) in x.chunks(t * c).zip(out.chunks_mut(t * c)) {
            let (mut q, mut kv_rows) = (vec![0.0; t * c], vec![0.0; n_r * 2 * c]);
            let (mut k_sum, mut state) = (vec![0.0; c], vec![0.0; state_len]);
            let mut add = |block_k_sum: &[f32], block_state: &[f32]| {
                kernels::add_assign(&mut k_sum, block_k_sum);
                kernels::add_assign(&mut state, block_state);
            };
            for (i, (x, q)) in x.chunks(per * c).zip(q.chunks_mut(per * c)).enumerate() {
                let (mut bk, mut bs) = (vec![0.0; c], vec![0.0; state_len]);
                let kv_block: &mut [f32] = if fast.reduces() { &mut [] } else { &mut kv_rows[i * per * 2 * c..(i * per * 2 * c + x.len() * 2).min(t * 2 * c)] };
                fast.infer_rows(p, i * per, x, q, kv_block, &mut bk, &mut bs);
                if !fast.reduces() {
                    add(&bk, &bs);
                }
            }
            if fast.reduces() {
                for (i, kv_block) in kv_rows.chunks_mut(per_r * 2 * c).enumerate() {
                    let rows = kv_block.len() / (2 * c);
                    let (mut patches, mut reduced, mut normed) = (vec![0.0; rows * len], vec![0.0; rows * c], vec![0.0; rows * c]);
                    let (mut bk, mut bs) = (vec![0.0; c], vec![0.0; state_len]);
                    fast.infer_reduce(p, i * per_r, x, &mut patches, &mut reduced, &mut normed, kv_block, &mut bk, &mut bs);
                    add(&bk, &bs);
                }
            }
            let mut v_full = vec![0.0; if fast.interpolates() { t * c } else { 0 }];
            for (i, v) in v_full.chunks_mut(per * c).enumerate() {
                fast.infer_values(&kv_rows, i * per, v);
            }
            let mut mixed = vec![0.0; t * c];
            for (i, mixed) in mixed.chunks_mut(per * c).enumerate() {
                let mut scores = vec![0.0; mixed.len() / c * n_r];
                fast.infer_queries(i * per, &q[i * per * c..i * per * c + mixed.len()], &kv_rows, &k_sum, &state, conv.as_ref(), &v_full, mixed, &mut scores);
            }
            fast.proj.apply(p, &mixed, out);
        }
        Some(out)
    }
}

/// A stage embedding's conv over a token grid (PVT's patch convs, CSwin's padded merges):
/// (B, H·W, C_in) rows, or (B, C_in, H, W) images for a first stage, → (B, H'·W', C_out) rows.
#[derive(Debug)]
struct StageConvCase {
    source: Source,
    batch: usize,
    in_chans: usize,
    grid: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    dim: usize,
}

impl StageConvCase {
    fn draw(rng: &mut Pcg64) -> Self {
        let (kernel, stride, padding) = pick(rng, &[(2, 2, 0), (3, 2, 1), (7, 4, 2), (3, 3, 0)]);
        let source = pick(rng, &[Source::Rows, Source::Planes]);
        Self { source, batch: pick(rng, &[1, 2]), in_chans: pick(rng, &[1, 3, 5]), grid: pick(rng, &[[7, 9], [8, 8], [5, 6]]), kernel, stride, padding, dim: pick(rng, &[4, 9]) }
    }

    fn out_grid(&self) -> [usize; 2] {
        self.grid.map(|n| (n + 2 * self.padding - self.kernel) / self.stride + 1)
    }

    fn out_len(&self) -> usize {
        let [h, w] = self.out_grid();
        self.batch * h * w * self.dim
    }

    fn patches(&self, fast: &FastConv, x: &[f32]) -> Vec<f32> {
        let [h, w] = self.out_grid();
        let mut patches = vec![0.0; self.batch * h * w * fast.patch_len()];
        fast.im2col_batch(x, self.grid, self.batch, &mut patches);
        patches
    }
}

impl LayerCase for StageConvCase {
    type Layer = Conv2d;
    type Fast = FastConv;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> Conv2d {
        let p = self.padding;
        Conv2dConfig::new([self.in_chans, self.dim], [self.kernel, self.kernel]).with_stride([self.stride, self.stride]).with_padding(PaddingConfig2d::Explicit(p, p, p, p)).init(device)
    }

    fn input(&self, _layer: &Conv2d, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.batch * self.grid[0] * self.grid[1] * self.in_chans, 0.0, 1.0)
    }

    fn reference(&self, layer: &Conv2d, x: Tensor<1>) -> Tensor<1> {
        let [h, w] = self.grid;
        let image = match self.source {
            Source::Rows => x.reshape([self.batch, h * w, self.in_chans]).swap_dims(1, 2).reshape([self.batch, self.in_chans, h, w]),
            Source::Planes => x.reshape([self.batch, self.in_chans, h, w]),
        };
        let y = layer.forward(image); // (B, dim, H', W')
        let [oh, ow] = self.out_grid();
        y.reshape([self.batch, self.dim, oh * ow]).swap_dims(1, 2).reshape([self.out_len()])
    }

    fn lower(&self, layer: &Conv2d, table: &mut ParamTable) -> FastConv {
        FastConv::lower(layer, self.source, table).expect("a dense conv lowers")
    }

    fn train(&self, fast: &mut FastConv, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let patches = self.patches(fast, x);
        let mut out = vec![0.0; self.out_len()];
        fast.proj.forward(p, &patches, &mut out, false);
        fast.proj.backward_params(g, &patches, dy, &mut Vec::new());
        let mut dpatches = vec![0.0; patches.len()];
        fast.proj.backward_input(p, dy, &mut dpatches, |_, _| {});
        let mut dx = vec![0.0; x.len()];
        let [h, w] = self.out_grid();
        for (dx, dp) in dx.chunks_mut(x.len() / self.batch).zip(dpatches.chunks(h * w * fast.patch_len())) {
            fast.col2im_add(dp, self.grid, dx);
        }
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastConv, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; self.out_len()];
        fast.proj.apply(p, &self.patches(fast, x), &mut out);
        Some(out)
    }
}

/// The conv blocks of the mobile families on raster rows: conv (dense k×k, 1×1, depthwise with a
/// channel multiplier; strided) → BatchNorm2d (training statistics) → activation, and the
/// deploy form (the conv with a bias, no norm).
#[derive(Debug)]
struct ConvBlockCase {
    batch: usize,
    grid: [usize; 2],
    shape: ConvShape,
    act: Activation,
    /// Threads the inference splits each image's output rows over.
    parts: usize,
}

impl ConvBlockCase {
    /// A block of each conv kind in turn. Deploy blocks have a conv bias (the folded
    /// BatchNorm's); trained ones none: a bias before a training-mode BatchNorm has a gradient
    /// that is 0 up to rounding (the BN removes per-channel constants), noise against noise.
    fn draw(rng: &mut Pcg64, index: usize, deploy: bool) -> Self {
        let (in_chans, out_chans) = (pick(rng, &[1, 3, 5, 8]), pick(rng, &[2, 7, 12]));
        let shape = match index % 5 {
            0 => ConvShape::new(in_chans, out_chans, pick(rng, &[3, 5]), pick(rng, &[1, 2])),
            1 => ConvShape::new(in_chans, out_chans, 1, 1),
            // SLA's stride-1 depthwise kernel (AVX-512 for 16-channel blocks), then the general
            // one: strided, and with a channel multiplier.
            2 => ConvShape::depthwise(pick(rng, &[3, 16, 32]), 1, 3, 1),
            3 => ConvShape::depthwise(in_chans, 1, pick(rng, &[3, 5]), 2),
            _ => ConvShape::depthwise(in_chans, pick(rng, &[2, 4]), pick(rng, &[3, 5]), pick(rng, &[1, 2])),
        };
        let act = pick(rng, &[Activation::Identity, Activation::Relu, Activation::Relu6, Activation::Silu, Activation::Gelu, Activation::Hardsigmoid, Activation::Hardswish]);
        // BatchNorm needs two values per channel; odd grids exercise the padding at the edges.
        Self { batch: pick(rng, &[1, 2, 3]), grid: pick(rng, &[[5, 6], [7, 7], [4, 9]]), shape: shape.with_bias(deploy), act, parts: pick(rng, &[1, 2, 3]) }
    }

    fn out_len(&self) -> usize {
        let [h, w] = self.shape.out_grid(self.grid);
        self.batch * h * w * self.shape.out_chans
    }

    /// Rows (B, H·W, C) → planes (B, C, H, W).
    fn planes(&self, x: Tensor<1>) -> Tensor<4> {
        let ([h, w], c) = (self.grid, self.shape.in_chans);
        x.reshape([self.batch, h * w, c]).swap_dims(1, 2).reshape([self.batch, c, h, w])
    }

    /// Planes (B, C, H', W') → rows, flat.
    fn rows(&self, y: Tensor<4>) -> Tensor<1> {
        let [b, c, h, w] = y.dims();
        y.reshape([b, c, h * w]).swap_dims(1, 2).reshape([self.out_len()])
    }

    fn train(&self, fast: &mut FastConvNormAct, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let mut out = vec![0.0; self.out_len()];
        let mut cache = ConvNormActCache::default();
        fast.forward(p, x, self.grid, self.batch, &mut out, &mut cache).expect("enough values per channel");
        let mut dx = vec![0.0; x.len()];
        fast.backward(p, g, x, dy, &mut dx, &cache);
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastConvNormAct, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; self.out_len()];
        let per_out = out.len() / self.batch;
        for (o, x) in out.chunks_mut(per_out).zip(x.chunks(x.len() / self.batch)) {
            fast.infer(p, x, self.grid, o, self.parts);
        }
        Some(out)
    }
}

/// [`ConvBlockCase`] with a BatchNorm: the trained form.
#[derive(Debug)]
struct ConvNormActCase(ConvBlockCase);

impl LayerCase for ConvNormActCase {
    type Layer = ConvNormAct;
    type Fast = FastConvNormAct;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> ConvNormAct {
        ConvNormAct::new(self.0.shape, self.0.act, device)
    }

    fn input(&self, _layer: &ConvNormAct, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.0.batch * self.0.grid[0] * self.0.grid[1] * self.0.shape.in_chans, 0.0, 1.0)
    }

    fn reference(&self, layer: &ConvNormAct, x: Tensor<1>) -> Tensor<1> {
        self.0.rows(layer.forward(self.0.planes(x)))
    }

    fn lower(&self, layer: &ConvNormAct, table: &mut ParamTable) -> FastConvNormAct {
        FastConvNormAct::lower(layer, table).expect("the block lowers")
    }

    fn train(&self, fast: &mut FastConvNormAct, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        self.0.train(fast, p, x, dy, g)
    }

    fn write_buffers(&self, fast: &FastConvNormAct, state: &mut StateDict) {
        fast.write_buffers(state);
    }

    fn infer(&self, fast: &FastConvNormAct, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        self.0.infer(fast, p, x)
    }
}

/// [`ConvBlockCase`] without a norm: the deploy form.
#[derive(Debug)]
struct ConvActCase(ConvBlockCase);

impl LayerCase for ConvActCase {
    type Layer = ConvAct;
    type Fast = FastConvNormAct;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> ConvAct {
        ConvAct { conv: self.0.shape.init(device), act: self.0.act }
    }

    fn input(&self, _layer: &ConvAct, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.0.batch * self.0.grid[0] * self.0.grid[1] * self.0.shape.in_chans, 0.0, 1.0)
    }

    fn reference(&self, layer: &ConvAct, x: Tensor<1>) -> Tensor<1> {
        self.0.rows(layer.forward(self.0.planes(x)))
    }

    fn lower(&self, layer: &ConvAct, table: &mut ParamTable) -> FastConvNormAct {
        FastConvNormAct::lower_deploy(layer, table).expect("the block lowers")
    }

    fn train(&self, fast: &mut FastConvNormAct, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        self.0.train(fast, p, x, dy, g)
    }

    fn infer(&self, fast: &FastConvNormAct, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        self.0.infer(fast, p, x)
    }
}

#[derive(Debug)]
struct PatchEmbedCase {
    batch: usize,
    in_chans: usize,
    patch: usize,
    /// Patches per side.
    side: usize,
    dim: usize,
}

impl PatchEmbedCase {
    fn draw(rng: &mut Pcg64) -> Self {
        Self { batch: pick(rng, &[1, 2]), in_chans: pick(rng, &[1, 3, 5]), patch: pick(rng, &[2, 3]), side: pick(rng, &[1, 2, 3]), dim: pick(rng, &[7, 9, 12]) }
    }

    fn size(&self) -> usize {
        self.patch * self.side
    }

    fn out_len(&self) -> usize {
        self.batch * self.side * self.side * self.dim
    }

    fn patches(&self, fast: &FastPatchEmbed, images: &[f32]) -> Vec<f32> {
        let per_image = self.in_chans * self.size() * self.size();
        let mut patches = vec![0.0; self.batch * self.side * self.side * fast.patch_len()];
        for (image, patches) in images.chunks(per_image).zip(patches.chunks_mut(self.side * self.side * fast.patch_len())) {
            fast.im2col(image, self.size(), patches);
        }
        patches
    }
}

impl LayerCase for PatchEmbedCase {
    type Layer = PatchEmbed;
    type Fast = FastPatchEmbed;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> PatchEmbed {
        PatchEmbed::new(self.in_chans, self.dim, self.patch, device)
    }

    fn input(&self, _layer: &PatchEmbed, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.batch * self.in_chans * self.size() * self.size(), 0.0, 1.0)
    }

    fn reference(&self, layer: &PatchEmbed, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.in_chans, self.size(), self.size()])).reshape([self.out_len()])
    }

    fn lower(&self, layer: &PatchEmbed, table: &mut ParamTable) -> FastPatchEmbed {
        FastPatchEmbed::lower(layer, table).expect("a patch embedding lowers")
    }

    /// Images get no gradient: the embedding is the first layer.
    fn train(&self, fast: &mut FastPatchEmbed, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let patches = self.patches(fast, x);
        let mut out = vec![0.0; self.out_len()];
        fast.proj.forward(p, &patches, &mut out, false);
        fast.proj.backward_params(g, &patches, dy, &mut Vec::new());
        (out, None)
    }

    fn infer(&self, fast: &FastPatchEmbed, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let mut out = vec![0.0; self.out_len()];
        fast.proj.apply(p, &self.patches(fast, x), &mut out);
        Some(out)
    }
}

/// A Swin block's window attention as the block runs it on its (B, H·W, C) rows: pad (zeros,
/// or a fused block's pad token), shift, windows, attention, reverse, crop.
#[derive(Module, Debug)]
struct WindowedAttention {
    attn: WindowAttention,
    attn_mask: Option<MaskBuffer>,
    pad: Option<Tensor<1>>,
    #[module(skip)]
    grid: WindowGrid,
}

impl WindowedAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mask = self.attn_mask.as_ref().map(MaskBuffer::tensor);
        self.grid.apply(x, self.pad.as_ref(), |windows| self.attn.forward(windows, mask))
    }
}

#[derive(Debug)]
struct WindowAttentionCase {
    batch: usize,
    heads: usize,
    head_dim: usize,
    grid: WindowGrid,
    qkv_bias: bool,
    /// The official layout (index and mask in the state; the harness redraws the mask's values
    /// like any float buffer's) or timm's (recomputed: the real 0 / −100 mask).
    persistent: bool,
    /// A fused block's pad token instead of zeros.
    pad: bool,
    /// Whether the training forward adds to what the output holds (a residual).
    accumulate: bool,
    /// Threads sharing one image's inference.
    parts: usize,
}

impl WindowAttentionCase {
    /// Maps that windows do not divide (padding), windows of 2–4 tokens a side; shifted cases
    /// have maps larger than their window, so that they do shift.
    fn draw(rng: &mut Pcg64, shifted: bool) -> Self {
        let (target, resolution) = if shifted {
            (pick(rng, &[2, 3, 4]), [pick(rng, &[5, 6, 7, 9]), pick(rng, &[5, 7, 8])])
        } else {
            (pick(rng, &[2, 3, 4]), [pick(rng, &[2, 3, 5, 7]), pick(rng, &[3, 4, 6, 7])])
        };
        let grid = WindowGrid::new(resolution, target, shifted).expect("a non-empty map");
        assert_eq!(grid.shift > 0, shifted, "{grid:?}");
        Self {
            batch: pick(rng, &[1, 2]),
            heads: pick(rng, &[1, 2, 3]),
            head_dim: pick(rng, &[3, 4, 5]),
            grid,
            qkv_bias: rng.random_bool(0.5),
            persistent: rng.random_bool(0.5),
            pad: rng.random_bool(0.5),
            accumulate: rng.random_bool(0.5),
            parts: pick(rng, &[1, 2, 3]),
        }
    }

    fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn tokens(&self) -> usize {
        self.grid.resolution[0] * self.grid.resolution[1]
    }

    fn len(&self) -> usize {
        self.batch * self.tokens() * self.dim()
    }

    /// One image at a time, as the inference walk runs it: `out += attn(x)` from zeros.
    fn infer_images(&self, fast: &FastWindowAttention, p: &[f32], x: &[f32], parts: usize) -> Vec<f32> {
        let per_image = self.tokens() * self.dim();
        let mut out = vec![0.0; x.len()];
        let mut scratch = WindowInferScratch::default(); // reused from image to image
        for (x, out) in x.chunks(per_image).zip(out.chunks_mut(per_image)) {
            fast.infer(p, x, out, &mut scratch, parts);
        }
        out
    }
}

impl LayerCase for WindowAttentionCase {
    type Layer = WindowedAttention;
    type Fast = FastWindowAttention;

    fn build(&self, device: &Device, rng: &mut Pcg64) -> WindowedAttention {
        let pad = self.pad.then(|| flat(&uniform(rng, self.dim(), -1.0, 1.0), device));
        WindowedAttention {
            attn: WindowAttention::new(self.dim(), self.heads, self.grid.window, self.qkv_bias, self.persistent, device),
            attn_mask: self.grid.mask_buffer(self.persistent, device),
            pad,
            grid: self.grid,
        }
    }

    fn input(&self, _layer: &WindowedAttention, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.len(), 0.0, 1.0)
    }

    fn reference(&self, layer: &WindowedAttention, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.tokens(), self.dim()])).reshape([self.len()])
    }

    fn lower(&self, layer: &WindowedAttention, table: &mut ParamTable) -> FastWindowAttention {
        FastWindowAttention::lower(&layer.attn, layer.grid, layer.attn_mask.as_ref(), layer.pad.as_ref(), table).expect("window attention lowers")
    }

    fn train(&self, fast: &mut FastWindowAttention, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let base: Vec<f32> = (0..x.len()).map(|i| if self.accumulate { (i % 7) as f32 - 3.0 } else { f32::NAN }).collect();
        let mut out = base.clone(); // NaN where the forward must overwrite
        let mut acts = WindowAttentionActivations::default();
        fast.forward(p, x, &mut out, &mut acts, self.batch, self.accumulate).expect("the training forward runs");
        if self.accumulate {
            out.iter_mut().zip(&base).for_each(|(o, b)| *o -= b);
        }
        let mut dx = vec![f32::NAN; x.len()]; // overwritten
        fast.backward(p, g, &acts, dy, &mut dx, &mut WindowAttentionScratch::default(), self.batch);
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastWindowAttention, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        Some(self.infer_images(fast, p, x, self.parts))
    }
}

/// A CSWin block's attention between its norm and its residual: `proj(attns(qkv(x)))`.
#[derive(Module, Debug)]
struct CrossShapedLayer {
    qkv: Linear,
    attns: Vec<CrossShapedBranch>,
    proj: Linear,
}

impl CrossShapedLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.proj.forward(cross_shaped_attention(self.qkv.forward(x), &self.attns))
    }
}

#[derive(Debug)]
struct CrossShapedCase {
    config: CrossShapedConfig,
    batch: usize,
    qkv_bias: bool,
    /// Whether the training forward adds to what the output holds (a residual).
    accumulate: bool,
    /// Threads sharing one image's inference.
    parts: usize,
}

impl CrossShapedCase {
    /// Maps of 2–6 tokens a side, stripes of every width that divides them (1 included) or the
    /// whole map (split = resolution, or a last stage), 1–2 heads of 2–5 channels per branch.
    /// SLA's stripes are at least half the map (see [`Self::well_conditioned`]); FLatten only
    /// has the global window.
    fn draw(rng: &mut Pcg64, kind: AttentionKind) -> Self {
        let resolution: usize = pick(rng, &[2, 3, 4, 6]);
        let divisors: Vec<usize> = (1..=resolution).filter(|s| resolution.is_multiple_of(*s) && (kind == AttentionKind::Softmax || 2 * s >= resolution)).collect();
        let (split, last_stage) = match kind {
            AttentionKind::Focused { .. } => (resolution, rng.random_bool(0.5)),
            _ => (pick(rng, &divisors), rng.random_bool(0.25)),
        };
        let global = last_stage || split == resolution;
        let (heads, head_dim) = (pick(rng, &[1, 2]) * if global { 1 } else { 2 }, pick(rng, &[2, 3, 4, 5]));
        let config = CrossShapedConfig { dim: heads * head_dim, num_heads: heads, resolution, split, last_stage, kind };
        config.validate().expect("a valid drawn config");
        Self { config, batch: pick(rng, &[1, 2]), qkv_bias: rng.random_bool(0.5), accumulate: rng.random_bool(0.5), parts: pick(rng, &[1, 2, 3]) }
    }

    fn dim(&self) -> usize {
        self.config.dim
    }

    fn tokens(&self) -> usize {
        self.config.resolution * self.config.resolution
    }

    fn len(&self) -> usize {
        self.batch * self.tokens() * self.dim()
    }

    /// SLA's normaliser per window, row and head is 0 or at least [`MIN_SLA_NORMALISER`], as
    /// [`AttentionCase::well_conditioned`] asks of a whole sequence.
    fn well_conditioned(&self, layer: &CrossShapedLayer, x: &[f32]) -> bool {
        let (b, t, c) = (self.batch, self.tokens(), self.dim());
        let x = flat(x, &layer.qkv.weight.val().device()).reshape([b, t, c]);
        let qkv = layer.qkv.forward(x).reshape([b, t, 3, c]);
        let mut start = 0;
        for branch in &layer.attns {
            let (first, dim) = (start, branch.dim());
            start += dim;
            let CrossShapedBranch::Linear(a) = branch else { continue };
            if a.feature_map != FeatureMap::Relu {
                continue;
            }
            let part = |i: usize| img2windows(qkv.clone().narrow(2, i, 1).narrow(3, first, dim).reshape([b, t, dim]), a.resolution, a.window);
            let (q, k) = (part(0), part(1).add(a.positional_encoding.val()));
            let [windows, n, _] = q.dims();
            let (h, d) = (a.num_heads, dim / a.num_heads);
            let q = relu(q).reshape([windows, n, h, d]);
            let k = relu(k).reshape([windows, n, h, d]);
            if !host_f32(q.mul(k.sum_dim(1)).sum_dim(3)).iter().all(|&v| v == 0.0 || v >= MIN_SLA_NORMALISER) {
                return false;
            }
        }
        true
    }
}

impl LayerCase for CrossShapedCase {
    type Layer = CrossShapedLayer;
    type Fast = FastCrossShapedAttention;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> CrossShapedLayer {
        let c = self.dim();
        CrossShapedLayer { qkv: linear(c, 3 * c, self.qkv_bias, device), attns: self.config.init(device), proj: linear(c, c, true, device) }
    }

    fn input(&self, layer: &CrossShapedLayer, rng: &mut Pcg64) -> Vec<f32> {
        loop {
            let x = normal(rng, self.len(), 0.0, 1.0);
            if self.well_conditioned(layer, &x) {
                return x;
            }
        }
    }

    fn reference(&self, layer: &CrossShapedLayer, x: Tensor<1>) -> Tensor<1> {
        layer.forward(x.reshape([self.batch, self.tokens(), self.dim()])).reshape([self.len()])
    }

    fn lower(&self, layer: &CrossShapedLayer, table: &mut ParamTable) -> FastCrossShapedAttention {
        FastCrossShapedAttention::lower(&layer.qkv, &layer.attns, &layer.proj, table).expect("cross-shaped attention lowers")
    }

    fn train(&self, fast: &mut FastCrossShapedAttention, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let base: Vec<f32> = (0..x.len()).map(|i| if self.accumulate { (i % 7) as f32 - 3.0 } else { f32::NAN }).collect();
        let mut out = base.clone(); // NaN where the forward must overwrite
        let mut acts = CrossShapedActivations::default();
        fast.forward(p, x, &mut out, &mut acts, self.batch, self.accumulate).expect("the training forward runs");
        if self.accumulate {
            out.iter_mut().zip(&base).for_each(|(o, b)| *o -= b);
        }
        let mut dx = vec![f32::NAN; x.len()]; // overwritten
        fast.backward(p, g, x, &acts, dy, &mut dx, &mut CrossShapedScratch::default(), self.batch);
        (out, Some(dx))
    }

    /// One image at a time, as the inference walk runs it: `out += attn(x)` from zeros, the
    /// scratch reused from image to image.
    fn infer(&self, fast: &FastCrossShapedAttention, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        let per_image = self.tokens() * self.dim();
        let mut out = vec![0.0; x.len()];
        let mut scratch = CrossShapedInferScratch::default();
        for (x, out) in x.chunks(per_image).zip(out.chunks_mut(per_image)) {
            fast.infer(p, x, out, &mut scratch, self.parts);
        }
        Some(out)
    }
}

/// SLA / FLatten inside a Swin block's windows, as the block runs it on its (B, H·W, C) rows:
/// pad (zeros, or a fused block's pad token), shift, windows, attention over each, reverse, crop.
#[derive(Module, Debug)]
struct WindowedLinearAttention {
    attn: LinearAttention,
    pad: Option<Tensor<1>>,
    #[module(skip)]
    grid: WindowGrid,
}

impl WindowedLinearAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.grid.apply(x, self.pad.as_ref(), |windows| self.attn.forward(windows))
    }
}

#[derive(Debug)]
struct WindowedLinearCase {
    kind: AttentionKind,
    /// The window geometry and sizes of a window-attention case.
    windows: WindowAttentionCase,
}

impl WindowedLinearCase {
    /// Maps of several windows (padded ones among them), shifted or not.
    fn draw(rng: &mut Pcg64, kind: AttentionKind) -> Self {
        let shifted = rng.random_bool(0.5);
        let windows = loop {
            let case = WindowAttentionCase::draw(rng, shifted);
            if !case.grid.is_one_window() {
                break case;
            }
        };
        Self { kind, windows }
    }

    fn infer_images(&self, fast: &FastWindowedLinear, p: &[f32], x: &[f32], parts: usize) -> Vec<f32> {
        let per_image = self.windows.tokens() * self.windows.dim();
        let mut out = vec![0.0; x.len()];
        let mut scratch = WindowedLinearInferScratch::default(); // reused from image to image
        for (x, out) in x.chunks(per_image).zip(out.chunks_mut(per_image)) {
            fast.infer(p, x, out, &mut scratch, parts);
        }
        out
    }

    fn tokens(&self, x: &[f32], device: &Device) -> Tensor<3> {
        let w = &self.windows;
        Tensor::from_data(TensorData::new(x.to_vec(), [w.batch, w.tokens(), w.dim()]), device)
    }
}

impl LayerCase for WindowedLinearCase {
    type Layer = WindowedLinearAttention;
    type Fast = FastWindowedLinear;

    fn build(&self, device: &Device, rng: &mut Pcg64) -> WindowedLinearAttention {
        let w = &self.windows;
        let m = w.grid.window;
        let config = AttentionConfig { dim: w.dim(), num_heads: w.heads, qkv_bias: w.qkv_bias, kind: self.kind, grid: Some([m, m]) };
        let Attention::Linear(attn) = config.init(device) else { panic!("a linear kind builds linear attention") };
        let pad = w.pad.then(|| flat(&uniform(rng, w.dim(), -1.0, 1.0), device));
        WindowedLinearAttention { attn, pad, grid: w.grid }
    }

    /// Inputs whose every window is well conditioned for SLA (see [`AttentionCase`]).
    fn input(&self, layer: &WindowedLinearAttention, rng: &mut Pcg64) -> Vec<f32> {
        let device = layer.attn.qkv.weight.val().device();
        loop {
            let x = normal(rng, self.windows.len(), 0.0, 1.0);
            let mut ok = true;
            layer.grid.apply(self.tokens(&x, &device), layer.pad.as_ref(), |windows| {
                ok = sla_well_conditioned(&layer.attn, windows.clone());
                windows
            });
            if ok {
                return x;
            }
        }
    }

    fn reference(&self, layer: &WindowedLinearAttention, x: Tensor<1>) -> Tensor<1> {
        let w = &self.windows;
        layer.forward(x.reshape([w.batch, w.tokens(), w.dim()])).reshape([w.len()])
    }

    fn lower(&self, layer: &WindowedLinearAttention, table: &mut ParamTable) -> FastWindowedLinear {
        FastWindowedLinear::lower(&layer.attn, layer.grid, layer.pad.as_ref(), table).expect("linear attention over windows lowers")
    }

    fn train(&self, fast: &mut FastWindowedLinear, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let (batch, accumulate) = (self.windows.batch, self.windows.accumulate);
        let base: Vec<f32> = (0..x.len()).map(|i| if accumulate { (i % 7) as f32 - 3.0 } else { f32::NAN }).collect();
        let mut out = base.clone(); // NaN where the forward must overwrite
        let mut acts = WindowedLinearActivations::default();
        fast.forward(p, x, &mut out, &mut acts, batch, accumulate).expect("the training forward runs");
        if accumulate {
            out.iter_mut().zip(&base).for_each(|(o, b)| *o -= b);
        }
        let mut dx = vec![f32::NAN; x.len()]; // overwritten
        fast.backward(p, g, &acts, dy, &mut dx, &mut WindowedLinearScratch::default(), batch);
        (out, Some(dx))
    }

    fn infer(&self, fast: &FastWindowedLinear, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        Some(self.infer_images(fast, p, x, self.windows.parts))
    }
}

#[derive(Debug)]
struct PatchMergeCase {
    /// The norm over 4C (its batch, tokens and channels those of the merged rows).
    norm: NormCase,
    batch: usize,
    resolution: [usize; 2],
    dim: usize,
    parts: usize,
}

/// Odd maps (padding) and even ones, at least 2×2 merged tokens (BatchNorm statistics).
fn merge_sizes(rng: &mut Pcg64) -> (usize, [usize; 2], usize, usize) {
    (pick(rng, &[1, 2]), [pick(rng, &[3, 4, 5, 7]), pick(rng, &[3, 4, 6, 7])], pick(rng, &[3, 4, 5]), pick(rng, &[1, 2, 3]))
}

impl PatchMergeCase {
    fn draw(rng: &mut Pcg64, variant: NormVariant) -> Self {
        let (batch, resolution, dim, parts) = merge_sizes(rng);
        let [h, w] = PatchMerging::output_resolution(resolution);
        let norm = NormCase { batch, tokens: h * w, channels: 4 * dim, ..NormCase::draw(rng, variant) };
        Self { norm, batch, resolution, dim, parts }
    }
}

/// A merge's fast training forward and backward over the batch.
fn merge_train(fast: &mut FastPatchMerging, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32], batch: usize, advance: bool) -> (Vec<f32>, Option<Vec<f32>>) {
    let mut out = vec![f32::NAN; dy.len()];
    let mut acts = PatchMergeActivations::default();
    fast.forward(p, x, &mut out, &mut acts, batch, advance).expect("the training forward runs");
    let mut dx = vec![f32::NAN; x.len()]; // overwritten
    fast.backward(p, g, &acts, dy, &mut dx, &mut PatchMergeScratch::default(), batch);
    (out, Some(dx))
}

/// A merge's inference, one image at a time, the scratch reused.
fn merge_infer(fast: &FastPatchMerging, p: &[f32], x: &[f32], parts: usize) -> Vec<f32> {
    let (per_in, per_out) = (fast.tokens() * fast.dim(), fast.out_tokens() * fast.out_dim());
    let mut out = vec![f32::NAN; x.len() / per_in * per_out];
    let mut scratch = PatchMergeScratch::default();
    for (x, out) in x.chunks(per_in).zip(out.chunks_mut(per_out)) {
        fast.infer(p, x, out, &mut scratch, parts);
    }
    out
}

impl LayerCase for PatchMergeCase {
    type Layer = PatchMerging;
    type Fast = FastPatchMerging;

    fn build(&self, device: &Device, rng: &mut Pcg64) -> PatchMerging {
        PatchMerging { norm: self.norm.build(device, rng), reduction: linear(4 * self.dim, 2 * self.dim, false, device) }
    }

    fn input(&self, _layer: &PatchMerging, rng: &mut Pcg64) -> Vec<f32> {
        // Off-centre, so the norm's means matter.
        normal(rng, self.batch * self.resolution[0] * self.resolution[1] * self.dim, 0.5, 1.5)
    }

    fn reference(&self, layer: &PatchMerging, x: Tensor<1>) -> Tensor<1> {
        let [h, w] = self.resolution;
        let out = layer.forward(x.reshape([self.batch, h * w, self.dim]), self.resolution);
        let len = out.shape().num_elements();
        out.reshape([len])
    }

    fn lower(&self, layer: &PatchMerging, table: &mut ParamTable) -> FastPatchMerging {
        FastPatchMerging::lower(layer, self.resolution, table).expect("patch merging lowers")
    }

    fn train(&self, fast: &mut FastPatchMerging, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        merge_train(fast, p, x, dy, g, self.batch, self.norm.advance)
    }

    fn write_buffers(&self, fast: &FastPatchMerging, state: &mut StateDict) {
        if let Some(norm) = &fast.norm {
            norm.write_buffers(state);
        }
    }

    fn infer(&self, fast: &FastPatchMerging, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        Some(merge_infer(fast, p, x, self.parts))
    }
}

/// The deploy form: no norm, `reduction` with a bias.
#[derive(Debug)]
struct DeployPatchMergeCase {
    batch: usize,
    resolution: [usize; 2],
    dim: usize,
    parts: usize,
}

impl LayerCase for DeployPatchMergeCase {
    type Layer = DeployPatchMerging;
    type Fast = FastPatchMerging;

    fn build(&self, device: &Device, _rng: &mut Pcg64) -> DeployPatchMerging {
        DeployPatchMerging { reduction: linear(4 * self.dim, 2 * self.dim, true, device) }
    }

    fn input(&self, _layer: &DeployPatchMerging, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.batch * self.resolution[0] * self.resolution[1] * self.dim, 0.0, 1.0)
    }

    fn reference(&self, layer: &DeployPatchMerging, x: Tensor<1>) -> Tensor<1> {
        let [h, w] = self.resolution;
        let out = layer.forward(x.reshape([self.batch, h * w, self.dim]), self.resolution);
        let len = out.shape().num_elements();
        out.reshape([len])
    }

    fn lower(&self, layer: &DeployPatchMerging, table: &mut ParamTable) -> FastPatchMerging {
        FastPatchMerging::lower_deploy(layer, self.resolution, table).expect("patch merging lowers")
    }

    fn train(&self, fast: &mut FastPatchMerging, p: &[f32], x: &[f32], dy: &[f32], g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        merge_train(fast, p, x, dy, g, self.batch, true)
    }

    fn infer(&self, fast: &FastPatchMerging, p: &[f32], x: &[f32]) -> Option<Vec<f32>> {
        Some(merge_infer(fast, p, x, self.parts))
    }
}

/// The loss as a layer: the soft targets are its (constant) module, the logits its input, the
/// mean loss its one output.
#[derive(Debug)]
struct CrossEntropyCase {
    batch: usize,
    classes: usize,
}

impl LayerCase for CrossEntropyCase {
    type Layer = Tensor<2>;
    /// The targets on the host.
    type Fast = Vec<f32>;

    fn build(&self, device: &Device, rng: &mut Pcg64) -> Tensor<2> {
        let targets: Vec<f32> = normal(rng, self.batch * self.classes, 0.0, 2.0)
            .chunks(self.classes)
            .flat_map(|row| {
                let exp: Vec<f32> = row.iter().map(|v| v.exp()).collect();
                let sum: f32 = exp.iter().sum();
                exp.into_iter().map(move |e| e / sum)
            })
            .collect();
        flat(&targets, device).reshape([self.batch, self.classes])
    }

    fn input(&self, _targets: &Tensor<2>, rng: &mut Pcg64) -> Vec<f32> {
        normal(rng, self.batch * self.classes, 0.0, 3.0)
    }

    fn reference(&self, targets: &Tensor<2>, logits: Tensor<1>) -> Tensor<1> {
        soft_cross_entropy(logits.reshape([self.batch, self.classes]), targets.clone())
    }

    fn lower(&self, targets: &Tensor<2>, _table: &mut ParamTable) -> Vec<f32> {
        host_f32(targets.clone())
    }

    fn train(&self, targets: &mut Vec<f32>, _p: &[f32], logits: &[f32], dy: &[f32], _g: &mut [f32]) -> (Vec<f32>, Option<Vec<f32>>) {
        let (loss, grad) = cross_entropy(logits, targets, self.classes);
        (vec![loss as f32], Some(grad.iter().map(|g| g * dy[0]).collect()))
    }
}

#[test]
fn linear_with_bias_matches_burn() {
    check(|rng| LinearCase::draw(rng, true));
}

#[test]
fn linear_without_bias_matches_burn() {
    check(|rng| LinearCase::draw(rng, false));
}

#[test]
fn distilled_heads_match_burn() {
    check(|rng| DistilledHeadCase { rows: pick(rng, &[1, 2, 5]), inputs: pick(rng, &[1, 4, 9, 15]), outputs: pick(rng, &[1, 7, 13]) });
}

#[test]
fn layer_norm_matches_burn() {
    check(|rng| NormCase::draw(rng, NormVariant::LayerNorm));
}

#[test]
fn repbn_matches_burn() {
    check(|rng| NormCase::draw(rng, NormVariant::RepBn));
}

#[test]
fn prepbn_warm_up_matches_burn() {
    check(|rng| NormCase::draw(rng, NormVariant::PrepbnWarm));
}

#[test]
fn prepbn_mixing_matches_burn() {
    check(|rng| NormCase::draw(rng, NormVariant::PrepbnMixing));
}

#[test]
fn prepbn_at_lambda_zero_matches_burn() {
    check(|rng| NormCase::draw(rng, NormVariant::PrepbnLambdaZero));
}

#[test]
fn mlp_matches_burn() {
    check(MlpCase::draw);
}

#[test]
fn meta3d_attention_with_its_bias_table_matches_burn() {
    check(Meta3dAttentionCase::draw);
}

#[test]
fn softmax_attention_matches_burn() {
    check(|rng| AttentionCase::draw(rng, AttentionKind::Softmax));
}

#[test]
fn relu_over_length_attention_matches_burn() {
    check(|rng| AttentionCase::draw(rng, AttentionKind::ReluL { qk_norm: false, gated: false }));
}

#[test]
fn relu_over_length_attention_with_qk_norm_and_gate_matches_burn() {
    check(|rng| {
        let (qk_norm, gated) = pick(rng, &[(true, false), (false, true), (true, true)]);
        AttentionCase::draw(rng, AttentionKind::ReluL { qk_norm, gated })
    });
}

#[test]
fn flatten_focused_attention_matches_burn() {
    check(|rng| {
        // Powers 2 and 3 (FLatten's default): at higher ones a row with every input ≤ 0 has
        // u = 1e-6/s everywhere and ‖u^p‖ underflows f32, NaN in burn as in the official code.
        let (power, kernel_size) = (pick(rng, &[2.0, 3.0]), pick(rng, &[3, 5]));
        AttentionCase::draw(rng, AttentionKind::Focused { power, kernel_size })
    });
}

#[test]
fn sla_attention_matches_burn() {
    check(|rng| {
        let kernel_size = pick(rng, &[3, 5]);
        AttentionCase::draw(rng, AttentionKind::Sla { kernel_size })
    });
}

#[test]
fn softmax_spatial_reduction_attention_matches_burn() {
    check(|rng| SrAttentionCase::draw(rng, AttentionKind::Softmax));
}

#[test]
fn sla_spatial_reduction_attention_matches_burn() {
    check(|rng| {
        let kernel_size = pick(rng, &[3, 5]);
        SrAttentionCase::draw(rng, AttentionKind::Sla { kernel_size })
    });
}

#[test]
fn flatten_spatial_reduction_attention_matches_burn() {
    check(|rng| {
        let power = pick(rng, &[2.0, 3.0]);
        SrAttentionCase::draw(rng, AttentionKind::Focused { power, kernel_size: 3 })
    });
}

#[test]
fn stage_conv_over_a_token_grid_matches_burn() {
    check(StageConvCase::draw);
}

#[test]
fn conv_norm_activation_blocks_match_burn() {
    let mut index = 0;
    check(|rng| {
        index += 1;
        ConvNormActCase(ConvBlockCase::draw(rng, index, false))
    });
}

#[test]
fn deploy_conv_activation_blocks_match_burn() {
    let mut index = 0;
    check(|rng| {
        index += 1;
        ConvActCase(ConvBlockCase::draw(rng, index, true))
    });
}

#[test]
fn patch_embedding_matches_burn() {
    check(PatchEmbedCase::draw);
}

#[test]
fn cross_entropy_matches_burn() {
    check(|rng| CrossEntropyCase { batch: pick(rng, &[1, 3, 5]), classes: pick(rng, &[2, 7, 10]) });
}

/// F1 (`nn::fuse::fold_into_next_linear`, SPEC §7.2 item 10) for each norm that folds: the
/// eval-mode norm → Linear equals the folded Linear, in burn and on the fast path, with and
/// without an original bias.
#[test]
fn folded_linear_equals_norm_then_linear() {
    let device = Device::flex(); // no autodiff: every norm evaluates in eval mode
    let mut rng = Pcg64::seed_from_u64(SEED);
    for variant in [NormVariant::RepBn, NormVariant::PrepbnMixing] {
        for _ in 0..SHAPES {
            let case = NormCase::draw(&mut rng, variant);
            let (outputs, bias) = (pick(&mut rng, &[1, 7, 13]), rng.random_bool(0.5));
            let what = format!("{case:?} into {outputs} outputs, bias {bias}");
            let norm = randomized(case.build(&device, &mut rng), &mut rng);
            let next = randomized(linear(case.channels, outputs, bias, &device), &mut rng);
            let x = Tensor::<2>::from_data(TensorData::new(case.input(&norm, &mut rng), [case.rows(), case.channels]), &device);
            let normed = norm.forward(x.clone().reshape([1, case.rows(), case.channels])).reshape([case.rows(), case.channels]);
            let want = host_f32(next.forward(normed));
            let (a, b) = norm.eval_affine().expect("RepBN and PRepBN fold");
            let folded = fold_into_next_linear(&next, a, b);
            assert!(folded.bias.is_some(), "{what}: the folded Linear has a bias");
            assert_close(&format!("{what}: folded in burn"), &host_f32(folded.forward(x.clone())), &want);
            let mut table = ParamTable::for_module(&folded);
            let fast = FastLinear::lower(&folded, &mut table).expect("a Linear lowers");
            let mut ours = vec![0.0; want.len()];
            fast.apply(&table.values, &host_f32(x), &mut ours);
            assert_close(&format!("{what}: folded on the fast path"), &ours, &want);
        }
    }
}

#[test]
fn window_attention_matches_burn() {
    check(|rng| WindowAttentionCase::draw(rng, false));
}

#[test]
fn shifted_window_attention_matches_burn() {
    check(|rng| WindowAttentionCase::draw(rng, true));
}

#[test]
fn cross_shaped_lepe_attention_matches_burn() {
    check(|rng| CrossShapedCase::draw(rng, AttentionKind::Softmax));
}

#[test]
fn cross_shaped_sla_attention_matches_burn() {
    check(|rng| {
        let kernel_size = pick(rng, &[3, 5]);
        CrossShapedCase::draw(rng, AttentionKind::Sla { kernel_size })
    });
}

#[test]
fn cross_shaped_flatten_attention_matches_burn() {
    check(|rng| {
        // Powers 2 and 3, as flatten_focused_attention_matches_burn.
        let (power, kernel_size) = (pick(rng, &[2.0, 3.0]), pick(rng, &[3, 5]));
        CrossShapedCase::draw(rng, AttentionKind::Focused { power, kernel_size })
    });
}

#[test]
fn cross_shaped_attention_refuses_a_wrong_input() {
    let mut rng = Pcg64::seed_from_u64(SEED);
    let case = CrossShapedCase::draw(&mut rng, AttentionKind::Softmax);
    let layer = case.build(&Device::flex(), &mut rng);
    let mut table = ParamTable::for_module(&layer);
    let fast = case.lower(&layer, &mut table);
    let x = vec![0.0; case.len() + case.dim()];
    let err = fast.forward(&table.values, &x, &mut x.clone(), &mut CrossShapedActivations::default(), case.batch, false).unwrap_err();
    assert!(err.to_string().contains("cross-shaped attention"), "{err}");
}

#[test]
fn patch_merging_matches_burn() {
    check(|rng| {
        let variant = pick(rng, &[NormVariant::LayerNorm, NormVariant::RepBn, NormVariant::PrepbnWarm, NormVariant::PrepbnMixing]);
        PatchMergeCase::draw(rng, variant)
    });
}

#[test]
fn deploy_patch_merging_matches_burn() {
    check(|rng| {
        let (batch, resolution, dim, parts) = merge_sizes(rng);
        DeployPatchMergeCase { batch, resolution, dim, parts }
    });
}

/// The deploy forms on the fast path against the unfused burn layers in eval mode: a block's
/// norm (RepBN / PRepBN) folded into window attention's qkv, its padded windows filled with the
/// folded norm's zero `−b/a`; a merge's norm folded into its reduction.
#[test]
fn fused_window_attention_and_patch_merging_equal_unfused_eval() {
    let device = Device::flex(); // no autodiff: every norm evaluates in eval mode
    let mut rng = Pcg64::seed_from_u64(SEED);
    for _ in 0..SHAPES {
        let variant = pick(&mut rng, &[NormVariant::RepBn, NormVariant::PrepbnMixing]);
        let shifted = rng.random_bool(0.5);
        let case = WindowAttentionCase { pad: false, persistent: false, ..WindowAttentionCase::draw(&mut rng, shifted) };
        let norm = randomized(NormCase { channels: case.dim(), ..NormCase::draw(&mut rng, variant) }.build(&device, &mut rng), &mut rng);
        let layer = randomized(case.build(&device, &mut rng), &mut rng);
        let x = case.input(&layer, &mut rng);
        let tokens = Tensor::<3>::from_data(TensorData::new(x.clone(), [case.batch, case.tokens(), case.dim()]), &device);
        let want = host_f32(layer.forward(norm.forward(tokens)));
        let (a, b) = norm.eval_affine().expect("RepBN and PRepBN fold");
        let fused = WindowedAttention { attn: layer.attn.fold_input(a.clone(), b.clone()), pad: Some(b.neg().div(a)), ..layer };
        let mut table = ParamTable::for_module(&fused);
        let fast = FastWindowAttention::lower(&fused.attn, fused.grid, fused.attn_mask.as_ref(), fused.pad.as_ref(), &mut table).expect("window attention lowers");
        assert_close(&format!("{case:?} fused after {variant:?}"), &case.infer_images(&fast, &table.values, &x, case.parts), &want);

        let merge = PatchMergeCase::draw(&mut rng, variant);
        let unfused = randomized(merge.build(&device, &mut rng), &mut rng);
        let x = merge.input(&unfused, &mut rng);
        let want = host_f32(merge.reference(&unfused, flat(&x, &device)));
        let deploy = unfused.fuse().expect("RepBN and PRepBN fold");
        let mut table = ParamTable::for_module(&deploy);
        let fast = FastPatchMerging::lower_deploy(&deploy, merge.resolution, &mut table).expect("patch merging lowers");
        assert_close(&format!("{merge:?} fused"), &merge_infer(&fast, &table.values, &x, merge.parts), &want);
    }
}

/// Inference (one image at a time, over 1–3 threads) computes what the training forward does
/// over the batch, where they compute the same function: window attention, and a merge whose
/// norm has no batch statistics (LayerNorm, deploy).
#[test]
fn window_attention_and_patch_merging_infer_equals_forward() {
    let device = Device::flex();
    let mut rng = Pcg64::seed_from_u64(SEED);
    for _ in 0..SHAPES {
        let shifted = rng.random_bool(0.5);
        let case = WindowAttentionCase::draw(&mut rng, shifted);
        let layer = randomized(case.build(&device, &mut rng), &mut rng);
        let mut table = ParamTable::for_module(&layer);
        let fast = case.lower(&layer, &mut table);
        let x = case.input(&layer, &mut rng);
        let mut want = vec![0.0; x.len()];
        fast.forward(&table.values, &x, &mut want, &mut WindowAttentionActivations::default(), case.batch, false).expect("the training forward runs");
        for parts in 1..=3 {
            assert_close(&format!("{case:?} over {parts} parts"), &case.infer_images(&fast, &table.values, &x, parts), &want);
        }

        let merge = PatchMergeCase::draw(&mut rng, NormVariant::LayerNorm);
        let layer = randomized(merge.build(&device, &mut rng), &mut rng);
        let x = merge.input(&layer, &mut rng);
        let mut table = ParamTable::for_module(&layer);
        let mut fast = merge.lower(&layer, &mut table);
        let deploy = DeployPatchMerging { reduction: randomized(linear(4 * merge.dim, 2 * merge.dim, true, &device), &mut rng) };
        let mut deploy_table = ParamTable::for_module(&deploy);
        let mut fast_deploy = FastPatchMerging::lower_deploy(&deploy, merge.resolution, &mut deploy_table).expect("patch merging lowers");
        for (fast, p) in [(&mut fast, &table.values), (&mut fast_deploy, &deploy_table.values)] {
            let mut want = vec![0.0; x.len() / fast.tokens() / fast.dim() * fast.out_tokens() * fast.out_dim()];
            fast.forward(p, &x, &mut want, &mut PatchMergeActivations::default(), merge.batch, true).expect("the training forward runs");
            for parts in 1..=3 {
                assert_close(&format!("{merge:?} over {parts} parts"), &merge_infer(fast, p, &x, parts), &want);
            }
        }
    }
    // Wrong sizes are errors, not panics.
    let case = WindowAttentionCase::draw(&mut rng, false);
    let layer = case.build(&device, &mut rng);
    let mut table = ParamTable::for_module(&layer);
    let fast = case.lower(&layer, &mut table);
    let x = vec![0.0; case.len() + case.dim()];
    assert!(fast.forward(&table.values, &x, &mut x.clone(), &mut WindowAttentionActivations::default(), case.batch, false).is_err());
}

/// SLAB-Swin's 'L' stages above 224²: SLA over several (padded, shifted) windows.
#[test]
fn sla_over_windows_matches_burn() {
    check(|rng| {
        let kernel_size = pick(rng, &[3, 5]);
        WindowedLinearCase::draw(rng, AttentionKind::Sla { kernel_size })
    });
}

/// FLatten-Swin's 'L' stages over several windows (powers as in
/// `flatten_focused_attention_matches_burn`).
#[test]
fn flatten_over_windows_matches_burn() {
    check(|rng| {
        let (power, kernel_size) = (pick(rng, &[2.0, 3.0]), pick(rng, &[3, 5]));
        WindowedLinearCase::draw(rng, AttentionKind::Focused { power, kernel_size })
    });
}

/// Linear attention over windows: inference over 1–3 threads equals the training forward; a
/// fused block (its norm folded into qkv, padding with −b/a) equals the unfused one in eval
/// mode; a map that is one window equals the plain attention over the map; wrong sizes are
/// errors.
#[test]
fn linear_attention_over_windows_infers_fuses_and_covers_one_window() {
    let device = Device::flex();
    let mut rng = Pcg64::seed_from_u64(SEED);
    for _ in 0..SHAPES {
        let case = WindowedLinearCase::draw(&mut rng, AttentionKind::Sla { kernel_size: 3 });
        let layer = randomized(case.build(&device, &mut rng), &mut rng);
        let mut table = ParamTable::for_module(&layer);
        let mut fast = case.lower(&layer, &mut table);
        let x = case.input(&layer, &mut rng);
        let mut want = vec![0.0; x.len()];
        fast.forward(&table.values, &x, &mut want, &mut WindowedLinearActivations::default(), case.windows.batch, false).expect("the training forward runs");
        for parts in 1..=3 {
            assert_close(&format!("{case:?} over {parts} parts"), &case.infer_images(&fast, &table.values, &x, parts), &want);
        }

        let variant = pick(&mut rng, &[NormVariant::RepBn, NormVariant::PrepbnMixing]);
        let norm = randomized(NormCase { channels: case.windows.dim(), ..NormCase::draw(&mut rng, variant) }.build(&device, &mut rng), &mut rng);
        let unfused = WindowedLinearAttention { pad: None, ..layer };
        let want = host_f32(unfused.forward(norm.forward(case.tokens(&x, &device))));
        let (a, b) = norm.eval_affine().expect("RepBN and PRepBN fold");
        let attn = LinearAttention { qkv: fold_into_next_linear(&unfused.attn.qkv, a.clone(), b.clone()), ..unfused.attn.clone() };
        let fused = WindowedLinearAttention { attn, pad: Some(b.neg().div(a)), ..unfused };
        let mut table = ParamTable::for_module(&fused);
        let fast = FastWindowedLinear::lower(&fused.attn, fused.grid, fused.pad.as_ref(), &mut table).expect("linear attention over windows lowers");
        assert_close(&format!("{case:?} fused after {variant:?}"), &case.infer_images(&fast, &table.values, &x, case.windows.parts), &want);
    }
    // One window of the whole map: the layer over windows is the attention over the map.
    let (batch, m, c) = (2, 4, 8);
    let grid = WindowGrid::new([m, m], m, true).expect("a non-empty map");
    assert!(grid.is_one_window());
    let windows = WindowAttentionCase { batch, heads: 2, head_dim: c / 2, grid, qkv_bias: true, persistent: false, pad: false, accumulate: false, parts: 2 };
    let case = WindowedLinearCase { kind: AttentionKind::Sla { kernel_size: 3 }, windows };
    let layer = randomized(case.build(&device, &mut rng), &mut rng);
    let x = case.input(&layer, &mut rng);
    let mut table = ParamTable::for_module(&layer);
    let mut whole = FastAttention::lower(&Attention::Linear(layer.attn.clone()), &mut table).expect("SLA lowers");
    let mut want = vec![0.0; x.len()];
    whole.forward(&table.values, &x, &mut want, &mut AttentionActivations::default(), batch, m * m, false).expect("the training forward runs");
    let mut windowed_table = ParamTable::for_module(&layer);
    let mut fast = case.lower(&layer, &mut windowed_table);
    assert_close("SLA over one whole-map window", &case.infer_images(&fast, &windowed_table.values, &x, 2), &want);
    // Wrong sizes are errors, not panics; so is a window the attention's grid does not fit.
    let x = vec![0.0; x.len() + c];
    assert!(fast.forward(&windowed_table.values, &x, &mut x.clone(), &mut WindowedLinearActivations::default(), batch, false).is_err());
    let other = WindowGrid::new([2 * m, 2 * m], m - 1, false).expect("a non-empty map");
    assert!(FastWindowedLinear::lower(&layer.attn, other, None, &mut ParamTable::for_module(&layer)).is_err());
}
