//! Layers with parameters and buffers, named as in PyTorch's state dicts (`backbone.4.0.bn1.weight`)
//! so that weights load by name from converted files ([`load_strict`]). Layers that behave
//! differently in training (BatchNorm) follow the module's mode, set with [`Module::set_train`].
//! Activations are channels-last (NHWC), so per-channel operations work on the last axis.

mod batchnorm;
mod conv;
mod cosface;
mod gem;
mod grouped_vlad;
mod linear;
mod netvlad;
mod norm;
mod state;

pub use batchnorm::BatchNorm2d;
pub use conv::{Conv2d, ConvTranspose2d};
pub use cosface::{class_cosines, MarginCosineProduct};
pub use gem::GeM;
pub use grouped_vlad::{GroupedVlad, GroupedVladShape};
pub use linear::Linear;
pub use netvlad::{netvlad_residuals, vlad_descriptor, NetVlad, PcaWhitening};
pub use norm::{flatten, l2_normalize, LayerNorm};
pub use state::{load_strict, plain_entries, Buffer, Slot, StateEntry};

use crate::autograd::Parameter;

/// Anything that owns parameters (and maybe buffers).
pub trait Module {
    /// Every parameter, in a stable order.
    fn parameters(&self) -> Vec<Parameter>;

    /// Every buffer (tensors kept but not trained, such as BatchNorm's running statistics).
    fn buffers(&self) -> Vec<Buffer> {
        Vec::new()
    }

    /// The module's state dict: every parameter and buffer with how the file stores it.
    fn state_entries(&self) -> Vec<StateEntry> {
        plain_entries(&self.parameters(), &self.buffers())
    }

    /// Training mode (BatchNorm normalises with batch statistics and updates its running ones)
    /// or evaluation mode. Modules without such layers ignore it.
    fn set_train(&self, _train: bool) {}
}
