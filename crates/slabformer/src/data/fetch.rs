//! Fetching Fashion-MNIST the way `../shared/DATA.md` prescribes: the Debian package through
//! `apt-get download`, its raw idx files checked against known sha256 sums. Everything is built in
//! a scratch folder beside the destination and renamed into place only when every check passed.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const FASHION_MNIST_PACKAGE: &str = "dataset-fashion-mnist";
pub const FASHION_MNIST_VERSION: &str = "0.0~git20200523.55506a9-1";
pub const FASHION_MNIST_DEB_SHA256: &str = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0";

/// The raw (decompressed) idx files and their sha256.
pub const FASHION_MNIST_FILES: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
];

fn fetch_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Data { path: path.to_path_buf(), reason: reason.into() }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Whether `dir` already holds the four verified files.
pub fn fashion_mnist_present(dir: &Path) -> Result<bool> {
    for (name, sum) in FASHION_MNIST_FILES {
        let path = dir.join(name);
        if !path.exists() {
            return Ok(false);
        }
        if sha256_file(&path)? != sum {
            return Err(fetch_error(&path, "present but its sha256 is wrong: remove the folder and fetch again"));
        }
    }
    Ok(true)
}

/// Removes the scratch folder however the fetch ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(command: &mut Command, what: &str, scratch: &Path) -> Result<()> {
    let output = command
        .output()
        .map_err(|e| fetch_error(scratch, format!("cannot run {what}: {e} (is it installed?)")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(fetch_error(
            scratch,
            format!("{what} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        ))
    }
}

/// Fetches Fashion-MNIST into `dest` (which must not exist, or already hold the verified files).
/// Returns `false` when the files were already there.
pub fn fetch_fashion_mnist(dest: &Path) -> Result<bool> {
    fetch_with(dest, "apt-get")
}

fn fetch_with(dest: &Path, apt_get: &str) -> Result<bool> {
    if dest.exists() {
        if fashion_mnist_present(dest)? {
            return Ok(false);
        }
        return Err(fetch_error(dest, "exists but does not hold the Fashion-MNIST idx files; not overwriting it"));
    }
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let scratch = Scratch(parent.join(format!(".fashion-mnist.partial-{}", crate::files::unique_suffix())));
    std::fs::create_dir_all(&scratch.0).map_err(io(&scratch.0))?;

    let spec = format!("{FASHION_MNIST_PACKAGE}={FASHION_MNIST_VERSION}");
    let download = || run(Command::new(apt_get).args(["download", &spec]).current_dir(&scratch.0), "apt-get download", &scratch.0);
    if download().is_err() {
        // The package lists may be missing on a fresh machine ("apt-get update once per machine").
        run(Command::new(apt_get).args(["update", "-qq"]), "apt-get update", &scratch.0)?;
        download()?;
    }
    let deb = std::fs::read_dir(&scratch.0)
        .map_err(io(&scratch.0))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| fetch_error(&scratch.0, "apt-get download produced no .deb"))?;
    let sum = sha256_file(&deb)?;
    if sum != FASHION_MNIST_DEB_SHA256 {
        return Err(fetch_error(&deb, format!("sha256 {sum}, expected {FASHION_MNIST_DEB_SHA256}")));
    }
    let extracted = scratch.0.join("extracted");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted), "dpkg-deb -x", &scratch.0)?;
    let source = extracted.join("usr/share/datasets/fashion-mnist");
    let staged = scratch.0.join("fashion-mnist");
    std::fs::create_dir_all(&staged).map_err(io(&staged))?;
    for (name, want) in FASHION_MNIST_FILES {
        let gz = source.join(format!("{name}.gz"));
        let out = staged.join(name);
        let got = gunzip_hashing(&gz, &out)?;
        if got != want {
            return Err(fetch_error(&gz, format!("decompressed sha256 {got}, expected {want}")));
        }
    }
    if let Err(e) = std::fs::rename(&staged, dest) {
        // Another fetch (a parallel test, say) may have finished first.
        if fashion_mnist_present(dest).unwrap_or(false) {
            return Ok(false);
        }
        return Err(io(dest)(e));
    }
    Ok(true)
}

/// Decompresses `gz` into `out`, returning the sha256 of what was written.
fn gunzip_hashing(gz: &Path, out: &Path) -> Result<String> {
    let file = std::fs::File::open(gz).map_err(io(gz))?;
    let mut decoder = flate2::read::GzDecoder::new(std::io::BufReader::new(file));
    let mut writer = std::io::BufWriter::new(std::fs::File::create(out).map_err(io(out))?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = decoder.read(&mut buf).map_err(|e| fetch_error(gz, format!("not a valid gzip file: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).map_err(io(out))?;
    }
    writer.flush().map_err(io(out))?;
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_client_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("fashion-mnist");
        let err = fetch_with(&dest, "/nonexistent/apt-get").unwrap_err().to_string();
        assert!(err.contains("apt-get") && err.contains("cannot run"), "{err}");
        assert!(!dest.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert!(leftovers.is_empty(), "scratch folder left behind: {leftovers:?}");
    }

    #[test]
    fn a_folder_with_wrong_files_is_refused_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FASHION_MNIST_FILES[0].0), b"not the real file").unwrap();
        let err = fetch_with(dir.path(), "/nonexistent/apt-get").unwrap_err().to_string();
        assert!(err.contains("sha256"), "{err}");
        assert_eq!(std::fs::read(dir.path().join(FASHION_MNIST_FILES[0].0)).unwrap(), b"not the real file");
        let other = tempfile::tempdir().unwrap();
        std::fs::write(other.path().join("notes.txt"), b"mine").unwrap();
        let err = fetch_with(other.path(), "/nonexistent/apt-get").unwrap_err().to_string();
        assert!(err.contains("not overwriting"), "{err}");
    }
}
