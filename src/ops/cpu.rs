//! Loops shared by the CPU implementations of the op families: splitting an output over threads,
//! walking strided views in row-major order, and running loops compiled for the CPU's widest
//! vector instructions.

use std::mem::MaybeUninit;

/// Elements per thread below which splitting does not pay.
const MIN_PER_THREAD: usize = 1 << 15;

/// Fills `out` by calling `fill(start, chunk)` on consecutive chunks, on several threads when
/// `out` is large enough.
pub(crate) fn parallel_fill<T: Send>(out: &mut [T], fill: impl Fn(usize, &mut [T]) + Sync) {
    parallel_rows(out, 1, fill)
}

/// `parallel_fill` over whole rows of `row_len` elements: `fill(first_row, rows)` on consecutive
/// runs of rows.
pub(crate) fn parallel_rows<T: Send>(
    out: &mut [T],
    row_len: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) {
    let rows = out.len().checked_div(row_len).unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min(out.len() / MIN_PER_THREAD).min(rows).max(1);
    if threads == 1 {
        fill(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (i, c) in out.chunks_mut(per * row_len).enumerate() {
            let fill = &fill;
            s.spawn(move || fill(i * per, c));
        }
    });
}

/// Calls `f(k, offsets)` for k in 0..len, where `offsets` are the storage offsets, in each of the N
/// operands, of the element at row-major position `start + k` of `shape`.
pub(crate) fn walk<const N: usize>(
    shape: &[usize],
    strides: &[Vec<usize>; N],
    base: [usize; N],
    start: usize,
    len: usize,
    mut f: impl FnMut(usize, [usize; N]),
) {
    let inner: [usize; N] = std::array::from_fn(|j| strides[j].last().copied().unwrap_or(0));
    walk_runs(shape, strides, base, start, len, |k, run, mut pos| {
        for e in 0..run {
            f(k + e, pos);
            for (p, s) in pos.iter_mut().zip(&inner) {
                *p += s;
            }
        }
    });
}

/// Calls `f(k, run, offsets)` on consecutive runs along the innermost dimension that together
/// cover row-major positions `start..start + len` of `shape`: the run holds positions
/// `start + k..start + k + run`, and `offsets` are the storage offsets, in each of the N operands,
/// of its first element. Carries into the outer dimensions like an odometer between runs.
/// Always inlined, so that under [`vectorized`] the runs are compiled for the wide vector unit
/// (with `f` an `#[inline(always)]` closure too).
#[inline(always)]
pub(crate) fn walk_runs<const N: usize>(
    shape: &[usize],
    strides: &[Vec<usize>; N],
    base: [usize; N],
    start: usize,
    len: usize,
    mut f: impl FnMut(usize, usize, [usize; N]),
) {
    let rank = shape.len();
    if len == 0 {
        return; // also when a dimension is 0
    }
    if rank == 0 {
        (0..len).for_each(|k| f(k, 1, base));
        return;
    }
    let mut idx = vec![0; rank];
    let mut rem = start;
    for d in (0..rank).rev() {
        idx[d] = rem % shape[d];
        rem /= shape[d];
    }
    let mut pos = base;
    for (p, s) in pos.iter_mut().zip(strides) {
        *p += idx.iter().zip(s).map(|(i, s)| i * s).sum::<usize>();
    }
    let last = rank - 1;
    let mut k = 0;
    while k < len {
        let run = (shape[last] - idx[last]).min(len - k);
        f(k, run, pos);
        k += run;
        for (p, s) in pos.iter_mut().zip(strides) {
            *p += run * s[last];
        }
        idx[last] += run;
        let mut d = last;
        while d > 0 && idx[d] == shape[d] {
            idx[d] = 0;
            idx[d - 1] += 1;
            for (p, s) in pos.iter_mut().zip(strides) {
                *p = *p + s[d - 1] - shape[d] * s[d];
            }
            d -= 1;
        }
    }
}

/// A vector of `len` elements written by `fill(chunk)`, which must write every element of the
/// chunk it is given (`parallel_fill`'s chunks, here of uninitialised memory): outputs that are
/// fully overwritten skip the zeroing (a memset, or the kernel's zeroing of fresh pages being
/// paid twice when the buffer is reused from the heap).
pub(crate) fn filled_vec<T: Copy + Send>(
    len: usize,
    fill: impl Fn(usize, &mut [MaybeUninit<T>]) + Sync,
) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    parallel_fill(&mut out.spare_capacity_mut()[..len], fill);
    // SAFETY: `fill` wrote each of the first `len` elements (its contract), and `T: Copy` has no
    // drop that could observe a partially written vector on a panic (the vector is then dropped
    // with length 0).
    unsafe { out.set_len(len) };
    out
}

/// The vector instruction sets the hot loops are compiled for, the best one picked at run time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Simd {
    /// The target's baseline (SSE2 on x86-64): the only level off x86-64.
    Baseline,
    /// AVX2 (8 f32 lanes), without FMA: no loop here asks for fused multiply-adds.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW/DQ/VL (16 f32 lanes, masked tails). LLVM enables FMA with it, but rustc never
    /// fuses a separate multiply and add, so results are those of the baseline loops.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The best level this CPU supports, detected once; `VPR_SIMD=baseline|avx2` caps it (to compare
/// the levels, and for the tests that check they agree bit for bit).
pub(crate) fn simd_level() -> Simd {
    static LEVEL: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = std::env::var("VPR_SIMD").ok();
        detect(cap.as_deref())
    })
}

#[cfg(target_arch = "x86_64")]
fn detect(cap: Option<&str>) -> Simd {
    let avx512 = is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl");
    let avx2 = is_x86_feature_detected!("avx2");
    match cap {
        Some("baseline") => Simd::Baseline,
        Some("avx2") if avx2 => Simd::Avx2,
        _ if avx512 => Simd::Avx512,
        _ if avx2 => Simd::Avx2,
        _ => Simd::Baseline,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect(_cap: Option<&str>) -> Simd {
    Simd::Baseline
}

/// Every level this CPU runs, baseline first (for the tests that compare them).
#[cfg(test)]
pub(crate) fn supported_levels() -> Vec<Simd> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut levels = vec![Simd::Baseline];
    #[cfg(target_arch = "x86_64")]
    {
        let best = detect(None);
        if best != Simd::Baseline {
            levels.push(Simd::Avx2);
        }
        if best == Simd::Avx512 {
            levels.push(Simd::Avx512);
        }
    }
    levels
}

/// Runs `f` compiled for the best vector instruction set of this CPU ([`simd_level`]). `f` must
/// be an `#[inline(always)]` closure so that its loops are compiled inside the `target_feature`
/// function (a closure that is not inlined keeps the baseline code); the closures it calls
/// per element inline by themselves when small, or need the same attribute.
#[inline(always)]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    vectorized_at(simd_level(), f)
}

/// [`vectorized`] at a given level (which the CPU must support: the tests compare levels).
#[inline(always)]
pub(crate) fn vectorized_at<R>(level: Simd, f: impl FnOnce() -> R) -> R {
    match level {
        Simd::Baseline => f(),
        // SAFETY: `detect` picked these levels only where the CPU has the features
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { with_avx2(f) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512 => unsafe { with_avx512(f) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
unsafe fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// e^x in f32 within 2 ulp, in a form the compiler vectorizes: x = n ln 2 + r with |r| <= ln 2 / 2,
/// e^r by Cephes' expf polynomial, 2^n added to the exponent bits. x is clamped to [-87, 88]
/// (e^x underflows to 0 below -87, where the 2^n step would reach denormals); NaN stays NaN.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding 1.5 * 2^23 rounds to the nearest integer n without a libm call, and leaves n in the
    // low bits of the sum, so that 2^n needs no float-to-int conversion (which does not vectorize)
    const ROUND: f32 = 12_582_912.0;
    let c = x.clamp(-87.0, 88.0);
    let t = c * LOG2E + ROUND;
    let n = t - ROUND;
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let r = c - n * LN2_HI - n * LN2_LO;
    let p = ((((1.9875691e-04 * r + 0.0013981999) * r + 0.008333452) * r + 0.041665796) * r
        + 0.16666666)
        * r
        + 0.5;
    let e = f32::from_bits((p * r * r + r + 1.0).to_bits().wrapping_add(n_bits << 23));
    if x.is_nan() {
        x
    } else if x < -87.0 {
        0.0
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 + 87.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * want;
            worst = worst.max((exp_f32(x) as f64 - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "exp is {worst} ulp off");
        assert_eq!(exp_f32(-87.5), 0.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(0.0), 1.0);
    }
}
