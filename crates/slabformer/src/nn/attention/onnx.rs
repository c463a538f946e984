//! ONNX emission of the attention kinds, op for op as their burn forwards.

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use super::{Attention, DotAttention, FOCUS_OFFSET, FeatureMap, LinearAttention, Score, linear_attention_eps, linear_order};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int, attr_ints};
use crate::error::Result;

impl ToOnnx for Attention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        match self {
            Attention::Dot(a) => a.to_onnx(g, x),
            Attention::Linear(a) => a.to_onnx(g, x),
        }
    }
}

impl ToOnnx for DotAttention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let h = self.num_heads;
        let c = self.qkv.weight.dims()[0];
        let d = c / h;
        let qkv = self.qkv.to_onnx(g, x)?;
        let qkv = g.reshape(&qkv, &[0, -1, 3, h as i64, d as i64]);
        let qkv = g.transpose(&qkv, &[2, 0, 3, 1, 4]); // (3, B, h, N, d)
        let mut q = g.gather(&qkv, 0, 0);
        let mut k = g.gather(&qkv, 1, 0);
        let v = g.gather(&qkv, 2, 0);
        for (t, norm) in [(&mut q, &self.q_norm), (&mut k, &self.k_norm)] {
            if let Some(norm) = norm {
                *t = norm.to_onnx(g, t)?;
            }
        }
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let scores = g.op("MatMul", &[&q, &kt], vec![]);
        let scores = g.binary_scalar("Mul", &scores, (d as f64).powf(-0.5) as f32);
        let weights = match self.score {
            Score::Softmax => g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]),
            Score::ReluOverLength => {
                // ReLU(s)/L with L the number of keys, read from the graph (any token count).
                let r = g.op("Relu", &[&scores], vec![]);
                let shape = g.op("Shape", &[&scores], vec![]);
                let last = g.gather(&shape, 3, 0);
                let length = g.op("Cast", &[&last], vec![attr_int("to", 1)]);
                g.op("Div", &[&r, &length], vec![])
            }
        };
        let out = g.op("MatMul", &[&weights, &v], vec![]); // (B, h, N, d)
        let out = g.transpose(&out, &[0, 2, 1, 3]);
        let mut out = g.reshape(&out, &[0, -1, c as i64]); // (B, N, C)
        if let Some(gate) = &self.gate {
            let gate = gate.to_onnx(g, x)?;
            out = g.op("Mul", &[&out, &gate], vec![]);
        }
        self.proj.to_onnx(g, &out)
    }
}

impl ToOnnx for LinearAttention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let n = self.grid[0] * self.grid[1];
        let h = self.num_heads;
        let c = self.qkv.weight.dims()[0];
        let d = c / h;
        let qkv = self.qkv.to_onnx(g, x)?;
        let qkv = g.reshape(&qkv, &[0, n as i64, 3, c as i64]);
        let q = g.gather(&qkv, 0, 2);
        let k = g.gather(&qkv, 1, 2);
        let v = g.gather(&qkv, 2, 2);
        let pos = g.param("positional_encoding", &self.positional_encoding);
        let k = g.op("Add", &[&k, &pos], vec![]);
        let (q, k) = feature_map(g, self.feature_map, self.scale.as_ref(), &q, &k);
        let (q, k, v) = (g.split_heads(&q, n, h, d), g.split_heads(&k, n, h, d), g.split_heads(&v, n, h, d));
        let out = linear_core(g, &q, &k, &v, [n, n], d, linear_attention_eps(self.feature_map, n) as f32);
        let conv = depthwise_on_grid(g, &self.dwc, &v, self.grid, h, d);
        let out = g.op("Add", &[&out, &conv], vec![]);
        let merged = g.merge_heads(&out, n, c);
        self.proj.to_onnx(g, &merged)
    }
}

/// φ(q), φ(k) on (B, N, C) as `FeatureMap::apply` computes them; `theta` is FLatten's scale.
pub(super) fn feature_map(g: &mut Graph, map: FeatureMap, theta: Option<&Param<Tensor<3>>>, q: &str, k: &str) -> (String, String) {
    match map {
        FeatureMap::Relu => (g.op("Relu", &[q], vec![]), g.op("Relu", &[k], vec![])),
        FeatureMap::Focused { power } => {
            let theta = g.param("focus_scale", theta.expect("focused attention has a scale"));
            let scale = g.op("Softplus", &[&theta], vec![]);
            (focus(g, q, &scale, power), focus(g, k, &scale, power))
        }
    }
}

/// The linear-attention core on heads q (B, h, N_q, d), k and v (B, h, N_k, d), in the order
/// `linear_attention_core` picks for `[N_q, N_k]`.
pub(super) fn linear_core(g: &mut Graph, q: &str, k: &str, v: &str, [n_q, n_k]: [usize; 2], d: usize, eps: f32) -> String {
    let kt = g.transpose(k, &[0, 1, 3, 2]);
    let numerator = if linear_order(n_q, n_k, d, d) {
        let kv = g.op("MatMul", &[&kt, v], vec![]);
        g.op("MatMul", &[q, &kv], vec![])
    } else {
        let qk = g.op("MatMul", &[q, &kt], vec![]);
        g.op("MatMul", &[&qk, v], vec![])
    };
    let k_sum = g.reduce_sum(k, 2);
    let qk_sum = g.op("Mul", &[q, &k_sum], vec![]);
    let denominator = g.reduce_sum(&qk_sum, 3);
    let denominator = g.binary_scalar("Add", &denominator, eps);
    g.op("Div", &[&numerator, &denominator], vec![])
}

/// DWC on each head's v (B, h, N, d) as a d-channel image on the row-major `grid`, one conv
/// shared by the heads; (B, h, N, d) out.
pub(super) fn depthwise_on_grid(g: &mut Graph, dwc: &Conv2d, v: &str, [rows, cols]: [usize; 2], h: usize, d: usize) -> String {
    let n = rows * cols;
    let image = g.reshape(v, &[-1, n as i64, d as i64]);
    let image = g.transpose(&image, &[0, 2, 1]);
    let image = g.reshape(&image, &[-1, d as i64, rows as i64, cols as i64]);
    let pad = dwc.weight.dims()[2] / 2;
    let conv = g.conv(&image, dwc, pad);
    let conv = g.reshape(&conv, &[-1, h as i64, d as i64, n as i64]);
    g.transpose(&conv, &[0, 1, 3, 2])
}

/// FLatten's feature map `f_p((ReLU(t) + 1e-6) / scale)` over the channel axis, as
/// `nn::attention::focus_power` computes it.
pub(super) fn focus(g: &mut Graph, t: &str, scale: &str, power: f64) -> String {
    let r = g.op("Relu", &[t], vec![]);
    let r = g.binary_scalar("Add", &r, FOCUS_OFFSET as f32);
    let x = g.op("Div", &[&r, scale], vec![]);
    let norm = l2_norm(g, &x);
    let base = if power <= 6.0 {
        x
    } else {
        let max = g.op("ReduceMax", &[&x], vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)]);
        g.op("Div", &[&x, &max], vec![])
    };
    let xp = g.binary_scalar("Pow", &base, power as f32);
    let norm_p = l2_norm(g, &xp);
    let unit = g.op("Div", &[&xp, &norm_p], vec![]);
    g.op("Mul", &[&unit, &norm], vec![])
}

/// ‖x‖ over the last axis of (B, N, C), keeping the axis.
fn l2_norm(g: &mut Graph, x: &str) -> String {
    let squares = g.op("Mul", &[x, x], vec![]);
    let sum = g.reduce_sum(&squares, 2);
    g.op("Sqrt", &[&sum], vec![])
}
