//! Kernel sources follow the rules that keep them portable between NVRTC and the virtual GPU:
//! shared memory only through EMU_SHARED / EMU_DYNAMIC_SHARED, inline PTX only inside the wrappers
//! of kernels/include/, and no header but our own common.cuh.

use vpr_engine::device::kernels::KERNEL_MODULES;

/// Lines of `src` that use raw `__shared__`, inline `asm`, or include anything but common.cuh.
fn violations(src: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let raw_shared = code
            .match_indices("__shared__")
            .any(|(p, _)| !code[..p].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
        let asm = code
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .any(|w| matches!(w, "asm" | "__asm" | "__asm__"));
        let include = code.trim_start().starts_with("#include") && !code.contains("\"common.cuh\"");
        if raw_shared || asm || include {
            found.push(format!("line {}: {}", i + 1, line.trim()));
        }
    }
    found
}

#[test]
fn kernels_use_only_the_portable_vocabulary() {
    let mut bad = Vec::new();
    for m in KERNEL_MODULES {
        for v in violations(m.source) {
            bad.push(format!("kernels/{}.cu {v}", m.name));
        }
    }
    assert!(bad.is_empty(), "raw __shared__, asm or foreign includes in kernels/*.cu (use EMU_SHARED / emu:: wrappers):\n{}", bad.join("\n"));
}

#[test]
fn the_lint_catches_each_rule() {
    assert_eq!(violations("  __shared__ float s[32];").len(), 1);
    assert_eq!(violations("asm volatile(\"bar.sync 0;\");").len(), 1);
    assert_eq!(violations("__asm__ volatile(\"bar.sync 0;\");").len(), 1);
    assert_eq!(violations("__asm(\"trap;\");").len(), 1);
    assert_eq!(violations("#include <cuda_fp16.h>").len(), 1);
    assert!(violations(
        "#include \"common.cuh\"\nEMU_SHARED(float, s, [32]); // __shared__ in a comment"
    )
    .is_empty());
}
