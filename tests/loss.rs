//! Cross-entropy: CPU against an f64 reference of F.cross_entropy, the virtual GPU (and CUDA when
//! present) against the CPU, gradients by finite differences, ignore_index, special values and
//! bad input.
mod common;

use common::{assert_close, gpu_devices, seed};
use vpr_engine::autograd::{self, gradcheck};
use vpr_engine::ops::loss::{Reduction, IGNORE_INDEX};
use vpr_engine::tensor::Rng;
use vpr_engine::{DType, Device, Error, Tensor};

const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 33), (33, 7), (257, 3), (5, 1030), (2, 0)];

/// Labels in 0..c with about one row in four ignored (all ignored when c = 0).
fn labels(n: usize, c: usize, rng: &mut Rng) -> Vec<i64> {
    (0..n)
        .map(|_| {
            if c == 0 || rng.below(4) == 0 {
                IGNORE_INDEX
            } else {
                rng.below(c as u64) as i64
            }
        })
        .collect()
}

/// F.cross_entropy in f64 on the (already rounded) logits: the loss and d loss / d logits
/// times `g`.
fn reference(x: &[f64], y: &[i64], c: usize, reduction: Reduction, g: f64) -> (f64, Vec<f64>) {
    let n = y.len();
    let count = y.iter().filter(|&&l| l != IGNORE_INDEX).count() as f64;
    let div = match reduction {
        Reduction::Mean => count,
        Reduction::Sum => 1.0,
    };
    let mut total = 0.0;
    let mut grad = vec![0.0; n * c];
    for r in 0..n {
        if y[r] == IGNORE_INDEX {
            continue;
        }
        let row = &x[r * c..(r + 1) * c];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - row[y[r] as usize];
        for j in 0..c {
            let hot = if j as i64 == y[r] { 1.0 } else { 0.0 };
            grad[r * c + j] = g / div * ((row[j] - lse).exp() - hot);
        }
    }
    (total / div, grad)
}

/// The loss and the gradient of `g * loss` with respect to the logits on `device`.
fn run(x: &Tensor, y: &[i64], reduction: Reduction, g: f64, device: &Device) -> (Tensor, Tensor) {
    let xd = x.to_device(device).unwrap().requires_grad();
    let yd = Tensor::from_slice(y, &[y.len()], device).unwrap();
    let loss = xd.cross_entropy(&yd, reduction).unwrap();
    assert_eq!(loss.shape(), &[] as &[usize]);
    assert_eq!(loss.dtype(), DType::F32);
    let seed = Tensor::full(&[], g, DType::F32, device).unwrap();
    let grads = autograd::backward_with(&loss, seed).unwrap();
    let gx = grads.get(&xd).expect("a gradient for the logits").clone();
    assert_eq!(gx.dtype(), x.dtype());
    (loss, gx)
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    let mut rng = Rng::new(s);
    for &dtype in &DType::FLOATS {
        for &(n, c) in SHAPES {
            for reduction in [Reduction::Mean, Reduction::Sum] {
                let x =
                    Tensor::randn(&[n, c], 0.0, 4.0, rng.next_u64(), dtype, &Device::Cpu).unwrap();
                let y = labels(n, c, &mut rng);
                let g = 0.5 + rng.uniform();
                let (loss, gx) = run(&x, &y, reduction, g, &Device::Cpu);
                let (want_loss, want_grad) =
                    reference(&x.to_f64_vec().unwrap(), &y, c, reduction, g);
                let what = format!("{dtype} [{n}, {c}] {reduction:?}");
                assert_close(
                    &loss.to_f64_vec().unwrap(),
                    &[want_loss],
                    1e-5,
                    &format!("loss {what}"),
                    s,
                );
                assert_close(
                    &gx.to_f64_vec().unwrap(),
                    &want_grad,
                    dtype.tolerance(),
                    &format!("grad {what}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn gpu_matches_cpu() {
    let s = seed("gpu_matches_cpu");
    let mut rng = Rng::new(s);
    for device in gpu_devices() {
        for &dtype in &DType::FLOATS {
            for &(n, c) in SHAPES {
                let reduction = if rng.below(2) == 0 {
                    Reduction::Mean
                } else {
                    Reduction::Sum
                };
                let x =
                    Tensor::randn(&[n, c], 0.0, 4.0, rng.next_u64(), dtype, &Device::Cpu).unwrap();
                let y = labels(n, c, &mut rng);
                let (got_loss, got_grad) = run(&x, &y, reduction, 1.25, &device);
                let (want_loss, want_grad) = run(&x, &y, reduction, 1.25, &Device::Cpu);
                let what = format!("{device} {dtype} [{n}, {c}] {reduction:?}");
                let loss = |t: &Tensor| t.to_f64_vec().unwrap();
                assert_close(
                    &loss(&got_loss),
                    &loss(&want_loss),
                    1e-5,
                    &format!("loss {what}"),
                    s,
                );
                assert_close(
                    &got_grad.to_f64_vec().unwrap(),
                    &want_grad.to_f64_vec().unwrap(),
                    dtype.tolerance(),
                    &format!("grad {what}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn gradient_matches_finite_differences() {
    let s = seed("gradient_matches_finite_differences");
    let mut rng = Rng::new(s);
    for reduction in [Reduction::Mean, Reduction::Sum] {
        let (n, c) = (6, 5);
        let x = Tensor::randn(&[n, c], 0.0, 1.5, s, DType::F32, &Device::Cpu).unwrap();
        let mut y = labels(n, c, &mut rng);
        y[0] = 2; // at least one row counts
        let y = Tensor::from_vec(y, &[n], &Device::Cpu).unwrap();
        let check = gradcheck(|xs| xs[0].cross_entropy(&y, reduction), &[x], 1e-2, s).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "{reduction:?}: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
    }
}

#[test]
fn ignored_rows_count_for_nothing() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let x = Tensor::randn(&[3, 4], 0.0, 1.0, 7, DType::F32, &Device::Cpu).unwrap();
        // ignoring a row equals dropping it
        let (loss, gx) = run(&x, &[1, IGNORE_INDEX, 3], Reduction::Mean, 1.0, &device);
        let kept = Tensor::cat(
            &[&x.narrow(0, 0, 1).unwrap(), &x.narrow(0, 2, 1).unwrap()],
            0,
        )
        .unwrap();
        let (want, want_grad) = run(&kept, &[1, 3], Reduction::Mean, 1.0, &device);
        assert_eq!(
            loss.to_f64_vec().unwrap(),
            want.to_f64_vec().unwrap(),
            "{device}"
        );
        let g = gx.to_f64_vec().unwrap();
        assert!(
            g[4..8].iter().all(|&v| v == 0.0),
            "{device}: ignored row has gradient {g:?}"
        );
        assert_eq!(&g[..4], &want_grad.to_f64_vec().unwrap()[..4], "{device}");
        // a custom ignore index
        let yd = Tensor::from_slice(&[1i64, 0, 0], &[3], &device).unwrap();
        let l = x
            .to_device(&device)
            .unwrap()
            .cross_entropy_with(&yd, Reduction::Sum, 0)
            .unwrap();
        let (want, _) = run(
            &x.narrow(0, 0, 1).unwrap(),
            &[1],
            Reduction::Sum,
            1.0,
            &device,
        );
        assert_eq!(
            l.to_f64_vec().unwrap(),
            want.to_f64_vec().unwrap(),
            "{device}"
        );
        // everything ignored: mean is 0/0 = NaN as in PyTorch, sum 0, no gradient
        let all = [IGNORE_INDEX; 3];
        let (mean, g) = run(&x, &all, Reduction::Mean, 1.0, &device);
        assert!(mean.to_scalar_f64().unwrap().is_nan(), "{device}");
        assert!(
            g.to_f64_vec().unwrap().iter().all(|&v| v == 0.0),
            "{device}"
        );
        let (sum, _) = run(&x, &all, Reduction::Sum, 1.0, &device);
        assert_eq!(sum.to_scalar_f64().unwrap(), 0.0, "{device}");
    }
}

#[test]
fn special_values_follow_pytorch() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let ninf = f32::NEG_INFINITY;
        // -inf logits of other classes are fine; NaN or +inf anywhere in a counted row gives NaN
        let cases: [(&[f32], f64); 4] = [
            (&[0.0, ninf, 1.0], (1.0f64.exp() + 1.0).ln()),
            (&[0.0, f32::NAN, 1.0], f64::NAN),
            (&[0.0, f32::INFINITY, 1.0], f64::NAN),
            (&[ninf, ninf, ninf], f64::NAN),
        ];
        for (row, want) in cases {
            let x = Tensor::from_slice(row, &[1, 3], &device).unwrap();
            let y = Tensor::from_slice(&[0i64], &[1], &device).unwrap();
            let got = x
                .cross_entropy(&y, Reduction::Mean)
                .unwrap()
                .to_scalar_f64()
                .unwrap();
            if want.is_nan() {
                assert!(got.is_nan(), "{device} {row:?}: {got}");
            } else {
                assert!(
                    (got - want).abs() < 1e-6,
                    "{device} {row:?}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn bad_input_is_a_clear_error() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[2, 3], DType::F32, &cpu).unwrap();
    let y = |v: &[i64]| Tensor::from_slice(v, &[v.len()], &cpu).unwrap();
    for bad in [[0, 3], [-1, 0], [0, -101]] {
        match x.cross_entropy(&y(&bad), Reduction::Mean) {
            Err(Error::Argument(m)) => assert!(m.contains("outside 0..3"), "{m}"),
            other => panic!("labels {bad:?}: {other:?}"),
        }
    }
    let y32 = Tensor::from_slice(&[0i32, 1], &[2], &cpu).unwrap();
    assert!(
        matches!(x.cross_entropy(&y32, Reduction::Mean), Err(Error::DType(m)) if m.contains("i64"))
    );
    assert!(
        matches!(x.cross_entropy(&y(&[0]), Reduction::Mean), Err(Error::Shape(m)) if m.contains("[2, 3]"))
    );
    let flat = Tensor::zeros(&[3], DType::F32, &cpu).unwrap();
    assert!(matches!(
        flat.cross_entropy(&y(&[0, 1, 2]), Reduction::Sum),
        Err(Error::Shape(_))
    ));
    let ints = Tensor::zeros(&[2, 3], DType::I32, &cpu).unwrap();
    assert!(matches!(
        ints.cross_entropy(&y(&[0, 1]), Reduction::Sum),
        Err(Error::DType(_))
    ));
    let vgpu = Device::new("vgpu").unwrap();
    let yg = Tensor::from_slice(&[0i64, 1], &[2], &vgpu).unwrap();
    assert!(matches!(
        x.cross_entropy(&yg, Reduction::Sum),
        Err(Error::Device(_))
    ));
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::loss::conformance, "loss conformance");
}
