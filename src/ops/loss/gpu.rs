//! Launches of kernels/loss.cu; the file's header comment explains the kernels.

use super::Rows;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;

const WARPS_PER_BLOCK: usize = 8;
/// Enough warps to fill an H100 several times over; the kernels loop over further rows.
const MAX_BLOCKS: usize = 4096;
/// Threads of the one-block reduction.
const REDUCE_THREADS: u32 = 256;

fn warp_per_row(rows: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(WARPS_PER_BLOCK).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid: (blocks as u32, 1, 1),
        block: (32 * WARPS_PER_BLOCK as u32, 1, 1),
        shared_bytes: 0,
    }
}

/// The loss (one f32) and the per-row log-sum-exp (`rows` f32).
pub fn forward(
    x: &GpuBuffer,
    labels: &GpuBuffer,
    dtype: DType,
    p: &Rows,
    divisor: f32,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let gpu = x.gpu();
    let row_loss = gpu.alloc(p.rows * 4)?;
    let lse = gpu.alloc(p.rows * 4)?;
    let loss = gpu.alloc(4)?;
    if p.rows > 0 {
        let mut args = KernelArgs::new();
        args.ptr(x, 0)
            .ptr(labels, 0)
            .ptr(&row_loss, 0)
            .ptr(&lse, 0)
            .push(p.rows as i64)
            .push(p.classes as i64)
            .push(p.ignore_index)
            .push(p.scale)
            .push(p.margin);
        gpu.launch(
            &format!("cross_entropy_fwd_{dtype}"),
            warp_per_row(p.rows),
            &mut args,
        )?;
    }
    let mut args = KernelArgs::new();
    args.ptr(&row_loss, 0)
        .ptr(&loss, 0)
        .push(p.rows as i64)
        .push(divisor);
    let one_block = LaunchConfig {
        grid: (1, 1, 1),
        block: (REDUCE_THREADS, 1, 1),
        shared_bytes: 0,
    };
    gpu.launch("cross_entropy_reduce_f32", one_block, &mut args)?;
    Ok((loss, lse))
}

/// The gradient of the logits, in their dtype.
pub fn backward(
    x: &GpuBuffer,
    labels: &GpuBuffer,
    lse: &GpuBuffer,
    g: &GpuBuffer,
    dtype: DType,
    p: &Rows,
    divisor: f32,
) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let out = gpu.alloc(p.rows * p.classes * dtype.size_in_bytes())?;
    if p.rows * p.classes == 0 {
        return Ok(out);
    }
    let mut args = KernelArgs::new();
    args.ptr(x, 0)
        .ptr(labels, 0)
        .ptr(lse, 0)
        .ptr(g, 0)
        .ptr(&out, 0)
        .push(p.rows as i64)
        .push(p.classes as i64)
        .push(p.ignore_index)
        .push(divisor)
        .push(p.scale)
        .push(p.margin);
    gpu.launch(
        &format!("cross_entropy_bwd_{dtype}"),
        warp_per_row(p.rows),
        &mut args,
    )?;
    Ok(out)
}
