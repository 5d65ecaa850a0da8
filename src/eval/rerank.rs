//! SelaVPR's re-ranking: each query's first K predictions of the global search are re-ordered by
//! the number of mutual nearest neighbours between the query's local feature map and each
//! candidate's (`ops::mnn`, on the device), most matches first. Candidates with the same count
//! keep their global order; SelaVPR sorts with numpy's `argsort()[::-1]`, whose order among
//! equal counts depends on numpy's sorting algorithm (not stable), so only those ties may come
//! out in another order than SelaVPR's.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::recall::Predictions;
use crate::io::npy::MappedMatrix;
use crate::ops::mnn::mutual_nn_counts;
use crate::tensor::Tensor;

/// Candidates scored per call of the kernel: bounds the memory of one call to this many pairs of
/// maps (SelaVPR's 61 x 61 x 128 maps are 1.9 MB each).
const CANDIDATES_PER_CALL: usize = 16;

/// `predictions` with each query's first `k` (at most the list's length) re-ordered by mutual
/// nearest neighbours between the local maps in `queries` and `database` (`.npy` arrays
/// `[N, h, w, C]`, rows in the order of the test set). `progress` gets the queries done.
pub fn rerank(
    predictions: &Predictions,
    k: usize,
    queries: &MappedMatrix,
    database: &MappedMatrix,
    device: &Device,
    progress: &mut dyn FnMut(usize),
) -> Result<Predictions> {
    predictions.check()?;
    let channels = |m: &MappedMatrix| m.shape.last().copied().unwrap_or(0);
    if queries.rows != predictions.queries() || queries.shape.len() < 2 {
        return Err(Error::Shape(format!(
            "local features of {} queries ({:?}) for predictions of {}",
            queries.rows,
            queries.shape,
            predictions.queries()
        )));
    }
    if database.shape.len() < 2 || channels(database) != channels(queries) {
        return Err(Error::Shape(format!(
            "query local features {:?} and database local features {:?} differ in channels",
            queries.shape, database.shape
        )));
    }
    if let Some(&past) = predictions.indices.iter().find(|&&i| i >= database.rows) {
        return Err(Error::Shape(format!(
            "prediction {past} is past the {} database local feature maps",
            database.rows
        )));
    }
    let c = channels(queries);
    let (query_len, database_len) = (queries.cols / c.max(1), database.cols / c.max(1));
    let k = k.min(predictions.k);
    let mut reranked = predictions.clone();
    for q in 0..predictions.queries() {
        let query = Tensor::from_vec(queries.read_rows(q, 1), &[1, query_len, c], device)?;
        let row = predictions.row(q);
        let mut counts = Vec::with_capacity(k);
        for group in row[..k].chunks(CANDIDATES_PER_CALL) {
            let maps: Vec<f32> = group
                .iter()
                .flat_map(|&i| database.read_rows(i, 1))
                .collect();
            let candidates = Tensor::from_vec(maps, &[group.len(), database_len, c], device)?;
            let repeated = query.broadcast_to(&[group.len(), query_len, c])?;
            counts.extend(mutual_nn_counts(&repeated, &candidates)?.to_vec::<i64>()?);
        }
        // most matches first; a stable sort keeps the global order among equal counts
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by_key(|&j| std::cmp::Reverse(counts[j]));
        let distances = predictions.distances_of(q);
        let start = q * predictions.k;
        for (slot, &j) in order.iter().enumerate() {
            reranked.indices[start + slot] = row[j];
            reranked.distances[start + slot] = distances[j];
        }
        progress(q + 1);
    }
    Ok(reranked)
}
