//! PyTorch parity of a whole training run: the MLP of tools/fixtures/mlp_training.py (Linear
//! 32->64, GELU, Linear 64->10, cross-entropy; batch 16, 20 steps) trained with 8 optimizer
//! set-ups must give PyTorch's per-step losses and final weights (f32: 1e-5 relative, on the CPU
//! and the virtual GPU; bf16 autocast: 2e-2). Gradients come from the autograd tape (matmul,
//! bias add and GELU backward rules, the fused cross-entropy backward).
mod common;

use common::assert_close;
use safetensors::SafeTensors;
use std::collections::HashMap;
use vpr_engine::autograd::{self, autocast, Parameter};
use vpr_engine::nn::Linear;
use vpr_engine::ops::loss::Reduction;
use vpr_engine::train::{clip_grad_norm, Adam, Optimizer, ParamGroup, Sgd, StepLr};
use vpr_engine::{DType, Device, Tensor};

const STEPS: usize = 20;
const PARAMS: [&str; 4] = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"];

struct Fixture {
    f32s: HashMap<String, (Vec<usize>, Vec<f32>)>,
    labels: Vec<i64>,
}

fn fixture() -> Fixture {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mlp_training.safetensors"
    );
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = HashMap::new();
    let mut labels = Vec::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        if name == "y" {
            labels = data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect();
        } else {
            let v = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            f32s.insert(name, (view.shape().to_vec(), v));
        }
    }
    Fixture { f32s, labels }
}

impl Fixture {
    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f32>) {
        self.f32s
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no {name}"))
    }

    fn tensor(&self, name: &str, device: &Device) -> Tensor {
        let (shape, v) = self.get(name);
        Tensor::from_slice(v, shape, device).unwrap()
    }

    fn values(&self, name: &str) -> Vec<f64> {
        self.get(name).1.iter().map(|&x| x as f64).collect()
    }

    /// Batch `step`: x [16, 32] and y [16].
    fn batch(&self, step: usize, device: &Device) -> (Tensor, Tensor) {
        let x = self
            .tensor("x", device)
            .narrow(0, step, 1)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let n = self.labels.len() / STEPS;
        let y = Tensor::from_slice(&self.labels[step * n..(step + 1) * n], &[n], device).unwrap();
        (x, y)
    }
}

struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(f: &Fixture, device: &Device) -> Mlp {
        let fc1 = Linear::new("fc1", 32, 64, true, 0, device).unwrap();
        let fc2 = Linear::new("fc2", 64, 10, true, 0, device).unwrap();
        let mlp = Mlp { fc1, fc2 };
        for (p, name) in mlp.params().iter().zip(PARAMS) {
            assert_eq!(p.name(), name);
            p.set(f.tensor(&format!("init.{name}"), device)).unwrap();
        }
        mlp
    }

    fn params(&self) -> Vec<Parameter> {
        vec![
            self.fc1.weight.clone(),
            self.fc1.bias.clone().unwrap(),
            self.fc2.weight.clone(),
            self.fc2.bias.clone().unwrap(),
        ]
    }

    /// The loss of one batch (logits in f32 for the loss, as the fixture's `.float()`).
    fn loss(&self, x: &Tensor, y: &Tensor) -> Tensor {
        let h = self.fc1.forward(x).unwrap().gelu().unwrap();
        let logits = self.fc2.forward(&h).unwrap().to_dtype(DType::F32).unwrap();
        logits.cross_entropy(y, Reduction::Mean).unwrap()
    }
}

fn devices() -> Vec<Device> {
    vec![Device::Cpu, Device::new("vgpu").unwrap()]
}

#[test]
fn first_step_gradients_match_pytorch() {
    let f = fixture();
    for device in devices() {
        let mlp = Mlp::new(&f, &device);
        let (x, y) = f.batch(0, &device);
        autograd::backward(&mlp.loss(&x, &y)).unwrap();
        for p in mlp.params() {
            let g = p
                .grad()
                .unwrap_or_else(|| panic!("{device}: no gradient for {}", p.name()));
            let want = f.values(&format!("grad0.{}", p.name()));
            assert_close(
                &g.to_f64_vec().unwrap(),
                &want,
                1e-5,
                &format!("{device} grad0.{}", p.name()),
                0,
            );
        }
    }
}

/// Trains the fixture's run `name` on `device` and compares losses and final weights.
fn check_run(name: &str, tol: f64) {
    let f = fixture();
    for device in devices() {
        let mlp = Mlp::new(&f, &device);
        let params = mlp.params();
        let momentum = |lr| Sgd {
            momentum: 0.9,
            ..Sgd::new(lr)
        };
        let groups = match name {
            "sgd_momentum" => vec![ParamGroup::new(
                params.clone(),
                Sgd {
                    dampening: 0.1,
                    weight_decay: 1e-3,
                    ..momentum(0.05)
                },
            )],
            "sgd_nesterov" => vec![ParamGroup::new(
                params.clone(),
                Sgd {
                    nesterov: true,
                    weight_decay: 1e-3,
                    ..momentum(0.05)
                },
            )],
            "sgd_groups" => vec![
                ParamGroup::new(params[..2].to_vec(), momentum(0.01)),
                ParamGroup::new(params[2..].to_vec(), momentum(0.1)),
            ],
            "sgd_steplr" | "sgd_clip" => vec![ParamGroup::new(params.clone(), momentum(0.1))],
            "adam" => vec![ParamGroup::new(
                params.clone(),
                Adam {
                    betas: (0.9, 0.99),
                    eps: 1e-7,
                    weight_decay: 1e-2,
                    ..Adam::new(3e-3)
                },
            )],
            "adamw" | "adamw_bf16" => vec![ParamGroup::new(
                params.clone(),
                Adam {
                    weight_decay: 0.05,
                    ..Adam::adamw(3e-3)
                },
            )],
            _ => unreachable!("{name}"),
        };
        let mut opt = Optimizer::new(groups).unwrap();
        let mut sched = (name == "sgd_steplr").then(|| StepLr::new(5, 0.5).unwrap());
        let mut losses = Vec::new();
        for step in 0..STEPS {
            opt.zero_grad();
            let (x, y) = f.batch(step, &device);
            let loss = if name == "adamw_bf16" {
                autocast(DType::BF16, || mlp.loss(&x, &y))
            } else {
                mlp.loss(&x, &y)
            };
            autograd::backward(&loss).unwrap();
            for p in &params {
                assert!(
                    p.grad().is_some(),
                    "{device} {name}: no gradient reached {}",
                    p.name()
                );
            }
            if name == "sgd_clip" {
                clip_grad_norm(&params, 0.5).unwrap();
            }
            opt.step().unwrap();
            if let Some(s) = sched.as_mut() {
                s.step(&mut opt).unwrap();
            }
            losses.push(loss.to_scalar_f64().unwrap());
        }
        let what = format!("{device} {name}");
        assert_close(
            &losses,
            &f.values(&format!("{name}.losses")),
            tol,
            &format!("{what} losses"),
            0,
        );
        for p in &params {
            let want = f.values(&format!("{name}.{}", p.name()));
            assert_close(
                &p.tensor().to_f64_vec().unwrap(),
                &want,
                tol,
                &format!("{what} {}", p.name()),
                0,
            );
        }
    }
}

#[test]
fn sgd_momentum() {
    check_run("sgd_momentum", 1e-5);
}

#[test]
fn sgd_nesterov() {
    check_run("sgd_nesterov", 1e-5);
}

#[test]
fn sgd_groups() {
    check_run("sgd_groups", 1e-5);
}

#[test]
fn sgd_steplr() {
    check_run("sgd_steplr", 1e-5);
}

#[test]
fn sgd_clip() {
    check_run("sgd_clip", 1e-5);
}

#[test]
fn adam() {
    check_run("adam", 1e-5);
}

#[test]
fn adamw() {
    check_run("adamw", 1e-5);
}

#[test]
fn adamw_bf16() {
    check_run("adamw_bf16", 2e-2);
}

#[test]
fn training_steps_after_the_first_allocate_nothing_from_the_driver() {
    // a device of its own, so other tests' allocations do not count
    let device = Device::vgpu_with(vpr_engine::device::VgpuOptions::default());
    let gpu = device.gpu().unwrap().clone();
    let f = fixture();
    let mlp = Mlp::new(&f, &device);
    let mut opt = Optimizer::new(vec![ParamGroup::new(mlp.params(), Adam::adamw(1e-3))]).unwrap();
    let mut after_first = 0;
    for step in 0..4 {
        opt.zero_grad();
        let (x, y) = f.batch(step, &device);
        autograd::backward(&mlp.loss(&x, &y)).unwrap();
        opt.step().unwrap();
        if step == 1 {
            after_first = gpu.driver_allocations();
        }
    }
    assert!(after_first > 0);
    assert_eq!(
        gpu.driver_allocations(),
        after_first,
        "steps 3 and 4 called the driver's allocator"
    );
}
