//! Classifying image files with a model file: the preprocessing stored in the file (resize to
//! `img_size / eval_crop`, center crop, normalization), then softmax probabilities.

use std::path::Path;

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};

use super::model_file::{LoadedModel, Preprocess};
use crate::data::augment::AugmentConfig;
use crate::data::load_image_channels;
use crate::state::host_f32;
use crate::error::Result;
use crate::models::ModelFamily;

/// The `k` most probable classes of one image: `(class name or "class i", probability)`.
pub fn top_k<F: ModelFamily>(model: &LoadedModel<F>, preprocess: &Preprocess, image: &Path, k: usize) -> Result<Vec<(String, f32)>> {
    let config = model.image_config();
    let (size, channels) = (config.img_size(), config.in_chans());
    let view = AugmentConfig { mean: preprocess.mean.clone(), std: preprocess.std.clone(), eval_crop: preprocess.eval_crop, ..Default::default() };
    let stored = view.stored_size(size);
    let pixels = load_image_channels(image, stored, channels)?;
    let mut input = vec![0.0f32; channels * size * size];
    view.eval_view(&pixels, [channels, stored, stored], size, &mut input);
    let device = Device::flex();
    let x = Tensor::<4>::from_data(TensorData::new(input, [1, channels, size, size]), &device);
    let logits = model.logits(x);
    let probs = host_f32(softmax(logits, 1));
    let mut ranked: Vec<(usize, f32)> = probs.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(ranked
        .into_iter()
        .take(k)
        .map(|(class, p)| (preprocess.classes.get(class).cloned().unwrap_or_else(|| format!("class {class}")), p))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::model_file::{load_model, save_deploy, save_model};
    use crate::models::{VisionTransformer, VitConfig};

    #[test]
    fn trained_and_fused_files_predict_the_same_ranking() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex();
        let config = VitConfig { img_size: 16, patch_size: 4, in_chans: 1, embed_dim: 12, depth: 1, num_heads: 2, num_classes: 7, ..VitConfig::slab_deit_tiny() };
        let model = config.init(&device).unwrap();
        let pre = Preprocess { mean: vec![0.3], std: vec![0.3], eval_crop: 0.875, classes: (0..7).map(|i| format!("c{i}")).collect() };
        save_model(&dir.path().join("t.safetensors"), &model, &pre, false).unwrap();
        save_deploy::<VisionTransformer>(&dir.path().join("f.safetensors"), &model.fuse().unwrap(), &config, &pre, false).unwrap();
        let image = dir.path().join("x.png");
        image::GrayImage::from_fn(40, 30, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8])).save(&image).unwrap();
        let (trained, _) = load_model::<VisionTransformer>(&dir.path().join("t.safetensors"), &device).unwrap();
        let (fused, _) = load_model::<VisionTransformer>(&dir.path().join("f.safetensors"), &device).unwrap();
        let a = top_k(&trained, &pre, &image, 5).unwrap();
        let b = top_k(&fused, &pre, &image, 5).unwrap();
        assert_eq!(a.len(), 5);
        assert_eq!(a.iter().map(|r| &r.0).collect::<Vec<_>>(), b.iter().map(|r| &r.0).collect::<Vec<_>>());
        assert!(a.windows(2).all(|w| w[0].1 >= w[1].1));
        assert!(a.iter().map(|r| r.1).sum::<f32>() <= 1.0 + 1e-5);
        let missing = top_k(&trained, &pre, &dir.path().join("nope.png"), 5).unwrap_err().to_string();
        assert!(missing.contains("nope.png"), "{missing}");
    }
}
