//! Folding a per-channel affine map (an eval-mode RepBN, SPEC §2.4) into a neighbouring linear
//! layer (SPEC §2.8).

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::Tensor;

/// F1: `Linear(a ⊙ x + b)` as one Linear: `W' = diag(a)·W`, `c' = c + b·W` (burn layout
/// `W: [in, out]`). A Linear without bias gains one.
pub fn fold_into_next_linear(linear: &Linear, a: Tensor<1>, b: Tensor<1>) -> Linear {
    let weight = linear.weight.val(); // [in, out]
    let [d_in, d_out] = weight.dims();
    let shift = b.reshape([1, d_in]).matmul(weight.clone()).reshape([d_out]); // b·W
    let bias = match &linear.bias {
        Some(c) => c.val().add(shift),
        None => shift,
    };
    Linear {
        weight: Param::from_tensor(weight.mul(a.reshape([d_in, 1]))),
        bias: Some(Param::from_tensor(bias)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::attention::linear;
    use crate::nn::norm::{RepBN, RepBnInit};
    use burn::module::RunningState;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn folded_linear_equals_linear_after_repbn() {
        // SPEC §7.2 item 10, with and without an original bias.
        let device = Device::flex();
        let uniform = |lo, hi| Tensor::<1>::random([16], Distribution::Uniform(lo, hi), &device);
        let mut rep = RepBN::new(16, 1e-5, RepBnInit::Vision, &device);
        rep.alpha = Param::from_tensor(Tensor::from_floats([0.4], &device));
        rep.bn.weight = Param::from_tensor(uniform(0.5, 1.5));
        rep.bn.bias = Param::from_tensor(uniform(-0.5, 0.5));
        rep.bn.running_mean = RunningState::new(uniform(-1.0, 1.0));
        rep.bn.running_var = RunningState::new(uniform(0.5, 2.0));
        let x = Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.3, 1.5), &device);
        for bias in [true, false] {
            let mut lin = linear(16, 8, bias, &device);
            lin.weight = Param::from_tensor(Tensor::random([16, 8], Distribution::Normal(0.0, 0.5), &device));
            let want = lin.forward(rep.forward(x.clone()));
            let (a, b) = rep.affine();
            let fused = fold_into_next_linear(&lin, a, b);
            assert!(fused.bias.is_some());
            let got = fused.forward(x.clone());
            let scale: f32 = want.clone().abs().max().into_scalar();
            let diff: f32 = got.sub(want).abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale.max(1.0), "bias {bias}: {diff}");
        }
    }
}
