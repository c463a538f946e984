//! A dedicated CPU inference runtime for the deploy models.
//!
//! burn's flex backend runs every op as its own pass over freshly allocated tensors; for
//! inference the model is fixed, so this runtime plans it once: weights laid out for the GEMM,
//! activations in per-thread buffers reused for every image, biases, residuals, GELU and the SLA
//! normaliser fused around the GEMMs, kernels compiled for AVX-512/AVX2 and picked at run time.
//! It reads the same models (trained or fused) and matches their burn forward to float rounding.

pub mod kernels;
mod vit;

pub use vit::{CpuAttention, CpuVit};
