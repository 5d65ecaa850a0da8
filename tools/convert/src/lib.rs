//! `convert`: official PyTorch VPR checkpoints to self-describing safetensors.
//!
//! The pipeline: [`container`] reads the zip or legacy file layout in place, [`pickle`] runs
//! the pickle without executing anything, [`torch`] finds the state dict and rebuilds its
//! tensors through a short list of known functions, [`arch`] recognises the architecture
//! from names and shapes, and [`convert`] writes the safetensors file atomically.

pub mod error;

pub mod arch;
pub mod catalog;
pub mod container;
pub mod convert;
pub mod pickle;
pub mod torch;

pub use convert::{convert_bytes, convert_file, Options};
pub use error::{Error, Result};
