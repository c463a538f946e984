//! Swin patch merging (SPEC §4.3): each 2×2 neighbourhood of the (H, W) token map, gathered in
//! the order (0,0), (1,0), (0,1), (1,1) [(row, col) offsets], concatenated to 4C → Norm(4C) →
//! Linear(4C → 2C, no bias). Odd maps are padded with zeros at the bottom/right first, as the
//! official detection backbone does. Its fuse rule folds the norm into `reduction`, which gains a
//! bias.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor};

use super::fuse::fold_into_next_linear;
use super::linear::linear;
use super::norm::{Norm, NormKind};
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

    /// The deploy form: the eval-mode norm folded into `reduction`; `None` for LayerNorm.
    pub fn fuse(&self) -> Option<DeployPatchMerging> {
        let (a, b) = self.norm.eval_affine()?;
        Some(DeployPatchMerging { reduction: fold_into_next_linear(&self.reduction, a, b) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

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
        let merge = crate::testing::randomized(PatchMerging::new(6, &NormKind::repbn(), &device), 3.0);
        let x = Tensor::<3>::random([2, 20, 6], Distribution::Normal(0.0, 1.0), &device);
        let want = merge.forward(x.clone(), [4, 5]);
        let got = merge.fuse().unwrap().forward(x, [4, 5]);
        let scale: f32 = want.clone().abs().max().into_scalar();
        let diff: f32 = got.sub(want).abs().max().into_scalar();
        assert!(diff <= 1e-5 * scale, "{diff} vs {scale}");
        assert!(PatchMerging::new(6, &NormKind::layer_norm(1e-5), &device).fuse().is_none());
        assert_eq!(crate::state::trainable_param_count(&merge), PatchMerging::param_count(6, &NormKind::repbn()));
        assert!(merge.try_forward(Tensor::zeros([2, 19, 6], &device), [4, 5]).is_err());
    }
}
