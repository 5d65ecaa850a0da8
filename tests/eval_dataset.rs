//! Geo-tagged datasets, positives, Recall@N and the predictions CSV of `vpr-engine eval`,
//! against VPR-methods-evaluation's numbers (tests/fixtures/eval, written by
//! tools/fixtures/eval_recall.py with scikit-learn) and brute-force references.

mod common;

use std::path::{Path, PathBuf};
use vpr_engine::eval::dataset::{list_folder, EvalDataset};
use vpr_engine::eval::predictions::write_csv;
use vpr_engine::eval::recall::{format_recalls, recall_curve, recalls, Predictions};
use vpr_engine::tensor::Rng;
use vpr_engine::Error;

/// A fresh folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-dataset-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Creates an empty file (the dataset code reads names only), with its folders.
fn touch(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"").unwrap();
}

/// A file name in the dataset tools' format for a position.
fn utm_name(east: f64, north: f64, tag: &str) -> String {
    format!("@{east:010.2}@{north:010.2}@10@S@37.0@-122.0@@@@@@@{tag}@.jpg")
}

fn fixture_lines(file: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/eval")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tools/fixtures/eval_recall.py)",
            path.display()
        )
    });
    text.lines().map(str::to_string).collect()
}

fn numbers<T: std::str::FromStr>(line: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    line.split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// Database indices within `radius` of each query by checking every pair (the definition).
fn brute_force_positives(dataset: &EvalDataset, radius: f64) -> Vec<Vec<usize>> {
    dataset
        .queries_utm
        .iter()
        .map(|q| {
            (0..dataset.database_utm.len())
                .filter(|&i| {
                    let d = dataset.database_utm[i];
                    let (dx, dy) = (q[0] - d[0], q[1] - d[1]);
                    dx * dx + dy * dy <= radius * radius
                })
                .collect()
        })
        .collect()
}

/// A dataset of positions only (the paths are placeholders).
fn positions(database_utm: Vec<[f64; 2]>, queries_utm: Vec<[f64; 2]>) -> EvalDataset {
    EvalDataset {
        database: (0..database_utm.len())
            .map(|i| PathBuf::from(format!("d{i}.jpg")))
            .collect(),
        queries: (0..queries_utm.len())
            .map(|i| PathBuf::from(format!("q{i}.jpg")))
            .collect(),
        database_utm,
        queries_utm,
    }
}

#[test]
fn positives_and_recalls_match_vpr_methods_evaluation() {
    let dir = temp_dir("fixture");
    let database_names = fixture_lines("database.txt");
    let query_names = fixture_lines("queries.txt");
    // written in reverse so that the listing has to sort them
    for name in database_names.iter().rev() {
        touch(&dir.join("database").join(name));
    }
    for name in query_names.iter().rev() {
        touch(&dir.join("queries").join(name));
    }
    let dataset = EvalDataset::open(&dir).unwrap();
    let listed = |paths: &[PathBuf]| -> Vec<String> {
        let names = paths
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap());
        names.map(str::to_string).collect()
    };
    assert_eq!(listed(&dataset.database), database_names);
    assert_eq!(listed(&dataset.queries), query_names);

    for radius in [25, 10, 0] {
        let want: Vec<Vec<usize>> = fixture_lines(&format!("positives_{radius}.txt"))
            .iter()
            .map(|line| numbers(line))
            .collect();
        let got = dataset.positives(radius as f64).unwrap();
        assert_eq!(got.len(), want.len());
        for (q, (got, want)) in got.iter().zip(&want).enumerate() {
            assert_eq!(got, want, "positives within {radius} m of query {q}");
        }
    }

    let rows: Vec<Vec<usize>> = fixture_lines("predictions.txt")
        .iter()
        .map(|line| numbers(line))
        .collect();
    let k = rows[0].len();
    let indices: Vec<usize> = rows.concat();
    let distances = vec![0.0; indices.len()];
    let predictions = Predictions::new(k, indices, distances).unwrap();
    let positives = dataset.positives(25.0).unwrap();
    let expected = fixture_lines("recalls.txt");
    assert_eq!(expected.len(), 9, "three recall lists of three lines");
    for case in expected.chunks(3) {
        let ns: Vec<usize> = numbers(case[0].strip_prefix("ns: ").unwrap());
        let want: Vec<f64> = numbers(&case[1]);
        let got = recalls(&predictions, &positives, &ns).unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&got),
            bits(&want),
            "recalls at {ns:?}: {got:?} != {want:?}"
        );
        assert_eq!(format_recalls(&ns, &got), case[2]);
        if ns.len() == k {
            assert_eq!(recall_curve(&predictions, &positives).unwrap(), want);
        }
    }
}

#[test]
fn recall_prints_like_python_for_every_count() {
    let lines = fixture_lines("format.txt");
    assert!(lines.len() > 1000);
    for line in lines {
        let fields: Vec<&str> = line.split(' ').collect();
        let (count, queries): (usize, usize) =
            (fields[0].parse().unwrap(), fields[1].parse().unwrap());
        // one query in `queries`, found `count` times out of them
        let predictions = Predictions::new(1, vec![0; queries], vec![0.0; queries]).unwrap();
        let positives: Vec<Vec<usize>> = (0..queries)
            .map(|q| if q < count { vec![0] } else { vec![] })
            .collect();
        let value = recalls(&predictions, &positives, &[1]).unwrap();
        assert_eq!(
            format_recalls(&[1], &value),
            format!("R@1: {}", fields[2]),
            "{line}"
        );
    }
}

#[test]
fn grid_positives_equal_the_brute_force_loop() {
    let seed = common::seed("grid_positives_equal_the_brute_force_loop");
    let mut rng = Rng::new(seed);
    // whole metres on a small patch: many pairs exactly at the radius (3/4/5, 15/20/25 ...),
    // duplicates and queries on database points
    let lattice = |rng: &mut Rng, n: usize| -> Vec<[f64; 2]> {
        let mut c = || rng.below(60) as f64 - 20.0;
        (0..n).map(|_| [c(), c()]).collect()
    };
    let database = lattice(&mut rng, 1500);
    let mut queries = lattice(&mut rng, 200);
    queries.extend_from_slice(&database[..20]);
    let dataset = positions(database, queries);
    for radius in [0.0, 1.0, 5.0, 10.0, 25.0, 0.5, 100.0] {
        let got = dataset.positives(radius).unwrap();
        assert_eq!(
            got,
            brute_force_positives(&dataset, radius),
            "lattice, radius {radius}, seed {seed}"
        );
    }
    let at_radius = dataset.positives(5.0).unwrap();
    let exact = (0..dataset.queries_utm.len()).any(|q| {
        at_radius[q].iter().any(|&d| {
            let (a, b) = (dataset.queries_utm[q], dataset.database_utm[d]);
            (a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) == 25.0 && a[0] != b[0] && a[1] != b[1]
        })
    });
    assert!(exact, "no pair at exactly 3/4/5 was generated, seed {seed}");

    // UTM-sized coordinates with two decimals, and some database points copied with
    // offsets of exactly 25 m in decimal
    let utm = |rng: &mut Rng| {
        let cents = |x: f64| (x * 100.0).round() / 100.0;
        [
            cents(552_000.0 + rng.uniform() * 800.0),
            cents(4_180_000.0 + rng.uniform() * 800.0),
        ]
    };
    let mut database: Vec<[f64; 2]> = (0..3000).map(|_| utm(&mut rng)).collect();
    let queries: Vec<[f64; 2]> = (0..300).map(|_| utm(&mut rng)).collect();
    for q in &queries[..100] {
        let cents = |x: f64| (x * 100.0).round() / 100.0;
        database.push([cents(q[0] + 8.8), cents(q[1] - 23.4)]);
        database.push([cents(q[0] - 15.0), cents(q[1] + 20.0)]);
    }
    let dataset = positions(database, queries);
    for radius in [25.0, 10.0, 0.0, 3.7] {
        let got = dataset.positives(radius).unwrap();
        assert_eq!(
            got,
            brute_force_positives(&dataset, radius),
            "UTM, radius {radius}, seed {seed}"
        );
    }
}

#[test]
fn both_layouts_are_found() {
    for layout in ["", "images/test/"] {
        let dir = temp_dir(&format!("layout-{}", layout.len()));
        touch(&dir.join(format!("{layout}database/b/{}", utm_name(10.0, 20.0, "1"))));
        touch(&dir.join(format!(
            "{layout}database/a/{}",
            utm_name(30.5, -40.25, "2")
        )));
        touch(&dir.join(format!("{layout}database/notes.txt")));
        touch(&dir.join(format!("{layout}queries/{}", utm_name(10.0, 45.0, "3"))));
        let dataset = EvalDataset::open(&dir).unwrap();
        let base = dir.join(layout);
        assert_eq!(
            dataset.database,
            vec![
                base.join("database/a").join(utm_name(30.5, -40.25, "2")),
                base.join("database/b").join(utm_name(10.0, 20.0, "1")),
            ]
        );
        assert_eq!(dataset.database_utm, vec![[30.5, -40.25], [10.0, 20.0]]);
        assert_eq!(dataset.queries_utm, vec![[10.0, 45.0]]);
        assert_eq!(dataset.positives(25.0).unwrap(), vec![vec![1]]);
    }
}

#[test]
fn folder_names_with_at_signs_do_not_matter() {
    let dir = temp_dir("at@folder@1@2@");
    touch(&dir.join("data@x/database/@5@6@.jpg"));
    touch(&dir.join("data@x/queries/q@7/@8.5@-9@.png"));
    let dataset = EvalDataset::open(&dir.join("data@x")).unwrap();
    assert_eq!(dataset.database_utm, vec![[5.0, 6.0]]);
    assert_eq!(dataset.queries_utm, vec![[8.5, -9.0]]);
}

#[test]
fn a_missing_or_empty_folder_is_one_clear_error() {
    let dir = temp_dir("missing");
    let message = |result: vpr_engine::Result<EvalDataset>| result.unwrap_err().to_string();

    let nothing = message(EvalDataset::open(&dir.join("absent")));
    assert!(nothing.contains("absent"), "{nothing}");

    let neither = message(EvalDataset::open(&dir));
    assert!(
        neither.contains("database/ and queries/") && neither.contains("images/test"),
        "{neither}"
    );

    touch(&dir.join("database").join(utm_name(1.0, 2.0, "d")));
    let no_queries = EvalDataset::open(&dir).unwrap_err();
    assert!(matches!(no_queries, Error::Io { .. }), "{no_queries}");
    assert!(no_queries
        .to_string()
        .contains(&format!("{}", dir.join("queries").display())));

    std::fs::create_dir_all(dir.join("queries")).unwrap();
    let no_query_images = message(EvalDataset::open(&dir));
    assert!(
        no_query_images.contains("no .jpg, .jpeg or .png image under")
            && no_query_images.contains("queries"),
        "{no_query_images}"
    );

    let empty = temp_dir("empty-database");
    std::fs::create_dir_all(empty.join("images/test/database")).unwrap();
    touch(
        &empty
            .join("images/test/queries")
            .join(utm_name(1.0, 2.0, "q")),
    );
    let no_database_images = message(EvalDataset::open(&empty));
    assert!(
        no_database_images.contains("image under") && no_database_images.contains("database"),
        "{no_database_images}"
    );

    let file = dir.join("database").join(utm_name(1.0, 2.0, "d"));
    let not_folder = message(EvalDataset::from_folders(&file, &dir.join("queries")));
    assert!(not_folder.contains("is not a folder"), "{not_folder}");
}

#[test]
fn the_first_image_without_a_position_is_named() {
    let dir = temp_dir("unparsable");
    touch(&dir.join("database").join(utm_name(1.0, 2.0, "a")));
    touch(&dir.join("database/b_no_position.jpg"));
    touch(&dir.join("database/c_neither.jpg"));
    touch(&dir.join("queries").join(utm_name(1.0, 2.0, "q")));
    let error = EvalDataset::open(&dir).unwrap_err();
    assert!(matches!(error, Error::Format { .. }), "{error}");
    let message = error.to_string();
    let first = dir.join("database/b_no_position.jpg");
    assert!(
        message.starts_with(&format!("{}: ", first.display())),
        "{message}"
    );
    assert!(message.contains("no UTM coordinates"), "{message}");

    let dir = temp_dir("unparsable-query");
    touch(&dir.join("database").join(utm_name(1.0, 2.0, "a")));
    touch(&dir.join("queries/@1.5@north@.jpg"));
    let message = EvalDataset::open(&dir).unwrap_err().to_string();
    assert!(
        message.contains("@1.5@north@.jpg") && message.contains("\"north\""),
        "{message}"
    );
}

#[test]
fn the_images_paths_file_gives_the_order() {
    let dir = temp_dir("paths-file");
    let database = dir.join("database");
    let names = [
        utm_name(3.0, 3.0, "c"),
        utm_name(1.0, 1.0, "a"),
        utm_name(2.0, 2.0, "b"),
    ];
    touch(&database.join("z").join(&names[0]));
    touch(&database.join(&names[1]));
    touch(&database.join(&names[2]));
    touch(&database.join(utm_name(9.0, 9.0, "unlisted")));
    let list = dir.join("database_images_paths.txt");
    std::fs::write(
        &list,
        format!("z/{}\n\n{}\r\n  \n{}", names[0], names[1], names[2]),
    )
    .unwrap();
    let want = vec![
        database.join("z").join(&names[0]),
        database.join(&names[1]),
        database.join(&names[2]),
    ];
    assert_eq!(list_folder(&database).unwrap(), want);
    // the trailing separator does not move the list file
    let mut with_slash = database.clone().into_os_string();
    with_slash.push("/");
    assert_eq!(list_folder(Path::new(&with_slash)).unwrap().len(), 3);

    touch(&dir.join("queries").join(utm_name(1.0, 1.0, "q")));
    let dataset = EvalDataset::open(&dir).unwrap();
    assert_eq!(dataset.database, want);
    assert_eq!(
        dataset.database_utm,
        vec![[3.0, 3.0], [1.0, 1.0], [2.0, 2.0]]
    );
    assert_eq!(dataset.positives(0.0).unwrap(), vec![vec![1]]);

    std::fs::write(&list, format!("{}\nz/missing.jpg\n", names[1])).unwrap();
    let error = list_folder(&database).unwrap_err();
    assert!(matches!(error, Error::Format { .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!("{}: ", list.display()))
            && message.contains(&format!("{}", database.join("z/missing.jpg").display()))
            && message.contains("line 2"),
        "{message}"
    );

    std::fs::write(&list, "z\n").unwrap();
    let folder = list_folder(&database).unwrap_err().to_string();
    assert!(folder.contains("not an existing file"), "{folder}");

    std::fs::write(&list, format!("/abs/{}\n", names[1])).unwrap();
    let absolute = list_folder(&database).unwrap_err().to_string();
    assert!(absolute.contains("absolute"), "{absolute}");

    std::fs::write(&list, "\n \n").unwrap();
    let empty = list_folder(&database).unwrap_err().to_string();
    assert!(
        empty.starts_with(&format!("{}: ", list.display())) && empty.contains("no image"),
        "{empty}"
    );
}

/// Parses the CSV that `write_csv` writes: RFC 4180 fields, `\n` line ends.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = vec![];
    let mut row = vec![];
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(
        field.is_empty() && row.is_empty() && !quoted,
        "the CSV does not end with a line end"
    );
    rows
}

#[test]
fn predictions_csv_quotes_and_replaces_atomically() {
    let dir = temp_dir("csv");
    let dataset = EvalDataset {
        database: ["db/a.jpg", "db/b,c.jpg", "db/say \"d\".jpg"]
            .map(PathBuf::from)
            .to_vec(),
        queries: ["q/one.jpg", "q/two\nlines.jpg"]
            .map(PathBuf::from)
            .to_vec(),
        database_utm: vec![[0.0, 0.0]; 3],
        queries_utm: vec![[0.0, 0.0]; 2],
    };
    let distances = vec![0.1, 0.25, 1e-7, 3.0, 1.0 / 3.0, 16777217.0];
    let predictions = Predictions::new(3, vec![1, 0, 2, 2, 1, 0], distances).unwrap();
    let positives = vec![vec![0, 2], vec![]];
    let path = dir.join("predictions.csv");
    std::fs::write(&path, "an older file\n").unwrap();
    write_csv(&path, &dataset, &predictions, &positives).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        "query,rank,prediction,distance,positive\n\
         q/one.jpg,1,\"db/b,c.jpg\",0.1,false\n\
         q/one.jpg,2,db/a.jpg,0.25,true\n\
         q/one.jpg,3,\"db/say \"\"d\"\".jpg\",0.0000001,true\n\
         \"q/two\nlines.jpg\",1,\"db/say \"\"d\"\".jpg\",3,false\n\
         \"q/two\nlines.jpg\",2,\"db/b,c.jpg\",0.33333334,false\n\
         \"q/two\nlines.jpg\",3,db/a.jpg,16777216,false\n"
    );
    let rows = parse_csv(&text);
    assert_eq!(rows.len(), 7);
    assert_eq!(
        rows[4],
        ["q/two\nlines.jpg", "1", "db/say \"d\".jpg", "3", "false"]
    );
    for (row, (q, rank)) in rows[1..]
        .iter()
        .zip([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)])
    {
        let index = predictions.row(q)[rank];
        assert_eq!(row[0], dataset.queries[q].to_str().unwrap());
        assert_eq!(row[2], dataset.database[index].to_str().unwrap());
        let distance: f32 = row[3].parse().unwrap();
        assert_eq!(
            distance.to_bits(),
            predictions.distances_of(q)[rank].to_bits()
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["predictions.csv"],
        "only the CSV is left in the folder"
    );

    // bad input writes nothing and leaves the old file
    let wrong_rows = Predictions::new(3, vec![0, 1, 2], vec![0.0; 3]).unwrap();
    let error = write_csv(&path, &dataset, &wrong_rows, &positives).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("2 queries, but predictions for 1"),
        "{error}"
    );
    let past_end = Predictions::new(3, vec![0, 1, 2, 0, 1, 3], vec![0.0; 6]).unwrap();
    let error = write_csv(&path, &dataset, &past_end, &positives).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("prediction 3 is past the 3 database images"),
        "{error}"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let missing_folder = dir.join("absent/predictions.csv");
    assert!(write_csv(&missing_folder, &dataset, &predictions, &positives).is_err());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}
