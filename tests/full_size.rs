//! Full-size CosPlace ResNet-18/512, EigenPlaces ResNet-50/2048 and CosPlace VGG16/512 (full
//! resolution), and SelaVPR (DINOv2 ViT-L/14 with adapters: global descriptors and local features),
//! DINOv2 ViT-S/14 and ViT-B/14 with registers (224x224), OpenIBL's VGG16 + NetVLAD + PCA-whitening
//! (4096-d) and the geo-localization benchmark's ResNet-50 conv4 + NetVLAD (65536-d) at 480x640,
//! built by `models::load` from files in the official key layout, against what PyTorch computed (eval mode) on the same PNG images. The
//! weights are the synthetic ones of tools/fixtures/full_size_models.py, regenerated bit for bit
//! here (tests/common/synthetic.rs), so no large file is committed.

mod common;

use common::synthetic;
use std::path::PathBuf;
use vpr_engine::io::image;
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::{models, Device, Tensor};

const IMAGES: [&str; 3] = ["a.png", "b.png", "c.png"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full_size")
}

/// The ViTs' fixture images are resized to this square, as `extract` resizes for a fixed-size model.
const VIT_SIDE: usize = 224;

/// SelaVPR's local features compared: (row, column) of the 61x61 map, as the generator samples them.
fn local_samples() -> impl Iterator<Item = (usize, usize)> {
    (0..64).map(|i| ((7 * i) % 61, (11 * i + 3) % 61))
}

fn expected(key: &str) -> Vec<f32> {
    let file = WeightsFile::open(&fixtures().join("expected.safetensors")).unwrap();
    let values = file.read_f64(key).unwrap();
    values.into_iter().map(|v| v as f32).collect()
}

/// `file` as the model's normalised batch of one on `device`, resized to `side` x `side` if given.
fn input(file: &str, spec: &models::InputSpec, side: Option<usize>, device: &Device) -> Tensor {
    input_sized(file, spec, side.map(|s| (s, s)), device)
}

/// `file` as the model's normalised batch of one on `device`, resized to `(height, width)` if given.
fn input_sized(
    file: &str,
    spec: &models::InputSpec,
    size: Option<(usize, usize)>,
    device: &Device,
) -> Tensor {
    let rgb = image::decode(&fixtures().join(file)).unwrap();
    let mut x = image::to_normalized_tensor(&rgb, spec.mean, spec.std);
    if let Some((height, width)) = size {
        x = image::resize(&x, height, width, true);
    }
    Tensor::from_vec(x.data, &[1, x.height, x.width, 3], &Device::Cpu)
        .unwrap()
        .to_device(device)
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: size");
    let err = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);
    eprintln!("{what}: max abs error {err:e}");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
}

/// Writes the synthetic weights of `manifest` (with `vpr.arch = arch`), runs `body` on the model
/// loaded from them, and removes the file.
fn with_model(
    fixture: &str,
    manifest: &str,
    arch: &str,
    device: &Device,
    body: impl FnOnce(&dyn models::PlaceModel),
) {
    let dir = std::env::temp_dir().join(format!("vpr-full-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join(format!("{fixture}.safetensors"));
    synthetic::write_weights(manifest, &[("vpr.arch", arch)], &weights);
    let model = models::load(&weights, device);
    std::fs::remove_file(&weights).unwrap();
    body(model.unwrap().as_ref());
}

/// Each fixture image's descriptor against PyTorch's, the images resized to `side` if given.
fn check_side(
    fixture: &str,
    manifest: &str,
    arch: &str,
    side: Option<usize>,
    device: &Device,
    tol: f32,
) {
    with_model(fixture, manifest, arch, device, |model| {
        for file in IMAGES {
            let x = input(file, model.input(), side, device);
            let got = model.descriptors(&x).unwrap().to_vec::<f32>().unwrap();
            let what = format!("{fixture} on {device}, {file}");
            assert_close(&what, &got, &expected(&format!("{fixture}/{file}")), tol);
        }
    });
}

fn check(fixture: &str, manifest: &str, arch: &str, device: &Device, tol: f32) {
    check_side(fixture, manifest, arch, None, device, tol);
}

#[test]
fn cosplace_resnet18_512_matches_pytorch_on_cpu() {
    check(
        "cosplace_resnet18_512",
        "cosplace_resnet18_512",
        "cosplace",
        &Device::Cpu,
        1e-5,
    );
}

#[test]
fn eigenplaces_resnet50_2048_matches_pytorch_on_cpu() {
    check(
        "eigenplaces_resnet50_2048",
        "cosplace_resnet50_2048",
        "eigenplaces",
        &Device::Cpu,
        1e-5,
    );
}

#[test]
fn cosplace_vgg16_512_matches_pytorch_on_cpu() {
    check(
        "cosplace_vgg16_512",
        "cosplace_vgg16_512",
        "cosplace",
        &Device::Cpu,
        1e-5,
    );
}

#[test]
fn selavpr_global_and_local_features_match_pytorch_on_cpu() {
    let device = Device::Cpu;
    with_model("selavpr", "selavpr", "selavpr", &device, |model| {
        for file in IMAGES {
            let x = input(file, model.input(), Some(VIT_SIDE), &device);
            let (global, local) = model.descriptors_and_local(&x).unwrap();
            let what = format!("selavpr global, {file}");
            let global = global.to_vec::<f32>().unwrap();
            assert_close(&what, &global, &expected(&format!("selavpr/{file}")), 1e-5);
            let local = local.unwrap();
            assert_eq!(local.shape(), [1, 61, 61, 128]);
            let local = local.to_vec::<f32>().unwrap();
            let sampled: Vec<f32> = local_samples()
                .flat_map(|(r, c)| local[(r * 61 + c) * 128..][..128].to_vec())
                .collect();
            let what = format!("selavpr local, {file}");
            assert_close(
                &what,
                &sampled,
                &expected(&format!("selavpr_local/{file}")),
                1e-5,
            );
        }
    });
}

#[test]
fn dinov2_vits14_matches_pytorch_on_cpu() {
    check_side(
        "dinov2_vits14",
        "dinov2_vits14",
        "dinov2",
        Some(VIT_SIDE),
        &Device::Cpu,
        1e-5,
    );
}

#[test]
fn dinov2_vitb14_reg4_matches_pytorch_on_cpu() {
    check_side(
        "dinov2_vitb14_reg4",
        "dinov2_vitb14_reg4",
        "dinov2",
        Some(VIT_SIDE),
        &Device::Cpu,
        1e-5,
    );
}

/// A NetVLAD model's descriptors at 480x640 against PyTorch's, every `stride`-th element (as the
/// generator stores them).
fn check_vlad(fixture: &str, arch: &str, dim: usize, stride: usize) {
    let device = Device::Cpu;
    with_model(fixture, fixture, arch, &device, |model| {
        assert_eq!(model.dim(), dim);
        for file in IMAGES {
            let x = input_sized(file, model.input(), Some((480, 640)), &device);
            let got = model.descriptors(&x).unwrap().to_vec::<f32>().unwrap();
            let sampled: Vec<f32> = got.iter().step_by(stride).copied().collect();
            let what = format!("{fixture} on {device}, {file}");
            assert_close(
                &what,
                &sampled,
                &expected(&format!("{fixture}/{file}")),
                1e-4,
            );
        }
    });
}

#[test]
fn openibl_vgg16_netvlad_pca_matches_pytorch_at_480x640_on_cpu() {
    check_vlad("openibl_vgg16_netvlad_pca", "netvlad", 4096, 1);
}

#[test]
fn benchmark_resnet50conv4_netvlad_matches_pytorch_at_480x640_on_cpu() {
    check_vlad("bench_resnet50conv4_netvlad", "benchmark", 65536, 17);
}
