//! The pictures read back as PNG and checked pixel by pixel against the layout: sizes, frame
//! colours, where each image lands, captions, the curve's path, markers and value labels, and
//! bad input. Inputs are generated into a temporary folder with random colours (the seed is
//! printed; `VPR_TEST_SEED` replays it).

use super::*;
use std::path::PathBuf;

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A colour far from white (so that padding is told apart) and from ink.
    fn colour(&mut self) -> Rgb<u8> {
        Rgb(std::array::from_fn(|_| 60 + self.below(140) as u8))
    }
}

/// An empty folder of its own for `test` under the system's temporary folder.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vpr-pictures-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a `width` x `height` image of one colour (PNG or JPEG by the extension).
fn solid(path: PathBuf, width: u32, height: u32, colour: Rgb<u8>) -> PathBuf {
    RgbImage::from_pixel(width, height, colour)
        .save(&path)
        .unwrap();
    path
}

fn read_png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn is_green(p: Rgb<u8>) -> bool {
    p[1] as i32 > p[0] as i32 + 80 && p[1] as i32 > p[2] as i32 + 80
}

fn is_red(p: Rgb<u8>) -> bool {
    p[0] as i32 > p[1] as i32 + 80 && p[0] as i32 > p[2] as i32 + 80
}

fn is_ink(p: Rgb<u8>) -> bool {
    p.0.iter().all(|&v| v < 80)
}

fn assert_near(got: Rgb<u8>, want: Rgb<u8>, tolerance: u8, what: &str, seed: u64) {
    let close = got
        .0
        .iter()
        .zip(want.0)
        .all(|(&g, w)| g.abs_diff(w) <= tolerance);
    assert!(
        close,
        "{what}: {got:?}, want {want:?} +- {tolerance} (seed {seed})"
    );
}

/// Files in `dir` whose names start with a dot: the temporary files of `AtomicFile`.
fn hidden_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

/// The query (a 3:2 image of four coloured quadrants) and four predictions of other shapes,
/// sizes and formats: every tile's frame, content, padding and caption where the layout puts
/// them.
#[test]
fn prediction_picture_puts_each_image_in_its_framed_and_captioned_tile() {
    let seed = crate::test_seed("prediction_picture");
    let mut rng = Rng(seed);
    let dir = scratch_dir("layout");
    let quadrants: [Rgb<u8>; 4] = std::array::from_fn(|_| rng.colour());
    let query = dir.join("query.png");
    RgbImage::from_fn(240, 160, |x, y| {
        quadrants[(x >= 120) as usize + 2 * (y >= 80) as usize]
    })
    .save(&query)
    .unwrap();
    let colours: [Rgb<u8>; 4] = std::array::from_fn(|_| rng.colour());
    // tall and a JPEG; small (scaled up); wide; square
    let inputs = [
        (dir.join("tall.jpg"), 100, 250, Mark::Positive),
        (dir.join("small.png"), 50, 50, Mark::Negative),
        (dir.join("wide.png"), 500, 100, Mark::Negative),
        (dir.join("square.png"), 300, 300, Mark::Positive),
    ];
    for ((path, w, h, _), colour) in inputs.iter().zip(colours) {
        solid(path.clone(), *w, *h, colour);
    }
    let predictions: Vec<(&Path, Mark)> = inputs
        .iter()
        .map(|(path, _, _, mark)| (path.as_path(), *mark))
        .collect();
    let out = dir.join("preds.png");
    save_prediction_picture(&query, &predictions, &out).unwrap();
    let picture = read_png(&out);

    // 16 + 5 tiles of 384 + 16, by 16 + 40 + 384 + 16
    assert_eq!(picture.dimensions(), (2016, 456));
    assert_eq!(prediction_picture_size(5), (2016, 456));

    let marks = std::iter::once(Mark::Query).chain(predictions.iter().map(|p| p.1));
    for (index, mark) in marks.enumerate() {
        let (x, y) = tile_origin(index);
        let band = |px: i64, py: i64| {
            px < x + FRAME || px >= x + TILE - FRAME || py < y + FRAME || py >= y + TILE - FRAME
        };
        for py in y..y + TILE {
            for px in (x..x + TILE).filter(|&px| band(px, py)) {
                let p = *picture.get_pixel(px as u32, py as u32);
                let what = format!("tile {index} ({mark:?}) frame at ({px}, {py}): {p:?}");
                match mark {
                    Mark::Positive => assert!(is_green(p), "{what}"),
                    Mark::Negative => assert!(is_red(p), "{what}"),
                    Mark::Query => assert!(!is_green(p) && !is_red(p), "{what}"),
                }
            }
        }
        // the caption: ink in the band above the tile, none in the margin above the band
        let ink_in = |rows: std::ops::Range<i64>| {
            rows.flat_map(|py| (x..x + TILE).map(move |px| (px, py)))
                .filter(|&(px, py)| is_ink(*picture.get_pixel(px as u32, py as u32)))
                .count()
        };
        assert!(
            ink_in(y - CAPTION_HEIGHT..y) > 100,
            "tile {index}: no caption"
        );
        assert_eq!(
            ink_in(0..GAP),
            0,
            "tile {index}: ink above the caption band"
        );
    }
    // each caption says what it should, in its own band
    let captions = [
        "QUERY",
        "1 POSITIVE",
        "2 NEGATIVE",
        "3 NEGATIVE",
        "4 POSITIVE",
    ];
    for (index, caption) in captions.iter().enumerate() {
        let (x, y) = tile_origin(index);
        let band = image::imageops::crop_imm(
            &picture,
            x as u32,
            (y - CAPTION_HEIGHT) as u32,
            TILE as u32,
            CAPTION_HEIGHT as u32,
        )
        .to_image();
        assert!(
            shows_text(&band, caption, CAPTION_SCALE),
            "tile {index}: no {caption:?}"
        );
        let other = if caption.contains("POSITIVE") {
            "NEGATIVE"
        } else {
            "POSITIVE"
        };
        assert!(
            !shows_text(&band, other, CAPTION_SCALE),
            "tile {index}: {other:?}"
        );
    }

    let at = |index: usize, dx: i64, dy: i64| {
        let (x, y) = tile_origin(index);
        *picture.get_pixel((x + FRAME + dx) as u32, (y + FRAME + dy) as u32)
    };
    // the query, 240 x 160 -> 360 x 240: rows 60..300 of the inside, white above and below,
    // quadrants where they were
    for (i, q) in quadrants.iter().enumerate() {
        let (dx, dy) = (90 + 180 * (i % 2) as i64, 120 + 120 * (i / 2) as i64);
        assert_near(at(0, dx, dy), *q, 0, &format!("query quadrant {i}"), seed);
    }
    assert_near(at(0, 180, 59), WHITE, 0, "query padding above", seed);
    assert_near(at(0, 90, 60), quadrants[0], 0, "query's first row", seed);
    assert_near(at(0, 270, 299), quadrants[3], 0, "query's last row", seed);
    assert_near(at(0, 180, 300), WHITE, 0, "query padding below", seed);
    // the tall JPEG, 100 x 250 -> 144 x 360: columns 108..252, white either side
    assert_near(at(1, 180, 180), colours[0], 4, "tall JPEG centre", seed);
    assert_near(at(1, 100, 180), WHITE, 0, "tall JPEG padding left", seed);
    assert_near(at(1, 260, 180), WHITE, 0, "tall JPEG padding right", seed);
    // the small square, scaled up to the whole inside
    for (dx, dy) in [(0, 0), (359, 0), (0, 359), (359, 359), (180, 180)] {
        assert_near(at(2, dx, dy), colours[1], 0, "small square", seed);
    }
    // the wide image, 500 x 100 -> 360 x 72: rows 144..216
    assert_near(at(3, 180, 143), WHITE, 0, "wide padding above", seed);
    assert_near(at(3, 0, 144), colours[2], 0, "wide image's first row", seed);
    assert_near(
        at(3, 359, 215),
        colours[2],
        0,
        "wide image's last row",
        seed,
    );
    assert_near(at(3, 180, 216), WHITE, 0, "wide padding below", seed);
    assert_near(at(4, 180, 180), colours[3], 0, "square centre", seed);
    assert_eq!(
        hidden_files(&dir),
        Vec::<String>::new(),
        "temporary files left"
    );
}

/// A query without predictions is a picture of one tile.
#[test]
fn prediction_picture_of_a_query_alone_is_one_tile() {
    let dir = scratch_dir("alone");
    let query = solid(dir.join("q.png"), 64, 48, Rgb([10, 100, 200]));
    let out = dir.join("alone.png");
    save_prediction_picture(&query, &[], &out).unwrap();
    assert_eq!(read_png(&out).dimensions(), (416, 456));
}

/// A missing file or one that is not an image, as the query or as a prediction: an error that
/// names it, and no picture (an older one at `out` stays as it was, and no temporary file is
/// left behind).
#[test]
fn prediction_picture_of_an_unreadable_image_is_an_error_naming_it() {
    let dir = scratch_dir("unreadable");
    let good = solid(dir.join("good.png"), 20, 30, Rgb([90, 90, 90]));
    let missing = dir.join("missing.jpg");
    let not_an_image = dir.join("notes.jpg");
    std::fs::write(&not_an_image, b"these are notes, not a JPEG").unwrap();
    let truncated = dir.join("truncated.png");
    let png = std::fs::read(&good).unwrap();
    let good = good.as_path();
    std::fs::write(&truncated, &png[..png.len() / 2]).unwrap();
    let out = dir.join("preds.png");
    std::fs::write(&out, b"an older picture").unwrap();

    for bad in [&missing, &not_an_image, &truncated] {
        let as_query = save_prediction_picture(bad, &[(good, Mark::Positive)], &out);
        let as_prediction =
            save_prediction_picture(good, &[(good, Mark::Positive), (bad, Mark::Negative)], &out);
        for result in [as_query, as_prediction] {
            let message = result.expect_err("an unreadable image").to_string();
            assert!(
                message.contains(&bad.display().to_string()),
                "{message:?} does not name {}",
                bad.display()
            );
        }
        assert_eq!(std::fs::read(&out).unwrap(), b"an older picture");
    }
    assert_eq!(
        hidden_files(&dir),
        Vec::<String>::new(),
        "temporary files left"
    );

    let nowhere = dir.join("no-such-folder").join("preds.png");
    let message = save_prediction_picture(good, &[], &nowhere)
        .expect_err("a picture in a missing folder")
        .to_string();
    assert!(message.contains("no-such-folder"), "{message}");
    assert!(!nowhere.parent().unwrap().exists());
}

/// A picture replaces an older file at its path whole.
#[test]
fn prediction_picture_replaces_an_older_file() {
    let dir = scratch_dir("replace");
    let query = solid(dir.join("q.png"), 16, 16, Rgb([200, 0, 200]));
    let out = dir.join("preds.png");
    std::fs::write(&out, b"an older picture").unwrap();
    save_prediction_picture(&query, &[(&query, Mark::Negative)], &out).unwrap();
    let (width, height) = prediction_picture_size(2);
    assert_eq!(read_png(&out).dimensions(), (width as u32, height as u32));
    assert_eq!(
        hidden_files(&dir),
        Vec::<String>::new(),
        "temporary files left"
    );
}

/// Where the plot geometry puts R@N = `recall` of a curve of `points` points, computed here
/// from the constants rather than by `PlotGeometry`.
fn expected_point(n: usize, recall: f64, points: usize) -> (i64, i64) {
    let x = PLOT_WIDTH as f64 * (n as f64).log10() / (points.max(2) as f64).log10();
    (
        PLOT_LEFT + x.round() as i64,
        PLOT_TOP + (PLOT_HEIGHT as f64 * (1.0 - recall / 100.0)).round() as i64,
    )
}

/// The mean row of the curve's pixels in column `x`, if it has any.
fn curve_row(picture: &RgbImage, x: i64) -> Option<f64> {
    let rows: Vec<u32> = (0..picture.height())
        .filter(|&y| *picture.get_pixel(x as u32, y) == CURVE)
        .collect();
    (!rows.is_empty()).then(|| rows.iter().sum::<u32>() as f64 / rows.len() as f64)
}

/// Pixels of `colour` inside the plot area (the axes are outside it).
fn count_in_plot(picture: &RgbImage, colour: impl Fn(Rgb<u8>) -> bool) -> usize {
    (PLOT_TOP..PLOT_TOP + PLOT_HEIGHT)
        .flat_map(|y| (PLOT_LEFT..PLOT_LEFT + PLOT_WIDTH).map(move |x| (x, y)))
        .filter(|&(x, y)| colour(*picture.get_pixel(x as u32, y as u32)))
        .count()
}

/// Whether `label` drawn at `scale` appears in `picture` exactly: the font's ink where it has
/// ink and background where it has none.
fn shows_text(picture: &RgbImage, label: &str, scale: i64) -> bool {
    let (w, h) = (text_width(label, scale), text_height(scale));
    let mut stamp = RgbImage::from_pixel(w as u32, h as u32, WHITE);
    text(&mut stamp, 0, 0, scale, label, INK);
    let (width, height) = (picture.width() as i64, picture.height() as i64);
    (0..=height - h).any(|y| {
        (0..=width - w).any(|x| {
            stamp.enumerate_pixels().all(|(sx, sy, s)| {
                let p = *picture.get_pixel(x as u32 + sx, y as u32 + sy);
                (*s == INK) == is_ink(p)
            })
        })
    })
}

/// A curve from 0 % at N = 1 to 100 % at N = 20: the curve starts at the plot's bottom-left
/// corner, ends at its top-right one, and climbs through every N where the geometry says.
#[test]
fn recall_curve_rises_from_the_bottom_left_corner() {
    let dir = scratch_dir("curve-ramp");
    let recalls: Vec<f64> = (0..20).map(|i| 100.0 * i as f64 / 19.0).collect();
    let out = dir.join("curve.png");
    save_recall_curve(&recalls, &[], "a ramp", &out).unwrap();
    let picture = read_png(&out);
    assert_eq!(picture.dimensions(), (1024, 640));
    assert_eq!(
        expected_point(1, 0.0, 20),
        (PLOT_LEFT, PLOT_TOP + PLOT_HEIGHT)
    );
    assert_eq!(
        expected_point(20, 100.0, 20),
        (PLOT_LEFT + PLOT_WIDTH, PLOT_TOP)
    );
    for (x, y) in [(90, 570), (990, 70)] {
        assert_eq!(*picture.get_pixel(x, y), CURVE, "corner ({x}, {y})");
    }
    let mut previous_row = f64::INFINITY;
    for (i, &recall) in recalls.iter().enumerate() {
        let (x, y) = expected_point(i + 1, recall, 20);
        assert_eq!(*picture.get_pixel(x as u32, y as u32), CURVE, "R@{}", i + 1);
        let row = curve_row(&picture, x).unwrap();
        assert!(
            (row - y as f64).abs() <= 3.0,
            "R@{}: row {row}, want {y}",
            i + 1
        );
        assert!(row < previous_row, "R@{}: the curve does not climb", i + 1);
        previous_row = row;
    }
    // without highlights nothing but the curve and grid lines is inside the plot
    assert_eq!(count_in_plot(&picture, is_ink), 0);
    assert_eq!(count_in_plot(&picture, |p| p == MARKER), 0);
}

/// Random rising curves of 1000 points: every tenth N on its place, markers and value labels at
/// the highlighted Ns, labels apart from each other.
#[test]
fn recall_curve_of_a_thousand_points_marks_and_labels_the_highlights() {
    let seed = crate::test_seed("curve_thousand");
    let mut rng = Rng(seed);
    let mut recall = rng.below(50) as f64;
    let recalls: Vec<f64> = (0..1000)
        .map(|_| {
            recall += (100.0 - recall) * rng.below(100) as f64 / 2000.0;
            recall
        })
        .collect();
    let highlight = [1, 5, 10, 20, 100, 1000];
    let dir = scratch_dir("curve-thousand");
    let out = dir.join("curve.png");
    save_recall_curve(&recalls, &highlight, "random: Recall@N", &out).unwrap();
    let picture = read_png(&out);
    assert_eq!(picture.dimensions(), (1024, 640));
    let points: Vec<(i64, i64)> = (1..=1000)
        .map(|n| expected_point(n, recalls[n - 1], 1000))
        .collect();
    let marked_columns: Vec<i64> = highlight.iter().map(|&n| points[n - 1].0).collect();
    let mut previous_row = f64::INFINITY;
    for n in (2..1000).step_by(7) {
        let x = points[n - 1].0;
        if marked_columns
            .iter()
            .any(|m| (m - x).abs() <= MARKER_RADIUS + 1)
        {
            continue;
        }
        // the segments through column x join the points from the last one left of it to the
        // first one right of it, so its pixels lie between their rows (give or take the pen)
        let first = points.iter().rposition(|p| p.0 < x).unwrap();
        let last = points.iter().position(|p| p.0 > x).unwrap();
        let rows = points[first..=last].iter().map(|p| p.1);
        let (low, high) = (rows.clone().min().unwrap() - 1, rows.max().unwrap() + 1);
        let row = curve_row(&picture, x).unwrap_or_else(|| panic!("R@{n}: no curve (seed {seed})"));
        assert!(
            (low as f64..=high as f64).contains(&row),
            "R@{n}: row {row}, want {low}..={high} (seed {seed})"
        );
        assert!(row <= previous_row, "R@{n}: the curve falls (seed {seed})");
        previous_row = row;
    }
    for &n in &highlight {
        let (x, y) = expected_point(n, recalls[n - 1], 1000);
        // a disc: its centre and four points 5 pixels from it, and nothing of it 8 from it
        for (dx, dy) in [(0, 0), (-5, 0), (5, 0), (0, -5), (0, 5)] {
            let p = *picture.get_pixel((x + dx) as u32, (y + dy) as u32);
            assert_eq!(p, MARKER, "R@{n} marker at ({dx}, {dy}) from its centre");
        }
        for (dx, dy) in [(-8, 0), (0, -8), (0, 8)] {
            let p = *picture.get_pixel((x + dx).min(1023) as u32, (y + dy) as u32);
            assert_ne!(p, MARKER, "R@{n} marker at ({dx}, {dy}) from its centre");
        }
        let label = format!("R@{n} {:.1}", recalls[n - 1]);
        assert!(
            shows_text(&picture, &label, LABEL_SCALE),
            "no {label:?} (seed {seed})"
        );
    }
    assert!(shows_text(&picture, "RANDOM: RECALL@N", 3), "title");
    for tick in ["1", "10", "100", "1000", "0", "50"] {
        assert!(shows_text(&picture, tick, LABEL_SCALE), "tick {tick}");
    }
}

/// A curve of one point is a dot at N = 1 (and the axis runs to 2).
#[test]
fn recall_curve_of_one_point_is_a_dot() {
    let dir = scratch_dir("curve-one");
    let out = dir.join("curve.png");
    save_recall_curve(&[42.0], &[], "one", &out).unwrap();
    let picture = read_png(&out);
    assert_eq!(picture.dimensions(), (1024, 640));
    let (x, y) = expected_point(1, 42.0, 1);
    assert_eq!((x, y), (90, 360));
    assert_eq!(*picture.get_pixel(x as u32, y as u32), CURVE);
    assert_eq!(
        count_in_plot(&picture, |p| p == CURVE),
        6,
        "a 3 x 3 dot, half outside the plot"
    );

    save_recall_curve(&[42.0], &[1], "one", &out).unwrap();
    let picture = read_png(&out);
    assert_eq!(*picture.get_pixel(x as u32, y as u32), MARKER);
    assert!(shows_text(&picture, "R@1 42.0", LABEL_SCALE));
}

#[test]
fn recall_curve_ticks_are_one_two_five_per_decade_and_the_last_n() {
    let ticks = |points| PlotGeometry::new(points).x_ticks();
    assert_eq!(ticks(1), (vec![1, 2], vec![]));
    assert_eq!(ticks(20), (vec![1, 2, 5, 10, 20], vec![3, 4, 6, 7, 8, 9]));
    assert_eq!(ticks(25).0, vec![1, 2, 5, 10, 20, 25]);
    // 21 is too close to 20 to get a number of its own
    assert_eq!(ticks(21).0, vec![1, 2, 5, 10, 20]);
    let (major, minor) = ticks(1000);
    assert_eq!(major, vec![1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]);
    assert_eq!(minor.len(), 18);
    assert_eq!(ticks(30).0, vec![1, 2, 5, 10, 20, 30]);
    assert!(!ticks(30).1.contains(&30));
}

/// A label goes below right of its marker on an empty plot, above left when something is drawn
/// there or the plot ends on the right, further away when both are taken, and stays inside the
/// plot even when the plot has no free place.
#[test]
fn recall_curve_labels_go_where_nothing_is_drawn() {
    let (w, h) = (
        text_width("R@20 99.9", LABEL_SCALE),
        text_height(LABEL_SCALE),
    );
    let mut picture = RgbImage::from_pixel(CURVE_WIDTH as u32, CURVE_HEIGHT as u32, WHITE);
    fill_rect(&mut picture, PLOT_LEFT, 250, PLOT_WIDTH, 1, GRID);
    assert_eq!(
        place_label(&picture, 300, 240, w, h),
        (310, 250),
        "over a grid line"
    );
    assert_eq!(
        place_label(&picture, 985, 300, w, h),
        (975 - w, 290 - h),
        "at the right"
    );
    assert_eq!(
        place_label(&picture, 985, 75, w, h),
        (975 - w, 85),
        "top right"
    );
    assert_eq!(
        place_label(&picture, 95, 565, w, h),
        (105, 555 - h),
        "bottom left"
    );

    // the four places next to a marker at (300, 300), taken one after the other by a dot at
    // their centre
    disc(&mut picture, 300, 300, MARKER_RADIUS, MARKER);
    let places = [
        (310, 310),
        (290 - w, 290 - h),
        (310, 290 - h),
        (290 - w, 310),
    ];
    for (i, taken) in [CURVE, INK, MARKER, CURVE].into_iter().enumerate() {
        assert_eq!(
            place_label(&picture, 300, 300, w, h),
            places[i],
            "place {i}"
        );
        let (x, y) = places[i];
        fill_rect(&mut picture, x + w / 2, y + h / 2, 3, 3, taken);
    }
    // with those four taken, another place, on nothing drawn
    let (left, top) = place_label(&picture, 300, 300, w, h);
    let drawn = (top - 4..top + h + 4)
        .flat_map(|y| (left - 4..left + w + 4).map(move |x| (x, y)))
        .filter(|&(x, y)| ![WHITE, GRID].contains(picture.get_pixel(x as u32, y as u32)))
        .count();
    assert_eq!(drawn, 0, "a label at ({left}, {top}) on a drawn pixel");
    assert!(!places.contains(&(left, top)), "({left}, {top}) was taken");

    fill_rect(&mut picture, 0, 0, CURVE_WIDTH, CURVE_HEIGHT, CURVE);
    assert_eq!(place_label(&picture, 985, 565, w, h), (990 - w, 570 - h));
}

/// Every pixel of the curve away from the markers is still the curve's once the markers are
/// labelled: no label covers the curve.
fn assert_labels_leave_the_curve_whole(recalls: &[f64], highlight: &[usize], seed: u64) {
    let dir = scratch_dir("curve-labels");
    let (plain, marked) = (dir.join("plain.png"), dir.join("marked.png"));
    save_recall_curve(recalls, &[], "t", &plain).unwrap();
    save_recall_curve(recalls, highlight, "t", &marked).unwrap();
    let (plain, marked) = (read_png(&plain), read_png(&marked));
    let markers: Vec<(i64, i64)> = highlight
        .iter()
        .map(|&n| expected_point(n, recalls[n - 1], recalls.len()))
        .collect();
    let mut curve_pixels = 0;
    for (x, y, p) in plain.enumerate_pixels() {
        let near_marker = markers.iter().any(|&(mx, my)| {
            (mx - x as i64).abs() <= MARKER_RADIUS + 1 && (my - y as i64).abs() <= MARKER_RADIUS + 1
        });
        if *p == CURVE && !near_marker {
            curve_pixels += 1;
            assert_eq!(
                *marked.get_pixel(x, y),
                CURVE,
                "({x}, {y}) covered (seed {seed})"
            );
        }
    }
    assert!(curve_pixels > 100, "{curve_pixels} curve pixels");
    for &n in highlight {
        let label = format!("R@{n} {:.1}", recalls[n - 1]);
        assert!(
            shows_text(&marked, &label, LABEL_SCALE),
            "no {label:?} (seed {seed})"
        );
    }
}

/// Labels leave the curve whole: a curve near 100 % at its right end (no room above the last
/// marker, none to its right), one flat at 0 % (none below), Ns next to each other.
#[test]
fn recall_curve_labels_leave_the_curve_whole() {
    let seed = crate::test_seed("curve_labels");
    let saturating: Vec<f64> = (1..=1000)
        .map(|n| {
            100.0 - 40.0 * (-(n as f64 - 1.0) / 30.0).exp() - 10.0 * (-(n as f64) / 300.0).exp()
        })
        .collect();
    assert_labels_leave_the_curve_whole(&saturating, &[1, 5, 10, 20, 100, 1000], seed);
    let mut rng = Rng(seed);
    let flat_then_rising: Vec<f64> = (0..50)
        .map(|i| {
            if i < 40 {
                0.0
            } else {
                rng.below(1000) as f64 / 10.0
            }
        })
        .scan(0.0, |max: &mut f64, r| {
            *max = max.max(r);
            Some(*max)
        })
        .collect();
    assert_labels_leave_the_curve_whole(&flat_then_rising, &[1, 2, 3, 4, 5, 10, 45, 50], seed);
}

/// No recalls, a recall that is not a percentage, a highlight outside the curve: an error
/// naming the file, and no file.
#[test]
fn recall_curve_of_bad_input_is_an_error_and_writes_nothing() {
    let dir = scratch_dir("curve-bad");
    let out = dir.join("curve.png");
    let cases: [(&[f64], &[usize], &str); 6] = [
        (&[], &[], "at least one recall"),
        (&[50.0, f64::NAN], &[], "R@2 is NaN"),
        (&[50.0, 100.5], &[], "R@2 is 100.5"),
        (&[-1.0], &[], "R@1 is -1"),
        (&[50.0, 60.0], &[0], "R@0"),
        (&[50.0, 60.0], &[1, 3], "R@3"),
    ];
    for (recalls, highlight, says) in cases {
        let message = save_recall_curve(recalls, highlight, "bad", &out)
            .expect_err(says)
            .to_string();
        assert!(message.contains(says), "{message:?} does not say {says:?}");
        assert!(message.contains(&out.display().to_string()), "{message}");
        assert!(!out.exists(), "{says}: a file was written");
    }
    assert_eq!(
        hidden_files(&dir),
        Vec::<String>::new(),
        "temporary files left"
    );
}
