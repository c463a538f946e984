//! Shared helpers for the golden tests: where the golden folder is, and tolerant comparisons that
//! name the worst element when they fail.

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor};
use slabformer::state::{StateDict, StateTensor, Values};

/// `$SLABFORMER_GOLDEN`, or `../shared/golden` beside the workspace. Relative paths are taken from
/// the workspace root. A missing folder fails the test: the golden checks are never skipped.
pub fn golden_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = match std::env::var_os("SLABFORMER_GOLDEN") {
        Some(p) => root.join(p),
        None => root.join("../shared/golden"),
    };
    assert!(
        dir.is_dir(),
        "golden folder {} not found: put the shared folder beside the repository or set SLABFORMER_GOLDEN",
        dir.display()
    );
    dir
}

pub fn golden(case: &str) -> StateDict {
    let path = golden_dir().join(format!("{case}.safetensors"));
    StateDict::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("golden case `{case}` is unreadable: {e}"))
}

pub fn plain() -> Device {
    Device::flex()
}

pub fn autodiff() -> Device {
    Device::flex().autodiff()
}

pub fn values_of(t: &StateTensor) -> Vec<f64> {
    match &t.values {
        Values::F32(v) => v.iter().map(|&x| x as f64).collect(),
        Values::I64(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

pub fn tensor_values<const D: usize>(t: Tensor<D>) -> (Vec<usize>, Vec<f64>) {
    let shape = t.dims().to_vec();
    let v = t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap();
    (shape, v.into_iter().map(|x| x as f64).collect())
}

#[derive(Clone, Copy)]
pub enum Tol {
    /// `max|a−b| ≤ 1e-4 + 1e-4·max|b|` (outputs, state).
    Output,
    /// `max|a−b| ≤ 1e-3 + 1e-4·max|b|` (gradients).
    Grad,
}

/// Compares `ours` against `want` with the golden README's tolerance; panics naming the worst
/// element.
pub fn assert_close(name: &str, shape: &[usize], ours: &[f64], want_shape: &[usize], want: &[f64], tol: Tol) {
    let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
    assert_eq!(
        squeeze(shape),
        squeeze(want_shape),
        "{name}: shape {shape:?} vs golden {want_shape:?}"
    );
    assert_eq!(ours.len(), want.len(), "{name}: element count");
    let max_ref = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let bound = match tol {
        Tol::Output => 1e-4 + 1e-4 * max_ref,
        Tol::Grad => 1e-3 + 1e-4 * max_ref,
    };
    let (worst, diff) = ours
        .iter()
        .zip(want)
        .map(|(a, b)| if a.is_nan() || b.is_nan() { f64::INFINITY } else { (a - b).abs() })
        .enumerate()
        .fold((0, 0.0f64), |(wi, wd), (i, d)| if d > wd { (i, d) } else { (wi, wd) });
    assert!(
        diff <= bound,
        "{name}: max |Δ| = {diff:.3e} > {bound:.3e} at flat index {worst} (ours {}, golden {})",
        ours[worst],
        want[worst]
    );
}

pub fn assert_tensor<const D: usize>(name: &str, ours: Tensor<D>, golden: &StateDict, key: &str, tol: Tol) {
    let want = golden.get(key).unwrap();
    let (shape, v) = tensor_values(ours);
    assert_close(&format!("{name} [{key}]"), &shape, &v, &want.shape, &values_of(want), tol);
}

/// Every tensor of `want` must be in `ours` (same key) and close; integer buffers exactly equal.
/// Keys in `ours` that `want` lacks are an error too: names must mirror the official ones.
pub fn assert_state(name: &str, ours: &StateDict, want: &StateDict, tol: Tol) {
    let extra: Vec<_> = ours.keys().filter(|k| !want.contains(k)).collect();
    assert!(extra.is_empty(), "{name}: keys not in the golden state: {extra:?}");
    for (key, w) in want.iter() {
        let o = ours
            .get(key)
            .unwrap_or_else(|_| panic!("{name}: no `{key}` in our state"));
        match (&o.values, &w.values) {
            (Values::I64(a), Values::I64(b)) => {
                assert_eq!(a, b, "{name}: integer buffer `{key}`");
                assert_eq!(o.shape, w.shape, "{name}: shape of `{key}`");
            }
            _ => assert_close(&format!("{name} [{key}]"), &o.shape, &values_of(o), &w.shape, &values_of(w), tol),
        }
    }
}

/// Gradients: a parameter that got none must have an all-zero golden gradient.
pub fn assert_grads(name: &str, ours: &StateDict, want: &StateDict) {
    for (key, w) in want.iter() {
        if key == "input" {
            continue;
        }
        match ours.get(key) {
            Ok(o) => assert_close(&format!("{name} grad [{key}]"), &o.shape, &values_of(o), &w.shape, &values_of(w), Tol::Grad),
            Err(_) => {
                let max = values_of(w).iter().fold(0.0f64, |m, v| m.max(v.abs()));
                assert!(max == 0.0, "{name}: no gradient for `{key}`, golden max |grad| {max}");
            }
        }
    }
}
