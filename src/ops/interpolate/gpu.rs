//! Launches of kernels/interpolate.cu; the file's header comment explains the kernels.

use super::cpu::{axis, transposed};
use super::InterpGeom;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{LINEAR_MAX_BLOCKS, LINEAR_THREADS};

/// Mirrors `struct InterpShape` in kernels/interpolate.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct InterpShape {
    pub(crate) n: i64,
    pub(crate) h: i64,
    pub(crate) w: i64,
    pub(crate) c: i64,
    pub(crate) oh: i64,
    pub(crate) ow: i64,
    pub(crate) step_h: f64,
    pub(crate) step_w: f64,
}

impl InterpShape {
    fn new(g: &InterpGeom) -> InterpShape {
        let i = |v: usize| v as i64;
        InterpShape {
            n: i(g.n),
            h: i(g.h),
            w: i(g.w),
            c: i(g.c),
            oh: i(g.oh),
            ow: i(g.ow),
            step_h: g.step_h,
            step_w: g.step_w,
        }
    }
}

/// Bicubic interpolation (antialiased when `g.antialias`) of the dense `[N, H, W, C]` input `x`.
pub fn bicubic(x: &GpuBuffer, dtype: DType, g: &InterpGeom) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let len = g.n * g.oh * g.ow * g.c;
    let y = gpu.alloc(len * dtype.size_in_bytes())?;
    if len == 0 {
        return Ok(y);
    }
    let mut args = KernelArgs::new();
    args.ptr(x, 0).ptr(&y, 0).push(InterpShape::new(g));
    let name = if g.antialias {
        format!("interpolate_bicubic_aa_{dtype}")
    } else {
        format!("interpolate_bicubic_{dtype}")
    };
    let cfg = LaunchConfig::linear(len, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch(&name, cfg, &mut args)?;
    Ok(y)
}

/// Tap tables of an axis uploaded as three arrays: per position the first of its entries (i32
/// `[len + 1]`), and per entry the position on the other side (i32) and the weight (f32). The
/// bicubic backward uploads its transposed taps, the augmentation's crops their resize taps.
pub(crate) struct DeviceTaps {
    pub(crate) first: GpuBuffer,
    pub(crate) index: GpuBuffer,
    pub(crate) weight: GpuBuffer,
}

/// Uploads `taps` (weights rounded to f32) for `op`, which names the error.
pub(crate) fn upload_taps<W: Copy + Into<f64>>(
    gpu: &std::sync::Arc<crate::device::Gpu>,
    taps: &[Vec<(usize, W)>],
    op: &str,
) -> Result<DeviceTaps> {
    let total: usize = taps.iter().map(Vec::len).sum();
    let widest = taps.iter().flatten().map(|&(i, _)| i).max().unwrap_or(0);
    if total > i32::MAX as usize || widest > i32::MAX as usize {
        return Err(Error::Argument(format!(
            "{op}: {total} weights, positions up to {widest} along an axis"
        )));
    }
    let mut first = Vec::with_capacity(taps.len() + 1);
    let (mut index, mut weight) = (Vec::with_capacity(total), Vec::with_capacity(total));
    first.push(0i32);
    for t in taps {
        for &(d, w) in t {
            index.push(d as i32);
            weight.push(w.into() as f32);
        }
        first.push(index.len() as i32);
    }
    // an axis nobody reads still needs buffers to point at
    index.push(0);
    weight.push(0.0);
    Ok(DeviceTaps {
        first: gpu.upload(bytemuck::cast_slice(&first))?,
        index: gpu.upload(bytemuck::cast_slice(&index))?,
        weight: gpu.upload(bytemuck::cast_slice(&weight))?,
    })
}

/// `interpolate_bicubic_backward_<dtype>`: the input's gradient from the dense output gradient
/// `dy`, gathered through the transposed taps (the CPU's f64 tables, weights rounded to f32).
pub fn bicubic_backward(dy: &GpuBuffer, dtype: DType, g: &InterpGeom) -> Result<GpuBuffer> {
    let gpu = dy.gpu();
    let len = g.n * g.h * g.w * g.c;
    let dx = gpu.alloc(len * dtype.size_in_bytes())?;
    if len == 0 {
        return Ok(dx);
    }
    let op = "interpolate_bicubic backward";
    let rows = upload_taps(
        gpu,
        &transposed(&axis(g.h, g.oh, g.step_h, g.antialias), g.h),
        op,
    )?;
    let cols = upload_taps(
        gpu,
        &transposed(&axis(g.w, g.ow, g.step_w, g.antialias), g.w),
        op,
    )?;
    let mut args = KernelArgs::new();
    args.ptr(dy, 0).ptr(&dx, 0).push(InterpShape::new(g));
    for t in [&rows, &cols] {
        args.ptr(&t.first, 0).ptr(&t.index, 0).ptr(&t.weight, 0);
    }
    let cfg = LaunchConfig::linear(len, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch(
        &format!("interpolate_bicubic_backward_{dtype}"),
        cfg,
        &mut args,
    )?;
    Ok(dx)
}
