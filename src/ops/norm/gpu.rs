//! Launches of kernels/norm.cu; the file's header comment explains the kernels.

use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::reduce::lanes_per_row;

/// Rows up to this long get a group of lanes of a warp each (8 warps per block); longer ones a
/// block each.
const WARP_ROW_MAX: usize = 1024;
const WARPS_PER_BLOCK: usize = 8;
/// Threads a launch needs at most to fill an H100 (132 SMs x 2048 threads) a few times over; the
/// row kernels loop over the rows beyond it.
const MAX_THREADS: usize = 1 << 20;
/// Columns per block of the weight and bias gradients' first stage.
const COLUMN_THREADS: usize = 256;
/// Blocks the first stage aims for (a couple per SM of an H100), and the rows a chunk has at least.
const PARAM_GRAD_BLOCKS: usize = 264;
const MIN_CHUNK_ROWS: usize = 8;

/// The row kernels' launch for `rows` rows of `n`, and the width argument: lanes per row, or 0 for
/// a block per row.
fn row_launch(rows: usize, n: usize) -> (LaunchConfig, i32) {
    let (grid, threads, width) = if n <= WARP_ROW_MAX {
        let width = lanes_per_row(n);
        let rows_per_block = WARPS_PER_BLOCK * (32 / width);
        (rows.div_ceil(rows_per_block), 32 * WARPS_PER_BLOCK, width)
    } else {
        // about 8 elements per thread per pass
        let threads = (n / 8).next_power_of_two().clamp(128, 1024);
        (rows, threads, 0)
    };
    let grid = grid.clamp(1, MAX_THREADS / threads);
    let cfg = LaunchConfig {
        grid: (grid as u32, 1, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: 0,
    };
    (cfg, width as i32)
}

/// Pushes the buffer's address, or a null pointer.
fn ptr_or_null(args: &mut KernelArgs, buf: Option<&GpuBuffer>) {
    match buf {
        Some(b) => args.ptr(b, 0),
        None => args.push(0u64),
    };
}

/// `layer_norm_<dtype>` of the dense `[rows, n]` input `x` (rows, n >= 1) with f32 weight and bias
/// of `n`: the output in `dtype`, and each row's mean and rstd (f32).
pub fn layer_norm(
    x: &GpuBuffer,
    weight: Option<&GpuBuffer>,
    bias: Option<&GpuBuffer>,
    dtype: DType,
    rows: usize,
    n: usize,
    eps: f32,
) -> Result<(GpuBuffer, GpuBuffer, GpuBuffer)> {
    let gpu = x.gpu();
    let y = gpu.alloc(rows * n * dtype.size_in_bytes())?;
    let mean = gpu.alloc(rows * 4)?;
    let rstd = gpu.alloc(rows * 4)?;
    let (cfg, width) = row_launch(rows, n);
    let mut args = KernelArgs::new();
    args.ptr(x, 0);
    ptr_or_null(&mut args, weight);
    ptr_or_null(&mut args, bias);
    args.ptr(&y, 0)
        .ptr(&mean, 0)
        .ptr(&rstd, 0)
        .push(rows as i64)
        .push(n as i64)
        .push(eps)
        .push(width);
    gpu.launch(&format!("layer_norm_{dtype}"), cfg, &mut args)?;
    Ok((y, mean, rstd))
}

/// `layer_norm_backward_<dtype>`: the input's gradient from the forward's input, f32 weight,
/// statistics and the output's gradient `dy` (dense, in `dtype`).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward(
    x: &GpuBuffer,
    weight: Option<&GpuBuffer>,
    mean: &GpuBuffer,
    rstd: &GpuBuffer,
    dy: &GpuBuffer,
    dtype: DType,
    rows: usize,
    n: usize,
) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let dx = gpu.alloc(rows * n * dtype.size_in_bytes())?;
    let (cfg, width) = row_launch(rows, n);
    let mut args = KernelArgs::new();
    args.ptr(x, 0);
    ptr_or_null(&mut args, weight);
    args.ptr(mean, 0)
        .ptr(rstd, 0)
        .ptr(dy, 0)
        .ptr(&dx, 0)
        .push(rows as i64)
        .push(n as i64)
        .push(width);
    gpu.launch(&format!("layer_norm_backward_{dtype}"), cfg, &mut args)?;
    Ok(dx)
}

/// The weight's and the bias's gradients (f32 `[n]`, each only when asked for) from the forward's
/// input and statistics and the output's gradient: two deterministic stages, chunks of rows then
/// their sum.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_param_grads(
    x: &GpuBuffer,
    mean: &GpuBuffer,
    rstd: &GpuBuffer,
    dy: &GpuBuffer,
    dtype: DType,
    rows: usize,
    n: usize,
    (want_w, want_b): (bool, bool),
) -> Result<(Option<GpuBuffer>, Option<GpuBuffer>)> {
    let gpu = x.gpu();
    let tiles = n.div_ceil(COLUMN_THREADS);
    let chunks = (PARAM_GRAD_BLOCKS / tiles).clamp(1, rows.div_ceil(MIN_CHUNK_ROWS));
    let rows_per_chunk = rows.div_ceil(chunks);
    let chunks = rows.div_ceil(rows_per_chunk);
    let partial = |want: bool| want.then(|| gpu.alloc(chunks * n * 4)).transpose();
    let (partial_w, partial_b) = (partial(want_w)?, partial(want_b)?);
    let mut args = KernelArgs::new();
    args.ptr(x, 0).ptr(mean, 0).ptr(rstd, 0).ptr(dy, 0);
    ptr_or_null(&mut args, partial_w.as_ref());
    ptr_or_null(&mut args, partial_b.as_ref());
    args.push(rows as i64)
        .push(n as i64)
        .push(rows_per_chunk as i64);
    let cfg = LaunchConfig {
        grid: (tiles as u32, chunks as u32, 1),
        block: (COLUMN_THREADS as u32, 1, 1),
        shared_bytes: 0,
    };
    gpu.launch(
        &format!("layer_norm_param_grad_partial_{dtype}"),
        cfg,
        &mut args,
    )?;
    let out = |want: bool| want.then(|| gpu.alloc(n * 4)).transpose();
    let (dw, db) = (out(want_w)?, out(want_b)?);
    let mut args = KernelArgs::new();
    ptr_or_null(&mut args, partial_w.as_ref());
    ptr_or_null(&mut args, partial_b.as_ref());
    ptr_or_null(&mut args, dw.as_ref());
    ptr_or_null(&mut args, db.as_ref());
    args.push(chunks as i64).push(n as i64);
    let cfg = LaunchConfig::linear(n, COLUMN_THREADS as u32, 1024);
    gpu.launch("layer_norm_param_grad_sum", cfg, &mut args)?;
    Ok((dw, db))
}
