//! Layer norm (torch.nn.LayerNorm over the last axis), L2 normalisation
//! (torch.nn.functional.normalize) and CosPlace's Flatten.

use super::Module;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tensor::Tensor;

/// torch.nn.LayerNorm(C, eps) with elementwise affine (weight and bias `[C]`), over the last axis.
pub struct LayerNorm {
    pub weight: Parameter,
    pub bias: Parameter,
    pub eps: f64,
}

impl LayerNorm {
    /// PyTorch's initial state (weight 1, bias 0); `name` is the module's prefix (`blocks.0.norm1`).
    /// DINOv2 uses eps 1e-6, PyTorch's default is 1e-5.
    pub fn new(name: &str, channels: usize, eps: f64, device: &Device) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: Parameter::new(
                format!("{name}.weight"),
                Tensor::ones(&[channels], DType::F32, device)?,
            ),
            bias: Parameter::new(
                format!("{name}.bias"),
                Tensor::zeros(&[channels], DType::F32, device)?,
            ),
            eps,
        })
    }

    /// Normalises `x` [..., C]: the output has x's dtype (f32 inside an autocast scope).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(
            Some(&self.weight.tensor()),
            Some(&self.bias.tensor()),
            self.eps,
        )
    }
}

impl Module for LayerNorm {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

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
