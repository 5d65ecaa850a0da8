//! The left singular vectors of a 2 x n matrix exactly as `np.linalg.svd(a,
//! full_matrices=False)` returns them, signs included: EigenPlaces takes its focal direction
//! from row 1 of that U, so a sign flip or a column swap moves the focal point to the other side
//! of the street. numpy calls LAPACK's dgesdd (OpenBLAS's build of reference LAPACK); for two
//! rows it takes one of two paths:
//!
//! - n = 2 (path 5s): bidiagonalise A directly (dgebd2), SVD of the 2 x 2 bidiagonal
//!   (dbdsdc -> dlasdq -> dbdsqr -> dlasv2), U = Q_bidiag * U_bidiag (dormbr);
//! - n >= 3 (path 3t): A = L * Q (dgelq2), then the same on the 2 x 2 lower triangle L.
//!
//! The Householder reflectors (dlarfg: beta = -sign(alpha) * norm, tau = (beta - alpha) / beta)
//! and the 2 x 2 SVD's rotations fix the signs. Where a quantity cancels to rounding noise
//! (exactly collinear positions, constant rows) whether the noise is exactly 0 decides a sign,
//! so the arithmetic follows OpenBLAS's x86-64 kernels as numpy's wheels run them: the level-2
//! updates (dgemv, dger via daxpy) fuse multiply-adds, dnrm2 sums squares in x87 extended
//! precision (modelled here by a double-double sum), LAPACK's own Fortran does not fuse. The
//! scaling dgesdd and dlarfg apply to matrices near the underflow threshold is left out: metre
//! offsets are far from it.

/// Fortran's SIGN(a, b): |a| with the sign of b (negative zero counts as negative).
fn sign(a: f64, b: f64) -> f64 {
    a.abs().copysign(b)
}

/// LAPACK's dlapy2: sqrt(x^2 + y^2) without overflow.
fn lapy2(x: f64, y: f64) -> f64 {
    let (x, y) = (x.abs(), y.abs());
    let (w, z) = (x.max(y), x.min(y));
    if z == 0.0 {
        w
    } else {
        w * (1.0 + (z / w) * (z / w)).sqrt()
    }
}

/// dnrm2 as OpenBLAS's x87 kernel computes it: squares summed with more precision than f64
/// (here a double-double sum), one rounding at the square root.
fn nrm2(values: &[f64]) -> f64 {
    let (mut hi, mut lo) = (0.0f64, 0.0f64);
    for &x in values {
        let square = x * x;
        let square_error = x.mul_add(x, -square);
        let sum = hi + square;
        let sum_error = if hi.abs() >= square.abs() {
            (hi - sum) + square
        } else {
            (square - sum) + hi
        };
        hi = sum;
        lo += sum_error + square_error;
    }
    let sum = hi + lo;
    lo -= sum - hi;
    hi = sum;
    if hi == 0.0 {
        return 0.0;
    }
    let root = hi.sqrt();
    root + (root.mul_add(-root, hi) + lo) / (2.0 * root)
}

/// dlarfg: the reflector H = I - tau [1 v][1 v]^T with H [alpha x] = [beta 0]. Scales `x` into
/// v in place and returns (beta, tau); tau = 0 (H = I, beta = alpha) when x is zero.
fn householder(alpha: f64, x: &mut [f64]) -> (f64, f64) {
    if x.is_empty() {
        return (alpha, 0.0);
    }
    let norm = nrm2(x);
    if norm == 0.0 {
        return (alpha, 0.0);
    }
    let beta = -sign(lapy2(alpha, norm), alpha);
    let tau = (beta - alpha) / beta;
    let scale = 1.0 / (alpha - beta);
    for v in x.iter_mut() {
        *v *= scale;
    }
    (beta, tau)
}

/// dlasv2 on the upper triangular [[f, g], [0, h]]: the singular values' magnitudes (larger
/// first) and the left rotation (cos, sin). Their signs, which dlasv2 also returns, only reach
/// VT (dbdsqr flips its rows to make the values positive), so they are left out.
fn svd_2x2(f: f64, g: f64, h: f64) -> ([f64; 2], (f64, f64)) {
    let eps = f64::EPSILON / 2.0;
    let (mut ft, mut fa, mut ht, mut ha) = (f, f.abs(), h, h.abs());
    let swap = ha > fa;
    if swap {
        std::mem::swap(&mut ft, &mut ht);
        std::mem::swap(&mut fa, &mut ha);
    }
    let (gt, ga) = (g, g.abs());
    let (values, clt, slt, crt, srt);
    if ga == 0.0 {
        (values, clt, slt, crt, srt) = ([fa, ha], 1.0, 0.0, 1.0, 0.0);
    } else if ga > fa && fa / ga < eps {
        // g dominates: the values are |g| and |f h / g|
        let small = if ha > 1.0 {
            fa / (ga / ha)
        } else {
            (fa / ga) * ha
        };
        (values, clt, slt, crt, srt) = ([ga, small], 1.0, ht / gt, ft / gt, 1.0);
    } else {
        let d = fa - ha;
        let l = if d == fa { 1.0 } else { d / fa };
        let m = gt / ft;
        let t = 2.0 - l;
        let mm = m * m;
        let s = (t * t + mm).sqrt();
        let r = if l == 0.0 {
            m.abs()
        } else {
            (l * l + mm).sqrt()
        };
        let a = 0.5 * (s + r);
        let t = if mm == 0.0 {
            if l == 0.0 {
                sign(2.0, ft) * sign(1.0, gt)
            } else {
                gt / sign(d, ft) + m / t
            }
        } else {
            (m / (s + t) + m / (r + l)) * (1.0 + a)
        };
        let l = (t * t + 4.0).sqrt();
        values = [fa * a, ha / a];
        crt = 2.0 / l;
        srt = t / l;
        clt = (crt + srt * m) / a;
        slt = (ht / ft) * srt / a;
    }
    (values, if swap { (srt, crt) } else { (clt, slt) })
}

/// U (row-major, `u[row][column]`) of the upper bidiagonal [[d1, e1], [0, d2]] as dbdsdc
/// returns it for n = 2: dbdsqr's test for a negligible e1, the dlasv2 rotation applied to the
/// identity, then the three sorts of dbdsqr (decreasing), dlasdq (increasing) and dbdsdc
/// (decreasing), each swapping U's columns with the singular values.
fn bidiagonal_u(d1: f64, e1: f64, d2: f64) -> [[f64; 2]; 2] {
    let eps = f64::EPSILON / 2.0;
    let tol = eps.powf(-0.125).clamp(10.0, 100.0) * eps;
    let mut smin = d1.abs();
    if smin != 0.0 {
        smin = smin.min(d2.abs() * (smin / (smin + e1.abs())));
    }
    smin /= 2f64.sqrt();
    let threshold = (tol * smin).max(6.0 * (2.0 * (2.0 * f64::MIN_POSITIVE)));
    let mut u = [[1.0, 0.0], [0.0, 1.0]];
    let mut d = [d1.abs(), d2.abs()];
    if e1.abs() > threshold {
        let (values, (cos, sin)) = svd_2x2(d1, e1, d2);
        d = values;
        for row in u.iter_mut() {
            let [x, y] = *row;
            *row = [cos * x + sin * y, cos * y - sin * x];
        }
    }
    let mut swap_if = |swap: bool, d: &mut [f64; 2]| {
        if swap {
            d.swap(0, 1);
            for row in u.iter_mut() {
                row.swap(0, 1);
            }
        }
    };
    swap_if(d[1] > d[0], &mut d);
    swap_if(d[1] < d[0], &mut d);
    swap_if(d[1] > d[0], &mut d);
    u
}

/// dgebd2 on the 2 x 2 [[a11, a12], [a21, a22]]: the first column's reflector (tau, v2) and the
/// bidiagonal (d1, e1, d2). The second column is updated as dlarf does (skipped when zero),
/// with OpenBLAS's fused dger.
fn bidiagonalize(a11: f64, a21: f64, a12: f64, a22: f64) -> ((f64, f64), (f64, f64, f64)) {
    let mut v = [a21];
    let (d1, tau) = householder(a11, &mut v);
    let v2 = v[0];
    let (mut e1, mut d2) = (a12, a22);
    if tau != 0.0 && (a12 != 0.0 || a22 != 0.0) {
        let scaled = -tau * (a12 + a22 * v2);
        e1 = a12 + scaled;
        d2 = scaled.mul_add(v2, a22);
    }
    ((tau, v2), (d1, e1, d2))
}

/// U := (I - tau [1 v2][1 v2]^T) U, column by column as dormbr -> dorm2r -> dlarf does.
fn reflect(tau: f64, v2: f64, u: &mut [[f64; 2]; 2]) {
    if tau == 0.0 {
        return;
    }
    let [top, bottom] = u;
    for (c1, c2) in top.iter_mut().zip(bottom.iter_mut()) {
        let scaled = -tau * (*c1 + *c2 * v2);
        *c1 += scaled;
        *c2 = scaled.mul_add(v2, *c2);
    }
}

/// U of `np.linalg.svd(a, full_matrices=False)` for the 2 x n matrix with rows `rows` (n >= 2),
/// row-major: `u[i][j]` is numpy's `U[i, j]`.
pub(crate) fn left_singular_vectors(rows: [&[f64]; 2]) -> [[f64; 2]; 2] {
    let n = rows[0].len();
    assert!(n >= 2 && rows[1].len() == n, "2 x n with n >= 2");
    let ((tau, v2), (d1, e1, d2)) = if n == 2 {
        bidiagonalize(rows[0][0], rows[1][0], rows[0][1], rows[1][1])
    } else {
        // dgelq2: the first row's reflector, applied to the second row from the right
        let mut first = rows[0].to_vec();
        let mut second = rows[1].to_vec();
        let (l11, tau1) = householder(first[0], &mut first[1..]);
        first[0] = 1.0;
        if tau1 != 0.0 {
            let mut last = n;
            while last > 0 && first[last - 1] == 0.0 {
                last -= 1;
            }
            if second[..last].iter().any(|&x| x != 0.0) {
                // dgemv (one row: a fused dot product in order), then dger (daxpy per column)
                let dot = (0..last).fold(0.0, |acc: f64, j| second[j].mul_add(first[j], acc));
                for j in 0..last {
                    second[j] = (-tau1 * first[j]).mul_add(dot, second[j]);
                }
            }
        }
        let l21 = second[0];
        let (l22, _) = householder(second[1], &mut second[2..]);
        bidiagonalize(l11, l21, 0.0, l22)
    };
    let mut u = bidiagonal_u(d1, e1, d2);
    reflect(tau, v2, &mut u);
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    fn orthonormal(u: [[f64; 2]; 2]) -> bool {
        let dot = |a: [f64; 2], b: [f64; 2]| a[0] * b[0] + a[1] * b[1];
        let (c0, c1) = ([u[0][0], u[1][0]], [u[0][1], u[1][1]]);
        (dot(c0, c0) - 1.0).abs() < 1e-14
            && (dot(c1, c1) - 1.0).abs() < 1e-14
            && dot(c0, c1).abs() < 1e-14
    }

    #[test]
    fn the_first_column_is_the_principal_axis() {
        // points along (3, 4) / 5 with a little spread across
        let east = [-3.0, -1.5, 0.1, 1.5, 2.9];
        let north = [-4.0, -2.0, 0.0, 2.1, 3.9];
        let u = left_singular_vectors([&east, &north]);
        assert!(orthonormal(u));
        assert!((u[0][0].abs() - 0.6).abs() < 1e-2 && (u[1][0].abs() - 0.8).abs() < 1e-2);
        // numpy: U[:, 0] = (-0.6005..., -0.7995...), the reflectors' signs
        assert!(u[0][0] < 0.0 && u[1][0] < 0.0, "{u:?}");
    }

    #[test]
    fn a_zero_matrix_gives_the_identity() {
        assert_eq!(
            left_singular_vectors([&[0.0; 4], &[0.0; 4]]),
            [[1.0, 0.0], [0.0, 1.0]]
        );
    }

    #[test]
    fn the_norm_is_correctly_rounded_on_hard_cases() {
        assert_eq!(nrm2(&[3.0, 4.0]), 5.0);
        assert_eq!(nrm2(&[1e-3; 100]), 1e-2);
        assert_eq!(nrm2(&[]), 0.0);
    }
}
