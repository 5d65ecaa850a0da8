//! CosPlace training steps against PyTorch on the same machine in the same run (the PyTorch side
//! is benches/train.py, run with `VPR_BENCH_PYTHON`, default `python3`):
//!
//! * `cpu`: one CosPlace ResNet-18/512 training step at batch 32, 224x224, f32, with as many
//!   threads as the machine has on both sides;
//! * `gpu` (with a usable CUDA device; a failure without one under `VPR_REQUIRE_GPU=1`):
//!   CosPlace ResNet-50/2048 at batch 32, 512x512 (the paper's training size), bf16 autocast on
//!   both sides (PyTorch: `torch.autocast`, eager).
//!
//! A step is what `vpr-engine train` runs per iteration (`train::classify::Trainer::step`): the
//! forward pass in train mode with CosPlace's freezing (conv1, bn1, layer1, layer2 frozen, their
//! BatchNorms still in train mode), CosFace (s = 30, m = 0.4) over a classifier of
//! 1000 classes, the backward pass and Adam steps of the model (1e-5) and the classifier (1e-2).
//! The images are random normalised tensors already on the device: loading and augmentation are
//! not timed. Median and minimum milliseconds of 10 steps after 2 warm-up steps; PyTorch runs in
//! its default layout (NCHW) and in channels-last, and the ratio is against the faster median.
//!
//! `cargo bench --bench train` (or `-- cpu`, `-- gpu`). The weights are the synthetic full-size
//! ones of the tests (tests/common/synthetic.rs); speed does not depend on them.

mod common;
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use std::path::Path;
use std::time::Instant;
use vpr_engine::models::CosPlaceNet;
use vpr_engine::nn::{MarginCosineProduct, Module};
use vpr_engine::train::classify::{Amp, Part, Trainer};
use vpr_engine::{DType, Device, Tensor};

const WARMUP: usize = 2;
const STEPS: usize = 10;
const BATCH: usize = 32;
const CLASSES: usize = 1000;
const SCALE: f32 = 30.0;
const MARGIN: f32 = 0.4;
const LR: f64 = 1e-5;
const CLASSIFIERS_LR: f64 = 1e-2;

/// One configuration of the bench: which network, at what size, in what precision.
struct Config<'a> {
    manifest: &'a str,
    backbone: &'a str,
    dim: usize,
    side: usize,
    amp: Amp,
}

/// Median and minimum milliseconds of our training step on `dev`.
fn ours_ms(dir: &Path, dev: &Device, config: &Config) -> [f64; 2] {
    let weights = dir.join(format!("{}.safetensors", config.manifest));
    synthetic::write_weights(config.manifest, &[], &weights);
    let model = CosPlaceNet::load(&weights, dev).expect("load the synthetic CosPlace weights");
    model.set_train(true);
    model.freeze_cosplace();
    let classifier =
        MarginCosineProduct::new("classifiers.0", model.dim(), CLASSES, SCALE, MARGIN, 7, dev)
            .unwrap();
    let mut trainer =
        Trainer::new(model, vec![classifier], LR, CLASSIFIERS_LR, config.amp).unwrap();
    let side = config.side;
    let images = Tensor::randn(&[BATCH, side, side, 3], 0.0, 1.0, 1, DType::F32, dev).unwrap();
    let labels: Vec<i64> = (0..BATCH).map(|i| ((i * 31) % CLASSES) as i64).collect();
    let parts = [Part {
        images,
        labels: Tensor::from_vec(labels, &[BATCH], dev).unwrap(),
        classifier: 0,
        weight: 1.0,
    }];
    let mut step = || {
        let t = Instant::now();
        let (losses, stepped) = trainer.step(&parts).unwrap();
        // the optimizer's kernels may still run after the loss was read
        if let Some(gpu) = dev.gpu() {
            gpu.synchronize().unwrap();
        }
        assert!(stepped && losses[0].is_finite(), "loss {losses:?}");
        t.elapsed().as_secs_f64() * 1e3
    };
    for _ in 0..WARMUP {
        step();
    }
    let mut times: Vec<f64> = (0..STEPS).map(|_| step()).collect();
    times.sort_by(f64::total_cmp);
    [times[STEPS / 2], times[0]]
}

/// Our numbers and PyTorch's, one row each, and the ratio of speeds.
fn compare(dir: &Path, dev: &Device, device: &str, config: &Config, threads: usize) {
    let ours = ours_ms(dir, dev, config);
    let amp = config.amp.name();
    let args: Vec<String> = ["step", device, config.backbone]
        .map(String::from)
        .into_iter()
        .chain([config.dim, CLASSES, BATCH, config.side].map(|v| v.to_string()))
        .chain([amp.to_string()])
        .chain([threads, WARMUP, STEPS].map(|v| v.to_string()))
        .collect();
    let row = |name: &str, [median, min]: [f64; 2]| {
        println!(
            "| {name} | {median:.1} | {min:.1} | {:.1} |",
            BATCH as f64 * 1e3 / median
        )
    };
    println!("| | median ms | min ms | img/s (median) |");
    println!("|---|---|---|---|");
    row("ours", ours);
    match common::python_numbers("train.py", &args, "ms_per_step").as_deref() {
        Ok(&[nchw, nchw_min, nhwc, nhwc_min]) => {
            row("PyTorch NCHW", [nchw, nchw_min]);
            row("PyTorch channels-last", [nhwc, nhwc_min]);
            println!(
                "\nspeed ours / PyTorch (faster layout, medians): {:.2}x",
                nchw.min(nhwc) / ours[0]
            );
        }
        Ok(other) => println!("\nPyTorch printed {other:?}"),
        Err(e) => println!("\nPyTorch skipped: {e}"),
    }
}

/// The CPU's model name and its x86 vector extensions, from /proc/cpuinfo.
fn cpu_description() -> String {
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return "unknown CPU (no /proc/cpuinfo)".into();
    };
    let field = |key: &str| {
        info.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == key).then(|| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let flags = field("flags");
    let vector: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| f.starts_with("avx") || f.starts_with("amx") || *f == "fma")
        .collect();
    format!(
        "{}; vector extensions: {}",
        field("model name"),
        if vector.is_empty() {
            "none listed".into()
        } else {
            vector.join(" ")
        }
    )
}

/// The 1, 5 and 15 minute load averages: other work on the machine skews CPU numbers.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn cpu(dir: &Path, threads: usize) {
    println!(
        "CosPlace ResNet-18/512 training step, batch {BATCH}, 224x224, f32, CPU, {threads} threads; median and min of {STEPS} after {WARMUP} warm-up"
    );
    println!("CPU: {}", cpu_description());
    println!("load average before: {}\n", load_average());
    let config = Config {
        manifest: "cosplace_resnet18_512",
        backbone: "resnet18",
        dim: 512,
        side: 224,
        amp: Amp::Off,
    };
    compare(dir, &Device::Cpu, "cpu", &config, threads);
    println!(
        "(goal: at least 1.2x on 2 cores); load average after: {}",
        load_average()
    );
}

fn gpu(dir: &Path, threads: usize) {
    let dev = match Device::new("cuda") {
        Ok(d) => d,
        Err(e) => {
            println!("train gpu part skipped: no usable CUDA device ({e}).");
            // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
            if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            return;
        }
    };
    println!(
        "\nCosPlace ResNet-50/2048 training step, batch {BATCH}, 512x512, bf16 autocast, {}; median and min of {STEPS} after {WARMUP} warm-up\n",
        dev.gpu().unwrap().describe()
    );
    let config = Config {
        manifest: "cosplace_resnet50_2048",
        backbone: "resnet50",
        dim: 2048,
        side: 512,
        amp: Amp::Bf16,
    };
    compare(dir, &dev, "cuda", &config, threads);
    println!("(goal: at least 1.3x against PyTorch AMP eager)");
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = std::env::temp_dir().join(format!("vpr-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if common::wants("cpu") {
        cpu(&dir, threads);
    }
    if common::wants("gpu") {
        gpu(&dir, threads);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
