//! State dicts: buffers (tensors a module keeps but does not train, such as BatchNorm's running
//! statistics) and strict loading of parameters and buffers by their official PyTorch names from
//! a converted weight file; [`StateEntry::file_value`] gives each back in the file's layout for
//! saving.

use crate::autograd::{no_grad, Parameter};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::weights::WeightsFile;
use crate::tensor::Tensor;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

/// A named tensor a module keeps and updates itself (no gradient); clones share it.
#[derive(Clone)]
pub struct Buffer(Arc<(String, RwLock<Tensor>)>);

impl Buffer {
    pub fn new(name: impl Into<String>, value: Tensor) -> Buffer {
        Buffer(Arc::new((name.into(), RwLock::new(value.detach()))))
    }

    pub fn name(&self) -> &str {
        &self.0 .0
    }

    pub fn tensor(&self) -> Tensor {
        self.0 .1.read().unwrap().clone()
    }

    /// Replaces the value; shape, dtype and device must stay the same.
    pub fn set(&self, value: Tensor) -> Result<()> {
        let mut v = self.0 .1.write().unwrap();
        if value.shape() != v.shape()
            || value.dtype() != v.dtype()
            || !value.device().same(v.device())
        {
            return Err(Error::Shape(format!(
                "buffer {}: new value {:?} {} on {} does not match {:?} {} on {}",
                self.name(),
                value.shape(),
                value.dtype(),
                value.device(),
                v.shape(),
                v.dtype(),
                v.device()
            )));
        }
        *v = value.detach();
        Ok(())
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({}, {:?})", self.name(), self.tensor())
    }
}

/// Where a state-dict tensor goes.
#[derive(Clone, Debug)]
pub enum Slot {
    /// A parameter stored as in the file.
    Parameter(Parameter),
    /// A convolution weight: OIHW `[O, I/g, KH, KW]` in the file, OHWI `[O, KH, KW, I/g]` in
    /// the engine (converted once, here). Also a transposed convolution's weight, `[Cin, Cout,
    /// KH, KW]` in the file and `[Cin, KH, KW, Cout]` in the engine: the same permutation.
    ConvWeight(Parameter),
    Buffer(Buffer),
}

/// One tensor of a module's state dict.
#[derive(Clone, Debug)]
pub struct StateEntry {
    pub slot: Slot,
    /// Files may leave it out (BatchNorm's `num_batches_tracked`, which `convert` drops).
    pub optional: bool,
}

impl StateEntry {
    pub fn name(&self) -> &str {
        match &self.slot {
            Slot::Parameter(p) | Slot::ConvWeight(p) => p.name(),
            Slot::Buffer(b) => b.name(),
        }
    }

    fn value(&self) -> Tensor {
        match &self.slot {
            Slot::Parameter(p) | Slot::ConvWeight(p) => p.tensor(),
            Slot::Buffer(b) => b.tensor(),
        }
    }

    /// The shape the file must hold.
    pub fn file_shape(&self) -> Vec<usize> {
        let shape = self.value().shape().to_vec();
        match (&self.slot, shape.as_slice()) {
            (Slot::ConvWeight(_), &[o, kh, kw, i]) => vec![o, i, kh, kw],
            _ => shape,
        }
    }

    /// The file's tensor `name` converted to this entry's layout, dtype and device.
    fn read(&self, file: &WeightsFile) -> Result<Tensor> {
        let current = self.value();
        let mut values = file.read_f64(self.name())?;
        if let (Slot::ConvWeight(_), &[o, kh, kw, i]) = (&self.slot, current.shape()) {
            let oihw = values;
            values = Vec::with_capacity(oihw.len());
            for oc in 0..o {
                for y in 0..kh {
                    for x in 0..kw {
                        values.extend((0..i).map(|ic| oihw[((oc * i + ic) * kh + y) * kw + x]));
                    }
                }
            }
        }
        Tensor::from_f64(&values, current.shape(), current.dtype(), current.device())
    }

    /// The value as the file stores it (a convolution weight back in OIHW).
    pub fn file_value(&self) -> Result<Tensor> {
        match &self.slot {
            Slot::ConvWeight(p) => p.tensor().detach().permute(&[0, 3, 1, 2])?.contiguous(),
            _ => Ok(self.value().detach()),
        }
    }

    fn store(&self, value: Tensor) -> Result<()> {
        match &self.slot {
            Slot::Parameter(p) | Slot::ConvWeight(p) => p.set(value),
            Slot::Buffer(b) => b.set(value),
        }
    }
}

/// The entries of parameters and buffers stored as in the file.
pub fn plain_entries(params: &[Parameter], buffers: &[Buffer]) -> Vec<StateEntry> {
    let params = params.iter().map(|p| StateEntry {
        slot: Slot::Parameter(p.clone()),
        optional: false,
    });
    let buffers = buffers.iter().map(|b| StateEntry {
        slot: Slot::Buffer(b.clone()),
        optional: false,
    });
    params.chain(buffers).collect()
}

/// Loads every entry from `file`, strictly: each required entry must be in the file with the
/// right shape, and every tensor of the file must belong to an entry. Nothing changes unless
/// everything fits; otherwise one error names the file and lists the missing, unexpected,
/// mis-shaped and mis-typed (integers for a float tensor or the reverse) keys. With `check_shapes` false only names are compared (the caller could not
/// read the model's widths because a key that gives one is missing). Float tensors are
/// converted to each entry's dtype (an f16 file loads into an f32 model).
pub fn load_strict(entries: &[StateEntry], file: &WeightsFile, check_shapes: bool) -> Result<()> {
    let mut missing = Vec::new();
    let mut misshaped = Vec::new();
    let mut mistyped = Vec::new();
    let mut claimed = BTreeSet::new();
    for e in entries {
        let name = e.name();
        claimed.insert(name.to_string());
        match file.shape(name) {
            None if e.optional => {}
            None => missing.push(name.to_string()),
            Some(got) => {
                let want = e.file_shape();
                if check_shapes && got != want.as_slice() {
                    misshaped.push(format!("{name} (file {got:?}, model {want:?})"));
                }
                let float = e.value().dtype().is_float();
                if file.holds_floats(name) != Some(float) {
                    let want = if float { "floats" } else { "integers" };
                    mistyped.push(format!("{name} (the model holds {want})"));
                }
            }
        }
    }
    let unexpected: Vec<String> = file
        .names()
        .into_iter()
        .filter(|n| !claimed.contains(n))
        .collect();
    let problems = [&missing, &unexpected, &misshaped, &mistyped];
    if problems.iter().any(|list| !list.is_empty()) {
        let mut parts = Vec::new();
        for (what, list) in [
            ("missing keys", &missing),
            ("unexpected keys", &unexpected),
            ("mis-shaped keys", &misshaped),
            ("mis-typed keys", &mistyped),
        ] {
            if !list.is_empty() {
                parts.push(format!("{what} ({}): {}", list.len(), shorten(list)));
            }
        }
        return Err(file.error(format!(
            "the weights do not fit the model its metadata describes: {}",
            parts.join("; ")
        )));
    }
    no_grad(|| {
        let values = entries
            .iter()
            .filter(|e| file.contains(e.name()))
            .map(|e| Ok((e, e.read(file)?)))
            .collect::<Result<Vec<_>>>()?;
        for (e, v) in values {
            e.store(v)?;
        }
        Ok(())
    })
}

/// At most 12 names, then how many more.
fn shorten(list: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = list[..list.len().min(SHOWN)].join(", ");
    if list.len() > SHOWN {
        s.push_str(&format!(", ... and {} more", list.len() - SHOWN));
    }
    s
}

/// A scalar i64 buffer on the CPU (BatchNorm's `num_batches_tracked`).
pub(crate) fn counter(name: String) -> Result<Buffer> {
    let zero = Tensor::zeros(&[], DType::I64, &crate::device::Device::Cpu)?;
    Ok(Buffer::new(name, zero))
}
