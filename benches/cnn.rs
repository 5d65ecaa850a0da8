//! Convolutional networks on the CPU against PyTorch on the same machine in the same run (when
//! `VPR_BENCH_PYTHON`, default `python3`, has torch and torchvision):
//!
//! * `forward`: the eval-mode forward of a CosPlace ResNet-50/2048 (backbone, L2, GeM, FC, L2) at
//!   224x224, batch 1 and 8, f32, median milliseconds per batch (PyTorch in its default NCHW
//!   layout and in channels-last; the ratio is against the faster);
//! * `extract`: `vpr-engine extract` with a CosPlace ResNet-18/512 over a folder of 512x512 PNG
//!   images, images per second, against a PyTorch loop over a DataLoader (PIL decode, ToTensor,
//!   Normalize in worker processes) with the same batch size.
//!
//! `cargo bench --bench cnn` (or `-- forward`, `-- extract` for one part). The weights are the
//! synthetic full-size ones of the tests (tests/common/synthetic.rs); speed does not depend on them.

mod common;
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use std::path::Path;
use std::process::Command;
use std::time::Instant;
use vpr_engine::{models, Device, Tensor};

const STEPS: usize = 10;
const EXTRACT_IMAGES: usize = 48;
const EXTRACT_BATCH: usize = 16;

fn forward(dir: &Path, threads: usize) {
    let weights = dir.join("cosplace_resnet50_2048.safetensors");
    synthetic::write_weights("cosplace_resnet50_2048", &[], &weights);
    let model = models::load(&weights, &Device::Cpu).expect("load the ResNet-50");
    println!("CosPlace ResNet-50/2048 forward, eval mode, f32, 224x224, CPU; median of {STEPS}");
    println!(
        "{:>6} {:>10} {:>12} {:>12} {:>14}",
        "batch", "ours ms", "pt nchw ms", "pt nhwc ms", "best pt/ours"
    );
    for batch in [1usize, 8] {
        let x = Tensor::randn(
            &[batch, 224, 224, 3],
            0.0,
            1.0,
            1,
            vpr_engine::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        for _ in 0..2 {
            model.descriptors(&x).unwrap();
        }
        let mut times: Vec<f64> = (0..STEPS)
            .map(|_| {
                let t = Instant::now();
                model.descriptors(&x).unwrap();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        let ours = times[STEPS / 2];
        let args = ["forward", "resnet50", "2048"]
            .map(String::from)
            .into_iter()
            .chain([batch, 224, 224, threads, STEPS].map(|v| v.to_string()))
            .collect::<Vec<_>>();
        match common::python_numbers("cnn_forward.py", &args, "ms_per_batch").as_deref() {
            Ok(&[nchw, nhwc]) => println!(
                "{batch:>6} {ours:>10.1} {nchw:>12.1} {nhwc:>12.1} {:>13.2}x",
                nchw.min(nhwc) / ours
            ),
            Ok(other) => println!("{batch:>6} {ours:>10.1} (PyTorch printed {other:?})"),
            Err(e) => println!(
                "{batch:>6} {ours:>10.1} {:>12} (PyTorch unavailable: {e})",
                "-"
            ),
        }
    }
}

fn extract(dir: &Path, threads: usize) {
    let weights = dir.join("cosplace_resnet18_512.safetensors");
    synthetic::write_weights("cosplace_resnet18_512", &[], &weights);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..EXTRACT_IMAGES {
        let img = image::RgbImage::from_fn(512, 512, |x, y| {
            let v = |s: u32| ((x * (s + i as u32) + y * (3 + s)) % 251) as u8;
            image::Rgb([v(1), v(2), v(5)])
        });
        img.save(images.join(format!("{i:04}.png"))).unwrap();
    }
    let out = dir.join("descriptors.npy");
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args([
            "extract",
            "--device",
            "cpu",
            "--batch-size",
            &EXTRACT_BATCH.to_string(),
        ])
        .arg("--weights")
        .arg(&weights)
        .arg("--images")
        .arg(&images)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("run vpr-engine extract");
    assert!(status.success(), "vpr-engine extract failed");
    let ours = EXTRACT_IMAGES as f64 / t.elapsed().as_secs_f64();
    println!(
        "extract, CosPlace ResNet-18/512, {EXTRACT_IMAGES} PNG images 512x512, batch {EXTRACT_BATCH}, CPU (whole command, model loading included)"
    );
    let args = vec![
        "extract".to_string(),
        "resnet18".into(),
        "512".into(),
        images.display().to_string(),
        EXTRACT_BATCH.to_string(),
        threads.to_string(),
    ];
    match common::python_numbers("cnn_forward.py", &args, "images_per_second").as_deref() {
        Ok(&[pt, ..]) => println!(
            "ours {ours:.1} img/s, PyTorch {pt:.1} img/s: {:.2}x",
            ours / pt
        ),
        Ok([]) => println!("ours {ours:.1} img/s (PyTorch printed nothing)"),
        Err(e) => println!("ours {ours:.1} img/s (PyTorch unavailable: {e})"),
    }
}

fn main() {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = std::env::temp_dir().join(format!("vpr-bench-cnn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    if common::wants("forward") {
        forward(&dir, threads);
    }
    if common::wants("extract") {
        extract(&dir, threads);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
