//! Exact k-nearest-neighbour search, ours against faiss `IndexFlatL2` on the same machine in the
//! same run (`VPR_BENCH_PYTHON`, default `python3`, with `faiss-cpu` installed), on random
//! L2-normalised float32 descriptors: the database is a `.npy` file that both sides read (ours
//! memory-maps it and streams it in chunks). Prints the median search time, the ratio, how many
//! queries got the same top-k list from both, and the memory our tiles take. A GPU, when there is
//! one, runs the same searches against our CPU figure.
//!
//! `cargo bench --bench search` (`-- small` for the first case only)

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use vpr_engine::eval::recall::Predictions;
use vpr_engine::eval::search::{self, SearchOptions};
use vpr_engine::io::npy::{self, MappedMatrix, Matrix};
use vpr_engine::{Device, Result};

const K: usize = 20;

struct Case {
    queries: usize,
    database: usize,
    dim: usize,
    repeats: usize,
}

const CASES: [Case; 2] = [
    Case {
        queries: 1_000,
        database: 100_000,
        dim: 512,
        repeats: 3,
    },
    Case {
        queries: 10_000,
        database: 1_000_000,
        dim: 256,
        repeats: 1,
    },
];

/// `rows` random unit vectors (normal coordinates, then L2-normalised), from `seed`.
fn unit_rows(rows: usize, dim: usize, seed: u64) -> Matrix {
    let mut state = seed;
    let mut uniform = || {
        // splitmix64
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut data = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let row: Vec<f64> = (0..dim)
            .map(|_| {
                // Box-Muller
                let (u, v) = (uniform().max(1e-300), uniform());
                (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
            })
            .collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        data.extend(row.iter().map(|x| (x / norm) as f32));
    }
    Matrix {
        rows,
        cols: dim,
        data,
    }
}

fn ours(
    queries: &Matrix,
    database: &MappedMatrix,
    device: &Device,
    repeats: usize,
) -> Result<(f64, Predictions)> {
    let options = SearchOptions::for_device(device, K);
    let mut times = Vec::new();
    let mut found = None;
    for _ in 0..repeats {
        let start = Instant::now();
        found = Some(search::search(
            queries,
            database,
            &options,
            device,
            &mut |_| {},
        )?);
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], found.expect("at least one repeat")))
}

fn faiss(
    queries: &Path,
    database: &Path,
    threads: usize,
    repeats: usize,
    out: &Path,
) -> std::result::Result<f64, String> {
    let python = std::env::var("VPR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/search.py");
    let output = Command::new(&python)
        .arg(script)
        .args([queries, database])
        .args([K, threads, repeats].map(|v| v.to_string()))
        .arg(out)
        .output()
        .map_err(|e| format!("{python}: {e}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("ms_per_search=")?.parse().ok())
        .ok_or_else(|| {
            format!(
                "{python} {script}: {}",
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .last()
                    .unwrap_or("no output")
            )
        })
}

/// The share of queries whose top-k lists are the same in both results.
fn same_lists(ours: &Predictions, theirs: &Path) -> Result<f64> {
    let theirs = npy::read(theirs)?;
    let same = (0..ours.queries())
        .filter(|&q| {
            let row = &theirs.data[q * K..(q + 1) * K];
            ours.row(q).iter().zip(row).all(|(&a, &b)| a as f32 == b)
        })
        .count();
    Ok(same as f64 / ours.queries() as f64)
}

fn main() -> Result<()> {
    let small_only = std::env::args().any(|a| a == "small");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir: PathBuf =
        std::env::temp_dir().join(format!("vpr-search-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| vpr_engine::Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let gpu = match Device::new("cuda") {
        Ok(d) => Some(d),
        Err(e) => {
            println!("(GPU part skipped: {e})");
            // set by tools/gpu_bundle.sh on the GPU machine, where a skip is a failure
            if std::env::var("VPR_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                std::process::exit(1);
            }
            None
        }
    };
    println!("exact L2 search, top {K}, float32, {threads} threads; median times");
    for (i, case) in CASES.iter().enumerate() {
        if small_only && i > 0 {
            break;
        }
        let queries = unit_rows(case.queries, case.dim, 1 + i as u64);
        let database_path = dir.join(format!("database-{i}.npy"));
        let queries_path = dir.join(format!("queries-{i}.npy"));
        npy::write(&queries_path, &queries)?;
        npy::write(
            &database_path,
            &unit_rows(case.database, case.dim, 100 + i as u64),
        )?;
        let database = MappedMatrix::open(&database_path)?;
        let options = SearchOptions::for_device(&Device::Cpu, K);
        let tiles_mb = 4.0
            * (case.queries * case.dim
                + options.chunk_rows * case.dim
                + options.query_rows * options.chunk_rows
                + case.queries * K * 3) as f64
            / 1e6;
        println!(
            "{} queries x {} database, dim {}: our tiles hold {tiles_mb:.0} MB (database {:.0} MB, mapped)",
            case.queries,
            case.database,
            case.dim,
            4.0 * (case.database * case.dim) as f64 / 1e6
        );
        let (cpu_ms, found) = ours(&queries, &database, &Device::Cpu, case.repeats)?;
        let faiss_out = dir.join(format!("faiss-{i}.npy"));
        match faiss(
            &queries_path,
            &database_path,
            threads,
            case.repeats,
            &faiss_out,
        ) {
            Ok(ms) => println!(
                "  cpu   ours {cpu_ms:>9.1} ms   faiss {ms:>9.1} ms   faiss/ours {:.2}x   same top-{K} lists {:.1}%",
                ms / cpu_ms,
                100.0 * same_lists(&found, &faiss_out)?
            ),
            Err(e) => println!("  cpu   ours {cpu_ms:>9.1} ms   (faiss unavailable: {e})"),
        }
        if let Some(gpu) = &gpu {
            let (gpu_ms, on_gpu) = ours(&queries, &database, gpu, case.repeats)?;
            let same = (0..found.queries())
                .filter(|&q| found.row(q) == on_gpu.row(q))
                .count();
            println!(
                "  cuda  ours {gpu_ms:>9.1} ms   cpu/cuda {:.2}x   same top-{K} lists as the cpu {:.1}%",
                cpu_ms / gpu_ms,
                100.0 * same as f64 / found.queries() as f64
            );
        }
        for f in [&database_path, &queries_path, &faiss_out] {
            let _ = std::fs::remove_file(f);
        }
    }
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}
