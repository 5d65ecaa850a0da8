//! CPU softmax: f64 math per row (max, sum of exp(x - max), then the outputs), rows spread over
//! threads. Special values come out as the kernels give them: NaN or +inf in a row makes it NaN,
//! -inf elements give 0 (log: -inf), a row of -inf is NaN.

use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// Below this many elements one thread does all the rows.
const PARALLEL_MIN: usize = 1 << 15;

/// One row; `e` is scratch space that keeps each exp(x - max) from the sum for the output.
fn row<T: Element>(x: &[T], y: &mut [T], log: bool, e: &mut Vec<f64>) {
    let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v.to_f64()));
    e.clear();
    e.extend(x.iter().map(|&v| (v.to_f64() - m).exp()));
    let s: f64 = e.iter().sum();
    if log {
        let log_s = s.ln();
        for (o, &v) in y.iter_mut().zip(x) {
            *o = T::from_f64(v.to_f64() - m - log_s);
        }
    } else {
        for (o, &ev) in y.iter_mut().zip(e.iter()) {
            *o = T::from_f64(ev / s);
        }
    }
}

/// Every row of `x` into `y`.
fn all_rows<T: Element>(x: &[T], y: &mut [T], n: usize, log: bool) {
    let mut e = Vec::with_capacity(n);
    x.chunks(n)
        .zip(y.chunks_mut(n))
        .for_each(|(a, b)| row(a, b, log, &mut e));
}

fn typed<T: IntoCpuStorage>(x: &[T], rows: usize, n: usize, log: bool) -> CpuStorage {
    let x = &x[..rows * n];
    let mut y = vec![T::from_f64(0.0); rows * n];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows);
    if x.len() < PARALLEL_MIN || threads <= 1 {
        all_rows(x, &mut y, n, log);
    } else {
        let per = rows.div_ceil(threads) * n;
        std::thread::scope(|s| {
            for (xc, yc) in x.chunks(per).zip(y.chunks_mut(per)) {
                s.spawn(move || all_rows(xc, yc, n, log));
            }
        });
    }
    T::into_storage(y)
}

/// softmax (or log_softmax) of each of the `rows` rows of length `n` (n >= 1) of a dense tensor.
pub fn softmax(s: &CpuStorage, rows: usize, n: usize, log: bool) -> Result<CpuStorage> {
    with_cpu_float_storage!(s, v, T => Ok(typed::<T>(v, rows, n, log)),
        _ => dtype_err!("softmax needs f32, f16 or bf16 storage, got {}", s.dtype()))
}

/// Twin of `softmax_backward_*` / `log_softmax_backward_*`: from the forward's output `y` and its
/// gradient `dy` (dense `[rows, n]`), `y * (dy - sum(dy * y))` or `dy - exp(y) * sum(dy)` per
/// row, in f64.
pub fn softmax_backward(
    y: &CpuStorage,
    dy: &CpuStorage,
    rows: usize,
    n: usize,
    log: bool,
) -> Result<CpuStorage> {
    with_cpu_float_storage!(y, yv, T => {
        let Some(gv) = T::slice(dy) else {
            return dtype_err!("softmax backward: output is {} but the gradient is {}", y.dtype(), dy.dtype());
        };
        Ok(backward_typed::<T>(&yv[..rows * n], &gv[..rows * n], n, log))
    }, _ => dtype_err!("softmax backward needs f32, f16 or bf16 storage, got {}", y.dtype()))
}

fn backward_rows<T: Element>(y: &[T], g: &[T], dx: &mut [T], n: usize, log: bool) {
    for ((yr, gr), xr) in y.chunks(n).zip(g.chunks(n)).zip(dx.chunks_mut(n)) {
        if log {
            let s: f64 = gr.iter().map(|v| v.to_f64()).sum();
            for ((o, &yv), &gv) in xr.iter_mut().zip(yr).zip(gr) {
                *o = T::from_f64(gv.to_f64() - yv.to_f64().exp() * s);
            }
        } else {
            let s: f64 = yr
                .iter()
                .zip(gr)
                .map(|(a, b)| a.to_f64() * b.to_f64())
                .sum();
            for ((o, &yv), &gv) in xr.iter_mut().zip(yr).zip(gr) {
                *o = T::from_f64(yv.to_f64() * (gv.to_f64() - s));
            }
        }
    }
}

fn backward_typed<T: IntoCpuStorage>(y: &[T], g: &[T], n: usize, log: bool) -> CpuStorage {
    let rows = y.len() / n;
    let mut dx = vec![T::from_f64(0.0); y.len()];
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows);
    if y.len() < PARALLEL_MIN || threads <= 1 {
        backward_rows(y, g, &mut dx, n, log);
    } else {
        let per = rows.div_ceil(threads) * n;
        std::thread::scope(|s| {
            for ((yc, gc), xc) in y.chunks(per).zip(g.chunks(per)).zip(dx.chunks_mut(per)) {
                s.spawn(move || backward_rows(yc, gc, xc, n, log));
            }
        });
    }
    T::into_storage(dx)
}
