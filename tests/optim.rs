//! Optimizers, loss scaler, clipping and StepLR: CPU against f64 references of torch.optim's
//! formulas, the virtual GPU (and CUDA when present) against the CPU, and the semantics PyTorch
//! users rely on (momentum initialisation, Nesterov, dampening, weight decay variants, bias
//! correction, groups, skipped and frozen parameters, scaler growth/backoff/skip).
mod common;

use common::{assert_close, gpu_devices, seed, ODD_SIZES};
use vpr_engine::autograd::Parameter;
use vpr_engine::tensor::Rng;
use vpr_engine::train::{
    clip_grad_norm, Adam, GradScaler, Hyper, Optimizer, ParamGroup, Sgd, StepLr,
};
use vpr_engine::{DType, Device, Error, Tensor};

fn randn(n: usize, std: f64, rng: &mut Rng) -> Vec<f64> {
    (0..n).map(|_| std * rng.normal()).collect()
}

fn tensor(v: &[f64], device: &Device) -> Tensor {
    Tensor::from_f64(v, &[v.len()], DType::F32, device).unwrap()
}

fn f32r(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// torch.optim's single-tensor update in f64: the parameter after the given gradients.
fn reference(hyper: &Hyper, p0: &[f64], grads: &[Vec<f64>]) -> Vec<f64> {
    let mut p = p0.to_vec();
    let n = p.len();
    let (mut buf, mut m, mut v) = (None::<Vec<f64>>, vec![0.0; n], vec![0.0; n]);
    for (t, g) in grads.iter().enumerate() {
        match hyper {
            Hyper::Sgd(h) => {
                let d: Vec<f64> = (0..n).map(|i| g[i] + h.weight_decay * p[i]).collect();
                let step: Vec<f64> = if h.momentum == 0.0 {
                    d
                } else {
                    let b: Vec<f64> = match &buf {
                        None => d.clone(),
                        Some(b) => (0..n)
                            .map(|i| b[i] * h.momentum + (1.0 - h.dampening) * d[i])
                            .collect(),
                    };
                    let s = if h.nesterov {
                        (0..n).map(|i| d[i] + h.momentum * b[i]).collect()
                    } else {
                        b.clone()
                    };
                    buf = Some(b);
                    s
                };
                for i in 0..n {
                    p[i] -= h.lr * step[i];
                }
            }
            Hyper::Adam(h) => {
                let (b1, b2) = h.betas;
                let k = (t + 1) as f64;
                for i in 0..n {
                    if h.decoupled {
                        p[i] *= 1.0 - h.lr * h.weight_decay;
                    }
                    let d = if h.decoupled {
                        g[i]
                    } else {
                        g[i] + h.weight_decay * p[i]
                    };
                    m[i] = b1 * m[i] + (1.0 - b1) * d;
                    v[i] = b2 * v[i] + (1.0 - b2) * d * d;
                    let denom = v[i].sqrt() / (1.0 - b2.powf(k)).sqrt() + h.eps;
                    p[i] -= h.lr / (1.0 - b1.powf(k)) * m[i] / denom;
                }
            }
        }
    }
    p
}

fn hypers() -> Vec<(&'static str, Hyper)> {
    let momentum = Sgd {
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 1e-3,
        ..Sgd::new(0.05)
    };
    vec![
        ("sgd", Sgd::new(0.1).into()),
        (
            "sgd wd",
            Sgd {
                weight_decay: 0.05,
                ..Sgd::new(0.1)
            }
            .into(),
        ),
        ("sgd momentum dampening wd", momentum.into()),
        (
            "sgd nesterov",
            Sgd {
                nesterov: true,
                dampening: 0.0,
                ..momentum
            }
            .into(),
        ),
        ("adam", Adam::new(3e-3).into()),
        (
            "adam l2",
            Adam {
                betas: (0.8, 0.99),
                eps: 1e-7,
                weight_decay: 1e-2,
                ..Adam::new(3e-3)
            }
            .into(),
        ),
        (
            "adamw",
            Adam {
                weight_decay: 0.05,
                ..Adam::adamw(3e-3)
            }
            .into(),
        ),
    ]
}

/// The parameter after `grads` on `device`.
fn train(hyper: Hyper, p0: &[f64], grads: &[Vec<f64>], device: &Device) -> Tensor {
    let p = Parameter::new("w", tensor(p0, device));
    let mut opt = Optimizer::single(vec![p.clone()], hyper).unwrap();
    for g in grads {
        p.set_grad(Some(tensor(g, device)));
        opt.step().unwrap();
    }
    assert_eq!(opt.state("w").unwrap().step, grads.len() as u64);
    p.tensor()
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    let mut rng = Rng::new(s);
    for (name, hyper) in hypers() {
        for &n in ODD_SIZES.iter().chain(&[0, 70_001]) {
            let p0 = f32r(&randn(n, 1.0, &mut rng));
            let grads: Vec<Vec<f64>> = (0..4).map(|_| f32r(&randn(n, 1.0, &mut rng))).collect();
            let got = train(hyper, &p0, &grads, &Device::Cpu)
                .to_f64_vec()
                .unwrap();
            assert_close(
                &got,
                &reference(&hyper, &p0, &grads),
                1e-5,
                &format!("{name} n={n}"),
                s,
            );
        }
    }
}

#[test]
fn gpu_matches_cpu() {
    let s = seed("gpu_matches_cpu");
    let mut rng = Rng::new(s);
    for device in gpu_devices() {
        for (name, hyper) in hypers() {
            for &n in ODD_SIZES.iter().chain(&[0, 1030]) {
                let p0 = randn(n, 1.0, &mut rng);
                let grads: Vec<Vec<f64>> = (0..3).map(|_| randn(n, 1.0, &mut rng)).collect();
                let got = train(hyper, &p0, &grads, &device).to_f64_vec().unwrap();
                let want = train(hyper, &p0, &grads, &Device::Cpu)
                    .to_f64_vec()
                    .unwrap();
                assert_close(&got, &want, 1e-5, &format!("{device} {name} n={n}"), s);
            }
        }
    }
}

#[test]
fn sgd_momentum_semantics() {
    let cpu = Device::Cpu;
    let run = |h: Sgd, grads: &[f64]| -> Vec<f64> {
        let p = Parameter::new("w", tensor(&[1.0], &cpu));
        let mut opt = Optimizer::single(vec![p.clone()], h).unwrap();
        grads
            .iter()
            .map(|&g| {
                p.set_grad(Some(tensor(&[g], &cpu)));
                opt.step().unwrap();
                p.tensor().to_f64_vec().unwrap()[0]
            })
            .collect()
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6);
    // first step: the buffer is the gradient itself, no dampening applied
    let h = Sgd {
        momentum: 0.5,
        dampening: 0.5,
        ..Sgd::new(0.1)
    };
    let got = run(h, &[2.0, 2.0]);
    // buf1 = 2, p = 1 - 0.2 = 0.8; buf2 = 0.5*2 + 0.5*2 = 2, p = 0.6
    assert!(close(&got, &[0.8, 0.6]), "{got:?}");
    // Nesterov: d + momentum * buf
    let h = Sgd {
        momentum: 0.5,
        nesterov: true,
        ..Sgd::new(0.1)
    };
    let got = run(h, &[2.0, 2.0]);
    // buf1 = 2, step 2 + 1 = 3 -> 0.7; buf2 = 1 + 2 = 3, step 2 + 1.5 -> 0.35
    assert!(close(&got, &[0.7, 0.35]), "{got:?}");
    // weight decay enters the gradient before the buffer
    let h = Sgd {
        momentum: 0.5,
        weight_decay: 0.5,
        ..Sgd::new(0.1)
    };
    let got = run(h, &[0.0]);
    assert!(close(&got, &[0.95]), "{got:?}");
}

#[test]
fn adam_bias_correction_and_decay_variants() {
    let cpu = Device::Cpu;
    let step = |h: Adam, p0: f64, g: f64| -> f64 {
        let p = Parameter::new("w", tensor(&[p0], &cpu));
        let mut opt = Optimizer::single(vec![p.clone()], h).unwrap();
        p.set_grad(Some(tensor(&[g], &cpu)));
        opt.step().unwrap();
        p.tensor().to_f64_vec().unwrap()[0]
    };
    // bias correction makes the first step lr * sign(g), whatever the betas
    for betas in [(0.9, 0.999), (0.5, 0.6)] {
        let h = Adam {
            betas,
            eps: 0.0,
            ..Adam::new(0.01)
        };
        assert!((step(h, 1.0, 3.0) - 0.99).abs() < 1e-6);
        assert!((step(h, 1.0, -1e-3) - 1.01).abs() < 1e-6);
    }
    // Adam's L2 decay is part of the gradient (so normalised away on step 1); AdamW's is not
    let l2 = Adam {
        weight_decay: 0.5,
        eps: 0.0,
        ..Adam::new(0.01)
    };
    assert!((step(l2, 2.0, 0.0) - 1.99).abs() < 1e-6);
    let w = Adam {
        weight_decay: 0.5,
        eps: 0.0,
        ..Adam::adamw(0.01)
    };
    // p * (1 - 0.005) = 1.99, then a step of lr * sign(g)
    assert!((step(w, 2.0, 1.0) - 1.98).abs() < 1e-6);
}

#[test]
fn groups_skipped_and_frozen_parameters() {
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        let mk = |name: &str| Parameter::new(name, tensor(&[1.0, 2.0, 3.0], &device));
        let (a, b, no_grad, frozen) = (mk("a"), mk("b"), mk("no_grad"), mk("frozen"));
        frozen.set_trainable(false);
        let mut opt = Optimizer::new(vec![
            ParamGroup::new(vec![a.clone(), no_grad.clone()], Sgd::new(1.0)),
            ParamGroup::new(vec![b.clone(), frozen.clone()], Sgd::new(0.01)),
        ])
        .unwrap();
        for p in [&a, &b, &frozen] {
            p.set_grad(Some(tensor(&[1.0, 1.0, 1.0], &device)));
        }
        opt.step().unwrap();
        let v = |p: &Parameter| p.tensor().to_f64_vec().unwrap();
        assert_eq!(v(&a), [0.0, 1.0, 2.0], "{device}");
        let want_b: Vec<f64> = [1.0f32, 2.0, 3.0]
            .iter()
            .map(|x| (x - 0.01f32) as f64)
            .collect();
        assert_eq!(v(&b), want_b, "{device}");
        assert_eq!(v(&no_grad), [1.0, 2.0, 3.0], "{device}");
        assert_eq!(v(&frozen), [1.0, 2.0, 3.0], "{device}");
        assert!(opt.state("no_grad").is_none() && opt.state("frozen").is_none());
        assert_eq!(opt.groups()[1].hyper.lr(), 0.01);
        opt.zero_grad();
        assert!(a.grad().is_none() && frozen.grad().is_none());
    }
}

#[test]
fn bad_configurations_are_errors() {
    let cpu = Device::Cpu;
    let p = Parameter::new("w", tensor(&[1.0], &cpu));
    let bad: Vec<Hyper> = vec![
        Sgd {
            nesterov: true,
            ..Sgd::new(0.1)
        }
        .into(),
        Sgd {
            nesterov: true,
            momentum: 0.9,
            dampening: 0.1,
            ..Sgd::new(0.1)
        }
        .into(),
        Sgd::new(-1.0).into(),
        Adam {
            betas: (1.0, 0.9),
            ..Adam::new(0.1)
        }
        .into(),
        Adam {
            eps: f64::NAN,
            ..Adam::new(0.1)
        }
        .into(),
    ];
    for h in bad {
        assert!(
            matches!(
                Optimizer::single(vec![p.clone()], h),
                Err(Error::Argument(_))
            ),
            "{h:?}"
        );
    }
    let twin = Parameter::new("w", tensor(&[1.0], &cpu));
    assert!(
        matches!(Optimizer::single(vec![p.clone(), twin], Sgd::new(0.1)), Err(Error::Argument(m)) if m.contains("'w'"))
    );
    let half = Parameter::new("h", Tensor::zeros(&[2], DType::F16, &cpu).unwrap());
    assert!(matches!(
        Optimizer::single(vec![half], Sgd::new(0.1)),
        Err(Error::DType(_))
    ));
    let mut opt = Optimizer::single(vec![p.clone()], Sgd::new(0.1)).unwrap();
    p.set_grad(Some(tensor(&[1.0, 2.0], &cpu)));
    assert!(matches!(opt.step(), Err(Error::Shape(m)) if m.contains("'w'")));
    assert!(opt.hyper_mut(3).is_err());
}

#[test]
fn grad_scaler_grows_backs_off_and_skips() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let p = Parameter::new("w", tensor(&[1.0, 1.0, 1.0], &device));
        let mut opt = Optimizer::single(vec![p.clone()], Sgd::new(1.0)).unwrap();
        let mut scaler = GradScaler::with_options(8.0, 2.0, 0.5, 3).unwrap();
        // (gradient before scaling, whether finite): 3 good steps grow the scale, an inf and a
        // NaN back it off and skip the step, then growth needs 3 good steps again
        let seq: [(f64, bool); 8] = [
            (0.5, true),
            (0.5, true),
            (0.5, true),
            (f64::INFINITY, false),
            (f64::NAN, false),
            (0.5, true),
            (0.5, true),
            (0.5, true),
        ];
        let scales = [8.0, 8.0, 8.0, 16.0, 8.0, 4.0, 4.0, 4.0];
        let mut want_p = 1.0f32;
        for (i, (&(g, good), &scale)) in seq.iter().zip(&scales).enumerate() {
            assert_eq!(scaler.scale(), scale, "{device} step {i}");
            let before = p.tensor().to_f64_vec().unwrap();
            // the gradient a backward of loss * scale would produce
            p.set_grad(Some(tensor(
                &[g * scale as f64, 0.25 * scale as f64, 0.0],
                &device,
            )));
            let stepped = scaler.step(&mut opt).unwrap();
            assert_eq!(stepped, good, "{device} step {i}");
            if good {
                want_p -= 0.5;
                // the optimizer saw the unscaled gradient
                assert_eq!(
                    p.tensor().to_f64_vec().unwrap()[0],
                    want_p as f64,
                    "{device} step {i}"
                );
            } else {
                assert_eq!(
                    p.tensor().to_f64_vec().unwrap(),
                    before,
                    "{device} step {i}: skipped step changed w"
                );
            }
            scaler.update().unwrap();
        }
        assert_eq!(scaler.scale(), 8.0, "{device}");
        assert_eq!(scaler.growth_tracker(), 0, "{device}");
        // update without a step, and unscaling twice, are errors
        assert!(scaler.update().is_err());
        p.set_grad(Some(tensor(&[1.0, 1.0, 1.0], &device)));
        assert!(!scaler.unscale(&opt).unwrap());
        assert!(scaler.unscale(&opt).is_err());
        // gradients were divided by the scale in place of the parameter's gradient
        assert_eq!(
            p.grad().unwrap().to_f64_vec().unwrap(),
            [0.125; 3],
            "{device}"
        );
    }
    // the defaults are torch's
    let s = GradScaler::new();
    assert_eq!((s.scale(), s.growth_tracker()), (65536.0, 0));
    let mut off = GradScaler::disabled();
    assert_eq!(off.scale(), 1.0);
    assert!(!off
        .unscale(&Optimizer::single(vec![], Sgd::new(0.1)).unwrap())
        .unwrap());
    assert!(GradScaler::with_options(1.0, 0.5, 0.5, 10).is_err());
}

#[test]
fn grad_scaler_growth_every_2000_steps_and_scaled_backward() {
    let cpu = Device::Cpu;
    let p = Parameter::new("w", tensor(&[0.0], &cpu));
    let mut opt = Optimizer::single(vec![p.clone()], Sgd::new(0.0)).unwrap();
    let mut scaler = GradScaler::new();
    for i in 0..2000 {
        assert_eq!(scaler.scale(), 65536.0, "step {i}");
        p.set_grad(Some(tensor(&[1.0], &cpu)));
        assert!(scaler.step(&mut opt).unwrap());
        scaler.update().unwrap();
    }
    assert_eq!(scaler.scale(), 131072.0);
    // backward of the scaled loss: gradients arrive multiplied by the scale
    let x = Tensor::randn(&[4, 3], 0.0, 1.0, 5, DType::F32, &cpu)
        .unwrap()
        .requires_grad();
    let y = Tensor::from_slice(&[0i64, 1, 2, 0], &[4], &cpu).unwrap();
    let loss = x
        .cross_entropy(&y, vpr_engine::ops::loss::Reduction::Mean)
        .unwrap();
    let scaled = scaler
        .backward(&loss)
        .unwrap()
        .get(&x)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    let loss = x
        .cross_entropy(&y, vpr_engine::ops::loss::Reduction::Mean)
        .unwrap();
    let plain = vpr_engine::autograd::backward(&loss)
        .unwrap()
        .get(&x)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    for (a, b) in scaled.iter().zip(&plain) {
        assert_eq!(*a, b * 131072.0);
    }
}

#[test]
fn clipping_matches_reference_on_every_device() {
    let s = seed("clipping_matches_reference_on_every_device");
    let mut rng = Rng::new(s);
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    let sizes = [1usize, 7, 33, 257, 9001];
    let grads: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&n| f32r(&randn(n, 0.3, &mut rng)))
        .collect();
    let total: f64 = grads.iter().flatten().map(|g| g * g).sum::<f64>().sqrt();
    for device in devices {
        for max_norm in [0.5 * total, 2.0 * total, 0.0] {
            let params: Vec<Parameter> = grads
                .iter()
                .enumerate()
                .map(|(i, g)| {
                    let p = Parameter::new(format!("p{i}"), tensor(g, &device));
                    p.set_grad(Some(tensor(g, &device)));
                    p
                })
                .collect();
            let unclipped = Parameter::new("frozen", tensor(&[100.0], &device));
            unclipped.set_grad(Some(tensor(&[100.0], &device)));
            unclipped.set_trainable(false);
            let mut all = params.clone();
            all.push(unclipped.clone());
            let norm = clip_grad_norm(&all, max_norm).unwrap();
            assert_eq!(norm.shape(), &[] as &[usize]);
            assert!(norm.device().same(&device));
            let what = format!("{device} max_norm {max_norm}");
            assert_close(
                &norm.to_f64_vec().unwrap(),
                &[total],
                1e-5,
                &format!("norm {what}"),
                s,
            );
            let coef = (max_norm / (total + 1e-6)).min(1.0);
            for (p, g) in params.iter().zip(&grads) {
                let want: Vec<f64> = g.iter().map(|x| x * coef).collect();
                assert_close(
                    &p.grad().unwrap().to_f64_vec().unwrap(),
                    &want,
                    1e-5,
                    &what,
                    s,
                );
            }
            assert_eq!(unclipped.grad().unwrap().to_f64_vec().unwrap(), [100.0]);
        }
    }
    assert_eq!(
        clip_grad_norm(&[], 1.0).unwrap().to_scalar_f64().unwrap(),
        0.0
    );
    assert!(clip_grad_norm(&[], -1.0).is_err());
}

#[test]
fn step_lr_multiplies_every_group_by_gamma() {
    let cpu = Device::Cpu;
    let p = Parameter::new("a", tensor(&[1.0], &cpu));
    let q = Parameter::new("b", tensor(&[1.0], &cpu));
    let mut opt = Optimizer::new(vec![
        ParamGroup::new(vec![p], Sgd::new(0.1)),
        ParamGroup::new(vec![q], Adam::new(0.01)),
    ])
    .unwrap();
    let mut sched = StepLr::new(5, 0.5).unwrap();
    let mut lrs = Vec::new();
    for _ in 0..12 {
        lrs.push((opt.groups()[0].hyper.lr(), opt.groups()[1].hyper.lr()));
        sched.step(&mut opt).unwrap();
    }
    // torch: lr of epoch e is base * gamma^(e // step_size), computed by repeated products
    for (e, &(a, b)) in lrs.iter().enumerate() {
        let k = e / 5;
        let (mut wa, mut wb) = (0.1, 0.01);
        for _ in 0..k {
            wa *= 0.5;
            wb *= 0.5;
        }
        assert_eq!((a, b), (wa, wb), "epoch {e}");
    }
    assert_eq!(sched.last_epoch(), 12);
    assert!(StepLr::new(0, 0.5).is_err());
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::train::optim::conformance, "optim conformance");
}
