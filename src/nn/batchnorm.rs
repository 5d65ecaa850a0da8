//! BatchNorm2d over channels-last activations, composed from elementwise ops and reductions so
//! autograd covers it. Training mode normalises with the batch's statistics over N, H and W
//! (biased variance) and updates the running statistics as PyTorch does (momentum 0.1, the
//! unbiased variance); evaluation mode uses the running statistics. The arithmetic is f32 even
//! for f16/bf16 inputs (autocast), and the result has the input's dtype.

use super::state::{counter, plain_entries, Buffer, Slot, StateEntry};
use super::Module;
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tensor::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};

/// torch.nn.BatchNorm2d (affine, running statistics tracked).
pub struct BatchNorm2d {
    pub weight: Parameter,
    pub bias: Parameter,
    pub running_mean: Buffer,
    pub running_var: Buffer,
    /// Batches seen in training mode: an i64 scalar kept on the CPU. PyTorch reads it only when
    /// momentum is None, and `convert` drops it, so files may leave it out.
    pub num_batches_tracked: Buffer,
    pub eps: f64,
    pub momentum: f64,
    training: AtomicBool,
}

impl BatchNorm2d {
    /// PyTorch's initial state (weight 1, bias 0, running mean 0, running variance 1), eps 1e-5,
    /// momentum 0.1, evaluation mode; `name` is the module's prefix (`backbone.1`).
    pub fn new(name: &str, channels: usize, device: &Device) -> Result<BatchNorm2d> {
        let ones = || Tensor::ones(&[channels], DType::F32, device);
        let zeros = || Tensor::zeros(&[channels], DType::F32, device);
        Ok(BatchNorm2d {
            weight: Parameter::new(format!("{name}.weight"), ones()?),
            bias: Parameter::new(format!("{name}.bias"), zeros()?),
            running_mean: Buffer::new(format!("{name}.running_mean"), zeros()?),
            running_var: Buffer::new(format!("{name}.running_var"), ones()?),
            num_batches_tracked: counter(format!("{name}.num_batches_tracked"))?,
            eps: 1e-5,
            momentum: 0.1,
            training: AtomicBool::new(false),
        })
    }

    pub fn channels(&self) -> usize {
        self.weight.tensor().numel()
    }

    pub fn is_train(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Normalises `x` [N, H, W, C].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.channels();
        if x.rank() != 4 || x.shape()[3] != c {
            return shape_err!(
                "{}: input {:?} is not [N, H, W, {c}]",
                self.weight.name(),
                x.shape()
            );
        }
        let shape = x.shape().to_vec();
        let rows = shape[..3].iter().product::<usize>();
        let flat = x.to_dtype(DType::F32)?.contiguous()?.reshape(&[rows, c])?;
        let normalised = if self.is_train() {
            if rows < 2 {
                return shape_err!(
                    "{}: training mode needs more than one value per channel, got input {shape:?}",
                    self.weight.name()
                );
            }
            let mean = flat.mean(0, true)?;
            let centered = flat.sub(&mean)?;
            let var = centered.sum_sq(0, true)?.mul_scalar(1.0 / rows as f64)?;
            self.update_running_stats(&mean, &var, rows)?;
            centered.mul(&var.add_scalar(self.eps)?.rsqrt()?)?
        } else {
            let inv_std = self.running_var.tensor().add_scalar(self.eps)?.rsqrt()?;
            flat.sub(&self.running_mean.tensor())?.mul(&inv_std)?
        };
        normalised
            .mul(&self.weight.tensor())?
            .add(&self.bias.tensor())?
            .reshape(&shape)?
            .to_dtype(x.dtype())
    }

    /// running = (1 - momentum) running + momentum batch, with the unbiased batch variance.
    fn update_running_stats(&self, mean: &Tensor, var: &Tensor, rows: usize) -> Result<()> {
        no_grad(|| {
            let m = self.momentum;
            let c = [self.channels()];
            let blend = |running: &Buffer, batch: Tensor| -> Result<()> {
                running.set(
                    running
                        .tensor()
                        .mul_scalar(1.0 - m)?
                        .add(&batch.reshape(&c)?.mul_scalar(m)?)?,
                )
            };
            blend(&self.running_mean, mean.detach())?;
            blend(
                &self.running_var,
                var.mul_scalar(rows as f64 / (rows - 1) as f64)?,
            )?;
            let seen = self.num_batches_tracked.tensor().to_vec::<i64>()?[0];
            self.num_batches_tracked
                .set(Tensor::from_vec(vec![seen + 1], &[], &Device::Cpu)?)
        })
    }

    /// The evaluation-mode map as `x * scale + shift` per channel, in f64 (for folding into the
    /// preceding convolution).
    pub fn scale_shift(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        let (w, b) = (
            self.weight.tensor().to_f64_vec()?,
            self.bias.tensor().to_f64_vec()?,
        );
        let mean = self.running_mean.tensor().to_f64_vec()?;
        let var = self.running_var.tensor().to_f64_vec()?;
        let scale: Vec<f64> = w
            .iter()
            .zip(&var)
            .map(|(w, v)| w / (v + self.eps).sqrt())
            .collect();
        let shift = b
            .iter()
            .zip(&mean)
            .zip(&scale)
            .map(|((b, m), s)| b - m * s)
            .collect();
        Ok((scale, shift))
    }
}

impl Module for BatchNorm2d {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    fn buffers(&self) -> Vec<Buffer> {
        vec![
            self.running_mean.clone(),
            self.running_var.clone(),
            self.num_batches_tracked.clone(),
        ]
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut entries = plain_entries(
            &self.parameters(),
            &[self.running_mean.clone(), self.running_var.clone()],
        );
        entries.push(StateEntry {
            slot: Slot::Buffer(self.num_batches_tracked.clone()),
            optional: true,
        });
        entries
    }

    fn set_train(&self, train: bool) {
        self.training.store(train, Ordering::Relaxed);
    }
}
