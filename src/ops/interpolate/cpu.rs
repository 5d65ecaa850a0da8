//! CPU bicubic interpolation in f64: the separable weights of each output row and column are
//! tabulated once (PyTorch's formulas, see kernels/interpolate.cu), then output rows are spread
//! over threads, each output pixel a weighted sum of runs of C channels. The backward gathers
//! through the transposed tables (which outputs read an input position, with what weight), which
//! the GPU backward uses too.

use super::InterpGeom;
use crate::error::{dtype_err, Result};
use crate::ops::cpu::parallel_rows;
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// The input positions and weights one output position along an axis reads (or, transposed, the
/// output positions and weights that read one input position).
pub(super) type Taps = Vec<(usize, f64)>;

fn cubic_near(x: f64, a: f64) -> f64 {
    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
}

fn cubic_far(x: f64, a: f64) -> f64 {
    ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
}

/// Plain bicubic: the four neighbours of `step * (d + 0.5) - 0.5`, clamped to the border, with
/// Keys' weights for a = -0.75.
fn cubic_taps(d: usize, step: f64, len: usize) -> Taps {
    let s = step * (d as f64 + 0.5) - 0.5;
    let i = (s.floor() as i64).min(len as i64 - 1);
    let t = (s - i as f64).clamp(0.0, 1.0);
    let a = -0.75;
    let weights = [
        cubic_far(t + 1.0, a),
        cubic_near(t, a),
        cubic_near(1.0 - t, a),
        cubic_far(2.0 - t, a),
    ];
    (0..4)
        .map(|k| {
            (
                (i - 1 + k).clamp(0, len as i64 - 1) as usize,
                weights[k as usize],
            )
        })
        .collect()
}

/// Pillow's bicubic filter (a = -0.5), zero beyond 2.
fn aa_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        cubic_near(x, -0.5)
    } else if x < 2.0 {
        cubic_far(x, -0.5)
    } else {
        0.0
    }
}

/// Antialiased bicubic: the filter widened by `step` when downsampling, over the window around
/// `step * (d + 0.5)` cut to the input, weights divided by their sum.
fn aa_taps(d: usize, step: f64, len: usize) -> Taps {
    let (support, inv_scale) = if step >= 1.0 {
        (2.0 * step, 1.0 / step)
    } else {
        (2.0, 1.0)
    };
    let center = step * (d as f64 + 0.5);
    // truncation toward zero, then the cut, as PyTorch's int64 casts and bounds
    let lo = ((center - support + 0.5) as i64).max(0);
    let hi = ((center + support + 0.5) as i64).min(len as i64);
    let most = support.ceil() as i64 * 2 + 1;
    let n = (hi - lo).clamp(0, most);
    let raw: Vec<f64> = (lo..lo + n)
        .map(|j| aa_filter((j as f64 - center + 0.5) * inv_scale))
        .collect();
    let total: f64 = raw.iter().sum();
    (lo..lo + n)
        .zip(raw)
        .map(|(j, w)| (j as usize, if total != 0.0 { w / total } else { w }))
        .collect()
}

/// The taps of every output position of an axis of `len` resized to `out`.
pub(super) fn axis(len: usize, out: usize, step: f64, antialias: bool) -> Vec<Taps> {
    (0..out)
        .map(|d| {
            if antialias {
                aa_taps(d, step, len)
            } else {
                cubic_taps(d, step, len)
            }
        })
        .collect()
}

fn typed<T: IntoCpuStorage>(x: &[T], g: &InterpGeom) -> CpuStorage {
    let rows = axis(g.h, g.oh, g.step_h, g.antialias);
    let cols = axis(g.w, g.ow, g.step_w, g.antialias);
    let (row_len, image) = (g.ow * g.c, g.h * g.w * g.c);
    let mut y = vec![T::from_f64(0.0); g.n * g.oh * row_len];
    parallel_rows(&mut y, row_len, |first, out| {
        let mut acc = vec![0f64; g.c];
        let mut line = vec![0f64; g.c];
        for (r, out_row) in out.chunks_mut(row_len).enumerate() {
            let (n, oy) = ((first + r) / g.oh, (first + r) % g.oh);
            for (ox, out_px) in out_row.chunks_mut(g.c).enumerate() {
                acc.fill(0.0);
                for &(iy, wy) in &rows[oy] {
                    line.fill(0.0);
                    for &(ix, wx) in &cols[ox] {
                        let px = &x[n * image + (iy * g.w + ix) * g.c..][..g.c];
                        line.iter_mut()
                            .zip(px)
                            .for_each(|(l, v)| *l += wx * v.to_f64());
                    }
                    acc.iter_mut().zip(&line).for_each(|(a, l)| *a += wy * l);
                }
                out_px
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(o, &a)| *o = T::from_f64(a));
            }
        }
    });
    T::into_storage(y)
}

/// Bicubic interpolation of the dense `[N, H, W, C]` input (starting at element `offset`).
pub fn bicubic(x: &CpuStorage, offset: usize, g: &InterpGeom) -> Result<CpuStorage> {
    let len = g.n * g.h * g.w * g.c;
    with_cpu_float_storage!(x, v, T => Ok(typed::<T>(&v[offset..offset + len], g)),
        _ => dtype_err!("interpolate_bicubic needs f32, f16 or bf16 storage, got {}", x.dtype()))
}

/// For each of the `len` input positions, the output positions that read it and the weight they
/// read it with (a position read twice through the border clamp counts once, weights added), in
/// output order.
pub(super) fn transposed(taps: &[Taps], len: usize) -> Vec<Taps> {
    let mut t: Vec<Taps> = vec![Vec::new(); len];
    for (d, row) in taps.iter().enumerate() {
        for &(i, w) in row {
            match t[i].last_mut() {
                Some((last, acc)) if *last == d => *acc += w,
                _ => t[i].push((d, w)),
            }
        }
    }
    t
}

fn backward_typed<T: IntoCpuStorage>(dy: &[T], g: &InterpGeom) -> CpuStorage {
    let rows = transposed(&axis(g.h, g.oh, g.step_h, g.antialias), g.h);
    let cols = transposed(&axis(g.w, g.ow, g.step_w, g.antialias), g.w);
    let (row_len, image) = (g.w * g.c, g.oh * g.ow * g.c);
    let mut dx = vec![T::from_f64(0.0); g.n * g.h * row_len];
    parallel_rows(&mut dx, row_len, |first, out| {
        let mut acc = vec![0f64; g.c];
        let mut line = vec![0f64; g.c];
        for (r, out_row) in out.chunks_mut(row_len).enumerate() {
            let (n, iy) = ((first + r) / g.h, (first + r) % g.h);
            for (ix, out_px) in out_row.chunks_mut(g.c).enumerate() {
                acc.fill(0.0);
                for &(oy, wy) in &rows[iy] {
                    line.fill(0.0);
                    for &(ox, wx) in &cols[ix] {
                        let px = &dy[n * image + (oy * g.ow + ox) * g.c..][..g.c];
                        line.iter_mut()
                            .zip(px)
                            .for_each(|(l, v)| *l += wx * v.to_f64());
                    }
                    acc.iter_mut().zip(&line).for_each(|(a, l)| *a += wy * l);
                }
                out_px
                    .iter_mut()
                    .zip(&acc)
                    .for_each(|(o, &a)| *o = T::from_f64(a));
            }
        }
    });
    T::into_storage(dx)
}

/// The input's gradient from the dense output gradient `dy` (`[N, OH, OW, C]`, starting at element
/// `offset`): each input element gathers the output gradients that read it, times their weights.
pub fn bicubic_backward(dy: &CpuStorage, offset: usize, g: &InterpGeom) -> Result<CpuStorage> {
    let len = g.n * g.oh * g.ow * g.c;
    with_cpu_float_storage!(dy, v, T => Ok(backward_typed::<T>(&v[offset..offset + len], g)),
        _ => dtype_err!("interpolate_bicubic backward needs f32, f16 or bf16 storage, got {}", dy.dtype()))
}
