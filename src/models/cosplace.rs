//! CosPlace (Berton et al., CVPR 2022) and EigenPlaces (ICCV 2023): one network, a truncated
//! ResNet or VGG16 backbone followed by the `gem_fc` head (L2 over channels, GeM, Flatten,
//! Linear, L2), with the official state-dict names (`backbone.*`, `aggregation.1.p`,
//! `aggregation.3.{weight,bias}`). Built from a converted file's metadata (`vpr.arch`,
//! `vpr.backbone`, `vpr.backbone.truncate`, `vpr.dim`, `vpr.aggregation`, `vpr.gem.eps`,
//! `vpr.input.*`) and widths read from its weight shapes.
//!
//! [`CosPlaceNet`] is the trainable network (real BatchNorm layers following the train/eval
//! mode, autograd through everything); [`CosPlaceNet::into_inference`] turns it into
//! [`CosPlace`], the [`PlaceModel`] that `extract` uses: BatchNorm folded, fused convolutions,
//! frozen parameters, run under `no_grad`.

use super::resnet::{FoldedResNet, ResNet};
use super::vgg::Vgg16;
use super::{arch, InputSpec, ModelInfo, PlaceModel, Shapes, MAX_WIDTH};
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::io::weights::{write_weights, WeightsFile};
use crate::nn::{flatten, l2_normalize, load_strict, Buffer, GeM, Linear, Module, StateEntry};
use crate::tape::autocast_to_f32;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::Path;

enum Backbone {
    ResNet(ResNet),
    Vgg16(Vgg16),
}

impl Backbone {
    fn module(&self) -> &dyn Module {
        match self {
            Backbone::ResNet(r) => r,
            Backbone::Vgg16(v) => v,
        }
    }
}

/// The trainable CosPlace / EigenPlaces network.
pub struct CosPlaceNet {
    info: ModelInfo,
    backbone: Backbone,
    pub gem: GeM,
    pub fc: Linear,
    /// The `__metadata__` of the file it was loaded from, written back by `save`.
    metadata: BTreeMap<String, String>,
}

impl CosPlaceNet {
    /// The network a converted file describes, its weights loaded strictly, on `device`, in
    /// evaluation mode, every parameter trainable.
    pub fn load(path: &Path, device: &Device) -> Result<CosPlaceNet> {
        CosPlaceNet::from_file(&WeightsFile::open(path)?, device)
    }

    /// [`CosPlaceNet::load`] from an open file.
    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<CosPlaceNet> {
        let system = arch(file)?;
        if !matches!(system, "cosplace" | "eigenplaces") {
            return Err(file.error(format!(
                "vpr.arch is '{system}', not cosplace or eigenplaces"
            )));
        }
        let aggregation = file.require("vpr.aggregation")?;
        if aggregation != "gem_fc" {
            return Err(file.error(format!(
                "vpr.aggregation '{aggregation}' is not gem_fc, the {system} head"
            )));
        }
        let name = file.require("vpr.backbone")?;
        let truncate = file.require("vpr.backbone.truncate")?;
        let dim: usize = file.require_parsed("vpr.dim")?;
        if dim == 0 || dim > MAX_WIDTH {
            return Err(file.error(format!(
                "vpr.dim {dim} is not a descriptor size (1 to {MAX_WIDTH})"
            )));
        }
        let shapes = Shapes::new(file);
        let backbone = match (name, truncate) {
            ("vgg16", "conv5_3") => Backbone::Vgg16(Vgg16::from_shapes("backbone.", &shapes, device)?),
            (resnet, "conv5" | "conv4") if resnet.starts_with("resnet") => {
                let depth = resnet["resnet".len()..]
                    .parse()
                    .map_err(|_| file.error(format!("vpr.backbone '{resnet}' is not a ResNet")))?;
                let layers = if truncate == "conv5" { 4 } else { 3 };
                let net = ResNet::from_shapes("backbone.", depth, layers, &shapes, device)
                    .map_err(|e| file.error(e.to_string()))?;
                Backbone::ResNet(net)
            }
            _ => {
                return Err(file.error(format!(
                    "backbone '{name}' truncated at '{truncate}' is not supported (resnet18/34/50/101/152 at conv5 or conv4, vgg16 at conv5_3)"
                )))
            }
        };
        let channels = match &backbone {
            Backbone::ResNet(r) => r.channels(),
            Backbone::Vgg16(v) => v.channels(),
        };
        let gem = GeM::new(
            "aggregation.1.p",
            3.0,
            file.require_parsed("vpr.gem.eps")?,
            device,
        )?;
        let fc = Linear::new("aggregation.3", channels, dim, true, 0, device)?;
        let widths_known = shapes.finish()?;
        let net = CosPlaceNet {
            info: ModelInfo {
                description: format!("{system} {name} -> {dim}"),
                dim,
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            backbone,
            gem,
            fc,
            metadata: file.metadata().clone(),
        };
        load_strict(&net.state_entries(), file, widths_known)?;
        Ok(net)
    }

    /// Descriptors `[N, dim]` (f32) of normalised images `[N, H, W, 3]`, through the BatchNorm
    /// layers in the current mode; records the tape when parameters train.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let features = match &self.backbone {
            Backbone::ResNet(r) => r.forward(images)?,
            Backbone::Vgg16(v) => v.forward(images)?,
        };
        head(&self.gem, &self.fc, &features)
    }

    /// CosPlace's (and EigenPlaces') freezing: ResNet conv1, bn1, layer1 and layer2; VGG16 all
    /// but the last three convolutions. Frozen BatchNorms still follow the train/eval mode (as
    /// in the official training, where `model.train()` reaches them).
    pub fn freeze_cosplace(&self) {
        match &self.backbone {
            Backbone::ResNet(r) => r.freeze_cosplace(),
            Backbone::Vgg16(v) => v.freeze_cosplace(),
        }
    }

    /// Writes the network as the converted file it was loaded from (official names and layouts,
    /// BatchNorm running statistics and counters, the same metadata), so that [`super::load`]
    /// and `--weights` read a trained model back.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors = no_grad(|| {
            self.state_entries()
                .iter()
                .map(|e| Ok((e.name().to_string(), e.file_value()?)))
                .collect::<Result<Vec<_>>>()
        })?;
        write_weights(path, &tensors, &self.metadata)
    }

    /// `cosplace resnet50 -> 2048`.
    pub fn describe(&self) -> String {
        self.info.description.clone()
    }

    pub fn dim(&self) -> usize {
        self.info.dim
    }

    pub fn input(&self) -> &InputSpec {
        &self.info.input
    }

    /// The inference model: every parameter frozen, BatchNorms (in evaluation mode) folded into
    /// their convolutions.
    pub fn into_inference(self) -> Result<CosPlace> {
        for p in self.parameters() {
            p.set_trainable(false);
        }
        self.set_train(false);
        let backbone = match self.backbone {
            Backbone::ResNet(r) => InferenceBackbone::ResNet(r.fold()?),
            Backbone::Vgg16(v) => InferenceBackbone::Vgg16(v),
        };
        Ok(CosPlace {
            info: self.info,
            backbone,
            gem: self.gem,
            fc: self.fc,
        })
    }
}

impl Module for CosPlaceNet {
    fn parameters(&self) -> Vec<Parameter> {
        let mut p = self.backbone.module().parameters();
        p.extend(self.gem.parameters());
        p.extend(self.fc.parameters());
        p
    }

    fn buffers(&self) -> Vec<Buffer> {
        self.backbone.module().buffers()
    }

    fn state_entries(&self) -> Vec<StateEntry> {
        let mut e = self.backbone.module().state_entries();
        e.extend(self.gem.state_entries());
        e.extend(self.fc.state_entries());
        e
    }

    fn set_train(&self, train: bool) {
        self.backbone.module().set_train(train);
    }
}

/// L2 over channels, GeM, Flatten, Linear, L2; in f32.
fn head(gem: &GeM, fc: &Linear, features: &Tensor) -> Result<Tensor> {
    let x = l2_normalize(&autocast_to_f32(features)?, -1)?;
    let pooled = flatten(&gem.forward(&x)?)?;
    l2_normalize(&fc.forward(&pooled)?.to_dtype(DType::F32)?, -1)
}

enum InferenceBackbone {
    ResNet(FoldedResNet),
    Vgg16(Vgg16),
}

/// CosPlace / EigenPlaces for inference (see [`CosPlaceNet::into_inference`]).
pub struct CosPlace {
    info: ModelInfo,
    backbone: InferenceBackbone,
    gem: GeM,
    fc: Linear,
}

impl PlaceModel for CosPlace {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        no_grad(|| {
            let features = match &self.backbone {
                InferenceBackbone::ResNet(r) => r.forward(images)?,
                InferenceBackbone::Vgg16(v) => v.forward(images)?,
            };
            head(&self.gem, &self.fc, &features)
        })
    }
}
