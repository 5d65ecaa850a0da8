//! f32 matrix multiplication on the CPU through the `gemm` crate (packed, SIMD, multi-threaded),
//! which takes arbitrary strides: transposed and broadcast views are read in place. f16 and bf16
//! are converted to f32 by the caller and rounded once at the end.

use super::{GemmPlan, MatOperand};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, Result};
use crate::layout::Layout;
use crate::tensor::{CpuStorage, Storage, Tensor};
use gemm::Parallelism;

/// Below this many multiply-adds per matrix, a batch is spread over threads one matrix each
/// instead of letting `gemm` split every matrix.
const SMALL_MATRIX: usize = 128 * 128 * 128;

fn f32_data(t: &Tensor) -> Result<&[f32]> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => dtype_err!(
            "cpu gemm: expected f32 CPU storage, got {} on {}",
            t.dtype(),
            t.device()
        ),
    }
}

pub fn gemm(
    a: &Tensor,
    b: &Tensor,
    c: Option<&Tensor>,
    plan: &GemmPlan,
    out_layout: Layout,
) -> Result<Tensor> {
    let (ad, bd) = (f32_data(a)?, f32_data(b)?);
    let ao = MatOperand::new(a, &plan.batch)?;
    let bo = MatOperand::new(b, &plan.batch)?;
    let c = match c {
        Some(c) => Some((
            f32_data(c)?,
            MatOperand::new(&c.broadcast_to(out_layout.shape())?, &plan.batch)?,
        )),
        None => None,
    };
    let (m, n) = (plan.m, plan.n);
    let mut out = vec![0f32; out_layout.numel()];
    let batches = plan.batch_count();
    let one = |z: usize, dst: &mut [f32], par: Parallelism| {
        let read_dst = match &c {
            Some((cd, co)) => {
                let off = plan.batch_offset(z, co);
                for (i, row) in dst.chunks_mut(n).enumerate() {
                    for (j, v) in row.iter_mut().enumerate() {
                        *v = cd[off + i * co.rs + j * co.cs];
                    }
                }
                true
            }
            None => false,
        };
        if plan.k == 0 {
            let scale = if read_dst { plan.beta } else { 0.0 };
            dst.iter_mut().for_each(|v| *v *= scale);
            return;
        }
        let (a_off, b_off) = (plan.batch_offset(z, &ao), plan.batch_offset(z, &bo));
        // SAFETY: check_extent (in Tensor::gemm) verified that every element of the broadcast
        // views lies inside the storages, so all reads through these offsets and strides are in
        // bounds; dst is an exclusive m x n row-major slice.
        unsafe {
            gemm::gemm(
                m,
                n,
                plan.k,
                dst.as_mut_ptr(),
                1,
                n as isize,
                read_dst,
                ad.as_ptr().add(a_off),
                ao.cs as isize,
                ao.rs as isize,
                bd.as_ptr().add(b_off),
                bo.cs as isize,
                bo.rs as isize,
                plan.beta,  // the crate computes dst = alpha * dst + beta * lhs @ rhs
                plan.alpha, // (its alpha and beta are the other way round)
                false,
                false,
                false,
                par,
            )
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    if m * n == 0 {
        // empty product: nothing to compute
    } else if batches > 1 && threads > 1 && m * n * plan.k < SMALL_MATRIX {
        let per = batches.div_ceil(threads);
        std::thread::scope(|s| {
            for (ci, chunk) in out.chunks_mut(per * m * n).enumerate() {
                let one = &one;
                s.spawn(move || {
                    for (i, dst) in chunk.chunks_mut(m * n).enumerate() {
                        one(ci * per + i, dst, Parallelism::None);
                    }
                });
            }
        });
    } else {
        for (z, dst) in out.chunks_mut(m * n).enumerate() {
            one(z, dst, Parallelism::Rayon(0));
        }
    }
    Ok(Tensor::from_parts(
        Storage::Cpu(CpuStorage::F32(out)),
        out_layout,
        DType::F32,
        Device::Cpu,
    ))
}
