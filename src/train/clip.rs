//! Gradient clipping by global norm, as torch.nn.utils.clip_grad_norm_: total = sqrt(sum of
//! squares of every gradient), coef = max_norm / (total + 1e-6) clamped at 1, grads *= coef.
//! On a GPU the norm and the coefficient stay on the device: per-block partial sums of squares,
//! one block adding them up, and a scaling kernel that reads the coefficient from device memory.

use super::optim::{buf, buf_tensor, cpu, f32_tensor, f32s, gpu};
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// Clips the gradients of the trainable `params` that have one (all on one device) to a global
/// L2 norm of at most `max_norm`; returns the norm before clipping, an f32 scalar on that device.
pub fn clip_grad_norm(params: &[Parameter], max_norm: f64) -> Result<Tensor> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::Argument(format!(
            "clip_grad_norm: max_norm {max_norm} must be >= 0"
        )));
    }
    no_grad(|| {
        let mut grads = Vec::new();
        for p in params.iter().filter(|p| p.is_trainable()) {
            let Some(g) = p.grad() else { continue };
            if g.dtype() != DType::F32 {
                return Err(Error::DType(format!(
                    "clip_grad_norm: gradient of '{}' is {}, expected f32",
                    p.name(),
                    g.dtype()
                )));
            }
            if let Some((_, first)) = grads.first() {
                let first: &Tensor = first;
                first.same_device(&g, "clip_grad_norm")?;
            }
            grads.push((p.clone(), g.contiguous()?));
        }
        let Some((_, first)) = grads.first() else {
            return Tensor::zeros(&[], DType::F32, &Device::Cpu);
        };
        let device = first.device().clone();
        let max_norm = max_norm as f32;
        if device.is_cpu() {
            let total = grads
                .iter()
                .map(|(_, g)| cpu::sumsq(f32s(g)))
                .sum::<f32>()
                .sqrt();
            let coef = (max_norm / (total + 1e-6)).min(1.0);
            // f32::min ignores NaN; torch's clamp keeps it
            let coef = if total.is_nan() { f32::NAN } else { coef };
            for (p, g) in &grads {
                p.set_grad(Some(f32_tensor(cpu::scale(f32s(g), coef), g.shape())?));
            }
            return f32_tensor(vec![total], &[]);
        }
        let slots: Vec<usize> = grads
            .iter()
            .map(|(_, g)| gpu::sumsq_blocks(g.numel()))
            .collect();
        let count: usize = slots.iter().sum();
        let gpu_dev = device.gpu().expect("a GPU device");
        let partials = gpu_dev.alloc(count * 4)?;
        let mut slot = 0;
        for ((_, g), &n) in grads.iter().zip(&slots) {
            gpu::sumsq_partials(buf(g)?, g.numel(), &partials, slot)?;
            slot += n;
        }
        let norm_and_coef = gpu::clip_coef(&partials, count, max_norm)?;
        for (p, g) in &grads {
            let b = gpu::scale_by(buf(g)?, g.numel(), &norm_and_coef, 4)?;
            p.set_grad(Some(buf_tensor(b, g.shape(), &device)?));
        }
        buf_tensor(norm_and_coef, &[2], &device)?
            .narrow(0, 0, 1)?
            .reshape(&[])
    })
}
