//! The fast CPU runtimes: inference on the deploy models ([`CpuModel`]) and training steps
//! ([`CpuTrainer`]), for every family whose model lowers into a plan.
//!
//! burn's flex backend runs every op as its own pass over freshly allocated tensors; here the
//! model is lowered once (`ModelFamily::lower`, into a `crate::plan::Plan` of the layer kinds'
//! fast forms in `nn`):
//! weights laid out for the GEMM, activations in buffers reused from call to call, biases,
//! residuals, GELU and the SLA normaliser fused around the GEMMs, kernels compiled for
//! AVX-512/AVX2 and picked at run time, backward passes written out. These executors own the
//! threading, the workspaces and the optimizer state; both read the same models (trained or
//! fused) and match burn to float rounding.

mod inference;
mod train;

pub use inference::{CpuAttention, CpuModel};
pub use train::{CpuTrainer, ForwardOptions, StepReport};
