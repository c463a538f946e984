//! Model families. Each is one file: a config struct with named presets, the burn module tree
//! (the one description of the model), its fast plan lowered from that tree, its fuse and its
//! ONNX walk; [`ModelFamily`] is what every family provides to the trainer, the CLI and the
//! loaders. A preset is data: `presets()` lists every name the CLI and the loaders accept.

pub mod cswin;
pub mod vit;

pub use cswin::{CswinConfig, CswinTransformer};
pub use vit::{Pool, VisionTransformer, VitConfig};

use burn::module::Module;
use burn::tensor::Device;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::nn::schedule::{Phase, PrepbnSchedule};

/// A named, documented preset of a family's config.
pub struct Preset<C = VitConfig> {
    pub name: &'static str,
    pub summary: &'static str,
    pub config: fn() -> C,
}

/// What a model family provides: its config and presets, one constructor, the counts the papers
/// tabulate, its deploy form, and the PRepBN schedule its norms follow.
pub trait ModelFamily: Module + Sized {
    type Config: Clone + std::fmt::Debug + PartialEq + Serialize + DeserializeOwned;
    /// The re-parameterized inference form.
    type Deploy: Module;

    fn presets() -> &'static [Preset<Self::Config>];
    /// Validates `config` and builds the model with its initialisation.
    fn init(config: &Self::Config, device: &Device) -> Result<Self>;
    fn config(&self) -> &Self::Config;
    /// Trainable parameters, from the architecture alone.
    fn param_count(config: &Self::Config) -> usize;
    /// Multiply-accumulates of one sample's forward pass (the papers' "FLOPs").
    fn macs(config: &Self::Config) -> u64;
    /// The deploy form: every foldable norm folded away; an error names what does not fold.
    fn fuse(&self) -> Result<Self::Deploy>;
    /// What the model's PRepBN norms compute at the next training-mode call (None without them).
    fn prepbn_phase(&self) -> Option<Phase>;
    /// The PRepBN schedule (T, warm-up, r0, decay) of `config`'s norms, for the trainer to set;
    /// None when the family's norms are not PRepBN.
    fn prepbn_schedule(config: &mut Self::Config) -> Option<&mut PrepbnSchedule>;
}

pub fn presets() -> &'static [Preset] {
    VisionTransformer::presets()
}

pub fn preset(name: &str) -> Result<VitConfig> {
    presets()
        .iter()
        .find(|p| p.name == name)
        .map(|p| (p.config)())
        .ok_or_else(|| Error::UnknownModel {
            name: name.to_string(),
            known: presets().iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        })
}
