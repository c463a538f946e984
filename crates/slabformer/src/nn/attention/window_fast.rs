//! Swin window attention on the fast path ([`FastWindowAttention`]), lowered from the burn
//! [`WindowAttention`] and its block's [`WindowGrid`]: pad to whole windows, cyclic shift,
//! softmax MHSA inside each M×M window with the relative position bias `table[index]` (and the
//! shifted-window mask), projection.
//!
//! Layout: an image's tokens are a raster (H·W, C) row block. The layer gathers them in *window
//! order* — the windows of the padded, shifted map row-major, each window's M² tokens row-major,
//! padded positions filled with zeros (or a fused block's pad token) — so every window is a
//! contiguous (M², ·) row block: qkv is one GEMM over all windows' rows, each head's scores and
//! weighted values are GEMMs on strided column views of its window's block (no head split or
//! merge copies), and the projection reads the mixed rows gathered back into raster order. The
//! window ↔ raster maps are computed once, at lowering; nothing is allocated per window.
//!
//! SLA / FLatten stages of SLAB-Swin run the existing [`FastAttention`] when their window is the
//! whole stage map, and [`FastWindowedLinear`] (the same attention per window, over the same
//! window-order rows) when the map has several windows.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::kernels as attention_kernels;
use super::window::{MaskBuffer, WindowAttention, WindowGrid};
use super::{Attention, AttentionActivations, AttentionScratch, FastAttention, LinearAttention};
use crate::error::{Error, Result};
use crate::kernels::{self, MatMut, MatRef, matmul};
use crate::nn::linear::FastLinear;
use crate::nn::lower::{Layout, ParamTable, Slot, for_each_part, row_block, sized};
use crate::state::host_f32;

/// A window-order position that holds padding, not a token of the map.
const PAD: u32 = u32::MAX;

/// Window attention of one Swin block on the fast path.
pub struct FastWindowAttention {
    pub qkv: FastLinear,
    pub proj: FastLinear,
    pub heads: usize,
    pub grid: WindowGrid,
    /// `relative_position_bias_table`, ((2M−1)², heads) as in the official state.
    bias_table: Slot,
    /// `relative_position_index`, (M², M²).
    index: Vec<u32>,
    maps: WindowMaps,
    /// Per window of an image: where its (M², M²) mask starts in `masks`; `None` without a mask
    /// or where the mask is all zeros (interior windows of a shifted block).
    mask_of: Vec<Option<usize>>,
    masks: Vec<f32>,
}

/// An image's rows in window order and back, for a block's grid: which raster token each
/// window-order position holds (or padding), where each raster token sits, and what padded
/// positions hold.
struct WindowMaps {
    /// Window-order position (Hp·Wp of them) → raster token of the image, or [`PAD`].
    source: Vec<u32>,
    /// Raster token (H·W) → its window-order position.
    position: Vec<u32>,
    /// What padded positions hold: a fused block's pad token (C), zeros otherwise.
    pad: Option<Vec<f32>>,
}

impl WindowMaps {
    /// The maps of `grid` for C = `dim`; `pad` is checked to be C wide.
    fn new(grid: &WindowGrid, pad: Option<&Tensor<1>>, dim: usize) -> Result<Self> {
        let pad = match pad {
            Some(token) => {
                let values = host_f32(token.clone());
                if values.len() != dim {
                    return Err(config_error(format!("the pad token has {} values for width {dim}", values.len())));
                }
                Some(values)
            }
            None => None,
        };
        let (source, position) = window_order(grid);
        Ok(Self { source, position, pad })
    }

    /// Tokens of an image, H·W.
    fn tokens(&self) -> usize {
        self.position.len()
    }

    /// Window-order rows of an image, Hp·Wp.
    fn window_rows(&self) -> usize {
        self.source.len()
    }

    /// Window-order rows `first..` (counted over the batch) of the C-wide raster rows `x` into
    /// `out`; padded positions hold the pad token where `padded` (zeros without one), else zeros
    /// (a gradient's window order).
    fn gather_windows(&self, c: usize, x: &[f32], first: usize, out: &mut [f32], padded: bool) {
        let (per_image, tokens) = (self.window_rows(), self.tokens());
        let pad = self.pad.as_deref().filter(|_| padded);
        for (k, row) in out.chunks_exact_mut(c).enumerate() {
            let (image, at) = ((first + k) / per_image, (first + k) % per_image);
            match (self.source[at], pad) {
                (PAD, Some(token)) => row.copy_from_slice(token),
                (PAD, None) => row.fill(0.0),
                (src, _) => {
                    let src = image * tokens + src as usize;
                    row.copy_from_slice(&x[src * c..(src + 1) * c]);
                }
            }
        }
    }

    /// Raster rows `first..` (counted over the batch) of the C-wide window-order rows `windows`
    /// into `out`, added to what it holds where `accumulate`; padded positions are dropped.
    fn gather_raster(&self, c: usize, windows: &[f32], first: usize, out: &mut [f32], accumulate: bool) {
        let (per_image, tokens) = (self.window_rows(), self.tokens());
        for (k, row) in out.chunks_exact_mut(c).enumerate() {
            let (image, token) = ((first + k) / tokens, (first + k) % tokens);
            let src = image * per_image + self.position[token] as usize;
            let src = &windows[src * c..(src + 1) * c];
            if accumulate {
                kernels::add_assign(row, src);
            } else {
                row.copy_from_slice(src);
            }
        }
    }
}

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct WindowAttentionActivations {
    /// (B·Hp·Wp, C): the input in window order, padded.
    windows: Vec<f32>,
    /// (B·Hp·Wp, 3C).
    qkv: Vec<f32>,
    /// (heads, M², M²): the gathered relative position bias of this forward.
    bias: Vec<f32>,
    /// (B·nW, heads, M², M²) attention weights.
    probs: Vec<f32>,
    /// (B·Hp·Wp, C) heads side by side before proj, window order.
    mixed: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct WindowAttentionScratch {
    /// (B·Hp·Wp, C): the output gradient in window order, then the input gradient's.
    dwindows: Vec<f32>,
    dmixed: Vec<f32>,
    dqkv: Vec<f32>,
    /// Per task: dP (M², M²) and its share of the bias gradient (heads, M², M²).
    bias_partials: Vec<f32>,
    /// The Linears' weight-gradient partials.
    partials: Vec<f32>,
}

/// Reusable inference buffers for one image.
#[derive(Default)]
pub struct WindowInferScratch {
    /// (Hp·Wp, C): the input in window order, then the mixed rows back in raster order.
    rows: Vec<f32>,
    /// (Hp·Wp, 3C).
    qkv: Vec<f32>,
    /// (Hp·Wp, C), window order.
    mixed: Vec<f32>,
    /// (heads, M², M²).
    bias: Vec<f32>,
    /// Per part: the (heads, M², M²) weights of the window it is on.
    weights: Vec<f32>,
}

fn config_error(what: String) -> Error {
    Error::Config(format!("window attention on the fast path: {what}"))
}

impl FastWindowAttention {
    /// `mask`: the block's `attn_mask` buffer (shifted blocks), read as loaded; `pad`: what a
    /// fused block pads its windows with (its folded norm's zero, `−b/a`), zeros if `None`.
    pub fn lower(attn: &WindowAttention, grid: WindowGrid, mask: Option<&MaskBuffer>, pad: Option<&Tensor<1>>, table: &mut ParamTable) -> Result<Self> {
        let (c, heads, m) = (attn.dim(), attn.num_heads, grid.window);
        if attn.window != m {
            return Err(config_error(format!("its windows are {0}×{0} but the block's grid has {m}×{m}", attn.window)));
        }
        if heads == 0 || !c.is_multiple_of(heads) {
            return Err(config_error(format!("width {c} is not divisible by {heads} heads")));
        }
        let n = m * m;
        let entries = (2 * m - 1) * (2 * m - 1);
        let table_dims = attn.relative_position_bias_table.dims();
        if table_dims != [entries, heads] {
            return Err(config_error(format!("relative_position_bias_table is {table_dims:?}, expected [{entries}, {heads}]")));
        }
        let index_values = attn.relative_position_index.tensor().into_data().convert::<i64>().try_to_vec::<i64>().map_err(|e| config_error(format!("relative_position_index: {e:?}")))?;
        if index_values.len() != n * n || index_values.iter().any(|&i| i < 0 || i as usize >= entries) {
            return Err(config_error(format!("relative_position_index needs {n}×{n} entries in [0, {entries})")));
        }
        let index = index_values.into_iter().map(|i| i as u32).collect();
        let (mask_of, masks) = match mask {
            Some(mask) => {
                let tensor = mask.tensor();
                let dims = tensor.dims();
                if dims != [grid.num_windows(), n, n] {
                    return Err(config_error(format!("attn_mask is {dims:?}, the grid has {} windows of {n} tokens", grid.num_windows())));
                }
                let values = host_f32(tensor);
                let (mut mask_of, mut masks) = (Vec::new(), Vec::new());
                for window in values.chunks_exact(n * n) {
                    mask_of.push(window.iter().any(|&v| v != 0.0).then(|| {
                        masks.extend_from_slice(window);
                        masks.len() - n * n
                    }));
                }
                (mask_of, masks)
            }
            None => (vec![None; grid.num_windows()], Vec::new()),
        };
        let maps = WindowMaps::new(&grid, pad, c)?;
        Ok(Self {
            qkv: FastLinear::lower(&attn.qkv, table)?,
            proj: FastLinear::lower(&attn.proj, table)?,
            heads,
            grid,
            bias_table: table.add(&attn.relative_position_bias_table, Layout::Official)?,
            index,
            maps,
            mask_of,
            masks,
        })
    }

    pub fn dim(&self) -> usize {
        self.qkv.inputs
    }

    /// Tokens of an image, H·W.
    pub fn tokens(&self) -> usize {
        self.maps.tokens()
    }

    /// Window-order rows of an image, Hp·Wp (the padded map).
    pub fn window_rows(&self) -> usize {
        self.maps.window_rows()
    }

    fn window_tokens(&self) -> usize {
        self.grid.window_tokens()
    }

    /// The (heads, M², M²) bias `table[index]` of the current parameters.
    fn gather_bias(&self, p: &[f32], out: &mut [f32]) {
        let (table, heads) = (&p[self.bias_table.range()], self.heads);
        let pairs = self.index.len();
        for (h, out) in out.chunks_exact_mut(pairs).enumerate() {
            for (o, &i) in out.iter_mut().zip(&self.index) {
                *o = table[i as usize * heads + h];
            }
        }
    }

    /// The mask of window `window` (counted over the batch), if it has one.
    fn mask(&self, window: usize) -> Option<&[f32]> {
        let pairs = self.index.len();
        self.mask_of[window % self.mask_of.len()].map(|start| &self.masks[start..start + pairs])
    }

    /// One window: its (M², 3C) qkv rows → the (heads, M², M²) weights into `weights` and its
    /// (M², C) heads side by side into `mixed`.
    fn window_forward(&self, qkv: &[f32], bias: &[f32], mask: Option<&[f32]>, weights: &mut [f32], mixed: &mut [f32]) {
        let (c, n) = (self.dim(), self.window_tokens());
        let d = c / self.heads;
        let scale = (d as f32).powf(-0.5);
        let column = |start: usize| MatRef::columns(qkv, n, 3 * c, start, d);
        for (h, (w, b)) in weights.chunks_exact_mut(n * n).zip(bias.chunks_exact(n * n)).enumerate() {
            w.copy_from_slice(b);
            if let Some(mask) = mask {
                kernels::add_assign(w, mask);
            }
            matmul(MatMut::new(w, n, n), column(h * d), column(c + h * d).t(), true, scale); // bias + mask + s·QKᵀ
            attention_kernels::softmax_rows(w, n);
            matmul(MatMut::columns(mixed, n, c, h * d, d), MatRef::new(w, n, n), column(2 * c + h * d), false, 1.0); // (M², d)
        }
    }

    /// One window's backward from `dmixed` (M², C): dqkv (M², 3C) overwritten, dS added into
    /// `dbias` (heads, M², M²); `dp` is (M², M²) scratch.
    fn window_backward(&self, qkv: &[f32], probs: &[f32], dmixed: &[f32], dqkv: &mut [f32], dp: &mut [f32], dbias: &mut [f32]) {
        let (c, n) = (self.dim(), self.window_tokens());
        let d = c / self.heads;
        let scale = (d as f32).powf(-0.5);
        let column = |start: usize| MatRef::columns(qkv, n, 3 * c, start, d);
        for (h, (p, db)) in probs.chunks_exact(n * n).zip(dbias.chunks_exact_mut(n * n)).enumerate() {
            let d_out = MatRef::columns(dmixed, n, c, h * d, d);
            matmul(MatMut::new(dp, n, n), d_out, column(2 * c + h * d).t(), false, 1.0); // dP = dO·Vᵀ
            matmul(MatMut::columns(dqkv, n, 3 * c, 2 * c + h * d, d), MatRef::new(p, n, n).t(), d_out, false, 1.0); // dV = Pᵀ·dO
            attention_kernels::softmax_backward_rows(p, dp, n); // dS, also the bias' gradient
            kernels::add_assign(db, dp);
            matmul(MatMut::columns(dqkv, n, 3 * c, h * d, d), MatRef::new(dp, n, n), column(c + h * d), false, scale); // dQ = s·dS·K
            matmul(MatMut::columns(dqkv, n, 3 * c, c + h * d, d), MatRef::new(dp, n, n).t(), column(h * d), false, scale); // dK = s·dSᵀ·Q
        }
    }

    /// Inference on one image: `out += attn(x)` for its (H·W, C) raster rows, `parts` threads
    /// sharing the work (on this thread when 1). Both passes of
    /// [`infer_mix`](Self::infer_mix) and [`infer_project`](Self::infer_project).
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], s: &mut WindowInferScratch, parts: usize) {
        self.infer_mix(p, x, s, parts);
        self.infer_project(p, out, s, parts);
    }

    /// Inference, first pass: every window of the image `x` (H·W, C) gathered, its qkv, its
    /// attention, into `s`; the windows are split over `parts` threads, which need not meet.
    /// After it `x` is no longer read, so a block without a norm may pass its residual stream
    /// as `x` here and as `out` to `infer_project`.
    pub fn infer_mix(&self, p: &[f32], x: &[f32], s: &mut WindowInferScratch, parts: usize) {
        let (c, n, heads) = (self.dim(), self.window_tokens(), self.heads);
        assert_eq!(x.len(), self.tokens() * c, "one image's (H·W, C) rows");
        let windows = self.grid.num_windows();
        let rows = windows * n;
        let parts = parts.clamp(1, windows);
        let per = windows.div_ceil(parts);
        self.gather_bias(p, sized(&mut s.bias, heads * n * n));
        let WindowInferScratch { rows: staging, qkv, mixed, bias, weights } = s;
        let bias: &[f32] = bias;
        let jobs: Vec<_> = sized(staging, rows * c)
            .chunks_mut(per * n * c)
            .zip(sized(qkv, rows * 3 * c).chunks_mut(per * n * 3 * c))
            .zip(sized(mixed, rows * c).chunks_mut(per * n * c))
            .zip(sized(weights, parts * heads * n * n).chunks_mut(heads * n * n))
            .enumerate()
            .collect();
        for_each_part(jobs, |(i, (((staging, qkv), mixed), weights))| {
            self.maps.gather_windows(c, x, i * per * n, staging, true);
            self.qkv.apply(p, staging, qkv); // (rows, 3C)
            for (k, (qkv, mixed)) in qkv.chunks_exact(n * 3 * c).zip(mixed.chunks_exact_mut(n * c)).enumerate() {
                self.window_forward(qkv, bias, self.mask(i * per + k), weights, mixed);
            }
        });
    }

    /// Inference, second pass: `out += proj(mixed)` for the image's (H·W, C) raster rows, their
    /// row blocks split over `parts` threads.
    pub fn infer_project(&self, p: &[f32], out: &mut [f32], s: &mut WindowInferScratch, parts: usize) {
        let (c, t) = (self.dim(), self.tokens());
        assert_eq!(out.len(), t * c, "one image's (H·W, C) rows");
        let per = t.div_ceil(parts.clamp(1, t));
        let mixed = &s.mixed;
        let jobs: Vec<_> = out.chunks_mut(per * c).zip(s.rows.chunks_mut(per * c)).enumerate().collect();
        for_each_part(jobs, |(i, (out, staging))| {
            let staging = &mut staging[..out.len()];
            self.maps.gather_raster(c, mixed, i * per, staging, false);
            self.proj.apply_residual(p, staging, out);
        });
    }

    /// Training forward of `batch` images' (B·H·W, C) raster rows: `out (+)= attn(x)`
    /// (`accumulate`: add to what `out` holds, a residual), keeping the activations.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut WindowAttentionActivations, batch: usize, accumulate: bool) -> Result<()> {
        let (c, n, heads) = (self.dim(), self.window_tokens(), self.heads);
        let t = self.tokens();
        if batch == 0 || x.len() != batch * t * c || out.len() != x.len() {
            let [h, w] = self.grid.resolution;
            return Err(Error::InputShape { layer: "window attention", expected: format!("{batch} × ({h}·{w}, {c}) rows in and out"), found: vec![x.len(), out.len()] });
        }
        let windows = batch * self.grid.num_windows();
        let rows = windows * n;
        let per = row_block(rows);
        sized(&mut a.windows, rows * c).par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.maps.gather_windows(c, x, i * per, block, true));
        self.qkv.forward(p, &a.windows, sized(&mut a.qkv, rows * 3 * c), false); // (B·Hp·Wp, 3C)
        self.gather_bias(p, sized(&mut a.bias, heads * n * n));
        let WindowAttentionActivations { qkv, bias, probs, mixed, .. } = a;
        let bias: &[f32] = bias;
        sized(probs, windows * heads * n * n)
            .par_chunks_mut(heads * n * n)
            .zip(qkv.par_chunks(n * 3 * c))
            .zip(sized(mixed, rows * c).par_chunks_mut(n * c))
            .enumerate()
            .for_each(|(w, ((probs, qkv), mixed))| self.window_forward(qkv, bias, self.mask(w), probs, mixed));
        // The projection on raster row blocks, each gathered from the windows while in cache.
        let mixed: &[f32] = mixed;
        let per = row_block(batch * t);
        out.par_chunks_mut(per * c).enumerate().for_each_init(Vec::new, |staging, (i, out)| {
            let staging = sized(staging, out.len());
            self.maps.gather_raster(c, mixed, i * per, staging, false);
            if accumulate {
                self.proj.apply_residual(p, staging, out);
            } else {
                self.proj.apply(p, staging, out);
            }
        });
        Ok(())
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the gradients of qkv, proj and the relative
    /// position bias table (dS scattered through the index) added into `g`, for the activations
    /// of the last [`forward`](Self::forward) of `batch` images. Padded positions are constants:
    /// their gradient is dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], a: &WindowAttentionActivations, dy: &[f32], dx: &mut [f32], s: &mut WindowAttentionScratch, batch: usize) {
        let (c, n, heads) = (self.dim(), self.window_tokens(), self.heads);
        let windows = batch * self.grid.num_windows();
        let rows = windows * n;
        let per = row_block(rows);
        let WindowAttentionScratch { dwindows, dmixed, dqkv, bias_partials, partials } = s;
        // proj read the raster rows of `mixed`: in window order, its gradient is dy there (and
        // none at padded positions, which proj never read).
        sized(dwindows, rows * c).par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.maps.gather_windows(c, dy, i * per, block, false));
        self.proj.backward_params(g, &a.mixed, dwindows, partials);
        self.proj.backward_input(p, dwindows, sized(dmixed, rows * c), |_, _| {});
        let tasks = rayon::current_num_threads().clamp(1, windows);
        let per_task = windows.div_ceil(tasks);
        let width = (heads + 1) * n * n;
        let bias_partials = sized(bias_partials, tasks * width);
        let dmixed: &[f32] = dmixed;
        sized(dqkv, rows * 3 * c)
            .par_chunks_mut(per_task * n * 3 * c)
            .zip(a.qkv.par_chunks(per_task * n * 3 * c))
            .zip(a.probs.par_chunks(per_task * heads * n * n))
            .zip(dmixed.par_chunks(per_task * n * c))
            .zip(bias_partials.par_chunks_mut(width))
            .for_each(|((((dqkv, qkv), probs), dmixed), partial)| {
                let (dp, dbias) = partial.split_at_mut(n * n);
                dbias.fill(0.0);
                for (((dqkv, qkv), probs), dmixed) in dqkv.chunks_exact_mut(n * 3 * c).zip(qkv.chunks_exact(n * 3 * c)).zip(probs.chunks_exact(heads * n * n)).zip(dmixed.chunks_exact(n * c)) {
                    self.window_backward(qkv, probs, dmixed, dqkv, dp, dbias);
                }
            });
        let used = windows.div_ceil(per_task);
        let table = &mut g[self.bias_table.range()];
        for partial in bias_partials.chunks_exact(width).take(used) {
            for (h, dbias) in partial[n * n..].chunks_exact(n * n).enumerate() {
                for (&i, v) in self.index.iter().zip(dbias) {
                    table[i as usize * heads + h] += v;
                }
            }
        }
        self.qkv.backward_params(g, &a.windows, dqkv, partials);
        self.qkv.backward_input(p, dqkv, dwindows, |_, _| {}); // (B·Hp·Wp, C), window order
        let per = row_block(dx.len() / c);
        let dwindows: &[f32] = dwindows;
        dx.par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.maps.gather_raster(c, dwindows, i * per, block, false));
    }
}

/// For a grid's padded, shifted map: each window-order position's raster token (or [`PAD`])
/// and each raster token's window-order position ([`window_order_of`]).
fn window_order(grid: &WindowGrid) -> (Vec<u32>, Vec<u32>) {
    window_order_of(grid.resolution, grid.padded(), [grid.window; 2], grid.shift)
}

/// The window order of an H×W map padded to Hp×Wp, rolled by −`shift` and cut into windows of
/// `rows × cols` tokens: each window-order position's raster token (or [`PAD`]) and each raster
/// token's window-order position. Position (w, t) of window w = (wr, wc), token t = (i, j) sits
/// at (wr·rows + i, wc·cols + j) of the rolled map, i.e. at ((wr·rows + i + s) mod Hp,
/// (wc·cols + j + s) mod Wp) of the padded one.
pub(super) fn window_order_of([h, w]: [usize; 2], [hp, wp]: [usize; 2], [rows, cols]: [usize; 2], shift: usize) -> (Vec<u32>, Vec<u32>) {
    let mut source = Vec::with_capacity(hp * wp);
    let mut position = vec![0; h * w];
    for wr in 0..hp / rows {
        for wc in 0..wp / cols {
            for i in 0..rows {
                for j in 0..cols {
                    let (y, x) = ((wr * rows + i + shift) % hp, (wc * cols + j + shift) % wp);
                    if y < h && x < w {
                        position[y * w + x] = source.len() as u32;
                        source.push((y * w + x) as u32);
                    } else {
                        source.push(PAD);
                    }
                }
            }
        }
    }
    (source, position)
}

/// SLA / FLatten over a Swin block's windows on the fast path, where the map has several windows
/// (or is padded): the block's rows gathered in window order (padding with zeros or a fused
/// block's pad token; shifted windows as for window attention, whose mask SLA does not use), the
/// existing [`FastAttention`] over each window as one sequence of M² tokens (its positional
/// encoding per window position, its DWC on each window's M×M grid), the output gathered back
/// into raster order. A map that is one window runs [`FastAttention`] directly
/// ([`WindowGrid::is_one_window`]).
pub struct FastWindowedLinear {
    pub attn: FastAttention,
    pub grid: WindowGrid,
    maps: WindowMaps,
    /// The DWC taps tiled over the heads for inference (training re-tiles them every step).
    inference_conv: (Vec<f32>, Vec<f32>),
}

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct WindowedLinearActivations {
    /// (B·Hp·Wp, C): the input in window order, padded.
    windows: Vec<f32>,
    attn: AttentionActivations,
    /// (B·Hp·Wp, C): the attention's output in window order.
    mixed: Vec<f32>,
}

/// Reusable backward buffers.
#[derive(Default)]
pub struct WindowedLinearScratch {
    /// (B·Hp·Wp, C): the output gradient in window order, and the input gradient's.
    dwindows: Vec<f32>,
    dinput: Vec<f32>,
    attn: AttentionScratch,
}

/// Reusable inference buffers for one image.
#[derive(Default)]
pub struct WindowedLinearInferScratch {
    /// Per part: a window's (M², C) rows, its (M², 3C) qkv, Σφ(k) (C), φ(K)ᵀV (heads·d·d).
    rows: Vec<f32>,
    qkv: Vec<f32>,
    k_sum: Vec<f32>,
    kv: Vec<f32>,
    /// (Hp·Wp, C) heads side by side, window order.
    mixed: Vec<f32>,
    /// (H·W, C): the mixed rows back in raster order, before proj.
    raster: Vec<f32>,
}

impl FastWindowedLinear {
    /// `pad`: what a fused block pads its windows with (its folded norm's zero, `−b/a`), zeros
    /// if `None`.
    pub fn lower(attn: &LinearAttention, grid: WindowGrid, pad: Option<&Tensor<1>>, table: &mut ParamTable) -> Result<Self> {
        let m = grid.window;
        if attn.grid != [m, m] {
            return Err(config_error(format!("linear attention over a {:?} grid in the block's {m}×{m} windows", attn.grid)));
        }
        let fast = FastAttention::lower(&Attention::Linear(attn.clone()), table)?;
        let maps = WindowMaps::new(&grid, pad, fast.dim())?;
        let inference_conv = fast.tiled_conv(&table.values).expect("linear attention has a depthwise conv");
        Ok(Self { attn: fast, grid, maps, inference_conv })
    }

    pub fn dim(&self) -> usize {
        self.attn.dim()
    }

    /// Tokens of an image, H·W.
    pub fn tokens(&self) -> usize {
        self.maps.tokens()
    }

    /// Inference, first pass: each window of the image `x` (H·W, C) gathered, then the
    /// attention's two inference passes over it (keys: qkv, feature maps, Σφ(k), φ(K)ᵀV;
    /// queries: normalized φ(Q)·KV plus the DWC on v) into `s`; the windows are split over
    /// `parts` threads, which need not meet. After it `x` is no longer read (see
    /// [`FastWindowAttention::infer_mix`]).
    pub fn infer_mix(&self, p: &[f32], x: &[f32], s: &mut WindowedLinearInferScratch, parts: usize) {
        let (c, n) = (self.dim(), self.grid.window_tokens());
        let d = c / self.attn.heads;
        assert_eq!(x.len(), self.tokens() * c, "one image's (H·W, C) rows");
        let windows = self.grid.num_windows();
        let parts = parts.clamp(1, windows);
        let per = windows.div_ceil(parts);
        let (taps, bias) = &self.inference_conv;
        let conv = self.attn.conv_view(taps, bias).expect("linear attention has a depthwise conv");
        let WindowedLinearInferScratch { rows, qkv, k_sum, kv, mixed, .. } = s;
        let jobs: Vec<_> = sized(mixed, windows * n * c)
            .chunks_mut(per * n * c)
            .zip(sized(rows, parts * n * c).chunks_mut(n * c))
            .zip(sized(qkv, parts * n * 3 * c).chunks_mut(n * 3 * c))
            .zip(sized(k_sum, parts * c).chunks_mut(c))
            .zip(sized(kv, parts * c * d).chunks_mut(c * d))
            .enumerate()
            .collect();
        for_each_part(jobs, |(i, ((((mixed, rows), qkv), k_sum), kv))| {
            for (k, mixed) in mixed.chunks_exact_mut(n * c).enumerate() {
                self.maps.gather_windows(c, x, (i * per + k) * n, rows, true);
                self.attn.infer_keys(p, 0, rows, qkv, k_sum, kv);
                self.attn.infer_queries(p, 0, qkv, k_sum, kv, Some(&conv), rows, mixed, &mut [], &mut []);
            }
        });
    }

    /// Inference, second pass: `out += proj(mixed)` for the image's (H·W, C) raster rows, their
    /// row blocks split over `parts` threads.
    pub fn infer_project(&self, p: &[f32], out: &mut [f32], s: &mut WindowedLinearInferScratch, parts: usize) {
        let (c, t) = (self.dim(), self.tokens());
        assert_eq!(out.len(), t * c, "one image's (H·W, C) rows");
        let per = t.div_ceil(parts.clamp(1, t));
        let mixed = &s.mixed;
        let jobs: Vec<_> = out.chunks_mut(per * c).zip(sized(&mut s.raster, t * c).chunks_mut(per * c)).enumerate().collect();
        for_each_part(jobs, |(i, (out, raster))| {
            self.maps.gather_raster(c, mixed, i * per, raster, false);
            self.attn.proj.apply_residual(p, raster, out);
        });
    }

    /// Both inference passes on one image: `out += attn(x)`.
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], s: &mut WindowedLinearInferScratch, parts: usize) {
        self.infer_mix(p, x, s, parts);
        self.infer_project(p, out, s, parts);
    }

    /// Training forward of `batch` images' (B·H·W, C) raster rows: `out (+)= attn(x)`
    /// (`accumulate`: add to what `out` holds, a residual), keeping the activations. The
    /// attention runs on the B·nW windows as a batch of M²-token sequences.
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut WindowedLinearActivations, batch: usize, accumulate: bool) -> Result<()> {
        let (c, n, t) = (self.dim(), self.grid.window_tokens(), self.tokens());
        if batch == 0 || x.len() != batch * t * c || out.len() != x.len() {
            let [h, w] = self.grid.resolution;
            return Err(Error::InputShape { layer: "linear attention over windows", expected: format!("{batch} × ({h}·{w}, {c}) rows in and out"), found: vec![x.len(), out.len()] });
        }
        let windows = batch * self.grid.num_windows();
        let rows = windows * n;
        let per = row_block(rows);
        let maps = &self.maps;
        sized(&mut a.windows, rows * c).par_chunks_mut(per * c).enumerate().for_each(|(i, block)| maps.gather_windows(c, x, i * per, block, true));
        self.attn.forward(p, &a.windows, sized(&mut a.mixed, rows * c), &mut a.attn, windows, n, false)?; // (B·Hp·Wp, C)
        let (mixed, per) = (&a.mixed, row_block(batch * t));
        out.par_chunks_mut(per * c).enumerate().for_each(|(i, out)| maps.gather_raster(c, mixed, i * per, out, accumulate));
        Ok(())
    }

    /// `dx = ∂attn/∂x · dy` (overwritten) and the attention's parameter gradients added into `g`,
    /// for the activations of the last [`forward`](Self::forward) of `batch` images. Padded
    /// positions are constants: their output was dropped (no gradient) and their input
    /// gradient is dropped.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], a: &WindowedLinearActivations, dy: &[f32], dx: &mut [f32], s: &mut WindowedLinearScratch, batch: usize) {
        let (c, n) = (self.dim(), self.grid.window_tokens());
        let windows = batch * self.grid.num_windows();
        let rows = windows * n;
        let per = row_block(rows);
        let WindowedLinearScratch { dwindows, dinput, attn } = s;
        sized(dwindows, rows * c).par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.maps.gather_windows(c, dy, i * per, block, false));
        self.attn.backward(p, g, &a.windows, &a.attn, dwindows, sized(dinput, rows * c), attn, windows, n);
        let per = row_block(dx.len() / c);
        let dinput: &[f32] = dinput;
        dx.par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.maps.gather_raster(c, dinput, i * per, block, false));
    }
}
