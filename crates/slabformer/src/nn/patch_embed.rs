//! Image → tokens with one strided convolution (`patch_embed.proj`): the burn module, its fast
//! CPU form (im2col rows times the conv as a matrix) and its ONNX emission.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

use super::linear::FastLinear;
use super::lower::{Layout, ParamTable};
use crate::deploy::onnx::{Graph, ToOnnx};
use crate::error::Result;

#[derive(Module, Debug)]
pub struct PatchEmbed {
    pub proj: Conv2d,
}

impl PatchEmbed {
    pub fn new(in_chans: usize, dim: usize, patch: usize, device: &Device) -> Self {
        Self {
            proj: Conv2dConfig::new([in_chans, dim], [patch, patch])
                .with_stride([patch, patch])
                .init(device),
        }
    }

    pub fn param_count(in_chans: usize, dim: usize, patch: usize) -> usize {
        in_chans * dim * patch * patch + dim
    }

    /// (B, in_chans, H, W) → (B, H/p · W/p, dim), tokens row-major.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<3> {
        let y = self.proj.forward(x); // (B, dim, H/p, W/p)
        let [b, c, h, w] = y.dims();
        y.reshape([b, c, h * w]).swap_dims(1, 2)
    }
}

/// (B, C_in, H, W) images → (B, N, dim) tokens.
impl ToOnnx for PatchEmbed {
    fn to_onnx(&self, g: &mut Graph, images: &str) -> Result<String> {
        let x = g.conv(images, &self.proj, 0); // (B, dim, h, w)
        let shape = g.ints("shape", &[0, 0, -1]);
        let x = g.op("Reshape", &[&x, &shape], vec![]); // (B, dim, N)
        Ok(g.transpose(&x, &[0, 2, 1])) // (B, N, dim)
    }
}

/// The patch embedding on the fast path: the conv as a (C_in·p·p, dim) matrix over im2col rows.
pub struct FastPatchEmbed {
    pub proj: FastLinear,
    in_chans: usize,
    patch: usize,
}

impl FastPatchEmbed {
    pub fn lower(embed: &PatchEmbed, table: &mut ParamTable) -> Result<Self> {
        let [_, in_chans, patch, _] = embed.proj.weight.dims();
        Ok(Self { proj: FastLinear::lower_conv(&embed.proj, Layout::Transposed, table)?, in_chans, patch })
    }

    pub fn in_chans(&self) -> usize {
        self.in_chans
    }

    /// Patches of a (size, size) image.
    pub fn num_patches(&self, size: usize) -> usize {
        (size / self.patch).pow(2)
    }

    /// Values of one im2col row (one patch).
    pub fn patch_len(&self) -> usize {
        self.proj.inputs
    }

    /// One (C_in, size, size) image → its im2col rows in `patches`, one row per patch in
    /// row-major patch order, each in (channel, i, j) order like the conv weight.
    pub fn im2col(&self, image: &[f32], size: usize, patches: &mut [f32]) {
        let (p, len) = (self.patch, self.patch_len());
        let cols = size / p;
        for (index, dst) in patches.chunks_exact_mut(len).enumerate() {
            let (r, q) = (index / cols, index % cols);
            for ch in 0..self.in_chans {
                for i in 0..p {
                    let src = ch * size * size + (r * p + i) * size + q * p;
                    dst[(ch * p + i) * p..(ch * p + i + 1) * p].copy_from_slice(&image[src..src + p]);
                }
            }
        }
    }
}
