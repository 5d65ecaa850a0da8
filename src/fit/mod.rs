//! Fitting the parameters that NetVLAD models start from or end with, from sampled descriptors:
//! k-means centroids (`kmeans`, on any device), OpenIBL's soft-assignment initialisation from
//! them (`netvlad`), and PCA-whitening (`pca`, on the host in f64 with faer's symmetric
//! eigensolver). Library code composed of existing ops; no kernels of its own.

pub mod kmeans;
pub mod netvlad;
pub mod pca;

pub use kmeans::{kmeans, KMeans, KMeansOptions};
pub use netvlad::{netvlad_init, NetVladInit};
pub use pca::{fit_pca, PcaFit, PcaLayer, PcaParams};
