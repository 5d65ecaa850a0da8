//! ClusVPR against PyTorch: a tiny network with the official structure and key names, written from
//! the paper's design in tools/fixtures/clusvpr.py, saved as an OpenIBL training checkpoint and
//! converted by our converter, gives PyTorch's float64 backbone features, CWTNet output,
//! descriptors and gradients of every `net_vlad` parameter on the CPU and the virtual GPU.

mod common;

use std::path::{Path, PathBuf};
use vpr_engine::autograd::backward;
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::models::{self, knn_density, ClusVpr};
use vpr_engine::nn::Module;
use vpr_engine::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"))
}

fn expected() -> WeightsFile {
    WeightsFile::open(&fixture("clusvpr_tiny.expected")).unwrap()
}

/// `max |got - want| / max |want|`.
fn relative_error(got: &Tensor, want: &[f64]) -> f64 {
    common::max_relative_error(&got.to_f64_vec().unwrap(), want)
}

/// f32 against float64 through 13 convolutions, four CWTNet blocks and the VLAD.
const TOLERANCE: f64 = 1e-5;

fn check(what: &str, got: &Tensor, want: &WeightsFile, name: &str, tolerance: f64) {
    let err = relative_error(got, &want.read_f64(name).unwrap());
    eprintln!("{what} {name}: max error {err:.2e}");
    assert!(err <= tolerance, "{what} {name}: max error {err:e}");
}

#[test]
fn clusvpr_features_descriptors_and_gradients_match_pytorch() {
    let want = expected();
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        let file = WeightsFile::open(&fixture("clusvpr_tiny")).unwrap();
        let net = ClusVpr::from_file(&file, &device).unwrap();
        let what = format!("clusvpr on {device}");
        let input = want.tensor("input", DType::F32, &device).unwrap();
        let out = net.forward(&input).unwrap();
        check(&what, &out.backbone, &want, "backbone", TOLERANCE);
        check(&what, &out.cwt, &want, "cwt", TOLERANCE);
        check(&what, &out.descriptors, &want, "descriptors", TOLERANCE);
        assert_eq!(out.descriptors.shape(), [2, 32]);

        let r = want.tensor("r", DType::F32, &device).unwrap();
        let loss = out.descriptors.mul(&r).unwrap().sum_all().unwrap();
        backward(&loss).unwrap();
        let mut pairs = Vec::new();
        for entry in net.state_entries() {
            let name = entry.name().to_string();
            let key = format!("grad.{name}");
            if want.shape(&key).is_none() {
                continue;
            }
            let p = net
                .parameters()
                .into_iter()
                .find(|p| p.name() == name)
                .unwrap();
            let g = p
                .grad()
                .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
            // convolution weights back to the file's layout
            let g = if g.rank() == 4 {
                g.permute(&[0, 3, 1, 2]).unwrap()
            } else {
                g
            };
            pairs.push((
                key.clone(),
                g.to_f64_vec().unwrap(),
                want.read_f64(&key).unwrap(),
            ));
        }
        // The key biases' gradients are zero in exact arithmetic (softmax ignores a constant
        // added to every score of a row), so errors are measured against at least a thousandth
        // of the largest gradient.
        let largest = pairs
            .iter()
            .flat_map(|(_, _, w)| w.iter())
            .fold(0.0f64, |m, w| m.max(w.abs()));
        for (key, got, w) in &pairs {
            let scale = w
                .iter()
                .fold(0.0f64, |m, w| m.max(w.abs()))
                .max(1e-3 * largest);
            let diff = got
                .iter()
                .zip(w)
                .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
            let err = diff / scale;
            eprintln!("{what} {key}: max error {err:.2e}");
            assert!(err <= TOLERANCE, "{what} {key}: max error {err:e}");
        }
        let checked = pairs.len();
        assert_eq!(checked, 4 + 4 * 22, "{what}: gradients checked");
    }
}

#[test]
fn clusvpr_loads_as_a_place_model() {
    let model = models::load(&fixture("clusvpr_tiny"), &Device::Cpu).unwrap();
    assert_eq!(model.describe(), "clusvpr vgg16 + 4 CWTNet blocks -> 32");
    assert_eq!(model.dim(), 32);
    assert_eq!(
        model.input().size,
        models::InputSize::Resize {
            height: 96,
            width: 128
        }
    );
    let want = expected();
    let input = want.tensor("input", DType::F32, &Device::Cpu).unwrap();
    check(
        "descriptors",
        &model.descriptors(&input).unwrap(),
        &want,
        "descriptors",
        TOLERANCE,
    );
    // another image size gives another map, which the per-location GeM cannot take
    let small = Tensor::zeros(&[1, 64, 128, 3], DType::F32, &Device::Cpu).unwrap();
    let err = model.descriptors(&small).unwrap_err().to_string();
    assert!(err.contains("4x8 map") && err.contains("96x128"), "{err}");
}

#[test]
fn knn_density_is_the_sum_of_the_k_smallest_squared_distances() {
    let seed = 7;
    let (n, t, c, k) = (2, 13, 5, 4);
    let x = Tensor::randn(&[n, t, c], 0.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap();
    let v = x.to_f64_vec().unwrap();
    let mut want = Vec::new();
    for b in 0..n {
        for i in 0..t {
            let mut d: Vec<f64> = (0..t)
                .map(|j| {
                    (0..c)
                        .map(|e| (v[(b * t + i) * c + e] - v[(b * t + j) * c + e]).powi(2))
                        .sum()
                })
                .collect();
            d.sort_by(f64::total_cmp);
            want.push(d[..k].iter().sum::<f64>());
        }
    }
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        let got = knn_density(&x.to_device(&device).unwrap(), k).unwrap();
        assert_eq!(got.shape(), [n, t]);
        let err = relative_error(&got, &want);
        eprintln!("knn density on {device}: max error {err:.2e}");
        assert!(err < 1e-5, "seed {seed} on {device}: {err:e}");
    }
    assert!(knn_density(&x, t + 1).is_err());
}

/// The tiny model's file with metadata entries replaced, in a temporary folder.
fn with_metadata(changes: &[(&str, &str)], tag: &str) -> PathBuf {
    let file = WeightsFile::open(&fixture("clusvpr_tiny")).unwrap();
    let tensors: Vec<(String, Tensor)> = file
        .names()
        .into_iter()
        .map(|n| {
            let t = file.tensor(&n, DType::F32, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    let mut meta = file.metadata().clone();
    for (k, v) in changes {
        meta.insert(k.to_string(), v.to_string());
    }
    let dir = std::env::temp_dir().join(format!("clusvpr_{tag}_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    vpr_engine::io::weights::write_weights(&path, &tensors, &meta).unwrap();
    path
}

#[test]
fn clusvpr_files_that_do_not_describe_the_network_are_refused() {
    for (changes, tag, needle) in [
        (
            &[("vpr.aggregation", "netvlad")][..],
            "aggregation",
            "not grouped_vlad",
        ),
        (&[("vpr.clusvpr.map", "5x8")][..], "odd", "even sides"),
        // 32 locations for a GeM exponent of 48
        (&[("vpr.clusvpr.map", "4x8")][..], "map", "GeM_pool.p"),
        (&[("vpr.clusvpr.cwt.heads", "3")][..], "heads", "3 heads"),
    ] {
        let path = with_metadata(changes, tag);
        let err = match models::load(&path, &Device::Cpu) {
            Ok(_) => panic!("{tag}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(needle), "{tag}: {err}");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
