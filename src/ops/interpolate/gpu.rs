//! Launches of kernels/interpolate.cu; the file's header comment explains the kernels.

use super::InterpGeom;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
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

/// Bicubic interpolation (antialiased when `g.antialias`) of the dense `[N, H, W, C]` input `x`.
pub fn bicubic(x: &GpuBuffer, dtype: DType, g: &InterpGeom) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let len = g.n * g.oh * g.ow * g.c;
    let y = gpu.alloc(len * dtype.size_in_bytes())?;
    if len == 0 {
        return Ok(y);
    }
    let i = |v: usize| v as i64;
    let shape = InterpShape {
        n: i(g.n),
        h: i(g.h),
        w: i(g.w),
        c: i(g.c),
        oh: i(g.oh),
        ow: i(g.ow),
        step_h: g.step_h,
        step_w: g.step_w,
    };
    let mut args = KernelArgs::new();
    args.ptr(x, 0).ptr(&y, 0).push(shape);
    let name = if g.antialias {
        format!("interpolate_bicubic_aa_{dtype}")
    } else {
        format!("interpolate_bicubic_{dtype}")
    };
    let cfg = LaunchConfig::linear(len, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch(&name, cfg, &mut args)?;
    Ok(y)
}
