//! CPU max pooling in the input's dtype (comparisons are exact in any of them): the forward runs
//! output rows on several threads, the backward scatters each image's gradients on one thread per
//! group of images.

use super::PoolGeom;
use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::ops::cpu::{parallel_rows, vectorized};
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};
use std::mem::MaybeUninit;

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

/// Output rows `row0..` (whole rows of `out` and `idx`), compiled for the CPU's vector unit.
fn forward_rows<T: Element>(
    x: &[T],
    g: &PoolGeom,
    row0: usize,
    out: &mut [MaybeUninit<T>],
    idx: &mut [MaybeUninit<i32>],
) {
    vectorized(
        #[inline(always)]
        || forward_rows_inline(x, g, row0, out, idx),
    )
}

#[inline(always)]
fn forward_rows_inline<T: Element>(
    x: &[T],
    g: &PoolGeom,
    row0: usize,
    out: &mut [MaybeUninit<T>],
    idx: &mut [MaybeUninit<i32>],
) {
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
            o.iter_mut().zip(&best).for_each(|(o, &b)| {
                o.write(T::from_f32(b));
            });
            ix.iter_mut().zip(&at).for_each(|(ix, &a)| {
                ix.write(a);
            });
        }
    }
}

fn forward_typed<T: IntoCpuStorage>(x: &[T], g: &PoolGeom) -> (CpuStorage, CpuStorage) {
    let len = g.n * g.oh * g.ow * g.c;
    // every output row is written below: no zeroing first
    let (mut out, mut idx) = (Vec::with_capacity(len), Vec::with_capacity(len));
    let (o, ix) = (
        &mut out.spare_capacity_mut()[..len],
        &mut idx.spare_capacity_mut()[..len],
    );
    let rows = g.n * g.oh;
    let threads = threads_for(len, rows);
    if threads == 1 {
        forward_rows(x, g, 0, o, ix);
    } else {
        let per = rows.div_ceil(threads) * g.ow * g.c;
        std::thread::scope(|s| {
            for (i, (o, ix)) in o.chunks_mut(per).zip(ix.chunks_mut(per)).enumerate() {
                s.spawn(move || forward_rows(x, g, i * rows.div_ceil(threads), o, ix));
            }
        });
    }
    // SAFETY: the chunks cover all `len` elements of both, and `forward_rows` writes every
    // element of the whole output rows it is given (each position's C values and indices)
    unsafe {
        out.set_len(len);
        idx.set_len(len);
    }
    (T::into_storage(out), CpuStorage::I32(idx))
}

/// Max pooling of the dense input starting at `offset` in `x`: (values, i32 indices).
pub fn max_pool(x: &CpuStorage, offset: usize, g: &PoolGeom) -> Result<(CpuStorage, CpuStorage)> {
    with_cpu_float_storage!(x, v, T => Ok(forward_typed::<T>(&v[offset..], g)),
        _ => dtype_err!("max_pool2d needs f32, f16 or bf16, got {}", x.dtype()))
}

fn backward_images<T: Element>(idx: &[i32], dy: &[T], g: &PoolGeom, dx: &mut [MaybeUninit<T>]) {
    let (in_len, out_len) = (g.h * g.w * g.c, g.oh * g.ow * g.c);
    let mut acc = vec![0f32; in_len];
    for ((dst, ix), gy) in dx
        .chunks_mut(in_len)
        .zip(idx.chunks(out_len))
        .zip(dy.chunks(out_len))
    {
        acc.fill(0.0);
        // output positions in order, each a run of C channels: the same additions in the same
        // order as one pass over the elements, without a division per element for the channel
        for (ix, gy) in ix.chunks(g.c).zip(gy.chunks(g.c)) {
            for (ch, (&at, &v)) in ix.iter().zip(gy).enumerate() {
                acc[at as usize * g.c + ch] += v.to_f32();
            }
        }
        dst.iter_mut().zip(&acc).for_each(|(d, &a)| {
            d.write(T::from_f32(a));
        });
    }
}

fn backward_typed<T: IntoCpuStorage>(idx: &[i32], dy: &[T], g: &PoolGeom) -> CpuStorage {
    let (in_len, out_len) = (g.h * g.w * g.c, g.oh * g.ow * g.c);
    let len = g.n * in_len;
    let mut dx = Vec::with_capacity(len);
    // images on threads: each gathers its own input gradient
    parallel_rows(&mut dx.spare_capacity_mut()[..len], in_len, |n0, d| {
        let images = (n0 * out_len)..((n0 + d.len() / in_len) * out_len);
        backward_images(&idx[images.clone()], &dy[images], g, d)
    });
    // SAFETY: the chunks cover all `len` elements, and `backward_images` writes every element
    // of the images it is given
    unsafe { dx.set_len(len) };
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

#[cfg(test)]
mod tests {
    use super::{backward_typed, forward_typed, window, PoolGeom};
    use crate::tensor::{CpuStorage, Rng};

    fn geom(
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> PoolGeom {
        let out = |len: usize| (len + 2 * pad - kernel) / stride + 1;
        PoolGeom {
            n,
            h,
            w,
            c,
            kernel,
            stride,
            pad,
            oh: out(h),
            ow: out(w),
        }
    }

    /// Max pooling one output element at a time: the first largest value of each window, NaN
    /// winning (the last one), as the loops over contiguous channels must give.
    fn reference_forward(x: &[f32], g: &PoolGeom) -> (Vec<f32>, Vec<i32>) {
        let (mut out, mut idx) = (Vec::new(), Vec::new());
        for n in 0..g.n {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    for ch in 0..g.c {
                        let mut best: Option<(f32, i32)> = None;
                        for ih in window(oh, g, g.h) {
                            for iw in window(ow, g, g.w) {
                                let v = x[((n * g.h + ih) * g.w + iw) * g.c + ch];
                                let pos = (ih * g.w + iw) as i32;
                                if best.is_none_or(|(b, _)| v > b || v.is_nan()) {
                                    best = Some((v, pos));
                                }
                            }
                        }
                        let (b, at) = best.unwrap();
                        out.push(b);
                        idx.push(at);
                    }
                }
            }
        }
        (out, idx)
    }

    /// The backward as one pass over the output elements in order (the channel from a division).
    fn reference_backward(idx: &[i32], dy: &[f32], g: &PoolGeom) -> Vec<f32> {
        let (in_len, out_len) = (g.h * g.w * g.c, g.oh * g.ow * g.c);
        let mut dx = vec![0f32; g.n * in_len];
        for (e, (&at, &v)) in idx.iter().zip(dy).enumerate() {
            dx[(e / out_len) * in_len + at as usize * g.c + e % g.c] += v;
        }
        dx
    }

    #[test]
    fn max_pool_matches_the_per_element_loops_bit_for_bit() {
        let seed = crate::test_seed("max_pool_matches_the_per_element_loops_bit_for_bit");
        let mut rng = Rng::new(seed);
        // ResNet's stem pooling at an odd channel count, overlapping windows of another stride,
        // and one large enough for several threads
        for g in [
            geom(2, 13, 11, 67, 3, 2, 1),
            geom(3, 9, 10, 5, 2, 1, 0),
            geom(4, 40, 38, 33, 3, 2, 1),
        ] {
            let len = g.n * g.h * g.w * g.c;
            // few distinct values, so that windows hold ties, and some NaNs
            let x: Vec<f32> = (0..len)
                .map(|_| match rng.below(40) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    _ => rng.below(9) as f32 - 4.0,
                })
                .collect();
            let (want, want_idx) = reference_forward(&x, &g);
            let (CpuStorage::F32(got), CpuStorage::I32(got_idx)) = forward_typed(&x, &g) else {
                unreachable!("f32 values and i32 indices")
            };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&got) == bits(&want),
                "forward values (VPR_TEST_SEED={seed})"
            );
            assert!(
                got_idx == want_idx,
                "forward indices (VPR_TEST_SEED={seed})"
            );
            let dy: Vec<f32> = (0..want.len()).map(|_| rng.normal() as f32).collect();
            let CpuStorage::F32(dx) = backward_typed(&got_idx, &dy, &g) else {
                unreachable!("an f32 gradient")
            };
            let want_dx = reference_backward(&got_idx, &dy, &g);
            assert!(
                bits(&dx) == bits(&want_dx),
                "backward (VPR_TEST_SEED={seed})"
            );
        }
    }
}
