//! CPU attention in f32 (f16/bf16 are converted by the caller), blocked so that memory stays
//! linear in L: per (b, h) and tile of `TILE` queries, the score tile `S = scale Q_t K^T`
//! ([TILE, L]) and `S V` are `gemm` crate products reading the strided views in place; the
//! softmax of each row is taken in between (f32). Jobs are spread over threads, each
//! thread with one score tile of scratch. The exponentials (L^2 per head, the cost beside the
//! products) are a polynomial the compiler vectorizes (`exp`), not libm's scalar call.
//!
//! The backward (per (b, h), query tiles in turn) recomputes `P = exp(S - lse)` from the saved
//! log-sum-exp, then `dV += P^T dO`, `dS = P (dO V^T - Dv)`, `dQ = scale dS K`,
//! `dK += scale dS^T Q`, with `Dv = rowsum(dO O)` in f64.

use crate::ops::cpu::exp_f32;
use gemm::Parallelism;

/// Query rows per job: a score tile of TILE x L f32 per thread.
const TILE: usize = 64;

/// A `[B, H, L, D]` f32 view with a stride-1 last axis: its data, offset and the strides of the
/// batch, head and position axes.
#[derive(Clone, Copy)]
pub struct HeadView<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub strides: [usize; 3],
}

impl HeadView<'_> {
    /// Offset of row `i` of head (b, h).
    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        self.offset + b * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }

    /// Pointer to row `i` of head (b, h).
    fn ptr(&self, b: usize, h: usize, i: usize) -> *const f32 {
        let at = self.row(b, h, i);
        assert!(at <= self.data.len(), "attention: view past its storage");
        // SAFETY: `at` is within (or one past) the slice, checked above; the callers' extents
        // were checked against the storages (check_extent in the op's mod.rs).
        unsafe { self.data.as_ptr().add(at) }
    }
}

/// `[B, H, L, D]`
#[derive(Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub l: usize,
    pub d: usize,
}

/// `dst = beta * lhs @ rhs (+ dst when accumulate)`: an m x n product over k, every operand given
/// by a pointer and its (column, row) strides, on the calling thread.
#[allow(clippy::too_many_arguments)]
fn product(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    assert!(
        m == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "attention: product past its output"
    );
    // SAFETY: dst is an exclusive slice holding the m x n result (asserted above); lhs and rhs
    // point into storages whose views cover every element read (checked by check_extent before
    // the op reaches the CPU twin, and the scratch tiles are sized for their products).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0,
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0,
            rhs.1 as isize,
            rhs.2 as isize,
            1.0, // the crate computes dst = alpha * dst + beta * lhs @ rhs
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// `row[j] = exp(row[j] - shift)`, returning the sum of the new values (f32 in 8 lanes).
fn exp_shifted(row: &mut [f32], shift: f32) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        for (x, acc) in c.iter_mut().zip(&mut lanes) {
            *x = exp_f32(*x - shift);
            *acc += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_f32(*x - shift);
        sum += *x;
    }
    sum
}

/// The largest element (8 lanes, so that it vectorizes).
fn row_max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (&x, m) in c.iter().zip(&mut lanes) {
            *m = m.max(x);
        }
    }
    rest.iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}

/// Runs `job` on every item, the items split over threads in contiguous runs; each thread gets a
/// scratch vector of `scratch` floats.
fn run_jobs<J: Send>(jobs: Vec<J>, scratch: usize, job: impl Fn(J, &mut Vec<f32>) + Sync) {
    let threads = threads().min(jobs.len()).max(1);
    let per = jobs.len().div_ceil(threads).max(1);
    let mut groups: Vec<Vec<J>> = Vec::new();
    let mut jobs = jobs.into_iter().peekable();
    while jobs.peek().is_some() {
        groups.push(jobs.by_ref().take(per).collect());
    }
    if groups.len() <= 1 {
        let mut s = vec![0f32; scratch];
        groups.into_iter().flatten().for_each(|j| job(j, &mut s));
        return;
    }
    std::thread::scope(|sc| {
        for group in groups {
            let job = &job;
            sc.spawn(move || {
                let mut s = vec![0f32; scratch];
                group.into_iter().for_each(|j| job(j, &mut s));
            });
        }
    });
}

/// The output, dense `[B, H, L, D]`, and the log-sum-exp of every query row, `[B, H, L]`.
pub fn forward(
    q: HeadView,
    k: HeadView,
    v: HeadView,
    dims: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { b: nb, h: nh, l, d } = dims;
    let mut out = vec![0f32; nb * nh * l * d];
    let mut lse = vec![0f32; nb * nh * l];
    // (head index, first query, output rows, their lse)
    let jobs: Vec<(usize, usize, &mut [f32], &mut [f32])> = out
        .chunks_mut(l * d)
        .zip(lse.chunks_mut(l))
        .enumerate()
        .flat_map(|(bh, (o, s))| {
            o.chunks_mut(TILE * d)
                .zip(s.chunks_mut(TILE))
                .enumerate()
                .map(move |(t, (o, s))| (bh, t * TILE, o, s))
        })
        .collect();
    run_jobs(jobs, TILE * l, |(bh, q0, o, row_lse), s| {
        let (b, h) = (bh / nh, bh % nh);
        let rows = row_lse.len();
        let s = &mut s[..rows * l];
        // S = scale Q_t K^T: K^T's element (j, c) is K[c, j]
        product(
            (rows, l, d),
            s,
            l,
            false,
            (q.ptr(b, h, q0), 1, q.strides[2]),
            (k.ptr(b, h, 0), k.strides[2], 1),
            scale,
        );
        for (row, lse) in s.chunks_mut(l).zip(row_lse.iter_mut()) {
            let m = row_max(row);
            let sum = exp_shifted(row, m);
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
            *lse = m + sum.ln();
        }
        product(
            (rows, d, l),
            o,
            d,
            false,
            (s.as_ptr(), 1, l),
            (v.ptr(b, h, 0), 1, v.strides[2]),
            1.0,
        );
    });
    (out, lse)
}

/// The gradients of q, k and v, each dense `[B, H, L, D]`, from the forward's inputs, its output
/// `o`, its log-sum-exp (dense `[B, H, L]`) and the output's gradient `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: HeadView,
    k: HeadView,
    v: HeadView,
    o: HeadView,
    lse: &[f32],
    g: HeadView,
    dims: Dims,
    scale: f32,
) -> [Vec<f32>; 3] {
    let Dims { b: nb, h: nh, l, d } = dims;
    let n = nb * nh * l * d;
    let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    let jobs: Vec<_> = dq
        .chunks_mut(l * d)
        .zip(dk.chunks_mut(l * d))
        .zip(dv.chunks_mut(l * d))
        .enumerate()
        .map(|(bh, ((dq, dk), dv))| (bh, dq, dk, dv))
        .collect();
    // scratch: P and dS tiles, and Dv of the head
    run_jobs(jobs, 2 * TILE * l + l, |(bh, dq, dk, dv), scratch| {
        let (b, h) = (bh / nh, bh % nh);
        let (p, rest) = scratch.split_at_mut(TILE * l);
        let (ds, dvec) = rest.split_at_mut(TILE * l);
        let lse = &lse[bh * l..(bh + 1) * l];
        for (i, dot) in dvec.iter_mut().enumerate() {
            let (oi, gi) = (o.row(b, h, i), g.row(b, h, i));
            let (orow, grow) = (&o.data[oi..oi + d], &g.data[gi..gi + d]);
            *dot = orow
                .iter()
                .zip(grow)
                .map(|(&a, &c)| a as f64 * c as f64)
                .sum::<f64>() as f32;
        }
        for q0 in (0..l).step_by(TILE) {
            let rows = TILE.min(l - q0);
            let (p, ds) = (&mut p[..rows * l], &mut ds[..rows * l]);
            product(
                (rows, l, d),
                p,
                l,
                false,
                (q.ptr(b, h, q0), 1, q.strides[2]),
                (k.ptr(b, h, 0), k.strides[2], 1),
                scale,
            );
            for (row, &m) in p.chunks_mut(l).zip(&lse[q0..q0 + rows]) {
                exp_shifted(row, m);
            }
            // dV += P^T dO_t
            product(
                (l, d, rows),
                dv,
                d,
                true,
                (p.as_ptr(), l, 1),
                (g.ptr(b, h, q0), 1, g.strides[2]),
                1.0,
            );
            // dP = dO_t V^T, then dS = P (dP - Dv) in place
            product(
                (rows, l, d),
                ds,
                l,
                false,
                (g.ptr(b, h, q0), 1, g.strides[2]),
                (v.ptr(b, h, 0), v.strides[2], 1),
                1.0,
            );
            for ((drow, prow), &dot) in ds.chunks_mut(l).zip(p.chunks(l)).zip(&dvec[q0..q0 + rows])
            {
                drow.iter_mut()
                    .zip(prow)
                    .for_each(|(x, &pv)| *x = pv * (*x - dot));
            }
            // dQ_t = scale dS K
            product(
                (rows, d, l),
                &mut dq[q0 * d..(q0 + rows) * d],
                d,
                false,
                (ds.as_ptr(), 1, l),
                (k.ptr(b, h, 0), 1, k.strides[2]),
                scale,
            );
            // dK += scale dS^T Q_t
            product(
                (l, d, rows),
                dk,
                d,
                true,
                (ds.as_ptr(), l, 1),
                (q.ptr(b, h, q0), 1, q.strides[2]),
                scale,
            );
        }
    });
    [dq, dk, dv]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_helpers_cover_the_remainder() {
        let mut row: Vec<f32> = (0..21).map(|i| -(i as f32) * 0.25).collect();
        row[19] = 3.0;
        assert_eq!(row_max(&row), 3.0);
        let want: f64 = row.iter().map(|&x| (x as f64 - 3.0).exp()).sum();
        let sum = exp_shifted(&mut row, 3.0);
        assert!((sum as f64 - want).abs() < 1e-6 * want, "{sum} vs {want}");
        assert_eq!(row[19], 1.0);
    }
}
