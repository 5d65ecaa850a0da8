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
    let width = lanes_per_row(n);
    let (path, grid, threads) = if n <= WARP_ROW_MAX {
        let rows_per_block = WARPS_PER_BLOCK as usize * (32 / width);
        ("warp", rows.div_ceil(rows_per_block), 32 * WARPS_PER_BLOCK)
    } else {
        // about 16 elements per thread (a few 16-byte vectors), 128 to 1024 threads
        (
            "block",
            rows,
            (n / 16).next_power_of_two().clamp(128, 1024) as u32,
        )
    };
    let cfg = LaunchConfig {
        grid: (grid.min(MAX_THREADS / threads as usize) as u32, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.ptr(buf, 0)
        .ptr(&out, 0)
        .push(rows as i64)
        .push(n as i64);
    if path == "warp" {
        args.push(width as i32);
    }
    gpu.launch(&format!("{name}_{path}_{dtype}"), cfg, &mut args)?;
    Ok(out)
}
