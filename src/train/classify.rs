//! `vpr-engine train` for the systems trained by classification over geographic classes:
//! CosPlace (CVPR 2022) and EigenPlaces (ICCV 2023).
//!
//! Each epoch trains one group of classes with its own CosFace classifier (CosPlace: group
//! `epoch mod groups`; EigenPlaces: a lateral and a frontal view dataset of group `epoch mod 9`,
//! their two losses added before the model's step). The classifiers of the other groups, and
//! their Adam state, wait in host memory. After each epoch the model is written to
//! `last.safetensors`, evaluated on the validation set through `eval`'s code, kept as
//! `best.safetensors` when its Recall@1 is the best so far, and the whole training state is
//! checkpointed; the test set is evaluated at the end.
//!
//! Randomness: one generator per epoch and purpose (which images, which augmentation), seeded
//! from `--seed` and the epoch, drawn on this thread only; so an epoch is the same whatever the
//! number of loader threads, and a run resumed at an epoch boundary repeats the uninterrupted
//! one bit for bit on the CPU.

use super::batches::{ClassSampler, Loader, Source};
use super::checkpoint::{load_checkpoint, save_checkpoint, TrainState};
use super::optim::{Adam, Optimizer, ParamGroup};
use super::run_dir::{parse_json_object, Metrics, Value};
use super::scaler::GradScaler;
use crate::autograd::{backward, Parameter};
use crate::data::cosplace::{CosPlaceGrouping, CosPlaceGroups};
use crate::data::eigenplaces::{EigenPlacesGrouping, EigenPlacesGroups};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::eval::dataset::EvalDataset;
use crate::eval::extract::ExtractOptions;
use crate::eval::run::{evaluate, Descriptors};
use crate::io::image::Rgb8;
use crate::io::weights::{write_weights, WeightsFile};
use crate::models::{self, initial_weights, CosPlaceNet};
use crate::nn::{MarginCosineProduct, Module};
use crate::ops::augment::{CropBox, JitterParams};
use crate::tape::autocast;
use crate::tensor::Rng;
use crate::tensor::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Which system is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    CosPlace,
    EigenPlaces,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::CosPlace => "cosplace",
            Method::EigenPlaces => "eigenplaces",
        }
    }

    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "cosplace" => Ok(Method::CosPlace),
            "eigenplaces" => Ok(Method::EigenPlaces),
            _ => Err(Error::Argument(format!(
                "method '{s}' is not cosplace or eigenplaces"
            ))),
        }
    }

    /// CosFace's scale: 30 in CosPlace, 100 in EigenPlaces; the margin is 0.4 in both.
    fn cosface_scale(self) -> f32 {
        match self {
            Method::CosPlace => 30.0,
            Method::EigenPlaces => 100.0,
        }
    }
}

/// CosFace's margin in both systems.
const COSFACE_MARGIN: f32 = 0.4;
/// ColorJitter's brightness, contrast, saturation and hue in both systems.
const JITTER: [f32; 4] = [0.7, 0.7, 0.7, 0.5];
/// RandomResizedCrop's area scale and aspect ratios.
const CROP_SCALE: (f64, f64) = (0.5, 1.0);
const CROP_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// Positives of the validation and test sets are within this many metres.
const POSITIVE_RADIUS: f64 = 25.0;
/// Batches decoded ahead of the device.
const PREFETCH_BATCHES: usize = 2;

/// Mixed precision of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Amp {
    Off,
    Bf16,
    /// f16 with a dynamic loss scale, as `torch.cuda.amp.GradScaler`.
    F16,
}

impl Amp {
    pub fn parse(s: &str) -> Result<Amp> {
        match s {
            "off" => Ok(Amp::Off),
            "bf16" => Ok(Amp::Bf16),
            "f16" => Ok(Amp::F16),
            _ => Err(Error::Argument(format!(
                "--amp '{s}' is not bf16, f16 or off"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Amp::Off => "off",
            Amp::Bf16 => "bf16",
            Amp::F16 => "f16",
        }
    }

    fn dtype(self) -> Option<DType> {
        match self {
            Amp::Off => None,
            Amp::Bf16 => Some(DType::BF16),
            Amp::F16 => Some(DType::F16),
        }
    }
}

/// Every setting of a run (written to `config.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOptions {
    pub method: Method,
    /// The dataset folder: `train/` (CosPlace) or `train_panoramas/` (EigenPlaces), `val/`,
    /// and optionally `test/`.
    pub dataset: PathBuf,
    pub backbone: String,
    pub dim: usize,
    pub device: String,
    pub amp: Amp,
    pub epochs: usize,
    pub iterations_per_epoch: usize,
    pub batch_size: usize,
    /// Side of the square training images (RandomResizedCrop's output).
    pub image_size: usize,
    pub lr: f64,
    pub classifiers_lr: f64,
    pub init: Option<PathBuf>,
    pub seed: u64,
    /// ColorJitter and RandomResizedCrop on the device (off: images used as decoded, resized to
    /// `image_size` when they are not that size).
    pub augment: bool,
    /// Train the early layers too (CosPlace's `--train_all_layers`; by default conv1, bn1,
    /// layer1 and layer2, or VGG16's first ten convolutions, stay frozen).
    pub train_all_layers: bool,
    pub skip_bad_images: bool,
    pub loader_threads: usize,
    /// CosPlace's classes and groups, and how many of the groups are trained.
    pub cosplace: CosPlaceGrouping,
    pub groups_num: usize,
    pub eigenplaces: EigenPlacesGrouping,
    /// EigenPlaces' weights of the lateral and frontal losses.
    pub lambda_lateral: f64,
    pub lambda_frontal: f64,
    /// Images per model call when validating and testing.
    pub eval_batch_size: usize,
}

impl TrainOptions {
    /// The paper's settings for `method` (CosPlace: ResNet-18/512, 50 epochs of 10,000
    /// iterations, 8 groups; EigenPlaces: ResNet-50/2048, 40 epochs of 5,000, 9 groups).
    pub fn defaults(method: Method, dataset: &Path) -> TrainOptions {
        let eigen = method == Method::EigenPlaces;
        TrainOptions {
            method,
            dataset: dataset.to_path_buf(),
            backbone: if eigen { "resnet50" } else { "resnet18" }.into(),
            dim: if eigen { 2048 } else { 512 },
            device: "cpu".into(),
            amp: Amp::Off,
            epochs: if eigen { 40 } else { 50 },
            iterations_per_epoch: if eigen { 5000 } else { 10000 },
            batch_size: 32,
            image_size: 512,
            lr: 1e-5,
            classifiers_lr: 1e-2,
            init: None,
            seed: 0,
            augment: true,
            train_all_layers: false,
            skip_bad_images: false,
            loader_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cosplace: CosPlaceGrouping::default(),
            groups_num: 8,
            eigenplaces: EigenPlacesGrouping::default(),
            lambda_lateral: 1.0,
            lambda_frontal: 1.0,
            eval_batch_size: 16,
        }
    }

    fn fields(&self) -> Vec<(&'static str, Value)> {
        let text = |s: &str| Value::Text(s.to_string());
        let num = |x: f64| Value::Number(x);
        let c = &self.cosplace;
        let e = &self.eigenplaces;
        vec![
            ("method", text(self.method.name())),
            ("dataset", text(&self.dataset.to_string_lossy())),
            ("backbone", text(&self.backbone)),
            ("dim", num(self.dim as f64)),
            ("device", text(&self.device)),
            ("amp", text(self.amp.name())),
            ("epochs", num(self.epochs as f64)),
            (
                "iterations_per_epoch",
                num(self.iterations_per_epoch as f64),
            ),
            ("batch_size", num(self.batch_size as f64)),
            ("image_size", num(self.image_size as f64)),
            ("lr", num(self.lr)),
            ("classifiers_lr", num(self.classifiers_lr)),
            (
                "init",
                text(
                    &self
                        .init
                        .as_ref()
                        .map_or(String::new(), |p| p.to_string_lossy().into()),
                ),
            ),
            // as text: a JSON number cannot hold every u64
            ("seed", text(&self.seed.to_string())),
            ("augment", Value::Bool(self.augment)),
            ("train_all_layers", Value::Bool(self.train_all_layers)),
            ("skip_bad_images", Value::Bool(self.skip_bad_images)),
            ("loader_threads", num(self.loader_threads as f64)),
            ("cosplace_m", num(c.m as f64)),
            ("cosplace_alpha", num(c.alpha as f64)),
            ("cosplace_n", num(c.n as f64)),
            ("cosplace_l", num(c.l as f64)),
            (
                "cosplace_min_images_per_class",
                num(c.min_images_per_class as f64),
            ),
            ("groups_num", num(self.groups_num as f64)),
            ("eigenplaces_m", num(e.m as f64)),
            ("eigenplaces_n", num(e.n as f64)),
            ("eigenplaces_focal_dist", num(e.focal_dist)),
            (
                "eigenplaces_min_images_per_class",
                num(e.min_images_per_class as f64),
            ),
            ("lambda_lateral", num(self.lambda_lateral)),
            ("lambda_frontal", num(self.lambda_frontal)),
            ("eval_batch_size", num(self.eval_batch_size as f64)),
        ]
    }

    /// Reads the settings a run's `config.json` holds.
    pub fn from_config(path: &Path) -> Result<TrainOptions> {
        let bad = |message: String| Error::Format {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        let map = parse_json_object(&text).map_err(bad)?;
        let get = |k: &str| map.get(k).ok_or_else(|| bad(format!("no setting '{k}'")));
        let text_of = |k: &str| match get(k)? {
            Value::Text(s) => Ok(s.clone()),
            v => Err(bad(format!("setting '{k}' is {v:?}, not text"))),
        };
        let number = |k: &str| match get(k)? {
            Value::Number(x) => Ok(*x),
            v => Err(bad(format!("setting '{k}' is {v:?}, not a number"))),
        };
        let count = |k: &str| {
            let x = number(k)?;
            if x >= 0.0 && x.fract() == 0.0 && x < 1e15 {
                Ok(x as usize)
            } else {
                Err(bad(format!("setting '{k}' = {x} is not a count")))
            }
        };
        let flag = |k: &str| match get(k)? {
            Value::Bool(b) => Ok(*b),
            v => Err(bad(format!("setting '{k}' is {v:?}, not true or false"))),
        };
        let method = Method::parse(&text_of("method")?).map_err(|e| bad(e.to_string()))?;
        let init = text_of("init")?;
        Ok(TrainOptions {
            method,
            dataset: PathBuf::from(text_of("dataset")?),
            backbone: text_of("backbone")?,
            dim: count("dim")?,
            device: text_of("device")?,
            amp: Amp::parse(&text_of("amp")?).map_err(|e| bad(e.to_string()))?,
            epochs: count("epochs")?,
            iterations_per_epoch: count("iterations_per_epoch")?,
            batch_size: count("batch_size")?,
            image_size: count("image_size")?,
            lr: number("lr")?,
            classifiers_lr: number("classifiers_lr")?,
            init: (!init.is_empty()).then(|| PathBuf::from(init)),
            seed: text_of("seed")?
                .parse()
                .map_err(|_| bad("setting 'seed' is not an integer".into()))?,
            augment: flag("augment")?,
            train_all_layers: flag("train_all_layers")?,
            skip_bad_images: flag("skip_bad_images")?,
            loader_threads: count("loader_threads")?,
            cosplace: CosPlaceGrouping {
                m: count("cosplace_m")? as u32,
                alpha: count("cosplace_alpha")? as u32,
                n: count("cosplace_n")? as u32,
                l: count("cosplace_l")? as u32,
                min_images_per_class: count("cosplace_min_images_per_class")?,
            },
            groups_num: count("groups_num")?,
            eigenplaces: EigenPlacesGrouping {
                m: count("eigenplaces_m")? as u32,
                n: count("eigenplaces_n")? as u32,
                focal_dist: number("eigenplaces_focal_dist")?,
                min_images_per_class: count("eigenplaces_min_images_per_class")?,
            },
            lambda_lateral: number("lambda_lateral")?,
            lambda_frontal: number("lambda_frontal")?,
            eval_batch_size: count("eval_batch_size")?,
        })
    }

    /// Errors for settings no run can use.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("--epochs", self.epochs),
            ("--iterations-per-epoch", self.iterations_per_epoch),
            ("--batch-size", self.batch_size),
            ("--image-size", self.image_size),
            ("--groups-num", self.groups_num),
            ("--loader-threads", self.loader_threads),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::Argument(format!("{name} must be at least 1")));
            }
        }
        for (name, v) in [("--lr", self.lr), ("--classifiers-lr", self.classifiers_lr)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::Argument(format!(
                    "{name} {v} is not a learning rate"
                )));
            }
        }
        Ok(())
    }
}

/// What happens during a run, for progress bars and logs.
pub enum Event<'a> {
    /// A line worth showing (the data found, the model built, a skipped image).
    Note(String),
    /// An epoch begins.
    EpochStart {
        epoch: usize,
        epochs: usize,
        iterations: usize,
        what: &'a str,
    },
    /// An iteration ended.
    Step {
        iteration: usize,
        loss: f64,
        images_per_second: f64,
    },
    /// Validation or test progress: `(stage, done, total)`.
    Evaluating {
        stage: &'a str,
        done: usize,
        total: usize,
    },
    /// An epoch ended.
    EpochEnd {
        epoch: usize,
        mean_loss: f64,
        recalls: [f64; 2],
        best: bool,
        seconds: f64,
    },
}

/// What a run ends with.
pub struct TrainSummary {
    pub best_recall1: f64,
    /// Recall@1 and @5 of the best model on the test set, when the dataset has one.
    pub test_recalls: Option<[f64; 2]>,
    pub epochs_run: usize,
}

/// One part of an iteration: a batch of normalised images `[B, S, S, 3]` for the classifier
/// `classifier`, its loss weighted by `weight`.
pub struct Part {
    pub images: Tensor,
    pub labels: Tensor,
    pub classifier: usize,
    pub weight: f64,
}

/// The model, its classifiers and their optimizer: one training iteration at a time.
pub struct Trainer {
    pub model: CosPlaceNet,
    pub classifiers: Vec<MarginCosineProduct>,
    pub optimizer: Optimizer,
    pub scaler: GradScaler,
    amp: Amp,
}

impl Trainer {
    /// Adam over the model's trainable parameters (`lr`) and each classifier (`classifiers_lr`),
    /// no weight decay, as both originals; a loss scaler for f16.
    pub fn new(
        model: CosPlaceNet,
        classifiers: Vec<MarginCosineProduct>,
        lr: f64,
        classifiers_lr: f64,
        amp: Amp,
    ) -> Result<Trainer> {
        let trainable: Vec<Parameter> = model
            .parameters()
            .into_iter()
            .filter(|p| p.is_trainable())
            .collect();
        let mut groups = vec![ParamGroup::new(trainable, Adam::new(lr))];
        groups.extend(
            classifiers
                .iter()
                .map(|c| ParamGroup::new(c.parameters(), Adam::new(classifiers_lr))),
        );
        Ok(Trainer {
            model,
            classifiers,
            optimizer: Optimizer::new(groups)?,
            scaler: if amp == Amp::F16 {
                GradScaler::new()
            } else {
                GradScaler::disabled()
            },
            amp,
        })
    }

    /// One iteration: each part's forward pass and weighted CosFace loss, back-propagated (the
    /// gradients of the parts add up), then one step of every parameter that got a gradient.
    /// Returns each part's loss (unweighted) and whether the step ran (f16 skips steps whose
    /// gradients overflowed).
    pub fn step(&mut self, parts: &[Part]) -> Result<(Vec<f64>, bool)> {
        self.optimizer.zero_grad();
        let mut losses = Vec::with_capacity(parts.len());
        for part in parts {
            let classifier = self
                .classifiers
                .get(part.classifier)
                .ok_or_else(|| Error::Argument(format!("no classifier {}", part.classifier)))?;
            let forward = || -> Result<Tensor> {
                let descriptors = self.model.forward(&part.images)?;
                classifier.loss(&descriptors, &part.labels)
            };
            let loss = match self.amp.dtype() {
                Some(dtype) => autocast(dtype, forward)?,
                None => forward()?,
            };
            losses.push(loss.to_scalar_f64()?);
            let weighted = if part.weight == 1.0 {
                loss
            } else {
                loss.mul_scalar(part.weight)?
            };
            if self.scaler.is_enabled() {
                self.scaler.backward(&weighted)?;
            } else {
                backward(&weighted)?;
            }
        }
        let stepped = self.scaler.step(&mut self.optimizer)?;
        self.scaler.update()?;
        Ok((losses, stepped))
    }
}

/// Where a method's training images are.
fn train_folder(method: Method, dataset: &Path) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = match method {
        Method::CosPlace => vec![dataset.join("train")],
        // SF-XL keeps its panoramas in raw/train/panoramas
        Method::EigenPlaces => vec![
            dataset.join("train_panoramas"),
            dataset.join("raw").join("train").join("panoramas"),
        ],
    };
    candidates
        .iter()
        .find(|p| p.is_dir())
        .cloned()
        .ok_or_else(|| {
            Error::Argument(format!(
                "{}: no training folder for {} ({})",
                dataset.display(),
                method.name(),
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        })
}

/// The training data of a run: per classifier, its classes, each a list of sources.
struct TrainData {
    /// `views[i]` = the classes of classifier i.
    views: Vec<Vec<Vec<Source>>>,
    /// Classifiers trained together in an epoch: CosPlace one, EigenPlaces two.
    per_epoch: usize,
    /// Distinct epochs before the groups repeat.
    cycle: usize,
}

impl TrainData {
    fn load(options: &TrainOptions, report: &mut dyn FnMut(Event)) -> Result<TrainData> {
        let folder = train_folder(options.method, &options.dataset)?;
        match options.method {
            Method::CosPlace => {
                let groups = CosPlaceGroups::load_or_build(&folder, &options.cosplace)?;
                let used = options.groups_num;
                if groups.groups.len() < used {
                    let c = &options.cosplace;
                    return Err(Error::Argument(format!(
                        "{}: only {} groups with M {}, alpha {}, N {}, L {} and at least {} images per class, but --groups-num is {used}",
                        folder.display(),
                        groups.groups.len(),
                        c.m,
                        c.alpha,
                        c.n,
                        c.l,
                        c.min_images_per_class
                    )));
                }
                let views: Vec<Vec<Vec<Source>>> = groups.groups[..used]
                    .iter()
                    .map(|classes| {
                        classes
                            .iter()
                            .map(|images| {
                                images
                                    .iter()
                                    .map(|&i| Source::Image(groups.images[i as usize].clone()))
                                    .collect()
                            })
                            .collect()
                    })
                    .collect();
                report(Event::Note(format!(
                    "{}: {} images, {} groups trained, classes per group {:?}",
                    folder.display(),
                    groups.images.len(),
                    used,
                    views.iter().map(Vec::len).collect::<Vec<_>>()
                )));
                Ok(TrainData {
                    views,
                    per_epoch: 1,
                    cycle: used,
                })
            }
            Method::EigenPlaces => {
                let groups = EigenPlacesGroups::load_or_build(&folder, &options.eigenplaces)?;
                let views: Vec<Vec<Vec<Source>>> = groups
                    .views
                    .iter()
                    .map(|view| {
                        view.classes
                            .iter()
                            .map(|crops| {
                                crops
                                    .iter()
                                    .map(|c| Source::Crop {
                                        panorama: groups.panoramas[c.panorama as usize].clone(),
                                        crop: *c,
                                    })
                                    .collect()
                            })
                            .collect()
                    })
                    .collect();
                report(Event::Note(format!(
                    "{}: {} panoramas, {} groups, classes per group {:?}",
                    folder.display(),
                    groups.panoramas.len(),
                    views.len() / 2,
                    views.iter().step_by(2).map(Vec::len).collect::<Vec<_>>()
                )));
                Ok(TrainData {
                    cycle: views.len() / 2,
                    views,
                    per_epoch: 2,
                })
            }
        }
    }
}

/// A generator for one purpose of one epoch, independent of every other.
fn epoch_rng(seed: u64, epoch: usize, purpose: u64) -> Rng {
    let mut mix = Rng::new(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ purpose);
    Rng::new(mix.next_u64())
}

/// The files of a run folder.
pub struct RunFiles {
    pub dir: PathBuf,
}

impl RunFiles {
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.safetensors")
    }
    pub fn last(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }
    pub fn init(&self) -> PathBuf {
        self.dir.join("init.safetensors")
    }
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
}

/// Trains as `options` say into the run folder `out` on `device` (a new run), or continues the
/// run in `out` (`resume`, with the options read from its `config.json` and `epochs` possibly
/// raised).
pub fn train(
    options: &TrainOptions,
    out: &Path,
    device: &Device,
    resume: bool,
    report: &mut dyn FnMut(Event),
) -> Result<TrainSummary> {
    options.validate()?;
    let files = RunFiles {
        dir: out.to_path_buf(),
    };
    let io = |p: &Path| {
        let shown = p.display().to_string();
        move |source| Error::Io {
            path: shown.clone(),
            source,
        }
    };
    if !resume && files.state().exists() {
        return Err(Error::Argument(format!(
            "{} already holds a training run: continue it with --resume {} or choose another --out",
            out.display(),
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let data = TrainData::load(options, report)?;
    let val = EvalDataset::open(&options.dataset.join("val"))?;
    let scale = options.method.cosface_scale();

    // the model: the run's own file when resuming, else built from --init or from scratch
    let model = if resume {
        CosPlaceNet::load(&files.last(), device)?
    } else {
        let init = options.init.as_deref().map(WeightsFile::open).transpose()?;
        let initial = initial_weights(
            options.method.name(),
            &options.backbone,
            options.dim,
            init.as_ref(),
            options.seed,
        )?;
        report(Event::Note(match &options.init {
            Some(p) => format!("backbone: {} tensors from {}", initial.copied, p.display()),
            None => format!(
                "backbone: {} from torchvision's default initialisation (no --init)",
                options.backbone
            ),
        }));
        write_weights(&files.init(), &initial.tensors, &initial.metadata)?;
        CosPlaceNet::load(&files.init(), device)?
    };
    model.set_train(true);
    if !options.train_all_layers {
        model.freeze_cosplace();
    }
    let mut classifiers = Vec::new();
    for (i, classes) in data.views.iter().enumerate() {
        classifiers.push(MarginCosineProduct::new(
            &format!("classifiers.{i}"),
            model.dim(),
            classes.len(),
            scale,
            COSFACE_MARGIN,
            options.seed.wrapping_add(1000 + i as u64),
            &Device::Cpu,
        )?);
    }
    let mut trainer = Trainer::new(
        model,
        classifiers,
        options.lr,
        options.classifiers_lr,
        options.amp,
    )?;
    let buffers: Vec<(crate::nn::Buffer, Parameter)> = trainer
        .model
        .buffers()
        .into_iter()
        .map(|b| {
            let p = Parameter::new(
                format!("buffer/{}", b.name()),
                b.tensor().to_dtype(DType::F32)?,
            );
            Ok((b, p))
        })
        .collect::<Result<_>>()?;
    let mut all_params = trainer.model.parameters();
    all_params.extend(trainer.classifiers.iter().flat_map(|c| c.parameters()));
    all_params.extend(buffers.iter().map(|(_, p)| p.clone()));

    let mut start_epoch = 0;
    let mut best_recall1 = f64::NEG_INFINITY;
    if resume {
        let mut state = TrainState {
            params: &all_params,
            optimizer: Some(&mut trainer.optimizer),
            schedule: None,
            scaler: Some(&mut trainer.scaler),
            rng_state: 0,
            step: 0,
            extra: BTreeMap::new(),
        };
        load_checkpoint(&files.state(), &mut state)?;
        start_epoch = state.step as usize;
        best_recall1 = state
            .extra
            .get("best_recall1")
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NEG_INFINITY);
        for (b, p) in &buffers {
            b.set(p.tensor().to_dtype(b.tensor().dtype())?)?;
        }
        report(Event::Note(format!(
            "resuming {} after epoch {start_epoch} (best validation Recall@1 {best_recall1:.2})",
            out.display()
        )));
    } else {
        let mut f = crate::io::AtomicFile::create(&files.config())?;
        f.write_bytes(super::run_dir::json_line(&options.fields()).as_bytes())?;
        f.write_bytes(b"\n")?;
        f.commit()?;
    }
    let mut metrics = Metrics::open(&files.metrics(), start_epoch)?;

    for epoch in start_epoch..options.epochs {
        let started = Instant::now();
        let first = (epoch % data.cycle) * data.per_epoch;
        let active: Vec<usize> = (first..first + data.per_epoch).collect();
        let params: Vec<Parameter> = active
            .iter()
            .flat_map(|&v| trainer.classifiers[v].parameters())
            .collect();
        trainer.optimizer.move_to(&params, device)?;
        let mean_loss = train_epoch(
            &mut trainer,
            &data,
            &active,
            options,
            epoch,
            device,
            &mut metrics,
            out,
            report,
        )?;
        trainer.optimizer.move_to(&params, &Device::Cpu)?;

        trainer.model.save(&files.last())?;
        let recalls = evaluate_model(&files.last(), &val, device, options, "validation", report)?;
        let best = recalls[0] > best_recall1;
        if best {
            best_recall1 = recalls[0];
            trainer.model.save(&files.best())?;
        }
        for (b, p) in &buffers {
            p.set(
                b.tensor()
                    .to_dtype(DType::F32)?
                    .to_device(&p.tensor().device().clone())?,
            )?;
        }
        // the epoch's line before its state: a run killed in between repeats the epoch on
        // resume, which drops the line and writes it again
        metrics.write(&[
            ("epoch", Value::Number(epoch as f64)),
            ("mean_loss", Value::Number(mean_loss)),
            ("val_recall@1", Value::Number(recalls[0])),
            ("val_recall@5", Value::Number(recalls[1])),
            ("best", Value::Bool(best)),
            ("seconds", Value::Number(started.elapsed().as_secs_f64())),
        ])?;
        let state = TrainState {
            params: &all_params,
            optimizer: Some(&mut trainer.optimizer),
            schedule: None,
            scaler: Some(&mut trainer.scaler),
            rng_state: options.seed,
            step: epoch as u64 + 1,
            extra: [("best_recall1".to_string(), format!("{best_recall1:?}"))].into(),
        };
        save_checkpoint(&files.state(), &state)?;
        report(Event::EpochEnd {
            epoch,
            mean_loss,
            recalls,
            best,
            seconds: started.elapsed().as_secs_f64(),
        });
    }

    let test_dir = options.dataset.join("test");
    let test_recalls = if test_dir.is_dir() && files.best().exists() {
        // SF-XL's test queries are queries_v1 in CosPlace's evaluation
        let v1 = test_dir.join("queries_v1");
        let test = if v1.is_dir() {
            EvalDataset::from_folders(&test_dir.join("database"), &v1)?
        } else {
            EvalDataset::open(&test_dir)?
        };
        let recalls = evaluate_model(&files.best(), &test, device, options, "test", report)?;
        metrics.write(&[
            ("epoch", Value::Number(options.epochs as f64)),
            ("test_recall@1", Value::Number(recalls[0])),
            ("test_recall@5", Value::Number(recalls[1])),
        ])?;
        Some(recalls)
    } else {
        None
    };
    Ok(TrainSummary {
        best_recall1,
        test_recalls,
        epochs_run: options.epochs.saturating_sub(start_epoch),
    })
}

/// One epoch of `options.iterations_per_epoch` iterations on the classifiers `active` (their
/// parameters already on `device`); returns the mean loss.
#[allow(clippy::too_many_arguments)]
fn train_epoch(
    trainer: &mut Trainer,
    data: &TrainData,
    active: &[usize],
    options: &TrainOptions,
    epoch: usize,
    device: &Device,
    metrics: &mut Metrics,
    out: &Path,
    report: &mut dyn FnMut(Event),
) -> Result<f64> {
    let mut samplers = Vec::new();
    for &v in active {
        samplers.push(ClassSampler::new(
            data.views[v].len(),
            options.batch_size,
            &format!("classifier {v}'s group"),
        )?);
    }
    report(Event::EpochStart {
        epoch,
        epochs: options.epochs,
        iterations: options.iterations_per_epoch,
        what: if data.per_epoch == 1 {
            "group"
        } else {
            "lateral+frontal of group"
        },
    });
    let mut sample_rng = epoch_rng(options.seed, epoch, 1);
    let mut augment_rng = epoch_rng(options.seed, epoch, 2);
    let mut loader = Loader::new(
        options.loader_threads,
        PREFETCH_BATCHES * options.batch_size,
    );
    // (view, labels) of the batches queued, in order
    let mut queued: std::collections::VecDeque<(usize, Vec<usize>)> = Default::default();
    let batches_total = options.iterations_per_epoch * active.len();
    let mut batches_queued = 0;
    let mut loss_sum = 0.0;
    let mut tick = Instant::now();
    for iteration in 0..options.iterations_per_epoch {
        while batches_queued < batches_total && queued.len() < PREFETCH_BATCHES * active.len() {
            let slot = batches_queued % active.len();
            let classes = samplers[slot].next_batch(&mut sample_rng);
            for &c in &classes {
                let images = &data.views[active[slot]][c];
                let pick = sample_rng.below(images.len() as u64) as usize;
                loader.submit(images[pick].clone())?;
            }
            queued.push_back((slot, classes));
            batches_queued += 1;
        }
        let mut parts = Vec::new();
        for _ in 0..active.len() {
            let (slot, classes) = queued.pop_front().expect("batches were queued");
            let view = active[slot];
            let mut pixels = Vec::with_capacity(classes.len());
            for &c in &classes {
                let image = match loader.take() {
                    Ok(img) => img,
                    Err(e) if options.skip_bad_images => {
                        report(Event::Note(format!("skipped: {e}")));
                        replacement(&data.views[view][c], &mut sample_rng, report)?
                    }
                    Err(e) => {
                        return Err(Error::Argument(format!(
                            "{e} (add --skip-bad-images to train without such images)"
                        )))
                    }
                };
                pixels.push(image);
            }
            let input = trainer.model.input().clone();
            let images = training_images(&pixels, options, &mut augment_rng, &input, device)?;
            let labels: Vec<i64> = classes.iter().map(|&c| c as i64).collect();
            let weight = match (options.method, slot) {
                (Method::EigenPlaces, 0) => options.lambda_lateral,
                (Method::EigenPlaces, _) => options.lambda_frontal,
                (Method::CosPlace, _) => 1.0,
            };
            parts.push(Part {
                images,
                labels: Tensor::from_vec(labels, &[classes.len()], device)?,
                classifier: view,
                weight,
            });
        }
        let (losses, _) = trainer.step(&parts)?;
        let loss: f64 = losses.iter().sum();
        if !loss.is_finite() && trainer.amp != Amp::F16 {
            return Err(Error::Argument(format!(
                "the loss is {loss} at epoch {epoch}, iteration {iteration}: training stopped; {} holds the state after {epoch} epochs (--resume continues from there)",
                out.display()
            )));
        }
        loss_sum += loss;
        let now = Instant::now();
        let images_per_second = (options.batch_size * active.len()) as f64
            / now.duration_since(tick).as_secs_f64().max(1e-9);
        tick = now;
        let mut fields = vec![
            ("epoch", Value::Number(epoch as f64)),
            ("iteration", Value::Number(iteration as f64)),
            ("loss", Value::Number(loss)),
        ];
        if data.per_epoch == 2 {
            fields.push(("loss_lateral", Value::Number(losses[0])));
            fields.push(("loss_frontal", Value::Number(losses[1])));
        }
        fields.push(("lr", Value::Number(options.lr)));
        fields.push(("classifiers_lr", Value::Number(options.classifiers_lr)));
        fields.push(("images_per_second", Value::Number(images_per_second)));
        metrics.write(&fields)?;
        report(Event::Step {
            iteration,
            loss,
            images_per_second,
        });
    }
    Ok(loss_sum / options.iterations_per_epoch as f64)
}

/// Another image of the same class, read on this thread, for one that failed to decode.
fn replacement(class: &[Source], rng: &mut Rng, report: &mut dyn FnMut(Event)) -> Result<Rgb8> {
    for _ in 0..class.len().max(1) * 4 {
        match class[rng.below(class.len() as u64) as usize].read() {
            Ok(image) => return Ok(image),
            Err(e) => report(Event::Note(format!("skipped: {e}"))),
        }
    }
    Err(Error::Argument(format!(
        "no readable image in the class of {}",
        class[0].path().display()
    )))
}

/// Recall@1 and @5 of the model in `weights` on `dataset`.
fn evaluate_model(
    weights: &Path,
    dataset: &EvalDataset,
    device: &Device,
    options: &TrainOptions,
    stage: &str,
    report: &mut dyn FnMut(Event),
) -> Result<[f64; 2]> {
    let model = models::load(weights, device)?;
    let mut extract = ExtractOptions::new(options.eval_batch_size);
    extract.loader_threads = options.loader_threads;
    let evaluation = evaluate(
        dataset,
        Descriptors::Model {
            model: model.as_ref(),
            options: extract,
        },
        device,
        POSITIVE_RADIUS,
        &[1, 5],
        None,
        &mut |part, done, total| {
            report(Event::Evaluating {
                stage: &format!("{stage} {part}"),
                done,
                total,
            })
        },
    )?;
    Ok([evaluation.recalls[0], evaluation.recalls[1]])
}

/// `[B, H, W, 3]` f32 in 0..1 (ToTensor) on `device`, written on a GPU straight into the
/// page-locked memory it is uploaded from; every image must have the same size.
fn batch_tensor(images: &[Rgb8], device: &Device) -> Result<Tensor> {
    let (h, w) = (images[0].height, images[0].width);
    if let Some(other) = images.iter().find(|i| (i.height, i.width) != (h, w)) {
        return Err(Error::Shape(format!(
            "training images of one batch differ in size: {}x{} and {h}x{w} (CosPlace's training crops are all one size)",
            other.height, other.width
        )));
    }
    Tensor::from_f32_fill(&[images.len(), h, w, 3], device, |values| {
        let pixels = images.iter().flat_map(|image| &image.pixels);
        for (v, &p) in values.iter_mut().zip(pixels) {
            *v = p as f32 / 255.0;
        }
    })
}

/// A batch as the model trains on it: ToTensor on `device`, then the augmentation (ColorJitter,
/// RandomResizedCrop to the training size; parameters drawn from `rng`) or, without it, a resize
/// to the training size when the images are not that size, then the model's normalisation.
pub fn training_images(
    pixels: &[Rgb8],
    options: &TrainOptions,
    rng: &mut Rng,
    input: &crate::models::InputSpec,
    device: &Device,
) -> Result<Tensor> {
    let images = batch_tensor(pixels, device)?;
    let mean = Tensor::from_slice(&input.mean, &[3], device)?;
    let std = Tensor::from_slice(&input.std, &[3], device)?;
    let (n, h, w) = (images.shape()[0], images.shape()[1], images.shape()[2]);
    let s = options.image_size;
    let sized = if options.augment {
        let [b, c, sat, hue] = JITTER;
        let jitter: Vec<JitterParams> = (0..n)
            .map(|_| JitterParams::sample(rng, b, c, sat, hue))
            .collect();
        let boxes: Vec<CropBox> = (0..n)
            .map(|_| CropBox::sample(rng, h, w, CROP_SCALE, CROP_RATIO))
            .collect();
        images
            .color_jitter(&jitter)?
            .resized_crops(&boxes, s, s, true)?
    } else if (h, w) != (s, s) {
        let whole = CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        };
        images.resized_crops(&vec![whole; n], s, s, true)?
    } else {
        images.clone()
    };
    sized.sub(&mean)?.div(&std)
}
