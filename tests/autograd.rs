//! The tape: gradients through views, copies and casts, accumulation, no_grad, frozen parameters,
//! and gradient checks against finite differences.

mod common;

use common::seed;
use vpr_engine::autograd::{self, gradcheck, no_grad, Parameter};
use vpr_engine::{DType, Device, Tensor};

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, -1.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn views_and_copies_pass_gradients_back() {
    let s = seed("views");
    let x = rand(&[3, 4, 5], s);
    let cases: Vec<(&str, Box<dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>>)> = vec![
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
        let check = gradcheck(&f, &[x.clone()], 1e-2, s).unwrap();
        // every op here is linear, so the differences are exact up to f32 rounding
        assert!(
            check.max_error <= 1e-4,
            "{name}: {} ({}); VPR_TEST_SEED={s}",
            check.max_error,
            check.worst
        );
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
    type Case = Box<dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>>;
    let cases: Vec<(&str, Vec<Vec<usize>>, Case)> = vec![
        ("nn", vec![vec![3, 5], vec![5, 4]], Box::new(|x| x[0].matmul(&x[1]))),
        ("nt", vec![vec![3, 5], vec![4, 5]], Box::new(|x| x[0].matmul(&x[1].t()?))),
        ("batched broadcast", vec![vec![2, 3, 5], vec![5, 4]], Box::new(|x| x[0].matmul(&x[1]))),
        ("vector", vec![vec![5], vec![2, 5, 3]], Box::new(|x| x[0].matmul(&x[1]))),
        (
            "gemm alpha beta",
            vec![vec![3, 5], vec![5, 4], vec![4]],
            Box::new(|x| Tensor::gemm(&x[0], &x[1], Some(&x[2]), 0.5, -2.0)),
        ),
    ];
    for (i, (name, shapes, f)) in cases.into_iter().enumerate() {
        let inputs: Vec<Tensor> = shapes.iter().enumerate().map(|(j, sh)| rand(sh, s + 10 * i as u64 + j as u64)).collect();
        let check = gradcheck(&f, &inputs, 1e-2, s).unwrap();
        assert!(check.max_error <= 1e-3, "{name}: {} ({}); VPR_TEST_SEED={s}", check.max_error, check.worst);
    }
}

#[test]
fn autocast_multiplies_in_bf16_and_keeps_f32_master_gradients() {
    let s = seed("autocast");
    let a = rand(&[4, 8], s).requires_grad();
    let b = rand(&[8, 3], s + 1).requires_grad();
    let y = autograd::autocast(DType::BF16, || a.matmul(&b)).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let grads = autograd::backward_with(&y, Tensor::ones(&[4, 3], DType::BF16, &Device::Cpu).unwrap()).unwrap();
    let (ga, gb) = (grads.get(&a).unwrap(), grads.get(&b).unwrap());
    assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32));
    // dA = 1 @ B^T: each row is the row sums of B, computed from bf16-rounded B
    let bsum: Vec<f64> = b.to_dtype(DType::BF16).unwrap().to_f64_vec().unwrap().chunks(3).map(|r| r.iter().sum()).collect();
    common::assert_close(&ga.to_f64_vec().unwrap()[..8], &bsum, 1e-2, "dA under autocast", s);
}
