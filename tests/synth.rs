//! `vpr-engine synth`: the same bytes for a seed, names the dataset tools parse, panoramas whose
//! heading field puts EigenPlaces' crops where the crops of the same bearing are, queries with
//! positives, class counts the trainers' groupings need, and the output folder rules.

mod common;

use common::vpr_engine;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use vpr_engine::eval::dataset::{parse_utm, EvalDataset};
use vpr_engine::io::image::{decode, Rgb8};
use vpr_engine::synth::plan::{Plan, TRAIN, TRAIN_PANORAMAS};
use vpr_engine::synth::render::{render, View};
use vpr_engine::synth::{self, columns, SynthOptions, SynthSummary};

/// A fresh folder for one test (not created).
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("synth-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn options(places: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        places,
        seed,
        ..SynthOptions::default()
    }
}

fn generate(dir: &Path, options: &SynthOptions) -> SynthSummary {
    synth::generate(dir, options).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().to_path_buf());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The images of one folder, sorted.
fn images(folder: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
}

/// Field `i` of a file name split on '@'.
fn field(path: &Path, i: usize) -> String {
    let name = path.file_name().unwrap().to_str().unwrap();
    name.split('@').nth(i).unwrap().to_string()
}

fn heading(path: &Path) -> f64 {
    field(path, 9).parse().unwrap()
}

fn mean_abs_diff(a: &Rgb8, b: &Rgb8) -> f64 {
    assert_eq!((a.height, a.width), (b.height, b.width));
    let total: f64 = a
        .pixels
        .iter()
        .zip(&b.pixels)
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum();
    total / a.pixels.len() as f64
}

/// EigenPlaces' crop of a panorama of `width` columns and heading `yaw` at compass `bearing`:
/// its first column, as the original computes it.
fn eigenplaces_start(width: usize, yaw: f64, bearing: f64, side: usize) -> usize {
    let w = width as f64;
    let north = (((180.0 - yaw).rem_euclid(360.0)) / 360.0 * w) as i64;
    let offset = ((bearing / 360.0 * w) as i64).rem_euclid(width as i64);
    (north + offset - side as i64 / 2).rem_euclid(width as i64) as usize
}

#[test]
fn the_same_seed_writes_the_same_bytes_and_another_seed_other_ones() {
    let (a, b, c) = (temp_dir("seed-a"), temp_dir("seed-b"), temp_dir("seed-c"));
    generate(&a, &options(2, 5));
    generate(&b, &options(2, 5));
    generate(&c, &options(2, 6));
    let listing = files(&a);
    assert_eq!(listing, files(&b));
    assert!(listing.len() > 300, "{} files", listing.len());
    for file in listing.iter().step_by(7) {
        let (x, y) = (
            std::fs::read(a.join(file)).unwrap(),
            std::fs::read(b.join(file)).unwrap(),
        );
        assert!(x == y, "{} differs between two runs", file.display());
    }
    // another seed: another city, other positions and weather, so other names and pixels
    let other = files(&c);
    assert_eq!(other.len(), listing.len());
    let same_names = listing.iter().filter(|f| other.contains(f)).count();
    assert_eq!(same_names, 1, "only synth.json is shared: {same_names}");
    let first = |dir: &Path, folder: &str| decode(&images(&dir.join(folder))[0]).unwrap();
    let differs = mean_abs_diff(&first(&a, TRAIN_PANORAMAS), &first(&c, TRAIN_PANORAMAS));
    assert!(
        differs > 10.0,
        "seeds 5 and 6 give similar panoramas: {differs}"
    );
}

#[test]
fn the_layout_and_names_are_what_the_trainers_and_eval_read() {
    let dir = temp_dir("layout");
    let opts = options(4, 1);
    let summary = generate(&dir, &opts);
    let side = opts.image_size;
    let folders = [
        (TRAIN, summary.train_crops, side),
        (
            TRAIN_PANORAMAS,
            summary.train_panoramas,
            opts.panorama_width(),
        ),
        ("val/database", summary.val_database, side),
        ("val/queries", summary.val_queries, side),
        ("test/database", summary.test_database, side),
        ("test/queries", summary.test_queries, side),
    ];
    assert_eq!(summary.train_panoramas, 4 * 12);
    assert_eq!(summary.train_crops, 4 * 12 * 12);
    assert_eq!(summary.val_database, 2 * 12);
    assert_eq!(summary.val_queries, 10);
    assert_eq!(opts.panorama_width() * 2, 13 * side);
    for (folder, count, width) in folders {
        let paths = images(&dir.join(folder));
        assert_eq!(paths.len(), count, "{folder}");
        let mut names = HashSet::new();
        for (i, path) in paths.iter().enumerate() {
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(names.insert(name.to_string()), "{name} twice in {folder}");
            let fields: Vec<&str> = name.split('@').collect();
            assert_eq!(fields.len(), 16, "{name}");
            assert_eq!((fields[0], fields[15]), ("", ".jpg"), "{name}");
            assert_eq!((fields[3], fields[4]), ("10", "S"), "{name}");
            let [east, north] = parse_utm(path).unwrap();
            assert_eq!(fields[1], format!("{east:010.2}"), "{name}");
            assert_eq!(fields[2], format!("{north:010.2}"), "{name}");
            assert!((540_000.0..560_000.0).contains(&east), "{name}");
            assert!((4_170_000.0..4_190_000.0).contains(&north), "{name}");
            let lat: f64 = fields[5].parse().unwrap();
            let lon: f64 = fields[6].parse().unwrap();
            assert!((37.6..37.9).contains(&lat) && (-122.6..-122.3).contains(&lon));
            assert_eq!(fields[8].len(), 2, "{name}");
            assert_eq!(fields[9].len(), 3, "{name}");
            let h: u32 = fields[9].parse().unwrap();
            assert!(h < 360, "{name}");
            if i % 50 == 0 {
                let image = decode(path).unwrap();
                assert_eq!((image.height, image.width), (side, width), "{name}");
            }
        }
    }
    // a panorama's 12 crops: same position and capture, headings 30 degrees apart
    let crops = images(&dir.join(TRAIN));
    let panorama = &images(&dir.join(TRAIN_PANORAMAS))[0];
    let of_it: Vec<&PathBuf> = crops
        .iter()
        .filter(|c| field(c, 7) == field(panorama, 7))
        .collect();
    assert_eq!(of_it.len(), 12);
    let mut bins: Vec<u32> = of_it
        .iter()
        .map(|c| {
            assert_eq!(parse_utm(c).unwrap(), parse_utm(panorama).unwrap());
            let offset = (heading(c) - heading(panorama)).rem_euclid(360.0);
            assert_eq!(offset % 30.0, 0.0, "{}", c.display());
            heading(c) as u32 / 30
        })
        .collect();
    bins.sort();
    assert_eq!(bins, (0..12).collect::<Vec<u32>>());
    // eval reads the splits; every query has database images within 25 m
    for split in ["val", "test"] {
        let set = EvalDataset::open(&dir.join(split)).unwrap();
        for (q, positives) in set.positives(25.0).unwrap().iter().enumerate() {
            assert!(
                !positives.is_empty(),
                "{}: no database image within 25 m",
                set.queries[q].display()
            );
        }
    }
}

#[test]
fn val_is_in_the_training_city_and_test_is_not() {
    let plan = Plan::new(&options(40, 3)).unwrap();
    let utm = |folder: &str| -> Vec<[f64; 2]> {
        plan.images()
            .filter(|i| i.path.parent() == Some(Path::new(folder)))
            .map(|i| i.name.utm())
            .collect()
    };
    let train = utm(TRAIN_PANORAMAS);
    let nearest = |p: &[f64; 2]| {
        train
            .iter()
            .map(|t| ((t[0] - p[0]).powi(2) + (t[1] - p[1]).powi(2)).sqrt())
            .fold(f64::INFINITY, f64::min)
    };
    for p in utm("val/database").iter().chain(&utm("val/queries")) {
        assert!(
            nearest(p) < 10.0,
            "val image at {p:?} is off the training places"
        );
    }
    for p in utm("test/database").iter().chain(&utm("test/queries")) {
        assert!(
            nearest(p) > 100.0,
            "test image at {p:?} is near a training place"
        );
    }
}

#[test]
fn eigenplaces_crops_of_a_panorama_are_the_views_at_their_bearings() {
    let opts = options(2, 11);
    let plan = Plan::new(&opts).unwrap();
    let (w, side) = (opts.panorama_width(), opts.image_size);
    let step = 360.0 / w as f64;
    let capture = &plan.captures[5];
    assert_eq!(capture.images[0].name.heading as f64, capture.view.bearing);
    // the capture's own heading, and one (a multiple of 15 degrees) where the original's
    // truncations are exact for bearings that are multiples of 15 degrees
    for yaw in [capture.view.bearing, 135.0] {
        let pano_view = View {
            bearing: yaw,
            ..capture.view
        };
        let pano = render(&plan.city, &pano_view, &capture.appearance, 1);
        for bearing in [0.0, 15.0, 105.0, 250.0, 7.3, 93.9, 201.2, 333.3] {
            let start = eigenplaces_start(w, yaw, bearing, side);
            // the bearing of the crop's centre: the original's int() truncations may put it
            // up to two columns short of `bearing`
            let centre = ((start + side / 2) as f64 * step - (180.0 - yaw)).rem_euclid(360.0);
            let short = (bearing - centre).rem_euclid(360.0);
            assert!(
                short < 2.0 * step + 1e-9,
                "yaw {yaw} bearing {bearing}: crop at {centre}"
            );
            if yaw == 135.0 && bearing % 15.0 == 0.0 {
                assert!(
                    short.min(360.0 - short) < 1e-9,
                    "yaw {yaw} bearing {bearing}"
                );
            }
            let crop = columns(&pano, start, side);
            let view = |bearing: f64| {
                let v = View {
                    bearing,
                    width: side,
                    ..capture.view
                };
                render(&plan.city, &v, &capture.appearance, 2)
            };
            let diff = mean_abs_diff(&crop, &view(centre));
            // only the sensor noise of the two renders differs
            assert!(
                diff < 3.0,
                "yaw {yaw} bearing {bearing}: mean |difference| {diff}"
            );
            let flipped = columns(
                &pano,
                eigenplaces_start(w, 180.0 - yaw, bearing, side),
                side,
            );
            for (what, d) in [
                (
                    "yaw read as 180 - yaw",
                    mean_abs_diff(&flipped, &view(centre)),
                ),
                ("30 degrees off", mean_abs_diff(&crop, &view(centre + 30.0))),
            ] {
                assert!(
                    d > 10.0,
                    "yaw {yaw} bearing {bearing}: {what} differs only by {d}"
                );
            }
        }
    }
}

#[test]
fn written_crops_are_eigenplaces_crops_of_their_panoramas() {
    let dir = temp_dir("crops");
    let opts = options(1, 2);
    generate(&dir, &opts);
    let (w, side) = (opts.panorama_width(), opts.image_size);
    let panoramas: HashMap<String, PathBuf> = images(&dir.join(TRAIN_PANORAMAS))
        .into_iter()
        .map(|p| (field(&p, 7), p))
        .collect();
    for crop in images(&dir.join(TRAIN)).iter().step_by(5) {
        let pano_path = &panoramas[&field(crop, 7)];
        let pano = decode(pano_path).unwrap();
        let start = eigenplaces_start(w, heading(pano_path), heading(crop), side);
        // the original's truncations put its crop on our columns or one to the left; the two
        // JPEG encodings of the same pixels differ by a few levels
        let cut = decode(crop).unwrap();
        let best = [start, (start + 1) % w]
            .iter()
            .map(|&s| mean_abs_diff(&columns(&pano, s, side), &cut))
            .fold(f64::INFINITY, f64::min);
        assert!(best < 9.0, "{}: mean |difference| {best}", crop.display());
        let turned = mean_abs_diff(&columns(&pano, (start + w / 12) % w, side), &cut);
        assert!(
            turned > 2.0 * best,
            "{}: 30 degrees off differs by {turned}",
            crop.display()
        );
    }
}

/// CosPlace's class or group: (east, north, heading) cells.
type Cell = (i64, i64, i64);

/// CosPlace's class of a name: (floor(e / 10), floor(n / 10), floor(h / 30)).
fn cosplace_class(name: &str) -> Cell {
    let f: Vec<f64> = [1, 2, 9]
        .map(|i| name.split('@').nth(i).unwrap().parse::<f64>().unwrap())
        .to_vec();
    (
        (f[0] / 10.0).floor() as i64,
        (f[1] / 10.0).floor() as i64,
        (f[2] / 30.0).floor() as i64,
    )
}

/// Classes with at least `min` names, and for CosPlace's N, L the classes of each group in
/// first-appearance order over the sorted names.
fn cosplace_groups(names: &[String], min: usize, n: i64, l: i64) -> (usize, Vec<usize>) {
    let mut sorted = names.to_vec();
    sorted.sort();
    let mut counts: HashMap<Cell, usize> = HashMap::new();
    for name in &sorted {
        *counts.entry(cosplace_class(name)).or_default() += 1;
    }
    let mut groups: Vec<(Cell, HashSet<Cell>)> = Vec::new();
    for name in &sorted {
        let class = cosplace_class(name);
        if counts[&class] < min {
            continue;
        }
        let group = (
            class.0.rem_euclid(n),
            class.1.rem_euclid(n),
            class.2.rem_euclid(l),
        );
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, classes)) => {
                classes.insert(class);
            }
            None => groups.push((group, HashSet::from([class]))),
        }
    }
    let kept = counts.values().filter(|&&c| c >= min).count();
    (kept, groups.iter().map(|(_, c)| c.len()).collect())
}

/// EigenPlaces' classes (15 m cells) with at least `min` panoramas.
fn eigenplaces_classes(names: &[String], min: usize) -> usize {
    let mut counts: BTreeMap<(i64, i64), usize> = BTreeMap::new();
    for name in names {
        let f: Vec<f64> = name
            .split('@')
            .skip(1)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        let cell = ((f[0] / 15.0).floor() as i64, (f[1] / 15.0).floor() as i64);
        *counts.entry(cell).or_default() += 1;
    }
    counts.values().filter(|&&c| c >= min).count()
}

#[test]
fn the_defaults_give_the_trainers_enough_classes() {
    let opts = SynthOptions::default();
    let plan = Plan::new(&opts).unwrap();
    let names = |folder: &str| -> Vec<String> {
        plan.images()
            .filter(|i| i.path.parent() == Some(Path::new(folder)))
            .map(|i| i.name.file_name())
            .collect()
    };
    let (crops, panoramas) = (names(TRAIN), names(TRAIN_PANORAMAS));
    // CosPlace, everything in one group (N = 1, L = 1)
    let (classes, groups) = cosplace_groups(&crops, 10, 1, 1);
    assert_eq!(classes, opts.places * 12);
    assert!(classes >= 300, "{classes} CosPlace classes");
    assert_eq!(groups, vec![classes]);
    // the paper's N = 5, L = 2: the 8 groups trained on
    let (_, groups) = cosplace_groups(&crops, 10, 5, 2);
    eprintln!("CosPlace N=5 L=2 classes per group: {groups:?}");
    assert!(groups.len() >= 8, "{groups:?}");
    assert!(groups[..8].iter().all(|&c| c >= 15), "{groups:?}");
    let eigen = eigenplaces_classes(&panoramas, 5);
    assert!(eigen >= 100, "{eigen} EigenPlaces classes");
    for split in ["val", "test"] {
        let (database, queries) = (
            names(&format!("{split}/database")).len(),
            names(&format!("{split}/queries")).len(),
        );
        assert!((200..=500).contains(&database), "{split}: {database}");
        assert!((80..=150).contains(&queries), "{split}: {queries}");
    }
}

#[test]
fn the_summary_counts_the_classes_of_the_written_files() {
    let dir = temp_dir("classes");
    let summary = generate(&dir, &options(3, 4));
    let listed = |folder: &str| -> Vec<String> {
        images(&dir.join(folder))
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
            .collect()
    };
    let (classes, _) = cosplace_groups(&listed(TRAIN), 10, 1, 1);
    assert_eq!(classes, 36);
    assert_eq!(summary.cosplace_classes, classes);
    let eigen = eigenplaces_classes(&listed(TRAIN_PANORAMAS), 5);
    assert!(eigen >= 3, "{eigen}");
    assert_eq!(summary.eigenplaces_classes, eigen);
}

#[test]
fn the_command_writes_new_folders_replaces_its_output_and_refuses_others() {
    let dir = temp_dir("cli");
    let out = dir.to_str().unwrap();
    let (code, stdout, stderr) = vpr_engine(&["synth", "--out", out, "--places", "1"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("train 144 crops (12 CosPlace classes)"),
        "{stdout}"
    );
    assert!(dir.join("synth.json").is_file());
    // a trainer's cache is stale once the city changes: replaced with the rest
    std::fs::create_dir_all(dir.join("cache")).unwrap();
    std::fs::write(dir.join("cache/classes.bin"), b"stale").unwrap();
    let before = files(&dir);
    let (code, _, stderr) = vpr_engine(&["synth", "--out", out, "--places", "1", "--seed", "9"]);
    assert_eq!(code, 0, "{stderr}");
    let after = files(&dir);
    assert!(!dir.join("cache").exists());
    assert_eq!(after.len() + 1, before.len());
    assert!(after
        .iter()
        .all(|f| !before.contains(f) || f == Path::new("synth.json")));
    assert!(std::fs::read_to_string(dir.join("synth.json"))
        .unwrap()
        .contains("\"seed\": 9"));
    // something synth did not write stops it, and nothing is touched
    std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
    let (code, _, stderr) = vpr_engine(&["synth", "--out", out, "--places", "1"]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("notes.txt") && stderr.contains(out),
        "{stderr}"
    );
    assert_eq!(files(&dir).len(), after.len() + 1);
    // a folder that is not a synth output
    let foreign = temp_dir("cli-foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("photo.jpg"), b"x").unwrap();
    let (code, _, stderr) = vpr_engine(&["synth", "--out", foreign.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("not empty") && stderr.contains("synth.json"),
        "{stderr}"
    );
    for bad in [["--places", "0"], ["--image-size", "100"]] {
        let (code, _, stderr) = vpr_engine(&["synth", "--out", out, bad[0], bad[1]]);
        assert_eq!(code, 2);
        assert!(stderr.contains(bad[0]), "{stderr}");
    }
}
