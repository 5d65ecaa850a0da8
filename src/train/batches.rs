//! Training batches: which images (CosPlace's class sampling) and their pixels, decoded by
//! loader threads ahead of the device.
//!
//! Every random choice is made on the caller's thread from its own generator, before the work
//! goes to the threads, so a run is the same whatever the number of threads and however they are
//! scheduled. The threads only read and decode; results come back in order.

use crate::data::eigenplaces::{crop_panorama, crop_start, PanoCrop};
use crate::error::{Error, Result};
use crate::io::image::{self, Rgb8};
use crate::tensor::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Batches of distinct classes as PyTorch's `DataLoader(shuffle=True, drop_last=True)` draws
/// them from a dataset whose items are classes: a fresh permutation of the classes, cut into
/// batches, the incomplete tail dropped, then the next permutation.
pub struct ClassSampler {
    classes: usize,
    batch_size: usize,
    order: Vec<usize>,
    next: usize,
}

impl ClassSampler {
    /// An error when there are fewer classes than one batch holds (nothing could be drawn).
    pub fn new(classes: usize, batch_size: usize, what: &str) -> Result<ClassSampler> {
        if batch_size == 0 || classes < batch_size {
            return Err(Error::Argument(format!(
                "{what} has {classes} classes, fewer than the batch size {batch_size}: lower --batch-size or use a grouping with more classes per group"
            )));
        }
        Ok(ClassSampler {
            classes,
            batch_size,
            order: Vec::new(),
            next: 0,
        })
    }

    /// The classes of the next batch.
    pub fn next_batch(&mut self, rng: &mut Rng) -> Vec<usize> {
        if self.next + self.batch_size > self.order.len() {
            self.order = permutation(self.classes, rng);
            self.next = 0;
        }
        let batch = self.order[self.next..self.next + self.batch_size].to_vec();
        self.next += self.batch_size;
        batch
    }
}

/// A uniformly random permutation of `0..n` (Fisher-Yates).
pub fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

/// One training image to read.
#[derive(Clone, Debug)]
pub enum Source {
    /// A whole image file (a CosPlace crop).
    Image(PathBuf),
    /// A square crop out of a 360-degree panorama, as tall as the panorama (EigenPlaces).
    Crop { panorama: PathBuf, crop: PanoCrop },
}

impl Source {
    pub fn path(&self) -> &PathBuf {
        match self {
            Source::Image(p) => p,
            Source::Crop { panorama, .. } => panorama,
        }
    }

    /// The pixels, decoded (and cropped) as PIL would give them.
    pub fn read(&self) -> Result<Rgb8> {
        match self {
            Source::Image(path) => image::decode(path),
            Source::Crop { panorama, crop } => {
                let pano = image::decode(panorama)?;
                let side = pano.height;
                let start = crop_start(crop, pano.width, side);
                crop_panorama(&pano, start, side).map_err(|e| Error::Format {
                    path: panorama.display().to_string(),
                    message: e.to_string(),
                })
            }
        }
    }
}

type Job = (u64, Source);
type Done = (u64, Result<Rgb8>);

/// Threads decoding `Source`s ahead of the trainer; `submit` hands work out, `take` returns the
/// results in submission order.
pub struct Loader {
    jobs: Option<SyncSender<Job>>,
    done: Receiver<Done>,
    threads: Vec<JoinHandle<()>>,
    submitted: u64,
    taken: u64,
    arrived: BTreeMap<u64, Result<Rgb8>>,
}

impl Loader {
    /// `threads` decoders with room for `queue` waiting images.
    pub fn new(threads: usize, queue: usize) -> Loader {
        let (jobs, job_rx) = sync_channel::<Job>(queue.max(1));
        let (done_tx, done) = channel::<Done>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let threads = (0..threads.max(1))
            .map(|_| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx: Sender<Done> = done_tx.clone();
                std::thread::spawn(move || loop {
                    let job = job_rx.lock().unwrap().recv();
                    let Ok((index, source)) = job else { return };
                    if done_tx.send((index, source.read())).is_err() {
                        return;
                    }
                })
            })
            .collect();
        Loader {
            jobs: Some(jobs),
            done,
            threads,
            submitted: 0,
            taken: 0,
            arrived: BTreeMap::new(),
        }
    }

    /// Queues one image (blocks while the queue is full).
    pub fn submit(&mut self, source: Source) -> Result<()> {
        let jobs = self.jobs.as_ref().expect("the loader is running");
        jobs.send((self.submitted, source))
            .map_err(|_| Error::Argument("the image loader threads stopped".into()))?;
        self.submitted += 1;
        Ok(())
    }

    /// The next image in submission order.
    pub fn take(&mut self) -> Result<Rgb8> {
        if self.taken == self.submitted {
            return Err(Error::Argument("no image was queued".into()));
        }
        let index = self.taken;
        while !self.arrived.contains_key(&index) {
            let (i, result) = self
                .done
                .recv()
                .map_err(|_| Error::Argument("the image loader threads stopped".into()))?;
            self.arrived.insert(i, result);
        }
        self.taken += 1;
        self.arrived.remove(&index).expect("arrived above")
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.jobs = None;
        // the threads end when the job channel closes; drain so none blocks on a send
        while self.done.try_recv().is_ok() {}
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
