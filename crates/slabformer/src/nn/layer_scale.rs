//! LayerScale: a learned per-channel scale on a residual branch (timm's `LayerScale` /
//! `LayerScale2d`, key `gamma`), as the EfficientFormer blocks use it: `x + γ ⊙ branch(x)`.

use burn::module::{Module, Param};
use burn::nn::Initializer;
use burn::tensor::{Device, Tensor};
use rayon::prelude::*;

use super::lower::{Layout, ParamTable, Slot};
use crate::deploy::onnx::Graph;
use crate::error::Result;
use crate::kernels;

#[derive(Module, Debug)]
pub struct LayerScale {
    pub gamma: Param<Tensor<1>>,
}

impl LayerScale {
    /// γ = `init` for every one of `channels` (timm's `layer_scale_init_value`).
    pub fn new(channels: usize, init: f64, device: &Device) -> Self {
        Self { gamma: Initializer::Constant { value: init }.init([channels], device) }
    }

    /// (B, C, H, W) planes, γ per channel C.
    pub fn forward_planes(&self, x: Tensor<4>) -> Tensor<4> {
        let c = self.gamma.dims()[0];
        x.mul(self.gamma.val().reshape([1, c, 1, 1]))
    }

    /// [`forward_planes`](Self::forward_planes) in `g`.
    pub fn planes_to_onnx(&self, g: &mut Graph, x: &str) -> String {
        let c = self.gamma.dims()[0];
        let gamma = g.tensor("gamma", self.gamma.val().reshape([c, 1, 1]));
        g.op("Mul", &[x, &gamma], vec![])
    }

    /// [`forward_tokens`](Self::forward_tokens) in `g`.
    pub fn tokens_to_onnx(&self, g: &mut Graph, x: &str) -> String {
        let gamma = g.param("gamma", &self.gamma);
        g.op("Mul", &[x, &gamma], vec![])
    }

    /// (B, N, C) tokens, γ per channel C.
    pub fn forward_tokens(&self, x: Tensor<3>) -> Tensor<3> {
        let c = self.gamma.dims()[0];
        x.mul(self.gamma.val().reshape([1, 1, c]))
    }

    /// γ in the fast path's parameter table.
    pub fn lower(&self, table: &mut ParamTable) -> Result<Slot> {
        table.add(&self.gamma, Layout::Official)
    }
}

// ---- The fast form over (rows, C) rows (tokens, or the raster rows of planes).

/// `x += γ ⊙ branch`, on this thread (inference).
pub fn add_scaled(x: &mut [f32], branch: &[f32], gamma: &[f32]) {
    x.chunks_exact_mut(gamma.len()).zip(branch.chunks_exact(gamma.len())).for_each(|(x, b)| x.iter_mut().zip(b).zip(gamma).for_each(|((x, b), g)| *x += g * b));
}

/// `out = x + m·γ ⊙ branch` over `batch` images' rows, m the image's drop-path factor (`mask`
/// empty: every branch kept, m = 1).
pub fn add_scaled_branch(x: &[f32], branch: &[f32], gamma: &[f32], mask: &[f32], batch: usize, out: &mut [f32]) {
    let per_image = out.len() / batch;
    out.par_chunks_mut(per_image).zip(x.par_chunks(per_image)).zip(branch.par_chunks(per_image)).enumerate().for_each(|(image, ((o, x), b))| {
        let m = mask.get(image).copied().unwrap_or(1.0);
        for ((o, x), b) in o.chunks_exact_mut(gamma.len()).zip(x.chunks_exact(gamma.len())).zip(b.chunks_exact(gamma.len())) {
            o.iter_mut().zip(x).zip(b).zip(gamma).for_each(|(((o, x), b), g)| *o = x + m * g * b);
        }
    });
}

/// Its backward from `dy` = ∂L/∂out: `dbranch = m·γ ⊙ dy` (overwritten), `dgamma += Σ m·dy ⊙
/// branch` (the residual's own gradient is `dy` itself).
pub fn scaled_branch_backward(dy: &[f32], branch: &[f32], gamma: &[f32], mask: &[f32], batch: usize, dbranch: &mut [f32], dgamma: &mut [f32]) {
    let (c, per_image) = (gamma.len(), dy.len() / batch);
    let partials: Vec<Vec<f32>> = dbranch
        .par_chunks_mut(per_image)
        .zip(dy.par_chunks(per_image))
        .zip(branch.par_chunks(per_image))
        .enumerate()
        .map(|(image, ((db, dy), b))| {
            let m = mask.get(image).copied().unwrap_or(1.0);
            let mut dg = vec![0.0; c];
            for ((db, dy), b) in db.chunks_exact_mut(c).zip(dy.chunks_exact(c)).zip(b.chunks_exact(c)) {
                for ((((db, dy), b), g), dg) in db.iter_mut().zip(dy).zip(b).zip(gamma).zip(dg.iter_mut()) {
                    *db = m * g * dy;
                    *dg += m * dy * b;
                }
            }
            dg
        })
        .collect();
    partials.iter().for_each(|dg| kernels::add_assign(dgamma, dg));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::host_f32;
    use crate::testing::{assert_near, randomized, standard_normal};

    #[test]
    fn both_layouts_scale_each_channel() {
        let device = Device::flex();
        let scale = randomized(LayerScale::new(3, 1e-5, &device), 1.0, 1);
        let gamma = host_f32(scale.gamma.val());
        let planes = standard_normal([2, 3, 2, 2], 2, &device);
        let x = host_f32(planes.clone());
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * gamma[(i / 4) % 3]).collect();
        assert_near("planes", &host_f32(scale.forward_planes(planes.clone())), &want, 0.0, 1e-7);
        let tokens = planes.reshape([2, 4, 3]);
        let want: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * gamma[i % 3]).collect();
        assert_near("tokens", &host_f32(scale.forward_tokens(tokens)), &want, 0.0, 1e-7);
    }
}
