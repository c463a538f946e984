//! Import of official PyTorch checkpoints (`.pth`): `state_dict` files or `{"model": state_dict}`
//! as the official release ships them. The pickle is parsed by burn's PyTorch reader, which reads
//! tensors only and never runs pickled code; anything else is refused with its error. The DeiT
//! family's parameter names are the official ones, so no key table is needed.

use std::path::Path;

use burn::store::pytorch_reader::{DType, PytorchReader};

use crate::error::{Error, Result};
use crate::state::{StateDict, StateTensor, Values, le_chunks};

/// All tensors of a PyTorch checkpoint as a state dict (floats as f32, integers as i64).
pub fn read_pytorch(path: &Path) -> Result<StateDict> {
    let origin = path.display().to_string();
    let refuse = |reason: String| Error::Format { origin: origin.clone(), reason };
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let mut file = std::fs::File::open(path).map_err(io)?;
        let n = file.read(&mut magic).map_err(io)?;
        // torch.save writes a zip archive (since PyTorch 1.6) or, before, a pickle (protocol
        // marker 0x80); anything else is not a checkpoint whatever its name.
        if !(magic[..n].starts_with(b"PK\x03\x04") || magic[..n].first() == Some(&0x80)) {
            return Err(refuse(format!(
                "not a PyTorch checkpoint: expected a .pth file of torch.save (a zip archive, or a legacy pickle), found {} starting with {:02x?}",
                if n < 4 { "a file of under 4 bytes".to_string() } else { "a file".to_string() },
                &magic[..n]
            )));
        }
    }
    // The official release nests the state dict under "model"; plain state dicts are at the root.
    let reader = ["model", "state_dict"]
        .iter()
        .find_map(|key| PytorchReader::with_top_level_key(path, key).ok().filter(|r| !r.is_empty()))
        .map(Ok)
        .unwrap_or_else(|| PytorchReader::new(path))
        .map_err(|e| refuse(format!("not a readable PyTorch checkpoint: {e}")))?;
    if reader.is_empty() {
        return Err(refuse("the checkpoint holds no tensors".into()));
    }
    let mut dict = StateDict::new(origin.clone());
    for (name, tensor) in reader.tensors() {
        let bytes = tensor.read().map_err(|e| refuse(format!("`{name}`: {e}")))?;
        let values = match tensor.dtype() {
            DType::F32 => Values::F32(le_chunks::<4>(&bytes).map(f32::from_le_bytes).collect()),
            DType::F64 => Values::F32(le_chunks::<8>(&bytes).map(|b| f64::from_le_bytes(b) as f32).collect()),
            DType::I64 => Values::I64(le_chunks::<8>(&bytes).map(i64::from_le_bytes).collect()),
            DType::I32 => Values::I64(le_chunks::<4>(&bytes).map(|b| i32::from_le_bytes(b) as i64).collect()),
            other => return Err(refuse(format!("`{name}` has dtype {other:?}; f32, f64, i32 and i64 are supported"))),
        };
        dict.insert(name.clone(), StateTensor { shape: tensor.shape().to_vec(), values });
    }
    Ok(dict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_truncated_and_malicious_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let random = dir.path().join("random.pth");
        std::fs::write(&random, (0..4096u32).map(|i| ((i * 2654435761u32) >> 13) as u8).collect::<Vec<_>>()).unwrap();
        assert!(read_pytorch(&random).unwrap_err().to_string().contains("random.pth"));

        // pickle.dumps({'w': obj}) where obj.__reduce__ = (os.system, ('touch …',)): a reader
        // that executed pickles would create the marker file.
        let marker = std::path::Path::new("/tmp/slabformer-pwned");
        let _ = std::fs::remove_file(marker);
        let evil: [u8; 71] = [
            128, 2, 125, 113, 0, 88, 1, 0, 0, 0, 119, 113, 1, 99, 112, 111, 115, 105, 120, 10, 115, 121, 115, 116, 101, 109, 10, 113, 2, 88, 27, 0, 0,
            0, 116, 111, 117, 99, 104, 32, 47, 116, 109, 112, 47, 115, 108, 97, 98, 102, 111, 114, 109, 101, 114, 45, 112, 119, 110, 101, 100, 113,
            3, 133, 113, 4, 82, 113, 5, 115, 46,
        ];
        let evil_path = dir.path().join("evil.pth");
        std::fs::write(&evil_path, evil).unwrap();
        let err = read_pytorch(&evil_path).unwrap_err().to_string();
        assert!(err.contains("evil.pth"), "{err}");
        assert!(!marker.exists(), "the pickle was executed");

        let missing = read_pytorch(&dir.path().join("none.pth")).unwrap_err().to_string();
        assert!(missing.contains("none.pth"), "{missing}");
    }
}
