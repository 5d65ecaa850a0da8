//! Exact k-nearest-neighbour search by L2 distance, a database chunk at a time: the caller computes
//! the inner products of the queries with a chunk of database rows (`Tensor::matmul`) and the
//! squared norms (`sum_sq`), and `Neighbours::merge_chunk` turns them into faiss IndexFlatL2's
//! distances, `max((qn + dn) - 2 ip, 0)` in f32, and merges them into running per-query top-k
//! lists (kernels/knn.cu; the CPU twin in cpu.rs is also the CPU search).
//!
//! The order is total: ascending distance, exact ties to the lower database index, NaN distances
//! after +inf, and an empty slot (index -1, distance +inf; a negative index is what marks it)
//! after every real candidate, so that a real candidate at +inf or NaN still fills a slot. The
//! device and the CPU give the same lists bit for bit (a NaN distance comes out as one NaN, the
//! same on both). Inference only: nothing is recorded for autograd.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::Layout;
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{IntoCpuStorage, Storage, Tensor};

/// The largest k a list may keep (the kernel sorts its k best in shared memory).
pub const MAX_K: usize = 1024;
/// The most database rows one chunk may have (the kernel numbers candidates with 32 bits).
pub const MAX_CHUNK: usize = 1 << 30;

/// The k nearest database rows found so far for each of `queries` queries, best first.
pub struct Neighbours {
    /// f32 [queries, k]: squared L2 distances, ascending; +inf in slots not filled yet.
    pub distances: Tensor,
    /// i64 [queries, k]: the database row of each distance; -1 in slots not filled yet.
    pub indices: Tensor,
    /// Database rows merged so far: the next chunk starts at this row.
    pub merged: usize,
}

fn check_k(k: usize, what: &str) -> Result<()> {
    if k == 0 || k > MAX_K {
        return Err(Error::Argument(format!(
            "{what}: k = {k} is outside 1..={MAX_K}"
        )));
    }
    Ok(())
}

impl Neighbours {
    /// Empty lists (all +inf / -1, merged 0) for `queries` queries keeping `k` each
    /// (1 <= k <= MAX_K), on `device`.
    pub fn empty(queries: usize, k: usize, device: &Device) -> Result<Neighbours> {
        check_k(k, &format!("Neighbours::empty({queries} queries)"))?;
        Ok(Neighbours {
            distances: Tensor::full(&[queries, k], f64::INFINITY, DType::F32, device)?,
            indices: Tensor::full(&[queries, k], -1.0, DType::I64, device)?,
            merged: 0,
        })
    }

    /// The length of each list.
    pub fn k(&self) -> usize {
        self.distances.shape().get(1).copied().unwrap_or(0)
    }

    /// Merges the next database chunk, rows merged..merged+n: `ip` f32 [queries, n] inner products
    /// of the queries with the chunk's rows, `query_norms` f32 [queries] and `chunk_norms` f32 [n]
    /// squared L2 norms. Distance d = max((qn_i + dn_j) - 2*ip_ij, 0) in f32, faiss IndexFlatL2's
    /// formula and rounding; the k smallest (distance, index) pairs of the old list plus the chunk
    /// are kept, ascending by distance, exact ties broken by lower database index, NaN distances
    /// after +inf (then by index). Returns the new lists (merged + n). Every input must be on the
    /// lists' device; non-contiguous inputs are copied.
    pub fn merge_chunk(
        &self,
        ip: &Tensor,
        query_norms: &Tensor,
        chunk_norms: &Tensor,
    ) -> Result<Neighbours> {
        tape::no_grad(|| self.merge_chunk_impl(ip, query_norms, chunk_norms, gpu::MAX_BLOCKS))
    }

    /// `merge_chunk` with at most `max_blocks` blocks on a GPU (fewer than the rows to check the
    /// kernel's loop over rows).
    fn merge_chunk_impl(
        &self,
        ip: &Tensor,
        qn: &Tensor,
        dn: &Tensor,
        max_blocks: usize,
    ) -> Result<Neighbours> {
        let what = format!(
            "knn merge_chunk of ip {:?} ({}), query_norms {:?} ({}), chunk_norms {:?} ({}) into \
             lists {:?} ({}) / {:?} ({})",
            ip.shape(),
            ip.dtype(),
            qn.shape(),
            qn.dtype(),
            dn.shape(),
            dn.dtype(),
            self.distances.shape(),
            self.distances.dtype(),
            self.indices.shape(),
            self.indices.dtype(),
        );
        let (queries, k) = match *self.distances.shape() {
            [q, k] if self.indices.shape() == [q, k] => (q, k),
            _ => return shape_err!("{what}: the distances and indices must both be [queries, k]"),
        };
        if self.distances.dtype() != DType::F32 || self.indices.dtype() != DType::I64 {
            return dtype_err!("{what}: the lists must be f32 distances and i64 indices");
        }
        check_k(k, &what)?;
        if ip.dtype() != DType::F32 || qn.dtype() != DType::F32 || dn.dtype() != DType::F32 {
            return dtype_err!("{what}: ip and the norms must be f32");
        }
        let n = match *ip.shape() {
            [q, n] if q == queries => n,
            _ => return shape_err!("{what}: ip must be [queries = {queries}, n]"),
        };
        if qn.shape() != [queries] || dn.shape() != [n] {
            return shape_err!("{what}: query_norms must be [{queries}] and chunk_norms [{n}]");
        }
        if n > MAX_CHUNK {
            return Err(Error::Argument(format!(
                "{what}: a chunk has at most {MAX_CHUNK} database rows"
            )));
        }
        let device = self.distances.device();
        for (name, t) in [
            ("the indices", &self.indices),
            ("ip", ip),
            ("query_norms", qn),
            ("chunk_norms", dn),
        ] {
            if !t.device().same(device) {
                return Err(Error::Device(format!(
                    "{what}: {name} on {} but the distances on {device}",
                    t.device()
                )));
            }
        }
        let merged = self.merged + n;
        if i64::try_from(merged).is_err() {
            return Err(Error::Argument(format!(
                "{what}: {} rows merged so far plus {n} overflow the i64 indices",
                self.merged
            )));
        }
        if n == 0 || queries == 0 {
            return Ok(Neighbours {
                distances: self.distances.clone(),
                indices: self.indices.clone(),
                merged,
            });
        }
        let [old_dist, old_idx, ip, qn, dn] =
            [&self.distances, &self.indices, ip, qn, dn].map(Tensor::contiguous);
        let (old_dist, old_idx, ip, qn, dn) = (old_dist?, old_idx?, ip?, qn?, dn?);
        for t in [&old_dist, &old_idx, &ip, &qn, &dn] {
            check_extent(t)?;
        }
        let (distances, indices) = match (
            old_dist.storage(),
            old_idx.storage(),
            ip.storage(),
            qn.storage(),
            dn.storage(),
        ) {
            (
                Storage::Cpu(od),
                Storage::Cpu(oi),
                Storage::Cpu(ips),
                Storage::Cpu(qs),
                Storage::Cpu(ds),
            ) => {
                let f = |s| f32::slice(s).expect("dtype checked above");
                let oi = i64::slice(oi).expect("dtype checked above");
                let (d, i) = cpu::merge(
                    &f(od)[..queries * k],
                    &oi[..queries * k],
                    &f(ips)[..queries * n],
                    &f(qs)[..queries],
                    &f(ds)[..n],
                    k,
                    n,
                    self.merged,
                );
                (
                    Storage::Cpu(f32::into_storage(d)),
                    Storage::Cpu(i64::into_storage(i)),
                )
            }
            (
                Storage::Gpu(od),
                Storage::Gpu(oi),
                Storage::Gpu(ips),
                Storage::Gpu(qs),
                Storage::Gpu(ds),
            ) => {
                let (d, i) =
                    gpu::merge(od, oi, ips, qs, ds, queries, k, n, self.merged, max_blocks)?;
                (Storage::Gpu(d), Storage::Gpu(i))
            }
            _ => unreachable!("every input was checked to be on the lists' device"),
        };
        let layout = Layout::contiguous(&[queries, k])?;
        Ok(Neighbours {
            distances: Tensor::from_parts(distances, layout.clone(), DType::F32, device.clone()),
            indices: Tensor::from_parts(indices, layout, DType::I64, device.clone()),
            merged,
        })
    }
}

/// What a conformance case's chunks hold.
#[derive(Clone, Copy)]
enum Values {
    /// Inner products in [-1, 1), norms in [1, 1.01): distances of unit-length descriptors.
    Random,
    /// Small integers: many exact ties, within a chunk and with the old list.
    Ties,
    /// Small integers with NaN, +inf and -inf among the inner products, a NaN query norm and a NaN
    /// chunk norm.
    Special,
}

/// The inner products [queries, n] and norms of one chunk.
fn chunk_values(
    values: Values,
    queries: usize,
    n: usize,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let cpu = Device::Cpu;
    let integers = |shape: &[usize], low: f64, high: f64, seed: u64| -> Result<Tensor> {
        let t = Tensor::rand_uniform(shape, low, high, seed, DType::F32, &cpu)?;
        Tensor::from_f64(
            &t.to_f64_vec()?
                .iter()
                .map(|v| v.floor())
                .collect::<Vec<_>>(),
            shape,
            DType::F32,
            &cpu,
        )
    };
    match values {
        Values::Random => Ok((
            Tensor::rand_uniform(&[queries, n], -1.0, 1.0, seed, DType::F32, &cpu)?,
            Tensor::rand_uniform(&[queries], 1.0, 1.01, seed + 1, DType::F32, &cpu)?,
            Tensor::rand_uniform(&[n], 1.0, 1.01, seed + 2, DType::F32, &cpu)?,
        )),
        Values::Ties => Ok((
            integers(&[queries, n], -2.0, 3.0, seed)?,
            integers(&[queries], 0.0, 4.0, seed + 1)?,
            integers(&[n], 0.0, 4.0, seed + 2)?,
        )),
        Values::Special => {
            let (ip, qn, dn) = chunk_values(Values::Ties, queries, n, seed)?;
            let mut ip = ip.to_vec::<f32>()?;
            for (j, v) in ip.iter_mut().enumerate() {
                *v = match j % 13 {
                    2 => f32::NAN,
                    5 => f32::INFINITY,
                    9 => f32::NEG_INFINITY,
                    _ => *v,
                };
            }
            let mut dn = dn.to_vec::<f32>()?;
            dn[n / 2] = f32::NAN;
            let mut qn = qn.to_vec::<f32>()?;
            qn[queries / 2] = f32::NAN;
            Ok((
                Tensor::from_vec(ip, &[queries, n], &cpu)?,
                Tensor::from_vec(qn, &[queries], &cpu)?,
                Tensor::from_vec(dn, &[n], &cpu)?,
            ))
        }
    }
}

/// `knn_merge_f32` on `device` against the CPU, demanding the same indices and distances exactly:
/// odd sizes, fewer columns than k, k = 1 and k = MAX_K, chunks merged into partly filled and full
/// lists, exact ties, and NaN and infinities.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    use Values::{Random, Special, Ties};
    const ALL: usize = gpu::MAX_BLOCKS;
    // what, queries, k, chunk sizes in merge order, values, blocks at most
    type Case = (&'static str, usize, usize, &'static [usize], Values, usize);
    let cases: [Case; 11] = [
        ("odd sizes", 7, 5, &[33], Random, ALL),
        ("n < k", 3, 20, &[7], Random, ALL),
        ("three chunks", 5, 1, &[257, 1, 31], Random, ALL),
        ("full, then full", 2, 1024, &[1500, 700], Random, ALL),
        ("long chunk", 3, 100, &[5000], Random, ALL),
        ("partial, then full", 4, 64, &[30, 77, 1], Random, ALL),
        ("ties", 6, 50, &[300, 41], Ties, ALL),
        ("ties", 2, 1024, &[900, 3000], Ties, ALL),
        ("ties", 3, 1, &[100, 100], Ties, ALL),
        ("nan, inf", 5, 16, &[9, 200], Special, ALL),
        ("9 rows, 2 blocks", 9, 12, &[5, 300], Ties, 2),
    ];
    let mut rows = Vec::new();
    for (c, &(what, queries, k, chunks, values, blocks)) in cases.iter().enumerate() {
        let mut want = Neighbours::empty(queries, k, &Device::Cpu)?;
        let mut got = Neighbours::empty(queries, k, device)?;
        for (j, &n) in chunks.iter().enumerate() {
            let case_seed = seed.wrapping_add((c * 16 + j) as u64 * 3);
            let (ip, qn, dn) = chunk_values(values, queries, n, case_seed)?;
            let kernel = format!("knn_merge_f32 {what}, k {k}, merged {}", want.merged);
            let on_device = (|| {
                let (ip, qn, dn) = (
                    ip.to_device(device)?,
                    qn.to_device(device)?,
                    dn.to_device(device)?,
                );
                tape::no_grad(|| got.merge_chunk_impl(&ip, &qn, &dn, blocks))
            })();
            want = want.merge_chunk(&ip, &qn, &dn)?;
            let shape = [queries, n];
            match on_device {
                Ok(next) => {
                    got = next;
                    rows.push(compare(
                        &format!("{kernel}: indices"),
                        DType::I64,
                        &shape,
                        Ok(got.indices.clone()),
                        Ok(want.indices.clone()),
                        0.0,
                    ));
                    rows.push(compare(
                        &format!("{kernel}: distances"),
                        DType::F32,
                        &shape,
                        Ok(got.distances.clone()),
                        Ok(want.distances.clone()),
                        0.0,
                    ));
                }
                Err(e) => {
                    rows.push(compare(
                        &kernel,
                        DType::F32,
                        &shape,
                        Err(e),
                        Ok(want.distances.clone()),
                        0.0,
                    ));
                    break;
                }
            }
        }
    }
    Ok(rows)
}
