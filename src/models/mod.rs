//! Place-recognition systems: backbones (ResNet, VGG16, DINOv2 ViTs) and the systems built on
//! them (CosPlace, EigenPlaces, SelaVPR, OpenIBL's NetVLAD, the geo-localization benchmark's
//! models, ClusVPR), constructed from a converted safetensors file's `vpr.*`
//! metadata alone.
//!
//! [`load`] gives an inference model (BatchNorm folded, fused convolutions, frozen, no tape);
//! [`CosPlaceNet`] is the trainable network with real BatchNorm layers that training builds on.

mod benchmark;
mod clusvpr;
mod cosplace;
mod openibl;
mod resnet;
mod vgg;
mod vit;

pub use benchmark::Benchmark;
pub use clusvpr::{knn_density, ClusVpr, ClusVprOutput};
pub use cosplace::{initial_weights, CosPlace, CosPlaceNet, InitialWeights, TRAINABLE_BACKBONES};
pub use openibl::{add_pca, OpenIbl};
pub use resnet::{FoldedResNet, ResNet};
pub use vgg::Vgg16;
pub use vit::{Dinov2, PosInterpolation, SelaVpr, Vit, VitFeatures};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::io::weights::WeightsFile;
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};
use std::path::Path;

/// How images are prepared for a model: ToTensor's 0-1 RGB, then `(x - mean) / std` per
/// channel, at the size `size` asks for, resized with or without antialias.
#[derive(Clone, Debug, PartialEq)]
pub struct InputSpec {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub size: InputSize,
    /// Whether resizing antialiases (torchvision >= 0.17's tensor Resize) or not (plain
    /// bilinear, what the benchmark and SelaVPR ran).
    pub antialias: bool,
}

/// The image size a model expects (`vpr.input.size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSize {
    /// Full resolution, any size.
    Any,
    /// Resized to exactly this size before the model.
    Resize { height: usize, width: usize },
    /// The model only takes this size.
    Fixed { height: usize, width: usize },
    /// Sides must be multiples of this (patch size).
    Multiple(usize),
}

impl InputSpec {
    /// `vpr.input.mean`, `vpr.input.std` (three comma-separated numbers each),
    /// `vpr.input.size` (`any`, `resize:HxW`, `fixed:HxW`, `multiple:N`) and
    /// `vpr.input.antialias` (`true` or `false`; files converted before it existed antialias).
    pub fn from_file(file: &WeightsFile) -> Result<InputSpec> {
        let triple = |key: &str| -> Result<[f32; 3]> {
            let v = file.require(key)?;
            let parts: Vec<f32> = v
                .split(',')
                .map(|s| s.trim().parse::<f32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| {
                    file.error(format!("metadata entry '{key}' = '{v}' is not numbers"))
                })?;
            parts.try_into().map_err(|_| {
                file.error(format!(
                    "metadata entry '{key}' = '{v}' is not three numbers"
                ))
            })
        };
        let (mean, std) = (triple("vpr.input.mean")?, triple("vpr.input.std")?);
        if std.iter().any(|&s| !(s > 0.0 && s.is_finite())) {
            return Err(file.error(format!(
                "metadata entry 'vpr.input.std' = '{}' has a value that is not positive",
                file.require("vpr.input.std")?
            )));
        }
        let size_text = file.require("vpr.input.size")?;
        let bad = || {
            file.error(format!(
                "vpr.input.size '{size_text}' is not any, resize:HxW, fixed:HxW or multiple:N"
            ))
        };
        let hw = |s: &str| -> Result<(usize, usize)> {
            let (h, w) = s.split_once('x').ok_or_else(bad)?;
            match (h.parse(), w.parse()) {
                (Ok(h), Ok(w)) if h > 0 && w > 0 => Ok((h, w)),
                _ => Err(bad()),
            }
        };
        let size = match size_text.split_once(':') {
            None if size_text == "any" => InputSize::Any,
            Some(("resize", s)) => {
                let (height, width) = hw(s)?;
                InputSize::Resize { height, width }
            }
            Some(("fixed", s)) => {
                let (height, width) = hw(s)?;
                InputSize::Fixed { height, width }
            }
            Some(("multiple", n)) => match n.parse() {
                Ok(n) if n > 0 => InputSize::Multiple(n),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        };
        let antialias = match file.meta("vpr.input.antialias") {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => {
                return Err(file.error(format!(
                    "metadata entry 'vpr.input.antialias' = '{other}' is not true or false"
                )))
            }
        };
        Ok(InputSpec {
            mean,
            std,
            size,
            antialias,
        })
    }
}

/// What a place model says about itself.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// One line for people: system, backbone and descriptor size.
    pub description: String,
    /// Descriptor size.
    pub dim: usize,
    pub input: InputSpec,
    pub device: Device,
}

impl ModelInfo {
    /// The checks every place model makes on its input: normalised images `[N, H, W, 3]` f32 on
    /// the model's device.
    pub fn check_images(&self, images: &Tensor) -> Result<()> {
        let description = &self.description;
        if images.rank() != 4 || images.shape()[3] != 3 || images.dtype() != DType::F32 {
            return shape_err!(
                "{description}: images must be [N, H, W, 3] f32, got {:?} {}",
                images.shape(),
                images.dtype()
            );
        }
        if !images.device().same(&self.device) {
            return Err(Error::Device(format!(
                "{description}: images on {}, model on {}",
                images.device(),
                self.device
            )));
        }
        Ok(())
    }
}

/// A model that maps images to global descriptors.
pub trait PlaceModel: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// One line for people: system, backbone and descriptor size.
    fn describe(&self) -> String {
        self.info().description.clone()
    }
    /// Descriptor size.
    fn dim(&self) -> usize {
        self.info().dim
    }
    fn input(&self) -> &InputSpec {
        &self.info().input
    }
    fn device(&self) -> &Device {
        &self.info().device
    }
    /// Global descriptors `[N, dim]` (f32) of normalised images `[N, H, W, 3]` (f32, on
    /// `self.device()`). Records no tape.
    fn descriptors(&self, images: &Tensor) -> Result<Tensor>;
    /// Whether the model also gives local feature maps (SelaVPR does).
    fn has_local_features(&self) -> bool {
        false
    }
    /// The global descriptors and, for a model with local features, its local feature maps
    /// `[N, h, w, C]` (f32), from one pass. Records no tape.
    fn descriptors_and_local(&self, images: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.descriptors(images)?, None))
    }
}

/// The model a converted safetensors file describes, its weights loaded strictly (f16/bf16 files
/// converted to f32), on `device`, frozen, in eval mode.
pub fn load(path: &Path, device: &Device) -> Result<Box<dyn PlaceModel>> {
    let file = WeightsFile::open(path)?;
    match arch(&file)? {
        "cosplace" | "eigenplaces" => Ok(Box::new(
            CosPlaceNet::from_file(&file, device)?.into_inference()?,
        )),
        "dinov2" => Ok(Box::new(Dinov2::from_file(&file, device)?)),
        "selavpr" => Ok(Box::new(SelaVpr::from_file(&file, device)?)),
        "netvlad" => Ok(Box::new(OpenIbl::from_file(&file, device)?)),
        "benchmark" => Ok(Box::new(Benchmark::from_file(&file, device)?)),
        "clusvpr" => Ok(Box::new(ClusVpr::from_file(&file, device)?)),
        "torchvision" => Err(file.error(
            "is a torchvision ImageNet backbone checkpoint, not a place-recognition model: \
             start training from it with `vpr-engine train --init`",
        )),
        other => Err(file.error(format!(
            "vpr.arch '{other}' is not supported yet (supported: cosplace, eigenplaces, dinov2, selavpr, netvlad, benchmark, clusvpr)"
        ))),
    }
}

/// The file's `vpr.arch`, or an error saying the file was not written by `convert`.
fn arch(file: &WeightsFile) -> Result<&str> {
    file.meta("vpr.arch").ok_or_else(|| {
        file.error(
            "no vpr.arch metadata: not a converted weight file (convert the official \
             checkpoint first: cargo run --release -p convert -- IN.pth OUT.safetensors)",
        )
    })
}

/// Layer widths read from a file's weight shapes while a model is built. A missing key gives
/// width 1 and is remembered, so the strict load that follows reports every missing key (and
/// compares names only, since the widths are then unknown). Widths above `MAX_WIDTH` are refused
/// before anything of that size is allocated.
pub(crate) struct Shapes<'a> {
    file: &'a WeightsFile,
    complete: Cell<bool>,
    too_wide: RefCell<Option<String>>,
}

/// The widest layer (and largest descriptor) accepted; official models reach 4096.
const MAX_WIDTH: usize = 1 << 16;

impl<'a> Shapes<'a> {
    pub(crate) fn new(file: &'a WeightsFile) -> Shapes<'a> {
        Shapes {
            file,
            complete: Cell::new(true),
            too_wide: RefCell::new(None),
        }
    }

    /// Size `axis` of tensor `key` (1 when the key is missing, or the tensor has too few
    /// dimensions: the strict load then reports it as missing or mis-shaped).
    pub(crate) fn dim(&self, key: &str, axis: usize) -> usize {
        match self.file.shape(key).map(|s| s.get(axis).copied()) {
            Some(Some(n)) if n > MAX_WIDTH => {
                *self.too_wide.borrow_mut() = Some(format!(
                    "tensor '{key}' has {n} along axis {axis}, more than the {MAX_WIDTH} channels a layer may have"
                ));
                1
            }
            Some(n) => n.unwrap_or(1),
            None => {
                self.complete.set(false);
                1
            }
        }
    }

    /// Whether every width was read; an error if one was too large.
    pub(crate) fn finish(&self) -> Result<bool> {
        match self.too_wide.borrow_mut().take() {
            Some(message) => Err(self.file.error(message)),
            None => Ok(self.complete.get()),
        }
    }
}
