//! Launches of the kernels in kernels/matmul.cu.
//!
//! Kernel families: SIMT for f32; for bf16/f16, mma.sync everywhere, and on compute capability 9.0
//! (Hopper's sm_90a; the virtual GPU emulates it) wgmma, fed by TMA where the operands allow
//! tensor maps and by cp.async otherwise.

use super::{GemmPlan, MatOperand};
use crate::device::{Gpu, KernelArgs, LaunchConfig, TensorMapDesc};
use crate::error::{shape_err, Result};
use crate::layout::Layout;
use crate::tensor::{Storage, Tensor};
use crate::DType;
use std::cell::Cell;

const MAX_BATCH: usize = 6;

/// Mirrors `struct GemmParams` in kernels/matmul.cu (layout tested in src/device/abi.rs). Strides
/// in elements.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GemmParams {
    pub(crate) m: i64,
    pub(crate) n: i64,
    pub(crate) k: i64,
    pub(crate) lda: i64,
    pub(crate) ldb: i64,
    pub(crate) ldc_m: i64,
    pub(crate) ldc_n: i64,
    pub(crate) batch_rank: i64,
    pub(crate) batch_shape: [i64; MAX_BATCH],
    pub(crate) batch_a: [i64; MAX_BATCH],
    pub(crate) batch_b: [i64; MAX_BATCH],
    pub(crate) batch_c: [i64; MAX_BATCH],
    pub(crate) z0: i64,
    pub(crate) alpha: f32,
    pub(crate) beta: f32,
}

/// Which kernels run bf16/f16 products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorCorePath {
    /// `gemm_{dtype}_*`: mma.sync m16n8k16, any architecture from sm_80.
    MmaSync,
    /// `gemm_wgmma_{dtype}_*`: wgmma m64n256k16 with cp.async loads; compute capability 9.0.
    Wgmma,
    /// `gemm_tma_{dtype}_*`: wgmma with TMA loads by a producer warpgroup; compute capability 9.0,
    /// operands whose start, leading dimension and batch stride are multiples of 16 bytes, at most
    /// one batch dimension. The default on 9.0 where these hold, `Wgmma` where not.
    WgmmaTma,
}

thread_local! {
    static FORCED_PATH: Cell<Option<TensorCorePath>> = const { Cell::new(None) };
}

/// Runs `f` with bf16/f16 products on this thread forced onto `path` instead of the device's
/// default, so that `check` and the benches can run every family on a Hopper GPU. Asking for wgmma
/// on a device without it, or for TMA where the operands do not allow it, makes the products fail
/// with an error.
pub fn with_tensor_core_path<R>(path: TensorCorePath, f: impl FnOnce() -> R) -> R {
    let previous = FORCED_PATH.with(|p| p.replace(Some(path)));
    let result = f();
    FORCED_PATH.with(|p| p.set(previous));
    result
}

/// The kernel families `gpu` runs `dtype` products on, default first: `None` for f32 (SIMT).
pub fn tensor_core_paths(gpu: &Gpu, dtype: DType) -> &'static [Option<TensorCorePath>] {
    match dtype {
        DType::F32 => &[None],
        _ if has_wgmma(gpu) => &[
            Some(TensorCorePath::WgmmaTma),
            Some(TensorCorePath::Wgmma),
            Some(TensorCorePath::MmaSync),
        ],
        _ => &[Some(TensorCorePath::MmaSync)],
    }
}

/// Whether `gpu` can run the wgmma kernels.
fn has_wgmma(gpu: &Gpu) -> bool {
    gpu.compute_capability() == (9, 0)
}

/// Block tile of the SIMT and mma.sync kernels.
const TILE: usize = 128;
/// Block tile of the wgmma kernels, and their dynamic shared memory: 4 stages of a 128 x 64 and a
/// 256 x 64 tile, plus 1 KB to align them, plus (TMA) 8 mbarriers (see `wg::` in
/// kernels/matmul.cu).
const WGMMA_TILE: (usize, usize) = (128, 256);
const WGMMA_K_TILE: u32 = 64;
const WGMMA_SHARED_BYTES: u32 = 4 * (128 + 256) * 64 * 2 + 1024;
const TMA_SHARED_BYTES: u32 = WGMMA_SHARED_BYTES + 2 * 4 * 8;

/// The batch shape with the dimensions that every operand steps through as one merged (the outer
/// stride is the inner stride times the inner extent, broadcast ones included) and extent-1
/// dimensions dropped; the operands' batch strides follow. The output is dense, so it always
/// agrees. Kernels then do less index arithmetic per block, and a [B, H]-batched product (as in
/// attention) has the single batch dimension the TMA kernels take.
fn coalesce_batch(shape: &[usize], mut operands: [Option<&mut MatOperand>; 3]) -> Vec<usize> {
    let mut merged: Vec<usize> = Vec::new();
    let mut strides: [Vec<usize>; 3] = Default::default();
    for (d, &extent) in shape.iter().enumerate() {
        if extent == 1 {
            continue;
        }
        let joins = !merged.is_empty()
            && operands.iter().zip(&strides).all(|(o, s)| {
                o.as_ref()
                    .is_none_or(|o| *s.last().unwrap() == o.batch[d] * extent)
            });
        if joins {
            *merged.last_mut().unwrap() *= extent;
        } else {
            merged.push(extent);
        }
        for (o, s) in operands.iter().zip(&mut strides) {
            if let Some(o) = o {
                if joins {
                    *s.last_mut().unwrap() = o.batch[d];
                } else {
                    s.push(o.batch[d]);
                }
            }
        }
    }
    for (o, s) in operands.iter_mut().zip(strides) {
        if let Some(o) = o {
            o.batch = s;
        }
    }
    merged
}

/// The tensor maps of A and B, kernel arguments of the TMA kernels.
type TensorMaps = [[u64; 16]; 2];

/// The kernel family for a product (None: f32, SIMT) and, for TMA, the operands' tensor maps:
/// the thread's forced path if any, else the device's best; TMA falls back to cp.async where the
/// operands do not allow tensor maps, unless it was forced.
fn select_path(
    gpu: &Gpu,
    dtype: DType,
    operands: [(&Tensor, &MatOperand, usize, bool); 2],
    plan: &GemmPlan,
) -> Result<(Option<TensorCorePath>, Option<TensorMaps>)> {
    if dtype == DType::F32 {
        return Ok((None, None));
    }
    let forced = FORCED_PATH.with(Cell::get);
    let path = match forced {
        // the wgmma kernels need K >= 1 (see kernels/matmul.cu)
        _ if plan.k == 0 => TensorCorePath::MmaSync,
        Some(path) => path,
        None if has_wgmma(gpu) => TensorCorePath::WgmmaTma,
        None => TensorCorePath::MmaSync,
    };
    if path != TensorCorePath::MmaSync && !has_wgmma(gpu) {
        return Err(crate::Error::Device(format!(
            "the wgmma matmul kernels need compute capability 9.0; {} has {:?}",
            gpu.kind(),
            gpu.compute_capability()
        )));
    }
    if path != TensorCorePath::WgmmaTma {
        return Ok((Some(path), None));
    }
    match tma_maps(gpu, dtype, operands, plan)? {
        Some(maps) => Ok((Some(path), Some(maps))),
        None if forced.is_some() => Err(crate::Error::Argument(format!(
            "the TMA matmul kernels need 16-byte-aligned operands and at most one batch dimension: \
             {:?} @ {:?}",
            operands[0].0.shape(),
            operands[1].0.shape()
        ))),
        None => Ok((Some(TensorCorePath::Wgmma), None)),
    }
}

/// Tensor maps of A and B (each with its block-tile rows and whether it is stored K-major) for the
/// TMA kernels (`wg::load_tma`), or None where an operand does not allow one: its start, leading
/// dimension and batch stride must be multiples of 16 bytes, and the product may have one batch
/// dimension at most. A K-major operand is read in boxes of 64 k x the
/// block tile's rows, an MN-major one in boxes of 64 rows x 64 k; a broadcast operand gets a batch
/// extent of 1.
fn tma_maps(
    gpu: &Gpu,
    dtype: DType,
    operands: [(&Tensor, &MatOperand, usize, bool); 2],
    plan: &GemmPlan,
) -> Result<Option<TensorMaps>> {
    if plan.batch.len() > 1 || plan.k == 0 {
        return Ok(None);
    }
    let batches = plan.batch_count() as u64;
    let mut maps = [[0u64; 16]; 2];
    for (i, (t, o, tile_rows, k_major)) in operands.into_iter().enumerate() {
        let address = buffer(t).device_ptr() + 2 * o.offset as u64;
        let (ld, batch_stride) = (o.ld() as u64, o.batch.first().map_or(0, |&s| s as u64));
        if address % 16 != 0 || ld % 8 != 0 || batch_stride % 8 != 0 {
            return Ok(None);
        }
        let rows = (if i == 0 { plan.m } else { plan.n }) as u64;
        let (inner, outer) = if k_major {
            (plan.k as u64, rows)
        } else {
            (rows, plan.k as u64)
        };
        let batched = batches > 1 && batch_stride != 0;
        let desc = TensorMapDesc {
            bf16: dtype == DType::BF16,
            address,
            dims: [inner, outer, if batched { batches } else { 1 }],
            strides: [
                2 * ld,
                if batched {
                    2 * batch_stride
                } else {
                    (2 * ld * outer).next_multiple_of(16)
                },
            ],
            box_dims: [WGMMA_K_TILE, if k_major { tile_rows as u32 } else { 64 }, 1],
        };
        match gpu.encode_tensor_map(&desc) {
            Ok(map) => maps[i] = map,
            // the driver has limits of its own; the cp.async kernels take any operand
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(maps))
}
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
        let mut ao = MatOperand::new(a, &plan.batch)?;
        let mut bo = MatOperand::new(b, &plan.batch)?;
        let mut co = c
            .map(|c| {
                c.broadcast_to(out_layout.shape())
                    .and_then(|v| MatOperand::new(&v, &plan.batch))
            })
            .transpose()?;
        let plan = &GemmPlan {
            batch: coalesce_batch(&plan.batch, [Some(&mut ao), Some(&mut bo), co.as_mut()]),
            ..plan.clone()
        };
        let (ta, tb) = (ao.transposed(), bo.transposed());
        // A is K-major when stored [M, K], B when stored [N, K] (transposed)
        let operands = [(a, &ao, WGMMA_TILE.0, !ta), (b, &bo, WGMMA_TILE.1, tb)];
        let (path, tma) = select_path(&gpu, dtype, operands, plan)?;
        let (tile_m, tile_n) = match path {
            Some(TensorCorePath::Wgmma | TensorCorePath::WgmmaTma) => WGMMA_TILE,
            _ => (TILE, TILE),
        };
        let tiles = m.div_ceil(tile_m) * n.div_ceil(tile_n);
        if tiles > i32::MAX as usize {
            return shape_err!("matmul: a {m} x {n} product needs more blocks than a grid holds");
        }
        let mut p = GemmParams::zeroed_with(plan, &ao, &bo, co.as_ref());
        let family = match path {
            Some(TensorCorePath::Wgmma) => "gemm_wgmma",
            Some(TensorCorePath::WgmmaTma) => "gemm_tma",
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
            Some(TensorCorePath::WgmmaTma) => TMA_SHARED_BYTES,
        };
        // The TMA kernels are persistent: one launch, at most a block per SM, walks every tile of
        // every batch entry. The others take a block per tile and a grid.z entry per batch entry.
        let launches: Vec<(usize, LaunchConfig)> = if tma.is_some() {
            let blocks = (tiles * batches).min(gpu.multiprocessors() as usize);
            vec![(
                0,
                LaunchConfig {
                    grid: (blocks as u32, 1, 1),
                    block: (384, 1, 1),
                    shared_bytes,
                },
            )]
        } else {
            (0..batches)
                .step_by(MAX_GRID_Z)
                .map(|z0| {
                    let cfg = LaunchConfig {
                        grid: (tiles as u32, 1, (batches - z0).min(MAX_GRID_Z) as u32),
                        block: (256, 1, 1),
                        shared_bytes,
                    };
                    (z0, cfg)
                })
                .collect()
        };
        for (z0, cfg) in launches {
            p.z0 = z0 as i64;
            let mut args = KernelArgs::new();
            match &tma {
                Some([a_map, b_map]) => args.push(*a_map).push(*b_map),
                None => args
                    .ptr(buffer(a), ao.offset * size)
                    .ptr(buffer(b), bo.offset * size),
            };
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
