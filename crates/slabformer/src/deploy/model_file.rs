//! Model files: safetensors under the official keys, with a header that says which model the
//! file holds (its config), whether it is the trained or the fused deploy form, and how inputs
//! are preprocessed. A file alone is enough to rebuild and run the model.

use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::models::vit::DeployVit;
use crate::models::{VisionTransformer, VitConfig};
use crate::state::{StateDict, collect_state, load_state};
use crate::files::write_new;

pub const FORMAT_KEY: &str = "slabformer.format";
pub const FORMAT: &str = "slabformer-model-v1";
pub const MODEL_KEY: &str = "slabformer.model";
pub const KIND_KEY: &str = "slabformer.kind";
pub const PREPROCESS_KEY: &str = "slabformer.preprocess";

/// How images become model inputs: what the model was trained with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocess {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Center-crop fraction of the shorter side at evaluation.
    pub eval_crop: f64,
    /// Class names by output index (empty: indices are printed).
    pub classes: Vec<String>,
}

impl Preprocess {
    /// ImageNet statistics, the official models' preprocessing.
    pub fn imagenet(channels: usize) -> Self {
        let (mean, std) = if channels == 3 {
            (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225])
        } else {
            (vec![0.5; channels], vec![0.5; channels])
        };
        Self { mean, std, eval_crop: 0.875, classes: Vec::new() }
    }
}

/// The two forms a model file can hold.
pub enum LoadedModel {
    Trained(VisionTransformer),
    Deploy(DeployVit),
}

impl LoadedModel {
    pub fn config(&self) -> &VitConfig {
        match self {
            LoadedModel::Trained(m) => &m.config,
            LoadedModel::Deploy(m) => &m.config,
        }
    }
}

fn header(mut state: StateDict, config: &VitConfig, kind: &str, preprocess: &Preprocess) -> StateDict {
    state.metadata.insert(FORMAT_KEY.into(), FORMAT.into());
    state.metadata.insert(MODEL_KEY.into(), serde_json::to_string(config).expect("config serializes"));
    state.metadata.insert(KIND_KEY.into(), kind.into());
    state.metadata.insert(PREPROCESS_KEY.into(), serde_json::to_string(preprocess).expect("preprocess serializes"));
    state
}

pub fn model_bytes(model: &VisionTransformer, preprocess: &Preprocess) -> Result<Vec<u8>> {
    header(collect_state(model), &model.config, "trained", preprocess).to_safetensors_bytes()
}

pub fn deploy_bytes(model: &DeployVit, preprocess: &Preprocess) -> Result<Vec<u8>> {
    header(collect_state(model), &model.config, "deploy", preprocess).to_safetensors_bytes()
}

/// Writes a trained model atomically; an existing file is kept unless `overwrite`.
pub fn save_model(path: &Path, model: &VisionTransformer, preprocess: &Preprocess, overwrite: bool) -> Result<()> {
    write_new(path, &model_bytes(model, preprocess)?, overwrite)
}

/// Writes a fused deploy model atomically; an existing file is kept unless `overwrite`.
pub fn save_deploy(path: &Path, model: &DeployVit, preprocess: &Preprocess, overwrite: bool) -> Result<()> {
    write_new(path, &deploy_bytes(model, preprocess)?, overwrite)
}

/// Reads a model file written by [`save_model`] / [`save_deploy`] and rebuilds the model on
/// `device`. Files without the header, or whose tensors do not fit the model the header names,
/// are refused by name.
pub fn load_model(path: &Path, device: &Device) -> Result<(LoadedModel, Preprocess)> {
    let dict = StateDict::read_safetensors(path)?;
    let bad = |reason: String| Error::Data { path: path.to_path_buf(), reason };
    if dict.metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a slabformer model file (no `{FORMAT_KEY} = {FORMAT}` header); official PyTorch checkpoints go through `slabformer import`"
        )));
    }
    let field = |key: &str| dict.metadata.get(key).ok_or_else(|| bad(format!("header lacks `{key}`")));
    let config: VitConfig = serde_json::from_str(field(MODEL_KEY)?).map_err(|e| bad(format!("`{MODEL_KEY}`: {e}")))?;
    let preprocess: Preprocess = serde_json::from_str(field(PREPROCESS_KEY)?).map_err(|e| bad(format!("`{PREPROCESS_KEY}`: {e}")))?;
    let model = config.init(device)?;
    let model = match field(KIND_KEY)?.as_str() {
        "trained" => LoadedModel::Trained(load_state(model, &dict, false)?.0),
        "deploy" => {
            // Build the deploy structure by fusing a fresh model, then load the file into it.
            let deploy = model.fuse()?;
            LoadedModel::Deploy(load_state(deploy, &dict, false)?.0)
        }
        other => return Err(bad(format!("unknown model kind `{other}`"))),
    };
    Ok((model, preprocess))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> VitConfig {
        VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 1, num_heads: 2, num_classes: 3, ..VitConfig::slab_deit_tiny() }
    }

    #[test]
    fn trained_and_deploy_files_round_trip_with_their_header() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex();
        let model = tiny().init(&device).unwrap();
        let pre = Preprocess { classes: vec!["a".into(), "b".into(), "c".into()], ..Preprocess::imagenet(3) };
        let path = dir.path().join("m.safetensors");
        save_model(&path, &model, &pre, false).unwrap();
        let err = save_model(&path, &model, &pre, false).unwrap_err().to_string();
        assert!(err.contains("not overwriting"), "{err}");
        let (loaded, pre_back) = load_model(&path, &device).unwrap();
        assert_eq!(pre_back, pre);
        let LoadedModel::Trained(loaded) = loaded else { panic!("trained") };
        let x = burn::tensor::Tensor::<4>::ones([1, 3, 16, 16], &device);
        assert_eq!(loaded.forward(x.clone()).into_data(), model.forward(x.clone()).into_data());

        let deploy_path = dir.path().join("d.safetensors");
        save_deploy(&deploy_path, &model.fuse().unwrap(), &pre, false).unwrap();
        let (deploy, _) = load_model(&deploy_path, &device).unwrap();
        let LoadedModel::Deploy(deploy) = deploy else { panic!("deploy") };
        let diff: f32 = deploy.forward(x.clone()).sub(model.forward(x)).abs().max().into_scalar();
        assert!(diff < 1e-5);
    }

    #[test]
    fn foreign_corrupt_and_mismatched_files_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::flex();
        let model = tiny().init(&device).unwrap();
        // A bare state dict has no header.
        let bare = dir.path().join("bare.safetensors");
        std::fs::write(&bare, collect_state(&model).to_safetensors_bytes().unwrap()).unwrap();
        assert!(load_model(&bare, &device).err().unwrap().to_string().contains("not a slabformer model file"));
        // A header that names another model than the tensors hold.
        let mut other = header(collect_state(&model), &VitConfig { depth: 2, ..tiny() }, "trained", &Preprocess::imagenet(3));
        other.origin = "other".into();
        let mismatched = dir.path().join("other.safetensors");
        std::fs::write(&mismatched, other.to_safetensors_bytes().unwrap()).unwrap();
        let err = load_model(&mismatched, &device).err().unwrap().to_string();
        assert!(err.contains("blocks.1"), "{err}");
        // Truncated.
        let good = model_bytes(&model, &Preprocess::imagenet(3)).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &good[..good.len() / 3]).unwrap();
        assert!(load_model(&cut, &device).err().unwrap().to_string().contains("cut.safetensors"));
    }
}
