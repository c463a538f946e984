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

/// Refuses an output the user named that exists already, unless `overwrite`; what is not a
/// regular file (a device node, a folder) is never replaced, since the rename would put a plain
/// file in its place. Checked before long work as well as at writing time.
pub fn check_new(path: &Path, overwrite: bool) -> Result<()> {
    let refuse = |reason: String| Err(Error::Output { path: path.to_path_buf(), reason });
    let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "a device or other special file" };
        return refuse(format!("is {what}, not a regular file; not replacing it (name a file)"));
    }
    if !overwrite {
        return refuse("exists; not overwriting it (pass --overwrite to replace it)".into());
    }
    Ok(())
}

/// Whether `name` is one of [`write_atomic`]'s temporary files (`.<stem>.tmp-<pid>-<n><ext>`).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.contains(".tmp-")
}

/// Removes the temporary files that writes killed between create and rename left in `dir`;
/// only for a folder this process holds (see [`RunLock`]), where no other write is under way.
pub fn remove_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        if entry.file_name().to_str().is_some_and(is_temp_name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// The name of the lock file in a run folder.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a folder (`flock` on its `.lock` file, through `File::try_lock`): held
/// while the value lives, released by the kernel when the process exits or is killed. The lock
/// file stays: removing it would let two processes lock two different files of one name.
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    /// Takes the lock of `dir` (created if missing), or fails naming the folder and the holder
    /// (its pid and host, as it wrote them into the lock file).
    pub fn acquire(dir: &Path) -> Result<Self> {
        use std::io::Write;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        let path = dir.join(LOCK_FILE);
        let io = |source| Error::Io { path: path.clone(), source };
        let mut file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => "another process".to_string(),
                    h => h.to_string(),
                };
                return Err(Error::Output {
                    path: dir.to_path_buf(),
                    reason: format!("is in use by another training ({holder}); wait for it to end or choose another --out"),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        file.set_len(0).map_err(io)?;
        writeln!(file, "pid {} on {}", std::process::id(), host.trim()).map_err(io)?;
        Ok(Self { _file: file })
    }
}

/// [`write_atomic`] for an output the user named: an existing file is kept unless `overwrite`.
pub fn write_new(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    check_new(path, overwrite)?;
    write_atomic(path, bytes)
}
