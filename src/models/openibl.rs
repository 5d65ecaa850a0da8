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
use super::check_images;
use super::vgg::Vgg16;
use super::{arch, InputSpec, PlaceModel, Shapes};
use crate::autograd::no_grad;
use crate::device::Device;
use crate::error::Result;
use crate::io::weights::WeightsFile;
use crate::nn::{load_strict, Module, NetVlad, PcaWhitening};
use crate::tensor::Tensor;
use std::path::Path;

pub struct OpenIbl {
    description: String,
    backbone: Vgg16,
    vlad: NetVlad,
    pca: Option<PcaWhitening>,
    input: InputSpec,
    dim: usize,
    device: Device,
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
            description: format!("netvlad vgg16 {aggregation} -> {dim}"),
            backbone,
            vlad,
            pca,
            input: InputSpec::from_file(file)?,
            dim,
            device: device.clone(),
        })
    }
}

impl PlaceModel for OpenIbl {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn input(&self) -> &InputSpec {
        &self.input
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn descriptors(&self, images: &Tensor) -> Result<Tensor> {
        check_images(&self.description, &self.device, images)?;
        no_grad(|| {
            let vlad = self.vlad.forward(&self.backbone.forward(images)?)?;
            match &self.pca {
                Some(pca) => pca.forward(&vlad),
                None => Ok(vlad),
            }
        })
    }
}
