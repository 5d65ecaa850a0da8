//! Launch of kernels/knn.cu; the file's header comment explains the kernel.

use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::error::Result;

/// The kernel's block size (its `__launch_bounds__`).
const THREADS: u32 = 256;
/// Blocks at most; the kernel loops over the rows beyond them.
pub const MAX_BLOCKS: usize = 16384;

/// One merge of the dense `ip` [queries, n], `qn` [queries] and `dn` [n] into the dense lists
/// `old_dist` / `old_idx` [queries, k] (queries, n >= 1; the caller checked k and n against the
/// kernel's limits), a block per row up to `max_blocks` blocks; returns the new distances (f32)
/// and indices (i64).
#[allow(clippy::too_many_arguments)]
pub fn merge(
    old_dist: &GpuBuffer,
    old_idx: &GpuBuffer,
    ip: &GpuBuffer,
    qn: &GpuBuffer,
    dn: &GpuBuffer,
    queries: usize,
    k: usize,
    n: usize,
    merged: usize,
    max_blocks: usize,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let gpu = ip.gpu();
    let dist = gpu.alloc(queries * k * 4)?;
    let idx = gpu.alloc(queries * k * 8)?;
    let mut args = KernelArgs::new();
    args.ptr(old_dist, 0)
        .ptr(old_idx, 0)
        .ptr(ip, 0)
        .ptr(qn, 0)
        .ptr(dn, 0)
        .ptr(&dist, 0)
        .ptr(&idx, 0)
        .push(queries as i64)
        .push(k as i32)
        .push(n as i64)
        .push(merged as i64);
    let cfg = LaunchConfig {
        grid: (queries.min(max_blocks) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    gpu.launch("knn_merge_f32", cfg, &mut args)?;
    Ok((dist, idx))
}
