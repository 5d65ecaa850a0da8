//! ClusVPR's grouped VLAD layer (the `ClusVPR` module's aggregation, "OptLAD" in the paper's
//! terms), composed of ops so autograd and every device come for free:
//!
//! 1. `x` [N, H, W, D] is L2-normalised over channels at each location and expanded by
//!    `linear1` (no bias) to `E = expansion * D` channels, split into `G` groups of `g = E / G`;
//! 2. each (group, location) gets an attention `a = sigmoid(GeM)`, a generalised mean over the
//!    group's `g` channels, `(mean_c clamp(y_c, eps)^p_l)^(1 / p_l)`, with one learnable exponent
//!    `p_l` per location (so the layer only takes maps of exactly `L = H * W` locations);
//! 3. the soft assignment `s = softmax_k(y W^T)` over `K` clusters (`conv.weight`, a 1x1
//!    convolution without bias shared by the groups);
//! 4. `V[k] = sum over groups and locations of s_k a (y - c_k)`, computed as one batched GEMM
//!    of the weights `s a` with the group vectors minus `c_k` times the weights' sum (no
//!    per-cluster loop).
//!
//! [`GroupedVlad::descriptor`] finishes as OpenIBL's EmbedNet does: intra-normalisation per
//! cluster, cluster-major flatten, global L2. State names are the `ClusVPR` module's:
//! `{prefix}.linear1.weight` [E, D], `{prefix}.GeM_pool.p` [L], `{prefix}.conv.weight`
//! [K, g, 1, 1], `{prefix}.centroids` [K, g].

use super::state::{Slot, StateEntry};
use super::{l2_normalize, Module};
use crate::autograd::Parameter;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;

/// The shape of a grouped VLAD layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupedVladShape {
    /// Input channels D.
    pub dim: usize,
    /// Expanded channels E = expansion * D.
    pub expanded: usize,
    /// Groups G; the group width is E / G.
    pub groups: usize,
    /// Clusters K.
    pub clusters: usize,
    /// Locations L = H * W of the maps it takes (the GeM exponent's length).
    pub locations: usize,
}

pub struct GroupedVlad {
    /// `[E, D]`.
    pub linear1: Parameter,
    /// The per-location GeM exponent `[L]` (initialised to 3).
    pub p: Parameter,
    /// The soft-assignment weight, OHWI `[K, 1, 1, g]` (the file's `[K, g, 1, 1]`).
    pub assign: Parameter,
    /// `[K, g]`.
    pub centroids: Parameter,
    pub shape: GroupedVladShape,
    /// The GeM clamp (1e-6 in ClusVPR).
    pub eps: f64,
}

impl GroupedVlad {
    /// A layer with ClusVPR's initial exponent (3) and deterministic random other weights,
    /// named under `prefix` (`net_vlad`).
    pub fn new(prefix: &str, shape: GroupedVladShape, eps: f64, device: &Device) -> Result<Self> {
        let GroupedVladShape {
            dim,
            expanded,
            groups,
            clusters,
            locations,
        } = shape;
        if dim == 0 || groups == 0 || clusters == 0 || locations == 0 || expanded % groups != 0 {
            return shape_err!("{prefix}: grouped VLAD {shape:?} is not buildable");
        }
        let g = expanded / groups;
        let bound = 1.0 / (dim as f64).sqrt();
        let uniform = |shape: &[usize], bound: f64, seed: u64| {
            Tensor::rand_uniform(shape, -bound, bound, seed, DType::F32, device)
        };
        Ok(GroupedVlad {
            linear1: Parameter::new(
                format!("{prefix}.linear1.weight"),
                uniform(&[expanded, dim], bound, 1)?,
            ),
            p: Parameter::new(
                format!("{prefix}.GeM_pool.p"),
                Tensor::full(&[locations], 3.0, DType::F32, device)?,
            ),
            assign: Parameter::new(
                format!("{prefix}.conv.weight"),
                uniform(&[clusters, 1, 1, g], 1.0 / (g as f64).sqrt(), 2)?,
            ),
            centroids: Parameter::new(
                format!("{prefix}.centroids"),
                Tensor::rand_uniform(&[clusters, g], 0.0, 1.0, 3, DType::F32, device)?,
            ),
            shape,
            eps,
        })
    }

    /// The group width g = E / G.
    pub fn group_dim(&self) -> usize {
        self.shape.expanded / self.shape.groups
    }

    /// The descriptor size K * g.
    pub fn dim(&self) -> usize {
        self.shape.clusters * self.group_dim()
    }

    /// `x` [N, H, W, D] (H * W = L) -> the unnormalised VLAD `[N, K, g]`, in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let g = self.group_dim();
        let &[n, h, w, d] = x.shape() else {
            return shape_err!(
                "{}: input {:?} is not [N, H, W, C]",
                self.p.name(),
                x.shape()
            );
        };
        if d != s.dim || h * w != s.locations {
            return shape_err!(
                "{}: input {:?} is not a map of {} locations with {} channels",
                self.p.name(),
                x.shape(),
                s.locations,
                s.dim
            );
        }
        let l = s.locations;
        let x = l2_normalize(&autocast_to_f32(x)?.reshape(&[n, l, d])?, -1)?;
        // [N, L, G, g]: the expanded channels of a location, group-major as PyTorch's view.
        let y = x
            .matmul(&self.linear1.tensor().t()?)?
            .reshape(&[n, l, s.groups, g])?;

        // GeM over each group's channels, one exponent per location.
        let p = self.p.tensor().reshape(&[1, l, 1, 1])?;
        let gem = y
            .clamp(self.eps, f64::INFINITY)?
            .pow(&p)?
            .mean(-1, true)?
            .pow(&p.powf(-1.0)?)?;
        let attention = gem.sigmoid()?; // [N, L, G, 1]

        let assign = self.assign.tensor().reshape(&[s.clusters, g])?;
        let soft = y.matmul(&assign.t()?)?.softmax(-1)?; // [N, L, G, K]
        let weights = soft
            .mul(&attention)?
            .reshape(&[n, l * s.groups, s.clusters])?;
        // sum_{l,g} w (y - c_k) = w^T y - c_k sum_{l,g} w
        let wt = weights.transpose(1, 2)?; // [N, K, L*G]
        let pooled = wt.matmul(&y.reshape(&[n, l * s.groups, g])?)?;
        let mass = wt.sum(-1, true)?; // [N, K, 1]
        pooled.sub(&mass.mul(&self.centroids.tensor().unsqueeze(0)?)?)
    }

    /// `x` [N, H, W, D] -> `[N, K * g]`: intra-normalised per cluster, flattened cluster-major,
    /// L2-normalised.
    pub fn descriptor(&self, x: &Tensor) -> Result<Tensor> {
        let vlad = l2_normalize(&self.forward(x)?, -1)?;
        let n = vlad.shape()[0];
        l2_normalize(&vlad.reshape(&[n, self.dim()])?, -1)
    }
}

impl Module for GroupedVlad {
    fn parameters(&self) -> Vec<Parameter> {
        vec![
            self.linear1.clone(),
            self.p.clone(),
            self.assign.clone(),
            self.centroids.clone(),
        ]
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        [
            Slot::Parameter(self.linear1.clone()),
            Slot::Parameter(self.p.clone()),
            Slot::ConvWeight(self.assign.clone()),
            Slot::Parameter(self.centroids.clone()),
        ]
        .into_iter()
        .map(|slot| StateEntry {
            slot,
            optional: false,
        })
        .collect()
    }
}
