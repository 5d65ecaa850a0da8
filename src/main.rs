//! The `vpr-engine` command line.

use clap::{Parser, Subcommand};
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
    let result = match cli.command {
        Command::Info => {
            info();
            Ok(true)
        }
        Command::Check { device, seed } => check(device.as_deref(), seed),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn info() {
    println!("vpr-engine {}", env!("CARGO_PKG_VERSION"));
    println!("devices:");
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("  cpu      available, {threads} threads");
    match Device::new("vgpu") {
        Ok(Device::Gpu(g)) => println!("  vgpu     available: {}", g.describe()),
        _ => println!("  vgpu     unavailable"),
    }
    let status = cuda::probe();
    match &status.devices {
        Ok(devices) => devices.iter().for_each(|d| println!("  {d}")),
        Err(why) => println!("  cuda     unavailable: {why}"),
    }
    match &status.nvrtc {
        Ok(v) => println!("nvrtc:     {v}"),
        Err(why) => println!("nvrtc:     unavailable: {why}"),
    }
    println!("kernel cache: {}", status.cache_dir.display());
    let kernels: usize = KERNEL_MODULES.iter().map(|m| m.kernels.len()).sum();
    let files: Vec<String> = KERNEL_MODULES
        .iter()
        .map(|m| format!("{} ({})", m.name, m.kernels.len()))
        .collect();
    println!(
        "kernels: {kernels} in {} files: {}",
        KERNEL_MODULES.len(),
        files.join(", ")
    );
    println!("default device: {}", Device::default_device());
}

fn check(device: Option<&str>, seed: Option<u64>) -> vpr_engine::Result<bool> {
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
    println!("device: {}", g.describe());
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.subsec_nanos() as u64)
    });
    println!("seed: {seed} (rerun with --seed {seed})\n");
    let rows = vpr_engine::check::run(&device, seed);
    println!(
        "{:<28} {:<5} {:<18} {:>10} {:>8}  result",
        "kernel", "dtype", "shape", "max err", "tol"
    );
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
        println!(
            "{:<28} {:<5} {:<18} {:>10.2e} {:>8.0e}  {verdict}",
            r.kernel,
            r.dtype.to_string(),
            r.shape,
            r.max_err,
            r.tol
        );
    }
    println!("\n{} passed, {failed} failed", rows.len() - failed);
    Ok(failed == 0)
}
