//! Launches of kernels/pool.cu; the file's header comment explains the kernels.

use super::PoolGeom;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::{LINEAR_MAX_BLOCKS, LINEAR_THREADS};

/// Mirrors `struct PoolShape` in kernels/pool.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PoolShape {
    pub(crate) n: i64,
    pub(crate) h: i64,
    pub(crate) w: i64,
    pub(crate) c: i64,
    pub(crate) kernel: i64,
    pub(crate) stride: i64,
    pub(crate) pad: i64,
    pub(crate) oh: i64,
    pub(crate) ow: i64,
}

impl PoolShape {
    fn new(g: &PoolGeom) -> PoolShape {
        let i = |v: usize| v as i64;
        PoolShape {
            n: i(g.n),
            h: i(g.h),
            w: i(g.w),
            c: i(g.c),
            kernel: i(g.kernel),
            stride: i(g.stride),
            pad: i(g.pad),
            oh: i(g.oh),
            ow: i(g.ow),
        }
    }
}

fn linear(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(LINEAR_THREADS as usize)
        .clamp(1, LINEAR_MAX_BLOCKS as usize);
    LaunchConfig {
        grid: (blocks as u32, 1, 1),
        block: (LINEAR_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// Pooled values and i32 indices of the dense input `x` (starting `x_off` bytes in).
pub fn max_pool(
    x: &GpuBuffer,
    x_off: usize,
    dtype: DType,
    g: &PoolGeom,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let gpu = x.gpu();
    let len = g.n * g.oh * g.ow * g.c;
    let y = gpu.alloc(len * dtype.size_in_bytes())?;
    let idx = gpu.alloc(len * 4)?;
    if len > 0 {
        let mut args = KernelArgs::new();
        args.ptr(x, x_off)
            .ptr(&y, 0)
            .ptr(&idx, 0)
            .push(PoolShape::new(g));
        gpu.launch(&format!("max_pool_{dtype}"), linear(len), &mut args)?;
    }
    Ok((y, idx))
}

/// The input gradient from the indices and the dense output gradient `dy` (`dy_off` bytes in).
pub fn max_pool_backward(
    idx: &GpuBuffer,
    dy: &GpuBuffer,
    dy_off: usize,
    dtype: DType,
    g: &PoolGeom,
) -> Result<GpuBuffer> {
    let gpu = dy.gpu();
    let len = g.n * g.h * g.w * g.c;
    let dx = gpu.alloc(len * dtype.size_in_bytes())?;
    if len > 0 {
        let mut args = KernelArgs::new();
        args.ptr(idx, 0)
            .ptr(dy, dy_off)
            .ptr(&dx, 0)
            .push(PoolShape::new(g));
        gpu.launch(
            &format!("max_pool_backward_{dtype}"),
            linear(len),
            &mut args,
        )?;
    }
    Ok(dx)
}
