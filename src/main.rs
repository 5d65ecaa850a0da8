//! The `vpr-engine` command line.

use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use vpr_engine::device::kernels::KERNEL_MODULES;
use vpr_engine::device::{cuda, Device};
use vpr_engine::eval::dataset::EvalDataset;
use vpr_engine::eval::extract::{self, ExtractOptions};
use vpr_engine::eval::pictures::{self, Mark};
use vpr_engine::eval::run::{self, Descriptors};
use vpr_engine::eval::{predictions, recall};
use vpr_engine::fit::PcaParams;
use vpr_engine::ops::knn::MAX_K;
use vpr_engine::synth::{self, SynthOptions};
use vpr_engine::Error;

#[derive(Parser)]
#[command(
    name = "vpr-engine",
    version,
    about = "A GPU engine for visual place recognition"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the devices, their state, and the kernel build.
    Info,
    /// Run every kernel on random inputs against the CPU implementation and print a table.
    Check {
        /// cuda, cuda:N or vgpu (default: cuda when a GPU is usable, else vgpu).
        #[arg(long)]
        device: Option<String>,
        /// Seed of the random inputs (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Global descriptors of every image under a folder, as a float32 [N, dim] .npy (row i for
    /// the i-th image path in sorted order) and the paths in OUT's name with .paths.txt.
    Extract(Box<ExtractArgs>),
    /// Recall@N of a model (or of descriptors from any system) on a geo-tagged test set: exact
    /// L2 nearest neighbours of each query among the database images, a prediction correct when
    /// within --positive-dist-threshold metres (the protocol of the VPR tools). Prints
    /// `R@1: x, R@5: x, R@10: x, R@20: x`; a summary goes to standard error.
    Eval(Box<EvalArgs>),
    /// Adds OpenIBL's PCA-whitening to a converted OpenIBL NetVLAD model (a training checkpoint's
    /// EmbedNet), as OpenIBL does for testing: the result is an EmbedNetPCA model file.
    AddPca(AddPcaArgs),
    /// Train CosPlace or EigenPlaces (classification over geographic classes with CosFace) on a
    /// dataset in SF-XL's layout, with the papers' settings unless told otherwise; writes RUN/
    /// best.safetensors and last.safetensors (models for extract and eval), the resumable
    /// state, metrics.jsonl and config.json.
    Train(Box<TrainArgs>),
    /// Renders a procedural city into training and test datasets: CosPlace crops (DIR/train),
    /// EigenPlaces panoramas (DIR/train_panoramas) and DIR/val, DIR/test with database/ and
    /// queries/, every image named @east@north@zone@letter@lat@lon@pano@tile@heading@...@.jpg.
    Synth(SynthArgs),
}

#[derive(clap::Args)]
struct TrainArgs {
    /// cosplace or eigenplaces.
    #[arg(long, required_unless_present = "resume")]
    method: Option<String>,
    /// The dataset: DIR/train (CosPlace's crops, named @east@north@...@heading@...) or
    /// DIR/train_panoramas (or DIR/raw/train/panoramas: EigenPlaces' 360-degree panoramas),
    /// DIR/val/{database,queries}, and DIR/test/{database,queries} when there is a test set.
    #[arg(long, required_unless_present = "resume")]
    dataset: Option<PathBuf>,
    /// The run folder to write.
    #[arg(long, value_name = "RUN", required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in RUN after its last finished epoch, with its config.json (only
    /// --epochs, --device and --loader-threads may be given with it).
    #[arg(long, value_name = "RUN")]
    resume: Option<PathBuf>,
    /// resnet18, resnet34, resnet50, resnet101, resnet152 or vgg16 (default: resnet18 for
    /// CosPlace, resnet50 for EigenPlaces).
    #[arg(long)]
    backbone: Option<String>,
    /// Descriptor size (default: 512 for CosPlace, 2048 for EigenPlaces).
    #[arg(long)]
    dim: Option<usize>,
    /// cpu, cuda, cuda:N or vgpu (default: cuda when a GPU is usable, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Mixed precision: bf16, f16 (with loss scaling) or off (default: bf16 on GPUs of
    /// compute capability 8.0 and later, else off).
    #[arg(long)]
    amp: Option<String>,
    /// Default: 50 (CosPlace), 40 (EigenPlaces).
    #[arg(long)]
    epochs: Option<usize>,
    /// Default: 10000 (CosPlace), 5000 (EigenPlaces).
    #[arg(long)]
    iterations_per_epoch: Option<usize>,
    /// Images per batch (EigenPlaces: per view, two views per iteration).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Side of the square training images, RandomResizedCrop's output (default: 512).
    #[arg(long)]
    image_size: Option<usize>,
    /// Adam's learning rate for the model (default: 1e-5).
    #[arg(long)]
    lr: Option<f64>,
    /// Adam's learning rate for the classifiers (default: 1e-2).
    #[arg(long)]
    classifiers_lr: Option<f64>,
    /// Start the backbone from these weights: a converted CosPlace/EigenPlaces model (as
    /// EigenPlaces starts from CosPlace) or a torchvision ImageNet checkpoint converted by
    /// tools/convert (e.g. resnet50-11ad3fa6.pth). Default: torchvision's random initialisation.
    #[arg(long, value_name = "W.safetensors")]
    init: Option<PathBuf>,
    /// Seed of every random choice of the run.
    #[arg(long)]
    seed: Option<u64>,
    /// Train on the images as they are (no ColorJitter, no RandomResizedCrop).
    #[arg(long)]
    no_augment: bool,
    /// Train every layer of the backbone (by default the first half stays frozen, as in
    /// CosPlace and EigenPlaces).
    #[arg(long)]
    train_all_layers: bool,
    /// Report a training image that cannot be read and use another of its class, instead of
    /// stopping.
    #[arg(long)]
    skip_bad_images: bool,
    /// Threads decoding training images (default: one per core).
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Class cell size in metres (CosPlace's and EigenPlaces' M; default 10 and 15).
    #[arg(long = "M", value_name = "M")]
    cell_metres: Option<u32>,
    /// CosPlace's heading bin in degrees (alpha; default 30).
    #[arg(long = "alpha", value_name = "ALPHA")]
    heading_degrees: Option<u32>,
    /// Cells per group side (N; default 5 for CosPlace, 3 for EigenPlaces).
    #[arg(long = "N", value_name = "N")]
    group_side: Option<u32>,
    /// CosPlace's heading bins per group (L; default 2).
    #[arg(long = "L", value_name = "L")]
    heading_groups: Option<u32>,
    /// How many of CosPlace's groups are trained, epoch e training group e mod this (default 8).
    #[arg(long)]
    groups_num: Option<usize>,
    /// Classes with fewer images are dropped (default: 10 CosPlace, 5 EigenPlaces).
    #[arg(long)]
    min_images_per_class: Option<usize>,
    /// EigenPlaces' distance from a class's centre to its focal point, in metres (default 10).
    #[arg(long)]
    focal_dist: Option<f64>,
    /// Images per model call when validating and testing.
    #[arg(long)]
    eval_batch_size: Option<usize>,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// The folder to write: new, empty, or an earlier synth output (which is replaced, with
    /// the trainer's cache/ in it).
    #[arg(long)]
    out: PathBuf,
    /// Training places: 10 m street cells, each photographed from 12 camera positions (12
    /// panoramas and 144 crops); val and test get max(2, N/4) places (12 database images each)
    /// and max(10, N) queries.
    #[arg(long, default_value_t = SynthOptions::default().places)]
    places: usize,
    /// Seed of the city and of every capture: the same seed writes the same bytes.
    #[arg(long, default_value_t = SynthOptions::default().seed)]
    seed: u64,
    /// Side of the crops and height of the panoramas (width 6.5x), a multiple of 24.
    #[arg(long, default_value_t = SynthOptions::default().image_size)]
    image_size: usize,
}

#[derive(clap::Args)]
struct AddPcaArgs {
    /// A converted OpenIBL NetVLAD model without PCA (vpr.aggregation netvlad).
    #[arg(long)]
    weights: PathBuf,
    /// The PCA parameters: a safetensors file with U, lams, mu and Utmu (as vpr_engine::fit
    /// saves them), or a folder with U.bin, lams.bin and mu.bin, the raw little-endian float32
    /// datasets of OpenIBL's pca_params .h5 file (`h5dump -d /U -b LE -o U.bin FILE.h5`, and
    /// likewise lams and mu).
    #[arg(long)]
    pca: PathBuf,
    /// Keep the first DIM components (default: all in the parameters; OpenIBL uses 4096).
    #[arg(long)]
    dim: Option<usize>,
    /// The model file to write.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ExtractArgs {
    /// A converted model: safetensors with vpr.* metadata, as `convert` writes.
    #[arg(long)]
    weights: PathBuf,
    /// The folder searched (recursively) for .jpg, .jpeg and .png images.
    #[arg(long)]
    images: PathBuf,
    /// The descriptors file to write (D.npy; the paths go to D.paths.txt).
    #[arg(long)]
    out: PathBuf,
    /// Also the local feature maps of a model that has them (SelaVPR), as one float32
    /// [N, h, w, C] .npy written as the images are done (never held in memory).
    #[arg(long, value_name = "L.npy")]
    local: Option<PathBuf>,
    /// cpu, cuda, cuda:N or vgpu (default: cuda when a GPU is usable, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Most images per model call; only consecutive images of one size share a call.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// HEIGHTxWIDTH every image is resized to (e.g. 480x640), instead of the model's own
    /// size rule.
    #[arg(long, value_name = "HxW")]
    resize: Option<String>,
    /// Whether resizing antialiases (torchvision >= 0.17's default) or is plain bilinear (what
    /// SelaVPR and the benchmark ran); default: what the model's file says.
    #[arg(long, value_name = "true|false")]
    antialias: Option<bool>,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A converted model (safetensors with vpr.* metadata) to extract the descriptors with.
    #[arg(long, required_unless_present = "query_descriptors")]
    weights: Option<PathBuf>,
    /// Query descriptors instead of a model: a float32 [queries, dim] .npy, row i for the i-th
    /// query image in sorted order (what `extract` writes).
    #[arg(long, requires = "database_descriptors", conflicts_with = "weights")]
    query_descriptors: Option<PathBuf>,
    /// Database descriptors to go with --query-descriptors.
    #[arg(long, requires = "query_descriptors")]
    database_descriptors: Option<PathBuf>,
    /// The test set: DIR/database and DIR/queries (or DIR/images/test/{database,queries}),
    /// images named @east@north@zone@letter@lat@lon@...@.jpg (UTM metres).
    #[arg(long, required_unless_present = "database_folder")]
    dataset: Option<PathBuf>,
    /// The database folder, instead of --dataset.
    #[arg(long, requires = "queries_folder", conflicts_with = "dataset")]
    database_folder: Option<PathBuf>,
    /// The queries folder, with --database-folder.
    #[arg(long, requires = "database_folder")]
    queries_folder: Option<PathBuf>,
    /// cpu, cuda, cuda:N or vgpu (default: cuda when a GPU is usable, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Most images per model call; only consecutive images of one size share a call.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// HEIGHTxWIDTH every image is resized to (e.g. 480x640), instead of the model's own
    /// size rule.
    #[arg(long, value_name = "HxW")]
    resize: Option<String>,
    /// Whether resizing antialiases (torchvision >= 0.17's default) or is plain bilinear (what
    /// SelaVPR and the benchmark ran); default: what the model's file says.
    #[arg(long, value_name = "true|false")]
    antialias: Option<bool>,
    /// A database image is a positive of a query within this many metres (inclusive).
    #[arg(long, default_value_t = 25.0, allow_negative_numbers = true)]
    positive_dist_threshold: f64,
    /// The N of Recall@N, ascending (e.g. 1,5,10,20 or 1 5 10 20).
    #[arg(long, num_args = 1.., value_delimiter = ',', default_values_t = [1, 5, 10, 20])]
    recall_values: Vec<usize>,
    /// A CSV of every query's top predictions (as many as the largest N): query, rank,
    /// prediction, squared L2 distance, whether it is a positive.
    #[arg(long, value_name = "FILE.csv")]
    save_predictions: Option<PathBuf>,
    /// A folder for pictures: a PNG per query of the query and its top 5 predictions (green
    /// frames for positives, red for negatives) and recall.png, the Recall@N curve.
    #[arg(long, value_name = "DIR")]
    save_pictures: Option<PathBuf>,
    /// How many queries get a picture (the first ones in order).
    #[arg(long, default_value_t = 20, requires = "save_pictures")]
    num_pictures: usize,
    /// Pictures only of queries whose first prediction is wrong (not a positive).
    #[arg(long, requires = "save_pictures")]
    wrong_only: bool,
    /// Re-rank each query's first K predictions by mutual nearest neighbours between local
    /// features (SelaVPR's re-ranking; SelaVPR uses K = 100). Needs a model with local features
    /// or --query-local and --database-local.
    #[arg(long, value_name = "K")]
    rerank: Option<usize>,
    /// With --rerank and a model: the folder its local feature maps are written to and kept
    /// (queries_local.npy, database_local.npy; about 1.9 MB per image for SelaVPR). Default: a
    /// temporary folder, removed afterwards.
    #[arg(long, value_name = "DIR", requires_all = ["rerank", "weights"])]
    local_dir: Option<PathBuf>,
    /// With --rerank and descriptor files: the queries' local feature maps, a float32
    /// [queries, h, w, C] .npy (what `extract --local` writes).
    #[arg(long, requires_all = ["rerank", "query_descriptors", "database_local"])]
    query_local: Option<PathBuf>,
    /// The database's local feature maps, with --query-local.
    #[arg(long, requires = "query_local")]
    database_local: Option<PathBuf>,
    /// A folder to write the extracted descriptors to, as `extract` writes them
    /// (queries.npy and database.npy with their .paths.txt), for a later --query-descriptors.
    #[arg(long, value_name = "DIR", requires = "weights")]
    save_descriptors: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let result = match cli.command {
        Command::Info => info(&mut out).map(|_| true),
        Command::Check { device, seed } => check(&mut out, device.as_deref(), seed),
        Command::Extract(args) => extract(&mut out, &args).map(|_| true),
        Command::Eval(args) => eval(&mut out, &args).map(|_| true),
        Command::AddPca(args) => add_pca(&mut out, &args).map(|_| true),
        Command::Train(args) => train(&mut out, &args).map(|_| true),
        Command::Synth(args) => synth(&mut out, &args).map(|_| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // the reader went away (`vpr-engine check | head`): nothing is left to tell
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn stdout_err(source: std::io::Error) -> Error {
    Error::Io {
        path: "standard output".into(),
        source,
    }
}

fn info(out: &mut impl Write) -> vpr_engine::Result<()> {
    let mut lines = vec![
        format!("vpr-engine {}", env!("CARGO_PKG_VERSION")),
        "devices:".to_string(),
    ];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    lines.push(format!("  cpu      available, {threads} threads"));
    lines.push(match Device::new("vgpu") {
        Ok(d) => format!(
            "  vgpu     available: {}",
            d.gpu().map_or(String::new(), |g| g.describe())
        ),
        Err(e) => format!("  vgpu     unavailable: {e}"),
    });
    let status = cuda::probe();
    match &status.devices {
        Ok(devices) => lines.extend(devices.iter().map(|d| format!("  {d}"))),
        Err(why) => lines.push(format!("  cuda     unavailable: {why}")),
    }
    lines.push(match &status.nvrtc {
        Ok(v) => format!("nvrtc:     {v}"),
        Err(why) => format!("nvrtc:     unavailable: {why}"),
    });
    lines.push(format!("kernel cache: {}", status.cache_dir.display()));
    let kernels: usize = KERNEL_MODULES.iter().map(|m| m.kernels.len()).sum();
    let files: Vec<String> = KERNEL_MODULES
        .iter()
        .map(|m| format!("{} ({})", m.name, m.kernels.len()))
        .collect();
    lines.push(format!(
        "kernels: {kernels} in {} files: {}",
        KERNEL_MODULES.len(),
        files.join(", ")
    ));
    lines.push(format!(
        "default device: {} (check: cuda when usable, else vgpu)",
        Device::default_device()
    ));
    for line in lines {
        writeln!(out, "{line}").map_err(stdout_err)?;
    }
    Ok(())
}

fn check(
    out: &mut impl Write,
    device: Option<&str>,
    seed: Option<u64>,
) -> vpr_engine::Result<bool> {
    let device = match device {
        Some(d) => Device::new(d)?,
        None => Device::new("cuda").or_else(|_| Device::new("vgpu"))?,
    };
    let Some(g) = device.gpu() else {
        return Err(Error::Argument(
            "check runs the kernels of a GPU against the CPU: use --device cuda, cuda:N or vgpu"
                .into(),
        ));
    };
    // poisoned outputs make unwritten elements fail the comparison
    g.set_poison(true);
    writeln!(out, "device: {}", g.describe()).map_err(stdout_err)?;
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() as u64)
    });
    writeln!(out, "seed: {seed} (rerun with --seed {seed})\n").map_err(stdout_err)?;
    let rows = vpr_engine::check::run(&device, seed);
    // columns fit the labels, but for the few long ones of rows that run two kernels
    let kw = rows
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(0)
        .clamp(6, 36);
    let sw = rows.iter().map(|r| r.shape.len()).max().unwrap_or(0).max(5);
    let mut lines = vec![format!(
        "{:<kw$} {:<5} {:<sw$} {:>10} {:>8}  result",
        "kernel", "dtype", "shape", "max err", "tol"
    )];
    let mut failed = 0;
    for r in &rows {
        let verdict = if r.passed() {
            "pass".to_string()
        } else {
            failed += 1;
            format!(
                "FAIL{}",
                r.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )
        };
        lines.push(format!(
            "{:<kw$} {:<5} {:<sw$} {:>10.2e} {:>8.0e}  {verdict}",
            r.kernel,
            r.dtype.to_string(),
            r.shape,
            r.max_err,
            r.tol
        ));
    }
    lines.push(format!("\n{} passed, {failed} failed", rows.len() - failed));
    if rows.is_empty() {
        lines.push("FAIL: no kernel was checked".into());
    }
    for line in lines {
        writeln!(out, "{line}").map_err(stdout_err)?;
    }
    // an empty table proves nothing
    Ok(failed == 0 && !rows.is_empty())
}

/// `HEIGHTxWIDTH`, both positive.
fn parse_resize(text: &str) -> vpr_engine::Result<[usize; 2]> {
    let size = text
        .split_once(['x', 'X'])
        .and_then(|(h, w)| Some([h.trim().parse().ok()?, w.trim().parse().ok()?]))
        .filter(|[h, w]: &[usize; 2]| *h > 0 && *w > 0);
    size.ok_or_else(|| {
        Error::Argument(format!(
            "--resize '{text}' is not HEIGHTxWIDTH with positive sides (e.g. 480x640)"
        ))
    })
}

fn extract(out: &mut impl Write, args: &ExtractArgs) -> vpr_engine::Result<()> {
    // every argument is checked before the model is loaded or an image read
    let resize = args.resize.as_deref().map(parse_resize).transpose()?;
    if args.batch_size == 0 {
        return Err(Error::Argument("--batch-size must be at least 1".into()));
    }
    let device = match &args.device {
        Some(d) => Device::new(d)?,
        None => Device::default_device(),
    };
    let descriptors = &args.out;
    check_output_file("--out", descriptors)?;
    if let Some(local) = &args.local {
        check_output_file("--local", local)?;
    }
    let paths = extract::list_images(&args.images)?;
    let model = vpr_engine::models::load(&args.weights, &device)?;
    let options = ExtractOptions {
        resize,
        antialias: args.antialias,
        local: args.local.clone(),
        ..ExtractOptions::new(args.batch_size)
    };
    let start = Instant::now();
    let total = paths.len();
    let mut bar = ProgressBar::new(total, "images", std::io::stderr().is_terminal());
    let result = extract::extract_descriptors(model.as_ref(), &paths, &options, &mut |done| {
        bar.update(done)
    });
    bar.finish();
    let matrix = result?;
    extract::write_outputs(descriptors, &paths, &matrix)?;
    let seconds = start.elapsed().as_secs_f64();
    let local = args.local.as_ref().map_or(String::new(), |l| {
        format!(" and local features {}", l.display())
    });
    writeln!(
        out,
        "{total} images -> {} [{total}, {}] and {}{local} ({}, {device}, {seconds:.1} s, {:.1} images/s)",
        descriptors.display(),
        matrix.cols,
        extract::paths_file(descriptors).display(),
        model.describe(),
        total as f64 / seconds.max(1e-9),
    )
    .map_err(stdout_err)
}

fn synth(out: &mut impl Write, args: &SynthArgs) -> vpr_engine::Result<()> {
    let options = SynthOptions {
        places: args.places,
        seed: args.seed,
        image_size: args.image_size,
    };
    let mut bar: Option<ProgressBar> = None;
    let shown = std::io::stderr().is_terminal();
    let result = synth::generate_with_progress(&args.out, &options, &mut |done, total| {
        bar.get_or_insert_with(|| ProgressBar::new(total, "captures", shown))
            .update(done)
    });
    if let Some(b) = &bar {
        b.finish();
    }
    let s = result?;
    writeln!(
        out,
        "{}: train {} crops ({} CosPlace classes) + {} panoramas ({} EigenPlaces classes), \
         val {} database + {} queries, test {} database + {} queries (seed {}, {:.1} s)",
        args.out.display(),
        s.train_crops,
        s.cosplace_classes,
        s.train_panoramas,
        s.eigenplaces_classes,
        s.val_database,
        s.val_queries,
        s.test_database,
        s.test_queries,
        args.seed,
        s.seconds
    )
    .map_err(stdout_err)
}

/// An existing folder for FILE's parent, or an error naming `flag`.
fn add_pca(out: &mut impl Write, args: &AddPcaArgs) -> vpr_engine::Result<()> {
    check_output_file("--out", &args.out)?;
    let params = if args.pca.is_dir() {
        let part = |name: &str| args.pca.join(format!("{name}.bin"));
        PcaParams::from_raw_files(&part("U"), &part("lams"), &part("mu"))?
    } else {
        PcaParams::load(&args.pca)?
    };
    let params = match args.dim {
        Some(dim) if dim == 0 || dim > params.dim => {
            return Err(Error::Argument(format!(
                "--dim {dim}: the PCA parameters have {} components",
                params.dim
            )))
        }
        Some(dim) => params.truncated(dim)?,
        None => params,
    };
    vpr_engine::models::add_pca(&args.weights, &params, &args.out)?;
    writeln!(
        out,
        "wrote {}: {}-d descriptors with PCA-whitening",
        args.out.display(),
        params.dim
    )
    .map_err(stdout_err)
}

fn check_output_file(flag: &str, file: &Path) -> vpr_engine::Result<()> {
    let folder = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() || file.is_dir() {
        return Err(Error::Argument(format!(
            "{flag} {}: not a file in an existing folder",
            file.display()
        )));
    }
    Ok(())
}

/// Creates the folder `dir` (and its parents) for `flag`'s outputs.
fn create_output_folder(flag: &str, dir: &Path) -> vpr_engine::Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: format!("{flag} {}", dir.display()),
        source,
    })
}

fn eval(out: &mut impl Write, args: &EvalArgs) -> vpr_engine::Result<()> {
    // every argument is checked before a model is loaded or an image read
    let resize = args.resize.as_deref().map(parse_resize).transpose()?;
    if args.batch_size == 0 {
        return Err(Error::Argument("--batch-size must be at least 1".into()));
    }
    let ns = &args.recall_values;
    if ns.is_empty() || ns[0] == 0 || ns.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Error::Argument(format!(
            "--recall-values {ns:?}: need ascending values of at least 1"
        )));
    }
    if ns[ns.len() - 1] > MAX_K {
        return Err(Error::Argument(format!(
            "--recall-values: the search keeps at most {MAX_K} predictions per query"
        )));
    }
    let threshold = args.positive_dist_threshold;
    if !(threshold.is_finite() && threshold >= 0.0) {
        return Err(Error::Argument(format!(
            "--positive-dist-threshold {threshold}: need a distance of 0 or more metres"
        )));
    }
    if let Some(csv) = &args.save_predictions {
        check_output_file("--save-predictions", csv)?;
    }
    if let Some(k) = args.rerank {
        if k == 0 || k > MAX_K {
            return Err(Error::Argument(format!(
                "--rerank {k}: re-rank 1 to {MAX_K} predictions"
            )));
        }
        if args.weights.is_none() && args.query_local.is_none() {
            return Err(Error::Argument(
                "--rerank with descriptor files needs --query-local and --database-local".into(),
            ));
        }
    }
    let device = match &args.device {
        Some(d) => Device::new(d)?,
        None => Device::default_device(),
    };
    let dataset = match (&args.dataset, &args.database_folder, &args.queries_folder) {
        (Some(dir), _, _) => EvalDataset::open(dir)?,
        (None, Some(database), Some(queries)) => EvalDataset::from_folders(database, queries)?,
        _ => unreachable!("clap requires --dataset or both folders"),
    };
    let model = args
        .weights
        .as_deref()
        .map(|w| vpr_engine::models::load(w, &device))
        .transpose()?;
    let descriptors = match (&model, &args.query_descriptors, &args.database_descriptors) {
        (Some(model), _, _) => Descriptors::Model {
            model: model.as_ref(),
            options: ExtractOptions {
                resize,
                antialias: args.antialias,
                ..ExtractOptions::new(args.batch_size)
            },
        },
        (None, Some(queries), Some(database)) => Descriptors::Files {
            queries: queries.clone(),
            database: database.clone(),
        },
        _ => unreachable!("clap requires --weights or both descriptor files"),
    };
    for (flag, dir) in [
        ("--save-pictures", &args.save_pictures),
        ("--save-descriptors", &args.save_descriptors),
        ("--local-dir", &args.local_dir),
    ] {
        if let Some(dir) = dir {
            create_output_folder(flag, dir)?;
        }
    }

    // a model's local maps go to --local-dir, else to a temporary folder removed on return
    let temporary =
        TemporaryFolder::new(args.rerank.is_some() && model.is_some() && args.local_dir.is_none())?;
    let rerank = args.rerank.map(|k| {
        match (
            &args.local_dir,
            &temporary.0,
            &args.query_local,
            &args.database_local,
        ) {
            (Some(dir), _, _, _) | (None, Some(dir), _, _) => run::Rerank::in_folder(k, dir),
            (None, None, Some(queries), Some(database)) => run::Rerank {
                k,
                queries: queries.clone(),
                database: database.clone(),
            },
            _ => unreachable!("checked above: --rerank has a model or both local files"),
        }
    });
    let shown = std::io::stderr().is_terminal();
    let mut bar: Option<(String, ProgressBar)> = None;
    let result = run::evaluate(
        &dataset,
        descriptors,
        &device,
        threshold,
        ns,
        rerank.as_ref(),
        &mut |stage, done, total| {
            if bar.as_ref().is_none_or(|(s, _)| s != stage) {
                if let Some((_, old)) = &bar {
                    old.finish();
                }
                let unit = match stage {
                    "search" => "database rows searched",
                    "rerank" => "queries re-ranked",
                    "queries" => "query images",
                    _ => "database images",
                };
                bar = Some((stage.to_string(), ProgressBar::new(total, unit, shown)));
            }
            if let Some((_, b)) = &mut bar {
                b.update(done);
            }
        },
    );
    if let Some((_, b)) = &bar {
        b.finish();
    }
    let evaluation = result?;

    if let (Some(dir), Some((queries, database))) = (&args.save_descriptors, &evaluation.extracted)
    {
        extract::write_outputs(&dir.join("queries.npy"), &dataset.queries, queries)?;
        extract::write_outputs(&dir.join("database.npy"), &dataset.database, database)?;
    }
    if let Some(csv) = &args.save_predictions {
        predictions::write_csv(
            csv,
            &dataset,
            &evaluation.predictions,
            &evaluation.positives,
        )?;
    }
    if let Some(dir) = &args.save_pictures {
        // the test set's name: its folder, or the folder holding its database folder
        let root = args.dataset.clone().or_else(|| {
            let database = args.database_folder.as_ref()?.canonicalize().ok()?;
            database.parent().map(Path::to_path_buf)
        });
        let name = root
            .and_then(|r| {
                Some(
                    r.canonicalize()
                        .ok()?
                        .file_name()?
                        .to_string_lossy()
                        .into_owned(),
                )
            })
            .unwrap_or_else(|| "the test set".into());
        let title = match &model {
            Some(m) => format!("{} on {name}: Recall@N", m.describe()),
            None => format!("{name}: Recall@N"),
        };
        save_pictures(dir, args, &dataset, &evaluation, &title)?;
    }

    let line = recall::format_recalls(ns, &evaluation.recalls);
    writeln!(out, "{line}").map_err(stdout_err)?;
    let without = evaluation.positives.iter().filter(|p| p.is_empty()).count();
    let images = dataset.queries.len() + dataset.database.len();
    let source = match (&model, &args.query_descriptors, &args.database_descriptors) {
        (Some(model), _, _) => format!(
            "extracted by {} on {device} in {:.1} s ({:.1} images/s)",
            model.describe(),
            evaluation.extract_seconds,
            images as f64 / evaluation.extract_seconds.max(1e-9)
        ),
        (_, Some(q), Some(d)) => format!("read from {} and {}", q.display(), d.display()),
        _ => unreachable!("clap requires --weights or both descriptor files"),
    };
    eprintln!(
        "{} queries ({without} without a positive within {threshold} m), {} database images\n\
         descriptors {source}\n\
         exact L2 search for the top {} on {device} in {:.2} s",
        dataset.queries.len(),
        dataset.database.len(),
        evaluation.predictions.k,
        evaluation.search_seconds
    );
    if let (Some(k), Some(before)) = (args.rerank, &evaluation.recalls_before_rerank) {
        eprintln!(
            "re-ranked the top {k} by local features in {:.2} s; before re-ranking: {}",
            evaluation.rerank_seconds,
            recall::format_recalls(ns, before)
        );
    }
    Ok(())
}

/// A folder of its own under the system's temporary folder, removed with everything in it when
/// dropped; `None` when not asked for.
struct TemporaryFolder(Option<PathBuf>);

impl TemporaryFolder {
    fn new(wanted: bool) -> vpr_engine::Result<TemporaryFolder> {
        if !wanted {
            return Ok(TemporaryFolder(None));
        }
        let dir = std::env::temp_dir().join(format!("vpr-engine-local-{}", std::process::id()));
        create_output_folder("temporary folder", &dir)?;
        Ok(TemporaryFolder(Some(dir)))
    }
}

impl Drop for TemporaryFolder {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// `--save-pictures` into `dir`: the first `--num-pictures` queries (with `--wrong-only`, of
/// those whose first prediction is not a positive) with their top 5 predictions, and the
/// Recall@N curve up to the largest N under `title`.
fn save_pictures(
    dir: &Path,
    args: &EvalArgs,
    dataset: &EvalDataset,
    evaluation: &run::Evaluation,
    title: &str,
) -> vpr_engine::Result<()> {
    let p = &evaluation.predictions;
    let is_positive = |q: usize, i: usize| evaluation.positives[q].binary_search(&i).is_ok();
    let width = p.queries().saturating_sub(1).to_string().len().max(3);
    let chosen = (0..p.queries())
        .filter(|&q| !args.wrong_only || !is_positive(q, p.row(q)[0]))
        .take(args.num_pictures);
    for q in chosen {
        let marked: Vec<(&Path, Mark)> = p
            .row(q)
            .iter()
            .take(5)
            .map(|&i| {
                let mark = if is_positive(q, i) {
                    Mark::Positive
                } else {
                    Mark::Negative
                };
                (dataset.database[i].as_path(), mark)
            })
            .collect();
        let file = dir.join(format!("query_{q:0width$}.png"));
        pictures::save_prediction_picture(&dataset.queries[q], &marked, &file)?;
    }
    let curve = recall::recall_curve(p, &evaluation.positives)?;
    let highlight: Vec<usize> = args.recall_values.iter().map(|&n| n.min(p.k)).collect();
    pictures::save_recall_curve(&curve, &highlight, title, &dir.join("recall.png"))
}

fn train(out: &mut impl Write, args: &TrainArgs) -> vpr_engine::Result<()> {
    use vpr_engine::train::classify::{self, Amp, Event, Method, TrainOptions};
    let (mut options, run, resume) = match &args.resume {
        Some(run) => {
            let given = [
                ("--method", args.method.is_some()),
                ("--dataset", args.dataset.is_some()),
                ("--out", args.out.is_some()),
                ("--backbone", args.backbone.is_some()),
                ("--dim", args.dim.is_some()),
                ("--amp", args.amp.is_some()),
                (
                    "--iterations-per-epoch",
                    args.iterations_per_epoch.is_some(),
                ),
                ("--batch-size", args.batch_size.is_some()),
                ("--image-size", args.image_size.is_some()),
                ("--lr", args.lr.is_some()),
                ("--classifiers-lr", args.classifiers_lr.is_some()),
                ("--init", args.init.is_some()),
                ("--seed", args.seed.is_some()),
                ("--no-augment", args.no_augment),
                ("--train-all-layers", args.train_all_layers),
                ("--skip-bad-images", args.skip_bad_images),
                ("--M", args.cell_metres.is_some()),
                ("--alpha", args.heading_degrees.is_some()),
                ("--N", args.group_side.is_some()),
                ("--L", args.heading_groups.is_some()),
                ("--groups-num", args.groups_num.is_some()),
                (
                    "--min-images-per-class",
                    args.min_images_per_class.is_some(),
                ),
                ("--focal-dist", args.focal_dist.is_some()),
                ("--eval-batch-size", args.eval_batch_size.is_some()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
                return Err(Error::Argument(format!(
                    "{flag} cannot be given with --resume: the run's settings are in {}",
                    run.join("config.json").display()
                )));
            }
            let options = TrainOptions::from_config(&run.join("config.json"))?;
            (options, run.clone(), true)
        }
        None => {
            let method = Method::parse(args.method.as_deref().unwrap_or_default())?;
            let dataset = args.dataset.clone().unwrap_or_default();
            let mut o = TrainOptions::defaults(method, &dataset);
            let eigen = method == Method::EigenPlaces;
            o.backbone = args.backbone.clone().unwrap_or(o.backbone);
            o.dim = args.dim.unwrap_or(o.dim);
            o.iterations_per_epoch = args.iterations_per_epoch.unwrap_or(o.iterations_per_epoch);
            o.batch_size = args.batch_size.unwrap_or(o.batch_size);
            o.image_size = args.image_size.unwrap_or(o.image_size);
            o.lr = args.lr.unwrap_or(o.lr);
            o.classifiers_lr = args.classifiers_lr.unwrap_or(o.classifiers_lr);
            o.init = args.init.clone();
            o.seed = args.seed.unwrap_or(o.seed);
            o.augment = !args.no_augment;
            o.train_all_layers = args.train_all_layers;
            o.skip_bad_images = args.skip_bad_images;
            if let Some(m) = args.cell_metres {
                o.cosplace.m = m;
                o.eigenplaces.m = m;
            }
            if let Some(a) = args.heading_degrees {
                o.cosplace.alpha = a;
            }
            if let Some(n) = args.group_side {
                o.cosplace.n = n;
                o.eigenplaces.n = n;
            }
            if let Some(l) = args.heading_groups {
                o.cosplace.l = l;
            }
            o.groups_num = args.groups_num.unwrap_or(o.groups_num);
            if let Some(k) = args.min_images_per_class {
                o.cosplace.min_images_per_class = k;
                o.eigenplaces.min_images_per_class = k;
            }
            o.eigenplaces.focal_dist = args.focal_dist.unwrap_or(o.eigenplaces.focal_dist);
            o.eval_batch_size = args.eval_batch_size.unwrap_or(o.eval_batch_size);
            if eigen && (args.heading_degrees.is_some() || args.heading_groups.is_some()) {
                return Err(Error::Argument(
                    "--alpha and --L are CosPlace's (EigenPlaces' classes have no heading)".into(),
                ));
            }
            (o, args.out.clone().unwrap_or_default(), false)
        }
    };
    options.epochs = args.epochs.unwrap_or(if resume {
        options.epochs
    } else {
        TrainOptions::defaults(options.method, &options.dataset).epochs
    });
    options.loader_threads = args.loader_threads.unwrap_or(options.loader_threads);
    let device = match args
        .device
        .as_deref()
        .or(resume.then_some(options.device.as_str()))
    {
        Some(d) => Device::new(d)?,
        None => Device::default_device(),
    };
    options.device = device.to_string();
    if !resume {
        options.amp = match args.amp.as_deref() {
            Some(a) => Amp::parse(a)?,
            None => match device.gpu() {
                // the virtual GPU is for checking, in f32 unless asked
                Some(g)
                    if g.compute_capability().0 >= 8
                        && matches!(g.kind(), vpr_engine::device::GpuKind::Cuda(_)) =>
                {
                    Amp::Bf16
                }
                _ => Amp::Off,
            },
        };
    }
    let shown = std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut loss_avg = 0.0;
    let started = Instant::now();
    let mut report = |event: Event| match event {
        Event::Note(text) => {
            if let Some(b) = &bar {
                b.finish();
            }
            eprintln!("{text}");
        }
        Event::EpochStart {
            epoch,
            epochs,
            iterations,
            what,
        } => {
            bar = Some(ProgressBar::new(
                iterations,
                &format!("it (epoch {}/{epochs}, {what} {})", epoch + 1, epoch),
                shown,
            ));
            loss_avg = 0.0;
        }
        Event::Step {
            iteration, loss, ..
        } => {
            loss_avg = if iteration == 0 {
                loss
            } else {
                0.98 * loss_avg + 0.02 * loss
            };
            if let Some(b) = &mut bar {
                b.set_note(format!("loss {loss_avg:.4}"));
                b.update(iteration + 1);
            }
        }
        Event::Evaluating { stage, done, total } => {
            if let Some(b) = &mut bar {
                b.set_note(format!("{stage} {done}/{total}"));
                b.update(b.total);
            }
        }
        Event::EpochEnd {
            epoch,
            mean_loss,
            recalls,
            best,
            seconds,
        } => {
            if let Some(b) = bar.take() {
                b.finish();
            }
            eprintln!(
                "epoch {}: loss {mean_loss:.4}, val R@1 {:.2}, R@5 {:.2}{} ({seconds:.1} s)",
                epoch + 1,
                recalls[0],
                recalls[1],
                if best { ", best so far" } else { "" }
            );
        }
    };
    let summary = classify::train(&options, &run, &device, resume, &mut report)?;
    let mut lines = vec![format!(
        "trained {} {} -> {} on {device} for {} epochs in {:.1} s: best validation R@1 {:.2}",
        options.method.name(),
        options.backbone,
        options.dim,
        summary.epochs_run,
        started.elapsed().as_secs_f64(),
        summary.best_recall1
    )];
    if let Some([r1, r5]) = summary.test_recalls {
        lines.push(format!("test R@1 {r1:.2}, R@5 {r5:.2} (best model)"));
    }
    lines.push(format!(
        "models: {} and {}",
        run.join("best.safetensors").display(),
        run.join("last.safetensors").display()
    ));
    for line in lines {
        writeln!(out, "{line}").map_err(stdout_err)?;
    }
    Ok(())
}

/// Work done, speed and time left on one line of standard error, redrawn at most ten times a
/// second; silent when standard error is not a terminal.
struct ProgressBar {
    total: usize,
    /// What is counted ("images", "database rows").
    unit: String,
    /// Shown after the time left (the running loss).
    note: String,
    shown: bool,
    start: Instant,
    last_draw: Option<Instant>,
}

impl ProgressBar {
    fn new(total: usize, unit: &str, shown: bool) -> ProgressBar {
        ProgressBar {
            total,
            unit: unit.to_string(),
            note: String::new(),
            shown,
            start: Instant::now(),
            last_draw: None,
        }
    }

    fn update(&mut self, done: usize) {
        let now = Instant::now();
        let recent = self
            .last_draw
            .is_some_and(|t| now.duration_since(t).as_secs_f64() < 0.1);
        if !self.shown || (recent && done < self.total) {
            return;
        }
        self.last_draw = Some(now);
        let rate = done as f64 / now.duration_since(self.start).as_secs_f64().max(1e-9);
        let left = ((self.total - done) as f64 / rate.max(1e-9)).round() as u64;
        let width = 30;
        let filled = width * done / self.total.max(1);
        eprint!(
            "\r[{}{}] {done}/{} {}, {rate:.1}/s, ETA {}:{:02} {}  ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.total,
            self.unit,
            left / 60,
            left % 60,
            self.note
        );
    }

    fn set_note(&mut self, note: String) {
        self.note = note;
    }

    /// Ends the bar's line so that what follows starts on its own.
    fn finish(&self) {
        if self.shown && self.last_draw.is_some() {
            eprintln!();
        }
    }
}
