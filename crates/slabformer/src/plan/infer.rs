//! The plan's inference walk: one image (or one sequence of tokens) at a time, nothing kept.
//!
//! The token rows are split into `parts` row blocks, one per thread. Row-local work (norms,
//! MLPs, a mixing layer's query rows and its projection) runs block by block without the threads
//! meeting; a token-mixing layer first computes every block's keys and values (and SLA's partial
//! Σk and KᵀV, summed once all blocks are done), so the threads meet once per attention layer
//! and once around the embedding and the head.

use rayon::prelude::*;

use super::{Embed, Layer, Plan, Residual, StageEmbed, Step, TokenSteps};
use crate::kernels;
use crate::nn::attention::FastAttention;
use crate::nn::attention::cross_shaped_fast::{CrossShapedInferScratch, FastCrossShapedAttention};
use crate::nn::attention::spatial_reduction_fast::FastSrAttention;
use crate::nn::attention::window_fast::{WindowInferScratch, WindowedLinearInferScratch};
use crate::nn::conv::Source;
use crate::nn::norm::FastNorm;
use crate::nn::patch_merge::{FastPatchMerging, PatchMergeScratch};

/// One thread's inference activations for one sequence, with room for `parts` row blocks.
pub struct InferWorkspace {
    patches: Vec<f32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    mixed: Vec<f32>,
    /// (T, keys) attention scores (softmax / ReLU-L layers only).
    scores: Vec<f32>,
    /// Per row block: Σk (C) and K·V (heads × d × d) of SLA layers.
    k_sum: Vec<f32>,
    kv: Vec<f32>,
    hidden: Vec<f32>,
    /// The output gate's values (gated ReLU attention only).
    gate: Vec<f32>,
    /// Spatial-reduction layers only: queries (T, C), keys and values (N_r, 2C), the
    /// reduction's im2col rows, conv output and its norm, and v interpolated to (T, C).
    sr_q: Vec<f32>,
    sr_kv: Vec<f32>,
    sr_patches: Vec<f32>,
    sr_reduced: Vec<f32>,
    sr_normed: Vec<f32>,
    v_full: Vec<f32>,
    /// Window attention's, linear attention over windows' and patch merging's own buffers
    /// (Swin), sized on first use.
    window: WindowInferScratch,
    /// Cross-shaped attention's (CSWin), sized on first use.
    cross: CrossShapedInferScratch,
    windowed_linear: WindowedLinearInferScratch,
    merge: PatchMergeScratch,
    pooled: Vec<f32>,
    out: Vec<f32>,
    /// Tokens of the sequence the workspace holds now, and their width.
    tokens: usize,
    width: usize,
    /// The tokens the sequence starts with that the buffers are sized for.
    pub sized_for: usize,
    /// How many row blocks `k_sum` and `kv` have room for.
    pub parts: usize,
}

/// Inference workspaces kept between calls (a model's, a nested token run's): a thread takes one
/// for a call and the guard puts it back, so calls after the first allocate (and fault in)
/// nothing.
#[derive(Default)]
pub struct WorkspacePool(std::sync::Mutex<Vec<InferWorkspace>>);

impl WorkspacePool {
    /// A kept workspace that `fits`, or `make`'s.
    pub fn take(&self, fits: impl Fn(&InferWorkspace) -> bool, make: impl FnOnce() -> InferWorkspace) -> PooledWorkspace<'_> {
        let reused = {
            let mut kept = self.lock();
            kept.iter().position(fits).map(|i| kept.swap_remove(i))
        };
        PooledWorkspace { workspace: Some(reused.unwrap_or_else(make)), pool: self }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<InferWorkspace>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// An [`InferWorkspace`] taken from a [`WorkspacePool`], back in it when dropped.
pub struct PooledWorkspace<'a> {
    workspace: Option<InferWorkspace>,
    pool: &'a WorkspacePool,
}

impl std::ops::Deref for PooledWorkspace<'_> {
    type Target = InferWorkspace;
    fn deref(&self) -> &InferWorkspace {
        self.workspace.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for PooledWorkspace<'_> {
    fn deref_mut(&mut self) -> &mut InferWorkspace {
        self.workspace.as_mut().expect("present until dropped")
    }
}

impl Drop for PooledWorkspace<'_> {
    fn drop(&mut self) {
        if let Some(workspace) = self.workspace.take() {
            self.pool.lock().push(workspace);
        }
    }
}

impl InferWorkspace {
    /// Sized for `plan` on sequences that start with `tokens` tokens (the embedding steps set
    /// their own): every buffer as large as the step that needs most of it.
    pub fn new(plan: &Plan, tokens: usize, parts: usize) -> Self {
        Self::for_steps(&plan.steps, tokens, parts)
    }

    /// Sized for `steps` on sequences that start with `tokens` tokens.
    fn for_steps(steps: &[Step], tokens: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let (mut t, mut c) = (tokens, 0);
        let (mut x, mut patches, mut qkv, mut mixed, mut scores, mut k_sum, mut kv, mut hidden, mut gate, mut pooled, mut classes) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
        let (mut sr_q, mut sr_kv, mut sr_patches, mut sr_reduced, mut v_full) = (0, 0, 0, 0, 0);
        for step in steps {
            match step {
                Step::Rows(r) => (t, c) = (r.grid[0] * r.grid[1], r.chans),
                Step::Block(b) => {
                    let ([h, w], chans) = b.output();
                    (t, c) = (h * w, chans);
                }
                Step::Embed(e) => {
                    (t, c) = (e.tokens(), e.dim());
                    patches = patches.max(e.num_patches() * e.patch.patch_len());
                }
                Step::Stage(s) => {
                    (t, c) = (s.tokens(), s.dim());
                    patches = patches.max(t * s.conv.patch_len());
                }
                Step::Merge(m) => (t, c) = (m.out_tokens(), m.out_dim()),
                Step::Residual(r) => {
                    c = r.layer.dim();
                    match &r.layer {
                        Layer::Attention { attn, .. } => {
                            qkv = qkv.max(t * 3 * c);
                            mixed = mixed.max(t * c);
                            if attn.has_scores() {
                                scores = scores.max(t * t);
                            }
                            if attn.has_gate() {
                                gate = gate.max(t * c);
                            }
                            (k_sum, kv) = (k_sum.max(parts * c), kv.max(parts * c * c / attn.heads));
                        }
                        Layer::SpatialReduction { attn, .. } => {
                            let n_r = attn.keys();
                            (sr_q, mixed, sr_kv) = (sr_q.max(t * c), mixed.max(t * c), sr_kv.max(n_r * 2 * c));
                            (sr_patches, sr_reduced) = (sr_patches.max(n_r * attn.patch_len()), sr_reduced.max(if attn.reduces() { n_r * c } else { 0 }));
                            if attn.has_scores() {
                                scores = scores.max(t * n_r);
                            }
                            if attn.interpolates() {
                                v_full = v_full.max(t * c);
                            }
                            (k_sum, kv) = (k_sum.max(parts * c), kv.max(parts * c * c / attn.heads));
                        }
                        Layer::WindowAttention(_) | Layer::WindowedLinear(_) | Layer::CrossShaped(_) => {}
                        Layer::Mlp(mlp) => hidden = hidden.max(t * mlp.hidden()),
                    }
                }
                Step::Head(h) => classes = h.outputs,
                Step::DistilledHead(h) => classes = h.outputs(),
                Step::Pool(_) => pooled = pooled.max(c),
                Step::Norm(_) => {}
            }
            x = x.max(t * c);
        }
        InferWorkspace {
            patches: vec![0.0; patches],
            x: vec![0.0; x],
            normed: vec![0.0; x],
            qkv: vec![0.0; qkv],
            mixed: vec![0.0; mixed],
            scores: vec![0.0; scores],
            k_sum: vec![0.0; k_sum],
            kv: vec![0.0; kv],
            hidden: vec![0.0; hidden],
            gate: vec![0.0; gate],
            sr_q: vec![0.0; sr_q],
            sr_kv: vec![0.0; sr_kv],
            sr_patches: vec![0.0; sr_patches],
            sr_reduced: vec![0.0; sr_reduced],
            sr_normed: vec![0.0; sr_reduced],
            v_full: vec![0.0; v_full],
            window: WindowInferScratch::default(),
            cross: CrossShapedInferScratch::default(),
            windowed_linear: WindowedLinearInferScratch::default(),
            merge: PatchMergeScratch::default(),
            pooled: vec![0.0; pooled.max(c)],
            out: vec![0.0; classes],
            tokens,
            width: c,
            sized_for: tokens,
            parts,
        }
    }

    /// The (T, C) tokens the plan works on.
    pub fn tokens_mut(&mut self) -> &mut [f32] {
        &mut self.x
    }

    pub fn tokens(&self) -> &[f32] {
        &self.x
    }

    /// The rows per block when `tokens` rows are split into `parts` blocks.
    fn rows_per_part(&self, parts: usize) -> usize {
        assert!(parts <= self.parts, "workspace sized for {} row blocks, asked for {parts}", self.parts);
        self.tokens.div_ceil(parts.max(1)).max(1)
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

impl Plan {
    /// A workspace for inference on one image, its rows split into up to `parts` blocks.
    pub fn infer_workspace(&self, parts: usize) -> InferWorkspace {
        InferWorkspace::new(self, 0, parts)
    }

    /// One (C, H, W) image → its logits, its token rows split over `parts` threads.
    pub fn infer_image(&self, image: &[f32], logits: &mut [f32], ws: &mut InferWorkspace, parts: usize) {
        walk(&self.steps, &self.table.values, Some(image), ws, parts);
        logits.copy_from_slice(&ws.out);
    }

    /// The plan's steps on the `ws.tokens_mut()` sequence of a plan that starts from tokens
    /// (no embedding), in place.
    pub fn infer_tokens(&self, ws: &mut InferWorkspace, parts: usize) {
        walk(&self.steps, &self.table.values, None, ws, parts);
    }
}

impl TokenSteps {
    /// Eval mode on one image's `sequences` (S, T, C) sequences of `tokens` tokens, in place,
    /// the sequences split over up to `parts` threads.
    pub fn infer(&self, p: &[f32], x: &mut [f32], sequences: usize, tokens: usize, parts: usize) {
        let per_sequence = x.len() / sequences;
        let per_thread = sequences.div_ceil(parts.clamp(1, sequences)) * per_sequence;
        let jobs: Vec<_> = x.chunks_mut(per_thread).collect();
        for_each_part(jobs, |block| {
            let mut ws = self.infer_workspaces.take(|ws| ws.sized_for == tokens, || InferWorkspace::for_steps(&self.steps, tokens, 1));
            for sequence in block.chunks_mut(per_sequence) {
                (ws.tokens, ws.width) = (tokens, per_sequence / tokens);
                ws.x[..per_sequence].copy_from_slice(sequence);
                walk(&self.steps, p, None, &mut ws, 1);
                sequence.copy_from_slice(&ws.x[..per_sequence]);
            }
        });
    }
}

/// The inference walk of `steps` over the sequence `ws` holds (or that `image` embeds).
fn walk(steps: &[Step], p: &[f32], image: Option<&[f32]>, ws: &mut InferWorkspace, parts: usize) {
    // Steps whose row-local work waits to run in one pass over the row blocks.
    let mut pending = 0..0;
    for (i, step) in steps.iter().enumerate() {
        match step {
            Step::Residual(r @ Residual { layer: Layer::Attention { attn, .. }, .. }) => {
                row_pass(&steps[pending], p, ws, parts);
                key_pass(r, attn, p, ws, parts);
                pending = i..i + 1; // its query rows
                continue;
            }
            Step::Residual(r @ Residual { layer: Layer::SpatialReduction { attn, .. }, .. }) => {
                row_pass(&steps[pending], p, ws, parts);
                reduced_key_pass(r, attn, p, ws, parts);
                pending = i..i + 1; // its query rows
                continue;
            }
            Step::Residual(r @ Residual { layer: Layer::WindowAttention(_) | Layer::WindowedLinear(_), .. }) => {
                row_pass(&steps[pending], p, ws, parts);
                windowed(r, p, ws, parts);
                pending = i + 1..i + 1;
                continue;
            }
            Step::Residual(r @ Residual { layer: Layer::CrossShaped(attn), .. }) => {
                row_pass(&steps[pending], p, ws, parts);
                cross_shaped(r, attn, p, ws, parts);
                pending = i + 1..i + 1;
                continue;
            }
            Step::Residual(_) | Step::Norm(_) => {
                if pending.is_empty() {
                    pending.start = i;
                }
                pending.end = i + 1;
                continue;
            }
            _ => {}
        }
        row_pass(&steps[pending], p, ws, parts);
        pending = i + 1..i + 1;
        match step {
            Step::Embed(e) => embed(e, p, image.expect("an image for a plan that embeds one"), ws, parts),
            Step::Stage(s) => stage(s, p, image, ws, parts),
            Step::Merge(m) => merge(m, p, ws, parts),
            Step::Pool(pool) => {
                let c = ws.width;
                pool.apply(&ws.x[..ws.tokens * c], c, &mut ws.pooled[..c]);
            }
            Step::Head(head) => head.apply(p, &ws.pooled[..head.inputs], &mut ws.out),
            Step::DistilledHead(head) => head.apply(p, &ws.pooled[..head.inputs()], &mut ws.out),
            Step::Rows(r) => {
                let (n, c) = (r.grid[0] * r.grid[1], r.chans);
                r.rows_of(image.expect("an image for a plan that reads one"), &mut ws.x[..n * c]);
                (ws.tokens, ws.width) = (n, c);
            }
            Step::Block(b) => {
                let ([h, w], c) = b.output();
                b.infer(p, &ws.x[..ws.tokens * ws.width], &mut ws.normed[..h * w * c], parts);
                std::mem::swap(&mut ws.x, &mut ws.normed);
                (ws.tokens, ws.width) = (h * w, c);
            }
            Step::Residual(_) | Step::Norm(_) => unreachable!("row-local steps are pending above"),
        }
    }
    row_pass(&steps[pending], p, ws, parts);
}

/// Patch conv rows split over the threads, then the class token and the position embedding.
fn embed(e: &Embed, p: &[f32], image: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let c = e.dim();
    let (n, patch_len) = (e.num_patches(), e.patch.patch_len());
    e.patch.im2col(image, e.img_size, &mut ws.patches[..n * patch_len]);
    let first = usize::from(e.prepend_class_token);
    if first == 1 {
        ws.x[..c].copy_from_slice(&p[e.cls_token.range()]);
    }
    (ws.tokens, ws.width) = (first + n, c);
    let per = n.div_ceil(parts.max(1)).max(1);
    let jobs: Vec<_> = ws.patches[..n * patch_len].chunks(per * patch_len).zip(ws.x[first * c..(first + n) * c].chunks_mut(per * c)).collect();
    for_each_part(jobs, |(patches, x)| e.patch.proj.apply(p, patches, x)); // (N, C) after the class token
    kernels::add_assign(&mut ws.x[..ws.tokens * c], &p[e.pos_embed.range()]);
}

/// A stage embedding: im2col rows of the image or of the token grid the workspace holds (all of
/// them first: the conv's output overwrites its input), then the conv, norm and position
/// embedding row block by row block.
fn stage(s: &StageEmbed, p: &[f32], image: Option<&[f32]>, ws: &mut InferWorkspace, parts: usize) {
    let (n, len, c) = (s.tokens(), s.conv.patch_len(), s.dim());
    let per = n.div_ceil(parts.max(1)).max(1);
    let InferWorkspace { x, normed, patches, tokens, width, .. } = ws;
    {
        let src: &[f32] = match s.conv.source {
            Source::Planes => image.expect("an image for a plan that embeds one"),
            Source::Rows => &x[..*tokens * *width],
        };
        let jobs: Vec<_> = patches[..n * len].chunks_mut(per * len).enumerate().collect();
        for_each_part(jobs, |(i, patches)| s.conv.im2col(src, s.in_grid, i * per, patches));
    }
    (*tokens, *width) = (n, c);
    let jobs: Vec<_> = patches[..n * len].chunks(per * len).zip(x[..n * c].chunks_mut(per * c)).zip(normed.chunks_mut(per * c)).enumerate().collect();
    for_each_part(jobs, |(i, ((patches, x), normed))| {
        match &s.norm {
            Some(norm) => {
                let normed = &mut normed[..x.len()];
                s.conv.proj.apply(p, patches, normed);
                norm.infer(p, normed, x);
            }
            None => s.conv.proj.apply(p, patches, x),
        }
        if let Some(pos) = s.pos_embed {
            kernels::add_assign(x, &p[pos.range()][i * per * c..i * per * c + x.len()]);
        }
    });
}

/// A residual over windows (window attention, linear attention over windows): the norm row
/// block by row block (where there is one), then `x += attn(normed)` with the threads splitting
/// the windows; without a norm the layer reads the residual stream, which it only overwrites
/// once every window is mixed.
fn windowed(r: &Residual, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let (c, t, per) = (r.layer.dim(), ws.tokens, ws.rows_per_part(parts));
    let InferWorkspace { x, normed, window, windowed_linear, .. } = ws;
    let x = &mut x[..t * c];
    let input: &[f32] = match &r.norm {
        Some(norm) => {
            let normed = &mut normed[..t * c];
            let jobs: Vec<_> = x.chunks(per * c).zip(normed.chunks_mut(per * c)).collect();
            for_each_part(jobs, |(x, normed)| norm.infer(p, x, normed));
            normed
        }
        None => x,
    };
    match &r.layer {
        Layer::WindowAttention(attn) => attn.infer_mix(p, input, window, parts),
        Layer::WindowedLinear(attn) => attn.infer_mix(p, input, windowed_linear, parts),
        _ => unreachable!("only layers over windows run here"),
    }
    match &r.layer {
        Layer::WindowAttention(attn) => attn.infer_project(p, x, window, parts),
        Layer::WindowedLinear(attn) => attn.infer_project(p, x, windowed_linear, parts),
        _ => unreachable!("only layers over windows run here"),
    }
}

/// A cross-shaped attention residual, as [`window_attention`]: the norm row block by row block
/// (where there is one), then `x += attn(normed)` with the threads splitting the windows.
fn cross_shaped(r: &Residual, attn: &FastCrossShapedAttention, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let (c, t, per) = (attn.dim(), ws.tokens, ws.rows_per_part(parts));
    let InferWorkspace { x, normed, cross, .. } = ws;
    let x = &mut x[..t * c];
    match &r.norm {
        Some(norm) => {
            let normed = &mut normed[..t * c];
            let jobs: Vec<_> = x.chunks(per * c).zip(normed.chunks_mut(per * c)).collect();
            for_each_part(jobs, |(x, normed)| norm.infer(p, x, normed));
            attn.infer(p, normed, x, cross, parts);
        }
        None => {
            attn.infer_mix(p, x, cross, parts);
            attn.infer_project(p, x, cross, parts);
        }
    }
}

/// Patch merging into the second token buffer, which then holds the sequence.
fn merge(m: &FastPatchMerging, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let (n, c) = (m.out_tokens(), m.out_dim());
    let InferWorkspace { x, normed, merge, tokens, width, .. } = ws;
    m.infer(p, &x[..*tokens * *width], &mut normed[..n * c], merge, parts);
    std::mem::swap(x, normed);
    (*tokens, *width) = (n, c);
}

/// A spatial-reduction layer's first passes: block by block the norm, the queries and (without
/// reduction) the keys, values and partial sums; with reduction, the reduced rows' keys and
/// values from the whole normed grid, block by block; then the partial sums into the first
/// block's, and v interpolated to the query tokens where the layer does that.
fn reduced_key_pass(r: &Residual, attn: &FastSrAttention, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let c = attn.dim();
    let (d, n_r) = (c / attn.heads, attn.keys());
    let (t, per) = (ws.tokens, ws.rows_per_part(parts));
    let InferWorkspace { x, normed, sr_q, sr_kv, sr_patches, sr_reduced, sr_normed, v_full, k_sum, kv, .. } = ws;
    let kv_width = if attn.reduces() { 0 } else { 2 * c };
    let mut kv_rows = sr_kv.chunks_mut((per * kv_width).max(1));
    let jobs: Vec<_> = x[..t * c]
        .chunks(per * c)
        .zip(normed[..t * c].chunks_mut(per * c))
        .zip(sr_q.chunks_mut(per * c))
        .zip(k_sum.chunks_mut(c))
        .zip(kv.chunks_mut(c * d))
        .enumerate()
        .map(|(i, ((((x, normed), q), k_sum), kv))| (i, x, normed, q, next_block(&mut kv_rows, x.len() / c * kv_width), k_sum, kv))
        .collect();
    let mut blocks = jobs.len();
    for_each_part(jobs, |(i, x, normed, q, kv_rows, k_sum, kv)| {
        let input = norm_or_identity(r.norm.as_ref(), p, x, normed);
        attn.infer_rows(p, i * per, input, &mut q[..x.len()], kv_rows, k_sum, kv);
    });
    if attn.reduces() {
        let input: &[f32] = if r.norm.is_some() { &normed[..t * c] } else { &x[..t * c] };
        let (per_r, len) = (n_r.div_ceil(parts.max(1)).max(1), attn.patch_len());
        let jobs: Vec<_> = sr_kv[..n_r * 2 * c]
            .chunks_mut(per_r * 2 * c)
            .zip(sr_patches.chunks_mut(per_r * len))
            .zip(sr_reduced.chunks_mut(per_r * c))
            .zip(sr_normed.chunks_mut(per_r * c))
            .zip(k_sum.chunks_mut(c))
            .zip(kv.chunks_mut(c * d))
            .enumerate()
            .collect();
        blocks = jobs.len();
        for_each_part(jobs, |(i, (((((kv_rows, patches), reduced), normed), k_sum), kv))| {
            let rows = kv_rows.len() / (2 * c);
            attn.infer_reduce(p, i * per_r, input, &mut patches[..rows * len], &mut reduced[..rows * c], &mut normed[..rows * c], kv_rows, k_sum, kv);
        });
    }
    if !attn.has_scores() && blocks > 1 {
        let (first, rest) = k_sum.split_at_mut(c);
        rest.chunks(c).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
        let (first, rest) = kv.split_at_mut(c * d);
        rest.chunks(c * d).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
    }
    if attn.interpolates() {
        let kv_rows: &[f32] = &sr_kv[..n_r * 2 * c];
        let jobs: Vec<_> = v_full[..t * c].chunks_mut(per * c).enumerate().collect();
        for_each_part(jobs, |(i, v)| attn.infer_values(kv_rows, i * per, v));
    }
}

/// A mixing layer's first pass, block by block: the norm, then qkv (and SLA's feature maps, each
/// block's share of Σk and KᵀV), then the blocks' partial sums into the first's.
fn key_pass(r: &Residual, attn: &FastAttention, p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let c = attn.dim();
    let d = c / attn.heads;
    let (t, per) = (ws.tokens, ws.rows_per_part(parts));
    let InferWorkspace { x, normed, qkv, k_sum, kv, .. } = ws;
    let jobs: Vec<_> = x[..t * c].chunks(per * c).zip(normed[..t * c].chunks_mut(per * c)).zip(qkv.chunks_mut(per * 3 * c)).zip(k_sum.chunks_mut(c)).zip(kv.chunks_mut(c * d)).enumerate().collect();
    let blocks = jobs.len();
    for_each_part(jobs, |(i, ((((x, normed), qkv), k_sum), kv))| {
        let input = norm_or_identity(r.norm.as_ref(), p, x, normed);
        attn.infer_keys(p, i * per, input, &mut qkv[..x.len() * 3], k_sum, kv);
    });
    if blocks > 1 {
        let (first, rest) = k_sum.split_at_mut(c);
        rest.chunks(c).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
        let (first, rest) = kv.split_at_mut(c * d);
        rest.chunks(c * d).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
    }
}

/// Row-local work of `steps`, block by block: the first step may be a mixing layer whose keys
/// are done (its query rows, projection and residual run here); the others are norms and MLP
/// branches.
fn row_pass(steps: &[Step], p: &[f32], ws: &mut InferWorkspace, parts: usize) {
    let Some(first_step) = steps.first() else { return };
    let (c, t, per) = (ws.width, ws.tokens, ws.rows_per_part(parts));
    let hidden_width = steps.iter().map(|s| match s {
        Step::Residual(Residual { layer: Layer::Mlp(mlp), .. }) => mlp.hidden(),
        _ => 0,
    }).max().unwrap_or(0);
    let InferWorkspace { x, normed, qkv, mixed, scores, k_sum, kv, hidden, gate, sr_q, sr_kv, v_full, .. } = ws;
    let (qkv, k_sum, kv, sr_kv, v_full): (&[f32], &[f32], &[f32], &[f32], &[f32]) = (qkv, k_sum, kv, sr_kv, v_full);
    let mixing = match first_step {
        Step::Residual(Residual { layer: Layer::Attention { attn, inference_conv }, .. }) => {
            let conv = inference_conv.as_ref().and_then(|(taps, bias)| attn.conv_view(taps, bias));
            let d = c / attn.heads;
            Some((attn, conv, &k_sum[..c], &kv[..c * d]))
        }
        _ => None,
    };
    let reducing = match first_step {
        Step::Residual(Residual { layer: Layer::SpatialReduction { attn, inference_conv }, .. }) => {
            let conv = inference_conv.as_ref().and_then(|(taps, bias)| attn.conv_view(taps, bias));
            let d = c / attn.heads;
            let v_full = if attn.interpolates() { &v_full[..t * c] } else { &[][..] };
            Some((attn, conv, &k_sum[..c], &kv[..c * d], &sr_kv[..attn.keys() * 2 * c], v_full))
        }
        _ => None,
    };
    let score_width = match (&mixing, &reducing) {
        (Some((a, ..)), _) if a.has_scores() => t,
        (_, Some((a, ..))) if a.has_scores() => a.keys(),
        _ => 0,
    };
    let gate_width = if mixing.as_ref().is_some_and(|(a, ..)| a.has_gate()) { c } else { 0 };
    let q_width = if reducing.is_some() { c } else { 0 };
    let mixed_width = if mixing.is_some() || reducing.is_some() { c } else { 0 };
    let mut scores = scores.chunks_mut((per * score_width).max(1));
    let mut hidden = hidden.chunks_mut((per * hidden_width).max(1));
    let mut gate = gate.chunks_mut((per * gate_width).max(1));
    let mut queries = sr_q.chunks((per * q_width).max(1));
    let mut mixed = mixed.chunks_mut((per * mixed_width).max(1));
    let jobs: Vec<_> = x[..t * c]
        .chunks_mut(per * c)
        .zip(normed[..t * c].chunks_mut(per * c))
        .enumerate()
        .map(|(i, (x, normed))| {
            let rows = x.len() / c;
            let q = queries.next().map_or(&[][..], |q| &q[..rows * q_width]);
            let scratch = (next_block(&mut mixed, rows * mixed_width), next_block(&mut scores, rows * score_width), next_block(&mut hidden, rows * hidden_width), next_block(&mut gate, rows * gate_width));
            (i * per, x, normed, q, scratch)
        })
        .collect();
    for_each_part(jobs, |(first, x, normed, q, (mixed, scores, hidden, gate))| {
        for step in steps {
            match step {
                Step::Residual(r) => match &r.layer {
                    Layer::Attention { attn, .. } => {
                        let (_, conv, k_sum, kv) = mixing.as_ref().expect("a mixing layer only opens a pass");
                        // The gate reads the attention's input: the norm's output from the key
                        // pass, or x itself.
                        let input: &[f32] = if r.norm.is_some() { normed } else { x };
                        attn.infer_queries(p, first, qkv, k_sum, kv, conv.as_ref(), input, mixed, gate, scores);
                        attn.proj.apply_residual(p, mixed, x);
                    }
                    Layer::SpatialReduction { attn, .. } => {
                        let (_, conv, k_sum, kv, kv_rows, v_full) = reducing.as_ref().expect("a mixing layer only opens a pass");
                        attn.infer_queries(first, q, kv_rows, k_sum, kv, conv.as_ref(), v_full, mixed, scores);
                        attn.proj.apply_residual(p, mixed, x);
                    }
                    Layer::WindowAttention(_) | Layer::WindowedLinear(_) | Layer::CrossShaped(_) => unreachable!("layers over windows run as their own step"),
                    Layer::Mlp(mlp) => {
                        let hidden = &mut hidden[..x.len() / c * mlp.hidden()];
                        mlp.infer_hidden(p, norm_or_identity(r.norm.as_ref(), p, x, normed), hidden);
                        mlp.infer_residual(p, hidden, x);
                    }
                },
                Step::Norm(n) => {
                    n.infer(p, x, normed);
                    x.copy_from_slice(normed);
                }
                Step::Embed(_) | Step::Stage(_) | Step::Merge(_) | Step::Pool(_) | Step::Head(_) | Step::DistilledHead(_) | Step::Rows(_) | Step::Block(_) => unreachable!("only row-local steps wait for a row pass"),
            }
        }
    });
}
