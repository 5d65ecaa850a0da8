//! Converted weight files: a memory-mapped safetensors file whose tensors keep the official
//! PyTorch names and whose `__metadata__` says how to build the model (`vpr.arch`,
//! `vpr.backbone`, ...; see tools/convert/README.md). Tensors are read by name and converted to
//! the dtype the caller asks for (f16, bf16, f32 and f64 files all load into an f32 model);
//! nothing is copied until a tensor is read. Every error names the file.
//!
//! [`write_weights`] writes such a file (a trained model), through a temporary file renamed into
//! place, so a crash never leaves half a file under the final name.

use super::AtomicFile;
use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors, TensorView};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An open weight file.
pub struct WeightsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    /// Where the tensor data starts in the file (after the length word and the JSON header).
    data_start: usize,
    header: Metadata,
    metadata: BTreeMap<String, String>,
}

impl WeightsFile {
    /// Maps `path` and parses its header (tensor names, dtypes, shapes and offsets, metadata).
    pub fn open(path: &Path) -> Result<WeightsFile> {
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        // SAFETY: the map is only read; weight files are written once (to a temporary file that
        // is then renamed) and never modified in place while a model loads.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: shown.clone(),
            source,
        })?;
        let (header_len, header) = SafeTensors::read_metadata(&map).map_err(|e| Error::Format {
            path: shown,
            message: format!("not a readable safetensors file (truncated or corrupted?): {e}"),
        })?;
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        Ok(WeightsFile {
            path: path.to_path_buf(),
            map,
            data_start: 8 + header_len,
            header,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file's contents.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::Format {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    /// The whole `__metadata__` (empty when the file has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// One metadata entry.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// One metadata entry that must be there.
    pub fn require(&self, key: &str) -> Result<&str> {
        self.meta(key)
            .ok_or_else(|| self.error(format!("metadata entry '{key}' is missing")))
    }

    /// A metadata entry parsed as `T`.
    pub fn require_parsed<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let v = self.require(key)?;
        v.trim().parse().map_err(|_| {
            self.error(format!(
                "metadata entry '{key}' = '{v}' is not a valid {}",
                std::any::type_name::<T>()
            ))
        })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.header.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.header.info(name).is_some()
    }

    /// The shape of a tensor, if the file has it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.header.info(name).map(|i| i.shape.as_slice())
    }

    /// Whether a tensor holds floating-point values (f16, bf16, f32, f64), if the file has it.
    pub fn holds_floats(&self, name: &str) -> Option<bool> {
        self.header.info(name).map(|i| {
            matches!(
                i.dtype,
                StDtype::F16 | StDtype::BF16 | StDtype::F32 | StDtype::F64
            )
        })
    }

    /// A tensor's values as f64 (exact for every float and integer dtype up to 32 bits).
    pub fn read_f64(&self, name: &str) -> Result<Vec<f64>> {
        let info = self
            .header
            .info(name)
            .ok_or_else(|| self.error(format!("tensor '{name}' is missing")))?;
        let (start, end) = info.data_offsets;
        let bytes = &self.map[self.data_start + start..self.data_start + end];
        fn words<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            bytes
                .chunks_exact(N)
                .map(|b| f(b.try_into().expect("chunks_exact yields N bytes")))
                .collect()
        }
        Ok(match info.dtype {
            StDtype::F32 => words(bytes, |b| f32::from_le_bytes(b) as f64),
            StDtype::F16 => words(bytes, |b| f16::from_le_bytes(b).to_f64()),
            StDtype::BF16 => words(bytes, |b| bf16::from_le_bytes(b).to_f64()),
            StDtype::F64 => words(bytes, f64::from_le_bytes),
            StDtype::I64 => words(bytes, |b| i64::from_le_bytes(b) as f64),
            StDtype::I32 => words(bytes, |b| i32::from_le_bytes(b) as f64),
            other => {
                return Err(self.error(format!(
                    "tensor '{name}' has dtype {other:?}, which is not a weight dtype"
                )))
            }
        })
    }

    /// A tensor converted to `dtype` (rounded to nearest) on `device`, in the file's shape.
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let values = self.read_f64(name)?;
        let shape = self.shape(name).unwrap_or_default().to_vec();
        Tensor::from_f64(&values, &shape, dtype, device)
    }
}

/// Writes `tensors` (f32, or i64 counters; any device) under their names with `metadata`
/// as a safetensors file at `path`: a temporary file in the same folder, synced, then renamed.
pub fn write_weights(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let shown = path.display().to_string();
    let err = |message: String| Error::Format {
        path: shown.clone(),
        message,
    };
    let mut data = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let (dtype, bytes) = match t.dtype() {
            DType::I64 => (
                StDtype::I64,
                bytemuck::cast_slice(&t.to_vec::<i64>()?).to_vec(),
            ),
            _ => {
                let v = t.to_dtype(DType::F32)?.to_vec::<f32>()?;
                (StDtype::F32, bytemuck::cast_slice(&v).to_vec())
            }
        };
        data.push((name, dtype, t.shape().to_vec(), bytes));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.to_string(), v))
                .map_err(|e| err(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = metadata.clone().into_iter().collect();
    let bytes =
        safetensors::tensor::serialize(views, Some(meta)).map_err(|e| err(e.to_string()))?;
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(&bytes)?;
    file.commit()
}

impl std::fmt::Debug for WeightsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WeightsFile({}, {} tensors)",
            self.path.display(),
            self.header.tensors().len()
        )
    }
}
