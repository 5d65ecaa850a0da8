//! Bicubic interpolation: PyTorch's numbers for DINOv2's position-embedding resizes
//! (tests/fixtures/norm_interp.safetensors), invariants on fresh random inputs, the virtual GPU
//! (and a real one when present) against the CPU, every dtype, errors.

mod common;

use common::{assert_tensor_close, fixture_tensors, gpu_devices, seed};
use vpr_engine::ops::interpolate::ResizeTo;
use vpr_engine::{DType, Device, Error, Tensor};

fn dino(m: f64) -> f64 {
    (m + 0.1) / 37.0
}

/// The fixture's cases: name, input grid, size rule, antialias.
fn fixture_cases() -> Vec<(&'static str, &'static str, ResizeTo, bool)> {
    vec![
        (
            "s16_1",
            "grid37",
            ResizeTo::ScaleFactor([dino(16.0), dino(16.0)]),
            false,
        ),
        (
            "s37_1",
            "grid37",
            ResizeTo::ScaleFactor([dino(37.0), dino(37.0)]),
            false,
        ),
        (
            "s16_1x37_1",
            "grid37",
            ResizeTo::ScaleFactor([dino(16.0), dino(37.0)]),
            false,
        ),
        ("size16", "grid37", ResizeTo::Size([16, 16]), false),
        ("size16_aa", "grid37", ResizeTo::Size([16, 16]), true),
        (
            "s16_1x37_1_aa",
            "grid37",
            ResizeTo::ScaleFactor([dino(16.0), dino(37.0)]),
            true,
        ),
        ("up37_aa", "grid16", ResizeTo::Size([37, 37]), true),
        ("size23x19", "grid16", ResizeTo::Size([23, 19]), false),
    ]
}

#[test]
fn matches_pytorch_for_dinov2_position_embeddings() {
    let f = fixture_tensors("norm_interp.safetensors");
    let get = |k: &str| {
        let (shape, v) = &f[&format!("interp.{k}")];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
    };
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        for (name, grid, to, aa) in fixture_cases() {
            let x = get(grid).to_device(&device).unwrap();
            let got = x.interpolate_bicubic(to, aa).unwrap();
            let want = get(name);
            let err = vpr_engine::check::max_error(
                &got.to_f64_vec().unwrap(),
                &want.to_f64_vec().unwrap(),
            );
            println!("interpolate {name} on {device}: max error against PyTorch {err:e}");
            assert_tensor_close(&got, &want, 1e-5, &format!("{name} on {device}"), 0);
        }
    }
}

#[test]
fn the_offset_scale_factor_is_not_a_plain_resize() {
    // DINOv2's (16 + 0.1) / 37 gives 16 rows, but samples other points than a resize to 16 does
    let f = fixture_tensors("norm_interp.safetensors");
    let (a, b) = (&f["interp.s16_1"].1, &f["interp.size16"].1);
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff > 0.05, "the two paths differ by only {diff}");
    // and 37 -> 37 by (37 + 0.1) / 37 is no identity without antialias
    let (x, y) = (&f["interp.grid37"].1, &f["interp.s37_1"].1);
    let diff = x
        .iter()
        .zip(y)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(diff > 0.05, "37 -> 37 changed the grid by only {diff}");
}

#[test]
fn same_size_is_the_identity_and_constants_stay_constant() {
    let s = seed("interpolate identity and constants");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        for (j, &dtype) in DType::FLOATS.iter().enumerate() {
            let x = Tensor::randn(&[2, 7, 9, 3], 0.0, 1.0, s + j as u64, dtype, &Device::Cpu)
                .unwrap()
                .to_device(&device)
                .unwrap();
            for aa in [false, true] {
                let y = x.interpolate_bicubic(ResizeTo::Size([7, 9]), aa).unwrap();
                assert_tensor_close(
                    &y,
                    &x,
                    0.0,
                    &format!("{device} {dtype} identity aa={aa}"),
                    s,
                );
            }
            let ones = Tensor::full(&[1, 7, 9, 2], 0.75, dtype, &device).unwrap();
            let sizes = [
                ResizeTo::Size([3, 4]),
                ResizeTo::Size([20, 31]),
                ResizeTo::ScaleFactor([0.3, 1.7]),
            ];
            for (to, aa) in sizes.iter().flat_map(|&t| [(t, false), (t, true)]) {
                let y = ones.interpolate_bicubic(to, aa).unwrap();
                let want = Tensor::full(y.shape(), 0.75, dtype, &Device::Cpu).unwrap();
                let what = format!("{device} {dtype} constant {to:?} aa={aa}");
                assert_tensor_close(&y, &want, dtype.tolerance(), &what, s);
            }
        }
    }
}

#[test]
fn half_precision_computes_in_f32() {
    let s = seed("interpolate f16/bf16");
    let x = Tensor::randn(&[1, 37, 37, 4], 0.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        for dtype in [DType::F16, DType::BF16] {
            for (to, aa) in [
                (ResizeTo::ScaleFactor([dino(16.0), dino(16.0)]), false),
                (ResizeTo::Size([16, 16]), true),
            ] {
                let xl = x.to_dtype(dtype).unwrap();
                let want = xl
                    .to_dtype(DType::F32)
                    .unwrap()
                    .interpolate_bicubic(to, aa)
                    .unwrap();
                let got = xl
                    .to_device(&device)
                    .unwrap()
                    .interpolate_bicubic(to, aa)
                    .unwrap();
                assert_eq!(got.dtype(), dtype);
                let what = format!("{device} {dtype} {to:?} aa={aa}");
                assert_tensor_close(&got, &want, dtype.tolerance(), &what, s);
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(
        vpr_engine::ops::interpolate::conformance,
        "interpolate conformance",
    );
}

#[test]
fn views_are_read_through_their_layout() {
    let s = seed("interpolate views");
    // an NCHW tensor permuted to NHWC is a strided view
    let nchw = Tensor::randn(&[2, 3, 9, 8], 0.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    let view = nchw.permute(&[0, 2, 3, 1]).unwrap();
    let dense = view.contiguous().unwrap();
    for aa in [false, true] {
        let to = ResizeTo::Size([5, 13]);
        let got = view.interpolate_bicubic(to, aa).unwrap();
        let want = dense.interpolate_bicubic(to, aa).unwrap();
        assert_tensor_close(&got, &want, 0.0, &format!("view aa={aa}"), s);
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[1, 37, 37, 4], DType::F32, &cpu).unwrap();
    let message = |r: vpr_engine::Result<Tensor>| r.expect_err("an error").to_string();
    let m = message(
        Tensor::zeros(&[37, 37, 4], DType::F32, &cpu)
            .unwrap()
            .interpolate_bicubic(ResizeTo::Size([16, 16]), false),
    );
    assert!(m.contains("rank 4") && m.contains("[37, 37, 4]"), "{m}");
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let m = message(x.interpolate_bicubic(ResizeTo::ScaleFactor([bad, 1.0]), false));
        assert!(m.contains("scale"), "{m}");
    }
    let m = message(x.interpolate_bicubic(ResizeTo::ScaleFactor([0.01, 1.0]), false));
    assert!(m.contains("0 x 37"), "{m}");
    let m = message(x.interpolate_bicubic(ResizeTo::Size([0, 5]), true));
    assert!(m.contains("0 x 5"), "{m}");
    let ints = Tensor::zeros(&[1, 4, 4, 1], DType::I32, &cpu).unwrap();
    assert!(matches!(
        ints.interpolate_bicubic(ResizeTo::Size([2, 2]), false),
        Err(Error::DType(_))
    ));
}

/// The gradient cases of the fixture: name and size rule (on interp.grad.x, [1, 11, 9, 3]).
fn gradient_cases() -> [(&'static str, ResizeTo, bool); 3] {
    [
        (
            "scale",
            ResizeTo::ScaleFactor([5.1 / 11.0, 4.1 / 9.0]),
            false,
        ),
        ("size_aa", ResizeTo::Size([5, 4]), true),
        ("up_aa", ResizeTo::Size([17, 13]), true),
    ]
}

#[test]
fn gradients_match_pytorch() {
    let f = fixture_tensors("norm_interp.safetensors");
    let get = |k: &str| {
        let (shape, v) = &f[&format!("interp.grad.{k}")];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
    };
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        for (name, to, aa) in gradient_cases() {
            let x = get("x").to_device(&device).unwrap().requires_grad();
            let y = x.interpolate_bicubic(to, aa).unwrap();
            let dy = get(&format!("{name}.dy")).to_device(&device).unwrap();
            let grads = vpr_engine::autograd::backward_with(&y, dy).unwrap();
            let got = grads.get(&x).unwrap();
            let want = get(&format!("{name}.dx"));
            let err = vpr_engine::check::max_error(
                &got.to_f64_vec().unwrap(),
                &want.to_f64_vec().unwrap(),
            );
            println!("interpolate backward {name} on {device}: max error against PyTorch {err:e}");
            assert_tensor_close(got, &want, 1e-5, &format!("{name} dx on {device}"), 0);
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("interpolate gradcheck");
    let cases = [
        ([1, 6, 5, 2], ResizeTo::ScaleFactor([0.6, 1.7]), false),
        ([2, 5, 7, 1], ResizeTo::Size([9, 3]), false),
        ([1, 9, 7, 2], ResizeTo::Size([4, 3]), true),
        ([1, 4, 3, 2], ResizeTo::Size([7, 8]), true),
        ([1, 1, 1, 3], ResizeTo::Size([3, 2]), false),
    ];
    for (j, &(shape, to, aa)) in cases.iter().enumerate() {
        let x = Tensor::randn(&shape, 0.0, 1.0, s + j as u64, DType::F32, &Device::Cpu).unwrap();
        let f = move |t: &[Tensor]| t[0].interpolate_bicubic(to, aa);
        let check = vpr_engine::autograd::gradcheck(f, &[x], 1e-2, s).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "{shape:?} {to:?} aa={aa}: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
    }
}
