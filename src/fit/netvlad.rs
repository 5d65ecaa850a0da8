//! OpenIBL's initialisation of a NetVLAD layer from k-means centres (`_init_params`).
//!
//! With unit centres c_hat_k = c_k / |c_k| and sampled (L2-normalised) descriptors x_i, the
//! soft-assignment sharpness is alpha = -ln(0.01) / mean_i(top1_i - top2_i), where top1_i and
//! top2_i are the largest and second largest of c_hat_k . x_i over k: alpha makes the best
//! cluster's assignment weight 100 times the runner-up's for the average descriptor. The 1x1
//! assignment convolution (no bias) gets weight alpha * c_hat, and the centroids are the raw,
//! unnormalised centres.
//!
//! Composed of ops on the centres' device: one `matmul` for the scores; per descriptor, the
//! largest score (`max`) and the second largest (`max` again after the `argmax` position has been
//! pushed to -inf by subtracting a one-hot +inf matrix, the `select_backward` kernel), so that a
//! tie for first place gives a difference of 0 as a descending sort does; the mean is one
//! reduction, read back as a single number.

use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::tape;
use crate::tensor::Tensor;

/// The initial parameters of a NetVLAD layer.
pub struct NetVladInit {
    /// The soft-assignment sharpness alpha, -ln(0.01) / mean(top1 - top2).
    pub alpha: f64,
    /// f32 [K, D]: alpha * c_k / |c_k|, the 1x1 assignment convolution's weight as a matrix (for
    /// a 1x1 kernel PyTorch's [K, D, 1, 1] and the engine's OHWI [K, 1, 1, D] hold the same
    /// numbers in the same order, so a reshape loads it into either).
    pub conv_weight: Tensor,
    /// f32 [K, D]: the raw centres.
    pub centroids: Tensor,
    /// mean(top1 - top2) over the descriptors, for reporting.
    pub mean_gap: f64,
}

/// OpenIBL's initialisation from `centroids` (f32 [K, D], K >= 2) and `descriptors` (f32 [N, D],
/// N >= 1, the sampled local descriptors the centres were fitted on), on the centres' device.
pub fn netvlad_init(centroids: &Tensor, descriptors: &Tensor) -> Result<NetVladInit> {
    let what = format!(
        "netvlad_init of centroids {:?} ({}) from descriptors {:?} ({})",
        centroids.shape(),
        centroids.dtype(),
        descriptors.shape(),
        descriptors.dtype()
    );
    let (k, dim, n) = match (centroids.shape(), descriptors.shape()) {
        (&[k, d], &[n, d2]) if d == d2 => (k, d, n),
        _ => return shape_err!("{what}: needs [K, D] centroids and [N, D] descriptors"),
    };
    if centroids.dtype() != DType::F32 || descriptors.dtype() != DType::F32 {
        return dtype_err!("{what}: both must be f32");
    }
    if k < 2 || n == 0 || dim == 0 {
        return Err(Error::Argument(format!(
            "{what}: alpha needs K >= 2 clusters and at least one descriptor"
        )));
    }
    tape::no_grad(|| {
        let device = centroids.device();
        let norms = centroids.sum_sq(-1, true)?.sqrt()?;
        let unit = centroids.div(&norms)?;
        let scores = descriptors.matmul(&unit.t()?)?;
        let top1 = scores.max(-1, false)?;
        let best = scores.argmax(-1, false)?;
        let inf = Tensor::full(&[n], f64::INFINITY, DType::F32, device)?;
        let masked = scores.sub(&Tensor::select_backward(&best, &inf, &[n, k], 1)?)?;
        let top2 = masked.max(-1, false)?;
        let mean_gap = top1.sub(&top2)?.mean(0, false)?.to_scalar_f64()?;
        if mean_gap.is_nan() || mean_gap <= 0.0 {
            return Err(Error::Argument(format!(
                "{what}: the mean gap between the two best scores is {mean_gap}, so alpha is \
                 undefined (identical or NaN centres?)"
            )));
        }
        let alpha = -(0.01f64.ln()) / mean_gap;
        Ok(NetVladInit {
            alpha,
            conv_weight: unit.mul_scalar(alpha)?,
            centroids: centroids.contiguous()?,
            mean_gap,
        })
    })
}
