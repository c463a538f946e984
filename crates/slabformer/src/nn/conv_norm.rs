//! The conv blocks of the mobile hybrids: a 2-D convolution (dense, strided, grouped or
//! depthwise) with PyTorch's symmetric "same" padding, BatchNorm2d and an activation — timm's
//! `ConvNormAct` / `BatchNormAct2d` (keys `conv.*`, `bn.*`) as one module, and the parts for
//! families whose official keys name them differently (EfficientFormer's `conv1`/`norm1`,
//! Mobile-Former's `conv.0`/`conv.1`). Deploy folds the BatchNorm into the conv.

use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::activation::{gelu, hard_sigmoid, relu, sigmoid};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::fuse::{ConvFold, fold_into_previous_conv};
use super::norm::BatchNorm;
use crate::deploy::onnx::{Graph, ToOnnx, attr_float};
use crate::error::Result;

/// The element-wise activations of the mobile families (GELU is the exact, erf form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Identity,
    Relu,
    /// min(max(x, 0), 6) (Mobile-Former's every plain activation).
    Relu6,
    /// x·σ(x) (MobileViT).
    Silu,
    Gelu,
    /// relu6(x + 3)/6.
    Hardsigmoid,
    /// x·relu6(x + 3)/6.
    Hardswish,
}

impl Activation {
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Activation::Identity => x,
            Activation::Relu => relu(x),
            Activation::Relu6 => x.clamp(0.0, 6.0),
            Activation::Silu => x.clone().mul(sigmoid(x)),
            Activation::Gelu => gelu(x),
            Activation::Hardsigmoid => hard_sigmoid(x, 1.0 / 6.0, 0.5),
            Activation::Hardswish => x.clone().mul(hard_sigmoid(x, 1.0 / 6.0, 0.5)),
        }
    }

    /// The activation of value `x` in `g`.
    pub fn to_onnx(self, g: &mut Graph, x: &str) -> String {
        let hard_sigmoid = |g: &mut Graph, x: &str| g.op("HardSigmoid", &[x], vec![attr_float("alpha", 1.0 / 6.0), attr_float("beta", 0.5)]);
        match self {
            Activation::Identity => x.to_string(),
            Activation::Relu => g.op("Relu", &[x], vec![]),
            Activation::Relu6 => {
                let (lo, hi) = (g.scalar("relu6_min", 0.0), g.scalar("relu6_max", 6.0));
                g.op("Clip", &[x, &lo, &hi], vec![])
            }
            Activation::Silu => {
                let s = g.op("Sigmoid", &[x], vec![]);
                g.op("Mul", &[x, &s], vec![])
            }
            Activation::Gelu => {
                // 0.5·x·(1 + erf(x/√2)): opset-13 has no Gelu node.
                let scaled = g.binary_scalar("Div", x, std::f32::consts::SQRT_2);
                let erf = g.op("Erf", &[&scaled], vec![]);
                let one = g.binary_scalar("Add", &erf, 1.0);
                let half = g.binary_scalar("Mul", x, 0.5);
                g.op("Mul", &[&half, &one], vec![])
            }
            Activation::Hardsigmoid => hard_sigmoid(g, x),
            Activation::Hardswish => {
                let s = hard_sigmoid(g, x);
                g.op("Mul", &[x, &s], vec![])
            }
        }
    }
}

/// The shape of one conv: `kernel`×`kernel` from `in_chans` to `out_chans` in `groups` groups
/// (groups = in_chans = out_chans is depthwise), padded by `(stride − 1 + kernel − 1) / 2` on
/// every side like timm's `create_conv2d` (3×3 → 1, 1×1 → 0, at stride 1 or 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub in_chans: usize,
    pub out_chans: usize,
    pub kernel: usize,
    pub stride: usize,
    pub groups: usize,
    pub bias: bool,
}

impl ConvShape {
    /// A dense conv without bias.
    pub fn new(in_chans: usize, out_chans: usize, kernel: usize, stride: usize) -> Self {
        Self { in_chans, out_chans, kernel, stride, groups: 1, bias: false }
    }

    /// A depthwise conv of `channels` (Mobile-Former's widens by `multiplier`).
    pub fn depthwise(channels: usize, multiplier: usize, kernel: usize, stride: usize) -> Self {
        Self { in_chans: channels, out_chans: channels * multiplier, kernel, stride, groups: channels, bias: false }
    }

    pub fn with_bias(self, bias: bool) -> Self {
        Self { bias, ..self }
    }

    pub fn padding(&self) -> usize {
        (self.stride - 1 + self.kernel - 1) / 2
    }

    pub fn init(&self, device: &Device) -> Conv2d {
        let pad = self.padding();
        Conv2dConfig::new([self.in_chans, self.out_chans], [self.kernel, self.kernel])
            .with_stride([self.stride, self.stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_groups(self.groups)
            .with_bias(self.bias)
            .init(device)
    }

    pub fn param_count(&self) -> usize {
        self.out_chans * (self.in_chans / self.groups) * self.kernel * self.kernel + if self.bias { self.out_chans } else { 0 }
    }

    /// The output grid of an `[h, w]` input (PyTorch's floor rule).
    pub fn out_grid(&self, [h, w]: [usize; 2]) -> [usize; 2] {
        let out = |n: usize| (n + 2 * self.padding() - self.kernel) / self.stride + 1;
        [out(h), out(w)]
    }

    /// Multiply-adds over an `[h, w]` input.
    pub fn macs(&self, grid: [usize; 2]) -> u64 {
        let [oh, ow] = self.out_grid(grid);
        (oh * ow * self.out_chans * (self.in_chans / self.groups) * self.kernel * self.kernel) as u64
    }
}

/// PyTorch's BatchNorm2d defaults (eps 1e-5, momentum 0.1, γ = 1) for `channels`.
pub fn batch_norm_2d(channels: usize, device: &Device) -> BatchNorm {
    BatchNorm::new(channels, 1e-5, 0.1, 1.0, device)
}

/// BatchNorm2d parameters of `channels` (γ, β; the statistics are buffers).
pub fn batch_norm_2d_param_count(channels: usize) -> usize {
    2 * channels
}

/// `bn(conv(x))` in eval mode as one conv with a bias (SPEC §2.8 F2 with BatchNorm's affine).
pub fn fold_batch_norm(conv: &Conv2d, bn: &BatchNorm) -> Conv2d {
    let (a, b) = bn.eval_affine();
    fold_into_previous_conv(conv, a, b, ConvFold::Exact)
}

/// timm's `ConvNormAct`: conv → BatchNorm2d → activation.
#[derive(Module, Debug)]
pub struct ConvNormAct {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    #[module(skip)]
    pub act: Activation,
}

impl ConvNormAct {
    pub fn new(shape: ConvShape, act: Activation, device: &Device) -> Self {
        Self { conv: shape.init(device), bn: batch_norm_2d(shape.out_chans, device), act }
    }

    pub fn param_count(shape: ConvShape) -> usize {
        shape.param_count() + batch_norm_2d_param_count(shape.out_chans)
    }

    /// (B, C_in, H, W) → (B, C_out, H', W').
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.act.forward(self.bn.forward_planes(self.conv.forward(x)))
    }

    /// The BatchNorm folded into the conv.
    pub fn fuse(&self) -> ConvAct {
        ConvAct { conv: fold_batch_norm(&self.conv, &self.bn), act: self.act }
    }
}

/// A conv with its activation: the deploy form of [`ConvNormAct`] (and of a plain conv).
#[derive(Module, Debug)]
pub struct ConvAct {
    pub conv: Conv2d,
    #[module(skip)]
    pub act: Activation,
}

impl ConvAct {
    /// (B, C_in, H, W) → (B, C_out, H', W').
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.act.forward(self.conv.forward(x))
    }
}

/// (B, C_in, H, W) → (B, C_out, H', W').
impl ToOnnx for ConvAct {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let pad = match self.conv.padding {
            PaddingConfig2d::Explicit(p, ..) => p,
            _ => 0,
        };
        let y = g.conv(x, &self.conv, pad);
        Ok(self.act.to_onnx(g, &y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::host_f32;
    use crate::testing::{assert_near, randomized, standard_normal};

    #[test]
    fn padding_and_grids_follow_pytorch() {
        for (shape, grid, out) in [
            (ConvShape::new(3, 8, 3, 2), [64, 64], [32, 32]),
            (ConvShape::new(3, 8, 3, 2), [7, 7], [4, 4]),
            (ConvShape::depthwise(8, 1, 3, 1), [5, 6], [5, 6]),
            (ConvShape::new(8, 16, 1, 1), [5, 6], [5, 6]),
        ] {
            assert_eq!(shape.out_grid(grid), out, "{shape:?}");
            let device = Device::flex();
            let y = shape.init(&device).forward(Tensor::zeros([1, shape.in_chans, grid[0], grid[1]], &device));
            assert_eq!(y.dims(), [1, shape.out_chans, out[0], out[1]], "{shape:?}");
        }
        assert_eq!(ConvShape::depthwise(8, 2, 3, 1).param_count(), 16 * 9);
        assert_eq!(ConvShape::new(8, 16, 1, 1).with_bias(true).param_count(), 8 * 16 + 16);
    }

    #[test]
    fn the_fused_conv_equals_conv_batch_norm_activation_in_eval() {
        let device = Device::flex();
        for (shape, act) in [
            (ConvShape::new(4, 6, 3, 2), Activation::Silu),
            (ConvShape::depthwise(6, 2, 3, 1).with_bias(true), Activation::Hardswish),
            (ConvShape { groups: 2, ..ConvShape::new(4, 6, 1, 1) }, Activation::Gelu),
        ] {
            let block = randomized(ConvNormAct::new(shape, act, &device), 2.0, 3); // eval: no autodiff
            let x = standard_normal([2, shape.in_chans, 7, 6], 4, &device);
            let want = host_f32(block.forward(x.clone()));
            let got = host_f32(block.fuse().forward(x));
            assert_near(&format!("{shape:?} {act:?}"), &got, &want, 1e-5, 1e-6);
        }
    }

    #[test]
    fn activations_match_their_definitions() {
        let device = Device::flex();
        let xs = [-7.0f32, -3.0, -1.5, 0.0, 0.5, 2.0, 3.0, 6.5];
        let x = Tensor::<1>::from_floats(xs, &device);
        let relu6 = |v: f32| v.clamp(0.0, 6.0);
        for (act, f) in [
            (Activation::Relu6, &relu6 as &dyn Fn(f32) -> f32),
            (Activation::Silu, &|v: f32| v / (1.0 + (-v).exp())),
            (Activation::Hardsigmoid, &|v: f32| relu6(v + 3.0) / 6.0),
            (Activation::Hardswish, &|v: f32| v * relu6(v + 3.0) / 6.0),
        ] {
            let want: Vec<f32> = xs.iter().map(|&v| f(v)).collect();
            assert_near(&format!("{act:?}"), &host_f32(act.forward(x.clone())), &want, 1e-6, 1e-7);
        }
    }
}
