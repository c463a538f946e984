//! [`CpuVit`]: the DeiT-family inference runtime.
//!
//! Layout: one image's tokens as a row-major (T, C) matrix; heads are column blocks read through
//! strided GEMM views, so no head split/merge copies. Biases and residuals are fused into the
//! GEMMs (the output starts as `x + bias` and the product is accumulated into it), GELU is applied
//! with fc1's bias in one pass, SLA's feature maps, normaliser and depthwise conv work on the qkv
//! buffer in place.
//!
//! A block is two passes over row blocks of the tokens: (A) norm1 → qkv (→ SLA feature maps and
//! this block's share of Σk and KᵀV), then, once every row's K and V exist, (B) attention of the
//! block's query rows → proj + residual → norm2 → MLP + residual. A batch is split over threads
//! image by image (each image's activations stay in its core's L2); a single image splits its
//! rows over the threads, which then meet twice per block.

use burn::module::Param;
use burn::nn::Linear;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;
use std::sync::Mutex;

use super::kernels::{self, MatMut, MatRef, matmul};
use crate::error::{Error, Result};
use crate::models::vit::{DeployVit, Pool, VisionTransformer, VitConfig};
use crate::nn::attention::{Attention, FeatureMap, Score};
use crate::nn::norm::{LayerNorm, Norm};
use crate::state::{host_f32, transpose_2d};

/// A linear layer as a row-major (inputs, outputs) weight matrix and a bias (zeros when the layer
/// has none).
struct Dense {
    weight: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Dense {
    fn from_linear(linear: &Linear) -> Self {
        let [inputs, outputs] = linear.weight.dims();
        Dense {
            weight: host_f32(linear.weight.val()), // burn keeps Linear weights as (in, out)
            bias: linear.bias.as_ref().map_or_else(|| vec![0.0; outputs], |b| host_f32(b.val())),
            inputs,
            outputs,
        }
    }

    /// A stride-p, p×p conv as a matrix over its im2col rows: weight (C_in·p·p, C_out).
    fn from_patch_conv(conv: &Conv2d) -> Self {
        let [outputs, in_chans, p, q] = conv.weight.dims();
        let inputs = in_chans * p * q;
        let weight = transpose_2d(&host_f32(conv.weight.val()), outputs, inputs); // (C_out, C_in·p·q) → (C_in·p·q, C_out)
        let bias = conv.bias.as_ref().map_or_else(|| vec![0.0; outputs], |b| host_f32(b.val()));
        Dense { weight, bias, inputs, outputs }
    }

    /// `out = epilogue(input · W, b)` for the rows `out` holds.
    fn apply_with(&self, input: &[f32], out: &mut [f32], epilogue: fn(&mut [f32], &[f32])) {
        let rows = out.len() / self.outputs;
        let input = MatRef::new(&input[..rows * self.inputs], rows, self.inputs);
        matmul(MatMut::new(out, rows, self.outputs), input, MatRef::new(&self.weight, self.inputs, self.outputs), false, 1.0);
        epilogue(out, &self.bias);
    }

    fn apply(&self, input: &[f32], out: &mut [f32]) {
        self.apply_with(input, out, kernels::add_bias);
    }

    /// `x += input · W + b`: a residual branch's output layer.
    fn apply_residual(&self, input: &[f32], x: &mut [f32]) {
        let rows = x.len() / self.outputs;
        kernels::add_bias(x, &self.bias);
        let input = MatRef::new(&input[..rows * self.inputs], rows, self.inputs);
        matmul(MatMut::new(x, rows, self.outputs), input, MatRef::new(&self.weight, self.inputs, self.outputs), true, 1.0);
    }
}

/// Splits a (rows, width) buffer into consecutive blocks of `per` rows.
fn row_blocks(buf: &mut [f32], width: usize, per: usize) -> impl Iterator<Item = &mut [f32]> {
    buf.chunks_mut(per * width)
}

/// Runs `f` on every item, in parallel when there is more than one.
fn for_each_part<T: Send>(parts: Vec<T>, f: impl Fn(T) + Sync + Send) {
    if parts.len() == 1 {
        parts.into_iter().for_each(f);
    } else {
        parts.into_par_iter().for_each(f);
    }
}

/// Rows `first..first + rows` of a strided view.
fn rows_of(m: MatRef<'_>, first: usize, rows: usize) -> MatRef<'_> {
    MatRef { offset: m.offset + first * m.row_stride, rows, ..m }
}

struct LayerNormParams {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl LayerNormParams {
    fn new(norm: &LayerNorm) -> Self {
        Self { weight: host_f32(norm.weight.val()), bias: host_f32(norm.bias.val()), eps: norm.eps as f32 }
    }

    fn from_norm(norm: &Norm) -> Result<Self> {
        match norm {
            Norm::LayerNorm(n) => Ok(Self::new(n)),
            _ => Err(Error::Config("the CPU runtime runs RepBN/PRepBN models in their fused form".into())),
        }
    }
}

/// `norm(x)` in `normed`, or `x` itself where the norm was folded away.
fn norm_or_identity<'a>(norm: Option<&LayerNormParams>, x: &'a [f32], normed: &'a mut [f32]) -> &'a [f32] {
    match norm {
        Some(ln) => {
            kernels::layer_norm(x, normed, &ln.weight, &ln.bias, ln.eps);
            normed
        }
        None => x,
    }
}

/// How a block mixes its tokens.
enum Mixer {
    /// Softmax or ReLU/L over the (T, T) score matrix of each head.
    Dot { score: Score },
    /// SLA: ReLU feature maps, K·V first, DWC on V (kernel taps tiled over the heads).
    Linear { positional_encoding: Vec<f32>, taps: Vec<f32>, dwc_bias: Vec<f32>, kernel: usize, grid: [usize; 2] },
}

/// A transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))` when it has an MLP (the
/// attention sweep runs blocks without one). Norms are absent in fused models.
struct CpuBlock {
    norm1: Option<LayerNormParams>,
    qkv: Dense,
    mixer: Mixer,
    proj: Dense,
    heads: usize,
    norm2: Option<LayerNormParams>,
    mlp: Option<(Dense, Dense)>,
}

/// Pass A's share of one row block.
struct PassA<'a> {
    first: usize,
    x: &'a [f32],
    normed: &'a mut [f32],
    qkv: &'a mut [f32],
    /// This block's Σ_j φ(k_j) (C) and every head's Σ_j φ(k_j)ᵀ v_j (heads × d × d), SLA only.
    k_sum: &'a mut [f32],
    kv: &'a mut [f32],
}

/// Pass B's share of one row block.
struct PassB<'a> {
    first: usize,
    x: &'a mut [f32],
    normed: &'a mut [f32],
    mixed: &'a mut [f32],
    scores: &'a mut [f32],
    hidden: &'a mut [f32],
}

impl CpuBlock {
    fn new(norms: Option<(&Norm, &Norm)>, attn: &Attention, mlp: Option<(&Linear, &Linear)>) -> Result<Self> {
        let unsupported = |what: &str| Err(Error::Config(format!("the CPU runtime does not run {what} yet; use the burn path")));
        let (qkv, proj, heads, mixer) = match attn {
            Attention::Dot(a) => {
                if a.q_norm.is_some() || a.gate.is_some() {
                    return unsupported("qk-norm or gated ReLU attention");
                }
                (&a.qkv, &a.proj, a.num_heads, Mixer::Dot { score: a.score })
            }
            Attention::Linear(a) => {
                if a.feature_map != FeatureMap::Relu {
                    return unsupported("focused linear attention");
                }
                let dim = a.qkv.weight.dims()[0];
                let [d, _, kernel, _] = a.dwc.weight.dims();
                let w = host_f32(a.dwc.weight.val()); // (d, 1, k, k), shared by every head
                let b = a.dwc.bias.as_ref().map(|b| host_f32(b.val())).unwrap_or_else(|| vec![0.0; d]);
                let (taps, dwc_bias) = kernels::tile_over_heads(&w, &b, dim, kernel);
                let mixer = Mixer::Linear {
                    positional_encoding: host_f32(a.positional_encoding.val()),
                    taps,
                    dwc_bias,
                    kernel,
                    grid: a.grid,
                };
                (&a.qkv, &a.proj, a.num_heads, mixer)
            }
        };
        let (norm1, norm2) = match norms {
            Some((n1, n2)) => (Some(LayerNormParams::from_norm(n1)?), Some(LayerNormParams::from_norm(n2)?)),
            None => (None, None),
        };
        Ok(CpuBlock {
            norm1,
            qkv: Dense::from_linear(qkv),
            mixer,
            proj: Dense::from_linear(proj),
            heads,
            norm2,
            mlp: mlp.map(|(fc1, fc2)| (Dense::from_linear(fc1), Dense::from_linear(fc2))),
        })
    }

    fn dim(&self) -> usize {
        self.qkv.inputs
    }

    /// The block on one sequence's (T, C) tokens in `ws.x`, its rows split into `parts` blocks.
    fn forward(&self, ws: &mut Workspace, parts: usize) {
        let c = self.dim();
        let d = c / self.heads;
        let t = ws.x.len() / c;
        assert!(parts <= ws.parts, "workspace sized for {} row blocks, asked for {parts}", ws.parts);
        let per = t.div_ceil(parts.max(1)).max(1);
        let Workspace { x, normed, qkv, mixed, scores, k_sum, kv, hidden, .. } = ws;

        let pass_a: Vec<PassA> = x
            .chunks(per * c)
            .zip(row_blocks(normed, c, per))
            .zip(row_blocks(qkv, 3 * c, per))
            .zip(k_sum.chunks_mut(c))
            .zip(kv.chunks_mut(c * d))
            .enumerate()
            .map(|(i, ((((x, normed), qkv), k_sum), kv))| PassA { first: i * per, x, normed, qkv, k_sum, kv })
            .collect();
        let blocks = pass_a.len();
        for_each_part(pass_a, |part| self.pass_a(part));
        if blocks > 1 {
            // Every block's partial Σk and KᵀV into the first's.
            let (first, rest) = k_sum.split_at_mut(c);
            rest.chunks(c).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
            let (first, rest) = kv.split_at_mut(c * d);
            rest.chunks(c * d).take(blocks - 1).for_each(|p| kernels::add_assign(first, p));
        }

        let (qkv, k_sum, kv): (&[f32], &[f32], &[f32]) = (qkv, &k_sum[..c], &kv[..c * d]);
        let hidden_width = self.mlp.as_ref().map_or(0, |(fc1, _)| fc1.outputs);
        let score_width = if matches!(self.mixer, Mixer::Dot { .. }) { t } else { 0 };
        let mut scores = row_blocks(scores, score_width.max(1), per);
        let mut hidden = row_blocks(hidden, hidden_width.max(1), per);
        let pass_b: Vec<PassB> = row_blocks(x, c, per)
            .zip(row_blocks(normed, c, per))
            .zip(row_blocks(mixed, c, per))
            .enumerate()
            .map(|(i, ((x, normed), mixed))| {
                let rows = x.len() / c;
                PassB { first: i * per, x, normed, mixed, scores: next_block(&mut scores, rows * score_width), hidden: next_block(&mut hidden, rows * hidden_width) }
            })
            .collect();
        for_each_part(pass_b, |part| self.pass_b(part, qkv, k_sum, kv, t));
    }

    /// norm1 → qkv for a row block; SLA: feature maps, then the block's Σk and KᵀV.
    fn pass_a(&self, part: PassA<'_>) {
        let PassA { first, x, normed, qkv, k_sum, kv } = part;
        let c = self.dim();
        let d = c / self.heads;
        let rows = x.len() / c;
        self.qkv.apply(norm_or_identity(self.norm1.as_ref(), x, normed), qkv); // (rows, 3C)
        if let Mixer::Linear { positional_encoding, .. } = &self.mixer {
            kernels::sla_feature_maps(qkv, &positional_encoding[first * c..], c);
            kernels::column_sums(qkv, rows, 3 * c, c, k_sum);
            for h in 0..self.heads {
                let k = MatRef::columns(qkv, rows, 3 * c, c + h * d, d);
                let v = MatRef::columns(qkv, rows, 3 * c, 2 * c + h * d, d);
                matmul(MatMut::new(&mut kv[h * d * d..(h + 1) * d * d], d, d), k.t(), v, false, 1.0); // (d, d)
            }
        }
    }

    /// Attention of a block of query rows over all T keys → proj + residual → norm2 → MLP +
    /// residual.
    fn pass_b(&self, part: PassB<'_>, qkv: &[f32], k_sum: &[f32], kv: &[f32], t: usize) {
        let PassB { first, x, normed, mixed, scores, hidden } = part;
        let c = self.dim();
        let d = c / self.heads;
        let rows = x.len() / c;
        let column = |start: usize| MatRef::columns(qkv, t, 3 * c, start, d);
        match &self.mixer {
            Mixer::Dot { score } => {
                let scale = (d as f32).powf(-0.5);
                for h in 0..self.heads {
                    let (q, k, v) = (column(h * d), column(c + h * d), column(2 * c + h * d));
                    matmul(MatMut::new(scores, rows, t), rows_of(q, first, rows), k.t(), false, scale); // (rows, T)
                    match score {
                        Score::Softmax => kernels::softmax_rows(scores, t),
                        Score::ReluOverLength => kernels::scaled_relu(scores, 1.0 / t as f32),
                    }
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), MatRef::new(scores, rows, t), v, false, 1.0);
                }
            }
            Mixer::Linear { taps, dwc_bias, kernel, grid, .. } => {
                for h in 0..self.heads {
                    let kv = MatRef::new(&kv[h * d * d..(h + 1) * d * d], d, d);
                    matmul(MatMut::columns(mixed, rows, c, h * d, d), rows_of(column(h * d), first, rows), kv, false, 1.0);
                    kernels::normalize_rows(rows, mixed, c, h * d, &qkv[first * 3 * c..], 3 * c, h * d, &k_sum[h * d..(h + 1) * d], 1e-6);
                }
                let conv = kernels::DepthwiseConv { taps, bias: dwc_bias, grid: *grid, kernel: *kernel };
                conv.add_to(qkv, 3 * c, 2 * c, mixed, first);
            }
        }
        self.proj.apply_residual(mixed, x);
        if let Some((fc1, fc2)) = &self.mlp {
            fc1.apply_with(norm_or_identity(self.norm2.as_ref(), x, normed), hidden, kernels::bias_gelu);
            fc2.apply_residual(hidden, x);
        }
    }
}

/// The next row block of a split buffer, trimmed to `len` values (empty when `len` is 0).
fn next_block<'a>(blocks: &mut impl Iterator<Item = &'a mut [f32]>, len: usize) -> &'a mut [f32] {
    match blocks.next() {
        Some(block) => &mut block[..len],
        None => &mut [],
    }
}

/// One attention layer on its own with its residual, `x + attn(x)`, for the attention scaling
/// sweep.
pub struct CpuAttention {
    block: CpuBlock,
}

impl CpuAttention {
    pub fn new(attn: &Attention) -> Result<Self> {
        Ok(Self { block: CpuBlock::new(None, attn, None)? })
    }

    /// (T, C) tokens → `x + attn(x)` for one sequence, rows split over the threads. Its buffers
    /// are allocated here, sized for T: softmax's (T, T) score matrix, SLA's (d, d) states.
    pub fn forward(&self, tokens: &[f32]) -> Result<Vec<f32>> {
        let c = self.block.dim();
        if tokens.is_empty() || !tokens.len().is_multiple_of(c) {
            return Err(Error::InputShape { layer: "attention", expected: format!("(T, {c}) tokens"), found: vec![tokens.len()] });
        }
        let t = tokens.len() / c;
        if let Mixer::Linear { grid, .. } = &self.block.mixer
            && grid[0] * grid[1] != t
        {
            return Err(Error::InputShape { layer: "attention", expected: format!("{} tokens on the {grid:?} grid", grid[0] * grid[1]), found: vec![t, c] });
        }
        let parts = rayon::current_num_threads();
        let mut ws = Workspace::new(t, c, &[&self.block], 0, parts);
        ws.x.copy_from_slice(tokens);
        self.block.forward(&mut ws, parts);
        Ok(ws.x)
    }
}

/// A [`Workspace`] borrowed from a model's pool.
struct PooledWorkspace<'a> {
    workspace: Option<Workspace>,
    pool: &'a Mutex<Vec<Workspace>>,
}

impl std::ops::Deref for PooledWorkspace<'_> {
    type Target = Workspace;
    fn deref(&self) -> &Workspace {
        self.workspace.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for PooledWorkspace<'_> {
    fn deref_mut(&mut self) -> &mut Workspace {
        self.workspace.as_mut().expect("present until dropped")
    }
}

impl Drop for PooledWorkspace<'_> {
    fn drop(&mut self) {
        if let Some(workspace) = self.workspace.take() {
            self.pool.lock().unwrap_or_else(|p| p.into_inner()).push(workspace);
        }
    }
}

/// One thread's activations for one sequence of T tokens, with room for `parts` row blocks.
struct Workspace {
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
    pooled: Vec<f32>,
    /// How many row blocks `k_sum` and `kv` have room for.
    parts: usize,
}

impl Workspace {
    fn new(t: usize, c: usize, blocks: &[&CpuBlock], patch_len: usize, parts: usize) -> Self {
        let parts = parts.max(1);
        let hidden = blocks.iter().filter_map(|b| b.mlp.as_ref().map(|(fc1, _)| fc1.outputs)).max().unwrap_or(0);
        let dot = blocks.iter().any(|b| matches!(b.mixer, Mixer::Dot { .. }));
        let d = blocks.iter().map(|b| c / b.heads).max().unwrap_or(0);
        Workspace {
            patches: vec![0.0; t * patch_len],
            x: vec![0.0; t * c],
            normed: vec![0.0; t * c],
            qkv: vec![0.0; t * 3 * c],
            mixed: vec![0.0; t * c],
            scores: vec![0.0; if dot { t * t } else { 0 }],
            k_sum: vec![0.0; parts * c],
            kv: vec![0.0; parts * c * d],
            hidden: vec![0.0; t * hidden],
            pooled: vec![0.0; c],
            parts,
        }
    }
}

/// A DeiT-family model prepared for fast CPU inference: DeiT, PRepBN-DeiT and SLAB-DeiT (fused),
/// LayerNorm models as they are; softmax, ReLU/L and SLA attention. Outputs equal the burn
/// forward of the same model within float rounding (tested to 1e-4 of the largest logit).
pub struct CpuVit {
    config: VitConfig,
    patch_embed: Dense,
    cls_token: Vec<f32>,
    pos_embed: Vec<f32>,
    blocks: Vec<CpuBlock>,
    norm: Option<LayerNormParams>,
    head: Dense,
    workspaces: Mutex<Vec<Workspace>>,
}

impl CpuVit {
    /// From a trained model: RepBN/PRepBN models are fused first; LayerNorm models keep their
    /// norms.
    pub fn new(model: &VisionTransformer) -> Result<Self> {
        if let Ok(deploy) = model.fuse() {
            return Self::from_deploy(&deploy);
        }
        let blocks = model
            .blocks
            .iter()
            .map(|b| CpuBlock::new(Some((&b.norm1, &b.norm2)), &b.attn, Some((&b.mlp.fc1, &b.mlp.fc2))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::assemble(&model.config, &model.patch_embed.proj, &model.cls_token, &model.pos_embed, blocks, Some(LayerNormParams::from_norm(&model.norm)?), &model.head))
    }

    /// From the norm-free deploy form.
    pub fn from_deploy(model: &DeployVit) -> Result<Self> {
        let blocks = model
            .blocks
            .iter()
            .map(|b| CpuBlock::new(None, &b.attn, Some((&b.mlp.fc1, &b.mlp.fc2))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::assemble(&model.config, &model.patch_embed.proj, &model.cls_token, &model.pos_embed, blocks, None, &model.head))
    }

    fn assemble(
        config: &VitConfig,
        patch_conv: &Conv2d,
        cls_token: &Param<Tensor<3>>,
        pos_embed: &Param<Tensor<3>>,
        blocks: Vec<CpuBlock>,
        norm: Option<LayerNormParams>,
        head: &Linear,
    ) -> Self {
        CpuVit {
            config: config.clone(),
            patch_embed: Dense::from_patch_conv(patch_conv),
            cls_token: host_f32(cls_token.val()),
            pos_embed: host_f32(pos_embed.val()),
            blocks,
            norm,
            head: Dense::from_linear(head),
            workspaces: Mutex::new(Vec::new()),
        }
    }

    pub fn config(&self) -> &VitConfig {
        &self.config
    }

    /// Images (B, C, H, W) → logits (B, num_classes), on the device of the input.
    pub fn forward_tensor(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let [b, ..] = images.dims();
        self.check_input(&images.dims())?;
        let device = images.device();
        let logits = self.forward(&host_f32(images), b)?;
        Ok(Tensor::from_data(TensorData::new(logits, [b, self.config.num_classes]), &device))
    }

    fn check_input(&self, dims: &[usize]) -> Result<()> {
        let cfg = &self.config;
        let expected = [dims[0], cfg.in_chans, cfg.img_size, cfg.img_size];
        if dims.len() != 4 || dims[0] == 0 || dims != expected {
            return Err(Error::InputShape {
                layer: "vision transformer",
                expected: format!("(B > 0, {}, {}, {}) images", cfg.in_chans, cfg.img_size, cfg.img_size),
                found: dims.to_vec(),
            });
        }
        Ok(())
    }

    /// `batch` images, row-major (B, C, H, W) → row-major (B, num_classes) logits.
    pub fn forward(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let cfg = &self.config;
        let per_image = cfg.in_chans * cfg.img_size * cfg.img_size;
        if batch == 0 || images.len() != batch * per_image {
            return Err(Error::InputShape {
                layer: "vision transformer",
                expected: format!("{batch} × ({}, {}, {}) = {} values", cfg.in_chans, cfg.img_size, cfg.img_size, batch * per_image),
                found: vec![images.len()],
            });
        }
        let classes = cfg.num_classes;
        let mut logits = vec![0.0; batch * classes];
        let threads = rayon::current_num_threads();
        if batch == 1 || threads == 1 {
            // One image: its token rows are split over the threads.
            let mut ws = self.workspace(threads);
            for (image, out) in images.chunks_exact(per_image).zip(logits.chunks_exact_mut(classes)) {
                self.forward_image(image, out, &mut ws, threads);
            }
        } else {
            logits
                .par_chunks_exact_mut(classes)
                .zip(images.par_chunks_exact(per_image))
                .for_each_init(|| self.workspace(1), |ws, (out, image)| self.forward_image(image, out, ws, 1));
        }
        Ok(logits)
    }

    /// A workspace from the pool (returned when the guard drops), or a new one: reusing them
    /// spares page faults on every call.
    fn workspace(&self, parts: usize) -> PooledWorkspace<'_> {
        let reused = self.workspaces.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let workspace = reused.filter(|ws| ws.parts >= parts).unwrap_or_else(|| {
            let blocks: Vec<&CpuBlock> = self.blocks.iter().collect();
            Workspace::new(self.config.num_tokens(), self.config.embed_dim, &blocks, self.patch_embed.inputs, parts)
        });
        PooledWorkspace { workspace: Some(workspace), pool: &self.workspaces }
    }

    fn forward_image(&self, image: &[f32], logits: &mut [f32], ws: &mut Workspace, parts: usize) {
        let cfg = &self.config;
        let (c, p, size) = (cfg.embed_dim, cfg.patch_size, cfg.img_size);
        let [rows, cols] = cfg.grid();
        let n = rows * cols;
        // im2col: one row per patch, (channel, i, j) order like the conv weight.
        let patch_len = self.patch_embed.inputs;
        for r in 0..rows {
            for q in 0..cols {
                let dst = &mut ws.patches[(r * cols + q) * patch_len..(r * cols + q + 1) * patch_len];
                for ch in 0..cfg.in_chans {
                    for i in 0..p {
                        let src = ch * size * size + (r * p + i) * size + q * p;
                        dst[(ch * p + i) * p..(ch * p + i + 1) * p].copy_from_slice(&image[src..src + p]);
                    }
                }
            }
        }
        let first = match cfg.pool {
            Pool::ClassToken => {
                ws.x[..c].copy_from_slice(&self.cls_token);
                1
            }
            Pool::Mean => 0,
        };
        let per = n.div_ceil(parts.max(1)).max(1);
        let jobs: Vec<_> = ws.patches[..n * patch_len].chunks(per * patch_len).zip(ws.x[first * c..].chunks_mut(per * c)).collect();
        for_each_part(jobs, |(patches, x)| self.patch_embed.apply(patches, x)); // (N, C) after the class token
        kernels::add_assign(&mut ws.x, &self.pos_embed);
        for block in &self.blocks {
            block.forward(ws, parts);
        }
        let t = first + n;
        let tokens = match (&self.norm, cfg.pool) {
            (Some(ln), Pool::ClassToken) => {
                kernels::layer_norm(&ws.x[..c], &mut ws.normed[..c], &ln.weight, &ln.bias, ln.eps);
                &ws.normed[..c]
            }
            (Some(ln), Pool::Mean) => {
                kernels::layer_norm(&ws.x, &mut ws.normed, &ln.weight, &ln.bias, ln.eps);
                &ws.normed[..t * c]
            }
            (None, Pool::ClassToken) => &ws.x[..c],
            (None, Pool::Mean) => &ws.x[..t * c],
        };
        match cfg.pool {
            Pool::ClassToken => ws.pooled.copy_from_slice(tokens),
            Pool::Mean => {
                kernels::column_sums(tokens, t, c, 0, &mut ws.pooled);
                ws.pooled.iter_mut().for_each(|v| *v /= t as f32);
            }
        }
        self.head.apply(&ws.pooled, logits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};
    use crate::nn::attention::AttentionKind;
    use crate::nn::norm::NormKind;

    fn max_abs(t: Tensor<2>) -> f32 {
        t.abs().max().into_scalar()
    }

    /// Non-trivial BatchNorm statistics and norm affines, so fusing changes every weight, and
    /// weights scaled up from their init so activations are O(1) and every op shows in the
    /// logits (BatchNorm with fixed statistics does not rescale activations: those models take
    /// less). Checked: a 1 % change of the DWC bias or 0.02 % of GELU fails the comparison.
    fn randomized(config: VitConfig, device: &Device) -> VisionTransformer {
        let weight_scale = if config.norm == NormKind::layer_norm(1e-6) { 10.0 } else { 5.0 };
        let model = config.init(device).unwrap();
        crate::state::map_float_tensors(model, |key, t| {
            let n = t.dims()[0];
            let uniform = |lo, hi| Tensor::<1>::random([n], Distribution::Uniform(lo, hi), &t.device());
            if key.ends_with("running_var") {
                Some(uniform(0.5, 2.0))
            } else if key.ends_with("running_mean") || key.ends_with("bias") || key.ends_with("alpha") {
                Some(uniform(-0.5, 0.5))
            } else if key.contains("norm") && key.ends_with("weight") {
                Some(uniform(0.5, 1.5))
            } else if key.contains("positional_encoding") || key.contains("pos_embed") || key.contains("cls_token") {
                Some(t.random_like(Distribution::Normal(0.0, 0.2)))
            } else if key.ends_with("weight") {
                Some(t.mul_scalar(weight_scale))
            } else {
                None
            }
        })
    }

    #[test]
    fn runtime_equals_the_burn_forward_for_every_supported_kind() {
        let device = Device::flex();
        let small = |base: VitConfig| VitConfig { img_size: 32, patch_size: 4, embed_dim: 48, depth: 2, num_heads: 3, num_classes: 10, ..base };
        let configs = [
            small(VitConfig::deit_tiny()),
            small(VitConfig::prepbn_deit_tiny()),
            small(VitConfig::slab_deit_tiny()),
            VitConfig { attention: AttentionKind::ReluL { qk_norm: false, gated: false }, ..small(VitConfig::relu_vit_tiny()) },
        ];
        for config in configs {
            let model = randomized(config.clone(), &device);
            let runtime = CpuVit::new(&model).unwrap();
            for batch in [1, 5] {
                let images = Tensor::<4>::random([batch, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
                let want = model.forward(images.clone());
                let got = runtime.forward_tensor(images).unwrap();
                let scale = max_abs(want.clone());
                let diff = max_abs(got.sub(want));
                assert!(diff <= 1e-4 * scale, "{:?} batch {batch}: {diff} vs max |logit| {scale}", config.attention);
            }
        }
    }

    #[test]
    fn a_single_attention_layer_with_its_residual_equals_burn() {
        use crate::nn::attention::AttentionConfig;
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla()] {
            let config = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind, grid: Some([8, 8]) };
            let attn = crate::state::map_float_tensors(config.init(&device), |key, t| {
                (key.contains("weight") || key.contains("positional")).then(|| t.random_like(Distribution::Normal(0.0, 0.3)))
            });
            let x = Tensor::<3>::random([1, 64, 48], Distribution::Normal(0.0, 1.0), &device);
            let want = host_f32(attn.forward(x.clone()).add(x.clone())); // with the residual
            let got = CpuAttention::new(&attn).unwrap().forward(&host_f32(x)).unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.1 && diff <= 1e-5 * scale, "{kind:?}: {diff} vs {scale}");
        }
        let sla = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([8, 8]) }.init(&device);
        assert!(CpuAttention::new(&sla).unwrap().forward(&[0.0; 48 * 63]).is_err());
    }

    #[test]
    fn the_deploy_form_and_the_trained_form_give_one_runtime() {
        let device = Device::flex();
        let config = VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 1, num_heads: 2, num_classes: 4, ..VitConfig::slab_deit_tiny() };
        let model = randomized(config, &device);
        let images = Tensor::<4>::random([3, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let a = CpuVit::new(&model).unwrap().forward_tensor(images.clone()).unwrap();
        let b = CpuVit::from_deploy(&model.fuse().unwrap()).unwrap().forward_tensor(images).unwrap();
        assert_eq!(host_f32(a), host_f32(b));
    }

    #[test]
    fn wrong_inputs_and_unsupported_models_are_errors() {
        let device = Device::flex();
        let config = VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 1, num_heads: 2, num_classes: 4, ..VitConfig::slab_deit_tiny() };
        let runtime = CpuVit::new(&config.init(&device).unwrap()).unwrap();
        let err = runtime.forward_tensor(Tensor::zeros([2, 3, 28, 28], &device)).unwrap_err();
        assert!(err.to_string().contains("[2, 3, 28, 28]"), "{err}");
        assert!(runtime.forward(&[0.0; 10], 1).is_err());
        let focused = VitConfig { attention: AttentionKind::focused(), ..config };
        let err = CpuVit::new(&focused.init(&device).unwrap()).err().unwrap();
        assert!(err.to_string().contains("focused"), "{err}");
    }
}
