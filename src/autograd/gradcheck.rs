//! Gradient checking: analytic gradients from the tape against central finite differences.
//!
//! The engine has no f64 dtype yet, so the function is evaluated in f32 on the CPU; the projection
//! onto random weights, the difference quotient and the comparison are done in f64, and each
//! quotient divides by the perturbation actually applied after rounding the inputs to f32.

use super::{backward_with, no_grad};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::{Rng, Tensor};

pub struct GradCheck {
    /// Largest `|analytic - numeric| / max(|numeric|, 1)` over all input elements.
    pub max_error: f64,
    /// Where the largest error is, for the failure message.
    pub worst: String,
}

/// Checks the gradients of `f` at `inputs` (f32 CPU tensors) with step `eps`.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f64,
    seed: u64,
) -> Result<GradCheck> {
    let cpu = Device::Cpu;
    for (i, x) in inputs.iter().enumerate() {
        if x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Err(Error::Argument(format!(
                "gradcheck input {i} must be f32 on the cpu, got {} on {}",
                x.dtype(),
                x.device()
            )));
        }
    }
    let leaves: Vec<Tensor> = inputs.iter().map(|x| x.detach().requires_grad()).collect();
    let out = f(&leaves)?;
    let mut rng = Rng::new(seed);
    let weights: Vec<f64> = (0..out.numel()).map(|_| rng.normal()).collect();
    let project = |t: &Tensor| -> Result<f64> {
        Ok(t.to_f64_vec()?
            .iter()
            .zip(&weights)
            .map(|(a, w)| a * w)
            .sum())
    };
    let grads = backward_with(
        &out,
        Tensor::from_f64(&weights, out.shape(), out.dtype(), &cpu)?,
    )?;

    let mut report = GradCheck {
        max_error: 0.0,
        worst: String::new(),
    };
    for (i, leaf) in leaves.iter().enumerate() {
        let analytic = match grads.get(leaf) {
            Some(g) => g.to_f64_vec()?,
            None => vec![0.0; leaf.numel()],
        };
        let base = leaf.to_f64_vec()?;
        for j in 0..base.len() {
            let evaluate = |delta: f64| -> Result<(f64, f64)> {
                let mut x = base.clone();
                x[j] = (base[j] + delta) as f32 as f64;
                let mut args: Vec<Tensor> = leaves.iter().map(Tensor::detach).collect();
                args[i] = Tensor::from_f64(&x, leaf.shape(), DType::F32, &cpu)?;
                Ok((no_grad(|| f(&args)).and_then(|o| project(&o))?, x[j]))
            };
            let (plus, x_plus) = evaluate(eps)?;
            let (minus, x_minus) = evaluate(-eps)?;
            let numeric = (plus - minus) / (x_plus - x_minus);
            let err = (analytic[j] - numeric).abs() / numeric.abs().max(1.0);
            if err.is_nan() || err > report.max_error {
                report.max_error = err;
                report.worst = format!(
                    "input {i} element {j}: analytic {}, numeric {numeric}",
                    analytic[j]
                );
            }
        }
    }
    Ok(report)
}
