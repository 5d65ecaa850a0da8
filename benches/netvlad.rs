//! NetVLAD aggregation on the CPU against PyTorch's einsum form on the same machine in the same
//! run (when `VPR_BENCH_PYTHON`, default `python3`, has torch): a 30x40x512 feature map (VGG16
//! conv5_3 at 480x640), K = 64 clusters, batch 32, f32, median milliseconds of 10 after 2
//! warm-ups, for the forward (no tape) and for forward + backward to the assignment weights and
//! the centroids (the loss sum(descriptor * r)), both on 2 threads unless `VPR_BENCH_THREADS`.
//!
//! `cargo bench --bench netvlad`.

use std::process::Command;
use std::time::Instant;
use vpr_engine::autograd::{backward_with, no_grad};
use vpr_engine::nn::NetVlad;
use vpr_engine::{DType, Device, Tensor};

const STEPS: usize = 10;
const SHAPE: [usize; 4] = [32, 30, 40, 512];
const CLUSTERS: usize = 64;

fn median_ms(mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut times: Vec<f64> = (0..STEPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[STEPS / 2]
}

fn pytorch(threads: usize) -> Result<Vec<f64>, String> {
    let python = std::env::var("VPR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/netvlad.py");
    let [n, h, w, d] = SHAPE;
    let args = [n, h, w, d, CLUSTERS, threads, STEPS].map(|v| v.to_string());
    let out = Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let values = l.strip_prefix("ms=")?;
            values.split(',').map(|v| v.parse().ok()).collect()
        })
        .ok_or_else(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            err.lines().last().unwrap_or("no output").to_string()
        })
}

fn main() {
    let threads: usize = std::env::var("VPR_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let cpu = Device::Cpu;
    let [n, h, w, d] = SHAPE;
    let layer = NetVlad::new("net_vlad", CLUSTERS, d, true, &cpu).unwrap();
    let x = Tensor::randn(&SHAPE, 0.0, 1.0, 1, DType::F32, &cpu).unwrap();
    let r = Tensor::randn(&[n, CLUSTERS * d], 0.0, 1.0, 2, DType::F32, &cpu).unwrap();
    let forward = median_ms(|| {
        no_grad(|| layer.forward(&x)).unwrap();
    });
    let forward_backward = median_ms(|| {
        let y = layer.forward(&x).unwrap();
        backward_with(&y, r.clone()).unwrap();
        layer.centroids.zero_grad();
        layer.conv.weight.zero_grad();
    });
    println!(
        "NetVLAD aggregation, {n} x {h}x{w}x{d}, K = {CLUSTERS}, f32, CPU, median of {STEPS} (ms)"
    );
    println!(
        "{:>18} {:>10} {:>14} {:>14}",
        "", "ours", "PyTorch einsum", "PyTorch / ours"
    );
    match pytorch(threads).as_deref() {
        Ok(&[pf, pfb]) => {
            println!(
                "{:>18} {forward:>10.1} {pf:>14.1} {:>13.2}x",
                "forward",
                pf / forward
            );
            println!(
                "{:>18} {forward_backward:>10.1} {pfb:>14.1} {:>13.2}x",
                "forward+backward",
                pfb / forward_backward
            );
        }
        other => {
            println!("{:>18} {forward:>10.1} (PyTorch: {other:?})", "forward");
            println!("{:>18} {forward_backward:>10.1}", "forward+backward");
        }
    }
}
