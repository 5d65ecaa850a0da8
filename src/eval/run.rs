//! One evaluation, as `vpr-engine eval` runs it: descriptors of a test set's queries and database
//! (extracted by a model, or read from `.npy` files), the exact search, positives, SelaVPR's
//! re-ranking by local features when asked, and Recall@N.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::dataset::EvalDataset;
use crate::eval::extract::{self, ExtractOptions};
use crate::eval::recall::{self, Predictions};
use crate::eval::rerank;
use crate::eval::search::{self, DescriptorRows, SearchOptions};
use crate::io::npy::{MappedMatrix, Matrix};
use crate::models::PlaceModel;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the descriptors come from.
pub enum Descriptors<'a> {
    /// Extracted from the test set's images by a model.
    Model {
        model: &'a dyn PlaceModel,
        options: ExtractOptions,
    },
    /// Read from float32 `.npy` files, row i for the i-th image of the test set.
    Files { queries: PathBuf, database: PathBuf },
}

/// SelaVPR's re-ranking of the first `k` predictions by local features: the maps' files
/// (`queries_local.npy` and `database_local.npy` that a model writes into a folder, or the
/// files of `Descriptors::Files`' local features).
pub struct Rerank {
    pub k: usize,
    pub queries: PathBuf,
    pub database: PathBuf,
}

impl Rerank {
    /// Re-ranking whose local maps a model writes into `dir`.
    pub fn in_folder(k: usize, dir: &Path) -> Rerank {
        Rerank {
            k,
            queries: dir.join("queries_local.npy"),
            database: dir.join("database_local.npy"),
        }
    }
}

/// What an evaluation found.
pub struct Evaluation {
    /// Each query's nearest database images, `k` = the largest recall N (or the database size).
    pub predictions: Predictions,
    /// Each query's positives (database indices within the distance threshold).
    pub positives: Vec<Vec<usize>>,
    /// Recall@N in percent for each N asked for (after re-ranking when it was asked for).
    pub recalls: Vec<f64>,
    /// Recall@N of the global search alone, when the predictions were re-ranked.
    pub recalls_before_rerank: Option<Vec<f64>>,
    /// The descriptors when a model extracted them (queries, database).
    pub extracted: Option<(Matrix, Matrix)>,
    /// Seconds spent getting the descriptors, searching and re-ranking.
    pub extract_seconds: f64,
    pub search_seconds: f64,
    pub rerank_seconds: f64,
}

/// Progress of the stages, for a progress bar: `(stage, done, total)`.
pub type Progress<'a> = &'a mut dyn FnMut(&str, usize, usize);

/// Evaluates on `dataset`: descriptors from `descriptors`, search on `device` for the largest N of
/// `recall_values` (and at least `rerank.k`), positives within `threshold` metres; with `rerank`,
/// the first k predictions re-ordered by local features (a model writes its maps to the rerank
/// files first).
pub fn evaluate(
    dataset: &EvalDataset,
    descriptors: Descriptors,
    device: &Device,
    threshold: f64,
    recall_values: &[usize],
    rerank: Option<&Rerank>,
    progress: Progress,
) -> Result<Evaluation> {
    let largest = recall_values
        .iter()
        .copied()
        .max()
        .ok_or_else(|| Error::Argument("no recall value to compute".into()))?;
    let positives = dataset.positives(threshold)?;
    let start = Instant::now();
    let (queries, database, extracted): (Box<dyn DescriptorRows>, Box<dyn DescriptorRows>, _) =
        match descriptors {
            Descriptors::Model { model, options } => {
                let mut extract_images = |stage: &str, paths: &[PathBuf], local: Option<&Path>| {
                    let options = ExtractOptions {
                        local: local.map(Path::to_path_buf),
                        ..options.clone()
                    };
                    extract::extract_descriptors(model, paths, &options, &mut |done| {
                        progress(stage, done, paths.len())
                    })
                };
                let local = |f: fn(&Rerank) -> &Path| rerank.map(f);
                let database =
                    extract_images("database", &dataset.database, local(|r| &r.database))?;
                let queries = extract_images("queries", &dataset.queries, local(|r| &r.queries))?;
                let kept = (queries.clone(), database.clone());
                (Box::new(queries), Box::new(database), Some(kept))
            }
            Descriptors::Files { queries, database } => (
                Box::new(open_descriptors(&queries, &dataset.queries, "queries")?),
                Box::new(open_descriptors(&database, &dataset.database, "database")?),
                None,
            ),
        };
    let extract_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let k = largest.max(rerank.map_or(0, |r| r.k));
    let options = SearchOptions::for_device(device, k);
    let total = database.shape()[0];
    let mut predictions = search::search(
        queries.as_ref(),
        database.as_ref(),
        &options,
        device,
        &mut |done| progress("search", done, total),
    )?;
    let search_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut recalls_before_rerank = None;
    if let Some(r) = rerank {
        let open = |path: &Path, rows: usize, part: &str| -> Result<MappedMatrix> {
            let m = MappedMatrix::open_rows(path)?;
            if m.rows != rows {
                return Err(Error::Shape(format!(
                    "{}: local features of {} images for the {rows} {part} images of the test set",
                    path.display(),
                    m.rows
                )));
            }
            Ok(m)
        };
        let local_queries = open(&r.queries, dataset.queries.len(), "query")?;
        let local_database = open(&r.database, dataset.database.len(), "database")?;
        recalls_before_rerank = Some(recall_at(&predictions, &positives, recall_values)?);
        let queries = dataset.queries.len();
        predictions = rerank::rerank(
            &predictions,
            r.k,
            &local_queries,
            &local_database,
            device,
            &mut |done| progress("rerank", done, queries),
        )?;
    }
    let rerank_seconds = start.elapsed().as_secs_f64();
    let recalls = recall_at(&predictions, &positives, recall_values)?;
    Ok(Evaluation {
        predictions,
        positives,
        recalls,
        recalls_before_rerank,
        extracted,
        extract_seconds,
        search_seconds,
        rerank_seconds,
    })
}

/// Recall@N for each N of `ns`; a database smaller than N is wholly in every top-N, so recall at
/// N is recall at its size.
fn recall_at(
    predictions: &Predictions,
    positives: &[Vec<usize>],
    ns: &[usize],
) -> Result<Vec<f64>> {
    let ns: Vec<usize> = ns.iter().map(|&n| n.min(predictions.k)).collect();
    recall::recalls(predictions, positives, &ns)
}

/// The descriptors file `path` of the `images` of a test set's `part`: one row per image, and
/// when `extract` wrote it (a `.paths.txt` beside it), the same file names in the same order.
fn open_descriptors(path: &Path, images: &[PathBuf], part: &str) -> Result<MappedMatrix> {
    let matrix = MappedMatrix::open(path)?;
    if matrix.rows != images.len() {
        return Err(Error::Shape(format!(
            "{}: {} descriptors for the {} {part} images of the test set",
            path.display(),
            matrix.rows,
            images.len()
        )));
    }
    let listing = extract::paths_file(path);
    if let Ok(text) = std::fs::read_to_string(&listing) {
        let listed: Vec<&str> = text.lines().collect();
        let mismatch = (0..images.len().max(listed.len())).find(|&i| {
            let name = |p: &Path| p.file_name().map(|n| n.to_os_string());
            listed.get(i).map(|l| name(Path::new(l))) != images.get(i).map(|p| name(p))
        });
        if let Some(i) = mismatch {
            return Err(Error::Format {
                path: listing.display().to_string(),
                message: format!(
                    "row {i} lists {}, but the test set's {part} image {i} is {}: the \
                     descriptors are not in the test set's order",
                    listed.get(i).unwrap_or(&"nothing"),
                    images
                        .get(i)
                        .map_or("missing".to_string(), |p| p.display().to_string())
                ),
            });
        }
    }
    Ok(matrix)
}
