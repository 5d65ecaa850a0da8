//! Launches of kernels/reduce.cu; the file's header comment explains the kernels.

use super::{Dims, ReduceOp};
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;

/// Rows up to this long get one warp each (or a group of lanes when short; 8 warps per block);
/// longer ones a block each.
const WARP_ROW_MAX: usize = 1024;
const WARPS_PER_BLOCK: usize = 8;
const BLOCK_THREADS: u32 = 256;
/// Blocks that keep an H100 (132 SMs, several 256-thread blocks each) busy; below this many rows
/// or column tiles a long axis is split into segments reduced by separate blocks.
const TARGET_BLOCKS: usize = 512;
/// Elements per segment of a split row at least, so a block has enough to read to pay for itself.
const MIN_SEGMENT: usize = 4096;
/// Rows per thread and segment of a split column, at least.
const MIN_COL_ROWS_PER_THREAD: usize = 16;
const MAX_SPLITS: usize = 1024;
/// Threads a launch needs at most to fill an H100 (132 SMs x 2048 threads) a few times over; the
/// kernels loop over the work beyond it, which also spreads the tail of the last wave.
const MAX_THREADS: usize = 1 << 20;

fn cfg(grid: (usize, usize), block: (usize, usize)) -> LaunchConfig {
    let max_blocks = (MAX_THREADS / (block.0 * block.1)).min(65535);
    LaunchConfig {
        grid: (grid.0.clamp(1, max_blocks) as u32, grid.1 as u32, 1),
        block: (block.0 as u32, block.1 as u32, 1),
        shared_bytes: 0,
    }
}

fn warp_per_row(rows: usize) -> LaunchConfig {
    cfg(
        (rows.div_ceil(WARPS_PER_BLOCK), 1),
        (32 * WARPS_PER_BLOCK, 1),
    )
}

/// Lanes that share a short row: about 4 elements each, a power of two up to the whole warp.
pub(crate) fn lanes_per_row(n: usize) -> usize {
    n.div_ceil(4).next_power_of_two().min(32)
}

/// Segments to split an axis of `n` into so that `units` work units become about TARGET_BLOCKS
/// blocks, none shorter than `min_len`. Returns (segment length, segments).
fn split(units: usize, n: usize, min_len: usize) -> (usize, usize) {
    let splits = if units >= TARGET_BLOCKS {
        1
    } else {
        TARGET_BLOCKS
            .div_ceil(units)
            .min(n / min_len)
            .clamp(1, MAX_SPLITS)
    };
    // whole 16-byte vectors per segment, so every segment starts with the row's alignment
    let seg = n.div_ceil(splits).next_multiple_of(8);
    (seg, n.div_ceil(seg))
}

/// `op` over the `n` axis of the dense `[outer, n, inner]` tensor in `buf`; n >= 1 and
/// outer * inner >= 1 (the caller handles empty cases).
pub fn reduce(buf: &GpuBuffer, dtype: DType, op: ReduceOp, dims: Dims) -> Result<GpuBuffer> {
    let gpu = buf.gpu();
    let Dims { outer, n, inner } = dims;
    let outputs = outer * inner;
    let out = gpu.alloc(outputs * op.out_dtype(dtype).size_in_bytes())?;
    let name = |path: &str| format!("reduce_{path}_{}_{dtype}", op.name());

    if inner == 1 && n <= WARP_ROW_MAX {
        let mut args = KernelArgs::new();
        let width = lanes_per_row(n);
        args.ptr(buf, 0)
            .push(outer as i64)
            .push(n as i64)
            .push(width as i32)
            .ptr(&out, 0);
        let cfg = warp_per_row(outer.div_ceil(32 / width));
        gpu.launch(&name("rows_warp"), cfg, &mut args)?;
        return Ok(out);
    }

    let (kernel, (seg, splits), launch) = if inner == 1 {
        let (seg, splits) = split(outer, n, MIN_SEGMENT);
        (
            name("rows_block"),
            (seg, splits),
            cfg((outer * splits, 1), (BLOCK_THREADS as usize, 1)),
        )
    } else {
        // bx threads across the columns (a warp reads 32 / bx consecutive rows of bx columns, so
        // its loads stay contiguous for narrow tensors too), by threads down the axis
        let bx = inner.next_power_of_two().min(32);
        let by = n.next_power_of_two().min(BLOCK_THREADS as usize / bx);
        let tiles = outer * inner.div_ceil(bx);
        let (seg, splits) = split(tiles, n, by * MIN_COL_ROWS_PER_THREAD);
        (name("cols"), (seg, splits), cfg((tiles, splits), (bx, by)))
    };
    // partial results of the segments: f32 values, and indices for argmax
    let index_bytes = if op == ReduceOp::ArgMax && splits > 1 {
        outputs * splits * 8
    } else {
        0
    };
    let pv = gpu.alloc(if splits > 1 { outputs * splits * 4 } else { 0 })?;
    let pi = gpu.alloc(index_bytes)?;

    let mut args = KernelArgs::new();
    args.ptr(buf, 0);
    if inner == 1 {
        args.push(outer as i64).push(n as i64);
    } else {
        args.push(outer as i64).push(n as i64).push(inner as i64);
    }
    args.push(seg as i64)
        .push(splits as i64)
        .ptr(&out, 0)
        .ptr(&pv, 0)
        .ptr(&pi, 0);
    gpu.launch(&kernel, launch, &mut args)?;

    if splits > 1 {
        let mut args = KernelArgs::new();
        args.ptr(&pv, 0)
            .ptr(&pi, 0)
            .push(outputs as i64)
            .push(splits as i64)
            .push(n as i64)
            .ptr(&out, 0);
        gpu.launch(&name("partials"), warp_per_row(outputs), &mut args)?;
    }
    Ok(out)
}
