//! A dense (ungrouped) strided 2-D convolution on the fast path, as a GEMM over im2col rows:
//! the stage embeddings of hierarchical models (PVT's patch convs, CSwin's stem and merges) and
//! PVT's key/value reduction conv. It reads either (C, H, W) images or a token grid kept as
//! (H·W, C) raster rows, the layout every plan step works in, and writes (H'·W', C_out) rows.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::linear::FastLinear;
use super::lower::ParamTable;
use crate::error::{Error, Result};

/// How the conv's input is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// (C, H, W) planes: an image.
    Planes,
    /// (H·W, C) raster rows: a token grid.
    Rows,
}

/// The conv: its weight as a (C_in·kh·kw, C_out) matrix over im2col rows in (channel, i, j)
/// order, like the official weight's (C_out, C_in, kh, kw).
pub struct FastConv {
    pub proj: FastLinear,
    pub in_chans: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// (top, left) zero padding; bottom and right are the same.
    pub padding: [usize; 2],
}

impl FastConv {
    pub fn lower(conv: &Conv2d, table: &mut ParamTable) -> Result<Self> {
        let unsupported = |what: String| Error::Unsupported { what, path: "the fast CPU path" };
        if conv.groups != 1 || conv.dilation != [1, 1] {
            return Err(unsupported(format!("a grouped or dilated conv (groups {}, dilation {:?}) as a stage or reduction conv", conv.groups, conv.dilation)));
        }
        let padding = match conv.padding {
            PaddingConfig2d::Valid => [0, 0],
            PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [top, left],
            ref other => return Err(unsupported(format!("conv padding {other:?}"))),
        };
        let [_, in_chans, ..] = conv.weight.dims();
        Ok(Self { proj: FastLinear::lower_patch_conv(conv, table)?, in_chans, kernel: conv.kernel_size, stride: conv.stride, padding })
    }

    /// The output grid of an input grid (PyTorch's floor rule).
    pub fn out_grid(&self, [h, w]: [usize; 2]) -> [usize; 2] {
        let out = |n: usize, a: usize| (n + 2 * self.padding[a]).checked_sub(self.kernel[a]).map_or(0, |span| span / self.stride[a] + 1);
        [out(h, 0), out(w, 1)]
    }

    /// Values of one im2col row.
    pub fn patch_len(&self) -> usize {
        self.proj.inputs
    }

    pub fn outputs(&self) -> usize {
        self.proj.outputs
    }

    /// The im2col rows of output positions `first..` (as many as `patches` holds) of the input
    /// `src` on the `grid` (H, W), laid out as `source`; padding reads zeros.
    pub fn im2col(&self, src: &[f32], source: Source, grid: [usize; 2], first: usize, patches: &mut [f32]) {
        let ([kh, kw], len) = (self.kernel, self.patch_len());
        let (ch_stride, px_stride) = self.strides(source, grid);
        let out_cols = self.out_grid(grid)[1];
        for (index, dst) in patches.chunks_exact_mut(len).enumerate() {
            let (r, q) = ((first + index) / out_cols, (first + index) % out_cols);
            for ch in 0..self.in_chans {
                for i in 0..kh {
                    let row = &mut dst[(ch * kh + i) * kw..(ch * kh + i + 1) * kw];
                    match self.source_row(grid, r, q, i) {
                        Some((y, x0, cols)) if px_stride == 1 && cols.len() == kw => {
                            let start = ch * ch_stride + y * grid[1] + x0;
                            row.copy_from_slice(&src[start..start + kw]);
                        }
                        Some((y, x0, cols)) => {
                            for (j, v) in row.iter_mut().enumerate() {
                                *v = if cols.contains(&j) { src[ch * ch_stride + (y * grid[1] + x0 + j - cols.start) * px_stride] } else { 0.0 };
                            }
                        }
                        None => row.fill(0.0),
                    }
                }
            }
        }
    }

    /// The transpose of [`im2col`](Self::im2col) over a whole output grid: every im2col row's
    /// gradient in `dpatches` added back into `dsrc` at the input values it was read from.
    pub fn col2im_add(&self, dpatches: &[f32], source: Source, grid: [usize; 2], dsrc: &mut [f32]) {
        let ([kh, kw], len) = (self.kernel, self.patch_len());
        let (ch_stride, px_stride) = self.strides(source, grid);
        let out_cols = self.out_grid(grid)[1];
        for (index, dp) in dpatches.chunks_exact(len).enumerate() {
            let (r, q) = (index / out_cols, index % out_cols);
            for ch in 0..self.in_chans {
                for i in 0..kh {
                    let Some((y, x0, cols)) = self.source_row(grid, r, q, i) else { continue };
                    let row = &dp[(ch * kh + i) * kw..(ch * kh + i + 1) * kw];
                    for j in cols.clone() {
                        dsrc[ch * ch_stride + (y * grid[1] + x0 + j - cols.start) * px_stride] += row[j];
                    }
                }
            }
        }
    }

    /// Per image: (B, N_out, C_in·kh·kw) im2col rows of (B, …) inputs of `per_image` values.
    pub fn im2col_batch(&self, src: &[f32], source: Source, grid: [usize; 2], batch: usize, patches: &mut [f32]) {
        let per_image = src.len() / batch;
        let [oh, ow] = self.out_grid(grid);
        patches.par_chunks_mut(oh * ow * self.patch_len()).zip(src.par_chunks(per_image)).for_each(|(patches, src)| self.im2col(src, source, grid, 0, patches));
    }

    /// (channel stride, pixel stride) of the source layout.
    fn strides(&self, source: Source, [h, w]: [usize; 2]) -> (usize, usize) {
        match source {
            Source::Planes => (h * w, 1),
            Source::Rows => (1, self.in_chans),
        }
    }

    /// For output (r, q) and kernel row i: the input row y, the input column of kernel column
    /// `cols.start`, and the kernel columns inside the input; None when row y is padding.
    fn source_row(&self, [h, w]: [usize; 2], r: usize, q: usize, i: usize) -> Option<(usize, usize, std::ops::Range<usize>)> {
        let y = (r * self.stride[0] + i).checked_sub(self.padding[0]).filter(|y| *y < h)?;
        let left = q * self.stride[1]; // input column of kernel column j is left + j − pad
        let first = self.padding[1].saturating_sub(left);
        let end = (w + self.padding[1]).saturating_sub(left).min(self.kernel[1]);
        (first < end).then(|| (y, left + first - self.padding[1], first..end))
    }
}
