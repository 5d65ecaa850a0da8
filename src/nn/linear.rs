use super::Module;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tensor::Tensor;

/// `y = x W^T + b`, with `W` of shape [out, in] as in torch.nn.Linear.
pub struct Linear {
    pub weight: Parameter,
    pub bias: Option<Parameter>,
}

impl Linear {
    /// PyTorch's default initialisation: weight and bias uniform in ±1/sqrt(in).
    pub fn new(
        name: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
        seed: u64,
        device: &Device,
    ) -> Result<Linear> {
        let bound = 1.0 / (inputs as f64).sqrt();
        let weight =
            Tensor::rand_uniform(&[outputs, inputs], -bound, bound, seed, DType::F32, device)?;
        let bias = if bias {
            let b = Tensor::rand_uniform(
                &[outputs],
                -bound,
                bound,
                seed.wrapping_add(1),
                DType::F32,
                device,
            )?;
            Some(Parameter::new(format!("{name}.bias"), b))
        } else {
            None
        };
        Ok(Linear {
            weight: Parameter::new(format!("{name}.weight"), weight),
            bias,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.tensor();
        if x.rank() == 0 || x.shape()[x.rank() - 1] != w.shape()[1] {
            return shape_err!(
                "{}: input {:?} does not end in {} features",
                self.weight.name(),
                x.shape(),
                w.shape()[1]
            );
        }
        let y = x.matmul(&w.t()?)?;
        match &self.bias {
            Some(b) => y.add(&b.tensor().to_dtype(y.dtype())?),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn parameters(&self) -> Vec<Parameter> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .collect()
    }
}
