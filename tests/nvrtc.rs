//! Every kernel file compiles with NVRTC to CUBIN for sm_80, sm_90 and sm_90a (CUBIN runs ptxas,
//! the only check of inline PTX), without register spills; prints registers and shared memory per
//! kernel. sm_90a is what a compute capability 9.0 GPU gets: it enables the wgmma kernels.
//! NVRTC comes from NVIDIA's PyPI wheel, installed into `.cuda-tools/` on first use.

mod common;

use std::path::Path;
use vpr_engine::device::cuda::cached_cubin;
use vpr_engine::device::kernels::KERNEL_MODULES;
use vpr_engine::device::nvrtc::{Nvrtc, Target};

const ARCHS: [&str; 3] = ["sm_80", "sm_90", "sm_90a"];

/// Per-kernel figures from ptxas's verbose log.
#[derive(Debug, Default, Clone)]
struct Resources {
    kernel: String,
    registers: u32,
    shared_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
    stack_bytes: u32,
}

fn number_before(line: &str, unit: &str) -> Option<u32> {
    let pos = line.find(unit)?;
    line[..pos].split_whitespace().last()?.parse().ok()
}

fn parse_ptxas_log(log: &str) -> Vec<Resources> {
    let mut out: Vec<Resources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(Resources {
                kernel: rest.split('\'').next().unwrap_or("").to_string(),
                ..Default::default()
            });
        } else if let Some(r) = out.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                r.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                r.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                r.registers = number_before(line, "registers").unwrap_or(0);
                r.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[test]
fn every_kernel_compiles_for_sm80_sm90_and_sm90a_without_spills() {
    common::install_nvrtc();
    let nvrtc = Nvrtc::load().expect("NVRTC from .cuda-tools");
    let (major, minor) = nvrtc.version();
    assert!(Path::new(nvrtc.path()).exists() || nvrtc.path().starts_with("lib"));
    let jobs: Vec<_> = KERNEL_MODULES
        .iter()
        .flat_map(|m| ARCHS.map(|a| (m, a)))
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2).max(1))
            .map(|chunk| {
                let nvrtc = &nvrtc;
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(m, arch)| {
                            (
                                m.name,
                                arch,
                                nvrtc.compile(m, Target::Cubin(arch), &["--ptxas-options=-v"]),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });

    println!("NVRTC {major}.{minor}: kernel resources");
    println!(
        "{:<14} {:<6} {:<36} {:>5} {:>9} {:>7} {:>7}",
        "file", "arch", "kernel", "regs", "smem", "stack", "spills"
    );
    let mut failures = Vec::new();
    for (module, arch, compiled) in results {
        let compiled = match compiled {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{module}.cu for {arch}: {e}"));
                continue;
            }
        };
        assert!(
            !compiled.binary.is_empty(),
            "{module}.cu for {arch}: empty CUBIN"
        );
        let module_kernels = &KERNEL_MODULES
            .iter()
            .find(|m| m.name == module)
            .unwrap()
            .kernels;
        // ptxas warns of what costs speed without failing: wgmma serialised, local memory.
        for line in compiled.log.lines() {
            if line.contains("warning") || line.contains("Performance Loss") {
                failures.push(format!("{module}.cu for {arch}: {}", line.trim()));
            }
        }
        let resources = parse_ptxas_log(&compiled.log);
        for k in module_kernels.iter() {
            if !resources.iter().any(|r| &r.kernel == k) {
                failures.push(format!(
                    "{module}.cu for {arch}: ptxas reported nothing for kernel {k}"
                ));
            }
        }
        for r in resources {
            println!(
                "{:<14} {:<6} {:<36} {:>5} {:>9} {:>7} {:>7}",
                module,
                arch,
                r.kernel,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_stores + r.spill_loads
            );
            if r.spill_stores + r.spill_loads > 0 {
                failures.push(format!(
                    "{module}.cu {} on {arch}: {} bytes of register spills",
                    r.kernel,
                    r.spill_stores + r.spill_loads
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "NVRTC check failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn ptxas_log_parser_reads_the_figures() {
    let log = "ptxas info    : Compiling entry function 'gemm_bf16' for 'sm_90'\n\
               ptxas info    : Function properties for gemm_bf16\n\
               ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 128 registers, used 1 barriers, 16384 bytes smem, 400 bytes cmem[0]\n";
    let r = &parse_ptxas_log(log)[0];
    assert_eq!(
        (r.kernel.as_str(), r.registers, r.shared_bytes),
        ("gemm_bf16", 128, 16384)
    );
    assert_eq!((r.stack_bytes, r.spill_stores, r.spill_loads), (8, 4, 12));
}

#[test]
fn compiled_modules_are_cached_on_disk_by_source_arch_and_compiler() {
    common::install_nvrtc();
    let nvrtc = Nvrtc::load().unwrap();
    let dir = std::env::temp_dir().join(format!("vpr-kernel-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let module = KERNEL_MODULES.iter().find(|m| m.name == "copy").unwrap();
    let first = cached_cubin(&nvrtc, module, "sm_90", &dir).unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(
        files[0].starts_with("copy-")
            && files[0].ends_with(&format!(
                "-sm_90-nvrtc{}.{}.cubin",
                nvrtc.version().0,
                nvrtc.version().1
            ))
    );
    // a second call reads the file: prove it by planting different bytes there
    std::fs::write(dir.join(&files[0]), b"cached").unwrap();
    assert_eq!(
        cached_cubin(&nvrtc, module, "sm_90", &dir).unwrap(),
        b"cached"
    );
    assert_ne!(first, b"cached");
    // another architecture is another entry
    cached_cubin(&nvrtc, module, "sm_80", &dir).unwrap();
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The wgmma kernels (cp.async- and TMA-fed) are real only where HAS_WGMMA holds: their PTX for
/// compute_90a issues wgmma, for compute_90 they are stubs that trap (the host never launches them
/// there).
#[test]
fn wgmma_kernels_are_compiled_for_sm90a_only() {
    common::install_nvrtc();
    let nvrtc = Nvrtc::load().expect("NVRTC from .cuda-tools");
    let module = KERNEL_MODULES.iter().find(|m| m.name == "matmul").unwrap();
    let ptx = |arch| {
        let compiled = nvrtc.compile(module, Target::Ptx(arch), &[]).unwrap();
        String::from_utf8(compiled.binary).unwrap()
    };
    let hopper = ptx("compute_90a");
    let wgmma_kernels: Vec<_> = module
        .kernels
        .iter()
        .filter(|k| k.starts_with("gemm_wgmma_") || k.starts_with("gemm_tma_"))
        .collect();
    assert_eq!(
        wgmma_kernels.len(),
        16,
        "two families, bf16 and f16, four transposes"
    );
    for k in &wgmma_kernels {
        let body = ptx_entry(&hopper, k);
        assert!(
            body.contains("wgmma.mma_async.sync.aligned.m64n256k16.f32"),
            "{k} issues no wgmma on compute_90a"
        );
        if k.starts_with("gemm_tma_") {
            assert!(
                body.contains("cp.async.bulk.tensor.3d")
                    && body.contains("mbarrier.try_wait")
                    && body.contains("setmaxnreg.inc"),
                "{k}: no TMA loads, mbarrier waits or register reallocation"
            );
        } else {
            assert!(body.contains("fence.proxy.async"), "{k}: no proxy fence");
        }
    }
    let plain = ptx("compute_90");
    for k in &wgmma_kernels {
        let body = ptx_entry(&plain, k);
        assert!(
            body.contains("trap;") && !body.contains("wgmma."),
            "{k} on compute_90"
        );
    }
}

/// The PTX text of entry `name`, up to the next entry.
fn ptx_entry<'a>(ptx: &'a str, name: &str) -> &'a str {
    let start = ptx
        .find(&format!(".entry {name}("))
        .unwrap_or_else(|| panic!("no entry {name} in the PTX"));
    let rest = &ptx[start + 1..];
    &ptx[start..start + 1 + rest.find(".entry ").unwrap_or(rest.len())]
}
