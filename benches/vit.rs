//! Vision transformers against PyTorch on the same machine in the same run (the PyTorch side is
//! benches/vit.py, run with `VPR_BENCH_PYTHON`, default `python3`):
//!
//! * `cpu`: DINOv2 ViT-B/14 class-token descriptors (`models::load` -> `descriptors`) at 224x224,
//!   batch 1, f32, median milliseconds; PyTorch runs the same network with DINOv2's attention and
//!   with `scaled_dot_product_attention`, and the ratio is against the faster.
//! * `gpu` (with a usable CUDA device; a failure without one under `VPR_REQUIRE_GPU=1`): fused
//!   attention forward and forward + backward against `scaled_dot_product_attention` at DINOv2
//!   shapes (16 heads of 64, 257 and 1370 tokens, bf16, f16 and f32), and SelaVPR ViT-L/14 global
//!   and local features, images per second at 224x224, f32, against PyTorch eager.
//!
//! `cargo bench --bench vit` (or `-- cpu`, `-- gpu`). The weights are the synthetic full-size ones
//! of the tests (tests/common/synthetic.rs); speed does not depend on them.

mod common;
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use std::path::Path;
use std::time::Instant;
use vpr_engine::{autograd, models, DType, Device, Tensor};

const STEPS: usize = 10;

fn strings(values: &[&dyn ToString]) -> Vec<String> {
    values.iter().map(|v| v.to_string()).collect()
}

/// Median seconds of `STEPS` runs of `f` after two warm-ups; `f` returns its own duration.
fn median(mut f: impl FnMut() -> f64) -> f64 {
    for _ in 0..2 {
        f();
    }
    let mut t: Vec<f64> = (0..STEPS).map(|_| f()).collect();
    t.sort_by(f64::total_cmp);
    t[STEPS / 2]
}

fn cpu(dir: &Path, threads: usize) {
    const SIDE: usize = 224;
    let weights = dir.join("dinov2_vitb14.safetensors");
    synthetic::write_weights("dinov2_vitb14", &[], &weights);
    let model = models::load(&weights, &Device::Cpu).expect("load the ViT-B/14");
    let x = Tensor::randn(&[1, SIDE, SIDE, 3], 0.0, 1.0, 1, DType::F32, &Device::Cpu).unwrap();
    let ours = 1e3
        * median(|| {
            let t = Instant::now();
            model.descriptors(&x).unwrap();
            t.elapsed().as_secs_f64()
        });
    println!("DINOv2 ViT-B/14 forward, f32, {SIDE}x{SIDE}, batch 1, CPU, {threads} threads; median of {STEPS}");
    println!(
        "{:>10} {:>14} {:>12} {:>14}",
        "ours ms", "pt dinov2 ms", "pt sdpa ms", "best pt/ours"
    );
    let args = strings(&[&"forward", &threads, &STEPS, &SIDE]);
    match common::python_numbers("vit.py", &args, "ms_per_image").as_deref() {
        Ok(&[plain, sdpa]) => println!(
            "{ours:>10.1} {plain:>14.1} {sdpa:>12.1} {:>13.2}x",
            plain.min(sdpa) / ours
        ),
        Ok(other) => println!("{ours:>10.1} (PyTorch printed {other:?})"),
        Err(e) => println!("{ours:>10.1} (PyTorch unavailable: {e})"),
    }
}

/// Our attention's forward and forward + backward milliseconds at [batch, heads, length, dim].
fn attention_ms(dev: &Device, shape: [usize; 4], dtype: DType) -> [f64; 2] {
    let gpu = dev.gpu().unwrap();
    let randn = |seed| Tensor::randn(&shape, 0.0, 1.0, seed, dtype, dev).unwrap();
    let (q, k, v, g) = (randn(1), randn(2), randn(3), randn(4));
    let scale = 1.0 / (shape[3] as f64).sqrt();
    let forward = median(|| {
        let t = Instant::now();
        let y = q.attention(&k, &v, scale).unwrap();
        gpu.synchronize().unwrap();
        drop(y);
        t.elapsed().as_secs_f64()
    });
    let (q, k, v) = (q.requires_grad(), k.requires_grad(), v.requires_grad());
    let both = median(|| {
        let t = Instant::now();
        let y = q.attention(&k, &v, scale).unwrap();
        let grads = autograd::backward_with(&y, g.clone()).unwrap();
        gpu.synchronize().unwrap();
        drop(grads);
        t.elapsed().as_secs_f64()
    });
    [forward * 1e3, both * 1e3]
}

fn gpu(dir: &Path) {
    let dev = match Device::new("cuda") {
        Ok(d) => d,
        Err(e) => {
            println!("vit gpu part skipped: no usable CUDA device ({e}).");
            // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
            if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return;
        }
    };
    println!(
        "\n## attention against scaled_dot_product_attention: {}\n",
        dev.gpu().unwrap().describe()
    );
    println!("median ms; ratio = PyTorch time / our time.\n");
    println!("| batch x heads x tokens x dim | dtype | ours fwd | SDPA fwd | ratio | ours fwd+bwd | SDPA fwd+bwd | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for shape in [[32, 16, 257, 64], [8, 16, 1370, 64]] {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            let ours = attention_ms(&dev, shape, dtype);
            let args = strings(&[&"attention", &shape[0], &shape[1], &shape[2], &shape[3]])
                .into_iter()
                .chain([
                    match dtype {
                        DType::BF16 => "bfloat16",
                        DType::F16 => "float16",
                        _ => "float32",
                    }
                    .to_string(),
                    STEPS.to_string(),
                ])
                .collect::<Vec<_>>();
            let [b, h, l, d] = shape;
            match common::python_numbers("vit.py", &args, "ms").as_deref() {
                Ok(&[fwd, both]) => println!(
                    "| {b}x{h}x{l}x{d} | {dtype} | {:.3} | {fwd:.3} | {:.2} | {:.3} | {both:.3} | {:.2} |",
                    ours[0],
                    fwd / ours[0],
                    ours[1],
                    both / ours[1]
                ),
                other => println!(
                    "| {b}x{h}x{l}x{d} | {dtype} | {:.3} | - | - | {:.3} | - | - | (PyTorch: {other:?})",
                    ours[0], ours[1]
                ),
            }
        }
    }
    const BATCH: usize = 32;
    const SIDE: usize = 224;
    let weights = dir.join("selavpr.safetensors");
    synthetic::write_weights("selavpr", &[], &weights);
    let model = models::load(&weights, &dev).expect("load SelaVPR");
    let gpu = dev.gpu().unwrap();
    let x = Tensor::randn(&[BATCH, SIDE, SIDE, 3], 0.0, 1.0, 1, DType::F32, &dev).unwrap();
    let seconds = median(|| {
        let t = Instant::now();
        let out = model.descriptors_and_local(&x).unwrap();
        gpu.synchronize().unwrap();
        drop(out);
        t.elapsed().as_secs_f64()
    });
    let ours = BATCH as f64 / seconds;
    println!("\nSelaVPR ViT-L/14 global + local features, f32, {SIDE}x{SIDE}, batch {BATCH}");
    match common::python_numbers(
        "vit.py",
        &strings(&[&"selavpr", &BATCH, &SIDE, &STEPS]),
        "images_per_second",
    )
    .as_deref()
    {
        Ok(&[pt, ..]) => println!(
            "ours {ours:.1} img/s, PyTorch eager {pt:.1} img/s: {:.2}x",
            ours / pt
        ),
        other => println!("ours {ours:.1} img/s (PyTorch: {other:?})"),
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = std::env::temp_dir().join(format!("vpr-bench-vit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if common::wants("cpu") {
        cpu(&dir, threads);
    }
    if common::wants("gpu") {
        gpu(&dir);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
