//! The exported ONNX file, run by ONNX Runtime (Python `onnxruntime`, which `.ci/run` installs
//! in `.ci/venv`; `$SLABFORMER_PYTHON` names another interpreter), gives slabformer's logits.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Tensor};
use slabformer::deploy::onnx::{export, export_classifier, export_model};
use slabformer::models::swin::{FinalNormFold, SwinFuse, SwinLayout};
use slabformer::models::{CswinConfig, Pool, PvtConfig, SwinConfig, VitConfig};
use slabformer::models::vit::{DeployVit, VisionTransformer};
use slabformer::nn::attention::AttentionKind;

/// `$SLABFORMER_PYTHON`, else `.ci/venv` (made with the pinned onnxruntime from PyPI on first use,
/// exactly as `.ci/run` makes it).
fn python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("SLABFORMER_PYTHON") {
                return PathBuf::from(p);
            }
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
            let python = root.join(".ci/venv/bin/python");
            let ready = |p: &Path| Command::new(p).args(["-c", "import onnxruntime, numpy"]).status().is_ok_and(|s| s.success());
            if !ready(&python) {
                let status = Command::new("bash").arg(root.join(".ci/python-env")).status();
                assert!(status.is_ok_and(|s| s.success()), "could not set up .ci/venv with onnxruntime (see .ci/python-env)");
            }
            python
        })
        .clone()
}

/// A fused model of `config` with random BatchNorm statistics and α, so the folds matter, and
/// weights at a scale that gives O(1) logits (timm's 0.02-std init gives tiny ones, against which
/// a 1e-4 tolerance would prove little).
fn deploy(config: VitConfig) -> DeployVit {
    randomized(config).fuse().unwrap()
}

const WEIGHTS_SEED: u64 = 17;
const IMAGES_SEED: u64 = 18;

/// The model before fusing, randomized as for [`deploy`] (LayerNorm affines too).
fn randomized(config: VitConfig) -> VisionTransformer {
    slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 6.0, WEIGHTS_SEED)
}

fn run_onnx_runtime(model: &Path, input: &[f32], shape: [usize; 4]) -> Vec<f32> {
    let dir = model.parent().unwrap();
    let (src, dst) = (dir.join("input.bin"), dir.join("output.bin"));
    std::fs::write(&src, input.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/onnx_run.py");
    let output = Command::new(python())
        .arg(&script)
        .args([model, &src, &dst])
        .args(shape.map(|d| d.to_string()))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e} (run .ci/run, or set SLABFORMER_PYTHON to a python with onnxruntime)", python().display()));
    assert!(
        output.status.success(),
        "ONNX Runtime failed (needs `pip install onnxruntime numpy`; .ci/run sets up .ci/venv):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(&dst).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn check(name: &str, config: VitConfig) {
    let model = deploy(config.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.onnx"));
    export(&model, &path, false).unwrap();
    compare(name, &path, images(&config), |images| model.forward(images));
}

/// The shape of the 3 test images for `config`.
fn images(config: &VitConfig) -> [usize; 4] {
    [3, config.in_chans, config.img_size, config.img_size]
}

/// slabformer's logits against ONNX Runtime's on the exported file, for seeded random images of
/// `shape`.
fn compare(name: &str, path: &Path, shape: [usize; 4], forward: impl Fn(Tensor<4>) -> Tensor<2>) {
    let images = slabformer::testing::standard_normal(shape, IMAGES_SEED, &Device::flex());
    let input: Vec<f32> = images.clone().into_data().try_to_vec().unwrap();
    let ours: Vec<f32> = forward(images).into_data().try_to_vec().unwrap();
    let theirs = run_onnx_runtime(path, &input, shape);
    assert_eq!(ours.len(), theirs.len(), "{name}: logits count");
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.5, "{name}: logits too small to test against ({scale})");
    let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    // The golden README's bound for two fp32 implementations: rounding grows with the logits, so a
    // fixed 1e-4 failed at |logit| 8.5. Over 300 seeds per model on an AMX Xeon the worst Δ was
    // 9.6e-6·max|logit| (9 % of this bound), and a 2e-3 shift of the logits still fails it.
    let bound = 1e-4 + 1e-4 * scale;
    assert!(worst <= bound, "{name}: max |slabformer − onnxruntime| = {worst:e} > {bound:e} (max |logit| {scale})");
}

fn small(base: VitConfig) -> VitConfig {
    VitConfig { img_size: 32, patch_size: 4, embed_dim: 48, depth: 2, num_heads: 3, num_classes: 10, ..base }
}

#[test]
fn layer_norm_deit_exports_with_its_norms_and_matches_slabformer() {
    let config = small(VitConfig::deit_tiny());
    let model = randomized(config.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deit.onnx");
    export_model(&model, &path, false).unwrap();
    compare("deit", &path, images(&config), |images| model.forward(images));
}

#[test]
fn slab_deit_onnx_matches_slabformer() {
    check("slab_deit", small(VitConfig::slab_deit_tiny()));
}

#[test]
fn prepbn_deit_with_class_token_onnx_matches_slabformer() {
    check("prepbn_deit", small(VitConfig::prepbn_deit_tiny()));
}

#[test]
fn relu_attention_with_qk_norm_and_gate_onnx_matches_slabformer() {
    let config = VitConfig {
        attention: AttentionKind::ReluL { qk_norm: true, gated: true },
        pool: Pool::ClassToken,
        ..small(VitConfig::prepbn_deit_tiny())
    };
    check("relu_vit", config);
}

#[test]
fn flatten_focused_attention_onnx_matches_slabformer() {
    // With its LayerNorms (the FLatten-DeiT preset) and fused (PRepBN norms).
    let config = small(VitConfig::flatten_deit_tiny());
    let model = randomized(config.clone());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flatten.onnx");
    export_model(&model, &path, false).unwrap();
    compare("flatten", &path, images(&config), |images| model.forward(images));
    check("flatten_prepbn", VitConfig { attention: AttentionKind::focused(), pool: Pool::Mean, ..small(VitConfig::prepbn_deit_tiny()) });
}

#[test]
fn existing_files_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.onnx");
    let slab = deploy(small(VitConfig::slab_deit_tiny()));
    export(&slab, &path, false).unwrap();
    let before = std::fs::read(&path).unwrap();
    let err = export(&slab, &path, false).unwrap_err().to_string();
    assert!(err.contains("not overwriting"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "the existing file is untouched");
}

/// A small PVT on a non-square input: fused SLAB-PVT (with and without the key/value reduction),
/// fused PRepBN-PVT (softmax SRA) and the LayerNorm PVT and FLatten-PVT with their norms.
#[test]
fn pvt_onnx_matches_slabformer() {
    let small = |base: PvtConfig| PvtConfig {
        img_size: [48, 80],
        embed_dims: [16, 24, 32, 48],
        num_heads: [1, 2, 2, 3],
        mlp_ratios: [2.0; 4],
        depths: [1, 2, 1, 1],
        num_classes: 10,
        ..base
    };
    let cases = [
        ("slab_pvt", small(PvtConfig::slab_pvt_tiny())),
        ("slab_pvt_reduced", PvtConfig { sr_ratios: [4, 2, 1, 1], ..small(PvtConfig::slab_pvt_tiny()) }),
        ("prepbn_pvt", small(PvtConfig::prepbn_pvt_tiny())),
        ("pvt", small(PvtConfig::pvt_tiny())),
        ("flatten_pvt", PvtConfig { sr_ratios: [2, 1, 1, 1], ..small(PvtConfig::flatten_pvt_tiny()) }),
    ];
    for (name, config) in cases {
        let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 6.0, WEIGHTS_SEED);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        export_classifier(&model, &path, false).unwrap();
        let [h, w] = config.img_size;
        compare(name, &path, [3, config.in_chans, h, w], |images| model.forward(images));
    }
}

#[test]
fn cswin_family_onnx_matches_slabformer() {
    // SLAB-CSWin exported fused (SLA + LePE in global windows, softmax stripes, stem and merge
    // norms folded into their convs), CSWin-T and FLatten-CSWin with their LayerNorms.
    let small = |base: CswinConfig| CswinConfig {
        img_size: 64,
        num_classes: 10,
        embed_dim: 8,
        depth: [1, 1, 2, 1],
        num_heads: [2, 2, 4, 8],
        split_size: [1, 2, 2, 2],
        mlp_ratio: 2.0,
        ..base
    };
    let cases = [
        ("slab_cswin", small(CswinConfig::slab_cswin_tiny())),
        ("cswin", small(CswinConfig::cswin_tiny())),
        ("flatten_cswin", small(CswinConfig::flatten_cswin_tiny())),
    ];
    for (name, config) in cases {
        let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 3.0, WEIGHTS_SEED);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        export_classifier(&model, &path, false).unwrap();
        compare(name, &path, [3, config.in_chans, config.img_size, config.img_size], |images| model.forward(images));
    }
}

/// Small Swin models: a 10×14 token map (20×28 images, patch 2) with windows of 4, so the first
/// stage pads to 12×16 and shifts by 2, the second (5×7) pads to 8×8 after an odd merge, the
/// third (3×4) is one unshifted 3×3-window row padded to 3×6.
fn small_swin(base: SwinConfig, layout: SwinLayout) -> SwinConfig {
    SwinConfig {
        img_size: [20, 28],
        patch_size: 2,
        embed_dim: 8,
        depths: vec![2, 2, 2],
        num_heads: vec![1, 2, 4],
        attention: vec![base.attention[0], base.attention[1], base.attention[3]],
        window_size: 4,
        linear_window_size: 4,
        num_classes: 10,
        layout,
        ..base
    }
}

fn check_swin(name: &str, export_form: impl Fn(&slabformer::models::SwinTransformer, &Path), config: SwinConfig, forward_fused: Option<SwinFuse>) {
    let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 3.0, WEIGHTS_SEED);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.onnx"));
    export_form(&model, &path);
    let [h, w] = config.img_size;
    let shape = [2, config.in_chans, h, w];
    match forward_fused {
        Some(how) => {
            let deploy = model.fuse_with(how).unwrap();
            compare(name, &path, shape, |images| deploy.forward(images));
        }
        None => compare(name, &path, shape, |images| model.forward(images)),
    }
}

/// The Swin family on a padded map with shifted windows: fused SLAB-Swin (SLA 'L' stages over
/// several padded, shifted windows that pad with the −b/a token, softmax window attention with
/// the relative position bias and the −100 mask) in both layouts, with the final norm folded
/// into the head or into the last stage, SLA 'L' stages of one window each, fused PRepBN-Swin,
/// and the LayerNorm Swin-T and FLatten-Swin with their norms.
#[test]
fn swin_family_onnx_matches_slabformer() {
    let trained = |m: &slabformer::models::SwinTransformer, p: &Path| export_classifier(m, p, false).unwrap();
    let last_stage = SwinFuse { final_norm: FinalNormFold::LastStage, official_patch_embed: false };
    let deployed = |m: &slabformer::models::SwinTransformer, p: &Path| export_classifier(&m.fuse_with(last_stage).unwrap(), p, false).unwrap();
    let cases = [
        ("slab_swin", small_swin(SwinConfig::slab_swin_tiny(), SwinLayout::Official)),
        ("slab_swin_timm", small_swin(SwinConfig::slab_swin_tiny(), SwinLayout::Timm)),
        ("slab_swin_one_window", SwinConfig { linear_window_size: 16, ..small_swin(SwinConfig::slab_swin_tiny(), SwinLayout::Official) }),
        ("prepbn_swin_timm", small_swin(SwinConfig::prepbn_swin_small(), SwinLayout::Timm)),
        ("swin", small_swin(SwinConfig::swin_tiny(), SwinLayout::Official)),
        ("swin_timm", small_swin(SwinConfig::swin_tiny(), SwinLayout::Timm)),
        ("flatten_swin", small_swin(SwinConfig::flatten_swin_tiny(), SwinLayout::Official)),
    ];
    for (name, config) in cases {
        let fused = config.norm.folds().then_some(SwinFuse::EXACT);
        check_swin(name, trained, config, fused);
    }
    check_swin("slab_swin_last_stage", deployed, small_swin(SwinConfig::slab_swin_tiny(), SwinLayout::Official), Some(last_stage));
}

/// The released Swin-T and SLAB-Swin-T at 224² (SLA stages of one 56² window, 7-token softmax
/// windows shifted by 3).
#[test]
fn swin_tiny_and_slab_swin_tiny_at_224_onnx_match_slabformer() {
    for (name, config) in [("swin_tiny", SwinConfig::swin_tiny()), ("slab_swin_tiny", SwinConfig::slab_swin_tiny())] {
        let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 1.0, WEIGHTS_SEED);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("{name}.onnx"));
        export_classifier(&model, &path, false).unwrap();
        compare(name, &path, [1, 3, 224, 224], |images| model.forward(images));
    }
}

#[test]
fn mobile_former_onnx_matches_slabformer() {
    // Every block kind (conv-only, DnaBlock3, DnaBlock with n = 2), odd 7×7 and 4×4 maps, a width
    // rounded by make_divisible, with and without grouped 1×1 convs and channel shuffles; the
    // trained form (BatchNorms emitted folded) and the fused one.
    use slabformer::models::mobile_former::{BlockArgs, DnaKind, MobileFormerConfig};
    let row = |block, e1, c, n, s, e2| BlockArgs { block, e1, c, n, s, e2 };
    let (dna, dna3) = (DnaKind::DnaBlock, DnaKind::DnaBlock3);
    for group_num in [1, 2] {
        let config = MobileFormerConfig {
            img_size: 28,
            num_classes: 10,
            block_args: vec![row(dna3, 2, 8, 1, 1, 0), row(dna3, 6, 12, 1, 2, 4), row(dna, 3, 12, 2, 1, 3), row(dna3, 6, 22, 1, 2, 4), row(dna, 4, 26, 1, 1, 4)],
            stem_chs: 8,
            token_num: 3,
            token_dim: 16,
            num_features: 24,
            group_num,
            ..MobileFormerConfig::mobile_former_52m()
        };
        let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 3.0, WEIGHTS_SEED);
        let dir = tempfile::tempdir().unwrap();
        let shape = [3, config.in_chans, config.img_size, config.img_size];
        let path = dir.path().join("mobile_former.onnx");
        export_classifier(&model, &path, false).unwrap();
        compare(&format!("mobile_former groups {group_num}"), &path, shape, |images| model.forward(images));
        let deploy = model.fuse().unwrap();
        let path = dir.path().join("mobile_former_fused.onnx");
        export_classifier(&deploy, &path, false).unwrap();
        compare(&format!("fused mobile_former groups {group_num}"), &path, shape, |images| deploy.forward(images));
    }
}

#[test]
fn mobilevit_family_onnx_matches_slabformer() {
    // MobileViT v1 (softmax transformer over unfolded 2×2 patches, fusion conv) and v2 (separable
    // attention, GroupNorm(1)), exported as trained (each BatchNorm emitted folded) and fused.
    use slabformer::models::MobileVitConfig;
    let small = |base: MobileVitConfig| MobileVitConfig { img_size: 64, num_classes: 10, ..base };
    let cases = [("mobilevit_xxs", small(MobileVitConfig::mobilevit_xxs())), ("mobilevitv2", small(MobileVitConfig::mobilevitv2(0.25)))];
    for (name, config) in cases {
        let model = slabformer::testing::randomized(config.init(&Device::flex()).unwrap(), 2.0, WEIGHTS_SEED);
        let dir = tempfile::tempdir().unwrap();
        let shape = [3, config.in_chans, config.img_size, config.img_size];
        let path = dir.path().join(format!("{name}.onnx"));
        export_classifier(&model, &path, false).unwrap();
        compare(name, &path, shape, |images| model.forward(images));
        let deploy = model.fuse().unwrap();
        let path = dir.path().join(format!("{name}_fused.onnx"));
        export_classifier(&deploy, &path, false).unwrap();
        compare(&format!("{name} fused"), &path, shape, |images| deploy.forward(images));
    }
    // Maps that are not whole patches (80² → 5×5 in stage 4) are resized, which the walk does not
    // emit: a clear error, no file.
    let model = MobileVitConfig { img_size: 80, ..small(MobileVitConfig::mobilevit_xxs()) }.init(&Device::flex()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = export_classifier(&model, &dir.path().join("odd.onnx"), false).unwrap_err().to_string();
    assert!(err.contains("5×5") && err.contains("ONNX export"), "{err}");
}

/// EfficientFormer v1 (224², its Meta3D attention's fixed grid) and EfficientFormer-V2 (64²,
/// stride-2 attention with its bilinear upsample, the downsampling attention): the trained form
/// (exported through its fold) and the deploy form, both against the unfused eval forward.
#[test]
fn efficientformer_families_onnx_match_slabformer() {
    use slabformer::models::{EfficientFormerConfig, EfficientFormerV2Config};
    let device = Device::flex();
    let v1 = EfficientFormerConfig { depths: vec![1, 1, 1, 3], embed_dims: vec![8, 12, 16, 24], num_vit: 2, num_classes: 10, ..EfficientFormerConfig::l1() };
    let model = slabformer::testing::randomized(v1.init(&device).unwrap(), 6.0, WEIGHTS_SEED);
    let deploy = model.fuse().unwrap();
    let v2 = EfficientFormerV2Config {
        img_size: 64,
        depths: vec![1, 1, 2, 2],
        embed_dims: vec![8, 12, 16, 24],
        mlp_ratios: vec![vec![4.0], vec![4.0], vec![4.0, 3.0], vec![4.0, 3.0]],
        num_vit: 1,
        num_classes: 10,
        ..EfficientFormerV2Config::s0()
    };
    let model2 = slabformer::testing::randomized(v2.init(&device).unwrap(), 6.0, WEIGHTS_SEED);
    let deploy2 = model2.fuse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let paths = ["efficientformer", "efficientformer_deploy", "efficientformer_v2", "efficientformer_v2_deploy"].map(|n| dir.path().join(format!("{n}.onnx")));
    export_classifier(&model, &paths[0], false).unwrap();
    export_classifier(&deploy, &paths[1], false).unwrap();
    export_classifier(&model2, &paths[2], false).unwrap();
    export_classifier(&deploy2, &paths[3], false).unwrap();
    for path in &paths[..2] {
        compare(&path.display().to_string(), path, [3, 3, 224, 224], |images| model.forward(images));
    }
    for path in &paths[2..] {
        compare(&path.display().to_string(), path, [3, 3, 64, 64], |images| model2.forward(images));
    }
}
