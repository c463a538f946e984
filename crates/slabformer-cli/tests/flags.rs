//! Command-line flags reach the config the trainer runs.

use std::process::Command;

#[test]
fn train_flags_override_the_config_and_bad_values_are_refused_by_key() {
    let binary = env!("CARGO_BIN_EXE_slabformer");
    let out = Command::new(binary)
        .args(["train", "--preset", "fashion-slab", "--print-config", "--lr", "0.0005", "--epochs", "7", "--clip-grad", "2.5"])
        .output()
        .expect("runs the binary");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = String::from_utf8_lossy(&out.stdout);
    for line in ["lr = 0.0005", "epochs = 7", "clip_grad = 2.5"] {
        assert!(config.lines().any(|l| l.trim() == line), "`{line}` missing from\n{config}");
    }
    let run = tempfile::tempdir().unwrap();
    let out = Command::new(binary).args(["train", "--preset", "fashion-slab", "--lr", "nan", "--out"]).arg(run.path().join("run")).output().expect("runs the binary");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("optim.lr"), "{err}");
}
