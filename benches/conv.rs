//! CPU convolution forward (f32, batch 1, NHWC) at ResNet-50's layer shapes at 224x224, against
//! PyTorch's `F.conv2d` on the same machine in the same run (NCHW, its default, and channels-last)
//! when a Python with torch is available (`VPR_BENCH_PYTHON`, default `python3`), with as many
//! threads. Prints the best time per shape and, weighting each shape by how often ResNet-50 has
//! it, the time of all 53 convolutions of one forward pass.
//!
//! `cargo bench --bench conv`

use std::process::Command;
use std::time::Instant;
use vpr_engine::ops::conv::Conv2dOptions;
use vpr_engine::{DType, Device, Result, Tensor};

/// A convolution shape: input H (= W), C, output channels, kernel, stride, and how many of the
/// 53 convolutions of ResNet-50 (torchvision, stride on the 3x3) have it.
#[derive(Clone, Copy)]
struct Shape {
    hw: usize,
    c: usize,
    o: usize,
    k: usize,
    stride: usize,
    count: usize,
}

const fn s(hw: usize, c: usize, o: usize, k: usize, stride: usize, count: usize) -> Shape {
    Shape {
        hw,
        c,
        o,
        k,
        stride,
        count,
    }
}

/// Every distinct convolution of ResNet-50 at 224x224.
const RESNET50: &[Shape] = &[
    s(224, 3, 64, 7, 2, 1),
    // layer1 (56x56)
    s(56, 64, 64, 1, 1, 1),
    s(56, 64, 64, 3, 1, 3),
    s(56, 64, 256, 1, 1, 4),
    s(56, 256, 64, 1, 1, 2),
    // layer2 (56 -> 28)
    s(56, 256, 128, 1, 1, 1),
    s(56, 128, 128, 3, 2, 1),
    s(28, 128, 512, 1, 1, 4),
    s(56, 256, 512, 1, 2, 1),
    s(28, 512, 128, 1, 1, 3),
    s(28, 128, 128, 3, 1, 3),
    // layer3 (28 -> 14)
    s(28, 512, 256, 1, 1, 1),
    s(28, 256, 256, 3, 2, 1),
    s(14, 256, 1024, 1, 1, 6),
    s(28, 512, 1024, 1, 2, 1),
    s(14, 1024, 256, 1, 1, 5),
    s(14, 256, 256, 3, 1, 5),
    // layer4 (14 -> 7)
    s(14, 1024, 512, 1, 1, 1),
    s(14, 512, 512, 3, 2, 1),
    s(7, 512, 2048, 1, 1, 3),
    s(14, 1024, 2048, 1, 2, 1),
    s(7, 2048, 512, 1, 1, 2),
    s(7, 512, 512, 3, 1, 2),
];

const RUNS: usize = 20;

/// The fastest of `RUNS` runs after a warm-up: on a machine shared with other jobs, where a run
/// that loses a core for a scheduler time slice takes tens of milliseconds longer, the minimum is
/// the steadiest estimate of the uncontended time (for both sides).
fn best_ms(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..RUNS {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

fn ours(sh: &Shape) -> Result<f64> {
    let x = Tensor::randn(
        &[1, sh.hw, sh.hw, sh.c],
        0.0,
        1.0,
        1,
        DType::F32,
        &Device::Cpu,
    )?;
    let w = Tensor::randn(
        &[sh.o, sh.k, sh.k, sh.c],
        0.0,
        0.1,
        2,
        DType::F32,
        &Device::Cpu,
    )?;
    let opts = Conv2dOptions::new().stride(sh.stride).padding(sh.k / 2);
    best_ms(|| x.conv2d(&w, None, opts).map(drop))
}

/// PyTorch's best ms per shape, NCHW and channels-last, in RESNET50's order.
fn pytorch(threads: usize) -> std::result::Result<Vec<(f64, f64)>, String> {
    let python = std::env::var("VPR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/conv.py");
    let shapes: Vec<String> = RESNET50
        .iter()
        .map(|s| format!("{},{},{},{},{}", s.hw, s.c, s.o, s.k, s.stride))
        .collect();
    let out = Command::new(&python)
        .arg(script)
        .arg(threads.to_string())
        .arg(RUNS.to_string())
        .args(&shapes)
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let times: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let (a, b) = l.strip_prefix("ms=")?.split_once(',')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .collect();
    if times.len() == RESNET50.len() {
        Ok(times)
    } else {
        Err(format!(
            "{python} {script}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no output")
        ))
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("conv2d forward, f32, batch 1, CPU ({threads} threads), best of {RUNS}; ms");
    let torch = pytorch(threads);
    if let Err(e) = &torch {
        println!("(PyTorch unavailable: {e})");
    }
    println!(
        "{:<28} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "shape (HxW C -> O, k/s)", "count", "ours", "pt nchw", "pt nhwc", "best/ours"
    );
    let mut total = [0.0f64; 3];
    for (i, sh) in RESNET50.iter().enumerate() {
        let name = format!(
            "{}x{} {} -> {}, {}x{}/{}",
            sh.hw, sh.hw, sh.c, sh.o, sh.k, sh.k, sh.stride
        );
        let ms = match ours(sh) {
            Ok(ms) => ms,
            Err(e) => {
                println!("{name:<28} failed: {e}");
                return;
            }
        };
        total[0] += ms * sh.count as f64;
        match &torch {
            Ok(t) => {
                let (nchw, nhwc) = t[i];
                total[1] += nchw * sh.count as f64;
                total[2] += nhwc * sh.count as f64;
                println!(
                    "{name:<28} {:>5} {ms:>9.3} {nchw:>9.3} {nhwc:>9.3} {:>8.2}x",
                    sh.count,
                    nchw.min(nhwc) / ms
                );
            }
            Err(_) => println!("{name:<28} {:>5} {ms:>9.3}", sh.count),
        }
    }
    println!(
        "{:<28} {:>5} {:>9.2} {:>9.2} {:>9.2} {:>8.2}x",
        "ResNet-50, all convolutions",
        53,
        total[0],
        total[1],
        total[2],
        total[1].min(total[2]) / total[0]
    );
}
