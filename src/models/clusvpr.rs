//! ClusVPR (Xu et al.): OpenIBL's VGG16 `EmbedNet` whose `net_vlad` is the `ClusVPR` layer: four
//! CWTNet blocks on the conv5_3 map, then the grouped VLAD with a per-location GeM attention
//! ([`GroupedVlad`]). Built from a converted file's metadata (`vpr.arch=clusvpr`,
//! `vpr.clusvpr.*`, `vpr.input.*`) with widths read from its weight shapes; state names are the
//! official ones (`base_model.base.N`, `net_vlad.*`). No trained weights are published.
//!
//! # The network
//!
//! A CWTNet block splits the D channels of the map `x` into a local half `l` and a global half
//! `g` and returns `cat(relu(bn(dw_l(l) + dw_g(g))), relu(bn(dw_lg(l) + cwt(g))))`, where the
//! `dw_*` are depthwise 3x3 convolutions without bias (`local_dwconvl`, `global_dwconv`,
//! `local_dwconvg`) and `bn` is `local_bn` for both halves. `cwt(g) = g + point_conv(up(T(pool(g))))`:
//! a 2x2 average pool, a 1x1 embedding with bias, a zero-initialised class token prepended (no
//! position embedding), transformer layers without LayerNorm (`x + attn(x)`, then `x + mlp(x)`,
//! MLP with exact GELU), the class token dropped, a depthwise 2x2 stride-2 transposed convolution
//! `up` (no bias) and a 1x1 `point_conv` (no bias).
//!
//! The attention is multi-head scaled dot-product attention whose values are re-weighted by the
//! token density around each token. With `t_i` the layer's input tokens (class token included)
//! and `k = 11` (the released `Attention.k = 10` plus the token itself):
//!
//! ```text
//! density_i = sum of the k smallest |t_i - t_j|^2 over all tokens j (j = i included)
//! d_i       = (density_i - min density) / (max density - min density)
//! rho_i     = exp(-d_i / (k - 1))
//! w_i       = (1 - rho_i) / sum_j (1 - rho_j), then min-max normalised like d
//! v_i      <- v_i * (0.5 + w_i)
//! ```
//!
//! so tokens in sparse regions (far from their neighbours) get up to 1.5 times their value and
//! the densest 0.5 times. The weights carry no gradient: KNN_CUDA, which the released code uses,
//! computes its distances under `torch.no_grad`. The squared distances are faiss's
//! `|a|^2 + |b|^2 - 2 a.b` (one GEMM and the `knn` op's top-k merge) rather than summed
//! differences; the CWT's depthwise transposed convolution, whose 2x2 windows do not overlap, is
//! a broadcast product and a reshape, since `conv_transpose2d` has no groups.
//!
//! # Where the released code cannot run, and the reading chosen
//!
//! - `ClusVPR.__init__` reads `self.H * self.W` (the GeM exponent's length) before it assigns
//!   `H = 30, W = 40`, so the class cannot be instantiated. We read it as intended: the exponent
//!   has one entry per location of the 30x40 conv5_3 map. The converter recovers the map from the
//!   exponent's length, taking it to be 3:4 like the 480x640 images (1200 -> 30x40), and sets the
//!   input rule to `resize:480x640` (16 times the map), OpenIBL's test size.
//! - At evaluation the released forward resizes any other map to 30x40 before the CWTNet blocks
//!   and back after them, but the grouped VLAD that follows still needs exactly 1200 locations,
//!   so no other map size works there either. We resize the images instead (the input rule), and
//!   a map of another size is an error naming the expected image size.
//! - In training mode the region path feeds 10x10 patches into that 1200-long GeM exponent (a
//!   broadcast error), and the CWT's in-place `x += ...` on a view of its input breaks backward in
//!   current PyTorch. Only inference is built here: the in-place add is read as the plain sum it
//!   computes, and `ClusVpr::forward` keeps autograd (evaluation-mode BatchNorm) for tests of the
//!   gradients, not for the regional training.
//! - The package's `utils/data/__init__.py` lacks exports that training imports, and the
//!   clustering script writes 512-d centres while the layer has 128-d ones (its group width).
//!   Neither touches inference; centres come from the checkpoint.
//! - `global_bn` is constructed but never used (both branches go through `local_bn`, as the
//!   released forward does); its tensors are loaded so the state dict loads strictly, and
//!   unused.
//! - The constructor's `alpha`, `clsts` and `traindescs` only initialise training.
//! - Heads (2), k (11) and the pool/upsampling factor (2) are not in the weights: the converter
//!   writes the released configuration (`configs.get_vgg`) as metadata.
//! - OpenIBL's 0-255 input normalisation applies (mean-subtracted, std 1/255), as for OpenIBL's
//!   NetVLAD, although the backbone is torchvision's ImageNet VGG16.
//! - ClusVPR evaluates with OpenIBL's PCA-whitening to 4096-d (`--reduction`); that layer is
//!   fitted separately and is not part of this model: descriptors are the 8192-d VLAD.

use super::vgg::Vgg16;
use super::{arch, InputSize, InputSpec, ModelInfo, PlaceModel, Shapes, MAX_WIDTH};
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::io::weights::WeightsFile;
use crate::nn::{
    load_strict, BatchNorm2d, Conv2d, GroupedVlad, GroupedVladShape, Linear, Module, Slot,
    StateEntry,
};
use crate::ops::conv::Conv2dOptions;
use crate::ops::knn::Neighbours;
use crate::tensor::Tensor;

/// One transformer layer of a CWT: attention with density-weighted values, then the MLP.
struct CwtLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl CwtLayer {
    fn new(prefix: &str, dim: usize, hidden: usize, device: &Device) -> Result<CwtLayer> {
        let linear = |name: &str, i, o, seed| {
            Linear::new(&format!("{prefix}.{name}"), i, o, true, seed, device)
        };
        Ok(CwtLayer {
            query: linear("attn.query", dim, dim, 1)?,
            key: linear("attn.key", dim, dim, 2)?,
            value: linear("attn.value", dim, dim, 3)?,
            out: linear("attn.out", dim, dim, 4)?,
            fc1: linear("ffn.fc1", dim, hidden, 5)?,
            fc2: linear("ffn.fc2", hidden, dim, 6)?,
        })
    }

    /// `x` [N, T, C] -> [N, T, C].
    fn forward(&self, x: &Tensor, heads: usize, knn: usize) -> Result<Tensor> {
        let &[n, t, c] = x.shape() else {
            return shape_err!("CWT tokens {:?} are not [N, T, C]", x.shape());
        };
        let dh = c / heads;
        let split = |y: Tensor| y.reshape(&[n, t, heads, dh])?.transpose(1, 2);
        let weight = no_grad(|| density_weights(&x.detach(), knn))?;
        let v = self.value.forward(x)?.mul(&weight.unsqueeze(2)?)?;
        let attended = split(self.query.forward(x)?)?.attention(
            &split(self.key.forward(x)?)?,
            &split(v)?,
            1.0 / (dh as f64).sqrt(),
        )?;
        let merged = attended.transpose(1, 2)?.reshape(&[n, t, c])?;
        let x = x.add(&self.out.forward(&merged)?)?;
        x.add(&self.fc2.forward(&self.fc1.forward(&x)?.gelu()?)?)
    }

    fn linears(&self) -> [&Linear; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.out,
            &self.fc1,
            &self.fc2,
        ]
    }
}

/// `density_i`: the sum of the squared distances from each token to its `k` nearest tokens
/// (itself included), `tokens` [N, T, C] -> [N, T] (f32). Records nothing.
pub fn knn_density(tokens: &Tensor, k: usize) -> Result<Tensor> {
    let &[n, t, c] = tokens.shape() else {
        return shape_err!("kNN density: tokens {:?} are not [N, T, C]", tokens.shape());
    };
    if k > t {
        return shape_err!("kNN density: {k} neighbours among {t} tokens");
    }
    no_grad(|| {
        let tokens = tokens.to_dtype(DType::F32)?.contiguous()?;
        let mut rows = Vec::with_capacity(n);
        for i in 0..n {
            let x = tokens.narrow(0, i, 1)?.reshape(&[t, c])?;
            let norms = x.sum_sq(1, false)?;
            let lists = Neighbours::empty(t, k, x.device())?.merge_chunk(
                &x.matmul(&x.t()?)?,
                &norms,
                &norms,
            )?;
            rows.push(lists.distances.sum(1, true)?.reshape(&[1, t])?);
        }
        Tensor::cat(&rows.iter().collect::<Vec<_>>(), 0)
    })
}

/// `(x - min) / (max - min)` along the last axis of [N, T].
fn min_max(x: &Tensor) -> Result<Tensor> {
    let lo = x.min(-1, true)?;
    x.sub(&lo)?.div(&x.max(-1, true)?.sub(&lo)?)
}

/// The value weights `0.5 + w` [N, T] of the module header's formula.
fn density_weights(tokens: &Tensor, k: usize) -> Result<Tensor> {
    let d = min_max(&knn_density(tokens, k)?)?;
    let sparse = d
        .mul_scalar(-1.0 / (k as f64 - 1.0))?
        .exp()?
        .affine(-1.0, 1.0)?;
    min_max(&sparse.div(&sparse.sum(-1, true)?)?)?.add_scalar(0.5)
}

/// The clustering-weighted transformer on one branch (`global_cwt`).
struct Cwt {
    embed: Conv2d,
    cls: Parameter,
    layers: Vec<CwtLayer>,
    /// `[C, 2, 2, 1]`: the file's depthwise `[C, 1, 2, 2]` through `Slot::ConvWeight`.
    transpose: Parameter,
    point: Conv2d,
}

impl Cwt {
    /// `g` [N, H, W, C] (H, W even) -> `g` plus the transformer's upsampled output.
    fn forward(&self, g: &Tensor, heads: usize, knn: usize) -> Result<Tensor> {
        let &[n, h, w, c] = g.shape() else {
            return shape_err!("CWT input {:?} is not [N, H, W, C]", g.shape());
        };
        let (ph, pw) = (h / 2, w / 2);
        let pooled = g
            .reshape(&[n, ph, 2, pw, 2, c])?
            .mean(4, false)?
            .mean(2, false)?;
        let embedded = self.embed.forward(&pooled)?.reshape(&[n, ph * pw, c])?;
        let cls = self.cls.tensor().broadcast_to(&[n, 1, c])?;
        let mut tokens = Tensor::cat(&[&cls, &embedded], 1)?;
        for layer in &self.layers {
            tokens = layer.forward(&tokens, heads, knn)?;
        }
        let grid = tokens
            .narrow(1, 1, ph * pw)?
            .contiguous()?
            .reshape(&[n, ph, 1, pw, 1, c])?;
        // out[2i + a, 2j + b, c] = grid[i, j, c] * kernel[c, a, b]: windows do not overlap.
        let kernel = self
            .transpose
            .tensor()
            .reshape(&[c, 4])?
            .t()?
            .reshape(&[2, 1, 2, c])?;
        let up = grid.mul(&kernel)?.reshape(&[n, h, w, c])?;
        g.add(&self.point.forward(&up)?)
    }
}

/// One CWTNet block of `vit_layer`.
struct CwtNet {
    local_l: Conv2d,
    local_g: Conv2d,
    global: Conv2d,
    cwt: Cwt,
    local_bn: BatchNorm2d,
    /// Loaded, never used: the released forward normalises both branches with `local_bn`.
    global_bn: BatchNorm2d,
}

impl CwtNet {
    fn new(
        prefix: &str,
        branch: usize,
        layers: usize,
        mlp: usize,
        device: &Device,
    ) -> Result<CwtNet> {
        let depthwise = |name: &str| {
            let options = Conv2dOptions::new().padding(1).groups(branch);
            Conv2d::new(
                &format!("{prefix}.{name}"),
                branch,
                branch,
                3,
                options,
                false,
                device,
            )
        };
        let t = format!("{prefix}.global_cwt.transformer");
        let cwt = Cwt {
            embed: Conv2d::new(
                &format!("{t}.embeddings.patch_embeddings"),
                branch,
                branch,
                1,
                Conv2dOptions::new(),
                true,
                device,
            )?,
            cls: Parameter::new(
                format!("{t}.embeddings.cls_token"),
                Tensor::zeros(&[1, 1, branch], DType::F32, device)?,
            ),
            layers: (0..layers)
                .map(|i| CwtLayer::new(&format!("{t}.encoder.layer.{i}"), branch, mlp, device))
                .collect::<Result<_>>()?,
            transpose: Parameter::new(
                format!("{prefix}.global_cwt.transpose.weight"),
                Tensor::rand_uniform(&[branch, 2, 2, 1], -0.5, 0.5, 7, DType::F32, device)?,
            ),
            point: Conv2d::new(
                &format!("{prefix}.global_cwt.point_conv"),
                branch,
                branch,
                1,
                Conv2dOptions::new(),
                false,
                device,
            )?,
        };
        Ok(CwtNet {
            local_l: depthwise("local_dwconvl")?,
            local_g: depthwise("local_dwconvg")?,
            global: depthwise("global_dwconv")?,
            cwt,
            local_bn: BatchNorm2d::new(&format!("{prefix}.local_bn"), branch, device)?,
            global_bn: BatchNorm2d::new(&format!("{prefix}.global_bn"), branch, device)?,
        })
    }

    /// `x` [N, H, W, D] -> [N, H, W, D].
    fn forward(&self, x: &Tensor, heads: usize, knn: usize) -> Result<Tensor> {
        let b = x.shape()[3] / 2;
        let local = x.narrow(3, 0, b)?.contiguous()?;
        let global = x.narrow(3, b, b)?.contiguous()?;
        let local_out = self
            .local_l
            .forward(&local)?
            .add(&self.global.forward(&global)?)?;
        let global_out = self
            .local_g
            .forward(&local)?
            .add(&self.cwt.forward(&global, heads, knn)?)?;
        let local_out = self.local_bn.forward(&local_out)?.relu()?;
        let global_out = self.local_bn.forward(&global_out)?.relu()?;
        Tensor::cat(&[&local_out, &global_out], 3)
    }

    fn convs(&self) -> [&Conv2d; 5] {
        [
            &self.local_l,
            &self.local_g,
            &self.global,
            &self.cwt.embed,
            &self.cwt.point,
        ]
    }
}

impl Module for CwtNet {
    fn parameters(&self) -> Vec<Parameter> {
        let mut p: Vec<Parameter> = self.convs().iter().flat_map(|c| c.parameters()).collect();
        p.push(self.cwt.cls.clone());
        p.push(self.cwt.transpose.clone());
        for layer in &self.cwt.layers {
            p.extend(layer.linears().iter().flat_map(|l| l.parameters()));
        }
        p.extend(self.local_bn.parameters());
        p.extend(self.global_bn.parameters());
        p
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut e: Vec<StateEntry> = self
            .convs()
            .iter()
            .flat_map(|c| c.state_entries())
            .collect();
        let plain = |slot| StateEntry {
            slot,
            optional: false,
        };
        e.push(plain(Slot::Parameter(self.cwt.cls.clone())));
        e.push(plain(Slot::ConvWeight(self.cwt.transpose.clone())));
        for layer in &self.cwt.layers {
            e.extend(layer.linears().iter().flat_map(|l| l.state_entries()));
        }
        e.extend(self.local_bn.state_entries());
        e.extend(self.global_bn.state_entries());
        e
    }
}

/// The ClusVPR network: VGG16, CWTNet blocks, grouped VLAD.
pub struct ClusVpr {
    info: ModelInfo,
    backbone: Vgg16,
    blocks: Vec<CwtNet>,
    pub vlad: GroupedVlad,
    heads: usize,
    knn: usize,
    map: (usize, usize),
}

/// Features at each stage of [`ClusVpr::forward`].
pub struct ClusVprOutput {
    /// conv5_3 before its ReLU, [N, H, W, D].
    pub backbone: Tensor,
    /// After the CWTNet blocks, [N, H, W, D].
    pub cwt: Tensor,
    /// [N, K * g].
    pub descriptors: Tensor,
}

impl ClusVpr {
    /// The network a converted file describes, its weights loaded strictly, on `device`, in
    /// evaluation mode, every parameter trainable.
    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<ClusVpr> {
        let system = arch(file)?;
        if system != "clusvpr" {
            return Err(file.error(format!("vpr.arch is '{system}', not clusvpr")));
        }
        let aggregation = file.require("vpr.aggregation")?;
        if aggregation != "grouped_vlad" {
            return Err(file.error(format!(
                "vpr.aggregation '{aggregation}' is not grouped_vlad, the ClusVPR layer"
            )));
        }
        let parsed = |key: &str| -> Result<usize> { file.require_parsed(key) };
        let map_text = file.require("vpr.clusvpr.map")?;
        let map = map_text
            .split_once('x')
            .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)))
            .filter(|&(h, w): &(usize, usize)| h > 0 && w > 0 && h % 2 == 0 && w % 2 == 0)
            .ok_or_else(|| {
                file.error(format!(
                    "vpr.clusvpr.map '{map_text}' is not HxW with even sides"
                ))
            })?;
        let (blocks, layers, heads, knn) = (
            parsed("vpr.clusvpr.blocks")?,
            parsed("vpr.clusvpr.cwt.layers")?,
            parsed("vpr.clusvpr.cwt.heads")?,
            parsed("vpr.clusvpr.cwt.knn")?,
        );
        let groups = parsed("vpr.clusvpr.groups")?;
        if blocks > 64 || layers > 64 || knn == 0 || groups == 0 || groups > MAX_WIDTH {
            return Err(file.error(format!(
                "{blocks} CWTNet blocks of {layers} layers, k = {knn}, {groups} groups is not a ClusVPR"
            )));
        }
        let shapes = Shapes::new(file);
        let backbone = Vgg16::from_shapes("base_model.base.", &shapes, device)?;
        let dim = backbone.channels();
        let branch = dim / 2;
        let mlp = shapes.dim(
            "net_vlad.vit_layer.0.global_cwt.transformer.encoder.layer.0.ffn.fc1.weight",
            0,
        );
        if heads == 0 || branch == 0 || branch % heads != 0 {
            return Err(file.error(format!(
                "a CWT of width {branch} does not split into {heads} heads"
            )));
        }
        let blocks = (0..blocks)
            .map(|i| {
                CwtNet::new(
                    &format!("net_vlad.vit_layer.{i}"),
                    branch,
                    layers,
                    mlp,
                    device,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shape = GroupedVladShape {
            dim,
            expanded: shapes.dim("net_vlad.linear1.weight", 0),
            groups,
            clusters: shapes.dim("net_vlad.centroids", 0),
            locations: map.0 * map.1,
        };
        let vlad = GroupedVlad::new(
            "net_vlad",
            shape,
            file.require_parsed("vpr.clusvpr.gem.eps")?,
            device,
        )
        .map_err(|e| file.error(e.to_string()))?;
        let widths_known = shapes.finish()?;
        let net = ClusVpr {
            info: ModelInfo {
                description: format!(
                    "clusvpr vgg16 + {} CWTNet blocks -> {}",
                    blocks.len(),
                    vlad.dim()
                ),
                dim: vlad.dim(),
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            backbone,
            blocks,
            vlad,
            heads,
            knn,
            map,
        };
        load_strict(&net.state_entries(), file, widths_known)?;
        Ok(net)
    }

    /// Normalised images [N, H, W, 3] -> every stage's features; records the tape for trainable
    /// parameters (BatchNorm in evaluation mode; the density weights are constants).
    pub fn forward(&self, images: &Tensor) -> Result<ClusVprOutput> {
        let backbone = self.backbone.forward(images)?;
        let (h, w) = (backbone.shape()[1], backbone.shape()[2]);
        if (h, w) != self.map {
            let (mh, mw) = self.map;
            let hint = match self.info.input.size {
                InputSize::Resize { height, width } => {
                    format!(" (images resized to {height}x{width})")
                }
                _ => String::new(),
            };
            return Err(Error::Shape(format!(
                "{}: images {:?} give a {h}x{w} map, but the model takes {mh}x{mw}{hint}",
                self.info.description,
                images.shape()
            )));
        }
        let mut cwt = backbone.clone();
        for block in &self.blocks {
            cwt = block.forward(&cwt, self.heads, self.knn)?;
        }
        let descriptors = self.vlad.descriptor(&cwt)?;
        Ok(ClusVprOutput {
            backbone,
            cwt,
            descriptors,
        })
    }
}

impl Module for ClusVpr {
    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.backbone.parameters();
        p.extend(self.blocks.iter().flat_map(Module::parameters));
        p.extend(self.vlad.parameters());
        p
    }

    fn buffers(&self) -> Vec<crate::nn::Buffer> {
        self.blocks
            .iter()
            .flat_map(|b| [b.local_bn.buffers(), b.global_bn.buffers()].concat())
            .collect()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut e = self.backbone.state_entries();
        e.extend(self.blocks.iter().flat_map(Module::state_entries));
        e.extend(self.vlad.state_entries());
        e
    }
}

impl PlaceModel for ClusVpr {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        no_grad(|| Ok(self.forward(images)?.descriptors))
    }
}
