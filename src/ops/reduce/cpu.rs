//! CPU reductions: f64 accumulation, the same NaN and tie rules as kernels/reduce.cu. Work is
//! split across threads by outer index, or, when there are fewer outer indices than threads, by
//! segments of the reduced axis whose partial results are combined in order.

use super::{Dims, ReduceOp};
use crate::dtype::Element;
use crate::error::{dtype_err, Result};
use crate::ops::cpu::vectorized;
use crate::tensor::{with_cpu_float_storage, CpuStorage, IntoCpuStorage};

/// Below this many input elements one thread does all the work.
const PARALLEL_MIN: usize = 1 << 16;

#[derive(Clone, Copy)]
struct Acc {
    v: f64,
    i: i64,
}

/// One reduction: identity, the per-element transform, an associative combine, the final value.
trait Rule: Copy + Send + Sync {
    const IDENTITY: Acc;
    /// Whether `combine` is `a.v + b.v` (no index): such rules accumulate over the inner axis in
    /// plain f64 vectors, which vectorise, with the same additions in the same order.
    const SUMS: bool = false;
    fn load(x: f64) -> f64 {
        x
    }
    fn combine(a: Acc, b: Acc) -> Acc;
    fn finish(a: Acc, _n: usize) -> f64 {
        a.v
    }
}

#[derive(Clone, Copy)]
struct Sum;
impl Rule for Sum {
    const IDENTITY: Acc = Acc { v: 0.0, i: 0 };
    const SUMS: bool = true;
    fn combine(a: Acc, b: Acc) -> Acc {
        Acc { v: a.v + b.v, i: 0 }
    }
}

#[derive(Clone, Copy)]
struct SumSq;
impl Rule for SumSq {
    const IDENTITY: Acc = Sum::IDENTITY;
    const SUMS: bool = true;
    fn load(x: f64) -> f64 {
        x * x
    }
    fn combine(a: Acc, b: Acc) -> Acc {
        Sum::combine(a, b)
    }
}

#[derive(Clone, Copy)]
struct Mean;
impl Rule for Mean {
    const IDENTITY: Acc = Sum::IDENTITY;
    const SUMS: bool = true;
    fn combine(a: Acc, b: Acc) -> Acc {
        Sum::combine(a, b)
    }
    fn finish(a: Acc, n: usize) -> f64 {
        a.v / n as f64
    }
}

#[derive(Clone, Copy)]
struct Max;
impl Rule for Max {
    const IDENTITY: Acc = Acc {
        v: f64::NEG_INFINITY,
        i: 0,
    };
    fn combine(a: Acc, b: Acc) -> Acc {
        // NaN wins, as torch.max
        if a.v.is_nan() || a.v > b.v {
            a
        } else {
            b
        }
    }
}

#[derive(Clone, Copy)]
struct Min;
impl Rule for Min {
    const IDENTITY: Acc = Acc {
        v: f64::INFINITY,
        i: 0,
    };
    fn combine(a: Acc, b: Acc) -> Acc {
        if a.v.is_nan() || a.v < b.v {
            a
        } else {
            b
        }
    }
}

#[derive(Clone, Copy)]
struct ArgMax;
impl Rule for ArgMax {
    const IDENTITY: Acc = Acc {
        v: f64::NEG_INFINITY,
        i: i64::MAX,
    };
    /// NaN beats every number; among equal values or NaNs the lower index wins.
    fn combine(a: Acc, b: Acc) -> Acc {
        let take_b = match (a.v.is_nan(), b.v.is_nan()) {
            (false, false) => b.v > a.v || (b.v == a.v && b.i < a.i),
            (an, bn) => bn && (!an || b.i < a.i),
        };
        if take_b {
            b
        } else {
            a
        }
    }
}

pub fn reduce(s: &CpuStorage, op: ReduceOp, dims: Dims) -> Result<CpuStorage> {
    with_cpu_float_storage!(s, v, T => Ok(match op {
        ReduceOp::Sum => finish::<T, Sum>(v, dims, op),
        ReduceOp::SumSq => finish::<T, SumSq>(v, dims, op),
        ReduceOp::Mean => finish::<T, Mean>(v, dims, op),
        ReduceOp::Max => finish::<T, Max>(v, dims, op),
        ReduceOp::Min => finish::<T, Min>(v, dims, op),
        ReduceOp::ArgMax => finish::<T, ArgMax>(v, dims, op),
    }), _ => dtype_err!("reduce {}: needs f32, f16 or bf16 storage, got {}", op.name(), s.dtype()))
}

fn finish<T: IntoCpuStorage, R: Rule>(v: &[T], dims: Dims, op: ReduceOp) -> CpuStorage {
    let acc = accumulate::<T, R>(&v[..dims.outer * dims.n * dims.inner], dims);
    if op == ReduceOp::ArgMax {
        CpuStorage::I64(acc.iter().map(|a| a.i).collect())
    } else {
        T::into_storage(
            acc.iter()
                .map(|&a| T::from_f64(R::finish(a, dims.n)))
                .collect(),
        )
    }
}

/// Accumulators of the `outer * inner` outputs over rows `k0..k1` of the reduced axis.
fn accumulate_range<T: Element, R: Rule>(
    v: &[T],
    outer: std::ops::Range<usize>,
    k0: usize,
    k1: usize,
    dims: Dims,
) -> Vec<Acc> {
    let Dims { n, inner, .. } = dims;
    let step = |a: Acc, x: T, k: usize| {
        R::combine(
            a,
            Acc {
                v: R::load(x.to_f64()),
                i: k as i64,
            },
        )
    };
    if inner == 1 {
        let row = |o: usize| {
            v[o * n + k0..o * n + k1]
                .iter()
                .zip(k0..)
                .fold(R::IDENTITY, |a, (&x, k)| step(a, x, k))
        };
        return outer.map(row).collect();
    }
    if R::SUMS {
        return vectorized(
            #[inline(always)]
            || {
                let mut sums = vec![R::IDENTITY.v; outer.len() * inner];
                for (o, out) in outer.zip(sums.chunks_mut(inner)) {
                    for k in k0..k1 {
                        let row = &v[(o * n + k) * inner..][..inner];
                        for (a, &x) in out.iter_mut().zip(row) {
                            *a += R::load(x.to_f64());
                        }
                    }
                }
                sums.into_iter().map(|v| Acc { v, i: 0 }).collect()
            },
        );
    }
    let mut acc = vec![R::IDENTITY; outer.len() * inner];
    for (o, out) in outer.zip(acc.chunks_mut(inner)) {
        for k in k0..k1 {
            let row = &v[(o * n + k) * inner..][..inner];
            for (a, &x) in out.iter_mut().zip(row) {
                *a = step(*a, x, k);
            }
        }
    }
    acc
}

fn accumulate<T: Element, R: Rule>(v: &[T], dims: Dims) -> Vec<Acc> {
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    if v.len() < PARALLEL_MIN || threads == 1 {
        return accumulate_range::<T, R>(v, 0..dims.outer, 0, dims.n, dims);
    }
    if dims.outer >= threads {
        let chunk = dims.outer.div_ceil(threads);
        return std::thread::scope(|s| {
            let handles: Vec<_> = (0..dims.outer)
                .step_by(chunk)
                .map(|o0| {
                    s.spawn(move || {
                        accumulate_range::<T, R>(
                            v,
                            o0..(o0 + chunk).min(dims.outer),
                            0,
                            dims.n,
                            dims,
                        )
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("reduce worker panicked"))
                .collect()
        });
    }
    // Few outer indices: split the reduced axis and combine the segments' accumulators in order.
    let seg = dims.n.div_ceil(threads);
    let parts: Vec<Vec<Acc>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..dims.n)
            .step_by(seg)
            .map(|k0| {
                s.spawn(move || {
                    accumulate_range::<T, R>(v, 0..dims.outer, k0, (k0 + seg).min(dims.n), dims)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("reduce worker panicked"))
            .collect()
    });
    let mut parts = parts.into_iter();
    let first = parts
        .next()
        .unwrap_or_else(|| vec![R::IDENTITY; dims.outer * dims.inner]);
    parts.fold(first, |acc, p| {
        acc.into_iter()
            .zip(p)
            .map(|(a, b)| R::combine(a, b))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::{accumulate, Acc, Dims, Mean, Rule, Sum, SumSq};
    use crate::tensor::Rng;

    /// `R` through the generic accumulator path (per-element `combine` on `Acc`), the path the
    /// sums took before their plain f64 loops.
    #[derive(Clone, Copy)]
    struct Generic<R>(R);
    impl<R: Rule> Rule for Generic<R> {
        const IDENTITY: Acc = R::IDENTITY;
        fn load(x: f64) -> f64 {
            R::load(x)
        }
        fn combine(a: Acc, b: Acc) -> Acc {
            R::combine(a, b)
        }
    }

    fn check<R: Rule>(v: &[f32], dims: Dims, what: &str, seed: u64) {
        let bits = |a: Vec<Acc>| a.iter().map(|a| a.v.to_bits()).collect::<Vec<_>>();
        let (fast, generic) = (
            bits(accumulate::<f32, R>(v, dims)),
            bits(accumulate::<f32, Generic<R>>(v, dims)),
        );
        assert!(
            fast == generic,
            "{what} {dims:?} differs (VPR_TEST_SEED={seed})"
        );
    }

    #[test]
    fn sums_over_inner_axes_match_the_generic_path_bit_for_bit() {
        let seed = crate::test_seed("sums_over_inner_axes_match_the_generic_path_bit_for_bit");
        let mut rng = Rng::new(seed);
        // BatchNorm's statistics ([rows, C] over rows: one outer index, the reduced axis split
        // over threads), many outer indices, odd inner widths, and a row sum (inner 1)
        for (outer, n, inner) in [
            (1, 3001, 67),
            (1, 1100, 64),
            (9, 37, 131),
            (5, 17, 1),
            (3, 2, 1000),
        ] {
            let dims = Dims { outer, n, inner };
            let v: Vec<f32> = (0..outer * n * inner)
                .map(|_| {
                    if rng.below(50) == 0 {
                        -0.0
                    } else {
                        (5.0 * rng.normal()) as f32
                    }
                })
                .collect();
            check::<Sum>(&v, dims, "sum", seed);
            check::<SumSq>(&v, dims, "sum_sq", seed);
            check::<Mean>(&v, dims, "mean", seed);
        }
    }
}
