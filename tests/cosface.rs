//! CosFace: the margin cross-entropy kernels against an f64 reference on the CPU, the virtual GPU
//! (and CUDA when present) against the CPU, and the whole classifier (cosines, margin, loss)
//! against f64 with finite-difference gradients for descriptors and class weights.
mod common;

use common::{assert_close, gpu_devices, seed};
use vpr_engine::autograd::{self, gradcheck};
use vpr_engine::nn::{class_cosines, MarginCosineProduct};
use vpr_engine::tensor::Rng;
use vpr_engine::{DType, Device, Tensor};

const SHAPES: &[(usize, usize)] = &[(1, 1), (7, 33), (32, 257), (5, 1030)];

/// Mean cross-entropy of `s (cos - m onehot)` in f64, and its gradient with respect to `cos`.
fn reference(cos: &[f64], y: &[i64], c: usize, s: f64, m: f64) -> (f64, Vec<f64>) {
    let n = y.len();
    let mut total = 0.0;
    let mut grad = vec![0.0; n * c];
    for r in 0..n {
        let z: Vec<f64> = (0..c)
            .map(|j| s * (cos[r * c + j] - if j as i64 == y[r] { m } else { 0.0 }))
            .collect();
        let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = top + z.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
        total += lse - z[y[r] as usize];
        for j in 0..c {
            let hot = if j as i64 == y[r] { 1.0 } else { 0.0 };
            grad[r * c + j] = s / n as f64 * ((z[j] - lse).exp() - hot);
        }
    }
    (total / n as f64, grad)
}

fn labels(n: usize, c: usize, rng: &mut Rng) -> Vec<i64> {
    (0..n).map(|_| rng.below(c as u64) as i64).collect()
}

fn run(cos: &Tensor, y: &[i64], s: f32, m: f32, device: &Device) -> (Tensor, Tensor) {
    let xd = cos.to_device(device).unwrap().requires_grad();
    let yd = Tensor::from_slice(y, &[y.len()], device).unwrap();
    let loss = xd.margin_cross_entropy(&yd, s, m).unwrap();
    let grads = autograd::backward(&loss).unwrap();
    let g = grads.get(&xd).expect("a gradient for the cosines").clone();
    (loss, g)
}

#[test]
fn margin_loss_matches_f64_on_the_cpu() {
    let sd = seed("margin_loss_matches_f64_on_the_cpu");
    let mut rng = Rng::new(sd);
    for &dtype in &DType::FLOATS {
        for &(n, c) in SHAPES {
            for (s, m) in [(30.0, 0.4), (100.0, 0.4), (1.0, 0.0)] {
                let cos =
                    Tensor::rand_uniform(&[n, c], -1.0, 1.0, rng.next_u64(), dtype, &Device::Cpu)
                        .unwrap();
                let y = labels(n, c, &mut rng);
                let (loss, g) = run(&cos, &y, s, m, &Device::Cpu);
                let (want, want_g) =
                    reference(&cos.to_f64_vec().unwrap(), &y, c, s as f64, m as f64);
                let what = format!("{dtype} [{n}, {c}] s {s} m {m}");
                // the logits are rounded to f32 once (|z| <= s), so the loss carries s ulps
                let tol = 1e-6 * s as f64;
                assert_close(
                    &loss.to_f64_vec().unwrap(),
                    &[want],
                    tol,
                    &format!("loss {what}"),
                    sd,
                );
                assert_close(
                    &g.to_f64_vec().unwrap(),
                    &want_g,
                    dtype.tolerance().max(tol),
                    &format!("grad {what}"),
                    sd,
                );
            }
        }
    }
}

#[test]
fn margin_loss_on_gpus_matches_the_cpu() {
    let sd = seed("margin_loss_on_gpus_matches_the_cpu");
    let mut rng = Rng::new(sd);
    for device in gpu_devices() {
        for &dtype in &DType::FLOATS {
            for &(n, c) in SHAPES {
                let cos =
                    Tensor::rand_uniform(&[n, c], -1.0, 1.0, rng.next_u64(), dtype, &Device::Cpu)
                        .unwrap();
                let y = labels(n, c, &mut rng);
                let (got, got_g) = run(&cos, &y, 30.0, 0.4, &device);
                let (want, want_g) = run(&cos, &y, 30.0, 0.4, &Device::Cpu);
                let what = format!("{device} {dtype} [{n}, {c}]");
                assert_close(
                    &got.to_f64_vec().unwrap(),
                    &want.to_f64_vec().unwrap(),
                    1e-5,
                    &format!("loss {what}"),
                    sd,
                );
                assert_close(
                    &got_g.to_f64_vec().unwrap(),
                    &want_g.to_f64_vec().unwrap(),
                    dtype.tolerance(),
                    &format!("grad {what}"),
                    sd,
                );
            }
        }
    }
}

/// The classifier's loss in f64 from descriptors `x [n, d]` and weights `w [c, d]`.
fn classifier_reference(x: &[f64], w: &[f64], y: &[i64], d: usize, s: f64, m: f64) -> f64 {
    let (n, c) = (y.len(), w.len() / d);
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let mut cos = vec![0.0; n * c];
    for r in 0..n {
        let xr = &x[r * d..(r + 1) * d];
        for j in 0..c {
            let wj = &w[j * d..(j + 1) * d];
            let dot: f64 = xr.iter().zip(wj).map(|(a, b)| a * b).sum();
            cos[r * c + j] = dot / (norm(xr) * norm(wj)).max(1e-8);
        }
    }
    reference(&cos, y, c, s, m).0
}

#[test]
fn classifier_matches_f64_and_finite_differences() {
    let sd = seed("classifier_matches_f64_and_finite_differences");
    let mut rng = Rng::new(sd);
    let (n, d, c) = (6, 9, 11);
    let cpu = Device::Cpu;
    let head =
        MarginCosineProduct::new("classifier", d, c, 30.0, 0.4, rng.next_u64(), &cpu).unwrap();
    let x = Tensor::randn(&[n, d], 0.0, 1.0, rng.next_u64(), DType::F32, &cpu).unwrap();
    let y = labels(n, c, &mut rng);
    let yt = Tensor::from_slice(&y, &[n], &cpu).unwrap();
    let w = head.weight.tensor();
    // Xavier-uniform bound
    let bound = (6.0 / (c + d) as f64).sqrt();
    assert!(w.to_f64_vec().unwrap().iter().all(|v| v.abs() <= bound));
    let want = classifier_reference(
        &x.to_f64_vec().unwrap(),
        &w.to_f64_vec().unwrap(),
        &y,
        d,
        30.0,
        0.4,
    );
    let got = head.loss(&x, &yt).unwrap().to_f64_vec().unwrap();
    assert_close(&got, &[want], 3e-5, "classifier loss", sd);
    // a small scale: at s = 30 the loss curves too fast for f32 central differences (the kernels'
    // gradients at s = 30 and 100 are checked against f64 above)
    let check = gradcheck(
        |t| class_cosines(&t[0], &t[1])?.margin_cross_entropy(&yt, 4.0, 0.4),
        &[x, w],
        1e-3,
        sd,
    )
    .unwrap();
    assert!(
        check.max_error <= 2e-3,
        "{} ({}); VPR_TEST_SEED={sd}",
        check.max_error,
        check.worst
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let cpu = Device::Cpu;
    let head = MarginCosineProduct::new("classifiers.3", 4, 5, 30.0, 0.4, 1, &cpu).unwrap();
    let x = Tensor::zeros(&[2, 3], DType::F32, &cpu).unwrap();
    let y = Tensor::from_slice(&[0i64, 1], &[2], &cpu).unwrap();
    let e = head.loss(&x, &y).unwrap_err().to_string();
    assert!(
        e.contains("classifiers.3.weight") && e.contains("[2, 3]"),
        "{e}"
    );
    let x = Tensor::zeros(&[2, 4], DType::F32, &cpu).unwrap();
    let y = Tensor::from_slice(&[0i64, 5], &[2], &cpu).unwrap();
    let e = head.loss(&x, &y).unwrap_err().to_string();
    assert!(e.contains("label 5"), "{e}");
    let e = x
        .margin_cross_entropy(
            &Tensor::from_slice(&[0i64, 1], &[2], &cpu).unwrap(),
            f32::NAN,
            0.4,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("finite"), "{e}");
}
