//! Layer norm: the CPU against an f64 reference and PyTorch's numbers
//! (tests/fixtures/norm_interp.safetensors), gradients by finite differences, the virtual GPU (and
//! a real one when present) against the CPU, mixed dtypes, autocast, nn::LayerNorm, errors.

mod common;

use common::{assert_close, assert_tensor_close, fixture_tensors, gpu_devices, seed, ODD_SIZES};
use vpr_engine::autograd::{self, gradcheck, Parameter};
use vpr_engine::nn::{LayerNorm, Module};
use vpr_engine::{DType, Device, Error, Tensor};

/// Layer norm of each row from the textbook definition: variance as E[(x - E[x])^2] over an
/// explicit list, in f64.
fn reference(x: &[f64], w: Option<&[f64]>, b: Option<&[f64]>, n: usize, eps: f64) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|row| {
            let mean = row.iter().sum::<f64>() / n as f64;
            let dev: Vec<f64> = row.iter().map(|v| v - mean).collect();
            let var = dev.iter().map(|d| d * d).sum::<f64>() / n as f64;
            dev.into_iter().enumerate().map(move |(k, d)| {
                d / (var + eps).sqrt() * w.map_or(1.0, |w| w[k]) + b.map_or(0.0, |b| b[k])
            })
        })
        .collect()
}

fn cpu_randn(shape: &[usize], mean: f64, std: f64, s: u64, dtype: DType) -> Tensor {
    Tensor::randn(shape, mean, std, s, dtype, &Device::Cpu).unwrap()
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &n) in ODD_SIZES.iter().chain(&[384, 1000, 1536]).enumerate() {
            let sd = s.wrapping_add((i * 16 + j) as u64 * 4);
            // a mean far from zero against a small spread: a one-pass variance would cancel
            let x = cpu_randn(&[3, n], 50.0, 0.5, sd, dtype);
            let w = cpu_randn(&[n], 1.0, 0.5, sd + 1, DType::F32);
            let b = cpu_randn(&[n], 0.0, 0.5, sd + 2, dtype);
            let (xv, wv, bv) = (
                x.to_f64_vec().unwrap(),
                w.to_f64_vec().unwrap(),
                b.to_f64_vec().unwrap(),
            );
            let got = x.layer_norm(Some(&w), Some(&b), 1e-6).unwrap();
            assert_eq!(got.dtype(), dtype);
            let want = reference(&xv, Some(&wv), Some(&bv), n, 1e-6);
            let what = format!("cpu {dtype} [3, {n}]");
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                dtype.tolerance(),
                &what,
                s,
            );
            let got = x.layer_norm(None, None, 1e-5).unwrap();
            let want = reference(&xv, None, None, n, 1e-5);
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                dtype.tolerance(),
                &what,
                s,
            );
        }
    }
}

#[test]
fn matches_pytorch_forward_and_gradients() {
    let f = fixture_tensors("norm_interp.safetensors");
    let get = |k: &str| {
        let (shape, v) = &f[k];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
    };
    for case in ["vit", "odd", "wide"] {
        let p = |k: &str| format!("ln.{case}.{k}");
        let eps = f[&p("eps")].1[0];
        let mut devices = vec![Device::Cpu];
        devices.extend(gpu_devices());
        for device in devices {
            let on = |k: &str| get(&p(k)).to_device(&device).unwrap();
            let x = on("x").requires_grad();
            let w = Parameter::new("weight", on("weight"));
            let b = Parameter::new("bias", on("bias"));
            let y = x
                .layer_norm(Some(&w.tensor()), Some(&b.tensor()), eps)
                .unwrap();
            let grads = autograd::backward_with(&y, on("dy")).unwrap();
            let checks = [
                ("y", y.clone()),
                ("dx", grads.get(&x).unwrap().clone()),
                ("dweight", w.grad().unwrap()),
                ("dbias", b.grad().unwrap()),
            ];
            for (k, got) in checks {
                let want = get(&p(k));
                let err = vpr_engine::check::max_error(
                    &got.to_f64_vec().unwrap(),
                    &want.to_f64_vec().unwrap(),
                );
                println!("layer_norm {case} {k} on {device}: max error against PyTorch {err:e}");
                assert_tensor_close(&got, &want, 1e-5, &format!("{case} {k} {device}"), 0);
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("layer_norm gradcheck");
    for (j, shape) in [&[3, 7][..], &[2, 2, 5], &[4, 1], &[1, 33]]
        .iter()
        .enumerate()
    {
        let c = shape[shape.len() - 1];
        let sd = s.wrapping_add(8 * j as u64);
        let inputs = [
            cpu_randn(shape, 1.0, 1.0, sd, DType::F32),
            cpu_randn(&[c], 1.0, 0.5, sd + 1, DType::F32),
            cpu_randn(&[c], 0.0, 0.5, sd + 2, DType::F32),
        ];
        let with_params = |t: &[Tensor]| t[0].layer_norm(Some(&t[1]), Some(&t[2]), 1e-5);
        let bare = |t: &[Tensor]| t[0].layer_norm(None, None, 1e-5);
        let weight_only = |t: &[Tensor]| t[0].layer_norm(Some(&t[1]), None, 1e-5);
        let bias_only = |t: &[Tensor]| t[0].layer_norm(None, Some(&t[1]), 1e-5);
        let checks = [
            ("x, weight, bias", gradcheck(with_params, &inputs, 1e-2, sd)),
            ("x", gradcheck(bare, &inputs[..1], 1e-2, sd)),
            ("x, weight", gradcheck(weight_only, &inputs[..2], 1e-2, sd)),
            (
                "x, bias",
                gradcheck(bias_only, &[inputs[0].clone(), inputs[2].clone()], 1e-2, sd),
            ),
        ];
        for (what, check) in checks {
            let check = check.unwrap();
            assert!(
                check.max_error <= 1e-3,
                "{shape:?} {what}: {} ({}); VPR_TEST_SEED={s}",
                check.max_error,
                check.worst
            );
        }
    }
}

#[test]
fn gpu_matches_cpu_with_gradients() {
    let s = seed("layer_norm gpu_matches_cpu_with_gradients");
    // a group of lanes per row up to 1024, a block beyond
    let shapes: [&[usize]; 6] = [
        &[1, 1],
        &[5, 7],
        &[2, 3, 257],
        &[64, 384],
        &[3, 1025],
        &[2, 1536],
    ];
    for dev in gpu_devices() {
        for (i, &dtype) in DType::FLOATS.iter().enumerate() {
            for (j, &shape) in shapes.iter().enumerate() {
                let sd = s.wrapping_add(8 * (i * 8 + j) as u64);
                let c = shape[shape.len() - 1];
                let x = cpu_randn(shape, 1.0, 2.0, sd, dtype);
                let w = cpu_randn(&[c], 1.0, 0.5, sd + 1, DType::F32);
                let b = cpu_randn(&[c], 0.0, 0.5, sd + 2, dtype);
                let dy = cpu_randn(shape, 0.0, 1.0, sd + 3, dtype);
                let run = |device: &Device| {
                    let x = x.to_device(device).unwrap().requires_grad();
                    let w = Parameter::new("w", w.to_device(device).unwrap());
                    let b = Parameter::new("b", b.to_device(device).unwrap());
                    let y = x
                        .layer_norm(Some(&w.tensor()), Some(&b.tensor()), 1e-6)
                        .unwrap();
                    let g = autograd::backward_with(&y, dy.to_device(device).unwrap()).unwrap();
                    let dx = g.get(&x).unwrap().clone();
                    // y detached, so that comparing it records nothing
                    [y.detach(), dx, w.grad().unwrap(), b.grad().unwrap()]
                };
                let (got, want) = (run(&dev), run(&Device::Cpu));
                assert_eq!(autograd::tape_len(), 0, "backward left nodes on the tape");
                for (k, (g, w)) in ["y", "dx", "dweight", "dbias"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    assert_eq!(g.dtype(), w.dtype(), "{k}");
                    let what = format!("{dev} {dtype} {shape:?} {k}");
                    assert_tensor_close(g, w, dtype.tolerance(), &what, s);
                }
                // the parameters' gradients come back in each parameter's dtype
                assert_eq!(got[2].dtype(), DType::F32);
                assert_eq!(got[3].dtype(), dtype);
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::norm::conformance, "norm conformance");
}

#[test]
fn a_nan_stays_in_its_row_and_a_constant_row_gives_the_bias() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let x =
            Tensor::from_slice(&[1.0f32, f32::NAN, 3.0, 2.0, 2.0, 2.0], &[2, 3], &device).unwrap();
        let b = Tensor::from_slice(&[0.5f32, -1.0, 4.0], &[3], &device).unwrap();
        let y = x
            .layer_norm(None, Some(&b), 1e-5)
            .unwrap()
            .to_f64_vec()
            .unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()), "{device}: {y:?}");
        assert_eq!(&y[3..], &[0.5, -1.0, 4.0], "{device}");
    }
}

#[test]
fn autocast_runs_in_f32_as_torch_autocast() {
    let s = seed("layer_norm autocast");
    let x = cpu_randn(&[4, 33], 0.0, 1.0, s, DType::BF16);
    let w = cpu_randn(&[33], 1.0, 0.5, s + 1, DType::BF16);
    let y = autograd::autocast(DType::BF16, || x.layer_norm(Some(&w), None, 1e-6)).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let x32 = x.to_dtype(DType::F32).unwrap();
    let w32 = w.to_dtype(DType::F32).unwrap();
    let want = x32.layer_norm(Some(&w32), None, 1e-6).unwrap();
    assert_tensor_close(&y, &want, 0.0, "autocast", s);
    // outside autocast a bf16 input gives a bf16 output, with f32 or bf16 parameters
    assert_eq!(
        x.layer_norm(Some(&w), None, 1e-6).unwrap().dtype(),
        DType::BF16
    );
}

#[test]
fn layer_norm_module_loads_official_names_and_normalises() {
    let s = seed("nn::LayerNorm");
    let ln = LayerNorm::new("blocks.0.norm1", 7, 1e-6, &Device::Cpu).unwrap();
    let names: Vec<String> = ln
        .parameters()
        .iter()
        .map(|p| p.name().to_string())
        .collect();
    assert_eq!(names, ["blocks.0.norm1.weight", "blocks.0.norm1.bias"]);
    let w = cpu_randn(&[7], 1.0, 0.5, s, DType::F32);
    let b = cpu_randn(&[7], 0.0, 0.5, s + 1, DType::F32);
    ln.weight.set(w.clone()).unwrap();
    ln.bias.set(b.clone()).unwrap();
    let x = cpu_randn(&[2, 3, 7], 0.0, 1.0, s + 2, DType::F32);
    let want = reference(
        &x.to_f64_vec().unwrap(),
        Some(&w.to_f64_vec().unwrap()),
        Some(&b.to_f64_vec().unwrap()),
        7,
        1e-6,
    );
    let got = ln.forward(&x).unwrap();
    assert_close(&got.to_f64_vec().unwrap(), &want, 1e-5, "nn::LayerNorm", s);
}

#[test]
fn empty_inputs_give_empty_outputs() {
    let x = Tensor::zeros(&[0, 5], DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::ones(&[5], DType::F32, &Device::Cpu).unwrap();
    assert_eq!(x.layer_norm(Some(&w), None, 1e-5).unwrap().shape(), &[0, 5]);
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[2, 5], DType::F32, &cpu).unwrap();
    let message = |r: vpr_engine::Result<Tensor>| r.expect_err("an error").to_string();
    let w4 = Tensor::ones(&[4], DType::F32, &cpu).unwrap();
    let m = message(x.layer_norm(Some(&w4), None, 1e-5));
    assert!(
        m.contains("weight") && m.contains("[4]") && m.contains("[2, 5]"),
        "{m}"
    );
    let b_half = Tensor::zeros(&[5], DType::F16, &cpu).unwrap();
    let m = message(x.layer_norm(None, Some(&b_half), 1e-5));
    assert!(m.contains("bias") && m.contains("f16"), "{m}");
    let m = message(x.layer_norm(None, None, -1.0));
    assert!(m.contains("eps"), "{m}");
    let m = message(x.layer_norm(None, None, f64::NAN));
    assert!(m.contains("eps"), "{m}");
    let scalar = Tensor::from_slice(&[1.0f32], &[], &cpu).unwrap();
    assert!(matches!(
        scalar.layer_norm(None, None, 1e-5),
        Err(Error::Shape(_))
    ));
    let ints = Tensor::zeros(&[2, 5], DType::I32, &cpu).unwrap();
    assert!(matches!(
        ints.layer_norm(None, None, 1e-5),
        Err(Error::DType(_))
    ));
}
