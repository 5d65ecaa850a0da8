//! The CPU's element-wise, normalisation and pooling ops against PyTorch's at the shapes of a
//! ResNet-18 training step (batch 32, 56x56x64 channels-last activations, max pooling of
//! 112x112x64) and of a ViT-B forward (257 tokens of 768, MLP width 3072), f32, as many threads
//! as the machine has on both sides (PyTorch side: benches/elementwise.py, run with
//! `VPR_BENCH_PYTHON`; its ResNet tensors are channels-last, as ours are NHWC).
//!
//! Each op's median milliseconds over its repetitions; ours and PyTorch's alternate in two
//! rounds, and the table keeps each side's faster round (other work on a shared machine slows
//! one round more than the other). `fwd+bwd` runs the forward and the backward of a given
//! output gradient through autograd. `cargo bench --bench elementwise` (or `-- cpu`, its only part).

mod common;

use vpr_engine::autograd::backward_with;
use vpr_engine::nn::{BatchNorm2d, Module};
use vpr_engine::{DType, Device, Tensor};

const ROUNDS: usize = 2;

/// The ops in the order benches/elementwise.py prints them.
const OPS: [&str; 14] = [
    "relu",
    "relu fwd+bwd",
    "add",
    "bias add",
    "batchnorm train fwd",
    "batchnorm train fwd+bwd",
    "max pool 3x3/2",
    "max pool fwd+bwd",
    "gelu",
    "gelu fwd+bwd",
    "layer norm",
    "layer norm fwd+bwd",
    "layerscale mul",
    "residual add (vit)",
];

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap()
}

fn ours() -> Vec<f64> {
    let act = [32, 56, 56, 64];
    let x = randn(&act, 1);
    let y = randn(&act, 2);
    let g = randn(&act, 3);
    let rows = randn(&[32 * 56 * 56, 64], 4);
    let bias = randn(&[64], 5);
    let bn = BatchNorm2d::new("bn", 64, &Device::Cpu).unwrap();
    bn.set_train(true);
    let pool_in = randn(&[32, 112, 112, 64], 6);
    let pool_g = randn(&act, 7);
    let hidden = randn(&[257, 3072], 8);
    let hidden_g = randn(&[257, 3072], 9);
    let tokens = randn(&[257, 768], 10);
    let tokens_g = randn(&[257, 768], 11);
    let other_tokens = randn(&[257, 768], 12);
    let (w, b) = (randn(&[768], 13), randn(&[768], 14));
    let xg = x.clone().requires_grad();
    let pool_xg = pool_in.clone().requires_grad();
    let hidden_xg = hidden.clone().requires_grad();
    let tokens_xg = tokens.clone().requires_grad();
    let big = 10;
    let small = 50;
    vec![
        common::median_ms(1, big, || drop(x.relu().unwrap())),
        common::median_ms(1, big, || {
            drop(backward_with(&xg.relu().unwrap(), g.clone()).unwrap())
        }),
        common::median_ms(1, big, || drop(x.add(&y).unwrap())),
        common::median_ms(1, big, || drop(rows.add(&bias).unwrap())),
        common::median_ms(1, big, || drop(bn.forward(&x).unwrap())),
        common::median_ms(1, big, || {
            drop(backward_with(&bn.forward(&xg).unwrap(), g.clone()).unwrap())
        }),
        common::median_ms(1, big, || drop(pool_in.max_pool2d(3, 2, 1).unwrap())),
        common::median_ms(1, big, || {
            let out = pool_xg.max_pool2d(3, 2, 1).unwrap();
            drop(backward_with(&out, pool_g.clone()).unwrap())
        }),
        common::median_ms(1, small, || drop(hidden.gelu().unwrap())),
        common::median_ms(1, small, || {
            drop(backward_with(&hidden_xg.gelu().unwrap(), hidden_g.clone()).unwrap())
        }),
        common::median_ms(1, small, || {
            drop(tokens.layer_norm(Some(&w), Some(&b), 1e-6).unwrap())
        }),
        common::median_ms(1, small, || {
            let out = tokens_xg.layer_norm(Some(&w), Some(&b), 1e-6).unwrap();
            drop(backward_with(&out, tokens_g.clone()).unwrap())
        }),
        common::median_ms(1, small, || drop(tokens.mul(&w).unwrap())),
        common::median_ms(1, small, || drop(tokens.add(&other_tokens).unwrap())),
    ]
}

fn main() {
    if !common::wants("cpu") {
        return; // the only part
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("CPU element-wise ops, f32, {threads} threads; median ms, best of {ROUNDS} rounds");
    println!("load average before: {}", load().trim());
    let mut best_ours = vec![f64::INFINITY; OPS.len()];
    let mut best_torch: Option<Vec<f64>> = None;
    let mut torch_error = None;
    for _ in 0..ROUNDS {
        for (b, t) in best_ours.iter_mut().zip(ours()) {
            *b = b.min(t);
        }
        match common::python_numbers("elementwise.py", &[threads.to_string()], "ms") {
            Ok(t) if t.len() == OPS.len() => {
                let best = best_torch.get_or_insert_with(|| vec![f64::INFINITY; OPS.len()]);
                for (b, t) in best.iter_mut().zip(t) {
                    *b = b.min(t);
                }
            }
            Ok(t) => torch_error = Some(format!("PyTorch printed {} numbers", t.len())),
            Err(e) => torch_error = Some(e),
        }
    }
    println!("\n| op | ours ms | PyTorch ms | PyTorch / ours |\n|---|---|---|---|");
    for (i, op) in OPS.iter().enumerate() {
        match &best_torch {
            Some(t) => println!(
                "| {op} | {:.3} | {:.3} | {:.2} |",
                best_ours[i],
                t[i],
                t[i] / best_ours[i]
            ),
            None => println!("| {op} | {:.3} | - | - |", best_ours[i]),
        }
    }
    if let Some(e) = torch_error {
        println!("PyTorch: {e}");
    }
    println!("load average after: {}", load().trim());
}
