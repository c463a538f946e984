//! [`CpuModel`]: the inference runtime over a model's plan (`crate::plan`): a batch is split over threads image by image (each image's activations stay in
//! its core's L2); a single image splits its rows over the threads, which then meet twice per
//! attention layer (see `crate::plan`). Workspaces are pooled per model, so calls after the first
//! fault no pages in.

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::models::ModelFamily;
use crate::nn::attention::{Attention, FastAttention};
use crate::nn::lower::ParamTable;
use crate::plan::{InferWorkspace, Layer, Plan, PooledWorkspace, Residual, Step, WorkspacePool};
use crate::state::host_f32;

/// One attention layer on its own with its residual, `x + attn(x)`, for the attention scaling
/// sweep.
pub struct CpuAttention {
    plan: Plan,
    dim: usize,
    grid: Option<[usize; 2]>,
}

impl CpuAttention {
    pub fn new(attn: &Attention) -> Result<Self> {
        let mut table = ParamTable::for_module(attn);
        let attn = FastAttention::lower(attn, &mut table)?;
        let (dim, grid) = (attn.dim(), attn.grid());
        let layer = Layer::attention(attn, &table);
        Ok(Self { plan: Plan { table, steps: vec![Step::Residual(Residual { norm: None, layer, drop_path: 0.0 })] }, dim, grid })
    }

    /// (T, C) tokens → `x + attn(x)` for one sequence, rows split over the threads. Its buffers
    /// are allocated here, sized for T: softmax's (T, T) score matrix, SLA's (d, d) states.
    pub fn forward(&self, tokens: &[f32]) -> Result<Vec<f32>> {
        let c = self.dim;
        if tokens.is_empty() || !tokens.len().is_multiple_of(c) {
            return Err(Error::InputShape { layer: "attention", expected: format!("(T, {c}) tokens"), found: vec![tokens.len()] });
        }
        let t = tokens.len() / c;
        if let Some(grid) = self.grid
            && grid[0] * grid[1] != t
        {
            return Err(Error::InputShape { layer: "attention", expected: format!("{} tokens on the {grid:?} grid", grid[0] * grid[1]), found: vec![t, c] });
        }
        let parts = rayon::current_num_threads();
        let mut ws = InferWorkspace::new(&self.plan, t, parts);
        ws.tokens_mut().copy_from_slice(tokens);
        self.plan.infer_tokens(&mut ws, parts);
        Ok(ws.tokens().to_vec())
    }
}

/// A model prepared for fast CPU inference: its plan (the deploy form where the norms fold,
/// the trained form of LayerNorm models), with pooled workspaces. Outputs equal the burn forward
/// of the same model within float rounding (tested to 1e-4 of the largest logit).
pub struct CpuModel {
    plan: Plan,
    /// (in_chans, [H, W]) of the images and the number of classes.
    input: (usize, [usize; 2]),
    classes: usize,
    workspaces: WorkspacePool,
}

impl CpuModel {
    /// From a trained model: RepBN/PRepBN models are fused first (their deploy form is what
    /// inference runs); LayerNorm models keep their norms.
    pub fn new<F: ModelFamily>(model: &F) -> Result<Self> {
        if model.image_config().folds() {
            return Self::from_deploy::<F>(&model.fuse()?);
        }
        Self::from_plan(model.lower()?)
    }

    /// From the norm-free deploy form.
    pub fn from_deploy<F: ModelFamily>(model: &F::Deploy) -> Result<Self> {
        Self::from_plan(F::lower_deploy(model)?)
    }

    /// From a plan that embeds images and ends in a classifier head.
    pub fn from_plan(plan: Plan) -> Result<Self> {
        let not_a_classifier = || Error::Unsupported { what: "a plan that does not go from images to logits".into(), path: "the CPU runtime" };
        let input = plan.input().ok_or_else(not_a_classifier)?;
        let classes = plan.classes().ok_or_else(not_a_classifier)?;
        Ok(Self { plan, input, classes, workspaces: WorkspacePool::default() })
    }

    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Height of the images the model takes (their side, for the square ones training and
    /// evaluation use).
    pub fn img_size(&self) -> usize {
        self.input.1[0]
    }

    /// Images (B, C, H, W) → logits (B, num_classes), on the device of the input.
    pub fn forward_tensor(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let [b, ..] = images.dims();
        self.check_input(&images.dims())?;
        let device = images.device();
        let logits = self.forward(&host_f32(images), b)?;
        Ok(Tensor::from_data(TensorData::new(logits, [b, self.classes]), &device))
    }

    fn check_input(&self, dims: &[usize]) -> Result<()> {
        let (chans, [h, w]) = self.input;
        if dims.len() != 4 || dims[0] == 0 || dims != [dims[0], chans, h, w] {
            return Err(Error::InputShape { layer: "model input", expected: format!("(B > 0, {chans}, {h}, {w}) images"), found: dims.to_vec() });
        }
        Ok(())
    }

    /// `batch` images, row-major (B, C, H, W) → row-major (B, num_classes) logits.
    pub fn forward(&self, images: &[f32], batch: usize) -> Result<Vec<f32>> {
        let (chans, [h, w]) = self.input;
        let per_image = chans * h * w;
        if batch == 0 || images.len() != batch * per_image {
            return Err(Error::InputShape { layer: "model input", expected: format!("{batch} × ({chans}, {h}, {w}) = {} values", batch * per_image), found: vec![images.len()] });
        }
        let classes = self.classes;
        let mut logits = vec![0.0; batch * classes];
        let threads = rayon::current_num_threads();
        if batch == 1 || threads == 1 {
            // One image: its token rows are split over the threads.
            let mut ws = self.workspace(threads);
            for (image, out) in images.chunks_exact(per_image).zip(logits.chunks_exact_mut(classes)) {
                self.plan.infer_image(image, out, &mut ws, threads);
            }
        } else {
            logits
                .par_chunks_exact_mut(classes)
                .zip(images.par_chunks_exact(per_image))
                .for_each_init(|| self.workspace(1), |ws, (out, image)| self.plan.infer_image(image, out, ws, 1));
        }
        Ok(logits)
    }

    /// A workspace from the pool (returned when the guard drops), or a new one: reusing them
    /// spares page faults on every call.
    fn workspace(&self, parts: usize) -> PooledWorkspace<'_> {
        self.workspaces.take(|ws| ws.parts >= parts, || self.plan.infer_workspace(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, Distribution};
    use crate::models::vit::Pool;
    use crate::models::{VisionTransformer, VitConfig};
    use crate::nn::attention::AttentionKind;

    fn max_abs(t: Tensor<2>) -> f32 {
        t.abs().max().into_scalar()
    }

    /// A model whose every op shows in the logits (see `testing::randomized`); BatchNorm with
    /// fixed statistics does not rescale activations, so those models take smaller weights.
    /// Checked: a 1 % change of the DWC bias or 0.02 % of GELU fails the comparison.
    fn randomized(config: VitConfig, device: &Device) -> VisionTransformer {
        let weight_scale = if config.norm.folds() { 5.0 } else { 10.0 };
        crate::testing::randomized(config.init(device).unwrap(), weight_scale, 1)
    }

    #[test]
    fn runtime_equals_the_burn_forward_for_every_supported_kind() {
        let device = Device::flex();
        let small = |base: VitConfig| VitConfig { img_size: 32, patch_size: 4, embed_dim: 48, depth: 2, num_heads: 3, num_classes: 10, ..base };
        let configs = [
            small(VitConfig::deit_tiny()),
            small(VitConfig::prepbn_deit_tiny()),
            small(VitConfig::slab_deit_tiny()),
            VitConfig { attention: AttentionKind::ReluL { qk_norm: false, gated: false }, ..small(VitConfig::relu_vit_tiny()) },
            VitConfig { attention: AttentionKind::ReluL { qk_norm: true, gated: true }, ..small(VitConfig::relu_vit_tiny()) },
            VitConfig { attention: AttentionKind::ReluL { qk_norm: true, gated: true }, ..small(VitConfig::prepbn_deit_tiny()) },
            small(VitConfig::flatten_deit_tiny()),
            VitConfig { attention: AttentionKind::focused(), pool: Pool::Mean, ..small(VitConfig::prepbn_deit_tiny()) },
        ];
        for config in configs {
            let model = randomized(config.clone(), &device);
            let runtime = CpuModel::new(&model).unwrap();
            for batch in [1, 5] {
                let images = crate::testing::standard_normal([batch, 3, 32, 32], 4, &device);
                let want = model.forward(images.clone());
                let got = runtime.forward_tensor(images).unwrap();
                let scale = max_abs(want.clone());
                let diff = max_abs(got.sub(want));
                assert!(diff <= 1e-4 * scale, "{:?} batch {batch}: {diff} vs max |logit| {scale}", config.attention);
            }
        }
    }

    #[test]
    fn a_single_attention_layer_with_its_residual_equals_burn() {
        use crate::nn::attention::AttentionConfig;
        let device = Device::flex();
        for kind in [AttentionKind::Softmax, AttentionKind::sla()] {
            let config = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind, grid: Some([8, 8]) };
            let attn = crate::state::map_float_tensors(config.init(&device), |key, t| {
                (key.contains("weight") || key.contains("positional")).then(|| t.random_like(Distribution::Normal(0.0, 0.3)))
            });
            let x = crate::testing::standard_normal([1, 64, 48], 5, &device);
            let want = host_f32(attn.forward(x.clone()).add(x.clone())); // with the residual
            let got = CpuAttention::new(&attn).unwrap().forward(&host_f32(x)).unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.1 && diff <= 1e-5 * scale, "{kind:?}: {diff} vs {scale}");
        }
        let sla = AttentionConfig { dim: 48, num_heads: 3, qkv_bias: true, kind: AttentionKind::sla(), grid: Some([8, 8]) }.init(&device);
        assert!(CpuAttention::new(&sla).unwrap().forward(&[0.0; 48 * 63]).is_err());
    }

    #[test]
    fn the_deploy_form_and_the_trained_form_give_one_runtime() {
        let device = Device::flex();
        let config = VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 1, num_heads: 2, num_classes: 4, ..VitConfig::slab_deit_tiny() };
        let model = randomized(config, &device);
        let images = crate::testing::standard_normal([3, 3, 32, 32], 6, &device);
        let a = CpuModel::new(&model).unwrap().forward_tensor(images.clone()).unwrap();
        let b = CpuModel::from_deploy::<VisionTransformer>(&model.fuse().unwrap()).unwrap().forward_tensor(images).unwrap();
        assert_eq!(host_f32(a), host_f32(b));
    }

    #[test]
    fn wrong_inputs_and_unsupported_models_are_errors() {
        let device = Device::flex();
        let config = VitConfig { img_size: 32, patch_size: 4, embed_dim: 24, depth: 1, num_heads: 2, num_classes: 4, ..VitConfig::slab_deit_tiny() };
        let runtime = CpuModel::new(&config.init(&device).unwrap()).unwrap();
        let err = runtime.forward_tensor(Tensor::zeros([2, 3, 28, 28], &device)).unwrap_err();
        assert!(err.to_string().contains("[2, 3, 28, 28]"), "{err}");
        assert!(runtime.forward(&[0.0; 10], 1).is_err());
        let sharp = VitConfig { attention: AttentionKind::Focused { power: 8.0, kernel_size: 5 }, ..config };
        let err = CpuModel::new(&sharp.init(&device).unwrap()).err().unwrap();
        assert!(matches!(err, Error::Unsupported { .. }) && err.to_string().contains("power 8"), "{err}");
    }
}
