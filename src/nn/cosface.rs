//! CosFace's classifier (large-margin cosine loss, Wang et al. 2018) as CosPlace and EigenPlaces
//! train with it: a weight `W [classes, dim]` kept unnormalised, cosines `x W^T / max(|x| |W_j|,
//! 1e-8)`, and the cross-entropy of `s * (cos - m * onehot)`, fused in the loss kernels.

use super::{plain_entries, Module, StateEntry};
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;

/// The denominator's floor, as in the originals' cosine similarity.
const NORM_PRODUCT_MIN: f64 = 1e-8;

pub struct MarginCosineProduct {
    pub weight: Parameter,
    pub scale: f32,
    pub margin: f32,
}

impl MarginCosineProduct {
    /// A classifier of `classes` rows for `dim`-dimensional descriptors, Xavier-uniform
    /// initialised (bound `sqrt(6 / (classes + dim))`), as the originals initialise it.
    pub fn new(
        name: &str,
        dim: usize,
        classes: usize,
        scale: f32,
        margin: f32,
        seed: u64,
        device: &Device,
    ) -> Result<MarginCosineProduct> {
        let bound = (6.0 / (classes + dim) as f64).sqrt();
        let w = Tensor::rand_uniform(&[classes, dim], -bound, bound, seed, DType::F32, device)?;
        Ok(MarginCosineProduct {
            weight: Parameter::new(format!("{name}.weight"), w),
            scale,
            margin,
        })
    }

    pub fn classes(&self) -> usize {
        self.weight.tensor().shape()[0]
    }

    /// The mean loss over the batch of descriptors `[N, dim]` with class labels `[N]` (i64).
    pub fn loss(&self, x: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor();
        if x.rank() != 2 || x.shape()[1] != w.shape()[1] {
            return shape_err!(
                "{}: descriptors {:?} are not [N, {}]",
                self.weight.name(),
                x.shape(),
                w.shape()[1]
            );
        }
        class_cosines(x, &w)?.margin_cross_entropy(labels, self.scale, self.margin)
    }
}

/// The cosines `[N, C]` of descriptors `x [N, D]` against class weights `w [C, D]`: `x w^T /
/// max(|x| |w_j|, 1e-8)`; the product runs in the autocast dtype, the norms and the division in
/// f32.
pub fn class_cosines(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dots = autocast_to_f32(&x.matmul(&w.t()?)?)?.to_dtype(DType::F32)?;
    let x_norm = x.to_dtype(DType::F32)?.sum_sq(1, false)?.sqrt()?;
    let w_norm = w.to_dtype(DType::F32)?.sum_sq(1, false)?.sqrt()?;
    let norms = x_norm.unsqueeze(1)?.mul(&w_norm.unsqueeze(0)?)?;
    dots.div(&norms.clamp(NORM_PRODUCT_MIN, f64::INFINITY)?)
}

impl Module for MarginCosineProduct {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.weight.clone()]
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        plain_entries(&self.parameters(), &[])
    }
}
