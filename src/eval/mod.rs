//! Evaluation of place-recognition models: descriptor extraction for a folder of images, and
//! Recall@N on geo-tagged test sets by exact nearest-neighbour search.

pub mod dataset;
pub mod extract;
pub mod pictures;
pub mod predictions;
pub mod recall;
pub mod rerank;
pub mod run;
pub mod search;
