//! The kill test's short form (bench/kill_test.sh, docs/reliability.md): a small training killed
//! at random moments — once before its first checkpoint, some during checkpoint writes — and
//! resumed each time ends bit-identical to an uninterrupted run.

use std::path::Path;
use std::process::Command;

#[test]
fn a_training_killed_and_resumed_three_times_equals_the_uninterrupted_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let binary = env!("CARGO_BIN_EXE_slabformer");
    let data = root.join("data/fashion-mnist");
    let fetch = Command::new(binary).args(["data", "fetch", "fashion-mnist", "--dest"]).arg(&data).status().expect("runs the binary");
    assert!(fetch.success(), "Fashion-MNIST is needed for this test and could not be fetched");
    let out = Command::new("bash").arg(root.join("bench/kill_test.sh")).arg("3").env("SLABFORMER", binary).env("SLABFORMER_DATA", &data).output().expect("runs bash");
    assert!(
        out.status.success(),
        "kill test failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
