//! Folding a per-channel affine map (an eval-mode RepBN, SPEC §2.4) into a neighbouring linear
//! layer (SPEC §2.8).

use burn::module::Param;
use burn::nn::{Linear, PaddingConfig2d};
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// How F2 treats the conv bias.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConvFold {
    /// `c' = a ⊙ c + b`: exact.
    Exact,
    /// The official Swin `PatchEmbed.merge_bn`, which drops the `η·c` term of RepBN
    /// (`c' = γ(c − μ)/s + β`); only for reproducing official fused checkpoints.
    OfficialPatchEmbed { alpha: f32 },
}

/// F2: `RepBN(conv(x))` as one conv (a, b from [`RepBN::affine`](crate::nn::norm::RepBN::affine),
/// per output channel): `W' = a ⊙ W`, `c' = a ⊙ c + b`.
pub fn fold_into_previous_conv(conv: &Conv2d, a: Tensor<1>, b: Tensor<1>, mode: ConvFold) -> Conv2d {
    let weight = conv.weight.val(); // [out, in/groups, kh, kw]
    let out = weight.dims()[0];
    let c = match &conv.bias {
        Some(c) => c.val(),
        None => Tensor::zeros([out], &weight.device()),
    };
    let bias = a.clone().mul(c.clone()).add(b);
    let bias = match mode {
        ConvFold::Exact => bias,
        ConvFold::OfficialPatchEmbed { alpha } => bias.sub(c.mul_scalar(alpha)),
    };
    let mut fused = conv.clone();
    fused.weight = Param::from_tensor(weight.mul(a.reshape([out, 1, 1, 1])));
    fused.bias = Some(Param::from_tensor(bias));
    fused
}

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

/// F1 for a conv that reads the norm's output, `conv(a ⊙ x + b)` as one conv (PVT's `sr`
/// reduction after the block norm): `W'[o, i, …] = W[o, i, …]·a_i`,
/// `c'[o] = c[o] + Σ_{i, kh, kw} W[o, i, kh, kw]·b_i`. Exact only for an ungrouped conv without
/// padding, where every output reads a full window of normed inputs; `None` otherwise.
pub fn fold_into_next_conv(conv: &Conv2d, a: Tensor<1>, b: Tensor<1>) -> Option<Conv2d> {
    let unpadded = matches!(conv.padding, PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0));
    if conv.groups != 1 || !unpadded {
        return None;
    }
    let weight = conv.weight.val(); // [out, in, kh, kw]
    let [out, d_in, _, _] = weight.dims();
    let shift = weight.clone().mul(b.reshape([1, d_in, 1, 1])).sum_dim(3).sum_dim(2).sum_dim(1).reshape([out]);
    let bias = match &conv.bias {
        Some(c) => c.val().add(shift),
        None => shift,
    };
    let mut fused = conv.clone();
    fused.weight = Param::from_tensor(weight.mul(a.reshape([1, d_in, 1, 1])));
    fused.bias = Some(Param::from_tensor(bias));
    Some(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::norm::tests::randomized_repbn;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn folded_conv_equals_repbn_after_conv_and_compat_mode_misses_alpha_bias() {
        // SPEC §7.2 item 11.
        use burn::nn::conv::Conv2dConfig;
        let device = Device::flex();
        let rep = randomized_repbn(8, &device);
        let mut conv = Conv2dConfig::new([3, 8], [2, 2]).with_stride([2, 2]).init(&device);
        conv.bias = Some(Param::from_tensor(Tensor::random([8], Distribution::Uniform(-1.0, 1.0), &device)));
        let x = crate::testing::standard_normal([2, 3, 8, 8], 27, &device);
        let tokens = |y: Tensor<4>| {
            let [b, c, h, w] = y.dims();
            y.reshape([b, c, h * w]).swap_dims(1, 2) // (B, N, C) for RepBN
        };
        let want = rep.forward(tokens(conv.forward(x.clone())));
        let (a, b) = rep.affine();
        let exact = tokens(fold_into_previous_conv(&conv, a.clone(), b.clone(), ConvFold::Exact).forward(x.clone()));
        let diff: f32 = exact.clone().sub(want.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "{diff}");
        let official = tokens(fold_into_previous_conv(&conv, a, b, ConvFold::OfficialPatchEmbed { alpha: 0.37 }).forward(x));
        // The official merge is off by exactly η·c per output channel.
        let eta_c = conv.bias.as_ref().unwrap().val().mul_scalar(0.37).reshape([1, 1, 8]);
        let gap: f32 = exact.sub(official).sub(eta_c).abs().max().into_scalar();
        assert!(gap < 1e-5, "{gap}");
    }

    #[test]
    fn folded_next_conv_equals_conv_after_repbn_and_padded_convs_are_refused() {
        use burn::nn::conv::Conv2dConfig;
        let device = Device::flex();
        let rep = randomized_repbn(6, &device);
        let conv = Conv2dConfig::new([6, 5], [2, 2]).with_stride([2, 2]).init(&device);
        let x = crate::testing::standard_normal([2, 6, 8, 8], 28, &device);
        let tokens = x.clone().reshape([2, 6, 64]).swap_dims(1, 2); // (B, N, C)
        let normed = rep.forward(tokens).swap_dims(1, 2).reshape([2, 6, 8, 8]);
        let want = conv.forward(normed);
        let (a, b) = rep.affine();
        let fused = fold_into_next_conv(&conv, a.clone(), b.clone()).unwrap();
        let diff: f32 = fused.forward(x).sub(want.clone()).abs().max().into_scalar();
        let scale: f32 = want.abs().max().into_scalar();
        assert!(diff < 1e-5 * scale.max(1.0), "{diff} vs {scale}");
        let padded = Conv2dConfig::new([6, 5], [3, 3]).with_padding(burn::nn::PaddingConfig2d::Explicit(1, 1, 1, 1)).init(&device);
        assert!(fold_into_next_conv(&padded, a, b).is_none());
    }
}
