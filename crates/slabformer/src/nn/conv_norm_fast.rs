//! The fast form of the conv blocks of [`conv_norm`](super::conv_norm): conv → BatchNorm2d →
//! activation on (H·W, C) raster rows, the layout every plan step works in. Dense convs are a
//! GEMM over im2col rows (none for 1×1 stride-1 convs: the rows are the GEMM's input as they
//! are); depthwise convs (with a channel multiplier) run directly over the rows, each kernel tap
//! one multiply-add across the channels. Training uses the batch statistics and updates the
//! running ones ([`FastNorm`]); inference uses the running statistics, or the BatchNorm folded
//! into the conv for a deploy block.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::attention::kernels::DepthwiseConv;
use super::conv::{FastConv, Source};
use super::conv_norm::{Activation, ConvAct, ConvNormAct};
use super::lower::{Layout, ParamTable, Slot};
use super::mlp::{bias_gelu, bias_silu, gelu_backward};
use super::norm::BatchNorm;
use super::norm::fast::{FastNorm, NormCache};
use crate::error::{Error, Result};
use crate::kernels::{self, exp, gelu, multiversion};
use crate::plan::FastBlock;
use rand_pcg::Pcg64;
use crate::state::StateDict;

fn unsupported(what: String) -> Error {
    Error::Unsupported { what, path: "the fast CPU path" }
}

/// A depthwise conv (groups = C_in, C_out = multiplier·C_in) over raster rows; weight kept as
/// (k·k, C_out): each kernel tap is one row across the output channels.
pub struct FastDepthwise {
    weight: Slot,
    bias: Option<Slot>,
    in_chans: usize,
    multiplier: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

multiversion! {
    /// `out[c] += w[c]·x[c / multiplier]` across the output channels.
    fn tap_forward(out: &mut [f32], w: &[f32], x: &[f32], multiplier: usize) {
        if multiplier == 1 {
            for ((o, w), x) in out.iter_mut().zip(w).zip(x) {
                *o += w * x;
            }
        } else {
            for ((o, w), c) in out.iter_mut().zip(w).zip(0..) {
                *o += w * x[c / multiplier];
            }
        }
    }
}

multiversion! {
    /// One tap's backward: `dw[c] += dy[c]·x[c / m]`, `dx[c / m] += dy[c]·w[c]`.
    fn tap_backward(dy: &[f32], w: &[f32], x: &[f32], dw: &mut [f32], dx: &mut [f32], multiplier: usize) {
        if multiplier == 1 {
            for ((((g, w), x), dw), dx) in dy.iter().zip(w).zip(x).zip(dw.iter_mut()).zip(dx.iter_mut()) {
                *dw += g * x;
                *dx += g * w;
            }
        } else {
            for (c, ((g, w), dw)) in dy.iter().zip(w).zip(dw.iter_mut()).enumerate() {
                *dw += g * x[c / multiplier];
                dx[c / multiplier] += g * w;
            }
        }
    }
}

impl FastDepthwise {
    fn lower(conv: &Conv2d, padding: usize, table: &mut ParamTable) -> Result<Self> {
        let [out_chans, per_group, kh, kw] = conv.weight.dims();
        let in_chans = conv.groups;
        if per_group != 1 || kh != kw || conv.stride[0] != conv.stride[1] || out_chans % in_chans != 0 {
            return Err(unsupported(format!("a depthwise conv with weight {:?} and stride {:?}", conv.weight.dims(), conv.stride)));
        }
        Ok(Self {
            weight: table.add(&conv.weight, Layout::Transposed)?,
            bias: conv.bias.as_ref().map(|b| table.add(b, Layout::Official)).transpose()?,
            in_chans,
            multiplier: out_chans / in_chans,
            kernel: kh,
            stride: conv.stride[0],
            padding,
        })
    }

    fn out_chans(&self) -> usize {
        self.in_chans * self.multiplier
    }

    fn out_grid(&self, grid: [usize; 2]) -> [usize; 2] {
        grid.map(|n| (n + 2 * self.padding).saturating_sub(self.kernel) / self.stride + 1)
    }

    /// The input rows and kernel taps output pixel (r, q) reads: (tap index, input pixel).
    fn taps(&self, [h, w]: [usize; 2], r: usize, q: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let k = self.kernel;
        (0..k * k).filter_map(move |t| {
            let y = (r * self.stride + t / k).checked_sub(self.padding).filter(|y| *y < h)?;
            let x = (q * self.stride + t % k).checked_sub(self.padding).filter(|x| *x < w)?;
            Some((t, y * w + x))
        })
    }

    /// SLA's depthwise-conv kernel (AVX-512 where the CPU has it) covers the stride-1 "same"
    /// convs without a channel multiplier.
    fn as_same_conv<'a>(&self, p: &'a [f32], zeros: &'a [f32], grid: [usize; 2]) -> Option<DepthwiseConv<'a>> {
        let same = self.stride == 1 && self.multiplier == 1 && self.padding == self.kernel / 2 && self.kernel % 2 == 1;
        let bias = self.bias.map_or(zeros, |b| &p[b.range()]);
        same.then(|| DepthwiseConv { taps: &p[self.weight.range()], bias, grid, kernel: self.kernel })
    }

    /// Output rows `first..` (as many as `out` holds) of one image's input rows `x`.
    fn forward_rows(&self, p: &[f32], x: &[f32], grid: [usize; 2], first: usize, out: &mut [f32]) {
        let (ci, co) = (self.in_chans, self.out_chans());
        let zeros = vec![0.0; co];
        if let Some(conv) = self.as_same_conv(p, &zeros, grid) {
            out.fill(0.0);
            conv.add_to(x, ci, 0, out, first);
            return;
        }
        let ow = self.out_grid(grid)[1];
        let weight = &p[self.weight.range()];
        for (index, o) in out.chunks_exact_mut(co).enumerate() {
            match self.bias {
                Some(b) => o.copy_from_slice(&p[b.range()]),
                None => o.fill(0.0),
            }
            let (r, q) = ((first + index) / ow, (first + index) % ow);
            for (t, pixel) in self.taps(grid, r, q) {
                tap_forward(o, &weight[t * co..(t + 1) * co], &x[pixel * ci..(pixel + 1) * ci], self.multiplier);
            }
        }
    }

    /// One image's backward: `dx +=`, and the weight and bias gradients into `dw` (k·k, C_out)
    /// and `db`.
    fn backward_image(&self, p: &[f32], x: &[f32], grid: [usize; 2], dy: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
        let (ci, co) = (self.in_chans, self.out_chans());
        let zeros = vec![0.0; co];
        if let Some(conv) = self.as_same_conv(p, &zeros, grid) {
            dy.chunks_exact(co).for_each(|g| kernels::add_assign(db, g));
            conv.backward(dy, x, ci, 0, dx, ci, 0, dw);
            return;
        }
        let ow = self.out_grid(grid)[1];
        let weight = &p[self.weight.range()];
        for (index, g) in dy.chunks_exact(co).enumerate() {
            kernels::add_assign(db, g);
            for (t, pixel) in self.taps(grid, index / ow, index % ow) {
                let taps = t * co..(t + 1) * co;
                tap_backward(g, &weight[taps.clone()], &x[pixel * ci..(pixel + 1) * ci], &mut dw[taps], &mut dx[pixel * ci..(pixel + 1) * ci], self.multiplier);
            }
        }
    }
}

/// A conv on the fast path: dense (groups 1) or depthwise.
pub enum FastConv2d {
    Dense(FastConv),
    Depthwise(FastDepthwise),
}

impl FastConv2d {
    pub fn lower(conv: &Conv2d, table: &mut ParamTable) -> Result<Self> {
        let padding = match conv.padding {
            PaddingConfig2d::Valid => 0,
            PaddingConfig2d::Explicit(top, left, bottom, right) if [left, bottom, right] == [top; 3] => top,
            ref other => return Err(unsupported(format!("conv padding {other:?}"))),
        };
        let [_, per_group, ..] = conv.weight.dims();
        match conv.groups {
            1 => Ok(Self::Dense(FastConv::lower(conv, Source::Rows, table)?)),
            groups if per_group == 1 && groups > 1 => Ok(Self::Depthwise(FastDepthwise::lower(conv, padding, table)?)),
            groups => Err(unsupported(format!("a grouped conv with {groups} groups of {per_group} input channels"))),
        }
    }

    pub fn in_chans(&self) -> usize {
        match self {
            Self::Dense(c) => c.in_chans,
            Self::Depthwise(d) => d.in_chans,
        }
    }

    pub fn out_chans(&self) -> usize {
        match self {
            Self::Dense(c) => c.outputs(),
            Self::Depthwise(d) => d.out_chans(),
        }
    }

    pub fn out_grid(&self, grid: [usize; 2]) -> [usize; 2] {
        match self {
            Self::Dense(c) => c.out_grid(grid),
            Self::Depthwise(d) => d.out_grid(grid),
        }
    }

    /// Whether a dense conv's im2col rows are its input rows as they are (1×1, stride 1).
    fn is_pointwise(&self) -> bool {
        matches!(self, Self::Dense(c) if c.kernel == [1, 1] && c.stride == [1, 1] && c.padding == [0, 0])
    }

    /// One image's output rows `first..` (as many as `out` holds), on this thread: input rows
    /// (H·W, C_in) → `act` of the output rows of (H'·W', C_out). A dense conv applies the
    /// activation with its bias as the GEMM's epilogue, where the kind has one: one pass over
    /// the output, not two.
    pub fn infer_rows(&self, p: &[f32], x: &[f32], grid: [usize; 2], first: usize, out: &mut [f32], act: Activation) {
        let rows = out.len() / self.out_chans();
        let dense = |c: &FastConv, input: &[f32], out: &mut [f32]| match act.bias_epilogue() {
            Some(epilogue) => c.proj.apply_with(p, input, out, epilogue),
            None => {
                c.proj.apply(p, input, out);
                act.apply_in_place(out);
            }
        };
        match self {
            Self::Dense(c) if self.is_pointwise() => dense(c, &x[first * c.in_chans..(first + rows) * c.in_chans], out),
            Self::Dense(c) => kernels::with_scratch(rows * c.patch_len(), |patches| {
                c.im2col(x, grid, first, patches);
                dense(c, patches, out);
            }),
            Self::Depthwise(d) => {
                d.forward_rows(p, x, grid, first, out);
                act.apply_in_place(out);
            }
        }
    }

    /// A batch of `batch` images, keeping the im2col rows a dense conv's backward needs.
    fn forward(&self, p: &[f32], x: &[f32], grid: [usize; 2], batch: usize, out: &mut [f32], patches: &mut Vec<f32>) {
        match self {
            Self::Dense(c) if self.is_pointwise() => c.proj.forward(p, x, out, false),
            Self::Dense(c) => {
                let [oh, ow] = c.out_grid(grid);
                patches.resize(batch * oh * ow * c.patch_len(), 0.0);
                c.im2col_batch(x, grid, batch, patches);
                c.proj.forward(p, patches, out, false);
            }
            Self::Depthwise(d) => {
                let per_out = out.len() / batch;
                out.par_chunks_mut(per_out).zip(x.par_chunks(x.len() / batch)).for_each(|(o, x)| d.forward_rows(p, x, grid, 0, o));
            }
        }
    }

    /// `dx +=` the input gradient and the parameter gradients into `g`.
    fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], grid: [usize; 2], batch: usize, patches: &[f32], dy: &[f32], dx: &mut [f32]) {
        match self {
            // The input gradients below are overwritten by `backward_input`: scratch, not zeros.
            Self::Dense(c) if self.is_pointwise() => {
                c.proj.backward_params(g, x, dy, &mut Vec::new());
                kernels::with_scratch(x.len(), |dxi| {
                    c.proj.backward_input(p, dy, dxi, |_, _| {});
                    kernels::add_assign(dx, dxi);
                });
            }
            Self::Dense(c) => {
                c.proj.backward_params(g, patches, dy, &mut Vec::new());
                kernels::with_scratch(patches.len(), |dpatches| {
                    c.proj.backward_input(p, dy, dpatches, |_, _| {});
                    let per_image = dpatches.len() / batch;
                    dx.par_chunks_mut(x.len() / batch).zip(dpatches.par_chunks(per_image)).for_each(|(dx, dp)| c.col2im_add(dp, grid, dx));
                });
            }
            Self::Depthwise(d) => {
                let (taps, co) = (d.kernel * d.kernel * d.out_chans(), d.out_chans());
                let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
                    .par_chunks_mut(x.len() / batch)
                    .zip(x.par_chunks(x.len() / batch))
                    .zip(dy.par_chunks(dy.len() / batch))
                    .map(|((dx, x), dy)| {
                        let (mut dw, mut db) = (vec![0.0; taps], vec![0.0; co]);
                        d.backward_image(p, x, grid, dy, dx, &mut dw, &mut db);
                        (dw, db)
                    })
                    .collect();
                for (dw, db) in partials {
                    kernels::add_assign(&mut g[d.weight.range()], &dw);
                    if let Some(b) = d.bias {
                        kernels::add_assign(&mut g[b.range()], &db);
                    }
                }
            }
        }
    }
}

multiversion! {
    /// `x = act(x)` element-wise.
    fn activate_simple(x: &mut [f32], act: Activation) {
        let hard_sigmoid = |v: f32| (v + 3.0).clamp(0.0, 6.0) * (1.0 / 6.0);
        // One loop per kind, so each vectorizes on its own.
        let values = x.iter_mut();
        match act {
            Activation::Identity => {}
            Activation::Gelu => values.for_each(|v| *v = gelu(*v)),
            Activation::Relu => values.for_each(|v| *v = v.max(0.0)),
            Activation::Relu6 => values.for_each(|v| *v = v.clamp(0.0, 6.0)),
            Activation::Silu => values.for_each(|v| *v /= 1.0 + exp(-*v)),
            Activation::Hardsigmoid => values.for_each(|v| *v = hard_sigmoid(*v)),
            Activation::Hardswish => values.for_each(|v| *v *= hard_sigmoid(*v)),
        }
    }
}

multiversion! {
    /// `grad *= act'(pre)` element-wise (any activation but GELU).
    fn activation_backward_simple(pre: &[f32], grad: &mut [f32], act: Activation) {
        let pairs = grad.iter_mut().zip(pre);
        match act {
            Activation::Identity | Activation::Gelu => {}
            Activation::Relu => pairs.for_each(|(g, &v)| *g *= f32::from(v > 0.0)),
            Activation::Relu6 => pairs.for_each(|(g, &v)| *g *= f32::from(v > 0.0 && v < 6.0)),
            Activation::Silu => pairs.for_each(|(g, &v)| {
                let s = 1.0 / (1.0 + exp(-v));
                *g *= s * (1.0 + v * (1.0 - s));
            }),
            Activation::Hardsigmoid => pairs.for_each(|(g, &v)| *g *= f32::from(v > -3.0 && v < 3.0) * (1.0 / 6.0)),
            Activation::Hardswish => pairs.for_each(|(g, &v)| *g *= if v >= 3.0 { 1.0 } else if v > -3.0 { (2.0 * v + 3.0) * (1.0 / 6.0) } else { 0.0 }),
        }
    }
}

impl Activation {
    /// `out = act(pre)` on the fast path.
    pub fn apply(self, pre: &[f32], out: &mut [f32]) {
        out.copy_from_slice(pre);
        self.apply_in_place(out);
    }

    /// `x = act(x + bias)` row by row, as a GEMM epilogue, for the kinds that have one.
    fn bias_epilogue(self) -> Option<fn(&mut [f32], &[f32])> {
        match self {
            Activation::Identity => Some(kernels::add_bias),
            Activation::Silu => Some(bias_silu),
            Activation::Gelu => Some(bias_gelu),
            _ => None,
        }
    }

    /// `x = act(x)` on the fast path.
    pub fn apply_in_place(self, x: &mut [f32]) {
        if self != Activation::Identity {
            activate_simple(x, self);
        }
    }

    /// `grad *= act'(pre)`.
    pub fn backward(self, pre: &[f32], grad: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::Gelu => gelu_backward(pre, grad),
            _ => activation_backward_simple(pre, grad, self),
        }
    }
}

/// Conv → BatchNorm2d (absent in a deploy block, folded into the conv) → activation.
pub struct FastConvNormAct {
    pub conv: FastConv2d,
    pub bn: Option<FastNorm>,
    pub act: Activation,
}

/// What a training forward keeps for the backward.
#[derive(Default)]
pub struct ConvNormActCache {
    grid: [usize; 2],
    batch: usize,
    /// A dense conv's im2col rows.
    patches: Vec<f32>,
    /// The conv's output (the BatchNorm's input).
    conv_out: Vec<f32>,
    norm: NormCache,
    /// The activation's input.
    pre: Vec<f32>,
}

impl FastConvNormAct {
    pub fn lower(block: &ConvNormAct, table: &mut ParamTable) -> Result<Self> {
        Self::lower_parts(&block.conv, &block.bn, block.act, table)
    }

    /// A family's own conv → BatchNorm → activation (its modules hold the conv and norm apart).
    pub fn lower_parts(conv: &Conv2d, bn: &BatchNorm, act: Activation, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { conv: FastConv2d::lower(conv, table)?, bn: Some(FastNorm::lower_batch_norm(bn, table)?), act })
    }

    pub fn lower_deploy(block: &ConvAct, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { conv: FastConv2d::lower(&block.conv, table)?, bn: None, act: block.act })
    }

    /// A conv on its own (no norm, no activation).
    pub fn lower_plain(conv: &Conv2d, table: &mut ParamTable) -> Result<Self> {
        Ok(Self { conv: FastConv2d::lower(conv, table)?, bn: None, act: Activation::Identity })
    }

    pub fn out_grid(&self, grid: [usize; 2]) -> [usize; 2] {
        self.conv.out_grid(grid)
    }

    pub fn out_chans(&self) -> usize {
        self.conv.out_chans()
    }

    /// One image in eval mode: (H·W, C_in) rows → (H'·W', C_out) rows, the output rows split
    /// over `parts` threads.
    pub fn infer(&self, p: &[f32], x: &[f32], grid: [usize; 2], out: &mut [f32], parts: usize) {
        let c = self.out_chans();
        let per = (out.len() / c).div_ceil(parts.max(1)).max(1);
        let part = |(i, out): (usize, &mut [f32])| match &self.bn {
            Some(bn) => {
                self.conv.infer_rows(p, x, grid, i * per, out, Activation::Identity);
                kernels::with_scratch(out.len(), |conv_out| {
                    conv_out.copy_from_slice(out);
                    bn.infer(p, conv_out, out);
                });
                self.act.apply_in_place(out);
            }
            None => self.conv.infer_rows(p, x, grid, i * per, out, self.act),
        };
        if parts > 1 {
            out.par_chunks_mut(per * c).enumerate().for_each(part);
        } else {
            part((0, out));
        }
    }

    /// A training forward of `batch` images (B, H·W, C_in) → (B, H'·W', C_out): batch
    /// statistics, the running ones updated.
    pub fn forward(&mut self, p: &[f32], x: &[f32], grid: [usize; 2], batch: usize, out: &mut [f32], cache: &mut ConvNormActCache) -> Result<()> {
        let c = self.out_chans();
        (cache.grid, cache.batch) = (grid, batch);
        cache.conv_out.resize(out.len(), 0.0);
        self.conv.forward(p, x, grid, batch, &mut cache.conv_out, &mut cache.patches);
        cache.pre.resize(out.len(), 0.0);
        match &mut self.bn {
            Some(bn) => bn.forward(p, &cache.conv_out, &mut cache.pre, &mut cache.norm, c, true)?,
            None => cache.pre.copy_from_slice(&cache.conv_out),
        }
        let per = out.len().div_ceil(rayon::current_num_threads()).max(1);
        let act = self.act;
        out.par_chunks_mut(per).zip(cache.pre.par_chunks(per)).for_each(|(o, pre)| act.apply(pre, o));
        Ok(())
    }

    /// `dx +=` the input gradient of `dy`, the parameter gradients into `g`.
    pub fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32], cache: &ConvNormActCache) {
        // Per-thread scratch, not fresh vectors: a step's gradients are tens of MB, which the
        // allocator would hand back to the OS and fault in zeroed again at every call.
        kernels::with_scratch(dy.len(), |grad| {
            grad.copy_from_slice(dy);
            let per = grad.len().div_ceil(rayon::current_num_threads()).max(1);
            let act = self.act;
            grad.par_chunks_mut(per).zip(cache.pre.par_chunks(per)).for_each(|(g, pre)| act.backward(pre, g));
            match &self.bn {
                Some(bn) => kernels::with_scratch(grad.len(), |dconv| {
                    dconv.fill(0.0); // the BatchNorm's backward adds into it
                    bn.backward(p, g, &cache.conv_out, grad, dconv, &cache.norm, self.out_chans());
                    self.conv.backward(p, g, x, cache.grid, cache.batch, &cache.patches, dconv, dx);
                }),
                None => self.conv.backward(p, g, x, cache.grid, cache.batch, &cache.patches, grad, dx),
            }
        });
    }

    /// The BatchNorm's running statistics, into a state dict under their official keys.
    pub fn write_buffers(&self, state: &mut StateDict) {
        if let Some(bn) = &self.bn {
            bn.write_buffers(state);
        }
    }
}

/// A conv block as a plan step of its own (a conv family's stem, its last 1×1 conv), on a map of
/// a fixed grid.
pub struct ConvStep {
    pub block: FastConvNormAct,
    pub grid: [usize; 2],
    cache: ConvNormActCache,
}

impl ConvStep {
    pub fn new(block: FastConvNormAct, grid: [usize; 2]) -> Self {
        Self { block, grid, cache: ConvNormActCache::default() }
    }
}

impl FastBlock for ConvStep {
    fn output(&self) -> ([usize; 2], usize) {
        (self.block.out_grid(self.grid), self.block.out_chans())
    }
    fn infer(&self, p: &[f32], x: &[f32], out: &mut [f32], parts: usize) {
        self.block.infer(p, x, self.grid, out, parts);
    }
    fn forward(&mut self, p: &[f32], x: &[f32], batch: usize, out: &mut [f32], _advance: bool, _rng: &mut Pcg64) -> Result<()> {
        self.block.forward(p, x, self.grid, batch, out, &mut self.cache)
    }
    fn backward(&self, p: &[f32], g: &mut [f32], x: &[f32], dy: &[f32], dx: &mut [f32]) {
        dx.fill(0.0);
        self.block.backward(p, g, x, dy, dx, &self.cache);
    }
    fn write_buffers(&self, state: &mut StateDict) {
        self.block.write_buffers(state);
    }
    fn set_grid(&mut self, grid: [usize; 2]) -> Result<[usize; 2]> {
        self.grid = grid;
        Ok(self.output().0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Tensor};

    /// Every activation's fast forward and derivative against burn's forward and autodiff, on
    /// values past each kink (ReLU6's 0 and 6, the hard ones' ±3), which the layer harness'
    /// normalized activations rarely reach.
    #[test]
    fn activations_and_their_derivatives_equal_burn() {
        let values: Vec<f32> = (-90..=90).map(|i| i as f32 * 0.1 + 0.05).collect();
        let device = Device::flex().autodiff();
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6, Activation::Silu, Activation::Gelu, Activation::Hardsigmoid, Activation::Hardswish] {
            let x = Tensor::<1>::from_floats(values.as_slice(), &device).require_grad();
            let y = act.forward(x.clone());
            let grads = y.clone().sum().backward();
            let (want, want_grad) = (crate::state::host_f32(y), crate::state::host_f32(x.grad(&grads).expect("x is a leaf")));
            let mut ours = vec![0.0; values.len()];
            act.apply(&values, &mut ours);
            let mut grad = vec![1.0; values.len()];
            act.backward(&values, &mut grad);
            crate::testing::assert_near(&format!("{act:?}"), &ours, &want, 1e-6, 1e-6);
            crate::testing::assert_near(&format!("{act:?}'"), &grad, &want_grad, 1e-5, 1e-6);
        }
    }
}
