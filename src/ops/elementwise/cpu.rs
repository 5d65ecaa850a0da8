//! CPU twins of kernels/elementwise.cu: the same f32 formulas, rounded to the storage type to
//! nearest even (the `half` crate rounds that way), split over threads for large tensors.

use super::{BinaryOp, UnaryOp};
use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::layout::{coalesce, Layout};
use crate::ops::cpu::{
    exp_f32, filled_vec, parallel_fill, simd_level, vectorized_at, walk, walk_runs, Simd,
};
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};
use std::mem::MaybeUninit;

// The same formulas as the kernels' (see the comments there).
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || a > b {
        a
    } else {
        b
    }
}
fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || a < b {
        a
    } else {
        b
    }
}
fn relu(x: f32) -> f32 {
    if x > 0.0 || x.is_nan() {
        x
    } else {
        0.0
    }
}

/// erf in f32 within 1.6 ulp, branch-free so that loops over it vectorize (as CUDA's `erff`,
/// which the kernels call, is within 2 ulp). Coefficients from tools/fit/erf_f32.py:
/// `x + x R(x²)` for |x| <= 0.921875, `±(1 - e^(-F(|x|)))` above, with F(t) = -ln erfc(t)
/// fitted up to t = 4, where erf rounds to ±1.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    const SMALL: [f32; 7] = [
        0.12837917,
        -0.3761263,
        0.11283624,
        -0.026855579,
        0.005191889,
        -8.0426957e-04,
        7.9626545e-05,
    ];
    const TAIL: [f32; 10] = [
        -3.3421497e-04,
        1.1303122,
        0.6316441,
        0.11031041,
        -0.02659876,
        0.0048466665,
        -6.240762e-04,
        5.1343686e-05,
        -2.2146437e-06,
        2.7189074e-08,
    ];
    let horner = |c: &[f32], v: f32| c.iter().rev().fold(0.0, |r, &k| r * v + k);
    let t = x.abs();
    let small = x + x * horner(&SMALL, x * x);
    let tail = (1.0 - exp_f32(-horner(&TAIL, t.min(4.0)))).copysign(x);
    if t <= 0.921_875 || x.is_nan() {
        small
    } else {
        tail
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn unary(s: &CpuStorage, layout: &Layout, op: UnaryOp) -> Result<CpuStorage> {
    with_cpu_float_storage!(s, v, T => Ok(T::into_storage(unary_typed(simd_level(), v, layout, op))),
        _ => dtype_err!("{} needs a float tensor (f32, f16 or bf16), got {}", op.name(), s.dtype()))
}

/// One monomorphised loop per op, so the op is not matched per element.
fn unary_typed<T: Element>(level: Simd, v: &[T], l: &Layout, op: UnaryOp) -> Vec<T> {
    match op {
        UnaryOp::Neg => map1(level, v, l, |x| -x),
        UnaryOp::Exp => map1(level, v, l, f32::exp),
        UnaryOp::Log => map1(level, v, l, f32::ln),
        UnaryOp::Sqrt => map1(level, v, l, f32::sqrt),
        UnaryOp::Rsqrt => map1(level, v, l, |x| 1.0 / x.sqrt()),
        UnaryOp::Relu => map1(level, v, l, relu),
        // closures rather than fn items, so that the loops inline them and vectorize; forced,
        // as each loop is compiled once per vector instruction set and erf is too large for
        // the inliner to copy into all of them by itself
        UnaryOp::Gelu => map1(
            level,
            v,
            l,
            #[inline(always)]
            |x| 0.5 * x * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2)),
        ),
        UnaryOp::Sigmoid => map1(level, v, l, sigmoid),
        UnaryOp::Abs => map1(level, v, l, f32::abs),
        UnaryOp::Powf(p) => map1(level, v, l, move |x| x.powf(p)),
        UnaryOp::Clamp(lo, hi) => map1(level, v, l, move |x| nan_min(nan_max(x, lo), hi)),
        UnaryOp::Affine(mul, add) => map1(level, v, l, move |x| x * mul + add),
    }
}

/// `a` and `b` are views with the output's shape (broadcast dimensions have stride 0).
pub fn binary(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    op: BinaryOp,
) -> Result<CpuStorage> {
    with_cpu_float_storage!(a, x, T => {
        let Some(y) = T::slice(b) else {
            return dtype_err!("{}: operands have different dtypes {} and {}", op.name(), a.dtype(), b.dtype());
        };
        Ok(T::into_storage(binary_typed(simd_level(), x, la, y, lb, op)))
    }, _ => dtype_err!("{} needs float tensors (f32, f16 or bf16), got {}", op.name(), a.dtype()))
}

fn binary_typed<T: Element>(
    level: Simd,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    op: BinaryOp,
) -> Vec<T> {
    match op {
        BinaryOp::Add => map2(level, a, la, b, lb, |x, y| x + y),
        BinaryOp::Sub => map2(level, a, la, b, lb, |x, y| x - y),
        BinaryOp::Mul => map2(level, a, la, b, lb, |x, y| x * y),
        BinaryOp::Div => map2(level, a, la, b, lb, |x, y| x / y),
        BinaryOp::Maximum => map2(level, a, la, b, lb, nan_max),
        BinaryOp::Minimum => map2(level, a, la, b, lb, nan_min),
        BinaryOp::Pow => map2(level, a, la, b, lb, f32::powf),
    }
}

fn map1<T: Element>(level: Simd, v: &[T], l: &Layout, f: impl Fn(f32) -> f32 + Sync) -> Vec<T> {
    let (shape, strides) = coalesce(l.shape(), [l.strides()]);
    let inner = strides[0].last().copied().unwrap_or(1);
    filled_vec(l.numel(), |start, chunk| {
        vectorized_at(
            level,
            #[inline(always)]
            || {
                walk_runs(
                    &shape,
                    &strides,
                    [l.offset()],
                    start,
                    chunk.len(),
                    #[inline(always)]
                    |k, run, [i]| {
                        let out = &mut chunk[k..k + run];
                        match inner {
                            1 => unary_run(out, &v[i..i + run], &f),
                            s => unary_run(out, (0..run).map(|e| &v[i + e * s]), &f),
                        }
                    },
                );
            },
        )
    })
}

/// One run of `map1`: `out[k] = f(x[k])`.
#[inline(always)]
fn unary_run<'a, T: Element>(
    out: &mut [MaybeUninit<T>],
    x: impl IntoIterator<Item = &'a T>,
    f: &impl Fn(f32) -> f32,
) {
    for (o, x) in out.iter_mut().zip(x) {
        o.write(T::from_f32(f(x.to_f32())));
    }
}

/// `f(a, b)` over the output's shape, `a` and `b` views with that shape. Runs along the innermost
/// (coalesced) dimension where each operand is dense (stride 1) or constant (stride 0, as a
/// broadcast bias or scalar) are plain slice loops that vectorise; other strides go element by
/// element. The same `f` on the same values either way, so results do not depend on the path.
fn map2<T: Element>(
    level: Simd,
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Vec<T> {
    let (shape, strides) = coalesce(la.shape(), [la.strides(), lb.strides()]);
    let inner = strides.each_ref().map(|s| s.last().copied().unwrap_or(1));
    filled_vec(la.numel(), |start, chunk| {
        vectorized_at(
            level,
            #[inline(always)]
            || {
                let base = [la.offset(), lb.offset()];
                walk_runs(
                    &shape,
                    &strides,
                    base,
                    start,
                    chunk.len(),
                    #[inline(always)]
                    |k, run, [i, j]| {
                        let out = &mut chunk[k..k + run];
                        match inner {
                            [1, 1] => binary_run(out, &a[i..i + run], &b[j..j + run], &f),
                            [1, 0] => binary_run(out, &a[i..i + run], std::iter::repeat(&b[j]), &f),
                            [0, 1] => binary_run(out, std::iter::repeat(&a[i]), &b[j..j + run], &f),
                            [sa, sb] => {
                                let a = (0..run).map(|e| &a[i + e * sa]);
                                binary_run(out, a, (0..run).map(|e| &b[j + e * sb]), &f)
                            }
                        }
                    },
                );
            },
        )
    })
}

/// One run of `map2`: `out[k] = f(a[k], b[k])`.
#[inline(always)]
fn binary_run<'a, T: Element>(
    out: &mut [MaybeUninit<T>],
    a: impl IntoIterator<Item = &'a T>,
    b: impl IntoIterator<Item = &'a T>,
    f: &impl Fn(f32, f32) -> f32,
) {
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        o.write(T::from_f32(f(x.to_f32(), y.to_f32())));
    }
}

/// Twin of the `<op>_backward_<dtype>` kernels: `dx = dy * op'(x)` over dense `x` and `dy` of `n`
/// elements, for the ops with a fused backward ([`UnaryOp::fused_backward`]).
pub fn unary_backward(
    x: &CpuStorage,
    dy: &CpuStorage,
    n: usize,
    op: UnaryOp,
) -> Result<CpuStorage> {
    with_cpu_float_storage!(x, xv, T => {
        let Some(g) = T::slice(dy) else {
            return dtype_err!("{} backward: input is {} but the gradient is {}", op.name(), x.dtype(), dy.dtype());
        };
        Ok(T::into_storage(unary_backward_typed(simd_level(), &xv[..n], &g[..n], op)?))
    }, _ => dtype_err!("{} backward needs a float tensor (f32, f16 or bf16), got {}", op.name(), x.dtype()))
}

fn unary_backward_typed<T: Element>(level: Simd, x: &[T], g: &[T], op: UnaryOp) -> Result<Vec<T>> {
    let l = Layout::contiguous(&[x.len()])?;
    Ok(match op {
        UnaryOp::Sqrt => map2(level, x, &l, g, &l, |x, dy| dy / (2.0 * x.sqrt())),
        UnaryOp::Rsqrt => map2(level, x, &l, g, &l, |x, dy| {
            let r = 1.0 / x.sqrt();
            -0.5 * dy * r * r * r
        }),
        UnaryOp::Relu => map2(level, x, &l, g, &l, |x, dy| if x <= 0.0 { 0.0 } else { dy }),
        // d/dx x Φ(x) = Φ(x) + x φ(x), times dy
        UnaryOp::Gelu => map2(
            level,
            x,
            &l,
            g,
            &l,
            #[inline(always)]
            |x, dy| {
                const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
                let cdf = 0.5 * (1.0 + erf_f32(x * std::f32::consts::FRAC_1_SQRT_2));
                dy * (cdf + x * FRAC_1_SQRT_2PI * exp_f32(-0.5 * x * x))
            },
        ),
        UnaryOp::Sigmoid => map2(level, x, &l, g, &l, |x, dy| {
            let s = sigmoid(x);
            dy * s * (1.0 - s)
        }),
        UnaryOp::Abs => map2(level, x, &l, g, &l, |x, dy| {
            if x > 0.0 {
                dy
            } else if x < 0.0 {
                -dy
            } else {
                0.0
            }
        }),
        UnaryOp::Powf(p) => map2(level, x, &l, g, &l, move |x, dy| {
            if p == 0.0 {
                0.0
            } else {
                dy * p * x.powf(p - 1.0)
            }
        }),
        UnaryOp::Clamp(lo, hi) => {
            map2(
                level,
                x,
                &l,
                g,
                &l,
                move |x, dy| if x > lo && x < hi { dy } else { 0.0 },
            )
        }
        UnaryOp::Neg | UnaryOp::Exp | UnaryOp::Log | UnaryOp::Affine(..) => {
            return Err(crate::error::Error::Argument(format!(
                "{} has no fused backward kernel",
                op.name()
            )))
        }
    })
}

/// The gradients of a and b (views with the output's shape) given the dense output gradient `dy`,
/// both dense over the output's shape: twin of the `<op>_backward_<dtype>` kernels of maximum,
/// minimum and pow.
pub fn binary_backward(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    dy: &CpuStorage,
    op: BinaryOp,
) -> Result<(CpuStorage, CpuStorage)> {
    let grad: fn(f32, f32, f32) -> (f32, f32) = match op {
        BinaryOp::Maximum => |a, b, dy| {
            let g = if a == b { 0.5 * dy } else { dy };
            (if a < b { 0.0 } else { g }, if a > b { 0.0 } else { g })
        },
        BinaryOp::Minimum => |a, b, dy| {
            let g = if a == b { 0.5 * dy } else { dy };
            (if a > b { 0.0 } else { g }, if a < b { 0.0 } else { g })
        },
        BinaryOp::Pow => |a, b, dy| {
            let da = if b == 0.0 {
                0.0
            } else {
                dy * b * a.powf(b - 1.0)
            };
            let db = if a == 0.0 && b >= 0.0 {
                0.0
            } else {
                dy * a.powf(b) * a.ln()
            };
            (da, db)
        },
        _ => {
            return Err(crate::error::Error::Argument(format!(
                "{} has no fused backward kernel",
                op.name()
            )))
        }
    };
    let l = Layout::contiguous(la.shape())?;
    with_cpu_float_storage!(a, x, T => {
        let (Some(y), Some(g)) = (T::slice(b), T::slice(dy)) else {
            return dtype_err!("{} backward: operands {} and {}, gradient {}", op.name(), a.dtype(), b.dtype(), dy.dtype());
        };
        // two passes (one per output) keep to map3's single-output shape; this is the reference path
        let da = map3(x, la, y, lb, g, &l, move |a, b, dy| grad(a, b, dy).0);
        let db = map3(x, la, y, lb, g, &l, move |a, b, dy| grad(a, b, dy).1);
        Ok((T::into_storage(da), T::into_storage(db)))
    }, _ => dtype_err!("{} backward needs float tensors (f32, f16 or bf16), got {}", op.name(), a.dtype()))
}

/// Twin of `select_backward_<dtype>`: `g` and the i64 `idx` dense over `[outer, inner]`, the result
/// dense over `[outer, n, inner]` with `g[o, j]` at `k = idx[o, j]` and 0 elsewhere.
pub fn select_backward(
    idx: &CpuStorage,
    g: &CpuStorage,
    outer: usize,
    n: usize,
    inner: usize,
) -> Result<CpuStorage> {
    let Some(idx) = i64::slice(idx) else {
        return dtype_err!("select backward needs i64 indices, got {}", idx.dtype());
    };
    with_cpu_float_storage!(g, gv, T => {
        let mut out = vec![T::from_f32(0.0); outer * n * inner];
        parallel_fill(&mut out, |start, chunk| {
            for (k, o) in chunk.iter_mut().enumerate() {
                let i = start + k;
                let (j, t) = (i % inner, i / inner);
                let slice = (t / n) * inner + j;
                if idx[slice] == (t % n) as i64 {
                    *o = gv[slice];
                }
            }
        });
        Ok(T::into_storage(out))
    }, _ => dtype_err!("select backward needs a float gradient (f32, f16 or bf16), got {}", g.dtype()))
}

/// `map2` with a third operand, for the backward twins: all views have the output's shape.
fn map3<T: Element>(
    a: &[T],
    la: &Layout,
    b: &[T],
    lb: &Layout,
    c: &[T],
    lc: &Layout,
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Vec<T> {
    let mut out = vec![T::from_f32(0.0); la.numel()];
    if out.is_empty() {
        return out;
    }
    let (shape, strides) = coalesce(la.shape(), [la.strides(), lb.strides(), lc.strides()]);
    parallel_fill(&mut out, |start, chunk| {
        walk(
            &shape,
            &strides,
            [la.offset(), lb.offset(), lc.offset()],
            start,
            chunk.len(),
            |k, [i, j, m]| {
                chunk[k] = T::from_f32(f(a[i].to_f32(), b[j].to_f32(), c[m].to_f32()));
            },
        );
    });
    out
}

#[cfg(test)]
mod tests {
    use super::{binary_typed, erf_f32, unary_backward_typed, unary_typed, BinaryOp, UnaryOp};
    use crate::dtype::Element;
    use crate::layout::{coalesce, Layout};
    use crate::ops::cpu::{supported_levels, walk};
    use crate::ops::elementwise::erf;
    use crate::tensor::Rng;
    use half::f16;

    /// `len` normal values with special ones (±0, ±inf, NaN, tiny) sprinkled in.
    fn data<T: Element>(rng: &mut Rng, len: usize) -> Vec<T> {
        const SPECIAL: [f32; 7] = [
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-39,
            1.0,
        ];
        (0..len)
            .map(|_| match rng.below(20) {
                0 => SPECIAL[rng.below(SPECIAL.len() as u64) as usize],
                _ => (3.0 * rng.normal()) as f32,
            })
            .map(T::from_f32)
            .collect()
    }

    /// The element-by-element loop the fast paths replaced: one call per element through `walk`.
    fn reference2<T: Element>(
        a: &[T],
        la: &Layout,
        b: &[T],
        lb: &Layout,
        f: impl Fn(f32, f32) -> f32,
    ) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); la.numel()];
        let (shape, strides) = coalesce(la.shape(), [la.strides(), lb.strides()]);
        let n = out.len();
        walk(
            &shape,
            &strides,
            [la.offset(), lb.offset()],
            0,
            n,
            |k, [i, j]| out[k] = T::from_f32(f(a[i].to_f32(), b[j].to_f32())),
        );
        out
    }

    /// The values' bits, every NaN as one: which NaN an operation on two NaNs returns depends on
    /// the order of its operands in the machine instruction, which the compiler may swap for
    /// commutative ones (x86 returns the first), so NaN payloads and signs are not promised.
    fn bits<T: Element>(v: &[T]) -> Vec<u64> {
        v.iter()
            .map(|x| x.to_f64())
            .map(|x| if x.is_nan() { f64::NAN } else { x }.to_bits())
            .collect()
    }

    /// Pairs of operand views over one output shape: dense, trailing (bias) and leading
    /// broadcasts, a scalar, a transposed and a narrowed (row-strided) operand, sizes that are not
    /// multiples of 16, and one large enough to be split over threads in the middle of a row.
    fn view_pairs() -> Vec<(&'static str, Layout, Layout)> {
        let c = |s: &[usize]| Layout::contiguous(s).unwrap();
        let shape = [37, 67];
        vec![
            ("dense", c(&[4099]), c(&[4099])),
            ("bias", c(&shape), c(&[67]).broadcast_to(&shape).unwrap()),
            (
                "per-row",
                c(&shape),
                c(&[37, 1]).broadcast_to(&shape).unwrap(),
            ),
            ("scalar", c(&[]).broadcast_to(&shape).unwrap(), c(&shape)),
            (
                "transposed",
                c(&[67, 37]).transpose(0, 1).unwrap(),
                c(&shape),
            ),
            (
                "narrowed",
                c(&[37, 80]).narrow(1, 5, 67).unwrap(),
                c(&[67]).broadcast_to(&shape).unwrap(),
            ),
            (
                "large bias",
                c(&[601, 129]),
                c(&[129]).broadcast_to(&[601, 129]).unwrap(),
            ),
        ]
    }

    fn check_binary<T: Element>(test: &str) {
        let mut rng = Rng::new(crate::test_seed(test));
        let ops = [
            (BinaryOp::Add, (|x, y| x + y) as fn(f32, f32) -> f32),
            (BinaryOp::Sub, |x, y| x - y),
            (BinaryOp::Mul, |x, y| x * y),
            (BinaryOp::Div, |x, y| x / y),
            (BinaryOp::Maximum, super::nan_max),
            (BinaryOp::Minimum, super::nan_min),
            (BinaryOp::Pow, f32::powf),
        ];
        for (name, la, lb) in view_pairs() {
            let a = data::<T>(&mut rng, la.storage_extent());
            let b = data::<T>(&mut rng, lb.storage_extent());
            for (op, f) in ops {
                let want = bits(&reference2(&a, &la, &b, &lb, f));
                for level in supported_levels() {
                    let got = bits(&binary_typed(level, &a, &la, &b, &lb, op));
                    assert!(
                        got == want,
                        "{} {name} at {level:?} differs from the per-element loop",
                        op.name()
                    );
                }
            }
        }
    }

    fn check_unary<T: Element>(test: &str) {
        let mut rng = Rng::new(crate::test_seed(test));
        let ops = UnaryOp::ALL;
        let levels = supported_levels();
        for (name, l, _) in view_pairs() {
            let v = data::<T>(&mut rng, l.storage_extent());
            let dense = Layout::contiguous(l.shape()).unwrap();
            // the reference: the same op on a dense copy through the per-element walk
            let mut copy = vec![T::from_f32(0.0); l.numel()];
            let (shape, strides) = coalesce(l.shape(), [l.strides()]);
            walk(&shape, &strides, [l.offset()], 0, copy.len(), |k, [i]| {
                copy[k] = v[i]
            });
            for op in ops {
                let want = bits(&unary_typed(levels[0], &copy, &dense, op));
                for &level in &levels {
                    let got = bits(&unary_typed(level, &v, &l, op));
                    assert!(
                        got == want,
                        "{} {name} at {level:?} differs from the baseline",
                        op.name()
                    );
                }
            }
        }
        let (x, g) = (data::<T>(&mut rng, 4099), data::<T>(&mut rng, 4099));
        for op in ops.into_iter().filter(|op| op.fused_backward()) {
            let want = bits(&unary_backward_typed(levels[0], &x, &g, op).unwrap());
            for &level in &levels {
                let got = bits(&unary_backward_typed(level, &x, &g, op).unwrap());
                assert!(
                    got == want,
                    "{} backward at {level:?} differs from the baseline",
                    op.name()
                );
            }
        }
    }

    #[test]
    fn binary_fast_paths_match_the_per_element_loop_bit_for_bit() {
        check_binary::<f32>("binary f32");
        check_binary::<f16>("binary f16");
    }

    #[test]
    fn unary_ops_agree_bit_for_bit_across_views_and_vector_levels() {
        check_unary::<f32>("unary f32");
        check_unary::<f16>("unary f16");
    }

    #[test]
    fn erf_f32_is_within_1_6_ulp() {
        // every 1e-5 over [-4.5, 4.5], and tiny arguments (relative precision near 0)
        let dense = (-450_000..=450_000).map(|i| i as f32 * 1e-5);
        let tiny = (0..400).map(|i| 10f32.powf(-38.0 + 0.1 * i as f32));
        let mut worst = (0f64, 0f32);
        for x in dense.chain(tiny) {
            let (got, want) = (erf_f32(x) as f64, erf(x as f64));
            // the spacing of f32 values in want's binade
            let binade = (want.abs() as f32).max(f32::MIN_POSITIVE).to_bits() & 0x7f80_0000;
            let ulp = (f32::from_bits(binade + 1) - f32::from_bits(binade)) as f64;
            let err = (got - want).abs() / ulp;
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 <= 1.6,
            "erf_f32 is {} ulp off at {}",
            worst.0,
            worst.1
        );
        assert!(erf_f32(f32::NAN).is_nan());
        assert_eq!(erf_f32(f32::INFINITY), 1.0);
        assert_eq!(erf_f32(-7.0), -1.0);
    }
}
