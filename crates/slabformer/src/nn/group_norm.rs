//! GroupNorm with one group (timm's `GroupNorm1`, MobileViT-v2's transformer norm): per sample,
//! mean and biased variance over every channel and position; then a per-channel affine
//! (`weight`, `bias` as in PyTorch). Training and eval compute the same thing (no running
//! statistics), so it does not fold into a neighbour.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};

use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::Result;

/// PyTorch's GroupNorm default eps.
pub const GROUP_NORM_EPS: f64 = 1e-5;

#[derive(Module, Debug)]
pub struct GroupNorm1 {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl GroupNorm1 {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self { weight: Initializer::Ones.init([channels], device), bias: Initializer::Zeros.init([channels], device), eps: GROUP_NORM_EPS }
    }

    pub fn param_count(channels: usize) -> usize {
        2 * channels
    }

    /// (B, C, H, W) → (B, C, H, W).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let flat = x.reshape([b, c * h * w]); // (B, C·H·W): one group
        let centered = flat.clone().sub(flat.mean_dim(1));
        let var = centered.clone().square().mean_dim(1); // biased, as PyTorch
        let normed = centered.div(var.add_scalar(self.eps).sqrt()).reshape([b, c, h, w]);
        normed.mul(self.weight.val().reshape([1, c, 1, 1])).add(self.bias.val().reshape([1, c, 1, 1]))
    }
}

/// (B, C, H, W) → (B, C, H, W), op for op as `forward`.
impl ToOnnx for GroupNorm1 {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let c = self.weight.dims()[0] as i64;
        let mean = |g: &mut Graph, v: &str| g.op("ReduceMean", &[v], vec![attr_ints("axes", &[1, 2, 3]), attr_int("keepdims", 1)]);
        let m = mean(g, x);
        let centered = g.op("Sub", &[x, &m], vec![]);
        let squared = g.op("Mul", &[&centered, &centered], vec![]);
        let var = mean(g, &squared);
        let var = g.binary_scalar("Add", &var, self.eps as f32);
        let std = g.op("Sqrt", &[&var], vec![]);
        let normed = g.op("Div", &[&centered, &std], vec![]);
        let weight = g.param("gn_weight", &self.weight);
        let weight = g.reshape(&weight, &[1, c, 1, 1]);
        let bias = g.param("gn_bias", &self.bias);
        let bias = g.reshape(&bias, &[1, c, 1, 1]);
        let scaled = g.op("Mul", &[&normed, &weight], vec![]);
        Ok(g.op("Add", &[&scaled, &bias], vec![]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::host_f32;
    use crate::testing::{assert_near, randomized, standard_normal};

    #[test]
    fn statistics_span_all_channels_and_positions_of_a_sample() {
        let device = Device::flex();
        let norm = randomized(GroupNorm1::new(3, &device), 1.0, 1);
        let x = standard_normal([2, 3, 4, 5], 2, &device).mul_scalar(3.0).add_scalar(1.5);
        let got = host_f32(norm.forward(x.clone()));
        let (xs, w, b) = (host_f32(x), host_f32(norm.weight.val()), host_f32(norm.bias.val()));
        let per = 3 * 20;
        let mut want = vec![0.0f32; xs.len()];
        for s in 0..2 {
            let v = &xs[s * per..(s + 1) * per];
            let mean = v.iter().map(|&a| a as f64).sum::<f64>() / per as f64;
            let var = v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / per as f64;
            for (i, &a) in v.iter().enumerate() {
                let c = i / 20;
                want[s * per + i] = (((a as f64 - mean) / (var + 1e-5).sqrt()) * w[c] as f64 + b[c] as f64) as f32;
            }
        }
        assert_near("group norm", &got, &want, 1e-5, 1e-5);
    }
}
