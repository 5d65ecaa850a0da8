//! `add_pca` / `vpr-engine add-pca`: OpenIBL's PCA-whitening added to a converted EmbedNet (the
//! tiny OpenIBL fixture, 128-d NetVLAD) gives the model whose descriptors are
//! `L2(W v + b)` of the NetVLAD descriptor `v`, with W = (U diag(lams^-1/2))^T and b = -W mu.

mod common;

use common::seed;
use std::path::{Path, PathBuf};
use vpr_engine::fit::{fit_pca, PcaParams};
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::{models, DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}.safetensors"))
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vpr-add-pca-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// PCA parameters fitted to random 128-d descriptors.
fn params(seed: u64, dim: usize) -> PcaParams {
    let x = Tensor::randn(&[40, 128], 0.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap();
    fit_pca(&x, dim).unwrap().params
}

/// `L2(W v + b)` in f64 for each row of the descriptors `v` [n, D].
fn whitened(v: &[f32], params: &PcaParams) -> Vec<f64> {
    let layer = params.layer(true, &Device::Cpu).unwrap();
    let (w, b) = (
        layer.weight.to_f64_vec().unwrap(),
        layer.bias.to_f64_vec().unwrap(),
    );
    let d = params.input_dim;
    v.chunks_exact(d)
        .flat_map(|row| {
            let y: Vec<f64> = (0..params.dim)
                .map(|c| b[c] + (0..d).map(|j| w[c * d + j] * row[j] as f64).sum::<f64>())
                .collect();
            let norm = y.iter().map(|a| a * a).sum::<f64>().sqrt();
            y.into_iter().map(move |a| a / norm)
        })
        .collect()
}

fn descriptors(model: &Path, x: &Tensor) -> Vec<f32> {
    let model = models::load(model, &Device::Cpu).unwrap();
    model.descriptors(x).unwrap().to_vec::<f32>().unwrap()
}

#[test]
fn the_pca_model_whitens_the_netvlad_descriptor() {
    let s = seed("the_pca_model_whitens_the_netvlad_descriptor");
    let dir = temp_dir("lib");
    let params = params(s, 16);
    let out = dir.join("pca.safetensors");
    models::add_pca(&fixture("netvlad_openibl"), &params, &out).unwrap();
    let file = WeightsFile::open(&out).unwrap();
    assert_eq!(file.meta("vpr.aggregation"), Some("netvlad_pca"));
    assert_eq!(file.meta("vpr.dim"), Some("16"));
    assert_eq!(file.shape("pca_layer.weight"), Some(&[16, 128, 1, 1][..]));

    let x = Tensor::randn(&[2, 32, 48, 3], 0.0, 1.0, s + 1, DType::F32, &Device::Cpu).unwrap();
    let v = descriptors(&fixture("netvlad_openibl"), &x);
    let got = descriptors(&out, &x);
    let want = whitened(&v, &params);
    assert_eq!(got.len(), want.len());
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(err <= 1e-5, "seed {s}: max abs error {err:e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs the binary: exit code and everything it printed.
fn vpr_engine(args: &[&str]) -> (i32, String) {
    let (code, out, err) = common::vpr_engine(args);
    (code, out + &err)
}

#[test]
fn the_command_reads_h5dump_files_keeps_dim_components_and_refuses_bad_input() {
    let s = seed("the_command_reads_h5dump_files");
    let dir = temp_dir("cli");
    let params = params(s, 16);
    // what `h5dump -b LE` writes for OpenIBL's datasets: raw little-endian float32
    let raw = dir.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    for (name, values) in [("U", &params.u), ("lams", &params.lams), ("mu", &params.mu)] {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(raw.join(format!("{name}.bin")), bytes).unwrap();
    }
    let weights = fixture("netvlad_openibl");
    let out = dir.join("pca8.safetensors");
    let (code, text) = vpr_engine(&[
        "add-pca",
        "--weights",
        weights.to_str().unwrap(),
        "--pca",
        raw.to_str().unwrap(),
        "--dim",
        "8",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("8-d descriptors with PCA-whitening"),
        "{text}"
    );
    let x = Tensor::randn(&[1, 32, 32, 3], 0.0, 1.0, s + 1, DType::F32, &Device::Cpu).unwrap();
    let want = whitened(&descriptors(&weights, &x), &params.truncated(8).unwrap());
    let got = descriptors(&out, &x);
    let err = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    assert!(err <= 1e-5, "seed {s}: max abs error {err:e}");

    let saved = dir.join("params.safetensors");
    params.save(&saved).unwrap();
    let bad_out = dir.join("bad.safetensors");
    let run = |weights: &Path, pca: &Path, dim: &str| {
        let mut args = vec![
            "add-pca",
            "--weights",
            weights.to_str().unwrap(),
            "--pca",
            pca.to_str().unwrap(),
            "--out",
            bad_out.to_str().unwrap(),
        ];
        if !dim.is_empty() {
            args.extend(["--dim", dim]);
        }
        vpr_engine(&args)
    };
    // a model that already has PCA
    let (code, text) = run(&fixture("netvlad_openibl_pca"), &saved, "");
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("not vpr.arch 'netvlad' with 'netvlad_pca'"),
        "{text}"
    );
    // another system
    let (code, text) = run(&fixture("netvlad_bench_r18conv4_netvlad"), &saved, "");
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("vpr.arch 'benchmark'"), "{text}");
    // parameters for other descriptors (OpenIBL's layout, 96-d)
    let other = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pca_h5dump");
    let (code, text) = run(&weights, &other, "");
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("project 96-d descriptors") && text.contains("gives 128-d"),
        "{text}"
    );
    // more components than fitted
    let (code, text) = run(&weights, &saved, "17");
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("--dim 17: the PCA parameters have 16 components"),
        "{text}"
    );
    // a missing parameters file
    let (code, text) = run(&weights, &dir.join("nothing.safetensors"), "");
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("nothing.safetensors"), "{text}");
    assert!(!bad_out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
