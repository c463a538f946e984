//! DeiT / ViT family: DeiT-T/S, PRepBN-DeiT, SLAB-DeiT, FLatten-DeiT, ReLU-attention ViT.
//!
//! One model, with the norm and attention kinds passed in. Structure (SPEC §4.1): patch conv →
//! (+ class token) → + absolute position embedding → blocks of `x + attn(norm1(x))`,
//! `x + mlp(norm2(x))` → final norm → class token or token mean → head.

use burn::module::{Module, Param};
use burn::nn::{Initializer, Linear};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, Preset};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int};
use crate::error::{Error, Result};
use crate::nn::attention::{Attention, AttentionConfig, AttentionKind, FastAttention};
use crate::nn::drop_path::DropPath;
use crate::nn::fuse::fold_into_next_linear;
use crate::nn::linear::{FastLinear, linear};
use crate::nn::lower::ParamTable;
use crate::nn::mlp::{FastMlp, Mlp};
use crate::nn::norm::{FastNorm, Norm, NormKind};
use crate::nn::patch_embed::PatchEmbed;
use crate::nn::schedule::{Phase, PrepbnSchedule};
use crate::plan::{Embed, Layer, Plan, Residual, Step};

pub use crate::nn::pool::Pool;

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
        let (a1, b1) = self.norm1.eval_affine()?;
        let (a2, b2) = self.norm2.eval_affine()?;
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
    head.forward(pool.forward(x)) // (B, C) → (B, num_classes)
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
    fn tagged(config: &VitConfig) -> AnyConfig {
        AnyConfig::Vit(config.clone())
    }
    fn config_of(any: &AnyConfig) -> Option<&VitConfig> {
        match any {
            AnyConfig::Vit(c) => Some(c),
            _ => None,
        }
    }
    fn lower(&self) -> Result<Plan> {
        lower_trained(self)
    }
    fn lower_deploy(deploy: &DeployVit) -> Result<Plan> {
        lower_deployed(deploy)
    }
}

impl ImageConfig for VitConfig {
    fn input_size(&self) -> [usize; 2] {
        [self.img_size; 2]
    }
    fn in_chans(&self) -> usize {
        self.in_chans
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn folds(&self) -> bool {
        self.norm.folds()
    }
    fn validate(&self) -> Result<()> {
        VitConfig::validate(self)
    }
}

impl ImageClassifier for VisionTransformer {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ImageClassifier for DeployVit {
    fn image_config(&self) -> &dyn ImageConfig {
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
        let final_norm = self.norm.eval_affine()?;
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

// ---- The fast path: the same module tree lowered into a plan of layer steps (`crate::plan`),
// in the order `VisionTransformer::forward` and `Block::forward` run them; the CPU runtime runs
// its inference, the CPU trainer its training steps. Parameters are
// registered in the order the earlier lowering used (blocks, final norm, embedding, head), which
// keeps the flat buffer, and so every sum over it, as it was.

/// The model as trained, its norms included, as a plan.
fn lower_trained(model: &VisionTransformer) -> Result<Plan> {
    let mut table = ParamTable::for_module(model);
    let cfg = &model.config;
    let mut steps = Vec::with_capacity(2 * cfg.depth + 4);
    for (i, b) in model.blocks.iter().enumerate() {
        let rate = cfg.block_drop_path_rate(i);
        let (norm1, norm2) = (FastNorm::lower(&b.norm1, &mut table)?, FastNorm::lower(&b.norm2, &mut table)?);
        let attn = Layer::attention(FastAttention::lower(&b.attn, &mut table)?, &table);
        steps.push(Step::Residual(Residual { norm: Some(norm1), layer: attn, drop_path: rate }));
        steps.push(Step::Residual(Residual { norm: Some(norm2), layer: Layer::Mlp(FastMlp::lower(&b.mlp, &mut table)?), drop_path: rate }));
    }
    steps.push(Step::Norm(FastNorm::lower(&model.norm, &mut table)?));
    assemble(cfg, table, &model.patch_embed, &model.cls_token, &model.pos_embed, steps, &model.head)
}

/// The norm-free deploy form as a plan.
fn lower_deployed(model: &DeployVit) -> Result<Plan> {
    let mut table = ParamTable::for_module(model);
    let mut steps = Vec::with_capacity(2 * model.blocks.len() + 3);
    for b in &model.blocks {
        let attn = Layer::attention(FastAttention::lower(&b.attn, &mut table)?, &table);
        steps.push(Step::Residual(Residual { norm: None, layer: attn, drop_path: 0.0 }));
        steps.push(Step::Residual(Residual { norm: None, layer: Layer::Mlp(FastMlp::lower(&b.mlp, &mut table)?), drop_path: 0.0 }));
    }
    assemble(&model.config, table, &model.patch_embed, &model.cls_token, &model.pos_embed, steps, &model.head)
}

/// The embedding in front of `blocks` (and the final norm), the pooling and the head behind.
#[allow(clippy::too_many_arguments)]
fn assemble(config: &VitConfig, mut table: ParamTable, patch_embed: &PatchEmbed, cls_token: &Param<Tensor<3>>, pos_embed: &Param<Tensor<3>>, blocks: Vec<Step>, head: &Linear) -> Result<Plan> {
    let embed = Embed::lower(patch_embed, config.img_size, cls_token, config.pool == Pool::ClassToken, pos_embed, &mut table)?;
    let head = FastLinear::lower(head, &mut table)?;
    let steps = std::iter::once(Step::Embed(embed)).chain(blocks).chain([Step::Pool(config.pool), Step::Head(head)]).collect();
    Ok(Plan { table, steps })
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
    let pooled = pool.to_onnx(g, x);
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
        
        // SPEC §7.2 item 13 for the DeiT family: SLAB (PRepBN + SLA, mean pool) and PRepBN-DeiT
        // (pure RepBN, class token).
        let device = Device::flex();
        let small = |base: VitConfig| VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 2, num_heads: 2, num_classes: 7, ..base };
        let gated = VitConfig { attention: AttentionKind::ReluL { qk_norm: true, gated: true }, ..small(VitConfig::prepbn_deit_tiny()) };
        let focused = VitConfig { attention: AttentionKind::focused(), pool: Pool::Mean, ..small(VitConfig::prepbn_deit_tiny()) };
        for config in [small(VitConfig::slab_deit_tiny()), small(VitConfig::prepbn_deit_tiny()), small(VitConfig::prepbn_deit_small()), gated, focused] {
            let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0, 5); // folding is non-trivial
            let deploy = model.fuse().unwrap();
            let keys = crate::state::collect_state(&deploy);
            // No block or final norm is left (qk-norm's per-head LayerNorms are not foldable and stay).
            let folded = |k: &str| k.contains("norm1") || k.contains("norm2") || k.starts_with("norm.") || k.contains("bn.") || k.contains("alpha");
            assert!(!keys.keys().any(|k| folded(k)), "{:?}", keys.keys().collect::<Vec<_>>());
            let images = crate::testing::standard_normal([64, 3, 32, 32], 30, &device);
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
