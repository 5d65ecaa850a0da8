//! CPU layer norm: f64 math per row (two-pass mean and variance), rows spread over threads. The
//! statistics kept for the backward are rounded to f32, as the kernels keep them, so that both
//! backwards start from the same numbers.

use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::ops::cpu::vectorized;
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

/// Rows whose sums run interleaved: the sum of one row is a chain of dependent f64 additions
/// (kept in order, so results do not change), and four independent chains hide its latency.
const GROUP: usize = 4;

/// `[Σ_k term(r, k) for r in 0..G]` over k in 0..n, each sum in the order and with the start
/// value (-0.0) of `Iterator::sum`, the G chains interleaved.
#[inline(always)]
fn interleaved_sums<const G: usize>(n: usize, term: impl Fn(usize, usize) -> f64) -> [f64; G] {
    let mut sums = [-0.0; G];
    for k in 0..n {
        for (r, s) in sums.iter_mut().enumerate() {
            *s += term(r, k);
        }
    }
    sums
}

/// Rows `r0..r0 + count` of the forward: the output rows and each row's (mean, rstd).
fn forward_rows<T: Element>(
    x: &[T],
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    (r0, count): (usize, usize),
    n: usize,
    eps: f64,
) -> (Vec<T>, Vec<(f32, f32)>) {
    vectorized(
        #[inline(always)]
        || {
            let mut y = Vec::with_capacity(count * n);
            let mut stats = Vec::with_capacity(count);
            let rows = &x[r0 * n..(r0 + count) * n];
            let mut emit = |row: &[T], mean: f64, var: f64| {
                let rstd = 1.0 / (var + eps).sqrt();
                y.extend(row.iter().enumerate().map(|(k, v)| {
                    T::from_f64((v.to_f64() - mean) * rstd * param(w, k, 1.0) + param(b, k, 0.0))
                }));
                stats.push((mean as f32, rstd as f32));
            };
            let mut groups = rows.chunks_exact(GROUP * n);
            for group in groups.by_ref() {
                let at = |r: usize, k: usize| group[r * n + k].to_f64();
                let means = interleaved_sums::<GROUP>(n, &at).map(|s| s / n as f64);
                let vars = interleaved_sums::<GROUP>(n, |r, k| (at(r, k) - means[r]).powi(2))
                    .map(|s| s / n as f64);
                for (r, row) in group.chunks_exact(n).enumerate() {
                    emit(row, means[r], vars[r]);
                }
            }
            for row in groups.remainder().chunks_exact(n) {
                let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
                let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n as f64;
                emit(row, mean, var);
            }
            (y, stats)
        },
    )
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
        forward_rows(x, w, b, (r0, count), n, eps)
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

/// Rows `r0..r0 + count` of the input's gradient.
fn backward_rows<T: Element>(
    x: &[T],
    w: Option<&[f32]>,
    st: &Stats,
    dy: &[T],
    (r0, count): (usize, usize),
    n: usize,
) -> Vec<T> {
    vectorized(
        #[inline(always)]
        || {
            let mut dx = Vec::with_capacity(count * n);
            let g = |r: usize, k: usize| dy[r * n + k].to_f64() * param(w, k, 1.0);
            let xhat = |r: usize, k: usize| {
                (x[r * n + k].to_f64() - st.mean[r] as f64) * st.rstd[r] as f64
            };
            let mut emit = |r: usize, mean_g: f64, mean_gx: f64| {
                let rs = st.rstd[r] as f64;
                dx.extend(
                    (0..n).map(|k| T::from_f64(rs * (g(r, k) - mean_g - xhat(r, k) * mean_gx))),
                );
            };
            let end = r0 + count;
            let mut r = r0;
            while r + GROUP <= end {
                let mean_g = interleaved_sums::<GROUP>(n, |i, k| g(r + i, k)).map(|s| s / n as f64);
                let mean_gx = interleaved_sums::<GROUP>(n, |i, k| g(r + i, k) * xhat(r + i, k))
                    .map(|s| s / n as f64);
                for i in 0..GROUP {
                    emit(r + i, mean_g[i], mean_gx[i]);
                }
                r += GROUP;
            }
            for r in r..end {
                let mean_g = (0..n).map(|k| g(r, k)).sum::<f64>() / n as f64;
                let mean_gx = (0..n).map(|k| g(r, k) * xhat(r, k)).sum::<f64>() / n as f64;
                emit(r, mean_g, mean_gx);
            }
            dx
        },
    )
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
        backward_rows(x, w, st, dy, (r0, count), n)
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
        vectorized(
            #[inline(always)]
            || {
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
            },
        )
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

#[cfg(test)]
mod tests {
    use super::{backward_typed, forward_typed, param, Stats};
    use crate::dtype::Element;
    use crate::tensor::{CpuStorage, Rng};

    /// One row at a time, each sum a plain `Iterator::sum`: the loops the interleaved ones replaced.
    fn reference(
        x: &[f32],
        w: Option<&[f32]>,
        b: Option<&[f32]>,
        dy: &[f32],
        n: usize,
        eps: f64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut y, mut means, mut rstds, mut dx) = (vec![], vec![], vec![], vec![]);
        for row in x.chunks(n) {
            let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (v.to_f64() - mean).powi(2)).sum::<f64>() / n as f64;
            let rstd = 1.0 / (var + eps).sqrt();
            y.extend(row.iter().enumerate().map(|(k, v)| {
                f32::from_f64((v.to_f64() - mean) * rstd * param(w, k, 1.0) + param(b, k, 0.0))
            }));
            means.push(mean as f32);
            rstds.push(rstd as f32);
        }
        for (r, (xr, gr)) in x.chunks(n).zip(dy.chunks(n)).enumerate() {
            let (m, rs) = (means[r] as f64, rstds[r] as f64);
            let g = |k: usize| gr[k].to_f64() * param(w, k, 1.0);
            let xhat = |k: usize| (xr[k].to_f64() - m) * rs;
            let mean_g = (0..n).map(g).sum::<f64>() / n as f64;
            let mean_gx = (0..n).map(|k| g(k) * xhat(k)).sum::<f64>() / n as f64;
            dx.extend((0..n).map(|k| f32::from_f64(rs * (g(k) - mean_g - xhat(k) * mean_gx))));
        }
        (y, means, rstds, dx)
    }

    #[test]
    fn layer_norm_matches_the_row_by_row_loops_bit_for_bit() {
        let seed = crate::test_seed("layer_norm_matches_the_row_by_row_loops_bit_for_bit");
        let mut rng = Rng::new(seed);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // row counts that leave a remainder after groups of four, on one thread and on several
        for (rows, n, affine) in [(7, 33, true), (3, 5, false), (257, 131, true), (2, 1, true)] {
            let mut normal = |len: usize, mean: f64| -> Vec<f32> {
                (0..len).map(|_| (mean + rng.normal()) as f32).collect()
            };
            let (x, dy) = (normal(rows * n, 3.0), normal(rows * n, 0.0));
            let (w, b) = (normal(n, 1.0), normal(n, 0.0));
            let (w, b) = if affine {
                (Some(&w[..]), Some(&b[..]))
            } else {
                (None, None)
            };
            let (want_y, want_mean, want_rstd, want_dx) = reference(&x, w, b, &dy, n, 1e-5);
            let f = forward_typed(&x, w, b, rows, n, 1e-5);
            let CpuStorage::F32(y) = f.y else {
                unreachable!("f32 output")
            };
            let what = format!("{rows}x{n} (VPR_TEST_SEED={seed})");
            assert!(bits(&y) == bits(&want_y), "forward {what}");
            assert!(bits(&f.mean) == bits(&want_mean), "mean {what}");
            assert!(bits(&f.rstd) == bits(&want_rstd), "rstd {what}");
            let st = Stats {
                mean: &f.mean,
                rstd: &f.rstd,
            };
            let CpuStorage::F32(dx) = backward_typed(&x, w, &st, &dy, n) else {
                unreachable!("f32 gradient")
            };
            assert!(bits(&dx) == bits(&want_dx), "backward {what}");
        }
    }
}
