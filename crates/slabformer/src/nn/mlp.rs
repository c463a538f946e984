//! The transformer MLP: fc1 → GELU (exact, erf) → fc2.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Tensor};

use super::attention::linear;

#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, device: &Device) -> Self {
        Self {
            fc1: linear(dim, hidden, true, device),
            fc2: linear(hidden, dim, true, device),
        }
    }

    pub fn param_count(dim: usize, hidden: usize) -> usize {
        dim * hidden + hidden + hidden * dim + dim
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}
