//! The conversion itself: checkpoint bytes in, named tensors and metadata out, then an
//! all-or-nothing write.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::arch;
use crate::container;
use crate::error::Result;
use crate::torch::{self, DType, Tensor};
use crate::{bail, err};

/// Version of the `vpr.*` metadata schema this converter writes.
pub const SCHEMA: &str = "1";

#[derive(Debug, Default, Clone)]
pub struct Options {
    /// `--arch`: one of [`arch::ARCHES`] or `raw`; `None` recognises.
    pub arch: Option<String>,
    /// `--key`: where the state dict sits (`a/b` for nested dicts).
    pub key: Option<String>,
}

/// Everything that will be written, before it is written.
pub struct Converted<'a> {
    pub tensors: Vec<Tensor<'a>>,
    pub metadata: HashMap<String, String>,
    /// Things the user should know (dropped counters, stripped prefixes, assumptions).
    pub notes: Vec<String>,
}

/// Reads a checkpoint from memory. `file_name` goes into the metadata and helps tell
/// CosPlace from EigenPlaces.
pub fn convert_bytes<'a>(data: &'a [u8], file_name: &str, opts: &Options) -> Result<Converted<'a>> {
    let ck = container::open(data)?;
    // Views may share storage, so a hostile pickle could name one large storage thousands of
    // times and make the output (and the gathered copies) explode. Real checkpoints use each
    // stored byte once, or twice for tied weights.
    let sd = torch::state_dict(&ck, opts.key.as_deref(), 4 * data.len())?;
    let mut notes = Vec::new();
    if sd.location != "the top-level dict" {
        notes.push(format!("state dict found under {}", sd.location));
    }
    let mut tensors = sd.tensors;

    // DataParallel / DDP wrap the model as `module`; strip it only when every key has it,
    // so a model with a submodule that happens to be called `module` is left alone.
    while tensors.iter().all(|t| t.name.starts_with("module.")) {
        for t in &mut tensors {
            t.name.drain(.."module.".len());
        }
        notes.push("stripped the DataParallel prefix \"module.\"".into());
    }

    // BatchNorm's step counters are training state, not weights.
    let before = tensors.len();
    tensors.retain(|t| !(t.name.ends_with("num_batches_tracked") && t.dtype == DType::I64));
    if tensors.len() < before {
        notes.push(format!(
            "dropped {} num_batches_tracked counters (int64 training state)",
            before - tensors.len()
        ));
    }
    if tensors.is_empty() {
        bail!("state dict holds nothing but BatchNorm counters");
    }

    let mut metadata = HashMap::new();
    if opts.arch.as_deref() == Some("raw") {
        metadata.insert("vpr.arch".to_string(), "raw".to_string());
    } else {
        let shapes: Vec<(String, Vec<usize>)> = tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        let found = arch::recognise(&shapes, opts.arch.as_deref(), file_name)?;
        tensors.retain(|t| !found.dropped.contains(&t.name));
        notes.extend(found.notes);
        metadata.extend(found.meta);
    }
    metadata.insert("vpr.format".into(), SCHEMA.into());
    metadata.insert("vpr.source".into(), file_name.into());
    metadata.insert("vpr.source.format".into(), ck.format.name().into());
    metadata.insert(
        "vpr.converter".into(),
        format!("convert {}", env!("CARGO_PKG_VERSION")),
    );
    Ok(Converted {
        tensors,
        metadata,
        notes,
    })
}

/// Converts `input` to `output`. The output is written under a temporary name in the same
/// folder and renamed at the end, so a failure never leaves a partial file behind.
pub fn convert_file(input: &Path, output: &Path, opts: &Options) -> Result<Vec<String>> {
    let file = fs::File::open(input).map_err(|e| err!("cannot open: {e}"))?;
    let len = file.metadata().map_err(|e| err!("cannot stat: {e}"))?.len();
    if len == 0 {
        bail!("file is empty");
    }
    // SAFETY: the map is read-only and dropped before we return; a checkpoint rewritten by
    // another process while we read it is outside what this tool can defend against.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| err!("cannot map: {e}"))?;
    let name = input
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let conv = convert_bytes(&map, &name, opts)?;

    let tmp = temp_name(output);
    let write = safetensors::serialize_to_file(
        conv.tensors.iter().map(|t| (t.name.as_str(), t)),
        Some(conv.metadata),
        &tmp,
    )
    .map_err(|e| err!("cannot write {}: {e}", tmp.display()))
    .and_then(|()| {
        fs::rename(&tmp, output).map_err(|e| err!("cannot rename to {}: {e}", output.display()))
    });
    if write.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    write.map(|()| conv.notes)
}

fn temp_name(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{}.partial", std::process::id()));
    output.with_file_name(name)
}
