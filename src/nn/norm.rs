//! L2 normalisation (torch.nn.functional.normalize) and CosPlace's Flatten.

use crate::error::{shape_err, Result};
use crate::tensor::Tensor;

/// `x / max(||x||_2, 1e-12)` along `dim`, as F.normalize(x, p=2, dim).
pub fn l2_normalize(x: &Tensor, dim: isize) -> Result<Tensor> {
    let norm = x.sum_sq(dim, true)?.sqrt()?.clamp(1e-12, f64::INFINITY)?;
    x.div(&norm.to_dtype(x.dtype())?)
}

/// [N, 1, 1, C] -> [N, C]; any other spatial size is an error (CosPlace asserts the same).
pub fn flatten(x: &Tensor) -> Result<Tensor> {
    match *x.shape() {
        [n, 1, 1, c] => x.reshape(&[n, c]),
        _ => shape_err!("flatten: input {:?} is not [N, 1, 1, C]", x.shape()),
    }
}
