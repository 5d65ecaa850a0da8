//! k-means (Lloyd's algorithm) on any device, for NetVLAD's centroid initialisation: OpenIBL's and
//! the VPR benchmark's recipe clusters ~50,000 sampled, L2-normalised local descriptors into
//! K = 64 centres with 100 iterations.
//!
//! Each iteration is composed of existing ops, so it runs and is checked wherever they are:
//! - assignment: the inner products of the data with the centroids are one `matmul`, and
//!   `Neighbours::merge_chunk` with k = 1 turns them into the nearest centroid by squared L2
//!   distance in f32 (faiss IndexFlatL2's formula; exact ties go to the lower centroid index);
//! - update: the scatter-add of the data into per-cluster sums is a GEMM, the transposed one-hot
//!   assignment matrix times the data; the one-hot matrix is the `select_backward` kernel (a 1 at
//!   each row's picked column), and its column sums are the cluster sizes. Each centroid is its
//!   cluster's sum divided by its size.
//!
//! Initialisation is seeded and deterministic: the centroids start as K distinct data rows, the
//! first K of a random permutation drawn with the engine's seeded generator (faiss draws its
//! initial centroids the same way, with its own generator; sklearn, which OpenIBL calls, uses
//! k-means++, so the centres of either library are not reproduced bit for bit, only the recipe).
//!
//! Empty clusters are re-seeded as faiss does, by splitting a large cluster after the update: the
//! empty centroid becomes a copy of the split one, and the two are pushed apart by a relative
//! 1/1024 in alternating signs per coordinate (even coordinates x(1 + eps) for the new one and
//! x(1 - eps) for the old one, odd coordinates the other way), and each is taken to hold half of
//! the old cluster for later splits in the same iteration. Our choice of which cluster to split:
//! always the largest (ties to the lower index), where faiss draws one at random with probability
//! proportional to its size; deterministic, and the largest is the one faiss most often picks.
//!
//! faiss also subsamples the data to 256 points per centroid before clustering by default
//! (16,384 of the benchmark's 50,000 descriptors); this function clusters all the rows it is
//! given, so a caller that wants faiss's sampling passes the subsample.

use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::ops::knn::Neighbours;
use crate::tape;
use crate::tensor::Rng;
use crate::tensor::Tensor;

/// Relative perturbation that separates a split centroid from its copy (faiss's value).
pub const SPLIT_EPS: f32 = 1.0 / 1024.0;

/// What to fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KMeansOptions {
    /// Number of clusters K.
    pub k: usize,
    /// Lloyd iterations (assignment then update), each counted once.
    pub iterations: usize,
    /// Seed of the initial centroids' draw.
    pub seed: u64,
}

impl KMeansOptions {
    /// OpenIBL's and the benchmark's settings: K = 64, 100 iterations, seed 43 (OpenIBL's
    /// `random_state`).
    pub fn netvlad() -> KMeansOptions {
        KMeansOptions {
            k: 64,
            iterations: 100,
            seed: 43,
        }
    }
}

/// A fitted clustering.
pub struct KMeans {
    /// f32 [K, D] on the data's device: the centres after the last update.
    pub centroids: Tensor,
    /// Per iteration, the sum of squared distances of the rows to their nearest centroid before
    /// that iteration's update (faiss's objective): non-increasing up to rounding and splits.
    pub objective: Vec<f64>,
    /// Rows per cluster at the last assignment (before any split of the last iteration).
    pub sizes: Vec<usize>,
    /// Empty clusters re-seeded by splitting, over all iterations.
    pub splits: usize,
}

/// The row indices of the initial centroids: the first `k` of a seeded random permutation of
/// `0..n` (a partial Fisher-Yates shuffle), distinct.
pub fn initial_rows(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below((n - i) as u64) as usize;
        perm.swap(i, j);
    }
    perm.truncate(k);
    perm
}

/// Re-seeds every empty cluster (size 0) by splitting the currently largest one, as the module
/// header describes. `centroids` is row-major [K, D]; `sizes` is updated to the assumed even
/// split. Returns the number of splits.
pub fn split_empty_clusters(centroids: &mut [f32], sizes: &mut [usize], dim: usize) -> usize {
    let mut splits = 0;
    for empty in 0..sizes.len() {
        if sizes[empty] != 0 {
            continue;
        }
        let largest = (0..sizes.len())
            .max_by(|&a, &b| sizes[a].cmp(&sizes[b]).then(b.cmp(&a)))
            .expect("at least one cluster");
        if sizes[largest] < 2 {
            // nothing left to split: every row is already a cluster of its own
            break;
        }
        for j in 0..dim {
            let v = centroids[largest * dim + j];
            let (new, old) = if j % 2 == 0 {
                (v * (1.0 + SPLIT_EPS), v * (1.0 - SPLIT_EPS))
            } else {
                (v * (1.0 - SPLIT_EPS), v * (1.0 + SPLIT_EPS))
            };
            centroids[empty * dim + j] = new;
            centroids[largest * dim + j] = old;
        }
        sizes[empty] = sizes[largest] / 2;
        sizes[largest] -= sizes[empty];
        splits += 1;
    }
    splits
}

/// The nearest centroid of each row of `data` (f32 [N, D]) among `centroids` (f32 [K, D]) by
/// squared L2 distance in f32, ties to the lower centroid: i64 [N] indices and f32 [N] distances,
/// on the data's device. `data_norms` are the rows' squared norms (f32 [N]).
pub fn assign(data: &Tensor, data_norms: &Tensor, centroids: &Tensor) -> Result<(Tensor, Tensor)> {
    tape::no_grad(|| {
        let n = data.dim(0)?;
        let ip = data.matmul(&centroids.t()?)?;
        let centroid_norms = centroids.sum_sq(-1, false)?;
        let nearest = Neighbours::empty(n, 1, data.device())?.merge_chunk(
            &ip,
            data_norms,
            &centroid_norms,
        )?;
        Ok((
            nearest.indices.reshape(&[n])?,
            nearest.distances.reshape(&[n])?,
        ))
    })
}

/// Clusters the rows of `data` (f32 [N, D] on any device, N >= K) with Lloyd's algorithm, as the
/// module header describes. The result stays on the data's device.
pub fn kmeans(data: &Tensor, options: &KMeansOptions) -> Result<KMeans> {
    let [n, dim] = *data.shape() else {
        return shape_err!("kmeans: data must be [N, D], got {:?}", data.shape());
    };
    if data.dtype() != DType::F32 {
        return dtype_err!("kmeans: data must be f32, got {}", data.dtype());
    }
    let k = options.k;
    if k == 0 || n < k || dim == 0 {
        return Err(Error::Argument(format!(
            "kmeans: {k} clusters of {n} rows of dimension {dim}: needs 1 <= K <= N and D >= 1"
        )));
    }
    tape::no_grad(|| {
        let device = data.device();
        let data = data.contiguous()?;
        let norms = data.sum_sq(-1, false)?;
        let rows = initial_rows(n, k, options.seed)
            .into_iter()
            .map(|r| data.narrow(0, r, 1))
            .collect::<Result<Vec<_>>>()?;
        let mut centroids = Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)?;
        let ones = Tensor::ones(&[n], DType::F32, device)?;
        let mut objective = Vec::with_capacity(options.iterations);
        let mut sizes = vec![0; k];
        let mut splits = 0;
        for _ in 0..options.iterations {
            let (nearest, distances) = assign(&data, &norms, &centroids)?;
            objective.push(distances.sum_all()?.to_scalar_f64()?);
            let one_hot = Tensor::select_backward(&nearest, &ones, &[n, k], 1)?;
            let sums = one_hot.t()?.matmul(&data)?;
            // sizes are sums of ones below 2^24: exact in f32
            let counts = one_hot.sum(0, false)?.to_vec::<f32>()?;
            sizes = counts.iter().map(|&c| c as usize).collect();
            let divisors: Vec<f32> = counts.iter().map(|&c| c.max(1.0)).collect();
            centroids = sums.div(&Tensor::from_vec(divisors, &[k, 1], device)?)?;
            if sizes.contains(&0) {
                let mut host = centroids.to_vec::<f32>()?;
                let mut split_sizes = sizes.clone();
                splits += split_empty_clusters(&mut host, &mut split_sizes, dim);
                centroids = Tensor::from_vec(host, &[k, dim], device)?;
            }
        }
        Ok(KMeans {
            centroids,
            objective,
            sizes,
            splits,
        })
    })
}
