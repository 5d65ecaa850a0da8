//! The kernel sources, embedded at build time (see build.rs): the CUDA backend compiles them with
//! NVRTC, the tests compile them for sm_80 and sm_90, and `vgpu` runs their host build.

/// One `kernels/*.cu` file: one NVRTC module, one virtual GPU dispatcher.
#[derive(Debug)]
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    /// Every `extern "C" __global__` entry point in the file.
    pub kernels: &'static [&'static str],
}

use std::collections::HashMap;
use std::sync::OnceLock;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The module that defines `kernel`, or None. Every launch asks, so the answer comes from a map
/// built once rather than a scan over every kernel name.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    static BY_KERNEL: OnceLock<HashMap<&'static str, &'static KernelModule>> = OnceLock::new();
    BY_KERNEL
        .get_or_init(|| {
            KERNEL_MODULES
                .iter()
                .flat_map(|m| m.kernels.iter().map(move |&k| (k, m)))
                .collect()
        })
        .get(kernel)
        .copied()
}
