//! CPU twin of kernels/mnn.cu: the same similarities (the f64 sum over d in ascending order of the
//! exact products, rounded once to f32) and the same 64-bit candidate keys, so the same arg-maxes
//! bit for bit. Blocks of `ROWS` x `COLS` similarities are accumulated in registers (the loop over
//! the columns vectorises); each row's and each column's best candidate is a running maximum, so
//! the order in which blocks are visited does not matter. The rows of a pair are split over the
//! threads, each keeping its own column maxima, merged at the end.

/// Rows and columns of a register block.
const ROWS: usize = 4;
const COLS: usize = 8;
/// Similarities (La x Lb x D multiply-adds) below which a pair runs on one thread.
const PARALLEL_MIN: usize = 1 << 22;

/// The order-preserving image of a float: NaN above +inf, -0 as +0; never 0.
#[inline(always)]
fn value_key(v: f32) -> u32 {
    if v.is_nan() {
        return u32::MAX;
    }
    if v == 0.0 {
        return 0x8000_0000;
    }
    let u = v.to_bits();
    if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// The candidate `index` with similarity `v`: larger is better (higher value, then lower index).
#[inline(always)]
fn candidate(v: f32, index: usize) -> u64 {
    (u64::from(value_key(v)) << 32) | u64::from(u32::MAX - index as u32)
}

#[inline(always)]
fn index_of(candidate: u64) -> usize {
    (u32::MAX - candidate as u32) as usize
}

/// The best candidates of rows `rows` of a (row maxima, one per row) and of every column of b
/// (column maxima over those rows), from the pair's operands as f64: `a` [La, D], `bt` the
/// columns of b in blocks of `COLS`, each block `[D, COLS]` (zero past Lb).
fn best_candidates(
    a: &[f64],
    bt: &[f64],
    (la, lb, d): (usize, usize, usize),
    rows: std::ops::Range<usize>,
) -> (Vec<u64>, Vec<u64>) {
    let mut row_best = vec![0u64; rows.len()];
    let mut col_best = vec![0u64; lb];
    for i0 in rows.clone().step_by(ROWS) {
        let nr = ROWS.min(rows.end - i0);
        for (block, cols) in bt.chunks(d * COLS).enumerate() {
            let j0 = block * COLS;
            let mut acc = [[0f64; COLS]; ROWS];
            for k in 0..d {
                let y = &cols[k * COLS..][..COLS];
                for (r, acc) in acc.iter_mut().enumerate().take(nr) {
                    let x = a[(i0 + r) * d + k];
                    for c in 0..COLS {
                        acc[c] += x * y[c];
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(nr) {
                let i = i0 + r;
                for (c, &s) in acc.iter().enumerate().take(COLS.min(lb - j0)) {
                    let j = j0 + c;
                    let v = s as f32;
                    let best = &mut row_best[i - rows.start];
                    *best = (*best).max(candidate(v, j));
                    col_best[j] = col_best[j].max(candidate(v, i));
                }
            }
        }
    }
    debug_assert!(rows.end <= la);
    (row_best, col_best)
}

/// The number of mutual nearest neighbours of one pair, `a` [La, D] and `b` [Lb, D] (La, Lb >= 1),
/// with exactly one turned into 0.
fn pair_count(a: &[f32], b: &[f32], la: usize, lb: usize, d: usize) -> i64 {
    let a64: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
    let blocks = lb.div_ceil(COLS);
    let mut bt = vec![0f64; blocks * d * COLS];
    for (j, row) in b.chunks(d.max(1)).take(lb).enumerate() {
        let (block, c) = (j / COLS, j % COLS);
        for (k, &v) in row.iter().enumerate() {
            bt[(block * d + k) * COLS + c] = f64::from(v);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = cores.min((la * lb * d.max(1)) / PARALLEL_MIN).clamp(1, la);
    let per = la.div_ceil(threads).next_multiple_of(ROWS);
    let parts: Vec<(Vec<u64>, Vec<u64>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..la)
            .step_by(per)
            .map(|first| {
                let (a64, bt) = (&a64, &bt);
                let rows = first..(first + per).min(la);
                s.spawn(move || best_candidates(a64, bt, (la, lb, d), rows))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a matching thread panicked"))
            .collect()
    });
    let mut row_best = Vec::with_capacity(la);
    let mut col_best = vec![0u64; lb];
    for (rows, cols) in parts {
        row_best.extend(rows);
        col_best
            .iter_mut()
            .zip(cols)
            .for_each(|(best, c)| *best = (*best).max(c));
    }
    let mutual = row_best
        .iter()
        .enumerate()
        .filter(|&(i, &best)| index_of(col_best[index_of(best)]) == i)
        .count() as i64;
    if mutual == 1 {
        0
    } else {
        mutual
    }
}

/// Mutual-match counts of `pairs` pairs of dense maps `a` [pairs, La, D] and `b` [pairs, Lb, D]
/// (La, Lb, D >= 1: the caller answers the empty cases).
pub fn mutual_nn_counts(
    a: &[f32],
    b: &[f32],
    pairs: usize,
    la: usize,
    lb: usize,
    d: usize,
) -> Vec<i64> {
    (0..pairs)
        .map(|p| {
            pair_count(
                &a[p * la * d..][..la * d],
                &b[p * lb * d..][..lb * d],
                la,
                lb,
                d,
            )
        })
        .collect()
}
