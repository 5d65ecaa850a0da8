//! Launches of kernels/augment.cu; the file's header comment explains the kernels.

use super::cpu::{resize_taps, Taps};
use super::{CropBox, JitterParams};
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::error::Result;
use crate::ops::interpolate::gpu::upload_taps;
use crate::ops::{LINEAR_MAX_BLOCKS, LINEAR_THREADS};

/// Threads of a `color_jitter_means_f32` block (a power of two: the kernel's tree reduction).
const MEANS_THREADS: u32 = 256;

/// ColorJitter of the dense `[N, H, W, 3]` f32 images `x` (`pixels` = H * W), `params[n]` for
/// image n: the grey means where contrast needs them, then the chain per pixel.
pub fn color_jitter(x: &GpuBuffer, pixels: usize, params: &[JitterParams]) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let n = params.len();
    let order: Vec<i32> = params.iter().flat_map(|p| p.order.map(i32::from)).collect();
    let factor: Vec<f32> = params
        .iter()
        .flat_map(|p| [p.brightness, p.contrast, p.saturation, p.hue])
        .collect();
    let order = gpu.upload(bytemuck::cast_slice(&order))?;
    let factor = gpu.upload(bytemuck::cast_slice(&factor))?;
    let means = gpu.alloc(n * 4)?;
    let mut args = KernelArgs::new();
    args.ptr(x, 0)
        .ptr(&order, 0)
        .ptr(&factor, 0)
        .ptr(&means, 0)
        .push(pixels as i64);
    let per_image = LaunchConfig {
        grid: (n as u32, 1, 1),
        block: (MEANS_THREADS, 1, 1),
        shared_bytes: 0,
    };
    gpu.launch("color_jitter_means_f32", per_image, &mut args)?;
    let y = gpu.alloc(n * pixels * 3 * 4)?;
    let mut args = KernelArgs::new();
    args.ptr(x, 0)
        .ptr(&y, 0)
        .ptr(&order, 0)
        .ptr(&factor, 0)
        .ptr(&means, 0)
        .push(n as i64)
        .push(pixels as i64);
    let cfg = LaunchConfig::linear(n * pixels, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch("color_jitter_f32", cfg, &mut args)?;
    Ok(y)
}

/// The resize taps of every image's box along one axis, in image coordinates: entry
/// `n * out + d` for output position d of image n.
fn box_taps(boxes: &[CropBox], out: usize, antialias: bool, vertical: bool) -> Vec<Taps> {
    boxes
        .iter()
        .flat_map(|b| {
            let (start, len) = if vertical {
                (b.top, b.height)
            } else {
                (b.left, b.width)
            };
            resize_taps(len, out, antialias)
                .into_iter()
                .map(move |t| t.into_iter().map(|(i, w)| (start + i, w)).collect())
        })
        .collect()
}

/// `resized_crop_f32`: each image of the dense `[N, H, W, 3]` f32 images `x` cut to its box and
/// resized to `out_h` x `out_w`, through the CPU's tap tables.
pub fn resized_crops(
    x: &GpuBuffer,
    (h, w): (usize, usize),
    boxes: &[CropBox],
    (out_h, out_w): (usize, usize),
    antialias: bool,
) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let n = boxes.len();
    let op = "resized_crops";
    let rows = upload_taps(gpu, &box_taps(boxes, out_h, antialias, true), op)?;
    let cols = upload_taps(gpu, &box_taps(boxes, out_w, antialias, false), op)?;
    let len = n * out_h * out_w * 3;
    let y = gpu.alloc(len * 4)?;
    let mut args = KernelArgs::new();
    args.ptr(x, 0).ptr(&y, 0);
    for v in [n, h, w, out_h, out_w] {
        args.push(v as i64);
    }
    for t in [&rows, &cols] {
        args.ptr(&t.first, 0).ptr(&t.index, 0).ptr(&t.weight, 0);
    }
    let cfg = LaunchConfig::linear(len, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch("resized_crop_f32", cfg, &mut args)?;
    Ok(y)
}
