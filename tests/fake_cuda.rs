//! The CUDA backend end to end on a machine without a GPU: `vpr-engine` runs against a fake
//! libcuda.so.1 (tests/fake_cuda/libcuda.cpp) that implements the driver API calls the engine
//! makes, with the real driver's checks, and runs the kernels of every CUBIN it loads on the
//! virtual GPU. NVRTC compiles real CUBINs for the fake device's architecture, so this covers
//! cudarc, src/device/cuda.rs, the kernel cache, launch limits, tensor maps and the allocator on
//! the path a real GPU takes; only the hardware itself is emulated.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Builds the fake driver once per test process: the test file linked with the virtual GPU's
/// library into `libcuda.so.1` (and `libcuda.so`, the name cudarc tries first).
fn fake_driver_dir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        if vpr_engine::device::vgpu::built_with_asan() {
            eprintln!(
                "fake CUDA driver tests skipped: the virtual GPU is built with AddressSanitizer"
            );
            return None;
        }
        common::install_nvrtc();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fake-cuda");
        std::fs::create_dir_all(&dir).unwrap();
        let lib = dir.join("libcuda.so.1");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let out = Command::new(&cxx)
            .args(["-std=c++17", "-O1", "-fPIC", "-shared", "-DCUDA_EMU", "-I"])
            .arg(root.join("kernels/include"))
            .arg(root.join("tests/fake_cuda/libcuda.cpp"))
            .args(["-o"])
            .arg(&lib)
            .arg("-Wl,--whole-archive")
            .arg(env!("VPR_VGPU_LIBRARY"))
            .args([
                "-Wl,--no-whole-archive",
                "-Wl,--exclude-libs,ALL",
                "-Wl,--no-undefined",
                "-lpthread",
            ])
            .output()
            .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
        assert!(
            out.status.success(),
            "building the fake libcuda failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let alias = dir.join("libcuda.so");
        let _ = std::fs::remove_file(&alias);
        std::fs::copy(&lib, &alias).unwrap();
        Some(dir)
    })
    .as_deref()
}

/// A program run against the fake driver (`vpr-engine`, or this test binary for its child tests):
/// its output, and the driver's log of the calls it made.
struct Run {
    output: Output,
    log: String,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    fn assert_success(&self, what: &str) {
        assert!(
            self.output.status.success(),
            "{what} failed ({}):\n{}\n{}",
            self.output.status,
            self.stdout(),
            self.stderr()
        );
    }

    fn log_lines(&self, prefix: &str) -> Vec<&str> {
        self.log.lines().filter(|l| l.starts_with(prefix)).collect()
    }
}

fn run_with_fake(name: &str, program: &Path, args: &[&str], env: &[(&str, &str)]) -> Option<Run> {
    let dir = fake_driver_dir()?;
    let log = dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&log);
    let library_path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let output = Command::new(program)
        .args(args)
        .env("LD_LIBRARY_PATH", library_path)
        .env("VPR_KERNEL_CACHE", dir.join("kernel-cache"))
        .env("FAKE_CUDA_LOG", &log)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    Some(Run { output, log })
}

fn engine(name: &str, args: &[&str], env: &[(&str, &str)]) -> Option<Run> {
    run_with_fake(name, Path::new(env!("CARGO_BIN_EXE_vpr-engine")), args, env)
}

#[test]
fn info_describes_the_device_the_driver_reports() {
    let Some(run) = engine("info", &["info"], &[]) else {
        return;
    };
    run.assert_success("vpr-engine info");
    let out = run.stdout();
    assert!(
        out.contains("cuda:0 vpr-engine fake CUDA driver (virtual GPU, sm_90) | compute capability 9.0 | 80.0 GiB"),
        "{out}"
    );
}

#[test]
fn a_driver_without_a_gpu_is_explained_not_a_panic() {
    for (name, env, why) in [
        (
            "no-gpu",
            ("FAKE_CUDA_DEVICES", "0"),
            "the CUDA driver found no GPU",
        ),
        (
            "init-fails",
            ("FAKE_CUDA_INIT_ERROR", "100"),
            "the CUDA driver reports: CUDA_ERROR_NO_DEVICE",
        ),
    ] {
        let Some(info) = engine(name, &["info"], &[env]) else {
            return;
        };
        info.assert_success("vpr-engine info");
        assert!(info.stdout().contains(why), "{name}: {}", info.stdout());

        let check = engine(name, &["check", "--device", "cuda"], &[env]).unwrap();
        assert!(
            !check.output.status.success(),
            "{name}: check passed without a GPU"
        );
        let err = check.stderr();
        assert!(err.contains("cuda:0 is unavailable"), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    // a device the driver does not have
    let check = engine("second-gpu", &["check", "--device", "cuda:1"], &[]).unwrap();
    assert!(!check.output.status.success());
    let err = check.stderr();
    assert!(
        err.contains("cuda:1 is unavailable: CUDA_ERROR_INVALID_DEVICE")
            && !err.contains("panicked"),
        "{err}"
    );
}

/// `check --device cuda` on a compute capability `cc` device: every row passes, each kernel file
/// is compiled for `arch` and loaded once, and its CUBIN lands in the kernel cache.
fn check_passes(cc: &str, arch: &str) -> Option<Run> {
    let run = engine(
        &format!("check-{arch}"),
        &["check", "--device", "cuda"],
        &[("FAKE_CUDA_CC", cc)],
    )?;
    run.assert_success("vpr-engine check --device cuda");
    let out = run.stdout();
    assert!(
        out.contains(&format!("compute capability {cc}")) || out.contains(arch),
        "{out}"
    );

    let loads = run.log_lines("cuModuleLoadData");
    let mut files: Vec<&str> = loads.iter().map(|l| l.split(' ').nth(1).unwrap()).collect();
    files.sort();
    let count = files.len();
    files.dedup();
    assert_eq!(
        count,
        files.len(),
        "a kernel file was loaded twice: {loads:?}"
    );
    for module in vpr_engine::device::kernels::KERNEL_MODULES {
        if module.name == "selftest" {
            continue;
        }
        assert!(
            files.contains(&module.name),
            "{} never loaded: {loads:?}",
            module.name
        );
        let cached = std::fs::read_dir(fake_driver_dir()?.join("kernel-cache"))
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| {
                let f = e.file_name().to_string_lossy().into_owned();
                f.starts_with(&format!("{}-", module.name)) && f.contains(&format!("-{arch}-nvrtc"))
            });
        assert!(cached, "no cached {arch} CUBIN of {}", module.name);
    }
    assert!(
        loads
            .iter()
            .all(|l| l.ends_with(&format!(" sm_{}", &arch[3..5]))),
        "{loads:?}"
    );
    Some(run)
}

#[test]
fn check_passes_on_a_compute_capability_9_0_device() {
    let Some(run) = check_passes("9.0", "sm_90a") else {
        return;
    };
    let out = run.stdout();
    for family in ["gemm_tma_bf16", "gemm_wgmma_f16", "gemm_bf16"] {
        assert!(out.contains(family), "no {family} rows:\n{out}");
    }
    // the TMA kernels ask for their 193 KiB of shared memory before they launch
    assert!(
        run.log_lines("cuFuncSetAttribute gemm_tma_").len() >= 8,
        "{}",
        run.log
    );
    assert!(!run.log_lines("cuTensorMapEncodeTiled").is_empty());
}

#[test]
fn check_passes_on_a_compute_capability_8_0_device() {
    let Some(run) = check_passes("8.0", "sm_80") else {
        return;
    };
    let out = run.stdout();
    assert!(out.contains("gemm_bf16"), "{out}");
    assert!(
        !out.contains("gemm_tma") && !out.contains("gemm_wgmma"),
        "{out}"
    );
    assert!(run.log_lines("cuTensorMapEncodeTiled").is_empty());
}

/// Run by `training_steps_reuse_device_memory` in a process with the fake driver: three AdamW
/// steps of a bf16-autocast linear layer on `cuda`, with a marker in the driver's log before each.
#[test]
#[ignore = "runs in a child process of training_steps_reuse_device_memory"]
fn training_steps_child() {
    use std::io::Write;
    use vpr_engine::nn::{Linear, Module};
    use vpr_engine::ops::loss::Reduction;
    use vpr_engine::train::{Adam, Optimizer};
    use vpr_engine::{autograd, DType, Device, Tensor};

    let log = std::env::var("FAKE_CUDA_LOG").expect("run with the fake driver");
    let mark = |text: String| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{text}").unwrap();
    };
    let device = Device::new("cuda").unwrap();
    let fc = Linear::new("fc", 96, 40, true, 0, &device).unwrap();
    let mut opt = Optimizer::single(fc.parameters(), Adam::adamw(1e-2)).unwrap();
    let x = Tensor::randn(&[64, 96], 0.0, 1.0, 1, DType::F32, &device).unwrap();
    let y = Tensor::from_vec((0..64i64).map(|i| i % 40).collect(), &[64], &device).unwrap();
    let mut losses = Vec::new();
    for step in 0..3 {
        mark(format!("step {step}"));
        opt.zero_grad();
        let logits = autograd::autocast(DType::BF16, || fc.forward(&x)).unwrap();
        let loss = logits
            .to_dtype(DType::F32)
            .unwrap()
            .cross_entropy(&y, Reduction::Mean)
            .unwrap();
        autograd::backward(&loss).unwrap();
        opt.step().unwrap();
        losses.push(loss.to_scalar_f64().unwrap());
    }
    mark(format!("losses {losses:?}"));
    assert!(losses[2] < losses[0], "{losses:?}");
}

/// Runs the ignored test `child` of this file in a process with the fake driver.
fn run_child(child: &str) -> Option<Run> {
    let exe = std::env::current_exe().unwrap();
    let run = run_with_fake(
        child,
        &exe,
        &["--ignored", "--exact", child, "--nocapture"],
        &[],
    )?;
    run.assert_success(child);
    assert!(run.stdout().contains("1 passed"), "{}", run.stdout());
    Some(run)
}

#[test]
fn training_steps_reuse_device_memory() {
    let Some(run) = run_child("training_steps_child") else {
        return;
    };
    let steps: Vec<&str> = run.log.split("step ").collect();
    assert_eq!(steps.len(), 4, "{}", run.log);
    assert!(steps[1].contains("cuLaunchKernel"), "{}", run.log);
    // the first step fills the caching allocator; the next ones only reuse it
    for later in &steps[2..] {
        assert!(
            !later.contains("cuMemAlloc") && !later.contains("cuMemFree"),
            "a later training step called the driver's allocator:\n{}",
            run.log
        );
    }
}

/// Run by `batches_upload_through_one_page_locked_buffer`: image-sized uploads through
/// `Tensor::from_f32_fill`, a larger one, then the first size again, each read back.
#[test]
#[ignore = "runs in a child process of batches_upload_through_one_page_locked_buffer"]
fn staged_uploads_child() {
    use std::io::Write;
    use vpr_engine::Tensor;

    let log = std::env::var("FAKE_CUDA_LOG").expect("run with the fake driver");
    let mark = |text: &str| {
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writeln!(f, "{text}").unwrap();
    };
    let device = vpr_engine::Device::new("cuda").unwrap();
    for (i, shape) in [[2, 5, 7, 3], [2, 5, 7, 3], [4, 5, 7, 3], [2, 5, 7, 3]]
        .iter()
        .enumerate()
    {
        mark(&format!("upload {i}"));
        let t = Tensor::from_f32_fill(shape, &device, |v| {
            assert!(
                v.iter().all(|&x| x == 0.0),
                "fill got bytes that were not zeroed"
            );
            v.iter_mut()
                .enumerate()
                .for_each(|(j, x)| *x = (j * 7 + i) as f32);
        })
        .unwrap();
        assert_eq!(t.shape(), shape);
        let back = t.to_vec::<f32>().unwrap();
        let want: Vec<f32> = (0..back.len()).map(|j| (j * 7 + i) as f32).collect();
        assert_eq!(back, want, "upload {i}");
    }
}

#[test]
fn batches_upload_through_one_page_locked_buffer() {
    let Some(run) = run_child("staged_uploads_child") else {
        return;
    };
    let uploads: Vec<&str> = run.log.split("upload ").skip(1).collect();
    assert_eq!(uploads.len(), 4, "{}", run.log);
    let first = 2 * 5 * 7 * 3 * 4;
    assert!(
        uploads[0].contains(&format!("cuMemHostAlloc {first}\n")),
        "{}",
        run.log
    );
    // the same size reuses the buffer; a larger one replaces it; a smaller one fits in it
    for i in [1, 3] {
        assert!(
            !uploads[i].contains("cuMemHost") && !uploads[i].contains("cuMemFreeHost"),
            "{}",
            run.log
        );
    }
    assert!(
        uploads[2].contains(&format!("cuMemFreeHost {first}\n"))
            && uploads[2].contains(&format!("cuMemHostAlloc {}\n", 2 * first)),
        "{}",
        run.log
    );
}

/// Run by `launch_errors_are_errors`: a launch the driver refuses fails at once; a kernel that
/// faults fails the next synchronising call, and every call after it, as on a GPU.
#[test]
#[ignore = "runs in a child process of launch_errors_are_errors"]
fn launch_errors_child() {
    use vpr_engine::device::{KernelArgs, LaunchConfig};
    let device = vpr_engine::Device::new("cuda").unwrap();
    let gpu = device.gpu().unwrap().clone();
    let out = gpu.alloc(1024 * 4).unwrap();
    let launch = |kernel: &str, threads: u32| {
        let cfg = LaunchConfig {
            grid: (1, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        };
        gpu.launch(kernel, cfg, KernelArgs::new().ptr(&out, 0))
    };

    let err = launch("vgpu_partial_warp_i32", 2048)
        .unwrap_err()
        .to_string();
    assert!(err.contains("CUDA_ERROR_INVALID_VALUE"), "{err}");
    launch("vgpu_partial_warp_i32", 32).unwrap();
    gpu.synchronize().unwrap();

    launch("vgpu_bug_divergent_barrier_f32", 256).unwrap();
    let err = gpu.synchronize().unwrap_err().to_string();
    assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
    let err = gpu.download(&out, 0, 16).unwrap_err().to_string();
    assert!(err.contains("CUDA_ERROR_LAUNCH_FAILED"), "{err}");
}

#[test]
fn launch_errors_are_errors() {
    let Some(run) = run_child("launch_errors_child") else {
        return;
    };
    // the driver's own account of the fault names the barrier the threads diverged at
    let err = run.stderr();
    assert!(
        err.contains("vgpu_bug_divergent_barrier_f32 faulted") && err.contains("selftest.cu"),
        "{err}"
    );
}
