//! Pooling heads: (B, T, C) tokens → (B, C), the class token or the token mean. The burn form,
//! the fast form (forward and backward over host rows) and the ONNX emission.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::deploy::onnx::{Graph, attr_int, attr_ints};
use crate::kernels;

/// What the head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pool {
    /// A class token is prepended; the head reads it (DeiT).
    ClassToken,
    /// No class token in the sequence; the head reads the token mean (SLAB/FLatten). The
    /// `cls_token` parameter still exists, unused, as in the official SLAB code.
    Mean,
}

impl Pool {
    /// (B, T, C) → (B, C).
    pub fn forward(self, x: Tensor<3>) -> Tensor<2> {
        let [b, _, c] = x.dims();
        let pooled = match self {
            Pool::ClassToken => x.narrow(1, 0, 1), // (B, 1, C)
            Pool::Mean => x.mean_dim(1),           // (B, 1, C)
        };
        pooled.reshape([b, c])
    }

    /// One image's (T, C) tokens → its (C) pooled row.
    pub fn apply(self, tokens: &[f32], c: usize, out: &mut [f32]) {
        match self {
            Pool::ClassToken => out.copy_from_slice(&tokens[..c]),
            Pool::Mean => {
                let t = tokens.len() / c;
                kernels::column_sums(tokens, t, c, 0, out);
                out.iter_mut().for_each(|v| *v /= t as f32);
            }
        }
    }

    /// Its backward: the pooled row's gradient `dpooled` (C) spread over the image's (T, C)
    /// token gradients `dtokens` (overwritten).
    pub fn backward(self, dpooled: &[f32], dtokens: &mut [f32]) {
        let c = dpooled.len();
        let t = dtokens.len() / c;
        match self {
            Pool::ClassToken => {
                dtokens.fill(0.0);
                dtokens[..c].copy_from_slice(dpooled);
            }
            Pool::Mean => dtokens.chunks_exact_mut(c).for_each(|row| row.iter_mut().zip(dpooled).for_each(|(r, v)| *r = v / t as f32)),
        }
    }

    /// (B, T, C) → (B, C) in the graph.
    pub fn to_onnx(self, g: &mut Graph, x: &str) -> String {
        match self {
            Pool::Mean => g.op("ReduceMean", &[x], vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)]),
            Pool::ClassToken => g.gather(x, 0, 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::host_f32;
    use burn::tensor::Device;

    #[test]
    fn fast_pooling_and_its_backward_equal_burn() {
        let device = Device::flex().autodiff();
        for pool in [Pool::ClassToken, Pool::Mean] {
            let x = crate::testing::standard_normal([2, 5, 3], 23, &device).require_grad();
            let weight = crate::testing::standard_normal([2, 3], 24, &device);
            let pooled = pool.forward(x.clone());
            let grads = pooled.clone().mul(weight.clone()).sum().backward();
            let (xs, want, want_dx) = (host_f32(x.clone()), host_f32(pooled), host_f32(x.grad(&grads).unwrap()));
            let w = host_f32(weight);
            for image in 0..2 {
                let mut out = [0.0; 3];
                pool.apply(&xs[image * 15..(image + 1) * 15], 3, &mut out);
                crate::testing::assert_near(&format!("{pool:?} forward"), &out, &want[image * 3..(image + 1) * 3], 1e-6, 0.0);
                let mut dx = [1.0; 15]; // overwritten
                pool.backward(&w[image * 3..(image + 1) * 3], &mut dx);
                crate::testing::assert_near(&format!("{pool:?} backward"), &dx, &want_dx[image * 15..(image + 1) * 15], 1e-6, 0.0);
            }
        }
    }
}
