#!/usr/bin/env python3
"""Fits the coefficients of `erf_f32` in src/ops/elementwise/cpu.rs, an erf for f32 that the
compiler vectorises (no table, no branch), and prints its worst error in f32 ulps against
mpmath's erf. Run by hand (needs numpy and mpmath); the build never runs it.

    |x| <= 0.921875:  erf(x) = x + x * R(x^2)          R(s) = erf(sqrt s)/sqrt s - 1, degree 6
    |x| >  0.921875:  erf(x) = sign(x) (1 - exp(-F(t)))  F(t) = -ln erfc(t), t = min(|x|, 4), degree 9

Above 4, 1 - erf < 1.6e-8 is under half an ulp of 1, so erf rounds to +-1. Each coefficient is
rounded to f32 in turn and the higher ones refitted against what the rounded ones leave
(weighted least squares, reweighted towards minimax), so the rounding is compensated.
"""
import mpmath as mp
import numpy as np

mp.mp.dps = 40
SPLIT = 0.921875


def fit_rounded(var, target, weight, degree):
    fixed = []
    for k in range(degree + 1):
        rest = target - sum(c * var**i for i, c in enumerate(fixed))
        basis = np.stack([var**i for i in range(k, degree + 1)], 1)
        w = weight.copy()
        for _ in range(20):
            c, *_ = np.linalg.lstsq(basis * w[:, None], rest * w, rcond=None)
            e = np.abs(basis @ c - rest)
            w = w * (e / e.max() + 1e-3) ** 0.5
            w /= w.max()
        fixed.append(float(np.float32(c[0])))
    return np.array(fixed, dtype=np.float32)


def horner(c, v):
    r = np.full_like(v, c[-1])
    for k in range(len(c) - 2, -1, -1):
        r = (r * v + c[k]).astype(np.float32)
    return r


def erf_f32(x, r, f):
    t = np.abs(x)
    small = (x + x * horner(r, (x * x).astype(np.float32))).astype(np.float32)
    big = (np.float32(1) - np.exp(-horner(f, np.minimum(t, np.float32(4))))).astype(np.float32)
    return np.where(t <= SPLIT, small, np.copysign(big, x)).astype(np.float32)


def main():
    x1 = np.linspace(1e-6, SPLIT, 4000)
    erf1 = np.array([float(mp.erf(mp.mpf(x))) for x in x1])
    r = fit_rounded(x1**2, erf1 / x1 - 1, 1 / erf1 * x1, 6)
    x2 = np.linspace(SPLIT, 4.0, 6000)
    f_target = np.array([float(-mp.log(mp.erfc(mp.mpf(x)))) for x in x2])
    erfc2 = np.exp(-f_target)
    f = fit_rounded(x2, f_target, erfc2 / erfc2.max(), 9)
    print("const ERF_SMALL: [f32; 7] =", [float(v) for v in r])
    print("const ERF_TAIL: [f32; 10] =", [float(v) for v in f])
    xs = np.concatenate([
        np.linspace(-4.5, 4.5, 400_001).astype(np.float32),
        np.float32(10.0) ** np.linspace(-30, 0, 2000).astype(np.float32),
    ])
    got = erf_f32(xs, r, f).astype(np.float64)
    want = np.array([float(mp.erf(mp.mpf(float(v)))) for v in xs])
    ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
    err = np.abs(got - want) / ulp
    print(f"worst error {err.max():.3f} ulp at x = {xs[err.argmax()]}")


if __name__ == "__main__":
    main()
