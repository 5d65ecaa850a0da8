//! The `vpr-engine` command line.

use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;
use vpr_engine::device::kernels::KERNEL_MODULES;
use vpr_engine::device::{cuda, Device};

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let result = match cli.command {
        Command::Info => info(&mut out).map(|_| true),
        Command::Check { device, seed } => check(&mut out, device.as_deref(), seed),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        // the reader went away (`vpr-engine check | head`): nothing is left to tell
        Err(vpr_engine::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn stdout_err(source: std::io::Error) -> vpr_engine::Error {
    vpr_engine::Error::Io {
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
        return Err(vpr_engine::Error::Argument(
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
