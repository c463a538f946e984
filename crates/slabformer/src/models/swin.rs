//! Swin family: Swin-T/S, PRepBN-Swin, SLAB-Swin, FLatten-Swin (SPEC §4.3).
//!
//! One model, with the norm and each stage's attention kind passed in. Structure: patch conv
//! (k = s = patch) → Norm → stages of Swin blocks `x + attn(norm1(x))` (attention inside shifted
//! or unshifted windows, see [`WindowGrid`]), `x + mlp(norm2(x))`, with patch merging between
//! stages → final Norm → token mean → head. 'S' stages use softmax window attention with a
//! relative position bias; 'L' stages use SLA or FLatten ([`LinearAttention`]) over windows of
//! `linear_window_size` (56 in SLAB, which makes each 224² 'L' map a single window).
//!
//! Two key layouts load without remapping ([`SwinLayout`]): the official Swin/SLAB code's and
//! timm's.

use burn::module::{Module, Param, RunningState};
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, Preset, check_images};
use crate::deploy::onnx::{Graph, ToOnnx};
use crate::plan::{Layer, Plan, Residual, StageEmbed, Step};
use crate::error::{Error, Result};
use crate::nn::attention::window::{MaskBuffer, WindowAttention, WindowGrid};
use crate::nn::attention::window_fast::{FastWindowAttention, FastWindowedLinear};
use crate::nn::conv::Source;
use crate::nn::linear::FastLinear;
use crate::nn::lower::ParamTable;
use crate::nn::mlp::FastMlp;
use crate::nn::norm::FastNorm;
use crate::nn::patch_merge::FastPatchMerging;
use crate::nn::pool::Pool;
use crate::nn::attention::{Attention, AttentionConfig, AttentionKind, FastAttention, LinearAttention};
use crate::nn::drop_path::DropPath;
use crate::nn::fuse::{ConvFold, fold_into_next_linear, fold_into_previous_conv};
use crate::nn::linear::linear;
use crate::nn::mlp::Mlp;
use crate::nn::norm::{Norm, NormKind};
use crate::nn::patch_embed::PatchEmbed;
use crate::nn::patch_merge::{DeployPatchMerging, PatchMerging};
use crate::nn::schedule::{Phase, PrepbnSchedule};

/// Whose state-dict keys the model carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwinLayout {
    /// The official Swin / SLAB code: `layers.{s}.downsample` at the END of stage s, the head
    /// `head`, and `relative_position_index` / `attn_mask` as persistent buffers.
    Official,
    /// timm 0.9.16: `layers.{s}.downsample` at the START of stage s (s ≥ 1), the head `head.fc`,
    /// and both buffers non-persistent (recomputed, not in the state dict).
    Timm,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwinConfig {
    /// Input (height, width); any multiple of the patch size (224², 384², 800×1216, …).
    pub img_size: [usize; 2],
    pub patch_size: usize,
    pub in_chans: usize,
    pub num_classes: usize,
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    /// Each stage's attention: `Softmax` is window attention, `Sla` / `Focused` linear attention.
    pub attention: Vec<AttentionKind>,
    /// Target window of the softmax stages.
    pub window_size: usize,
    /// Target window of the linear-attention stages.
    pub linear_window_size: usize,
    pub mlp_ratio: f64,
    pub qkv_bias: bool,
    pub norm: NormKind,
    /// Whether the patch embedding has a norm (every released config does).
    pub patch_norm: bool,
    pub drop_path_rate: f64,
    pub layout: SwinLayout,
}

pub(crate) const PRESETS: &[Preset<SwinConfig>] = &[
    Preset { name: "swin_tiny", summary: "Swin-T: LayerNorm, window attention", config: SwinConfig::swin_tiny },
    Preset { name: "swin_small", summary: "Swin-S: LayerNorm, window attention", config: SwinConfig::swin_small },
    Preset { name: "prepbn_swin_tiny", summary: "Swin-T with pure RepBN (T = 0)", config: SwinConfig::prepbn_swin_tiny },
    Preset { name: "prepbn_swin_small", summary: "Swin-S with PRepBN, T = 3e5", config: SwinConfig::prepbn_swin_small },
    Preset { name: "slab_swin_tiny", summary: "SLAB-Swin-T: PRepBN (T = 6e4), SLA in stages 1–2 (LLSS)", config: SwinConfig::slab_swin_tiny },
    Preset { name: "slab_swin_small", summary: "SLAB-Swin-S: PRepBN (T = 6e4), SLA in stages 1–2 (LLSS)", config: SwinConfig::slab_swin_small },
    Preset { name: "flatten_swin_tiny", summary: "FLatten-Swin-T: LayerNorm, focused linear attention in stages 1–2 (LLSS)", config: SwinConfig::flatten_swin_tiny },
];

impl SwinConfig {
    fn swin(depths: Vec<usize>, drop_path_rate: f64) -> Self {
        Self {
            img_size: [224, 224],
            patch_size: 4,
            in_chans: 3,
            num_classes: 1000,
            embed_dim: 96,
            depths,
            num_heads: vec![3, 6, 12, 24],
            attention: vec![AttentionKind::Softmax; 4],
            window_size: 7,
            linear_window_size: 56,
            mlp_ratio: 4.0,
            qkv_bias: true,
            norm: NormKind::layer_norm(1e-5),
            patch_norm: true,
            drop_path_rate,
            layout: SwinLayout::Official,
        }
    }

    pub fn swin_tiny() -> Self {
        Self::swin(vec![2, 2, 6, 2], 0.2)
    }

    pub fn swin_small() -> Self {
        Self::swin(vec![2, 2, 18, 2], 0.3)
    }

    /// `swin_t_prepbn.yaml`: pure RepBN, drop-path 0.1.
    pub fn prepbn_swin_tiny() -> Self {
        Self { norm: NormKind::repbn(), drop_path_rate: 0.1, ..Self::swin_tiny() }
    }

    /// Not released; Table A1 gives T = 3e5 for Swin-S (SPEC §2.5).
    pub fn prepbn_swin_small() -> Self {
        Self { norm: NormKind::prepbn(1e-5, 300_000), ..Self::swin_small() }
    }

    /// The 'LLSS' pattern of SLAB/FLatten: linear attention in stages 1–2, window softmax after.
    fn llss(base: Self, linear: AttentionKind) -> Self {
        let attention = vec![linear, linear, AttentionKind::Softmax, AttentionKind::Softmax];
        Self { attention, ..base }
    }

    pub fn slab_swin_tiny() -> Self {
        Self { norm: NormKind::prepbn(1e-5, 60_000), ..Self::llss(Self::swin_tiny(), AttentionKind::sla()) }
    }

    pub fn slab_swin_small() -> Self {
        Self { norm: NormKind::prepbn(1e-5, 60_000), ..Self::llss(Self::swin_small(), AttentionKind::sla()) }
    }

    pub fn flatten_swin_tiny() -> Self {
        Self::llss(Self::swin_tiny(), AttentionKind::focused())
    }

    pub fn num_stages(&self) -> usize {
        self.depths.len()
    }

    /// Token map (rows, cols) after patch embedding.
    pub fn grid(&self) -> [usize; 2] {
        self.img_size.map(|s| s / self.patch_size)
    }

    /// Stage `s`'s token map: each patch merging halves it, rounding up.
    pub fn stage_resolution(&self, s: usize) -> [usize; 2] {
        (0..s).fold(self.grid(), |r, _| PatchMerging::output_resolution(r))
    }

    pub fn stage_dim(&self, s: usize) -> usize {
        self.embed_dim << s
    }

    /// Width of the last stage, which the head reads.
    pub fn num_features(&self) -> usize {
        self.stage_dim(self.num_stages() - 1)
    }

    pub fn mlp_hidden(&self, dim: usize) -> usize {
        (dim as f64 * self.mlp_ratio) as usize
    }

    /// Block `i` of stage `s`: its windows (odd blocks shift) for the stage's attention kind.
    pub fn block_grid(&self, s: usize, i: usize) -> Result<WindowGrid> {
        let target = if self.attention[s].needs_grid() { self.linear_window_size } else { self.window_size };
        WindowGrid::new(self.stage_resolution(s), target, i % 2 == 1)
    }

    /// Stochastic depth of the `k`-th block overall: linear from 0 to `drop_path_rate`
    /// (`torch.linspace(0, rate, total)`).
    pub fn block_drop_path_rate(&self, k: usize) -> f64 {
        let total: usize = self.depths.iter().sum();
        if total > 1 { self.drop_path_rate * k as f64 / (total - 1) as f64 } else { 0.0 }
    }

    /// The attention of a stage's linear kind over an M×M window.
    fn linear_attention_config(&self, s: usize, window: usize) -> AttentionConfig {
        AttentionConfig {
            dim: self.stage_dim(s),
            num_heads: self.num_heads[s],
            qkv_bias: self.qkv_bias,
            kind: self.attention[s],
            grid: Some([window, window]),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let err = |msg: String| Err(Error::Config(msg));
        let p = self.patch_size;
        if p == 0 || self.img_size.iter().any(|&s| s == 0 || !s.is_multiple_of(p)) {
            return err(format!("img_size {:?} must be positive multiples of patch_size {p}", self.img_size));
        }
        if self.in_chans == 0 || self.num_classes == 0 || self.embed_dim == 0 {
            return err("in_chans, num_classes and embed_dim must be > 0".into());
        }
        let stages = self.num_stages();
        if stages == 0 || self.num_heads.len() != stages || self.attention.len() != stages {
            return err(format!(
                "depths ({}), num_heads ({}) and attention ({}) need one entry per stage, at least one stage",
                stages,
                self.num_heads.len(),
                self.attention.len()
            ));
        }
        if self.depths.contains(&0) {
            return err(format!("every stage needs a block, got depths {:?}", self.depths));
        }
        if self.window_size == 0 || self.linear_window_size == 0 {
            return err("window sizes must be > 0".into());
        }
        if !(self.mlp_ratio.is_finite() && self.mlp_ratio > 0.0) {
            return err(format!("mlp_ratio must be > 0, got {}", self.mlp_ratio));
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return err(format!("drop_path_rate must lie in [0, 1), got {}", self.drop_path_rate));
        }
        self.norm.validate()?;
        for s in 0..stages {
            let (dim, heads) = (self.stage_dim(s), self.num_heads[s]);
            match self.attention[s] {
                AttentionKind::Softmax => {
                    if heads == 0 || !dim.is_multiple_of(heads) {
                        return err(format!("stage {s}: dim {dim} is not divisible by num_heads {heads}"));
                    }
                }
                AttentionKind::Sla { .. } | AttentionKind::Focused { .. } => {
                    let window = self.block_grid(s, 0)?.window;
                    self.linear_attention_config(s, window).validate()?;
                }
                AttentionKind::ReluL { .. } => {
                    return err(format!("stage {s}: Swin stages take softmax window attention, SLA or FLatten, not ReLU attention"));
                }
            }
        }
        Ok(())
    }

    /// Trainable parameters, from the architecture alone (SPEC §7.2 item 14 counting rules).
    pub fn param_count(&self) -> usize {
        let (c, norm) = (self.embed_dim, &self.norm);
        let mut count = PatchEmbed::param_count(self.in_chans, c, self.patch_size) + if self.patch_norm { norm.param_count(c) } else { 0 };
        for s in 0..self.num_stages() {
            let dim = self.stage_dim(s);
            for i in 0..self.depths[s] {
                let window = self.block_grid(s, i).map(|g| g.window).unwrap_or(0);
                let attention = match self.attention[s] {
                    AttentionKind::Softmax => WindowAttention::param_count(dim, self.num_heads[s], window, self.qkv_bias),
                    _ => self.linear_attention_config(s, window).param_count(),
                };
                count += 2 * norm.param_count(dim) + attention + Mlp::param_count(dim, self.mlp_hidden(dim));
            }
            if s + 1 < self.num_stages() {
                count += PatchMerging::param_count(dim, norm);
            }
        }
        let f = self.num_features();
        count + norm.param_count(f) + f * self.num_classes + self.num_classes
    }

    /// Multiply-accumulates of one image's forward pass (the papers' "FLOPs"): the patch conv,
    /// every window's attention (padding included), the MLPs, the merges and the head.
    pub fn macs(&self) -> u64 {
        let [h, w] = self.grid();
        let c = self.embed_dim;
        let mut macs = (h * w * c * self.in_chans * self.patch_size * self.patch_size) as u64;
        for s in 0..self.num_stages() {
            let (dim, [h, w]) = (self.stage_dim(s), self.stage_resolution(s));
            for i in 0..self.depths[s] {
                let Ok(grid) = self.block_grid(s, i) else { continue };
                let per_window = match self.attention[s] {
                    AttentionKind::Softmax => WindowAttention::macs_per_window(dim, grid.window),
                    _ => self.linear_attention_config(s, grid.window).macs(grid.window_tokens()),
                };
                macs += grid.num_windows() as u64 * per_window + 2 * (h * w * dim * self.mlp_hidden(dim)) as u64;
            }
            if s + 1 < self.num_stages() {
                macs += PatchMerging::macs(dim, [h, w]);
            }
        }
        macs + (self.num_features() * self.num_classes) as u64
    }

    pub fn init(&self, device: &Device) -> Result<SwinTransformer> {
        self.validate()?;
        let persistent = self.layout == SwinLayout::Official;
        let last = self.num_stages() - 1;
        let mut layers = Vec::with_capacity(self.num_stages());
        let mut k = 0;
        for s in 0..=last {
            let dim = self.stage_dim(s);
            let mut blocks = Vec::with_capacity(self.depths[s]);
            for i in 0..self.depths[s] {
                let grid = self.block_grid(s, i)?;
                let attn = match self.attention[s] {
                    AttentionKind::Softmax => SwinAttention::Window(WindowAttention::new(dim, self.num_heads[s], grid.window, self.qkv_bias, persistent, device)),
                    _ => match self.linear_attention_config(s, grid.window).init(device) {
                        Attention::Linear(a) => SwinAttention::Linear(a),
                        Attention::Dot(_) => unreachable!("a linear kind builds linear attention"),
                    },
                };
                blocks.push(SwinBlock {
                    norm1: self.norm.init(dim, device),
                    attn,
                    drop_path: DropPath::new(self.block_drop_path_rate(k)),
                    norm2: self.norm.init(dim, device),
                    mlp: Mlp::new(dim, self.mlp_hidden(dim), device),
                    attn_mask: grid.mask_buffer(persistent, device),
                    grid,
                });
                k += 1;
            }
            let (downsample, merge_first, merged) = match self.layout {
                SwinLayout::Official => ((s < last).then(|| PatchMerging::new(dim, &self.norm, device)), false, self.stage_resolution(s)),
                SwinLayout::Timm if s > 0 => (Some(PatchMerging::new(self.stage_dim(s - 1), &self.norm, device)), true, self.stage_resolution(s - 1)),
                SwinLayout::Timm => (None, true, self.stage_resolution(s)),
            };
            layers.push(SwinStage { blocks, downsample, merge_first, merged_resolution: merged });
        }
        let c = self.embed_dim;
        let f = self.num_features();
        let head = linear(f, self.num_classes, true, device);
        Ok(SwinTransformer {
            patch_embed: SwinPatchEmbed {
                proj: PatchEmbed::new(self.in_chans, c, self.patch_size, device).proj,
                norm: self.patch_norm.then(|| self.norm.init(c, device)),
            },
            layers,
            norm: self.norm.init(f, device),
            head: match self.layout {
                SwinLayout::Official => SwinHead::Linear(head),
                SwinLayout::Timm => SwinHead::Timm(ClassifierHead { fc: head }),
            },
            config: self.clone(),
        })
    }
}

/// Patch conv, then the norm over the tokens.
#[derive(Module, Debug)]
pub struct SwinPatchEmbed {
    pub proj: Conv2d,
    pub norm: Option<Norm>,
}

impl SwinPatchEmbed {
    /// (B, in_chans, H, W) → (B, H/p · W/p, C).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<3> {
        let x = PatchEmbed { proj: self.proj.clone() }.forward(images); // (B, N, C)
        match &self.norm {
            Some(norm) => norm.forward(x),
            None => x,
        }
    }
}

/// A Swin block's token mixer; adds no component to parameter keys.
#[derive(Module, Debug)]
pub enum SwinAttention {
    Window(WindowAttention),
    Linear(LinearAttention),
}

impl SwinAttention {
    /// Windows (B·nW, M², C) → (B·nW, M², C). The shifted-window mask applies to softmax
    /// attention only: the official SLA ignores it.
    pub fn forward(&self, windows: Tensor<3>, mask: Option<Tensor<3>>) -> Tensor<3> {
        match self {
            SwinAttention::Window(a) => a.forward(windows, mask),
            SwinAttention::Linear(a) => a.forward(windows),
        }
    }

    /// The fuse rule of a preceding norm: folded into `qkv`.
    pub fn fold_input(&self, a: Tensor<1>, b: Tensor<1>) -> Self {
        match self {
            SwinAttention::Window(attn) => SwinAttention::Window(attn.fold_input(a, b)),
            SwinAttention::Linear(attn) => SwinAttention::Linear(LinearAttention { qkv: fold_into_next_linear(&attn.qkv, a, b), ..attn.clone() }),
        }
    }

    fn qkv_mut(&mut self) -> &mut Linear {
        match self {
            SwinAttention::Window(a) => &mut a.qkv,
            SwinAttention::Linear(a) => &mut a.qkv,
        }
    }

    fn proj_mut(&mut self) -> &mut Linear {
        match self {
            SwinAttention::Window(a) => &mut a.proj,
            SwinAttention::Linear(a) => &mut a.proj,
        }
    }
}

/// Attention over the block's windows of `x` (B, H·W, C), padding with `pad` (zeros if none).
fn mix_tokens(attn: &SwinAttention, mask: Option<&MaskBuffer>, grid: &WindowGrid, pad: Option<&Tensor<1>>, x: Tensor<3>) -> Tensor<3> {
    let mask = mask.map(MaskBuffer::tensor);
    grid.apply(x, pad, |windows| attn.forward(windows, mask))
}

#[derive(Module, Debug)]
pub struct SwinBlock {
    pub norm1: Norm,
    pub attn: SwinAttention,
    pub drop_path: DropPath,
    pub norm2: Norm,
    pub mlp: Mlp,
    /// Shifted blocks only.
    pub attn_mask: Option<MaskBuffer>,
    #[module(skip)]
    pub grid: WindowGrid,
}

impl SwinBlock {
    /// (B, H·W, C) → (B, H·W, C).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let mixed = mix_tokens(&self.attn, self.attn_mask.as_ref(), &self.grid, None, self.norm1.forward(x.clone()));
        let x = x.add(self.drop_path.forward(mixed));
        x.clone().add(self.drop_path.forward(self.mlp.forward(self.norm2.forward(x))))
    }

    /// norm1 folded into the attention's `qkv`, norm2 into `mlp.fc1`. A padded map is padded with
    /// the token the folded norm1 maps to zero, `−b/a`.
    fn fuse(&self) -> Result<DeploySwinBlock> {
        let (a1, b1) = self.norm1.eval_affine()?;
        let (a2, b2) = self.norm2.eval_affine()?;
        let pad = if self.grid.pads() {
            check_invertible(&a1, "a block's norm1 (to pad its windows)")?;
            Some(RunningState::new(b1.clone().neg().div(a1.clone())))
        } else {
            None
        };
        Ok(DeploySwinBlock {
            pad,
            attn: self.attn.fold_input(a1, b1),
            mlp: Mlp { fc1: fold_into_next_linear(&self.mlp.fc1, a2, b2), fc2: self.mlp.fc2.clone() },
            attn_mask: self.attn_mask.clone(),
            grid: self.grid,
        })
    }
}

/// One stage: its blocks, and the patch merging that the layout places in it, before the blocks
/// (timm) or after them (official).
#[derive(Module, Debug)]
pub struct SwinStage {
    pub blocks: Vec<SwinBlock>,
    pub downsample: Option<PatchMerging>,
    #[module(skip)]
    pub merge_first: bool,
    /// The map `downsample` reads.
    #[module(skip)]
    pub merged_resolution: [usize; 2],
}

impl SwinStage {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let merge = |x: Tensor<3>| match &self.downsample {
            Some(m) => m.forward(x, self.merged_resolution), // (B, ⌈H/2⌉·⌈W/2⌉, 2C)
            None => x,
        };
        let x = if self.merge_first { merge(x) } else { x };
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        if self.merge_first { x } else { merge(x) }
    }
}

/// timm's classifier head (`head.fc`).
#[derive(Module, Debug)]
pub struct ClassifierHead {
    pub fc: Linear,
}

/// The head Linear, under `head` (official) or `head.fc` (timm); adds no key component itself.
#[derive(Module, Debug)]
pub enum SwinHead {
    Linear(Linear),
    Timm(ClassifierHead),
}

impl SwinHead {
    pub fn linear(&self) -> &Linear {
        match self {
            SwinHead::Linear(l) => l,
            SwinHead::Timm(h) => &h.fc,
        }
    }

    fn with_linear(&self, fc: Linear) -> Self {
        match self {
            SwinHead::Linear(_) => SwinHead::Linear(fc),
            SwinHead::Timm(_) => SwinHead::Timm(ClassifierHead { fc }),
        }
    }

    /// Tokens (B, N, C) → logits (B, classes) from the token mean.
    fn forward(&self, x: Tensor<3>) -> Tensor<2> {
        self.linear().forward(Pool::Mean.forward(x)) // (B, C) → (B, classes)
    }
}

#[derive(Module, Debug)]
pub struct SwinTransformer {
    pub patch_embed: SwinPatchEmbed,
    pub layers: Vec<SwinStage>,
    pub norm: Norm,
    pub head: SwinHead,
    #[module(skip)]
    pub config: SwinConfig,
}

/// Where [`SwinTransformer::fuse_with`] puts the final norm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinalNormFold {
    /// Forward into the head (mean pooling commutes with the per-channel affine map).
    Head,
    /// Backwards into the last stage, as the official `SwinTransformer.merge_bn` (SPEC §2.8 F3).
    LastStage,
}

/// How to fuse: exact (the default), or as the official merge sequence does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwinFuse {
    pub final_norm: FinalNormFold,
    /// Reproduce the official `PatchEmbed.merge_bn`, which drops RepBN's `α·c` bias term.
    pub official_patch_embed: bool,
}

impl SwinFuse {
    pub const EXACT: Self = Self { final_norm: FinalNormFold::Head, official_patch_embed: false };
    /// The official `eval.py` merge, bias omission included: reproduces official fused states.
    pub const OFFICIAL: Self = Self { final_norm: FinalNormFold::LastStage, official_patch_embed: true };
}

impl SwinTransformer {
    /// Images (B, in_chans, H, W) → logits (B, num_classes). The input must have the configured
    /// size; see [`try_forward`](Self::try_forward) for a checked call.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.patch_embed.forward(images); // (B, N, C)
        let x = self.layers.iter().fold(x, |x, stage| stage.forward(x)); // (B, N_last, 8C)
        self.head.forward(self.norm.forward(x))
    }

    /// [`forward`](Self::forward) after checking the input is (B > 0, in_chans, H, W).
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        check_images("swin transformer", &self.config, images.dims())?;
        Ok(self.forward(images))
    }

    /// The phase the first PRepBN layer will compute next (its λ is the one training logs).
    pub fn prepbn_phase(&self) -> Option<Phase> {
        match &self.layers.first()?.blocks.first()?.norm1 {
            Norm::LinearNorm(n) => Some(n.next_phase()),
            _ => None,
        }
    }

    /// The exact deploy form ([`SwinFuse::EXACT`]).
    pub fn fuse(&self) -> Result<DeploySwin> {
        self.fuse_with(SwinFuse::EXACT)
    }

    /// The norm-free deploy form: block norms folded into `qkv` / `fc1`, each merge's norm into
    /// its `reduction` (which gains a bias), the patch-embed norm into the conv, the final norm
    /// into the head or the last stage. Needs RepBN/PRepBN norms; lives on the device without
    /// autodiff.
    pub fn fuse_with(&self, how: SwinFuse) -> Result<DeploySwin> {
        let model = self.valid();
        let proj = match &model.patch_embed.norm {
            Some(norm) => {
                let (a, b) = norm.eval_affine()?;
                let mode = if how.official_patch_embed { ConvFold::OfficialPatchEmbed { alpha: repbn_alpha(norm) } } else { ConvFold::Exact };
                fold_into_previous_conv(&model.patch_embed.proj, a, b, mode)
            }
            None => model.patch_embed.proj.clone(),
        };
        let mut layers = Vec::with_capacity(model.layers.len());
        for stage in &model.layers {
            let downsample = match &stage.downsample {
                Some(m) => Some(m.fuse()?),
                None => None,
            };
            let blocks = stage.blocks.iter().map(SwinBlock::fuse).collect::<Result<Vec<_>>>()?;
            layers.push(DeploySwinStage { blocks, downsample, merge_first: stage.merge_first, merged_resolution: stage.merged_resolution });
        }
        let (a, b) = model.norm.eval_affine()?;
        let head = match how.final_norm {
            FinalNormFold::Head => model.head.with_linear(fold_into_next_linear(model.head.linear(), a, b)),
            FinalNormFold::LastStage => {
                fold_into_last_stage(&mut layers, a, b)?;
                model.head.with_linear(model.head.linear().clone())
            }
        };
        Ok(DeploySwin { patch_embed: PatchEmbed { proj }, layers, head, config: model.config.clone() })
    }
}

/// RepBN's α of a foldable norm (for the official patch-embed merge).
fn repbn_alpha(norm: &Norm) -> f32 {
    let alpha = match norm {
        Norm::RepBN(n) => n.alpha.val(),
        Norm::LinearNorm(n) => n.norm2.alpha.val(),
        Norm::LayerNorm(_) => return 0.0,
    };
    alpha.into_scalar()
}

/// F3 (SPEC §2.8): the final norm `a ⊙ r + b` folded into the last stage's residual stream. The
/// merge feeding the stage and every branch output (attn.proj, mlp.fc2) are scaled by `a`, the
/// last fc2 also adds `b`; the inputs that read the stream (qkv, fc1) are scaled by 1/a.
fn fold_into_last_stage(layers: &mut [DeploySwinStage], a: Tensor<1>, b: Tensor<1>) -> Result<()> {
    check_invertible(&a, "the final norm (fold it into the head instead)")?;
    let last = layers.len() - 1;
    let merge_first = layers[last].merge_first;
    let merge = match (merge_first, last) {
        (true, _) => layers[last].downsample.as_mut(),
        (false, 0) => None,
        (false, _) => layers[last - 1].downsample.as_mut(),
    }
    .ok_or_else(|| Error::Config("folding the final norm into the last stage needs a patch merging before it (two stages or more)".into()))?;
    merge.reduction = scale_outputs(&merge.reduction, a.clone(), None);
    let inverse = a.clone().recip();
    let blocks = &mut layers[last].blocks;
    let depth = blocks.len();
    for (i, block) in blocks.iter_mut().enumerate() {
        let proj = scale_outputs(block.attn.proj_mut(), a.clone(), None);
        *block.attn.proj_mut() = proj;
        let qkv = scale_inputs(block.attn.qkv_mut(), inverse.clone());
        *block.attn.qkv_mut() = qkv;
        block.mlp.fc2 = scale_outputs(&block.mlp.fc2, a.clone(), (i + 1 == depth).then(|| b.clone()));
        block.mlp.fc1 = scale_inputs(&block.mlp.fc1, inverse.clone());
        block.pad = block.pad.take().map(|pad| RunningState::new(pad.value().mul(a.clone()))); // the stream it stands in for is scaled
    }
    Ok(())
}

/// Dividing by a norm's scale `a` needs `|a_c| ≥ 1e-8` in every channel.
fn check_invertible(a: &Tensor<1>, what: &str) -> Result<()> {
    let smallest: f32 = a.clone().abs().min().into_scalar();
    if smallest.is_nan() || smallest < 1e-8 {
        return Err(Error::Config(format!("{what}: a channel has |a| = {smallest:e} < 1e-8")));
    }
    Ok(())
}

/// `y ↦ a ⊙ y (+ shift)` after a Linear: its output columns (burn layout `[in, out]`) scaled.
fn scale_outputs(linear: &Linear, a: Tensor<1>, shift: Option<Tensor<1>>) -> Linear {
    let weight = linear.weight.val();
    let [_, d_out] = weight.dims();
    let bias = linear.bias.as_ref().map(|c| c.val().mul(a.clone()));
    let bias = match (bias, shift) {
        (Some(c), Some(s)) => Some(c.add(s)),
        (c, s) => c.or(s),
    };
    Linear { weight: Param::from_tensor(weight.mul(a.reshape([1, d_out]))), bias: bias.map(Param::from_tensor) }
}

/// `x ↦ Linear(s ⊙ x)`: its input rows scaled, bias unchanged.
fn scale_inputs(linear: &Linear, s: Tensor<1>) -> Linear {
    let weight = linear.weight.val();
    let [d_in, _] = weight.dims();
    Linear { weight: Param::from_tensor(weight.mul(s.reshape([d_in, 1]))), bias: linear.bias.clone() }
}

/// A block with its norms folded away: `x + attn(x)`, `x + mlp(x)`.
#[derive(Module, Debug)]
pub struct DeploySwinBlock {
    /// What padded windows are filled with (maps that windows do not divide only): it comes from
    /// the trained norm, so it is a buffer of the deploy model's state (`….pad`).
    pub pad: Option<RunningState<Tensor<1>>>,
    pub attn: SwinAttention,
    pub mlp: Mlp,
    pub attn_mask: Option<MaskBuffer>,
    #[module(skip)]
    pub grid: WindowGrid,
}

impl DeploySwinBlock {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let pad = self.pad.as_ref().map(RunningState::value);
        let x = x.clone().add(mix_tokens(&self.attn, self.attn_mask.as_ref(), &self.grid, pad.as_ref(), x));
        x.clone().add(self.mlp.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct DeploySwinStage {
    pub blocks: Vec<DeploySwinBlock>,
    pub downsample: Option<DeployPatchMerging>,
    #[module(skip)]
    pub merge_first: bool,
    #[module(skip)]
    pub merged_resolution: [usize; 2],
}

impl DeploySwinStage {
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let merge = |x: Tensor<3>| match &self.downsample {
            Some(m) => m.forward(x, self.merged_resolution),
            None => x,
        };
        let x = if self.merge_first { merge(x) } else { x };
        let x = self.blocks.iter().fold(x, |x, block| block.forward(x));
        if self.merge_first { x } else { merge(x) }
    }
}

/// The norm-free deploy model made by [`SwinTransformer::fuse_with`].
#[derive(Module, Debug)]
pub struct DeploySwin {
    pub patch_embed: PatchEmbed,
    pub layers: Vec<DeploySwinStage>,
    pub head: SwinHead,
    #[module(skip)]
    pub config: SwinConfig,
}

impl DeploySwin {
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.patch_embed.forward(images); // (B, N, C)
        let x = self.layers.iter().fold(x, |x, stage| stage.forward(x));
        self.head.forward(x)
    }

    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        check_images("swin transformer", &self.config, images.dims())?;
        Ok(self.forward(images))
    }
}

impl ImageConfig for SwinConfig {
    fn input_size(&self) -> [usize; 2] {
        self.img_size
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
        SwinConfig::validate(self)
    }
}

impl ImageClassifier for SwinTransformer {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ImageClassifier for DeploySwin {
    fn image_config(&self) -> &dyn ImageConfig {
        &self.config
    }
    fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        self.forward(images)
    }
}

impl ModelFamily for SwinTransformer {
    type Config = SwinConfig;
    type Deploy = DeploySwin;

    fn presets() -> &'static [Preset<SwinConfig>] {
        PRESETS
    }
    fn init(config: &SwinConfig, device: &Device) -> Result<Self> {
        config.init(device)
    }
    fn config(&self) -> &SwinConfig {
        &self.config
    }
    fn param_count(config: &SwinConfig) -> usize {
        config.param_count()
    }
    fn macs(config: &SwinConfig) -> u64 {
        config.macs()
    }
    fn fuse(&self) -> Result<DeploySwin> {
        SwinTransformer::fuse(self)
    }
    fn prepbn_phase(&self) -> Option<Phase> {
        SwinTransformer::prepbn_phase(self)
    }
    fn prepbn_schedule(config: &mut SwinConfig) -> Option<&mut PrepbnSchedule> {
        match &mut config.norm {
            NormKind::Prepbn { schedule, .. } => Some(schedule),
            _ => None,
        }
    }
    fn tagged(config: &SwinConfig) -> AnyConfig {
        AnyConfig::Swin(config.clone())
    }
    fn config_of(any: &AnyConfig) -> Option<&SwinConfig> {
        match any {
            AnyConfig::Swin(c) => Some(c),
            _ => None,
        }
    }
    fn lower(&self) -> Result<Plan> {
        let mut table = ParamTable::for_module(self);
        let embed = StageEmbed::lower(&self.patch_embed.proj, self.patch_embed.norm.as_ref(), None, Source::Planes, self.config.img_size, &mut table)?;
        let stages = self.layers.iter().map(|s| (&s.blocks[..], s.downsample.as_ref(), s.merge_first, s.merged_resolution));
        let block = |b: &SwinBlock, rate: f64, table: &mut ParamTable| -> Result<[Step; 2]> {
            let norm1 = FastNorm::lower(&b.norm1, table)?;
            let attn = lower_attention(&b.attn, &b.grid, b.attn_mask.as_ref(), None, table)?;
            let norm2 = FastNorm::lower(&b.norm2, table)?;
            let mlp = Layer::Mlp(FastMlp::lower(&b.mlp, table)?);
            Ok([Step::Residual(Residual { norm: Some(norm1), layer: attn, drop_path: rate }), Step::Residual(Residual { norm: Some(norm2), layer: mlp, drop_path: rate })])
        };
        let merge = |m: &PatchMerging, resolution, table: &mut ParamTable| FastPatchMerging::lower(m, resolution, table);
        let mut steps = lower_stages(&self.config, embed, stages, block, merge, &mut table)?;
        steps.push(Step::Norm(FastNorm::lower(&self.norm, &mut table)?));
        steps.push(Step::Pool(Pool::Mean));
        steps.push(Step::Head(FastLinear::lower(self.head.linear(), &mut table)?));
        Ok(Plan { table, steps })
    }
    fn lower_deploy(deploy: &DeploySwin) -> Result<Plan> {
        let mut table = ParamTable::for_module(deploy);
        let embed = StageEmbed::lower(&deploy.patch_embed.proj, None, None, Source::Planes, deploy.config.img_size, &mut table)?;
        let stages = deploy.layers.iter().map(|s| (&s.blocks[..], s.downsample.as_ref(), s.merge_first, s.merged_resolution));
        let block = |b: &DeploySwinBlock, _: f64, table: &mut ParamTable| -> Result<[Step; 2]> {
            let pad = b.pad.as_ref().map(RunningState::value);
            let attn = lower_attention(&b.attn, &b.grid, b.attn_mask.as_ref(), pad.as_ref(), table)?;
            let mlp = Layer::Mlp(FastMlp::lower(&b.mlp, table)?);
            Ok([Step::Residual(Residual { norm: None, layer: attn, drop_path: 0.0 }), Step::Residual(Residual { norm: None, layer: mlp, drop_path: 0.0 })])
        };
        let merge = |m: &DeployPatchMerging, resolution, table: &mut ParamTable| FastPatchMerging::lower_deploy(m, resolution, table);
        let mut steps = lower_stages(&deploy.config, embed, stages, block, merge, &mut table)?;
        steps.push(Step::Pool(Pool::Mean));
        steps.push(Step::Head(FastLinear::lower(deploy.head.linear(), &mut table)?));
        Ok(Plan { table, steps })
    }
}

// ---- The fast path: the model lowered into a plan (`crate::plan`) in the order the forward
// runs it: the patch embedding as a stage embedding (conv, patch norm; no position embedding),
// per stage its blocks' attention and MLP residuals with the patch merging before (timm) or
// after (official) them, then (unfused models) the final norm, the token mean and the head.

/// A block's token mixer as a residual layer: window attention for softmax stages; for 'L'
/// stages the existing linear attention where the window is the whole map (224²), linear
/// attention over the windows otherwise.
fn lower_attention(attn: &SwinAttention, grid: &WindowGrid, mask: Option<&MaskBuffer>, pad: Option<&Tensor<1>>, table: &mut ParamTable) -> Result<Layer> {
    Ok(match attn {
        SwinAttention::Window(a) => Layer::WindowAttention(FastWindowAttention::lower(a, *grid, mask, pad, table)?),
        SwinAttention::Linear(a) if grid.is_one_window() => Layer::attention(FastAttention::lower(&Attention::Linear(a.clone()), table)?, table),
        SwinAttention::Linear(a) => Layer::WindowedLinear(FastWindowedLinear::lower(a, *grid, pad, table)?),
    })
}

/// The embedding, then every stage's steps; `stages` yields (blocks, downsample, merge first,
/// the map the downsample reads).
fn lower_stages<'a, B: 'a, M: 'a>(
    config: &SwinConfig,
    embed: StageEmbed,
    stages: impl Iterator<Item = (&'a [B], Option<&'a M>, bool, [usize; 2])>,
    block: impl Fn(&B, f64, &mut ParamTable) -> Result<[Step; 2]>,
    merge: impl Fn(&M, [usize; 2], &mut ParamTable) -> Result<FastPatchMerging>,
    table: &mut ParamTable,
) -> Result<Vec<Step>> {
    let mut steps = vec![Step::Stage(embed)];
    let mut k = 0;
    for (blocks, downsample, merge_first, resolution) in stages {
        let merge_step = |table: &mut ParamTable| downsample.map(|m| merge(m, resolution, table).map(Step::Merge)).transpose();
        if merge_first {
            steps.extend(merge_step(table)?);
        }
        for b in blocks {
            steps.extend(block(b, config.block_drop_path_rate(k), table)?);
            k += 1;
        }
        if !merge_first {
            steps.extend(merge_step(table)?);
        }
    }
    Ok(steps)
}

// ---- ONNX: the graph walks the same modules as the forwards.

impl ToOnnx for SwinPatchEmbed {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let x = PatchEmbed { proj: self.proj.clone() }.to_onnx(g, images)?; // (B, N, C)
        match &self.norm {
            Some(norm) => norm.to_onnx(g, &x),
            None => Ok(x),
        }
    }
}

impl SwinAttention {
    fn to_onnx(&self, g: &mut Graph, windows: &str, mask: Option<&MaskBuffer>) -> Result<String> {
        match self {
            SwinAttention::Window(a) => a.to_onnx(g, windows, mask.map(MaskBuffer::tensor)),
            SwinAttention::Linear(a) => a.to_onnx(g, windows),
        }
    }

    fn dim(&self) -> usize {
        match self {
            SwinAttention::Window(a) => a.dim(),
            SwinAttention::Linear(a) => a.qkv.weight.dims()[0],
        }
    }
}

/// [`mix_tokens`] in the graph.
fn mix_tokens_onnx(g: &mut Graph, attn: &SwinAttention, mask: Option<&MaskBuffer>, grid: &WindowGrid, pad: Option<&Tensor<1>>, x: &str) -> Result<String> {
    grid.to_onnx(g, x, attn.dim(), pad, |g, windows| attn.to_onnx(g, windows, mask))
}

impl ToOnnx for SwinBlock {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let normed = self.norm1.to_onnx(g, x)?;
        let mixed = mix_tokens_onnx(g, &self.attn, self.attn_mask.as_ref(), &self.grid, None, &normed)?;
        let x = g.op("Add", &[x, &mixed], vec![]);
        let normed = self.norm2.to_onnx(g, &x)?;
        let m = self.mlp.to_onnx(g, &normed)?;
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

impl ToOnnx for DeploySwinBlock {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let pad = self.pad.as_ref().map(RunningState::value);
        let mixed = mix_tokens_onnx(g, &self.attn, self.attn_mask.as_ref(), &self.grid, pad.as_ref(), x)?;
        let x = g.op("Add", &[x, &mixed], vec![]);
        let m = self.mlp.to_onnx(g, &x)?;
        Ok(g.op("Add", &[&x, &m], vec![]))
    }
}

/// A stage as ONNX, trained or deploy form: `merge` (the stage's patch merging; none leaves
/// the tokens as they are) before the blocks in timm's layout, after them in the official one.
fn stage_to_onnx<B: ToOnnx>(g: &mut Graph, x: &str, blocks: &[B], merge_first: bool, merge: impl Fn(&mut Graph, &str) -> Result<String>) -> Result<String> {
    let mut x = if merge_first { merge(g, x)? } else { x.to_string() };
    for block in blocks {
        x = block.to_onnx(g, &x)?;
    }
    if merge_first { Ok(x) } else { merge(g, &x) }
}

impl ToOnnx for SwinStage {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        stage_to_onnx(g, x, &self.blocks, self.merge_first, |g, x| match &self.downsample {
            Some(m) => m.to_onnx(g, x, self.merged_resolution),
            None => Ok(x.to_string()),
        })
    }
}

impl ToOnnx for DeploySwinStage {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        stage_to_onnx(g, x, &self.blocks, self.merge_first, |g, x| match &self.downsample {
            Some(m) => m.to_onnx(g, x, self.merged_resolution),
            None => Ok(x.to_string()),
        })
    }
}

impl ToOnnx for SwinHead {
    /// Tokens (B, N, C) → logits (B, classes) from the token mean.
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let pooled = Pool::Mean.to_onnx(g, x);
        self.linear().to_onnx(g, &pooled)
    }
}

/// RepBN/PRepBN models are emitted in their fused form ([`SwinFuse::EXACT`]); LayerNorm models
/// (Swin-T/S, FLatten-Swin) with their norms.
impl ToOnnx for SwinTransformer {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        if self.config.norm.folds() {
            return self.fuse()?.to_onnx(g, images);
        }
        let mut x = self.patch_embed.to_onnx(g, images)?; // (B, N, C)
        for stage in &self.layers {
            x = stage.to_onnx(g, &x)?;
        }
        let x = self.norm.to_onnx(g, &x)?;
        self.head.to_onnx(g, &x)
    }
}

impl ToOnnx for DeploySwin {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let mut x = self.patch_embed.to_onnx(g, images)?; // (B, N, C)
        for stage in &self.layers {
            x = stage.to_onnx(g, &x)?;
        }
        self.head.to_onnx(g, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{collect_state, trainable_param_count};
    

    fn preset(name: &str) -> SwinConfig {
        (PRESETS.iter().find(|p| p.name == name).unwrap().config)()
    }

    #[test]
    fn parameter_counts_match_spec() {
        // SPEC §7.2 item 14 (training form), computed from the architecture and from the built
        // (lazy) modules.
        let cases = [
            ("swin_tiny", 28_288_354),
            ("swin_small", 49_606_258),
            ("prepbn_swin_tiny", 28_288_383),
            ("slab_swin_tiny", 29_216_605),
            ("slab_swin_small", 50_552_965),
        ];
        let device = Device::flex();
        for (name, want) in cases {
            let config = preset(name);
            assert_eq!(config.param_count(), want, "{name}");
            assert_eq!(trainable_param_count(&config.init(&device).unwrap()), want, "{name}");
        }
        // Fused SLAB-Swin-T: SPEC's 29 167 040 (training form less its 29 norms) plus the 2C
        // biases the three merges' `reduction` gain when their norms fold in (SPEC §2.8 F1).
        let fused = preset("slab_swin_tiny").init(&device).unwrap().fuse().unwrap();
        assert_eq!(trainable_param_count(&fused), 29_167_040 + 192 + 384 + 768);
    }

    #[test]
    fn params_and_flops_match_published_figures() {
        // Published params (M) and FLOPs (G MACs) at 224², SPEC §4.3 (Swin paper Table 1, SLAB
        // Table 6 / 7, FLatten Table 2 as the spec quotes them): within 3 %.
        let cases = [
            ("swin_tiny", 28.0, 4.5),
            ("swin_small", 50.0, 8.7),
            ("prepbn_swin_tiny", 28.29, 4.5),
            ("slab_swin_tiny", 29.22, 4.5),
            ("slab_swin_small", 50.55, 8.7),
            ("flatten_swin_tiny", 29.0, 4.5),
        ];
        for (name, params, flops) in cases {
            let config = preset(name);
            let ours_params = config.param_count() as f64 / 1e6;
            let ours_flops = config.macs() as f64 / 1e9;
            assert!((ours_params - params).abs() <= 0.03 * params, "{name}: {ours_params:.3} M vs {params} M");
            assert!((ours_flops - flops).abs() <= 0.03 * flops, "{name}: {ours_flops:.3} G vs {flops} G");
        }
    }

    #[test]
    fn slab_linear_stages_are_one_window_of_the_whole_map() {
        // SPEC §4.3: the 'L' positional encodings are (3136, 96) and (784, 192), no shift; the 'S'
        // stages keep window 7 with shift 3.
        let config = preset("slab_swin_tiny");
        let model = config.init(&Device::flex()).unwrap();
        for (s, tokens) in [(0, 3136), (1, 784)] {
            for block in &model.layers[s].blocks {
                let SwinAttention::Linear(attn) = &block.attn else { panic!("stage {s} is SLA") };
                assert_eq!(attn.positional_encoding.lazy_shape().dims::<3>(), [1, tokens, config.stage_dim(s)]);
                assert_eq!(block.grid.shift, 0);
                assert!(block.attn_mask.is_none());
            }
        }
        let shifted = &model.layers[2].blocks[1];
        assert_eq!((shifted.grid.window, shifted.grid.shift), (7, 3));
        assert!(matches!(shifted.attn, SwinAttention::Window(_)));
    }

    #[test]
    fn layouts_name_the_official_and_timm_keys() {
        let device = Device::flex();
        let small = |layout| SwinConfig { img_size: [32, 32], patch_size: 2, embed_dim: 8, depths: vec![2, 2], num_heads: vec![2, 4], attention: vec![AttentionKind::Softmax; 2], window_size: 4, num_classes: 3, layout, ..SwinConfig::swin_tiny() };
        let official = collect_state(&small(SwinLayout::Official).init(&device).unwrap());
        for key in ["patch_embed.proj.weight", "patch_embed.norm.weight", "layers.0.blocks.0.attn.relative_position_index", "layers.0.blocks.1.attn_mask", "layers.0.downsample.reduction.weight", "head.weight"] {
            assert!(official.contains(key), "official: {key}");
        }
        assert!(!official.contains("layers.0.blocks.0.attn_mask"));
        let timm = collect_state(&small(SwinLayout::Timm).init(&device).unwrap());
        for key in ["layers.1.downsample.norm.weight", "head.fc.weight", "layers.1.blocks.1.attn.relative_position_bias_table"] {
            assert!(timm.contains(key), "timm: {key}");
        }
        assert!(!timm.keys().any(|k| k.contains("relative_position_index") || k.contains("attn_mask") || k.starts_with("layers.0.downsample")));
    }

    /// Narrow versions of the presets (the real windows and stage layout, small widths) for the
    /// forward passes at full resolutions.
    fn narrow(base: SwinConfig, img_size: [usize; 2]) -> SwinConfig {
        SwinConfig { img_size, embed_dim: 8, depths: vec![2, 2, 2, 2], num_heads: vec![1, 2, 2, 4], num_classes: 5, ..base }
    }

    #[test]
    fn a_padded_fused_model_file_keeps_its_padding_token() {
        // At 256² the stage-1 'L' map (64×64) is padded to the 56-token windows: the fused blocks
        // pad with −b/a of the trained norm1, which must travel in the deploy file.
        use crate::deploy::model_file::{LoadedModel, Preprocess, load_model, save_deploy};
        let device = Device::flex();
        let config = narrow(SwinConfig::slab_swin_tiny(), [256, 256]);
        let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0, 5);
        let deploy = model.fuse().unwrap();
        assert!(crate::state::collect_state(&deploy).keys().any(|k| k.ends_with(".pad")), "no pad buffer in the deploy state");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fused.safetensors");
        save_deploy::<SwinTransformer>(&path, &deploy, &config, &Preprocess::imagenet(3), false).unwrap();
        let (LoadedModel::Deploy(loaded), _) = load_model::<SwinTransformer>(&path, &device).unwrap() else { panic!("a deploy file") };
        let images = crate::testing::standard_normal([1, 3, 256, 256], 33, &device);
        let (want, got) = (deploy.forward(images.clone()), loaded.forward(images));
        assert_eq!(crate::state::host_f32(got), crate::state::host_f32(want));
    }

    #[test]
    fn every_resolution_builds_and_runs_including_non_divisible_maps() {
        // 224², 256², 384² and a detection-size 800×1216 input. At 256² the 64×64 stage-1 map is
        // not a multiple of SLAB's 56-token 'L' window; at 800×1216 the 200×304 map is not a
        // multiple of 7: both are padded (see `WindowGrid`).
        let device = Device::flex();
        for size in [[224, 224], [256, 256], [384, 384], [800, 1216]] {
            for base in [SwinConfig::prepbn_swin_tiny(), SwinConfig::slab_swin_tiny()] {
                let config = narrow(base, size);
                let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0, 5);
                let images = crate::testing::standard_normal([1, 3, size[0], size[1]], 42, &device);
                let logits = model.try_forward(images.clone()).unwrap();
                assert_eq!(logits.dims(), [1, 5]);
                let values = crate::state::host_f32(logits.clone());
                assert!(values.iter().all(|v| v.is_finite()), "{size:?}: {values:?}");
                // Padded windows stay equal once fused (the fused blocks pad with −b/a, also
                // under the last-stage fold of the final norm).
                let scale = values.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                for how in [SwinFuse::EXACT, SwinFuse { final_norm: FinalNormFold::LastStage, official_patch_embed: false }] {
                    let fused = model.fuse_with(how).unwrap().forward(images.clone());
                    let diff: f32 = fused.sub(logits.clone()).abs().max().into_scalar();
                    assert!(diff <= 1e-4 * scale, "{size:?} {how:?}: fused differs by {diff}");
                }
            }
            // The full-width presets build at this size (parameters are lazy).
            let config = SwinConfig { img_size: size, ..SwinConfig::slab_swin_tiny() };
            assert_eq!(trainable_param_count(&config.init(&device).unwrap()), config.param_count());
        }
        let grid = SwinConfig { img_size: [800, 1216], ..SwinConfig::swin_tiny() }.block_grid(0, 1).unwrap();
        assert_eq!((grid.resolution, grid.padded(), grid.shift), ([200, 304], [203, 308], 3));
    }

    #[test]
    fn padded_windows_equal_the_official_detection_padding_by_hand() {
        // A 5×6 map with window 4: the official detection block pads to 8×8 after norm1, attends
        // in four windows and crops. Reproduce that by hand for one unshifted block.
        let device = Device::flex();
        let config = SwinConfig { img_size: [10, 12], patch_size: 2, embed_dim: 8, depths: vec![1], num_heads: vec![2], attention: vec![AttentionKind::Softmax], window_size: 4, num_classes: 3, ..SwinConfig::swin_tiny() };
        let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0, 5);
        let block = &model.layers[0].blocks[0];
        let x = crate::testing::standard_normal([2, 30, 8], 34, &device);
        let normed = block.norm1.forward(x.clone()).reshape([2, 5, 6, 8]);
        let padded = Tensor::<4>::zeros([2, 8, 8, 8], &device).slice_assign([0..2, 0..5, 0..6, 0..8], normed);
        let SwinAttention::Window(attn) = &block.attn else { panic!("window attention") };
        let windows = crate::nn::attention::window::window_partition(padded, 4);
        let mixed = crate::nn::attention::window::window_reverse(attn.forward(windows, None), 4, [8, 8]);
        let mixed = mixed.narrow(1, 0, 5).narrow(2, 0, 6).reshape([2, 30, 8]);
        let mid = x.clone().add(mixed);
        let want = mid.clone().add(block.mlp.forward(block.norm2.forward(mid)));
        let diff: f32 = block.forward(x).sub(want).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn fused_models_equal_unfused_eval_and_have_no_norms() {
        // SPEC §7.2 item 13 for Swin: PRepBN-Swin (RepBN, window attention) and SLAB-Swin (PRepBN +
        // SLA), both layouts, both final-norm folds.
        let device = Device::flex();
        let small = |base: SwinConfig, layout| SwinConfig { img_size: [32, 32], patch_size: 2, embed_dim: 8, depths: vec![2, 2, 2], num_heads: vec![1, 2, 4], attention: vec![AttentionKind::Softmax; 3], window_size: 4, linear_window_size: 8, num_classes: 7, layout, ..base };
        let slab = |layout| SwinConfig { attention: vec![AttentionKind::sla(), AttentionKind::Softmax, AttentionKind::Softmax], ..small(SwinConfig::slab_swin_tiny(), layout) };
        let flatten = SwinConfig { attention: vec![AttentionKind::focused(), AttentionKind::Softmax, AttentionKind::Softmax], ..small(SwinConfig::prepbn_swin_tiny(), SwinLayout::Official) };
        let configs = [small(SwinConfig::prepbn_swin_tiny(), SwinLayout::Official), small(SwinConfig::prepbn_swin_small(), SwinLayout::Timm), slab(SwinLayout::Official), slab(SwinLayout::Timm), flatten];
        for config in configs {
            let model = crate::testing::randomized(config.init(&device).unwrap(), 1.0, 5);
            let images = crate::testing::standard_normal([16, 3, 32, 32], 35, &device);
            let want = model.forward(images.clone());
            let scale: f32 = want.clone().abs().max().into_scalar();
            for how in [SwinFuse::EXACT, SwinFuse { final_norm: FinalNormFold::LastStage, official_patch_embed: false }] {
                let deploy = model.fuse_with(how).unwrap();
                let keys = collect_state(&deploy);
                let folded = |k: &str| k.contains("norm") || k.contains("bn.") || k.contains("alpha");
                assert!(!keys.keys().any(|k| folded(k)), "{:?}", keys.keys().collect::<Vec<_>>());
                let got = deploy.forward(images.clone());
                let diff: f32 = got.clone().sub(want.clone()).abs().max().into_scalar();
                assert!(diff <= 1e-4 * scale.max(1.0), "{config:?} {how:?}: {diff} vs max |logit| {scale}");
                let same_top1: bool = got.argmax(1).equal(want.clone().argmax(1)).all().into_scalar();
                assert!(same_top1);
            }
            // The official patch-embed merge misses exactly α·c in the conv bias.
            let bias = |d: &DeploySwin| d.patch_embed.proj.bias.as_ref().unwrap().val();
            let official = model.fuse_with(SwinFuse::OFFICIAL).unwrap();
            let alpha_c = model.patch_embed.proj.bias.as_ref().unwrap().val().mul_scalar(repbn_alpha(model.patch_embed.norm.as_ref().unwrap()));
            let exact = model.fuse().unwrap();
            let gap: f32 = bias(&exact).sub(bias(&official)).sub(alpha_c.clone()).abs().max().into_scalar();
            let size: f32 = alpha_c.abs().max().into_scalar();
            assert!(gap < 1e-6 && size > 1e-3, "{gap} {size}");
        }
        let layer_norm = small(SwinConfig::swin_tiny(), SwinLayout::Official).init(&device).unwrap();
        assert!(layer_norm.fuse().unwrap_err().to_string().contains("LayerNorm"));
        let one_stage = SwinConfig { depths: vec![2], num_heads: vec![2], attention: vec![AttentionKind::Softmax], ..small(SwinConfig::prepbn_swin_tiny(), SwinLayout::Official) };
        let model = one_stage.init(&device).unwrap();
        assert!(model.fuse_with(SwinFuse::OFFICIAL).is_err());
        assert!(model.fuse().is_ok());
    }

    #[test]
    fn every_preset_is_valid_and_bad_configs_and_inputs_are_errors() {
        for p in PRESETS {
            (p.config)().validate().unwrap_or_else(|e| panic!("{}: {e}", p.name));
        }
        let base = SwinConfig::swin_tiny();
        let bad = [
            SwinConfig { img_size: [226, 224], ..base.clone() },
            SwinConfig { num_heads: vec![3, 6, 12], ..base.clone() },
            SwinConfig { num_heads: vec![5, 6, 12, 24], ..base.clone() },
            SwinConfig { depths: vec![2, 0, 6, 2], ..base.clone() },
            SwinConfig { attention: vec![AttentionKind::ReluL { qk_norm: false, gated: false }; 4], ..base.clone() },
            SwinConfig { window_size: 0, ..base.clone() },
            SwinConfig { drop_path_rate: 1.0, ..base.clone() },
            SwinConfig { norm: NormKind::layer_norm(0.0), ..base.clone() },
            SwinConfig { attention: vec![AttentionKind::Sla { kernel_size: 4 }; 4], ..base.clone() },
        ];
        let device = Device::flex();
        for config in bad {
            assert!(config.init(&device).is_err(), "{config:?}");
        }
        let config = SwinConfig { img_size: [32, 32], patch_size: 2, embed_dim: 8, depths: vec![2], num_heads: vec![2], attention: vec![AttentionKind::Softmax], window_size: 4, num_classes: 3, ..base };
        let model = config.init(&device).unwrap();
        for dims in [[2, 3, 32, 30], [2, 1, 32, 32], [0, 3, 32, 32]] {
            let err = model.try_forward(Tensor::zeros(dims, &device)).unwrap_err();
            assert!(err.to_string().contains(&format!("{dims:?}")), "{err}");
        }
    }

    /// Small models for the fast path: shifted windows on every stage but the last, a padded
    /// map (10×14, windows of 4, odd maps at the merges), both layouts, an SLA 'L' stage whose
    /// window is its whole map next to softmax stages, and SLA / FLatten 'L' stages over several
    /// padded, shifted windows.
    fn fast_path_configs() -> Vec<SwinConfig> {
        let small = |base: SwinConfig, layout| SwinConfig { img_size: [32, 32], patch_size: 2, embed_dim: 8, depths: vec![2, 2, 2], num_heads: vec![1, 2, 4], attention: vec![AttentionKind::Softmax; 3], window_size: 4, linear_window_size: 16, num_classes: 7, layout, ..base };
        let slab = |layout| SwinConfig { attention: vec![AttentionKind::sla(), AttentionKind::Softmax, AttentionKind::Softmax], ..small(SwinConfig::slab_swin_tiny(), layout) };
        let padded = |base| SwinConfig { img_size: [20, 28], ..small(base, SwinLayout::Official) };
        // 'L' stages over several windows: 10×14 padded to 12×16 in 4×4 windows, shifted by 2.
        let windowed = |base: SwinConfig, layout| SwinConfig { img_size: [20, 28], linear_window_size: 4, ..SwinConfig { attention: vec![base.attention[0], AttentionKind::Softmax, AttentionKind::Softmax], ..small(base, layout) } };
        vec![
            small(SwinConfig::swin_tiny(), SwinLayout::Official),
            small(SwinConfig::swin_tiny(), SwinLayout::Timm),
            small(SwinConfig::prepbn_swin_tiny(), SwinLayout::Official),
            small(SwinConfig::prepbn_swin_small(), SwinLayout::Timm),
            slab(SwinLayout::Official),
            slab(SwinLayout::Timm),
            padded(SwinConfig::swin_tiny()),
            padded(SwinConfig::prepbn_swin_tiny()),
            windowed(SwinConfig::slab_swin_tiny(), SwinLayout::Official),
            windowed(SwinConfig::slab_swin_tiny(), SwinLayout::Timm),
            windowed(SwinConfig::flatten_swin_tiny(), SwinLayout::Official),
        ]
    }


    #[test]
    fn the_cpu_runtime_equals_the_burn_forward_fused_and_unfused() {
        for config in fast_path_configs() {
            crate::testing::check_runtime_against_burn::<SwinTransformer>(&config, TEST_SEED);
        }
    }

    #[test]
    fn linear_attention_over_several_windows_lowers_to_windowed_steps() {
        // A 16×16 'L' map in 8×8 windows: both stage-1 blocks (the second shifted) are linear
        // attention over windows; the softmax stages stay window attention.
        let config = SwinConfig { linear_window_size: 8, ..fast_path_configs().swap_remove(4) };
        let plan = config.init(&Device::flex()).unwrap().lower().unwrap();
        let count = |f: fn(&Layer) -> bool| plan.steps.iter().filter(|s| matches!(s, Step::Residual(r) if f(&r.layer))).count();
        assert_eq!(count(|l| matches!(l, Layer::WindowedLinear(_))), 2);
        assert_eq!(count(|l| matches!(l, Layer::Attention { .. })), 0);
        assert_eq!(count(|l| matches!(l, Layer::WindowAttention(_))), 4);
    }

    /// The narrowed SLAB-Swin layout (real 56-token 'L' windows and 7-token softmax windows) at
    /// 256²: the 64×64 stage-1 map is four windows padded to 112×112 (shifted by 28 on odd
    /// blocks); fused too, where the padding is the −b/a token.
    fn multi_window_slab_swin() -> SwinConfig {
        narrow(SwinConfig::slab_swin_tiny(), [256, 256])
    }

    #[test]
    fn slab_swin_over_several_linear_windows_runs_on_the_cpu_runtime() {
        let config = multi_window_slab_swin();
        assert!(!config.block_grid(0, 1).unwrap().is_one_window());
        crate::testing::check_runtime_against_burn::<SwinTransformer>(&config, TEST_SEED);
    }

    #[test]
    fn slab_swin_over_several_linear_windows_trains_like_burn() {
        check_trainer_against_burn(crate::testing::mid_prepbn_decay::<SwinTransformer>(multi_window_slab_swin()), None);
    }

    const TEST_SEED: u64 = 20261202;

    /// Forward, backward and state of the CPU trainer against burn autodiff.
    fn check_trainer_against_burn(config: SwinConfig, drop_path_seed: Option<u64>) {
        // Linear attention's gradients are differences of terms ∝ 1/normaliser (see the PVT
        // trainer test): the golden files' gradient tolerance, 1e-3 + 1e-4·max, for those models.
        // BatchNorm models: the gradient through a batch-statistics norm is the difference of
        // terms that cancel over the batch's 3·256 rows, and a branch's bias gradient sums
        // those rows again; about one run in six differs by 1e-5–5e-5 (at a max of 4e-3–7e-3)
        // from f32 rounding, so 1e-4 for them.
        let abs = if config.attention.iter().any(AttentionKind::needs_grid) {
            1e-3
        } else if config.norm.folds() {
            1e-4
        } else {
            1e-5
        };
        crate::testing::check_trainer_against_burn::<SwinTransformer>(&config, TEST_SEED, drop_path_seed, abs);
    }

    #[test]
    fn the_cpu_trainer_equals_burn_autodiff_for_every_kind() {
        for config in fast_path_configs() {
            check_trainer_against_burn(crate::testing::mid_prepbn_decay::<SwinTransformer>(config), None);
        }
    }

    #[test]
    fn the_cpu_trainer_draws_drop_path_masks_like_burn() {
        let config = SwinConfig { drop_path_rate: 0.5, ..fast_path_configs().swap_remove(4) };
        check_trainer_against_burn(config, Some(7));
    }
}
