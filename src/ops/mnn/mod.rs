//! Mutual nearest neighbours between dense local feature maps: SelaVPR's re-ranking score.
//!
//! SelaVPR (Lu-Feng/SelaVPR, `local_matching.py`, `match_batch_tensor`) scores a query map `fm1`
//! [l, D] against candidate maps `fm2` [N, l, D] as follows, and this op does the same with
//! `a` = the query side and `b` = the candidate side:
//!
//! - `M = fm2 @ fm1^T` [N, l_b, l_a]: the dot products, no normalisation in the matcher (the maps'
//!   locations are L2-normalised by the model, which this op does not assume);
//! - `max1 = argmax(M, dim=1)`: for each query position i, its best candidate position j;
//!   `max2 = argmax(M, dim=2)`: for each candidate position j, its best query position;
//! - query position i is a match when `max2[max1[i]] == i` (its best candidate's best query
//!   position is i itself): the count is taken on the query side, one per mutual pair;
//! - the score is the number of matches, except that exactly one match scores 0: the code takes
//!   `torch.nonzero(valid).squeeze()`, which for a single match is a 0-d tensor, and scores 0 when
//!   the result has no dimension (`test.py` then sorts the candidates by descending score).
//!
//! Here `S = a b^T` ([La, Lb] per pair: `S[i, j] = M[j, i]`), position i of a matches j = the
//! arg-max of row i, and is mutual when the arg-max of column j is i. Arg-max follows torch.argmax:
//! the first (lowest) index among equal maxima, NaN counting as the largest value, -0 equal to +0.
//!
//! Precision: `S[i, j]` is the f64 sum over d = 0..D in ascending order of the products
//! `a[i, d] * b[j, d]` (exact in f64), rounded once to f32: essentially the correctly rounded f32
//! dot product, computed the same way on every device, so the CPU and the GPUs pick the same
//! arg-maxes bit for bit (a fused multiply-add cannot change an exact product's sum). PyTorch's f32
//! GEMM rounds differently, so two candidates within an f32 rounding error of each other can be
//! ordered differently than in SelaVPR; exact ties (duplicated locations) go to the lower index in
//! both. The GPU never holds a pair's `S` (55 MB for 61 x 61 maps): tiles of it live in registers
//! (kernels/mnn.cu). Inference only: nothing is recorded for autograd.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::Layout;
use crate::ops::copy::check_extent;
use crate::tensor::{IntoCpuStorage, Storage, Tensor};

/// For each pair p the number of mutual nearest neighbours between local maps `a[p]` [La, D] and
/// `b[p]` [Lb, D] (f32, same device), with SelaVPR's semantics (module documentation): i64 [P].
/// `a` may also be [1, La, D], one query map scored against every candidate map of `b`.
pub fn mutual_nn_counts(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let what = || {
        format!(
            "mutual_nn_counts of a {:?} ({}) and b {:?} ({})",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype()
        )
    };
    let (&[pa, la, da], &[pairs, lb, d]) = (a.shape(), b.shape()) else {
        return shape_err!("{}: a and b must be [pairs, locations, dim]", what());
    };
    if da != d || (pa != pairs && pa != 1) {
        return shape_err!(
            "{}: a must be [{pairs}, La, {d}] or [1, La, {d}] for b [pairs = {pairs}, Lb, dim = {d}]",
            what()
        );
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return dtype_err!("{}: both maps must be f32", what());
    }
    if !a.device().same(b.device()) {
        return Err(Error::Device(format!(
            "{}: a on {} but b on {}",
            what(),
            a.device(),
            b.device()
        )));
    }
    if la > i32::MAX as usize || lb > i32::MAX as usize {
        return Err(Error::Argument(format!(
            "{}: at most {} locations per map",
            what(),
            i32::MAX
        )));
    }
    let device = b.device();
    if pairs == 0 || la == 0 || lb == 0 || d == 0 {
        // no pairs or no locations, no matches; with D = 0 every similarity is 0, the only mutual pair is
        // (0, 0), and a single match scores 0
        return Tensor::zeros(&[pairs], DType::I64, device);
    }
    let (a, b) = (a.detach().contiguous()?, b.detach().contiguous()?);
    check_extent(&a)?;
    check_extent(&b)?;
    let storage = match (a.storage(), b.storage()) {
        (Storage::Cpu(sa), Storage::Cpu(sb)) => {
            let f = |s| f32::slice(s).expect("dtype checked above");
            let (va, vb) = (&f(sa)[a.layout().offset()..], &f(sb)[b.layout().offset()..]);
            let counts = if pa == pairs {
                cpu::mutual_nn_counts(va, vb, pairs, la, lb, d)
            } else {
                (0..pairs)
                    .flat_map(|p| cpu::mutual_nn_counts(va, &vb[p * lb * d..], 1, la, lb, d))
                    .collect()
            };
            Storage::Cpu(i64::into_storage(counts))
        }
        (Storage::Gpu(ga), Storage::Gpu(gb)) => Storage::Gpu(gpu::mutual_nn_counts(
            ga,
            a.layout().offset(),
            pa,
            gb,
            b.layout().offset(),
            pairs,
            la,
            lb,
            d,
        )?),
        _ => unreachable!("both maps were checked to be on one device"),
    };
    Ok(Tensor::from_parts(
        storage,
        Layout::contiguous(&[pairs])?,
        DType::I64,
        device.clone(),
    ))
}

/// What a conformance case's maps hold.
#[derive(Clone, Copy)]
enum Values {
    /// Uniform in [-1, 1).
    Random,
    /// Small integers (-3..=2) with every third location of each map a copy of the one before: many
    /// exact ties in both directions.
    Ties,
    /// Random with NaN in a few elements of a and b.
    Nan,
}

/// Maps [pairs, len, d] of `values`.
fn maps(values: Values, pairs: usize, len: usize, d: usize, seed: u64) -> Result<Tensor> {
    let shape = [pairs, len, d];
    let t = Tensor::rand_uniform(&shape, -1.0, 1.0, seed, DType::F32, &Device::Cpu)?;
    let mut v = t.to_vec::<f32>()?;
    match values {
        Values::Random => {}
        Values::Ties => {
            v.iter_mut().for_each(|x| *x = (*x * 2.5).round());
            for p in 0..pairs {
                for l in (2..len).step_by(3) {
                    let row = (p * len + l) * d;
                    v.copy_within(row - d..row, row);
                }
            }
        }
        Values::Nan => v.iter_mut().step_by(97).for_each(|x| *x = f32::NAN),
    }
    Tensor::from_vec(v, &shape, &Device::Cpu)
}

/// `mnn_tiles_f32` + `mnn_count_f32` on `device` against the CPU, demanding the same counts:
/// odd sizes, several strips and column tiles with partial ones, D beyond one shared slice, exact
/// ties from duplicated locations, Lb = 1 (every position of a picks the one location: a single
/// mutual match, scored 0), La = 1, one query map against several candidates, NaN.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    use Values::{Nan, Random, Ties};
    // what, a pairs (1: broadcast), pairs, La, Lb, D, values
    type Case = (&'static str, usize, usize, usize, usize, usize, Values);
    let cases: [Case; 9] = [
        ("odd sizes", 3, 3, 37, 29, 13, Random),
        ("strips and tiles", 2, 2, 130, 65, 33, Random),
        ("SelaVPR dim", 2, 2, 97, 150, 128, Random),
        ("ties", 5, 5, 70, 67, 7, Ties),
        ("ties, D 1", 3, 3, 20, 31, 1, Ties),
        ("Lb 1", 2, 2, 9, 1, 4, Random),
        ("La 1", 2, 2, 1, 9, 4, Random),
        ("one query map", 1, 4, 33, 40, 17, Random),
        ("nan", 2, 2, 41, 38, 5, Nan),
    ];
    let mut rows = Vec::new();
    for (c, &(what, pa, pairs, la, lb, d, values)) in cases.iter().enumerate() {
        let s = seed.wrapping_add(c as u64 * 7);
        let a = maps(values, pa, la, d, s)?;
        let b = maps(values, pairs, lb, d, s + 1)?;
        let got = (|| mutual_nn_counts(&a.to_device(device)?, &b.to_device(device)?))();
        let want = mutual_nn_counts(&a, &b);
        rows.push(compare(
            &format!("mnn_tiles_f32+mnn_count_f32 ({what})"),
            DType::F32,
            &[pairs, la, lb, d],
            got,
            want,
            0.0,
        ));
    }
    Ok(rows)
}
