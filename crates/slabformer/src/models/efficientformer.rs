//! EfficientFormer (v1): L1 / L3 / L7, timm 0.9.16's `efficientformer.py` layout and keys
//! (SPEC §3.7, §4.8; zoo README `efficientformer_tiny`).
//!
//! Stem (two 3×3/2 conv + BN + ReLU) → four stages (stages 1–3 open with a 3×3/2 conv + BN) of
//! Meta4D blocks `x + γ₁ ⊙ (AvgPool3×3(x) − x)`, `x + γ₂ ⊙ BN(fc2(GELU(BN(fc1(x)))))`; the last
//! `num_vit` blocks of the last stage are Meta3D blocks on the flattened 7×7 tokens,
//! `x + γ₁ ⊙ Attn(LN(x))`, `x + γ₂ ⊙ MLP(LN(x))`. Head: LayerNorm → token mean →
//! (`head` + `head_dist`) / 2. The Meta3D attention is hard-coded (key_dim 32, 8 heads,
//! attn_ratio 4, 7×7 resolution) whatever the width, so the input is fixed at 224².

use burn::module::{Module, Param, ParamId};
use burn::nn::conv::Conv2d;
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::{gelu, relu, softmax};
use burn::tensor::module::avg_pool2d;
use burn::tensor::ops::AvgPoolOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, Preset, check_images};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::{Error, Result};
use crate::nn::attention_bias::{bias_index, gather_bias};
use crate::nn::conv_norm::{Activation, ConvAct, ConvShape, batch_norm_2d, batch_norm_2d_param_count, fold_batch_norm};
use crate::nn::drop_path::DropPath;
use crate::nn::layer_scale::LayerScale;
use crate::nn::linear::linear;
use crate::nn::mlp::Mlp;
use crate::nn::norm::{BatchNorm, LayerNorm};
use crate::plan::Plan;

/// The Meta3D attention's constants (timm builds it as `Attention(dim)`).
pub const KEY_DIM: usize = 32;
pub const HEADS: usize = 8;
pub const VAL_DIM: usize = 4 * KEY_DIM;
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
                    BlockKind::Meta3d => 2 * c + 4 * c + Meta3dAttention::param_count(c) + Mlp::param_count(c, hidden),
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

/// The Meta3D attention (SPEC §3.7): `qkv` head-interleaved (head h owns q, k, v in
/// [192h, 192h + 192)), scores scaled by key_dim^-½ plus the 7×7 absolute-offset bias.
#[derive(Module, Debug)]
pub struct Meta3dAttention {
    pub qkv: Linear,
    pub proj: Linear,
    /// (HEADS, 49).
    pub attention_biases: Param<Tensor<2>>,
    /// (49, 49), persistent in timm's state dict.
    pub attention_bias_idxs: Param<Tensor<2, Int>>,
}

impl Meta3dAttention {
    fn new(dim: usize, device: &Device) -> Self {
        let n = RESOLUTION * RESOLUTION;
        let (index, shape) = bias_index([RESOLUTION; 2], 1);
        Self {
            qkv: linear(dim, HEADS * QKV_PER_HEAD, true, device),
            proj: linear(HEADS * VAL_DIM, dim, true, device),
            attention_biases: Initializer::Zeros.init([HEADS, n], device),
            attention_bias_idxs: Param::initialized(ParamId::new(), Tensor::from_data(TensorData::new(index, shape), device)),
        }
    }

    fn param_count(dim: usize) -> usize {
        let qkv = HEADS * QKV_PER_HEAD;
        dim * qkv + qkv + HEADS * VAL_DIM * dim + dim + HEADS * RESOLUTION * RESOLUTION
    }

    /// (B, 49, C) → (B, 49, C).
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let qkv = self.qkv.forward(x).reshape([b, n, HEADS, QKV_PER_HEAD]).swap_dims(1, 2); // (B, h, N, 192)
        let q = qkv.clone().narrow(3, 0, KEY_DIM);
        let k = qkv.clone().narrow(3, KEY_DIM, KEY_DIM);
        let v = qkv.narrow(3, 2 * KEY_DIM, VAL_DIM);
        let bias = gather_bias(&self.attention_biases, self.attention_bias_idxs.val()).unsqueeze::<4>(); // (1, h, N, N)
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((KEY_DIM as f64).powf(-0.5)).add(bias); // (B, h, N, N)
        let out = softmax(scores, 3).matmul(v); // (B, h, N, 128)
        self.proj.forward(out.swap_dims(1, 2).reshape([b, n, HEADS * VAL_DIM])) // (B, N, C)
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
            token_mixer: Meta3dAttention::new(c, device),
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
        Err(Error::Unsupported { what: "EfficientFormer models".into(), path: "the fast CPU path" })
    }
    fn lower_deploy(_deploy: &DeployEfficientFormer) -> Result<Plan> {
        Err(Error::Unsupported { what: "EfficientFormer models".into(), path: "the fast CPU path" })
    }
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

impl ToOnnx for Meta3dAttention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let n = RESOLUTION * RESOLUTION;
        let qkv = self.qkv.to_onnx(g, x)?;
        let qkv = g.split_heads(&qkv, n, HEADS, QKV_PER_HEAD); // (B, h, N, 192)
        let q = g.slice(&qkv, 3, 0, KEY_DIM as i64);
        let k = g.slice(&qkv, 3, KEY_DIM as i64, 2 * KEY_DIM as i64);
        let v = g.slice(&qkv, 3, 2 * KEY_DIM as i64, QKV_PER_HEAD as i64);
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let scores = g.op("MatMul", &[&q, &kt], vec![]);
        let scores = g.binary_scalar("Mul", &scores, (KEY_DIM as f32).powf(-0.5));
        // The gathered bias is a constant of the trained table.
        let bias = g.tensor("attention_bias", gather_bias(&self.attention_biases, self.attention_bias_idxs.val()));
        let scores = g.op("Add", &[&scores, &bias], vec![]);
        let attn = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let out = g.op("MatMul", &[&attn, &v], vec![]);
        let out = g.merge_heads(&out, n, HEADS * VAL_DIM);
        self.proj.to_onnx(g, &out)
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
