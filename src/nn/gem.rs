//! Generalised-mean pooling (GeM, Radenović et al.) as CosPlace's `layers.GeM`: a learnable
//! exponent p, `mean over H, W of clamp(x, min=eps)^p`, then `^(1/p)`.

use super::Module;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;

pub struct GeM {
    /// The exponent, shape [1].
    pub p: Parameter,
    pub eps: f64,
}

impl GeM {
    /// `name` is the parameter's full name (`aggregation.1.p`).
    pub fn new(name: &str, p: f64, eps: f64, device: &Device) -> Result<GeM> {
        Ok(GeM {
            p: Parameter::new(name, Tensor::full(&[1], p, DType::F32, device)?),
            eps,
        })
    }

    /// `x` [N, H, W, C] -> [N, 1, 1, C], in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let &[n, h, w, c] = x.shape() else {
            return shape_err!(
                "{}: input {:?} is not [N, H, W, C]",
                self.p.name(),
                x.shape()
            );
        };
        let p = self.p.tensor();
        let powered = autocast_to_f32(x)?
            .clamp(self.eps, f64::INFINITY)?
            .pow(&p)?;
        let mean = powered.reshape(&[n, h * w, c])?.mean(1, true)?;
        mean.pow(&p.powf(-1.0)?)?.reshape(&[n, 1, 1, c])
    }
}

impl Module for GeM {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.p.clone()]
    }
}
