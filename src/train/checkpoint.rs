//! Training checkpoints in safetensors: parameters by name, optimizer state per parameter,
//! step counters, learning rates and schedule, loss-scaler state and the caller's RNG state.
//!
//! Layout: tensors `param/<name>` and `optim/<name>/<buffer>` (f32, little-endian); every scalar
//! is a string in `__metadata__` (f64 written in Rust's round-trip form, so a resumed run sees the
//! same bits). Each tensor's bytes and the metadata carry a 64-bit checksum, so corruption
//! anywhere is detected. A checkpoint is written to a temporary file in the same folder, synced,
//! and renamed into place: a crash leaves the old checkpoint or the new one, never half of one.
//! Loading checks everything before changing anything, and any problem is an error naming the
//! file and what is wrong.

use super::optim::{Adam, Hyper, Optimizer, ParamState, Sgd};
use super::scaler::GradScaler;
use super::schedule::StepLr;
use crate::autograd::{no_grad, Parameter};
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

const FORMAT: &str = "vpr-checkpoint-1";
const METADATA_CHECKSUM: &str = "checksum.metadata";
/// Prefix of the caller's scalars in the metadata.
const EXTRA: &str = "extra.";

/// What a checkpoint holds: saved from, and loaded into, these.
pub struct TrainState<'a> {
    /// Every parameter of the model (frozen ones included), by unique name.
    pub params: &'a [Parameter],
    pub optimizer: Option<&'a mut Optimizer>,
    pub schedule: Option<&'a mut StepLr>,
    pub scaler: Option<&'a mut GradScaler>,
    /// The caller's random generator state (data order, augmentation).
    pub rng_state: u64,
    /// The caller's step (or epoch) counter.
    pub step: u64,
    /// The caller's other scalars (a best validation recall, say), by name, as text.
    pub extra: BTreeMap<String, String>,
}

/// 64-bit checksum of `bytes`: FNV-style over little-endian words, each step a bijection of the
/// running value, so any change to a single word always changes the result.
fn checksum(bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ bytes.len() as u64;
    let mut words = bytes.chunks_exact(8);
    for w in words.by_ref() {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap()))
            .wrapping_mul(PRIME)
            .rotate_left(29);
    }
    let mut last = [0u8; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    (h ^ u64::from_le_bytes(last))
        .wrapping_mul(PRIME)
        .rotate_left(29)
}

fn metadata_checksum(meta: &BTreeMap<String, String>) -> u64 {
    let mut text = String::new();
    for (k, v) in meta.iter().filter(|(k, _)| k.as_str() != METADATA_CHECKSUM) {
        text.push_str(k);
        text.push('\0');
        text.push_str(v);
        text.push('\0');
    }
    checksum(text.as_bytes())
}

fn hyper_fields(h: &Hyper) -> Vec<(&'static str, String)> {
    match h {
        Hyper::Sgd(s) => vec![
            ("lr", format!("{:?}", s.lr)),
            ("momentum", format!("{:?}", s.momentum)),
            ("dampening", format!("{:?}", s.dampening)),
            ("weight_decay", format!("{:?}", s.weight_decay)),
            ("nesterov", s.nesterov.to_string()),
        ],
        Hyper::Adam(a) => vec![
            ("lr", format!("{:?}", a.lr)),
            ("beta1", format!("{:?}", a.betas.0)),
            ("beta2", format!("{:?}", a.betas.1)),
            ("eps", format!("{:?}", a.eps)),
            ("weight_decay", format!("{:?}", a.weight_decay)),
        ],
    }
}

/// The state buffers an update of this kind keeps.
fn buffer_names(h: &Hyper) -> &'static [&'static str] {
    match h {
        Hyper::Sgd(s) if s.momentum == 0.0 => &[],
        Hyper::Sgd(_) => &["momentum_buffer"],
        Hyper::Adam(_) => &["exp_avg", "exp_avg_sq"],
    }
}

fn buffer<'s>(s: &'s ParamState, name: &str) -> Option<&'s Tensor> {
    match name {
        "momentum_buffer" => s.momentum_buffer.as_ref(),
        "exp_avg" => s.exp_avg.as_ref(),
        _ => s.exp_avg_sq.as_ref(),
    }
}

fn set_buffer(s: &mut ParamState, name: &str, t: Tensor) {
    match name {
        "momentum_buffer" => s.momentum_buffer = Some(t),
        "exp_avg" => s.exp_avg = Some(t),
        _ => s.exp_avg_sq = Some(t),
    }
}

fn host_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let v = t.to_dtype(DType::F32)?.to_vec::<f32>()?;
    Ok(bytemuck::cast_slice(&v).to_vec())
}

/// Writes `state` to `path` atomically (temporary file in the same folder, fsync, rename).
pub fn save_checkpoint(path: &Path, state: &TrainState) -> Result<()> {
    let shown = path.display().to_string();
    let fmt_err = |message: String| Error::Format {
        path: shown.clone(),
        message,
    };
    let mut meta: BTreeMap<String, String> = BTreeMap::new();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("train.step".into(), state.step.to_string());
    meta.insert("train.rng_state".into(), state.rng_state.to_string());
    for (k, v) in &state.extra {
        meta.insert(format!("{EXTRA}{k}"), v.clone());
    }
    let mut names = HashSet::new();
    no_grad(|| -> Result<()> {
        for p in state.params {
            if !names.insert(p.name()) {
                return Err(fmt_err(format!(
                    "parameter name '{}' appears twice",
                    p.name()
                )));
            }
            let t = p.tensor();
            tensors.push((
                format!("param/{}", p.name()),
                t.shape().to_vec(),
                host_bytes(&t)?,
            ));
        }
        if let Some(opt) = state.optimizer.as_deref() {
            meta.insert("optim.groups".into(), opt.groups().len().to_string());
            for (i, g) in opt.groups().iter().enumerate() {
                meta.insert(format!("optim.group.{i}.kind"), g.hyper.kind().into());
                meta.insert(
                    format!("optim.group.{i}.params"),
                    g.params.len().to_string(),
                );
                for (k, v) in hyper_fields(&g.hyper) {
                    meta.insert(format!("optim.group.{i}.{k}"), v);
                }
                for p in &g.params {
                    let Some(s) = opt.state(p.name()) else {
                        continue;
                    };
                    meta.insert(format!("optim.state.{}.step", p.name()), s.step.to_string());
                    for &b in buffer_names(&g.hyper) {
                        if let Some(t) = buffer(s, b) {
                            let name = format!("optim/{}/{b}", p.name());
                            tensors.push((name, t.shape().to_vec(), host_bytes(t)?));
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    if let Some(s) = state.schedule.as_deref() {
        meta.insert("schedule.step_size".into(), s.step_size().to_string());
        meta.insert("schedule.gamma".into(), format!("{:?}", s.gamma()));
        meta.insert("schedule.last_epoch".into(), s.last_epoch().to_string());
    }
    if let Some(s) = state.scaler.as_deref() {
        meta.insert("scaler.enabled".into(), s.is_enabled().to_string());
        meta.insert("scaler.scale".into(), format!("{:?}", s.scale()));
        meta.insert(
            "scaler.growth_tracker".into(),
            s.growth_tracker().to_string(),
        );
    }
    for (name, _, bytes) in &tensors {
        meta.insert(
            format!("checksum.{name}"),
            format!("{:016x}", checksum(bytes)),
        );
    }
    meta.insert(
        METADATA_CHECKSUM.into(),
        format!("{:016x}", metadata_checksum(&meta)),
    );

    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(StDtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| fmt_err(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| fmt_err("not a file path".into()))?
        .to_string_lossy()
        .to_string();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let io_err = |p: &Path, source| Error::Io {
        path: p.display().to_string(),
        source,
    };
    let write = || -> Result<()> {
        safetensors::tensor::serialize_to_file(views, Some(meta.into_iter().collect()), &tmp)
            .map_err(|e| match e {
                safetensors::SafeTensorError::IoError(source) => io_err(&tmp, source),
                e => Error::Format {
                    path: tmp.display().to_string(),
                    message: e.to_string(),
                },
            })?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_err(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
        // make the rename itself durable (best effort: not every platform can open a folder)
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    let result = write();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a checkpoint written by `save_checkpoint` into `state`: parameter values, optimizer
/// hyper-parameters and state, schedule and scaler (those present in `state`), `rng_state` and
/// `step`. Nothing changes unless the whole file checks out.
pub fn load_checkpoint(path: &Path, state: &mut TrainState) -> Result<()> {
    let shown = path.display().to_string();
    let err = |message: String| Error::Format {
        path: shown.clone(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: shown.clone(),
        source,
    })?;
    // SAFETY: the map is only read while this function runs; checkpoints are written to a new
    // file and renamed into place, never modified in place.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
        path: shown.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&map).map_err(|e| {
        err(format!(
            "not a readable safetensors file (truncated or corrupted?): {e}"
        ))
    })?;
    let (_, header) =
        SafeTensors::read_metadata(&map).map_err(|e| err(format!("unreadable header: {e}")))?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .ok_or_else(|| err("no __metadata__: not a training checkpoint".into()))?
        .into_iter()
        .collect();
    let get = |key: &str| -> Result<&str> {
        meta.get(key)
            .map(String::as_str)
            .ok_or_else(|| err(format!("metadata entry '{key}' is missing")))
    };
    fn parse<T: std::str::FromStr>(v: &str, key: &str, err: &dyn Fn(String) -> Error) -> Result<T> {
        v.parse().map_err(|_| {
            err(format!(
                "metadata entry '{key}' = '{v}' is not a valid {}",
                std::any::type_name::<T>()
            ))
        })
    }
    let num = |key: &str| -> Result<f64> { parse(get(key)?, key, &err) };
    let int = |key: &str| -> Result<u64> { parse(get(key)?, key, &err) };
    if get("format")? != FORMAT {
        return Err(err(format!("format '{}' is not {FORMAT}", get("format")?)));
    }
    let want = get(METADATA_CHECKSUM)?;
    if want != format!("{:016x}", metadata_checksum(&meta)) {
        return Err(err(
            "metadata checksum mismatch: the header is corrupted".into()
        ));
    }

    let mut used = HashSet::new();
    // a checked tensor as an f32 tensor on `device`
    let mut tensor = |name: &str, shape: &[usize], device: &Device| -> Result<Tensor> {
        let view = st
            .tensor(name)
            .map_err(|_| err(format!("tensor '{name}' is missing")))?;
        if view.dtype() != StDtype::F32 {
            return Err(err(format!(
                "tensor '{name}' is {:?}, expected F32",
                view.dtype()
            )));
        }
        if view.shape() != shape {
            return Err(err(format!(
                "tensor '{name}' has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        let sum = get(&format!("checksum.{name}"))?;
        if sum != format!("{:016x}", checksum(view.data())) {
            return Err(err(format!(
                "tensor '{name}': checksum mismatch, the data is corrupted"
            )));
        }
        used.insert(name.to_string());
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        Tensor::from_vec(values, shape, device)
    };

    let mut values = Vec::new();
    for p in state.params {
        let t = p.tensor();
        values.push(tensor(
            &format!("param/{}", p.name()),
            t.shape(),
            t.device(),
        )?);
    }

    let mut new_opt: Option<(Vec<Hyper>, HashMap<String, ParamState>)> = None;
    if let Some(opt) = state.optimizer.as_deref() {
        let groups = int("optim.groups")? as usize;
        if groups != opt.groups().len() {
            return Err(err(format!(
                "optimizer has {} parameter groups, the checkpoint {groups}",
                opt.groups().len()
            )));
        }
        let mut hypers = Vec::new();
        let mut states = HashMap::new();
        for (i, g) in opt.groups().iter().enumerate() {
            let key = |k: &str| format!("optim.group.{i}.{k}");
            let kind = get(&key("kind"))?;
            if kind != g.hyper.kind() {
                return Err(err(format!(
                    "parameter group {i} is {} here, {kind} in the checkpoint",
                    g.hyper.kind()
                )));
            }
            let count = int(&key("params"))? as usize;
            if count != g.params.len() {
                return Err(err(format!(
                    "parameter group {i} has {} parameters here, {count} in the checkpoint",
                    g.params.len()
                )));
            }
            let hyper = match g.hyper {
                Hyper::Sgd(_) => Hyper::Sgd(Sgd {
                    lr: num(&key("lr"))?,
                    momentum: num(&key("momentum"))?,
                    dampening: num(&key("dampening"))?,
                    weight_decay: num(&key("weight_decay"))?,
                    nesterov: parse(get(&key("nesterov"))?, &key("nesterov"), &err)?,
                }),
                Hyper::Adam(a) => Hyper::Adam(Adam {
                    lr: num(&key("lr"))?,
                    betas: (num(&key("beta1"))?, num(&key("beta2"))?),
                    eps: num(&key("eps"))?,
                    weight_decay: num(&key("weight_decay"))?,
                    decoupled: a.decoupled,
                }),
            };
            hyper
                .validate()
                .map_err(|e| err(format!("parameter group {i}: {e}")))?;
            for p in &g.params {
                let step_key = format!("optim.state.{}.step", p.name());
                if !meta.contains_key(&step_key) {
                    continue;
                }
                let t = p.tensor();
                let mut s = ParamState {
                    step: int(&step_key)?,
                    ..ParamState::default()
                };
                for &b in buffer_names(&hyper) {
                    let name = format!("optim/{}/{b}", p.name());
                    set_buffer(&mut s, b, tensor(&name, t.shape(), t.device())?);
                }
                states.insert(p.name().to_string(), s);
            }
            hypers.push(hyper);
        }
        new_opt = Some((hypers, states));
    }
    let new_schedule = match state.schedule.as_deref() {
        Some(_) => {
            let mut s = StepLr::new(int("schedule.step_size")?, num("schedule.gamma")?)
                .map_err(|e| err(e.to_string()))?;
            s.set_last_epoch(int("schedule.last_epoch")?);
            Some(s)
        }
        None => None,
    };
    let new_scaler = match state.scaler.as_deref() {
        Some(current) => {
            let enabled: bool = parse(get("scaler.enabled")?, "scaler.enabled", &err)?;
            if enabled != current.is_enabled() {
                return Err(err(format!(
                    "loss scaler is {} here but {} in the checkpoint",
                    if current.is_enabled() {
                        "enabled"
                    } else {
                        "disabled"
                    },
                    if enabled { "enabled" } else { "disabled" }
                )));
            }
            let scale: f32 = parse(get("scaler.scale")?, "scaler.scale", &err)?;
            let tracker: u32 = parse(get("scaler.growth_tracker")?, "scaler.growth_tracker", &err)?;
            let mut s = current.clone();
            s.set_state(scale, tracker)
                .map_err(|e| err(e.to_string()))?;
            Some(s)
        }
        None => None,
    };
    let rng_state = int("train.rng_state")?;
    let step = int("train.step")?;
    let extra: BTreeMap<String, String> = meta
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(EXTRA)?.to_string(), v.clone())))
        .collect();
    // optimizer tensors are not needed to load the weights alone
    let skip_optim = state.optimizer.is_none();
    let unknown: Vec<String> = st
        .names()
        .into_iter()
        .filter(|n| !(used.contains(*n) || skip_optim && n.starts_with("optim/")))
        .map(String::from)
        .collect();
    if !unknown.is_empty() {
        return Err(err(format!(
            "tensors {unknown:?} belong to nothing here (a different model or optimizer?)"
        )));
    }

    // everything checked: apply
    for (p, v) in state.params.iter().zip(values) {
        p.set(v)?;
    }
    if let (Some(opt), Some((hypers, states))) = (state.optimizer.as_deref_mut(), new_opt) {
        for (i, h) in hypers.into_iter().enumerate() {
            *opt.hyper_mut(i)? = h;
        }
        opt.replace_state(states);
    }
    if let (Some(s), Some(new)) = (state.schedule.as_deref_mut(), new_schedule) {
        *s = new;
    }
    if let (Some(s), Some(new)) = (state.scaler.as_deref_mut(), new_scaler) {
        *s = new;
    }
    state.rng_state = rng_state;
    state.step = step;
    state.extra = extra;
    Ok(())
}
