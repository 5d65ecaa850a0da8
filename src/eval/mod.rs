//! Evaluation of place-recognition models: descriptor extraction for a folder of images.

pub mod dataset;
pub mod extract;
pub mod pictures;
pub mod predictions;
pub mod recall;
