//! Image data: in-memory image sets (idx files, image folders), the Fashion-MNIST fetch,
//! augmentation and a prefetching loader.
//!
//! Randomness is derived, never carried: every random choice comes from a generator seeded by
//! `(run seed, epoch, sample or batch index)`. A resumed run therefore sees exactly the batches it
//! would have seen, with no generator state to save.

pub mod augment;
pub mod fetch;
pub mod loader;
pub mod sampler;

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand_pcg::Pcg64;

use crate::error::{Error, Result};

/// Images kept as bytes, channel-major per image (C, H, W), with integer labels.
#[derive(Clone, Debug)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub classes: Vec<String>,
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[index * n..(index + 1) * n]
    }

    /// The first `per_class` images of every class, in set order (small real subsets for tests
    /// and smoke runs).
    pub fn balanced_subset(&self, per_class: usize) -> ImageSet {
        let mut taken = vec![0usize; self.classes.len()];
        let indices: Vec<usize> = (0..self.len())
            .filter(|&i| {
                let class = self.labels[i] as usize;
                let keep = taken[class] < per_class;
                taken[class] += usize::from(keep);
                keep
            })
            .collect();
        self.select(&indices)
    }

    pub fn select(&self, indices: &[usize]) -> ImageSet {
        ImageSet {
            images: indices.iter().flat_map(|&i| self.image(i).iter().copied()).collect(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes.clone(),
            ..*self
        }
    }
}

impl ImageSet {
    fn empty_like(channels: usize, height: usize, width: usize, classes: Vec<String>) -> Self {
        Self {
            images: Vec::new(),
            labels: Vec::new(),
            channels,
            height,
            width,
            classes,
        }
    }
}

/// A generator for one random decision, from the run seed and the decision's coordinates.
pub fn derived_rng(parts: &[u64]) -> Pcg64 {
    // SplitMix64 finalizer over the parts: independent streams for distinct coordinates.
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    Pcg64::seed_from_u64(h)
}

fn data_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// An idx3 image file (magic 0x00000803): `(count, rows, cols, pixels)`.
pub fn read_idx_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    parse_idx_images(&read(path)?, path)
}

/// [`read_idx_images`] on the file's bytes (`path` names it in errors). The header's sizes are
/// multiplied in u64 with overflow checks: a header whose product does not fit is refused, it
/// cannot wrap around to the file's length.
pub fn parse_idx_images(bytes: &[u8], path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    if bytes.len() < 16 || be_u32(bytes, 0) != 0x0803 {
        return Err(data_error(path, "not an idx3 image file (magic 0x00000803)"));
    }
    let (n, rows, cols) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12));
    let want = u64::from(n).checked_mul(u64::from(rows)).and_then(|p| p.checked_mul(u64::from(cols))).and_then(|p| p.checked_add(16));
    if want != Some(bytes.len() as u64) {
        let implied = want.map_or("more than 2^64".to_string(), |w| w.to_string());
        return Err(data_error(path, format!("{} bytes, the header ({n} images of {rows}×{cols}) implies {implied}", bytes.len())));
    }
    Ok((n as usize, rows as usize, cols as usize, bytes[16..].to_vec()))
}

/// An idx1 label file (magic 0x00000801).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    parse_idx_labels(&read(path)?, path)
}

/// [`read_idx_labels`] on the file's bytes.
pub fn parse_idx_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    if bytes.len() < 8 || be_u32(bytes, 0) != 0x0801 {
        return Err(data_error(path, "not an idx1 label file (magic 0x00000801)"));
    }
    let n = u64::from(be_u32(bytes, 4));
    if bytes.len() as u64 != 8 + n {
        return Err(data_error(path, format!("{} bytes, the header implies {}", bytes.len(), 8 + n)));
    }
    Ok(bytes[8..].to_vec())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
];

/// Fashion-MNIST from the raw idx files in `root` (see [`fetch::fetch_fashion_mnist`]).
pub fn fashion_mnist(root: &Path, split: Split) -> Result<ImageSet> {
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    let images_path = root.join(format!("{prefix}-images-idx3-ubyte"));
    let labels_path = root.join(format!("{prefix}-labels-idx1-ubyte"));
    if !images_path.exists() {
        return Err(data_error(
            &images_path,
            "missing: run `slabformer data fetch fashion-mnist` (or point data.root at the idx files)",
        ));
    }
    let (n, rows, cols, images) = read_idx_images(&images_path)?;
    let labels = read_idx_labels(&labels_path)?;
    if labels.len() != n {
        return Err(data_error(&labels_path, format!("{} labels for {n} images", labels.len())));
    }
    if let Some(bad) = labels.iter().find(|&&l| l as usize >= FASHION_MNIST_CLASSES.len()) {
        return Err(data_error(&labels_path, format!("label {bad} out of range 0..10")));
    }
    Ok(ImageSet {
        images,
        labels: labels.into_iter().map(u32::from).collect(),
        channels: 1,
        height: rows,
        width: cols,
        classes: FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
    })
}

/// An ImageNet-style folder `root/<class>/<image>.{png,jpg,jpeg}`: classes in sorted order,
/// every image converted to RGB and resized (bilinear) to `size`×`size`.
pub fn image_folder(root: &Path, size: usize) -> Result<ImageSet> {
    let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|source| Error::Io { path: root.to_path_buf(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    class_dirs.sort();
    if class_dirs.is_empty() {
        return Err(data_error(root, "no class folders (expected root/<class>/<image>)"));
    }
    let classes: Vec<String> = class_dirs
        .iter()
        .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
        .collect();
    let mut set = ImageSet::empty_like(3, size, size, classes);
    for (label, dir) in class_dirs.iter().enumerate() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| Error::Io { path: dir.clone(), source })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            })
            .collect();
        files.sort();
        for file in files {
            let pixels = load_image(&file, size)?;
            set.images.extend_from_slice(&pixels);
            set.labels.push(label as u32);
        }
    }
    if set.is_empty() {
        return Err(data_error(root, "no .png/.jpg images in the class folders"));
    }
    Ok(set)
}

/// One image file as RGB bytes (3, size, size), resized with a bilinear filter.
pub fn load_image(path: &Path, size: usize) -> Result<Vec<u8>> {
    load_image_channels(path, size, 3)
}

/// Largest image side the loaders decode, and the most bytes a decoder may allocate: an
/// 8192×8192 RGB image (192 MiB) fits; a corrupt header claiming 65535×65535 is refused before
/// its pixels are allocated.
pub const MAX_IMAGE_SIDE: u32 = 16384;
pub const MAX_IMAGE_ALLOC: u64 = 256 << 20;

/// Pixels a JPEG file can hold per byte: every 8×8 block's DC coefficient takes at least one
/// bit in the first scan (baseline or progressive), so 64 × 8 pixels per byte at most.
const JPEG_MAX_PIXELS_PER_BYTE: u64 = 512;

/// A JPEG cut short decodes without an error, its missing part gray. A file too short for the
/// size its header declares is refused (a fuzzed 738-byte file declared 14352×2064 and took
/// seconds to decode); one without its end-of-image marker is decoded with a warning on stderr.
fn check_jpeg_length(bytes: &[u8], path: &Path) -> Result<()> {
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(bytes), image::ImageFormat::Jpeg)
        .into_dimensions()
        .map_err(|e| data_error(path, format!("cannot decode image: {e}")))?;
    if u64::from(w) * u64::from(h) > JPEG_MAX_PIXELS_PER_BYTE * bytes.len() as u64 {
        return Err(data_error(path, format!("truncated JPEG: {} bytes cannot hold the {w}×{h} image its header declares", bytes.len())));
    }
    // FF D9 ends the image; in the entropy-coded data an FF byte is always followed by 00 or a
    // restart marker, so the pair is the marker (or a thumbnail's, which a heuristic accepts).
    if !bytes.windows(2).any(|pair| pair == [0xFF, 0xD9]) {
        eprintln!("warning: {}: truncated JPEG (no end-of-image marker): its missing part is decoded as gray", path.display());
    }
    Ok(())
}

/// One image file as (channels, size, size) bytes: 3 for RGB, 1 for luma.
pub fn load_image_channels(path: &Path, size: usize, channels: usize) -> Result<Vec<u8>> {
    decode_image(&read(path)?, path, size, channels)
}

/// [`load_image_channels`] on the file's bytes (`path` names it in errors).
pub fn decode_image(bytes: &[u8], path: &Path, size: usize, channels: usize) -> Result<Vec<u8>> {
    if !matches!(channels, 1 | 3) {
        return Err(data_error(path, format!("models with {channels} input channels take no image files")));
    }
    let side = u32::try_from(size).ok().filter(|&s| s > 0 && s <= MAX_IMAGE_SIDE);
    let Some(side) = side else {
        return Err(data_error(path, format!("images are resized to {size}×{size}: the side must lie in 1..={MAX_IMAGE_SIDE}")));
    };
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| data_error(path, format!("cannot read image: {e}")))?;
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        check_jpeg_length(bytes, path)?;
    }
    reader.limits(limits);
    let image = reader.decode().map_err(|e| data_error(path, format!("cannot decode image: {e}")))?;
    let resized = image.resize_exact(side, side, image::imageops::FilterType::Triangle);
    let hw = size * size;
    if channels == 1 {
        return Ok(resized.to_luma8().into_raw());
    }
    let raw = resized.to_rgb8().into_raw();
    let mut chw = vec![0u8; 3 * hw];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * hw + i] = px[c];
        }
    }
    Ok(chw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_files_round_trip_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("imgs");
        let mut bytes = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3];
        bytes.extend(0u8..12);
        std::fs::write(&images, &bytes).unwrap();
        let (n, r, c, px) = read_idx_images(&images).unwrap();
        assert_eq!((n, r, c), (2, 2, 3));
        assert_eq!(px, (0u8..12).collect::<Vec<_>>());
        std::fs::write(&images, &bytes[..20]).unwrap();
        let err = read_idx_images(&images).unwrap_err().to_string();
        assert!(err.contains("imgs") && err.contains("implies"), "{err}");
        // Sizes whose product wraps around to the file's length in 64 bits (2^31 · 2^31 · 4 =
        // 2^64 ≡ 0): a 16-byte file passed as 2^31 images before the product was checked.
        let wrapping = [0, 0, 8, 3, 0x80, 0, 0, 0, 0x80, 0, 0, 0, 0, 0, 0, 4];
        let err = parse_idx_images(&wrapping, Path::new("wrap")).unwrap_err().to_string();
        assert!(err.contains("wrap") && err.contains("more than 2^64"), "{err}");
        let labels = dir.path().join("labels");
        std::fs::write(&labels, [0, 0, 8, 1, 0, 0, 0, 2, 7, 9]).unwrap();
        assert_eq!(read_idx_labels(&labels).unwrap(), vec![7, 9]);
        let err = fashion_mnist(dir.path(), Split::Train).unwrap_err().to_string();
        assert!(err.contains("data fetch fashion-mnist"), "{err}");
    }

    #[test]
    fn image_folder_reads_classes_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for (class, shade) in [("cat", 10u8), ("dog", 200u8)] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            let img = image::RgbImage::from_pixel(5, 4, image::Rgb([shade, shade / 2, 3]));
            img.save(dir.path().join(class).join("a.png")).unwrap();
        }
        std::fs::write(dir.path().join("dog").join("notes.txt"), "ignored").unwrap();
        let set = image_folder(dir.path(), 8).unwrap();
        assert_eq!(set.classes, vec!["cat", "dog"]);
        assert_eq!(set.labels, vec![0, 1]);
        assert_eq!(set.image(1)[0], 200);
        assert_eq!(set.image(1)[64], 100);
        std::fs::write(dir.path().join("cat").join("broken.png"), "not a png").unwrap();
        let err = image_folder(dir.path(), 8).unwrap_err().to_string();
        assert!(err.contains("broken.png"), "{err}");
    }

    #[test]
    fn derived_rngs_are_reproducible_and_distinct() {
        use rand::Rng;
        let a: u64 = derived_rng(&[1, 2, 3]).random();
        assert_eq!(a, derived_rng(&[1, 2, 3]).random::<u64>());
        assert_ne!(a, derived_rng(&[1, 2, 4]).random::<u64>());
        assert_ne!(a, derived_rng(&[1, 3, 2]).random::<u64>());
    }
}
