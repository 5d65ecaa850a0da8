//! The training-data layer against the training scripts' own arithmetic: CosPlace's class and
//! group tables, EigenPlaces' classes, focal points and crop starts, and numpy's SVD signs
//! (tests/fixtures/data_groups, written by tools/fixtures/data_groups.py with numpy), plus the
//! cache and the errors on bad data.

use std::path::{Path, PathBuf};
use vpr_engine::data::{
    crop_start, focal_point, principal_axes, CosPlaceGrouping, CosPlaceGroups, EigenPlacesGrouping,
    EigenPlacesGroups,
};

/// A fresh folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-groups-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Empty files with these names under `folder` (the grouping reads names only).
fn make_folder(folder: &Path, names: &[String]) {
    for name in names {
        let path = folder.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }
}

fn fixture(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data_groups")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run tools/fixtures/data_groups.py)",
            path.display()
        )
    })
}

fn fixture_lines(file: &str) -> Vec<String> {
    fixture(file).lines().map(str::to_string).collect()
}

fn numbers<T: std::str::FromStr>(text: &str) -> Vec<T>
where
    T::Err: std::fmt::Debug,
{
    text.split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// The paths of `images` relative to `folder`, as the fixture lists them.
fn relative(images: &[PathBuf], folder: &Path) -> Vec<String> {
    images
        .iter()
        .map(|p| {
            p.strip_prefix(folder)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// A CosPlace table file: the settings and `groups[g][c]` image indices.
fn cosplace_fixture(file: &str) -> (CosPlaceGrouping, Vec<Vec<Vec<u32>>>) {
    let lines = fixture_lines(file);
    let s: Vec<u32> = numbers(lines[0].strip_prefix("settings").unwrap());
    let settings = CosPlaceGrouping {
        m: s[0],
        alpha: s[1],
        n: s[2],
        l: s[3],
        min_images_per_class: s[4] as usize,
    };
    let mut groups: Vec<Vec<Vec<u32>>> = Vec::new();
    for line in &lines[2..] {
        if line == "group" {
            groups.push(Vec::new());
        } else {
            groups.last_mut().unwrap().push(numbers(line));
        }
    }
    (settings, groups)
}

#[test]
fn cosplace_groups_are_the_originals_and_come_back_from_the_cache() {
    let dir = temp_dir("cosplace");
    let train = dir.join("train");
    let names = fixture_lines("names.txt");
    make_folder(&train, &names);
    for (file, cache) in [
        ("cosplace_default.txt", "train_M10_N5_alpha30_L2_mipc10.txt"),
        ("cosplace_small.txt", "train_M5_N3_alpha45_L3_mipc2.txt"),
    ] {
        let (settings, expected) = cosplace_fixture(file);
        let built = CosPlaceGroups::load_or_build(&train, &settings).unwrap();
        assert_eq!(relative(&built.images, &train), names);
        assert_eq!(built.groups.len(), expected.len(), "{file}: group count");
        for (g, (got, want)) in built.groups.iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "{file}: group {g}");
        }
        let cache_file = dir.join("cache").join(cache);
        assert!(cache_file.is_file(), "{} not written", cache_file.display());
        let cached = CosPlaceGroups::load_or_build(&train, &settings).unwrap();
        assert_eq!(cached, built, "{file}: the cached table differs");
    }
    assert_eq!(
        CosPlaceGrouping::default(),
        cosplace_fixture("cosplace_default.txt").0
    );
}

#[test]
fn cosplace_takes_the_order_of_the_paths_file() {
    let dir = temp_dir("cosplace-paths-file");
    let train = dir.join("train");
    let names = fixture_lines("names.txt");
    make_folder(&train, &names);
    let shuffled: Vec<String> = fixture_lines("shuffled.txt")
        .iter()
        .map(|i| names[i.parse::<usize>().unwrap()].clone())
        .collect();
    std::fs::write(
        dir.join("train_images_paths.txt"),
        shuffled.join("\n") + "\n",
    )
    .unwrap();
    let (settings, expected) = cosplace_fixture("cosplace_shuffled.txt");
    let built = CosPlaceGroups::load_or_build(&train, &settings).unwrap();
    assert_eq!(relative(&built.images, &train), shuffled);
    assert_eq!(built.groups, expected);
}

#[test]
fn stale_or_broken_caches_are_rebuilt() {
    let dir = temp_dir("stale-cache");
    let train = dir.join("train");
    let names = fixture_lines("names.txt");
    make_folder(&train, &names);
    let (settings, expected) = cosplace_fixture("cosplace_default.txt");
    let cache = dir.join("cache/train_M10_N5_alpha30_L2_mipc10.txt");
    CosPlaceGroups::load_or_build(&train, &settings).unwrap();
    // a broken cache: rebuilt from the names
    std::fs::write(&cache, "vpr-engine CosPlace class table v1\ngarbage\n").unwrap();
    let rebuilt = CosPlaceGroups::load_or_build(&train, &settings).unwrap();
    assert_eq!(rebuilt.groups, expected);
    // the same count, first and last image, one name in between changed: rebuilt
    let text = std::fs::read_to_string(&cache).unwrap();
    let middle = &names[names.len() / 2];
    let renamed = middle.replace(".jpg", "y.jpg");
    std::fs::rename(train.join(middle), train.join(&renamed)).unwrap();
    CosPlaceGroups::load_or_build(&train, &settings).unwrap();
    assert_ne!(std::fs::read_to_string(&cache).unwrap(), text);
    std::fs::rename(train.join(&renamed), train.join(middle)).unwrap();
    assert_eq!(
        CosPlaceGroups::load_or_build(&train, &settings)
            .unwrap()
            .groups,
        expected
    );
    // a table of another image list (one image more): rebuilt, and the new image counted
    let text = std::fs::read_to_string(&cache).unwrap();
    let first_class = &expected[0][0];
    let twin = names[first_class[0] as usize].replace(".jpg", "x.jpg");
    make_folder(&train, std::slice::from_ref(&twin));
    let grown = CosPlaceGroups::load_or_build(&train, &settings).unwrap();
    assert_eq!(grown.images.len(), names.len() + 1);
    assert_ne!(std::fs::read_to_string(&cache).unwrap(), text);
    let classes: usize = grown.groups.iter().map(Vec::len).sum();
    assert_eq!(classes, expected.iter().map(Vec::len).sum::<usize>());
    let sizes: usize = grown.groups.iter().flatten().map(Vec::len).sum();
    assert_eq!(
        sizes,
        expected.iter().flatten().map(Vec::len).sum::<usize>() + 1
    );
}

/// One EigenPlaces class of the fixture: panorama indices, then per view (0, 90) the focal
/// point and the crop starts.
struct EigenClass {
    members: Vec<u32>,
    focal: [[f64; 2]; 2],
    starts: [Vec<usize>; 2],
}

fn eigenplaces_fixture(file: &str) -> (EigenPlacesGrouping, Vec<Vec<EigenClass>>) {
    let lines = fixture_lines(file);
    let s: Vec<f64> = numbers(lines[0].strip_prefix("settings").unwrap());
    let settings = EigenPlacesGrouping {
        m: s[0] as u32,
        n: s[1] as u32,
        focal_dist: s[2],
        min_images_per_class: s[3] as usize,
    };
    let mut groups: Vec<Vec<EigenClass>> = Vec::new();
    let mut rest = lines[1..].iter();
    while let Some(line) = rest.next() {
        if line == "group" {
            groups.push(Vec::new());
            continue;
        }
        let field = |line: &str, word: &str| line.strip_prefix(word).unwrap().to_string();
        let members = numbers(&field(line, "class"));
        let mut focal = [[0.0; 2]; 2];
        let mut starts = [Vec::new(), Vec::new()];
        for (v, angle) in ["0", "90"].iter().enumerate() {
            let f: Vec<f64> = numbers(&field(rest.next().unwrap(), &format!("focal{angle}")));
            focal[v] = [f[0], f[1]];
            starts[v] = numbers(&field(rest.next().unwrap(), &format!("starts{angle}")));
        }
        groups.last_mut().unwrap().push(EigenClass {
            members,
            focal,
            starts,
        });
    }
    (settings, groups)
}

#[test]
fn eigenplaces_classes_focal_points_and_crops_are_the_originals() {
    let dir = temp_dir("eigenplaces");
    let panos = dir.join("panoramas");
    let names = fixture_lines("panoramas.txt");
    make_folder(&panos, &names);
    for (file, cache) in [
        ("eigenplaces_default.txt", "panoramas_M15_N3_mipc5.txt"),
        ("eigenplaces_small.txt", "panoramas_M10_N2_mipc2.txt"),
    ] {
        let (settings, expected) = eigenplaces_fixture(file);
        let built = EigenPlacesGroups::load_or_build(&panos, &settings).unwrap();
        assert_eq!(relative(&built.panoramas, &panos), names);
        assert_eq!(built.views.len(), 2 * expected.len(), "{file}: view count");
        for (g, classes) in expected.iter().enumerate() {
            for v in 0..2 {
                let view = &built.views[2 * g + v];
                assert_eq!(view.classes.len(), classes.len(), "{file}: group {g}");
                for (c, want) in classes.iter().enumerate() {
                    let crops = &view.classes[c];
                    let members: Vec<u32> = crops.iter().map(|p| p.panorama).collect();
                    assert_eq!(members, want.members, "{file}: group {g} class {c}");
                    let focal = view.focal_points[c];
                    for k in 0..2 {
                        assert!(
                            (focal[k] - want.focal[v][k]).abs() <= 1e-9,
                            "{file}: group {g} view {v} class {c}: focal {focal:?}, numpy {:?}",
                            want.focal[v]
                        );
                    }
                    let starts: Vec<usize> =
                        crops.iter().map(|p| crop_start(p, 3328, 512)).collect();
                    assert_eq!(
                        starts, want.starts[v],
                        "{file}: group {g} view {v} class {c}"
                    );
                }
            }
        }
        assert!(dir.join("cache").join(cache).is_file());
        let cached = EigenPlacesGroups::load_or_build(&panos, &settings).unwrap();
        assert_eq!(cached, built, "{file}: the cached table differs");
    }
    assert_eq!(
        EigenPlacesGrouping::default(),
        eigenplaces_fixture("eigenplaces_default.txt").0
    );
}

#[test]
fn principal_axes_and_focal_points_are_numpys() {
    let lines = fixture_lines("svd.txt");
    let mut failures = Vec::new();
    let mut bit_exact = 0;
    for line in &lines {
        let parts: Vec<&str> = line.split(" | ").collect();
        let head: Vec<&str> = parts[0].split_whitespace().collect();
        let (kind, count) = (head[0], head[1].parse::<usize>().unwrap());
        let coordinates: Vec<f64> = head[2..].iter().map(|x| x.parse().unwrap()).collect();
        let positions: Vec<[f64; 2]> = coordinates.chunks(2).map(|p| [p[0], p[1]]).collect();
        assert_eq!(positions.len(), count);
        let u_numpy: Vec<f64> = numbers(parts[1]);
        let focal_numpy: Vec<f64> = numbers(parts[2]);
        let (u, _) = principal_axes(&positions).unwrap();
        let u: Vec<f64> = u.iter().flatten().copied().collect();
        let focal: Vec<f64> = [0.0, 90.0]
            .iter()
            .flat_map(|&angle| focal_point(&positions, 10.0, angle).unwrap())
            .collect();
        let close =
            |a: &[f64], b: &[f64], tol: f64| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol);
        if !close(&u, &u_numpy, 1e-12) || !close(&focal, &focal_numpy, 1e-9) {
            failures.push(format!("{kind} n={count}: U {u:?} numpy {u_numpy:?}"));
        }
        if u == u_numpy && focal == focal_numpy {
            bit_exact += 1;
        }
    }
    println!(
        "{} of {} classes within 1e-12 (U) and 1e-9 (focal points), {bit_exact} bit for bit",
        lines.len() - failures.len(),
        lines.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(principal_axes(&[[1.0, 2.0]]).is_err());
    assert!(focal_point(&[], 10.0, 0.0).is_err());
}

#[test]
fn bad_training_folders_are_errors_naming_the_path() {
    let dir = temp_dir("bad-inputs");
    let cosplace = CosPlaceGrouping::default();
    let eigenplaces = EigenPlacesGrouping::default();
    let message = |e: vpr_engine::Error| e.to_string();

    let missing = dir.join("missing");
    let e = message(CosPlaceGroups::load_or_build(&missing, &cosplace).unwrap_err());
    assert!(e.contains(&*missing.to_string_lossy()), "{e}");

    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    let e = message(CosPlaceGroups::load_or_build(&empty, &cosplace).unwrap_err());
    assert!(
        e.contains(&*empty.to_string_lossy()) && e.contains("no .jpg"),
        "{e}"
    );
    let e = message(EigenPlacesGroups::load_or_build(&empty, &eigenplaces).unwrap_err());
    assert!(e.contains(&*empty.to_string_lossy()), "{e}");

    let unnamed = dir.join("unnamed");
    make_folder(
        &unnamed,
        &[
            "@551000.00@4180000.00@10@S@@@@@090@@@@@@.jpg".into(),
            "image.jpg".into(),
        ],
    );
    let e = message(CosPlaceGroups::load_or_build(&unnamed, &cosplace).unwrap_err());
    assert!(
        e.contains(&*unnamed.join("image.jpg").to_string_lossy()),
        "{e}"
    );
    assert!(e.contains("no UTM coordinates"), "{e}");

    let headless = dir.join("headless");
    make_folder(&headless, &["@551000.00@4180000.00@10@S@.jpg".into()]);
    let e = message(CosPlaceGroups::load_or_build(&headless, &cosplace).unwrap_err());
    assert!(
        e.contains("@551000.00@4180000.00@10@S@.jpg: ") && e.contains("no heading"),
        "{e}"
    );

    let fractional = dir.join("fractional");
    make_folder(
        &fractional,
        &["@551000.00@4180000.00@10@S@@@@@090.5@@@@@@.jpg".into()],
    );
    let e = message(EigenPlacesGroups::load_or_build(&fractional, &eigenplaces).unwrap_err());
    assert!(e.contains("090.5@") && e.contains("whole number"), "{e}");

    // 12 images in 3 classes of at most 5: none reaches 10
    let sparse = dir.join("sparse");
    let names: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "@{:.2}@4180000.00@10@S@@@p{i}@@{:03}@@@@@@.jpg",
                551000.0 + (i % 3) as f64 * 10.0,
                90 + i % 2
            )
        })
        .collect();
    make_folder(&sparse, &names);
    let e = message(CosPlaceGroups::load_or_build(&sparse, &cosplace).unwrap_err());
    assert!(e.contains(&*sparse.to_string_lossy()), "{e}");
    assert!(
        e.contains("min_images_per_class") && e.contains("the 12 images fall in 3 classes"),
        "{e}"
    );
    assert!(e.contains("the largest with 4 images"), "{e}");
    // in 15 m cells: 4 and 8 panoramas
    let strict = EigenPlacesGrouping {
        min_images_per_class: 9,
        ..eigenplaces
    };
    let e = message(EigenPlacesGroups::load_or_build(&sparse, &strict).unwrap_err());
    assert!(
        e.contains("the 12 panoramas fall in 2 cells of 15 m, the largest with 8"),
        "{e}"
    );
    let lonely = EigenPlacesGrouping {
        min_images_per_class: 1,
        ..eigenplaces
    };
    let e = message(EigenPlacesGroups::load_or_build(&sparse, &lonely).unwrap_err());
    assert!(e.contains("at least 2"), "{e}");
    let zero = CosPlaceGrouping { m: 0, ..cosplace };
    assert!(CosPlaceGroups::load_or_build(&sparse, &zero).is_err());
}
