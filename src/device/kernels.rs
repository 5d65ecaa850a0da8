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

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The module that defines `kernel`, or None.
pub fn module_of(kernel: &str) -> Option<&'static KernelModule> {
    KERNEL_MODULES.iter().find(|m| m.kernels.contains(&kernel))
}
