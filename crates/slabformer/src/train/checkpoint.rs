//! Checkpoints: one safetensors file per checkpoint holding the model (`model.<key>`), the
//! optimizer moments and EMA weights, with the run position and config in its metadata. Files are
//! written to a temporary name and renamed into place; the newest `keep` are kept.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::state::StateDict;

pub const POSITION_KEY: &str = "slabformer.position";
pub const CONFIG_KEY: &str = "slabformer.train_config";

/// Where a run stands: enough, with the derived-randomness data pipeline, to continue exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Optimizer steps done.
    pub step: u64,
    /// Current epoch (training epochs first, then re-calibration epochs).
    pub epoch: u64,
    /// Optimizer steps of `epoch` already done.
    pub step_in_epoch: u64,
    /// Steps skipped for a non-finite loss or gradient (`on_nonfinite = "skip"`): counted in
    /// `step`, not taken by the optimizer.
    #[serde(default)]
    pub skipped: u64,
}

impl Position {
    /// Optimizer steps actually taken (AdamW's bias-correction count).
    pub fn optimizer_steps(&self) -> u64 {
        self.step - self.skipped
    }
}

pub fn checkpoint_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

fn checkpoint_name(step: u64) -> String {
    format!("step-{step:09}.safetensors")
}

/// Checkpoints of a run, oldest first.
pub fn list(run: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(checkpoint_dir(run))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("step-") && n.ends_with(".safetensors"))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

pub fn latest(run: &Path) -> Option<PathBuf> {
    list(run).pop()
}

/// The copy of the newest checkpoint known to be healthy (see [`mark_healthy`]).
pub fn healthy_path(run: &Path) -> PathBuf {
    checkpoint_dir(run).join("healthy.safetensors")
}

/// Makes `checkpoint` the run's healthy checkpoint: a hard link (a copy where links fail) under
/// [`healthy_path`], put in place by a rename. Pruning old `step-*` files leaves it alone.
pub fn mark_healthy(run: &Path, checkpoint: &Path) -> Result<PathBuf> {
    let target = healthy_path(run);
    let tmp = checkpoint_dir(run).join(format!(".healthy.tmp-{}.safetensors", crate::files::unique_suffix()));
    let io = |source| Error::Io { path: target.clone(), source };
    if std::fs::hard_link(checkpoint, &tmp).is_err() {
        std::fs::copy(checkpoint, &tmp).map_err(io)?;
    }
    std::fs::rename(&tmp, &target).map_err(io)?;
    Ok(target)
}

/// The run position stored in a checkpoint's header, read without its tensors.
pub fn position_of(path: &Path) -> Result<Position> {
    use std::io::Read;
    let bad = |what: String| Error::Format { origin: path.display().to_string(), reason: format!("not a slabformer checkpoint: {what}") };
    let mut file = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| bad(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad(format!("a header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Value = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let position = header["__metadata__"][POSITION_KEY].as_str().ok_or_else(|| bad("no run position".into()))?;
    serde_json::from_str(position).map_err(|e| bad(e.to_string()))
}

/// Saves one checkpoint and prunes all but the newest `keep`.
pub fn save(run: &Path, mut dict: StateDict, position: Position, config_toml: &str, keep: usize) -> Result<PathBuf> {
    dict.metadata.insert(POSITION_KEY.into(), serde_json::to_string(&position).expect("position serializes"));
    dict.metadata.insert(CONFIG_KEY.into(), config_toml.to_string());
    let path = checkpoint_dir(run).join(checkpoint_name(position.step));
    write_atomic(&path, &dict.to_safetensors_bytes()?)?;
    let all = list(run);
    for old in &all[..all.len().saturating_sub(keep)] {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// Reads a checkpoint: its tensors, position and the config it was trained with.
pub fn load(path: &Path) -> Result<(StateDict, Position, String)> {
    let dict = StateDict::read_safetensors(path)?;
    let bad = |what: &str| Error::Format { origin: path.display().to_string(), reason: format!("not a slabformer checkpoint: {what}") };
    let position = dict.metadata.get(POSITION_KEY).ok_or_else(|| bad("no run position"))?;
    let position: Position = serde_json::from_str(position).map_err(|e| bad(&e.to_string()))?;
    let config = dict.metadata.get(CONFIG_KEY).ok_or_else(|| bad("no training config"))?.clone();
    Ok((dict, position, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateTensor;

    #[test]
    fn saves_atomically_keeps_the_newest_and_round_trips() {
        let run = tempfile::tempdir().unwrap();
        let mut dict = StateDict::new("t");
        dict.insert("model.w", StateTensor::f32(vec![2], vec![1.0, 2.0]));
        for step in [10, 20, 30, 40] {
            let position = Position { step, epoch: step / 20, step_in_epoch: step % 20, skipped: step / 10 };
            save(run.path(), dict.clone(), position, "x = 1", 2).unwrap();
        }
        let names: Vec<String> = list(run.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(names, vec!["step-000000030.safetensors", "step-000000040.safetensors"]);
        let leftovers = std::fs::read_dir(checkpoint_dir(run.path())).unwrap().count();
        assert_eq!(leftovers, 2, "no temporary files left behind");
        let (back, position, config) = load(&latest(run.path()).unwrap()).unwrap();
        assert_eq!(position, Position { step: 40, epoch: 2, step_in_epoch: 0, skipped: 4 });
        assert_eq!(position_of(&latest(run.path()).unwrap()).unwrap(), position);
        // A checkpoint marked healthy survives the pruning of its step file.
        let healthy = mark_healthy(run.path(), &latest(run.path()).unwrap()).unwrap();
        save(run.path(), dict.clone(), Position { step: 50, ..position }, "x = 1", 1).unwrap();
        assert_eq!(list(run.path()).len(), 1);
        assert_eq!(position_of(&healthy).unwrap().step, 40);
        // Positions written before `skipped` existed read it as 0.
        let old: Position = serde_json::from_str(r#"{"step":3,"epoch":0,"step_in_epoch":3}"#).unwrap();
        assert_eq!(old.optimizer_steps(), 3);
        assert_eq!(config, "x = 1");
        assert_eq!(back.get("model.w").unwrap(), dict.get("model.w").unwrap());
        // A foreign safetensors file is refused by name.
        let foreign = run.path().join("foreign.safetensors");
        std::fs::write(&foreign, dict.to_safetensors_bytes().unwrap()).unwrap();
        assert!(load(&foreign).unwrap_err().to_string().contains("not a slabformer checkpoint"));
    }
}
