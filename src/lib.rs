//! vpr-engine: a GPU engine for visual place recognition. Compute is hand-written CUDA kernels
//! (`kernels/*.cu`) compiled by NVRTC at run time; the same kernels also run on the CPU through a
//! virtual GPU, and every op has a plain CPU implementation.
//!
//! Training a small model, here on the virtual GPU (`Device::new("cuda")` on a real one):
//!
//! ```
//! use vpr_engine::nn::{Linear, Module};
//! use vpr_engine::ops::loss::Reduction;
//! use vpr_engine::train::{Adam, Optimizer};
//! use vpr_engine::{autograd, DType, Device, Tensor};
//!
//! # fn main() -> vpr_engine::Result<()> {
//! let device = Device::new("vgpu")?;
//! let fc = Linear::new("fc", 32, 10, true, 0, &device)?;
//! let mut opt = Optimizer::single(fc.parameters(), Adam::adamw(1e-2))?;
//! let x = Tensor::randn(&[16, 32], 0.0, 1.0, 1, DType::F32, &device)?;
//! let y = Tensor::from_vec((0..16i64).map(|i| i % 10).collect(), &[16], &device)?;
//! let mut losses = Vec::new();
//! for _ in 0..5 {
//!     opt.zero_grad();
//!     // matrix products in bf16, the loss in f32, f32 master weights
//!     let logits = autograd::autocast(DType::BF16, || fc.forward(&x))?;
//!     let loss = logits.to_dtype(DType::F32)?.cross_entropy(&y, Reduction::Mean)?;
//!     autograd::backward(&loss)?;
//!     opt.step()?;
//!     losses.push(loss.to_scalar_f64()?);
//! }
//! assert!(losses[4] < losses[0]);
//! # Ok(())
//! # }
//! ```

pub mod autograd;
pub mod check;
pub mod data;
pub mod device;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod fit;
pub mod io;
pub mod layout;
pub mod models;
pub mod nn;
pub mod ops;
pub mod synth;
pub mod tape;
pub mod tensor;
pub mod train;

/// A fresh seed per run of a unit test (or `VPR_TEST_SEED` to replay one), printed with the
/// test's name so that a failure can be replayed.
#[cfg(test)]
pub(crate) fn test_seed(test: &str) -> u64 {
    let seed = std::env::var("VPR_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("{test}: VPR_TEST_SEED={seed}");
    seed
}

pub use device::Device;
pub use dtype::DType;
pub use error::{Error, Result};
pub use tensor::Tensor;
