//! One training step (forward, cross-entropy, backward, AdamW) of an MLP at a realistic size,
//! batch 256 and width 2048, on the CPU (and on a GPU where one exists), against PyTorch on the
//! same machine in the same run when a Python with torch is available (`VPR_BENCH_PYTHON`, default
//! `python3`). Prints the median time per step and the ratio.
//!
//! `cargo bench --bench mlp_step`

use std::process::Command;
use std::time::Instant;
use vpr_engine::autograd;
use vpr_engine::nn::{Linear, Module};
use vpr_engine::ops::loss::Reduction;
use vpr_engine::train::{Adam, Optimizer};
use vpr_engine::{DType, Device, Result, Tensor};

const BATCH: usize = 256;
const WIDTH: usize = 2048;
const CLASSES: usize = 1000;
const STEPS: usize = 10;

fn ours(device: &Device) -> Result<f64> {
    let fc1 = Linear::new("fc1", WIDTH, WIDTH, true, 1, device)?;
    let fc2 = Linear::new("fc2", WIDTH, CLASSES, true, 2, device)?;
    let params: Vec<_> = fc1
        .parameters()
        .into_iter()
        .chain(fc2.parameters())
        .collect();
    let mut opt = Optimizer::single(params, Adam::adamw(1e-3))?;
    let x = Tensor::randn(&[BATCH, WIDTH], 0.0, 1.0, 3, DType::F32, device)?;
    let labels: Vec<i64> = (0..BATCH as i64)
        .map(|i| (i * 7919) % CLASSES as i64)
        .collect();
    let y = Tensor::from_vec(labels, &[BATCH], device)?;
    let mut step = || -> Result<()> {
        opt.zero_grad();
        let logits = fc2.forward(&fc1.forward(&x)?.gelu()?)?;
        let loss = logits.cross_entropy(&y, Reduction::Mean)?;
        autograd::backward(&loss)?;
        opt.step()?;
        if let Some(g) = device.gpu() {
            g.synchronize()?;
        }
        Ok(())
    };
    for _ in 0..2 {
        step()?;
    }
    let mut times = Vec::new();
    for _ in 0..STEPS {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn pytorch(device: &str, threads: usize) -> std::result::Result<f64, String> {
    let python = std::env::var("VPR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/mlp_step.py");
    let args = [BATCH, WIDTH, CLASSES, threads].map(|v| v.to_string());
    let out = Command::new(&python)
        .arg(script)
        .args(&args)
        .args([device, &STEPS.to_string()])
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ms_per_step=")?.parse().ok())
        .ok_or_else(|| {
            format!(
                "{python} {script}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no output")
            )
        })
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("MLP training step: batch {BATCH}, {WIDTH} -> GELU -> {CLASSES}, AdamW, f32; median of {STEPS}");
    let mut devices = vec![("cpu", Device::Cpu)];
    match Device::new("cuda") {
        Ok(d) => devices.push(("cuda", d)),
        Err(e) => {
            println!("(GPU part skipped: {e})");
            // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
            if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
        }
    }
    println!(
        "{:<6} {:>14} {:>14} {:>18}",
        "device", "ours ms", "pytorch ms", "pytorch/ours"
    );
    for (name, device) in devices {
        let ours = match ours(&device) {
            Ok(ms) => ms,
            Err(e) => {
                println!("{name:<6} failed: {e}");
                continue;
            }
        };
        match pytorch(name, threads) {
            Ok(pt) => println!("{name:<6} {ours:>14.1} {pt:>14.1} {:>17.2}x", pt / ours),
            Err(e) => println!(
                "{name:<6} {ours:>14.1} {:>14} (PyTorch unavailable: {e})",
                "-"
            ),
        }
    }
}
