//! Pictures of an evaluation: a query beside its top predictions, each framed by whether it is
//! a positive (what VPR-methods-evaluation's `--num_preds_to_save` draws), and the Recall@N
//! curve. They are drawn pixel by pixel on an `image::RgbImage` with our own 5x7 bitmap font
//! (`font`), so no font file or plotting library is needed, and written as PNG through
//! [`AtomicFile`].

mod font;

use crate::error::{Error, Result};
use crate::io::image::{self as io_image, ImageF32, Rgb8};
use crate::io::AtomicFile;
use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// How a picture marks an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// The query: a neutral grey frame.
    Query,
    /// A prediction within the positive distance of the query: a green frame.
    Positive,
    /// A prediction that is not a positive: a red frame.
    Negative,
}

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const QUERY_FRAME: Rgb<u8> = Rgb([150, 150, 150]);
const POSITIVE_FRAME: Rgb<u8> = Rgb([0, 170, 60]);
const NEGATIVE_FRAME: Rgb<u8> = Rgb([220, 30, 30]);

// The prediction picture: a row of tiles, each a caption band above a square whose outer
// `FRAME` pixels are the frame and whose inside holds the image.
/// Side of a tile, frame included.
const TILE: i64 = 384;
/// Thickness of a tile's frame.
const FRAME: i64 = 12;
/// Space around and between tiles.
const GAP: i64 = 16;
/// Height of the band above a tile that holds its caption.
const CAPTION_HEIGHT: i64 = 40;
/// Pixels per font pixel in captions.
const CAPTION_SCALE: i64 = 3;

impl Mark {
    fn frame_colour(self) -> Rgb<u8> {
        match self {
            Mark::Query => QUERY_FRAME,
            Mark::Positive => POSITIVE_FRAME,
            Mark::Negative => NEGATIVE_FRAME,
        }
    }
}

/// Width and height of a prediction picture of `tiles` tiles (the query's included).
fn prediction_picture_size(tiles: usize) -> (i64, i64) {
    (
        GAP + tiles as i64 * (TILE + GAP),
        GAP + CAPTION_HEIGHT + TILE + GAP,
    )
}

/// Top-left corner of tile `index` (0 is the query's), frame included; its caption band is the
/// `CAPTION_HEIGHT` rows above it.
fn tile_origin(index: usize) -> (i64, i64) {
    (GAP + index as i64 * (TILE + GAP), GAP + CAPTION_HEIGHT)
}

/// One PNG at `out`: the query, then its predictions left to right (rank 1 first), each image
/// scaled to fit a square tile with its aspect kept (white padding on the short side), framed
/// green when [`Mark::Positive`], red when [`Mark::Negative`] and grey when [`Mark::Query`],
/// under a caption: "QUERY", then "1 POSITIVE", "2 NEGATIVE", ... (a prediction marked
/// [`Mark::Query`] gets its rank alone). Every image is read before anything is written, so an
/// unreadable one (an error naming its path) leaves no file.
pub fn save_prediction_picture(
    query: &Path,
    predictions: &[(&Path, Mark)],
    out: &Path,
) -> Result<()> {
    let inner = TILE - 2 * FRAME;
    // each image shrunk as soon as it is read, so that only one is held at full size
    let tiles: Vec<(Rgb8, Mark, String)> = std::iter::once((query, Mark::Query))
        .chain(predictions.iter().copied())
        .enumerate()
        .map(|(index, (path, mark))| {
            let caption = match (index, mark) {
                (0, _) => "QUERY".to_string(),
                (rank, Mark::Positive) => format!("{rank} POSITIVE"),
                (rank, Mark::Negative) => format!("{rank} NEGATIVE"),
                (rank, Mark::Query) => rank.to_string(),
            };
            let fitted = fit_in_square(&io_image::decode(path)?, inner as usize);
            Ok((fitted, mark, caption))
        })
        .collect::<Result<_>>()?;

    let (width, height) = prediction_picture_size(tiles.len());
    let mut picture = RgbImage::from_pixel(width as u32, height as u32, WHITE);
    for (index, (fitted, mark, caption)) in tiles.iter().enumerate() {
        let (x, y) = tile_origin(index);
        frame(&mut picture, x, y, TILE, TILE, FRAME, mark.frame_colour());
        let image_x = x + FRAME + (inner - fitted.width as i64) / 2;
        let image_y = y + FRAME + (inner - fitted.height as i64) / 2;
        paste(&mut picture, fitted, image_x, image_y);
        let caption_x = x + (TILE - text_width(caption, CAPTION_SCALE)) / 2;
        let caption_y = y - (CAPTION_HEIGHT + text_height(CAPTION_SCALE)) / 2;
        text(
            &mut picture,
            caption_x,
            caption_y,
            CAPTION_SCALE,
            caption,
            INK,
        );
    }
    write_png(&picture, out)
}

/// `image` resized so that its long side is `side` pixels and its aspect is kept, with
/// torchvision's anti-aliased bilinear filter (a triangle filter widened by the shrink factor,
/// so that every source pixel counts).
fn fit_in_square(image: &Rgb8, side: usize) -> Rgb8 {
    let scale = side as f64 / image.width.max(image.height) as f64;
    let scaled = |n: usize| ((n as f64 * scale).round() as usize).clamp(1, side);
    let (height, width) = (scaled(image.height), scaled(image.width));
    let float = ImageF32 {
        height: image.height,
        width: image.width,
        data: image.pixels.iter().map(|&v| v as f32).collect(),
    };
    let resized = io_image::resize(&float, height, width, true);
    Rgb8 {
        height,
        width,
        pixels: resized
            .data
            .iter()
            .map(|v| v.round().clamp(0.0, 255.0) as u8)
            .collect(),
    }
}

// The Recall@N curve: a plot area with a logarithmic N axis (so that R@1 ... R@20 stay apart
// when the curve runs to N = 1000) and a linear 0-100 % recall axis.
const CURVE_WIDTH: i64 = 1024;
const CURVE_HEIGHT: i64 = 640;
const PLOT_LEFT: i64 = 90;
const PLOT_TOP: i64 = 70;
const PLOT_WIDTH: i64 = 900;
const PLOT_HEIGHT: i64 = 500;
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
const CURVE: Rgb<u8> = Rgb([0, 90, 220]);
const MARKER: Rgb<u8> = Rgb([240, 120, 0]);
/// Thickness of the curve's line.
const CURVE_PEN: i64 = 3;
/// Radius of the disc that marks a highlighted N.
const MARKER_RADIUS: i64 = 6;
/// Pixels per font pixel in tick and value labels.
const LABEL_SCALE: i64 = 2;

/// Where values land in the plot area of a curve of `points` points.
struct PlotGeometry {
    /// The N at the right edge: the last point's, at least 2 so that the axis has a length.
    n_max: f64,
}

impl PlotGeometry {
    fn new(points: usize) -> PlotGeometry {
        PlotGeometry {
            n_max: points.max(2) as f64,
        }
    }

    /// Pixel column of N.
    fn x(&self, n: f64) -> i64 {
        PLOT_LEFT + (PLOT_WIDTH as f64 * n.log10() / self.n_max.log10()).round() as i64
    }

    /// Pixel row of a recall in percent.
    fn y(&self, recall: f64) -> i64 {
        PLOT_TOP + (PLOT_HEIGHT as f64 * (1.0 - recall / 100.0)).round() as i64
    }

    /// The N that get a tick, a grid line and a number (1, 2, 5, 10, 20, 50 ...), and those
    /// that get a small tick only (3, 4, 6, ... 9, 30 ...), up to `n_max`. The last N is
    /// numbered too unless it is too close to the previous number.
    fn x_ticks(&self) -> (Vec<u64>, Vec<u64>) {
        let n_max = self.n_max as u64;
        let (mut major, mut minor) = (Vec::new(), Vec::new());
        let mut decade = 1;
        while decade <= n_max {
            for digit in 1..10 {
                let n = digit * decade;
                if n > n_max {
                    break;
                }
                match digit {
                    1 | 2 | 5 => major.push(n),
                    _ => minor.push(n),
                }
            }
            decade *= 10;
        }
        let last = *major.last().expect("1 is always a tick");
        if last != n_max && self.x(n_max as f64) - self.x(last as f64) >= 40 {
            minor.retain(|&n| n != n_max);
            major.push(n_max);
        }
        (major, minor)
    }
}

/// A Recall@N line chart as PNG at `out`: N from 1 to `recalls.len()` on a logarithmic axis
/// (`recalls[i]` is R@(i + 1) in percent), recall 0-100 % up the side, light grey grid lines, a
/// blue curve with orange markers at the `highlight` Ns, each labelled with its value ("R@5
/// 96.4"), and `title` on top. An empty curve, a recall that is not a number in 0-100 or a
/// highlighted N outside the curve is an error, and nothing is written.
pub fn save_recall_curve(
    recalls: &[f64],
    highlight: &[usize],
    title: &str,
    out: &Path,
) -> Result<()> {
    if recalls.is_empty() {
        return Err(Error::Argument(format!(
            "{}: a Recall@N curve needs at least one recall",
            out.display()
        )));
    }
    if let Some((i, r)) = recalls
        .iter()
        .enumerate()
        .find(|(_, r)| !(0.0..=100.0).contains(*r))
    {
        return Err(Error::Argument(format!(
            "{}: R@{} is {r}, not a percentage in 0-100",
            out.display(),
            i + 1
        )));
    }
    let mut highlight = highlight.to_vec();
    highlight.sort_unstable();
    highlight.dedup();
    if let Some(n) = highlight.iter().find(|&&n| n == 0 || n > recalls.len()) {
        return Err(Error::Argument(format!(
            "{}: R@{n} is highlighted but the curve has R@1 to R@{}",
            out.display(),
            recalls.len()
        )));
    }

    let plot = PlotGeometry::new(recalls.len());
    let mut picture = RgbImage::from_pixel(CURVE_WIDTH as u32, CURVE_HEIGHT as u32, WHITE);
    draw_title(&mut picture, title);
    draw_axes(&mut picture, &plot);
    let points: Vec<(i64, i64)> = recalls
        .iter()
        .enumerate()
        .map(|(i, &r)| (plot.x((i + 1) as f64), plot.y(r)))
        .collect();
    // a dot first, which is the whole curve when it has one point
    line(&mut picture, points[0], points[0], CURVE_PEN, CURVE);
    for pair in points.windows(2) {
        line(&mut picture, pair[0], pair[1], CURVE_PEN, CURVE);
    }
    for &n in &highlight {
        let (x, y) = points[n - 1];
        disc(&mut picture, x, y, MARKER_RADIUS, MARKER);
    }
    for &n in &highlight {
        let (x, y) = points[n - 1];
        let label = format!("R@{n} {:.1}", recalls[n - 1]);
        let (w, h) = (text_width(&label, LABEL_SCALE), text_height(LABEL_SCALE));
        let (left, top) = place_label(&picture, x, y, w, h);
        fill_rect(&mut picture, left - 2, top - 2, w + 4, h + 4, WHITE);
        text(&mut picture, left, top, LABEL_SCALE, &label, INK);
    }
    write_png(&picture, out)
}

/// The title centred above the plot, in the largest of three sizes that fits the width.
fn draw_title(picture: &mut RgbImage, title: &str) {
    let scale = (1..=3)
        .rev()
        .find(|&s| text_width(title, s) <= CURVE_WIDTH - 2 * GAP)
        .unwrap_or(1);
    let x = ((CURVE_WIDTH - text_width(title, scale)) / 2).max(GAP);
    text(picture, x, 12, scale, title, INK);
}

/// Grid lines, the two axes, their ticks and numbers, and the axis names.
fn draw_axes(picture: &mut RgbImage, plot: &PlotGeometry) {
    let bottom = PLOT_TOP + PLOT_HEIGHT;
    let label_height = text_height(LABEL_SCALE);
    for recall in (0..=100).step_by(10) {
        let y = plot.y(recall as f64);
        fill_rect(picture, PLOT_LEFT, y, PLOT_WIDTH, 1, GRID);
        fill_rect(picture, PLOT_LEFT - 8, y, 8, 1, INK);
        let number = recall.to_string();
        let x = PLOT_LEFT - 14 - text_width(&number, LABEL_SCALE);
        text(picture, x, y - label_height / 2, LABEL_SCALE, &number, INK);
    }
    let (major, minor) = plot.x_ticks();
    for n in major {
        let x = plot.x(n as f64);
        fill_rect(picture, x, PLOT_TOP, 1, PLOT_HEIGHT, GRID);
        fill_rect(picture, x, bottom, 1, 8, INK);
        let number = n.to_string();
        let number_x = x - text_width(&number, LABEL_SCALE) / 2;
        text(picture, number_x, bottom + 14, LABEL_SCALE, &number, INK);
    }
    for n in minor {
        fill_rect(picture, plot.x(n as f64), bottom, 1, 4, INK);
    }
    // the axes over the grid, 2 px thick, outside the plot area so that a curve on 0 % or at
    // N = 1 stays visible
    fill_rect(picture, PLOT_LEFT - 2, PLOT_TOP, 2, PLOT_HEIGHT + 2, INK);
    fill_rect(picture, PLOT_LEFT - 2, bottom + 1, PLOT_WIDTH + 2, 2, INK);
    let x_name = "N (LOG SCALE)";
    let x_name_left = PLOT_LEFT + (PLOT_WIDTH - text_width(x_name, LABEL_SCALE)) / 2;
    text(picture, x_name_left, bottom + 40, LABEL_SCALE, x_name, INK);
    text(
        picture,
        GAP,
        PLOT_TOP - 26,
        LABEL_SCALE,
        "RECALL@N (%)",
        INK,
    );
}

/// Top-left corner for a `w` x `h` label of the marker at (x, y): the place nearest the marker
/// where the label and a margin around it stay inside the plot and cover nothing drawn so far
/// but background and grid lines (neither the curve, nor a marker, nor another label), at
/// least `OFFSET` pixels from the marker's centre. Among places equally near, a label diagonal
/// to its marker comes before one beside or under it, and below right of the marker (a rising
/// curve leaves the plot empty there) before above left, above right and below left.
/// Below right, held inside the plot, when the plot has no free place.
fn place_label(picture: &RgbImage, x: i64, y: i64, w: i64, h: i64) -> (i64, i64) {
    const OFFSET: i64 = 10;
    const MARGIN: i64 = 4;
    let blank = |&(left, top): &(i64, i64)| {
        (top - MARGIN..top + h + MARGIN).all(|py| {
            (left - MARGIN..left + w + MARGIN).all(|px| {
                let p = *picture.get_pixel(px as u32, py as u32);
                p == WHITE || p == GRID
            })
        })
    };
    // every place inside the plot on a 2-pixel grid through the preferred one
    let grid =
        |through: i64, low: i64, high: i64| (low + (through - low).rem_euclid(2)..=high).step_by(2);
    let lefts = grid(
        x + OFFSET,
        PLOT_LEFT + MARGIN,
        PLOT_LEFT + PLOT_WIDTH - MARGIN - w,
    );
    // (distance from the marker, how far from diagonal, side, left, top), sorted by preference
    let mut places: Vec<(i64, i64, u8, i64, i64)> = Vec::new();
    for top in grid(
        y + OFFSET,
        PLOT_TOP + MARGIN,
        PLOT_TOP + PLOT_HEIGHT - MARGIN - h,
    ) {
        for left in lefts.clone() {
            let gap_x = (left - x).max(x - (left + w)).max(0);
            let gap_y = (top - y).max(y - (top + h)).max(0);
            let gap = gap_x.max(gap_y);
            let (right, below) = (2 * left + w >= 2 * x, 2 * top + h >= 2 * y);
            let side = match (right, below) {
                (true, true) => 0,
                (false, false) => 1,
                (true, false) => 2,
                (false, true) => 3,
            };
            if gap >= OFFSET {
                places.push((gap, (gap_x - gap_y).abs(), side, left, top));
            }
        }
    }
    places.sort_unstable();
    places
        .into_iter()
        .map(|(_, _, _, left, top)| (left, top))
        .find(blank)
        .unwrap_or((
            (x + OFFSET).clamp(PLOT_LEFT, PLOT_LEFT + PLOT_WIDTH - w),
            (y + OFFSET).clamp(PLOT_TOP, PLOT_TOP + PLOT_HEIGHT - h),
        ))
}

/// Encodes `picture` as PNG in memory, then writes it to `out` through [`AtomicFile`].
fn write_png(picture: &RgbImage, out: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    picture
        .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| Error::Format {
            path: out.display().to_string(),
            message: format!("cannot encode the PNG: {e}"),
        })?;
    let mut file = AtomicFile::create(out)?;
    file.write_bytes(&bytes)?;
    file.commit()
}

// Drawing helpers. Coordinates are signed and anything outside the picture is clipped.

/// Fills the `w` x `h` rectangle whose top-left corner is (x, y).
fn fill_rect(picture: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, colour: Rgb<u8>) {
    let (width, height) = (picture.width() as i64, picture.height() as i64);
    for row in y.max(0)..(y + h).min(height) {
        for column in x.max(0)..(x + w).min(width) {
            picture.put_pixel(column as u32, row as u32, colour);
        }
    }
}

/// The `thickness`-pixel border just inside the `w` x `h` rectangle at (x, y).
fn frame(picture: &mut RgbImage, x: i64, y: i64, w: i64, h: i64, thickness: i64, c: Rgb<u8>) {
    fill_rect(picture, x, y, w, thickness, c);
    fill_rect(picture, x, y + h - thickness, w, thickness, c);
    fill_rect(picture, x, y, thickness, h, c);
    fill_rect(picture, x + w - thickness, y, thickness, h, c);
}

/// A line from `from` to `to` (Bresenham's), drawn with a square pen `pen` pixels wide.
fn line(picture: &mut RgbImage, from: (i64, i64), to: (i64, i64), pen: i64, colour: Rgb<u8>) {
    let (mut x, mut y) = from;
    let (dx, dy) = ((to.0 - x).abs(), -(to.1 - y).abs());
    let (step_x, step_y) = ((to.0 - x).signum(), (to.1 - y).signum());
    let mut error = dx + dy;
    loop {
        fill_rect(picture, x - pen / 2, y - pen / 2, pen, pen, colour);
        if (x, y) == to {
            break;
        }
        let doubled = 2 * error;
        if doubled >= dy {
            error += dy;
            x += step_x;
        }
        if doubled <= dx {
            error += dx;
            y += step_y;
        }
    }
}

/// A filled disc of radius `r` centred on (x, y).
fn disc(picture: &mut RgbImage, x: i64, y: i64, r: i64, colour: Rgb<u8>) {
    for dy in -r..=r {
        let half = ((r * r - dy * dy) as f64).sqrt().round() as i64;
        fill_rect(picture, x - half, y + dy, 2 * half + 1, 1, colour);
    }
}

/// Copies `image` into `picture` with its top-left corner at (x, y).
fn paste(picture: &mut RgbImage, image: &Rgb8, x: i64, y: i64) {
    for (row, pixels) in image.pixels.chunks_exact(image.width * 3).enumerate() {
        for (column, p) in pixels.chunks_exact(3).enumerate() {
            let colour = Rgb([p[0], p[1], p[2]]);
            fill_rect(picture, x + column as i64, y + row as i64, 1, 1, colour);
        }
    }
}

/// Width in pixels of `s` drawn at `scale` (no blank column after the last glyph).
fn text_width(s: &str, scale: i64) -> i64 {
    let glyphs = s.chars().count() as i64;
    (glyphs * font::ADVANCE as i64 - 1).max(0) * scale
}

/// Height in pixels of a line of text drawn at `scale`.
fn text_height(scale: i64) -> i64 {
    font::GLYPH_HEIGHT as i64 * scale
}

/// `s` in the bitmap font with its top-left corner at (x, y), each font pixel a `scale` x
/// `scale` square.
fn text(picture: &mut RgbImage, x: i64, y: i64, scale: i64, s: &str, colour: Rgb<u8>) {
    for (i, c) in s.chars().enumerate() {
        let left = x + (i * font::ADVANCE) as i64 * scale;
        for (row, ink) in font::glyph(c).iter().enumerate() {
            for (column, _) in ink.match_indices('#') {
                let (px, py) = (left + column as i64 * scale, y + row as i64 * scale);
                fill_rect(picture, px, py, scale, scale, colour);
            }
        }
    }
}

#[cfg(test)]
mod tests;
