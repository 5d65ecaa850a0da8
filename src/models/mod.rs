//! Place-recognition systems: backbones (ResNet, VGG16) and the systems built on them (CosPlace,
//! EigenPlaces), constructed from a converted safetensors file's `vpr.*` metadata alone.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::path::Path;

/// How images are prepared for a model: ToTensor's 0-1 RGB, then `(x - mean) / std` per
/// channel, at the size `size` asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub size: InputSize,
}

/// The image size a model expects (`vpr.input.size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSize {
    /// Full resolution, any size.
    Any,
    /// Resized to exactly this size before the model.
    Resize { height: usize, width: usize },
    /// The model only takes this size.
    Fixed { height: usize, width: usize },
    /// Sides must be multiples of this (patch size).
    Multiple(usize),
}

/// A model that maps images to global descriptors.
pub trait PlaceModel: Send + Sync {
    /// One line for people: system, backbone and descriptor size.
    fn describe(&self) -> String;
    /// Descriptor size.
    fn dim(&self) -> usize;
    fn input(&self) -> &InputSpec;
    fn device(&self) -> &Device;
    /// Global descriptors `[N, dim]` (f32) of normalised images `[N, H, W, 3]` (f32, on
    /// `self.device()`). Records no tape.
    fn descriptors(&self, images: &Tensor) -> Result<Tensor>;
}

/// The model a converted safetensors file describes, its weights loaded, on `device`, in eval
/// mode.
pub fn load(path: &Path, device: &Device) -> Result<Box<dyn PlaceModel>> {
    let _ = device;
    Err(Error::Format {
        path: path.display().to_string(),
        message: "model loading is being built in this session".into(),
    })
}
