//! Image preparation against PIL and torchvision (tests/fixtures/preprocess.safetensors and
//! tests/fixtures/images/, written by tools/fixtures/resize.py): decoding to RGB as PIL's
//! `convert("RGB")` does, the anti-aliased bilinear resize, and the whole ToTensor, Normalize,
//! Resize pipeline.

use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use vpr_engine::io::image::{self, ImageF32, Rgb8};

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The fixture file's tensors: (shape, bytes) by name.
fn load_fixture() -> Vec<(String, Vec<usize>, Dtype, Vec<u8>)> {
    let bytes = std::fs::read(fixtures().join("preprocess.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, t.shape().to_vec(), t.dtype(), t.data().to_vec()))
        .collect()
}

fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Largest |got - want|, after checking the sizes agree.
fn max_abs_diff(got: &ImageF32, want_shape: &[usize], want: &[f32], what: &str) -> f32 {
    assert_eq!(
        [got.height, got.width, 3],
        want_shape,
        "{what}: output size"
    );
    got.data
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

#[test]
fn resize_matches_torchvision_antialiased_bilinear() {
    let tensors = load_fixture();
    let mut cases = 0;
    for (name, shape, _, bytes) in &tensors {
        let Some(case) = name
            .strip_prefix("resize.")
            .and_then(|n| n.strip_suffix(".input"))
        else {
            continue;
        };
        let (_, out_shape, _, out_bytes) = tensors
            .iter()
            .find(|(n, ..)| *n == format!("resize.{case}.output"))
            .unwrap();
        let input = ImageF32 {
            height: shape[0],
            width: shape[1],
            data: floats(bytes),
        };
        let got = image::resize(&input, out_shape[0], out_shape[1]);
        let err = max_abs_diff(&got, out_shape, &floats(out_bytes), case);
        eprintln!("resize {case}: {shape:?} -> {out_shape:?}, max |error| {err:.2e}");
        // inputs are N(0, 1), so an absolute bound is a relative one
        assert!(err <= 1e-5, "{case}: max |error| {err:e}");
        cases += 1;
    }
    assert_eq!(cases, 9);
}

#[test]
fn resize_to_the_same_size_changes_nothing() {
    let input = ImageF32 {
        height: 3,
        width: 2,
        data: (0..18).map(|v| v as f32 * 0.37 - 2.0).collect(),
    };
    assert_eq!(image::resize(&input, 3, 2), input);
}

#[test]
fn pngs_decode_as_pil_converts_them_to_rgb() {
    let tensors = load_fixture();
    let mut files = 0;
    for (name, shape, dtype, want) in &tensors {
        let Some(file) = name.strip_prefix("decode.").filter(|f| f.ends_with(".png")) else {
            continue;
        };
        assert_eq!(*dtype, Dtype::U8);
        let got = image::decode(&fixtures().join("images").join(file)).unwrap();
        assert_eq!([got.height, got.width, 3], shape[..], "{file}");
        assert!(got.pixels == *want, "{file}: pixels differ from PIL's");
        files += 1;
    }
    assert_eq!(files, 9);
}

/// How far our JPEG decodes may be from PIL's, in 8-bit levels. PIL decodes with libjpeg-turbo,
/// the image crate with zune-jpeg, which differs in three stages (tools/jpeg/pil_model.py
/// rebuilds both decodes and measures each stage): its IDCT is stb_image's 12-bit one, not
/// libjpeg's islow (1-2% of the values off by 1-3, grey included); its triangle chroma
/// upsampling rounds after the vertical pass and biases both sides alike (a quarter of the
/// values of 4:2:0 images off by 1-2, which R and B amplify by up to 1.8); its YCbCr->RGB
/// coefficients have 14 bits where libjpeg's have 16 (under 0.1% of the values, by 1). Measured
/// on these fixtures (Pillow 13, 4:2:0): colour off by at most 4 levels, a quarter of the values
/// by one or more, the mean below 0.5; grey off by at most 1. The fixtures' sizes (64x48, 57x41)
/// are multiples of 16 or odd, which keeps two larger effects out: zune upsamples the
/// block-padded chroma, so the last column of an even width that is not a multiple of 16 is off
/// by up to about 16 levels, and images under 5 pixels wide, which libjpeg upsamples by
/// repetition, by up to about 40.
const JPEG_MAX_LEVELS: i32 = 4;

#[test]
fn jpegs_decode_close_to_pil() {
    let tensors = load_fixture();
    for file in ["photo.jpg", "photo_odd.jpg", "grey.jpg"] {
        let (_, shape, _, want) = tensors
            .iter()
            .find(|(n, ..)| *n == format!("decode.{file}"))
            .unwrap();
        let got = image::decode(&fixtures().join("images").join(file)).unwrap();
        assert_eq!([got.height, got.width, 3], shape[..], "{file}");
        let diffs: Vec<i32> = got
            .pixels
            .iter()
            .zip(want)
            .map(|(&g, &w)| (g as i32 - w as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let mean = diffs.iter().sum::<i32>() as f64 / diffs.len() as f64;
        eprintln!("{file}: max |difference| from PIL {max} levels, mean {mean:.3}");
        let max_allowed = if file == "grey.jpg" {
            1
        } else {
            JPEG_MAX_LEVELS
        };
        assert!(
            max <= max_allowed && mean < 0.5,
            "{file}: differs from PIL by up to {max} levels, {mean} on average"
        );
    }
}

#[test]
fn the_whole_preparation_matches_torchvision() {
    let tensors = load_fixture();
    let mut cases = 0;
    for (name, shape, _, want) in &tensors {
        let Some(rest) = name.strip_prefix("pipeline.") else {
            continue;
        };
        let (file, size) = rest.rsplit_once('.').unwrap();
        let decoded: Rgb8 = image::decode(&fixtures().join("images").join(file)).unwrap();
        let normalised = image::to_normalized_tensor(&decoded, IMAGENET_MEAN, IMAGENET_STD);
        let got = image::resize(&normalised, shape[0], shape[1]);
        let err = max_abs_diff(&got, shape, &floats(want), name);
        eprintln!("{file} -> {size}: max |error| {err:.2e}");
        // the JPEG decoders' differences pass through Normalize (1/255/std per level) and the
        // resize (a weighted mean); the PNGs are decoded exactly
        let tol = if file.ends_with(".jpg") {
            JPEG_MAX_LEVELS as f32 / 255.0 / 0.224 + 1e-5
        } else {
            1e-5
        };
        assert!(err <= tol, "{name}: max |error| {err:e}");
        cases += 1;
    }
    assert_eq!(cases, 4);
}

#[test]
fn bad_files_are_errors_naming_them() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-bad-files");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let png = std::fs::read(fixtures().join("images/rgb.png")).unwrap();
    let cases = [
        ("truncated.png", png[..png.len() / 2].to_vec()),
        ("text.jpg", b"not an image".to_vec()),
        ("empty.png", Vec::new()),
    ];
    for (name, bytes) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = image::decode(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains("cannot decode"),
            "{name}: {err}"
        );
    }
    let err = image::decode(&dir.join("missing.png"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.png"), "{err}");
}
