//! slabformer: efficient transformers (SLAB, SLA, PRepBN, FLatten, ReLU attention) on burn.
//!
//! Layout (see docs/architecture.md): [`kernels`] the SIMD kernels and GEMM views; [`nn`] the layer
//! kinds, each with its burn module, fast CPU form, fuse rule and ONNX emission; [`models`] the
//! model families, each described once and lowered from that description onto the fast path;
//! [`runtime`] the fast executors (inference, training steps); [`optim`] the optimizer both
//! training engines use; [`deploy`] model files, import, ONNX; [`train`] the training runs;
//! [`state`] the state-dict I/O under official PyTorch key names.

pub mod data;
pub mod deploy;
pub mod error;
pub mod files;
pub mod kernels;
pub mod memory;
pub mod models;
pub mod nn;
pub mod optim;
pub mod plan;
pub mod runtime;
pub mod state;
pub mod testing;
pub mod train;

pub use error::{Error, Result};
