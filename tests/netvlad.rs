//! NetVLAD and OpenIBL's PCA-whitening layer against PyTorch (tools/fixtures/netvlad.py: float64
//! forward and gradients) and an f64 reference on fresh random inputs, gradients by finite
//! differences; and tiny OpenIBL and geo-localization-benchmark networks, converted by our
//! converter, against PyTorch's float64 descriptors, on the CPU and the virtual GPU.

mod common;

use common::{assert_close, gpu_devices, seed};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vpr_engine::autograd::{self, gradcheck};
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::models;
use vpr_engine::nn::{netvlad_residuals, vlad_descriptor, Module, NetVlad, PcaWhitening};
use vpr_engine::{DType, Device, Tensor};

/// tests/fixtures/netvlad.safetensors: float32 inputs, float64 results.
fn layer_fixture() -> WeightsFile {
    WeightsFile::open(&fixture("netvlad")).unwrap()
}

fn values(f: &WeightsFile, key: &str) -> Vec<f64> {
    f.read_f64(key).unwrap()
}

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(gpu_devices());
    d
}

fn tensor(f: &WeightsFile, key: &str, shape: Option<&[usize]>, device: &Device) -> Tensor {
    let s = f.shape(key).unwrap().to_vec();
    Tensor::from_f64(&values(f, key), shape.unwrap_or(&s), DType::F32, device).unwrap()
}

/// `max |got - want| / max |want|`: float32 against float64 over values of any scale.
fn relative(got: &Tensor, want: &[f64]) -> f64 {
    let got = got.to_f64_vec().unwrap();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, w| m.max(w.abs()));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
        / scale.max(1e-30)
}

fn assert_relative(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let err = relative(got, want);
    eprintln!("{what}: max error {err:.2e}");
    assert!(err <= tol, "{what}: max error {err:e} > {tol:e}");
}

#[test]
fn layer_matches_pytorch_forward_and_gradients() {
    let f = layer_fixture();
    for device in devices() {
        for (case, normalize) in [("openibl", true), ("raw", false)] {
            let key = |k: &str| format!("{case}.{k}");
            let layer = NetVlad::new("v", 8, 16, normalize, &device).unwrap();
            layer
                .conv
                .weight
                .set(tensor(
                    &f,
                    &key("conv.weight"),
                    Some(&[8, 1, 1, 16]),
                    &device,
                ))
                .unwrap();
            layer
                .centroids
                .set(tensor(&f, &key("centroids"), None, &device))
                .unwrap();
            let x = tensor(&f, &key("x"), None, &device).requires_grad();
            let residuals = layer.residuals(&x).unwrap();
            let descriptor = vlad_descriptor(&residuals).unwrap();
            assert_eq!(descriptor.shape(), [2, 128]);
            let r = tensor(&f, &key("r"), None, &device);
            let grads = autograd::backward_with(&descriptor, r).unwrap();
            let what = |k: &str| format!("{case} on {device}: {k}");
            let tol = 1e-5;
            // detached, so that reading them back from a GPU records nothing
            let (residuals, descriptor) = (residuals.detach(), descriptor.detach());
            assert_relative(
                &what("residuals"),
                &residuals,
                &values(&f, &key("residuals")),
                tol,
            );
            assert_relative(
                &what("descriptor"),
                &descriptor,
                &values(&f, &key("descriptor")),
                tol,
            );
            let gx = grads.get(&x).unwrap();
            assert_relative(&what("grad x"), gx, &values(&f, &key("grad.x")), tol);
            let gw = layer.conv.weight.grad().unwrap();
            assert_relative(
                &what("grad conv.weight"),
                &gw,
                &values(&f, &key("grad.conv.weight")),
                tol,
            );
            let gc = layer.centroids.grad().unwrap();
            assert_relative(
                &what("grad centroids"),
                &gc,
                &values(&f, &key("grad.centroids")),
                tol,
            );
            // the module's forward is the same composition
            let (again, a) = autograd::no_grad(|| {
                let x = x.detach();
                (layer.forward(&x).unwrap(), layer.assignment(&x).unwrap())
            });
            assert_relative(
                &what("forward"),
                &again,
                &values(&f, &key("descriptor")),
                tol,
            );
            assert_eq!(a.shape(), [2, 35, 8]);
            let rows = a.sum(-1, false).unwrap().to_f64_vec().unwrap();
            assert!(rows.iter().all(|s| (s - 1.0).abs() < 1e-5), "{rows:?}");
        }
    }
    assert_eq!(autograd::tape_len(), 0, "backward left nodes on the tape");
}

/// NetVLAD in f64 straight from its definition: V[k] = sum_l a_kl (x_l - c_k).
fn reference(
    x: &[f64],
    w: &[f64],
    c: &[f64],
    (n, l, k, d): (usize, usize, usize, usize),
    normalize: bool,
) -> (Vec<f64>, Vec<f64>) {
    let l2 = |v: &mut [f64]| {
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt().max(1e-12);
        v.iter_mut().for_each(|a| *a /= norm);
    };
    let mut residuals = vec![0.0; n * k * d];
    for b in 0..n {
        for p in 0..l {
            let mut xl = x[(b * l + p) * d..][..d].to_vec();
            if normalize {
                l2(&mut xl);
            }
            let logits: Vec<f64> = (0..k)
                .map(|j| (0..d).map(|i| w[j * d + i] * xl[i]).sum())
                .collect();
            let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = logits.iter().map(|v| (v - max).exp()).collect();
            let total: f64 = e.iter().sum();
            for j in 0..k {
                for i in 0..d {
                    residuals[(b * k + j) * d + i] += e[j] / total * (xl[i] - c[j * d + i]);
                }
            }
        }
    }
    let mut descriptor = residuals.clone();
    for b in 0..n {
        for j in 0..k {
            l2(&mut descriptor[(b * k + j) * d..][..d]);
        }
        l2(&mut descriptor[b * k * d..][..k * d]);
    }
    (residuals, descriptor)
}

#[test]
fn layer_matches_an_f64_reference_on_odd_sizes() {
    let s = seed("netvlad f64 reference");
    let cases = [
        (1, 1, 1, 1, 1, true),
        (2, 3, 5, 7, 4, true),
        (3, 7, 1, 33, 7, false),
        (1, 6, 9, 257, 5, true),
        (2, 2, 2, 16, 64, true),
    ];
    for device in devices() {
        for (i, &(n, h, w, d, k, normalize)) in cases.iter().enumerate() {
            let sd = s.wrapping_add(4 * i as u64);
            let x = Tensor::randn(&[n, h, w, d], 0.2, 1.0, sd, DType::F32, &Device::Cpu).unwrap();
            let scale = 4.0 / (d as f64).sqrt().max(1.0);
            let wt = Tensor::randn(&[k, d], 0.0, scale, sd + 1, DType::F32, &Device::Cpu).unwrap();
            let c =
                Tensor::rand_uniform(&[k, d], -0.3, 0.7, sd + 2, DType::F32, &Device::Cpu).unwrap();
            let (want_r, want_d) = reference(
                &x.to_f64_vec().unwrap(),
                &wt.to_f64_vec().unwrap(),
                &c.to_f64_vec().unwrap(),
                (n, h * w, k, d),
                normalize,
            );
            let on = |t: &Tensor| t.to_device(&device).unwrap();
            let residuals = netvlad_residuals(&on(&x), &on(&wt), &on(&c), normalize).unwrap();
            let descriptor = vlad_descriptor(&residuals).unwrap();
            let what = format!("{device} n {n} h {h} w {w} d {d} k {k} normalize {normalize}");
            let scale = want_r.iter().fold(1f64, |m, v| m.max(v.abs()));
            let got_r: Vec<f64> = residuals.to_f64_vec().unwrap();
            let err = got_r
                .iter()
                .zip(&want_r)
                .fold(0f64, |m, (g, w)| m.max((g - w).abs()))
                / scale;
            assert!(
                err <= 2e-6,
                "{what}: residuals error {err:e}; VPR_TEST_SEED={s}"
            );
            assert_close(
                &descriptor.to_f64_vec().unwrap(),
                &want_d,
                1e-5,
                &format!("{what}: descriptor"),
                s,
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("netvlad gradcheck");
    for (i, &(n, h, w, d, k, normalize)) in [(2, 2, 3, 5, 3, true), (1, 3, 1, 4, 2, false)]
        .iter()
        .enumerate()
    {
        let sd = s.wrapping_add(4 * i as u64);
        let cpu = Device::Cpu;
        let inputs = [
            Tensor::randn(&[n, h, w, d], 0.3, 1.0, sd, DType::F32, &cpu).unwrap(),
            Tensor::randn(&[k, d], 0.0, 1.0, sd + 1, DType::F32, &cpu).unwrap(),
            Tensor::rand_uniform(&[k, d], -0.3, 0.7, sd + 2, DType::F32, &cpu).unwrap(),
        ];
        let f = |t: &[Tensor]| vlad_descriptor(&netvlad_residuals(&t[0], &t[1], &t[2], normalize)?);
        let check = gradcheck(f, &inputs, 5e-3, sd).unwrap();
        eprintln!("case {i}: gradcheck max error {:.2e}", check.max_error);
        assert!(
            check.max_error <= 2e-3,
            "case {i}: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
        let raw = |t: &[Tensor]| netvlad_residuals(&t[0], &t[1], &t[2], normalize);
        let check = gradcheck(raw, &inputs, 5e-3, sd).unwrap();
        eprintln!(
            "case {i} residuals: gradcheck max error {:.2e}",
            check.max_error
        );
        assert!(
            check.max_error <= 2e-3,
            "case {i} residuals: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
    }
}

#[test]
fn pca_whitening_matches_pytorch_forward_and_gradients() {
    let f = layer_fixture();
    for device in devices() {
        let pca = PcaWhitening::new("pca_layer", 128, 6, &device).unwrap();
        assert_eq!((pca.inputs(), pca.outputs()), (128, 6));
        pca.weight
            .set(tensor(&f, "pca.weight", Some(&[6, 1, 1, 128]), &device))
            .unwrap();
        pca.bias.set(tensor(&f, "pca.bias", None, &device)).unwrap();
        let x = tensor(&f, "pca.x", None, &device).requires_grad();
        let y = pca.forward(&x).unwrap();
        let grads = autograd::backward_with(&y, tensor(&f, "pca.r", None, &device)).unwrap();
        let what = |k: &str| format!("pca on {device}: {k}");
        assert_relative(&what("y"), &y, &values(&f, "pca.y"), 1e-5);
        assert_relative(
            &what("grad x"),
            grads.get(&x).unwrap(),
            &values(&f, "pca.grad.x"),
            1e-5,
        );
        let gw = pca.weight.grad().unwrap();
        assert_relative(
            &what("grad weight"),
            &gw,
            &values(&f, "pca.grad.weight"),
            1e-5,
        );
        let gb = pca.bias.grad().unwrap();
        assert_relative(&what("grad bias"), &gb, &values(&f, "pca.grad.bias"), 1e-5);
        let names: Vec<String> = pca
            .state_entries()
            .iter()
            .map(|e| format!("{} {:?}", e.name(), e.file_shape()))
            .collect();
        assert_eq!(
            names,
            ["pca_layer.weight [6, 128, 1, 1]", "pca_layer.bias [6]"]
        );
    }
}

#[test]
fn state_names_are_the_official_ones() {
    let v = NetVlad::new("net_vlad", 64, 512, true, &Device::Cpu).unwrap();
    let names: Vec<String> = v
        .state_entries()
        .iter()
        .map(|e| format!("{} {:?}", e.name(), e.file_shape()))
        .collect();
    assert_eq!(
        names,
        [
            "net_vlad.centroids [64, 512]",
            "net_vlad.conv.weight [64, 512, 1, 1]"
        ]
    );
    assert_eq!((v.clusters(), v.dim()), (64, 512));
    let params: Vec<String> = v.parameters().iter().map(|p| p.name().into()).collect();
    assert_eq!(params, ["net_vlad.centroids", "net_vlad.conv.weight"]);
}

#[test]
fn bad_inputs_are_errors_naming_the_shapes() {
    let cpu = Device::Cpu;
    let v = NetVlad::new("net_vlad", 4, 8, true, &cpu).unwrap();
    let x = Tensor::zeros(&[1, 2, 3, 5], DType::F32, &cpu).unwrap();
    let e = v.forward(&x).unwrap_err().to_string();
    assert!(e.contains("[1, 2, 3, 5]") && e.contains("8"), "{e}");
    let e = v
        .forward(&Tensor::zeros(&[2, 8], DType::F32, &cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not [N, H, W, C]"), "{e}");
    let w = Tensor::zeros(&[4, 8], DType::F32, &cpu).unwrap();
    let c = Tensor::zeros(&[4, 7], DType::F32, &cpu).unwrap();
    let x = Tensor::zeros(&[1, 2, 2, 8], DType::F32, &cpu).unwrap();
    let e = netvlad_residuals(&x, &w, &c, true).unwrap_err().to_string();
    assert!(e.contains("[4, 8]") && e.contains("[4, 7]"), "{e}");
    let pca = PcaWhitening::new("pca_layer", 32, 6, &cpu).unwrap();
    let e = pca
        .forward(&Tensor::zeros(&[2, 31], DType::F32, &cpu).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pca_layer.weight") && e.contains("[2, 31]"),
        "{e}"
    );
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"))
}

/// Each tiny model's descriptors against PyTorch's float64 ones.
#[test]
fn tiny_models_match_pytorch_on_the_cpu_and_the_virtual_gpu() {
    let models = [
        ("netvlad_openibl_pca", "netvlad vgg16 netvlad_pca -> 6", 6),
        ("netvlad_openibl", "netvlad vgg16 netvlad -> 128", 128),
        (
            "netvlad_bench_r18conv4_netvlad",
            "benchmark resnet18conv4 netvlad -> 128",
            128,
        ),
        (
            "netvlad_bench_r50conv5_gemfc",
            "benchmark resnet50conv5 gem_fc -> 6",
            6,
        ),
        ("netvlad_bench_vgg16_gem", "benchmark vgg16 gem -> 16", 16),
    ];
    for (name, description, dim) in models {
        let want = WeightsFile::open(&fixture(&format!("{name}.expected"))).unwrap();
        for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
            let model = models::load(&fixture(name), &device).unwrap();
            assert_eq!(model.describe(), description);
            assert_eq!(model.dim(), dim);
            for i in 0..2 {
                let x = want
                    .tensor(&format!("input.{i}"), DType::F32, &device)
                    .unwrap();
                let got = model.descriptors(&x).unwrap();
                assert_eq!(got.shape(), [1, dim]);
                let reference = want.read_f64(&format!("descriptors.{i}")).unwrap();
                assert_relative(
                    &format!("{name} on {device}, image {i}"),
                    &got,
                    &reference,
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn openibl_models_take_0_255_input_by_their_metadata() {
    let model = models::load(&fixture("netvlad_openibl_pca"), &Device::Cpu).unwrap();
    let spec = model.input();
    assert_eq!(spec.mean, [0.48502, 0.45796, 0.4076]);
    assert!(spec.std.iter().all(|&s| (s - 1.0 / 255.0).abs() < 1e-9));
    assert_eq!(
        spec.size,
        models::InputSize::Resize {
            height: 480,
            width: 640
        }
    );
}

/// The fixture `name` rewritten with `edit` applied to its metadata, at a temporary path.
fn rewrite(name: &str, tag: &str, edit: impl Fn(&mut HashMap<String, String>)) -> PathBuf {
    let bytes = std::fs::read(fixture(name)).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta: HashMap<String, String> = header.metadata().clone().unwrap_or_default();
    edit(&mut meta);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let path = std::env::temp_dir().join(format!(
        "vpr-netvlad-{}-{name}-{tag}.safetensors",
        std::process::id()
    ));
    safetensors::tensor::serialize_to_file(tensors, Some(meta), &path).unwrap();
    path
}

fn load_error(path: &Path) -> String {
    let e = match models::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    };
    std::fs::remove_file(path).unwrap();
    e
}

#[test]
fn metadata_that_does_not_fit_is_refused() {
    let path = rewrite("netvlad_openibl", "flatten", |m| {
        m.insert("vpr.netvlad.flatten".into(), "descriptor-major".into());
    });
    let e = load_error(&path);
    assert!(e.contains("vpr.netvlad.flatten 'descriptor-major'"), "{e}");

    let path = rewrite("netvlad_openibl", "dim", |m| {
        m.insert("vpr.dim".into(), "4096".into());
    });
    let e = load_error(&path);
    assert!(e.contains("vpr.dim 4096") && e.contains("128"), "{e}");

    let path = rewrite("netvlad_openibl", "pca", |m| {
        m.insert("vpr.aggregation".into(), "netvlad_pca".into());
    });
    let e = load_error(&path);
    assert!(
        e.contains("missing keys") && e.contains("pca_layer.weight"),
        "{e}"
    );

    let path = rewrite("netvlad_bench_r18conv4_netvlad", "aggregation", |m| {
        m.insert("vpr.aggregation".into(), "crn".into());
    });
    let e = load_error(&path);
    assert!(e.contains("'crn' is not a benchmark aggregation"), "{e}");

    let path = rewrite("netvlad_openibl", "backbone", |m| {
        m.insert("vpr.backbone".into(), "resnet50".into());
    });
    let e = load_error(&path);
    assert!(e.contains("OpenIBL's NetVLAD runs on vgg16"), "{e}");
}
