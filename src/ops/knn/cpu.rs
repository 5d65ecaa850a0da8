//! CPU twin of `knn_merge_f32`, and the CPU search path itself: the same keys and sort keys as the
//! kernel (see kernels/knn.cu), so the same lists bit for bit, found the way a CPU does it fast.
//!
//! Per query row the k-th best sort key so far is a threshold. The chunk is scanned a block of
//! columns at a time: distances and keys of the block into small arrays (a loop the compiler
//! vectorises), then only the columns whose key reaches the threshold's are looked at. Those that
//! beat it go to a buffer; when the buffer fills, the k best are selected and the threshold
//! tightens. Rows are spread over threads.

/// The key of a NaN distance: after +inf.
const NAN_KEY: u32 = 0xffff_fffe;
/// The key of an empty slot (index -1): after everything else.
const EMPTY_KEY: u32 = 0xffff_ffff;
/// Columns whose distances are computed together.
const BLOCK: usize = 64;
/// Candidates (rows times k + n) per thread below which splitting the rows over threads does not
/// pay.
const PARALLEL_MIN: usize = 1 << 16;

/// faiss IndexFlatL2's distance: the norms' sum first, then the exact -2 * ip; clamped at 0 (NaN
/// stays NaN, -0 becomes 0).
#[inline(always)]
pub(crate) fn distance(qn: f32, dn: f32, ip: f32) -> f32 {
    let d = (qn + dn) - 2.0 * ip;
    if d <= 0.0 {
        0.0
    } else {
        d
    }
}

/// An unsigned key in the order of the distances, NaN after +inf.
#[inline(always)]
fn key(d: f32) -> u32 {
    let u = d.to_bits();
    if d.is_nan() {
        NAN_KEY
    } else if d == 0.0 {
        0x8000_0000
    } else if u & 0x8000_0000 != 0 {
        !u
    } else {
        u | 0x8000_0000
    }
}

/// `key(distance(qn, dn, ip))` for a chunk column, whose distance is never negative nor -0: a
/// select instead of branches, so the scan loop vectorises.
#[inline(always)]
fn chunk_key(qn: f32, dn: f32, ip: f32) -> u32 {
    let d = distance(qn, dn, ip);
    if d.is_nan() {
        NAN_KEY
    } else {
        d.to_bits() | 0x8000_0000
    }
}

/// The distance a key stands for.
fn distance_of(key: u32) -> f32 {
    f32::from_bits(if key & 0x8000_0000 != 0 {
        key & 0x7fff_ffff
    } else {
        !key
    })
}

/// The sort key of a candidate: its key, then its position (old entries 0..k, then k + column).
#[inline(always)]
fn sort_key(key: u32, pos: usize) -> u64 {
    (u64::from(key) << 32) | pos as u64
}

/// One merge: `old_dist`/`old_idx` [queries, k], `ip` [queries, n], `qn` [queries], `dn` [n],
/// dense; the chunk's first row is database row `merged`. Returns the new distances and indices.
#[allow(clippy::too_many_arguments)]
pub fn merge(
    old_dist: &[f32],
    old_idx: &[i64],
    ip: &[f32],
    qn: &[f32],
    dn: &[f32],
    k: usize,
    n: usize,
    merged: usize,
) -> (Vec<f32>, Vec<i64>) {
    let queries = qn.len();
    let mut best = vec![0u64; queries * k];
    let rows = |first: usize, out: &mut [u64]| {
        let mut buffer = Vec::with_capacity(buffer_len(k));
        for (r, out_row) in out.chunks_mut(k).enumerate() {
            let q = first + r;
            row(
                &old_dist[q * k..(q + 1) * k],
                &old_idx[q * k..(q + 1) * k],
                &ip[q * n..(q + 1) * n],
                qn[q],
                dn,
                out_row,
                &mut buffer,
            );
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = cores
        .min(queries)
        .min(queries * (n + k) / PARALLEL_MIN)
        .max(1);
    if threads == 1 {
        rows(0, &mut best);
    } else {
        let per = queries.div_ceil(threads);
        std::thread::scope(|s| {
            for (i, out) in best.chunks_mut(per * k).enumerate() {
                let rows = &rows;
                s.spawn(move || rows(i * per, out));
            }
        });
    }
    let mut dist = Vec::with_capacity(queries * k);
    let mut idx = Vec::with_capacity(queries * k);
    for (q, row_best) in best.chunks(k).enumerate() {
        for &e in row_best {
            let (key, pos) = ((e >> 32) as u32, (e & 0xffff_ffff) as usize);
            if key == EMPTY_KEY {
                dist.push(f32::INFINITY);
                idx.push(-1);
            } else {
                dist.push(distance_of(key));
                idx.push(if pos < k {
                    old_idx[q * k + pos]
                } else {
                    (merged + pos - k) as i64
                });
            }
        }
    }
    (dist, idx)
}

/// Candidates the buffer holds before the k best are selected from it.
fn buffer_len(k: usize) -> usize {
    3 * k + 256
}

/// The k smallest sort keys of one row's candidates into `out`, ascending.
fn row(
    old_dist: &[f32],
    old_idx: &[i64],
    ip: &[f32],
    qn: f32,
    dn: &[f32],
    out: &mut [u64],
    buffer: &mut Vec<u64>,
) {
    let k = out.len();
    buffer.clear();
    buffer.extend(
        old_dist
            .iter()
            .zip(old_idx)
            .enumerate()
            .map(|(pos, (&d, &i))| {
                let key = if i < 0 { EMPTY_KEY } else { key(d) };
                sort_key(key, pos)
            }),
    );
    let mut threshold = *buffer.iter().max().expect("k >= 1");
    let mut keys = [0u32; BLOCK];
    for (b, (ip_block, dn_block)) in ip.chunks(BLOCK).zip(dn.chunks(BLOCK)).enumerate() {
        let threshold_key = (threshold >> 32) as u32;
        let mut any = false;
        for ((slot, &x), &dnv) in keys.iter_mut().zip(ip_block).zip(dn_block) {
            *slot = chunk_key(qn, dnv, x);
            any |= *slot <= threshold_key;
        }
        if !any {
            continue;
        }
        let first = k + b * BLOCK;
        for (j, &kj) in keys[..ip_block.len()].iter().enumerate() {
            let candidate = sort_key(kj, first + j);
            if candidate < threshold {
                buffer.push(candidate);
            }
        }
        if buffer.len() >= buffer_len(k) {
            buffer.select_nth_unstable(k - 1);
            buffer.truncate(k);
            threshold = buffer[k - 1];
        }
    }
    if buffer.len() > k {
        buffer.select_nth_unstable(k - 1);
        buffer.truncate(k);
    }
    buffer.sort_unstable();
    out.copy_from_slice(buffer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_as_distances_with_nan_after_infinity() {
        let ordered = [
            f32::NEG_INFINITY,
            -1.5,
            -1e-40,
            0.0,
            1e-40,
            0.5,
            2.0,
            f32::MAX,
            f32::INFINITY,
            f32::NAN,
        ];
        for pair in ordered.windows(2) {
            assert!(key(pair[0]) < key(pair[1]), "{pair:?}");
        }
        assert_eq!(key(-0.0), key(0.0));
        assert_eq!(key(-f32::NAN), NAN_KEY);
        const { assert!(NAN_KEY < EMPTY_KEY) };
        for d in [
            f32::NEG_INFINITY,
            -1.5,
            0.0,
            1e-40,
            0.5,
            f32::MAX,
            f32::INFINITY,
        ] {
            assert_eq!(distance_of(key(d)).to_bits(), d.to_bits());
        }
        assert!(distance_of(NAN_KEY).is_nan());
    }

    #[test]
    fn distance_is_faiss_formula_clamped_at_zero() {
        assert_eq!(distance(1.0, 2.0, 0.5), 2.0);
        assert_eq!(distance(1.0, 1.0, 1.5).to_bits(), 0.0f32.to_bits());
        assert_eq!(distance(-0.0, -0.0, 0.0).to_bits(), 0.0f32.to_bits());
        assert!(distance(1.0, 1.0, f32::NAN).is_nan());
        assert_eq!(distance(1.0, 1.0, f32::NEG_INFINITY), f32::INFINITY);
        assert_eq!(distance(1.0, 1.0, f32::INFINITY), 0.0);
    }

    #[test]
    fn chunk_keys_are_the_keys_of_chunk_distances() {
        let values = [
            -3.0,
            -0.0,
            0.0,
            0.25,
            1.0,
            7.5,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ];
        for qn in values {
            for dn in values {
                for ip in values {
                    assert_eq!(
                        chunk_key(qn, dn, ip),
                        key(distance(qn, dn, ip)),
                        "{qn} {dn} {ip}"
                    );
                }
            }
        }
    }
}
