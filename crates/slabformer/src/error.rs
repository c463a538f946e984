//! One error type for the library: every variant names the key, shape or file at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {}", describe_io(source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not what it should be (a safetensors file, a checkpoint, a .pth): the
    /// reason says what was expected.
    #[error("{origin}: {reason}")]
    Format { origin: String, reason: String },
    #[error("{origin}: key `{key}` not found")]
    MissingKey { origin: String, key: String },
    #[error("{origin}: {count} parameter(s) of the model have no tensor in the file: {keys}")]
    MissingKeys {
        origin: String,
        count: usize,
        keys: String,
    },
    #[error("{origin}: {count} tensor(s) in the file match no parameter of the model: {keys}")]
    UnexpectedKeys {
        origin: String,
        count: usize,
        keys: String,
    },
    #[error("{origin}: shape mismatch for `{key}`: the model expects {expected:?}, the file has {found:?}")]
    ShapeMismatch {
        origin: String,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{origin}: {} problems:\n  - {}", problems.len(), problems.join("\n  - "))]
    StateMismatch { origin: String, problems: Vec<String> },
    #[error("{origin}: `{key}` has dtype {found}, expected {expected}")]
    DType {
        origin: String,
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("{layer}: input shape {found:?} does not fit: {expected}")]
    InputShape {
        layer: &'static str,
        expected: String,
        found: Vec<usize>,
    },
    #[error("{path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("training stopped: {0}")]
    Training(String),
    /// A model or layer that this path (the fast CPU path, ONNX export, …) does not handle.
    #[error("{path} does not support {what} yet")]
    Unsupported { what: String, path: &'static str },
    #[error("invalid config: {0}")]
    Config(String),
    /// An output (file or run folder) that is not written: it exists, is not a regular file, or
    /// another run holds it.
    #[error("{path}: {reason}")]
    Output { path: PathBuf, reason: String },
    #[error("unknown model `{name}`; known models: {known}")]
    UnknownModel { name: String, known: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An OS error as a user reads it: "no such file" rather than "entity not found" (what an
/// `io::Error` made from its kind alone says).
fn describe_io(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        _ => e.to_string(),
    }
}

/// Checks a rank-3 token input `(B, N, C)` against the layer's expected token count and width.
pub(crate) fn check_tokens(
    layer: &'static str,
    dims: [usize; 3],
    tokens: Option<usize>,
    channels: usize,
) -> Result<()> {
    let tokens_ok = tokens.is_none_or(|n| dims[1] == n);
    if dims[0] == 0 || !tokens_ok || dims[2] != channels {
        let expected = match tokens {
            Some(n) => format!("(B > 0, {n}, {channels})"),
            None => format!("(B > 0, N, {channels})"),
        };
        return Err(Error::InputShape {
            layer,
            expected,
            found: dims.to_vec(),
        });
    }
    Ok(())
}
