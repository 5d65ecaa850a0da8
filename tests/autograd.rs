//! The tape: gradients through views, copies and casts, accumulation, no_grad, frozen parameters,
//! and gradient checks against finite differences.

mod common;

use common::seed;
use vpr_engine::autograd::{self, gradcheck, no_grad, Parameter};
use vpr_engine::{DType, Device, Tensor};

type Op = Box<dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>>;

/// Fails with the op's name and the seed unless the analytic gradient is within `tol` of central
/// differences with step 1e-2.
fn assert_gradcheck_within(what: &str, f: &Op, inputs: &[Tensor], tol: f64, s: u64) {
    let check = gradcheck(f, inputs, 1e-2, s).unwrap();
    assert!(
        check.max_error <= tol,
        "{what}: {} ({}); VPR_TEST_SEED={s}",
        check.max_error,
        check.worst
    );
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, -1.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn views_and_copies_pass_gradients_back() {
    let s = seed("views");
    let x = rand(&[3, 4, 5], s);
    let cases: Vec<(&str, Op)> = vec![
        ("reshape", Box::new(|x| x[0].reshape(&[12, 5]))),
        (
            "permute",
            Box::new(|x| x[0].permute(&[2, 0, 1])?.contiguous()),
        ),
        ("transpose", Box::new(|x| x[0].transpose(0, 2))),
        ("narrow", Box::new(|x| x[0].narrow(1, 1, 2))),
        (
            "broadcast",
            Box::new(|x| x[0].narrow(1, 0, 1)?.broadcast_to(&[2, 3, 4, 5])),
        ),
        ("unsqueeze", Box::new(|x| x[0].unsqueeze(1)?.squeeze(1))),
        (
            "cat",
            Box::new(|x| Tensor::cat(&[&x[0], &x[0].narrow(1, 1, 2)?], 1)),
        ),
    ];
    for (name, f) in cases {
        // every op here is linear, so the differences are exact up to f32 rounding
        assert_gradcheck_within(name, &f, std::slice::from_ref(&x), 1e-4, s);
    }
}

#[test]
fn a_cast_passes_the_gradient_back_in_the_source_dtype() {
    let x = rand(&[5], 3).requires_grad();
    let y = x.to_dtype(DType::BF16).unwrap();
    let upstream = [1.0f64 / 3.0, -2.5, 7.0, 0.0, 1e-3];
    let g = Tensor::from_f64(&upstream, &[5], DType::BF16, &Device::Cpu).unwrap();
    let grads = autograd::backward_with(&y, g.clone()).unwrap();
    let gx = grads.get(&x).unwrap();
    assert_eq!(gx.dtype(), DType::F32);
    assert_eq!(gx.to_f64_vec().unwrap(), g.to_f64_vec().unwrap());
}

#[test]
fn gradients_reach_the_virtual_gpu_and_back() {
    let s = seed("devices");
    let vgpu = Device::new("vgpu").unwrap();
    let x = rand(&[4, 6], s).requires_grad();
    let y = x
        .to_device(&vgpu)
        .unwrap()
        .t()
        .unwrap()
        .contiguous()
        .unwrap();
    let grads =
        autograd::backward_with(&y, Tensor::ones(&[6, 4], DType::F32, &vgpu).unwrap()).unwrap();
    let g = grads.get(&x).expect("a gradient for x");
    assert!(g.device().is_cpu());
    assert_eq!(g.to_vec::<f32>().unwrap(), vec![1.0; 24]);
}

#[test]
fn parameter_gradients_accumulate_until_zeroed() {
    let p = Parameter::new(
        "w",
        Tensor::ones(&[2, 2], DType::F32, &Device::Cpu).unwrap(),
    );
    for _ in 0..3 {
        let y = p.tensor().reshape(&[4]).unwrap();
        autograd::backward_with(
            &y,
            Tensor::full(&[4], 0.5, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    }
    assert_eq!(p.grad().unwrap().to_vec::<f32>().unwrap(), vec![1.5; 4]);
    p.zero_grad();
    assert!(p.grad().is_none());
    assert_eq!(autograd::tape_len(), 0, "backward frees the nodes it used");
}

#[test]
fn frozen_parameters_and_no_grad_record_nothing() {
    let p = Parameter::new(
        "frozen",
        Tensor::ones(&[3], DType::F32, &Device::Cpu).unwrap(),
    );
    p.set_trainable(false);
    let before = autograd::tape_len();
    let y = p.tensor().reshape(&[3, 1]).unwrap();
    assert!(!y.is_requires_grad());
    let q = Parameter::new(
        "live",
        Tensor::ones(&[3], DType::F32, &Device::Cpu).unwrap(),
    );
    let z = no_grad(|| q.tensor().reshape(&[1, 3]).unwrap());
    assert!(!z.is_requires_grad());
    assert_eq!(autograd::tape_len(), before);
}

#[test]
fn backward_keeps_nodes_of_other_losses() {
    let a = Parameter::new("a", Tensor::ones(&[2], DType::F32, &Device::Cpu).unwrap());
    let b = Parameter::new("b", Tensor::ones(&[2], DType::F32, &Device::Cpu).unwrap());
    let ya = a.tensor().reshape(&[2, 1]).unwrap();
    let yb = b.tensor().reshape(&[1, 2]).unwrap();
    let ones = |s: &[usize]| Tensor::ones(s, DType::F32, &Device::Cpu).unwrap();
    autograd::backward_with(&ya, ones(&[2, 1])).unwrap();
    assert!(a.grad().is_some() && b.grad().is_none());
    autograd::backward_with(&yb, ones(&[1, 2])).unwrap();
    assert!(b.grad().is_some());
}

#[test]
fn backward_needs_a_scalar_loss() {
    let x = rand(&[3], 1).requires_grad();
    let e = autograd::backward(&x.reshape(&[3, 1]).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("one-element"), "{e}");
    autograd::clear_tape();
}

#[test]
fn matmul_and_gemm_gradients_match_finite_differences() {
    let s = seed("matmul_grad");
    let cases: Vec<(&str, Vec<Vec<usize>>, Op)> = vec![
        (
            "nn",
            vec![vec![3, 5], vec![5, 4]],
            Box::new(|x| x[0].matmul(&x[1])),
        ),
        (
            "nt",
            vec![vec![3, 5], vec![4, 5]],
            Box::new(|x| x[0].matmul(&x[1].t()?)),
        ),
        (
            "batched broadcast",
            vec![vec![2, 3, 5], vec![5, 4]],
            Box::new(|x| x[0].matmul(&x[1])),
        ),
        (
            "vector",
            vec![vec![5], vec![2, 5, 3]],
            Box::new(|x| x[0].matmul(&x[1])),
        ),
        (
            "gemm alpha beta",
            vec![vec![3, 5], vec![5, 4], vec![4]],
            Box::new(|x| Tensor::gemm(&x[0], &x[1], Some(&x[2]), 0.5, -2.0)),
        ),
    ];
    for (i, (name, shapes, f)) in cases.into_iter().enumerate() {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(j, sh)| rand(sh, s + 10 * i as u64 + j as u64))
            .collect();
        assert_gradcheck(name, &f, &inputs, s);
    }
}

#[test]
fn autocast_multiplies_in_bf16_and_keeps_f32_master_gradients() {
    let s = seed("autocast");
    let a = rand(&[4, 8], s).requires_grad();
    let b = rand(&[8, 3], s + 1).requires_grad();
    let y = autograd::autocast(DType::BF16, || a.matmul(&b)).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let grads = autograd::backward_with(
        &y,
        Tensor::ones(&[4, 3], DType::BF16, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let (ga, gb) = (grads.get(&a).unwrap(), grads.get(&b).unwrap());
    assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32));
    // dA = 1 @ B^T: each row is the row sums of B, computed from bf16-rounded B
    let bsum: Vec<f64> = b
        .to_dtype(DType::BF16)
        .unwrap()
        .to_f64_vec()
        .unwrap()
        .chunks(3)
        .map(|r| r.iter().sum())
        .collect();
    common::assert_close(
        &ga.to_f64_vec().unwrap()[..8],
        &bsum,
        1e-2,
        "dA under autocast",
        s,
    );
}

// ---------------------------------------------------------------- elementwise, reduce, softmax

use vpr_engine::ops::elementwise::{erf, BinaryOp, UnaryOp};
use vpr_engine::ops::reduce::ReduceOp;
use vpr_engine::tensor::Rng;

/// Fails with the op's name and the seed unless the analytic gradient is within 1e-3 of central
/// differences with step 1e-2 (inputs are kept at least 0.05 from non-differentiable points).
fn assert_gradcheck(what: &str, f: &Op, inputs: &[Tensor], s: u64) {
    assert_gradcheck_within(what, f, inputs, 1e-3, s);
}

/// Uniform values in [lo, hi], each moved at least `margin` away from the points in `avoid`.
fn uniform_avoiding(shape: &[usize], (lo, hi): (f64, f64), avoid: &[f64], seed: u64) -> Tensor {
    let margin = 0.05;
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| loop {
            let x = lo + (hi - lo) * rng.uniform();
            if avoid.iter().all(|p| (x - p).abs() >= margin) {
                break x;
            }
        })
        .collect();
    Tensor::from_f64(&v, shape, DType::F32, &Device::Cpu).unwrap()
}

/// Where `op` is smooth and well conditioned, and its kinks.
fn unary_inputs(op: UnaryOp) -> ((f64, f64), Vec<f64>) {
    match op {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Powf(_) => ((0.5, 2.0), vec![]),
        UnaryOp::Relu | UnaryOp::Abs => ((-2.0, 2.0), vec![0.0]),
        UnaryOp::Clamp(lo, hi) => ((-1.5, 2.0), vec![lo as f64, hi as f64]),
        UnaryOp::Gelu | UnaryOp::Sigmoid => ((-3.0, 3.0), vec![]),
        _ => ((-2.0, 2.0), vec![]),
    }
}

/// Values of `grid` steps of 0.1 in [-1, 1], shifted by `shift`: operands drawn with shifts 0 and
/// 0.05 differ by at least 0.05 in every broadcast pair, so maximum and minimum have no ties.
fn on_grid(shape: &[usize], shift: f64, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| 0.1 * (rng.below(20) as f64 - 10.0) + shift)
        .collect();
    Tensor::from_f64(&v, shape, DType::F32, &Device::Cpu).unwrap()
}

/// Inputs in the op's domain: divisors with |b| in [0.7, 2], positive bases for pow, and
/// separated operands for maximum and minimum.
fn binary_inputs(op: BinaryOp, sa: &[usize], sb: &[usize], seed: u64) -> [Tensor; 2] {
    match op {
        BinaryOp::Div => {
            let magnitude = uniform_avoiding(sb, (0.7, 2.0), &[], seed + 1);
            let sign = on_grid(sb, 0.05, seed + 2);
            [
                uniform_avoiding(sa, (-2.0, 2.0), &[], seed),
                magnitude
                    .mul(&sign.div(&sign.abs().unwrap()).unwrap())
                    .unwrap(),
            ]
        }
        BinaryOp::Pow => [
            uniform_avoiding(sa, (0.5, 2.0), &[], seed),
            uniform_avoiding(sb, (-1.5, 1.5), &[], seed + 1),
        ],
        BinaryOp::Maximum | BinaryOp::Minimum => {
            [on_grid(sa, 0.0, seed), on_grid(sb, 0.05, seed + 1)]
        }
        _ => [
            uniform_avoiding(sa, (-2.0, 2.0), &[], seed),
            uniform_avoiding(sb, (-2.0, 2.0), &[], seed + 1),
        ],
    }
}

#[test]
fn unary_gradients_match_finite_differences() {
    let s = seed("unary_grad");
    for (i, &op) in UnaryOp::ALL.iter().enumerate() {
        let (range, kinks) = unary_inputs(op);
        let cases: Vec<(&str, Vec<usize>, Op)> = vec![
            ("vector", vec![7], Box::new(move |x| x[0].unary(op))),
            ("matrix", vec![3, 5], Box::new(move |x| x[0].unary(op))),
            // a transposed view reaches the op (and the fused backward) as such
            (
                "transposed",
                vec![4, 3],
                Box::new(move |x| x[0].t()?.unary(op)),
            ),
            ("scalar", vec![], Box::new(move |x| x[0].unary(op))),
        ];
        for (j, (name, shape, f)) in cases.into_iter().enumerate() {
            let x = uniform_avoiding(&shape, range, &kinks, s + 10 * i as u64 + j as u64);
            assert_gradcheck(&format!("{} {name}", op.name()), &f, &[x], s);
        }
    }
}

#[test]
fn binary_gradients_match_finite_differences_with_broadcasting() {
    let s = seed("binary_grad");
    let shapes: [(&[usize], &[usize]); 5] = [
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[1], &[2, 3]),
        (&[3, 1], &[1, 4]),
        (&[2, 1, 4], &[3, 1]),
    ];
    for (i, &op) in BinaryOp::ALL.iter().enumerate() {
        for (j, &(sa, sb)) in shapes.iter().enumerate() {
            let inputs = binary_inputs(op, sa, sb, s + 100 * i as u64 + 10 * j as u64);
            let f: Op = Box::new(move |x| x[0].binary(op, &x[1]));
            assert_gradcheck(&format!("{} {sa:?} {sb:?}", op.name()), &f, &inputs, s);
        }
        // the same tensor on both sides: both gradients accumulate into it
        let [a, _] = binary_inputs(op, &[5], &[5], s + 100 * i as u64 + 99);
        let a = if matches!(op, BinaryOp::Div | BinaryOp::Pow) {
            a.abs().unwrap().add_scalar(0.5).unwrap()
        } else {
            a
        };
        if !matches!(op, BinaryOp::Maximum | BinaryOp::Minimum) {
            let f: Op = Box::new(move |x| x[0].binary(op, &x[0]));
            assert_gradcheck(&format!("{} x x", op.name()), &f, &[a], s);
        }
    }
}

/// Distinct values at least 0.1 apart, shuffled, so max and min have no ties within the step.
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
fn reduction_gradients_match_finite_differences() {
    let s = seed("reduce_grad");
    let ops = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::SumSq,
        ReduceOp::Max,
        ReduceOp::Min,
    ];
    let cases: [(&[usize], isize); 6] = [
        (&[3, 4, 5], 0),
        (&[3, 4, 5], 1),
        (&[3, 4, 5], -1),
        (&[7], 0),
        (&[1, 6], 0),
        (&[], 0),
    ];
    for (i, &op) in ops.iter().enumerate() {
        for (j, &(shape, dim)) in cases.iter().enumerate() {
            for keepdim in [false, true] {
                let x = distinct(shape, s + 10 * i as u64 + j as u64);
                let f: Op = Box::new(move |x| x[0].reduce(op, dim, keepdim));
                let what = format!("{}({dim}, keepdim {keepdim}) of {shape:?}", op.name());
                assert_gradcheck(&what, &f, &[x], s);
            }
        }
        // a transposed input
        let x = distinct(&[4, 6], s + 10 * i as u64 + 9);
        let f: Op = Box::new(move |x| x[0].t()?.reduce(op, 1, false));
        assert_gradcheck(&format!("{} of a transpose", op.name()), &f, &[x], s);
    }
    let x = distinct(&[3, 5], s);
    let f: Op = Box::new(|x| x[0].t()?.sum_all());
    assert_gradcheck("sum_all", &f, &[x], s);
}

#[test]
fn argmax_records_nothing_and_an_empty_axis_gets_an_empty_gradient() {
    let x = rand(&[3, 4], 5).requires_grad();
    let before = autograd::tape_len();
    let i = x.argmax(1, false).unwrap();
    assert!(!i.is_requires_grad());
    assert_eq!(autograd::tape_len(), before);
    // a sum over an empty axis is zeros; its gradient is an empty tensor of the input's shape
    let e = Tensor::zeros(&[3, 0], DType::F32, &Device::Cpu)
        .unwrap()
        .requires_grad();
    let y = e.sum(1, false).unwrap();
    let grads =
        autograd::backward_with(&y, Tensor::ones(&[3], DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(grads.get(&e).unwrap().shape(), &[3, 0]);
}

#[test]
fn softmax_gradients_match_finite_differences_along_any_dim() {
    let s = seed("softmax_grad");
    let cases: [(&[usize], isize); 7] = [
        (&[3, 4, 5], 0),
        (&[3, 4, 5], 1),
        (&[3, 4, 5], -1),
        (&[7], 0),
        (&[2, 40], 1),
        (&[4, 1], -1),
        (&[], 0),
    ];
    for log in [false, true] {
        for (j, &(shape, dim)) in cases.iter().enumerate() {
            let x = Tensor::randn(shape, 0.0, 2.0, s + j as u64, DType::F32, &Device::Cpu).unwrap();
            let f: Op = if log {
                Box::new(move |x| x[0].log_softmax(dim))
            } else {
                Box::new(move |x| x[0].softmax(dim))
            };
            let name = if log { "log_softmax" } else { "softmax" };
            assert_gradcheck(&format!("{name}({dim}) of {shape:?}"), &f, &[x], s);
        }
    }
    // softmax feeding a loss-like reduction, with a transposed input
    let x = Tensor::randn(&[5, 3], 0.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    let f: Op = Box::new(|x| x[0].t()?.log_softmax(-1)?.mul_scalar(-1.0)?.mean(1, false));
    assert_gradcheck("nll-like chain", &f, &[x], s);
}

/// The gradient of `f` at `inputs` for the upstream gradient `g` (every input a leaf).
fn grads_of(f: &Op, inputs: &[Tensor], g: &Tensor) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = inputs.iter().map(|x| x.detach().requires_grad()).collect();
    let y = f(&leaves).unwrap();
    let grads = autograd::backward_with(&y, g.clone()).unwrap();
    leaves
        .iter()
        .map(|l| grads.get(l).expect("a gradient for every input").clone())
        .collect()
}

#[test]
fn ties_and_kinks_follow_torch() {
    let cpu = Device::Cpu;
    let t = |v: &[f32]| Tensor::from_slice(v, &[v.len()], &cpu).unwrap();
    let ones = |n: usize| Tensor::ones(&[n], DType::F32, &cpu).unwrap();
    let one_grad = |f: Op, x: Tensor| grads_of(&f, &[x], &ones(5))[0].to_vec::<f32>().unwrap();
    let x = t(&[f32::NAN, 0.0, -0.5, 0.5, 1.0]);
    // values checked against torch 2.15
    assert_eq!(
        one_grad(Box::new(|x| x[0].abs()), x.clone())[1..],
        [0.0, -1.0, 1.0, 1.0]
    );
    assert_eq!(
        one_grad(Box::new(|x| x[0].relu()), x.clone()),
        [1.0, 0.0, 0.0, 1.0, 1.0]
    );
    assert_eq!(
        one_grad(Box::new(|x| x[0].clamp(-0.5, 0.5)), x.clone()),
        [0.0, 1.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        one_grad(Box::new(|x| x[0].abs()?.powf(0.0)), x.clone()),
        [0.0; 5]
    );
    let g = grads_of(
        &(Box::new(|x: &[Tensor]| x[0].maximum(&x[1])) as Op),
        &[t(&[1.0, 2.0, 3.0]), t(&[1.0, 1.0, 4.0])],
        &ones(3),
    );
    assert_eq!(g[0].to_vec::<f32>().unwrap(), [0.5, 1.0, 0.0]);
    assert_eq!(g[1].to_vec::<f32>().unwrap(), [0.5, 0.0, 1.0]);
    let g = grads_of(
        &(Box::new(|x: &[Tensor]| x[0].minimum(&x[1])) as Op),
        &[t(&[1.0, 2.0, 3.0]), t(&[1.0, 1.0, 4.0])],
        &ones(3),
    );
    assert_eq!(g[0].to_vec::<f32>().unwrap(), [0.5, 0.0, 1.0]);
    assert_eq!(g[1].to_vec::<f32>().unwrap(), [0.5, 1.0, 0.0]);
    let g = grads_of(
        &(Box::new(|x: &[Tensor]| x[0].pow(&x[1])) as Op),
        &[t(&[0.0, 0.0, 2.0]), t(&[0.0, 2.0, -1.0])],
        &ones(3),
    );
    assert_eq!(g[0].to_vec::<f32>().unwrap(), [0.0, 0.0, -0.25]);
    let db = g[1].to_vec::<f32>().unwrap();
    assert_eq!(db[..2], [0.0, 0.0]);
    assert!((db[2] - 0.5 * 2f32.ln()).abs() < 1e-6, "{db:?}");
    // max along a dim routes a tie to the first index, as torch.max(dim) does on the cpu
    let x = Tensor::from_slice(&[1.0f32, 3.0, 3.0, -2.0, -2.0, 0.0], &[2, 3], &cpu).unwrap();
    let g = grads_of(
        &(Box::new(|x: &[Tensor]| x[0].max(1, false)) as Op),
        std::slice::from_ref(&x),
        &ones(2),
    );
    assert_eq!(
        g[0].to_vec::<f32>().unwrap(),
        [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    );
    let g = grads_of(
        &(Box::new(|x: &[Tensor]| x[0].min(1, false)) as Op),
        &[x],
        &ones(2),
    );
    assert_eq!(
        g[0].to_vec::<f32>().unwrap(),
        [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    );
}

/// Every op of this family with inputs for `dtype` (rounded to it), the upstream gradient's shape
/// following from the output.
fn device_cases(s: u64) -> Vec<(String, Vec<Tensor>, Op)> {
    let mut cases: Vec<(String, Vec<Tensor>, Op)> = Vec::new();
    for (i, &op) in UnaryOp::ALL.iter().enumerate() {
        let (range, kinks) = unary_inputs(op);
        // 7 x 37: an odd size, so the fused kernels' vector loop has a tail
        let x = uniform_avoiding(&[7, 37], range, &kinks, s + i as u64);
        cases.push((op.name().into(), vec![x], Box::new(move |x| x[0].unary(op))));
    }
    for (i, &op) in BinaryOp::ALL.iter().enumerate() {
        let pairs: [(&[usize], &[usize]); 2] = [(&[5, 33], &[5, 33]), (&[2, 1, 33], &[5, 1])];
        for (j, (sa, sb)) in pairs.into_iter().enumerate() {
            let inputs = binary_inputs(op, sa, sb, s + 50 + 10 * i as u64 + j as u64).to_vec();
            let name = format!("{} {sa:?} {sb:?}", op.name());
            cases.push((name, inputs, Box::new(move |x| x[0].binary(op, &x[1]))));
        }
    }
    let ops = [
        ReduceOp::Sum,
        ReduceOp::Mean,
        ReduceOp::SumSq,
        ReduceOp::Max,
        ReduceOp::Min,
    ];
    for (i, &op) in ops.iter().enumerate() {
        for (dim, keepdim) in [(0, true), (1, false), (-1, true)] {
            let x = distinct(&[6, 33, 5], s + 200 + i as u64);
            let name = format!("{}({dim}, {keepdim})", op.name());
            cases.push((
                name,
                vec![x],
                Box::new(move |x| x[0].reduce(op, dim, keepdim)),
            ));
        }
    }
    // rows for the warp kernel (short and long) and the block kernel, and a non-last dim
    for (j, (shape, dim)) in [
        (&[9, 3][..], -1),
        (&[4, 300], 1),
        (&[2, 1500], -1),
        (&[33, 4], 0),
    ]
    .into_iter()
    .enumerate()
    {
        let x = Tensor::randn(
            shape,
            0.0,
            2.0,
            s + 300 + j as u64,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let x2 = x.clone();
        cases.push((
            format!("softmax({dim}) {shape:?}"),
            vec![x],
            Box::new(move |x| x[0].softmax(dim)),
        ));
        cases.push((
            format!("log_softmax({dim}) {shape:?}"),
            vec![x2],
            Box::new(move |x| x[0].log_softmax(dim)),
        ));
    }
    cases
}

#[test]
fn backward_on_the_virtual_gpu_matches_the_cpu() {
    let s = seed("device_grads");
    let vgpu = Device::new("vgpu").unwrap();
    for dtype in DType::FLOATS {
        for (k, (name, inputs, f)) in device_cases(s).into_iter().enumerate() {
            let inputs: Vec<Tensor> = inputs.iter().map(|x| x.to_dtype(dtype).unwrap()).collect();
            let out_shape = no_grad(|| f(&inputs)).unwrap().shape().to_vec();
            let g = Tensor::randn(
                &out_shape,
                0.0,
                1.0,
                s + 1000 + k as u64,
                dtype,
                &Device::Cpu,
            )
            .unwrap();
            let want = grads_of(&f, &inputs, &g);
            let on_gpu: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&vgpu).unwrap()).collect();
            let got = grads_of(&f, &on_gpu, &g.to_device(&vgpu).unwrap());
            for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                assert_eq!(got.dtype(), dtype, "{name}: gradient dtype");
                assert!(!got.device().is_cpu());
                common::assert_tensor_close(
                    got,
                    want,
                    dtype.tolerance(),
                    &format!("{name} {dtype} input {i}"),
                    s,
                );
            }
        }
    }
}

/// `d/dx op` at x in f64, for the ops with a fused backward kernel.
fn unary_derivative(op: UnaryOp, x: f64) -> f64 {
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    match op {
        UnaryOp::Sqrt => 0.5 / x.sqrt(),
        UnaryOp::Rsqrt => -0.5 * x.powf(-1.5),
        UnaryOp::Relu => (x > 0.0) as u8 as f64,
        UnaryOp::Gelu => {
            0.5 * (1.0 + erf(x / 2f64.sqrt()))
                + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
        UnaryOp::Sigmoid => sigmoid(x) * (1.0 - sigmoid(x)),
        UnaryOp::Abs => x.signum(),
        UnaryOp::Powf(p) => p as f64 * x.powf(p as f64 - 1.0),
        UnaryOp::Clamp(lo, hi) => (x > lo as f64 && x < hi as f64) as u8 as f64,
        _ => unreachable!("{} has no fused backward", op.name()),
    }
}

/// `(da, db)` of maximum, minimum and pow at (a, b) for the upstream gradient g, in f64.
fn binary_derivatives(op: BinaryOp, a: f64, b: f64, g: f64) -> (f64, f64) {
    let split = if a == b { 0.5 * g } else { g };
    match op {
        BinaryOp::Maximum => ((a >= b) as u8 as f64 * split, (b >= a) as u8 as f64 * split),
        BinaryOp::Minimum => ((a <= b) as u8 as f64 * split, (b <= a) as u8 as f64 * split),
        BinaryOp::Pow => (g * b * a.powf(b - 1.0), g * a.powf(b) * a.ln()),
        _ => unreachable!(),
    }
}

/// The gradients of `f` at `inputs` for the upstream `g`, on the CPU and on the virtual GPU.
fn cpu_and_vgpu(f: &Op, inputs: &[Tensor], g: &Tensor) -> (Vec<Tensor>, Vec<Tensor>) {
    let vgpu = Device::new("vgpu").unwrap();
    let on: Vec<Tensor> = inputs.iter().map(|x| x.to_device(&vgpu).unwrap()).collect();
    (
        grads_of(f, inputs, g),
        grads_of(f, &on, &g.to_device(&vgpu).unwrap()),
    )
}

#[test]
fn fused_backward_kernels_match_an_f64_reference_and_the_cpu() {
    let s = seed("fused_backward");
    let cpu = Device::Cpu;
    for dtype in DType::FLOATS {
        let tol = dtype.tolerance();
        for (k, &n) in common::ODD_SIZES.iter().enumerate() {
            let s = s + 1000 * k as u64;
            let check = |got: &Tensor, want: &[f64], what: String| {
                common::assert_close(&got.to_f64_vec().unwrap(), want, tol, &what, s);
            };
            let g = Tensor::randn(&[3, n], 0.0, 1.0, s, dtype, &cpu).unwrap();
            let gv = g.to_f64_vec().unwrap();
            // unary: dx = g op'(x), the kernel's output as it is
            for (i, &op) in UnaryOp::ALL.iter().enumerate() {
                if !op.fused_backward() {
                    continue;
                }
                let (range, kinks) = unary_inputs(op);
                let x = uniform_avoiding(&[3, n], range, &kinks, s + 1 + i as u64)
                    .to_dtype(dtype)
                    .unwrap();
                let want: Vec<f64> = x
                    .to_f64_vec()
                    .unwrap()
                    .iter()
                    .zip(&gv)
                    .map(|(&x, &g)| g * unary_derivative(op, x))
                    .collect();
                let f: Op = Box::new(move |x| x[0].unary(op));
                let (on_cpu, on_vgpu) = cpu_and_vgpu(&f, &[x], &g);
                let what = format!("{}_backward_{dtype} [3, {n}]", op.name());
                check(&on_cpu[0], &want, format!("{what} cpu vs f64"));
                common::assert_tensor_close(
                    &on_vgpu[0],
                    &on_cpu[0],
                    tol,
                    &format!("{what} vgpu vs cpu"),
                    s,
                );
            }
            // maximum, minimum (every third pair tied) and pow, same shapes: the kernel's output
            for (i, op) in [BinaryOp::Maximum, BinaryOp::Minimum, BinaryOp::Pow]
                .into_iter()
                .enumerate()
            {
                let [a, b] = binary_inputs(op, &[3, n], &[3, n], s + 20 + 2 * i as u64);
                let (mut av, bv) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
                if op != BinaryOp::Pow {
                    for j in (0..av.len()).step_by(3) {
                        av[j] = bv[j];
                    }
                }
                let a = Tensor::from_f64(&av, &[3, n], dtype, &cpu).unwrap();
                let b = b.to_dtype(dtype).unwrap();
                let (av, bv) = (a.to_f64_vec().unwrap(), b.to_f64_vec().unwrap());
                let (da, db): (Vec<f64>, Vec<f64>) = (0..av.len())
                    .map(|j| binary_derivatives(op, av[j], bv[j], gv[j]))
                    .unzip();
                let f: Op = Box::new(move |x| x[0].binary(op, &x[1]));
                let (on_cpu, on_vgpu) = cpu_and_vgpu(&f, &[a, b], &g);
                for (j, want) in [da, db].iter().enumerate() {
                    let what = format!("{}_backward_{dtype} [3, {n}] operand {j}", op.name());
                    check(&on_cpu[j], want, format!("{what} cpu vs f64"));
                    common::assert_tensor_close(
                        &on_vgpu[j],
                        &on_cpu[j],
                        tol,
                        &format!("{what} vgpu vs cpu"),
                        s,
                    );
                }
            }
            // select: max along the rows of [n, 3], the gradient at the first largest element
            let x = on_grid(&[n, 3], 0.0, s + 30).to_dtype(dtype).unwrap();
            let xv = x.to_f64_vec().unwrap();
            let gcol: Vec<f64> = gv[..3].to_vec();
            let mut want = vec![0.0; 3 * n];
            for c in 0..3 {
                let first_max =
                    (0..n).fold(0, |m, r| if xv[r * 3 + c] > xv[m * 3 + c] { r } else { m });
                want[first_max * 3 + c] = gcol[c];
            }
            let g3 = Tensor::from_f64(&gcol, &[3], dtype, &cpu).unwrap();
            let f: Op = Box::new(|x| x[0].max(0, false));
            let (on_cpu, on_vgpu) = cpu_and_vgpu(&f, &[x], &g3);
            check(
                &on_cpu[0],
                &want,
                format!("select_backward_{dtype} [{n}, 3] cpu vs f64"),
            );
            common::assert_tensor_close(
                &on_vgpu[0],
                &on_cpu[0],
                0.0,
                &format!("select_backward_{dtype} [{n}, 3] vgpu vs cpu"),
                s,
            );
        }
        // softmax: rows of every odd size, and 1500 (a block per row on the GPU)
        for (k, &n) in common::ODD_SIZES.iter().chain(&[1500]).enumerate() {
            let s = s + 5000 + 10 * k as u64;
            let x = Tensor::randn(&[3, n], 0.0, 2.0, s, dtype, &cpu).unwrap();
            let g = Tensor::randn(&[3, n], 0.0, 1.0, s + 1, dtype, &cpu).unwrap();
            for log in [false, true] {
                let y = if log {
                    x.log_softmax(-1)
                } else {
                    x.softmax(-1)
                }
                .unwrap();
                let (yv, gv) = (y.to_f64_vec().unwrap(), g.to_f64_vec().unwrap());
                let mut want = Vec::with_capacity(3 * n);
                for (yr, gr) in yv.chunks(n).zip(gv.chunks(n)) {
                    if log {
                        let sum: f64 = gr.iter().sum();
                        want.extend(yr.iter().zip(gr).map(|(y, g)| g - y.exp() * sum));
                    } else {
                        let dot: f64 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
                        want.extend(yr.iter().zip(gr).map(|(y, g)| y * (g - dot)));
                    }
                }
                let f: Op = if log {
                    Box::new(|x| x[0].log_softmax(-1))
                } else {
                    Box::new(|x| x[0].softmax(-1))
                };
                let (on_cpu, on_vgpu) = cpu_and_vgpu(&f, std::slice::from_ref(&x), &g);
                let name = if log { "log_softmax" } else { "softmax" };
                let what = format!("{name}_backward_{dtype} [3, {n}]");
                common::assert_close(
                    &on_cpu[0].to_f64_vec().unwrap(),
                    &want,
                    tol,
                    &format!("{what} cpu vs f64"),
                    s,
                );
                common::assert_tensor_close(
                    &on_vgpu[0],
                    &on_cpu[0],
                    tol,
                    &format!("{what} vgpu vs cpu"),
                    s,
                );
            }
        }
    }
}

#[test]
fn a_linear_layer_gets_a_dense_weight_gradient() {
    // x @ w.t(): the gradient must reach w in w's own row-major order, not as a strided view
    // that every optimizer step would first have to copy
    let w = Parameter::new("w", rand(&[6, 4], 1));
    let x = rand(&[3, 4], 2);
    let y = x.matmul(&w.tensor().t().unwrap()).unwrap();
    autograd::backward_with(&y, rand(&[3, 6], 3)).unwrap();
    let g = w.grad().unwrap();
    assert!(
        g.is_contiguous() && g.layout().offset() == 0,
        "{:?}",
        g.layout()
    );
}

#[test]
fn autocast_keeps_reductions_softmax_and_losses_in_f32() {
    let x = rand(&[4, 6], 9)
        .to_dtype(DType::BF16)
        .unwrap()
        .requires_grad();
    let labels = Tensor::from_vec(vec![0i64, 5, 2, 3], &[4], &Device::Cpu).unwrap();
    let (soft, logsoft, sum, mean, max, loss) = autograd::autocast(DType::BF16, || {
        (
            x.softmax(-1).unwrap(),
            x.log_softmax(-1).unwrap(),
            x.sum(1, false).unwrap(),
            x.mean(0, false).unwrap(),
            x.max(1, false).unwrap(),
            x.cross_entropy(&labels, vpr_engine::ops::loss::Reduction::Mean)
                .unwrap(),
        )
    });
    for (name, t) in [
        ("softmax", &soft),
        ("log_softmax", &logsoft),
        ("sum", &sum),
        ("mean", &mean),
        ("loss", &loss),
    ] {
        assert_eq!(t.dtype(), DType::F32, "{name} under autocast");
    }
    assert_eq!(
        max.dtype(),
        DType::BF16,
        "max selects, it does not accumulate"
    );
    // outside the scope nothing is promoted, and gradients reach the bf16 input in bf16
    assert_eq!(x.softmax(-1).unwrap().dtype(), DType::BF16);
    let grads = autograd::backward(&loss).unwrap();
    assert_eq!(grads.get(&x).unwrap().dtype(), DType::BF16);
    autograd::clear_tape();
}
