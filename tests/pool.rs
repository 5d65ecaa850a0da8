//! max_pool2d: the CPU against a direct f64 reference, ties and NaN as in PyTorch, gradients by
//! finite differences, shape errors, the GPUs against the CPU, and PyTorch's numbers from
//! tests/fixtures/conv_ops.safetensors.

mod common;

use common::{assert_close, seed};
use vpr_engine::autograd::{self, gradcheck};
use vpr_engine::tensor::Rng;
use vpr_engine::{DType, Device, Error, Tensor};

/// (what, input [N, H, W, C], kernel, stride, padding)
const CASES: &[(&str, [usize; 4], usize, usize, usize)] = &[
    ("3x3/2 pad 1 odd", [2, 9, 7, 3], 3, 2, 1),
    ("3x3/2 pad 1 even", [1, 8, 10, 5], 3, 2, 1),
    ("2x2/2 odd (floor)", [2, 7, 5, 4], 2, 2, 0),
    ("3x3/1 pad 1", [1, 5, 6, 2], 3, 1, 1),
    ("5x5/3 pad 2", [1, 11, 9, 3], 5, 3, 2),
    ("1x1/1", [1, 3, 4, 2], 1, 1, 0),
];

/// Max pooling by its definition in f64: padding never wins, ties go to the first position.
fn reference(x: &[f64], [n, h, w, c]: [usize; 4], k: usize, s: usize, p: usize) -> Vec<f64> {
    let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    let mut out = Vec::with_capacity(n * oh * ow * c);
    for b in 0..n {
        for y in 0..oh {
            for xo in 0..ow {
                for ch in 0..c {
                    let mut best = f64::NEG_INFINITY;
                    for i in 0..k {
                        for j in 0..k {
                            let (iy, ix) = (
                                (y * s + i) as isize - p as isize,
                                (xo * s + j) as isize - p as isize,
                            );
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                best =
                                    best.max(x[((b * h + iy as usize) * w + ix as usize) * c + ch]);
                            }
                        }
                    }
                    out.push(best);
                }
            }
        }
    }
    out
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("pool_cpu_matches_f64_reference");
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &(what, shape, k, st, p)) in CASES.iter().enumerate() {
            let x = Tensor::randn(
                &shape,
                0.0,
                1.0,
                s + (i * 16 + j) as u64,
                dtype,
                &Device::Cpu,
            )
            .unwrap();
            let got = x.max_pool2d(k, st, p).unwrap();
            let want = reference(&x.to_f64_vec().unwrap(), shape, k, st, p);
            // a max is exact in every dtype
            assert_close(
                &got.to_f64_vec().unwrap(),
                &want,
                0.0,
                &format!("{dtype} {what}"),
                s,
            );
        }
    }
}

/// Distinct values at least 0.1 apart, shuffled: no ties within a finite-difference step.
fn distinct(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut v: Vec<f64> = (0..n).map(|k| 0.1 * k as f64 - 0.05 * n as f64).collect();
    let mut rng = Rng::new(seed);
    for k in (1..n).rev() {
        v.swap(k, rng.below(k as u64 + 1) as usize);
    }
    Tensor::from_f64(&v, shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("pool_gradients_match_finite_differences");
    for (j, &(what, shape, k, st, p)) in CASES.iter().enumerate() {
        let x = distinct(&shape, s + j as u64);
        let f = move |t: &[Tensor]| t[0].max_pool2d(k, st, p);
        let check = gradcheck(f, &[x], 1e-2, s).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "{what}: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
    }
}

#[test]
fn ties_go_to_the_first_element_and_nan_wins() {
    // a constant image: every window's gradient goes to its first (top-left) element
    let x = Tensor::full(&[1, 4, 4, 1], 2.0, DType::F32, &Device::Cpu)
        .unwrap()
        .requires_grad();
    let y = x.max_pool2d(2, 2, 0).unwrap();
    let grads = autograd::backward(&y.sum_all().unwrap()).unwrap();
    let g = grads.get(&x).unwrap().to_f64_vec().unwrap();
    let mut want = vec![0.0; 16];
    for at in [0, 2, 8, 10] {
        want[at] = 1.0;
    }
    assert_eq!(g, want);
    // overlapping 3x3/2 windows on a constant image: the shared first elements sum
    let x = Tensor::full(&[1, 5, 5, 1], 1.0, DType::F32, &Device::Cpu)
        .unwrap()
        .requires_grad();
    let y = x.max_pool2d(3, 2, 1).unwrap();
    let grads = autograd::backward(&y.sum_all().unwrap()).unwrap();
    let g = grads.get(&x).unwrap().to_f64_vec().unwrap();
    // windows start at rows/cols -1, 1, 3 -> first valid elements 0, 1, 3
    let mut want = vec![0.0; 25];
    for r in [0, 1, 3] {
        for c in [0, 1, 3] {
            want[r * 5 + c] = 1.0;
        }
    }
    assert_eq!(g, want);
    // NaN propagates
    let x = Tensor::from_f64(
        &[1.0, f64::NAN, 3.0, 0.0],
        &[1, 2, 2, 1],
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert!(x.max_pool2d(2, 2, 0).unwrap().to_f64_vec().unwrap()[0].is_nan());
}

#[test]
fn bad_shapes_are_clear_errors() {
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let expect = |r: vpr_engine::Result<Tensor>, what: &str| match r {
        Err(Error::Shape(m)) => assert!(m.contains(what), "{m:?} lacks {what:?}"),
        Err(e) => panic!("expected a shape error with {what:?}, got {e}"),
        Ok(_) => panic!("expected a shape error with {what:?}"),
    };
    expect(t(&[4, 4, 3]).max_pool2d(2, 2, 0), "rank 4");
    expect(t(&[1, 4, 4, 3]).max_pool2d(3, 2, 2), "half the kernel");
    expect(
        t(&[1, 2, 4, 3]).max_pool2d(5, 1, 1),
        "larger than the padded input",
    );
    expect(t(&[1, 4, 4, 3]).max_pool2d(2, 0, 0), "stride");
}

#[test]
fn every_conformance_case_passes_on_the_gpus() {
    common::assert_conformance(vpr_engine::ops::pool::conformance, "pool conformance");
}

#[test]
fn matches_pytorch_fixtures() {
    let f = common::fixture_tensors("conv_ops.safetensors");
    let mut names: Vec<&str> = f
        .keys()
        .filter_map(|k| k.strip_prefix("pool.")?.strip_suffix(".opts"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "pool cases in the fixture");
    for name in names {
        let k = |part: &str| format!("pool.{name}.{part}");
        let o: Vec<usize> = f[&k("opts")].1.iter().map(|&v| v as usize).collect();
        let tensor = |part: &str| {
            let (shape, v) = &f[&k(part)];
            Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
        };
        let x = tensor("x").requires_grad();
        let y = x.max_pool2d(o[0], o[1], o[2]).unwrap();
        let loss = y.mul(&tensor("dy")).unwrap().sum_all().unwrap();
        let grads = autograd::backward(&loss).unwrap();
        for (got, part) in [(&y, "y"), (grads.get(&x).unwrap(), "dx")] {
            let (shape, want) = &f[&k(part)];
            assert_eq!(got.shape(), shape.as_slice(), "{name} {part}");
            assert_close(
                &got.to_f64_vec().unwrap(),
                want,
                1e-5,
                &format!("{name} {part}"),
                0,
            );
        }
    }
}

#[test]
fn a_batch_split_over_threads_equals_each_image_alone() {
    // [4, 32, 32, 32] is large enough to be split over threads by image (forward and backward);
    // each image alone is one unit of work, so it runs on one thread
    let s = seed("pool_batch_split_over_threads");
    let shape = [4, 32, 32, 32];
    let x = distinct(&shape, s).requires_grad();
    let g = Tensor::randn(&[4, 16, 16, 32], 0.0, 1.0, s + 1, DType::F32, &Device::Cpu).unwrap();
    let y = x.max_pool2d(3, 2, 1).unwrap();
    let dx = autograd::backward_with(&y, g.clone()).unwrap();
    let (y, dx) = (
        y.to_f64_vec().unwrap(),
        dx.get(&x).unwrap().to_f64_vec().unwrap(),
    );
    let (per_in, per_out) = (32 * 32 * 32, 16 * 16 * 32);
    for n in 0..4 {
        let xi = x
            .detach()
            .narrow(0, n, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .requires_grad();
        let yi = xi.max_pool2d(3, 2, 1).unwrap();
        let gi = g.narrow(0, n, 1).unwrap().contiguous().unwrap();
        let dxi = autograd::backward_with(&yi, gi).unwrap();
        let what = format!("image {n}");
        assert_close(
            &y[n * per_out..][..per_out],
            &yi.to_f64_vec().unwrap(),
            0.0,
            &what,
            s,
        );
        let dxi = dxi.get(&xi).unwrap().to_f64_vec().unwrap();
        assert_close(&dx[n * per_in..][..per_in], &dxi, 0.0, &what, s);
    }
}
