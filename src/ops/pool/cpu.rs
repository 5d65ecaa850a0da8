//! CPU max pooling in the input's dtype (comparisons are exact in any of them): the forward runs
//! output rows on several threads, the backward scatters each image's gradients on one thread per
//! group of images.

use super::PoolGeom;
use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::ops::cpu::parallel_rows;
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// Output elements below which one thread does everything.
const PARALLEL_MIN: usize = 1 << 14;

fn threads_for(len: usize, units: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(len / PARALLEL_MIN).min(units).max(1)
}

/// The window of output position `o` along an axis of `len`: the input positions it covers.
fn window(o: usize, g: &PoolGeom, len: usize) -> std::ops::Range<usize> {
    let start = (o * g.stride).saturating_sub(g.pad);
    let end = (o * g.stride + g.kernel).saturating_sub(g.pad).min(len);
    start..end
}

fn forward_rows<T: Element>(x: &[T], g: &PoolGeom, row0: usize, out: &mut [T], idx: &mut [i32]) {
    let row_len = g.ow * g.c;
    let mut best = vec![0f32; g.c];
    let mut at = vec![0i32; g.c];
    for (i, (orow, irow)) in out
        .chunks_mut(row_len)
        .zip(idx.chunks_mut(row_len))
        .enumerate()
    {
        let (n, oh) = ((row0 + i) / g.oh, (row0 + i) % g.oh);
        for ow in 0..g.ow {
            // the window's positions in order, each a run of C channels; every channel keeps
            // its first largest value, and every NaN wins (the last one is kept), as in PyTorch's
            // CPU kernel. Selects over the contiguous channels, not branches, so the loop
            // vectorises.
            let mut first = true;
            for ih in window(oh, g, g.h) {
                for iw in window(ow, g, g.w) {
                    let pos = (ih * g.w + iw) as i32;
                    let run = &x[((n * g.h + ih) * g.w + iw) * g.c..][..g.c];
                    if first {
                        best.iter_mut().zip(run).for_each(|(b, v)| *b = v.to_f32());
                        at.fill(pos);
                        first = false;
                        continue;
                    }
                    for ((b, a), v) in best.iter_mut().zip(at.iter_mut()).zip(run) {
                        let v = v.to_f32();
                        let better = v > *b || v.is_nan();
                        *b = if better { v } else { *b };
                        *a = if better { pos } else { *a };
                    }
                }
            }
            assert!(!first, "every window covers an input element");
            let (o, ix) = (&mut orow[ow * g.c..][..g.c], &mut irow[ow * g.c..][..g.c]);
            o.iter_mut()
                .zip(&best)
                .for_each(|(o, &b)| *o = T::from_f32(b));
            ix.copy_from_slice(&at);
        }
    }
}

fn forward_typed<T: IntoCpuStorage>(x: &[T], g: &PoolGeom) -> (CpuStorage, CpuStorage) {
    let len = g.n * g.oh * g.ow * g.c;
    let mut out = vec![T::from_f32(0.0); len];
    let mut idx = vec![0i32; len];
    let rows = g.n * g.oh;
    let threads = threads_for(len, rows);
    if threads == 1 {
        forward_rows(x, g, 0, &mut out, &mut idx);
    } else {
        let per = rows.div_ceil(threads) * g.ow * g.c;
        std::thread::scope(|s| {
            for (i, (o, ix)) in out.chunks_mut(per).zip(idx.chunks_mut(per)).enumerate() {
                s.spawn(move || forward_rows(x, g, i * rows.div_ceil(threads), o, ix));
            }
        });
    }
    (T::into_storage(out), CpuStorage::I32(idx))
}

/// Max pooling of the dense input starting at `offset` in `x`: (values, i32 indices).
pub fn max_pool(x: &CpuStorage, offset: usize, g: &PoolGeom) -> Result<(CpuStorage, CpuStorage)> {
    with_cpu_float_storage!(x, v, T => Ok(forward_typed::<T>(&v[offset..], g)),
        _ => dtype_err!("max_pool2d needs f32, f16 or bf16, got {}", x.dtype()))
}

fn backward_images<T: Element>(idx: &[i32], dy: &[T], g: &PoolGeom, dx: &mut [T]) {
    let (in_len, out_len) = (g.h * g.w * g.c, g.oh * g.ow * g.c);
    let mut acc = vec![0f32; in_len];
    for ((dst, ix), gy) in dx
        .chunks_mut(in_len)
        .zip(idx.chunks(out_len))
        .zip(dy.chunks(out_len))
    {
        acc.fill(0.0);
        for (e, (&at, &v)) in ix.iter().zip(gy).enumerate() {
            acc[at as usize * g.c + e % g.c] += v.to_f32();
        }
        dst.iter_mut()
            .zip(&acc)
            .for_each(|(d, &a)| *d = T::from_f32(a));
    }
}

fn backward_typed<T: IntoCpuStorage>(idx: &[i32], dy: &[T], g: &PoolGeom) -> CpuStorage {
    let (in_len, out_len) = (g.h * g.w * g.c, g.oh * g.ow * g.c);
    let mut dx = vec![T::from_f32(0.0); g.n * in_len];
    // images on threads: each gathers its own input gradient
    parallel_rows(&mut dx, in_len, |n0, d| {
        let images = (n0 * out_len)..((n0 + d.len() / in_len) * out_len);
        backward_images(&idx[images.clone()], &dy[images], g, d)
    });
    T::into_storage(dx)
}

/// The input gradient from the i32 indices of the forward and the dense output gradient starting
/// at `offset` in `dy`.
pub fn max_pool_backward(
    idx: &CpuStorage,
    dy: &CpuStorage,
    offset: usize,
    g: &PoolGeom,
) -> Result<CpuStorage> {
    let CpuStorage::I32(ix) = idx else {
        return dtype_err!(
            "max_pool2d backward: indices must be i32, got {}",
            idx.dtype()
        );
    };
    let len = g.n * g.oh * g.ow * g.c;
    with_cpu_float_storage!(dy, v, T => Ok(backward_typed::<T>(&ix[..len], &v[offset..][..len], g)),
        _ => dtype_err!("max_pool2d backward needs f32, f16 or bf16, got {}", dy.dtype()))
}
