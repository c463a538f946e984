//! A dense (ungrouped) strided 2-D convolution on the fast path, as a GEMM over im2col rows:
//! the stage embeddings of hierarchical models (PVT's patch convs, CSwin's stem and merges) and
//! PVT's key/value reduction conv. It reads either (C, H, W) images or a token grid kept as
//! (H·W, C) raster rows, the layout every plan step works in, and writes (H'·W', C_out) rows.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use rayon::prelude::*;

use super::linear::FastLinear;
use super::lower::{Layout, ParamTable};
use crate::error::{Error, Result};
use crate::kernels;

/// How the conv's input is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// (C, H, W) planes: an image.
    Planes,
    /// (H·W, C) raster rows: a token grid.
    Rows,
}

/// The conv: its weight as a (C_in·kh·kw, C_out) matrix over im2col rows. Over (C, H, W) planes
/// the rows run in (channel, i, j) order, like the official weight's (C_out, C_in, kh, kw); over
/// raster rows in (i, j, channel) order ([`Layout::TapsMajor`]), so each kernel tap of a row is
/// one input pixel's channels, copied whole.
pub struct FastConv {
    pub proj: FastLinear,
    pub in_chans: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// (top, left) zero padding; bottom and right are the same.
    pub padding: [usize; 2],
    /// What the conv reads.
    pub source: Source,
}

impl FastConv {
    pub fn lower(conv: &Conv2d, source: Source, table: &mut ParamTable) -> Result<Self> {
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
        let layout = match source {
            Source::Planes => Layout::Transposed,
            Source::Rows => Layout::TapsMajor,
        };
        Ok(Self { proj: FastLinear::lower_conv(conv, layout, table)?, in_chans, kernel: conv.kernel_size, stride: conv.stride, padding, source })
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
    /// `src` on the `grid` (H, W); padding reads zeros.
    pub fn im2col(&self, src: &[f32], grid: [usize; 2], first: usize, patches: &mut [f32]) {
        let ([kh, kw], len, c) = (self.kernel, self.patch_len(), self.in_chans);
        let out_cols = self.out_grid(grid)[1];
        for (index, dst) in patches.chunks_exact_mut(len).enumerate() {
            let (r, q) = ((first + index) / out_cols, (first + index) % out_cols);
            for i in 0..kh {
                let source_row = self.source_row(grid, r, q, i);
                match self.source {
                    // Kernel row i: kw pixels side by side, the ones inside the input one copy.
                    Source::Rows => {
                        let taps = &mut dst[i * kw * c..(i + 1) * kw * c];
                        match source_row {
                            Some((y, x0, cols)) => {
                                let start = (y * grid[1] + x0) * c;
                                taps[..cols.start * c].fill(0.0);
                                taps[cols.start * c..cols.end * c].copy_from_slice(&src[start..start + cols.len() * c]);
                                taps[cols.end * c..].fill(0.0);
                            }
                            None => taps.fill(0.0),
                        }
                    }
                    // Kernel row i of every channel plane.
                    Source::Planes => {
                        for ch in 0..c {
                            let row = &mut dst[(ch * kh + i) * kw..(ch * kh + i + 1) * kw];
                            match source_row.clone() {
                                Some((y, x0, cols)) => {
                                    let start = ch * grid[0] * grid[1] + y * grid[1] + x0;
                                    row[..cols.start].fill(0.0);
                                    row[cols.clone()].copy_from_slice(&src[start..start + cols.len()]);
                                    row[cols.end..].fill(0.0);
                                }
                                None => row.fill(0.0),
                            }
                        }
                    }
                }
            }
        }
    }

    /// The transpose of [`im2col`](Self::im2col) over a whole output grid: every im2col row's
    /// gradient in `dpatches` added back into `dsrc` at the input values it was read from.
    pub fn col2im_add(&self, dpatches: &[f32], grid: [usize; 2], dsrc: &mut [f32]) {
        let ([kh, kw], len, c) = (self.kernel, self.patch_len(), self.in_chans);
        let out_cols = self.out_grid(grid)[1];
        for (index, dp) in dpatches.chunks_exact(len).enumerate() {
            let (r, q) = (index / out_cols, index % out_cols);
            for i in 0..kh {
                let Some((y, x0, cols)) = self.source_row(grid, r, q, i) else { continue };
                match self.source {
                    Source::Rows => {
                        let start = (y * grid[1] + x0) * c;
                        kernels::add_assign(&mut dsrc[start..start + cols.len() * c], &dp[(i * kw + cols.start) * c..(i * kw + cols.end) * c]);
                    }
                    Source::Planes => {
                        for ch in 0..c {
                            let start = ch * grid[0] * grid[1] + y * grid[1] + x0;
                            let row = &dp[(ch * kh + i) * kw..(ch * kh + i + 1) * kw];
                            kernels::add_assign(&mut dsrc[start..start + cols.len()], &row[cols.clone()]);
                        }
                    }
                }
            }
        }
    }

    /// [`im2col`](Self::im2col) of every image of a batch, in parallel.
    pub fn im2col_batch(&self, src: &[f32], grid: [usize; 2], batch: usize, patches: &mut [f32]) {
        let per_image = src.len() / batch;
        let [oh, ow] = self.out_grid(grid);
        patches.par_chunks_mut(oh * ow * self.patch_len()).zip(src.par_chunks(per_image)).for_each(|(patches, src)| self.im2col(src, grid, 0, patches));
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
