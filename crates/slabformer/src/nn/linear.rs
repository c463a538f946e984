//! The Linear kind: burn's `Linear` built as timm's ViTs initialise it, its fast CPU form
//! ([`FastLinear`]: inference with bias / GELU / residual epilogues, the row-parallel training
//! forward and both backward GEMMs) and its ONNX emission. Its fold rule (a norm folded into the
//! Linear after it) is `nn::fuse::fold_into_next_linear`.

use burn::nn::conv::Conv2d;
use burn::nn::{Initializer, Linear, LinearConfig};
use burn::tensor::Device;
use rayon::prelude::*;

use crate::deploy::onnx::{Graph, ToOnnx};
use crate::error::Result;
use crate::kernels::{self, MatMut, MatRef, matmul};
use crate::nn::lower::{Layout, ParamTable, Slot, row_block};

/// A Linear initialised as timm's ViTs are (weight ~ N(0, 0.02), bias 0).
pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_in, d_out)
        .with_bias(bias)
        .with_initializer(Initializer::Normal { mean: 0.0, std: 0.02 })
        .init(device);
    if bias {
        layer.bias = Some(Initializer::Zeros.init([d_out], device));
    }
    layer
}

/// burn's Linear (`W: [in, out]`) is exactly ONNX MatMul + Add.
impl ToOnnx for Linear {
    fn to_onnx(&self, g: &mut Graph, x: &str) -> Result<String> {
        let w = g.param("weight", &self.weight);
        let y = g.op("MatMul", &[x, &w], vec![]);
        Ok(match &self.bias {
            Some(b) => {
                let b = g.param("bias", b);
                g.op("Add", &[&y, &b], vec![])
            }
            None => y,
        })
    }
}

/// A Linear on the fast path: weight (in, out) and bias (zeros when the layer has none) in the
/// flat parameter buffer `p` that every method takes.
pub struct FastLinear {
    pub weight: Slot,
    pub bias: Slot,
    /// Whether the bias is a parameter (it gets a gradient) or the zeros of a bias-free layer.
    has_bias: bool,
    pub inputs: usize,
    pub outputs: usize,
}

impl FastLinear {
    pub fn lower(linear: &Linear, table: &mut ParamTable) -> Result<Self> {
        let [inputs, outputs] = linear.weight.dims(); // burn keeps (in, out), as the GEMM wants
        let weight = table.add(&linear.weight, Layout::Transposed)?;
        let (bias, has_bias) = match &linear.bias {
            Some(b) => (table.add(b, Layout::Official)?, true),
            None => (table.zeros(outputs), false),
        };
        Ok(Self { weight, bias, has_bias, inputs, outputs })
    }

    /// A conv as a matrix over its im2col rows: weight (C_in·kh·kw, C_out), rows in `layout`.
    pub fn lower_conv(conv: &Conv2d, layout: Layout, table: &mut ParamTable) -> Result<Self> {
        let [outputs, in_chans, p, q] = conv.weight.dims();
        let weight = table.add(&conv.weight, layout)?;
        let (bias, has_bias) = match &conv.bias {
            Some(b) => (table.add(b, Layout::Official)?, true),
            None => (table.zeros(outputs), false),
        };
        Ok(Self { weight, bias, has_bias, inputs: in_chans * p * q, outputs })
    }

    fn weight<'a>(&self, p: &'a [f32]) -> MatRef<'a> {
        MatRef::new(&p[self.weight.range()], self.inputs, self.outputs)
    }

    pub fn bias<'a>(&self, p: &'a [f32]) -> &'a [f32] {
        &p[self.bias.range()]
    }

    /// `out = epilogue(input · W, b)` for the rows `out` holds, on this thread.
    pub fn apply_with(&self, p: &[f32], input: &[f32], out: &mut [f32], epilogue: fn(&mut [f32], &[f32])) {
        let rows = out.len() / self.outputs;
        let input = MatRef::new(&input[..rows * self.inputs], rows, self.inputs);
        matmul(MatMut::new(out, rows, self.outputs), input, self.weight(p), false, 1.0);
        epilogue(out, self.bias(p));
    }

    /// `out = input · W + b`, on this thread.
    pub fn apply(&self, p: &[f32], input: &[f32], out: &mut [f32]) {
        self.apply_with(p, input, out, kernels::add_bias);
    }

    /// `x += input · W + b` (a residual branch's output layer), on this thread.
    pub fn apply_residual(&self, p: &[f32], input: &[f32], x: &mut [f32]) {
        let rows = x.len() / self.outputs;
        kernels::add_bias(x, self.bias(p));
        let input = MatRef::new(&input[..rows * self.inputs], rows, self.inputs);
        matmul(MatMut::new(x, rows, self.outputs), input, self.weight(p), true, 1.0);
    }

    /// `out = x·W + b`, or `out += x·W + b` with `accumulate` (a residual branch), row blocks in
    /// parallel.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32], accumulate: bool) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let weight = self.weight(p);
        let bias = self.has_bias.then(|| self.bias(p));
        let per = row_block(out.len() / outputs);
        out.par_chunks_mut(per * outputs).zip(x.par_chunks(per * inputs)).for_each(|(o, x)| {
            let rows = o.len() / outputs;
            matmul(MatMut::new(o, rows, outputs), MatRef::new(x, rows, inputs), weight, accumulate, 1.0);
            if let Some(b) = bias {
                kernels::add_bias(o, b);
            }
        });
    }

    /// `out = epilogue(x·W, b)` with the pre-activation kept in `pre` (`out` holds what the
    /// epilogue makes of it), row blocks in parallel.
    pub fn forward_keep(&self, p: &[f32], x: &[f32], pre: &mut [f32], out: &mut [f32], epilogue: fn(&mut [f32], &mut [f32], &[f32])) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let (weight, bias) = (self.weight(p), self.bias(p));
        let per = row_block(pre.len() / outputs);
        pre.par_chunks_mut(per * outputs).zip(out.par_chunks_mut(per * outputs)).zip(x.par_chunks(per * inputs)).for_each(|((pre, out), x)| {
            let rows = pre.len() / outputs;
            matmul(MatMut::new(pre, rows, outputs), MatRef::new(x, rows, inputs), weight, false, 1.0);
            epilogue(pre, out, bias);
        });
    }

    /// `dx = dy·Wᵀ`, then `epilogue(dx_block, first_row)` on each row block while it is in cache.
    pub fn backward_input(&self, p: &[f32], dy: &[f32], dx: &mut [f32], epilogue: impl Fn(&mut [f32], usize) + Sync) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let weight_t = self.weight(p).t(); // (out, in)
        let per = row_block(dx.len() / inputs);
        dx.par_chunks_mut(per * inputs).zip(dy.par_chunks(per * outputs)).enumerate().for_each(|(i, (dx, dy))| {
            let rows = dx.len() / inputs;
            matmul(MatMut::new(dx, rows, inputs), MatRef::new(dy, rows, outputs), weight_t, false, 1.0);
            epilogue(dx, i * per);
        });
    }

    /// `dW += xᵀ·dy`, `db += Σ_rows dy`: one partial per thread over its share of the rows.
    pub fn backward_params(&self, g: &mut [f32], x: &[f32], dy: &[f32], scratch: &mut Vec<f32>) {
        let (inputs, outputs) = (self.inputs, self.outputs);
        let rows = dy.len() / outputs;
        let parts = rayon::current_num_threads().clamp(1, rows.max(1));
        let per = rows.div_ceil(parts);
        let width = inputs * outputs + outputs;
        scratch.clear();
        scratch.resize(parts * width, 0.0);
        scratch.par_chunks_mut(width).zip(x.par_chunks(per * inputs)).zip(dy.par_chunks(per * outputs)).for_each(|((partial, x), dy)| {
            let rows = dy.len() / outputs;
            let (dw, db) = partial.split_at_mut(inputs * outputs);
            matmul(MatMut::new(dw, inputs, outputs), MatRef::new(x, rows, inputs).t(), MatRef::new(dy, rows, outputs), false, 1.0);
            kernels::column_sums(dy, rows, outputs, 0, db);
        });
        for partial in scratch.chunks(width) {
            let (dw, db) = partial.split_at(inputs * outputs);
            kernels::add_assign(&mut g[self.weight.range()], dw);
            if self.has_bias {
                kernels::add_assign(&mut g[self.bias.range()], db);
            }
        }
    }
}

/// Two classifier heads on one pooled row, averaged: `(head(x) + head_dist(x)) / 2` (timm's
/// distilled heads outside distilled training, EfficientFormer's in training too).
pub struct FastDistilledHead {
    pub head: FastLinear,
    pub head_dist: FastLinear,
}

impl FastDistilledHead {
    pub fn lower(head: &Linear, head_dist: &Linear, table: &mut ParamTable) -> Result<Self> {
        let (head, head_dist) = (FastLinear::lower(head, table)?, FastLinear::lower(head_dist, table)?);
        if (head.inputs, head.outputs) != (head_dist.inputs, head_dist.outputs) {
            return Err(crate::error::Error::Unsupported { what: format!("distilled heads of shapes ({}, {}) and ({}, {})", head.inputs, head.outputs, head_dist.inputs, head_dist.outputs), path: "the fast CPU path" });
        }
        Ok(Self { head, head_dist })
    }

    pub fn inputs(&self) -> usize {
        self.head.inputs
    }

    pub fn outputs(&self) -> usize {
        self.head.outputs
    }

    /// One row, on this thread.
    pub fn apply(&self, p: &[f32], x: &[f32], out: &mut [f32]) {
        self.head.apply(p, x, out);
        self.head_dist.apply_residual(p, x, out);
        out.iter_mut().for_each(|v| *v *= 0.5);
    }

    /// A batch of rows.
    pub fn forward(&self, p: &[f32], x: &[f32], out: &mut [f32]) {
        self.head.forward(p, x, out, false);
        self.head_dist.forward(p, x, out, true);
        out.iter_mut().for_each(|v| *v *= 0.5);
    }

    /// `dx = ∂out/∂x · dy` (overwritten) and both heads' gradients into `g`.
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32], scratch: &mut Vec<f32>) {
        let half: Vec<f32> = dy.iter().map(|v| 0.5 * v).collect();
        self.head.backward_params(g, x, &half, scratch);
        self.head_dist.backward_params(g, x, &half, scratch);
        self.head.backward_input(p, &half, dx, |_, _| {});
        let mut other = vec![0.0; dx.len()];
        self.head_dist.backward_input(p, &half, &mut other, |_, _| {});
        kernels::add_assign(dx, &other);
    }
}

