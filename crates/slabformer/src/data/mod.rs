//! Image data: in-memory image sets (idx files, image folders), the Fashion-MNIST fetch,
//! augmentation and a prefetching loader.
//!
//! Randomness is derived, never carried: every random choice comes from a generator seeded by
//! `(run seed, epoch, sample or batch index)`. A resumed run therefore sees exactly the batches it
//! would have seen, with no generator state to save.

pub mod augment;
pub mod fetch;
pub mod loader;

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
    let bytes = read(path)?;
    if bytes.len() < 16 || be_u32(&bytes, 0) != 0x0803 {
        return Err(data_error(path, "not an idx3 image file (magic 0x00000803)"));
    }
    let (n, rows, cols) = (be_u32(&bytes, 4) as usize, be_u32(&bytes, 8) as usize, be_u32(&bytes, 12) as usize);
    let want = 16 + n * rows * cols;
    if bytes.len() != want {
        return Err(data_error(path, format!("{} bytes, the header implies {want}", bytes.len())));
    }
    Ok((n, rows, cols, bytes[16..].to_vec()))
}

/// An idx1 label file (magic 0x00000801).
pub fn read_idx_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read(path)?;
    if bytes.len() < 8 || be_u32(&bytes, 0) != 0x0801 {
        return Err(data_error(path, "not an idx1 label file (magic 0x00000801)"));
    }
    let n = be_u32(&bytes, 4) as usize;
    if bytes.len() != 8 + n {
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

/// One image file as (channels, size, size) bytes: 3 for RGB, 1 for luma.
pub fn load_image_channels(path: &Path, size: usize, channels: usize) -> Result<Vec<u8>> {
    let image = image::open(path).map_err(|e| data_error(path, format!("cannot decode image: {e}")))?;
    let resized = image.resize_exact(size as u32, size as u32, image::imageops::FilterType::Triangle);
    let hw = size * size;
    match channels {
        1 => Ok(resized.to_luma8().into_raw()),
        3 => {
            let raw = resized.to_rgb8().into_raw();
            let mut chw = vec![0u8; 3 * hw];
            for (i, px) in raw.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    chw[c * hw + i] = px[c];
                }
            }
            Ok(chw)
        }
        other => Err(data_error(path, format!("models with {other} input channels take no image files"))),
    }
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
