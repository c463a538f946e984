//! Model families. Each is one file: a config struct with named presets, the burn module tree
//! (the one description of the model), its fast plan lowered from that tree, its fuse and its
//! ONNX walk; [`ModelFamily`] is what every family provides to the trainer, the CLI and the
//! loaders. A preset is data: `presets()` lists every name the CLI and the loaders accept.

pub mod cswin;
pub mod efficientformer;
pub mod efficientformer_v2;
pub mod mobile_former;
pub mod mobilevit;
pub mod pvt;
pub mod swin;
pub mod vit;

pub use cswin::{CswinConfig, CswinTransformer};
pub use efficientformer::{EfficientFormer, EfficientFormerConfig};
pub use efficientformer_v2::{EfficientFormerV2, EfficientFormerV2Config};
pub use mobile_former::{MobileFormer, MobileFormerConfig};
pub use mobilevit::{MobileVit, MobileVitConfig};
pub use pvt::{PvtConfig, PyramidVisionTransformer};
pub use swin::{SwinConfig, SwinTransformer};
pub use vit::{Pool, VisionTransformer, VitConfig};

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::deploy::onnx::ToOnnx;
use crate::error::{Error, Result};
use crate::nn::schedule::{Phase, PrepbnSchedule};
use crate::plan::Plan;

/// A named, documented preset of a family's config.
pub struct Preset<C = VitConfig> {
    pub name: &'static str,
    pub summary: &'static str,
    pub config: fn() -> C,
}

/// What every family's config says about the images it takes and what it outputs.
pub trait ImageConfig {
    /// (height, width) of its input images.
    fn input_size(&self) -> [usize; 2];
    /// The side of its input images; training and evaluation on image sets take square ones
    /// (the trainer refuses others by name).
    fn img_size(&self) -> usize {
        self.input_size()[0]
    }
    fn in_chans(&self) -> usize;
    fn num_classes(&self) -> usize;
    /// Whether the model has a norm-free deploy form (RepBN / PRepBN norms fold; LayerNorm does
    /// not).
    fn folds(&self) -> bool;
    fn validate(&self) -> Result<()>;
    /// Whether a model built from this config also takes `side`×`side` images, as multi-scale
    /// training (`[data.multi_scale]`) feeds it; the error says why not. The default, for the
    /// families whose layers are sized from `img_size` (position embeddings, attention bias
    /// tables, window grids): its own size only.
    fn takes_size(&self, side: usize) -> Result<()> {
        let size = self.img_size();
        if side == size {
            return Ok(());
        }
        Err(Error::Config(format!("its layers are sized for {size}×{size} images (position embeddings, attention grids or bias tables)")))
    }
}

/// Whether `dims` are (B > 0, in_chans, H, W) images of `config`'s input size; an error naming
/// `layer` and both shapes otherwise.
pub(crate) fn check_images(layer: &'static str, config: &dyn ImageConfig, dims: [usize; 4]) -> Result<()> {
    let [h, w] = config.input_size();
    if dims[0] == 0 || dims[1..] != [config.in_chans(), h, w] {
        return Err(Error::InputShape { layer, expected: format!("(B > 0, {}, {h}, {w}) images", config.in_chans()), found: dims.to_vec() });
    }
    Ok(())
}

/// A model that maps images to logits: trained and deploy forms alike.
pub trait ImageClassifier: Module {
    fn image_config(&self) -> &dyn ImageConfig;
    fn logits(&self, images: Tensor<4>) -> Tensor<2>;
}

/// What a model family provides: its config and presets, one constructor, the counts the papers
/// tabulate, its deploy form, the PRepBN schedule its norms follow, its lowering onto the fast
/// path, and (both forms) its ONNX graph.
pub trait ModelFamily: ImageClassifier + ToOnnx + Clone + Sized {
    type Config: ImageConfig + Clone + std::fmt::Debug + 'static + PartialEq + Serialize + DeserializeOwned;
    /// The re-parameterized inference form.
    type Deploy: ImageClassifier + ToOnnx;

    fn presets() -> &'static [Preset<Self::Config>];
    /// `config` under its family's tag, as files and the CLI hold it.
    fn tagged(config: &Self::Config) -> AnyConfig;
    /// The config inside `any`, when it is this family's.
    fn config_of(any: &AnyConfig) -> Option<&Self::Config>;
    /// Validates `config` and builds the model with its initialisation.
    fn init(config: &Self::Config, device: &Device) -> Result<Self>;
    fn config(&self) -> &Self::Config;
    /// Trainable parameters, from the architecture alone.
    fn param_count(config: &Self::Config) -> usize;
    /// Multiply-accumulates of one sample's forward pass (the papers' "FLOPs").
    fn macs(config: &Self::Config) -> u64;
    /// The deploy form: every foldable norm folded away; an error names what does not fold.
    fn fuse(&self) -> Result<Self::Deploy>;
    /// What the model's PRepBN norms compute at the next training-mode call (None without them:
    /// the default, for families without PRepBN).
    fn prepbn_phase(&self) -> Option<Phase> {
        None
    }
    /// The PRepBN schedule (T, warm-up, r0, decay) of `config`'s norms, for the trainer to set;
    /// None when the family's norms are not PRepBN (the default).
    fn prepbn_schedule(_config: &mut Self::Config) -> Option<&mut PrepbnSchedule> {
        None
    }
    /// The model as trained (norms included) lowered onto the fast path, for the CPU trainer;
    /// `Error::Unsupported` names what the fast path lacks.
    fn lower(&self) -> Result<Plan>;
    /// The deploy form lowered onto the fast path, for the CPU runtime.
    fn lower_deploy(deploy: &Self::Deploy) -> Result<Plan>;
}

/// Largest size (width, image side, patch, window, heads, …) a model config may hold.
pub const MAX_CONFIG_SIZE: u64 = 1 << 16;
/// Largest class count.
pub const MAX_CLASSES: u64 = 1 << 20;
/// Most blocks a model may have over all its stages.
pub const MAX_BLOCKS: u64 = 4096;
/// Largest ratio (MLP width per channel and the like).
pub const MAX_RATIO: f64 = 64.0;

fn check_sizes_under(value: &serde_json::Value, key: &str, blocks: &mut u64) -> Result<()> {
    use serde_json::Value;
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let leaf = leaf.split('[').next().unwrap_or(leaf);
    match value {
        // PRepBN schedules count steps, not sizes.
        Value::Object(_) if leaf == "prepbn" || leaf == "schedule" => Ok(()),
        Value::Object(fields) => fields
            .iter()
            .try_for_each(|(k, v)| check_sizes_under(v, &if key.is_empty() { k.clone() } else { format!("{key}.{k}") }, blocks)),
        Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| check_sizes_under(v, &format!("{key}[{i}]"), blocks)),
        Value::Number(n) => {
            if let Some(v) = n.as_u64() {
                let bound = if leaf == "num_classes" { MAX_CLASSES } else { MAX_CONFIG_SIZE };
                if v > bound {
                    return Err(Error::Config(format!("{key} = {v} is beyond any model's size (at most {bound})")));
                }
                // Block counts: stage depths, MobileViT's transformer depths, Mobile-Former's
                // repeats of a block row (`n`).
                if matches!(leaf, "depth" | "depths" | "transformer_depth" | "n") {
                    *blocks += v;
                }
            } else if let Some(f) = n.as_f64()
                && leaf.contains("ratio")
                && !(f.abs() <= MAX_RATIO)
            {
                return Err(Error::Config(format!("{key} = {f} is beyond any model's ratio (at most {MAX_RATIO})")));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A config of any family, tagged with its family (`family = "vit"`) in files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum AnyConfig {
    Vit(VitConfig),
    Swin(SwinConfig),
    Pvt(PvtConfig),
    Cswin(CswinConfig),
    MobileFormer(MobileFormerConfig),
    Mobilevit(MobileVitConfig),
    #[serde(rename = "efficientformer")]
    EfficientFormer(EfficientFormerConfig),
    #[serde(rename = "efficientformer_v2")]
    EfficientFormerV2(EfficientFormerV2Config),
}

/// Runs `$body` with `$family` naming the family type of `$config` (an [`AnyConfig`], by value
/// or reference) and `$c` bound to its config.
#[macro_export]
macro_rules! with_family {
    ($config:expr, |$family:ident, $c:ident| $body:expr) => {
        match $config {
            $crate::models::AnyConfig::Vit($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::VisionTransformer;
                $body
            }
            $crate::models::AnyConfig::Swin($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::SwinTransformer;
                $body
            }
            $crate::models::AnyConfig::Pvt($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::PyramidVisionTransformer;
                $body
            }
            $crate::models::AnyConfig::Cswin($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::CswinTransformer;
                $body
            }
            $crate::models::AnyConfig::MobileFormer($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::MobileFormer;
                $body
            }
            $crate::models::AnyConfig::Mobilevit($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::MobileVit;
                $body
            }
            $crate::models::AnyConfig::EfficientFormer($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::EfficientFormer;
                $body
            }
            $crate::models::AnyConfig::EfficientFormerV2($c) => {
                #[allow(dead_code)]
                type $family = $crate::models::EfficientFormerV2;
                $body
            }
        }
    };
}

impl AnyConfig {
    pub fn family(&self) -> &'static str {
        match self {
            AnyConfig::Vit(_) => "vit",
            AnyConfig::Swin(_) => "swin",
            AnyConfig::Pvt(_) => "pvt",
            AnyConfig::Cswin(_) => "cswin",
            AnyConfig::MobileFormer(_) => "mobile_former",
            AnyConfig::Mobilevit(_) => "mobilevit",
            AnyConfig::EfficientFormer(_) => "efficientformer",
            AnyConfig::EfficientFormerV2(_) => "efficientformer_v2",
        }
    }

    pub fn image(&self) -> &dyn ImageConfig {
        with_family!(self, |F, c| c as &dyn ImageConfig)
    }

    pub fn param_count(&self) -> usize {
        with_family!(self, |F, c| F::param_count(c))
    }

    /// Refuses sizes no model has, by key, before anything is computed from them: a fuzzed
    /// header with `depths = [9223372036854775807, 2]` made the parameter count loop for ever,
    /// and products of huge sizes wrap around in `param_count`'s usize arithmetic. With every
    /// size ≤ [`MAX_CONFIG_SIZE`] (classes ≤ [`MAX_CLASSES`]), ≤ [`MAX_BLOCKS`] blocks in all and
    /// ratios ≤ [`MAX_RATIO`], every family's count stays far below 2^63. The PRepBN step
    /// counters are not sizes and are not bounded.
    pub fn check_sizes(&self) -> Result<()> {
        let tree = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))?;
        let mut blocks = 0u64;
        check_sizes_under(&tree, "", &mut blocks)?;
        if blocks > MAX_BLOCKS {
            return Err(Error::Config(format!("the model has {blocks} blocks in all (depths, transformer depths, repeats); at most {MAX_BLOCKS} are supported")));
        }
        Ok(())
    }

    pub fn macs(&self) -> u64 {
        with_family!(self, |F, c| F::macs(c))
    }

    pub fn prepbn_schedule(&mut self) -> Option<&mut PrepbnSchedule> {
        with_family!(self, |F, c| F::prepbn_schedule(c))
    }

    /// `self` with the fields in `overrides` (field name → value, e.g. from a TOML `[model]`
    /// table) replaced; a field the family's config lacks is an error naming it.
    pub fn with_overrides(&self, overrides: &serde_json::Map<String, serde_json::Value>) -> Result<Self> {
        let serde_json::Value::Object(mut fields) = serde_json::to_value(self).map_err(|e| Error::Config(e.to_string()))? else {
            unreachable!("a config serializes to an object")
        };
        for (key, value) in overrides {
            if key == "family" || !fields.contains_key(key) {
                let known: Vec<&str> = fields.keys().map(String::as_str).filter(|k| *k != "family").collect();
                return Err(Error::Config(format!("`{key}` is not a field of {} configs (fields: {})", self.family(), known.join(", "))));
            }
            fields.insert(key.clone(), value.clone());
        }
        serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| Error::Config(format!("model overrides: {e}")))
    }
}

/// One named preset of any family.
pub struct AnyPreset {
    pub name: &'static str,
    pub summary: &'static str,
    pub config: AnyConfig,
}

fn family_presets<F: ModelFamily>() -> impl Iterator<Item = AnyPreset> {
    F::presets().iter().map(|p| AnyPreset { name: p.name, summary: p.summary, config: F::tagged(&(p.config)()) })
}

/// Every preset of every family, family by family.
pub fn presets() -> Vec<AnyPreset> {
    family_presets::<VisionTransformer>()
        .chain(family_presets::<SwinTransformer>())
        .chain(family_presets::<PyramidVisionTransformer>())
        .chain(family_presets::<CswinTransformer>())
        .chain(family_presets::<MobileFormer>())
        .chain(family_presets::<MobileVit>())
        .chain(family_presets::<EfficientFormer>())
        .chain(family_presets::<EfficientFormerV2>())
        .collect()
}

pub fn preset(name: &str) -> Result<AnyConfig> {
    let all = presets();
    match all.iter().position(|p| p.name == name) {
        Some(i) => Ok(all.into_iter().nth(i).expect("found").config),
        None => Err(Error::UnknownModel { name: name.to_string(), known: all.iter().map(|p| p.name).collect::<Vec<_>>().join(", ") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_of_every_family_is_valid_tagged_and_uniquely_named() {
        let all = presets();
        for preset in &all {
            preset.config.image().validate().unwrap_or_else(|e| panic!("{}: {e}", preset.name));
            let text = serde_json::to_string(&preset.config).unwrap();
            assert!(text.contains(&format!("\"family\":\"{}\"", preset.config.family())), "{text}");
            assert_eq!(serde_json::from_str::<AnyConfig>(&text).unwrap(), preset.config, "{}", preset.name);
        }
        let mut names: Vec<_> = all.iter().map(|p| p.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len());
        let err = preset("no_such_model").unwrap_err().to_string();
        assert!(err.contains("no_such_model") && err.contains("slab_deit_tiny"), "{err}");
    }
}
