//! `extract`: global descriptors of every image under a folder, row i for the i-th path in
//! sorted order, written as a float32 `.npy` and a list of the paths.
//!
//! Loader threads decode, normalise and resize images ahead of the model through bounded
//! channels, so the device does not wait on JPEG decoding and memory stays flat (only the
//! descriptors are kept). Consecutive images of the same size are batched together (up to the
//! batch size), keeping the order.

use crate::error::{Error, Result};
use crate::io::image::{self, ImageF32};
use crate::io::npy::{self, Matrix};
use crate::io::AtomicFile;
use crate::models::{InputSize, InputSpec, PlaceModel};
use crate::tensor::Tensor;
use crate::DType;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};

/// How `extract_descriptors` runs.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// Most images per model call.
    pub batch_size: usize,
    /// `[height, width]` every image is resized to, instead of the model's own size rule.
    pub resize: Option<[usize; 2]>,
    /// Whether resizing antialiases, instead of what the model's file says.
    pub antialias: Option<bool>,
    /// Threads decoding and preparing images.
    pub loader_threads: usize,
    /// Where to write the local feature maps `[N, h, w, C]` of a model that has them (SelaVPR),
    /// as a float32 `.npy` written through a memory map as the batches come.
    pub local: Option<PathBuf>,
}

impl ExtractOptions {
    /// Batches of `batch_size`, the model's size rule, a loader thread per core.
    pub fn new(batch_size: usize) -> ExtractOptions {
        ExtractOptions {
            batch_size,
            resize: None,
            antialias: None,
            loader_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            local: None,
        }
    }
}

/// Whether a file name is an image `extract` reads (`.jpg`, `.jpeg`, `.png`, any case).
fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        ["jpg", "jpeg", "png"]
            .iter()
            .any(|x| e.eq_ignore_ascii_case(x))
    })
}

/// Every image under `dir` (recursively, following symbolic links to files but not to
/// folders), sorted as Python's `sorted()` sorts the path strings (byte order of UTF-8). Hidden
/// files and folders (names starting with '.') are left out, as Python's `glob` leaves them out
/// of the VPR tools' listings, so that row i is the same image as theirs. An error if `dir` is
/// not a folder or holds no image.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(dir).map_err(|source| Error::Io {
        path: dir.display().to_string(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(Error::Argument(format!(
            "{} is not a folder",
            dir.display()
        )));
    }
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let io_err = |source| Error::Io {
            path: folder.display().to_string(),
            source,
        };
        for entry in std::fs::read_dir(&folder).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            let kind = entry.file_type().map_err(io_err)?;
            if kind.is_dir() {
                pending.push(path);
            } else if is_image(&path) && (kind.is_file() || path.is_file()) {
                found.push(path);
            }
        }
    }
    if found.is_empty() {
        return Err(Error::Argument(format!(
            "no .jpg, .jpeg or .png image under {}",
            dir.display()
        )));
    }
    let mut named = found
        .into_iter()
        .map(|p| match p.to_str() {
            Some(s) if !s.contains('\n') => Ok((s.to_string(), p)),
            _ => Err(Error::Argument(format!(
                "{}: paths must be UTF-8 without line breaks to be listed in the paths file",
                p.display()
            ))),
        })
        .collect::<Result<Vec<_>>>()?;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(named.into_iter().map(|(_, p)| p).collect())
}

/// Checks `resize` against the model's size rule before any image is read: a fixed-size model
/// takes only its size, a patch model only multiples of its patch.
pub fn check_resize(spec: &InputSpec, resize: Option<[usize; 2]>) -> Result<()> {
    let Some([height, width]) = resize else {
        return Ok(());
    };
    match spec.size {
        InputSize::Fixed {
            height: h,
            width: w,
        } if [h, w] != [height, width] => Err(Error::Argument(format!(
            "--resize {height}x{width}: the model only takes {h}x{w} images"
        ))),
        InputSize::Multiple(k) if height % k != 0 || width % k != 0 => Err(Error::Argument(
            format!("--resize {height}x{width}: the model needs sides that are multiples of {k}"),
        )),
        _ => Ok(()),
    }
}

/// The image at `path` as the model takes it: decoded to RGB, ToTensor, normalised with the
/// model's mean and std, then resized (to `resize`, else as the model's size rule says; with
/// antialias if `antialias`).
pub fn prepare_image(
    path: &Path,
    spec: &InputSpec,
    resize: Option<[usize; 2]>,
    antialias: bool,
) -> Result<ImageF32> {
    let decoded = image::decode(path)?;
    let [height, width] = match (resize, spec.size) {
        (Some(size), _) => size,
        (None, InputSize::Resize { height, width } | InputSize::Fixed { height, width }) => {
            [height, width]
        }
        (None, InputSize::Multiple(k)) if decoded.height % k != 0 || decoded.width % k != 0 => {
            return Err(Error::Format {
                path: path.display().to_string(),
                message: format!(
                    "{}x{} is not a multiple of the model's patch size {k}: use --resize",
                    decoded.height, decoded.width
                ),
            })
        }
        (None, InputSize::Any | InputSize::Multiple(_)) => [decoded.height, decoded.width],
    };
    let normalised = image::to_normalized_tensor(&decoded, spec.mean, spec.std);
    Ok(image::resize(&normalised, height, width, antialias))
}

/// Descriptors `[paths.len(), model.dim()]` of the images, row i for `paths[i]`, and with
/// `options.local` their local feature maps in that file (committed when every image is done).
/// `progress` is called with the number of images done after each batch.
pub fn extract_descriptors(
    model: &dyn PlaceModel,
    paths: &[PathBuf],
    options: &ExtractOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Matrix> {
    if options.batch_size == 0 {
        return Err(Error::Argument("the batch size must be at least 1".into()));
    }
    check_resize(model.input(), options.resize)?;
    if options.local.is_some() && !model.has_local_features() {
        return Err(Error::Argument(format!(
            "{} has no local features to write",
            model.describe()
        )));
    }
    let threads = options.loader_threads.clamp(1, paths.len().max(1));
    // enough prepared images per loader for a whole batch to wait while the model runs
    let depth = options.batch_size.div_ceil(threads) + 1;
    let spec = model.input();
    let antialias = options.antialias.unwrap_or(spec.antialias);
    std::thread::scope(|scope| {
        let receivers: Vec<Receiver<Result<ImageF32>>> = (0..threads)
            .map(|first| {
                let (sender, receiver) = sync_channel(depth);
                scope.spawn(move || {
                    for path in paths.iter().skip(first).step_by(threads) {
                        let prepared = prepare_image(path, spec, options.resize, antialias);
                        let failed = prepared.is_err();
                        // a closed channel means the model side stopped: nothing left to do
                        if sender.send(prepared).is_err() || failed {
                            return;
                        }
                    }
                });
                receiver
            })
            .collect();
        // loader `i % threads` prepares image i, so taking them round-robin keeps the order;
        // returning drops the receivers, which stops the loaders if the model side failed
        let next = |i: usize| {
            receivers[i % threads].recv().unwrap_or_else(|_| {
                Err(Error::Argument(format!(
                    "the loader of {} stopped",
                    paths[i].display()
                )))
            })
        };
        let mut local = options.local.as_deref().map(|path| LocalFile {
            path,
            count: paths.len(),
            writer: None,
        });
        let matrix = run_in_batches(
            model,
            paths.len(),
            next,
            options.batch_size,
            local.as_mut(),
            progress,
        )?;
        if let Some(local) = local {
            local.commit()?;
        }
        Ok(matrix)
    })
}

/// The local feature maps of every image, written as the batches come: the file is created at
/// the first batch, when the maps' shape is known, and every later map must have that shape.
struct LocalFile<'a> {
    path: &'a Path,
    count: usize,
    writer: Option<(npy::RowWriter, Vec<usize>)>,
}

impl LocalFile<'_> {
    /// Writes the maps `[B, h, w, C]` of images `start..start + B`.
    fn write(&mut self, start: usize, maps: &Tensor) -> Result<()> {
        let shape = maps.shape()[1..].to_vec();
        let (writer, expected) = match &mut self.writer {
            Some(w) => w,
            None => {
                let full: Vec<usize> = std::iter::once(self.count).chain(shape.clone()).collect();
                let writer = npy::RowWriter::create(self.path, &full)?;
                self.writer.insert((writer, shape.clone()))
            }
        };
        if shape != *expected {
            return Err(Error::Shape(format!(
                "{}: local feature maps of {shape:?} after maps of {expected:?}: images of \
                 different sizes cannot share one array (use --resize)",
                self.path.display()
            )));
        }
        writer.write_rows(start, &maps.to_dtype(DType::F32)?.to_vec::<f32>()?)
    }

    fn commit(self) -> Result<()> {
        match self.writer {
            Some((writer, _)) => writer.commit(),
            None => Ok(()),
        }
    }
}

/// Takes the `count` prepared images from `next` in order, runs consecutive same-size runs of
/// up to `batch_size` through the model, and gathers the descriptors.
fn run_in_batches(
    model: &dyn PlaceModel,
    count: usize,
    mut next: impl FnMut(usize) -> Result<ImageF32>,
    batch_size: usize,
    mut local: Option<&mut LocalFile>,
    progress: &mut dyn FnMut(usize),
) -> Result<Matrix> {
    let dim = model.dim();
    let mut data = Vec::with_capacity(count * dim);
    let mut batch: Vec<ImageF32> = Vec::with_capacity(batch_size);
    for i in 0..count {
        let image = next(i)?;
        let same_size = batch
            .first()
            .is_none_or(|b| [b.height, b.width] == [image.height, image.width]);
        if batch.len() == batch_size || !same_size {
            run_batch(
                model,
                &batch,
                i - batch.len(),
                &mut data,
                local.as_deref_mut(),
            )?;
            batch.clear();
            progress(i);
        }
        batch.push(image);
    }
    if !batch.is_empty() {
        run_batch(model, &batch, count - batch.len(), &mut data, local)?;
        progress(count);
    }
    Ok(Matrix {
        rows: count,
        cols: dim,
        data,
    })
}

/// The descriptors of images `start..` of one size, as one `[N, H, W, 3]` batch on the model's
/// device, appended to `data`; their local maps into `local` when asked.
fn run_batch(
    model: &dyn PlaceModel,
    batch: &[ImageF32],
    start: usize,
    data: &mut Vec<f32>,
    local: Option<&mut LocalFile>,
) -> Result<()> {
    let [height, width] = [batch[0].height, batch[0].width];
    let pixels: Vec<f32> = batch
        .iter()
        .flat_map(|im| im.data.iter().copied())
        .collect();
    let images = Tensor::from_vec(pixels, &[batch.len(), height, width, 3], model.device())?;
    let descriptors = match local {
        Some(local) => {
            let (descriptors, maps) = model.descriptors_and_local(&images)?;
            let maps = maps.ok_or_else(|| {
                Error::Argument(format!("{} gave no local features", model.describe()))
            })?;
            local.write(start, &maps)?;
            descriptors
        }
        None => model.descriptors(&images)?,
    };
    if descriptors.shape() != [batch.len(), model.dim()] || descriptors.dtype() != DType::F32 {
        return Err(Error::Shape(format!(
            "{} gave {} descriptors {:?} for {} images, expected f32 [{}, {}]",
            model.describe(),
            descriptors.dtype(),
            descriptors.shape(),
            batch.len(),
            batch.len(),
            model.dim()
        )));
    }
    data.extend(descriptors.to_vec::<f32>()?);
    Ok(())
}

/// Where the paths of `out` (`D.npy`) are listed: `D.paths.txt`.
pub fn paths_file(out: &Path) -> PathBuf {
    let stem = match out.extension() {
        Some(e) if e.eq_ignore_ascii_case("npy") => out.with_extension(""),
        _ => out.to_path_buf(),
    };
    let mut name = stem.into_os_string();
    name.push(".paths.txt");
    PathBuf::from(name)
}

/// Writes `descriptors` to `out` and the paths, one a line, to `paths_file(out)`; both are
/// written under temporary names and renamed into place only when both are complete.
pub fn write_outputs(out: &Path, paths: &[PathBuf], descriptors: &Matrix) -> Result<()> {
    let listing = paths_file(out);
    let npy = npy::prepare(out, descriptors)?;
    let mut list = AtomicFile::create(&listing)?;
    let text: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    list.write_bytes(text.as_bytes())?;
    npy.commit()?;
    list.commit().inspect_err(|_| {
        // never leave descriptors without their paths
        let _ = std::fs::remove_file(out);
    })
}
