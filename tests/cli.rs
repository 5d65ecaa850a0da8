//! The command line end to end: `info`, `check`, and bad arguments; and `VPR_REQUIRE_GPU`, which
//! makes the suite's CUDA tests fail instead of skipping where no GPU is usable.

mod common;

use std::process::Command;

fn vpr_engine(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn info_lists_every_device_and_why_cuda_is_missing() {
    let (code, text) = vpr_engine(&["info"]);
    assert_eq!(code, 0, "{text}");
    for needle in [
        "cpu      available",
        "vgpu     available",
        "kernel cache:",
        "default device:",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    assert!(
        text.contains("cuda:0 ") || text.contains("cuda     unavailable: "),
        "{text}"
    );
}

#[test]
fn check_on_the_virtual_gpu_covers_every_kernel_and_passes() {
    let (code, text) = vpr_engine(&["check", "--device", "vgpu", "--seed", "11"]);
    assert_eq!(code, 0, "{text}");
    let summary = text.lines().last().unwrap();
    assert!(
        summary.ends_with(" 0 failed") && !summary.starts_with("0 passed"),
        "{summary}"
    );
    for module in vpr_engine::device::kernels::KERNEL_MODULES
        .iter()
        .filter(|m| m.name != "selftest")
    {
        for kernel in module.kernels {
            // a row's first word is its kernel, or kernels joined by '+' when it runs several
            assert!(
                text.lines().any(|l| l
                    .split_whitespace()
                    .next()
                    .is_some_and(|k| k.split('+').any(|k| k == *kernel))),
                "kernel {kernel} of kernels/{}.cu has no conformance case",
                module.name
            );
        }
    }
}

#[test]
fn bad_arguments_are_clear_errors() {
    let (code, text) = vpr_engine(&["check", "--device", "tpu"]);
    assert_eq!(code, 2);
    assert!(text.contains("unknown device 'tpu'"), "{text}");
    let (code, text) = vpr_engine(&["check", "--device", "cpu"]);
    assert_eq!(code, 2);
    assert!(text.contains("use --device cuda, cuda:N or vgpu"), "{text}");
    let (code, text) = vpr_engine(&["check", "--seed", "many"]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("--seed"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args(["check", "--device", "vgpu"])
        .env("VPR_VGPU_SEED", "abc")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("VPR_VGPU_SEED=\"abc\" is not a non-negative integer"),
        "{err}"
    );
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args(["check", "--device", "vgpu"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take()); // the reader goes away, as `| head` does
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

#[test]
fn check_on_a_real_gpu_when_there_is_one() {
    if let Err(e) = vpr_engine::Device::new("cuda") {
        common::skip_without_gpu("check --device cuda", &e);
        return;
    }
    let (code, text) = vpr_engine(&["check", "--device", "cuda"]);
    assert_eq!(code, 0, "{text}");
}

/// With `VPR_REQUIRE_GPU=1` the CUDA devices of the tests must include a real GPU.
#[test]
fn gpu_devices_include_cuda_when_required() {
    let devices = common::gpu_devices();
    if common::gpu_required() {
        assert!(
            devices.iter().any(|d| d.to_string().starts_with("cuda")),
            "{devices:?}"
        );
    }
}

/// Runs the test above in a child process of this test binary with `VPR_REQUIRE_GPU=value`.
fn gpu_devices_test_with(value: &str) -> (bool, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "gpu_devices_include_cuda_when_required"])
        .env("VPR_REQUIRE_GPU", value)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("1 passed") || text.contains("1 failed"),
        "{text}"
    );
    (out.status.success(), text)
}

#[test]
fn require_gpu_turns_a_skipped_cuda_test_into_a_failure() {
    let (passed, text) = gpu_devices_test_with("1");
    match vpr_engine::Device::new("cuda") {
        Ok(_) => assert!(passed, "{text}"),
        Err(_) => assert!(
            !passed && text.contains("VPR_REQUIRE_GPU=1 but a cuda test found no usable CUDA GPU"),
            "{text}"
        ),
    }
    let (passed, text) = gpu_devices_test_with("0");
    assert!(passed, "{text}");
    let (passed, text) = gpu_devices_test_with("yes");
    assert!(
        !passed && text.contains("VPR_REQUIRE_GPU=\"yes\" is neither 0 nor 1"),
        "{text}"
    );
}
