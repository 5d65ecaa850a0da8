//! Exact k-nearest-neighbour search by L2 distance, the search `faiss.IndexFlatL2` does in the
//! VPR evaluation tools, on any device.
//!
//! The database is streamed in chunks of rows (from memory or a memory-mapped `.npy`), so neither
//! the database nor a full query x database distance matrix is ever held: per chunk, the inner
//! products of a block of queries with the chunk's rows are one GEMM, and the knn kernel turns
//! them into squared distances `(|q|^2 + |d|^2) - 2 q.d` and merges them into each query's running
//! top-k list. The device holds the queries, one chunk, one `query_rows x chunk_rows` tile of
//! inner products and the lists.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::eval::recall::Predictions;
use crate::io::npy::{MappedMatrix, Matrix};
use crate::ops::knn::{Neighbours, MAX_K};
use crate::tensor::Tensor;

/// Descriptors read a block of rows at a time: a matrix in memory or a mapped `.npy` file.
pub trait DescriptorRows {
    /// `[rows, dim]`.
    fn shape(&self) -> [usize; 2];
    /// Rows `start..start + count`, row-major.
    fn read_rows(&self, start: usize, count: usize) -> Vec<f32>;
}

impl DescriptorRows for Matrix {
    fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    fn read_rows(&self, start: usize, count: usize) -> Vec<f32> {
        self.data[start * self.cols..(start + count) * self.cols].to_vec()
    }
}

impl DescriptorRows for MappedMatrix {
    fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    fn read_rows(&self, start: usize, count: usize) -> Vec<f32> {
        MappedMatrix::read_rows(self, start, count)
    }
}

/// How a search is cut into tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchOptions {
    /// Neighbours kept per query (at most `MAX_K`; fewer when the database is smaller).
    pub k: usize,
    /// Database rows per chunk.
    pub chunk_rows: usize,
    /// Queries per GEMM against a chunk.
    pub query_rows: usize,
}

impl SearchOptions {
    /// Tiles that suit `device`: on a GPU, large ones (a 4096 x 65536 tile of inner products
    /// is 1 GiB) so that each GEMM and merge fills it; on the CPU, tiles whose inner products
    /// stay within the caches between the GEMM that writes them and the merge that reads them.
    pub fn for_device(device: &Device, k: usize) -> SearchOptions {
        let (chunk_rows, query_rows) = match device {
            Device::Cpu => (4096, 1024),
            _ => (65536, 4096),
        };
        SearchOptions {
            k,
            chunk_rows,
            query_rows,
        }
    }
}

/// The `options.k` (at most the database's size) nearest database rows of every query, by
/// squared L2 distance in float32, ties broken by lower database index. `progress` is called
/// with the number of database rows searched after each chunk.
pub fn search(
    queries: &dyn DescriptorRows,
    database: &dyn DescriptorRows,
    options: &SearchOptions,
    device: &Device,
    progress: &mut dyn FnMut(usize),
) -> Result<Predictions> {
    let [num_queries, dim] = queries.shape();
    let [num_database, database_dim] = database.shape();
    if dim != database_dim {
        return Err(Error::Shape(format!(
            "query descriptors have {dim} dimensions, database descriptors {database_dim}"
        )));
    }
    if num_queries == 0 || num_database == 0 {
        return Err(Error::Argument(format!(
            "nothing to search: {num_queries} queries, {num_database} database descriptors"
        )));
    }
    if options.k == 0 || options.k > MAX_K {
        return Err(Error::Argument(format!(
            "{} neighbours per query: the search keeps 1 to {MAX_K}",
            options.k
        )));
    }
    if options.chunk_rows == 0 || options.query_rows == 0 {
        return Err(Error::Argument(format!("empty search tiles: {options:?}")));
    }
    let k = options.k.min(num_database);
    let blocks = (0..num_queries)
        .step_by(options.query_rows)
        .map(|start| {
            let rows = options.query_rows.min(num_queries - start);
            let q = Tensor::from_vec(queries.read_rows(start, rows), &[rows, dim], device)?;
            let norms = q.sum_sq(-1, false)?;
            Ok((q, norms))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut lists = blocks
        .iter()
        .map(|(q, _)| Neighbours::empty(q.shape()[0], k, device))
        .collect::<Result<Vec<_>>>()?;
    for start in (0..num_database).step_by(options.chunk_rows) {
        let rows = options.chunk_rows.min(num_database - start);
        let chunk = Tensor::from_vec(database.read_rows(start, rows), &[rows, dim], device)?;
        let chunk_norms = chunk.sum_sq(-1, false)?;
        let chunk_t = chunk.t()?;
        for ((q, query_norms), list) in blocks.iter().zip(lists.iter_mut()) {
            let ip = q.matmul(&chunk_t)?;
            *list = list.merge_chunk(&ip, query_norms, &chunk_norms)?;
        }
        progress(start + rows);
    }
    let mut indices = Vec::with_capacity(num_queries * k);
    let mut distances = Vec::with_capacity(num_queries * k);
    for list in &lists {
        let found = list.indices.to_vec::<i64>()?;
        if let Some(missing) = found.iter().position(|&i| i < 0) {
            return Err(Error::Argument(format!(
                "the search left slot {} of a query's {k} neighbours empty",
                missing % k
            )));
        }
        indices.extend(found.into_iter().map(|i| i as usize));
        distances.extend(list.distances.to_vec::<f32>()?);
    }
    Ok(Predictions {
        k,
        indices,
        distances,
    })
}
