//! Exact kNN merge (ops::knn): the CPU against f64 brute force on unit-length descriptors searched
//! as `eval` searches them (inner products by matmul, norms by sum_sq), exact ties to the lower
//! index, chunked merges equal to one merge, special values, the GPUs against the CPU bit for bit,
//! and errors for bad input.

mod common;

use common::{gpu_devices, seed};
use vpr_engine::device::VgpuOptions;
use vpr_engine::nn::l2_normalize;
use vpr_engine::ops::knn::{Neighbours, MAX_K};
use vpr_engine::{DType, Device, Error, Tensor};

/// Unit-length random descriptors [rows, dim] (f32), as the models give them.
fn descriptors(rows: usize, dim: usize, seed: u64) -> Tensor {
    let x = Tensor::randn(&[rows, dim], 0.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap();
    l2_normalize(&x, -1).unwrap()
}

/// The inputs of a merge as the search computes them: ip [queries, n], query and database norms.
fn search_inputs(q: &Tensor, db: &Tensor) -> (Tensor, Tensor, Tensor) {
    (
        q.matmul(&db.t().unwrap()).unwrap(),
        q.sum_sq(-1, false).unwrap(),
        db.sum_sq(-1, false).unwrap(),
    )
}

/// The lists after merging the chunks of `chunk` columns of `ip` (narrowed views, so not
/// contiguous) one after another.
fn merge_in_chunks(ip: &Tensor, qn: &Tensor, dn: &Tensor, k: usize, chunk: usize) -> Neighbours {
    let (queries, n) = (ip.shape()[0], ip.shape()[1]);
    let mut lists = Neighbours::empty(queries, k, ip.device()).unwrap();
    while lists.merged < n {
        let (start, len) = (lists.merged, chunk.min(n - lists.merged));
        lists = lists
            .merge_chunk(
                &ip.narrow(1, start, len).unwrap(),
                qn,
                &dn.narrow(0, start, len).unwrap(),
            )
            .unwrap();
    }
    lists
}

/// The spec by brute force: every column's f32 distance `max((qn + dn) - 2 ip, 0)`, all of them
/// sorted by (NaN last, distance, index), the first k, padded with (+inf, -1).
fn brute_force_top_k(ip: &[f32], qn: &[f32], dn: &[f32], k: usize) -> (Vec<f32>, Vec<i64>) {
    let n = dn.len();
    let (mut dist, mut idx) = (Vec::new(), Vec::new());
    for (i, &q) in qn.iter().enumerate() {
        let mut all: Vec<(f32, usize)> = (0..n)
            .map(|j| {
                let d = (q + dn[j]) - 2.0 * ip[i * n + j];
                (if d <= 0.0 { 0.0 } else { d }, j)
            })
            .collect();
        all.sort_by(|a, b| {
            (a.0.is_nan(), a.0)
                .partial_cmp(&(b.0.is_nan(), b.0))
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.1.cmp(&b.1))
        });
        for r in 0..k {
            match all.get(r) {
                Some(&(d, j)) => {
                    dist.push(d);
                    idx.push(j as i64);
                }
                None => {
                    dist.push(f32::INFINITY);
                    idx.push(-1);
                }
            }
        }
    }
    (dist, idx)
}

/// Asserts equal lists: the same indices and the same distances bit for bit (NaN equal to NaN).
fn assert_same_lists(got: &Neighbours, want_dist: &[f32], want_idx: &[i64], what: &str, s: u64) {
    let got_idx = got.indices.to_vec::<i64>().unwrap();
    let got_dist = got.distances.to_vec::<f32>().unwrap();
    assert_eq!(
        got_idx, want_idx,
        "{what}: indices; replay with VPR_TEST_SEED={s}"
    );
    for (p, (g, w)) in got_dist.iter().zip(want_dist).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: distance {p}: got {g}, want {w}; replay with VPR_TEST_SEED={s}"
        );
    }
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>().unwrap()
}

#[test]
fn cpu_lists_are_the_top_k_of_f64_distances() {
    let s = seed("knn_cpu_lists_are_the_top_k_of_f64_distances");
    // (queries, database rows, dim, k); the last is large enough to be split over threads
    let cases = [
        (7, 257, 33, 5),
        (33, 1000, 64, 100),
        (5, 3001, 128, 1024),
        (67, 4099, 16, 10),
    ];
    for (c, &(queries, n, dim, k)) in cases.iter().enumerate() {
        let what = format!("{queries} queries, {n} rows of {dim}, k {k}");
        let q = descriptors(queries, dim, s + 10 * c as u64);
        let db = descriptors(n, dim, s + 10 * c as u64 + 1);
        let (ip, qn, dn) = search_inputs(&q, &db);
        let lists = Neighbours::empty(queries, k, &Device::Cpu)
            .unwrap()
            .merge_chunk(&ip, &qn, &dn)
            .unwrap();
        assert_eq!(lists.merged, n);
        assert_eq!(lists.k(), k);
        assert_eq!(lists.distances.shape(), [queries, k]);
        // exactly the spec's lists for the f32 distances
        let (want_dist, want_idx) = brute_force_top_k(&f32s(&ip), &f32s(&qn), &f32s(&dn), k);
        assert_same_lists(&lists, &want_dist, &want_idx, &what, s);
        // and a top k of the true distances: the f32 distance of unit vectors of `dim` elements
        // is off the exact one by at most dim * u for each norm, 2 * dim * u for -2 ip (worst-case
        // bounds of a dot product's rounding, |q| = |d| = 1), and 2u + 4u for the two roundings of
        // (qn + dn) - 2 ip (results up to 2 and 4): E = (4 dim + 6) u, u = 2^-24. Two rows can
        // only trade places when their exact distances are within 2E.
        let err = (4 * dim + 6) as f64 * f64::powi(2.0, -24);
        let (qv, dv) = (q.to_f64_vec().unwrap(), db.to_f64_vec().unwrap());
        let got_dist = lists.distances.to_f64_vec().unwrap();
        let got_idx = lists.indices.to_vec::<i64>().unwrap();
        for i in 0..queries {
            let exact: Vec<f64> = (0..n)
                .map(|j| {
                    (0..dim)
                        .map(|e| (qv[i * dim + e] - dv[j * dim + e]).powi(2))
                        .sum()
                })
                .collect();
            let row = &got_idx[i * k..(i + 1) * k];
            let mut taken = vec![false; n];
            for (r, &j) in row.iter().enumerate() {
                let j = usize::try_from(j).expect("every slot is filled when n >= k");
                assert!(!taken[j], "{what}: query {i}: index {j} twice (seed {s})");
                taken[j] = true;
                let d = got_dist[i * k + r];
                assert!(
                    (d - exact[j]).abs() <= err,
                    "{what}: query {i}, row {j}: distance {d}, exact {} (seed {s})",
                    exact[j]
                );
                if r > 0 {
                    let prev = exact[row[r - 1] as usize];
                    assert!(
                        prev <= exact[j] + 2.0 * err,
                        "{what}: query {i}: order at {r} (seed {s})"
                    );
                }
            }
            let worst_in = row.iter().map(|&j| exact[j as usize]).fold(0.0, f64::max);
            let best_out = (0..n)
                .filter(|&j| !taken[j])
                .map(|j| exact[j])
                .fold(f64::INFINITY, f64::min);
            assert!(
                worst_in <= best_out + 2.0 * err,
                "{what}: query {i}: a row at {best_out} was left out for one at {worst_in} (seed {s})"
            );
        }
    }
}

#[test]
fn exact_ties_go_to_the_lower_index() {
    let s = seed("knn_exact_ties_go_to_the_lower_index");
    let mut rng = vpr_engine::tensor::Rng::new(s);
    // descriptors of small integers, so that every product and sum is exact in f32; the database
    // is 40 rows repeated 5 times, so every distance occurs at least 5 times
    let (queries, base, copies, dim, k) = (6, 40, 5, 16, 23);
    let mut small =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.below(3) as f32 - 1.0).collect() };
    let base_rows = small(base * dim);
    let db: Vec<f32> = (0..copies)
        .flat_map(|_| base_rows.iter().copied())
        .collect();
    let q = Tensor::from_vec(small(queries * dim), &[queries, dim], &Device::Cpu).unwrap();
    let db = Tensor::from_vec(db, &[base * copies, dim], &Device::Cpu).unwrap();
    let (ip, qn, dn) = search_inputs(&q, &db);
    let (want_dist, want_idx) = brute_force_top_k(&f32s(&ip), &f32s(&qn), &f32s(&dn), k);
    // the case has ties, and they straddle the cut: 23 is not a multiple of 5 copies
    assert!(
        want_dist.windows(2).filter(|w| w[0] == w[1]).count() >= queries * (k - k.div_ceil(copies))
    );
    for chunk in [1, 7, 64, base * copies] {
        let lists = merge_in_chunks(&ip, &qn, &dn, k, chunk);
        assert_same_lists(
            &lists,
            &want_dist,
            &want_idx,
            &format!("chunks of {chunk}"),
            s,
        );
        let (dist, idx) = (
            f32s(&lists.distances),
            lists.indices.to_vec::<i64>().unwrap(),
        );
        for p in 1..queries * k {
            if p % k != 0 && dist[p] == dist[p - 1] {
                assert!(idx[p] > idx[p - 1], "slot {p}: tie not by lower index");
            }
        }
    }
}

#[test]
fn chunked_merges_give_the_lists_of_one_merge() {
    let s = seed("knn_chunked_merges_give_the_lists_of_one_merge");
    let (queries, n, dim) = (5, 300, 24);
    let q = descriptors(queries, dim, s);
    let db = descriptors(n, dim, s + 1);
    let (ip, qn, dn) = search_inputs(&q, &db);
    for k in [1, 10, 333] {
        let whole = merge_in_chunks(&ip, &qn, &dn, k, n);
        let want = (
            f32s(&whole.distances),
            whole.indices.to_vec::<i64>().unwrap(),
        );
        for chunk in [1, 7, 64] {
            let lists = merge_in_chunks(&ip, &qn, &dn, k, chunk);
            assert_eq!(lists.merged, n);
            assert_same_lists(
                &lists,
                &want.0,
                &want.1,
                &format!("k {k}, chunks of {chunk}"),
                s,
            );
        }
    }
}

#[test]
fn special_values_rank_after_numbers_and_fill_empty_slots() {
    // distances NaN, +inf (ip -inf), 1.5, 0 (ip +inf, clamped), 1.5 again; k 7 leaves 2 slots empty
    let ip = [f32::NAN, f32::NEG_INFINITY, 0.25, f32::INFINITY, 0.25];
    let want_dist = [
        0.0,
        1.5,
        1.5,
        f32::INFINITY,
        f32::NAN,
        f32::INFINITY,
        f32::INFINITY,
    ];
    let want_idx = [3, 2, 4, 1, 0, -1, -1];
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &device).unwrap();
        let lists = Neighbours::empty(1, 7, &device)
            .unwrap()
            .merge_chunk(&t(&ip, &[1, 5]), &t(&[1.0], &[1]), &t(&[1.0; 5], &[5]))
            .unwrap();
        assert_same_lists(&lists, &want_dist, &want_idx, &format!("{device}"), 0);
        // a chunk at distance NaN and +inf later merges behind them, and -1 never comes back
        let again = lists
            .merge_chunk(
                &t(&[f32::NAN, f32::NEG_INFINITY], &[1, 2]),
                &t(&[1.0], &[1]),
                &t(&[1.0; 2], &[2]),
            )
            .unwrap();
        let want_dist = [
            0.0,
            1.5,
            1.5,
            f32::INFINITY,
            f32::INFINITY,
            f32::NAN,
            f32::NAN,
        ];
        assert_same_lists(
            &again,
            &want_dist,
            &[3, 2, 4, 1, 6, 0, 5],
            &format!("{device} again"),
            0,
        );
    }
}

#[test]
fn empty_lists_and_empty_chunks() {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in devices {
        let lists = Neighbours::empty(3, 4, &device).unwrap();
        assert_eq!((lists.k(), lists.merged), (4, 0));
        assert_same_lists(
            &lists,
            &[f32::INFINITY; 12],
            &[-1; 12],
            &format!("{device}"),
            0,
        );
        let none = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &device).unwrap();
        let same = lists
            .merge_chunk(&none(&[3, 0]), &none(&[3]), &none(&[0]))
            .unwrap();
        assert_eq!(same.merged, 0);
        assert_same_lists(
            &same,
            &[f32::INFINITY; 12],
            &[-1; 12],
            &format!("{device} n 0"),
            0,
        );
        // no queries: nothing to keep, but the rows count as merged
        let nobody = Neighbours::empty(0, 4, &device).unwrap();
        let after = nobody
            .merge_chunk(&none(&[0, 9]), &none(&[0]), &none(&[9]))
            .unwrap();
        assert_eq!((after.merged, after.distances.shape()), (9, &[0, 4][..]));
    }
}

#[test]
fn gpus_give_the_cpu_lists_bit_for_bit() {
    let s = seed("knn_gpus_give_the_cpu_lists_bit_for_bit");
    let (queries, n, dim) = (9, 1111, 32);
    let q = descriptors(queries, dim, s);
    let db = descriptors(n, dim, s + 1);
    let (ip, qn, dn) = search_inputs(&q, &db);
    for k in [3, 100] {
        let want = merge_in_chunks(&ip, &qn, &dn, k, 400);
        let want = (f32s(&want.distances), want.indices.to_vec::<i64>().unwrap());
        for device in gpu_devices() {
            let on = |t: &Tensor| t.to_device(&device).unwrap();
            for chunk in [64, 400, n] {
                let lists = merge_in_chunks(&on(&ip), &on(&qn), &on(&dn), k, chunk);
                let what = format!("{device}, k {k}, chunks of {chunk}");
                assert_same_lists(&lists, &want.0, &want.1, &what, s);
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::knn::conformance, "knn conformance");
}

#[test]
fn conformance_rows_pass_under_shuffled_schedules() {
    let s = seed("knn_conformance_rows_pass_under_shuffled_schedules");
    let device = Device::vgpu_with(VgpuOptions::with_seed(s | 1));
    let rows = vpr_engine::ops::knn::conformance(&device, s).unwrap();
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{} {}: {:?}", r.kernel, r.shape, r.error))
        .collect();
    assert!(
        failed.is_empty(),
        "replay with VPR_TEST_SEED={s}:\n{}",
        failed.join("\n")
    );
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let cpu = Device::Cpu;
    let f = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &cpu).unwrap();
    for k in [0, MAX_K + 1] {
        let e = Neighbours::empty(2, k, &cpu).err().expect("k out of range");
        assert!(
            matches!(e, Error::Argument(_)) && e.to_string().contains(&format!("k = {k}")),
            "{e}"
        );
    }
    let lists = Neighbours::empty(3, 4, &cpu).unwrap();
    let shape_errors: [(&str, Tensor, Tensor, Tensor, &str); 4] = [
        ("queries of ip", f(&[2, 5]), f(&[3]), f(&[5]), "[2, 5]"),
        ("rank of ip", f(&[15]), f(&[3]), f(&[5]), "[15]"),
        (
            "query norms",
            f(&[3, 5]),
            f(&[2]),
            f(&[5]),
            "query_norms [2]",
        ),
        (
            "chunk norms",
            f(&[3, 5]),
            f(&[3]),
            f(&[6]),
            "chunk_norms [6]",
        ),
    ];
    for (what, ip, qn, dn, needle) in shape_errors {
        let e = lists.merge_chunk(&ip, &qn, &dn).err().expect(what);
        assert!(
            matches!(e, Error::Shape(_)) && e.to_string().contains(needle),
            "{what}: {e}"
        );
    }
    let half = Tensor::zeros(&[3, 5], DType::F16, &cpu).unwrap();
    let e = lists
        .merge_chunk(&half, &f(&[3]), &f(&[5]))
        .err()
        .expect("f16 ip");
    assert!(
        matches!(e, Error::DType(_)) && e.to_string().contains("f16"),
        "{e}"
    );
    let bad_lists = Neighbours {
        indices: Tensor::zeros(&[3, 4], DType::I32, &cpu).unwrap(),
        ..Neighbours::empty(3, 4, &cpu).unwrap()
    };
    let e = bad_lists
        .merge_chunk(&f(&[3, 5]), &f(&[3]), &f(&[5]))
        .err()
        .expect("i32 indices");
    assert!(matches!(e, Error::DType(_)), "{e}");
    let vgpu = Device::new("vgpu").unwrap();
    let on_vgpu = f(&[3, 5]).to_device(&vgpu).unwrap();
    let e = lists
        .merge_chunk(&on_vgpu, &f(&[3]), &f(&[5]))
        .err()
        .expect("ip on another device");
    assert!(
        matches!(e, Error::Device(_)) && e.to_string().contains("vgpu"),
        "{e}"
    );
    let gpu_lists = Neighbours::empty(3, 4, &vgpu).unwrap();
    let e = gpu_lists
        .merge_chunk(&on_vgpu, &f(&[3]).to_device(&vgpu).unwrap(), &f(&[5]))
        .err()
        .expect("chunk norms on another device");
    assert!(
        matches!(e, Error::Device(_)) && e.to_string().contains("chunk_norms"),
        "{e}"
    );
}
