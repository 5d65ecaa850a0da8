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

/// Rows at least this long, when there are too few of them to give `SPLIT_BLOCKS` blocks a block
/// each, are cut into chunks of at least `SPLIT_CHUNK_MIN` elements, a block per chunk, so that a
/// few long rows (a query against a whole database) still spread over the GPU.
const SPLIT_ROW_MIN: usize = 16384;
const SPLIT_BLOCKS: usize = 256;
const SPLIT_CHUNK_MIN: usize = 4096;

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
    match path {
        RowPath::Warp(width) => {
            let mut args = KernelArgs::new();
            args.ptr(buf, 0)
                .ptr(&out, 0)
                .push(rows as i64)
                .push(n as i64)
                .push(width as i32);
            gpu.launch(&format!("{name}_warp_{dtype}"), cfg, &mut args)?;
        }
        RowPath::Block => {
            let mut args = KernelArgs::new();
            args.ptr(buf, 0)
                .ptr(&out, 0)
                .push(rows as i64)
                .push(n as i64);
            gpu.launch(&format!("{name}_block_{dtype}"), cfg, &mut args)?;
        }
        RowPath::Split { chunk, chunks } => {
            // (max, sum of exp) of every chunk, two f32 each
            let partial = gpu.alloc(rows * chunks * 8)?;
            let mut stats = split_args(&[buf, &partial], n, chunk, chunks);
            gpu.launch(&format!("softmax_split_stats_{dtype}"), cfg, &mut stats)?;
            let mut args = split_args(&[buf, &out, &partial], n, chunk, chunks);
            gpu.launch(&format!("{name}_split_write_{dtype}"), cfg, &mut args)?;
        }
    }
    Ok(out)
}

/// How rows are spread over threads: groups of lanes of a warp (this many per row), a block per
/// row, or a block per chunk of `chunk` elements, `chunks` per row.
enum RowPath {
    Warp(usize),
    Block,
    Split { chunk: usize, chunks: usize },
}

/// The launch shared by the forward and backward kernels for `rows` rows of length `n`.
fn row_launch(rows: usize, n: usize) -> (RowPath, LaunchConfig) {
    // about 16 elements per thread (a few 16-byte vectors), 128 to 1024 threads
    let threads_for = |len: usize| (len / 16).next_power_of_two().clamp(128, 1024) as u32;
    let (path, grid, threads) = if n <= WARP_ROW_MAX {
        let width = lanes_per_row(n);
        let rows_per_block = WARPS_PER_BLOCK as usize * (32 / width);
        (
            RowPath::Warp(width),
            rows.div_ceil(rows_per_block),
            32 * WARPS_PER_BLOCK,
        )
    } else if n >= SPLIT_ROW_MIN && 2 * rows < SPLIT_BLOCKS {
        let chunks = SPLIT_BLOCKS.div_ceil(rows).min(n.div_ceil(SPLIT_CHUNK_MIN));
        // a multiple of 16 elements keeps every chunk at its row's offset from 16-byte alignment
        let chunk = n.div_ceil(chunks).next_multiple_of(16);
        let chunks = n.div_ceil(chunk);
        (
            RowPath::Split { chunk, chunks },
            rows * chunks,
            threads_for(chunk),
        )
    } else {
        (RowPath::Block, rows, threads_for(n))
    };
    // the warp and block kernels loop over rows beyond the grid; the split ones take a block per
    // chunk, and never have more than about 2 * SPLIT_BLOCKS
    let grid = match path {
        RowPath::Split { .. } => grid,
        _ => grid.min(MAX_THREADS / threads as usize),
    };
    let cfg = LaunchConfig {
        grid: (grid as u32, 1, 1),
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
    match path {
        RowPath::Warp(_) | RowPath::Block => {
            // the kernel's width 0 means a block per row
            let width = match path {
                RowPath::Warp(w) => w as i32,
                _ => 0,
            };
            let mut args = KernelArgs::new();
            args.ptr(y, 0)
                .ptr(dy, 0)
                .ptr(&out, 0)
                .push(rows as i64)
                .push(n as i64)
                .push(width);
            gpu.launch(&format!("{name}_backward_{dtype}"), cfg, &mut args)?;
        }
        RowPath::Split { chunk, chunks } => {
            // each chunk's sum, one f32
            let partial = gpu.alloc(rows * chunks * 4)?;
            let mut sums = split_args(&[y, dy, &partial], n, chunk, chunks);
            gpu.launch(&format!("{name}_split_grad_sum_{dtype}"), cfg, &mut sums)?;
            let mut args = split_args(&[y, dy, &out, &partial], n, chunk, chunks);
            gpu.launch(&format!("{name}_split_grad_write_{dtype}"), cfg, &mut args)?;
        }
    }
    Ok(out)
}

/// The arguments of a split-row kernel: its buffers, then the row length, the chunk length and the
/// chunks per row.
fn split_args(buffers: &[&GpuBuffer], n: usize, chunk: usize, chunks: usize) -> KernelArgs {
    let mut args = KernelArgs::new();
    for b in buffers {
        args.ptr(b, 0);
    }
    args.push(n as i64).push(chunk as i64).push(chunks as i64);
    args
}
