//! The transformer MLP: fc1 → GELU (exact, erf) → fc2. The burn module, its fast CPU form
//! ([`FastMlp`]: GELU fused into fc1's epilogue, fc2 accumulated into the residual) and its ONNX
//! emission.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation;
use burn::tensor::{Device, Tensor};

use super::linear::{FastLinear, linear};
use super::lower::{ParamTable, sized};
use crate::deploy::onnx::{Graph, ToOnnx};
use super::conv_norm::Activation;
use crate::error::{Error, Result};
use crate::kernels::{erf, exp, gelu, multiversion};

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
        self.fc2.forward(activation::gelu(self.fc1.forward(x)))
    }
}

impl ToOnnx for Mlp {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let hidden = self.fc1.to_onnx(g, x)?;
        // 0.5·x·(1 + erf(x/√2)), the exact GELU.
        let scaled = g.binary_scalar("Div", &hidden, std::f32::consts::SQRT_2);
        let erf = g.op("Erf", &[&scaled], vec![]);
        let one_plus = g.binary_scalar("Add", &erf, 1.0);
        let prod = g.op("Mul", &[&hidden, &one_plus], vec![]);
        let act = g.binary_scalar("Mul", &prod, 0.5);
        self.fc2.to_onnx(g, &act)
    }
}

/// The MLP on the fast path: fc1 → activation (GELU, or SiLU for MobileViT's) → fc2.
pub struct FastMlp {
    pub fc1: FastLinear,
    pub fc2: FastLinear,
    pub act: Activation,
}

/// What the MLP's training forward keeps for its backward.
#[derive(Default)]
pub struct MlpActivations {
    /// (R, hidden) fc1 output before and after the activation.
    pre: Vec<f32>,
    act: Vec<f32>,
}

impl FastMlp {
    pub fn lower(mlp: &Mlp, table: &mut ParamTable) -> Result<Self> {
        Self::lower_with(&mlp.fc1, &mlp.fc2, Activation::Gelu, table)
    }

    /// fc1 → `act` → fc2 of a family's own MLP module; GELU and SiLU have fused epilogues.
    pub fn lower_with(fc1: &Linear, fc2: &Linear, act: Activation, table: &mut ParamTable) -> Result<Self> {
        if !matches!(act, Activation::Gelu | Activation::Silu) {
            return Err(Error::Unsupported { what: format!("an MLP with a {act:?} activation"), path: "the fast CPU path" });
        }
        Ok(Self { fc1: FastLinear::lower(fc1, table)?, fc2: FastLinear::lower(fc2, table)?, act })
    }

    fn epilogue(&self) -> fn(&mut [f32], &[f32]) {
        match self.act {
            Activation::Silu => bias_silu,
            _ => bias_gelu,
        }
    }

    fn epilogue_keep(&self) -> fn(&mut [f32], &mut [f32], &[f32]) {
        match self.act {
            Activation::Silu => bias_silu_keep,
            _ => bias_gelu_keep,
        }
    }

    pub fn hidden(&self) -> usize {
        self.fc1.outputs
    }

    /// Inference on this thread, first half: `hidden = act(fc1(input))` for the rows `hidden`
    /// holds.
    pub fn infer_hidden(&self, p: &[f32], input: &[f32], hidden: &mut [f32]) {
        self.fc1.apply_with(p, input, hidden, self.epilogue());
    }

    /// Second half: `x += fc2(hidden)` (the residual).
    pub fn infer_residual(&self, p: &[f32], hidden: &[f32], x: &mut [f32]) {
        self.fc2.apply_residual(p, hidden, x);
    }

    /// `out (+)= mlp(x)` over all rows (`accumulate`: add to what `out` holds), keeping the
    /// activations.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut MlpActivations, accumulate: bool) {
        let rows = x.len() / self.fc1.inputs;
        let hidden = self.hidden();
        self.fc1.forward_keep(p, x, sized(&mut a.pre, rows * hidden), sized(&mut a.act, rows * hidden), self.epilogue_keep());
        self.fc2.forward(p, &a.act, out, accumulate);
    }

    /// `dx = ∂mlp/∂x · dy` (overwritten) and the parameter gradients into `g`; `dhidden` and
    /// `partials` are scratch.
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &MlpActivations, dy: &[f32], dx: &mut [f32], dhidden: &mut Vec<f32>, partials: &mut Vec<f32>) {
        let rows = x.len() / self.fc1.inputs;
        let hidden = self.hidden();
        let pre = &a.pre;
        // dh = (dy·W2ᵀ) ⊙ act'(pre), then fc1.
        let act = self.act;
        self.fc2.backward_input(p, dy, sized(dhidden, rows * hidden), |dh, first| {
            act.backward(&pre[first * hidden..first * hidden + dh.len()], dh);
        });
        self.fc2.backward_params(g, &a.act, dy, partials);
        self.fc1.backward_input(p, dhidden, dx, |_, _| {});
        self.fc1.backward_params(g, x, dhidden, partials);
    }
}

// ---- The MLP's GELU epilogues.

multiversion! {
    /// `x = gelu(x + bias)` row by row, GELU with the exact erf form.
    pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }
}


multiversion! {
    /// `pre += bias` and `act = gelu(pre)` row by row: fc1 keeps its pre-activation for the
    /// backward pass.
    pub fn bias_gelu_keep(pre: &mut [f32], act: &mut [f32], bias: &[f32]) {
        for (row, out) in pre.chunks_exact_mut(bias.len()).zip(act.chunks_exact_mut(bias.len())) {
            for ((v, o), b) in row.iter_mut().zip(out.iter_mut()).zip(bias) {
                *v += b;
                *o = gelu(*v);
            }
        }
    }
}

multiversion! {
    /// `x = silu(x + bias)` row by row.
    pub fn bias_silu(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                let u = *v + b;
                *v = u / (1.0 + exp(-u));
            }
        }
    }
}

multiversion! {
    /// `pre += bias` and `act = silu(pre)` row by row.
    pub fn bias_silu_keep(pre: &mut [f32], act: &mut [f32], bias: &[f32]) {
        for (row, out) in pre.chunks_exact_mut(bias.len()).zip(act.chunks_exact_mut(bias.len())) {
            for ((v, o), b) in row.iter_mut().zip(out.iter_mut()).zip(bias) {
                *v += b;
                *o = *v / (1.0 + exp(-*v));
            }
        }
    }
}

multiversion! {
    /// `grad *= gelu'(pre)`, with gelu'(x) = Φ(x) + x·φ(x).
    pub fn gelu_backward(pre: &[f32], grad: &mut [f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for (g, &x) in grad.iter_mut().zip(pre) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
            *g *= cdf + x * pdf;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_gelu_equals_the_scalar_gelu() {
        // The vectorized slice version agrees with the scalar one (any dispatch path).
        let mut v: Vec<f32> = (-50..50).map(|i| i as f32 / 7.0).collect();
        let want: Vec<f32> = v.iter().map(|&x| gelu(x + 0.5)).collect();
        bias_gelu(&mut v, &[0.5; 10]);
        assert_eq!(v, want);
    }

}
