//! Model families as config presets. A preset is data: `presets()` lists every name the CLI and
//! the loaders accept.

pub mod vit;

pub use vit::{Pool, VisionTransformer, VitConfig};

use crate::error::{Error, Result};

/// A named, documented preset.
pub struct Preset {
    pub name: &'static str,
    pub summary: &'static str,
    pub config: fn() -> VitConfig,
}

pub fn presets() -> &'static [Preset] {
    vit::PRESETS
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
