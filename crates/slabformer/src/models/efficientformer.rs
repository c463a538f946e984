//! EfficientFormer (v1): L1 / L3 / L7, timm 0.9.16's `efficientformer.py` layout and keys
//! (SPEC §3.7, §4.8; zoo README `efficientformer_tiny`).
//!
//! Stem (two 3×3/2 conv + BN + ReLU) → four stages (stages 1–3 open with a 3×3/2 conv + BN) of
//! Meta4D blocks `x + γ₁ ⊙ (AvgPool3×3(x) − x)`, `x + γ₂ ⊙ BN(fc2(GELU(BN(fc1(x)))))`; the last
//! `num_vit` blocks of the last stage are Meta3D blocks on the flattened 7×7 tokens,
//! `x + γ₁ ⊙ Attn(LN(x))`, `x + γ₂ ⊙ MLP(LN(x))`. Head: LayerNorm → token mean →
//! (`head` + `head_dist`) / 2. The Meta3D attention is hard-coded (key_dim 32, 8 heads,
//! attn_ratio 4, 7×7 resolution) whatever the width, so the input is fixed at 224².

use burn::module::Module;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::{gelu, relu};
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Tensor};
use rand_pcg::Pcg64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, Preset, check_images};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::{Error, Result};
use crate::kernels;
use crate::nn::conv_norm::{Activation, ConvAct, ConvShape, batch_norm_2d, batch_norm_2d_param_count, fold_batch_norm};
use crate::nn::conv_norm_fast::{ConvNormActCache, ConvStep, FastConvNormAct};
use crate::nn::drop_path::{DropPath, draw_mask};
use crate::nn::layer_scale::{LayerScale, add_scaled, add_scaled_branch, scaled_branch_backward};
use crate::nn::linear::{FastDistilledHead, linear};
use crate::nn::lower::{ParamTable, Slot, sized};
use crate::nn::meta3d_attention::{FastMeta3dAttention, Meta3dActivations, Meta3dAttention};
use crate::nn::mlp::{FastMlp, Mlp, MlpActivations};
use crate::nn::norm::{BatchNorm, FastNorm, LayerNorm, NormCache};
use crate::nn::pool::Pool;
use crate::plan::{FastBlock, Plan, RasterInput, Step};
use crate::state::StateDict;

/// The Meta3D attention's constants (timm builds it as `Attention(dim)`).
pub const KEY_DIM: usize = 32;
pub const HEADS: usize = 8;
pub const ATTN_RATIO: usize = 4;
pub const VAL_DIM: usize = ATTN_RATIO * KEY_DIM;
/// Its bias table's grid side: the last stage must have 7×7 tokens.
pub const RESOLUTION: usize = 7;
/// `qkv` outputs per head: q, k (KEY_DIM each), v (VAL_DIM), interleaved head by head.
const QKV_PER_HEAD: usize = 2 * KEY_DIM + VAL_DIM;
/// PyTorch's `nn.LayerNorm` default eps (the Meta3D norms and the final norm).
const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientFormerConfig {
    /// Input side; the last stage's grid must be 7×7 (224 for the published models).
    pub img_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    /// Blocks per stage (four stages).
    pub depths: Vec<usize>,
    /// Widths per stage; the stem's first conv has `embed_dims[0] / 2` channels.
    pub embed_dims: Vec<usize>,
    /// Meta3D (attention) blocks at the end of the last stage.
    pub num_vit: usize,
    pub mlp_ratio: f64,
    /// The Meta4D token mixer's average-pool window.
    pub pool_size: usize,
    pub layer_scale_init_value: f64,
    pub drop_path_rate: f64,
}

pub(crate) const PRESETS: &[Preset<EfficientFormerConfig>] = &[
    Preset { name: "efficientformer_l1", summary: "EfficientFormer-L1: widths 48-448, depths 3/2/6/4, 1 Meta3D block", config: EfficientFormerConfig::l1 },
    Preset { name: "efficientformer_l3", summary: "EfficientFormer-L3: widths 64-512, depths 4/4/12/6, 4 Meta3D blocks", config: EfficientFormerConfig::l3 },
    Preset { name: "efficientformer_l7", summary: "EfficientFormer-L7: widths 96-768, depths 6/6/18/8, 8 Meta3D blocks", config: EfficientFormerConfig::l7 },
];

impl EfficientFormerConfig {
    fn published(depths: [usize; 4], embed_dims: [usize; 4], num_vit: usize) -> Self {
        Self {
            img_size: 224,
            in_chans: 3,
            num_classes: 1000,
            depths: depths.to_vec(),
            embed_dims: embed_dims.to_vec(),
            num_vit,
            mlp_ratio: 4.0,
            pool_size: 3,
            layer_scale_init_value: 1e-5,
            drop_path_rate: 0.0,
        }
    }

    /// timm `efficientformer_l1` (SPEC §4.8).
    pub fn l1() -> Self {
        Self::published([3, 2, 6, 4], [48, 96, 224, 448], 1)
    }

    pub fn l3() -> Self {
        Self::published([4, 4, 12, 6], [64, 128, 320, 512], 4)
    }

    pub fn l7() -> Self {
        Self::published([6, 6, 18, 8], [96, 192, 384, 768], 8)
    }

    fn stem_shapes(&self) -> [ConvShape; 2] {
        let c = self.embed_dims[0];
        [ConvShape::new(self.in_chans, c / 2, 3, 2).with_bias(true), ConvShape::new(c / 2, c, 3, 2).with_bias(true)]
    }

    /// Stage `s`'s downsampling conv (none in stage 0).
    fn downsample_shape(&self, s: usize) -> Option<ConvShape> {
        (s > 0).then(|| ConvShape::new(self.embed_dims[s - 1], self.embed_dims[s], 3, 2).with_bias(true))
    }

    /// The grid each stage's blocks run on.
    pub fn stage_grids(&self) -> Vec<[usize; 2]> {
        let [a, b] = self.stem_shapes();
        let mut grid = b.out_grid(a.out_grid([self.img_size; 2]));
        (0..self.depths.len())
            .map(|s| {
                if let Some(shape) = self.downsample_shape(s) {
                    grid = shape.out_grid(grid);
                }
                grid
            })
            .collect()
    }

    fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Stage `s`'s block layout in timm's order, `Flat` included (it has an index in
    /// `stages.{s}.blocks`, so the Meta3D blocks' keys count it).
    pub fn stage_layout(&self, s: usize) -> Vec<BlockKind> {
        let depth = self.depths[s];
        let num_vit = if s == self.depths.len() - 1 { self.num_vit } else { 0 };
        let mut kinds = Vec::with_capacity(depth + 1);
        if num_vit > 0 && num_vit >= depth {
            kinds.push(BlockKind::Flat);
        }
        for i in 0..depth {
            let remain = depth - i - 1;
            if num_vit > remain {
                kinds.push(BlockKind::Meta3d);
            } else {
                kinds.push(BlockKind::Meta4d);
                if num_vit > 0 && num_vit == remain {
                    kinds.push(BlockKind::Flat);
                }
            }
        }
        kinds
    }

    /// Block `j`'s (over all stages) stochastic depth rate: torch.linspace(0, rate, Σ depths).
    fn drop_path_rate_of(&self, j: usize) -> f64 {
        let total: usize = self.depths.iter().sum();
        if total > 1 { self.drop_path_rate * j as f64 / (total - 1) as f64 } else { 0.0 }
    }

    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Config(msg));
        if self.depths.len() != 4 || self.embed_dims.len() != 4 {
            return err(format!("depths and embed_dims need 4 stages each, got {} and {}", self.depths.len(), self.embed_dims.len()));
        }
        if self.depths.contains(&0) || self.embed_dims.iter().any(|&c| c < 2) {
            return err(format!("every stage needs ≥ 1 block (depths {:?}) and ≥ 2 channels (embed_dims {:?})", self.depths, self.embed_dims));
        }
        if self.in_chans == 0 || self.num_classes == 0 {
            return err("in_chans and num_classes must be > 0".into());
        }
        if self.num_vit == 0 || self.num_vit > self.depths[3] {
            return err(format!("num_vit = {} must lie in 1..={} (the last stage's depth): the final LayerNorm reads tokens", self.num_vit, self.depths[3]));
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) || self.embed_dims.iter().any(|&c| self.mlp_hidden(c) == 0) {
            return err(format!("mlp_ratio = {} must give every MLP ≥ 1 hidden channel", self.mlp_ratio));
        }
        if self.pool_size.is_multiple_of(2) {
            return err(format!("pool_size = {} must be odd (the pool keeps the grid with padding pool_size / 2)", self.pool_size));
        }
        if !self.layer_scale_init_value.is_finite() {
            return err(format!("layer_scale_init_value = {} must be finite", self.layer_scale_init_value));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return err(format!("drop_path_rate must lie in [0, 1), got {}", self.drop_path_rate));
        }
        let last = self.stage_grids()[3];
        if last != [RESOLUTION; 2] {
            return err(format!("img_size = {} gives a {last:?} last-stage grid; the Meta3D attention is fixed at 7×7 (use 224)", self.img_size));
        }
        Ok(())
    }

    /// Trainable parameters, from the architecture alone.
    pub fn param_count(&self) -> usize {
        let conv_bn = |s: ConvShape| s.param_count() + batch_norm_2d_param_count(s.out_chans);
        let mut total: usize = self.stem_shapes().into_iter().map(conv_bn).sum();
        for (s, &c) in self.embed_dims.iter().enumerate() {
            total += self.downsample_shape(s).map_or(0, conv_bn);
            let hidden = self.mlp_hidden(c);
            for kind in self.stage_layout(s) {
                total += match kind {
                    BlockKind::Meta4d => 2 * c + conv_bn(ConvShape::new(c, hidden, 1, 1).with_bias(true)) + conv_bn(ConvShape::new(hidden, c, 1, 1).with_bias(true)),
                    BlockKind::Flat => 0,
                    BlockKind::Meta3d => 2 * c + 4 * c + Meta3dAttention::param_count(c, HEADS, KEY_DIM, ATTN_RATIO, RESOLUTION) + Mlp::param_count(c, hidden),
                };
            }
        }
        let c = self.embed_dims[3];
        total + 2 * c + 2 * (c * self.num_classes + self.num_classes)
    }

    /// Multiply-accumulates of one image (convs, linears and the attention products).
    pub fn macs(&self) -> u64 {
        let [a, b] = self.stem_shapes();
        let mut total = a.macs([self.img_size; 2]) + b.macs(a.out_grid([self.img_size; 2]));
        let grids = self.stage_grids();
        let mut grid = b.out_grid(a.out_grid([self.img_size; 2]));
        for (s, &c) in self.embed_dims.iter().enumerate() {
            if let Some(shape) = self.downsample_shape(s) {
                total += shape.macs(grid);
            }
            grid = grids[s];
            let (n, hidden, c) = ((grid[0] * grid[1]) as u64, self.mlp_hidden(c) as u64, c as u64);
            for kind in self.stage_layout(s) {
                total += match kind {
                    BlockKind::Meta4d | BlockKind::Meta3d => 2 * n * c * hidden,
                    BlockKind::Flat => 0,
                };
                if kind == BlockKind::Meta3d {
                    let (heads, qkv) = (HEADS as u64, (HEADS * QKV_PER_HEAD) as u64);
                    total += n * c * qkv + heads * n * n * (KEY_DIM + VAL_DIM) as u64 + n * (HEADS * VAL_DIM) as u64 * c;
                }
            }
        }
        total + 2 * (self.embed_dims[3] * self.num_classes) as u64
    }

    pub fn init(&self, device: &Device) -> Result<EfficientFormer> {
        self.validate()?;
        let [a, b] = self.stem_shapes();
        let stem = Stem { conv1: a.init(device), norm1: batch_norm_2d(a.out_chans, device), conv2: b.init(device), norm2: batch_norm_2d(b.out_chans, device) };
        let mut j = 0;
        let stages = (0..4)
            .map(|s| {
                let c = self.embed_dims[s];
                let downsample = self.downsample_shape(s).map(|shape| Downsample { conv: shape.init(device), norm: batch_norm_2d(c, device) });
                let blocks = self
                    .stage_layout(s)
                    .into_iter()
                    .map(|kind| {
                        let rate = self.drop_path_rate_of(j);
                        j += usize::from(kind != BlockKind::Flat);
                        match kind {
                            BlockKind::Meta4d => MetaBlock::Meta4d(MetaBlock2d::new(self, c, rate, device)),
                            BlockKind::Flat => MetaBlock::Flat(Flat {}),
                            BlockKind::Meta3d => MetaBlock::Meta3d(MetaBlock1d::new(self, c, rate, device)),
                        }
                    })
                    .collect();
                Stage { downsample, blocks }
            })
            .collect();
        let c = self.embed_dims[3];
        Ok(EfficientFormer {
            stem,
            stages,
            norm: LayerNorm::new(c, LAYER_NORM_EPS, device),
            head: linear(c, self.num_classes, true, device),
            head_dist: linear(c, self.num_classes, true, device),
            config: self.clone(),
        })
    }
}

/// What sits at one index of a stage's `blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockKind {
    Meta4d,
    Flat,
    Meta3d,
}

/// Activations between blocks: planes before the last stage's `Flat`, tokens after it.
enum Features {
    Planes(Tensor<4>),
    Tokens(Tensor<3>),
}

impl Features {
    fn planes(self) -> Tensor<4> {
        match self {
            Features::Planes(x) => x,
            Features::Tokens(_) => unreachable!("the layout puts every Meta4D block before Flat"),
        }
    }

    fn tokens(self) -> Tensor<3> {
        match self {
            Features::Tokens(x) => x,
            Features::Planes(_) => unreachable!("the layout puts every Meta3D block after Flat"),
        }
    }
}

/// (B, C, H, W) → (B, H·W, C), row-major tokens (timm's `x.flatten(2).transpose(1, 2)`).
fn flatten(x: Tensor<4>) -> Tensor<3> {
    let [b, c, h, w] = x.dims();
    x.reshape([b, c, h * w]).swap_dims(1, 2)
}


/// The Meta4D token mixer: AvgPool(pool, stride 1, pad pool/2, count_include_pad=False)(x) − x.
fn pool_mixer(x: Tensor<4>, pool_size: usize) -> Tensor<4> {
    let pad = pool_size / 2;
    let options = AvgPoolOptions::new([pool_size; 2]).with_stride([1, 1]).with_padding([pad, pad]).with_count_include_pad(false);
    avg_pool2d(x.clone(), options).sub(x)
}

#[derive(Module, Debug)]
pub struct Stem {
    pub conv1: Conv2d,
    pub norm1: BatchNorm,
    pub conv2: Conv2d,
    pub norm2: BatchNorm,
}

impl Stem {
    /// (B, in_chans, H, W) → (B, C0, H/4, W/4).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = relu(self.norm1.forward_planes(self.conv1.forward(x)));
        relu(self.norm2.forward_planes(self.conv2.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Downsample {
    pub conv: Conv2d,
    pub norm: BatchNorm,
}

#[derive(Module, Debug)]
pub struct Stage {
    pub downsample: Option<Downsample>,
    pub blocks: Vec<MetaBlock>,
}

/// timm's `Flat`: no parameters, planes to tokens.
#[derive(Module, Debug)]
pub struct Flat {}

// The blocks live once in their stage's Vec: the size gap between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum MetaBlock {
    Meta4d(MetaBlock2d),
    Flat(Flat),
    Meta3d(MetaBlock1d),
}

/// timm's `ConvMlpWithNorm`: 1×1 conv → BN → GELU → 1×1 conv → BN.
#[derive(Module, Debug)]
pub struct ConvMlp {
    pub fc1: Conv2d,
    pub norm1: BatchNorm,
    pub fc2: Conv2d,
    pub norm2: BatchNorm,
}

#[derive(Module, Debug)]
pub struct MetaBlock2d {
    pub ls1: LayerScale,
    pub mlp: ConvMlp,
    pub ls2: LayerScale,
    pub drop_path: DropPath,
    pub pool_size: usize,
}

impl MetaBlock2d {
    fn new(config: &EfficientFormerConfig, c: usize, drop_path: f64, device: &Device) -> Self {
        let hidden = config.mlp_hidden(c);
        let ls = config.layer_scale_init_value;
        Self {
            ls1: LayerScale::new(c, ls, device),
            mlp: ConvMlp {
                fc1: ConvShape::new(c, hidden, 1, 1).with_bias(true).init(device),
                norm1: batch_norm_2d(hidden, device),
                fc2: ConvShape::new(hidden, c, 1, 1).with_bias(true).init(device),
                norm2: batch_norm_2d(c, device),
            },
            ls2: LayerScale::new(c, ls, device),
            drop_path: DropPath::new(drop_path),
            pool_size: config.pool_size,
        }
    }

    /// (B, C, H, W) → (B, C, H, W).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mixed = self.ls1.forward_planes(pool_mixer(x.clone(), self.pool_size));
        let x = x.add(self.drop_path.forward_planes(mixed));
        let m = &self.mlp;
        let hidden = gelu(m.norm1.forward_planes(m.fc1.forward(x.clone())));
        let branch = self.ls2.forward_planes(m.norm2.forward_planes(m.fc2.forward(hidden)));
        x.add(self.drop_path.forward_planes(branch))
    }

    /// Both BatchNorms folded into their convs.
    fn fuse(&self) -> DeployMetaBlock2d {
        let m = &self.mlp;
        DeployMetaBlock2d {
            ls1: self.ls1.clone(),
            mlp: DeployConvMlp {
                fc1: ConvAct { conv: fold_batch_norm(&m.fc1, &m.norm1), act: Activation::Gelu },
                fc2: ConvAct { conv: fold_batch_norm(&m.fc2, &m.norm2), act: Activation::Identity },
            },
            ls2: self.ls2.clone(),
            pool_size: self.pool_size,
        }
    }
}

#[derive(Module, Debug)]
pub struct MetaBlock1d {
    pub norm1: LayerNorm,
    pub token_mixer: Meta3dAttention,
    pub norm2: LayerNorm,
    pub mlp: Mlp,
    pub ls1: LayerScale,
    pub ls2: LayerScale,
    pub drop_path: DropPath,
}

impl MetaBlock1d {
    fn new(config: &EfficientFormerConfig, c: usize, drop_path: f64, device: &Device) -> Self {
        let ls = config.layer_scale_init_value;
        Self {
            norm1: LayerNorm::new(c, LAYER_NORM_EPS, device),
            token_mixer: Meta3dAttention::new(c, HEADS, KEY_DIM, ATTN_RATIO, RESOLUTION, device),
            norm2: LayerNorm::new(c, LAYER_NORM_EPS, device),
            mlp: Mlp::new(c, config.mlp_hidden(c), device),
            ls1: LayerScale::new(c, ls, device),
            ls2: LayerScale::new(c, ls, device),
            drop_path: DropPath::new(drop_path),
        }
    }

    /// (B, N, C) → (B, N, C).
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let a = self.ls1.forward_tokens(self.token_mixer.forward(self.norm1.forward(x.clone())));
        let x = x.add(self.drop_path.forward(a));
        let m = self.ls2.forward_tokens(self.mlp.forward(self.norm2.forward(x.clone())));
        x.add(self.drop_path.forward(m))
    }
}

/// Final LayerNorm → token mean → the two heads averaged (timm averages them whenever
/// `distilled_training` is off, in training too).
fn classify(norm: &LayerNorm, head: &Linear, head_dist: &Linear, x: Tensor<3>) -> Tensor<2> {
    let [b, _, c] = x.dims();
    let pooled = norm.forward(x).mean_dim(1).reshape([b, c]); // (B, C)
    head.forward(pooled.clone()).add(head_dist.forward(pooled)).div_scalar(2.0) // (B, classes)
}

#[derive(Module, Debug)]
pub struct EfficientFormer {
    pub stem: Stem,
    pub stages: Vec<Stage>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub head_dist: Linear,
    #[module(skip)]
    pub config: EfficientFormerConfig,
}

impl EfficientFormer {
    /// Images (B, in_chans, 224, 224) → logits (B, num_classes).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = Features::Planes(self.stem.forward(images));
        for stage in &self.stages {
            if let Some(d) = &stage.downsample {
                x = Features::Planes(d.norm.forward_planes(d.conv.forward(x.planes()))); // (B, C_s, H/2, W/2)
            }
            for block in &stage.blocks {
                x = match block {
                    MetaBlock::Meta4d(b) => Features::Planes(b.forward(x.planes())),
                    MetaBlock::Flat(_) => Features::Tokens(flatten(x.planes())), // (B, 49, C)
                    MetaBlock::Meta3d(b) => Features::Tokens(b.forward(x.tokens())),
                };
            }
        }
        classify(&self.norm, &self.head, &self.head_dist, x.tokens())
    }

    /// [`forward`](Self::forward) after checking the images' shape.
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        check_images("efficientformer", &self.config, images.dims())?;
        Ok(self.forward(images))
    }

    /// The deploy form: every BatchNorm folded into the conv before it (eval statistics). Every
    /// EfficientFormer folds; the `Result` is the families' common signature.
    pub fn fuse(&self) -> Result<DeployEfficientFormer> {
        let s = &self.stem;
        let stem = [
            ConvAct { conv: fold_batch_norm(&s.conv1, &s.norm1), act: Activation::Relu },
            ConvAct { conv: fold_batch_norm(&s.conv2, &s.norm2), act: Activation::Relu },
        ];
        let stages = self
            .stages
            .iter()
            .map(|stage| DeployStage {
                downsample: stage.downsample.as_ref().map(|d| ConvAct { conv: fold_batch_norm(&d.conv, &d.norm), act: Activation::Identity }),
                blocks: stage
                    .blocks
                    .iter()
                    .map(|b| match b {
                        MetaBlock::Meta4d(b) => DeployMetaBlock::Meta4d(b.fuse()),
                        MetaBlock::Flat(f) => DeployMetaBlock::Flat(f.clone()),
                        MetaBlock::Meta3d(b) => DeployMetaBlock::Meta3d(b.clone()),
                    })
                    .collect(),
            })
            .collect();
        let [conv1, conv2] = stem;
        Ok(DeployEfficientFormer { stem: DeployStem { conv1, conv2 }, stages, norm: self.norm.clone(), head: self.head.clone(), head_dist: self.head_dist.clone(), config: self.config.clone() })
    }
}

/// `ConvMlp` with its BatchNorms folded: conv + GELU, conv.
#[derive(Module, Debug)]
pub struct DeployConvMlp {
    pub fc1: ConvAct,
    pub fc2: ConvAct,
}

#[derive(Module, Debug)]
pub struct DeployMetaBlock2d {
    pub ls1: LayerScale,
    pub mlp: DeployConvMlp,
    pub ls2: LayerScale,
    pub pool_size: usize,
}

impl DeployMetaBlock2d {
    /// (B, C, H, W) → (B, C, H, W).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = x.clone().add(self.ls1.forward_planes(pool_mixer(x, self.pool_size)));
        x.clone().add(self.ls2.forward_planes(self.mlp.fc2.forward(self.mlp.fc1.forward(x))))
    }
}

#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum DeployMetaBlock {
    Meta4d(DeployMetaBlock2d),
    Flat(Flat),
    Meta3d(MetaBlock1d),
}

#[derive(Module, Debug)]
pub struct DeployStem {
    pub conv1: ConvAct,
    pub conv2: ConvAct,
}

#[derive(Module, Debug)]
pub struct DeployStage {
    pub downsample: Option<ConvAct>,
    pub blocks: Vec<DeployMetaBlock>,
}

/// The BatchNorm-free deploy model made by [`EfficientFormer::fuse`] (LayerNorms and layer
/// scales stay).
#[derive(Module, Debug)]
pub struct DeployEfficientFormer {
    pub stem: DeployStem,
    pub stages: Vec<DeployStage>,
    pub norm: LayerNorm,
    pub head: Linear,
    pub head_dist: Linear,
    #[module(skip)]
    pub config: EfficientFormerConfig,
}

impl DeployEfficientFormer {
    /// Images (B, in_chans, 224, 224) → logits (B, num_classes).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let mut x = Features::Planes(self.stem.conv2.forward(self.stem.conv1.forward(images)));
        for stage in &self.stages {
            if let Some(d) = &stage.downsample {
                x = Features::Planes(d.forward(x.planes()));
            }
            for block in &stage.blocks {
                x = match block {
                    DeployMetaBlock::Meta4d(b) => Features::Planes(b.forward(x.planes())),
                    DeployMetaBlock::Flat(_) => Features::Tokens(flatten(x.planes())),
                    DeployMetaBlock::Meta3d(b) => Features::Tokens(b.forward(x.tokens())),
                };
            }
        }
        classify(&self.norm, &self.head, &self.head_dist, x.tokens())
    }
}

impl ImageConfig for EfficientFormerConfig {
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
        true
    }
    fn validate(&self) -> Result<()> {
        EfficientFormerConfig::validate(self)
    }
}

impl ImageClassifier for EfficientFormer {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ImageClassifier for DeployEfficientFormer {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ModelFamily for EfficientFormer {
    type Config = EfficientFormerConfig;
    type Deploy = DeployEfficientFormer;

    fn presets() -> &'static [Preset<EfficientFormerConfig>] {
        PRESETS
    }
    fn tagged(config: &EfficientFormerConfig) -> AnyConfig {
        AnyConfig::EfficientFormer(config.clone())
    }
    fn config_of(any: &AnyConfig) -> Option<&EfficientFormerConfig> {
        match any {
            AnyConfig::EfficientFormer(c) => Some(c),
            _ => None,
        }
    }
    fn init(config: &EfficientFormerConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }
    fn config(&self) -> &EfficientFormerConfig {
        &self.config
    }
    fn param_count(config: &EfficientFormerConfig) -> usize {
        config.param_count()
    }
    fn macs(config: &EfficientFormerConfig) -> u64 {
        config.macs()
    }
    fn fuse(&self) -> Result<DeployEfficientFormer> {
        EfficientFormer::fuse(self)
    }
    fn lower(&self) -> Result<Plan> {
        self.plan()
    }
    fn lower_deploy(deploy: &DeployEfficientFormer) -> Result<Plan> {
        deploy.plan()
    }
}

// ---- The fast path: the stem and the downsamples as conv steps over (H·W, C) raster rows, each
// Meta4D and Meta3D block one step. `Flat` is no step: raster rows are timm's row-major tokens.

impl EfficientFormer {
    /// The trained model as a plan (batch-statistic BatchNorms in training, running ones in eval).
    fn plan(&self) -> Result<Plan> {
        let mut table = ParamTable::for_module(self);
        let c = &self.config;
        let mut steps = vec![Step::Rows(RasterInput { chans: c.in_chans, grid: [c.img_size; 2] })];
        let mut grid = [c.img_size; 2];
        let s = &self.stem;
        for (conv, norm) in [(&s.conv1, &s.norm1), (&s.conv2, &s.norm2)] {
            grid = push_conv(&mut steps, FastConvNormAct::lower_parts(conv, norm, Activation::Relu, &mut table)?, grid);
        }
        for stage in &self.stages {
            if let Some(d) = &stage.downsample {
                grid = push_conv(&mut steps, FastConvNormAct::lower_parts(&d.conv, &d.norm, Activation::Identity, &mut table)?, grid);
            }
            for block in &stage.blocks {
                let fast: Box<dyn FastBlock> = match block {
                    MetaBlock::Meta4d(b) => Box::new(FastMeta4d::lower(b, grid, &mut table)?),
                    MetaBlock::Flat(_) => continue,
                    MetaBlock::Meta3d(b) => Box::new(FastMeta3d::lower(b, grid, &mut table)?),
                };
                steps.push(Step::Block(fast));
            }
        }
        classifier_steps(&mut steps, &self.norm, &self.head, &self.head_dist, &mut table)?;
        Ok(Plan { table, steps })
    }
}

impl DeployEfficientFormer {
    /// The fused model as a plan (every BatchNorm folded into its conv).
    fn plan(&self) -> Result<Plan> {
        let mut table = ParamTable::for_module(self);
        let c = &self.config;
        let mut steps = vec![Step::Rows(RasterInput { chans: c.in_chans, grid: [c.img_size; 2] })];
        let mut grid = [c.img_size; 2];
        for conv in [&self.stem.conv1, &self.stem.conv2] {
            grid = push_conv(&mut steps, FastConvNormAct::lower_deploy(conv, &mut table)?, grid);
        }
        for stage in &self.stages {
            if let Some(d) = &stage.downsample {
                grid = push_conv(&mut steps, FastConvNormAct::lower_deploy(d, &mut table)?, grid);
            }
            for block in &stage.blocks {
                let fast: Box<dyn FastBlock> = match block {
                    DeployMetaBlock::Meta4d(b) => Box::new(FastMeta4d::lower_deploy(b, grid, &mut table)?),
                    DeployMetaBlock::Flat(_) => continue,
                    DeployMetaBlock::Meta3d(b) => Box::new(FastMeta3d::lower(b, grid, &mut table)?),
                };
                steps.push(Step::Block(fast));
            }
        }
        classifier_steps(&mut steps, &self.norm, &self.head, &self.head_dist, &mut table)?;
        Ok(Plan { table, steps })
    }
}

/// A conv block as a step on `grid`; returns the grid it leaves.
fn push_conv(steps: &mut Vec<Step>, block: FastConvNormAct, grid: [usize; 2]) -> [usize; 2] {
    let step = ConvStep::new(block, grid);
    let out = step.output().0;
    steps.push(Step::Block(Box::new(step)));
    out
}

/// The final LayerNorm, the token mean and the two heads averaged ([`classify`]).
fn classifier_steps(steps: &mut Vec<Step>, norm: &LayerNorm, head: &Linear, head_dist: &Linear, table: &mut ParamTable) -> Result<()> {
    steps.push(Step::Norm(FastNorm::lower_layer_norm(norm, table)?));
    steps.push(Step::Pool(Pool::Mean));
    steps.push(Step::DistilledHead(FastDistilledHead::lower(head, head_dist, table)?));
    Ok(())
}

/// [`pool_mixer`] on one image's (H·W, C) rows: `out = AvgPool(x) − x`, the average over the
/// window's pixels inside the map (count_include_pad=False).
fn pool_mix_rows(x: &[f32], [h, w]: [usize; 2], pool: usize, out: &mut [f32]) {
    let (pad, c) = (pool / 2, x.len() / (h * w));
    for r in 0..h {
        let rows = r.saturating_sub(pad)..(r + pad + 1).min(h);
        for q in 0..w {
            let cols = q.saturating_sub(pad)..(q + pad + 1).min(w);
            let inv = 1.0 / (rows.len() * cols.len()) as f32;
            let o = &mut out[(r * w + q) * c..(r * w + q + 1) * c];
            o.fill(0.0);
            for y in rows.clone() {
                for xx in cols.clone() {
                    kernels::add_assign(o, &x[(y * w + xx) * c..(y * w + xx + 1) * c]);
                }
            }
            o.iter_mut().zip(&x[(r * w + q) * c..(r * w + q + 1) * c]).for_each(|(o, x)| *o = *o * inv - x);
        }
    }
}

/// Its backward on one image: `dx += ∂(AvgPool(x) − x)/∂x · d`.
fn pool_mix_backward(d: &[f32], [h, w]: [usize; 2], pool: usize, dx: &mut [f32]) {
    let (pad, c) = (pool / 2, d.len() / (h * w));
    for r in 0..h {
        let rows = r.saturating_sub(pad)..(r + pad + 1).min(h);
        for q in 0..w {
            let cols = q.saturating_sub(pad)..(q + pad + 1).min(w);
            let inv = 1.0 / (rows.len() * cols.len()) as f32;
            let g = &d[(r * w + q) * c..(r * w + q + 1) * c];
            for y in rows.clone() {
                for xx in cols.clone() {
                    dx[(y * w + xx) * c..(y * w + xx + 1) * c].iter_mut().zip(g).for_each(|(dx, g)| *dx += g * inv);
                }
            }
            dx[(r * w + q) * c..(r * w + q + 1) * c].iter_mut().zip(g).for_each(|(dx, g)| *dx -= g);
        }
    }
}

/// A Meta4D block ([`MetaBlock2d`], or its fused form) on the fast path.
struct FastMeta4d {
    ls1: Slot,
    fc1: FastConvNormAct,
    fc2: FastConvNormAct,
    ls2: Slot,
    grid: [usize; 2],
    pool: usize,
    drop_path: f64,
    /// The last training forward's: its batch, the mixer's output, the block's middle (the
    /// MLP's input), the MLP's hidden rows and output, the convs' caches and both branches'
    /// drop-path factors (empty: all kept).
    batch: usize,
    mixed: Vec<f32>,
    mid: Vec<f32>,
    hidden: Vec<f32>,
    branch: Vec<f32>,
    caches: [ConvNormActCache; 2],
    masks: [Vec<f32>; 2],
}

impl FastMeta4d {
    fn lower(b: &MetaBlock2d, grid: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        let m = &b.mlp;
        let ls1 = b.ls1.lower(table)?;
        let fc1 = FastConvNormAct::lower_parts(&m.fc1, &m.norm1, Activation::Gelu, table)?;
        let fc2 = FastConvNormAct::lower_parts(&m.fc2, &m.norm2, Activation::Identity, table)?;
        Ok(Self::new(ls1, fc1, fc2, b.ls2.lower(table)?, grid, b.pool_size, b.drop_path.rate))
    }

    fn lower_deploy(b: &DeployMetaBlock2d, grid: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        let ls1 = b.ls1.lower(table)?;
        let (fc1, fc2) = (FastConvNormAct::lower_deploy(&b.mlp.fc1, table)?, FastConvNormAct::lower_deploy(&b.mlp.fc2, table)?);
        Ok(Self::new(ls1, fc1, fc2, b.ls2.lower(table)?, grid, b.pool_size, 0.0))
    }

    fn new(ls1: Slot, fc1: FastConvNormAct, fc2: FastConvNormAct, ls2: Slot, grid: [usize; 2], pool: usize, drop_path: f64) -> Self {
        Self { ls1, fc1, fc2, ls2, grid, pool, drop_path, batch: 0, mixed: Vec::new(), mid: Vec::new(), hidden: Vec::new(), branch: Vec::new(), caches: Default::default(), masks: Default::default() }
    }

    fn chans(&self) -> usize {
        self.fc2.out_chans()
    }

    fn pixels(&self) -> usize {
        self.grid[0] * self.grid[1]
    }
}

impl FastBlock for FastMeta4d {
    fn output(&self) -> ([usize; 2], usize) {
        (self.grid, self.chans())
    }
    fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], parts: usize) {
        let (n, c, grid) = (self.pixels(), self.chans(), self.grid);
        use kernels::with_scratch;
        with_scratch(n * c, |mixed| {
            with_scratch(n * self.fc1.out_chans(), |hidden| {
                pool_mix_rows(x, grid, self.pool, mixed);
                out.copy_from_slice(x);
                add_scaled(out, mixed, &p[self.ls1.range()]); // the mixer's residual
                self.fc1.infer(p, out, grid, hidden, parts);
                self.fc2.infer(p, hidden, grid, mixed, parts); // the MLP's output
                add_scaled(out, mixed, &p[self.ls2.range()]);
            })
        });
    }
    fn forward(&mut self, p: &[f32], x: &[f32], batch: usize, out: &mut [f32], _advance: bool, rng: &mut Pcg64) -> Result<()> {
        let (n, c, grid, pool) = (self.pixels(), self.chans(), self.grid, self.pool);
        self.batch = batch;
        let mixed = sized(&mut self.mixed, batch * n * c);
        mixed.par_chunks_mut(n * c).zip(x.par_chunks(n * c)).for_each(|(o, x)| pool_mix_rows(x, grid, pool, o));
        // burn draws the mixer's mask, then the MLP's, from the block's one DropPath.
        self.masks[0] = if self.drop_path > 0.0 { draw_mask(rng, batch, self.drop_path) } else { Vec::new() };
        add_scaled_branch(x, &self.mixed, &p[self.ls1.range()], &self.masks[0], batch, sized(&mut self.mid, batch * n * c));
        let [c1, c2] = &mut self.caches;
        self.fc1.forward(p, &self.mid, grid, batch, sized(&mut self.hidden, batch * n * self.fc1.out_chans()), c1)?;
        self.fc2.forward(p, &self.hidden, grid, batch, sized(&mut self.branch, batch * n * c), c2)?;
        self.masks[1] = if self.drop_path > 0.0 { draw_mask(rng, batch, self.drop_path) } else { Vec::new() };
        add_scaled_branch(&self.mid, &self.branch, &p[self.ls2.range()], &self.masks[1], batch, out);
        Ok(())
    }
    fn backward(&self, p: &[f32], g: &mut [f32], _x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let (n, c, batch) = (self.pixels(), self.chans(), self.batch);
        use kernels::with_scratch;
        with_scratch(dy.len(), |dbranch| {
            with_scratch(self.hidden.len(), |dhidden| {
                scaled_branch_backward(dy, &self.branch, &p[self.ls2.range()], &self.masks[1], batch, dbranch, &mut g[self.ls2.range()]);
                dhidden.fill(0.0); // fc2's backward adds into it
                self.fc2.backward(p, g, &self.hidden, dbranch, dhidden, &self.caches[1]);
                // ∂L/∂mid: the shortcut's share, then fc1 adds the MLP's.
                dx.copy_from_slice(dy);
                self.fc1.backward(p, g, &self.mid, dhidden, dx, &self.caches[0]);
                let dmixed = dbranch;
                scaled_branch_backward(dx, &self.mixed, &p[self.ls1.range()], &self.masks[0], batch, dmixed, &mut g[self.ls1.range()]);
                let (grid, pool) = (self.grid, self.pool);
                dx.par_chunks_mut(n * c).zip(dmixed.par_chunks(n * c)).for_each(|(dx, d)| pool_mix_backward(d, grid, pool, dx));
            })
        });
    }
    fn write_buffers(&self, state: &mut StateDict) {
        self.fc1.write_buffers(state);
        self.fc2.write_buffers(state);
    }
}

/// A Meta3D block ([`MetaBlock1d`], the same in the fused model) on the fast path, over the last
/// stage's tokens.
struct FastMeta3d {
    norm1: FastNorm,
    attn: FastMeta3dAttention,
    ls1: Slot,
    norm2: FastNorm,
    mlp: FastMlp,
    ls2: Slot,
    grid: [usize; 2],
    drop_path: f64,
    /// The last training forward's: its batch, both norms' outputs and caches, the attention's
    /// output and activations, the block's middle, the MLP's output and activations, and both
    /// branches' drop-path factors (empty: all kept).
    batch: usize,
    normed: [Vec<f32>; 2],
    norm_caches: [NormCache; 2],
    attended: Vec<f32>,
    attn_acts: Meta3dActivations,
    mid: Vec<f32>,
    branch: Vec<f32>,
    mlp_acts: MlpActivations,
    masks: [Vec<f32>; 2],
}

impl FastMeta3d {
    fn lower(b: &MetaBlock1d, grid: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        let norm1 = FastNorm::lower_layer_norm(&b.norm1, table)?;
        let attn = FastMeta3dAttention::lower(&b.token_mixer, table)?;
        if attn.tokens() != grid[0] * grid[1] {
            return Err(Error::Unsupported { what: format!("a Meta3D attention over {} tokens on a {}×{} map", attn.tokens(), grid[0], grid[1]), path: "the fast CPU path" });
        }
        let ls1 = b.ls1.lower(table)?;
        let norm2 = FastNorm::lower_layer_norm(&b.norm2, table)?;
        let mlp = FastMlp::lower(&b.mlp, table)?;
        let ls2 = b.ls2.lower(table)?;
        Ok(Self {
            norm1,
            attn,
            ls1,
            norm2,
            mlp,
            ls2,
            grid,
            drop_path: b.drop_path.rate,
            batch: 0,
            normed: Default::default(),
            norm_caches: Default::default(),
            attended: Vec::new(),
            attn_acts: Meta3dActivations::default(),
            mid: Vec::new(),
            branch: Vec::new(),
            mlp_acts: MlpActivations::default(),
            masks: Default::default(),
        })
    }

    fn chans(&self) -> usize {
        self.attn.dim()
    }
}

impl FastBlock for FastMeta3d {
    fn output(&self) -> ([usize; 2], usize) {
        (self.grid, self.chans())
    }
    fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], _parts: usize) {
        let len = x.len();
        let mut normed = vec![0.0; len];
        self.norm1.infer(p, x, &mut normed);
        let mut branch = vec![0.0; len];
        self.attn.infer(p, &normed, &mut branch);
        let mut mid = x.to_vec();
        add_scaled(&mut mid, &branch, &p[self.ls1.range()]);
        self.norm2.infer(p, &mid, &mut normed);
        let mut hidden = vec![0.0; self.attn.tokens() * self.mlp.hidden()];
        self.mlp.infer_hidden(p, &normed, &mut hidden);
        self.mlp.fc2.apply(p, &hidden, &mut branch);
        out.copy_from_slice(&mid);
        add_scaled(out, &branch, &p[self.ls2.range()]);
    }
    fn forward(&mut self, p: &[f32], x: &[f32], batch: usize, out: &mut [f32], advance: bool, rng: &mut Pcg64) -> Result<()> {
        let (len, c) = (x.len(), self.chans());
        self.batch = batch;
        let [n1, n2] = &mut self.normed;
        let [c1, c2] = &mut self.norm_caches;
        self.norm1.forward(p, x, sized(n1, len), c1, c, advance)?;
        self.attn.forward(p, n1, sized(&mut self.attended, len), &mut self.attn_acts, batch);
        // burn draws the attention's mask, then the MLP's, from the block's one DropPath.
        self.masks[0] = if self.drop_path > 0.0 { draw_mask(rng, batch, self.drop_path) } else { Vec::new() };
        add_scaled_branch(x, &self.attended, &p[self.ls1.range()], &self.masks[0], batch, sized(&mut self.mid, len));
        self.norm2.forward(p, &self.mid, sized(n2, len), c2, c, advance)?;
        self.mlp.forward(p, n2, sized(&mut self.branch, len), &mut self.mlp_acts, false);
        self.masks[1] = if self.drop_path > 0.0 { draw_mask(rng, batch, self.drop_path) } else { Vec::new() };
        add_scaled_branch(&self.mid, &self.branch, &p[self.ls2.range()], &self.masks[1], batch, out);
        Ok(())
    }
    fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let (len, c, batch) = (x.len(), self.chans(), self.batch);
        let mut dbranch = vec![0.0; len];
        scaled_branch_backward(dy, &self.branch, &p[self.ls2.range()], &self.masks[1], batch, &mut dbranch, &mut g[self.ls2.range()]);
        let mut dnormed = vec![0.0; len];
        self.mlp.backward(p, g, &self.normed[1], &self.mlp_acts, &dbranch, &mut dnormed, &mut Vec::new(), &mut Vec::new());
        let mut dmid = dy.to_vec(); // the shortcut's share; the norm adds the MLP's
        self.norm2.backward(p, g, &self.mid, &dnormed, &mut dmid, &self.norm_caches[1], c);
        scaled_branch_backward(&dmid, &self.attended, &p[self.ls1.range()], &self.masks[0], batch, &mut dbranch, &mut g[self.ls1.range()]);
        self.attn.backward(p, g, &self.normed[0], &self.attn_acts, &dbranch, &mut dnormed);
        dx.copy_from_slice(&dmid);
        self.norm1.backward(p, g, x, &dnormed, dx, &self.norm_caches[0], c);
    }
    fn write_buffers(&self, _state: &mut StateDict) {}
}

// ---- ONNX: the deploy form op for op (the trained form is exported through it, as BatchNorm in
// eval mode folds exactly).


impl ToOnnx for DeployMetaBlock2d {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let (k, p) = (self.pool_size as i64, (self.pool_size / 2) as i64);
        let attrs = vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[1, 1]), attr_ints("pads", &[p, p, p, p]), attr_int("count_include_pad", 0)];
        let pooled = g.op("AveragePool", &[x], attrs);
        let mixed = g.op("Sub", &[&pooled, x], vec![]);
        let mixed = self.ls1.planes_to_onnx(g, &mixed);
        let x = g.op("Add", &[x, &mixed], vec![]);
        let h = self.mlp.fc1.to_onnx(g, &x)?;
        let m = self.mlp.fc2.to_onnx(g, &h)?;
        let m = self.ls2.planes_to_onnx(g, &m);
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

impl ToOnnx for MetaBlock1d {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let normed = self.norm1.to_onnx(g, x)?;
        let a = self.token_mixer.to_onnx(g, &normed)?;
        let a = self.ls1.tokens_to_onnx(g, &a);
        let x = g.op("Add", &[x, &a], vec![]);
        let normed = self.norm2.to_onnx(g, &x)?;
        let m = self.mlp.to_onnx(g, &normed)?;
        let m = self.ls2.tokens_to_onnx(g, &m);
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

impl ToOnnx for DeployEfficientFormer {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let x = self.stem.conv1.to_onnx(g, images)?;
        let mut x = self.stem.conv2.to_onnx(g, &x)?;
        for stage in &self.stages {
            if let Some(d) = &stage.downsample {
                x = d.to_onnx(g, &x)?;
            }
            for block in &stage.blocks {
                x = match block {
                    DeployMetaBlock::Meta4d(b) => b.to_onnx(g, &x)?,
                    DeployMetaBlock::Flat(_) => {
                        let c = *self.config.embed_dims.last().expect("four stages") as i64;
                        let flat = g.reshape(&x, &[0, c, -1]);
                        g.transpose(&flat, &[0, 2, 1]) // (B, 49, C)
                    }
                    DeployMetaBlock::Meta3d(b) => b.to_onnx(g, &x)?,
                };
            }
        }
        let x = self.norm.to_onnx(g, &x)?;
        let pooled = g.op("ReduceMean", &[&x], vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)]);
        let a = self.head.to_onnx(g, &pooled)?;
        let b = self.head_dist.to_onnx(g, &pooled)?;
        let sum = g.op("Add", &[&a, &b], vec![]);
        Ok(g.binary_scalar("Div", &sum, 2.0))
    }
}

impl ToOnnx for EfficientFormer {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        self.fuse()?.to_onnx(g, images)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::set_training;
    use crate::state::{collect_state, host_f32, trainable_param_count};
    use crate::testing::{assert_near, randomized, standard_normal};

    /// A small model at the fixed 224² input: `num_vit` Meta3D blocks in a last stage of `last`.
    fn small(last: usize, num_vit: usize) -> EfficientFormerConfig {
        EfficientFormerConfig { depths: vec![1, 1, 2, last], embed_dims: vec![6, 8, 10, 12], num_vit, num_classes: 5, ..EfficientFormerConfig::l1() }
    }

    const TEST_SEED: u64 = 20261202;

    #[test]
    fn the_cpu_runtime_equals_the_burn_forward_fused_and_unfused() {
        // Meta4D blocks before Flat in the last stage, and Flat first (every last-stage block Meta3D).
        for config in [small(2, 1), small(2, 2)] {
            crate::testing::check_runtime_against_burn::<EfficientFormer>(&config, TEST_SEED);
        }
    }

    #[test]
    fn the_cpu_trainer_equals_burn_autodiff() {
        for config in [small(2, 1), small(2, 2)] {
            crate::testing::check_trainer_against_burn::<EfficientFormer>(&config, TEST_SEED, None, 1e-5);
        }
    }

    #[test]
    fn the_cpu_trainer_draws_drop_path_masks_like_burn() {
        // Rate 0.5 at the last block: each block's two per-image draws (mixer or attention, then
        // MLP) in burn's order, Meta4D and Meta3D.
        let config = EfficientFormerConfig { drop_path_rate: 0.5, ..small(3, 2) };
        crate::testing::check_trainer_against_burn::<EfficientFormer>(&config, TEST_SEED, Some(7), 1e-5);
    }

    #[test]
    fn the_pool_mixer_on_rows_equals_burns_and_its_backward_is_its_transpose() {
        // Odd, non-square maps and a 5×5 window: borders where count_include_pad=False matters.
        let device = Device::flex();
        for (grid, pool) in [([4, 5], 3), ([3, 7], 5), ([1, 2], 3)] {
            let c = 3;
            let planes = standard_normal([1, c, grid[0], grid[1]], 21, &device);
            let want = host_f32(pool_mixer(planes.clone(), pool).swap_dims(1, 3).swap_dims(1, 2)); // (1, H, W, C)
            let rows = host_f32(planes.swap_dims(1, 3).swap_dims(1, 2));
            let mut got = vec![0.0; rows.len()];
            pool_mix_rows(&rows, grid, pool, &mut got);
            assert_near(&format!("{grid:?} pool {pool}"), &got, &want, 1e-6, 1e-6);
            // ⟨d, A·x⟩ = ⟨Aᵀ·d, x⟩ for the backward Aᵀ.
            let d = host_f32(standard_normal([rows.len()], 22, &device));
            let mut dx = vec![0.0; rows.len()];
            pool_mix_backward(&d, grid, pool, &mut dx);
            let (lhs, rhs): (f32, f32) = (d.iter().zip(&got).map(|(a, b)| a * b).sum(), dx.iter().zip(&rows).map(|(a, b)| a * b).sum());
            assert!((lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0), "{grid:?} pool {pool}: {lhs} vs {rhs}");
        }
    }

    #[test]
    fn param_count_equals_the_built_models() {
        let device = Device::flex();
        for config in [small(2, 1), small(2, 2), small(3, 1), EfficientFormerConfig { mlp_ratio: 3.0, ..small(1, 1) }, EfficientFormerConfig::l1()] {
            let model = config.init(&device).unwrap();
            assert_eq!(trainable_param_count(&model), config.param_count(), "{config:?}");
        }
    }

    #[test]
    fn the_last_stage_layout_follows_timm() {
        use BlockKind::*;
        assert_eq!(small(2, 1).stage_layout(3), [Meta4d, Flat, Meta3d]);
        assert_eq!(small(2, 2).stage_layout(3), [Flat, Meta3d, Meta3d]);
        assert_eq!(EfficientFormerConfig::l3().stage_layout(3), [Meta4d, Meta4d, Flat, Meta3d, Meta3d, Meta3d, Meta3d]);
        assert_eq!(small(2, 1).stage_layout(2), [Meta4d, Meta4d]);
        let keys = collect_state(&small(2, 1).init(&Device::flex()).unwrap());
        assert!(keys.contains("stages.3.blocks.2.token_mixer.attention_bias_idxs") && keys.contains("stages.3.blocks.0.mlp.norm1.running_var"));
        assert!(keys.contains("stem.conv1.weight") && keys.contains("stem.norm2.num_batches_tracked") && !keys.contains("stages.0.downsample.conv.weight"));
    }

    #[test]
    fn presets_match_the_published_params_and_macs() {
        // SPEC §4.8 (EfficientFormer paper / timm cards): L1 12.3M / 1.3 GMACs, L3 31.3M / 3.9,
        // L7 82.1M / 10.2 at 224², 1000 classes. timm counts 12.29M / 31.41M / 82.23M.
        let cases = [(EfficientFormerConfig::l1(), 12.3e6, 12.29e6, 1.3), (EfficientFormerConfig::l3(), 31.3e6, 31.41e6, 3.9), (EfficientFormerConfig::l7(), 82.1e6, 82.23e6, 10.2)];
        for (config, params, timm, gmacs) in cases {
            let (p, m) = (config.param_count() as f64, config.macs() as f64 / 1e9);
            assert!((p / params - 1.0).abs() <= 0.03, "{config:?}: {p} params vs {params}");
            assert!((p - timm).abs() <= 0.005e6, "{config:?}: {p} params vs timm's {timm}");
            assert!((m / gmacs - 1.0).abs() <= 0.03, "{config:?}: {m:.3} GMACs vs {gmacs}");
        }
    }

    #[test]
    fn the_fused_model_equals_the_unfused_in_eval_without_batch_norms() {
        let device = Device::flex();
        for config in [small(2, 1), small(2, 2)] {
            let model = set_training(randomized(config.init(&device).unwrap(), 1.0, 11), false);
            let deploy = model.fuse().unwrap();
            let keys = collect_state(&deploy);
            assert!(!keys.keys().any(|k| k.contains("running_") || k.contains("norm1.running") || k.contains("num_batches")), "{:?}", keys.keys().collect::<Vec<_>>());
            let images = standard_normal([2, 3, 224, 224], 12, &device);
            let want = host_f32(model.forward(images.clone()));
            let got = host_f32(deploy.forward(images));
            assert_near(&format!("{config:?}"), &got, &want, 1e-4, 1e-5);
        }
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let device = Device::flex();
        let base = small(2, 1);
        let bad = [
            EfficientFormerConfig { img_size: 256, ..base.clone() },
            EfficientFormerConfig { num_vit: 0, ..base.clone() },
            EfficientFormerConfig { num_vit: 3, ..base.clone() },
            EfficientFormerConfig { depths: vec![1, 1, 2], ..base.clone() },
            EfficientFormerConfig { pool_size: 2, ..base.clone() },
            EfficientFormerConfig { mlp_ratio: 0.0, ..base.clone() },
            EfficientFormerConfig { drop_path_rate: 1.0, ..base.clone() },
        ];
        for config in bad {
            let err = config.init(&device).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{config:?}: {err}");
        }
        let model = base.init(&device).unwrap();
        let err = model.try_forward(Tensor::zeros([1, 3, 112, 112], &device)).unwrap_err();
        assert!(err.to_string().contains("112"), "{err}");
        assert!(serde_json::from_str::<EfficientFormerConfig>(&serde_json::to_string(&base).unwrap().replace("\"img_size\"", "\"img\"")).is_err());
    }
}
