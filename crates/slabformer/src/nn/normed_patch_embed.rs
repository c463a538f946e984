//! Patch embedding followed by a norm over the tokens (PVT's `patch_embed{i}`: `proj` conv, then
//! `norm`), and its fuse rule: an eval-mode RepBN/PRepBN folded into the conv (SPEC §2.8 F2,
//! with the exact `η·c` bias term the official Swin merge drops).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

use super::fuse::{ConvFold, fold_into_previous_conv};
use super::norm::{Norm, NormKind};
use crate::deploy::onnx::{Graph, ToOnnx};
use crate::error::Result;

#[derive(Module, Debug)]
pub struct NormedPatchEmbed {
    /// p×p conv with stride p.
    pub proj: Conv2d,
    /// Absent in the deploy form, where it is folded into `proj`.
    pub norm: Option<Norm>,
}

impl NormedPatchEmbed {
    pub fn new(in_chans: usize, dim: usize, patch: usize, norm: &NormKind, device: &Device) -> Self {
        Self {
            proj: Conv2dConfig::new([in_chans, dim], [patch, patch])
                .with_stride([patch, patch])
                .init(device),
            norm: Some(norm.init(dim, device)),
        }
    }

    pub fn param_count(in_chans: usize, dim: usize, patch: usize, norm: &NormKind) -> usize {
        in_chans * dim * patch * patch + dim + norm.param_count(dim)
    }

    /// (B, in_chans, H, W) → (B, ⌊H/p⌋·⌊W/p⌋, dim), tokens row-major.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let y = self.proj.forward(x); // (B, dim, H/p, W/p)
        let [b, c, h, w] = y.dims();
        let tokens = y.reshape([b, c, h * w]).swap_dims(1, 2); // (B, N, dim)
        match &self.norm {
            Some(norm) => norm.forward(tokens),
            None => tokens,
        }
    }

    /// The norm folded into `proj` (`W' = a ⊙ W`, `c' = a ⊙ c + b`); LayerNorm does not fold.
    pub fn fuse(&self) -> Result<Self> {
        let Some(norm) = &self.norm else {
            return Ok(self.clone());
        };
        let (a, b) = norm.eval_affine()?;
        Ok(Self { proj: fold_into_previous_conv(&self.proj, a, b, ConvFold::Exact), norm: None })
    }
}

/// (B, C_in, H, W) images → (B, N, dim) tokens, normed (LayerNorm; RepBN/PRepBN export fused).
impl ToOnnx for NormedPatchEmbed {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let x = g.conv(images, &self.proj, 0); // (B, dim, h, w)
        let x = g.reshape(&x, &[0, 0, -1]); // (B, dim, N)
        let x = g.transpose(&x, &[0, 2, 1]); // (B, N, dim)
        match &self.norm {
            Some(norm) => norm.to_onnx(g, &x),
            None => Ok(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::trainable_param_count;
    

    #[test]
    fn fused_embedding_equals_the_eval_embedding_and_counts_match() {
        let device = Device::flex();
        for norm in [NormKind::repbn(), NormKind::prepbn(1e-6, 10)] {
            let embed = NormedPatchEmbed::new(3, 8, 4, &norm, &device);
            assert_eq!(trainable_param_count(&embed), NormedPatchEmbed::param_count(3, 8, 4, &norm));
            let embed = crate::testing::randomized(embed, 1.0, 5);
            let images = crate::testing::standard_normal([2, 3, 12, 16], 25, &device);
            let want = embed.forward(images.clone());
            assert_eq!(want.dims(), [2, 12, 8]);
            let fused = embed.fuse().unwrap();
            assert!(fused.norm.is_none());
            let scale: f32 = want.clone().abs().max().into_scalar();
            let diff: f32 = fused.forward(images).sub(want).abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale.max(1.0), "{norm:?}: {diff}");
        }
        let layer_norm = NormedPatchEmbed::new(3, 8, 4, &NormKind::layer_norm(1e-6), &device);
        assert!(layer_norm.fuse().is_err());
    }
}
