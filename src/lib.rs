//! vpr-engine: a GPU engine for visual place recognition. Compute is hand-written CUDA kernels
//! (`kernels/*.cu`) compiled by NVRTC at run time; the same kernels also run on the CPU through a
//! virtual GPU, and every op has a plain CPU implementation.

pub mod autograd;
pub mod check;
pub mod device;
pub mod dtype;
pub mod error;
pub mod layout;
pub mod nn;
pub mod ops;
pub mod tensor;
pub mod train;

pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::Tensor;
