//! The deep-visual-geo-localization-benchmark's `GeoLocalizationNet` (Berton et al., CVPR 2022)
//! for inference: a ResNet-18/50/101 truncated at conv4 (`children()[:-3]`, up to layer3) or
//! conv5, or VGG16 `features[:-2]`, under `backbone.`, followed by one of its aggregations with
//! the official state-dict names:
//!
//! - `netvlad`: `aggregation.{centroids, conv.weight}`, descriptor K*D;
//! - `gem`: L2 over channels, GeM (`aggregation.1.p`), Flatten: the pooled vector is *not*
//!   normalised again, as in the benchmark;
//! - `gem_fc`: that, then Linear (`aggregation.1.{weight,bias}`, GeM at `aggregation.0.1.p`) and L2.
//!
//! Built from a converted file's metadata (`vpr.arch=benchmark`, `vpr.backbone`,
//! `vpr.backbone.truncate`, `vpr.aggregation`, `vpr.dim`, `vpr.gem.eps`, `vpr.netvlad.*`,
//! `vpr.input.*`) and widths read from the weight shapes; BatchNorms folded, frozen, no tape.

use super::resnet::{FoldedResNet, ResNet};
use super::vgg::Vgg16;
use super::{arch, InputSpec, ModelInfo, PlaceModel, Shapes, MAX_WIDTH};
use crate::autograd::no_grad;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::io::weights::WeightsFile;
use crate::nn::{flatten, l2_normalize, load_strict, GeM, Linear, Module, NetVlad, StateEntry};
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;
use std::path::Path;

/// A CNN backbone for inference (BatchNorm folded).
pub(crate) enum Cnn {
    ResNet(FoldedResNet),
    Vgg16(Vgg16),
}

impl Cnn {
    pub(crate) fn forward(&self, images: &Tensor) -> Result<Tensor> {
        match self {
            Cnn::ResNet(r) => r.forward(images),
            Cnn::Vgg16(v) => v.forward(images),
        }
    }
}

/// A CNN backbone as built, before the weights are loaded and the BatchNorms folded.
enum UnloadedCnn {
    ResNet(ResNet),
    Vgg16(Vgg16),
}

impl UnloadedCnn {
    /// `vpr.backbone` and `vpr.backbone.truncate` under `prefix`: ResNets at conv4 or conv5,
    /// VGG16 at conv5_3.
    fn from_file(
        file: &WeightsFile,
        prefix: &str,
        shapes: &Shapes,
        device: &Device,
    ) -> Result<Self> {
        let name = file.require("vpr.backbone")?;
        let truncate = file.require("vpr.backbone.truncate")?;
        Ok(match (name, truncate) {
            ("vgg16", "conv5_3") => UnloadedCnn::Vgg16(Vgg16::from_shapes(prefix, shapes, device)?),
            (resnet, "conv5" | "conv4") if resnet.starts_with("resnet") => {
                let depth = resnet["resnet".len()..]
                    .parse()
                    .map_err(|_| file.error(format!("vpr.backbone '{resnet}' is not a ResNet")))?;
                let layers = if truncate == "conv5" { 4 } else { 3 };
                let net = ResNet::from_shapes(prefix, depth, layers, shapes, device)
                    .map_err(|e| file.error(e.to_string()))?;
                UnloadedCnn::ResNet(net)
            }
            _ => {
                return Err(file.error(format!(
                    "backbone '{name}' truncated at '{truncate}' is not supported (resnet18/34/50/101/152 at conv5 or conv4, vgg16 at conv5_3)"
                )))
            }
        })
    }

    fn channels(&self) -> usize {
        match self {
            UnloadedCnn::ResNet(r) => r.channels(),
            UnloadedCnn::Vgg16(v) => v.channels(),
        }
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        match self {
            UnloadedCnn::ResNet(r) => r.state_entries(),
            UnloadedCnn::Vgg16(v) => v.state_entries(),
        }
    }

    /// Frozen, BatchNorms in evaluation mode and folded.
    fn into_inference(self) -> Result<Cnn> {
        let module: &dyn Module = match &self {
            UnloadedCnn::ResNet(r) => r,
            UnloadedCnn::Vgg16(v) => v,
        };
        for p in module.parameters() {
            p.set_trainable(false);
        }
        module.set_train(false);
        Ok(match self {
            UnloadedCnn::ResNet(r) => Cnn::ResNet(r.fold()?),
            UnloadedCnn::Vgg16(v) => Cnn::Vgg16(v),
        })
    }
}

/// A NetVLAD layer from `vpr.netvlad.*` and the weight shapes: `<name>.centroids` gives K; only
/// the cluster-major flatten of OpenIBL and the benchmark is supported.
pub(crate) fn netvlad_from_file(
    file: &WeightsFile,
    name: &str,
    channels: usize,
    shapes: &Shapes,
    device: &Device,
) -> Result<NetVlad> {
    let flatten = file.require("vpr.netvlad.flatten")?;
    if flatten != "cluster-major" {
        return Err(file.error(format!(
            "vpr.netvlad.flatten '{flatten}' is not supported (cluster-major, as OpenIBL and the benchmark flatten)"
        )));
    }
    let normalize_input = match file.require("vpr.netvlad.normalize_input")? {
        "true" => true,
        "false" => false,
        other => {
            return Err(file.error(format!(
                "vpr.netvlad.normalize_input '{other}' is not true or false"
            )))
        }
    };
    let clusters = shapes.dim(&format!("{name}.centroids"), 0);
    if clusters * channels > MAX_WIDTH {
        return Err(file.error(format!(
            "NetVLAD of {clusters} clusters of {channels} channels is larger than {MAX_WIDTH}"
        )));
    }
    NetVlad::new(name, clusters, channels, normalize_input, device)
}

/// `vpr.dim` against the size the weights give.
pub(crate) fn check_dim(file: &WeightsFile, dim: usize) -> Result<()> {
    let stated: usize = file.require_parsed("vpr.dim")?;
    if stated != dim {
        return Err(file.error(format!(
            "vpr.dim {stated} does not match the weights, which give {dim}"
        )));
    }
    Ok(())
}

enum Head {
    NetVlad(NetVlad),
    Gem(GeM),
    GemFc(GeM, Linear),
}

impl Head {
    fn state_entries(&self) -> Vec<StateEntry> {
        match self {
            Head::NetVlad(v) => v.state_entries(),
            Head::Gem(g) => g.state_entries(),
            Head::GemFc(g, fc) => {
                let mut e = g.state_entries();
                e.extend(fc.state_entries());
                e
            }
        }
    }

    fn forward(&self, features: &Tensor) -> Result<Tensor> {
        match self {
            Head::NetVlad(v) => v.forward(features),
            Head::Gem(gem) => gem_pool(gem, features),
            Head::GemFc(gem, fc) => {
                let pooled = gem_pool(gem, features)?;
                l2_normalize(&fc.forward(&pooled)?.to_dtype(DType::F32)?, -1)
            }
        }
    }

    fn parameters(&self) -> Vec<crate::autograd::Parameter> {
        match self {
            Head::NetVlad(v) => v.parameters(),
            Head::Gem(g) => g.parameters(),
            Head::GemFc(g, fc) => [g.parameters(), fc.parameters()].concat(),
        }
    }
}

/// L2 over channels, GeM, Flatten (the benchmark's default `--l2 before_pool`).
fn gem_pool(gem: &GeM, features: &Tensor) -> Result<Tensor> {
    let x = l2_normalize(&autocast_to_f32(features)?, -1)?;
    flatten(&gem.forward(&x)?)
}

/// A benchmark model for inference.
pub struct Benchmark {
    info: ModelInfo,
    backbone: Cnn,
    head: Head,
}

impl Benchmark {
    pub fn load(path: &Path, device: &Device) -> Result<Benchmark> {
        Benchmark::from_file(&WeightsFile::open(path)?, device)
    }

    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<Benchmark> {
        let system = arch(file)?;
        if system != "benchmark" {
            return Err(file.error(format!("vpr.arch is '{system}', not benchmark")));
        }
        let shapes = Shapes::new(file);
        let backbone = UnloadedCnn::from_file(file, "backbone.", &shapes, device)?;
        let channels = backbone.channels();
        let aggregation = file.require("vpr.aggregation")?;
        let (head, dim) = match aggregation {
            "netvlad" => {
                let v = netvlad_from_file(file, "aggregation", channels, &shapes, device)?;
                let dim = v.clusters() * v.dim();
                (Head::NetVlad(v), dim)
            }
            "gem" => {
                let eps = file.require_parsed("vpr.gem.eps")?;
                (
                    Head::Gem(GeM::new("aggregation.1.p", 3.0, eps, device)?),
                    channels,
                )
            }
            "gem_fc" => {
                let eps = file.require_parsed("vpr.gem.eps")?;
                let gem = GeM::new("aggregation.0.1.p", 3.0, eps, device)?;
                let out = shapes.dim("aggregation.1.weight", 0);
                let fc = Linear::new("aggregation.1", channels, out, true, 0, device)?;
                (Head::GemFc(gem, fc), out)
            }
            other => {
                return Err(file.error(format!(
                "vpr.aggregation '{other}' is not a benchmark aggregation (netvlad, gem, gem_fc)"
            )))
            }
        };
        let widths_known = shapes.finish()?;
        let mut entries = backbone.state_entries();
        entries.extend(head.state_entries());
        load_strict(&entries, file, widths_known)?;
        if widths_known {
            check_dim(file, dim)?;
        }
        for p in head.parameters() {
            p.set_trainable(false);
        }
        let name = file.require("vpr.backbone")?;
        let truncate = file.require("vpr.backbone.truncate")?;
        let backbone_name = match truncate {
            "conv4" | "conv5" => format!("{name}{truncate}"),
            _ => name.to_string(),
        };
        Ok(Benchmark {
            info: ModelInfo {
                description: format!("benchmark {backbone_name} {aggregation} -> {dim}"),
                dim,
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            backbone: backbone.into_inference()?,
            head,
        })
    }
}

impl PlaceModel for Benchmark {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        no_grad(|| self.head.forward(&self.backbone.forward(images)?))
    }
}
