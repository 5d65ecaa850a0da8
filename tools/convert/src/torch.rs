//! Giving meaning to the inert pickle graph: where the state dict is, and which of its
//! records are tensors.
//!
//! Only a handful of globals may appear inside a state dict: the tensor and parameter rebuild
//! functions torch has used since 0.4, the tensor/parameter classes that
//! `_rebuild_from_type_v2` names, `collections.OrderedDict` (empty backward-hook dicts) and the
//! typed storage classes. Anything else inside the state dict is an error that names it.
//! Objects outside the state dict (optimizer states, numpy recalls, argparse namespaces) are
//! never interpreted at all.

use std::borrow::Cow;

use crate::container::Checkpoint;
use crate::error::Result;
use crate::pickle::{Obj, Pickle, Value};
use crate::{bail, err};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
        }
    }
}

/// The dtype of a legacy typed-storage class name (`FloatStorage` -> f32). Torch still
/// writes these names in zip checkpoints, whatever the in-memory storage class.
pub fn storage_dtype(class: &str) -> Option<DType> {
    Some(match class {
        "DoubleStorage" => DType::F64,
        "FloatStorage" => DType::F32,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "IntStorage" => DType::I32,
        "ShortStorage" => DType::I16,
        "CharStorage" => DType::I8,
        "ByteStorage" => DType::U8,
        "BoolStorage" => DType::Bool,
        _ => return None,
    })
}

/// One tensor of the state dict, its bytes borrowed from the file when they are contiguous.
pub struct Tensor<'a> {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl safetensors::View for &Tensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The state dict found in a checkpoint.
pub struct StateDict<'a> {
    /// Where it was found: "the top-level dict" or "key \"model_state_dict\"".
    pub location: String,
    pub tensors: Vec<Tensor<'a>>,
}

/// Wrapper keys the official repositories put their state dict under, most specific first.
const WRAPPER_KEYS: [&str; 3] = ["model_state_dict", "state_dict", "model"];

/// Deep enough for any real nesting (parameter -> from_type -> tensor -> storage -> tuple),
/// shallow enough that a cyclic or absurdly nested pickle is refused quickly.
const MAX_DEPTH: usize = 16;

fn dict_items<'p>(p: &'p Pickle, v: &Value) -> Option<&'p [(Value, Value)]> {
    match p.obj(v) {
        Some(Obj::Dict(items)) => Some(items),
        _ => None,
    }
}

fn lookup<'p>(items: &'p [(Value, Value)], key: &str) -> Option<&'p Value> {
    // Python dicts keep the last value written for a key.
    items
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v)
}

fn str_keys(items: &[(Value, Value)]) -> String {
    let keys: Vec<String> = items
        .iter()
        .take(12)
        .map(|(k, _)| match k {
            Value::Str(s) => s.to_string(),
            _ => "<non-string>".into(),
        })
        .collect();
    let more = items.len().saturating_sub(12);
    if more > 0 {
        format!("{} and {more} more", keys.join(", "))
    } else {
        keys.join(", ")
    }
}

/// Finds the state dict: under `--key` when given (`a/b` descends), else under one of the
/// official wrapper keys, else the top-level dict itself. The tensors may add up to at most
/// `max_bytes`.
pub fn state_dict<'a>(
    ck: &Checkpoint<'a>,
    key: Option<&str>,
    max_bytes: usize,
) -> Result<StateDict<'a>> {
    let p = &ck.pickle;
    let Some(top) = dict_items(p, &p.root) else {
        if let Some(Obj::Call { func, .. }) = p.obj(&p.root) {
            if let Some((m, n)) = p.global(func) {
                bail!("checkpoint holds a pickled object of class {m}.{n}, not a dict; load it in PyTorch and save its state_dict()");
            }
        }
        bail!("checkpoint holds {}, not a dict", p.describe(&p.root));
    };
    let (location, items) = match key {
        Some(path) => {
            let mut items = top;
            for part in path.split('/') {
                let v = lookup(items, part).ok_or_else(|| {
                    err!(
                        "--key {path:?}: no key {part:?} (keys there: {})",
                        str_keys(items)
                    )
                })?;
                items = dict_items(p, v).ok_or_else(|| {
                    err!(
                        "--key {path:?}: {part:?} holds {}, not a dict",
                        p.describe(v)
                    )
                })?;
            }
            (format!("key {path:?}"), items)
        }
        None => WRAPPER_KEYS
            .iter()
            .find_map(|k| {
                lookup(top, k)
                    .and_then(|v| dict_items(p, v))
                    .map(|d| (format!("key {k:?}"), d))
            })
            .unwrap_or_else(|| ("the top-level dict".to_string(), top)),
    };

    let mut tensors: Vec<Tensor<'a>> = Vec::with_capacity(items.len());
    let mut total = 0usize;
    for (k, v) in items {
        let Value::Str(name) = k else {
            bail!(
                "state dict in {location} has a non-string key ({})",
                p.describe(k)
            );
        };
        check_globals(p, v, 0).map_err(|e| err!("state dict entry {name:?}: {e}"))?;
        let t = tensor(ck, v, 0).map_err(|e| {
            if location == "the top-level dict" && !is_call(p, v) {
                err!(
                    "state dict entry {name:?}: {e}; if the state dict is nested, pass --key (top-level keys: {})",
                    str_keys(items)
                )
            } else {
                err!("state dict entry {name:?}: {e}")
            }
        })?;
        total += t.data.len();
        if total > max_bytes {
            bail!("tensors add up to more than {max_bytes} bytes, 4 times the file: storages are reused too often");
        }
        let t = Tensor {
            name: name.to_string(),
            ..t
        };
        match tensors.iter_mut().find(|x| x.name == t.name) {
            Some(old) => *old = t,
            None => tensors.push(t),
        }
    }
    if tensors.is_empty() {
        bail!("state dict in {location} is empty");
    }
    Ok(StateDict { location, tensors })
}

fn is_call(p: &Pickle, v: &Value) -> bool {
    matches!(p.obj(v), Some(Obj::Call { .. }))
}

fn allowed_global(module: &str, name: &str) -> bool {
    matches!(
        (module, name),
        ("collections", "OrderedDict")
            | ("torch._utils", "_rebuild_tensor")
            | ("torch._utils", "_rebuild_tensor_v2")
            | ("torch._utils", "_rebuild_parameter")
            | ("torch._utils", "_rebuild_parameter_with_state")
            | ("torch._tensor", "_rebuild_from_type_v2")
            | ("torch", "Tensor")
            | ("torch.nn.parameter", "Parameter")
    ) || (module == "torch" && storage_dtype(name).is_some())
}

/// Refuses any global inside a state-dict entry that is not on the list above.
fn check_globals(p: &Pickle, v: &Value, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("nesting deeper than {MAX_DEPTH} levels (cyclic or hostile pickle)");
    }
    let Some(o) = p.obj(v) else { return Ok(()) };
    let each = |vs: &mut dyn Iterator<Item = &Value>| -> Result<()> {
        for x in vs {
            check_globals(p, x, depth + 1)?;
        }
        Ok(())
    };
    match o {
        Obj::Global { module, name } if !allowed_global(module, name) => {
            bail!("uses {module}.{name}, which is not a tensor rebuild function or storage type")
        }
        Obj::Global { .. } => Ok(()),
        Obj::Tuple(xs) | Obj::List(xs) | Obj::Set(xs) => each(&mut xs.iter()),
        Obj::Dict(kv) => each(&mut kv.iter().flat_map(|(k, v)| [k, v])),
        Obj::PersId(x) => check_globals(p, x, depth + 1),
        Obj::Call {
            func,
            args,
            state,
            dict_items,
            list_items,
        } => {
            check_globals(p, func, depth + 1)?;
            check_globals(p, args, depth + 1)?;
            if let Some(s) = state {
                check_globals(p, s, depth + 1)?;
            }
            each(&mut dict_items.iter().flat_map(|(k, v)| [k, v]))?;
            each(&mut list_items.iter())
        }
    }
}

fn tuple<'p>(p: &'p Pickle, v: &Value, what: &str) -> Result<&'p [Value]> {
    match p.obj(v) {
        Some(Obj::Tuple(t)) => Ok(t),
        _ => bail!("{what} is {}, not a tuple", p.describe(v)),
    }
}

fn int(v: &Value, what: &str) -> Result<usize> {
    match v {
        Value::Int(i) if *i >= 0 => Ok(*i as usize),
        Value::Int(i) => bail!("{what} is negative ({i})"),
        _ => bail!("{what} is not an integer"),
    }
}

fn ints(p: &Pickle, v: &Value, what: &str) -> Result<Vec<usize>> {
    tuple(p, v, what)?.iter().map(|x| int(x, what)).collect()
}

/// Interprets a state-dict value as a tensor, through the known rebuild functions only.
fn tensor<'a>(ck: &Checkpoint<'a>, v: &Value, depth: usize) -> Result<Tensor<'a>> {
    let p = &ck.pickle;
    if depth > 4 {
        bail!("tensor rebuild calls nest too deeply");
    }
    let Some(Obj::Call { func, args, .. }) = p.obj(v) else {
        bail!("is {}, not a tensor", p.describe(v));
    };
    let Some((module, name)) = p.global(func) else {
        bail!("is built by a non-global callable, not a tensor");
    };
    let args = tuple(p, args, "rebuild arguments")?;
    match (module, name) {
        ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
            let [storage, offset, size, stride, ..] = args else {
                bail!("{name} has {} arguments, expected at least 4", args.len());
            };
            rebuild(
                ck,
                storage,
                int(offset, "storage offset")?,
                ints(p, size, "size")?,
                ints(p, stride, "stride")?,
            )
        }
        ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
            let data = args
                .first()
                .ok_or_else(|| err!("{name} has no arguments"))?;
            tensor(ck, data, depth + 1)
        }
        ("torch._tensor", "_rebuild_from_type_v2") => {
            let [inner, new_type, inner_args, ..] = args else {
                bail!("{name} has {} arguments, expected at least 3", args.len());
            };
            match p.global(new_type) {
                Some(("torch", "Tensor") | ("torch.nn.parameter", "Parameter")) => {}
                _ => bail!(
                    "{name} rebuilds a {}, not a plain tensor",
                    p.describe(new_type)
                ),
            }
            // Re-express `inner(*inner_args)` as the call record it stands for.
            let Some(("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor")) = p.global(inner)
            else {
                bail!("{name} wraps {}, not a tensor rebuild", p.describe(inner));
            };
            let a = tuple(p, inner_args, "rebuild arguments")?;
            let [storage, offset, size, stride, ..] = a else {
                bail!(
                    "{name} has {} inner arguments, expected at least 4",
                    a.len()
                );
            };
            rebuild(
                ck,
                storage,
                int(offset, "storage offset")?,
                ints(p, size, "size")?,
                ints(p, stride, "stride")?,
            )
        }
        _ => bail!("is built by {module}.{name}, not a tensor rebuild function"),
    }
}

/// Resolves a storage persistent id to (dtype, bytes).
fn storage<'a>(ck: &Checkpoint<'a>, v: &Value) -> Result<(DType, &'a [u8])> {
    let p = &ck.pickle;
    let Some(Obj::PersId(id)) = p.obj(v) else {
        bail!("storage is {}, not a persistent id", p.describe(v));
    };
    let f = tuple(p, id, "storage id")?;
    // zip: ('storage', type, key, location, numel); legacy adds view metadata.
    let (Some(Value::Str(tag)), Some(ty), Some(Value::Str(key)), Some(numel)) =
        (f.first(), f.get(1), f.get(2), f.get(4))
    else {
        bail!("storage id has an unexpected layout");
    };
    if &**tag != "storage" {
        bail!("persistent id {tag:?} is not a storage");
    }
    let class = match p.global(ty) {
        Some(("torch", class)) => class,
        _ => bail!("storage type is {}", p.describe(ty)),
    };
    let dtype =
        storage_dtype(class).ok_or_else(|| err!("unsupported storage type torch.{class}"))?;
    let numel = int(numel, "storage size")?;
    let mut bytes = ck.storage(key)?;
    if let Some(view) = f.get(5).filter(|v| **v != Value::None) {
        // Storage views (torch < 0.4): (view key, offset, size) in elements of the root.
        let t = tuple(p, view, "storage view")?;
        let (Some(off), Some(len)) = (t.get(1), t.get(2)) else {
            bail!("storage view has an unexpected layout");
        };
        let (off, len) = (int(off, "view offset")?, int(len, "view size")?);
        bytes = off
            .checked_add(len)
            .and_then(|end| end.checked_mul(dtype.size()))
            .and_then(|end| bytes.get(off * dtype.size()..end))
            .ok_or_else(|| err!("storage view {key:?} lies outside its storage"))?;
    }
    let need = numel
        .checked_mul(dtype.size())
        .ok_or_else(|| err!("storage {key:?} declares an absurd size of {numel} elements"))?;
    if bytes.len() < need {
        bail!(
            "storage {key:?} holds {} bytes but declares {numel} elements of {} bytes",
            bytes.len(),
            dtype.size()
        );
    }
    Ok((dtype, &bytes[..need]))
}

fn rebuild<'a>(
    ck: &Checkpoint<'a>,
    st: &Value,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
) -> Result<Tensor<'a>> {
    let (dtype, bytes) = storage(ck, st)?;
    if shape.len() != stride.len() {
        bail!("size {shape:?} and stride {stride:?} have different ranks");
    }
    let es = dtype.size();
    let avail = bytes.len() / es;
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &s| a.checked_mul(s))
        .ok_or_else(|| err!("absurd shape {shape:?}"))?;
    let tensor = |data| Tensor {
        name: String::new(),
        dtype,
        shape: shape.clone(),
        data,
    };
    if numel == 0 {
        return Ok(tensor(Cow::Borrowed(&bytes[..0])));
    }
    // The last element the view touches must lie inside the storage.
    shape
        .iter()
        .zip(&stride)
        .try_fold(offset, |a, (&s, &st)| (s - 1).checked_mul(st).and_then(|x| a.checked_add(x)))
        .filter(|&l| l < avail)
        .ok_or_else(|| err!("shape {shape:?} with stride {stride:?} at offset {offset} reaches past its storage of {avail} elements"))?;
    // Overlapping views (expand, stride 0) would make the copy larger than the file.
    if numel > avail {
        bail!("shape {shape:?} has more elements than its storage ({avail}); overlapping views are not supported");
    }
    let mut expect = 1;
    let contiguous = shape.iter().zip(&stride).rev().all(|(&s, &st)| {
        let ok = s == 1 || st == expect;
        expect *= s;
        ok
    });
    if contiguous {
        return Ok(tensor(Cow::Borrowed(
            &bytes[offset * es..(offset + numel) * es],
        )));
    }
    // Non-contiguous (a transposed weight, a slice of a shared buffer): gather in C order.
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let at = offset + idx.iter().zip(&stride).map(|(i, s)| i * s).sum::<usize>();
        out.extend_from_slice(&bytes[at * es..(at + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    Ok(tensor(Cow::Owned(out)))
}
