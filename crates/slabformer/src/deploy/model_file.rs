//! Model files: safetensors under the official keys, with a header that says which model the
//! file holds (its config), whether it is the trained or the fused deploy form, and how inputs
//! are preprocessed. A file alone is enough to rebuild and run the model.

use std::path::Path;

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::models::{AnyConfig, ImageClassifier, ImageConfig, ModelFamily, VitConfig};
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
pub enum LoadedModel<F: ModelFamily> {
    Trained(F),
    Deploy(F::Deploy),
}

impl<F: ModelFamily> LoadedModel<F> {
    pub fn image_config(&self) -> &dyn ImageConfig {
        match self {
            LoadedModel::Trained(m) => m.image_config(),
            LoadedModel::Deploy(m) => m.image_config(),
        }
    }

    /// Logits of either form (eval mode).
    pub fn logits(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            LoadedModel::Trained(m) => m.valid().logits(images),
            LoadedModel::Deploy(m) => m.logits(images),
        }
    }
}

fn header(mut state: StateDict, config: &AnyConfig, kind: &str, preprocess: &Preprocess) -> StateDict {
    state.metadata.insert(FORMAT_KEY.into(), FORMAT.into());
    state.metadata.insert(MODEL_KEY.into(), serde_json::to_string(config).expect("config serializes"));
    state.metadata.insert(KIND_KEY.into(), kind.into());
    state.metadata.insert(PREPROCESS_KEY.into(), serde_json::to_string(preprocess).expect("preprocess serializes"));
    state
}

pub fn model_bytes<F: ModelFamily>(model: &F, preprocess: &Preprocess) -> Result<Vec<u8>> {
    header(collect_state(model), &F::tagged(model.config()), "trained", preprocess).to_safetensors_bytes()
}

/// `config` is the trained model's: the deploy form is rebuilt from it.
pub fn deploy_bytes<F: ModelFamily>(model: &F::Deploy, config: &F::Config, preprocess: &Preprocess) -> Result<Vec<u8>> {
    header(collect_state(model), &F::tagged(config), "deploy", preprocess).to_safetensors_bytes()
}

/// Writes a trained model atomically; an existing file is kept unless `overwrite`.
pub fn save_model<F: ModelFamily>(path: &Path, model: &F, preprocess: &Preprocess, overwrite: bool) -> Result<()> {
    write_new(path, &model_bytes(model, preprocess)?, overwrite)
}

/// Writes a fused deploy model atomically; an existing file is kept unless `overwrite`.
pub fn save_deploy<F: ModelFamily>(path: &Path, model: &F::Deploy, config: &F::Config, preprocess: &Preprocess, overwrite: bool) -> Result<()> {
    write_new(path, &deploy_bytes::<F>(model, config, preprocess)?, overwrite)
}

/// What a model file's header says, with its tensors.
pub struct ModelFile {
    pub config: AnyConfig,
    pub preprocess: Preprocess,
    /// "trained" or "deploy".
    pub kind: String,
    state: StateDict,
    path: std::path::PathBuf,
}

/// Reads a model file written by [`save_model`] / [`save_deploy`]; files without the header are
/// refused by name. [`ModelFile::load`] rebuilds the model.
pub fn read_model_file(path: &Path) -> Result<ModelFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse_model_file(&bytes, path)
}

/// [`read_model_file`] on the file's bytes (`path` names it in errors).
pub fn parse_model_file(bytes: &[u8], path: &Path) -> Result<ModelFile> {
    let dict = StateDict::from_safetensors_bytes(bytes, path.display().to_string())?;
    let bad = |reason: String| Error::Data { path: path.to_path_buf(), reason };
    if dict.metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a slabformer model file (no `{FORMAT_KEY} = {FORMAT}` header); official PyTorch checkpoints go through `slabformer import`"
        )));
    }
    let field = |key: &str| dict.metadata.get(key).ok_or_else(|| bad(format!("header lacks `{key}`")));
    let text = field(MODEL_KEY)?;
    // Files written before other families existed hold a DeiT-family config without the tag.
    let config = serde_json::from_str::<AnyConfig>(text)
        .or_else(|tagged| serde_json::from_str::<VitConfig>(text).map(AnyConfig::Vit).map_err(|_| tagged))
        .map_err(|e| bad(format!("`{MODEL_KEY}`: {e}")))?;
    config.check_sizes().map_err(|e| bad(format!("`{MODEL_KEY}`: {}", e.to_string().trim_start_matches("invalid config: "))))?;
    // Validated before anything is computed from it: a fuzzed header with `patch_size = 0` or
    // `num_heads = 0` divided by zero in the parameter count.
    config.image().validate().map_err(|e| bad(format!("`{MODEL_KEY}`: {}", e.to_string().trim_start_matches("invalid config: "))))?;
    let preprocess: Preprocess = serde_json::from_str(field(PREPROCESS_KEY)?).map_err(|e| bad(format!("`{PREPROCESS_KEY}`: {e}")))?;
    let kind = field(KIND_KEY)?.clone();
    if kind != "trained" && kind != "deploy" {
        return Err(bad(format!("unknown model kind `{kind}`")));
    }
    // The model is built from the header before the tensors are loaded into it: a header that
    // claims more parameters than the file holds is refused before that allocation. Deploy files
    // hold a little less than the trained config counts (norms folded away), buffers add to it:
    // twice the file's elements is a generous bound that still caps memory by the file's size.
    let params = config.param_count();
    let elements: usize = dict.iter().map(|(_, t)| t.shape.iter().product::<usize>()).sum();
    if params > 2 * elements + 4096 {
        return Err(bad(format!(
            "the header's `{MODEL_KEY}` describes a model of {params} parameters, but the file holds {elements} tensor elements ({} bytes); refusing to build it",
            elements * 4
        )));
    }
    if let Some(why) = crate::memory::params_too_big(params, 1, "the weights") {
        return Err(bad(format!("the header's `{MODEL_KEY}`: {why}")));
    }
    Ok(ModelFile { config, preprocess, kind, state: dict, path: path.to_path_buf() })
}

impl ModelFile {
    /// The model on `device`, when the file holds family `F` (dispatch on `config` with
    /// [`crate::with_family!`]); tensors that do not fit are refused by name.
    pub fn load<F: ModelFamily>(&self, device: &Device) -> Result<LoadedModel<F>> {
        let config = F::config_of(&self.config)
            .ok_or_else(|| Error::Data { path: self.path.clone(), reason: format!("holds a `{}` model, not the family asked for", self.config.family()) })?;
        let model = F::init(config, device)?;
        Ok(match self.kind.as_str() {
            "trained" => LoadedModel::Trained(load_state(model, &self.state, false)?.0),
            // Build the deploy structure by fusing a fresh model, then load the file into it.
            _ => LoadedModel::Deploy(load_state(model.fuse()?, &self.state, false)?.0),
        })
    }
}

/// [`read_model_file`] and [`ModelFile::load`] for a file known to hold family `F`.
pub fn load_model<F: ModelFamily>(path: &Path, device: &Device) -> Result<(LoadedModel<F>, Preprocess)> {
    let file = read_model_file(path)?;
    Ok((file.load::<F>(device)?, file.preprocess.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::VisionTransformer;

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
        let (loaded, pre_back) = load_model::<VisionTransformer>(&path, &device).unwrap();
        assert_eq!(pre_back, pre);
        let LoadedModel::Trained(loaded) = loaded else { panic!("trained") };
        let x = burn::tensor::Tensor::<4>::ones([1, 3, 16, 16], &device);
        assert_eq!(loaded.forward(x.clone()).into_data(), model.forward(x.clone()).into_data());

        let deploy_path = dir.path().join("d.safetensors");
        save_deploy::<VisionTransformer>(&deploy_path, &model.fuse().unwrap(), &model.config, &pre, false).unwrap();
        let (deploy, _) = load_model::<VisionTransformer>(&deploy_path, &device).unwrap();
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
        assert!(load_model::<VisionTransformer>(&bare, &device).err().unwrap().to_string().contains("not a slabformer model file"));
        // A header that names another model than the tensors hold.
        let mut other = header(collect_state(&model), &AnyConfig::Vit(VitConfig { depth: 2, ..tiny() }), "trained", &Preprocess::imagenet(3));
        other.origin = "other".into();
        let mismatched = dir.path().join("other.safetensors");
        std::fs::write(&mismatched, other.to_safetensors_bytes().unwrap()).unwrap();
        let err = load_model::<VisionTransformer>(&mismatched, &device).err().unwrap().to_string();
        assert!(err.contains("blocks.1"), "{err}");
        // Truncated.
        let good = model_bytes(&model, &Preprocess::imagenet(3)).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &good[..good.len() / 3]).unwrap();
        assert!(load_model::<VisionTransformer>(&cut, &device).err().unwrap().to_string().contains("cut.safetensors"));
        // A file of the DeiT family written before configs carried their family tag.
        let mut untagged = collect_state(&model);
        for (key, value) in header(StateDict::new("h"), &AnyConfig::Vit(tiny()), "trained", &Preprocess::imagenet(3)).metadata {
            untagged.metadata.insert(key, value);
        }
        untagged.metadata.insert(MODEL_KEY.into(), serde_json::to_string(&tiny()).unwrap());
        let old = dir.path().join("old.safetensors");
        std::fs::write(&old, untagged.to_safetensors_bytes().unwrap()).unwrap();
        assert_eq!(read_model_file(&old).unwrap().config, AnyConfig::Vit(tiny()));
        assert!(load_model::<VisionTransformer>(&old, &device).is_ok());
    }
}
