//! EfficientFormer v1's Meta3D attention (timm's `efficientformer.Attention`, SPEC §3.7): softmax
//! attention whose `qkv` outputs are head-interleaved (head h owns q, k (key_dim each) and v
//! (val_dim) in `[h·(2·key_dim + val_dim), …)`), scores scaled by key_dim^-½ plus a learned bias
//! gathered by the absolute offset between query and key ([`attention_bias`](super::attention_bias)).
//! The burn module, its fast form (inference, training forward and backward) and its ONNX emission.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Initializer, Linear};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rayon::prelude::*;

use super::attention_bias::{bias_index, gather_bias};
use super::linear::{FastLinear, linear};
use super::lower::{Layout, ParamTable, Slot, sized};
use crate::deploy::onnx::{Graph, ToOnnx, attr_int};
use crate::error::{Error, Result};
use crate::kernels::{self, MatMut, MatRef, matmul};

#[derive(Module, Debug)]
pub struct Meta3dAttention {
    pub qkv: Linear,
    pub proj: Linear,
    /// (heads, N).
    pub attention_biases: Param<Tensor<2>>,
    /// (N, N), persistent in timm's state dict.
    pub attention_bias_idxs: Param<Tensor<2, Int>>,
    pub heads: usize,
    pub key_dim: usize,
    pub val_dim: usize,
}

impl Meta3dAttention {
    /// On a `resolution`² token grid; `val_dim = attn_ratio·key_dim`.
    pub fn new(dim: usize, heads: usize, key_dim: usize, attn_ratio: usize, resolution: usize, device: &Device) -> Self {
        let (index, shape) = bias_index([resolution; 2], 1);
        let val_dim = attn_ratio * key_dim;
        Self {
            qkv: linear(dim, heads * (2 * key_dim + val_dim), true, device),
            proj: linear(heads * val_dim, dim, true, device),
            attention_biases: Initializer::Zeros.init([heads, resolution * resolution], device),
            attention_bias_idxs: Param::initialized(ParamId::new(), Tensor::from_data(TensorData::new(index, shape), device)),
            heads,
            key_dim,
            val_dim,
        }
    }

    pub fn param_count(dim: usize, heads: usize, key_dim: usize, attn_ratio: usize, resolution: usize) -> usize {
        let (qkv, v) = (heads * (2 + attn_ratio) * key_dim, heads * attn_ratio * key_dim);
        dim * qkv + qkv + v * dim + dim + heads * resolution * resolution
    }

    fn per_head(&self) -> usize {
        2 * self.key_dim + self.val_dim
    }

    /// (B, N, C) → (B, N, C).
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let (h, kd) = (self.heads, self.key_dim);
        let qkv = self.qkv.forward(x).reshape([b, n, h, self.per_head()]).swap_dims(1, 2); // (B, h, N, 2kd + vd)
        let q = qkv.clone().narrow(3, 0, kd);
        let k = qkv.clone().narrow(3, kd, kd);
        let v = qkv.narrow(3, 2 * kd, self.val_dim);
        let bias = gather_bias(&self.attention_biases, self.attention_bias_idxs.val()).unsqueeze::<4>(); // (1, h, N, N)
        let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar((kd as f64).powf(-0.5)).add(bias); // (B, h, N, N)
        let out = softmax(scores, 3).matmul(v); // (B, h, N, vd)
        self.proj.forward(out.swap_dims(1, 2).reshape([b, n, h * self.val_dim])) // (B, N, C)
    }
}

impl ToOnnx for Meta3dAttention {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let n = self.attention_bias_idxs.dims()[0];
        let (kd, per) = (self.key_dim as i64, self.per_head() as i64);
        let qkv = self.qkv.to_onnx(g, x)?;
        let qkv = g.split_heads(&qkv, n, self.heads, self.per_head()); // (B, h, N, 2kd + vd)
        let q = g.slice(&qkv, 3, 0, kd);
        let k = g.slice(&qkv, 3, kd, 2 * kd);
        let v = g.slice(&qkv, 3, 2 * kd, per);
        let kt = g.transpose(&k, &[0, 1, 3, 2]);
        let scores = g.op("MatMul", &[&q, &kt], vec![]);
        let scores = g.binary_scalar("Mul", &scores, (self.key_dim as f32).powf(-0.5));
        // The gathered bias is a constant of the trained table.
        let bias = g.tensor("attention_bias", gather_bias(&self.attention_biases, self.attention_bias_idxs.val()));
        let scores = g.op("Add", &[&scores, &bias], vec![]);
        let attn = g.op("Softmax", &[&scores], vec![attr_int("axis", -1)]);
        let out = g.op("MatMul", &[&attn, &v], vec![]);
        let out = g.merge_heads(&out, n, self.heads * self.val_dim);
        self.proj.to_onnx(g, &out)
    }
}

/// [`Meta3dAttention`] on the fast path, over sequences of the N tokens its index covers.
pub struct FastMeta3dAttention {
    pub qkv: FastLinear,
    pub proj: FastLinear,
    biases: Slot,
    /// (N, N) row-major: the bias-table column of each (query, key) pair.
    index: Vec<usize>,
    tokens: usize,
    heads: usize,
    key_dim: usize,
    val_dim: usize,
}

/// What the training forward keeps: the (B·N, h·(2kd + vd)) qkv rows, the (B, h, N, N) softmax
/// weights and the (B·N, h·vd) merged head outputs.
#[derive(Default)]
pub struct Meta3dActivations {
    qkv: Vec<f32>,
    probs: Vec<f32>,
    merged: Vec<f32>,
}

impl FastMeta3dAttention {
    pub fn lower(attn: &Meta3dAttention, table: &mut ParamTable) -> Result<Self> {
        let [nq, nk] = attn.attention_bias_idxs.dims();
        let index: Vec<usize> = attn.attention_bias_idxs.val().into_data().convert::<i64>().try_to_vec::<i64>().map_err(|e| Error::Unsupported { what: format!("an attention bias index that does not read as integers ({e:?})"), path: "the fast CPU path" })?.into_iter().map(|i| i as usize).collect();
        let [heads, columns] = attn.attention_biases.dims();
        // The kernels step through the biases a row of `nq` per head.
        if nq != nk || heads != attn.heads || columns != nq || index.iter().any(|&i| i >= columns) {
            return Err(Error::Unsupported { what: format!("a Meta3D attention with a ({nq}, {nk}) bias index into ({heads}, {columns}) biases"), path: "the fast CPU path" });
        }
        Ok(Self {
            qkv: FastLinear::lower(&attn.qkv, table)?,
            proj: FastLinear::lower(&attn.proj, table)?,
            biases: table.add(&attn.attention_biases, Layout::Official)?,
            index,
            tokens: nq,
            heads,
            key_dim: attn.key_dim,
            val_dim: attn.val_dim,
        })
    }

    /// The width of the tokens it reads.
    pub fn dim(&self) -> usize {
        self.qkv.inputs
    }

    /// Tokens per sequence.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    fn per_head(&self) -> usize {
        2 * self.key_dim + self.val_dim
    }

    fn scale(&self) -> f32 {
        (self.key_dim as f32).powf(-0.5)
    }

    /// One sequence's qkv rows → its softmax weights (h, N, N) and merged head outputs (N, h·vd).
    fn mix(&self, p: &[f32], qkv: &[f32], probs: &mut [f32], merged: &mut [f32]) {
        let (n, kd, vd, per) = (self.tokens, self.key_dim, self.val_dim, self.per_head());
        let (width, out_width) = (self.heads * per, self.heads * self.val_dim);
        let biases = &p[self.biases.range()];
        for (h, probs) in probs.chunks_exact_mut(n * n).enumerate() {
            let q = MatRef::columns(qkv, n, width, h * per, kd);
            let k = MatRef::columns(qkv, n, width, h * per + kd, kd);
            matmul(MatMut::new(probs, n, n), q, k.t(), false, self.scale());
            let bias = &biases[h * n..(h + 1) * n];
            for (row, index) in probs.chunks_exact_mut(n).zip(self.index.chunks_exact(n)) {
                row.iter_mut().zip(index).for_each(|(s, &i)| *s += bias[i]);
                softmax_row(row);
            }
            let v = MatRef::columns(qkv, n, width, h * per + 2 * kd, vd);
            matmul(MatMut::columns(merged, n, out_width, h * vd, vd), MatRef::new(probs, n, n), v, false, 1.0);
        }
    }

    /// One sequence in eval mode, on this thread: (N, C) → (N, C).
    pub fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32]) {
        let n = self.tokens;
        let mut qkv = vec![0.0; n * self.heads * self.per_head()];
        self.qkv.apply(p, x, &mut qkv);
        let (mut probs, mut merged) = (vec![0.0; self.heads * n * n], vec![0.0; n * self.heads * self.val_dim]);
        self.mix(p, &qkv, &mut probs, &mut merged);
        self.proj.apply(p, &merged, out);
    }

    /// `out = attn(x)` over `batch` sequences (B·N, C), keeping what the backward needs.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], a: &mut Meta3dActivations, batch: usize) {
        let n = self.tokens;
        let (width, out_width) = (self.heads * self.per_head(), self.heads * self.val_dim);
        self.qkv.forward(p, x, sized(&mut a.qkv, batch * n * width), false);
        let probs = sized(&mut a.probs, batch * self.heads * n * n);
        let merged = sized(&mut a.merged, batch * n * out_width);
        probs.par_chunks_mut(self.heads * n * n).zip(merged.par_chunks_mut(n * out_width)).zip(a.qkv.par_chunks(n * width)).for_each(|((probs, merged), qkv)| self.mix(p, qkv, probs, merged));
        self.proj.forward(p, &a.merged, out, false);
    }

    /// `dx = ∂attn/∂x · dy` (overwritten), the parameter gradients (the bias table's summed over
    /// the pairs that read each entry) into `g`.
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], a: &Meta3dActivations, dy: &[f32], dx: &mut [f32]) {
        let (n, kd, vd, per, heads) = (self.tokens, self.key_dim, self.val_dim, self.per_head(), self.heads);
        let (width, out_width) = (heads * per, heads * vd);
        let rows = dy.len() / self.proj.outputs;
        let mut partials = Vec::new();
        let mut dmerged = vec![0.0; rows * out_width];
        self.proj.backward_input(p, dy, &mut dmerged, |_, _| {});
        self.proj.backward_params(g, &a.merged, dy, &mut partials);
        let scale = self.scale();
        let mut dqkv = vec![0.0; rows * width];
        let dbiases: Vec<Vec<f32>> = dqkv
            .par_chunks_mut(n * width)
            .zip(dmerged.par_chunks(n * out_width))
            .zip(a.qkv.par_chunks(n * width))
            .zip(a.probs.par_chunks(heads * n * n))
            .map(|(((dqkv, dmerged), qkv), probs)| {
                let mut dbias = vec![0.0; heads * n];
                let mut ds = vec![0.0; n * n];
                for (h, probs) in probs.chunks_exact(n * n).enumerate() {
                    let dout = MatRef::columns(dmerged, n, out_width, h * vd, vd);
                    let v = MatRef::columns(qkv, n, width, h * per + 2 * kd, vd);
                    let p_mat = MatRef::new(probs, n, n);
                    matmul(MatMut::columns(dqkv, n, width, h * per + 2 * kd, vd), p_mat.t(), dout, false, 1.0); // dV = Pᵀ·dO
                    matmul(MatMut::new(&mut ds, n, n), dout, v.t(), false, 1.0); // dP = dO·Vᵀ
                    let dbias = &mut dbias[h * n..(h + 1) * n];
                    for ((d, prob), index) in ds.chunks_exact_mut(n).zip(probs.chunks_exact(n)).zip(self.index.chunks_exact(n)) {
                        let dot: f32 = d.iter().zip(prob).map(|(d, p)| d * p).sum();
                        for ((d, &p), &i) in d.iter_mut().zip(prob).zip(index) {
                            *d = p * (*d - dot); // ∂L/∂score
                            dbias[i] += *d;
                        }
                    }
                    let ds_mat = MatRef::new(&ds, n, n);
                    let q = MatRef::columns(qkv, n, width, h * per, kd);
                    let k = MatRef::columns(qkv, n, width, h * per + kd, kd);
                    matmul(MatMut::columns(dqkv, n, width, h * per, kd), ds_mat, k, false, scale); // dQ
                    matmul(MatMut::columns(dqkv, n, width, h * per + kd, kd), ds_mat.t(), q, false, scale); // dK
                }
                dbias
            })
            .collect();
        dbiases.iter().for_each(|d| kernels::add_assign(&mut g[self.biases.range()], d));
        self.qkv.backward_params(g, x, &dqkv, &mut partials);
        self.qkv.backward_input(p, &dqkv, dx, |_, _| {});
    }
}

/// `row = softmax(row)`, in place.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in row.iter_mut() {
        *v = kernels::exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|v| *v *= inv);
}
