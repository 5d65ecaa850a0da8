//! Dynamic loss scaling for f16 training, with the semantics of torch.amp.GradScaler: the loss's
//! gradient is multiplied by the scale before backward; before the optimizer step the gradients
//! are unscaled by a kernel that also raises a device flag on any inf or NaN (only that flag
//! comes back to the host); a step with such a gradient is skipped and the scale backs off,
//! and after `growth_interval` good steps in a row the scale grows. bf16 training needs none
//! (use `GradScaler::disabled()`, which passes everything through).

use super::optim::{buf, buf_tensor, cpu, f32_tensor, f32s, gpu, Optimizer};
use crate::autograd::{backward_with, no_grad, Gradients, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Debug, Clone)]
pub struct GradScaler {
    enabled: bool,
    scale: f32,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: u32,
    /// Good steps in a row since the scale last changed.
    growth_tracker: u32,
    /// Whether this iteration's gradients were unscaled, and what that found.
    found_inf: Option<bool>,
}

impl Default for GradScaler {
    fn default() -> Self {
        GradScaler::new()
    }
}

impl GradScaler {
    /// torch's defaults: initial scale 65536, growth x2 after 2000 good steps, backoff x0.5.
    pub fn new() -> GradScaler {
        GradScaler {
            enabled: true,
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            growth_tracker: 0,
            found_inf: None,
        }
    }

    /// A scaler that scales nothing and never skips (bf16 or f32 training).
    pub fn disabled() -> GradScaler {
        GradScaler {
            enabled: false,
            scale: 1.0,
            ..GradScaler::new()
        }
    }

    /// Custom factors, validated as torch does (growth > 1, 0 < backoff < 1, interval > 0).
    pub fn with_options(
        init_scale: f32,
        growth_factor: f32,
        backoff_factor: f32,
        growth_interval: u32,
    ) -> Result<GradScaler> {
        let ok = init_scale.is_finite()
            && init_scale > 0.0
            && growth_factor > 1.0
            && growth_factor.is_finite()
            && backoff_factor > 0.0
            && backoff_factor < 1.0
            && growth_interval > 0;
        if !ok {
            return Err(Error::Argument(format!(
                "GradScaler: init scale {init_scale} must be > 0, growth factor {growth_factor} > 1, \
                 backoff factor {backoff_factor} in (0, 1), growth interval {growth_interval} > 0"
            )));
        }
        Ok(GradScaler {
            scale: init_scale,
            growth_factor,
            backoff_factor,
            growth_interval,
            ..GradScaler::new()
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The current scale (1 when disabled).
    pub fn scale(&self) -> f32 {
        if self.enabled {
            self.scale
        } else {
            1.0
        }
    }

    pub fn growth_tracker(&self) -> u32 {
        self.growth_tracker
    }

    /// Restores the scale and growth tracker (from a checkpoint).
    pub(crate) fn set_state(&mut self, scale: f32, growth_tracker: u32) -> Result<()> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::Argument(format!(
                "GradScaler: scale {scale} must be finite and > 0"
            )));
        }
        self.scale = scale;
        self.growth_tracker = growth_tracker;
        self.found_inf = None;
        Ok(())
    }

    /// Back-propagates `loss * scale` (`loss.backward()` of torch's `scaler.scale(loss)`): the
    /// parameters' gradients come out multiplied by the scale.
    pub fn backward(&self, loss: &Tensor) -> Result<Gradients> {
        let seed = no_grad(|| {
            Tensor::full(
                loss.shape(),
                self.scale() as f64,
                loss.dtype(),
                loss.device(),
            )
        })?;
        backward_with(loss, seed)
    }

    /// Divides the gradients of the optimizer's trainable parameters by the scale (torch's
    /// `unscale_`) and records whether any was inf or NaN, which it returns. Once per iteration.
    pub fn unscale(&mut self, optimizer: &Optimizer) -> Result<bool> {
        if !self.enabled {
            return Ok(false);
        }
        if self.found_inf.is_some() {
            return Err(Error::Argument(
                "GradScaler::unscale was already called since the last update".into(),
            ));
        }
        let found = unscale_params(&optimizer.parameters(), self.scale)?;
        self.found_inf = Some(found);
        Ok(found)
    }

    /// Unscales (unless `unscale` already ran this iteration) and runs the optimizer's step unless
    /// a gradient was inf or NaN. Returns whether the step ran.
    pub fn step(&mut self, optimizer: &mut Optimizer) -> Result<bool> {
        if !self.enabled {
            optimizer.step()?;
            return Ok(true);
        }
        let found = match self.found_inf {
            Some(f) => f,
            None => self.unscale(optimizer)?,
        };
        if !found {
            optimizer.step()?;
        }
        Ok(!found)
    }

    /// Adjusts the scale for the next iteration (torch's `update`): backoff after a skipped step,
    /// growth after `growth_interval` good ones in a row.
    pub fn update(&mut self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let Some(found) = self.found_inf.take() else {
            return Err(Error::Argument(
                "GradScaler::update without unscale or step in this iteration".into(),
            ));
        };
        if found {
            self.scale *= self.backoff_factor;
            self.growth_tracker = 0;
        } else {
            let good = self.growth_tracker + 1;
            if good == self.growth_interval {
                let grown = self.scale * self.growth_factor;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.growth_tracker = 0;
            } else {
                self.growth_tracker = good;
            }
        }
        Ok(())
    }
}

/// Replaces each trainable parameter's gradient by `grad / scale`; whether any was not finite.
/// On a GPU one int flag per device is zeroed, raised by the kernels and read back once.
fn unscale_params(params: &[Parameter], scale: f32) -> Result<bool> {
    // torch: inv_scale = scale.double().reciprocal().float()
    let inv_scale = (1.0 / scale as f64) as f32;
    no_grad(|| {
        let mut found = false;
        let mut flags: Vec<(Device, Tensor)> = Vec::new();
        for p in params {
            if !p.is_trainable() {
                continue;
            }
            let Some(g) = p.grad() else { continue };
            if g.dtype() != DType::F32 {
                return Err(Error::DType(format!(
                    "GradScaler: gradient of '{}' is {}; f32 master weights have f32 gradients",
                    p.name(),
                    g.dtype()
                )));
            }
            let g = g.contiguous()?;
            let (shape, device) = (g.shape().to_vec(), g.device().clone());
            let out = if device.is_cpu() {
                let (v, bad) = cpu::unscale(f32s(&g), inv_scale);
                found |= bad;
                f32_tensor(v, &shape)?
            } else {
                let pos = match flags.iter().position(|(d, _)| d.same(&device)) {
                    Some(i) => i,
                    None => {
                        flags.push((device.clone(), Tensor::zeros(&[1], DType::I32, &device)?));
                        flags.len() - 1
                    }
                };
                let b = gpu::unscale(buf(&g)?, g.numel(), inv_scale, buf(&flags[pos].1)?)?;
                buf_tensor(b, &shape, &device)?
            };
            p.set_grad(Some(out));
        }
        for (_, flag) in &flags {
            found |= flag.to_vec::<i32>()?[0] != 0;
        }
        Ok(found)
    })
}
