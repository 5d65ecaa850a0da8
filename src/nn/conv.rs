//! Conv2d over channels-last activations with OHWI weights `[O, KH, KW, C/groups]` (files hold
//! PyTorch's OIHW; the state dict's `Slot::ConvWeight` converts once at load), and the folding
//! of an evaluation-mode BatchNorm into the convolution before it for inference; and
//! ConvTranspose2d, whose `[Cin, Cout, KH, KW]` file weights become `[Cin, KH, KW, Cout]` the same way.
//!
//! Folding computes `w' = w * s` and `b' = (b - mean) * s + beta` with `s = gamma / sqrt(var +
//! eps)` in f64 and rounds once to f32. Measured against conv followed by BatchNorm (both f32,
//! random weights and running statistics, tests/models.rs `batchnorm_folding_matches_unfolded`):
//! max error 1.2e-7 to 2.7e-7 relative to the largest output (the test asserts 1e-6), i.e. f32
//! rounding; on the tiny CosPlace fixtures folded and unfolded descriptors both stay within
//! 1e-6 of PyTorch's float64 result.

use super::batchnorm::BatchNorm2d;
use super::state::{Slot, StateEntry};
use super::Module;
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::ops::conv::{Conv2dOptions, ConvTranspose2dOptions};
use crate::tensor::Tensor;

/// torch.nn.Conv2d with square kernels.
pub struct Conv2d {
    /// OHWI `[O, KH, KW, C/groups]`.
    pub weight: Parameter,
    pub bias: Option<Parameter>,
    pub options: Conv2dOptions,
}

impl Conv2d {
    /// PyTorch's default initialisation (weight and bias uniform in ±1/sqrt(fan_in)), from a
    /// generator seeded by `name` (the module's prefix, `backbone.0`), so a model builds the
    /// same every time.
    pub fn new(
        name: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        options: Conv2dOptions,
        bias: bool,
        device: &Device,
    ) -> Result<Conv2d> {
        let groups = options.groups.max(1);
        if in_channels % groups != 0 || out_channels % groups != 0 {
            return shape_err!(
                "{name}: {in_channels} -> {out_channels} channels do not split into {groups} groups"
            );
        }
        let fan_in = in_channels / groups * kernel * kernel;
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let seed = name_seed(name);
        let shape = [out_channels, kernel, kernel, in_channels / groups];
        let weight = Tensor::rand_uniform(&shape, -bound, bound, seed, DType::F32, device)?;
        let bias = bias
            .then(|| {
                let b = Tensor::rand_uniform(
                    &[out_channels],
                    -bound,
                    bound,
                    seed.wrapping_add(1),
                    DType::F32,
                    device,
                )?;
                Ok(Parameter::new(format!("{name}.bias"), b))
            })
            .transpose()?;
        Ok(Conv2d {
            weight: Parameter::new(format!("{name}.weight"), weight),
            bias,
            options,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.tensor().shape()[0]
    }

    /// `x` [N, H, W, C] -> [N, OH, OW, O].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Parameter::tensor);
        x.conv2d(&self.weight.tensor(), bias.as_ref(), self.options)
    }

    /// `relu(conv(x) + residual)` (each part optional) in one pass where the device can.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Parameter::tensor);
        x.conv2d_fused(
            &self.weight.tensor(),
            bias.as_ref(),
            residual,
            relu,
            self.options,
        )
    }

    /// This convolution followed by `bn` in evaluation mode, as one convolution with a bias
    /// (frozen parameters, named after this convolution).
    pub fn fold(&self, bn: &BatchNorm2d) -> Result<Conv2d> {
        let w = self.weight.tensor();
        let o = w.shape()[0];
        if bn.channels() != o {
            return shape_err!(
                "cannot fold {} ({} channels) into {} ({o} outputs)",
                bn.weight.name(),
                bn.channels(),
                self.weight.name()
            );
        }
        let (scale, shift) = bn.scale_shift()?;
        let per_output = w.numel() / o;
        let weight: Vec<f64> = w
            .to_f64_vec()?
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[i / per_output])
            .collect();
        let bias: Vec<f64> = match &self.bias {
            Some(b) => b.tensor().to_f64_vec()?,
            None => vec![0.0; o],
        };
        let bias: Vec<f64> = (0..o).map(|c| bias[c] * scale[c] + shift[c]).collect();
        let name = self.weight.name().trim_end_matches(".weight");
        let folded = Conv2d {
            weight: Parameter::new(
                self.weight.name(),
                Tensor::from_f64(&weight, w.shape(), w.dtype(), w.device())?,
            ),
            bias: Some(Parameter::new(
                format!("{name}.bias"),
                Tensor::from_f64(&bias, &[o], w.dtype(), w.device())?,
            )),
            options: self.options,
        };
        for p in folded.parameters() {
            p.set_trainable(false);
        }
        Ok(folded)
    }
}

impl Module for Conv2d {
    fn parameters(&self) -> Vec<Parameter> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .collect()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        std::iter::once(Slot::ConvWeight(self.weight.clone()))
            .chain(self.bias.clone().map(Slot::Parameter))
            .map(|slot| StateEntry {
                slot,
                optional: false,
            })
            .collect()
    }
}

/// A 64-bit FNV-1a hash of `name`: a stable seed per layer.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// torch.nn.ConvTranspose2d with square kernels (groups 1, dilation 1), state names `weight` and
/// `bias`.
pub struct ConvTranspose2d {
    /// `[Cin, KH, KW, Cout]`: files hold PyTorch's `[Cin, Cout, KH, KW]`, which `Slot::ConvWeight`
    /// converts at load like an OIHW weight (the same permutation, with O = Cin and I = Cout).
    pub weight: Parameter,
    pub bias: Option<Parameter>,
    pub options: ConvTranspose2dOptions,
}

impl ConvTranspose2d {
    /// PyTorch's default initialisation: weight and bias uniform in ±1/sqrt(fan_in), where PyTorch
    /// computes fan_in from its `[Cin, Cout, KH, KW]` weight as `Cout * KH * KW`; seeded by `name`
    /// as `Conv2d::new` is.
    pub fn new(
        name: &str,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        options: ConvTranspose2dOptions,
        bias: bool,
        device: &Device,
    ) -> Result<ConvTranspose2d> {
        let fan_in = out_channels * kernel * kernel;
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let seed = name_seed(name);
        let shape = [in_channels, kernel, kernel, out_channels];
        let weight = Tensor::rand_uniform(&shape, -bound, bound, seed, DType::F32, device)?;
        let bias = bias
            .then(|| {
                let b = Tensor::rand_uniform(
                    &[out_channels],
                    -bound,
                    bound,
                    seed.wrapping_add(1),
                    DType::F32,
                    device,
                )?;
                Ok(Parameter::new(format!("{name}.bias"), b))
            })
            .transpose()?;
        Ok(ConvTranspose2d {
            weight: Parameter::new(format!("{name}.weight"), weight),
            bias,
            options,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.weight.tensor().shape()[3]
    }

    /// `x` [N, H, W, Cin] -> [N, (H - 1) * stride - 2 * padding + K + output_padding, ..., Cout].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(Parameter::tensor);
        x.conv_transpose2d(&self.weight.tensor(), bias.as_ref(), self.options)
    }
}

impl Module for ConvTranspose2d {
    fn parameters(&self) -> Vec<Parameter> {
        std::iter::once(self.weight.clone())
            .chain(self.bias.clone())
            .collect()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        std::iter::once(Slot::ConvWeight(self.weight.clone()))
            .chain(self.bias.clone().map(Slot::Parameter))
            .map(|slot| StateEntry {
                slot,
                optional: false,
            })
            .collect()
    }
}
