//! A model on the fast path: its layers lowered into one parameter table, and the order they run
//! in as a list of [`Step`]s. A family describes its model once, as its burn module tree; its
//! lowering turns that tree into a plan, and one executor walks the plan, with or without saved
//! activations:
//!
//! * inference ([`Plan::infer_image`], `infer.rs`): one image at a time, keeping nothing; its
//!   token rows are split over the threads, which meet once per token-mixing layer (the keys and
//!   values of every row must exist before any query row is mixed);
//! * training ([`Plan::train_forward`] / [`Plan::train_backward`], `train.rs`): the whole batch,
//!   step by step (BatchNorm needs batch statistics before any row is normalized), keeping what
//!   each step's backward needs, then back through the steps in reverse.
//!
//! What a step computes is its layer kind's fast form in `nn`; the plan only orders the calls.
//!
//! Both walks track each image's token count and width from step to step: a flat model (DeiT)
//! keeps the ones its [`Embed`] set; a hierarchical one (PVT, and the Swin / CSwin families'
//! stem and merges) changes grid and width at each [`StageEmbed`], and every step after it reads
//! the new ones.
//!
//! A conv family (MobileViT, …) starts with [`Step::Rows`], which lays the images out as the
//! (H·W, C) raster rows every step works in, and runs its own kinds as [`Step::Block`]s: a
//! [`FastBlock`] computes the whole block (its convs, BatchNorms and any token steps nested in
//! it, [`TokenSteps`]) and tells the walks the grid and width it leaves.

mod infer;
mod train;

pub use infer::{InferWorkspace, PooledWorkspace, WorkspacePool};
pub use train::{Scratch, TokenSteps, TrainActivations};

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use rand_pcg::Pcg64;

use crate::error::{Error, Result};
use crate::nn::attention::FastAttention;
use crate::nn::attention::cross_shaped_fast::FastCrossShapedAttention;
use crate::nn::attention::spatial_reduction_fast::FastSrAttention;
use crate::nn::attention::window_fast::{FastWindowAttention, FastWindowedLinear};
use crate::nn::conv::{FastConv, Source};
use crate::nn::linear::{FastDistilledHead, FastLinear};
use crate::nn::lower::{Layout, ParamTable, Slot};
use crate::nn::mlp::FastMlp;
use crate::nn::norm::{FastNorm, Norm};
use crate::nn::patch_embed::{FastPatchEmbed, PatchEmbed};
use crate::nn::patch_merge::FastPatchMerging;
use crate::nn::pool::Pool;
use crate::nn::schedule::Phase;
use crate::state::StateDict;

/// A lowered model: the parameter buffer and the steps that read it, in execution order.
pub struct Plan {
    pub table: ParamTable,
    pub steps: Vec<Step>,
}

/// One step of a plan, from (B, T, C) tokens (or images) to the next step's input.
pub enum Step {
    /// (C_in, H, W) images → (T, C) tokens: patch conv, class token, position embedding.
    Embed(Embed),
    /// A stage of a hierarchical model: the image or the previous stage's token grid → this
    /// stage's grid and width (strided conv, norm, position embedding).
    Stage(StageEmbed),
    /// `x + drop_path(layer(norm(x)))`; the norm is absent in fused models.
    Residual(Residual),
    /// (H·W, C) tokens → the 2×2-merged (⌈H/2⌉·⌈W/2⌉, 2C) (Swin's patch merging).
    Merge(FastPatchMerging),
    /// A norm on its own (the final norm of unfused models).
    Norm(FastNorm),
    /// (T, C) tokens → (C).
    Pool(Pool),
    /// (C) → (classes).
    Head(FastLinear),
    /// (C) → (classes): two heads averaged (EfficientFormer's `head` and `head_dist`).
    DistilledHead(FastDistilledHead),
    /// (C, H, W) images → their (H·W, C) raster rows (conv families' first step).
    Rows(RasterInput),
    /// A family's own block on (H·W, C) raster rows.
    Block(Box<dyn FastBlock>),
}

/// The images a conv family's plan reads, before they are laid out as raster rows.
#[derive(Clone, Copy, Debug)]
pub struct RasterInput {
    pub chans: usize,
    pub grid: [usize; 2],
}

impl RasterInput {
    /// One (C, H, W) image → its (H·W, C) rows.
    pub fn rows_of(&self, image: &[f32], rows: &mut [f32]) {
        let (c, n) = (self.chans, self.grid[0] * self.grid[1]);
        for (channel, plane) in image.chunks_exact(n).enumerate() {
            for (pixel, &v) in plane.iter().enumerate() {
                rows[pixel * c + channel] = v;
            }
        }
    }
}

/// A family's block as one step of the fast path, over (H·W, C) raster rows. It keeps what its
/// backward needs between [`forward`](Self::forward) and [`backward`](Self::backward) itself;
/// the walks keep its input.
pub trait FastBlock: Send + Sync {
    /// The grid and channels it leaves.
    fn output(&self) -> ([usize; 2], usize);
    /// One image in eval mode: (H·W, C_in) rows → (H'·W', C_out) rows, on up to `parts` threads.
    fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], parts: usize);
    /// A training forward of `batch` images (batch statistics, running ones updated; PRepBN
    /// counters only with `advance`); drop-path masks are drawn from `rng` in the order the burn
    /// module draws them.
    fn forward(&mut self, p: &[f32], x: &[f32], batch: usize, out: &mut [f32], advance: bool, rng: &mut Pcg64) -> Result<()>;
    /// `dx = ∂L/∂x` (overwritten) of the last forward, whose input was `x`; parameter gradients
    /// are added into `g`.
    fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32]);
    /// Its norms' running statistics and counters, under their official keys.
    fn write_buffers(&self, state: &mut StateDict);
    /// Re-targets the block at a `grid` input, keeping its parameters and statistics (one plan
    /// trains every size of a multi-scale run), and returns the grid it then leaves. The
    /// default, for blocks whose layers are sized for one grid: `Error::Unsupported`, unchanged.
    fn set_grid(&mut self, grid: [usize; 2]) -> Result<[usize; 2]> {
        let _ = grid;
        Err(Error::Unsupported { what: "multi-scale batches (a block sized for one input grid)".into(), path: "the fast CPU path" })
    }
    /// Values of one image's output.
    fn output_len(&self) -> usize {
        let ([h, w], c) = self.output();
        h * w * c
    }
}

/// The patch embedding with what is added to its tokens.
pub struct Embed {
    pub patch: FastPatchEmbed,
    pub img_size: usize,
    pub cls_token: Slot,
    /// Whether the class token is prepended (otherwise it exists, untrained, as in the official
    /// SLAB code).
    pub prepend_class_token: bool,
    pub pos_embed: Slot,
}

impl Embed {
    pub fn lower(patch_embed: &PatchEmbed, img_size: usize, cls_token: &Param<Tensor<3>>, prepend_class_token: bool, pos_embed: &Param<Tensor<3>>, table: &mut ParamTable) -> Result<Self> {
        let patch = FastPatchEmbed::lower(patch_embed, table)?;
        let cls_token = table.add(cls_token, Layout::Official)?;
        if !prepend_class_token {
            table.untrained(cls_token);
        }
        let pos_embed = table.add(pos_embed, Layout::Official)?;
        Ok(Self { patch, img_size, cls_token, prepend_class_token, pos_embed })
    }

    pub fn dim(&self) -> usize {
        self.patch.proj.outputs
    }

    pub fn image_len(&self) -> usize {
        self.patch.in_chans() * self.img_size * self.img_size
    }

    pub fn num_patches(&self) -> usize {
        self.patch.num_patches(self.img_size)
    }

    /// Tokens per image after this step.
    pub fn tokens(&self) -> usize {
        usize::from(self.prepend_class_token) + self.num_patches()
    }
}

/// A stage's embedding: (C_in, H, W) images or an (H·W, C_in) token grid → the (H'·W', C)
/// tokens of the conv's output grid, `pos + norm(conv(x))`; the norm is absent where it was
/// folded into the conv, the position embedding where the family has none.
pub struct StageEmbed {
    /// The conv, with what it reads (`conv.source`).
    pub conv: FastConv,
    /// The input's grid (the image's (H, W) for the first stage).
    pub in_grid: [usize; 2],
    pub norm: Option<FastNorm>,
    /// (H'·W', C), added after the norm.
    pub pos_embed: Option<Slot>,
}

impl StageEmbed {
    /// From a family's conv, the norm after it and the position embedding added last; `source`
    /// and `in_grid` say what the conv reads.
    pub fn lower(conv: &Conv2d, norm: Option<&Norm>, pos_embed: Option<&Param<Tensor<3>>>, source: Source, in_grid: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        let conv = FastConv::lower(conv, source, table)?;
        let norm = norm.map(|n| FastNorm::lower(n, table)).transpose()?;
        let pos_embed = pos_embed.map(|p| table.add(p, Layout::Official)).transpose()?;
        Ok(Self { conv, in_grid, norm, pos_embed })
    }

    /// The conv's output grid.
    pub fn grid(&self) -> [usize; 2] {
        self.conv.out_grid(self.in_grid)
    }

    /// Tokens per image after this step.
    pub fn tokens(&self) -> usize {
        let [rows, cols] = self.grid();
        rows * cols
    }

    pub fn dim(&self) -> usize {
        self.conv.outputs()
    }

    /// Values of one image's input.
    pub fn input_len(&self) -> usize {
        self.conv.in_chans * self.in_grid[0] * self.in_grid[1]
    }
}

/// A residual branch: `x + drop_path(layer(norm(x)))`.
pub struct Residual {
    pub norm: Option<FastNorm>,
    pub layer: Layer,
    /// Stochastic depth rate of the branch (training only).
    pub drop_path: f64,
}

/// What a residual branch runs.
pub enum Layer {
    /// Token mixing; SLA's conv taps come tiled over the heads for inference (training re-tiles
    /// them every step, as the weights change).
    Attention { attn: FastAttention, inference_conv: Option<(Vec<f32>, Vec<f32>)> },
    /// Token mixing with keys and values from the (reduced) token grid (PVT); conv taps as above.
    SpatialReduction { attn: FastSrAttention, inference_conv: Option<(Vec<f32>, Vec<f32>)> },
    /// Softmax attention inside (shifted) windows of the token map (Swin); the windows are
    /// independent, so it runs as one step with the threads splitting windows, not key rows.
    WindowAttention(FastWindowAttention),
    /// CSWin's cross-shaped windows (stripes or the whole map, LePE): like window attention, one
    /// step whose threads split windows.
    CrossShaped(FastCrossShapedAttention),
    /// SLA / FLatten inside the (shifted, padded) windows of a map that has several (Swin's 'L'
    /// stages above 224²); run like window attention, the threads splitting windows.
    WindowedLinear(FastWindowedLinear),
    Mlp(FastMlp),
}

impl Layer {
    pub fn attention(attn: FastAttention, table: &ParamTable) -> Self {
        let inference_conv = attn.tiled_conv(&table.values);
        Layer::Attention { attn, inference_conv }
    }

    pub fn spatial_reduction(attn: FastSrAttention, table: &ParamTable) -> Self {
        let inference_conv = attn.tiled_conv(&table.values);
        Layer::SpatialReduction { attn, inference_conv }
    }

    /// The width of the tokens the layer reads.
    pub fn dim(&self) -> usize {
        match self {
            Layer::Attention { attn, .. } => attn.dim(),
            Layer::SpatialReduction { attn, .. } => attn.dim(),
            Layer::WindowAttention(attn) => attn.dim(),
            Layer::CrossShaped(attn) => attn.dim(),
            Layer::WindowedLinear(attn) => attn.dim(),
            Layer::Mlp(mlp) => mlp.fc1.inputs,
        }
    }
}

/// Every norm of `steps` (outside blocks), in execution order.
fn norms_of(steps: &[Step]) -> impl Iterator<Item = &FastNorm> {
    steps.iter().flat_map(|step| {
        let (first, second) = match step {
            Step::Residual(r) => (r.norm.as_ref(), match &r.layer {
                Layer::SpatialReduction { attn, .. } => attn.norm(),
                _ => None,
            }),
            Step::Stage(s) => (s.norm.as_ref(), None),
            Step::Merge(m) => (m.norm.as_ref(), None),
            Step::Norm(n) => (Some(n), None),
            _ => (None, None),
        };
        first.into_iter().chain(second)
    })
}

/// Every step of a raster plan set for `grid` images, in order: the grid each block leaves is the
/// next one's. On an error, the index of the step that refused (itself unchanged).
fn regrid(steps: &mut [Step], mut grid: [usize; 2]) -> std::result::Result<(), (usize, Error)> {
    for (i, step) in steps.iter_mut().enumerate() {
        match step {
            Step::Rows(r) => r.grid = grid,
            Step::Block(b) => grid = b.set_grid(grid).map_err(|e| (i, e))?,
            // Per-image (C) rows: no grid.
            Step::Pool(_) | Step::Head(_) | Step::DistilledHead(_) => {}
            Step::Embed(_) | Step::Stage(_) | Step::Residual(_) | Step::Merge(_) | Step::Norm(_) => {
                return Err((i, Error::Unsupported { what: "multi-scale batches (token steps sized for one input)".into(), path: "the fast CPU path" }));
            }
        }
    }
    Ok(())
}

/// The running statistics and counters of every norm of `steps`, blocks' included.
fn write_buffers_of(steps: &[Step], dict: &mut StateDict) {
    norms_of(steps).for_each(|n| n.write_buffers(dict));
    steps.iter().for_each(|step| {
        if let Step::Block(b) = step {
            b.write_buffers(dict);
        }
    });
}

impl TokenSteps {
    /// Its norms' running statistics and counters, under their official keys.
    pub fn write_buffers(&self, dict: &mut StateDict) {
        write_buffers_of(&self.steps, dict);
    }
}

impl Plan {
    /// The image embedding, when the plan starts from images.
    pub fn embed(&self) -> Option<&Embed> {
        match self.steps.first()? {
            Step::Embed(e) => Some(e),
            _ => None,
        }
    }

    /// The images the plan takes: (channels, [H, W]).
    pub fn input(&self) -> Option<(usize, [usize; 2])> {
        match self.steps.first()? {
            Step::Embed(e) => Some((e.patch.in_chans(), [e.img_size; 2])),
            Step::Stage(s) if s.conv.source == Source::Planes => Some((s.conv.in_chans, s.in_grid)),
            Step::Rows(r) => Some((r.chans, r.grid)),
            _ => None,
        }
    }

    /// Re-targets a conv family's plan at `grid`-sized images ([`FastBlock::set_grid`] step by
    /// step), keeping its parameters and statistics. `Error::Unsupported` where a step is sized
    /// for one input (token plans: position embeddings, windows); the plan is then unchanged.
    pub fn set_input_grid(&mut self, grid: [usize; 2]) -> Result<()> {
        let Some((_, current)) = self.input() else {
            return Err(Error::Unsupported { what: "multi-scale batches on a plan that does not start from images".into(), path: "the fast CPU path" });
        };
        if current == grid {
            return Ok(());
        }
        regrid(&mut self.steps, grid).or_else(|(failed, e)| {
            // The steps before the one that refused go back to the grid they ran at (they took
            // a new one, so they take that one too); the refusing one is unchanged.
            regrid(&mut self.steps[..failed], current).expect("steps that re-target take the grid they ran at");
            Err(e)
        })
    }

    /// The classes of the head the plan ends in, if it ends in one.
    pub fn classes(&self) -> Option<usize> {
        match self.steps.last()? {
            Step::Head(h) => Some(h.outputs),
            Step::DistilledHead(h) => Some(h.outputs()),
            _ => None,
        }
    }

    /// Values of one input image.
    pub fn image_len(&self) -> Option<usize> {
        self.input().map(|(chans, [h, w])| chans * h * w)
    }

    /// Every norm of the plan (outside blocks), in execution order.
    pub fn norms(&self) -> impl Iterator<Item = &FastNorm> {
        norms_of(&self.steps)
    }

    /// What the next training-mode call of the first PRepBN norm computes (PRepBN models only).
    pub fn prepbn_phase(&self) -> Option<Phase> {
        self.norms().find_map(FastNorm::phase)
    }

    /// The model's full state under the official keys: `template` (the lowered model's
    /// `collect_state`) with the parameters in `values` and the norms' current statistics and
    /// counters.
    pub fn state_with(&self, values: &[f32], template: &StateDict, origin: &str) -> StateDict {
        self.table.state_with(values, template, origin, |dict| write_buffers_of(&self.steps, dict))
    }
}
