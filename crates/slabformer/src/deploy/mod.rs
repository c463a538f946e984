//! Deployment: model files with their config in the header, import of official PyTorch
//! checkpoints, and ONNX export of the fused model.

pub mod import;
pub mod model_file;
pub mod onnx;
pub mod predict;
