//! Layers with parameters. Each holds `Parameter`s named as in PyTorch's state dicts, so weights
//! load by name from converted checkpoints.

mod linear;

pub use linear::Linear;

use crate::autograd::Parameter;

/// Anything that owns parameters.
pub trait Module {
    /// Every parameter, in a stable order.
    fn parameters(&self) -> Vec<Parameter>;
}
