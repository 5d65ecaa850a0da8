//! Reductions: the CPU against an f64 reference, the virtual GPU (and a real one when present)
//! against the CPU, NaN and tie rules, empty axes, errors.

mod common;

use common::{assert_close, assert_tensor_close, gpu_devices, seed, ODD_SIZES};
use vpr_engine::ops::reduce::ReduceOp;
use vpr_engine::{DType, Device, Tensor};

/// Straightforward f64 reduction of row-major `x` of `shape` along `dim`; argmax gives the first
/// index of the largest value, NaN counting as largest.
fn reference(x: &[f64], shape: &[usize], dim: usize, op: ReduceOp) -> Vec<f64> {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let n = shape[dim];
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for i in 0..inner {
            let vals: Vec<f64> = (0..n).map(|k| x[(o * n + k) * inner + i]).collect();
            let first_nan = vals.iter().position(|v| v.is_nan());
            let max = vals.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            out.push(match op {
                ReduceOp::Sum => vals.iter().sum(),
                ReduceOp::SumSq => vals.iter().map(|v| v * v).sum(),
                ReduceOp::Mean => vals.iter().sum::<f64>() / n as f64,
                ReduceOp::Max => first_nan.map_or(max, |_| f64::NAN),
                ReduceOp::Min => first_nan
                    .map_or(vals.iter().cloned().fold(f64::INFINITY, f64::min), |_| {
                        f64::NAN
                    }),
                ReduceOp::ArgMax => {
                    first_nan.unwrap_or_else(|| vals.iter().position(|&v| v == max).unwrap()) as f64
                }
            });
        }
    }
    out
}

/// `values` as `dtype` stores them (f16 sums beyond 65504 become inf, as the result must).
fn stored(values: Vec<f64>, op: ReduceOp, dtype: DType) -> Vec<f64> {
    if op == ReduceOp::ArgMax {
        return values;
    }
    Tensor::from_f64(&values, &[values.len()], dtype, &Device::Cpu)
        .unwrap()
        .to_f64_vec()
        .unwrap()
}

fn out_shape(shape: &[usize], dim: usize, keepdim: bool) -> Vec<usize> {
    let mut s = shape.to_vec();
    if keepdim {
        s[dim] = 1;
    } else {
        s.remove(dim);
    }
    s
}

/// Exact for max/min/argmax; otherwise the rounding of the result to the dtype.
fn tol(op: ReduceOp, dtype: DType) -> f64 {
    if matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax) {
        0.0
    } else {
        dtype.tolerance()
    }
}

#[test]
fn cpu_matches_f64_reference_on_every_axis() {
    let s = seed("cpu_matches_f64_reference_on_every_axis");
    let shapes: &[&[usize]] = &[
        &[1],
        &[7],
        &[257],
        &[33, 7],
        &[3, 1, 5],
        &[2, 7, 33],
        &[4, 3, 5, 6],
        &[3, 70000],
    ];
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &shape) in shapes.iter().enumerate() {
            let t = Tensor::randn(
                shape,
                0.3,
                2.0,
                s + (i * 32 + j) as u64,
                dtype,
                &Device::Cpu,
            )
            .unwrap();
            let x = t.to_f64_vec().unwrap();
            for d in 0..shape.len() {
                for (dim, keepdim) in [
                    (d as isize, false),
                    (d as isize - shape.len() as isize, true),
                ] {
                    for op in ReduceOp::ALL {
                        let what = format!(
                            "cpu {} {dtype} {shape:?} dim {dim} keepdim {keepdim}",
                            op.name()
                        );
                        let got = t.reduce(op, dim, keepdim).unwrap();
                        assert_eq!(got.shape(), out_shape(shape, d, keepdim), "{what}");
                        assert_eq!(got.dtype(), op.out_dtype(dtype), "{what}");
                        let want = stored(reference(&x, shape, d, op), op, dtype);
                        assert_close(&got.to_f64_vec().unwrap(), &want, tol(op, dtype), &what, s);
                    }
                }
            }
        }
    }
}

#[test]
fn cpu_reduces_non_contiguous_views() {
    let s = seed("cpu_reduces_non_contiguous_views");
    let base = Tensor::randn(&[6, 9, 4], 0.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    let view = base.permute(&[2, 0, 1]).unwrap().narrow(2, 1, 7).unwrap();
    let dense = view.contiguous().unwrap();
    let x = dense.to_f64_vec().unwrap();
    for d in 0..3 {
        for op in ReduceOp::ALL {
            let got = view.reduce(op, d as isize, false).unwrap();
            assert_close(
                &got.to_f64_vec().unwrap(),
                &reference(&x, dense.shape(), d, op),
                tol(op, DType::F32),
                &format!("{} view dim {d}", op.name()),
                s,
            );
        }
    }
}

/// Shapes and dims that reach each launch path: warp rows, block rows, split rows, columns
/// (narrow and wide), split columns, a middle axis.
const GPU_CASES: &[(&[usize], isize)] = &[
    (&[1], 0),
    (&[7], -1),
    (&[33, 7], 1),
    (&[257, 33], -1),
    (&[3, 1025], 1),
    (&[2, 5000], 1),
    (&[1, 20011], -1),
    (&[33, 7], 0),
    (&[7, 1, 257], 0),
    (&[2, 7, 33], 1),
    (&[3, 257, 5], -2),
    (&[6000, 3], 0),
    (&[2100, 40], 0),
];

#[test]
fn gpu_matches_cpu_for_every_op_dtype_and_path() {
    let s = seed("gpu_matches_cpu_for_every_op_dtype_and_path");
    for dev in gpu_devices() {
        for (i, &dtype) in DType::FLOATS.iter().enumerate() {
            for (j, &(shape, dim)) in GPU_CASES.iter().enumerate() {
                let cpu = Tensor::randn(
                    shape,
                    0.5,
                    2.0,
                    s + (i * 32 + j) as u64,
                    dtype,
                    &Device::Cpu,
                )
                .unwrap();
                let gpu = cpu.to_device(&dev).unwrap();
                for op in ReduceOp::ALL {
                    for keepdim in [false, true] {
                        let what = format!(
                            "{dev} {} {dtype} {shape:?} dim {dim} keepdim {keepdim}",
                            op.name()
                        );
                        let got = gpu.reduce(op, dim, keepdim).unwrap();
                        assert_eq!(got.dtype(), op.out_dtype(dtype), "{what}");
                        assert_tensor_close(
                            &got,
                            &cpu.reduce(op, dim, keepdim).unwrap(),
                            tol(op, dtype),
                            &what,
                            s,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_reduces_non_contiguous_views() {
    let s = seed("gpu_reduces_non_contiguous_views");
    let cpu = Tensor::randn(&[5, 33, 8], 0.0, 1.0, s, DType::BF16, &Device::Cpu).unwrap();
    let view = |t: &Tensor| t.transpose(0, 2).unwrap().narrow(1, 3, 29).unwrap();
    for dev in gpu_devices() {
        let gpu = cpu.to_device(&dev).unwrap();
        for op in ReduceOp::ALL {
            for dim in [0, 1, -1] {
                let what = format!("{dev} {} transposed view dim {dim}", op.name());
                let want = view(&cpu).reduce(op, dim, false).unwrap();
                assert_tensor_close(
                    &view(&gpu).reduce(op, dim, false).unwrap(),
                    &want,
                    tol(op, DType::BF16),
                    &what,
                    s,
                );
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::reduce::conformance, "reduce conformance");
}

/// Rows of `n` values with planted NaNs, ties and infinities at positions that land in different
/// threads, vectors, the scalar head and tail, and different segments of a split row.
fn special_rows(n: usize) -> (Vec<f64>, usize) {
    let mut rows = Vec::new();
    let base = |r: usize| (0..n).map(move |k| ((k * 7 + r * 13) % 101) as f64 / 10.0 - 5.0);
    // 0: NaN late and early; argmax must give the early one
    let mut a: Vec<f64> = base(0).collect();
    a[n - 1] = f64::NAN;
    a[n / 3] = f64::NAN;
    // 1: the maximum twice; the first wins
    let mut b: Vec<f64> = base(1).collect();
    b[n - 2] = 100.0;
    b[n / 2] = 100.0;
    // 2: every value equal; index 0
    let c = vec![1.5; n];
    // 3: every value -inf; index 0, max -inf
    let d = vec![f64::NEG_INFINITY; n];
    // 4: +inf at the end, -inf elsewhere in places
    let mut e: Vec<f64> = base(4).collect();
    e[0] = f64::NEG_INFINITY;
    e[n - 1] = f64::INFINITY;
    for r in [a, b, c, d, e] {
        rows.extend(r);
    }
    (rows, 5)
}

#[test]
fn nan_ties_and_infinities_follow_torch() {
    let s = seed("nan_ties_and_infinities_follow_torch");
    for n in [7, 33, 257, 1000, 5003, 20011] {
        let (x, rows) = special_rows(n);
        for &dtype in &DType::FLOATS {
            let cpu = Tensor::from_f64(&x, &[rows, n], dtype, &Device::Cpu).unwrap();
            let xr = cpu.to_f64_vec().unwrap();
            // the same rows as columns (inner > 1 paths)
            let cpu_t = cpu.t().unwrap().contiguous().unwrap();
            let want_argmax = [n / 3, n / 2, 0, 0, n - 1];
            for op in ReduceOp::ALL {
                let want = stored(reference(&xr, &[rows, n], 1, op), op, dtype);
                if op == ReduceOp::ArgMax {
                    assert_eq!(
                        want,
                        want_argmax.map(|i| i as f64),
                        "reference argmax n {n}"
                    );
                }
                let t = tol(op, dtype);
                let what = format!("{} {dtype} n {n}", op.name());
                assert_close(
                    &cpu.reduce(op, 1, false).unwrap().to_f64_vec().unwrap(),
                    &want,
                    t,
                    &format!("cpu {what}"),
                    s,
                );
                assert_close(
                    &cpu_t.reduce(op, 0, false).unwrap().to_f64_vec().unwrap(),
                    &want,
                    t,
                    &format!("cpu cols {what}"),
                    s,
                );
                for dev in gpu_devices() {
                    let got = cpu.to_device(&dev).unwrap().reduce(op, -1, false).unwrap();
                    assert_close(
                        &got.to_f64_vec().unwrap(),
                        &want,
                        t,
                        &format!("{dev} rows {what}"),
                        s,
                    );
                    let got = cpu_t.to_device(&dev).unwrap().reduce(op, 0, false).unwrap();
                    assert_close(
                        &got.to_f64_vec().unwrap(),
                        &want,
                        t,
                        &format!("{dev} cols {what}"),
                        s,
                    );
                }
            }
        }
    }
}

#[test]
fn half_precision_inputs_accumulate_in_f32() {
    // 3000 values of 60000 in f16: a running f16 sum would overflow to inf after two elements;
    // the mean is representable. bf16 sums of small values would stall at 256 without f32.
    let s = seed("half_precision_inputs_accumulate_in_f32");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        let big = Tensor::full(&[2, 3000], 60000.0, DType::F16, &dev).unwrap();
        assert_close(
            &big.mean(1, false).unwrap().to_f64_vec().unwrap(),
            &[60000.0; 2],
            1e-3,
            &format!("{dev} f16 mean"),
            s,
        );
        assert_close(
            &big.t()
                .unwrap()
                .mean(0, false)
                .unwrap()
                .to_f64_vec()
                .unwrap(),
            &[60000.0; 2],
            1e-3,
            &format!("{dev} f16 cols mean"),
            s,
        );
        let ones = Tensor::full(&[5000], 1.0, DType::BF16, &dev).unwrap();
        assert_close(
            &ones.sum(0, false).unwrap().to_f64_vec().unwrap(),
            &[5000.0],
            4e-3,
            &format!("{dev} bf16 sum"),
            s,
        );
        assert_close(
            &ones.sum_sq(0, false).unwrap().to_f64_vec().unwrap(),
            &[5000.0],
            4e-3,
            &format!("{dev} bf16 sum_sq"),
            s,
        );
    }
}

#[test]
fn sum_all_sums_everything_into_a_scalar() {
    let s = seed("sum_all_sums_everything_into_a_scalar");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for &dtype in &DType::FLOATS {
            for shape in [&[33, 7, 5][..], &[1], &[20011], &[]] {
                let t = Tensor::randn(shape, 1.0, 1.0, s, dtype, &Device::Cpu).unwrap();
                let want: f64 = t.to_f64_vec().unwrap().iter().sum();
                let got = t.to_device(&dev).unwrap().sum_all().unwrap();
                assert_eq!(got.shape(), &[] as &[usize]);
                assert_close(
                    &[got.to_scalar_f64().unwrap()],
                    &[want],
                    dtype.tolerance(),
                    &format!("{dev} {dtype} {shape:?}"),
                    s,
                );
            }
            // a transposed view goes through a copy first
            let t = Tensor::randn(&[9, 4], 1.0, 1.0, s, dtype, &Device::Cpu).unwrap();
            let want: f64 = t.to_f64_vec().unwrap().iter().sum();
            let got = t
                .to_device(&dev)
                .unwrap()
                .t()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar_f64()
                .unwrap();
            assert_close(
                &[got],
                &[want],
                dtype.tolerance(),
                &format!("{dev} {dtype} transposed"),
                s,
            );
        }
    }
}

#[test]
fn empty_axes_and_empty_outputs() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for &dtype in &DType::FLOATS {
            let t = Tensor::zeros(&[3, 0, 2], dtype, &dev).unwrap();
            let sum = t.sum(1, false).unwrap();
            assert_eq!(sum.shape(), &[3, 2]);
            assert!(
                sum.to_f64_vec().unwrap().iter().all(|&v| v == 0.0),
                "{dev} {dtype} empty sum"
            );
            assert!(t
                .sum_sq(1, true)
                .unwrap()
                .to_f64_vec()
                .unwrap()
                .iter()
                .all(|&v| v == 0.0));
            assert_eq!(t.sum_sq(1, true).unwrap().shape(), &[3, 1, 2]);
            assert!(
                t.mean(-2, false)
                    .unwrap()
                    .to_f64_vec()
                    .unwrap()
                    .iter()
                    .all(|v| v.is_nan()),
                "{dev} {dtype} empty mean"
            );
            for op in [ReduceOp::Max, ReduceOp::Min, ReduceOp::ArgMax] {
                let err = t.reduce(op, 1, false).unwrap_err().to_string();
                assert!(
                    err.contains("[3, 0, 2]") && err.contains(op.name()),
                    "{dev} {dtype}: {err}"
                );
            }
            // reducing a non-empty axis of an empty tensor gives an empty result, for every op
            for op in ReduceOp::ALL {
                let r = t.reduce(op, 0, false).unwrap();
                assert_eq!(r.shape(), &[0, 2]);
                assert_eq!(r.dtype(), op.out_dtype(dtype));
            }
            assert_eq!(t.sum_all().unwrap().to_scalar_f64().unwrap(), 0.0);
        }
    }
}

#[test]
fn scalars_and_bad_arguments() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        let x = Tensor::full(&[], 2.5, DType::F32, &dev).unwrap();
        for op in ReduceOp::ALL {
            for dim in [0, -1] {
                let r = x.reduce(op, dim, false).unwrap();
                assert_eq!(r.shape(), &[] as &[usize]);
                let want = match op {
                    ReduceOp::SumSq => 6.25,
                    ReduceOp::ArgMax => 0.0,
                    _ => 2.5,
                };
                assert_eq!(
                    r.to_scalar_f64().unwrap(),
                    want,
                    "{dev} scalar {}",
                    op.name()
                );
            }
            assert!(x.reduce(op, 1, false).is_err());
        }
        let t = Tensor::zeros(&[4, 5], DType::F32, &dev).unwrap();
        let err = t.sum(2, false).unwrap_err().to_string();
        assert!(err.contains("[4, 5]") && err.contains('2'), "{err}");
        assert!(t.max(-3, false).is_err());
        let ints = Tensor::zeros(&[4, 5], DType::I32, &dev).unwrap();
        let err = ints.sum(0, false).unwrap_err().to_string();
        assert!(err.contains("i32") && err.contains("[4, 5]"), "{err}");
    }
}

#[test]
fn odd_sizes_every_axis_on_gpu() {
    let s = seed("odd_sizes_every_axis_on_gpu");
    for dev in gpu_devices() {
        for (j, &a) in ODD_SIZES.iter().enumerate() {
            for &b in &ODD_SIZES[..3] {
                let shape = [b, a, 3];
                let cpu =
                    Tensor::rand_uniform(&shape, -2.0, 3.0, s + j as u64, DType::F16, &Device::Cpu)
                        .unwrap();
                let gpu = cpu.to_device(&dev).unwrap();
                for dim in [0, 1, 2] {
                    for op in ReduceOp::ALL {
                        let what = format!("{dev} {} f16 {shape:?} dim {dim}", op.name());
                        assert_tensor_close(
                            &gpu.reduce(op, dim, true).unwrap(),
                            &cpu.reduce(op, dim, true).unwrap(),
                            tol(op, DType::F16),
                            &what,
                            s,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn grid_stride_loops_cover_every_output() {
    // More rows or column tiles than a launch has blocks (about 2^20 threads), so every kernel
    // loops; the last rows must be written too.
    let s = seed("grid_stride_loops_cover_every_output");
    let cases: &[(&[usize], isize)] = &[
        (&[1_048_700, 2], 1),
        (&[32_800, 130], 1),
        (&[4097, 1025], 1),
        (&[4097, 8, 32], 1),
    ];
    for dev in gpu_devices() {
        for &(shape, dim) in cases {
            let cpu = Tensor::randn(shape, 0.5, 1.0, s, DType::F32, &Device::Cpu).unwrap();
            let gpu = cpu.to_device(&dev).unwrap();
            for op in [ReduceOp::Sum, ReduceOp::ArgMax] {
                let what = format!("{dev} {} {shape:?} dim {dim}", op.name());
                assert_tensor_close(
                    &gpu.reduce(op, dim, false).unwrap(),
                    &cpu.reduce(op, dim, false).unwrap(),
                    tol(op, DType::F32),
                    &what,
                    s,
                );
            }
        }
    }
}
