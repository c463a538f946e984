//! Swin patch merging (SPEC §4.3): each 2×2 neighbourhood of the (H, W) token map, gathered in
//! the order (0,0), (1,0), (0,1), (1,1) [(row, col) offsets], concatenated to 4C → Norm(4C) →
//! Linear(4C → 2C, no bias). Odd maps are padded with zeros at the bottom/right first, as the
//! official detection backbone does. Its fuse rule folds the norm into `reduction`, which gains a
//! bias. Its fast form is [`FastPatchMerging`].

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

use super::fuse::fold_into_next_linear;
use super::linear::{FastLinear, linear};
use super::lower::{ParamTable, for_each_part, row_block, sized};
use super::norm::{FastNorm, Norm, NormCache, NormKind};
use crate::deploy::onnx::{Graph, ToOnnx};
use crate::error::{Error, Result};

#[derive(Module, Debug)]
pub struct PatchMerging {
    pub norm: Norm,
    pub reduction: Linear,
}

impl PatchMerging {
    pub fn new(dim: usize, norm: &NormKind, device: &Device) -> Self {
        Self { norm: norm.init(4 * dim, device), reduction: linear(4 * dim, 2 * dim, false, device) }
    }

    pub fn param_count(dim: usize, norm: &NormKind) -> usize {
        norm.param_count(4 * dim) + 4 * dim * 2 * dim
    }

    /// Multiply-accumulates of `reduction` for an (H, W) input map.
    pub fn macs(dim: usize, [h, w]: [usize; 2]) -> u64 {
        (h.div_ceil(2) * w.div_ceil(2) * 4 * dim * 2 * dim) as u64
    }

    /// The merged map's resolution.
    pub fn output_resolution([h, w]: [usize; 2]) -> [usize; 2] {
        [h.div_ceil(2), w.div_ceil(2)]
    }

    /// (B, H·W, C) tokens of an (H, W) map → (B, ⌈H/2⌉·⌈W/2⌉, 2C).
    pub fn forward(&self, x: Tensor<3>, resolution: [usize; 2]) -> Tensor<3> {
        self.reduction.forward(self.norm.forward(gather_2x2(x, resolution)))
    }

    /// [`forward`](Self::forward) after checking the tokens fit the map and the width.
    pub fn try_forward(&self, x: Tensor<3>, resolution: [usize; 2]) -> Result<Tensor<3>> {
        let [b, n, c] = x.dims();
        let [h, w] = resolution;
        if b == 0 || n != h * w || 4 * c != self.norm.channels() {
            return Err(Error::InputShape {
                layer: "patch merging",
                expected: format!("(B > 0, {h}·{w}, {})", self.norm.channels() / 4),
                found: x.dims().to_vec(),
            });
        }
        Ok(self.forward(x, resolution))
    }

    /// The deploy form: the eval-mode norm folded into `reduction`; an error for LayerNorm.
    pub fn fuse(&self) -> Result<DeployPatchMerging> {
        let (a, b) = self.norm.eval_affine()?;
        Ok(DeployPatchMerging { reduction: fold_into_next_linear(&self.reduction, a, b) })
    }
}

/// [`gather_2x2`] in the graph for C = `dim`: (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, 4C).
fn gather_2x2_onnx(g: &mut Graph, x: &str, [h, w]: [usize; 2], dim: usize) -> String {
    let ([h, w], c) = ([h as i64, w as i64], dim as i64);
    let (hp, wp) = (h + h % 2, w + w % 2);
    let mut map = g.reshape(x, &[-1, h, w, c]);
    if hp > h || wp > w {
        map = g.pad_zeros(&map, &[0, 0, 0, 0, 0, hp - h, wp - w, 0]); // (B, Hp, Wp, C)
    }
    let map = g.reshape(&map, &[-1, hp / 2, 2, wp / 2, 2, c]); // (B, H/2, row offset, W/2, col offset, C)
    let map = g.transpose(&map, &[0, 1, 3, 4, 2, 5]); // (B, H/2, W/2, col offset, row offset, C)
    g.reshape(&map, &[-1, (hp / 2) * (wp / 2), 4 * c])
}

impl PatchMerging {
    /// [`forward`](Self::forward) in the graph (the norm as its op: LayerNorm models).
    pub fn to_onnx(&self, g: &mut Graph, x: &str, resolution: [usize; 2]) -> Result<String> {
        let gathered = gather_2x2_onnx(g, x, resolution, self.norm.channels() / 4);
        let normed = self.norm.to_onnx(g, &gathered)?;
        self.reduction.to_onnx(g, &normed)
    }
}

/// Patch merging with its norm folded away: `reduction(gather(x))`, `reduction` with a bias.
#[derive(Module, Debug)]
pub struct DeployPatchMerging {
    pub reduction: Linear,
}

impl DeployPatchMerging {
    pub fn forward(&self, x: Tensor<3>, resolution: [usize; 2]) -> Tensor<3> {
        self.reduction.forward(gather_2x2(x, resolution))
    }

    /// [`forward`](Self::forward) in the graph.
    pub fn to_onnx(&self, g: &mut Graph, x: &str, resolution: [usize; 2]) -> Result<String> {
        let gathered = gather_2x2_onnx(g, x, resolution, self.reduction.weight.dims()[0] / 4);
        self.reduction.to_onnx(g, &gathered)
    }
}

/// (B, H·W, C) → (B, ⌈H/2⌉·⌈W/2⌉, 4C): [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)].
pub fn gather_2x2(x: Tensor<3>, [h, w]: [usize; 2]) -> Tensor<3> {
    let [b, _, c] = x.dims();
    let (hp, wp) = (h + h % 2, w + w % 2);
    let mut map = x.reshape([b, h, w, c]);
    if hp > h {
        let device = map.device();
        map = Tensor::cat(vec![map, Tensor::zeros([b, 1, w, c], &device)], 1); // (B, H + 1, W, C)
    }
    if wp > w {
        let device = map.device();
        map = Tensor::cat(vec![map, Tensor::zeros([b, hp, 1, c], &device)], 2); // (B, Hp, W + 1, C)
    }
    map.reshape([b, hp / 2, 2, wp / 2, 2, c]) // (B, H/2, row offset, W/2, col offset, C)
        .permute([0, 1, 3, 4, 2, 5]) // (B, H/2, W/2, col offset, row offset, C)
        .reshape([b, (hp / 2) * (wp / 2), 4 * c])
}

/// Patch merging on the fast path, from an (H, W) map of C-wide raster rows to the merged
/// (⌈H/2⌉·⌈W/2⌉, 2C) rows: the 2×2 gather (zeros past an odd edge), the norm over 4C (absent in
/// the deploy form) and `reduction`.
pub struct FastPatchMerging {
    pub norm: Option<FastNorm>,
    pub reduction: FastLinear,
    /// The input map.
    pub resolution: [usize; 2],
}

/// What the training forward keeps for the backward pass.
#[derive(Default)]
pub struct PatchMergeActivations {
    /// (B·N', 4C) gathered neighbourhoods, and the norm's output of them.
    gathered: Vec<f32>,
    normed: Vec<f32>,
    norm: NormCache,
}

/// Reusable buffers: inference's gathered and normalized rows, the backward's gradients.
#[derive(Default)]
pub struct PatchMergeScratch {
    gathered: Vec<f32>,
    normed: Vec<f32>,
    dinput: Vec<f32>,
    dgathered: Vec<f32>,
    partials: Vec<f32>,
}

impl FastPatchMerging {
    /// The training form over an (H, W) input map.
    pub fn lower(merge: &PatchMerging, resolution: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        let norm = FastNorm::lower(&merge.norm, table)?;
        Self::checked(Some(norm), FastLinear::lower(&merge.reduction, table)?, resolution)
    }

    /// The deploy form (norm folded into `reduction`) over an (H, W) input map.
    pub fn lower_deploy(merge: &DeployPatchMerging, resolution: [usize; 2], table: &mut ParamTable) -> Result<Self> {
        Self::checked(None, FastLinear::lower(&merge.reduction, table)?, resolution)
    }

    fn checked(norm: Option<FastNorm>, reduction: FastLinear, resolution: [usize; 2]) -> Result<Self> {
        if resolution.contains(&0) || !reduction.inputs.is_multiple_of(4) {
            return Err(Error::Config(format!("patch merging needs a non-empty map and a reduction from 4C, got map {resolution:?}, {} inputs", reduction.inputs)));
        }
        Ok(Self { norm, reduction, resolution })
    }

    /// Width of the input tokens, C.
    pub fn dim(&self) -> usize {
        self.reduction.inputs / 4
    }

    pub fn out_dim(&self) -> usize {
        self.reduction.outputs
    }

    /// Tokens of an input image, H·W.
    pub fn tokens(&self) -> usize {
        self.resolution[0] * self.resolution[1]
    }

    pub fn output_resolution(&self) -> [usize; 2] {
        PatchMerging::output_resolution(self.resolution)
    }

    /// Tokens of a merged image, ⌈H/2⌉·⌈W/2⌉.
    pub fn out_tokens(&self) -> usize {
        let [h, w] = self.output_resolution();
        h * w
    }

    /// Merged rows `first..` (counted over the batch) of the raster rows `x` into `out` (4C each):
    /// x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1), zeros outside the map.
    fn gather(&self, x: &[f32], first: usize, out: &mut [f32]) {
        let (c, [h, w], [_, wo]) = (self.dim(), self.resolution, self.output_resolution());
        let (tokens, merged) = (self.tokens(), self.out_tokens());
        for (k, row) in out.chunks_exact_mut(4 * c).enumerate() {
            let (image, token) = ((first + k) / merged, (first + k) % merged);
            let (i, j) = (token / wo, token % wo);
            for (slot, part) in row.chunks_exact_mut(c).enumerate() {
                let (y, x_) = (2 * i + slot % 2, 2 * j + slot / 2);
                if y < h && x_ < w {
                    let src = image * tokens + y * w + x_;
                    part.copy_from_slice(&x[src * c..(src + 1) * c]);
                } else {
                    part.fill(0.0);
                }
            }
        }
    }

    /// Input rows `first..` (counted over the batch) of the input gradient from the gathered
    /// rows' gradient `dgathered` (each input token sits in exactly one slot).
    fn scatter_back(&self, dgathered: &[f32], first: usize, dx: &mut [f32]) {
        let (c, [_, w], [_, wo]) = (self.dim(), self.resolution, self.output_resolution());
        let (tokens, merged) = (self.tokens(), self.out_tokens());
        for (k, row) in dx.chunks_exact_mut(c).enumerate() {
            let (image, token) = ((first + k) / tokens, (first + k) % tokens);
            let (y, x) = (token / w, token % w);
            let slot = y % 2 + 2 * (x % 2);
            let src = ((image * merged + (y / 2) * wo + x / 2) * 4 + slot) * c;
            row.copy_from_slice(&dgathered[src..src + c]);
        }
    }

    /// Inference on one image: its (H·W, C) rows → the merged (N', 2C) rows in `out`, the output
    /// rows split over `parts` threads (on this thread when 1).
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], s: &mut PatchMergeScratch, parts: usize) {
        let (c, merged) = (self.dim(), self.out_tokens());
        assert_eq!(x.len(), self.tokens() * c, "one image's (H·W, C) rows");
        assert_eq!(out.len(), merged * self.out_dim(), "one image's merged rows");
        let per = merged.div_ceil(parts.clamp(1, merged));
        let normed_len = if self.norm.is_some() { merged * 4 * c } else { 0 };
        let mut normed = sized(&mut s.normed, normed_len).chunks_mut((per * 4 * c).max(1));
        let jobs: Vec<_> = out
            .chunks_mut(per * self.out_dim())
            .zip(sized(&mut s.gathered, merged * 4 * c).chunks_mut(per * 4 * c))
            .enumerate()
            .map(|(i, (out, gathered))| (i, out, gathered, normed.next().unwrap_or_default()))
            .collect();
        for_each_part(jobs, |(i, out, gathered, normed)| {
            self.gather(x, i * per, gathered);
            let input: &[f32] = match &self.norm {
                Some(norm) => {
                    norm.infer(p, gathered, normed);
                    normed
                }
                None => gathered,
            };
            self.reduction.apply(p, input, out);
        });
    }

    /// Training forward of `batch` images' (B·H·W, C) rows into the merged (B·N', 2C) rows of
    /// `out`, keeping the activations; the norm takes batch statistics and advances like the
    /// burn layer's training call (its PRepBN counters only with `advance`).
    pub fn forward(&mut self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut PatchMergeActivations, batch: usize, advance: bool) -> Result<()> {
        let (c, merged) = (self.dim(), self.out_tokens());
        if batch == 0 || x.len() != batch * self.tokens() * c || out.len() != batch * merged * self.out_dim() {
            let [h, w] = self.resolution;
            return Err(Error::InputShape {
                layer: "patch merging",
                expected: format!("{batch} × ({h}·{w}, {c}) rows in, {batch} × ({merged}, {}) out", self.out_dim()),
                found: vec![x.len(), out.len()],
            });
        }
        let rows = batch * merged;
        let per = row_block(rows);
        let this = &*self;
        sized(&mut a.gathered, rows * 4 * c).par_chunks_mut(per * 4 * c).enumerate().for_each(|(i, block)| this.gather(x, i * per, block));
        let input: &[f32] = match &mut self.norm {
            Some(norm) => {
                norm.forward(p, &a.gathered, sized(&mut a.normed, rows * 4 * c), &mut a.norm, 4 * c, advance)?;
                &a.normed
            }
            None => &a.gathered,
        };
        self.reduction.forward(p, input, out, false); // (B·N', 2C)
        Ok(())
    }

    /// `dx = ∂merge/∂x · dy` (overwritten) and the parameter gradients into `g`, for the
    /// activations of the last [`forward`](Self::forward) of `batch` images.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, p: &[f32], g: &mut [f32], a: &PatchMergeActivations, dy: &[f32], dx: &mut [f32], s: &mut PatchMergeScratch, batch: usize) {
        let c = self.dim();
        let rows = batch * self.out_tokens();
        let input = if self.norm.is_some() { &a.normed } else { &a.gathered };
        self.reduction.backward_params(g, input, dy, &mut s.partials);
        self.reduction.backward_input(p, dy, sized(&mut s.dinput, rows * 4 * c), |_, _| {});
        let dgathered: &[f32] = match &self.norm {
            Some(norm) => {
                let dgathered = sized(&mut s.dgathered, rows * 4 * c);
                dgathered.fill(0.0); // the norm's backward adds into it
                norm.backward(p, g, &a.gathered, &s.dinput, dgathered, &a.norm, 4 * c);
                &s.dgathered
            }
            None => &s.dinput,
        };
        let per = row_block(batch * self.tokens());
        dx.par_chunks_mut(per * c).enumerate().for_each(|(i, block)| self.scatter_back(dgathered, i * per, block));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn gather_order_is_row_offset_fastest() {
        let device = Device::flex();
        // One channel holding each token's (row, col) as 10·row + col on a 4×4 map.
        let values: Vec<f32> = (0..16).map(|t| (10 * (t / 4) + t % 4) as f32).collect();
        let x = Tensor::<3>::from_data(TensorData::new(values, [1, 16, 1]), &device);
        let merged = floats(gather_2x2(x, [4, 4]));
        // Output token 1 is the neighbourhood at rows 0–1, cols 2–3.
        assert_eq!(&merged[4..8], &[2.0, 12.0, 3.0, 13.0]);
        assert_eq!(&merged[12..16], &[22.0, 32.0, 23.0, 33.0]);
    }

    #[test]
    fn odd_maps_pad_with_zeros() {
        let device = Device::flex();
        let x = Tensor::<3>::ones([2, 15, 3], &device);
        let merged = gather_2x2(x, [3, 5]);
        assert_eq!(merged.dims(), [2, 6, 12]);
        // The last output token covers rows 2–3, cols 4–5: only (2, 4) is inside the map.
        let last = floats(merged.narrow(0, 0, 1).narrow(1, 5, 1));
        assert_eq!(last, [vec![1.0; 3], vec![0.0; 9]].concat());
    }

    #[test]
    fn fused_merge_equals_unfused_eval() {
        let device = Device::flex();
        let merge = crate::testing::randomized(PatchMerging::new(6, &NormKind::repbn(), &device), 3.0, 5);
        let x = crate::testing::standard_normal([2, 20, 6], 29, &device);
        let want = merge.forward(x.clone(), [4, 5]);
        let got = merge.fuse().unwrap().forward(x, [4, 5]);
        let scale: f32 = want.clone().abs().max().into_scalar();
        let diff: f32 = got.sub(want).abs().max().into_scalar();
        assert!(diff <= 1e-5 * scale, "{diff} vs {scale}");
        assert!(PatchMerging::new(6, &NormKind::layer_norm(1e-5), &device).fuse().is_err());
        assert_eq!(crate::state::trainable_param_count(&merge), PatchMerging::param_count(6, &NormKind::repbn()));
        assert!(merge.try_forward(Tensor::zeros([2, 19, 6], &device), [4, 5]).is_err());
    }
}
