//! PCA-whitening fitted as OpenIBL's `ibl/pca.py` fits it, and the whitening layer it loads.
//!
//! Fitting, in f64 on the host (OpenIBL converts to double before anything else): with the n
//! training descriptors x_i (the rows of an [n, D] matrix) centred by their mean mu,
//! - when D <= n, the covariance C = X^T X / (n - 1) (D x D) is decomposed directly;
//! - otherwise (the usual case: 10,000 VLADs of 32,768 dimensions) the dual trick decomposes the
//!   n x n Gram matrix G = X X^T / (n - 1), whose non-zero eigenvalues are C's, and maps each
//!   eigenvector v back to C's as u = X^T v / sqrt(lambda (n - 1)), which has unit length.
//!
//! The symmetric eigensolver is faer's (`self_adjoint_eigen`, blocked and multi-threaded, so the
//! 10,000 x 10,000 Gram matrix takes minutes, not hours). The `dim` largest eigenvalues are kept
//! in descending order, floored at 1e-9 (after the selection, before the dual mapping, as OpenIBL
//! does). One deliberate difference: OpenIBL selects (and so sorts) only when `dim` is smaller
//! than the decomposed matrix and otherwise keeps the solver's ascending order; here the order is
//! always descending, which only permutes the output rows in that corner case.
//!
//! The parameters are OpenIBL's `pca_params` datasets in float32: `U` [D, dim], `lams` [dim],
//! `mu` [D, 1], `Utmu` [dim, 1] = U^T mu. The layer (OpenIBL's `pca_layer`, a 1x1 convolution
//! with bias) is weight W = (U diag(lams^-1/2))^T [dim, D] and bias b = -W mu [dim], computed
//! from the float32 parameters; without whitening, W = U^T.
//!
//! Files: OpenIBL writes these datasets to an HDF5 file. Reading HDF5 from Rust means binding the
//! C library (the `hdf5` crates) or one of the young pure-Rust readers, none of them established
//! enough to depend on, so the engine stores the same four datasets, same names and shapes, in a
//! safetensors file (`save` / `load`). An OpenIBL `pca_params_*.h5` file reaches it without
//! Python through HDF5's own command-line tools (Debian's `hdf5-tools`):
//! `h5dump -d /<name> -b LE -o <name>.bin pca_params.h5` for U, lams and mu writes each dataset's
//! raw little-endian float32 values in row-major order, which `PcaParams::from_raw_files` reads.

use std::collections::BTreeMap;
use std::path::Path;

use faer::linalg::matmul::matmul;
use faer::{get_global_parallelism, Accum, Mat, Side};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::io::weights::{write_weights, WeightsFile};
use crate::tensor::Tensor;

/// The smallest eigenvalue kept (smaller ones are raised to it), OpenIBL's floor.
pub const EIGENVALUE_FLOOR: f64 = 1e-9;

/// OpenIBL's PCA parameters, float32 as in its `pca_params` file.
#[derive(Clone, Debug, PartialEq)]
pub struct PcaParams {
    /// D, the descriptor size.
    pub input_dim: usize,
    /// The number of components kept.
    pub dim: usize,
    /// [D, dim] row-major: the principal directions, unit columns, by descending eigenvalue.
    pub u: Vec<f32>,
    /// [dim]: the covariance's eigenvalues, descending, floored at `EIGENVALUE_FLOOR`.
    pub lams: Vec<f32>,
    /// [D]: the training mean.
    pub mu: Vec<f32>,
    /// [dim]: U^T mu.
    pub utmu: Vec<f32>,
}

/// A fit with the eigen-decomposition behind it.
pub struct PcaFit {
    pub params: PcaParams,
    /// Whether the n x n Gram matrix was decomposed (D > n) rather than the D x D covariance.
    pub dual: bool,
    /// The `dim` largest eigenvalues of the decomposed matrix, descending, before the floor.
    pub eigenvalues: Vec<f64>,
    /// [size, dim] row-major: the decomposed matrix's unit eigenvectors for `eigenvalues` (size =
    /// n when dual, else D); each is determined up to its sign.
    pub eigenvectors: Vec<f64>,
}

/// The whitening layer's tensors: y = weight x + bias, then (in the model) L2 normalisation.
pub struct PcaLayer {
    /// f32 [dim, D].
    pub weight: Tensor,
    /// f32 [dim].
    pub bias: Tensor,
}

/// Fits PCA to the rows of `descriptors` (f32 [n, D] on any device, n >= 2), keeping `dim`
/// components (1 <= dim <= min(n, D)), as the module header describes.
pub fn fit_pca(descriptors: &Tensor, dim: usize) -> Result<PcaFit> {
    let [n, d] = *descriptors.shape() else {
        return shape_err!(
            "fit_pca: descriptors must be [n, D], got {:?}",
            descriptors.shape()
        );
    };
    if descriptors.dtype() != DType::F32 {
        return dtype_err!(
            "fit_pca: descriptors must be f32, got {}",
            descriptors.dtype()
        );
    }
    let dual = d > n;
    let size = if dual { n } else { d };
    if n < 2 || dim == 0 || dim > size {
        return Err(Error::Argument(format!(
            "fit_pca: {dim} components of {n} descriptors of dimension {d}: needs n >= 2 and \
             1 <= dim <= {size}"
        )));
    }
    let x = descriptors.to_vec::<f32>()?;
    let mut mu = vec![0f64; d];
    for row in x.chunks_exact(d) {
        for (m, &v) in mu.iter_mut().zip(row) {
            *m += v as f64;
        }
    }
    for m in &mut mu {
        *m /= n as f64;
    }
    let centred = Mat::<f64>::from_fn(n, d, |i, j| x[i * d + j] as f64 - mu[j]);
    drop(x);
    let par = get_global_parallelism();
    let scale = 1.0 / (n - 1) as f64;
    let mut m = Mat::<f64>::zeros(size, size);
    if dual {
        matmul(
            &mut m,
            Accum::Replace,
            &centred,
            centred.transpose(),
            scale,
            par,
        );
    } else {
        matmul(
            &mut m,
            Accum::Replace,
            centred.transpose(),
            &centred,
            scale,
            par,
        );
    }
    let eig = m
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Argument(format!("fit_pca: the eigensolver failed: {e:?}")))?;
    drop(m);
    let (values, vectors) = (eig.S().column_vector(), eig.U());
    // faer sorts ascending: the largest `dim` are the last ones, reversed
    let order: Vec<usize> = (0..dim).map(|c| size - 1 - c).collect();
    let eigenvalues: Vec<f64> = order.iter().map(|&c| values[c]).collect();
    let selected = Mat::<f64>::from_fn(size, dim, |i, c| vectors[(i, order[c])]);
    let eigenvectors = (0..size * dim)
        .map(|e| selected[(e / dim, e % dim)])
        .collect();
    let lams: Vec<f64> = eigenvalues
        .iter()
        .map(|&l| {
            if l < EIGENVALUE_FLOOR {
                EIGENVALUE_FLOOR
            } else {
                l
            }
        })
        .collect();
    let u = if dual {
        let root = ((n - 1) as f64).sqrt();
        let scaled = Mat::<f64>::from_fn(n, dim, |i, c| {
            selected[(i, c)] * ((1.0 / lams[c].sqrt()) / root)
        });
        let mut u = Mat::<f64>::zeros(d, dim);
        matmul(
            &mut u,
            Accum::Replace,
            centred.transpose(),
            &scaled,
            1.0,
            par,
        );
        u
    } else {
        selected
    };
    let utmu: Vec<f64> = (0..dim)
        .map(|c| (0..d).map(|j| u[(j, c)] * mu[j]).sum())
        .collect();
    let params = PcaParams {
        input_dim: d,
        dim,
        u: (0..d * dim).map(|e| u[(e / dim, e % dim)] as f32).collect(),
        lams: lams.iter().map(|&l| l as f32).collect(),
        mu: mu.iter().map(|&m| m as f32).collect(),
        utmu: utmu.iter().map(|&v| v as f32).collect(),
    };
    Ok(PcaFit {
        params,
        dual,
        eigenvalues,
        eigenvectors,
    })
}

impl PcaParams {
    fn check(&self, what: &str) -> Result<()> {
        let (d, dim) = (self.input_dim, self.dim);
        if d == 0
            || dim == 0
            || self.u.len() != d * dim
            || self.lams.len() != dim
            || self.mu.len() != d
            || self.utmu.len() != dim
        {
            return shape_err!(
                "{what}: PCA parameters of D = {d}, dim = {dim} hold U {}, lams {}, mu {}, \
                 Utmu {} values",
                self.u.len(),
                self.lams.len(),
                self.mu.len(),
                self.utmu.len()
            );
        }
        Ok(())
    }

    /// The first `dim` components (1 <= dim <= self.dim), as OpenIBL's loader keeps the leading
    /// columns of a file fitted with more.
    pub fn truncated(&self, dim: usize) -> Result<PcaParams> {
        self.check("PcaParams::truncated")?;
        if dim == 0 || dim > self.dim {
            return Err(Error::Argument(format!(
                "PcaParams::truncated: {dim} of {} components",
                self.dim
            )));
        }
        Ok(PcaParams {
            input_dim: self.input_dim,
            dim,
            u: self
                .u
                .chunks_exact(self.dim)
                .flat_map(|row| &row[..dim])
                .copied()
                .collect(),
            lams: self.lams[..dim].to_vec(),
            mu: self.mu.clone(),
            utmu: self.utmu[..dim].to_vec(),
        })
    }

    /// The layer's tensors on `device`: with `whiten`, W = (U diag(lams^-1/2))^T, else W = U^T;
    /// b = -W mu. Computed in f64 from the float32 parameters and rounded once.
    pub fn layer(&self, whiten: bool, device: &Device) -> Result<PcaLayer> {
        self.check("PcaParams::layer")?;
        let (d, dim) = (self.input_dim, self.dim);
        let mut weight = vec![0f64; dim * d];
        for c in 0..dim {
            let s = if whiten {
                1.0 / (self.lams[c] as f64).sqrt()
            } else {
                1.0
            };
            for j in 0..d {
                weight[c * d + j] = self.u[j * dim + c] as f64 * s;
            }
        }
        let bias: Vec<f64> = weight
            .chunks_exact(d)
            .map(|w| {
                -w.iter()
                    .zip(&self.mu)
                    .map(|(a, &m)| a * m as f64)
                    .sum::<f64>()
            })
            .collect();
        Ok(PcaLayer {
            weight: Tensor::from_f64(&weight, &[dim, d], DType::F32, device)?,
            bias: Tensor::from_f64(&bias, &[dim], DType::F32, device)?,
        })
    }

    /// Writes the four datasets under OpenIBL's names and shapes (`U` [D, dim], `lams` [dim],
    /// `mu` [D, 1], `Utmu` [dim, 1], float32) as a safetensors file with `vpr.kind` = `pca`.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.check(&path.display().to_string())?;
        let (d, dim) = (self.input_dim, self.dim);
        let cpu = Device::Cpu;
        let tensors = vec![
            ("U".into(), Tensor::from_slice(&self.u, &[d, dim], &cpu)?),
            ("lams".into(), Tensor::from_slice(&self.lams, &[dim], &cpu)?),
            ("mu".into(), Tensor::from_slice(&self.mu, &[d, 1], &cpu)?),
            (
                "Utmu".into(),
                Tensor::from_slice(&self.utmu, &[dim, 1], &cpu)?,
            ),
        ];
        let metadata = BTreeMap::from([("vpr.kind".to_string(), "pca".to_string())]);
        write_weights(path, &tensors, &metadata)
    }

    /// Reads a file written by `save` (or any safetensors file with those four datasets).
    pub fn load(path: &Path) -> Result<PcaParams> {
        let file = WeightsFile::open(path)?;
        let shape = |name: &str| {
            file.shape(name)
                .map(<[usize]>::to_vec)
                .ok_or_else(|| file.error(format!("no dataset {name}")))
        };
        let u_shape = shape("U")?;
        let [d, dim] = u_shape[..] else {
            return Err(file.error(format!("U is {u_shape:?}, not [D, dim]")));
        };
        for (name, want) in [
            ("lams", vec![dim]),
            ("mu", vec![d, 1]),
            ("Utmu", vec![dim, 1]),
        ] {
            let got = shape(name)?;
            if got.iter().product::<usize>() != want.iter().product::<usize>() {
                return Err(file.error(format!("{name} is {got:?}, expected {want:?}")));
            }
        }
        let read = |name: &str| -> Result<Vec<f32>> {
            Ok(file.read_f64(name)?.into_iter().map(|v| v as f32).collect())
        };
        let params = PcaParams {
            input_dim: d,
            dim,
            u: read("U")?,
            lams: read("lams")?,
            mu: read("mu")?,
            utmu: read("Utmu")?,
        };
        params.check(&path.display().to_string())?;
        Ok(params)
    }

    /// Parameters from raw little-endian float32 files of `U` [D, dim], `lams` [dim] and `mu` [D]
    /// (what `h5dump -b LE` writes for an OpenIBL `pca_params` file's datasets); D and dim follow
    /// from the sizes of lams and mu, and Utmu is recomputed as U^T mu in f64.
    pub fn from_raw_files(u: &Path, lams: &Path, mu: &Path) -> Result<PcaParams> {
        let read = |path: &Path| -> Result<Vec<f32>> {
            let bytes = std::fs::read(path).map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
            if bytes.len() % 4 != 0 {
                return Err(Error::Format {
                    path: path.display().to_string(),
                    message: format!("{} bytes is not a whole number of float32", bytes.len()),
                });
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let (u_values, lams, mu) = (read(u)?, read(lams)?, read(mu)?);
        let (d, dim) = (mu.len(), lams.len());
        if u_values.len() != d * dim {
            return Err(Error::Format {
                path: u.display().to_string(),
                message: format!(
                    "{} values, but mu has D = {d} and lams dim = {dim}: U must be [D, dim]",
                    u_values.len()
                ),
            });
        }
        let utmu = (0..dim)
            .map(|c| {
                (0..d)
                    .map(|j| u_values[j * dim + c] as f64 * mu[j] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        let params = PcaParams {
            input_dim: d,
            dim,
            u: u_values,
            lams,
            mu,
            utmu,
        };
        params.check(&u.display().to_string())?;
        Ok(params)
    }
}
