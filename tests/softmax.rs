//! softmax and log_softmax: the CPU against an f64 reference, the virtual GPU (and a real one when
//! present) against the CPU, normalisation, special values, large magnitudes, other dimensions.

mod common;

use common::{assert_close, assert_tensor_close, gpu_devices, seed, ODD_SIZES};
use vpr_engine::{DType, Device, Tensor};

/// softmax of each row as 1 / sum_j exp(x_j - x_i), a formula unlike the implementations', and
/// log_softmax as -log of that sum; the sum is scaled by its largest term so that it cannot
/// overflow for large magnitudes.
fn reference(x: &[f64], n: usize, log: bool) -> Vec<f64> {
    x.chunks(n)
        .flat_map(|row| {
            row.iter().map(move |&xi| {
                let top = row
                    .iter()
                    .map(|&xj| xj - xi)
                    .fold(f64::NEG_INFINITY, f64::max);
                let log_s = top
                    + row
                        .iter()
                        .map(|&xj| (xj - xi - top).exp())
                        .sum::<f64>()
                        .ln();
                if log {
                    -log_s
                } else {
                    (-log_s).exp()
                }
            })
        })
        .collect()
}

fn run(t: &Tensor, log: bool) -> Tensor {
    if log {
        t.log_softmax(-1).unwrap()
    } else {
        t.softmax(-1).unwrap()
    }
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &n) in ODD_SIZES.iter().chain(&[1000]).enumerate() {
            let t = Tensor::randn(
                &[5, n],
                0.0,
                4.0,
                s + (i * 8 + j) as u64,
                dtype,
                &Device::Cpu,
            )
            .unwrap();
            let x = t.to_f64_vec().unwrap();
            for log in [false, true] {
                let what = format!("cpu log={log} {dtype} n {n}");
                assert_close(
                    &run(&t, log).to_f64_vec().unwrap(),
                    &reference(&x, n, log),
                    dtype.tolerance(),
                    &what,
                    s,
                );
            }
        }
    }
}

#[test]
fn gpu_matches_cpu_for_short_and_long_rows() {
    let s = seed("gpu_matches_cpu_for_short_and_long_rows");
    // warp path up to 1024, block path beyond, many rows; few rows of 16384 and more are split
    // into chunks (one row over 100k, 64 rows at the threshold, 128 rows just past the split's
    // row limit)
    let cases: &[&[usize]] = &[
        &[1],
        &[7],
        &[3, 33],
        &[257, 5],
        &[2, 3, 257],
        &[2, 1024],
        &[3, 1025],
        &[2, 5003],
        &[100_003],
        &[64, 16384],
        &[128, 16411],
    ];
    for dev in gpu_devices() {
        for (i, &dtype) in DType::FLOATS.iter().enumerate() {
            for (j, &shape) in cases.iter().enumerate() {
                let cpu = Tensor::randn(
                    shape,
                    1.0,
                    3.0,
                    s + (i * 16 + j) as u64,
                    dtype,
                    &Device::Cpu,
                )
                .unwrap();
                let gpu = cpu.to_device(&dev).unwrap();
                for log in [false, true] {
                    let what = format!("{dev} log={log} {dtype} {shape:?}");
                    let got = run(&gpu, log);
                    assert_eq!(got.dtype(), dtype);
                    assert_tensor_close(&got, &run(&cpu, log), dtype.tolerance(), &what, s);
                }
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::softmax::conformance, "softmax conformance");
}

#[test]
fn rows_sum_to_one_and_log_softmax_is_log_of_softmax() {
    let s = seed("rows_sum_to_one_and_log_softmax_is_log_of_softmax");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for &dtype in &DType::FLOATS {
            for n in [1, 33, 1500, 20011] {
                let t = Tensor::randn(&[3, n], 0.0, 5.0, s + n as u64, dtype, &dev).unwrap();
                let p = t.softmax(-1).unwrap().to_f64_vec().unwrap();
                let sums: Vec<f64> = p.chunks(n).map(|r| r.iter().sum()).collect();
                // each stored probability is rounded to the dtype once
                let tol = dtype.tolerance() * 2.0;
                assert_close(
                    &sums,
                    &[1.0; 3],
                    tol,
                    &format!("{dev} {dtype} n {n} row sums"),
                    s,
                );
                let lp = t.log_softmax(-1).unwrap().to_f64_vec().unwrap();
                let log_p: Vec<f64> = p.iter().map(|v| v.ln()).collect();
                // compared where p is not tiny: there the log of a rounded probability is meaningful
                let (got, want): (Vec<f64>, Vec<f64>) = lp
                    .iter()
                    .zip(&log_p)
                    .filter(|(_, lq)| **lq > -10.0)
                    .map(|(a, b)| (*a, *b))
                    .unzip();
                assert!(!got.is_empty());
                assert_close(
                    &got,
                    &want,
                    tol,
                    &format!("{dev} {dtype} n {n} log_softmax vs log(softmax)"),
                    s,
                );
            }
        }
    }
}

#[test]
fn large_magnitudes_do_not_overflow() {
    let s = seed("large_magnitudes_do_not_overflow");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for (dtype, scale) in [
            (DType::F32, 1000.0),
            (DType::F32, 1e30),
            (DType::F16, 8000.0),
            (DType::BF16, 1e30),
        ] {
            for n in [7, 1030] {
                let cpu =
                    Tensor::randn(&[4, n], 0.0, scale, s + n as u64, dtype, &Device::Cpu).unwrap();
                let x = cpu.to_f64_vec().unwrap();
                let t = cpu.to_device(&dev).unwrap();
                for log in [false, true] {
                    let what = format!("{dev} log={log} {dtype} scale {scale} n {n}");
                    let got = run(&t, log).to_f64_vec().unwrap();
                    assert!(got.iter().all(|v| !v.is_nan()), "{what}: NaN");
                    assert_close(&got, &reference(&x, n, log), dtype.tolerance(), &what, s);
                }
            }
        }
    }
}

#[test]
fn special_values_follow_torch() {
    let inf = f64::INFINITY;
    let nan = f64::NAN;
    // rows of 3: (input, softmax, log_softmax), as torch.softmax gives them
    let rows: [([f64; 3], [f64; 3], [f64; 3]); 5] = [
        (
            [-inf, 0.0, 0.0],
            [0.0, 0.5, 0.5],
            [-inf, -std::f64::consts::LN_2, -std::f64::consts::LN_2],
        ),
        ([-inf, -inf, -inf], [nan; 3], [nan; 3]),
        ([1.0, nan, 2.0], [nan; 3], [nan; 3]),
        ([inf, 1.0, 2.0], [nan; 3], [nan; 3]),
        ([0.0, -inf, -inf], [1.0, 0.0, 0.0], [0.0, -inf, -inf]),
    ];
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for &dtype in &DType::FLOATS {
            // each row of 3 repeated to length 1100 too, so the block kernel sees it
            for reps in [1, 367] {
                for (x, p, lp) in &rows {
                    let xs: Vec<f64> = x.iter().cycle().take(3 * reps).cloned().collect();
                    let t = Tensor::from_f64(&xs, &[1, 3 * reps], dtype, &dev).unwrap();
                    let what = format!("{dev} {dtype} {x:?} x{reps}");
                    let scale = 1.0 / reps as f64;
                    let want_p: Vec<f64> =
                        p.iter().cycle().take(3 * reps).map(|v| v * scale).collect();
                    let want_lp: Vec<f64> = lp
                        .iter()
                        .cycle()
                        .take(3 * reps)
                        .map(|v| v - (reps as f64).ln())
                        .collect();
                    assert_close(
                        &t.softmax(-1).unwrap().to_f64_vec().unwrap(),
                        &want_p,
                        dtype.tolerance(),
                        &format!("softmax {what}"),
                        0,
                    );
                    assert_close(
                        &t.log_softmax(-1).unwrap().to_f64_vec().unwrap(),
                        &want_lp,
                        dtype.tolerance(),
                        &format!("log_softmax {what}"),
                        0,
                    );
                }
            }
        }
    }
}

/// Rows long enough to be split into chunks, each chunk a block: -inf chunks, one finite element in
/// the last chunk, a NaN in one chunk only.
#[test]
fn special_values_across_split_chunks() {
    let n = 40_000;
    let inf = f64::INFINITY;
    let mut one_hot = vec![-inf; n];
    one_hot[n - 1] = 0.0;
    let mut p_one_hot = vec![0.0; n];
    p_one_hot[n - 1] = 1.0;
    let mut nan_in_one_chunk = vec![0.5; n];
    nan_in_one_chunk[5] = f64::NAN;
    let cases = [
        (one_hot.clone(), p_one_hot, one_hot),
        (nan_in_one_chunk, vec![f64::NAN; n], vec![f64::NAN; n]),
        (vec![-inf; n], vec![f64::NAN; n], vec![f64::NAN; n]),
    ];
    for dev in gpu_devices() {
        for &dtype in &DType::FLOATS {
            for (i, (x, p, lp)) in cases.iter().enumerate() {
                let t = Tensor::from_f64(x, &[1, n], dtype, &dev).unwrap();
                let what = format!("{dev} {dtype} case {i}");
                assert_close(
                    &t.softmax(-1).unwrap().to_f64_vec().unwrap(),
                    p,
                    dtype.tolerance(),
                    &format!("softmax {what}"),
                    0,
                );
                assert_close(
                    &t.log_softmax(-1).unwrap().to_f64_vec().unwrap(),
                    lp,
                    dtype.tolerance(),
                    &format!("log_softmax {what}"),
                    0,
                );
            }
        }
    }
}

#[test]
fn other_dimensions_and_views() {
    let s = seed("other_dimensions_and_views");
    let cpu = Tensor::randn(&[4, 6, 33], 0.0, 2.0, s, DType::F32, &Device::Cpu).unwrap();
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        let t = cpu.to_device(&dev).unwrap();
        for dim in [0isize, 1, -2, 2] {
            for log in [false, true] {
                let got = if log {
                    t.log_softmax(dim)
                } else {
                    t.softmax(dim)
                }
                .unwrap();
                // the same through an explicit move of `dim` to the end on the CPU
                let d = dim.rem_euclid(3);
                let moved = cpu.transpose(d, -1).unwrap().contiguous().unwrap();
                let want = reference(&moved.to_f64_vec().unwrap(), moved.shape()[2], log);
                let want = Tensor::from_f64(&want, moved.shape(), DType::F32, &Device::Cpu)
                    .unwrap()
                    .transpose(d, -1)
                    .unwrap();
                assert_tensor_close(&got, &want, 1e-5, &format!("{dev} dim {dim} log={log}"), s);
            }
        }
        // a non-contiguous view along its last axis
        let view = t.transpose(0, 2).unwrap().narrow(2, 1, 3).unwrap();
        let want = cpu
            .transpose(0, 2)
            .unwrap()
            .narrow(2, 1, 3)
            .unwrap()
            .softmax(-1)
            .unwrap();
        assert_tensor_close(
            &view.softmax(-1).unwrap(),
            &want,
            1e-5,
            &format!("{dev} view"),
            s,
        );
    }
}

#[test]
fn empty_scalar_and_bad_input() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for dev in devices {
        for shape in [&[0, 5][..], &[5, 0], &[0]] {
            let e = Tensor::zeros(shape, DType::BF16, &dev).unwrap();
            assert_eq!(e.softmax(-1).unwrap().shape(), shape);
            assert_eq!(e.log_softmax(0).unwrap().shape(), shape);
        }
        let x = Tensor::full(&[], 3.0, DType::F16, &dev).unwrap();
        assert_eq!(x.softmax(0).unwrap().to_scalar_f64().unwrap(), 1.0);
        assert_eq!(x.log_softmax(-1).unwrap().to_scalar_f64().unwrap(), 0.0);
        assert!(x.softmax(1).is_err());
        let t = Tensor::zeros(&[2, 3], DType::F32, &dev).unwrap();
        let err = t.softmax(2).unwrap_err().to_string();
        assert!(err.contains("[2, 3]"), "{err}");
        let ints = Tensor::zeros(&[2, 3], DType::I64, &dev).unwrap();
        let err = ints.log_softmax(-1).unwrap_err().to_string();
        assert!(err.contains("i64") && err.contains("[2, 3]"), "{err}");
    }
}

#[test]
fn grid_stride_loops_cover_every_row() {
    // More rows than a launch has warps or blocks (about 2^20 threads), so the kernels loop.
    let s = seed("grid_stride_loops_cover_every_row");
    for dev in gpu_devices() {
        for shape in [[1_048_700, 2], [32_800, 130], [8193, 1025]] {
            let cpu = Tensor::randn(&shape, 0.0, 2.0, s, DType::F32, &Device::Cpu).unwrap();
            let got = cpu.to_device(&dev).unwrap().softmax(-1).unwrap();
            assert_tensor_close(
                &got,
                &cpu.softmax(-1).unwrap(),
                1e-5,
                &format!("{dev} {shape:?}"),
                s,
            );
        }
    }
}
