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
