//! Files the engine reads and writes besides checkpoints: converted model weights
//! (safetensors with `vpr.*` metadata), `.npy` descriptor matrices and the images descriptors
//! are extracted from. What the engine writes goes to a temporary file in the same folder that
//! is renamed into place, so a reader never sees half a file.

pub mod image;
pub mod jpeg;
pub mod npy;
pub mod weights;

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written under a temporary name in its final folder; `commit` renames it into
/// place, and dropping it uncommitted deletes the temporary file.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    writer: BufWriter<File>,
    committed: bool,
}

impl AtomicFile {
    /// Starts writing `path` (as `.NAME.tmp-PID` beside it).
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::Argument(format!("{}: not a file path", path.display())))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let file = File::create(&tmp).map_err(|source| io_error(&tmp, source))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            writer: BufWriter::new(file),
            committed: false,
        })
    }

    /// Flushes and syncs the temporary file and renames it to the final path.
    pub fn commit(mut self) -> Result<()> {
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().sync_all())
            .map_err(|source| io_error(&self.path, source))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|source| io_error(&self.path, source))?;
        self.committed = true;
        Ok(())
    }

    /// Appends `bytes`; an error names the final path.
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .map_err(|source| io_error(&self.path, source))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `Error::Io` naming `path`.
pub(crate) fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        source,
    }
}
