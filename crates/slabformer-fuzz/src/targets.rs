//! The fuzz targets: each a reader a user's file goes through, its seed files, and how its inputs
//! are mutated.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

use slabformer::data::{decode_image, parse_idx_images, parse_idx_labels};
use slabformer::deploy::model_file::{Preprocess, deploy_bytes, model_bytes, parse_model_file};
use slabformer::models::{ModelFamily, VisionTransformer, VitConfig};
use slabformer::train::config::TrainConfig;

use crate::mutate::{Shape, mutate};
use crate::pickle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Model files (`predict`, `eval`, `fuse`, `export` read them): the safetensors container,
    /// its JSON header, the slabformer header fields, then the model built and loaded from it.
    ModelFile,
    /// `slabformer import`: a `.pth` (zip or legacy container, pickle, storages).
    Pth,
    /// A training config: TOML, then every check of `resolve`, then the TOML round trip a
    /// checkpoint relies on.
    Config,
    /// idx3 image and idx1 label files (MNIST / Fashion-MNIST).
    Idx,
    /// PNG and JPEG files of image folders and `predict`: decode and resize.
    Image,
}

impl Target {
    pub const ALL: [Target; 5] = [Target::ModelFile, Target::Pth, Target::Config, Target::Idx, Target::Image];

    pub fn name(self) -> &'static str {
        match self {
            Target::ModelFile => "model-file",
            Target::Pth => "pth",
            Target::Config => "config",
            Target::Idx => "idx",
            Target::Image => "image",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn shape(self) -> Shape {
        match self {
            // The u64 JSON length, and the numbers (offsets, shapes) in the JSON.
            Target::ModelFile => Shape { header_fields: &[(0, 8), (0, 4), (4, 4)], big_endian: false, text: true },
            // Local header sizes and name length of the first zip entry.
            Target::Pth => Shape { header_fields: &[(18, 4), (22, 4), (26, 2), (28, 2)], big_endian: false, text: false },
            Target::Config => Shape { text: true, ..Shape::default() },
            Target::Idx => Shape { header_fields: &[(0, 4), (4, 4), (8, 4), (12, 4)], big_endian: true, text: false },
            // PNG: the IHDR chunk's length, width, height, depth and colour type.
            Target::Image => Shape { header_fields: &[(8, 4), (16, 4), (20, 4), (24, 1), (25, 1)], big_endian: true, text: false },
        }
    }

    /// The valid files mutation starts from.
    pub fn seeds(self) -> Vec<Vec<u8>> {
        match self {
            Target::ModelFile => model_file_seeds(),
            Target::Pth => {
                let tensors = pickle::seed_tensors();
                vec![
                    pickle::zip(&pickle::zip_entries(&tensors, None)),
                    pickle::zip(&pickle::zip_entries(&tensors, Some("model"))),
                    pickle::legacy_pth(&tensors),
                ]
            }
            Target::Config => TrainConfig::PRESETS
                .iter()
                .map(|name| TrainConfig::preset(name).expect("known preset").to_toml().into_bytes())
                .collect(),
            Target::Idx => {
                let mut images = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0, 0, 5];
                images.extend((0..60u8).map(|i| i.wrapping_mul(37)));
                let mut big = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
                big.extend((0..2 * 28 * 28).map(|i| (i % 251) as u8));
                vec![images, big, vec![0, 0, 8, 1, 0, 0, 0, 3, 7, 0, 9]]
            }
            Target::Image => image_seeds(),
        }
    }

    /// Input `seed`: a mutated copy of one of `corpus`.
    pub fn generate(self, seed: u64, corpus: &[Vec<u8>]) -> Vec<u8> {
        let mut rng = Pcg64::seed_from_u64(seed);
        // Zip entries carry CRC-32s: mutating the pickle inside the archive and packing it
        // again reaches the pickle reader, which a CRC mismatch would stop.
        if self == Target::Pth && rng.random_bool(0.4) {
            let nested = rng.random_bool(0.5).then_some("model");
            let mut entries = pickle::zip_entries(&pickle::seed_tensors(), nested);
            let pick = if rng.random_bool(0.7) { 0 } else { rng.random_range(0..entries.len()) };
            let shape = Shape { text: false, ..Shape::default() };
            let pickles: Vec<Vec<u8>> = entries.iter().map(|e| e.1.clone()).collect();
            mutate(&mut entries[pick].1, &pickles, shape, &mut rng);
            return pickle::zip(&entries);
        }
        let mut data = corpus[rng.random_range(0..corpus.len())].clone();
        mutate(&mut data, corpus, self.shape(), &mut rng);
        data
    }

    /// Runs the reader on `input`: `Err` is its (expected) refusal; a panic is a defect.
    pub fn exec(self, input: &[u8]) -> std::result::Result<(), String> {
        let text = |e: slabformer::Error| e.to_string();
        match self {
            Target::ModelFile => {
                let file = parse_model_file(input, Path::new("fuzz.safetensors")).map_err(text)?;
                let device = Device::flex();
                slabformer::with_family!(&file.config, |Family, _c| file.load::<Family>(&device).map(|_| ()).map_err(text))
            }
            Target::Pth => {
                let path = scratch_file("pth");
                std::fs::write(&path, input).map_err(|e| e.to_string())?;
                let result = slabformer::deploy::import::read_pytorch(&path).map(|_| ()).map_err(|e| text(e).replace(&path.display().to_string(), "fuzz.pth"));
                let _ = std::fs::remove_file(&path);
                result
            }
            Target::Config => {
                let source = String::from_utf8_lossy(input);
                let config = TrainConfig::from_toml(&source, "fuzz.toml").map_err(text)?;
                config.resolve(60_000).map_err(text)?;
                // A checkpoint stores `to_toml` and a resume compares what it reads back.
                let again = TrainConfig::from_toml(&config.to_toml(), "round trip").unwrap_or_else(|e| panic!("the written config does not read back: {e}"));
                assert!(again == config, "the config read back differs from the one written");
                Ok(())
            }
            Target::Idx => {
                let path = Path::new("fuzz-idx");
                let images = parse_idx_images(input, path).map(|_| ());
                let labels = parse_idx_labels(input, path).map(|_| ());
                images.or(labels).map_err(text)
            }
            Target::Image => {
                let channels = if input.len() % 2 == 0 { 3 } else { 1 };
                decode_image(input, Path::new("fuzz-image"), 24, channels).map(|_| ()).map_err(text)
            }
        }
    }
}

/// A file of this process and thread under /dev/shm (memory) where there is one.
fn scratch_file(ext: &str) -> PathBuf {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() { dir.to_path_buf() } else { std::env::temp_dir() };
    let thread = format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_alphanumeric(), "");
    dir.join(format!("slabformer-fuzz-{}-{thread}.{ext}", std::process::id()))
}

fn tiny_vit() -> VitConfig {
    VitConfig { img_size: 16, patch_size: 4, embed_dim: 12, depth: 1, num_heads: 2, num_classes: 3, ..VitConfig::slab_deit_tiny() }
}

fn model_file_seeds() -> Vec<Vec<u8>> {
    let device = Device::flex();
    // Seeded weights: the seeds, hence every input, are the same in every process (--replay).
    device.seed(0x5EED);
    let config = tiny_vit();
    let model = VisionTransformer::init(&config, &device).expect("tiny config");
    let pre = Preprocess { classes: vec!["a".into(), "b".into(), "c".into()], ..Preprocess::imagenet(3) };
    let mut seeds = vec![
        model_bytes(&model, &pre).expect("writes"),
        deploy_bytes::<VisionTransformer>(&model.fuse().expect("fuses"), &config, &pre).expect("writes"),
    ];
    // The other families at the sizes of their Fashion-MNIST presets, where those are small.
    for preset in ["fashion-slab-swin", "fashion-slab-pvt"] {
        let Ok(any) = TrainConfig::preset(preset).and_then(|c| c.model.config()) else { continue };
        if any.param_count() > 300_000 {
            continue;
        }
        let bytes = slabformer::with_family!(&any, |Family, c| Family::init(c, &device).and_then(|m| model_bytes(&m, &Preprocess::imagenet(1))));
        seeds.extend(bytes.ok());
    }
    seeds.iter().map(|s| canonical_header(s)).collect()
}

/// `file` with its JSON header's keys sorted: safetensors writes the metadata from a HashMap,
/// whose order differs between processes, and `--replay` needs the same seeds in every process.
fn canonical_header(file: &[u8]) -> Vec<u8> {
    let len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&file[8..8 + len]).expect("a JSON header");
    let mut json = serde_json::to_vec(&header).expect("serializes");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend_from_slice(&file[8 + len..]);
    out
}

fn image_seeds() -> Vec<Vec<u8>> {
    use image::{DynamicImage, ImageFormat};
    let encode = |image: DynamicImage, format: ImageFormat| {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, format).expect("encodes");
        out.into_inner()
    };
    let rgb = |w, h| DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 17) as u8, (y * 29) as u8, ((x + y) * 7) as u8])));
    let gray = |w, h| DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 5 + y * 11) % 256) as u8])));
    vec![
        encode(gray(8, 6), ImageFormat::Png),
        encode(rgb(5, 7), ImageFormat::Png),
        encode(DynamicImage::ImageRgba8(image::RgbaImage::from_fn(16, 16, |x, y| image::Rgba([x as u8 * 16, y as u8 * 16, 9, 200]))), ImageFormat::Png),
        encode(DynamicImage::ImageLuma16(image::ImageBuffer::from_fn(4, 4, |x, y| image::Luma([(x * 4000 + y * 300) as u16]))), ImageFormat::Png),
        encode(rgb(16, 16), ImageFormat::Jpeg),
        encode(gray(8, 8), ImageFormat::Jpeg),
        encode(rgb(33, 17), ImageFormat::Jpeg),
    ]
}
