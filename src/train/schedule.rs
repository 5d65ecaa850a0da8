//! Learning-rate schedules.

use super::optim::Optimizer;
use crate::error::{Error, Result};

/// torch.optim.lr_scheduler.StepLR: every `step_size` calls of `step` (epochs or iterations, as
/// the caller counts) each group's learning rate is multiplied by `gamma`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLr {
    step_size: u64,
    gamma: f64,
    /// Calls of `step` so far (torch's `last_epoch` after construction is 0).
    last_epoch: u64,
}

impl StepLr {
    pub fn new(step_size: u64, gamma: f64) -> Result<StepLr> {
        if step_size == 0 || !gamma.is_finite() || gamma < 0.0 {
            return Err(Error::Argument(format!(
                "StepLR: step_size {step_size} must be > 0 and gamma {gamma} finite and >= 0"
            )));
        }
        Ok(StepLr {
            step_size,
            gamma,
            last_epoch: 0,
        })
    }

    pub fn step_size(&self) -> u64 {
        self.step_size
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    pub(crate) fn set_last_epoch(&mut self, e: u64) {
        self.last_epoch = e;
    }

    /// Advances one epoch (or step); at multiples of `step_size` every group's lr is multiplied
    /// by `gamma` (in f64, as torch's chainable form does).
    pub fn step(&mut self, optimizer: &mut Optimizer) -> Result<()> {
        self.last_epoch += 1;
        if self.last_epoch % self.step_size == 0 {
            for g in 0..optimizer.groups().len() {
                let h = optimizer.hyper_mut(g)?;
                h.set_lr(h.lr() * self.gamma);
            }
        }
        Ok(())
    }
}
