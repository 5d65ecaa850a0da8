//! Matrix multiplication: the CPU against an f64 triple loop, every GPU (the virtual one always)
//! against the CPU, for f32, f16 and bf16, every transpose combination, broadcast batches,
//! alpha/beta, edge sizes, unaligned leading dimensions and bad input.

mod common;

use common::{assert_close, assert_tensor_close, gpu_devices, seed, ODD_SIZES};
use vpr_engine::device::VgpuOptions;
use vpr_engine::layout::broadcast_shapes;
use vpr_engine::ops::matmul::{tensor_core_paths, with_tensor_core_path, TensorCorePath};
use vpr_engine::{DType, Device, Error, Tensor};

const CPU: Device = Device::Cpu;

fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    Tensor::rand_uniform(shape, -1.0, 1.0, seed, dtype, &CPU).unwrap()
}

/// `alpha * a @ b + beta * c` in f64 by a triple loop over the broadcast batch; returns the
/// product's shape and its elements.
fn reference(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    alpha: f64,
    beta: f64,
) -> (Vec<usize>, Vec<f64>) {
    let (sa, sb) = (a.shape(), b.shape());
    let (m, k, n) = (sa[sa.len() - 2], sa[sa.len() - 1], sb[sb.len() - 1]);
    let batch = broadcast_shapes(&sa[..sa.len() - 2], &sb[..sb.len() - 2]).unwrap();
    let full = |rows, cols| {
        batch
            .iter()
            .copied()
            .chain([rows, cols])
            .collect::<Vec<_>>()
    };
    let av = a.broadcast_to(&full(m, k)).unwrap().to_f64_vec().unwrap();
    let bv = b.broadcast_to(&full(k, n)).unwrap().to_f64_vec().unwrap();
    let out_shape = full(m, n);
    let cv = c.map(|c| c.broadcast_to(&out_shape).unwrap().to_f64_vec().unwrap());
    let batches: usize = batch.iter().product();
    let mut out = vec![0.0; batches * m * n];
    for z in 0..batches {
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| av[(z * m + i) * k + p] * bv[(z * k + p) * n + j])
                    .sum();
                let o = (z * m + i) * n + j;
                out[o] = alpha * dot + cv.as_ref().map_or(0.0, |cv| beta * cv[o]);
            }
        }
    }
    (out_shape, out)
}

fn check_cpu(a: &Tensor, b: &Tensor, what: &str, seed: u64) {
    let got = a.matmul(b).unwrap();
    let (shape, want) = reference(a, b, None, 1.0, 0.0);
    assert_eq!(got.shape(), &shape[..], "{what}");
    assert_close(
        &got.to_f64_vec().unwrap(),
        &want,
        a.dtype().tolerance(),
        what,
        seed,
    );
}

/// The same views taken on `dev` from the same storage, multiplied there and on the CPU.
fn check_device(
    dev: &Device,
    inputs: &[Tensor],
    f: impl Fn(&[Tensor]) -> Tensor,
    what: &str,
    seed: u64,
) {
    let on_dev: Vec<Tensor> = inputs.iter().map(|t| t.to_device(dev).unwrap()).collect();
    let got = f(&on_dev);
    let want = f(inputs);
    let what = format!("{what} on {dev}");
    assert_tensor_close(&got, &want, want.dtype().tolerance(), &what, seed);
}

fn view(t: &Tensor, transposed: bool) -> Tensor {
    if transposed {
        t.t().unwrap()
    } else {
        t.clone()
    }
}

/// Stored operands for an m x n x k product with the given transposes.
fn operands(
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    seed: u64,
    dtype: DType,
) -> Vec<Tensor> {
    let a = if ta {
        rand(&[k, m], seed, dtype)
    } else {
        rand(&[m, k], seed, dtype)
    };
    let b = if tb {
        rand(&[n, k], seed + 1, dtype)
    } else {
        rand(&[k, n], seed + 1, dtype)
    };
    vec![a, b]
}

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    let mut sizes = vec![(1, 1, 1), (128, 64, 96), (129, 65, 31), (0, 5, 3)];
    for &m in ODD_SIZES {
        for &n in ODD_SIZES {
            sizes.push((m, n, 33));
        }
        sizes.push((m, 7, 257));
    }
    for dtype in DType::FLOATS {
        for &(m, n, k) in &sizes {
            for (ta, tb) in TRANSPOSES {
                let x = operands(m, n, k, ta, tb, s, dtype);
                check_cpu(
                    &view(&x[0], ta),
                    &view(&x[1], tb),
                    &format!("cpu {dtype} {m}x{n}x{k} ta={ta} tb={tb}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn cpu_batched_alpha_beta_and_views() {
    let s = seed("cpu_batched_alpha_beta_and_views");
    for dtype in DType::FLOATS {
        let tol = dtype.tolerance();
        // broadcast batch dims, a 2-D operand against a batch, a transposed batch operand
        check_cpu(
            &rand(&[2, 1, 33, 40], s, dtype),
            &rand(&[3, 40, 17], s + 1, dtype),
            "cpu batch broadcast",
            s,
        );
        check_cpu(
            &rand(&[5, 7, 9], s, dtype),
            &rand(&[9, 4], s + 1, dtype),
            "cpu 3-D @ 2-D",
            s,
        );
        check_cpu(
            &rand(&[4, 6, 9], s, dtype).transpose(1, 2).unwrap(),
            &rand(&[4, 5, 6], s + 1, dtype).t().unwrap(),
            "cpu TT batch",
            s,
        );
        // no unit stride in the matrix dims: [4, 9, 5] with strides (1, 20, 4)
        let a = rand(&[9, 5, 4], s, dtype).permute(&[2, 0, 1]).unwrap();
        check_cpu(
            &a,
            &rand(&[5, 3], s + 2, dtype),
            "cpu strided batch view",
            s,
        );
        // alpha, beta with a full C, a bias row and a column
        let (a, b) = (rand(&[2, 31, 24], s, dtype), rand(&[24, 70], s + 1, dtype));
        for c_shape in [vec![2, 31, 70], vec![70], vec![31, 1]] {
            let c = rand(&c_shape, s + 2, dtype);
            let got = Tensor::gemm(&a, &b, Some(&c), 0.5, -2.0).unwrap();
            let (shape, want) = reference(&a, &b, Some(&c), 0.5, -2.0);
            assert_eq!(got.shape(), &shape[..]);
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                tol,
                &format!("cpu gemm {dtype} C {c_shape:?}"),
                s,
            );
        }
    }
}

#[test]
fn k_zero_and_beta_zero() {
    let s = seed("k_zero_and_beta_zero");
    let mut devices = vec![CPU];
    devices.extend(gpu_devices());
    for dev in &devices {
        for dtype in DType::FLOATS {
            let a = Tensor::zeros(&[3, 0], dtype, dev).unwrap();
            let b = Tensor::zeros(&[0, 4], dtype, dev).unwrap();
            assert_eq!(
                a.matmul(&b).unwrap().to_f64_vec().unwrap(),
                vec![0.0; 12],
                "{dtype} on {dev}"
            );
            let c = rand(&[3, 4], s, dtype);
            let got = Tensor::gemm(&a, &b, Some(&c.to_device(dev).unwrap()), 2.0, 0.5).unwrap();
            let want: Vec<f64> = c.to_f64_vec().unwrap().iter().map(|v| 0.5 * v).collect();
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                dtype.tolerance(),
                &format!("K=0 gemm {dtype} on {dev}"),
                s,
            );
            // beta == 0: C is not read, NaN in it does not propagate
            let nan = Tensor::full(&[3, 4], f64::NAN, dtype, dev).unwrap();
            let (x, y) = (rand(&[3, 5], s, dtype), rand(&[5, 4], s + 1, dtype));
            let got = Tensor::gemm(
                &x.to_device(dev).unwrap(),
                &y.to_device(dev).unwrap(),
                Some(&nan),
                1.0,
                0.0,
            )
            .unwrap();
            let (_, want) = reference(&x, &y, None, 1.0, 0.0);
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                dtype.tolerance(),
                &format!("beta=0, NaN C, {dtype} on {dev}"),
                s,
            );
            // empty products
            let e = Tensor::zeros(&[0, 5], dtype, dev)
                .unwrap()
                .matmul(&y.to_device(dev).unwrap())
                .unwrap();
            assert_eq!(e.shape(), &[0, 4]);
        }
    }
}

#[test]
fn vectors() {
    let s = seed("vectors");
    for dev in [CPU, Device::new("vgpu").unwrap()] {
        let (v, m) = (rand(&[9], s, DType::F32), rand(&[9, 4], s + 1, DType::F32));
        let (vd, md) = (v.to_device(&dev).unwrap(), m.to_device(&dev).unwrap());
        let row = vd.matmul(&md).unwrap();
        assert_eq!(row.shape(), &[4]);
        let (_, want) = reference(&v.unsqueeze(0).unwrap(), &m, None, 1.0, 0.0);
        assert_close(
            &row.to_f64_vec().unwrap(),
            &want,
            1e-5,
            "vector @ matrix",
            s,
        );
        let col = md.t().unwrap().matmul(&vd).unwrap();
        assert_eq!(col.shape(), &[4]);
        assert_close(
            &col.to_f64_vec().unwrap(),
            &want,
            1e-5,
            "matrix @ vector",
            s,
        );
        let dot = vd.matmul(&vd).unwrap();
        assert_eq!(dot.shape(), &[] as &[usize]);
        let want: f64 = v.to_f64_vec().unwrap().iter().map(|x| x * x).sum();
        assert_close(&dot.to_f64_vec().unwrap(), &[want], 1e-5, "dot", s);
    }
}

#[test]
fn gpu_matches_cpu_sizes() {
    let s = seed("gpu_matches_cpu_sizes");
    // ones, primes, exact tile multiples (128), one past them, K beyond the 4-stage pipeline
    let sizes = [
        (1, 1, 1),
        (7, 33, 257),
        (33, 1, 7),
        (1, 257, 33),
        (128, 128, 64),
        (129, 65, 31),
        (130, 7, 300),
    ];
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            for &(m, n, k) in &sizes {
                let x = operands(m, n, k, false, false, s, dtype);
                check_device(
                    &dev,
                    &x,
                    |t| t[0].matmul(&t[1]).unwrap(),
                    &format!("{dtype} {m}x{n}x{k}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn gpu_matches_cpu_transposes() {
    let s = seed("gpu_matches_cpu_transposes");
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            for &(m, n, k) in &[(65, 47, 40), (33, 130, 70)] {
                for (ta, tb) in TRANSPOSES {
                    let x = operands(m, n, k, ta, tb, s, dtype);
                    let f = |t: &[Tensor]| view(&t[0], ta).matmul(&view(&t[1], tb)).unwrap();
                    check_device(
                        &dev,
                        &x,
                        f,
                        &format!("{dtype} {m}x{n}x{k} ta={ta} tb={tb}"),
                        s,
                    );
                }
            }
        }
    }
}

#[test]
fn gpu_batched_and_alpha_beta() {
    let s = seed("gpu_batched_and_alpha_beta");
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            let x = vec![
                rand(&[2, 1, 33, 40], s, dtype),
                rand(&[3, 40, 17], s + 1, dtype),
            ];
            check_device(
                &dev,
                &x,
                |t| t[0].matmul(&t[1]).unwrap(),
                &format!("{dtype} batch broadcast"),
                s,
            );
            // batch of transposed operands: [3, 40, 20]^T @ [3, 9, 40]^T
            let x = vec![
                rand(&[3, 40, 20], s, dtype),
                rand(&[3, 9, 40], s + 1, dtype),
            ];
            check_device(
                &dev,
                &x,
                |t| t[0].t().unwrap().matmul(&t[1].t().unwrap()).unwrap(),
                &format!("{dtype} TT batch"),
                s,
            );
            // a 2-D weight shared by a 3-D activation (x @ w.t(), the Linear layer)
            let x = vec![rand(&[2, 5, 24], s, dtype), rand(&[12, 24], s + 1, dtype)];
            check_device(
                &dev,
                &x,
                |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
                &format!("{dtype} linear"),
                s,
            );
            // no unit stride in the matrix dims (made contiguous first): [4, 9, 5], strides (1, 20, 4)
            let x = vec![rand(&[9, 5, 4], s, dtype), rand(&[5, 3], s + 1, dtype)];
            let f = |t: &[Tensor]| t[0].permute(&[2, 0, 1]).unwrap().matmul(&t[1]).unwrap();
            check_device(&dev, &x, f, &format!("{dtype} strided batch view"), s);
            for c_shape in [vec![2, 31, 70], vec![70], vec![31, 1], vec![2, 1, 1]] {
                let x = vec![
                    rand(&[2, 31, 24], s, dtype),
                    rand(&[24, 70], s + 1, dtype),
                    rand(&c_shape, s + 2, dtype),
                ];
                let f = |t: &[Tensor]| Tensor::gemm(&t[0], &t[1], Some(&t[2]), 0.5, -2.0).unwrap();
                check_device(&dev, &x, f, &format!("{dtype} gemm C {c_shape:?}"), s);
            }
            let x = vec![rand(&[31, 24], s, dtype), rand(&[70, 24], s + 1, dtype)];
            check_device(
                &dev,
                &x,
                |t| Tensor::gemm(&t[0], &t[1].t().unwrap(), None, -1.5, 3.0).unwrap(),
                &format!("{dtype} alpha only"),
                s,
            );
        }
    }
}

#[test]
fn gpu_unaligned_leading_dimensions() {
    let s = seed("gpu_unaligned_leading_dimensions");
    for dev in gpu_devices() {
        for dtype in DType::FLOATS {
            // row stride 37 and offsets 1 and 2: no row starts on a 16-byte boundary in general
            let x = vec![rand(&[40, 37], s, dtype), rand(&[35, 37], s + 1, dtype)];
            let f = |t: &[Tensor]| {
                t[0].narrow(1, 1, 35)
                    .unwrap()
                    .matmul(&t[1].narrow(1, 2, 33).unwrap())
                    .unwrap()
            };
            check_device(&dev, &x, f, &format!("{dtype} NN row stride 37"), s);
            // every transpose combination with row stride 37: m, n, k = 30, 20, 33
            for (ta, tb) in TRANSPOSES {
                let (ar, ac) = if ta { (33, 30) } else { (30, 33) };
                let (br, bc) = if tb { (20, 33) } else { (33, 20) };
                let x = vec![rand(&[ar, 37], s, dtype), rand(&[br, 37], s + 1, dtype)];
                let f = |t: &[Tensor]| {
                    view(&t[0].narrow(1, 1, ac).unwrap(), ta)
                        .matmul(&view(&t[1].narrow(1, 2, bc).unwrap(), tb))
                        .unwrap()
                };
                check_device(
                    &dev,
                    &x,
                    f,
                    &format!("{dtype} ta={ta} tb={tb} row stride 37"),
                    s,
                );
            }
            // aligned rows at an offset of 8 elements (16 bytes): the cp.async path with a view offset
            let x = vec![rand(&[33, 48], s, dtype), rand(&[40, 24], s + 1, dtype)];
            let f = |t: &[Tensor]| {
                t[0].narrow(1, 8, 40)
                    .unwrap()
                    .matmul(&t[1].narrow(1, 8, 16).unwrap())
                    .unwrap()
            };
            check_device(&dev, &x, f, &format!("{dtype} offset 8"), s);
        }
    }
}

#[test]
fn vgpu_shuffled_schedule() {
    // a shuffled thread order turns a missing barrier in the pipelines into wrong results
    let s = seed("vgpu_shuffled_schedule");
    let dev = Device::vgpu_with(VgpuOptions::with_seed(s | 1));
    for dtype in DType::FLOATS {
        let x = operands(70, 40, 200, false, true, s, dtype);
        check_device(
            &dev,
            &x,
            |t| t[0].matmul(&t[1].t().unwrap()).unwrap(),
            &format!("{dtype} shuffled schedule"),
            s,
        );
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::matmul::conformance, "matmul conformance");
}

fn shape_message(r: vpr_engine::Result<Tensor>) -> String {
    match r {
        Err(Error::Shape(m)) => m,
        other => panic!("expected a shape error, got {other:?}"),
    }
}

#[test]
fn errors() {
    let f32 = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &CPU).unwrap();
    let m = shape_message(f32(&[3, 4]).matmul(&f32(&[5, 6])));
    assert!(m.contains("[3, 4]") && m.contains("[5, 6]"), "{m}");
    let m = shape_message(f32(&[2, 3, 4]).matmul(&f32(&[3, 4, 6])));
    assert!(m.contains("[2, 3, 4]") && m.contains("[3, 4, 6]"), "{m}");
    let m = shape_message(f32(&[4]).matmul(&f32(&[5])));
    assert!(m.contains("[4]") && m.contains("[5]"), "{m}");
    let m = shape_message(Tensor::gemm(
        &f32(&[3, 4]),
        &f32(&[4, 6]),
        Some(&f32(&[5])),
        1.0,
        1.0,
    ));
    assert!(m.contains("[5]") && m.contains("[3, 6]"), "{m}");
    assert!(matches!(
        Tensor::gemm(&f32(&[4]), &f32(&[4, 2]), None, 1.0, 0.0),
        Err(Error::Shape(_))
    ));
    let scalar = Tensor::zeros(&[], DType::F32, &CPU).unwrap();
    assert!(matches!(scalar.matmul(&f32(&[1])), Err(Error::Shape(_))));

    let bf = Tensor::zeros(&[4, 2], DType::BF16, &CPU).unwrap();
    match f32(&[3, 4]).matmul(&bf) {
        Err(Error::DType(m)) => assert!(
            m.contains("f32") && m.contains("bf16") && m.contains("[3, 4]"),
            "{m}"
        ),
        other => panic!("expected a dtype error, got {other:?}"),
    }
    let ints = Tensor::zeros(&[2, 2], DType::I32, &CPU).unwrap();
    assert!(matches!(ints.matmul(&ints), Err(Error::DType(_))));
    let c16 = Tensor::zeros(&[3, 2], DType::F16, &CPU).unwrap();
    assert!(matches!(
        Tensor::gemm(&f32(&[3, 4]), &f32(&[4, 2]), Some(&c16), 1.0, 1.0),
        Err(Error::DType(_))
    ));

    let on_vgpu = f32(&[4, 2])
        .to_device(&Device::new("vgpu").unwrap())
        .unwrap();
    assert!(matches!(
        f32(&[3, 4]).matmul(&on_vgpu),
        Err(Error::Device(_))
    ));
}

/// Forcing a tensor-core family: every family computes the same product where it applies; TMA on
/// operands that do not allow tensor maps is a clear error, not a silent fallback.
#[test]
fn forced_tensor_core_paths() {
    let s = seed("forced_tensor_core_paths");
    let dev = Device::vgpu_with(VgpuOptions::default());
    let gpu = dev.gpu().unwrap().clone();
    for dtype in [DType::BF16, DType::F16] {
        let x = operands(136, 264, 328, false, true, s, dtype);
        let want = x[0].matmul(&x[1].t().unwrap()).unwrap();
        let (a, b) = (x[0].to_device(&dev).unwrap(), x[1].to_device(&dev).unwrap());
        for &path in tensor_core_paths(&gpu, dtype) {
            let got = with_tensor_core_path(path.unwrap(), || a.matmul(&b.t().unwrap())).unwrap();
            assert_tensor_close(
                &got,
                &want,
                dtype.tolerance(),
                &format!("{dtype} {path:?}"),
                s,
            );
        }
        let odd = operands(7, 9, 33, false, false, s, dtype);
        let (a, b) = (
            odd[0].to_device(&dev).unwrap(),
            odd[1].to_device(&dev).unwrap(),
        );
        let err = with_tensor_core_path(TensorCorePath::WgmmaTma, || a.matmul(&b)).unwrap_err();
        assert!(
            matches!(err, Error::Argument(_)) && err.to_string().contains("16-byte-aligned"),
            "{err}"
        );
    }
}
