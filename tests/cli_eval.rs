//! `vpr-engine eval` end to end: the tiny converted CosPlace ResNet-18
//! (tests/fixtures/cnn_cosplace_resnet18.safetensors) on the geo-tagged test set
//! tests/fixtures/eval_dataset/ against PyTorch's float64 descriptors searched exactly in float64
//! with 25 m positives (tests/fixtures/eval_e2e.expected.safetensors, written by
//! tools/fixtures/eval_e2e.py), on the CPU and the virtual GPU, from the model and from saved
//! descriptors; and every kind of bad input: one line on standard error, exit code 2.

mod common;

use common::vpr_engine;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use vpr_engine::io::npy::{self, Matrix};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("cnn_cosplace_resnet18.safetensors")
}

fn dataset() -> PathBuf {
    fixtures().join("eval_dataset")
}

/// A fresh folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-eval-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What PyTorch and a float64 search give for the fixture test set.
struct Expected {
    line: String,
    /// [queries][20] database rows, nearest first, and their squared distances.
    predictions: Vec<Vec<usize>>,
    distances: Vec<Vec<f64>>,
    positives: Vec<Vec<usize>>,
}

fn expected() -> Expected {
    let bytes = std::fs::read(fixtures().join("eval_e2e.expected.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let rows = |name: &str| -> Vec<Vec<f64>> {
        let t = st.tensor(name).unwrap();
        let values: Vec<f64> = t
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        values.chunks(t.shape()[1]).map(|r| r.to_vec()).collect()
    };
    Expected {
        line: meta["line"].clone(),
        predictions: rows("predictions")
            .into_iter()
            .map(|r| r.into_iter().map(|i| i as usize).collect())
            .collect(),
        distances: rows("distances"),
        positives: meta["positives"]
            .split('\n')
            .map(|l| l.split_whitespace().map(|i| i.parse().unwrap()).collect())
            .collect(),
    }
}

/// The sorted images of one folder of the fixture test set.
fn images(part: &str) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dataset().join(part))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// The rows of a predictions CSV after its header, split on commas (the fixture's paths have
/// none).
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("query,rank,prediction,distance,positive")
    );
    lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

/// The CSV lists PyTorch's 20 nearest images of every query, in order, with their distances and
/// positives.
fn check_predictions_csv(csv: &Path, want: &Expected) {
    let (queries, database) = (images("queries"), images("database"));
    let rows = csv_rows(csv);
    assert_eq!(rows.len(), queries.len() * 20);
    for (q, query) in queries.iter().enumerate() {
        for rank in 0..20 {
            let row = &rows[q * 20 + rank];
            let index = want.predictions[q][rank];
            assert_eq!(row[0], query.display().to_string(), "query {q}");
            assert_eq!(row[1], (rank + 1).to_string());
            assert_eq!(
                row[2],
                database[index].display().to_string(),
                "query {q} rank {rank}"
            );
            let distance: f64 = row[3].parse().unwrap();
            let exact = want.distances[q][rank];
            assert!(
                (distance - exact).abs() <= 1e-5 * exact.max(1.0),
                "query {q} rank {rank}: distance {distance}, PyTorch {exact}"
            );
            let positive = want.positives[q].contains(&index);
            assert_eq!(row[4], positive.to_string(), "query {q} rank {rank}");
        }
    }
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|b| b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

#[test]
fn recalls_and_predictions_match_pytorch_on_the_cpu_with_every_output() {
    let want = expected();
    let dir = temp_dir("cpu");
    let csv = dir.join("predictions.csv");
    let pictures = dir.join("pictures");
    let saved = dir.join("descriptors");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, stdout, stderr) = vpr_engine(&[
        "eval",
        "--weights",
        &s(&model()),
        "--dataset",
        &s(&dataset()),
        "--device",
        "cpu",
        "--batch-size",
        "3",
        "--save-predictions",
        &s(&csv),
        "--save-pictures",
        &s(&pictures),
        "--num-pictures",
        "4",
        "--save-descriptors",
        &s(&saved),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, format!("{}\n", want.line));
    assert!(
        stderr.contains("9 queries (1 without a positive within 25 m), 24 database images"),
        "{stderr}"
    );
    check_predictions_csv(&csv, &want);
    let mut drawn: Vec<String> = std::fs::read_dir(&pictures)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    drawn.sort();
    assert_eq!(
        drawn,
        [
            "query_000.png",
            "query_001.png",
            "query_002.png",
            "query_003.png",
            "recall.png"
        ]
    );
    assert!(drawn.iter().all(|f| is_png(&pictures.join(f))));

    // the saved descriptors evaluate to the same recalls without the model; pictures of the
    // queries whose first prediction is wrong
    let wrong = dir.join("wrong");
    let (code, stdout, stderr) = vpr_engine(&[
        "eval",
        "--query-descriptors",
        &s(&saved.join("queries.npy")),
        "--database-descriptors",
        &s(&saved.join("database.npy")),
        "--dataset",
        &s(&dataset()),
        "--device",
        "cpu",
        "--save-pictures",
        &s(&wrong),
        "--wrong-only",
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, format!("{}\n", want.line));
    let mut drawn: Vec<String> = std::fs::read_dir(&wrong)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    drawn.sort();
    let mut expected_files: Vec<String> = (0..want.predictions.len())
        .filter(|&q| !want.positives[q].contains(&want.predictions[q][0]))
        .map(|q| format!("query_{q:03}.png"))
        .collect();
    expected_files.push("recall.png".into());
    assert!(expected_files.len() > 2, "{expected_files:?}");
    assert_eq!(drawn, expected_files);
}

#[test]
fn recalls_and_predictions_match_pytorch_on_the_virtual_gpu() {
    let want = expected();
    let dir = temp_dir("vgpu");
    let csv = dir.join("predictions.csv");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (code, stdout, stderr) = vpr_engine(&[
        "eval",
        "--weights",
        &s(&model()),
        "--database-folder",
        &s(&dataset().join("database")),
        "--queries-folder",
        &s(&dataset().join("queries")),
        "--device",
        "vgpu",
        "--save-predictions",
        &s(&csv),
    ]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(stdout, format!("{}\n", want.line));
    check_predictions_csv(&csv, &want);
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let dir = temp_dir("bad-inputs");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    // a test set without queries/, one with an empty queries/, one with a name without coordinates
    let no_queries = dir.join("no-queries");
    std::fs::create_dir_all(no_queries.join("database")).unwrap();
    let empty_queries = dir.join("empty-queries");
    std::fs::create_dir_all(empty_queries.join("queries")).unwrap();
    let unnamed = dir.join("unnamed");
    for part in ["database", "queries"] {
        std::fs::create_dir_all(unnamed.join(part)).unwrap();
        std::fs::create_dir_all(empty_queries.join(part)).unwrap();
        for image in images(part) {
            let name = image.file_name().unwrap();
            std::fs::copy(&image, unnamed.join(part).join(name)).unwrap();
            if part == "database" {
                std::fs::copy(&image, empty_queries.join(part).join(name)).unwrap();
                std::fs::copy(&image, no_queries.join(part).join(name)).unwrap();
            }
        }
    }
    let first_query = &images("queries")[0];
    std::fs::copy(first_query, unnamed.join("queries/street.jpg")).unwrap();
    // descriptors of the wrong dimension and of the wrong number of rows
    let (q, db) = (images("queries").len(), images("database").len());
    let write = |name: &str, rows: usize, cols: usize| {
        let path = dir.join(name);
        let data = (0..rows * cols).map(|i| i as f32).collect();
        npy::write(&path, &Matrix { rows, cols, data }).unwrap();
        s(&path)
    };
    let (q8, db8, db4, q7) = (
        write("q8.npy", q, 8),
        write("db8.npy", db, 8),
        write("db4.npy", db, 4),
        write("q7.npy", q - 2, 8),
    );
    let (model, data) = (s(&model()), s(&dataset()));
    let with_model = |set: &Path| {
        vec![
            "--weights".to_string(),
            model.clone(),
            "--dataset".into(),
            s(set),
        ]
    };
    let with_files = |queries: &str, database: &str| {
        [
            "--query-descriptors",
            queries,
            "--database-descriptors",
            database,
            "--dataset",
            &data,
        ]
        .map(String::from)
        .to_vec()
    };
    let plus = |mut base: Vec<String>, extra: &[&str]| {
        base.extend(extra.iter().map(|e| e.to_string()));
        base
    };
    let cases: Vec<(Vec<String>, String)> = vec![
        (with_model(&no_queries), "queries".into()),
        (
            with_model(&empty_queries),
            "no .jpg, .jpeg or .png image under".into(),
        ),
        (with_model(&unnamed), "street.jpg".into()),
        (with_model(&dir.join("missing")), "missing".into()),
        (with_files(&q8, &db4), "dimensions".into()),
        (with_files(&q7, &db8), "q7.npy".into()),
        (
            plus(with_files(&q8, &db8), &["--recall-values", "5,1"]),
            "--recall-values".into(),
        ),
        (
            plus(with_files(&q8, &db8), &["--recall-values", "0"]),
            "--recall-values".into(),
        ),
        (
            plus(with_files(&q8, &db8), &["--positive-dist-threshold", "-1"]),
            "--positive-dist-threshold".into(),
        ),
        (
            plus(
                with_files(&q8, &db8),
                &["--save-predictions", &s(&dir.join("no/p.csv"))],
            ),
            "--save-predictions".into(),
        ),
        (
            plus(with_model(&dataset()), &["--device", "tpu"]),
            "unknown device 'tpu'".into(),
        ),
        (
            plus(with_model(&dataset()), &["--rerank", "5"]),
            "has no local features".into(),
        ),
        (
            plus(with_model(&dataset()), &["--rerank", "0"]),
            "--rerank 0".into(),
        ),
        (
            plus(with_files(&q8, &db8), &["--rerank", "5"]),
            "needs --query-local and --database-local".into(),
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["eval".to_string()];
        if !args.iter().any(|a| a == "--device") {
            all.extend(["--device".to_string(), "cpu".into()]);
        }
        all.extend(args.iter().cloned());
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = vpr_engine(&all);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.starts_with("error: ")
                && stderr.lines().count() == 1
                && stderr.contains(&needle),
            "{args:?}: expected one line with {needle:?}, got {stderr:?}"
        );
        assert_eq!(stdout, "", "{args:?}");
    }
}

/// The CSV's predictions: for each query, its database paths in rank order.
fn ranked(csv: &Path) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = Vec::new();
    for row in csv_rows(csv) {
        if row[1] == "1" {
            out.push(Vec::new());
        }
        out.last_mut().unwrap().push(row[2].clone());
    }
    out
}

#[test]
fn selavpr_local_features_and_reranking_end_to_end() {
    let dir = temp_dir("rerank");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let model = s(&fixtures().join("vit_selavpr.safetensors"));
    // extract --local: the maps of every image, [N, 61, 61, 8] at SelaVPR's 224 x 224
    for part in ["database", "queries"] {
        let (code, stdout, stderr) = vpr_engine(&[
            "extract",
            "--weights",
            &model,
            "--images",
            &s(&dataset().join(part)),
            "--out",
            &s(&dir.join(format!("{part}.npy"))),
            "--local",
            &s(&dir.join(format!("{part}_local.npy"))),
            "--device",
            "cpu",
        ]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let local = npy::MappedMatrix::open_rows(&dir.join(format!("{part}_local.npy"))).unwrap();
        assert_eq!(local.shape, [images(part).len(), 61, 61, 8]);
        // unit vectors at every location
        let first = local.read_rows(0, 1);
        for v in first.chunks(8) {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        }
    }
    // the global search alone, then re-ranked from the model and from the saved files
    let run = |extra: &[&str], csv: &str| {
        let mut args = vec![
            "eval".to_string(),
            "--dataset".into(),
            s(&dataset()),
            "--device".into(),
            "cpu".into(),
            "--save-predictions".into(),
            s(&dir.join(csv)),
        ];
        args.extend(extra.iter().map(|e| e.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = vpr_engine(&args);
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        (stdout, stderr, ranked(&dir.join(csv)))
    };
    let (plain, _, global) = run(&["--weights", &model], "global.csv");
    let kept = dir.join("kept");
    let (from_model, stderr, reranked) = run(
        &[
            "--weights",
            &model,
            "--rerank",
            "5",
            "--local-dir",
            &s(&kept),
        ],
        "model.csv",
    );
    assert!(
        stderr.contains(&format!("before re-ranking: {}", plain.trim())),
        "{stderr}"
    );
    let (from_files, _, reranked_files) = run(
        &[
            "--query-descriptors",
            &s(&dir.join("queries.npy")),
            "--database-descriptors",
            &s(&dir.join("database.npy")),
            "--rerank",
            "5",
            "--query-local",
            &s(&dir.join("queries_local.npy")),
            "--database-local",
            &s(&dir.join("database_local.npy")),
        ],
        "files.csv",
    );
    assert_eq!(from_files, from_model);
    assert_eq!(reranked_files, reranked);
    assert!(kept.join("queries_local.npy").is_file() && kept.join("database_local.npy").is_file());
    let mut moved = 0;
    for (g, r) in global.iter().zip(&reranked) {
        // the first 5 are the global top 5 in another order, the rest as they were
        let (mut a, mut b) = (g[..5].to_vec(), r[..5].to_vec());
        moved += (a != b) as usize;
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(g[5..], r[5..]);
    }
    assert!(moved > 0, "re-ranking changed no query's order");
}
