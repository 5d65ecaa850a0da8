//! CPU twins of kernels/loss.cu: f32 math, rows split over threads when there are many.

use super::Rows;
use crate::dtype::Element;
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// Rows per thread below which splitting the work does not pay.
const ROWS_PER_THREAD: usize = 64;

fn threads_for(rows: usize, classes: usize) -> usize {
    let work = rows * classes.max(1);
    if work < 1 << 16 {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.min(rows.div_ceil(ROWS_PER_THREAD)).max(1)
}

/// Runs `f(first_row, chunk)` over `out` cut into chunks of whole rows (`width` values each).
fn for_row_chunks<T: Send>(
    out: &mut [T],
    width: usize,
    rows: usize,
    classes: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let threads = threads_for(rows, classes);
    let per = rows.div_ceil(threads).max(1);
    if threads <= 1 || width == 0 {
        f(0, out);
        return;
    }
    std::thread::scope(|s| {
        for (i, chunk) in out.chunks_mut(per * width).enumerate() {
            let f = &f;
            s.spawn(move || f(i * per, chunk));
        }
    });
}

/// log-sum-exp of one row of logits `z`, as the kernel computes it: max, then the sum of
/// exp(z - max).
fn row_lse(z: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = z.clone().fold(
        f32::NEG_INFINITY,
        |m, v| {
            if v.is_nan() || v > m {
                v
            } else {
                m
            }
        },
    );
    if m.is_nan() {
        return f32::NAN;
    }
    if m == f32::NEG_INFINITY {
        return f32::NEG_INFINITY; // empty row or only -inf: loss -inf - -inf = NaN, as torch
    }
    // m = +inf gives exp(inf - inf) = NaN, as torch
    let s: f32 = z.map(|v| (v - m).exp()).sum();
    m + s.ln()
}

/// The loss (`[1]`) and each row's log-sum-exp (`[rows]`).
pub fn forward(x: &CpuStorage, labels: &[i64], p: &Rows, divisor: f32) -> (CpuStorage, CpuStorage) {
    let (rows, classes) = (p.rows, p.classes);
    let mut lse = vec![0f32; rows];
    let mut loss = vec![0f32; rows];
    with_cpu_float_storage!(x, v, _T => {
        let v = &v[..rows * classes];
        for_row_chunks(&mut lse, 1, rows, classes, |r0, out| {
            for (i, o) in out.iter_mut().enumerate() {
                let r = r0 + i;
                let row = &v[r * classes..(r + 1) * classes];
                *o = row_lse(row.iter().enumerate().map(|(j, x)| p.logit(x.to_f32(), j as i64 == labels[r])));
            }
        });
        for (r, l) in loss.iter_mut().enumerate() {
            let y = labels[r];
            if y != p.ignore_index {
                *l = lse[r] - p.logit(v[r * classes + y as usize].to_f32(), true);
            }
        }
    }, _ => unreachable!("cross_entropy checks for a float dtype"));
    let total: f32 = loss.iter().sum();
    (CpuStorage::F32(vec![total / divisor]), CpuStorage::F32(lse))
}

/// `g / divisor * scale * (exp(z - lse) - onehot(y))` per element, 0 in ignored rows, in the logits' dtype.
pub fn backward(
    x: &CpuStorage,
    labels: &[i64],
    lse: &CpuStorage,
    g: &CpuStorage,
    p: &Rows,
    divisor: f32,
) -> CpuStorage {
    let (CpuStorage::F32(lse), CpuStorage::F32(g)) = (lse, g) else {
        unreachable!("the saved log-sum-exp and the loss gradient are f32")
    };
    let factor = g[0] / divisor * p.scale;
    let (rows, classes) = (p.rows, p.classes);
    with_cpu_float_storage!(x, v, T => {
        let mut out = vec![T::from_f32(0.0); rows * classes];
        if out.is_empty() {
            return T::into_storage(out);
        }
        for_row_chunks(&mut out, classes, rows, classes, |r0, chunk| {
            for (i, row) in chunk.chunks_mut(classes).enumerate() {
                let r = r0 + i;
                let y = labels[r];
                if y == p.ignore_index {
                    continue;
                }
                let xr = &v[r * classes..(r + 1) * classes];
                for (j, (o, &xv)) in row.iter_mut().zip(xr).enumerate() {
                    let hot = j as i64 == y;
                    let prob = (p.logit(xv.to_f32(), hot) - lse[r]).exp();
                    *o = T::from_f32(factor * (prob - if hot { 1.0 } else { 0.0 }));
                }
            }
        });
        T::into_storage(out)
    }, _ => unreachable!("cross_entropy checks for a float dtype"))
}
