//! Loops shared by the CPU implementations of the op families: splitting an output over threads,
//! and walking strided views in row-major order.

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
/// operands, of the element at row-major position `start + k` of `shape`. Walks the innermost
/// dimension in runs and carries into the outer ones like an odometer.
pub(crate) fn walk<const N: usize>(
    shape: &[usize],
    strides: &[Vec<usize>; N],
    base: [usize; N],
    start: usize,
    len: usize,
    mut f: impl FnMut(usize, [usize; N]),
) {
    let rank = shape.len();
    if len == 0 {
        return; // also when a dimension is 0
    }
    if rank == 0 {
        (0..len).for_each(|k| f(k, base));
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
    let inner: [usize; N] = std::array::from_fn(|j| strides[j][last]);
    let mut k = 0;
    while k < len {
        let run = (shape[last] - idx[last]).min(len - k);
        for _ in 0..run {
            f(k, pos);
            k += 1;
            for (p, s) in pos.iter_mut().zip(&inner) {
                *p += s;
            }
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
