//! OpenIBL's NetVLAD models (Ge et al., SFRS, ECCV 2020; also its NetVLAD and SARE baselines) for
//! inference: VGG16 `features[:-2]` under `base_model.base.` (conv5_3 before its ReLU, stride 16),
//! NetVLAD under `net_vlad.` (`EmbedNet`: intra-normalisation, cluster-major flatten, L2;
//! 32768-d), and for `EmbedNetPCA` (the torch.hub `vgg16_netvlad` model, trained by SFRS) the
//! PCA-whitening layer `pca_layer.{weight,bias}` and a last L2 (4096-d).
//!
//! OpenIBL feeds the network 0-255 RGB minus the MatConvNet means; the converter writes that as
//! `vpr.input.mean` with `vpr.input.std` = 1/255, so images go through the usual ToTensor and
//! Normalize. Built from `vpr.arch=netvlad`, `vpr.aggregation` (`netvlad` or `netvlad_pca`),
//! `vpr.netvlad.*`, `vpr.dim` and the weight shapes.

use super::benchmark::{check_dim, netvlad_from_file};
use super::vgg::Vgg16;
use super::{arch, InputSpec, ModelInfo, PlaceModel, Shapes};
use crate::autograd::no_grad;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::fit::PcaParams;
use crate::io::weights::{write_weights, WeightsFile};
use crate::nn::{load_strict, Module, NetVlad, PcaWhitening};
use crate::tensor::Tensor;
use std::path::Path;

pub struct OpenIbl {
    info: ModelInfo,
    backbone: Vgg16,
    vlad: NetVlad,
    pca: Option<PcaWhitening>,
}

impl OpenIbl {
    pub fn load(path: &Path, device: &Device) -> Result<OpenIbl> {
        OpenIbl::from_file(&WeightsFile::open(path)?, device)
    }

    pub fn from_file(file: &WeightsFile, device: &Device) -> Result<OpenIbl> {
        let system = arch(file)?;
        if system != "netvlad" {
            return Err(file.error(format!("vpr.arch is '{system}', not netvlad")));
        }
        let backbone_name = file.require("vpr.backbone")?;
        let truncate = file.require("vpr.backbone.truncate")?;
        if (backbone_name, truncate) != ("vgg16", "conv5_3") {
            return Err(file.error(format!(
                "OpenIBL's NetVLAD runs on vgg16 truncated at conv5_3, not '{backbone_name}' at '{truncate}'"
            )));
        }
        let shapes = Shapes::new(file);
        let backbone = Vgg16::from_shapes("base_model.base.", &shapes, device)?;
        let vlad = netvlad_from_file(file, "net_vlad", backbone.channels(), &shapes, device)?;
        let vlad_dim = vlad.clusters() * vlad.dim();
        let aggregation = file.require("vpr.aggregation")?;
        let pca = match aggregation {
            "netvlad" => None,
            "netvlad_pca" => {
                let outputs = shapes.dim("pca_layer.weight", 0);
                Some(PcaWhitening::new("pca_layer", vlad_dim, outputs, device)?)
            }
            other => {
                return Err(file.error(format!(
                    "vpr.aggregation '{other}' is not an OpenIBL aggregation (netvlad, netvlad_pca)"
                )))
            }
        };
        let dim = pca.as_ref().map_or(vlad_dim, PcaWhitening::outputs);
        let widths_known = shapes.finish()?;
        let mut entries = backbone.state_entries();
        entries.extend(vlad.state_entries());
        if let Some(p) = &pca {
            entries.extend(p.state_entries());
        }
        load_strict(&entries, file, widths_known)?;
        if widths_known {
            check_dim(file, dim)?;
        }
        let mut parameters = backbone.parameters();
        parameters.extend(vlad.parameters());
        parameters.extend(pca.iter().flat_map(Module::parameters));
        for p in parameters {
            p.set_trainable(false);
        }
        Ok(OpenIbl {
            info: ModelInfo {
                description: format!("netvlad vgg16 {aggregation} -> {dim}"),
                dim,
                input: InputSpec::from_file(file)?,
                device: device.clone(),
            },
            backbone,
            vlad,
            pca,
        })
    }
}

impl PlaceModel for OpenIbl {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        self.info.check_images(images)?;
        no_grad(|| {
            let vlad = self.vlad.forward(&self.backbone.forward(images)?)?;
            match &self.pca {
                Some(pca) => pca.forward(&vlad),
                None => Ok(vlad),
            }
        })
    }
}

/// Writes to `out` the OpenIBL model in `weights` (`EmbedNet`, `vpr.aggregation=netvlad`) with
/// the PCA-whitening of `pca` added as `pca_layer` (`EmbedNetPCA`, as OpenIBL assembles it for
/// testing from a training checkpoint and its `pca_params` file: W = (U diag(lams^-1/2))^T,
/// b = -W mu, then L2; `pca.dim` components). Every other tensor and metadata entry is kept.
pub fn add_pca(weights: &Path, pca: &PcaParams, out: &Path) -> Result<()> {
    let file = WeightsFile::open(weights)?;
    let system = arch(&file)?;
    let aggregation = file.require("vpr.aggregation")?;
    if (system, aggregation) != ("netvlad", "netvlad") {
        return Err(file.error(format!(
            "PCA-whitening goes on an OpenIBL NetVLAD model without one (vpr.arch netvlad, \
             vpr.aggregation netvlad), not vpr.arch '{system}' with '{aggregation}'"
        )));
    }
    let vlad_dim: usize = file.require_parsed("vpr.dim")?;
    if pca.input_dim != vlad_dim {
        return Err(file.error(format!(
            "the PCA parameters project {}-d descriptors, the model's NetVLAD gives {vlad_dim}-d",
            pca.input_dim
        )));
    }
    let cpu = Device::Cpu;
    let mut tensors = file
        .names()
        .into_iter()
        .map(|name| {
            if file.holds_floats(&name) != Some(true) {
                return Err(file.error(format!("tensor {name} is not floating point")));
            }
            let t = file.tensor(&name, DType::F32, &cpu)?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    let layer = pca.layer(true, &cpu)?;
    tensors.push((
        "pca_layer.weight".into(),
        layer.weight.reshape(&[pca.dim, vlad_dim, 1, 1])?,
    ));
    tensors.push(("pca_layer.bias".into(), layer.bias));
    let mut metadata = file.metadata().clone();
    metadata.insert("vpr.aggregation".into(), "netvlad_pca".into());
    metadata.insert("vpr.pca.dim".into(), pca.dim.to_string());
    metadata.insert("vpr.dim".into(), pca.dim.to_string());
    write_weights(out, &tensors, &metadata)
}
