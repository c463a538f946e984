//! Writing files without ever leaving a half-written one or replacing one the user did not ask
//! to replace.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A suffix no other temporary file of this process (any thread) uses at the same time.
pub fn unique_suffix() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// A fresh temporary name beside `path` (its folder created), ending in `path`'s extension for
/// writers that choose a format by it.
fn temp_beside(path: &Path) -> Result<PathBuf> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let extension = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    Ok(dir.join(format!(".{stem}.tmp-{}{extension}", unique_suffix())))
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a crash
/// never leaves a half-written file under the final name.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let tmp = temp_beside(path)?;
    let result = (|| {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// [`write_atomic`] for a file that a writer (a plotter, an encoder) creates at a path it is
/// given: it gets the temporary path; its error, named by `what`, leaves nothing behind.
pub fn write_atomic_with(path: &Path, what: &str, write: impl FnOnce(&Path) -> std::result::Result<(), String>) -> Result<()> {
    let tmp = temp_beside(path)?;
    if let Err(reason) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Data { path: path.to_path_buf(), reason: format!("{what} failed: {reason}") });
    }
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io { path: path.to_path_buf(), source }
    })
}

/// Refuses an output the user named that exists already, unless `overwrite`: checked before
/// long work as well as at writing time.
pub fn check_new(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(Error::Config(format!("{} exists; not overwriting it (pass --overwrite to replace it)", path.display())));
    }
    Ok(())
}

/// [`write_atomic`] for an output the user named: an existing file is kept unless `overwrite`.
pub fn write_new(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    check_new(path, overwrite)?;
    write_atomic(path, bytes)
}
