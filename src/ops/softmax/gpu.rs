//! Launches of kernels/softmax.cu; the file's header comment explains the kernels.

use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::reduce::lanes_per_row;

/// Rows up to this long get one warp each (or a group of lanes when short; 8 warps per block);
/// longer ones a block each.
const WARP_ROW_MAX: usize = 1024;
const WARPS_PER_BLOCK: u32 = 8;
/// Threads a launch needs at most to fill an H100 (132 SMs x 2048 threads) a few times over; the
/// kernels loop over the rows beyond it.
const MAX_THREADS: usize = 1 << 20;

/// softmax (or log_softmax) of each of the `rows` rows of length `n` (both >= 1) of the dense
/// tensor in `buf`.
pub fn softmax(
    buf: &GpuBuffer,
    dtype: DType,
    rows: usize,
    n: usize,
    log: bool,
) -> Result<GpuBuffer> {
    let gpu = buf.gpu();
    let out = gpu.alloc(rows * n * dtype.size_in_bytes())?;
    let name = if log { "log_softmax" } else { "softmax" };
    let (path, cfg) = row_launch(rows, n);
    let mut args = KernelArgs::new();
    args.ptr(buf, 0)
        .ptr(&out, 0)
        .push(rows as i64)
        .push(n as i64);
    if let RowPath::Warp(width) = path {
        args.push(width as i32);
    }
    let path = match path {
        RowPath::Warp(_) => "warp",
        RowPath::Block => "block",
    };
    gpu.launch(&format!("{name}_{path}_{dtype}"), cfg, &mut args)?;
    Ok(out)
}

/// How rows are spread over threads: groups of lanes of a warp (this many per row) or a block per
/// row.
enum RowPath {
    Warp(usize),
    Block,
}

/// The launch shared by the forward and backward kernels for `rows` rows of length `n`.
fn row_launch(rows: usize, n: usize) -> (RowPath, LaunchConfig) {
    let (path, grid, threads) = if n <= WARP_ROW_MAX {
        let width = lanes_per_row(n);
        let rows_per_block = WARPS_PER_BLOCK as usize * (32 / width);
        (
            RowPath::Warp(width),
            rows.div_ceil(rows_per_block),
            32 * WARPS_PER_BLOCK,
        )
    } else {
        // about 16 elements per thread (a few 16-byte vectors), 128 to 1024 threads
        (
            RowPath::Block,
            rows,
            (n / 16).next_power_of_two().clamp(128, 1024) as u32,
        )
    };
    let cfg = LaunchConfig {
        grid: (grid.min(MAX_THREADS / threads as usize) as u32, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    };
    (path, cfg)
}

/// `softmax_backward_<dtype>` / `log_softmax_backward_<dtype>`: the input gradient from the
/// forward's output `y` and its gradient `dy` (dense `[rows, n]`, both >= 1, at offset 0).
pub fn softmax_backward(
    y: &GpuBuffer,
    dy: &GpuBuffer,
    dtype: DType,
    rows: usize,
    n: usize,
    log: bool,
) -> Result<GpuBuffer> {
    let gpu = y.gpu();
    let out = gpu.alloc(rows * n * dtype.size_in_bytes())?;
    let name = if log { "log_softmax" } else { "softmax" };
    let (path, cfg) = row_launch(rows, n);
    // the kernel's width 0 means a block per row
    let width = match path {
        RowPath::Warp(w) => w as i32,
        RowPath::Block => 0,
    };
    let mut args = KernelArgs::new();
    args.ptr(y, 0)
        .ptr(dy, 0)
        .ptr(&out, 0)
        .push(rows as i64)
        .push(n as i64)
        .push(width);
    gpu.launch(&format!("{name}_backward_{dtype}"), cfg, &mut args)?;
    Ok(out)
}
