//! EfficientFormer-V2: S0 / S1 / S2 / L, timm 0.9.16's `efficientformer_v2.py` layout and keys
//! (SPEC §4.8; zoo README `efficientformerv2_tiny`).
//!
//! Every conv is a ConvNorm (`conv` with bias, `bn` BatchNorm2d), GELU where timm's ConvNormAct
//! has one. Stem: two 3×3/2 ConvNormAct. Stages 1–3 open with a 3×3/2 ConvNorm; stage 3's adds an
//! [`Attention2dDownsample`]. Blocks: `x + γ₁ ⊙ Attention2d(x)` (the last `num_vit` blocks of stages
//! 2 and 3), `x + γ₂ ⊙ fc2(mid(fc1(x)))` with a depthwise 3×3 `mid` and a per-block hidden ratio.
//! Stage 2's attention runs on a stride-2 grid and is upsampled back. Head: BatchNorm2d → mean
//! over H, W → (`head` + `head_dist`) / 2. The attentions are sized from `img_size` (token
//! count, bias tables), so the input must be that size. Deploy folds every BatchNorm into its
//! conv, and the final one into both heads.

use burn::module::{Module, Param};
use burn::nn::conv::Conv2d;
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::module::{avg_pool2d, interpolate};
use burn::tensor::ops::{AvgPoolOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, Preset, check_images};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::{Error, Result};
use crate::nn::attention_bias::{bias_index, gather_bias};
use crate::nn::conv_norm::{Activation, ConvAct, ConvNormAct, ConvShape, batch_norm_2d_param_count};
use crate::nn::drop_path::DropPath;
use crate::nn::fuse::fold_into_next_linear;
use crate::nn::layer_scale::LayerScale;
use crate::nn::linear::linear;
use crate::nn::norm::BatchNorm;
use crate::plan::Plan;

/// Attention2d's constants (timm builds it with its defaults whatever the width).
pub const HEADS: usize = 8;
pub const KEY_DIM: usize = 32;
pub const VAL_DIM: usize = 4 * KEY_DIM;
/// Attention2dDownsample's key width (its default key_dim 16, attn_ratio 4, 8 heads).
pub const DOWN_KEY_DIM: usize = 16;
pub const DOWN_VAL_DIM: usize = 4 * DOWN_KEY_DIM;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EfficientFormerV2Config {
    /// Input side; the attentions' token grids and bias tables are built for it.
    pub img_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    /// Blocks per stage (four stages).
    pub depths: Vec<usize>,
    pub embed_dims: Vec<usize>,
    /// MLP hidden ratio of every block, stage by stage (`depths[s]` entries each).
    pub mlp_ratios: Vec<Vec<f64>>,
    /// Blocks with attention at the end of stages 2 and 3.
    pub num_vit: usize,
    pub layer_scale_init_value: f64,
    pub norm_eps: f64,
    pub drop_path_rate: f64,
}

pub(crate) const PRESETS: &[Preset<EfficientFormerV2Config>] = &[
    Preset { name: "efficientformerv2_s0", summary: "EfficientFormer-V2-S0: widths 32-176, depths 2/2/6/4", config: EfficientFormerV2Config::s0 },
    Preset { name: "efficientformerv2_s1", summary: "EfficientFormer-V2-S1: widths 32-224, depths 3/3/9/6", config: EfficientFormerV2Config::s1 },
    Preset { name: "efficientformerv2_s2", summary: "EfficientFormer-V2-S2: widths 32-288, depths 4/4/12/8", config: EfficientFormerV2Config::s2 },
    Preset { name: "efficientformerv2_l", summary: "EfficientFormer-V2-L: widths 40-384, depths 5/5/15/10", config: EfficientFormerV2Config::l },
];

/// Which of a stage's parts run where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StageGrids {
    /// The grid the stage's input arrives on.
    input: [usize; 2],
    /// The grid its blocks run on.
    blocks: [usize; 2],
}

impl EfficientFormerV2Config {
    fn published(depths: [usize; 4], embed_dims: [usize; 4], ratios: [&[usize]; 2], num_vit: usize, drop_path_rate: f64) -> Self {
        let uniform = |d: usize| vec![4.0; d];
        let listed = |r: &[usize]| r.iter().map(|&v| v as f64).collect();
        Self {
            img_size: 224,
            in_chans: 3,
            num_classes: 1000,
            depths: depths.to_vec(),
            embed_dims: embed_dims.to_vec(),
            mlp_ratios: vec![uniform(depths[0]), uniform(depths[1]), listed(ratios[0]), listed(ratios[1])],
            num_vit,
            layer_scale_init_value: 1e-5,
            norm_eps: 1e-5,
            drop_path_rate,
        }
    }

    /// timm `efficientformerv2_s0` (widths, depths and the per-block expansion ratios of
    /// `EfficientFormer_expansion_ratios`).
    pub fn s0() -> Self {
        Self::published([2, 2, 6, 4], [32, 48, 96, 176], [&[4, 3, 3, 3, 4, 4], &[4, 3, 3, 4]], 2, 0.0)
    }

    pub fn s1() -> Self {
        Self::published([3, 3, 9, 6], [32, 48, 120, 224], [&[4, 4, 3, 3, 3, 3, 4, 4, 4], &[4, 4, 3, 3, 4, 4]], 2, 0.0)
    }

    pub fn s2() -> Self {
        Self::published([4, 4, 12, 8], [32, 64, 144, 288], [&[4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4], &[4, 4, 3, 3, 3, 3, 4, 4]], 4, 0.02)
    }

    pub fn l() -> Self {
        Self::published([5, 5, 15, 10], [40, 80, 192, 384], [&[4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4], &[4, 4, 4, 3, 3, 3, 3, 4, 4, 4]], 6, 0.1)
    }

    fn stem_shapes(&self) -> [ConvShape; 2] {
        let c = self.embed_dims[0];
        [ConvShape::new(self.in_chans, c / 2, 3, 2).with_bias(true), ConvShape::new(c / 2, c, 3, 2).with_bias(true)]
    }

    fn downsample_shape(&self, s: usize) -> Option<ConvShape> {
        (s > 0).then(|| ConvShape::new(self.embed_dims[s - 1], self.embed_dims[s], 3, 2).with_bias(true))
    }

    fn stage_grids(&self) -> Vec<StageGrids> {
        let [a, b] = self.stem_shapes();
        let mut grid = b.out_grid(a.out_grid([self.img_size; 2]));
        (0..self.depths.len())
            .map(|s| {
                let input = grid;
                if let Some(shape) = self.downsample_shape(s) {
                    grid = shape.out_grid(grid);
                }
                StageGrids { input, blocks: grid }
            })
            .collect()
    }

    /// Whether block `i` of stage `s` has attention (timm: `i > depth − num_vit − 1` in stages ≥ 2).
    fn has_attention(&self, s: usize, i: usize) -> bool {
        s >= 2 && i + self.num_vit >= self.depths[s]
    }

    /// Stage 2's attention runs at stride 2, the last stage's at stride 1.
    fn attention_stride(s: usize) -> usize {
        if s == 2 { 2 } else { 1 }
    }

    fn mlp_hidden(&self, s: usize, i: usize) -> usize {
        (self.embed_dims[s] as f64 * self.mlp_ratios[s][i]) as usize
    }

    /// Block `j`'s (over all stages) stochastic depth rate: torch.linspace(0, rate, Σ depths).
    fn drop_path_rate_of(&self, j: usize) -> f64 {
        let total: usize = self.depths.iter().sum();
        if total > 1 { self.drop_path_rate * j as f64 / (total - 1) as f64 } else { 0.0 }
    }

    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Config(msg));
        if self.depths.len() != 4 || self.embed_dims.len() != 4 || self.mlp_ratios.len() != 4 {
            return err(format!("depths, embed_dims and mlp_ratios need 4 stages each, got {}, {} and {}", self.depths.len(), self.embed_dims.len(), self.mlp_ratios.len()));
        }
        if self.depths.contains(&0) || self.embed_dims.iter().any(|&c| c < 2) {
            return err(format!("every stage needs ≥ 1 block (depths {:?}) and ≥ 2 channels (embed_dims {:?})", self.depths, self.embed_dims));
        }
        if self.in_chans == 0 || self.num_classes == 0 || self.img_size == 0 {
            return err("img_size, in_chans and num_classes must be > 0".into());
        }
        for (s, ratios) in self.mlp_ratios.iter().enumerate() {
            if ratios.len() != self.depths[s] {
                return err(format!("mlp_ratios[{s}] has {} entries for {} blocks", ratios.len(), self.depths[s]));
            }
            if let Some(i) = (0..ratios.len()).find(|&i| !(ratios[i].is_finite() && self.mlp_hidden(s, i) > 0)) {
                return err(format!("mlp_ratios[{s}][{i}] = {} must give ≥ 1 hidden channel", ratios[i]));
            }
        }
        if !(self.layer_scale_init_value.is_finite() && self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return err(format!("layer_scale_init_value = {} must be finite and norm_eps = {} positive", self.layer_scale_init_value, self.norm_eps));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return err(format!("drop_path_rate must lie in [0, 1), got {}", self.drop_path_rate));
        }
        let grid = self.stage_grids()[2].blocks;
        if (0..self.depths[2]).any(|i| self.has_attention(2, i)) && !(grid[0].is_multiple_of(2) && grid[1].is_multiple_of(2)) {
            return err(format!("img_size = {} gives stage 2 a {grid:?} grid: its stride-2 attention upsamples ×2, so the grid must be even", self.img_size));
        }
        Ok(())
    }

    /// Trainable parameters, from the architecture alone.
    pub fn param_count(&self) -> usize {
        let conv_bn = |s: ConvShape| ConvNormAct::param_count(s);
        let grids = self.stage_grids();
        let mut total: usize = self.stem_shapes().into_iter().map(conv_bn).sum();
        for (s, g) in grids.iter().enumerate() {
            let c = self.embed_dims[s];
            total += self.downsample_shape(s).map_or(0, conv_bn);
            if s == 3 {
                let [h, w] = g.input;
                total += Attention2dDownsample::<ConvNormAct>::param_count(self.embed_dims[2], c, h * w);
            }
            for i in 0..self.depths[s] {
                let hidden = self.mlp_hidden(s, i);
                total += conv_bn(ConvShape::new(c, hidden, 1, 1).with_bias(true))
                    + conv_bn(ConvShape::depthwise(hidden, 1, 3, 1).with_bias(true))
                    + conv_bn(ConvShape::new(hidden, c, 1, 1).with_bias(true))
                    + c;
                if self.has_attention(s, i) {
                    total += c + Attention2d::<ConvNormAct>::param_count(c, Self::attention_stride(s), Self::attention_tokens(g.blocks, s));
                }
            }
        }
        let c = self.embed_dims[3];
        total + batch_norm_2d_param_count(c) + 2 * (c * self.num_classes + self.num_classes)
    }

    /// Tokens of stage `s`'s Attention2d on a `grid` (stage 2 strides by 2 first).
    fn attention_tokens(grid: [usize; 2], s: usize) -> usize {
        let stride = Self::attention_stride(s);
        grid[0].div_ceil(stride) * grid[1].div_ceil(stride)
    }

    /// Multiply-accumulates of one image (convs, linears and the attention products).
    pub fn macs(&self) -> u64 {
        let grids = self.stage_grids();
        let [a, b] = self.stem_shapes();
        let mut total = a.macs([self.img_size; 2]) + b.macs(a.out_grid([self.img_size; 2]));
        for (s, g) in grids.iter().enumerate() {
            let c = self.embed_dims[s];
            if let Some(shape) = self.downsample_shape(s) {
                total += shape.macs(g.input);
            }
            if s == 3 {
                total += Attention2dDownsample::<ConvNormAct>::macs(self.embed_dims[2], c, g.input);
            }
            for i in 0..self.depths[s] {
                let hidden = self.mlp_hidden(s, i);
                total += ConvShape::new(c, hidden, 1, 1).macs(g.blocks) + ConvShape::depthwise(hidden, 1, 3, 1).macs(g.blocks) + ConvShape::new(hidden, c, 1, 1).macs(g.blocks);
                if self.has_attention(s, i) {
                    total += Attention2d::<ConvNormAct>::macs(c, Self::attention_stride(s), g.blocks);
                }
            }
        }
        total + 2 * (self.embed_dims[3] * self.num_classes) as u64
    }

    pub fn init(&self, device: &Device) -> Result<EfficientFormerV2> {
        self.validate()?;
        let unit = |shape: ConvShape, act: Activation| {
            let mut u = ConvNormAct::new(shape, act, device);
            u.bn.eps = self.norm_eps;
            u
        };
        let [a, b] = self.stem_shapes();
        let stem = Stem { conv1: unit(a, Activation::Gelu), conv2: unit(b, Activation::Gelu) };
        let grids = self.stage_grids();
        let mut j = 0;
        let mut stages = Vec::with_capacity(4);
        for (s, g) in grids.iter().enumerate() {
            let c = self.embed_dims[s];
            let downsample = self.downsample_shape(s).map(|shape| Downsample {
                conv: unit(shape, Activation::Identity),
                attn: (s == 3).then(|| Attention2dDownsample::new(self.embed_dims[2], c, g.input, &unit, device)),
            });
            let blocks = (0..self.depths[s])
                .map(|i| {
                    let hidden = self.mlp_hidden(s, i);
                    let attention = self.has_attention(s, i);
                    let block = Block {
                        token_mixer: attention.then(|| Attention2d::new(c, Self::attention_stride(s), g.blocks, &unit, device)),
                        ls1: attention.then(|| LayerScale::new(c, self.layer_scale_init_value, device)),
                        mlp: ConvMlp {
                            fc1: unit(ConvShape::new(c, hidden, 1, 1).with_bias(true), Activation::Gelu),
                            mid: unit(ConvShape::depthwise(hidden, 1, 3, 1).with_bias(true), Activation::Gelu),
                            fc2: unit(ConvShape::new(hidden, c, 1, 1).with_bias(true), Activation::Identity),
                        },
                        ls2: LayerScale::new(c, self.layer_scale_init_value, device),
                        drop_path: DropPath::new(self.drop_path_rate_of(j)),
                    };
                    j += 1;
                    block
                })
                .collect();
            stages.push(Stage { downsample, blocks });
        }
        let c = self.embed_dims[3];
        let mut norm = crate::nn::conv_norm::batch_norm_2d(c, device);
        norm.eps = self.norm_eps;
        Ok(EfficientFormerV2 {
            stem,
            stages,
            norm,
            head: linear(c, self.num_classes, true, device),
            head_dist: linear(c, self.num_classes, true, device),
            config: self.clone(),
        })
    }
}

/// A conv with its norm and activation: [`ConvNormAct`] as trained, [`ConvAct`] deployed. The
/// blocks are written once over it.
pub trait ConvUnit: Module {
    /// (B, C_in, H, W) → (B, C_out, H', W').
    fn apply(&self, x: Tensor<4>) -> Tensor<4>;
}

impl ConvUnit for ConvNormAct {
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward(x)
    }
}

impl ConvUnit for ConvAct {
    fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward(x)
    }
}

fn index_buffer(values: Vec<i64>, shape: [usize; 2], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Scores (B, h, N_q, N_k) scaled by `key_dim`^-½ plus the bias gathered at `index`.
fn biased_scores(q: Tensor<4>, k: Tensor<4>, key_dim: usize, biases: &Param<Tensor<2>>, index: &Tensor<2, Int>) -> Tensor<4> {
    let bias = gather_bias(biases, index.clone()).unsqueeze::<4>(); // (1, h, N_q, N_k)
    q.matmul(k).mul_scalar((key_dim as f64).powf(-0.5)).add(bias)
}

/// timm's `Attention2d` with talking heads; with stride 2 a depthwise `stride_conv` halves the
/// grid first and a bilinear ×2 upsample (align_corners=False) restores it.
#[derive(Module, Debug)]
pub struct Attention2d<U: Module> {
    pub stride_conv: Option<U>,
    pub q: U,
    pub k: U,
    pub v: U,
    pub v_local: U,
    pub talking_head1: Conv2d,
    pub talking_head2: Conv2d,
    pub proj: U,
    /// (HEADS, N).
    pub attention_biases: Param<Tensor<2>>,
    /// (N, N), recomputed (non-persistent in timm).
    pub attention_bias_idxs: Tensor<2, Int>,
}

impl Attention2d<ConvNormAct> {
    fn new(dim: usize, stride: usize, grid: [usize; 2], unit: &dyn Fn(ConvShape, Activation) -> ConvNormAct, device: &Device) -> Self {
        let attention_grid = grid.map(|n| n.div_ceil(stride));
        let (index, shape) = bias_index(attention_grid, 1);
        let talking = || ConvShape::new(HEADS, HEADS, 1, 1).with_bias(true).init(device);
        let id = Activation::Identity;
        Self {
            stride_conv: (stride > 1).then(|| unit(ConvShape::depthwise(dim, 1, 3, stride).with_bias(true), id)),
            q: unit(ConvShape::new(dim, HEADS * KEY_DIM, 1, 1).with_bias(true), id),
            k: unit(ConvShape::new(dim, HEADS * KEY_DIM, 1, 1).with_bias(true), id),
            v: unit(ConvShape::new(dim, HEADS * VAL_DIM, 1, 1).with_bias(true), id),
            v_local: unit(ConvShape::depthwise(HEADS * VAL_DIM, 1, 3, 1).with_bias(true), id),
            talking_head1: talking(),
            talking_head2: talking(),
            proj: unit(ConvShape::new(HEADS * VAL_DIM, dim, 1, 1).with_bias(true), id),
            attention_biases: Initializer::Zeros.init([HEADS, shape[1]], device),
            attention_bias_idxs: index_buffer(index, shape, device),
        }
    }

    fn fuse(&self) -> Attention2d<ConvAct> {
        Attention2d {
            stride_conv: self.stride_conv.as_ref().map(ConvNormAct::fuse),
            q: self.q.fuse(),
            k: self.k.fuse(),
            v: self.v.fuse(),
            v_local: self.v_local.fuse(),
            talking_head1: self.talking_head1.clone(),
            talking_head2: self.talking_head2.clone(),
            proj: self.proj.fuse(),
            attention_biases: self.attention_biases.clone(),
            attention_bias_idxs: self.attention_bias_idxs.clone(),
        }
    }

    fn param_count(dim: usize, stride: usize, tokens: usize) -> usize {
        let unit = |s: ConvShape| ConvNormAct::param_count(s.with_bias(true));
        let (kh, dh) = (HEADS * KEY_DIM, HEADS * VAL_DIM);
        let stride_conv = if stride > 1 { unit(ConvShape::depthwise(dim, 1, 3, stride)) } else { 0 };
        stride_conv
            + 2 * unit(ConvShape::new(dim, kh, 1, 1))
            + unit(ConvShape::new(dim, dh, 1, 1))
            + unit(ConvShape::depthwise(dh, 1, 3, 1))
            + 2 * (HEADS * HEADS + HEADS)
            + unit(ConvShape::new(dh, dim, 1, 1))
            + HEADS * tokens
    }

    fn macs(dim: usize, stride: usize, grid: [usize; 2]) -> u64 {
        let (kh, dh) = (HEADS * KEY_DIM, HEADS * VAL_DIM);
        let inner = grid.map(|n| n.div_ceil(stride));
        let n = (inner[0] * inner[1]) as u64;
        let stride_conv = if stride > 1 { ConvShape::depthwise(dim, 1, 3, stride).macs(grid) } else { 0 };
        stride_conv
            + 2 * ConvShape::new(dim, kh, 1, 1).macs(inner)
            + ConvShape::new(dim, dh, 1, 1).macs(inner)
            + ConvShape::depthwise(dh, 1, 3, 1).macs(inner)
            + (HEADS as u64) * n * n * (KEY_DIM + VAL_DIM) as u64
            + 2 * n * n * (HEADS * HEADS) as u64
            + ConvShape::new(dh, dim, 1, 1).macs(grid)
    }
}

impl<U: ConvUnit> Attention2d<U> {
    /// (B, C, H, W) → (B, C, H, W).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = match &self.stride_conv {
            Some(conv) => conv.apply(x), // (B, C, H/2, W/2)
            None => x,
        };
        let [b, _, h, w] = x.dims();
        let n = h * w;
        let q = self.q.apply(x.clone()).reshape([b, HEADS, KEY_DIM, n]).swap_dims(2, 3); // (B, h, N, 32)
        let k = self.k.apply(x.clone()).reshape([b, HEADS, KEY_DIM, n]); // (B, h, 32, N)
        let v = self.v.apply(x); // (B, h·128, H, W)
        let v_local = self.v_local.apply(v.clone());
        let v = v.reshape([b, HEADS, VAL_DIM, n]).swap_dims(2, 3); // (B, h, N, 128)
        let scores = biased_scores(q, k, KEY_DIM, &self.attention_biases, &self.attention_bias_idxs); // (B, h, N, N)
        let attn = self.talking_head2.forward(softmax(self.talking_head1.forward(scores), 3));
        let mut out = attn.matmul(v).swap_dims(2, 3).reshape([b, HEADS * VAL_DIM, h, w]).add(v_local); // (B, h·128, H, W)
        if self.stride_conv.is_some() {
            let options = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_output_size([2 * h, 2 * w]);
            out = interpolate(out, options); // (B, h·128, 2H, 2W)
        }
        self.proj.apply(gelu(out))
    }
}

/// timm's `LocalGlobalQuery`: depthwise 3×3/2 conv (bias, no norm) + the stride-2 subsample,
/// then a 1×1 ConvNorm.
#[derive(Module, Debug)]
pub struct LocalGlobalQuery<U: Module> {
    pub local: Conv2d,
    pub proj: U,
}

/// timm's `Attention2dDownsample` (stage 3's downsample, added to its conv): queries on the
/// stride-2 grid against keys on the full one.
#[derive(Module, Debug)]
pub struct Attention2dDownsample<U: Module> {
    pub q: LocalGlobalQuery<U>,
    pub k: U,
    pub v: U,
    pub v_local: U,
    pub proj: U,
    /// (HEADS, N) over the input grid.
    pub attention_biases: Param<Tensor<2>>,
    /// (N/4, N): the even query points against every key, recomputed.
    pub attention_bias_idxs: Tensor<2, Int>,
}

impl Attention2dDownsample<ConvNormAct> {
    fn new(dim: usize, out_dim: usize, grid: [usize; 2], unit: &dyn Fn(ConvShape, Activation) -> ConvNormAct, device: &Device) -> Self {
        let (index, shape) = bias_index(grid, 2);
        let (kh, dh, id) = (HEADS * DOWN_KEY_DIM, HEADS * DOWN_VAL_DIM, Activation::Identity);
        Self {
            q: LocalGlobalQuery { local: ConvShape::depthwise(dim, 1, 3, 2).with_bias(true).init(device), proj: unit(ConvShape::new(dim, kh, 1, 1).with_bias(true), id) },
            k: unit(ConvShape::new(dim, kh, 1, 1).with_bias(true), id),
            v: unit(ConvShape::new(dim, dh, 1, 1).with_bias(true), id),
            v_local: unit(ConvShape::depthwise(dh, 1, 3, 2).with_bias(true), id),
            proj: unit(ConvShape::new(dh, out_dim, 1, 1).with_bias(true), id),
            attention_biases: Initializer::Zeros.init([HEADS, shape[1]], device),
            attention_bias_idxs: index_buffer(index, shape, device),
        }
    }

    fn param_count(dim: usize, out_dim: usize, tokens: usize) -> usize {
        let unit = |s: ConvShape| ConvNormAct::param_count(s.with_bias(true));
        let (kh, dh) = (HEADS * DOWN_KEY_DIM, HEADS * DOWN_VAL_DIM);
        ConvShape::depthwise(dim, 1, 3, 2).with_bias(true).param_count()
            + 2 * unit(ConvShape::new(dim, kh, 1, 1))
            + unit(ConvShape::new(dim, dh, 1, 1))
            + unit(ConvShape::depthwise(dh, 1, 3, 2))
            + unit(ConvShape::new(dh, out_dim, 1, 1))
            + HEADS * tokens
    }

    fn macs(dim: usize, out_dim: usize, grid: [usize; 2]) -> u64 {
        let (kh, dh) = (HEADS * DOWN_KEY_DIM, HEADS * DOWN_VAL_DIM);
        let half = grid.map(|n| n.div_ceil(2));
        let (n, n2) = ((grid[0] * grid[1]) as u64, (half[0] * half[1]) as u64);
        ConvShape::depthwise(dim, 1, 3, 2).macs(grid)
            + ConvShape::new(dim, kh, 1, 1).macs(half)
            + ConvShape::new(dim, kh, 1, 1).macs(grid)
            + ConvShape::new(dim, dh, 1, 1).macs(grid)
            + ConvShape::depthwise(dh, 1, 3, 2).macs(grid)
            + (HEADS as u64) * n2 * n * (DOWN_KEY_DIM + DOWN_VAL_DIM) as u64
            + ConvShape::new(dh, out_dim, 1, 1).macs(half)
    }

    fn fuse(&self) -> Attention2dDownsample<ConvAct> {
        Attention2dDownsample {
            q: LocalGlobalQuery { local: self.q.local.clone(), proj: self.q.proj.fuse() },
            k: self.k.fuse(),
            v: self.v.fuse(),
            v_local: self.v_local.fuse(),
            proj: self.proj.fuse(),
            attention_biases: self.attention_biases.clone(),
            attention_bias_idxs: self.attention_bias_idxs.clone(),
        }
    }
}

/// x[:, :, ::2, ::2] (timm's AvgPool2d(1, 2, 0)).
fn subsample(x: Tensor<4>) -> Tensor<4> {
    avg_pool2d(x, AvgPoolOptions::new([1, 1]).with_stride([2, 2]))
}

impl<U: ConvUnit> Attention2dDownsample<U> {
    /// (B, C, H, W) → (B, C_out, ⌈H/2⌉, ⌈W/2⌉).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, _, h, w] = x.dims();
        let n = h * w;
        let q = self.q.proj.apply(self.q.local.forward(x.clone()).add(subsample(x.clone()))); // (B, h·16, H/2, W/2)
        let [_, _, h2, w2] = q.dims();
        let q = q.reshape([b, HEADS, DOWN_KEY_DIM, h2 * w2]).swap_dims(2, 3); // (B, h, N/4, 16)
        let k = self.k.apply(x.clone()).reshape([b, HEADS, DOWN_KEY_DIM, n]); // (B, h, 16, N)
        let v = self.v.apply(x); // (B, h·64, H, W)
        let v_local = self.v_local.apply(v.clone()); // (B, h·64, H/2, W/2)
        let v = v.reshape([b, HEADS, DOWN_VAL_DIM, n]).swap_dims(2, 3); // (B, h, N, 64)
        let scores = biased_scores(q, k, DOWN_KEY_DIM, &self.attention_biases, &self.attention_bias_idxs); // (B, h, N/4, N)
        let out = softmax(scores, 3).matmul(v).swap_dims(2, 3).reshape([b, HEADS * DOWN_VAL_DIM, h2, w2]).add(v_local);
        self.proj.apply(gelu(out))
    }
}

#[derive(Module, Debug)]
pub struct Stem<U: Module> {
    pub conv1: U,
    pub conv2: U,
}

#[derive(Module, Debug)]
pub struct Downsample<U: Module> {
    pub conv: U,
    pub attn: Option<Attention2dDownsample<U>>,
}

impl<U: ConvUnit> Downsample<U> {
    /// (B, C_in, H, W) → (B, C_out, H/2, W/2).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let out = self.conv.apply(x.clone());
        match &self.attn {
            Some(attn) => attn.forward(x).add(out),
            None => out,
        }
    }
}

/// timm's `ConvMlpWithNorm` with its depthwise `mid` conv.
#[derive(Module, Debug)]
pub struct ConvMlp<U: Module> {
    pub fc1: U,
    pub mid: U,
    pub fc2: U,
}

#[derive(Module, Debug)]
pub struct Block<U: Module> {
    pub token_mixer: Option<Attention2d<U>>,
    pub ls1: Option<LayerScale>,
    pub mlp: ConvMlp<U>,
    pub ls2: LayerScale,
    pub drop_path: DropPath,
}

impl<U: ConvUnit> Block<U> {
    /// (B, C, H, W) → (B, C, H, W).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = match (&self.token_mixer, &self.ls1) {
            (Some(mixer), Some(ls1)) => x.clone().add(self.drop_path.forward_planes(ls1.forward_planes(mixer.forward(x)))),
            _ => x,
        };
        let m = &self.mlp;
        let branch = self.ls2.forward_planes(m.fc2.apply(m.mid.apply(m.fc1.apply(x.clone()))));
        x.add(self.drop_path.forward_planes(branch))
    }
}

#[derive(Module, Debug)]
pub struct Stage<U: Module> {
    pub downsample: Option<Downsample<U>>,
    pub blocks: Vec<Block<U>>,
}

/// Stem and stages: (B, in_chans, H, W) → (B, C3, H/32, W/32).
fn features<U: ConvUnit>(stem: &Stem<U>, stages: &[Stage<U>], images: Tensor<4>) -> Tensor<4> {
    let x = stem.conv2.apply(stem.conv1.apply(images)); // (B, C0, H/4, W/4)
    stages.iter().fold(x, |x, stage| {
        let x = match &stage.downsample {
            Some(d) => d.forward(x),
            None => x,
        };
        stage.blocks.iter().fold(x, |x, block| block.forward(x))
    })
}

/// Mean over H, W → the two heads averaged (timm averages them unless distilled training).
fn classify(head: &Linear, head_dist: &Linear, x: Tensor<4>) -> Tensor<2> {
    let [b, c, h, w] = x.dims();
    let pooled = x.reshape([b, c, h * w]).mean_dim(2).reshape([b, c]); // (B, C)
    head.forward(pooled.clone()).add(head_dist.forward(pooled)).div_scalar(2.0)
}

#[derive(Module, Debug)]
pub struct EfficientFormerV2 {
    pub stem: Stem<ConvNormAct>,
    pub stages: Vec<Stage<ConvNormAct>>,
    pub norm: BatchNorm,
    pub head: Linear,
    pub head_dist: Linear,
    #[module(skip)]
    pub config: EfficientFormerV2Config,
}

impl EfficientFormerV2 {
    /// Images (B, in_chans, img_size, img_size) → logits (B, num_classes).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.norm.forward_planes(features(&self.stem, &self.stages, images));
        classify(&self.head, &self.head_dist, x)
    }

    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        check_images("efficientformer_v2", &self.config, images.dims())?;
        Ok(self.forward(images))
    }

    /// The deploy form: every BatchNorm folded into the conv before it, the final one into both
    /// heads (the token mean between them is linear). Every EfficientFormer-V2 folds; the
    /// `Result` is the families' common signature.
    pub fn fuse(&self) -> Result<DeployEfficientFormerV2> {
        let unit = |u: &ConvNormAct| u.fuse();
        let stages = self
            .stages
            .iter()
            .map(|stage| Stage {
                downsample: stage.downsample.as_ref().map(|d| Downsample { conv: unit(&d.conv), attn: d.attn.as_ref().map(Attention2dDownsample::fuse) }),
                blocks: stage
                    .blocks
                    .iter()
                    .map(|b| Block {
                        token_mixer: b.token_mixer.as_ref().map(Attention2d::fuse),
                        ls1: b.ls1.clone(),
                        mlp: ConvMlp { fc1: unit(&b.mlp.fc1), mid: unit(&b.mlp.mid), fc2: unit(&b.mlp.fc2) },
                        ls2: b.ls2.clone(),
                        drop_path: DropPath::new(0.0),
                    })
                    .collect(),
            })
            .collect();
        let (a, b) = self.norm.eval_affine();
        Ok(DeployEfficientFormerV2 {
            stem: Stem { conv1: unit(&self.stem.conv1), conv2: unit(&self.stem.conv2) },
            stages,
            head: fold_into_next_linear(&self.head, a.clone(), b.clone()),
            head_dist: fold_into_next_linear(&self.head_dist, a, b),
            config: self.config.clone(),
        })
    }
}

/// The BatchNorm-free deploy model made by [`EfficientFormerV2::fuse`].
#[derive(Module, Debug)]
pub struct DeployEfficientFormerV2 {
    pub stem: Stem<ConvAct>,
    pub stages: Vec<Stage<ConvAct>>,
    pub head: Linear,
    pub head_dist: Linear,
    #[module(skip)]
    pub config: EfficientFormerV2Config,
}

impl DeployEfficientFormerV2 {
    /// Images (B, in_chans, img_size, img_size) → logits (B, num_classes).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        classify(&self.head, &self.head_dist, features(&self.stem, &self.stages, images))
    }
}

impl ImageConfig for EfficientFormerV2Config {
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
        EfficientFormerV2Config::validate(self)
    }
}

impl ImageClassifier for EfficientFormerV2 {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ImageClassifier for DeployEfficientFormerV2 {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ModelFamily for EfficientFormerV2 {
    type Config = EfficientFormerV2Config;
    type Deploy = DeployEfficientFormerV2;

    fn presets() -> &'static [Preset<EfficientFormerV2Config>] {
        PRESETS
    }
    fn tagged(config: &EfficientFormerV2Config) -> AnyConfig {
        AnyConfig::EfficientFormerV2(config.clone())
    }
    fn config_of(any: &AnyConfig) -> Option<&EfficientFormerV2Config> {
        match any {
            AnyConfig::EfficientFormerV2(c) => Some(c),
            _ => None,
        }
    }
    fn init(config: &EfficientFormerV2Config, device: &Device) -> Result<Self> {
        config.init(device)
    }
    fn config(&self) -> &EfficientFormerV2Config {
        &self.config
    }
    fn param_count(config: &EfficientFormerV2Config) -> usize {
        config.param_count()
    }
    fn macs(config: &EfficientFormerV2Config) -> u64 {
        config.macs()
    }
    fn fuse(&self) -> Result<DeployEfficientFormerV2> {
        EfficientFormerV2::fuse(self)
    }
    fn lower(&self) -> Result<Plan> {
        Err(Error::Unsupported { what: "EfficientFormer-V2 models".into(), path: "the fast CPU path" })
    }
    fn lower_deploy(_deploy: &DeployEfficientFormerV2) -> Result<Plan> {
        Err(Error::Unsupported { what: "EfficientFormer-V2 models".into(), path: "the fast CPU path" })
    }
}

// ---- ONNX: the deploy form op for op (the trained form is exported through it, as BatchNorm in
// eval mode folds exactly).

fn plain_conv_onnx(g: &mut Graph, x: &str, conv: &Conv2d) -> String {
    let pad = match conv.padding {
        burn::nn::PaddingConfig2d::Explicit(p, ..) => p,
        _ => 0,
    };
    g.conv(x, conv, pad)
}

/// (B, h·d, H, W) → (B, h, d, N) (`transpose`: (B, h, N, d)).
fn heads_onnx(g: &mut Graph, x: &str, d: usize, transpose: bool) -> String {
    let r = g.reshape(x, &[0, HEADS as i64, d as i64, -1]);
    if transpose { g.transpose(&r, &[0, 1, 3, 2]) } else { r }
}

fn scores_onnx(g: &mut Graph, q: &str, k: &str, key_dim: usize, biases: &Param<Tensor<2>>, index: &Tensor<2, Int>) -> String {
    let s = g.op("MatMul", &[q, k], vec![]);
    let s = g.binary_scalar("Mul", &s, (key_dim as f32).powf(-0.5));
    // The gathered bias is a constant of the trained table.
    let bias = g.tensor("attention_bias", gather_bias(biases, index.clone()));
    g.op("Add", &[&s, &bias], vec![])
}

/// (B, h, N, d) attention output → (B, h·d, H, W) planes of `like`'s grid.
fn planes_onnx(g: &mut Graph, out: &str, channels: usize, grid: [usize; 2]) -> String {
    let t = g.transpose(out, &[0, 1, 3, 2]);
    g.reshape(&t, &[0, channels as i64, grid[0] as i64, grid[1] as i64])
}

/// PyTorch's bilinear resampling (align_corners=False) of `n_in` samples to `n_out` as an
/// (n_out, n_in) row-major matrix: source = (o + ½)·n_in/n_out − ½, clamped at 0.
fn bilinear_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let mut m = vec![0.0; n_out * n_in];
    for o in 0..n_out {
        let src = ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let frac = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - frac;
        m[o * n_in + i1] += frac;
    }
    m
}


impl Attention2d<ConvAct> {
    fn to_onnx_on(&self, g: &mut Graph, x: &str, grid: [usize; 2]) -> Result<String> {
        let (x, inner) = match &self.stride_conv {
            Some(conv) => (conv.to_onnx(g, x)?, grid.map(|n| n.div_ceil(2))),
            None => (x.to_string(), grid),
        };
        let q = self.q.to_onnx(g, &x)?;
        let q = heads_onnx(g, &q, KEY_DIM, true);
        let k = self.k.to_onnx(g, &x)?;
        let k = heads_onnx(g, &k, KEY_DIM, false);
        let v_planes = self.v.to_onnx(g, &x)?;
        let v_local = self.v_local.to_onnx(g, &v_planes)?;
        let v = heads_onnx(g, &v_planes, VAL_DIM, true);
        let s = scores_onnx(g, &q, &k, KEY_DIM, &self.attention_biases, &self.attention_bias_idxs);
        let s = plain_conv_onnx(g, &s, &self.talking_head1);
        let a = g.op("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let a = plain_conv_onnx(g, &a, &self.talking_head2);
        let out = g.op("MatMul", &[&a, &v], vec![]);
        let out = planes_onnx(g, &out, HEADS * VAL_DIM, inner);
        let mut out = g.op("Add", &[&out, &v_local], vec![]);
        if self.stride_conv.is_some() {
            // The bilinear ×2 upsample as two constant matrices: A_h · X · A_wᵀ.
            let rows = bilinear_matrix(inner[0], 2 * inner[0]);
            let cols = bilinear_matrix(inner[1], 2 * inner[1]);
            let a_h = g.floats("upsample_rows", vec![2 * inner[0] as i64, inner[0] as i64], &rows);
            let a_wt = g.floats("upsample_cols", vec![inner[1] as i64, 2 * inner[1] as i64], &crate::state::transpose_2d(&cols, 2 * inner[1], inner[1]));
            let wide = g.op("MatMul", &[&out, &a_wt], vec![]);
            out = g.op("MatMul", &[&a_h, &wide], vec![]);
        }
        let out = Activation::Gelu.to_onnx(g, &out);
        self.proj.to_onnx(g, &out)
    }
}

impl Attention2dDownsample<ConvAct> {
    fn to_onnx_on(&self, g: &mut Graph, x: &str, grid: [usize; 2]) -> Result<String> {
        let half = grid.map(|n| n.div_ceil(2));
        let local = plain_conv_onnx(g, x, &self.q.local);
        let pooled = g.op("AveragePool", &[x], vec![attr_ints("kernel_shape", &[1, 1]), attr_ints("strides", &[2, 2])]);
        let q = g.op("Add", &[&local, &pooled], vec![]);
        let q = self.q.proj.to_onnx(g, &q)?;
        let q = heads_onnx(g, &q, DOWN_KEY_DIM, true);
        let k = self.k.to_onnx(g, x)?;
        let k = heads_onnx(g, &k, DOWN_KEY_DIM, false);
        let v_planes = self.v.to_onnx(g, x)?;
        let v_local = self.v_local.to_onnx(g, &v_planes)?;
        let v = heads_onnx(g, &v_planes, DOWN_VAL_DIM, true);
        let s = scores_onnx(g, &q, &k, DOWN_KEY_DIM, &self.attention_biases, &self.attention_bias_idxs);
        let a = g.op("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let out = g.op("MatMul", &[&a, &v], vec![]);
        let out = planes_onnx(g, &out, HEADS * DOWN_VAL_DIM, half);
        let out = g.op("Add", &[&out, &v_local], vec![]);
        let out = Activation::Gelu.to_onnx(g, &out);
        self.proj.to_onnx(g, &out)
    }
}

impl ToOnnx for DeployEfficientFormerV2 {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let x = self.stem.conv1.to_onnx(g, images)?;
        let mut x = self.stem.conv2.to_onnx(g, &x)?;
        for (stage, grids) in self.stages.iter().zip(self.config.stage_grids()) {
            if let Some(d) = &stage.downsample {
                let out = d.conv.to_onnx(g, &x)?;
                x = match &d.attn {
                    Some(attn) => {
                        let a = attn.to_onnx_on(g, &x, grids.input)?;
                        g.op("Add", &[&a, &out], vec![])
                    }
                    None => out,
                };
            }
            for block in &stage.blocks {
                if let (Some(mixer), Some(ls1)) = (&block.token_mixer, &block.ls1) {
                    let a = mixer.to_onnx_on(g, &x, grids.blocks)?;
                    let a = ls1.planes_to_onnx(g, &a);
                    x = g.op("Add", &[&x, &a], vec![]);
                }
                let h = block.mlp.fc1.to_onnx(g, &x)?;
                let h = block.mlp.mid.to_onnx(g, &h)?;
                let m = block.mlp.fc2.to_onnx(g, &h)?;
                let m = block.ls2.planes_to_onnx(g, &m);
                x = g.op("Add", &[&x, &m], vec![]);
            }
        }
        let pooled = g.op("ReduceMean", &[&x], vec![attr_ints("axes", &[2, 3]), attr_int("keepdims", 0)]);
        let a = self.head.to_onnx(g, &pooled)?;
        let b = self.head_dist.to_onnx(g, &pooled)?;
        let sum = g.op("Add", &[&a, &b], vec![]);
        Ok(g.binary_scalar("Div", &sum, 2.0))
    }
}

impl ToOnnx for EfficientFormerV2 {
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

    /// A small model at 64² (stage grids 16, 8, 4, 2), `num_vit` attention blocks per late stage.
    fn small(num_vit: usize) -> EfficientFormerV2Config {
        EfficientFormerV2Config {
            img_size: 64,
            depths: vec![1, 1, 2, 2],
            embed_dims: vec![6, 8, 10, 12],
            mlp_ratios: vec![vec![4.0], vec![3.0], vec![4.0, 3.0], vec![4.0, 2.0]],
            num_vit,
            num_classes: 5,
            drop_path_rate: 0.0,
            ..EfficientFormerV2Config::s0()
        }
    }

    #[test]
    fn param_count_equals_the_built_models() {
        let device = Device::flex();
        for config in [small(1), small(2), small(0), EfficientFormerV2Config { img_size: 96, ..small(1) }, EfficientFormerV2Config::s0(), EfficientFormerV2Config::l()] {
            let model = config.init(&device).unwrap();
            assert_eq!(trainable_param_count(&model), config.param_count(), "{config:?}");
        }
        let keys = collect_state(&small(1).init(&device).unwrap());
        for key in ["stem.conv1.conv.weight", "stages.2.blocks.1.token_mixer.stride_conv.bn.running_var", "stages.3.downsample.attn.q.local.weight", "stages.3.blocks.1.ls1.gamma", "norm.num_batches_tracked"] {
            assert!(keys.contains(key), "{key}");
        }
        assert!(!keys.keys().any(|k| k.contains("attention_bias_idxs") || k.starts_with("stages.2.blocks.0.token_mixer")));
    }

    #[test]
    fn presets_match_the_published_params_and_macs() {
        // SPEC §4.8 (Snap README): S0 3.5M / 0.40 GMACs, S1 6.1M / 0.65, S2 12.6M / 1.25,
        // L 26.1M / 2.56 at 224², 1000 classes. timm counts 3.60M / 6.19M / 12.71M / 26.32M.
        let cases = [
            (EfficientFormerV2Config::s0(), 3.5e6, 3.60e6, 0.40),
            (EfficientFormerV2Config::s1(), 6.1e6, 6.19e6, 0.65),
            (EfficientFormerV2Config::s2(), 12.6e6, 12.71e6, 1.25),
            (EfficientFormerV2Config::l(), 26.1e6, 26.32e6, 2.56),
        ];
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
        for config in [small(1), small(2)] {
            let model = set_training(randomized(config.init(&device).unwrap(), 1.0, 21), false);
            let deploy = model.fuse().unwrap();
            let keys = collect_state(&deploy);
            assert!(!keys.keys().any(|k| k.contains("bn.") || k.contains("running_") || k.starts_with("norm.")), "{:?}", keys.keys().collect::<Vec<_>>());
            let images = standard_normal([2, 3, 64, 64], 22, &device);
            let want = host_f32(model.forward(images.clone()));
            let got = host_f32(deploy.forward(images));
            assert_near(&format!("{config:?}"), &got, &want, 1e-4, 1e-5);
        }
    }

    #[test]
    fn bad_configs_and_inputs_are_errors() {
        let device = Device::flex();
        let base = small(1);
        let bad = [
            EfficientFormerV2Config { img_size: 48, ..base.clone() }, // stage 2 grid 3×3: odd
            EfficientFormerV2Config { mlp_ratios: vec![vec![4.0], vec![4.0], vec![4.0], vec![4.0, 4.0]], ..base.clone() },
            EfficientFormerV2Config { depths: vec![1, 1, 2], ..base.clone() },
            EfficientFormerV2Config { norm_eps: 0.0, ..base.clone() },
            EfficientFormerV2Config { drop_path_rate: -0.1, ..base.clone() },
        ];
        for config in bad {
            let err = config.init(&device).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{config:?}: {err}");
        }
        // Without stage-2 attention an odd grid is fine (the downsampling attention rounds up).
        EfficientFormerV2Config { img_size: 48, num_vit: 0, ..base.clone() }.init(&device).unwrap();
        let model = base.init(&device).unwrap();
        let err = model.try_forward(Tensor::zeros([1, 3, 32, 32], &device)).unwrap_err();
        assert!(err.to_string().contains("32"), "{err}");
    }
}
