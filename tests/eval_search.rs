//! The search of `eval` (eval::search): any tiling of queries and database chunks, from memory or a
//! memory-mapped `.npy`, gives the float64 brute-force neighbours (up to rounding of near-equal
//! distances), the same lists as any other tiling, exact ties to the lower database index, the
//! virtual GPU the CPU's lists; and errors for bad input.

mod common;

use common::seed;
use vpr_engine::eval::recall::Predictions;
use vpr_engine::eval::search::{search, DescriptorRows, SearchOptions};
use vpr_engine::io::npy::{self, MappedMatrix, Matrix};
use vpr_engine::ops::knn::MAX_K;
use vpr_engine::{Device, Error};

/// `rows` random unit vectors of `dim` coordinates (uniform, then L2-normalised), from `seed`.
fn unit_rows(rows: usize, dim: usize, seed: u64) -> Matrix {
    let mut state = seed;
    let mut next = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    let mut data = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let row: Vec<f64> = (0..dim).map(|_| next()).collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        data.extend(row.iter().map(|x| (x / norm) as f32));
    }
    Matrix {
        rows,
        cols: dim,
        data,
    }
}

fn run(
    q: &Matrix,
    db: &dyn DescriptorRows,
    k: usize,
    chunk: usize,
    qrows: usize,
    device: &Device,
) -> Predictions {
    let options = SearchOptions {
        k,
        chunk_rows: chunk,
        query_rows: qrows,
    };
    search(q, db, &options, device, &mut |_| {}).unwrap()
}

/// Squared distances in float64 of the float32 descriptors.
fn exact_distances(q: &Matrix, db: &Matrix, query: usize) -> Vec<f64> {
    let row = &q.data[query * q.cols..(query + 1) * q.cols];
    db.data
        .chunks(db.cols)
        .map(|d| {
            d.iter()
                .zip(row)
                .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                .sum()
        })
        .collect()
}

/// Float32 distances of unit vectors are within about 1e-6 of the exact ones (the sum of norms
/// rounds at 2^-23 of 2, the inner product at dim x 2^-24); lists may differ from the float64 ones
/// only where distances this close swap.
const NEAR: f64 = 1e-5;

/// `found` is a correct top-k of every query under float64 distances: the i-th found distance is
/// the i-th smallest up to NEAR, no index repeats, and the reported distances are the exact ones up
/// to NEAR.
fn assert_exact_top_k(found: &Predictions, q: &Matrix, db: &Matrix, what: &str) {
    for query in 0..q.rows {
        let exact = exact_distances(q, db, query);
        let mut sorted = exact.clone();
        sorted.sort_by(f64::total_cmp);
        let row = found.row(query);
        let mut seen = row.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            row.len(),
            "{what}: query {query} repeats an index"
        );
        for (rank, (&i, &d)) in row.iter().zip(found.distances_of(query)).enumerate() {
            assert!(
                (exact[i] - sorted[rank]).abs() <= NEAR,
                "{what}: query {query} rank {rank}: row {i} at {} but the {rank}-th nearest is at {}",
                exact[i],
                sorted[rank]
            );
            assert!(
                (d as f64 - exact[i]).abs() <= NEAR,
                "{what}: query {query} rank {rank}: distance {d}, exact {}",
                exact[i]
            );
        }
    }
}

/// The two results list the same rows, except where their distances are within NEAR (a swap of
/// near-equal distances rounded differently).
fn assert_same_lists(a: &Predictions, b: &Predictions, what: &str) {
    assert_eq!(a.k, b.k, "{what}");
    for query in 0..a.queries() {
        for (rank, ((&i, &j), (&di, &dj))) in a
            .row(query)
            .iter()
            .zip(b.row(query))
            .zip(a.distances_of(query).iter().zip(b.distances_of(query)))
            .enumerate()
        {
            assert!(
                i == j || (di as f64 - dj as f64).abs() <= NEAR,
                "{what}: query {query} rank {rank}: row {i} at {di} against row {j} at {dj}"
            );
        }
    }
}

#[test]
fn any_tiling_gives_the_float64_neighbours() {
    let s = seed("any_tiling_gives_the_float64_neighbours");
    let (q, db) = (unit_rows(37, 24, s), unit_rows(1000, 24, s + 1));
    let whole = run(&q, &db, 20, 1000, 37, &Device::Cpu);
    assert_exact_top_k(&whole, &q, &db, "one tile");
    for (chunk, qrows) in [(7, 5), (64, 16), (999, 1), (4096, 1024)] {
        let tiled = run(&q, &db, 20, chunk, qrows, &Device::Cpu);
        let what = format!("chunks of {chunk}, {qrows} queries a tile");
        assert_exact_top_k(&tiled, &q, &db, &what);
        assert_same_lists(&tiled, &whole, &what);
    }
}

#[test]
fn exact_ties_go_to_the_lower_database_index_across_chunks() {
    let s = seed("exact_ties_go_to_the_lower_database_index_across_chunks");
    let mut db = unit_rows(300, 16, s);
    // rows 150.. repeat rows 0..150, so every distance comes twice, 150 rows apart
    let (head, tail) = db.data.split_at_mut(150 * 16);
    tail.copy_from_slice(head);
    // the queries are database rows themselves: each is its own nearest neighbour, twice
    let q = Matrix {
        rows: 5,
        cols: 16,
        data: [3, 77, 149, 0, 42]
            .iter()
            .flat_map(|&r| db.data[r * 16..(r + 1) * 16].to_vec())
            .collect(),
    };
    let mut devices = vec![Device::Cpu];
    devices.extend(Device::new("vgpu"));
    for device in &devices {
        for chunk in [7, 150, 300] {
            let found = run(&q, &db, 10, chunk, 2, device);
            for query in 0..q.rows {
                let (row, d) = (found.row(query), found.distances_of(query));
                for pair in 0..5 {
                    let (a, b) = (row[2 * pair], row[2 * pair + 1]);
                    assert_eq!(
                        (b, d[2 * pair]),
                        (a + 150, d[2 * pair + 1]),
                        "{device}, chunks of {chunk}: query {query} pair {pair} of {row:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_virtual_gpu_finds_the_cpu_neighbours() {
    let s = seed("the_virtual_gpu_finds_the_cpu_neighbours");
    let (q, db) = (unit_rows(9, 16, s), unit_rows(150, 16, s + 1));
    let vgpu = Device::new("vgpu").unwrap();
    let cpu = run(&q, &db, 12, 64, 4, &Device::Cpu);
    for (chunk, qrows) in [(150, 9), (37, 4)] {
        let on_gpu = run(&q, &db, 12, chunk, qrows, &vgpu);
        let what = format!("vgpu, chunks of {chunk}, {qrows} queries a tile");
        assert_exact_top_k(&on_gpu, &q, &db, &what);
        assert_same_lists(&on_gpu, &cpu, &what);
    }
}

#[test]
fn a_mapped_npy_database_gives_the_in_memory_lists() {
    let s = seed("a_mapped_npy_database_gives_the_in_memory_lists");
    let (q, db) = (unit_rows(11, 8, s), unit_rows(500, 8, s + 1));
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("eval-search-db.npy");
    npy::write(&path, &db).unwrap();
    let mapped = MappedMatrix::open(&path).unwrap();
    let from_file = run(&q, &mapped, 20, 33, 4, &Device::Cpu);
    let in_memory = run(&q, &db, 20, 33, 4, &Device::Cpu);
    assert_eq!(from_file.indices, in_memory.indices);
    assert_eq!(from_file.distances, in_memory.distances);
}

#[test]
fn a_database_smaller_than_k_is_listed_whole() {
    let s = seed("a_database_smaller_than_k_is_listed_whole");
    let (q, db) = (unit_rows(3, 8, s), unit_rows(6, 8, s + 1));
    let found = run(&q, &db, 20, 4, 2, &Device::Cpu);
    assert_eq!(found.k, 6);
    assert_exact_top_k(&found, &q, &db, "6 database rows, k 20");
}

#[test]
fn bad_searches_are_errors() {
    let (q, db) = (unit_rows(3, 8, 1), unit_rows(6, 4, 2));
    let options = |k, chunk_rows, query_rows| SearchOptions {
        k,
        chunk_rows,
        query_rows,
    };
    let cases: [(&Matrix, &Matrix, SearchOptions, &str); 5] = [
        (
            &q,
            &db,
            options(5, 4, 4),
            "8 dimensions, database descriptors 4",
        ),
        (&q, &q, options(0, 4, 4), "0 neighbours"),
        (&q, &q, options(MAX_K + 1, 4, 4), "1025 neighbours"),
        (&q, &q, options(5, 0, 4), "empty search tiles"),
        (
            &q,
            &Matrix {
                rows: 0,
                cols: 8,
                data: vec![],
            },
            options(5, 4, 4),
            "0 database descriptors",
        ),
    ];
    for (queries, database, opts, needle) in cases {
        let err = search(queries, database, &opts, &Device::Cpu, &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, Error::Shape(_) | Error::Argument(_)) && err.to_string().contains(needle),
            "{opts:?}: {err}"
        );
    }
}

/// Writes rows `[rows, len, dim]` to a `.npy` for `rerank`.
fn local_file(name: &str, maps: &[Vec<Vec<f32>>]) -> MappedMatrix {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let (len, dim) = (maps[0].len(), maps[0][0].len());
    let mut writer = npy::RowWriter::create(&path, &[maps.len(), len, 1, dim]).unwrap();
    let values: Vec<f32> = maps.iter().flatten().flatten().copied().collect();
    writer.write_rows(0, &values).unwrap();
    writer.commit().unwrap();
    MappedMatrix::open_rows(&path).unwrap()
}

#[test]
fn reranking_orders_candidates_by_mutual_matches_keeping_ties_in_global_order() {
    use vpr_engine::eval::rerank::rerank;
    let one_hot = |i: usize| -> Vec<f32> { (0..8).map(|j| (i == j) as u8 as f32).collect() };
    // the query's six positions are e0..e5; a candidate whose first m positions are e0..e(m-1)
    // and the rest e7 (orthogonal to every query position) has m mutual matches (the others
    // all point at position 0, which points back at position 0 only), and SelaVPR counts a
    // single match as none
    let query: Vec<Vec<f32>> = (0..6).map(one_hot).collect();
    let candidate = |m: usize| -> Vec<Vec<f32>> {
        (0..6).map(|i| one_hot(if i < m { i } else { 7 })).collect()
    };
    let matches = [2, 5, 0, 3, 5, 1, 4];
    let database: Vec<Vec<Vec<f32>>> = matches.iter().map(|&m| candidate(m)).collect();
    let queries = local_file("rerank-queries.npy", &[query.clone(), query]);
    let database = local_file("rerank-database.npy", &database);
    // query 0 lists the database in order, query 1 in reverse; the last two stay below k = 5
    let predictions = Predictions::new(
        7,
        (0..7).chain((0..7).rev()).collect(),
        (0..14).map(|i| i as f32).collect(),
    )
    .unwrap();
    let mut devices = vec![Device::Cpu];
    devices.extend(Device::new("vgpu"));
    for device in &devices {
        let got = rerank(&predictions, 5, &queries, &database, device, &mut |_| {}).unwrap();
        // counts of rows 0..5: 2, 5, 0, 3, 5 -> rows 1 and 4 (tied, global order), 3, 0, 2
        assert_eq!(got.row(0), [1, 4, 3, 0, 2, 5, 6], "{device}");
        assert_eq!(got.distances_of(0), [1.0, 4.0, 3.0, 0.0, 2.0, 5.0, 6.0]);
        // rows 6, 5, 4, 3, 2 have counts 4, 0 (a single match), 5, 3, 0
        assert_eq!(got.row(1), [4, 6, 3, 5, 2, 1, 0], "{device}");
    }
}
