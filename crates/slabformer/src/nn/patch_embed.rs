//! Image → tokens with one strided convolution (`patch_embed.proj`).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Tensor};

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
