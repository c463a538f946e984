//! slabformer: efficient transformers (SLAB, SLA, PRepBN, FLatten, ReLU attention) on burn.
//!
//! Layout: [`nn`] holds the layers (norms, attention kinds, MLP, patch embedding), [`models`]
//! the model families as config presets, [`state`] the state-dict I/O under official PyTorch key
//! names.

pub mod data;
pub mod deploy;
pub mod error;
pub mod files;
pub mod models;
pub mod nn;
pub mod runtime;
pub mod state;
pub mod train;

pub use error::{Error, Result};
