//! LayerScale: a learned per-channel scale on a residual branch (timm's `LayerScale` /
//! `LayerScale2d`, key `gamma`), as the EfficientFormer blocks use it: `x + γ ⊙ branch(x)`.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::deploy::onnx::Graph;

#[derive(Module, Debug)]
pub struct LayerScale {
    pub gamma: Param<Tensor<1>>,
}

impl LayerScale {
    /// γ = `init` for every one of `channels` (timm's `layer_scale_init_value`).
    pub fn new(channels: usize, init: f64, device: &Device) -> Self {
        Self { gamma: Initializer::Constant { value: init }.init([channels], device) }
    }

    /// (B, C, H, W) planes, γ per channel C.
    pub fn forward_planes(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.gamma.dims()[0];
        x.mul(self.gamma.val().reshape([1, c, 1, 1]))
    }

    /// [`forward_planes`](Self::forward_planes) in `g`.
    pub fn planes_to_onnx(&self, g: &mut Graph, x: &str) -> String {
        let c = self.gamma.dims()[0];
        let gamma = g.tensor("gamma", self.gamma.val().reshape([c, 1, 1]));
        g.op("Mul", &[x, &gamma], vec![])
    }

    /// [`forward_tokens`](Self::forward_tokens) in `g`.
    pub fn tokens_to_onnx(&self, g: &mut Graph, x: &str) -> String {
        let gamma = g.param("gamma", &self.gamma);
        g.op("Mul", &[x, &gamma], vec![])
    }

    /// (B, N, C) tokens, γ per channel C.
    pub fn forward_tokens(&self, x: Tensor<3>) -> Tensor<3> {
        let c = self.gamma.dims()[0];
        x.mul(self.gamma.val().reshape([1, 1, c]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::host_f32;
    use crate::testing::{assert_near, randomized, standard_normal};

    #[test]
    fn both_layouts_scale_each_channel() {
        let device = Device::flex();
        let scale = randomized(LayerScale::new(3, 1e-5, &device), 1.0, 1);
        let gamma = host_f32(scale.gamma.val());
        let planes = standard_normal([2, 3, 2, 2], 2, &device);
        let x = host_f32(planes.clone());
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * gamma[(i / 4) % 3]).collect();
        assert_near("planes", &host_f32(scale.forward_planes(planes.clone())), &want, 0.0, 1e-7);
        let tokens = planes.reshape([2, 4, 3]);
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * gamma[i % 3]).collect();
        assert_near("tokens", &host_f32(scale.forward_tokens(tokens)), &want, 0.0, 1e-7);
    }
}
