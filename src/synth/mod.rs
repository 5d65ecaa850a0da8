//! `vpr-engine synth`: a procedural city rendered into the dataset layouts the trainers read, so
//! that training runs anywhere without downloading a dataset.
//!
//! `DIR/train/` holds CosPlace's square crops, `DIR/train_panoramas/` EigenPlaces' 360-degree
//! panoramas (width 6.5 x height), `DIR/val/` and `DIR/test/` `database/` and `queries/` folders;
//! every image is named `@east@north@10@S@lat@lon@pano_id@tile@heading@@@@timestamp@weather@.jpg`.
//! A panorama's heading is the bearing of its centre column: column x looks at bearing
//! `(x + 0.5) * 360 / W - (180 - heading)`, so EigenPlaces' crop at bearing b (starting at column
//! `int(((180 - heading) mod 360) / 360 * W) + int(b / 360 * W) - H / 2`) is the view at b.
//! See [`plan`] for what each split holds and [`SynthOptions`] for the sizes.

pub mod city;
pub mod names;
pub mod plan;
pub mod render;

use crate::error::{Error, Result};
use crate::io::image::Rgb8;
use crate::io::{io_error, AtomicFile};
use plan::{Capture, Plan};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Instant;

/// The file that marks a folder as written by `synth`.
pub const MANIFEST: &str = "synth.json";
/// What `synth` writes into its folder (and the trainer's cache of class tables, which a new
/// city makes stale): the entries it may replace.
const OWNED: [&str; 6] = [
    plan::TRAIN,
    plan::TRAIN_PANORAMAS,
    "val",
    "test",
    "cache",
    MANIFEST,
];
/// Prefix of the folder a run renders into before moving the result into place.
const STAGING: &str = ".synth-partial-";
const JPEG_QUALITY: u8 = 85;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthOptions {
    /// Training places: 10 m street cells, each photographed from 12 camera positions (12
    /// panoramas, 144 crops, 12 CosPlace classes). Val and test hold `max(2, places / 4)`
    /// places each (12 database images per place) and `max(10, places)` queries.
    pub places: usize,
    /// Seeds the city and every capture: the same seed gives the same bytes.
    pub seed: u64,
    /// Side of the square crops and height of the panoramas (a multiple of 24, so that the
    /// panorama width 6.5 x side is a whole number of 30-degree steps).
    pub image_size: usize,
}

impl Default for SynthOptions {
    fn default() -> SynthOptions {
        SynthOptions {
            places: 96,
            seed: 0,
            image_size: 96,
        }
    }
}

impl SynthOptions {
    pub fn validate(&self) -> Result<()> {
        if !(1..=20_000).contains(&self.places) {
            return Err(Error::Argument(format!(
                "--places {}: need 1 to 20000 places",
                self.places
            )));
        }
        if self.image_size % 24 != 0 || !(48..=960).contains(&self.image_size) {
            return Err(Error::Argument(format!(
                "--image-size {}: need a multiple of 24 from 48 to 960",
                self.image_size
            )));
        }
        Ok(())
    }

    /// Width of the panoramas: 6.5 x their height, as SF-XL's 3328 x 512.
    pub fn panorama_width(&self) -> usize {
        self.image_size * 13 / 2
    }

    /// Places of the val split and of the test split.
    pub fn eval_places(&self) -> usize {
        (self.places / 4).max(2)
    }

    /// Queries of the val split and of the test split.
    pub fn queries(&self) -> usize {
        self.places.max(10)
    }
}

/// What was written.
#[derive(Clone, Debug, PartialEq)]
pub struct SynthSummary {
    pub train_crops: usize,
    pub train_panoramas: usize,
    pub val_database: usize,
    pub val_queries: usize,
    pub test_database: usize,
    pub test_queries: usize,
    /// CosPlace's classes (10 m x 30 degrees, at least 10 images) in `train/`, all in one group.
    pub cosplace_classes: usize,
    /// EigenPlaces' classes (15 m cells, at least 5 panoramas) in `train_panoramas/`.
    pub eigenplaces_classes: usize,
    pub seconds: f64,
}

/// Renders the datasets of `options` into `out`, which must be missing, empty, or an earlier
/// `synth` output (with its `synth.json`); an earlier output is replaced only once the new one
/// is complete, together with the trainer's `cache/`.
pub fn generate(out: &Path, options: &SynthOptions) -> Result<SynthSummary> {
    generate_with_progress(out, options, &mut |_, _| {})
}

/// [`generate`], calling `progress(captures done, captures)` as captures are written.
pub fn generate_with_progress(
    out: &Path,
    options: &SynthOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SynthSummary> {
    let start = Instant::now();
    options.validate()?;
    let replaced = check_output_folder(out)?;
    let plan = Plan::new(options)?;
    let staging = out.join(format!("{STAGING}{}", std::process::id()));
    // what an interrupted run with the same process id left (usually nothing)
    let _ = std::fs::remove_dir_all(&staging);
    let folders: HashSet<PathBuf> = plan
        .images()
        .filter_map(|i| i.path.parent().map(Path::to_path_buf))
        .collect();
    for folder in &folders {
        let dir = staging.join(folder);
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
    }
    let written = render_all(&plan, &staging, progress);
    if let Err(e) = written {
        // the error that stopped the run is the one to report, not a failed clean-up
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    for entry in replaced {
        let path = out.join(&entry);
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(|e| io_error(&path, e))?;
    }
    for top in [plan::TRAIN, plan::TRAIN_PANORAMAS, "val", "test"] {
        let (from, to) = (staging.join(top), out.join(top));
        std::fs::rename(&from, &to).map_err(|e| io_error(&to, e))?;
    }
    std::fs::remove_dir_all(&staging).map_err(|e| io_error(&staging, e))?;
    let summary = summarize(&plan, start.elapsed().as_secs_f64());
    write_manifest(out, options, &summary)?;
    Ok(summary)
}

/// Creates `out` if missing; otherwise it must be empty or an earlier output. Returns the
/// entries to replace (never `synth.json`, which is rewritten last, so that an interrupted run
/// still leaves a folder marked as ours).
fn check_output_folder(out: &Path) -> Result<Vec<String>> {
    if !out.exists() {
        std::fs::create_dir_all(out).map_err(|e| io_error(out, e))?;
        return Ok(Vec::new());
    }
    if !out.is_dir() {
        return Err(Error::Argument(format!(
            "--out {}: exists and is not a folder",
            out.display()
        )));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| io_error(out, e))? {
        let entry = entry.map_err(|e| io_error(out, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if names.is_empty() {
        return Ok(names);
    }
    if !names.iter().any(|n| n == MANIFEST) {
        return Err(Error::Argument(format!(
            "--out {}: the folder is not empty and holds no {MANIFEST} of an earlier synth run; \
             give a new or empty folder",
            out.display()
        )));
    }
    if let Some(other) = names
        .iter()
        .find(|n| !OWNED.contains(&n.as_str()) && !n.starts_with(STAGING))
    {
        return Err(Error::Argument(format!(
            "--out {}: an earlier synth output, but it also holds {other}, which synth did not \
             write; move it away to regenerate here",
            out.display()
        )));
    }
    names.retain(|n| n != MANIFEST);
    Ok(names)
}

/// Renders every capture on all cores and writes its images under `root`.
fn render_all(plan: &Plan, root: &Path, progress: &mut dyn FnMut(usize, usize)) -> Result<()> {
    let total = plan.captures.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(total.max(1));
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let (sender, receiver) = mpsc::channel::<Result<()>>();
        for _ in 0..threads {
            let sender = sender.clone();
            let (next, failed) = (&next, &failed);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || failed.load(Ordering::Relaxed) {
                    return;
                }
                let result = write_capture(plan, &plan.captures[i], root);
                if result.is_err() {
                    failed.store(true, Ordering::Relaxed);
                }
                if sender.send(result).is_err() {
                    return;
                }
            });
        }
        drop(sender);
        let mut done = 0;
        for result in receiver {
            result?;
            done += 1;
            progress(done, total);
        }
        Ok(())
    })
}

fn write_capture(plan: &Plan, capture: &Capture, root: &Path) -> Result<()> {
    let view = render::render(
        &plan.city,
        &capture.view,
        &capture.appearance,
        capture.noise_seed,
    );
    for image in &capture.images {
        let cut = columns(&view, image.column, image.width);
        let path = root.join(&image.path);
        std::fs::write(&path, encode_jpeg(&cut, &path)?).map_err(|e| io_error(&path, e))?;
    }
    Ok(())
}

/// Columns `first..first + width` of `image`, wrapping around its right edge.
pub fn columns(image: &Rgb8, first: usize, width: usize) -> Rgb8 {
    if first == 0 && width == image.width {
        return image.clone();
    }
    let mut pixels = Vec::with_capacity(image.height * width * 3);
    for y in 0..image.height {
        let row = &image.pixels[y * image.width * 3..(y + 1) * image.width * 3];
        for x in 0..width {
            let i = (first + x) % image.width * 3;
            pixels.extend_from_slice(&row[i..i + 3]);
        }
    }
    Rgb8 {
        height: image.height,
        width,
        pixels,
    }
}

/// Baseline JPEG bytes of `image` (for the error message: the file it is for).
pub fn encode_jpeg(image: &Rgb8, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, JPEG_QUALITY)
        .encode(
            &image.pixels,
            image.width as u32,
            image.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| Error::Format {
            path: path.display().to_string(),
            message: format!("cannot encode the image as JPEG: {e}"),
        })?;
    Ok(bytes)
}

/// CosPlace's classes of a list of file names: (floor(e / 10), floor(n / 10), floor(h / 30))
/// with at least `min_images` images.
pub fn cosplace_classes<'a>(names: impl Iterator<Item = &'a str>, min_images: usize) -> usize {
    let mut counts: HashMap<(i64, i64, i64), usize> = HashMap::new();
    for name in names {
        let fields: Vec<&str> = name.split('@').collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(e), Some(n), Some(h)) = (number(1), number(2), number(9)) {
            let key = (
                (e / 10.0).floor() as i64,
                (n / 10.0).floor() as i64,
                (h / 30.0).floor() as i64,
            );
            *counts.entry(key).or_default() += 1;
        }
    }
    counts.values().filter(|&&c| c >= min_images).count()
}

/// EigenPlaces' classes: (floor(e / 15), floor(n / 15)) with at least `min_images` panoramas.
pub fn eigenplaces_classes<'a>(names: impl Iterator<Item = &'a str>, min_images: usize) -> usize {
    let mut counts: HashMap<(i64, i64), usize> = HashMap::new();
    for name in names {
        let fields: Vec<&str> = name.split('@').collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        if let (Some(e), Some(n)) = (number(1), number(2)) {
            let key = ((e / 15.0).floor() as i64, (n / 15.0).floor() as i64);
            *counts.entry(key).or_default() += 1;
        }
    }
    counts.values().filter(|&&c| c >= min_images).count()
}

fn summarize(plan: &Plan, seconds: f64) -> SynthSummary {
    let in_folder = |folder: &str| -> Vec<String> {
        plan.images()
            .filter(|i| i.path.parent() == Some(Path::new(folder)))
            .map(|i| i.name.file_name())
            .collect()
    };
    let crops = in_folder(plan::TRAIN);
    let panoramas = in_folder(plan::TRAIN_PANORAMAS);
    SynthSummary {
        train_crops: crops.len(),
        train_panoramas: panoramas.len(),
        val_database: in_folder("val/database").len(),
        val_queries: in_folder("val/queries").len(),
        test_database: in_folder("test/database").len(),
        test_queries: in_folder("test/queries").len(),
        cosplace_classes: cosplace_classes(crops.iter().map(String::as_str), 10),
        eigenplaces_classes: eigenplaces_classes(panoramas.iter().map(String::as_str), 5),
        seconds,
    }
}

fn write_manifest(out: &Path, options: &SynthOptions, s: &SynthSummary) -> Result<()> {
    let text = format!(
        "{{\n  \"generator\": \"vpr-engine synth {}\",\n  \"seed\": {},\n  \"places\": {},\n  \
         \"image_size\": {},\n  \"panorama_width\": {},\n  \"train\": {},\n  \
         \"train_panoramas\": {},\n  \"val_database\": {},\n  \"val_queries\": {},\n  \
         \"test_database\": {},\n  \"test_queries\": {},\n  \"cosplace_classes\": {},\n  \
         \"eigenplaces_classes\": {}\n}}\n",
        env!("CARGO_PKG_VERSION"),
        options.seed,
        options.places,
        options.image_size,
        options.panorama_width(),
        s.train_crops,
        s.train_panoramas,
        s.val_database,
        s.val_queries,
        s.test_database,
        s.test_queries,
        s.cosplace_classes,
        s.eigenplaces_classes
    );
    let mut file = AtomicFile::create(&out.join(MANIFEST))?;
    file.write_bytes(text.as_bytes())?;
    file.commit()
}
