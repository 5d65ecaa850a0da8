//! Launches of the kernels in kernels/matmul.cu.
//!
//! Three kernel families: SIMT for f32; for bf16/f16, mma.sync everywhere and wgmma on compute
//! capability 9.0 (Hopper's sm_90a; the virtual GPU emulates it), where it is the default.

use super::{GemmPlan, MatOperand};
use crate::device::{Gpu, KernelArgs, LaunchConfig};
use crate::error::{shape_err, Result};
use crate::layout::Layout;
use crate::tensor::{Storage, Tensor};
use crate::DType;
use std::cell::Cell;

const MAX_BATCH: usize = 6;

/// Mirrors `struct GemmParams` in kernels/matmul.cu. Strides in elements.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct GemmParams {
    m: i64,
    n: i64,
    k: i64,
    lda: i64,
    ldb: i64,
    ldc_m: i64,
    ldc_n: i64,
    batch_rank: i64,
    batch_shape: [i64; MAX_BATCH],
    batch_a: [i64; MAX_BATCH],
    batch_b: [i64; MAX_BATCH],
    batch_c: [i64; MAX_BATCH],
    z0: i64,
    alpha: f32,
    beta: f32,
}

/// Which kernels run bf16/f16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorCorePath {
    /// `gemm_{dtype}_*`: mma.sync m16n8k16, any architecture from sm_80.
    MmaSync,
    /// `gemm_wgmma_{dtype}_*`: wgmma m64n256k16, compute capability 9.0 only.
    Wgmma,
}

thread_local! {
    static FORCED_PATH: Cell<Option<TensorCorePath>> = const { Cell::new(None) };
}

/// Runs `f` with bf16/f16 products on this thread forced onto `path` instead of the device's
/// default, so that `check` and the benches can run both families on a Hopper GPU. Asking for
/// wgmma on a device without it makes the products fail with an error.
pub fn with_tensor_core_path<R>(path: TensorCorePath, f: impl FnOnce() -> R) -> R {
    let previous = FORCED_PATH.with(|p| p.replace(Some(path)));
    let result = f();
    FORCED_PATH.with(|p| p.set(previous));
    result
}

/// Whether `gpu` can run the wgmma kernels.
pub fn has_wgmma(gpu: &Gpu) -> bool {
    gpu.compute_capability() == (9, 0)
}

/// Block tile of the SIMT and mma.sync kernels.
const TILE: usize = 128;
/// Block tile of the wgmma kernels, and their dynamic shared memory: 4 stages of a 128 x 64 and a
/// 256 x 64 tile, plus 1 KB to align them (see `wg::` in kernels/matmul.cu).
const WGMMA_TILE: (usize, usize) = (128, 256);
const WGMMA_SHARED_BYTES: u32 = 4 * (128 + 256) * 64 * 2 + 1024;
/// Tensor-core kernel: pipeline stages and the shared tile of one operand per stage (elements),
/// as `tc::tile_elems` computes them.
const STAGES: usize = 4;
fn tc_tile_elems(k_contiguous: bool) -> usize {
    if k_contiguous {
        TILE * (32 + 8)
    } else {
        32 * (TILE + 8)
    }
}
/// grid.z (one batch entry per z) is limited to 65535.
const MAX_GRID_Z: usize = 65535;

fn buffer(t: &Tensor) -> &crate::device::GpuBuffer {
    match t.storage() {
        Storage::Gpu(b) => b,
        Storage::Cpu(_) => unreachable!("gpu gemm called with a CPU tensor"),
    }
}

pub fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    plan: &GemmPlan,
    out_layout: Layout,
) -> Result<Tensor> {
    let (dtype, size) = (a.dtype(), a.dtype().size_in_bytes());
    let gpu = buffer(a).gpu().clone();
    let out = gpu.alloc(out_layout.numel() * size)?;
    let batches = plan.batch_count();
    let (m, n) = (plan.m, plan.n);
    if m * n * batches > 0 {
        let ao = MatOperand::new(a, &plan.batch)?;
        let bo = MatOperand::new(b, &plan.batch)?;
        let co = c
            .map(|c| {
                c.broadcast_to(out_layout.shape())
                    .and_then(|v| MatOperand::new(&v, &plan.batch))
            })
            .transpose()?;
        let (ta, tb) = (ao.transposed(), bo.transposed());
        // the wgmma kernels need K >= 1 (see kernels/matmul.cu)
        let path = (dtype != DType::F32).then(|| match FORCED_PATH.with(Cell::get) {
            _ if plan.k == 0 => TensorCorePath::MmaSync,
            Some(forced) => forced,
            None if has_wgmma(&gpu) => TensorCorePath::Wgmma,
            None => TensorCorePath::MmaSync,
        });
        let (tile_m, tile_n) = match path {
            Some(TensorCorePath::Wgmma) => WGMMA_TILE,
            _ => (TILE, TILE),
        };
        let tiles = m.div_ceil(tile_m) * n.div_ceil(tile_n);
        if tiles > i32::MAX as usize {
            return shape_err!("matmul: a {m} x {n} product needs more blocks than a grid holds");
        }
        let mut p = GemmParams::zeroed_with(plan, &ao, &bo, co.as_ref());
        let family = match path {
            Some(TensorCorePath::Wgmma) => {
                if !has_wgmma(&gpu) {
                    return Err(crate::Error::Device(format!(
                        "the wgmma matmul kernels need compute capability 9.0; {} has {:?}",
                        gpu.kind(),
                        gpu.compute_capability()
                    )));
                }
                "gemm_wgmma"
            }
            _ => "gemm",
        };
        let kernel = format!(
            "{family}_{dtype}_{}{}",
            if ta { 't' } else { 'n' },
            if tb { 't' } else { 'n' }
        );
        let shared_bytes = match path {
            None => 0,
            Some(TensorCorePath::MmaSync) => {
                (STAGES * (tc_tile_elems(!ta) + tc_tile_elems(tb)) * size) as u32
            }
            Some(TensorCorePath::Wgmma) => WGMMA_SHARED_BYTES,
        };
        for z0 in (0..batches).step_by(MAX_GRID_Z) {
            p.z0 = z0 as i64;
            let cfg = LaunchConfig {
                grid: (tiles as u32, 1, (batches - z0).min(MAX_GRID_Z) as u32),
                block: (256, 1, 1),
                shared_bytes,
            };
            let mut args = KernelArgs::new();
            args.ptr(buffer(a), ao.offset * size)
                .ptr(buffer(b), bo.offset * size);
            match (c, &co) {
                (Some(c), Some(co)) => args.ptr(buffer(c), co.offset * size),
                _ => args.ptr(&out, 0), // never read: beta is 0
            };
            args.ptr(&out, 0).push(p);
            gpu.launch(&kernel, cfg, &mut args)?;
        }
    }
    Ok(Tensor::from_parts(
        Storage::Gpu(out),
        out_layout,
        dtype,
        a.device().clone(),
    ))
}

impl GemmParams {
    fn zeroed_with(
        plan: &GemmPlan,
        a: &MatOperand,
        b: &MatOperand,
        c: Option<&MatOperand>,
    ) -> GemmParams {
        let mut p: GemmParams = bytemuck::Zeroable::zeroed();
        p.m = plan.m as i64;
        p.n = plan.n as i64;
        p.k = plan.k as i64;
        p.lda = a.ld() as i64;
        p.ldb = b.ld() as i64;
        p.alpha = plan.alpha;
        p.beta = if c.is_some() { plan.beta } else { 0.0 };
        p.batch_rank = plan.batch.len() as i64;
        for (d, &s) in plan.batch.iter().enumerate() {
            p.batch_shape[d] = s as i64;
            p.batch_a[d] = a.batch[d] as i64;
            p.batch_b[d] = b.batch[d] as i64;
            p.batch_c[d] = c.map_or(0, |c| c.batch[d] as i64);
        }
        if let Some(c) = c {
            p.ldc_m = c.rs as i64;
            p.ldc_n = c.cs as i64;
        }
        p
    }
}
