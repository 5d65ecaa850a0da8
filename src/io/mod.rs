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
        // readable too, so that `map_whole` can map it
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|source| io_error(&tmp, source))?;
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

    /// The final path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the temporary file's length to `len` and maps all of it for writing (what was
    /// written before is flushed first and stays).
    pub fn map_whole(&mut self, len: u64) -> Result<memmap2::MmapMut> {
        self.writer
            .flush()
            .and_then(|()| self.writer.get_ref().set_len(len))
            .map_err(|source| io_error(&self.path, source))?;
        // SAFETY: the temporary file is ours alone (a name with our process id, not yet renamed
        // into place), so nothing else writes or truncates it while the map lives.
        unsafe { memmap2::MmapMut::map_mut(self.writer.get_ref()) }
            .map_err(|source| io_error(&self.path, source))
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
