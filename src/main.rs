//! The `vpr-engine` command line.

use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use vpr_engine::device::kernels::KERNEL_MODULES;
use vpr_engine::device::{cuda, Device};
use vpr_engine::eval::extract::{self, ExtractOptions};
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
    Extract {
        /// A converted model: safetensors with vpr.* metadata, as `convert` writes.
        #[arg(long)]
        weights: PathBuf,
        /// The folder searched (recursively) for .jpg, .jpeg and .png images.
        #[arg(long)]
        images: PathBuf,
        /// The descriptors file to write (D.npy; the paths go to D.paths.txt).
        #[arg(long)]
        out: PathBuf,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let result = match cli.command {
        Command::Info => info(&mut out).map(|_| true),
        Command::Check { device, seed } => check(&mut out, device.as_deref(), seed),
        Command::Extract {
            weights,
            images,
            out: descriptors,
            device,
            batch_size,
            resize,
        } => extract(
            &mut out,
            &weights,
            &images,
            &descriptors,
            device.as_deref(),
            batch_size,
            resize.as_deref(),
        )
        .map(|_| true),
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

fn extract(
    out: &mut impl Write,
    weights: &Path,
    images: &Path,
    descriptors: &Path,
    device: Option<&str>,
    batch_size: usize,
    resize: Option<&str>,
) -> vpr_engine::Result<()> {
    // every argument is checked before the model is loaded or an image read
    let resize = resize.map(parse_resize).transpose()?;
    if batch_size == 0 {
        return Err(Error::Argument("--batch-size must be at least 1".into()));
    }
    let device = match device {
        Some(d) => Device::new(d)?,
        None => Device::default_device(),
    };
    let folder = match descriptors.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() || descriptors.is_dir() {
        return Err(Error::Argument(format!(
            "--out {}: not a file in an existing folder",
            descriptors.display()
        )));
    }
    let paths = extract::list_images(images)?;
    let model = vpr_engine::models::load(weights, &device)?;
    let options = ExtractOptions {
        resize,
        ..ExtractOptions::new(batch_size)
    };
    let start = Instant::now();
    let total = paths.len();
    let mut bar = ProgressBar::new(total, std::io::stderr().is_terminal());
    let result = extract::extract_descriptors(model.as_ref(), &paths, &options, &mut |done| {
        bar.update(done)
    });
    bar.finish();
    let matrix = result?;
    extract::write_outputs(descriptors, &paths, &matrix)?;
    let seconds = start.elapsed().as_secs_f64();
    writeln!(
        out,
        "{total} images -> {} [{total}, {}] and {} ({}, {device}, {seconds:.1} s, {:.1} images/s)",
        descriptors.display(),
        matrix.cols,
        extract::paths_file(descriptors).display(),
        model.describe(),
        total as f64 / seconds.max(1e-9),
    )
    .map_err(stdout_err)
}

/// Images done, speed and time left on one line of standard error, redrawn at most ten times a
/// second; silent when standard error is not a terminal.
struct ProgressBar {
    total: usize,
    shown: bool,
    start: Instant,
    last_draw: Option<Instant>,
}

impl ProgressBar {
    fn new(total: usize, shown: bool) -> ProgressBar {
        ProgressBar {
            total,
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
            "\r[{}{}] {done}/{} images, {rate:.1} img/s, ETA {}:{:02}  ",
            "#".repeat(filled),
            " ".repeat(width - filled),
            self.total,
            left / 60,
            left % 60
        );
    }

    /// Ends the bar's line so that what follows starts on its own.
    fn finish(&self) {
        if self.shown && self.last_draw.is_some() {
            eprintln!();
        }
    }
}
