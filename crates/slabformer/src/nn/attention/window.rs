//! Swin window attention (W-MSA / SW-MSA, SPEC §3.2): softmax MHSA inside non-overlapping M×M
//! windows with a learned relative position bias, and the window geometry the Swin blocks run any
//! token mixer through: padding to whole windows, the cyclic shift by ⌊M/2⌋ and its −100 region
//! mask, window partition and reverse.
//!
//! The official code keeps `relative_position_index` and a shifted block's `attn_mask` as
//! persistent buffers (in the state dict); timm 0.9.16 keeps them non-persistent. [`IndexBuffer`]
//! and [`MaskBuffer`] hold either form, so both layouts load without remapping.

use burn::module::{Module, Param, ParamId, RunningState};
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::deploy::onnx::{Graph, ToOnnx, attr_int};
use crate::error::{Error, Result, check_tokens};
use crate::state::host_f32;
use crate::nn::fuse::fold_into_next_linear;
use crate::nn::linear::linear;

/// What the official code adds to the scores of token pairs from different regions of a shifted
/// window (−100, not −∞: a fully masked row never occurs, and −100 underflows exp).
pub const MASK_VALUE: f32 = -100.0;

/// The relative position index of an M×M window, (M², M²) row-major: for tokens i = (y_i, x_i),
/// j = (y_j, x_j), `((y_i − y_j) + M − 1)·(2M − 1) + (x_i − x_j) + M − 1`, in [0, (2M−1)² − 1].
pub fn relative_position_index(window: usize) -> Vec<i64> {
    let (m, n) = (window as i64, window * window);
    let mut index = Vec::with_capacity(n * n);
    for i in 0..n as i64 {
        for j in 0..n as i64 {
            let (dy, dx) = (i / m - j / m, i % m - j % m);
            index.push((dy + m - 1) * (2 * m - 1) + dx + m - 1);
        }
    }
    index
}

/// An integer buffer of a layer: in the state dict (official Swin) or recomputed at construction
/// (timm's non-persistent buffer). Adds no key segment.
#[derive(Module, Debug)]
pub enum IndexBuffer {
    Persistent(Param<Tensor<2, Int>>),
    Constant(Tensor<2, Int>),
}

impl IndexBuffer {
    fn new(values: Vec<i64>, shape: [usize; 2], persistent: bool, device: &Device) -> Self {
        let tensor = Tensor::<2, Int>::from_data(TensorData::new(values, shape), device);
        if persistent {
            IndexBuffer::Persistent(Param::initialized(ParamId::new(), tensor))
        } else {
            IndexBuffer::Constant(tensor)
        }
    }

    pub fn tensor(&self) -> Tensor<2, Int> {
        match self {
            IndexBuffer::Persistent(p) => p.val(),
            IndexBuffer::Constant(t) => t.clone(),
        }
    }
}

/// A float buffer that no step updates (the shifted-window mask): in the state dict (official
/// Swin; a float buffer like BatchNorm's running statistics, never trained) or recomputed at
/// construction (timm). Adds no key segment.
#[derive(Module, Debug)]
pub enum MaskBuffer {
    Persistent(RunningState<Tensor<3>>),
    Constant(Tensor<3>),
}

impl MaskBuffer {
    pub fn tensor(&self) -> Tensor<3> {
        match self {
            MaskBuffer::Persistent(s) => s.value(),
            MaskBuffer::Constant(t) => t.clone(),
        }
    }
}

/// How one Swin block sees its stage's (H, W) token map: square windows of `window` tokens a
/// side, cyclically shifted by `shift` (0: W-MSA). The official rule: a map no larger than the
/// target window in its smaller side is one window of that side, unshifted.
///
/// Maps that windows do not divide are padded at the bottom and right with zeros (after the
/// norm, before the shift) and cropped back afterwards, as the official Swin detection backbone
/// does; the shifted-window mask is computed on the padded map, and unshifted windows do not mask
/// the padding (also as there). A fused block, whose norm now sits inside `qkv`, pads with the
/// token that its folded norm maps to zero instead, so it computes the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowGrid {
    pub resolution: [usize; 2],
    pub window: usize,
    pub shift: usize,
}

impl WindowGrid {
    /// The block's grid for a target window size; `shifted` asks for SW-MSA (odd blocks).
    pub fn new(resolution: [usize; 2], target_window: usize, shifted: bool) -> Result<Self> {
        let [h, w] = resolution;
        if h == 0 || w == 0 || target_window == 0 {
            return Err(Error::Config(format!(
                "window attention needs a non-empty map and window, got map {h}×{w}, window {target_window}"
            )));
        }
        let smaller = h.min(w);
        Ok(if smaller <= target_window {
            Self { resolution, window: smaller, shift: 0 }
        } else {
            Self { resolution, window: target_window, shift: if shifted { target_window / 2 } else { 0 } }
        })
    }

    /// Tokens per window, M².
    pub fn window_tokens(&self) -> usize {
        self.window * self.window
    }

    /// The map padded to whole windows.
    pub fn padded(&self) -> [usize; 2] {
        self.resolution.map(|r| r.div_ceil(self.window) * self.window)
    }

    /// Windows per image.
    pub fn num_windows(&self) -> usize {
        let [hp, wp] = self.padded();
        (hp / self.window) * (wp / self.window)
    }

    /// The shifted-window mask (nW, M², M²): 0 within a region, −100 across regions (the 3×3
    /// regions `[0, −M)`, `[−M, −s)`, `[−s, end)` on each axis of the padded map); `None`
    /// unshifted.
    pub fn mask(&self) -> Option<Vec<f32>> {
        if self.shift == 0 {
            return None;
        }
        let (m, s) = (self.window, self.shift);
        let [hp, wp] = self.padded();
        let region = |r: usize, len: usize| if r < len - m { 0 } else if r < len - s { 1 } else { 2 };
        let (rows, cols) = (hp / m, wp / m);
        let n = m * m;
        let mut mask = Vec::with_capacity(rows * cols * n * n);
        for wr in 0..rows {
            for wc in 0..cols {
                let label = |t: usize| 3 * region(wr * m + t / m, hp) + region(wc * m + t % m, wp);
                for i in 0..n {
                    for j in 0..n {
                        mask.push(if label(i) == label(j) { 0.0 } else { MASK_VALUE });
                    }
                }
            }
        }
        Some(mask)
    }

    /// The mask as a buffer, in the state dict or not.
    pub fn mask_buffer(&self, persistent: bool, device: &Device) -> Option<MaskBuffer> {
        let n = self.window_tokens();
        let mask = Tensor::<3>::from_data(TensorData::new(self.mask()?, [self.num_windows(), n, n]), device);
        Some(if persistent { MaskBuffer::Persistent(RunningState::new(mask)) } else { MaskBuffer::Constant(mask) })
    }

    /// Whether the map is one unpadded, unshifted window (a layer over windows is then a layer
    /// over the whole map).
    pub fn is_one_window(&self) -> bool {
        self.num_windows() == 1 && !self.pads() && self.shift == 0
    }

    /// Whether windows do not divide the map, so that [`apply`](Self::apply) pads it.
    pub fn pads(&self) -> bool {
        self.padded() != self.resolution
    }

    /// Runs `mixer` over the windows of `x` (B, H·W, C): pad (with `pad`, (C), or zeros), shift,
    /// partition into (B·nW, M², C), mix, reverse, shift back, crop.
    pub fn apply(&self, x: Tensor<3>, pad: Option<&Tensor<1>>, mixer: impl FnOnce(Tensor<3>) -> Tensor<3>) -> Tensor<3> {
        let [b, _, c] = x.dims();
        let [h, w] = self.resolution;
        let [hp, wp] = self.padded();
        let filler = |shape: [usize; 4], device: &Device| match pad {
            Some(token) => token.clone().reshape([1, 1, 1, c]).expand(shape),
            None => Tensor::zeros(shape, device),
        };
        let mut map = x.reshape([b, h, w, c]); // (B, H, W, C)
        if hp > h {
            let device = map.device();
            map = Tensor::cat(vec![map, filler([b, hp - h, w, c], &device)], 1); // (B, Hp, W, C)
        }
        if wp > w {
            let device = map.device();
            map = Tensor::cat(vec![map, filler([b, hp, wp - w, c], &device)], 2); // (B, Hp, Wp, C)
        }
        let s = self.shift as i64;
        if s > 0 {
            map = map.roll(&[-s, -s], &[1, 2]);
        }
        let mixed = mixer(window_partition(map, self.window)); // (B·nW, M², C)
        let mut map = window_reverse(mixed, self.window, [hp, wp]); // (B, Hp, Wp, C)
        if s > 0 {
            map = map.roll(&[s, s], &[1, 2]);
        }
        if hp > h || wp > w {
            map = map.narrow(1, 0, h).narrow(2, 0, w); // (B, H, W, C)
        }
        map.reshape([b, h * w, c])
    }
}

/// (B, Hp, Wp, C) → (B·nW, M², C), windows row-major, tokens row-major inside each.
pub fn window_partition(map: Tensor<4>, window: usize) -> Tensor<3> {
    let [b, h, w, c] = map.dims();
    let m = window;
    map.reshape([b, h / m, m, w / m, m, c])
        .permute([0, 1, 3, 2, 4, 5]) // (B, H/M, W/M, M, M, C)
        .reshape([b * (h / m) * (w / m), m * m, c])
}

/// The inverse of [`window_partition`] for a (Hp, Wp) map.
pub fn window_reverse(windows: Tensor<3>, window: usize, map: [usize; 2]) -> Tensor<4> {
    let [bw, _, c] = windows.dims();
    let ([h, w], m) = (map, window);
    let b = bw / ((h / m) * (w / m));
    windows
        .reshape([b, h / m, w / m, m, m, c])
        .permute([0, 1, 3, 2, 4, 5]) // (B, H/M, M, W/M, M, C)
        .reshape([b, h, w, c])
}

/// Softmax MHSA inside one window of M² tokens, with the relative position bias
/// `table[index]` (and the shifted-window mask) added to the scores.
#[derive(Module, Debug)]
pub struct WindowAttention {
    pub qkv: Linear,
    /// ((2M−1)², heads).
    pub relative_position_bias_table: Param<Tensor<2>>,
    /// (M², M²), see [`relative_position_index`].
    pub relative_position_index: IndexBuffer,
    pub proj: Linear,
    pub num_heads: usize,
    pub window: usize,
}

impl WindowAttention {
    /// `persistent_index`: whether the index is in the state dict (official) or not (timm).
    pub fn new(dim: usize, num_heads: usize, window: usize, qkv_bias: bool, persistent_index: bool, device: &Device) -> Self {
        let n = window * window;
        Self {
            qkv: linear(dim, 3 * dim, qkv_bias, device),
            relative_position_bias_table: Initializer::Normal { mean: 0.0, std: 0.02 }.init([(2 * window - 1).pow(2), num_heads], device),
            relative_position_index: IndexBuffer::new(relative_position_index(window), [n, n], persistent_index, device),
            proj: linear(dim, dim, true, device),
            num_heads,
            window,
        }
    }

    pub fn param_count(dim: usize, num_heads: usize, window: usize, qkv_bias: bool) -> usize {
        dim * 3 * dim + if qkv_bias { 3 * dim } else { 0 } + dim * dim + dim + (2 * window - 1).pow(2) * num_heads
    }

    /// Multiply-accumulates over one window: projections, QKᵀ and AV.
    pub fn macs_per_window(dim: usize, window: usize) -> u64 {
        let (n, c) = ((window * window) as u64, dim as u64);
        n * c * 3 * c + 2 * n * n * c + n * c * c
    }

    pub fn dim(&self) -> usize {
        self.proj.weight.lazy_shape()[0]
    }

    /// The bias added to each head's scores, (heads, M², M²).
    pub fn relative_position_bias(&self) -> Tensor<3> {
        let n = self.window * self.window;
        let index = self.relative_position_index.tensor().reshape([n * n]);
        self.relative_position_bias_table
            .val()
            .select(0, index) // (M²·M², heads)
            .reshape([n, n, self.num_heads])
            .permute([2, 0, 1])
    }

    /// Windows (B·nW, M², C) → (B·nW, M², C); `mask` (nW, M², M²) for shifted windows.
    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<3>>) -> Tensor<3> {
        let [bw, n, c] = x.dims();
        let h = self.num_heads;
        let d = c / h;
        let qkv = self.qkv.forward(x).reshape([bw, n, 3, h, d]).permute([2, 0, 3, 1, 4]); // (3, B·nW, h, N, d)
        let [q, k, v] = [0, 1, 2].map(|i| qkv.clone().narrow(0, i, 1).reshape([bw, h, n, d]));
        let scores = q.mul_scalar((d as f64).powf(-0.5)).matmul(k.swap_dims(2, 3)); // (B·nW, h, N, N)
        let scores = scores.add(self.relative_position_bias().unsqueeze::<4>());
        let scores = match mask {
            Some(mask) => {
                let nw = mask.dims()[0];
                scores
                    .reshape([bw / nw, nw, h, n, n])
                    .add(mask.reshape([1, nw, 1, n, n]))
                    .reshape([bw, h, n, n])
            }
            None => scores,
        };
        let out = softmax(scores, 3).matmul(v); // (B·nW, h, N, d)
        self.proj.forward(out.swap_dims(1, 2).reshape([bw, n, c]))
    }

    /// [`forward`](Self::forward) after checking the windows' shape and the mask's.
    pub fn try_forward(&self, x: Tensor<3>, mask: Option<Tensor<3>>) -> Result<Tensor<3>> {
        let n = self.window * self.window;
        check_tokens("window attention", x.dims(), Some(n), self.dim())?;
        if let Some(m) = &mask {
            let [nw, a, b] = m.dims();
            if nw == 0 || a != n || b != n || !x.dims()[0].is_multiple_of(nw) {
                return Err(Error::InputShape {
                    layer: "window attention mask",
                    expected: format!("(nW, {n}, {n}) with nW dividing the {} windows", x.dims()[0]),
                    found: m.dims().to_vec(),
                });
            }
        }
        Ok(self.forward(x, mask))
    }

    /// The fuse rule of a preceding norm `a ⊙ x + b`: folded into `qkv`.
    pub fn fold_input(&self, a: Tensor<1>, b: Tensor<1>) -> Self {
        Self { qkv: fold_into_next_linear(&self.qkv, a, b), ..self.clone() }
    }
}

// ---- ONNX: the window geometry and the window attention, op for op as `apply` and `forward`.

impl WindowGrid {
    /// [`apply`](Self::apply) in the graph for C = `dim`: `x` (B, H·W, C) padded (zeros, plus a
    /// constant map holding `pad` at the padded positions), shifted (Slice + Concat), partitioned
    /// into (B·nW, M², C) for `mixer`, reversed, shifted back and cropped.
    pub fn to_onnx(&self, g: &mut Graph, x: &str, dim: usize, pad: Option<&Tensor<1>>, mixer: impl FnOnce(&mut Graph, &str) -> Result<String>) -> Result<String> {
        let [h, w] = self.resolution.map(|r| r as i64);
        let [hp, wp] = self.padded().map(|r| r as i64);
        let (m, c, s) = (self.window as i64, dim as i64, self.shift as i64);
        let mut map = g.reshape(x, &[-1, h, w, c]); // (B, H, W, C)
        if self.pads() {
            map = g.pad_zeros(&map, &[0, 0, 0, 0, 0, hp - h, wp - w, 0]); // (B, Hp, Wp, C)
            if let Some(token) = pad {
                let filler = padding_map(self.resolution, self.padded(), &host_f32(token.clone()));
                let filler = g.floats("pad_map", vec![1, hp, wp, c], &filler);
                map = g.op("Add", &[&map, &filler], vec![]);
            }
        }
        if s > 0 {
            map = roll_onnx(g, &map, 1, hp, -s);
            map = roll_onnx(g, &map, 2, wp, -s);
        }
        let windows = g.reshape(&map, &[-1, hp / m, m, wp / m, m, c]);
        let windows = g.transpose(&windows, &[0, 1, 3, 2, 4, 5]); // (B, Hp/M, Wp/M, M, M, C)
        let windows = g.reshape(&windows, &[-1, m * m, c]); // (B·nW, M², C)
        let mixed = mixer(g, &windows)?;
        let map = g.reshape(&mixed, &[-1, hp / m, wp / m, m, m, c]);
        let map = g.transpose(&map, &[0, 1, 3, 2, 4, 5]); // (B, Hp/M, M, Wp/M, M, C)
        let mut map = g.reshape(&map, &[-1, hp, wp, c]); // (B, Hp, Wp, C)
        if s > 0 {
            map = roll_onnx(g, &map, 1, hp, s);
            map = roll_onnx(g, &map, 2, wp, s);
        }
        if self.pads() {
            map = g.slice(&map, 1, 0, h);
            map = g.slice(&map, 2, 0, w); // (B, H, W, C)
        }
        Ok(g.reshape(&map, &[-1, h * w, c]))
    }
}

/// (Hp, Wp, C) row-major: `token` outside the (H, W) map, zeros inside (added to the
/// zero-padded map, it fills the padding with `token` as `apply` does).
fn padding_map([h, w]: [usize; 2], [hp, wp]: [usize; 2], token: &[f32]) -> Vec<f32> {
    let c = token.len();
    let mut map = vec![0.0; hp * wp * c];
    for (p, cell) in map.chunks_exact_mut(c).enumerate() {
        if p / wp >= h || p % wp >= w {
            cell.copy_from_slice(token);
        }
    }
    map
}

/// `torch.roll(x, by, axis)` on an axis of `len`: element i moves to (i + by) mod len.
fn roll_onnx(g: &mut Graph, x: &str, axis: i64, len: i64, by: i64) -> String {
    let start = (-by).rem_euclid(len);
    let tail = g.slice(x, axis, start, len);
    let head = g.slice(x, axis, 0, start);
    g.op("Concat", &[&tail, &head], vec![attr_int("axis", axis)])
}

impl WindowAttention {
    /// [`forward`](Self::forward) in the graph: windows (B·nW, M², C) → (B·nW, M², C). The
    /// relative position bias is gathered at export into a constant (heads, M², M²); the mask
    /// (nW, M², M²) is a constant too.
    pub fn to_onnx(&self, g: &mut Graph, x: &str, mask: Option<Tensor<3>>) -> Result<String> {
        let (h, n, c) = (self.num_heads as i64, (self.window * self.window) as i64, self.dim() as i64);
        let d = c / h;
        let qkv = self.qkv.to_onnx(g, x)?;
        let qkv = g.reshape(&qkv, &[-1, n, 3, h, d]);
        let qkv = g.transpose(&qkv, &[2, 0, 3, 1, 4]); // (3, B·nW, h, N, d)
        let (q, k, v) = (g.gather(&qkv, 0, 0), g.gather(&qkv, 1, 0), g.gather(&qkv, 2, 0));
        let q = g.binary_scalar("Mul", &q, (d as f64).powf(-0.5) as f32);
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let scores = g.op("MatMul", &[&q, &kt], vec![]); // (B·nW, h, N, N)
        let bias = g.tensor("relative_position_bias", self.relative_position_bias());
        let mut scores = g.op("Add", &[&scores, &bias], vec![]);
        if let Some(mask) = mask {
            let nw = mask.dims()[0];
            let mask = g.tensor("attn_mask", mask.reshape([nw, 1, n as usize, n as usize]));
            let per_image = g.reshape(&scores, &[-1, nw as i64, h, n, n]); // (B, nW, h, N, N)
            let masked = g.op("Add", &[&per_image, &mask], vec![]);
            scores = g.reshape(&masked, &[-1, h, n, n]);
        }
        let weights = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let out = g.op("MatMul", &[&weights, &v], vec![]); // (B·nW, h, N, d)
        let out = g.merge_heads(&out, n as usize, c as usize);
        self.proj.to_onnx(g, &out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn relative_index_is_49_by_49_in_range_and_matches_the_formula() {
        // SPEC §7.3 item 23.
        let index = relative_position_index(7);
        assert_eq!(index.len(), 49 * 49);
        assert_eq!(*index.iter().min().unwrap(), 0);
        assert_eq!(*index.iter().max().unwrap(), 168);
        // Diagonal: Δ = 0 → (M−1)(2M−1) + M−1 = 84.
        assert!((0..49).all(|i| index[i * 49 + i] == 84));
        // Token 0 = (0, 0) against token 48 = (6, 6): Δ = (−6, −6) → 0.
        assert_eq!(index[48], 0);
        assert_eq!(index[48 * 49], 168);
    }

    #[test]
    fn stage_one_has_64_windows_and_the_mask_is_0_or_minus_100() {
        // SPEC §7.3 item 23: 56² map, M = 7.
        let grid = WindowGrid::new([56, 56], 7, true).unwrap();
        assert_eq!((grid.window, grid.shift, grid.num_windows()), (7, 3, 64));
        let mask = grid.mask().unwrap();
        assert_eq!(mask.len(), 64 * 49 * 49);
        assert!(mask.iter().all(|&v| v == 0.0 || v == MASK_VALUE));
        // Interior windows see one region; the last window (bottom-right corner) four.
        assert!(mask[..49 * 49].iter().all(|&v| v == 0.0));
        let corner = &mask[63 * 49 * 49..];
        assert!(corner.contains(&MASK_VALUE));
        // Symmetric in (i, j).
        assert!((0..49).all(|i| (0..49).all(|j| corner[i * 49 + j] == corner[j * 49 + i])));
        assert_eq!(WindowGrid::new([56, 56], 7, false).unwrap().mask(), None);
    }

    #[test]
    fn small_maps_are_one_unshifted_window_and_odd_maps_pad() {
        assert_eq!(WindowGrid::new([7, 7], 7, true).unwrap(), WindowGrid { resolution: [7, 7], window: 7, shift: 0 });
        assert_eq!(WindowGrid::new([28, 28], 56, true).unwrap().window, 28);
        let grid = WindowGrid::new([25, 38], 7, true).unwrap();
        assert_eq!((grid.padded(), grid.num_windows()), ([28, 42], 24));
        assert!(WindowGrid::new([0, 4], 7, false).is_err());
    }

    #[test]
    fn partition_and_reverse_are_inverse_and_shift_round_trips() {
        let device = Device::flex();
        let x = crate::testing::standard_normal([2, 8, 12, 3], 9, &device);
        let windows = window_partition(x.clone(), 4);
        assert_eq!(windows.dims(), [2 * 6, 16, 3]);
        // Window 1 of image 0 is rows 0..4, cols 4..8; its token 5 is (1, 1) → map (1, 5).
        let token = floats(windows.clone().narrow(0, 1, 1).narrow(1, 5, 1));
        assert_eq!(token, floats(x.clone().narrow(0, 0, 1).narrow(1, 1, 1).narrow(2, 5, 1)));
        assert_eq!(floats(window_reverse(windows, 4, [8, 12])), floats(x.clone()));
        // The identity mixer through pad + shift + partition gives the input back, padded or not.
        for (res, m) in [([8, 12], 4), ([7, 10], 3), ([5, 5], 7)] {
            let tokens = crate::testing::standard_normal([2, res[0] * res[1], 3], 41, &device);
            let grid = WindowGrid::new(res, m, true).unwrap();
            let back = grid.apply(tokens.clone(), None, |w| w);
            assert_eq!(floats(back), floats(tokens), "{res:?} window {m}");
        }
    }

    #[test]
    fn one_unshifted_window_is_plain_mhsa_plus_the_bias() {
        // SPEC §7.3 item 23: with the bias table at zero, window attention over a map equal to one
        // window is softmax MHSA.
        use crate::nn::attention::{Attention, AttentionConfig, AttentionKind};
        let device = Device::flex();
        let mut attn = WindowAttention::new(12, 3, 4, true, true, &device);
        let Attention::Dot(mut plain) = (AttentionConfig { dim: 12, num_heads: 3, qkv_bias: true, kind: AttentionKind::Softmax, grid: None }).init(&device) else { panic!("softmax") };
        plain.qkv = attn.qkv.clone();
        plain.proj = attn.proj.clone();
        attn.relative_position_bias_table = Param::from_tensor(Tensor::zeros([49, 3], &device));
        let x = crate::testing::standard_normal([2, 16, 12], 10, &device);
        let diff: f32 = attn.forward(x.clone(), None).sub(plain.forward(x.clone())).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
        // A non-zero table shifts the scores by table[index] per head.
        attn.relative_position_bias_table = Param::from_tensor(crate::testing::standard_normal([49, 3], 11, &device));
        let bias = attn.relative_position_bias();
        assert_eq!(bias.dims(), [3, 16, 16]);
        let table = floats(attn.relative_position_bias_table.val());
        let index = relative_position_index(4);
        let head2: Vec<f32> = index.iter().map(|&k| table[k as usize * 3 + 2]).collect();
        assert_eq!(floats(bias.narrow(0, 2, 1)), head2);
    }

    #[test]
    fn masked_pairs_get_no_weight_and_bad_shapes_are_errors() {
        let device = Device::flex();
        let attn = WindowAttention::new(8, 2, 2, true, false, &device);
        let x = crate::testing::standard_normal([4, 4, 8], 12, &device);
        // Masking everything but the diagonal makes each token attend to itself only: out = proj(v).
        let eye: Vec<f32> = (0..16).map(|k| if k / 4 == k % 4 { 0.0 } else { -1e4 }).collect();
        let mask = Tensor::<3>::from_data(TensorData::new([eye.clone(), eye].concat(), [2, 4, 4]), &device);
        let out = attn.try_forward(x.clone(), Some(mask)).unwrap();
        let v = attn.qkv.forward(x.clone()).narrow(2, 16, 8);
        let want = attn.proj.forward(v);
        let diff: f32 = out.sub(want).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
        assert!(attn.try_forward(Tensor::zeros([4, 5, 8], &device), None).is_err());
        assert!(attn.try_forward(x, Some(Tensor::zeros([3, 4, 4], &device))).is_err());
    }
}
