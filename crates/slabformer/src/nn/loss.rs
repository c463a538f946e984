//! Soft-target cross-entropy, the loss both training engines minimise: the burn form (the
//! autodiff reference) and the fast form on host logits, which both engines use for the loss
//! and its gradient.

use burn::tensor::Tensor;
use burn::tensor::activation::log_softmax;

use crate::kernels;

/// Soft-target cross-entropy of (B, classes) logits, mean over the batch, as a burn tensor.
pub fn soft_cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    log_softmax(logits, 1).mul(targets).sum_dim(1).neg().mean()
}

/// Mean soft-target cross-entropy of (B, classes) logits and its gradient `(softmax − target)/B`.
pub fn cross_entropy(logits: &[f32], targets: &[f32], classes: usize) -> (f64, Vec<f32>) {
    let batch = logits.len() / classes;
    let mut grad = vec![0.0; logits.len()];
    let mut loss = 0.0f64;
    for ((z, target), g) in logits.chunks_exact(classes).zip(targets.chunks_exact(classes)).zip(grad.chunks_exact_mut(classes)) {
        let log_sum = kernels::log_sum_exp(z);
        for ((g, &z), &y) in g.iter_mut().zip(z).zip(target) {
            let log_p = z as f64 - log_sum;
            loss -= y as f64 * log_p;
            *g = ((log_p.exp() - y as f64) / batch as f64) as f32;
        }
    }
    (loss / batch as f64, grad)
}
