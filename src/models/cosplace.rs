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

/// The backbones `vpr-engine train` builds: torchvision's ResNets and VGG16.
pub const TRAINABLE_BACKBONES: &[&str] = &[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "vgg16",
];

/// The weights and metadata of a CosPlace / EigenPlaces network (`system`) to start training
/// from: the backbone's tensors from `init` when given (a converted CosPlace or EigenPlaces file,
/// or a torchvision ImageNet state dict in safetensors with torchvision's names), else
/// torchvision's default initialisation; the head (GeM p = 3, the `dim`-wide FC) always fresh, as
/// EigenPlaces starts from CosPlace's backbone.
pub fn initial_weights(
    system: &str,
    backbone: &str,
    dim: usize,
    init: Option<&WeightsFile>,
    seed: u64,
) -> Result<InitialWeights> {
    if !TRAINABLE_BACKBONES.contains(&backbone) {
        return Err(crate::error::Error::Argument(format!(
            "backbone '{backbone}' is not one of {}",
            TRAINABLE_BACKBONES.join(", ")
        )));
    }
    if dim == 0 || dim > MAX_WIDTH {
        return Err(crate::error::Error::Argument(format!(
            "descriptor size {dim} is not 1 to {MAX_WIDTH}"
        )));
    }
    let cpu = Device::Cpu;
    let mut tensors = match init {
        None => torchvision_backbone(backbone, seed)?,
        Some(file) => backbone_from(file, backbone)?,
    };
    let copied = if init.is_some() { tensors.len() } else { 0 };
    let channels = match tensors
        .iter()
        .rev()
        .find(|(n, t)| t.rank() == 4 && n.ends_with(".weight") && !n.contains("downsample"))
    {
        Some((_, t)) => t.shape()[0],
        None => {
            return Err(crate::error::Error::Argument(
                "the initial backbone has no convolution".into(),
            ))
        }
    };
    let bound = 1.0 / (channels as f64).sqrt();
    tensors.push((
        "aggregation.1.p".into(),
        Tensor::full(&[1], 3.0, DType::F32, &cpu)?,
    ));
    tensors.push((
        "aggregation.3.weight".into(),
        Tensor::rand_uniform(
            &[dim, channels],
            -bound,
            bound,
            seed ^ 0xfc,
            DType::F32,
            &cpu,
        )?,
    ));
    tensors.push((
        "aggregation.3.bias".into(),
        Tensor::rand_uniform(&[dim], -bound, bound, seed ^ 0xfc1, DType::F32, &cpu)?,
    ));
    let vgg = backbone == "vgg16";
    let meta: BTreeMap<String, String> = [
        ("vpr.format", "1".to_string()),
        ("vpr.source", "vpr-engine train".to_string()),
        ("vpr.arch", system.to_string()),
        ("vpr.backbone", backbone.to_string()),
        (
            "vpr.backbone.truncate",
            if vgg { "conv5_3" } else { "conv5" }.to_string(),
        ),
        ("vpr.backbone.channels", channels.to_string()),
        (
            "vpr.backbone.stride",
            if vgg { "16" } else { "32" }.to_string(),
        ),
        ("vpr.aggregation", "gem_fc".to_string()),
        ("vpr.gem.eps", "1e-6".to_string()),
        ("vpr.gem.l2_before_pool", "true".to_string()),
        ("vpr.dim", dim.to_string()),
        ("vpr.input.mean", "0.485,0.456,0.406".to_string()),
        ("vpr.input.std", "0.229,0.224,0.225".to_string()),
        ("vpr.input.size", "any".to_string()),
        ("vpr.input.antialias", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Ok(InitialWeights {
        tensors,
        metadata: meta,
        copied,
    })
}

/// What [`initial_weights`] gives: a converted model file's contents.
pub struct InitialWeights {
    pub tensors: Vec<(String, Tensor)>,
    pub metadata: BTreeMap<String, String>,
    /// How many backbone tensors came from the `init` file.
    pub copied: usize,
}

/// torchvision's initialisation of the backbone, under CosPlace's names: convolutions
/// Kaiming-normal with fan-out (std `sqrt(2 / (out * k * k))`), VGG biases 0, BatchNorm weight 1,
/// bias 0, running mean 0 and variance 1.
fn torchvision_backbone(backbone: &str, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let cpu = Device::Cpu;
    let mut out = Vec::new();
    let mut salt = 0u64;
    let mut conv = |out: &mut Vec<(String, Tensor)>, name: String, cout, cin, k: usize| {
        salt += 1;
        let std = (2.0 / (cout * k * k) as f64).sqrt();
        let w = Tensor::randn(
            &[cout, cin, k, k],
            0.0,
            std,
            seed.wrapping_add(salt),
            DType::F32,
            &cpu,
        )?;
        out.push((name, w));
        Ok::<_, crate::error::Error>(())
    };
    let bn = |out: &mut Vec<(String, Tensor)>, name: &str, c: usize| -> Result<()> {
        for (field, value) in [
            ("weight", 1.0),
            ("bias", 0.0),
            ("running_mean", 0.0),
            ("running_var", 1.0),
        ] {
            out.push((
                format!("{name}.{field}"),
                Tensor::full(&[c], value, DType::F32, &cpu)?,
            ));
        }
        Ok(())
    };
    if backbone == "vgg16" {
        let widths = [
            64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512,
        ];
        let (mut index, mut cin) = (0, 3);
        for w in widths {
            if w == 0 {
                index += 1; // max pool
                continue;
            }
            conv(&mut out, format!("backbone.{index}.weight"), w, cin, 3)?;
            out.push((
                format!("backbone.{index}.bias"),
                Tensor::zeros(&[w], DType::F32, &cpu)?,
            ));
            cin = w;
            index += 2; // conv, relu
        }
        return Ok(out);
    }
    let depth: usize = backbone["resnet".len()..].parse().map_err(|_| {
        crate::error::Error::Argument(format!("backbone '{backbone}' is not a ResNet"))
    })?;
    let (bottleneck, counts) = super::resnet::layout(depth)?;
    let expansion = if bottleneck { 4 } else { 1 };
    conv(&mut out, "backbone.0.weight".into(), 64, 3, 7)?;
    bn(&mut out, "backbone.1", 64)?;
    let mut cin = 64;
    for (li, &count) in counts.iter().enumerate() {
        let planes = 64 << li;
        for j in 0..count {
            let b = format!("backbone.{}.{j}", 4 + li);
            let convs: Vec<(usize, usize, usize)> = if bottleneck {
                vec![
                    (planes, cin, 1),
                    (planes, planes, 3),
                    (planes * 4, planes, 1),
                ]
            } else {
                vec![(planes, cin, 3), (planes, planes, 3)]
            };
            for (i, (cout, ci, k)) in convs.into_iter().enumerate() {
                conv(&mut out, format!("{b}.conv{}.weight", i + 1), cout, ci, k)?;
                bn(&mut out, &format!("{b}.bn{}", i + 1), cout)?;
            }
            if j == 0 && (li > 0 || cin != planes * expansion) {
                conv(
                    &mut out,
                    format!("{b}.downsample.0.weight"),
                    planes * expansion,
                    cin,
                    1,
                )?;
                bn(&mut out, &format!("{b}.downsample.1"), planes * expansion)?;
            }
            cin = planes * expansion;
        }
    }
    Ok(out)
}

/// The backbone tensors of `file` under CosPlace's names: `backbone.*` of a converted CosPlace /
/// EigenPlaces file, or torchvision's own names (`conv1`, `bn1`, `layer1`..`layer4`;
/// `features.0`..`features.28`) renamed. Classifier layers are left out.
fn backbone_from(file: &WeightsFile, backbone: &str) -> Result<Vec<(String, Tensor)>> {
    if let Some(name) = file.meta("vpr.backbone") {
        if name != backbone {
            return Err(file.error(format!(
                "holds a {name} backbone, but the backbone asked for is {backbone}"
            )));
        }
    }
    let vgg = backbone == "vgg16";
    let rename = |key: &str| -> Option<String> {
        if let Some(rest) = key.strip_prefix("backbone.") {
            return Some(format!("backbone.{rest}"));
        }
        if vgg {
            let rest = key.strip_prefix("features.")?;
            let index: usize = rest.split('.').next()?.parse().ok()?;
            return (index <= 28).then(|| format!("backbone.{rest}"));
        }
        let (head, rest) = key.split_once('.')?;
        let index = match head {
            "conv1" => 0,
            "bn1" => 1,
            layer => 3 + layer.strip_prefix("layer")?.parse::<usize>().ok()?,
        };
        Some(format!("backbone.{index}.{rest}"))
    };
    let mut out = Vec::new();
    // the step counters are integers and not weights
    for key in file
        .names()
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
    {
        if let Some(name) = rename(&key) {
            out.push((name, file.tensor(&key, DType::F32, &Device::Cpu)?));
        }
    }
    if out.is_empty() {
        return Err(file.error(format!(
            "has no {backbone} backbone tensors (neither backbone.* nor torchvision's names)"
        )));
    }
    // in network order (layer 10 after layer 9), so the last convolution sets the width
    let order = |name: &str| -> Vec<(usize, String)> {
        name.split('.')
            .map(|part| (part.parse().unwrap_or(usize::MAX), part.to_string()))
            .collect()
    };
    out.sort_by_key(|(name, _)| order(name));
    Ok(out)
}
