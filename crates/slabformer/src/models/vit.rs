//! DeiT / ViT family: DeiT-T/S, PRepBN-DeiT, SLAB-DeiT, FLatten-DeiT, ReLU-attention ViT.
//!
//! One model, with the norm and attention kinds passed in. Structure (SPEC §4.1): patch conv →
//! (+ class token) → + absolute position embedding → blocks of `x + attn(norm1(x))`,
//! `x + mlp(norm2(x))` → final norm → class token or token mean → head.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::{Device, Tensor};
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ModelFamily, Preset};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::{Error, Result};
use crate::kernels;
use crate::nn::attention::{Attention, AttentionActivations, AttentionConfig, AttentionKind, AttentionScratch, FastAttention};
use crate::nn::drop_path::{DropPath, add_masked_branch, draw_mask, masked_gradient, step_rng};
use crate::nn::fuse::fold_into_next_linear;
use crate::nn::linear::{FastLinear, linear};
use crate::nn::lower::{Layout, ParamTable, Slot, sized};
use crate::nn::mlp::{FastMlp, Mlp, MlpActivations};
use crate::nn::norm::{FastNorm, Norm, NormCache, NormKind};
use crate::nn::patch_embed::{FastPatchEmbed, PatchEmbed};
use crate::nn::schedule::{Phase, PrepbnSchedule};
use crate::state::StateDict;

/// What the head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// A class token is prepended; the head reads it (DeiT).
    ClassToken,
    /// No class token in the sequence; the head reads the token mean (SLAB/FLatten). The
    /// `cls_token` parameter still exists, unused, as in the official SLAB code.
    Mean,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub norm: NormKind,
    pub attention: AttentionKind,
    pub pool: Pool,
    pub drop_path_rate: f64,
}

pub(crate) const PRESETS: &[Preset] = &[
    Preset { name: "deit_tiny", summary: "DeiT-T: LayerNorm, softmax, class token", config: VitConfig::deit_tiny },
    Preset { name: "deit_small", summary: "DeiT-S: LayerNorm, softmax, class token", config: VitConfig::deit_small },
    Preset { name: "prepbn_deit_tiny", summary: "DeiT-T with pure RepBN (T = 0)", config: VitConfig::prepbn_deit_tiny },
    Preset { name: "prepbn_deit_small", summary: "DeiT-S with PRepBN, T = 3e5", config: VitConfig::prepbn_deit_small },
    Preset { name: "slab_deit_tiny", summary: "SLAB-DeiT-T: PRepBN (T = 6e4) + SLA, mean pool", config: VitConfig::slab_deit_tiny },
    Preset { name: "slab_deit_small", summary: "SLAB-DeiT-S: PRepBN (T = 6e4) + SLA, mean pool", config: VitConfig::slab_deit_small },
    Preset { name: "flatten_deit_tiny", summary: "FLatten-DeiT-T: LayerNorm + focused linear attention", config: VitConfig::flatten_deit_tiny },
    Preset { name: "relu_vit_tiny", summary: "ViT-T with ReLU/L attention and qk-LayerNorm", config: VitConfig::relu_vit_tiny },
    Preset { name: "golden_slab_deit_tiny", summary: "the 56², patch-4, 2-block SLAB-DeiT of the golden files", config: VitConfig::golden_slab_deit_tiny },
];

impl VitConfig {
    fn deit(embed_dim: usize, num_heads: usize) -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            num_classes: 1000,
            embed_dim,
            depth: 12,
            num_heads,
            mlp_ratio: 4.0,
            qkv_bias: true,
            norm: NormKind::layer_norm(1e-6),
            attention: AttentionKind::Softmax,
            pool: Pool::ClassToken,
            drop_path_rate: 0.0,
        }
    }

    pub fn deit_tiny() -> Self {
        Self::deit(192, 3)
    }

    pub fn deit_small() -> Self {
        Self::deit(384, 6)
    }

    pub fn prepbn_deit_tiny() -> Self {
        Self {
            norm: NormKind::repbn(),
            ..Self::deit_tiny()
        }
    }

    pub fn prepbn_deit_small() -> Self {
        Self {
            norm: NormKind::prepbn(1e-6, 300_000),
            ..Self::deit_small()
        }
    }

    fn slab(base: Self) -> Self {
        Self {
            norm: NormKind::prepbn(1e-6, 60_000),
            attention: AttentionKind::sla(),
            pool: Pool::Mean,
            ..base
        }
    }

    pub fn slab_deit_tiny() -> Self {
        Self::slab(Self::deit_tiny())
    }

    pub fn slab_deit_small() -> Self {
        Self::slab(Self::deit_small())
    }

    pub fn flatten_deit_tiny() -> Self {
        Self {
            attention: AttentionKind::focused(),
            pool: Pool::Mean,
            ..Self::deit_tiny()
        }
    }

    pub fn relu_vit_tiny() -> Self {
        Self {
            attention: AttentionKind::ReluL {
                qk_norm: true,
                gated: false,
            },
            ..Self::deit_tiny()
        }
    }

    /// `slab_deit.VisionTransformer(img_size=56, patch_size=4, num_classes=10, embed_dim=48,
    /// depth=2, num_heads=3)` of `golden/slab_deit_tiny.safetensors`.
    pub fn golden_slab_deit_tiny() -> Self {
        Self {
            img_size: 56,
            patch_size: 4,
            num_classes: 10,
            embed_dim: 48,
            depth: 2,
            num_heads: 3,
            ..Self::slab_deit_tiny()
        }
    }

    /// Token grid (rows, cols) after patch embedding.
    pub fn grid(&self) -> [usize; 2] {
        let side = self.img_size / self.patch_size;
        [side, side]
    }

    pub fn num_patches(&self) -> usize {
        let [r, c] = self.grid();
        r * c
    }

    /// Tokens the blocks see (patches, plus the class token if it is in the sequence).
    pub fn num_tokens(&self) -> usize {
        self.num_patches() + usize::from(self.pool == Pool::ClassToken)
    }

    /// Block `i`'s stochastic depth rate: it grows linearly over the blocks to `drop_path_rate`.
    pub fn block_drop_path_rate(&self, i: usize) -> f64 {
        if self.depth > 1 {
            self.drop_path_rate * i as f64 / (self.depth - 1) as f64
        } else {
            self.drop_path_rate
        }
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    pub fn attention_config(&self) -> AttentionConfig {
        AttentionConfig {
            dim: self.embed_dim,
            num_heads: self.num_heads,
            qkv_bias: self.qkv_bias,
            kind: self.attention,
            grid: (self.pool == Pool::Mean).then(|| self.grid()),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Config(msg));
        if self.patch_size == 0 || self.img_size == 0 || !self.img_size.is_multiple_of(self.patch_size) {
            return err(format!(
                "img_size {} must be a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.in_chans == 0 || self.num_classes == 0 || self.embed_dim == 0 || self.depth == 0 {
            return err("in_chans, num_classes, embed_dim and depth must be > 0".into());
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) {
            return err(format!("mlp_ratio must be > 0, got {}", self.mlp_ratio));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return err(format!("drop_path_rate must lie in [0, 1), got {}", self.drop_path_rate));
        }
        if self.attention.needs_grid() && self.pool == Pool::ClassToken {
            return err("linear attention works on the token grid: use pool = \"mean\" (no class token)".into());
        }
        self.norm.validate()?;
        self.attention_config().validate()
    }

    /// Trainable parameters, from the architecture alone (SPEC §7.2 item 14 counting rules).
    pub fn param_count(&self) -> usize {
        let c = self.embed_dim;
        let block = 2 * self.norm.param_count(c)
            + self.attention_config().param_count()
            + Mlp::param_count(c, self.mlp_hidden());
        PatchEmbed::param_count(self.in_chans, c, self.patch_size)
            + c // cls_token
            + self.num_tokens() * c
            + self.depth * block
            + self.norm.param_count(c)
            + c * self.num_classes
            + self.num_classes
    }

    /// Multiply-accumulates of one image's forward pass (the papers' "FLOPs").
    pub fn macs(&self) -> u64 {
        let (n, c) = (self.num_tokens() as u64, self.embed_dim as u64);
        let patch = self.num_patches() as u64 * c * (self.in_chans * self.patch_size * self.patch_size) as u64;
        let mlp = 2 * n * c * self.mlp_hidden() as u64;
        let block = self.attention_config().macs(self.num_tokens()) + mlp;
        patch + self.depth as u64 * block + c * self.num_classes as u64
    }

    pub fn init(&self, device: &Device) -> Result<VisionTransformer> {
        self.validate()?;
        let c = self.embed_dim;
        let attention = self.attention_config();
        let blocks = (0..self.depth)
            .map(|i| Block::new(&self.norm, &attention, self.mlp_hidden(), self.block_drop_path_rate(i), device))
            .collect();
        let embedding = Initializer::Normal { mean: 0.0, std: 0.02 };
        Ok(VisionTransformer {
            patch_embed: PatchEmbed::new(self.in_chans, c, self.patch_size, device),
            cls_token: Initializer::Zeros.init([1, 1, c], device),
            pos_embed: embedding.init([1, self.num_tokens(), c], device),
            blocks,
            norm: self.norm.init(c, device),
            head: linear(c, self.num_classes, true, device),
            config: self.clone(),
        })
    }
}

#[derive(Module, Debug)]
pub struct Block {
    pub norm1: Norm,
    pub attn: Attention,
    pub drop_path: DropPath,
    pub norm2: Norm,
    pub mlp: Mlp,
}

impl Block {
    pub fn new(
        norm: &NormKind,
        attention: &AttentionConfig,
        mlp_hidden: usize,
        drop_path_rate: f64,
        device: &Device,
    ) -> Self {
        let c = attention.dim;
        Self {
            norm1: norm.init(c, device),
            attn: attention.init(device),
            drop_path: DropPath::new(drop_path_rate),
            norm2: norm.init(c, device),
            mlp: Mlp::new(c, mlp_hidden, device),
        }
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone().add(self.drop_path.forward(self.attn.forward(self.norm1.forward(x))));
        x.clone().add(self.drop_path.forward(self.mlp.forward(self.norm2.forward(x))))
    }

    /// norm1 folded into the attention's input projections (`qkv`, and the gate if it has one),
    /// norm2 into `mlp.fc1`.
    pub fn fuse(&self) -> Result<DeployBlock> {
        let not_foldable = || Error::Config("LayerNorm blocks cannot be re-parameterized".into());
        let (a1, b1) = self.norm1.eval_affine().ok_or_else(not_foldable)?;
        let (a2, b2) = self.norm2.eval_affine().ok_or_else(not_foldable)?;
        Ok(DeployBlock {
            attn: self.attn.fold_input(a1, b1),
            mlp: Mlp { fc1: fold_into_next_linear(&self.mlp.fc1, a2, b2), fc2: self.mlp.fc2.clone() },
        })
    }
}

/// A block with its norms folded away: `x + attn(x)`, `x + mlp(x)`.
#[derive(Module, Debug)]
pub struct DeployBlock {
    pub attn: Attention,
    pub mlp: Mlp,
}

impl DeployBlock {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone().add(self.attn.forward(x));
        x.clone().add(self.mlp.forward(x))
    }
}

/// The norm-free deploy model made by [`VisionTransformer::fuse`].
#[derive(Module, Debug)]
pub struct DeployVit {
    pub patch_embed: PatchEmbed,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<DeployBlock>,
    pub head: Linear,
    #[module(skip)]
    pub config: VitConfig,
}

impl DeployVit {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = embed(&self.patch_embed, &self.cls_token, &self.pos_embed, self.config.pool, images);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        classify(x, self.config.pool, &self.head)
    }
}

/// Patch tokens, with the class token if the head reads it, plus position embeddings.
fn embed(patch_embed: &PatchEmbed, cls_token: &Param<Tensor<3>>, pos_embed: &Param<Tensor<3>>, pool: Pool, images: Tensor<4>) -> Tensor<3> {
    let x = patch_embed.forward(images); // (B, N, C)
    let [b, _, c] = x.dims();
    let x = match pool {
        Pool::ClassToken => Tensor::cat(vec![cls_token.val().expand([b, 1, c]), x], 1), // (B, N + 1, C)
        Pool::Mean => x,
    };
    x.add(pos_embed.val())
}

/// The head on the class token or on the token mean.
fn classify(x: Tensor<3>, pool: Pool, head: &Linear) -> Tensor<2> {
    let [b, _, c] = x.dims();
    let pooled = match pool {
        Pool::ClassToken => x.narrow(1, 0, 1), // (B, 1, C)
        Pool::Mean => x.mean_dim(1),           // (B, 1, C)
    };
    head.forward(pooled.reshape([b, c])) // (B, num_classes)
}

impl ModelFamily for VisionTransformer {
    type Config = VitConfig;
    type Deploy = DeployVit;

    fn presets() -> &'static [Preset] {
        PRESETS
    }
    fn init(config: &VitConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }
    fn config(&self) -> &VitConfig {
        &self.config
    }
    fn param_count(config: &VitConfig) -> usize {
        config.param_count()
    }
    fn macs(config: &VitConfig) -> u64 {
        config.macs()
    }
    fn fuse(&self) -> Result<DeployVit> {
        VisionTransformer::fuse(self)
    }
    fn prepbn_phase(&self) -> Option<Phase> {
        VisionTransformer::prepbn_phase(self)
    }
    fn prepbn_schedule(config: &mut VitConfig) -> Option<&mut PrepbnSchedule> {
        match &mut config.norm {
            NormKind::Prepbn { schedule, .. } => Some(schedule),
            _ => None,
        }
    }
}

/// A model that maps images to logits: trained and deploy forms alike.
pub trait ImageClassifier: Module {
    fn config(&self) -> &VitConfig;
    fn logits(&self, images: Tensor<4>) -> Tensor<2>;
}

impl ImageClassifier for VisionTransformer {
    fn config(&self) -> &VitConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ImageClassifier for DeployVit {
    fn config(&self) -> &VitConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

#[derive(Module, Debug)]
pub struct VisionTransformer {
    pub patch_embed: PatchEmbed,
    pub cls_token: Param<Tensor<3>>,
    pub pos_embed: Param<Tensor<3>>,
    pub blocks: Vec<Block>,
    pub norm: Norm,
    pub head: Linear,
    #[module(skip)]
    pub config: VitConfig,
}

impl VisionTransformer {
    /// Images (B, in_chans, H, W) → logits (B, num_classes). The input must have the configured
    /// size; see [`try_forward`](Self::try_forward) for a checked call.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = embed(&self.patch_embed, &self.cls_token, &self.pos_embed, self.config.pool, images);
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        classify(self.norm.forward(x), self.config.pool, &self.head)
    }

    /// The deploy form: every norm folded into the Linear after it (block norms into `qkv` and
    /// `fc1`, the final norm into the head, which only sees a token average or the class token,
    /// both linear). Eval-mode outputs are unchanged; needs RepBN/PRepBN norms, as LayerNorm
    /// computes its statistics online. The deploy model is an inference model: it lives on the
    /// device without autodiff.
    pub fn fuse(&self) -> Result<DeployVit> {
        let model = self.valid();
        model.fuse_inference()
    }

    fn fuse_inference(&self) -> Result<DeployVit> {
        let final_norm = self.norm.eval_affine().ok_or_else(|| {
            Error::Config("LayerNorm models have no foldable norms: only RepBN/PRepBN models re-parameterize".into())
        })?;
        let blocks = self.blocks.iter().map(Block::fuse).collect::<Result<Vec<_>>>()?;
        let valid = |p: &Param<Tensor<3>>| Param::from_tensor(p.val());
        Ok(DeployVit {
            patch_embed: self.patch_embed.clone(),
            cls_token: valid(&self.cls_token),
            pos_embed: valid(&self.pos_embed),
            blocks,
            head: fold_into_next_linear(&self.head, final_norm.0, final_norm.1),
            config: self.config.clone(),
        })
    }

    /// The phase the first PRepBN layer will compute next (its λ is the one training logs).
    pub fn prepbn_phase(&self) -> Option<Phase> {
        match &self.blocks.first()?.norm1 {
            Norm::LinearNorm(n) => Some(n.next_phase()),
            _ => None,
        }
    }

    /// [`forward`](Self::forward) after checking the input is (B > 0, in_chans, img, img).
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let cfg = &self.config;
        let dims = images.dims();
        let expected = [dims[0], cfg.in_chans, cfg.img_size, cfg.img_size];
        if dims[0] == 0 || dims != expected {
            return Err(Error::InputShape {
                layer: "vision transformer",
                expected: format!(
                    "(B > 0, {}, {}, {}) images",
                    cfg.in_chans, cfg.img_size, cfg.img_size
                ),
                found: dims.to_vec(),
            });
        }
        Ok(self.forward(images))
    }
}

// ---- The fast path: the same model lowered onto its layer kinds' fast forms. The topology below
// mirrors `VisionTransformer::forward` and `Block::forward`; layers, parameters and their keys
// come from the burn modules by `lower`.

/// A block on the fast path: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`. Norms are absent in
/// fused models, the MLP in the attention sweep's lone layers.
pub struct FastBlock {
    pub norm1: Option<FastNorm>,
    pub attn: FastAttention,
    pub norm2: Option<FastNorm>,
    pub mlp: Option<FastMlp>,
    /// Stochastic depth rate of both residual branches.
    pub drop_path: f64,
    /// SLA's conv taps tiled over the heads, for inference (training re-tiles every step).
    inference_conv: Option<(Vec<f32>, Vec<f32>)>,
}

/// One block's training activations, kept from the forward pass for the backward pass.
#[derive(Default)]
pub struct BlockActivations {
    /// (R, C) block input.
    x: Vec<f32>,
    norm1: NormCache,
    normed1: Vec<f32>,
    attn: AttentionActivations,
    /// (R, C) x + attn(norm1(x)).
    mid: Vec<f32>,
    norm2: NormCache,
    normed2: Vec<f32>,
    mlp: MlpActivations,
    /// Per-image drop-path factors of the attention and MLP branches (empty: kept).
    attn_mask: Vec<f32>,
    mlp_mask: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct Scratch {
    dnormed: Vec<f32>,
    dhidden: Vec<f32>,
    /// A residual branch's output gradient under drop-path.
    dbranch: Vec<f32>,
    attn: AttentionScratch,
    partials: Vec<f32>,
}

/// Where a norm that is present writes, or the input itself where it was folded away.
fn norm_or_identity<'a>(norm: Option<&FastNorm>, p: &[f32], x: &'a [f32], normed: &'a mut [f32]) -> &'a [f32] {
    match norm {
        Some(n) => {
            n.infer(p, x, normed);
            normed
        }
        None => x,
    }
}

/// Runs `f` on every item, in parallel when there is more than one.
fn for_each_part<T: Send>(parts: Vec<T>, f: impl Fn(T) + Sync + Send) {
    if parts.len() == 1 {
        parts.into_iter().for_each(f);
    } else {
        parts.into_par_iter().for_each(f);
    }
}

/// The next row block of a split buffer, trimmed to `len` values (empty when `len` is 0).
fn next_block<'a>(blocks: &mut impl Iterator<Item = &'a mut [f32]>, len: usize) -> &'a mut [f32] {
    match blocks.next() {
        Some(block) => &mut block[..len],
        None => &mut [],
    }
}

impl FastBlock {
    pub fn lower(norms: Option<(&Norm, &Norm)>, attn: &Attention, mlp: Option<&Mlp>, drop_path: f64, table: &mut ParamTable) -> Result<Self> {
        let (norm1, norm2) = match norms {
            Some((n1, n2)) => (Some(FastNorm::lower(n1, table)?), Some(FastNorm::lower(n2, table)?)),
            None => (None, None),
        };
        let attn = FastAttention::lower(attn, table)?;
        let mlp = mlp.map(|m| FastMlp::lower(m, table)).transpose()?;
        let inference_conv = attn.tiled_conv(&table.values);
        Ok(Self { norm1, attn, norm2, mlp, drop_path, inference_conv })
    }

    pub fn dim(&self) -> usize {
        self.attn.dim()
    }

    /// Inference on one sequence's (T, C) tokens in `ws.x`, its rows split into `parts` blocks,
    /// in two passes: (A) norm1 → qkv (→ SLA's feature maps and each block's share of Σk and KᵀV),
    /// then, once every row's K and V exist, (B) attention of the block's query rows → proj +
    /// residual → norm2 → MLP + residual. With more than one part the threads meet twice.
    pub fn infer(&self, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
        let c = self.dim();
        let d = c / self.attn.heads;
        let t = ws.x.len() / c;
        assert!(parts <= ws.parts, "workspace sized for {} row blocks, asked for {parts}", ws.parts);
        let per = t.div_ceil(parts.max(1)).max(1);
        let InferWorkspace { x, normed, qkv, mixed, scores, k_sum, kv, hidden, gate, .. } = ws;

        let pass_a: Vec<_> = x.chunks(per * c).zip(normed.chunks_mut(per * c)).zip(qkv.chunks_mut(per * 3 * c)).zip(k_sum.chunks_mut(c)).zip(kv.chunks_mut(c * d)).enumerate().collect();
        let blocks = pass_a.len();
        for_each_part(pass_a, |(i, ((((x, normed), qkv), k_sum), kv))| {
            let input = norm_or_identity(self.norm1.as_ref(), p, x, normed);
            self.attn.infer_keys(p, i * per, input, qkv, k_sum, kv);
        });
        if blocks > 1 {
            // Every block's partial Σk and KᵀV into the first's.
            let (first, rest) = k_sum.split_at_mut(c);
            rest.chunks(c).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
            let (first, rest) = kv.split_at_mut(c * d);
            rest.chunks(c * d).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
        }

        let (qkv, k_sum, kv): (&[f32], &[f32], &[f32]) = (qkv, &k_sum[..c], &kv[..c * d]);
        let conv = self.inference_conv.as_ref().and_then(|(taps, bias)| self.attn.conv_view(taps, bias));
        let hidden_width = self.mlp.as_ref().map_or(0, FastMlp::hidden);
        let score_width = if self.attn.has_scores() { t } else { 0 };
        let mut scores = scores.chunks_mut((per * score_width).max(1));
        let mut hidden = hidden.chunks_mut((per * hidden_width).max(1));
        let gate_width = if self.attn.has_gate() { c } else { 0 };
        let mut gate = gate.chunks_mut((per * gate_width).max(1));
        let pass_b: Vec<_> = x
            .chunks_mut(per * c)
            .zip(normed.chunks_mut(per * c))
            .zip(mixed.chunks_mut(per * c))
            .enumerate()
            .map(|(i, ((x, normed), mixed))| {
                let rows = x.len() / c;
                let scratch = (next_block(&mut scores, rows * score_width), next_block(&mut hidden, rows * hidden_width), next_block(&mut gate, rows * gate_width));
                (i * per, x, normed, mixed, scratch)
            })
            .collect();
        for_each_part(pass_b, |(first, x, normed, mixed, (scores, hidden, gate))| {
            // The gate reads the attention's input: norm1's output from pass A, or x itself.
            let input: &[f32] = if self.norm1.is_some() { normed } else { x };
            self.attn.infer_queries(p, first, qkv, k_sum, kv, conv.as_ref(), input, mixed, gate, scores);
            self.attn.proj.apply_residual(p, mixed, x);
            if let Some(mlp) = &self.mlp {
                mlp.infer_hidden(p, norm_or_identity(self.norm2.as_ref(), p, x, normed), hidden);
                mlp.infer_residual(p, hidden, x);
            }
        });
    }

    /// Training forward on `a.x` (B images of T tokens), the block's output into `out`.
    #[allow(clippy::too_many_arguments)]
    fn forward(&mut self, p: &[f32], a: &mut BlockActivations, out: &mut [f32], batch: usize, t: usize, advance: bool, rng: &mut Pcg64) -> Result<()> {
        let c = self.dim();
        let rows = batch * t;
        // Masks drawn in burn's order: the attention branch's, then the MLP's.
        let draw = |rng: &mut Pcg64| if self.drop_path > 0.0 { draw_mask(rng, batch, self.drop_path) } else { Vec::new() };
        a.attn_mask = draw(rng);
        a.mlp_mask = draw(rng);
        let (Some(norm1), Some(norm2), Some(mlp)) = (&mut self.norm1, &mut self.norm2, &self.mlp) else {
            return Err(Error::Unsupported { what: "training a block without its norms or MLP".into(), path: "the CPU trainer" });
        };
        norm1.forward(p, &a.x, sized(&mut a.normed1, rows * c), &mut a.norm1, c, advance)?;
        let mid = sized(&mut a.mid, rows * c);
        if a.attn_mask.is_empty() {
            mid.copy_from_slice(&a.x);
            self.attn.forward(p, &a.normed1, mid, &mut a.attn, batch, t, true)?; // x + attn(norm1(x))
        } else {
            self.attn.forward(p, &a.normed1, mid, &mut a.attn, batch, t, false)?;
            add_masked_branch(&a.x, mid, &a.attn_mask); // x + mask·attn(norm1(x))
        }
        norm2.forward(p, &a.mid, sized(&mut a.normed2, rows * c), &mut a.norm2, c, advance)?;
        if a.mlp_mask.is_empty() {
            out.copy_from_slice(&a.mid);
            mlp.forward(p, &a.normed2, out, &mut a.mlp, true); // mid + mlp(norm2(mid))
        } else {
            mlp.forward(p, &a.normed2, out, &mut a.mlp, false);
            add_masked_branch(&a.mid, out, &a.mlp_mask); // mid + mask·mlp(norm2(mid))
        }
        Ok(())
    }

    /// From `dx` = ∂L/∂(block output) to ∂L/∂(block input), in place; parameter gradients into `g`.
    #[allow(clippy::too_many_arguments)]
    fn backward(&self, p: &[f32], g: &mut [f32], a: &BlockActivations, dx: &mut [f32], s: &mut Scratch, batch: usize, t: usize) {
        let (norm1, norm2, mlp) = match (&self.norm1, &self.norm2, &self.mlp) {
            (Some(n1), Some(n2), Some(m)) => (n1, n2, m),
            _ => unreachable!("forward refuses blocks without norms or MLP"),
        };
        let c = self.dim();
        let rows = batch * t;
        let mut dbranch = std::mem::take(&mut s.dbranch);
        let dy: &[f32] = if a.mlp_mask.is_empty() { dx } else { masked_gradient(dx, &a.mlp_mask, &mut dbranch) };
        mlp.backward(p, g, &a.normed2, &a.mlp, dy, sized(&mut s.dnormed, rows * c), &mut s.dhidden, &mut s.partials);
        norm2.backward(p, g, &a.mid, &s.dnormed, dx, &a.norm2, c);
        let dy: &[f32] = if a.attn_mask.is_empty() { dx } else { masked_gradient(dx, &a.attn_mask, &mut dbranch) };
        self.attn.backward(p, g, &a.normed1, &a.attn, dy, sized(&mut s.dnormed, rows * c), &mut s.attn, batch, t);
        s.dbranch = dbranch;
        norm1.backward(p, g, &a.x, &s.dnormed, dx, &a.norm1, c);
    }
}

/// One thread's inference activations for one sequence of T tokens, with room for `parts` row
/// blocks.
pub struct InferWorkspace {
    patches: Vec<f32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    mixed: Vec<f32>,
    /// (T, T) attention scores (softmax / ReLU-L blocks only).
    scores: Vec<f32>,
    /// Per row block: Σk (C) and K·V (heads × d × d) of SLA blocks.
    k_sum: Vec<f32>,
    kv: Vec<f32>,
    hidden: Vec<f32>,
    /// The output gate's values (gated ReLU attention only).
    gate: Vec<f32>,
    pooled: Vec<f32>,
    /// How many row blocks `k_sum` and `kv` have room for.
    pub parts: usize,
}

impl InferWorkspace {
    pub fn new(t: usize, c: usize, blocks: &[FastBlock], patch_len: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let hidden = blocks.iter().filter_map(|b| b.mlp.as_ref().map(FastMlp::hidden)).max().unwrap_or(0);
        let dot = blocks.iter().any(|b| b.attn.has_scores());
        let gated = blocks.iter().any(|b| b.attn.has_gate());
        let d = blocks.iter().map(|b| c / b.attn.heads).max().unwrap_or(0);
        InferWorkspace {
            patches: vec![0.0; t * patch_len],
            x: vec![0.0; t * c],
            normed: vec![0.0; t * c],
            qkv: vec![0.0; t * 3 * c],
            mixed: vec![0.0; t * c],
            scores: vec![0.0; if dot { t * t } else { 0 }],
            k_sum: vec![0.0; parts * c],
            kv: vec![0.0; parts * c * d],
            hidden: vec![0.0; t * hidden],
            gate: vec![0.0; if gated { t * c } else { 0 }],
            pooled: vec![0.0; c],
            parts,
        }
    }

    /// The (T, C) tokens a block works on.
    pub fn tokens_mut(&mut self) -> &mut [f32] {
        &mut self.x
    }

    pub fn tokens(&self) -> &[f32] {
        &self.x
    }
}

/// The whole model's training activations of the last forward pass.
#[derive(Default)]
pub struct TrainActivations {
    pub batch: usize,
    patches: Vec<f32>,
    embedded: Vec<f32>,
    blocks: Vec<BlockActivations>,
    last: Vec<f32>,
    norm: NormCache,
    normed: Vec<f32>,
    pooled: Vec<f32>,
}

/// A DeiT-family model on the fast path: its layers lowered from a [`VisionTransformer`] (as
/// trained, norms included) or a [`DeployVit`] (norms folded away) into one parameter table.
/// The CPU runtime ([`crate::runtime::CpuVit`]) runs its inference, the CPU trainer
/// ([`crate::runtime::CpuTrainer`]) its training steps.
pub struct FastVit {
    pub config: VitConfig,
    pub table: ParamTable,
    patch_embed: FastPatchEmbed,
    cls_token: Slot,
    pos_embed: Slot,
    pub blocks: Vec<FastBlock>,
    norm: Option<FastNorm>,
    head: FastLinear,
}

impl FastVit {
    /// The model as trained, its norms included.
    pub fn lower(model: &VisionTransformer) -> Result<Self> {
        let mut table = ParamTable::for_module(model);
        let cfg = &model.config;
        let blocks = model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| FastBlock::lower(Some((&b.norm1, &b.norm2)), &b.attn, Some(&b.mlp), cfg.block_drop_path_rate(i), &mut table))
            .collect::<Result<Vec<_>>>()?;
        let norm = Some(FastNorm::lower(&model.norm, &mut table)?);
        Self::assemble(cfg, table, &model.patch_embed, &model.cls_token, &model.pos_embed, blocks, norm, &model.head)
    }

    /// The norm-free deploy form.
    pub fn lower_deploy(model: &DeployVit) -> Result<Self> {
        let mut table = ParamTable::for_module(model);
        let blocks = model.blocks.iter().map(|b| FastBlock::lower(None, &b.attn, Some(&b.mlp), 0.0, &mut table)).collect::<Result<Vec<_>>>()?;
        Self::assemble(&model.config, table, &model.patch_embed, &model.cls_token, &model.pos_embed, blocks, None, &model.head)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(config: &VitConfig, mut table: ParamTable, patch_embed: &PatchEmbed, cls_token: &Param<Tensor<3>>, pos_embed: &Param<Tensor<3>>, blocks: Vec<FastBlock>, norm: Option<FastNorm>, head: &Linear) -> Result<Self> {
        let patch_embed = FastPatchEmbed::lower(patch_embed, &mut table)?;
        let cls_token = table.add(cls_token, Layout::Official)?;
        if config.pool == Pool::Mean {
            table.untrained(cls_token);
        }
        let pos_embed = table.add(pos_embed, Layout::Official)?;
        let head = FastLinear::lower(head, &mut table)?;
        Ok(Self { config: config.clone(), table, patch_embed, cls_token, pos_embed, blocks, norm, head })
    }

    /// A workspace for inference on one image with its rows split into `parts` blocks.
    pub fn infer_workspace(&self, parts: usize) -> InferWorkspace {
        InferWorkspace::new(self.config.num_tokens(), self.config.embed_dim, &self.blocks, self.patch_embed.patch_len(), parts)
    }

    /// One (C, H, W) image → its logits, its token rows split over `parts` threads.
    pub fn infer_image(&self, image: &[f32], logits: &mut [f32], ws: &mut InferWorkspace, parts: usize) {
        let cfg = &self.config;
        let p = &self.table.values;
        let c = cfg.embed_dim;
        let n = cfg.num_patches();
        let patch_len = self.patch_embed.patch_len();
        self.patch_embed.im2col(image, cfg.img_size, &mut ws.patches[..n * patch_len]);
        let first = match cfg.pool {
            Pool::ClassToken => {
                ws.x[..c].copy_from_slice(&p[self.cls_token.range()]);
                1
            }
            Pool::Mean => 0,
        };
        let per = n.div_ceil(parts.max(1)).max(1);
        let jobs: Vec<_> = ws.patches[..n * patch_len].chunks(per * patch_len).zip(ws.x[first * c..].chunks_mut(per * c)).collect();
        for_each_part(jobs, |(patches, x)| self.patch_embed.proj.apply(p, patches, x)); // (N, C) after the class token
        kernels::add_assign(&mut ws.x, &p[self.pos_embed.range()]);
        for block in &self.blocks {
            block.infer(p, ws, parts);
        }
        let t = first + n;
        let rows = if cfg.pool == Pool::ClassToken { 1 } else { t };
        let tokens = match &self.norm {
            Some(norm) => {
                norm.infer(p, &ws.x[..rows * c], &mut ws.normed[..rows * c]);
                &ws.normed[..rows * c]
            }
            None => &ws.x[..rows * c],
        };
        kernels::column_sums(tokens, rows, c, 0, &mut ws.pooled); // the class token, or the token sum
        ws.pooled.iter_mut().for_each(|v| *v /= rows as f32);
        self.head.apply(p, &ws.pooled, logits);
    }

    /// Training-mode forward of `batch` row-major (B, C, H, W) images → (B, classes) logits,
    /// keeping the activations in `acts`. BatchNorm statistics and PRepBN counters advance like
    /// one training-mode forward of the burn model (the counters only with `advance`); drop-path
    /// masks come from `drop_path_seed` as burn's `drop_path::with_seed` draws them.
    pub fn train_forward(&mut self, images: &[f32], batch: usize, acts: &mut TrainActivations, drop_path_seed: u64, advance: bool) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let (c, size, chans) = (cfg.embed_dim, cfg.img_size, cfg.in_chans);
        let per_image = chans * size * size;
        if batch == 0 || images.len() != batch * per_image {
            return Err(Error::InputShape {
                layer: "vision transformer",
                expected: format!("{batch} × ({chans}, {size}, {size}) = {} values", batch * per_image),
                found: vec![images.len()],
            });
        }
        let (n, t) = (cfg.num_patches(), cfg.num_tokens());
        let rows = batch * t;
        let p = &self.table.values;
        acts.batch = batch;
        let patch_len = self.patch_embed.patch_len();
        let embed = &self.patch_embed;
        sized(&mut acts.patches, batch * n * patch_len).par_chunks_mut(n * patch_len).zip(images.par_chunks(per_image)).for_each(|(patches, image)| embed.im2col(image, size, patches));
        self.patch_embed.proj.forward(p, &acts.patches, sized(&mut acts.embedded, batch * n * c), false); // (B·N, C)
        acts.blocks.resize_with(self.blocks.len(), BlockActivations::default);
        let x = sized(&mut acts.blocks[0].x, rows * c);
        let (pos, cls) = (&p[self.pos_embed.range()], &p[self.cls_token.range()]);
        let first = usize::from(cfg.pool == Pool::ClassToken);
        x.par_chunks_mut(t * c).zip(acts.embedded.par_chunks(n * c)).for_each(|(x, embedded)| {
            x[..first * c].copy_from_slice(&cls[..first * c]);
            x[first * c..].copy_from_slice(embedded);
            kernels::add_assign(x, pos);
        });
        let mut rng = step_rng(drop_path_seed);
        for i in 0..self.blocks.len() {
            let (done, rest) = acts.blocks.split_at_mut(i + 1);
            let out = match rest.first_mut() {
                Some(next) => sized(&mut next.x, rows * c),
                None => sized(&mut acts.last, rows * c),
            };
            self.blocks[i].forward(p, &mut done[i], out, batch, t, advance, &mut rng)?;
        }
        let norm = self.norm.as_mut().ok_or_else(|| Error::Unsupported { what: "training the deploy form".into(), path: "the CPU trainer" })?;
        norm.forward(p, &acts.last, sized(&mut acts.normed, rows * c), &mut acts.norm, c, advance)?;
        let pooled = sized(&mut acts.pooled, batch * c);
        for (image, out) in pooled.chunks_exact_mut(c).enumerate() {
            let tokens = &acts.normed[image * t * c..(image + 1) * t * c];
            match cfg.pool {
                Pool::ClassToken => out.copy_from_slice(&tokens[..c]),
                Pool::Mean => {
                    kernels::column_sums(tokens, t, c, 0, out);
                    out.iter_mut().for_each(|v| *v /= t as f32);
                }
            }
        }
        let mut logits = vec![0.0; batch * cfg.num_classes];
        self.head.forward(p, &acts.pooled, &mut logits, false);
        Ok(logits)
    }

    /// Back-propagates `dlogits` = ∂L/∂logits (B, classes) through the forward that filled
    /// `acts`, adding every parameter's gradient into `g`.
    pub fn train_backward(&self, dlogits: &[f32], acts: &TrainActivations, g: &mut [f32], s: &mut Scratch) {
        let cfg = &self.config;
        let batch = acts.batch;
        let (c, t, n) = (cfg.embed_dim, cfg.num_tokens(), cfg.num_patches());
        let rows = batch * t;
        let p = &self.table.values;
        // Head and pooling.
        let mut dpooled = vec![0.0; batch * c];
        self.head.backward_input(p, dlogits, &mut dpooled, |_, _| {});
        self.head.backward_params(g, &acts.pooled, dlogits, &mut s.partials);
        let mut dnormed = vec![0.0; rows * c];
        for (image, dp) in dpooled.chunks_exact(c).enumerate() {
            let tokens = &mut dnormed[image * t * c..(image + 1) * t * c];
            match cfg.pool {
                Pool::ClassToken => tokens[..c].copy_from_slice(dp),
                Pool::Mean => tokens.chunks_exact_mut(c).for_each(|row| row.iter_mut().zip(dp).for_each(|(r, v)| *r = v / t as f32)),
            }
        }
        let mut dx = vec![0.0; rows * c];
        self.norm.as_ref().expect("train_forward ran").backward(p, g, &acts.last, &dnormed, &mut dx, &acts.norm, c);
        for (block, a) in self.blocks.iter().zip(&acts.blocks).rev() {
            block.backward(p, g, a, &mut dx, s, batch, t);
        }
        // Embedding: position embedding and class token summed over the images, then the patch conv.
        let first = usize::from(cfg.pool == Pool::ClassToken);
        g[self.pos_embed.range()].par_chunks_mut(c).enumerate().for_each(|(token, gp)| {
            for image in 0..batch {
                kernels::add_assign(gp, &dx[(image * t + token) * c..(image * t + token + 1) * c]);
            }
        });
        let dembedded = if first == 1 {
            let gc = &mut g[self.cls_token.range()];
            for image in 0..batch {
                kernels::add_assign(gc, &dx[image * t * c..(image * t + 1) * c]);
            }
            dx.chunks_exact(t * c).flat_map(|image| image[c..].iter().copied()).collect()
        } else {
            dx
        };
        debug_assert_eq!(dembedded.len(), batch * n * c);
        self.patch_embed.proj.backward_params(g, &acts.patches, &dembedded, &mut s.partials);
    }

    /// The model's full state under the official keys: `template` (the lowered model's
    /// `collect_state`) with the parameters in `values` and the layers' current statistics and
    /// counters.
    pub fn state_with(&self, values: &[f32], template: &StateDict, origin: &str) -> StateDict {
        self.table.state_with(values, template, origin, |dict| {
            for block in &self.blocks {
                block.norm1.iter().chain(&block.norm2).for_each(|n| n.write_buffers(dict));
            }
            self.norm.iter().for_each(|n| n.write_buffers(dict));
        })
    }

    /// What the next training-mode call of the first block's norm computes (PRepBN models only).
    pub fn prepbn_phase(&self) -> Option<Phase> {
        self.blocks.first()?.norm1.as_ref()?.phase()
    }
}

// ---- ONNX: the graph walks the same modules as the forward.

/// Patch tokens, with the class token if the head reads it, plus position embeddings.
fn embed_onnx(g: &mut Graph, images: &str, patch_embed: &PatchEmbed, cls_token: &Param<Tensor<3>>, pos_embed: &Param<Tensor<3>>, pool: Pool) -> Result<String> {
    let mut x = patch_embed.to_onnx(g, images)?; // (B, N, C)
    if pool == Pool::ClassToken {
        let c = cls_token.dims()[2] as i64;
        let shape = g.op("Shape", &[images], vec![]);
        let (start, end) = (g.ints("start", &[0]), g.ints("end", &[1]));
        let batch = g.op("Slice", &[&shape, &start, &end], vec![]);
        let rest = g.ints("rest", &[1, c]);
        let target = g.op("Concat", &[&batch, &rest], vec![attr_int("axis", 0)]);
        let cls = g.param("cls_token", cls_token);
        let cls = g.op("Expand", &[&cls, &target], vec![]);
        x = g.op("Concat", &[&cls, &x], vec![attr_int("axis", 1)]); // (B, N + 1, C)
    }
    let pos = g.param("pos_embed", pos_embed);
    Ok(g.op("Add", &[&x, &pos], vec![]))
}

/// The head on the class token or on the token mean.
fn classify_onnx(g: &mut Graph, x: &str, pool: Pool, head: &Linear) -> Result<String> {
    let pooled = match pool {
        Pool::Mean => g.op("ReduceMean", &[x], vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)]),
        Pool::ClassToken => g.gather(x, 0, 1),
    };
    head.to_onnx(g, &pooled)
}

impl ToOnnx for Block {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let normed = self.norm1.to_onnx(g, x)?;
        let a = self.attn.to_onnx(g, &normed)?;
        let x = g.op("Add", &[x, &a], vec![]);
        let normed = self.norm2.to_onnx(g, &x)?;
        let m = self.mlp.to_onnx(g, &normed)?;
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

impl ToOnnx for DeployBlock {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let a = self.attn.to_onnx(g, x)?;
        let x = g.op("Add", &[x, &a], vec![]);
        let m = self.mlp.to_onnx(g, &x)?;
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

/// RepBN/PRepBN models are emitted in their fused form (fewer ops); LayerNorm models with
/// their norms.
impl ToOnnx for VisionTransformer {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        if self.config.norm.folds() {
            return self.fuse()?.to_onnx(g, images);
        }
        let mut x = embed_onnx(g, images, &self.patch_embed, &self.cls_token, &self.pos_embed, self.config.pool)?;
        for block in &self.blocks {
            x = block.to_onnx(g, &x)?;
        }
        let x = self.norm.to_onnx(g, &x)?;
        classify_onnx(g, &x, self.config.pool, &self.head)
    }
}

impl ToOnnx for DeployVit {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let mut x = embed_onnx(g, images, &self.patch_embed, &self.cls_token, &self.pos_embed, self.config.pool)?;
        for block in &self.blocks {
            x = block.to_onnx(g, &x)?;
        }
        classify_onnx(g, &x, self.config.pool, &self.head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::trainable_param_count;

    #[test]
    fn parameter_counts_match_spec() {
        // SPEC §7.2 item 14 (training form).
        let cases = [
            (VitConfig::deit_tiny(), 5_717_416),
            (VitConfig::deit_small(), 22_050_664),
            (VitConfig::prepbn_deit_tiny(), 5_717_441),
            (VitConfig::prepbn_deit_small(), 22_069_889),
            (VitConfig::slab_deit_tiny(), 6_198_401),
            (VitConfig::slab_deit_small(), 22_992_641),
        ];
        let device = Device::flex();
        for (config, want) in cases {
            assert_eq!(config.param_count(), want, "{config:?}");
            // Parameters are lazy: counting a built model allocates nothing big.
            let model = config.init(&device).unwrap();
            assert_eq!(trainable_param_count(&model), want, "{config:?}");
        }
        // The fused SLAB-DeiT-T: every norm folded away (SPEC §7.2 item 14).
        let fused = VitConfig::slab_deit_tiny().init(&device).unwrap().fuse().unwrap();
        assert_eq!(trainable_param_count(&fused), 6_179_176);
    }

    #[test]
    fn flops_match_published_figures() {
        // Published GFLOPs (MACs) at 224², SPEC §4.1, given to one decimal: accept 2 % or the
        // rounding of the last digit, whichever is wider.
        let cases = [
            ("deit_tiny", 1.3),
            ("deit_small", 4.6),
            ("slab_deit_tiny", 1.1),
            ("flatten_deit_tiny", 1.1),
        ];
        for (name, published) in cases {
            let ours = crate::models::preset(name).unwrap().macs() as f64 / 1e9;
            let slack = f64::max(0.02 * published, 0.05);
            assert!((ours - published).abs() <= slack, "{name}: {ours:.3} G vs {published} G");
        }
    }

    #[test]
    fn every_preset_is_valid_and_names_are_unique() {
        let mut names: Vec<_> = crate::models::presets().iter().map(|p| p.name).collect();
        for preset in crate::models::presets() {
            (preset.config)().validate().unwrap_or_else(|e| panic!("{}: {e}", preset.name));
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), crate::models::presets().len());
        assert!(crate::models::preset("no_such_model").is_err());
    }

    #[test]
    fn token_grid_follows_the_config_resolution() {
        // The official SLA hard-codes 14×14; ours takes the grid from img_size / patch_size.
        let device = Device::flex();
        let config = VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 1, num_heads: 2, num_classes: 5, ..VitConfig::slab_deit_tiny() };
        let model = config.init(&device).unwrap();
        let logits = model.try_forward(Tensor::zeros([3, 3, 32, 32], &device)).unwrap();
        assert_eq!(logits.dims(), [3, 5]);
        let Attention::Linear(attn) = &model.blocks[0].attn else { panic!("SLA") };
        assert_eq!(attn.positional_encoding.dims(), [1, 64, 24]);
    }

    #[test]
    fn fused_models_equal_unfused_eval_and_have_no_norms() {
        use burn::tensor::Distribution;
        // SPEC §7.2 item 13 for the DeiT family: SLAB (PRepBN + SLA, mean pool) and PRepBN-DeiT
        // (pure RepBN, class token).
        let device = Device::flex();
        let small = |base: VitConfig| VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 2, num_heads: 2, num_classes: 7, ..base };
        let gated = VitConfig { attention: AttentionKind::ReluL { qk_norm: true, gated: true }, ..small(VitConfig::prepbn_deit_tiny()) };
        let focused = VitConfig { attention: AttentionKind::focused(), pool: Pool::Mean, ..small(VitConfig::prepbn_deit_tiny()) };
        for config in [small(VitConfig::slab_deit_tiny()), small(VitConfig::prepbn_deit_tiny()), small(VitConfig::prepbn_deit_small()), gated, focused] {
            let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0); // folding is non-trivial
            let deploy = model.fuse().unwrap();
            let keys = crate::state::collect_state(&deploy);
            // No block or final norm is left (qk-norm's per-head LayerNorms are not foldable and stay).
            let folded = |k: &str| k.contains("norm1") || k.contains("norm2") || k.starts_with("norm.") || k.contains("bn.") || k.contains("alpha");
            assert!(!keys.keys().any(|k| folded(k)), "{:?}", keys.keys().collect::<Vec<_>>());
            let images = Tensor::<4>::random([64, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
            let want = model.forward(images.clone());
            let got = deploy.forward(images);
            let scale: f32 = want.clone().abs().max().into_scalar();
            let diff: f32 = got.clone().sub(want.clone()).abs().max().into_scalar();
            assert!(diff <= 1e-4 * scale.max(1.0), "{config:?}: {diff} vs max |logit| {scale}");
            let same_top1: bool = got.argmax(1).equal(want.argmax(1)).all().into_scalar();
            assert!(same_top1);
        }
        let err = VitConfig { depth: 1, ..small(VitConfig::deit_tiny()) }.init(&device).unwrap().fuse().unwrap_err();
        assert!(err.to_string().contains("LayerNorm"), "{err}");
    }

    #[test]
    fn bad_inputs_and_configs_are_errors_not_panics() {
        let device = Device::flex();
        let config = VitConfig::golden_slab_deit_tiny();
        let model = config.init(&device).unwrap();
        for dims in [[2, 3, 64, 64], [2, 1, 56, 56], [0, 3, 56, 56]] {
            let err = model.try_forward(Tensor::zeros(dims, &device)).unwrap_err();
            assert!(err.to_string().contains(&format!("{dims:?}")), "{err}");
        }
        let bad = [
            VitConfig { img_size: 50, ..config.clone() },
            VitConfig { num_heads: 5, ..config.clone() },
            VitConfig { pool: Pool::ClassToken, ..config.clone() },
            VitConfig { drop_path_rate: 1.0, ..config.clone() },
            VitConfig { norm: NormKind::layer_norm(0.0), ..config.clone() },
        ];
        for config in bad {
            assert!(config.init(&device).is_err(), "{config:?}");
        }
    }
}
