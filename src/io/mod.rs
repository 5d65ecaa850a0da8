//! Reading files: converted model weights (safetensors with `vpr.*` metadata).
pub mod weights;
