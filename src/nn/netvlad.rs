//! NetVLAD aggregation (Arandjelović et al.) as OpenIBL's `NetVLAD` and the geo-localization
//! benchmark's `aggregation.NetVLAD` define it, and OpenIBL's PCA-whitening layer.
//!
//! NetVLAD over a feature map `x` [N, H, W, D] with K clusters: optional L2 normalisation of each
//! location over channels; soft assignment `a = softmax_k(W x_l)` (a 1x1 convolution without bias,
//! a matmul on [N, L, D]); residuals `V[k] = sum_l a_kl (x_l - c_k) = (a^T x)[k] - (sum_l a_kl) c_k`,
//! one batched GEMM instead of the originals' [N, K, D, L] residual tensor (OpenIBL) or loop over
//! clusters (the benchmark); then intra-normalisation (L2 over D per cluster), the cluster-major
//! flatten (index `k * D + d`) and a global L2. Everything is composed of ops, so the gradients of
//! the assignment weights and the centroids come from autograd on every device.
//!
//! State names: `<name>.centroids` [K, D] and `<name>.conv.weight` [K, D, 1, 1] (stored OHWI
//! `[K, 1, 1, D]` in the engine, which for a 1x1 kernel is the same memory).

use super::conv::Conv2d;
use super::state::{Slot, StateEntry};
use super::{l2_normalize, Module};
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::ops::conv::Conv2dOptions;
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;

pub struct NetVlad {
    /// `[K, D]`.
    pub centroids: Parameter,
    /// The soft-assignment 1x1 convolution, `[K, 1, 1, D]`, no bias.
    pub conv: Conv2d,
    /// L2-normalise each location's descriptor before everything else (both originals do).
    pub normalize_input: bool,
}

impl NetVlad {
    /// A NetVLAD layer named `name` (`net_vlad`, `aggregation`) with PyTorch's initial values:
    /// centroids uniform in [0, 1) as `torch.rand`, the convolution's default initialisation.
    pub fn new(
        name: &str,
        clusters: usize,
        dim: usize,
        normalize_input: bool,
        device: &Device,
    ) -> Result<NetVlad> {
        let conv = Conv2d::new(
            &format!("{name}.conv"),
            dim,
            clusters,
            1,
            Conv2dOptions::new(),
            false,
            device,
        )?;
        let centroids = Tensor::rand_uniform(
            &[clusters, dim],
            0.0,
            1.0,
            0x4e65_7456_4c41_4400,
            DType::F32,
            device,
        )?;
        Ok(NetVlad {
            centroids: Parameter::new(format!("{name}.centroids"), centroids),
            conv,
            normalize_input,
        })
    }

    pub fn clusters(&self) -> usize {
        self.centroids.tensor().shape()[0]
    }

    /// Channels of a local descriptor (D).
    pub fn dim(&self) -> usize {
        self.centroids.tensor().shape()[1]
    }

    /// The assignment weights as a `[K, D]` matrix (a view of the 1x1 convolution's).
    fn assignment_weight(&self) -> Result<Tensor> {
        self.conv
            .weight
            .tensor()
            .reshape(&[self.clusters(), self.dim()])
    }

    /// The soft assignment `[N, H*W, K]` of the locations of `x` [N, H, W, D] to the clusters.
    pub fn assignment(&self, x: &Tensor) -> Result<Tensor> {
        let x = locations(x, self.dim(), self.normalize_input, self.centroids.name())?;
        x.matmul(&self.assignment_weight()?.t()?)?
            .to_dtype(DType::F32)?
            .softmax(-1)
    }

    /// The unnormalised VLAD residuals `[N, K, D]` of `x` [N, H, W, D] (OpenIBL's `NetVLAD`
    /// module output, before the model's normalisation).
    pub fn residuals(&self, x: &Tensor) -> Result<Tensor> {
        netvlad_residuals(
            x,
            &self.assignment_weight()?,
            &self.centroids.tensor(),
            self.normalize_input,
        )
    }

    /// The NetVLAD descriptor `[N, K*D]` of `x` [N, H, W, D]: residuals, intra-normalised,
    /// flattened cluster-major, L2-normalised.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        vlad_descriptor(&self.residuals(x)?)
    }
}

/// The locations of `x` [N, H, W, D] as [N, H*W, D] in f32, normalised if asked.
fn locations(x: &Tensor, dim: usize, normalize: bool, what: &str) -> Result<Tensor> {
    let &[n, h, w, d] = x.shape() else {
        return shape_err!("{what}: input {:?} is not [N, H, W, C]", x.shape());
    };
    if d != dim {
        return shape_err!(
            "{what}: input {:?} has {d} channels, the layer {dim}",
            x.shape()
        );
    }
    let x = autocast_to_f32(x)?.reshape(&[n, h * w, d])?;
    if normalize {
        l2_normalize(&x, -1)
    } else {
        Ok(x)
    }
}

/// NetVLAD's residuals `[N, K, D]` of `x` [N, H, W, D] with assignment weights `weight` [K, D]
/// and `centroids` [K, D]: `V[k] = (a^T x)[k] - (sum_l a_kl) c_k`, `a = softmax_k(x W^T)`, the
/// locations L2-normalised first if `normalize_input`. Autograd reaches all three tensors.
pub fn netvlad_residuals(
    x: &Tensor,
    weight: &Tensor,
    centroids: &Tensor,
    normalize_input: bool,
) -> Result<Tensor> {
    if weight.rank() != 2 || centroids.shape() != weight.shape() {
        return shape_err!(
            "netvlad: assignment weights {:?} and centroids {:?} are not both [K, D]",
            weight.shape(),
            centroids.shape()
        );
    }
    let k = weight.shape()[0];
    let x = locations(x, weight.shape()[1], normalize_input, "netvlad")?;
    let n = x.shape()[0];
    let a = x.matmul(&weight.t()?)?.to_dtype(DType::F32)?.softmax(-1)?;
    // sum_l a_kl x_l for every cluster at once: [N, K, L] @ [N, L, D]
    let weighted = a.t()?.matmul(&x)?.to_dtype(DType::F32)?;
    let mass = a.sum(1, false)?.reshape(&[n, k, 1])?;
    weighted.sub(&mass.mul(centroids)?)
}

/// Residuals `[N, K, D]` to the descriptor `[N, K*D]`: L2 over D per cluster, flattened
/// cluster-major (`k * D + d`), L2 over everything.
pub fn vlad_descriptor(residuals: &Tensor) -> Result<Tensor> {
    let &[n, k, d] = residuals.shape() else {
        return shape_err!(
            "vlad_descriptor: residuals {:?} are not [N, K, D]",
            residuals.shape()
        );
    };
    let v = l2_normalize(residuals, -1)?;
    l2_normalize(&v.reshape(&[n, k * d])?, -1)
}

impl Module for NetVlad {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.centroids.clone(), self.conv.weight.clone()]
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut entries = vec![StateEntry {
            slot: Slot::Parameter(self.centroids.clone()),
            optional: false,
        }];
        entries.extend(self.conv.state_entries());
        entries
    }
}

/// OpenIBL's `pca_layer`: a 1x1 convolution from the VLAD vector (`I` = 32768) to `O` (4096)
/// channels with bias, which is `x W^T + b` on [N, I], then L2. The weight is stored `[O, 1, 1, I]`
/// (the file's `[O, I, 1, 1]`), viewed as `[O, I]`.
pub struct PcaWhitening {
    pub weight: Parameter,
    pub bias: Parameter,
}

impl PcaWhitening {
    /// Zero weights, to be loaded from a file or fitted: a projection has no useful random
    /// initialisation, and 32768 x 4096 random numbers would only be overwritten.
    pub fn new(name: &str, inputs: usize, outputs: usize, device: &Device) -> Result<PcaWhitening> {
        Ok(PcaWhitening {
            weight: Parameter::new(
                format!("{name}.weight"),
                Tensor::zeros(&[outputs, 1, 1, inputs], DType::F32, device)?,
            ),
            bias: Parameter::new(
                format!("{name}.bias"),
                Tensor::zeros(&[outputs], DType::F32, device)?,
            ),
        })
    }

    pub fn inputs(&self) -> usize {
        self.weight.tensor().shape()[3]
    }

    pub fn outputs(&self) -> usize {
        self.weight.tensor().shape()[0]
    }

    /// `x` [N, I] -> `L2(x W^T + b)` [N, O], in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (o, i) = (self.outputs(), self.inputs());
        if x.rank() != 2 || x.shape()[1] != i {
            return shape_err!(
                "{}: input {:?} is not [N, {i}]",
                self.weight.name(),
                x.shape()
            );
        }
        let w = self.weight.tensor().reshape(&[o, i])?;
        let y = autocast_to_f32(x)?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?
            .add(&self.bias.tensor())?;
        l2_normalize(&y, -1)
    }
}

impl Module for PcaWhitening {
    fn parameters(&self) -> Vec<Parameter> {
        vec![self.weight.clone(), self.bias.clone()]
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        vec![
            StateEntry {
                slot: Slot::ConvWeight(self.weight.clone()),
                optional: false,
            },
            StateEntry {
                slot: Slot::Parameter(self.bias.clone()),
                optional: false,
            },
        ]
    }
}
