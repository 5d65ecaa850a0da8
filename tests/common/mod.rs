//! Helpers shared by the integration tests: seeds, devices and comparisons.
#![allow(dead_code)]

pub mod synthetic;

use std::path::Path;
use std::process::Command;
use vpr_engine::check::{max_error, CheckRow};
use vpr_engine::device::nvrtc::{project_tools_dir, wheel_lib_dir};
use vpr_engine::{Device, Tensor};

/// A fresh seed per run (or `VPR_TEST_SEED`), printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("VPR_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("{test}: VPR_TEST_SEED={s}");
    s
}

/// Whether `VPR_REQUIRE_GPU=1` asks for a usable CUDA GPU (`tools/gpu_bundle.sh run` sets it on
/// the GPU machine): then a test that would skip its CUDA part for want of one fails instead, so a
/// green run there proves the GPU path. Unset, empty or `0`: skipping is allowed.
pub fn gpu_required() -> bool {
    match std::env::var("VPR_REQUIRE_GPU") {
        Err(_) => false,
        Ok(v) => match v.as_str() {
            "" | "0" => false,
            "1" => true,
            _ => panic!("VPR_REQUIRE_GPU={v:?} is neither 0 nor 1"),
        },
    }
}

/// Reports that `what` did not run on CUDA because `why`: a failure under `VPR_REQUIRE_GPU=1`,
/// otherwise a note on stderr past the test harness's capture (which only takes the print
/// macros), so that a green run without a GPU says what it did not run.
pub fn skip_without_gpu(what: &str, why: &dyn std::fmt::Display) {
    assert!(
        !gpu_required(),
        "VPR_REQUIRE_GPU=1 but {what} found no usable CUDA GPU: {why}"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "note: {what} skipped: {why}");
}

/// The virtual GPU, and the real one when this machine has a usable GPU (required under
/// `VPR_REQUIRE_GPU=1`). The real GPU's new allocations are filled with NaN as the virtual GPU's
/// always are, so an output element a kernel fails to write shows up there too instead of passing
/// with a stale value from the cache.
pub fn gpu_devices() -> Vec<Device> {
    let mut devices = vec![Device::new("vgpu").unwrap()];
    match Device::new("cuda") {
        Ok(d) => {
            if let Some(g) = d.gpu() {
                g.set_poison(true);
            }
            devices.push(d)
        }
        Err(e) if gpu_required() => skip_without_gpu("a cuda test", &e),
        Err(e) => {
            // the note once per test binary
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| skip_without_gpu("cuda tests", &e));
        }
    }
    devices
}

/// Asserts `max |got - want| / max(|want|, 1) <= tol`, naming the case and the seed.
pub fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str, seed: u64) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: lengths differ (seed {seed})"
    );
    let err = max_error(got, want);
    if err.is_nan() || err > tol {
        let worst = got
            .iter()
            .zip(want)
            .enumerate()
            .max_by(|a, b| {
                max_error(&[*a.1 .0], &[*a.1 .1]).total_cmp(&max_error(&[*b.1 .0], &[*b.1 .1]))
            })
            .map(|(i, (g, w))| format!("element {i}: got {g}, want {w}"))
            .unwrap_or_default();
        panic!("{what}: max error {err:e} > {tol:e} ({worst}); replay with VPR_TEST_SEED={seed}");
    }
}

pub fn assert_tensor_close(got: &Tensor, want: &Tensor, tol: f64, what: &str, seed: u64) {
    assert_eq!(
        got.shape(),
        want.shape(),
        "{what}: shapes differ (seed {seed})"
    );
    assert_close(
        &got.to_f64_vec().unwrap(),
        &want.to_f64_vec().unwrap(),
        tol,
        what,
        seed,
    );
}

/// Awkward sizes: 1, primes, one past powers of two.
pub const ODD_SIZES: &[usize] = &[1, 7, 33, 257];

/// Runs an op family's conformance cases on every GPU and asserts that each row passes.
pub fn assert_conformance(
    cases: fn(&Device, u64) -> vpr_engine::Result<Vec<CheckRow>>,
    test: &str,
) {
    let s = seed(test);
    for device in gpu_devices() {
        let rows = cases(&device, s).unwrap();
        assert!(!rows.is_empty(), "{device}: {test} ran no rows");
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| !r.passed())
            .map(|r| {
                format!(
                    "{} {} {}: err {:e} tol {:e} {:?}",
                    r.kernel, r.dtype, r.shape, r.max_err, r.tol, r.error
                )
            })
            .collect();
        assert!(
            failed.is_empty(),
            "{device}: replay with VPR_TEST_SEED={s}:\n{}",
            failed.join("\n")
        );
    }
}

const NVRTC_WHEEL: &str = "nvidia-cuda-nvrtc==13.0.88";

/// Installs NVIDIA's NVRTC wheel into `.cuda-tools/` (unless `VPR_NVRTC` names one), once per test
/// process: the tests run in parallel threads, and two pip installs into one folder race.
pub fn install_nvrtc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(install_nvrtc_wheel);
}

fn install_nvrtc_wheel() {
    let tools = project_tools_dir();
    // An explicit NVRTC (e.g. the toolkit's on a GPU machine with no network) needs no wheel.
    let explicit = std::env::var_os("VPR_NVRTC").is_some_and(|p| Path::new(&p).exists());
    if explicit || wheel_lib_dir(&tools).join("libnvrtc.so.13").exists() {
        return;
    }
    eprintln!("installing {NVRTC_WHEEL} into {}", tools.display());
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--no-deps",
            "--target",
        ])
        .arg(&tools)
        .arg(NVRTC_WHEEL)
        .status()
        .expect("running python3 -m pip");
    assert!(
        status.success(),
        "pip could not install {NVRTC_WHEEL} into {}",
        tools.display()
    );
}

/// Every tensor of a committed fixture under tests/fixtures/ as (shape, values in f64); f32 and
/// int64 tensors only.
pub fn fixture_tensors(file: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{}: {name} is {other:?}", path.display()),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// `max |got - want| / max |want|` (the absolute error where `want` is all zeros).
pub fn max_relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, w| m.max(w.abs()));
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Runs the `vpr-engine` binary: exit code, standard output, standard error.
pub fn vpr_engine(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
