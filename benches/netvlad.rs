//! NetVLAD on the CPU against PyTorch on the same machine in the same run (when
//! `VPR_BENCH_PYTHON`, default `python3`, has torch and torchvision), 2 threads each unless
//! `VPR_BENCH_THREADS`:
//!
//! * `aggregation`: the NetVLAD layer on a 30x40x512 feature map (VGG16 conv5_3 at 480x640),
//!   K = 64 clusters, batch 32, f32, against PyTorch's einsum form; median milliseconds of 10
//!   after 2 warm-ups, for the forward (no tape) and for forward + backward to the assignment
//!   weights and the centroids (the loss sum(descriptor * r));
//! * `model`: OpenIBL's VGG16 + NetVLAD + PCA-whitening (4096-d, `models::load` of synthetic
//!   full-size weights) on one 480x640 image, images per second from the median of 3 after 2
//!   warm-ups, against PyTorch in NCHW and channels-last.
//!
//! `cargo bench --bench netvlad` (or `-- aggregation`, `-- model` for one part).

mod common;
#[path = "../tests/common/synthetic.rs"]
mod synthetic;

use vpr_engine::autograd::{backward_with, no_grad};
use vpr_engine::models;
use vpr_engine::nn::NetVlad;
use vpr_engine::{DType, Device, Tensor};

const STEPS: usize = 10;
const MODEL_STEPS: usize = 3;
const SHAPE: [usize; 4] = [32, 30, 40, 512];
const CLUSTERS: usize = 64;

fn aggregation(threads: usize) {
    let cpu = Device::Cpu;
    let [n, h, w, d] = SHAPE;
    let layer = NetVlad::new("net_vlad", CLUSTERS, d, true, &cpu).unwrap();
    let x = Tensor::randn(&SHAPE, 0.0, 1.0, 1, DType::F32, &cpu).unwrap();
    let r = Tensor::randn(&[n, CLUSTERS * d], 0.0, 1.0, 2, DType::F32, &cpu).unwrap();
    let forward = common::median_ms(2, STEPS, || {
        no_grad(|| layer.forward(&x)).unwrap();
    });
    let forward_backward = common::median_ms(2, STEPS, || {
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
    let args = ["aggregation".to_string()]
        .into_iter()
        .chain([n, h, w, d, CLUSTERS, threads, STEPS].map(|v| v.to_string()))
        .collect::<Vec<_>>();
    match common::python_numbers("netvlad.py", &args, "ms").as_deref() {
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

fn model(threads: usize) {
    let dir = std::env::temp_dir().join(format!("vpr-bench-netvlad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let weights = dir.join("openibl_vgg16_netvlad_pca.safetensors");
    synthetic::write_weights("openibl_vgg16_netvlad_pca", &[], &weights);
    let model = models::load(&weights, &Device::Cpu).expect("load the OpenIBL model");
    std::fs::remove_dir_all(&dir).unwrap();
    let (h, w) = (480, 640);
    let x = Tensor::randn(&[1, h, w, 3], 0.0, 50.0, 1, DType::F32, &Device::Cpu).unwrap();
    let ours = common::median_ms(2, MODEL_STEPS, || {
        model.descriptors(&x).unwrap();
    });
    println!(
        "OpenIBL VGG16 + NetVLAD + PCA (4096-d), one {h}x{w} image, f32, CPU, median of {MODEL_STEPS}"
    );
    let args = ["model".to_string()]
        .into_iter()
        .chain([h, w, threads, MODEL_STEPS].map(|v| v.to_string()))
        .collect::<Vec<_>>();
    match common::python_numbers("netvlad.py", &args, "ms").as_deref() {
        Ok(&[nchw, nhwc]) => println!(
            "ours {:.2} img/s ({ours:.0} ms), PyTorch NCHW {:.2} img/s, channels-last {:.2} img/s: {:.2}x the faster",
            1e3 / ours,
            1e3 / nchw,
            1e3 / nhwc,
            nchw.min(nhwc) / ours
        ),
        other => println!("ours {:.2} img/s ({ours:.0} ms) (PyTorch: {other:?})", 1e3 / ours),
    }
}

fn main() {
    let threads: usize = std::env::var("VPR_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    if common::wants("aggregation") {
        aggregation(threads);
    }
    if common::wants("model") {
        model(threads);
    }
}
