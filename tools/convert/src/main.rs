//! `convert IN.pth OUT.safetensors [--arch NAME] [--key K]`, or `convert --list`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use convert::{catalog, convert_file, Options};

/// Convert an official PyTorch VPR checkpoint to a self-describing safetensors file.
///
/// The pickle inside the checkpoint is read, never executed. The architecture is recognised
/// from tensor names and shapes and written to the safetensors metadata (vpr.arch,
/// vpr.backbone, vpr.dim, input normalisation and size rule, ...).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The PyTorch checkpoint (.pth / .pth.tar, zip or legacy format).
    #[arg(required_unless_present = "list")]
    input: Option<PathBuf>,
    /// Where to write the safetensors file.
    #[arg(required_unless_present = "list")]
    output: Option<PathBuf>,
    /// Architecture: cosplace, eigenplaces, netvlad, selavpr, dinov2, benchmark, clusvpr,
    /// torchvision (an ImageNet ResNet or VGG16, a backbone for `vpr-engine train --init`), or
    /// raw (copy the tensors without recognising them). Default: recognise from the keys.
    #[arg(long, value_name = "NAME")]
    arch: Option<String>,
    /// Key of the state dict inside the checkpoint (a/b for nested dicts). Default: the
    /// first of model_state_dict, state_dict, model, else the top-level dict.
    #[arg(long, value_name = "K")]
    key: Option<String>,
    /// Print the catalog of official checkpoints and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.list {
        print!("{}", catalog::table());
        return ExitCode::SUCCESS;
    }
    let (Some(input), Some(output)) = (cli.input, cli.output) else {
        unreachable!("clap requires both paths unless --list")
    };
    let opts = Options {
        arch: cli.arch,
        key: cli.key,
    };
    match convert_file(&input, &output, &opts) {
        Ok(notes) => {
            for n in notes {
                eprintln!("convert: note: {n}");
            }
            eprintln!("convert: wrote {}", output.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("convert: {}: {e}", input.display());
            ExitCode::from(2)
        }
    }
}
