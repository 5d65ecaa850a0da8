//! CPU layer norm: f64 math per row (two-pass mean and variance), rows spread over threads. The
//! statistics kept for the backward are rounded to f32, as the kernels keep them, so that both
//! backwards start from the same numbers.

use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// Below this many elements one thread does all the rows.
const PARALLEL_MIN: usize = 1 << 15;

/// Threads for `rows` rows of `n`.
fn threads_for(rows: usize, n: usize) -> usize {
    if rows * n < PARALLEL_MIN {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(rows)
        .max(1)
}

/// Runs `f(first_row, rows)` over consecutive runs of rows, on several threads when large.
fn split_rows<R: Send>(rows: usize, n: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let threads = threads_for(rows, n);
    if threads <= 1 {
        return vec![f(0, rows)];
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..rows)
            .step_by(per)
            .map(|r0| {
                let f = &f;
                s.spawn(move || f(r0, per.min(rows - r0)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a layer norm thread panicked"))
            .collect()
    })
}

/// The optional f32 parameter's element `k` in f64, or `default` without one.
fn param(p: Option<&[f32]>, k: usize, default: f64) -> f64 {
    p.map_or(default, |p| p[k] as f64)
}

/// The forward's results: the output, and each row's mean and rstd.
pub struct Forward {
    pub y: CpuStorage,
    pub mean: Vec<f32>,
    pub rstd: Vec<f32>,
}

fn forward_typed<T: IntoCpuStorage>(
    x: &[T],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    rows: usize,
    n: usize,
    eps: f64,
) -> Forward {
    let parts = split_rows(rows, n, |r0, count| {
        let mut y = Vec::with_capacity(count * n);
        let mut stats = Vec::with_capacity(count);
        for row in x[r0 * n..(r0 + count) * n].chunks(n) {
            let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            y.extend(row.iter().enumerate().map(|(k, v)| {
                T::from_f64((v.to_f64() - mean) * rstd * param(w, k, 1.0) + param(b, k, 0.0))
            }));
            stats.push((mean as f32, rstd as f32));
        }
        (y, stats)
    });
    let mut y = Vec::with_capacity(rows * n);
    let (mut mean, mut rstd) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for (part, stats) in parts {
        y.extend(part);
        for (m, r) in stats {
            mean.push(m);
            rstd.push(r);
        }
    }
    Forward {
        y: T::into_storage(y),
        mean,
        rstd,
    }
}

/// Layer norm of the `rows` rows of length `n` (both >= 1) of the dense `x`, with optional f32
/// weight and bias of `n`.
pub fn layer_norm(
    x: &CpuStorage,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    rows: usize,
    n: usize,
    eps: f64,
) -> Result<Forward> {
    with_cpu_float_storage!(x, v, T => Ok(forward_typed::<T>(&v[..rows * n], w, b, rows, n, eps)),
        _ => dtype_err!("layer_norm needs f32, f16 or bf16 storage, got {}", x.dtype()))
}

/// The forward's saved statistics, for the backward.
pub struct Stats<'a> {
    pub mean: &'a [f32],
    pub rstd: &'a [f32],
}

fn backward_typed<T: IntoCpuStorage>(
    x: &[T],
    w: Option<&[f32]>,
    st: &Stats,
    dy: &[T],
    n: usize,
) -> CpuStorage {
    let rows = st.mean.len();
    let parts = split_rows(rows, n, |r0, count| {
        let mut dx = Vec::with_capacity(count * n);
        for r in r0..r0 + count {
            let (m, rs) = (st.mean[r] as f64, st.rstd[r] as f64);
            let (xr, gr) = (&x[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n]);
            let g = |k: usize| gr[k].to_f64() * param(w, k, 1.0);
            let xhat = |k: usize| (xr[k].to_f64() - m) * rs;
            let mean_g = (0..n).map(g).sum::<f64>() / n as f64;
            let mean_gx = (0..n).map(|k| g(k) * xhat(k)).sum::<f64>() / n as f64;
            dx.extend((0..n).map(|k| T::from_f64(rs * (g(k) - mean_g - xhat(k) * mean_gx))));
        }
        dx
    });
    T::into_storage(parts.concat())
}

/// Twin of `layer_norm_backward_*`: the input's gradient (x's dtype) from the forward's input `x`,
/// f32 weight, statistics and the output's gradient `dy` (dense `[rows, n]`, x's dtype), in f64.
pub fn layer_norm_backward(
    x: &CpuStorage,
    w: Option<&[f32]>,
    st: &Stats,
    dy: &CpuStorage,
    n: usize,
) -> Result<CpuStorage> {
    let len = st.mean.len() * n;
    with_cpu_float_storage!(x, xv, T => {
        let Some(gv) = T::slice(dy) else {
            return dtype_err!("layer_norm backward: input is {} but the gradient is {}", x.dtype(), dy.dtype());
        };
        Ok(backward_typed::<T>(&xv[..len], w, st, &gv[..len], n))
    }, _ => dtype_err!("layer_norm backward needs f32, f16 or bf16 storage, got {}", x.dtype()))
}

fn param_grads_typed<T: Element>(x: &[T], st: &Stats, dy: &[T], n: usize) -> (Vec<f32>, Vec<f32>) {
    let rows = st.mean.len();
    let parts = split_rows(rows, n, |r0, count| {
        let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
        for r in r0..r0 + count {
            let (m, rs) = (st.mean[r] as f64, st.rstd[r] as f64);
            for k in 0..n {
                let g = dy[r * n + k].to_f64();
                dw[k] += g * (x[r * n + k].to_f64() - m) * rs;
                db[k] += g;
            }
        }
        (dw, db)
    });
    let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
    for (pw, pb) in parts {
        dw.iter_mut().zip(pw).for_each(|(a, p)| *a += p);
        db.iter_mut().zip(pb).for_each(|(a, p)| *a += p);
    }
    let to_f32 = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
    (to_f32(dw), to_f32(db))
}

/// Twin of `layer_norm_param_grad_*`: the weight's and the bias's gradients (f32 `[n]`), sums over
/// the rows of `dy * xhat` and of `dy`, in f64.
pub fn layer_norm_param_grads(
    x: &CpuStorage,
    st: &Stats,
    dy: &CpuStorage,
    n: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let len = st.mean.len() * n;
    with_cpu_float_storage!(x, xv, T => {
        let Some(gv) = T::slice(dy) else {
            return dtype_err!("layer_norm backward: input is {} but the gradient is {}", x.dtype(), dy.dtype());
        };
        Ok(param_grads_typed::<T>(&xv[..len], st, &gv[..len], n))
    }, _ => dtype_err!("layer_norm backward needs f32, f16 or bf16 storage, got {}", x.dtype()))
}
