//! Elementwise ops: CPU against an f64 reference, virtual GPU (and CUDA when present) against the
//! CPU, broadcasting, strided views, NaN semantics, rounding, zero-size tensors and errors.

mod common;

use common::{assert_close, assert_tensor_close, gpu_devices, seed, ODD_SIZES};
use vpr_engine::ops::elementwise::{
    binary_domain, conformance, erf, unary_domain, BinaryOp, UnaryOp,
};
use vpr_engine::{DType, Device, Error, Tensor};

const CPU: Device = Device::Cpu;

/// A view of a test tensor (non-capturing closures coerce to this).
type View = fn(&Tensor) -> Tensor;

/// The [3, 33, 7] test tensor as one dimension.
fn flat(t: &Tensor) -> Tensor {
    t.reshape(&[693]).unwrap()
}

fn unary_f64(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        UnaryOp::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Powf(p) => x.powf(p as f64),
        UnaryOp::Clamp(lo, hi) => x.max(lo as f64).min(hi as f64),
        UnaryOp::Affine(mul, add) => x * mul as f64 + add as f64,
    }
}

fn binary_f64(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Maximum => a.max(b),
        BinaryOp::Minimum => a.min(b),
        BinaryOp::Pow => a.powf(b),
    }
}

/// The f64 reference of `op(a, b)` computed from the (rounded) stored inputs, broadcast by views.
fn binary_reference(op: BinaryOp, a: &Tensor, b: &Tensor, shape: &[usize]) -> Vec<f64> {
    let x = a.broadcast_to(shape).unwrap().to_f64_vec().unwrap();
    let y = b.broadcast_to(shape).unwrap().to_f64_vec().unwrap();
    x.iter()
        .zip(&y)
        .map(|(&x, &y)| binary_f64(op, x, y))
        .collect()
}

/// Inputs: 1-D at every odd size, a 3-D tensor, a transposed view, and a size large enough for
/// the CPU to split it over threads (contiguous and transposed).
fn unary_cases(op: UnaryOp, dtype: DType, s: u64) -> Vec<(String, Tensor)> {
    let (lo, hi) = unary_domain(op);
    let mut cases: Vec<(String, Tensor)> = ODD_SIZES
        .iter()
        .map(|&n| {
            (
                format!("[{n}]"),
                Tensor::rand_uniform(&[n], lo, hi, s + n as u64, dtype, &CPU).unwrap(),
            )
        })
        .collect();
    let t = Tensor::rand_uniform(&[3, 33, 7], lo, hi, s, dtype, &CPU).unwrap();
    cases.push(("[3,33,7]".into(), t.clone()));
    cases.push(("[3,33,7] permuted".into(), t.permute(&[2, 0, 1]).unwrap()));
    let big = Tensor::rand_uniform(&[300, 257], lo, hi, s + 1, dtype, &CPU).unwrap();
    cases.push(("[300,257]".into(), big.clone()));
    cases.push(("[300,257] transposed".into(), big.t().unwrap()));
    cases
}

#[test]
fn cpu_unary_matches_f64_reference() {
    let s = seed("cpu_unary_matches_f64_reference");
    for dtype in DType::FLOATS {
        for op in UnaryOp::ALL {
            for (name, x) in unary_cases(op, dtype, s) {
                let got = x.unary(op).unwrap();
                assert_eq!(got.shape(), x.shape());
                assert_eq!(got.dtype(), dtype);
                let want: Vec<f64> = x
                    .to_f64_vec()
                    .unwrap()
                    .iter()
                    .map(|&v| unary_f64(op, v))
                    .collect();
                assert_close(
                    &got.to_f64_vec().unwrap(),
                    &want,
                    dtype.tolerance(),
                    &format!("cpu {op:?} {dtype} {name}"),
                    s,
                );
            }
        }
    }
}

/// Shape pairs: equal (dense path), a row vector over rows, both sides broadcasting, a scalar
/// shape [1], a rank-0 tensor, leading dimensions, and one large enough for CPU threads.
const BINARY_SHAPES: &[(&[usize], &[usize])] = &[
    (&[257], &[257]),
    (&[7, 33], &[7, 33]),
    (&[7, 33], &[33]),
    (&[7, 1], &[1, 33]),
    (&[1], &[3, 7]),
    (&[5, 3], &[]),
    (&[2, 3, 1, 5], &[3, 4, 1]),
    (&[300, 257], &[300, 257]),
    (&[300, 257], &[300, 1]),
];

#[test]
fn cpu_binary_matches_f64_reference() {
    let s = seed("cpu_binary_matches_f64_reference");
    for dtype in DType::FLOATS {
        for op in BinaryOp::ALL {
            let ((alo, ahi), (blo, bhi)) = binary_domain(op);
            for (i, &(sa, sb)) in BINARY_SHAPES.iter().enumerate() {
                let a = Tensor::rand_uniform(sa, alo, ahi, s + 2 * i as u64, dtype, &CPU).unwrap();
                let b =
                    Tensor::rand_uniform(sb, blo, bhi, s + 2 * i as u64 + 1, dtype, &CPU).unwrap();
                for (x, y, order) in [(&a, &b, "a,b"), (&b, &a, "b,a")] {
                    // swap the operands' roles except for domain-restricted ops
                    if order == "b,a" && matches!(op, BinaryOp::Div | BinaryOp::Pow) {
                        continue;
                    }
                    let got = x.binary(op, y).unwrap();
                    let shape = vpr_engine::layout::broadcast_shapes(x.shape(), y.shape()).unwrap();
                    assert_eq!(got.shape(), &shape[..]);
                    let want = binary_reference(op, x, y, &shape);
                    let what = format!("cpu {op:?} {dtype} {:?} {:?}", x.shape(), y.shape());
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
    }
}

#[test]
fn gpu_unary_matches_cpu() {
    let s = seed("gpu_unary_matches_cpu");
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            for op in UnaryOp::ALL {
                let (lo, hi) = unary_domain(op);
                let x = Tensor::rand_uniform(&[3, 33, 7], lo, hi, s, dtype, &CPU).unwrap();
                let xg = x.to_device(&dev).unwrap();
                // dense at odd sizes (vector loop plus tail), misaligned and aligned narrowed
                // starts, permuted, narrowed, broadcast (stride 0) and empty
                let views: [(&str, View); 9] = [
                    ("[1]", |t| flat(t).narrow(0, 0, 1).unwrap()),
                    ("[7]", |t| flat(t).narrow(0, 0, 7).unwrap()),
                    ("[33] at offset 1", |t| flat(t).narrow(0, 1, 33).unwrap()),
                    ("[257] at offset 8", |t| flat(t).narrow(0, 8, 257).unwrap()),
                    ("[3,33,7]", |t| t.clone()),
                    ("permuted", |t| t.permute(&[2, 0, 1]).unwrap()),
                    ("narrowed", |t| t.narrow(1, 3, 29).unwrap()),
                    ("broadcast", |t| {
                        let row = t.narrow(2, 0, 1).unwrap();
                        row.broadcast_to(&[2, 3, 33, 5]).unwrap()
                    }),
                    ("empty", |t| t.narrow(1, 0, 0).unwrap()),
                ];
                for (name, view) in views {
                    let got = view(&xg).unary(op).unwrap();
                    assert_eq!(got.device().to_string(), dev.to_string());
                    let want = view(&x).unary(op).unwrap();
                    assert_tensor_close(
                        &got,
                        &want,
                        dtype.tolerance(),
                        &format!("{dev} {op:?} {dtype} {name}"),
                        s,
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_binary_matches_cpu() {
    let s = seed("gpu_binary_matches_cpu");
    // the shapes above without the large ones, plus zero-size and misaligned / strided operands
    let shapes: Vec<(&[usize], &[usize])> = BINARY_SHAPES
        .iter()
        .copied()
        .filter(|(a, _)| a.len() != 2 || a[0] != 300)
        .chain([(&[0, 3][..], &[3][..]), (&[4, 0], &[4, 1])])
        .collect();
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            for op in BinaryOp::ALL {
                let ((alo, ahi), (blo, bhi)) = binary_domain(op);
                for (i, &(sa, sb)) in shapes.iter().enumerate() {
                    let a =
                        Tensor::rand_uniform(sa, alo, ahi, s + 2 * i as u64, dtype, &CPU).unwrap();
                    let b = Tensor::rand_uniform(sb, blo, bhi, s + 2 * i as u64 + 1, dtype, &CPU)
                        .unwrap();
                    let got = a
                        .to_device(&dev)
                        .unwrap()
                        .binary(op, &b.to_device(&dev).unwrap())
                        .unwrap();
                    let what = format!("{dev} {op:?} {dtype} {sa:?} {sb:?}");
                    assert_tensor_close(
                        &got,
                        &a.binary(op, &b).unwrap(),
                        dtype.tolerance(),
                        &what,
                        s,
                    );
                }
                // non-contiguous and misaligned operands: transposed, narrowed at odd offsets
                let a = Tensor::rand_uniform(&[40, 9], alo, ahi, s + 100, dtype, &CPU).unwrap();
                let b = Tensor::rand_uniform(&[9, 41], blo, bhi, s + 101, dtype, &CPU).unwrap();
                let cases: [(&str, View, View); 3] = [
                    (
                        "transposed a",
                        |a| a.t().unwrap().narrow(1, 0, 33).unwrap(),
                        |b| b.narrow(1, 0, 33).unwrap(),
                    ),
                    (
                        "transposed b",
                        |a| a.narrow(0, 1, 9).unwrap(),
                        |b| b.t().unwrap().narrow(0, 3, 9).unwrap(),
                    ),
                    (
                        "offsets 3 and 1",
                        |a| a.reshape(&[360]).unwrap().narrow(0, 3, 257).unwrap(),
                        |b| b.reshape(&[369]).unwrap().narrow(0, 1, 257).unwrap(),
                    ),
                ];
                let (ag, bg) = (a.to_device(&dev).unwrap(), b.to_device(&dev).unwrap());
                for (name, va, vb) in cases {
                    let got = va(&ag).binary(op, &vb(&bg)).unwrap();
                    assert_tensor_close(
                        &got,
                        &va(&a).binary(op, &vb(&b)).unwrap(),
                        dtype.tolerance(),
                        &format!("{dev} {op:?} {dtype} {name}"),
                        s,
                    );
                }
            }
        }
    }
}

/// Every device: a strided view gives exactly what the same op gives on a dense copy of it (the
/// strided and dense kernels use the same formula, so not even rounding may differ).
#[test]
fn strided_views_equal_dense_copies() {
    let s = seed("strided_views_equal_dense_copies");
    let devices: Vec<Device> = std::iter::once(CPU).chain(gpu_devices()).collect();
    for dev in &devices {
        for dtype in DType::FLOATS {
            let x = Tensor::rand_uniform(&[5, 6, 7], 0.1, 3.0, s, dtype, dev).unwrap();
            let y = Tensor::rand_uniform(&[7, 6], -3.0, 3.0, s + 1, dtype, dev).unwrap();
            let views = [
                x.permute(&[2, 1, 0]).unwrap(),
                x.narrow(2, 1, 5).unwrap().narrow(0, 2, 2).unwrap(),
                x.narrow(0, 1, 1)
                    .unwrap()
                    .broadcast_to(&[3, 1, 6, 7])
                    .unwrap(),
            ];
            for v in &views {
                let dense = v.contiguous().unwrap();
                for op in [UnaryOp::Log, UnaryOp::Gelu, UnaryOp::Affine(3.0, -1.0)] {
                    let what = format!(
                        "{dev} {op:?} {dtype} {:?} strides {:?}",
                        v.shape(),
                        v.layout().strides()
                    );
                    assert_tensor_close(
                        &v.unary(op).unwrap(),
                        &dense.unary(op).unwrap(),
                        0.0,
                        &what,
                        s,
                    );
                }
            }
            // y^T [6,7] against x [5,6,7]: a transposed operand that also broadcasts
            let yt = y.t().unwrap();
            for op in [BinaryOp::Sub, BinaryOp::Pow] {
                let got = x.binary(op, &yt).unwrap();
                let want = x
                    .binary(
                        op,
                        &yt.contiguous()
                            .unwrap()
                            .broadcast_to(&[5, 6, 7])
                            .unwrap()
                            .contiguous()
                            .unwrap(),
                    )
                    .unwrap();
                assert_tensor_close(
                    &got,
                    &want,
                    0.0,
                    &format!("{dev} {op:?} {dtype} transposed broadcast"),
                    s,
                );
            }
        }
    }
}

#[test]
fn broadcasting_edge_cases() {
    let s = seed("broadcasting_edge_cases");
    let cases: &[(&[usize], &[usize], &[usize])] = &[
        (&[1], &[3, 4], &[3, 4]),
        (&[4], &[2, 3, 4], &[2, 3, 4]),
        (&[3, 1], &[1, 4], &[3, 4]),
        (&[2, 1, 4], &[3, 1], &[2, 3, 4]),
        (&[], &[2, 3], &[2, 3]),
        (&[], &[], &[]),
        (&[1, 1], &[1], &[1, 1]),
        (&[3, 0], &[1], &[3, 0]),
        (&[0], &[1, 1], &[1, 0]),
    ];
    let devices: Vec<Device> = std::iter::once(CPU).chain(gpu_devices()).collect();
    for dev in &devices {
        for &(sa, sb, want_shape) in cases {
            let a = Tensor::rand_uniform(sa, -2.0, 2.0, s, DType::F32, dev).unwrap();
            let b = Tensor::rand_uniform(sb, -2.0, 2.0, s + 1, DType::F32, dev).unwrap();
            for (x, y) in [(&a, &b), (&b, &a)] {
                let got = x.mul(y).unwrap();
                assert_eq!(
                    got.shape(),
                    want_shape,
                    "{dev}: {:?} * {:?}",
                    x.shape(),
                    y.shape()
                );
                let want = binary_reference(BinaryOp::Mul, x, y, want_shape);
                assert_close(
                    &got.to_f64_vec().unwrap(),
                    &want,
                    1e-6,
                    &format!("{dev}: {:?} * {:?}", x.shape(), y.shape()),
                    s,
                );
            }
        }
    }
}

#[test]
fn zero_size_tensors() {
    for dev in std::iter::once(CPU).chain(gpu_devices()) {
        for dtype in DType::FLOATS {
            let x = Tensor::zeros(&[4, 0, 3], dtype, &dev).unwrap();
            for op in UnaryOp::ALL {
                let y = x.unary(op).unwrap();
                assert_eq!((y.shape(), y.numel()), (&[4, 0, 3][..], 0));
            }
            let y = x.add(&Tensor::ones(&[1, 3], dtype, &dev).unwrap()).unwrap();
            assert_eq!(y.shape(), &[4, 0, 3]);
            assert!(y.to_f64_vec().unwrap().is_empty());
        }
    }
}

#[test]
fn errors_are_clear() {
    let a = Tensor::zeros(&[2, 3], DType::F32, &CPU).unwrap();
    let b = Tensor::zeros(&[4], DType::F32, &CPU).unwrap();
    match a.add(&b) {
        Err(Error::Shape(m)) => assert!(
            m.contains("[2, 3]") && m.contains("[4]") && m.contains("add"),
            "{m}"
        ),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let h = Tensor::zeros(&[2, 3], DType::F16, &CPU).unwrap();
    match a.mul(&h) {
        Err(Error::DType(m)) => assert!(
            m.contains("f32") && m.contains("f16") && m.contains("mul"),
            "{m}"
        ),
        other => panic!("expected a dtype error, got {other:?}"),
    }
    for dtype in [DType::I32, DType::I64, DType::U8] {
        let i = Tensor::zeros(&[3], dtype, &CPU).unwrap();
        assert!(
            matches!(i.exp(), Err(Error::DType(m)) if m.contains(dtype.name())),
            "exp on {dtype}"
        );
        assert!(
            matches!(i.clamp(0.0, 1.0), Err(Error::DType(_))),
            "clamp on {dtype}"
        );
        assert!(
            matches!(i.maximum(&i), Err(Error::DType(m)) if m.contains(dtype.name())),
            "maximum on {dtype}"
        );
    }
    for dev in gpu_devices() {
        let g = a.to_device(&dev).unwrap();
        assert!(matches!(g.sub(&a), Err(Error::Device(_))), "{dev} - cpu");
        assert!(matches!(a.sub(&g), Err(Error::Device(_))), "cpu - {dev}");
        assert!(
            matches!(g.div(&b.to_device(&dev).unwrap()), Err(Error::Shape(_))),
            "{dev} shapes"
        );
        let gi = Tensor::zeros(&[3], DType::I32, &dev).unwrap();
        assert!(
            matches!(gi.relu(), Err(Error::DType(_))),
            "{dev} relu on i32"
        );
    }
}

#[test]
fn erf_matches_tabulated_values() {
    // erf to 16 digits (Abramowitz & Stegun table 7.1 / mpmath)
    let table = [
        (0.0, 0.0),
        (1e-8, 1.1283791670955126e-8),
        (0.1, 0.1124629160182849),
        (0.5, 0.5204998778130465),
        (1.0, 0.8427007929497149),
        (2.0, 0.9953222650189527),
        (2.9, 0.9999589021219005),
        (3.0, 0.9999779095030014),
        (3.5, 0.9999992569016276),
        (4.0, 0.9999999845827421),
        (5.0, 0.9999999999984626),
        (6.5, 1.0),
    ];
    for (x, want) in table {
        assert!(
            (erf(x) - want).abs() <= 2e-15,
            "erf({x}) = {} want {want}",
            erf(x)
        );
        assert!((erf(-x) + want).abs() <= 2e-15, "erf(-{x})");
    }
    assert!(erf(f64::NAN).is_nan());
}

#[test]
fn gelu_and_sigmoid_known_values() {
    let s = seed("gelu_and_sigmoid_known_values");
    let x = [1.0, -1.0, 0.0, 2.0, -3.0, 0.5];
    // torch.nn.functional.gelu(x) and torch.sigmoid(x) in float64
    let gelu = [
        0.8413447460685429,
        -0.15865525393145707,
        0.0,
        1.9544997361036416,
        -0.00404969409489031,
        0.34573123063700656,
    ];
    let sigmoid = [
        0.7310585786300049,
        0.2689414213699951,
        0.5,
        0.8807970779778823,
        0.04742587317756678,
        0.6224593312018546,
    ];
    for dev in std::iter::once(CPU).chain(gpu_devices()) {
        let t = Tensor::from_f64(&x, &[6], DType::F32, &dev).unwrap();
        assert_close(
            &t.gelu().unwrap().to_f64_vec().unwrap(),
            &gelu,
            1e-6,
            &format!("{dev} gelu"),
            s,
        );
        assert_close(
            &t.sigmoid().unwrap().to_f64_vec().unwrap(),
            &sigmoid,
            1e-6,
            &format!("{dev} sigmoid"),
            s,
        );
    }
}

#[test]
fn nan_semantics_follow_pytorch() {
    let nan = f64::NAN;
    for dev in std::iter::once(CPU).chain(gpu_devices()) {
        for dtype in DType::FLOATS {
            let t = |v: &[f64]| Tensor::from_f64(v, &[v.len()], dtype, &dev).unwrap();
            let check = |got: Tensor, want: &[f64], what: &str| {
                let got = got.to_f64_vec().unwrap();
                let same = got
                    .iter()
                    .zip(want)
                    .all(|(g, w)| g == w || (g.is_nan() && w.is_nan()));
                assert!(
                    same && got.len() == want.len(),
                    "{dev} {dtype} {what}: got {got:?}, want {want:?}"
                );
            };
            let (a, b) = (t(&[nan, 1.0, 2.0, nan]), t(&[1.0, nan, 3.0, nan]));
            check(a.maximum(&b).unwrap(), &[nan, nan, 3.0, nan], "maximum");
            check(a.minimum(&b).unwrap(), &[nan, nan, 2.0, nan], "minimum");
            check(
                t(&[nan, -1.0, 2.0, -0.0]).relu().unwrap(),
                &[nan, 0.0, 2.0, 0.0],
                "relu",
            );
            let x = t(&[nan, -5.0, 5.0, 0.5]);
            check(x.clamp(0.0, 1.0).unwrap(), &[nan, 0.0, 1.0, 0.5], "clamp");
            check(
                x.clamp(2.0, 1.0).unwrap(),
                &[nan, 1.0, 1.0, 1.0],
                "clamp with min > max",
            );
            check(
                x.clamp(f64::NEG_INFINITY, 0.0).unwrap(),
                &[nan, -5.0, 0.0, 0.0],
                "clamp max only",
            );
            check(
                x.clamp(nan, 1.0).unwrap(),
                &[nan, nan, nan, nan],
                "clamp with a NaN bound",
            );
            check(
                t(&[-1.0, 0.0]).log().unwrap(),
                &[nan, f64::NEG_INFINITY],
                "log",
            );
        }
    }
}

/// Results are rounded to nearest even, not truncated: exact ties in f16 and bf16.
#[test]
fn rounding_is_to_nearest_even() {
    let cases = [
        // 1 + 2^-8 ties between 1 and 1 + 2^-7 in bf16 (goes to the even 1); 1+2^-7 + 2^-8 goes up
        (
            DType::BF16,
            [1.0, 1.0078125],
            2f64.powi(-8),
            [1.0, 1.015625],
        ),
        // the same one bit further down in f16 (10 mantissa bits)
        (
            DType::F16,
            [1.0, 1.0 + 2f64.powi(-10)],
            2f64.powi(-11),
            [1.0, 1.0 + 2f64.powi(-9)],
        ),
    ];
    for dev in std::iter::once(CPU).chain(gpu_devices()) {
        for (dtype, a, b, want) in cases {
            let x = Tensor::from_f64(&a, &[2], dtype, &dev).unwrap();
            let y = Tensor::from_f64(&[b], &[1], dtype, &dev).unwrap();
            assert_eq!(
                x.add(&y).unwrap().to_f64_vec().unwrap(),
                want,
                "{dev} {dtype} add"
            );
            assert_eq!(
                x.add_scalar(b).unwrap().to_f64_vec().unwrap(),
                want,
                "{dev} {dtype} add_scalar"
            );
        }
    }
}

#[test]
fn scalar_helpers_and_method_names() {
    let x = Tensor::from_f64(&[1.0, 4.0], &[2], DType::F32, &CPU).unwrap();
    assert_eq!(
        x.mul_scalar(-2.0).unwrap().to_f64_vec().unwrap(),
        [-2.0, -8.0]
    );
    assert_eq!(x.add_scalar(0.5).unwrap().to_f64_vec().unwrap(), [1.5, 4.5]);
    assert_eq!(
        x.affine(2.0, 1.0).unwrap().to_f64_vec().unwrap(),
        [3.0, 9.0]
    );
    assert_eq!(x.powf(0.5).unwrap().to_f64_vec().unwrap(), [1.0, 2.0]);
    assert_eq!(x.rsqrt().unwrap().to_f64_vec().unwrap(), [1.0, 0.5]);
    assert_eq!(
        x.neg().unwrap().abs().unwrap().to_f64_vec().unwrap(),
        [1.0, 4.0]
    );
    assert_eq!(x.pow(&x).unwrap().to_f64_vec().unwrap(), [1.0, 256.0]);
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(conformance, "elementwise conformance");
}
