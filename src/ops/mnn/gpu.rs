//! Launches of kernels/mnn.cu (its header comment explains the kernels), pairs in chunks so that
//! the per-strip column maxima stay within `SCRATCH_BUDGET` bytes.

use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::error::Result;

/// Rows of a per strip (and columns per tile), and the kernels' block size (MNN_TILE, MNN_THREADS in the kernel file).
const TILE: usize = 64;
const THREADS: u32 = 256;
/// Bytes of column maxima (8 per strip and column) per launch at most, unless a single pair
/// needs more.
const SCRATCH_BUDGET: usize = 64 << 20;

/// Counts (i64 [pairs]) of the dense f32 maps `a` [pairs, La, D] (or [1, La, D] for every pair:
/// `a_pairs` 1) and `b` [pairs, Lb, D], each dimension >= 1 and La, Lb below 2^31 (the caller
/// checked); `a_offset` and `b_offset` are the maps' first elements in their buffers.
#[allow(clippy::too_many_arguments)]
pub fn mutual_nn_counts(
    a: &GpuBuffer,
    a_offset: usize,
    a_pairs: usize,
    b: &GpuBuffer,
    b_offset: usize,
    pairs: usize,
    la: usize,
    lb: usize,
    d: usize,
) -> Result<GpuBuffer> {
    let gpu = a.gpu();
    let strips = la.div_ceil(TILE);
    let per_pair = strips * lb * 8;
    // (grid.y holds at most 65535 pairs)
    let chunk = (SCRATCH_BUDGET / per_pair).clamp(1, pairs).min(65535);
    let counts = gpu.alloc(pairs * 8)?;
    let row_arg = gpu.alloc(chunk * la * 4)?;
    let col_part = gpu.alloc(chunk * per_pair)?;
    for first in (0..pairs).step_by(chunk) {
        let n = chunk.min(pairs - first);
        let mut args = KernelArgs::new();
        let a_first = if a_pairs == 1 { 0 } else { first };
        args.ptr(a, (a_offset + a_first * la * d) * 4)
            .ptr(b, (b_offset + first * lb * d) * 4)
            .ptr(&row_arg, 0)
            .ptr(&col_part, 0)
            .push(if a_pairs == 1 { 0 } else { (la * d) as i64 })
            .push(la as i64)
            .push(lb as i64)
            .push(d as i64);
        let tiles = LaunchConfig {
            grid: (strips as u32, n as u32, 1),
            block: (THREADS, 1, 1),
            shared_bytes: 0,
        };
        gpu.launch("mnn_tiles_f32", tiles, &mut args)?;
        let mut args = KernelArgs::new();
        args.ptr(&row_arg, 0)
            .ptr(&col_part, 0)
            .ptr(&counts, first * 8)
            .push(la as i64)
            .push(lb as i64)
            .push(strips as i64);
        let count = LaunchConfig {
            grid: (n as u32, 1, 1),
            block: (THREADS, 1, 1),
            shared_bytes: 0,
        };
        gpu.launch("mnn_count_f32", count, &mut args)?;
    }
    Ok(counts)
}
