//! Full-size CosPlace ResNet-18/512, EigenPlaces ResNet-50/2048 and CosPlace VGG16/512, built by
//! `models::load` from files in the official key layout, against the descriptors PyTorch computed
//! (torchvision's modules, eval mode, full resolution) on the same PNG images. The weights are
//! the synthetic ones of tools/fixtures/full_size_models.py, regenerated bit for bit here
//! (tests/common/synthetic.rs), so no large file is committed.

mod common;

use common::synthetic;
use std::path::{Path, PathBuf};
use vpr_engine::io::image;
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::{models, Device, Tensor};

const IMAGES: [&str; 3] = ["a.png", "b.png", "c.png"];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full_size")
}

/// The engine's descriptor of each fixture image with the model in `weights`, and PyTorch's.
fn descriptors(fixture: &str, weights: &Path, device: &Device) -> Vec<(Vec<f32>, Vec<f32>)> {
    let model = models::load(weights, device).unwrap();
    let expected = WeightsFile::open(&fixtures().join("expected.safetensors")).unwrap();
    let spec = model.input().clone();
    IMAGES
        .iter()
        .map(|file| {
            let rgb = image::decode(&fixtures().join(file)).unwrap();
            let x = image::to_normalized_tensor(&rgb, spec.mean, spec.std);
            let batch = Tensor::from_vec(x.data, &[1, x.height, x.width, 3], &Device::Cpu)
                .unwrap()
                .to_device(device)
                .unwrap();
            let got = model.descriptors(&batch).unwrap().to_vec::<f32>().unwrap();
            let want = expected
                .read_f64(&format!("{fixture}/{file}"))
                .unwrap()
                .into_iter()
                .map(|v| v as f32)
                .collect();
            (got, want)
        })
        .collect()
}

fn check(fixture: &str, manifest: &str, arch: &str, device: &Device, tol: f32) {
    let dir = std::env::temp_dir().join(format!("vpr-full-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join(format!("{fixture}.safetensors"));
    synthetic::write_weights(manifest, &[("vpr.arch", arch)], &weights);
    let results = descriptors(fixture, &weights, device);
    std::fs::remove_file(&weights).unwrap();
    for ((got, want), file) in results.iter().zip(IMAGES) {
        assert_eq!(got.len(), want.len(), "{fixture} {file}: descriptor size");
        let err = got
            .iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs())
            .fold(0f32, f32::max);
        eprintln!("{fixture} on {device}, {file}: max abs error {err:e}");
        assert!(
            err <= tol,
            "{fixture} {file}: max abs error {err:e} > {tol:e}"
        );
    }
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
