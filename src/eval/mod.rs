//! Evaluation of place-recognition models: descriptor extraction for a folder of images.

pub mod extract;
pub mod pictures;
