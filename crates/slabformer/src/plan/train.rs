//! The plan's training walk: the whole batch step by step, each step's input and what its
//! backward needs kept; then the steps in reverse, parameter gradients added into one flat
//! buffer laid out like the parameters.

use rayon::prelude::*;

use super::{Embed, Layer, Plan, Residual, StageEmbed, Step};
use crate::error::{Error, Result};
use crate::kernels;
use crate::nn::attention::cross_shaped_fast::{CrossShapedActivations, CrossShapedScratch};
use crate::nn::attention::spatial_reduction_fast::{SrActivations, SrScratch};
use crate::nn::attention::window_fast::{WindowAttentionActivations, WindowAttentionScratch, WindowedLinearActivations, WindowedLinearScratch};
use crate::nn::attention::{AttentionActivations, AttentionScratch};
use crate::nn::conv::Source;
use crate::nn::drop_path::{add_masked_branch, draw_mask, masked_gradient, step_rng};
use crate::nn::lower::sized;
use crate::nn::mlp::MlpActivations;
use crate::nn::norm::NormCache;
use crate::nn::patch_merge::{PatchMergeActivations, PatchMergeScratch};
use rand_pcg::Pcg64;

/// One step's training activations.
#[derive(Default)]
struct StepActivations {
    /// The step's (B·T, C) input (empty for the embedding, whose input is the images).
    x: Vec<f32>,
    /// Tokens per image of that input.
    tokens: usize,
    /// The embedding's im2col rows and their conv output (a stage's: before its norm).
    patches: Vec<f32>,
    embedded: Vec<f32>,
    norm: NormCache,
    normed: Vec<f32>,
    attn: AttentionActivations,
    sr: SrActivations,
    window: WindowAttentionActivations,
    cross: CrossShapedActivations,
    windowed_linear: WindowedLinearActivations,
    merge: PatchMergeActivations,
    mlp: MlpActivations,
    /// Per-image drop-path factors of a residual branch (empty: all kept).
    mask: Vec<f32>,
}

/// The whole model's training activations of the last forward pass.
#[derive(Default)]
pub struct TrainActivations {
    pub batch: usize,
    steps: Vec<StepActivations>,
    output: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct Scratch {
    /// The spare of the two input-gradient buffers the blocks' backward passes take in turn.
    block_dx: Vec<f32>,
    dnormed: Vec<f32>,
    dhidden: Vec<f32>,
    /// A residual branch's output gradient under drop-path.
    dbranch: Vec<f32>,
    attn: AttentionScratch,
    sr: SrScratch,
    window: WindowAttentionScratch,
    cross: CrossShapedScratch,
    windowed_linear: WindowedLinearScratch,
    merge: PatchMergeScratch,
    partials: Vec<f32>,
}

impl Plan {
    /// Training-mode forward of `batch` row-major (B, C, H, W) images → (B, classes) logits,
    /// keeping the activations in `acts`. BatchNorm statistics and PRepBN counters advance like
    /// one training-mode forward of the burn model (the counters only with `advance`); drop-path
    /// masks come from `drop_path_seed` in the order burn's `drop_path::with_seed` draws them.
    pub fn train_forward(&mut self, images: &[f32], batch: usize, acts: &mut TrainActivations, drop_path_seed: u64, advance: bool) -> Result<Vec<f32>> {
        let (chans, [h, w]) = self.input().ok_or_else(|| Error::Unsupported { what: "training a plan that does not start from images".into(), path: "the CPU trainer" })?;
        let per_image = chans * h * w;
        if batch == 0 || images.len() != batch * per_image {
            return Err(Error::InputShape { layer: "model input", expected: format!("{batch} × ({chans}, {h}, {w}) = {} values", batch * per_image), found: vec![images.len()] });
        }
        let Plan { table, steps } = self;
        let mut rng = step_rng(drop_path_seed);
        forward_steps(steps, &table.values, images, batch, 0, acts, &mut rng, advance)?;
        Ok(acts.output.clone())
    }

    /// Back-propagates `dlogits` = ∂L/∂logits (B, classes) through the forward that filled
    /// `acts`, adding every parameter's gradient into `g`.
    pub fn train_backward(&self, dlogits: &[f32], acts: &TrainActivations, g: &mut [f32], s: &mut Scratch) {
        backward_steps(&self.steps, &self.table.values, dlogits.to_vec(), acts, g, s);
    }
}

/// The training forward of `steps` over `batch` images (or sequences) of `tokens` tokens: the
/// first step reads `images` if it embeds them, else `acts.steps[0].x`; the last one's output
/// lands in `acts.output`.
#[allow(clippy::too_many_arguments)]
fn forward_steps(steps: &mut [Step], p: &[f32], images: &[f32], batch: usize, mut tokens: usize, acts: &mut TrainActivations, rng: &mut Pcg64, advance: bool) -> Result<()> {
    acts.batch = batch;
    acts.steps.resize_with(steps.len(), StepActivations::default);
    for (i, step) in steps.iter_mut().enumerate() {
        let (done, rest) = acts.steps.split_at_mut(i + 1);
        let a = &mut done[i];
        a.tokens = tokens;
        let out = match rest.first_mut() {
            Some(next) => &mut next.x,
            None => &mut acts.output,
        };
        match step {
            Step::Embed(e) => tokens = embed_forward(e, p, images, batch, a, out),
            Step::Stage(s) => {
                stage_forward(s, p, images, batch, a, out, advance)?;
                tokens = s.tokens();
            }
            Step::Rows(r) => {
                let per_image = r.chans * r.grid[0] * r.grid[1];
                sized(out, batch * per_image).par_chunks_mut(per_image).zip(images.par_chunks(per_image)).for_each(|(rows, image)| r.rows_of(image, rows));
                tokens = r.grid[0] * r.grid[1];
            }
            Step::Block(b) => {
                b.forward(p, &a.x, batch, sized(out, batch * b.output_len()), advance, rng)?;
                let ([h, w], _) = b.output();
                tokens = h * w;
            }
            Step::Merge(m) => {
                m.forward(p, &a.x, sized(out, batch * m.out_tokens() * m.out_dim()), &mut a.merge, batch, advance)?;
                tokens = m.out_tokens();
            }
            Step::Residual(r) => residual_forward(r, p, a, out, batch, advance, rng)?,
            Step::Norm(n) => {
                let c = a.x.len() / (batch * tokens);
                n.forward(p, &a.x, sized(out, a.x.len()), &mut a.norm, c, advance)?;
            }
            Step::Pool(pool) => {
                let c = a.x.len() / (batch * tokens);
                let out = sized(out, batch * c);
                out.chunks_exact_mut(c).zip(a.x.chunks_exact(tokens * c)).for_each(|(o, image)| pool.apply(image, c, o));
                tokens = 1;
            }
            Step::Head(h) => h.forward(p, &a.x, sized(out, batch * h.outputs), false),
            Step::DistilledHead(h) => h.forward(p, &a.x, sized(out, batch * h.outputs())),
        }
    }
    Ok(())
}

/// Back-propagates `dy` = ∂L/∂(the last step's output) through the forward that filled `acts`,
/// adding every parameter's gradient into `g`; returns ∂L/∂(the first step's input) (empty when
/// the first step reads images).
fn backward_steps(steps: &[Step], p: &[f32], mut dy: Vec<f32>, acts: &TrainActivations, g: &mut [f32], s: &mut Scratch) -> Vec<f32> {
    let batch = acts.batch;
    for (step, a) in steps.iter().zip(&acts.steps).rev() {
        match step {
            Step::Head(h) => {
                let mut dx = vec![0.0; a.x.len()];
                h.backward_input(p, &dy, &mut dx, |_, _| {});
                h.backward_params(g, &a.x, &dy, &mut s.partials);
                dy = dx;
            }
            Step::DistilledHead(h) => {
                let mut dx = vec![0.0; a.x.len()];
                h.backward(p, g, &a.x, &dy, &mut dx, &mut s.partials);
                dy = dx;
            }
            Step::Pool(pool) => {
                let c = dy.len() / batch;
                let mut dx = vec![0.0; a.x.len()];
                dx.par_chunks_exact_mut(a.tokens * c).zip(dy.par_chunks_exact(c)).for_each(|(dx, dp)| pool.backward(dp, dx));
                dy = dx;
            }
            Step::Norm(n) => {
                let mut dx = vec![0.0; a.x.len()];
                n.backward(p, g, &a.x, &dy, &mut dx, &a.norm, a.x.len() / (batch * a.tokens));
                dy = dx;
            }
            Step::Merge(m) => {
                let mut dx = vec![0.0; a.x.len()];
                m.backward(p, g, &a.merge, &dy, &mut dx, &mut s.merge, batch);
                dy = dx;
            }
            Step::Block(b) => {
                // Two buffers in turn, not a fresh one per block: a block's input gradient is
                // tens of MB at training batch sizes.
                let mut dx = std::mem::take(&mut s.block_dx);
                dx.clear();
                dx.resize(a.x.len(), 0.0);
                b.backward(p, g, &a.x, &dy, &mut dx);
                s.block_dx = std::mem::replace(&mut dy, dx);
            }
            Step::Rows(_) => dy = Vec::new(),
            Step::Residual(r) => residual_backward(r, p, g, a, &mut dy, s, batch),
            Step::Embed(e) => {
                embed_backward(e, g, a, &dy, batch, &mut s.partials);
                dy = Vec::new();
            }
            Step::Stage(stage) => dy = stage_backward(stage, p, g, a, &dy, batch, &mut s.partials),
        }
    }
    dy
}

/// Token steps nested in a block (MobileViT's transformer over its unfolded patches): residual
/// and norm steps over a batch of token sequences, with their own activations.
pub struct TokenSteps {
    pub steps: Vec<Step>,
    acts: TrainActivations,
    /// Inference workspaces of earlier calls.
    pub(super) infer_workspaces: super::WorkspacePool,
}

impl TokenSteps {
    pub fn new(steps: Vec<Step>) -> Self {
        Self { steps, acts: TrainActivations::default(), infer_workspaces: Default::default() }
    }

    /// The training forward of `sequences` (S, T, C) sequences of `tokens` tokens → their
    /// output, kept until the next forward.
    pub fn forward(&mut self, p: &[f32], x: &[f32], sequences: usize, tokens: usize, rng: &mut Pcg64, advance: bool) -> Result<&[f32]> {
        self.acts.steps.resize_with(self.steps.len().max(1), StepActivations::default);
        self.acts.steps[0].x.clear();
        self.acts.steps[0].x.extend_from_slice(x);
        forward_steps(&mut self.steps, p, &[], sequences, tokens, &mut self.acts, rng, advance)?;
        Ok(&self.acts.output)
    }

    /// ∂L/∂x of the last forward from `dy` = ∂L/∂output, the parameter gradients into `g`.
    pub fn backward(&self, p: &[f32], g: &mut [f32], dy: Vec<f32>) -> Vec<f32> {
        backward_steps(&self.steps, p, dy, &self.acts, g, &mut Scratch::default())
    }
}

/// Patch conv over the batch's im2col rows, then the class token and the position embedding;
/// returns the tokens per image.
fn embed_forward(e: &Embed, p: &[f32], images: &[f32], batch: usize, a: &mut StepActivations, out: &mut Vec<f32>) -> usize {
    let (c, n, t) = (e.dim(), e.num_patches(), e.tokens());
    let patch_len = e.patch.patch_len();
    sized(&mut a.patches, batch * n * patch_len).par_chunks_mut(n * patch_len).zip(images.par_chunks(e.image_len())).for_each(|(patches, image)| e.patch.im2col(image, e.img_size, patches));
    let embedded = sized(&mut a.embedded, batch * n * c);
    e.patch.proj.forward(p, &a.patches, embedded, false); // (B·N, C)
    let (pos, cls) = (&p[e.pos_embed.range()], &p[e.cls_token.range()]);
    let first = usize::from(e.prepend_class_token);
    sized(out, batch * t * c).par_chunks_mut(t * c).zip(embedded.par_chunks(n * c)).for_each(|(x, embedded)| {
        x[..first * c].copy_from_slice(&cls[..first * c]);
        x[first * c..].copy_from_slice(embedded);
        kernels::add_assign(x, pos);
    });
    t
}

/// Position embedding and class token gradients summed over the images, then the patch conv's.
fn embed_backward(e: &Embed, g: &mut [f32], a: &StepActivations, dy: &[f32], batch: usize, partials: &mut Vec<f32>) {
    let (c, t) = (e.dim(), e.tokens());
    g[e.pos_embed.range()].par_chunks_mut(c).enumerate().for_each(|(token, gp)| {
        for image in 0..batch {
            kernels::add_assign(gp, &dy[(image * t + token) * c..(image * t + token + 1) * c]);
        }
    });
    let dembedded: Vec<f32> = if e.prepend_class_token {
        let gc = &mut g[e.cls_token.range()];
        for image in 0..batch {
            kernels::add_assign(gc, &dy[image * t * c..(image * t + 1) * c]);
        }
        dy.chunks_exact(t * c).flat_map(|image| image[c..].iter().copied()).collect()
    } else {
        dy.to_vec()
    };
    e.patch.proj.backward_params(g, &a.patches, &dembedded, partials);
}

/// A stage embedding over the batch: im2col rows of the images or of the previous stage's token
/// grids, the conv, its norm (batch statistics) and the position embedding.
#[allow(clippy::too_many_arguments)]
fn stage_forward(s: &mut StageEmbed, p: &[f32], images: &[f32], batch: usize, a: &mut StepActivations, out: &mut Vec<f32>, advance: bool) -> Result<()> {
    let (n, c, len) = (s.tokens(), s.dim(), s.conv.patch_len());
    let src: &[f32] = match s.conv.source {
        Source::Planes => images,
        Source::Rows => &a.x,
    };
    s.conv.im2col_batch(src, s.in_grid, batch, sized(&mut a.patches, batch * n * len));
    let out = sized(out, batch * n * c);
    match &mut s.norm {
        Some(norm) => {
            s.conv.proj.forward(p, &a.patches, sized(&mut a.embedded, batch * n * c), false); // (B·N, C)
            norm.forward(p, &a.embedded, out, &mut a.norm, c, advance)?;
        }
        None => s.conv.proj.forward(p, &a.patches, out, false),
    }
    if let Some(pos) = s.pos_embed {
        out.par_chunks_mut(n * c).for_each(|x| kernels::add_assign(x, &p[pos.range()]));
    }
    Ok(())
}

/// The position embedding's gradient summed over the images, the norm's and the conv's; returns
/// the gradient of the previous stage's tokens (nothing for a stage that reads the images).
fn stage_backward(s: &StageEmbed, p: &[f32], g: &mut [f32], a: &StepActivations, dy: &[f32], batch: usize, partials: &mut Vec<f32>) -> Vec<f32> {
    let (n, c, len) = (s.tokens(), s.dim(), s.conv.patch_len());
    if let Some(pos) = s.pos_embed {
        g[pos.range()].par_chunks_mut(c).enumerate().for_each(|(token, gp)| {
            for image in 0..batch {
                kernels::add_assign(gp, &dy[(image * n + token) * c..(image * n + token + 1) * c]);
            }
        });
    }
    let dembedded: Vec<f32> = match &s.norm {
        Some(norm) => {
            let mut d = vec![0.0; dy.len()];
            norm.backward(p, g, &a.embedded, dy, &mut d, &a.norm, c); // adds into d
            d
        }
        None => dy.to_vec(),
    };
    s.conv.proj.backward_params(g, &a.patches, &dembedded, partials);
    match s.conv.source {
        Source::Planes => Vec::new(),
        Source::Rows => {
            let mut dpatches = vec![0.0; a.patches.len()];
            s.conv.proj.backward_input(p, &dembedded, &mut dpatches, |_, _| {});
            let mut dx = vec![0.0; a.x.len()];
            dx.par_chunks_mut(a.x.len() / batch).zip(dpatches.par_chunks(n * len)).for_each(|(dx, dp)| s.conv.col2im_add(dp, s.in_grid, dx));
            dx
        }
    }
}

/// `out = x + mask·layer(norm(x))` over the batch, keeping the norm's and the layer's
/// activations.
fn residual_forward(r: &mut Residual, p: &[f32], a: &mut StepActivations, out: &mut Vec<f32>, batch: usize, advance: bool, rng: &mut Pcg64) -> Result<()> {
    let (len, t) = (a.x.len(), a.tokens);
    let c = len / (batch * t);
    a.mask = if r.drop_path > 0.0 { draw_mask(rng, batch, r.drop_path) } else { Vec::new() };
    let input: &[f32] = match &mut r.norm {
        Some(norm) => {
            norm.forward(p, &a.x, sized(&mut a.normed, len), &mut a.norm, c, advance)?;
            &a.normed
        }
        None => &a.x,
    };
    let out = sized(out, len);
    let kept = a.mask.is_empty();
    if kept {
        out.copy_from_slice(&a.x); // the layer adds its output to the residual
    }
    match &mut r.layer {
        Layer::Attention { attn, .. } => attn.forward(p, input, out, &mut a.attn, batch, t, kept)?,
        Layer::SpatialReduction { attn, .. } => attn.forward(p, input, out, &mut a.sr, batch, advance, kept)?,
        Layer::WindowAttention(attn) => attn.forward(p, input, out, &mut a.window, batch, kept)?,
        Layer::CrossShaped(attn) => attn.forward(p, input, out, &mut a.cross, batch, kept)?,
        Layer::WindowedLinear(attn) => attn.forward(p, input, out, &mut a.windowed_linear, batch, kept)?,
        Layer::Mlp(mlp) => mlp.forward(p, input, out, &mut a.mlp, kept),
    }
    if !kept {
        add_masked_branch(&a.x, out, &a.mask); // x + mask·layer(norm(x))
    }
    Ok(())
}

/// From `dy` = ∂L/∂(branch output) to ∂L/∂(branch input), in place.
fn residual_backward(r: &Residual, p: &[f32], g: &mut [f32], a: &StepActivations, dy: &mut [f32], s: &mut Scratch, batch: usize) {
    let (len, t) = (a.x.len(), a.tokens);
    let input = if r.norm.is_some() { &a.normed } else { &a.x };
    let mut dbranch = std::mem::take(&mut s.dbranch);
    let dout: &[f32] = if a.mask.is_empty() { dy } else { masked_gradient(dy, &a.mask, &mut dbranch) };
    let dinput = sized(&mut s.dnormed, len);
    match &r.layer {
        Layer::Attention { attn, .. } => attn.backward(p, g, input, &a.attn, dout, dinput, &mut s.attn, batch, t),
        Layer::SpatialReduction { attn, .. } => attn.backward(p, g, input, &a.sr, dout, dinput, &mut s.sr, batch),
        Layer::WindowAttention(attn) => attn.backward(p, g, &a.window, dout, dinput, &mut s.window, batch),
        Layer::CrossShaped(attn) => attn.backward(p, g, input, &a.cross, dout, dinput, &mut s.cross, batch),
        Layer::WindowedLinear(attn) => attn.backward(p, g, &a.windowed_linear, dout, dinput, &mut s.windowed_linear, batch),
        Layer::Mlp(mlp) => mlp.backward(p, g, input, &a.mlp, dout, dinput, &mut s.dhidden, &mut s.partials),
    }
    s.dbranch = dbranch;
    match &r.norm {
        Some(norm) => norm.backward(p, g, &a.x, &s.dnormed, dy, &a.norm, len / (batch * t)), // adds into dy
        None => kernels::add_assign(dy, &s.dnormed),
    }
}
