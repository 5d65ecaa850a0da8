//! The virtual GPU driver: device memory is host memory, and a launch calls the host build of the
//! kernel file (see build.rs and kernels/include/emu_runtime.cpp) with the same argument array a
//! real launch gets.

use super::gpu::{Driver, LaunchConfig, TensorMapDesc};
use super::kernels::KernelModule;
use crate::error::{Error, Result};
use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::Mutex;

/// Mirrors `emu::Dim3` in kernels/include/emu.cuh.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Dim3 {
    pub(super) x: u32,
    pub(super) y: u32,
    pub(super) z: u32,
}

/// Mirrors `emu::LaunchOptions` in kernels/include/emu.cuh.
#[repr(C)]
pub(crate) struct LaunchOptions {
    pub(super) seed: u64,
    pub(super) os_threads: u32,
    pub(super) stack_bytes: u32,
    pub(super) lenient_barrier: c_int,
}

pub(crate) type ModuleEntry = unsafe extern "C" fn(
    *const c_char,
    Dim3,
    Dim3,
    u32,
    *mut *mut c_void,
    *const LaunchOptions,
    *mut c_char,
    usize,
) -> c_int;

/// Mirrors `emu::ModuleInfo` in kernels/include/emu.cuh.
#[repr(C)]
pub(super) struct ModuleInfo {
    pub(super) name: *const c_char,
    pub(super) launch: ModuleEntry,
    pub(super) kernels: *const *const c_char,
    pub(super) kernel_count: usize,
}

extern "C" {
    /// The table of kernel files that build.rs generates (`vgpu_modules.cpp`).
    static vgpu_modules: ModuleInfo;
    static vgpu_module_count: usize;
    fn emu_asan_enabled() -> c_int;
    fn emu_encode_tensor_map(
        map: *mut c_void,
        rank: u32,
        address: u64,
        dims: *const u64,
        strides: *const u64,
        box_dims: *const u32,
        elem_bytes: u32,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// The dispatcher of the kernel file `module`.
fn module_entry(module: &str) -> Option<ModuleEntry> {
    // SAFETY: build.rs generates `vgpu_module_count` entries, each with a NUL-terminated name;
    // the table is immutable for the life of the process.
    let table =
        unsafe { std::slice::from_raw_parts(std::ptr::addr_of!(vgpu_modules), vgpu_module_count) };
    table
        .iter()
        // SAFETY: as above.
        .find(|m| unsafe { CStr::from_ptr(m.name) }.to_bytes() == module.as_bytes())
        .map(|m| m.launch)
}

/// Whether the virtual GPU was built with AddressSanitizer (`VPR_VGPU_ASAN=1`, see build.rs):
/// an out-of-bounds access in a kernel then aborts the process with a report.
pub fn built_with_asan() -> bool {
    // SAFETY: a constant function of the C++ runtime without arguments or state.
    unsafe { emu_asan_enabled() != 0 }
}

/// How the virtual GPU schedules threads. Defaults come from the environment:
/// `VPR_VGPU_SEED` (shuffled schedule; 0 or unset runs threads in order), `VPR_VGPU_THREADS`
/// (OS threads running blocks), `VPR_VGPU_STACK_KB` (per CUDA thread, default 64).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuOptions {
    pub seed: u64,
    pub os_threads: u32,
    pub stack_kib: u32,
    /// Count exited threads as arrived at `__syncthreads` (CUDA leaves that undefined).
    pub lenient_barrier: bool,
}

impl Default for VgpuOptions {
    fn default() -> Self {
        VgpuOptions {
            seed: 0,
            os_threads: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            stack_kib: 64,
            lenient_barrier: false,
        }
    }
}

impl VgpuOptions {
    /// The defaults, with the environment's settings; a setting that is not a number is an error
    /// naming it, not a silent default.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| -> Result<Option<u64>> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Argument(format!("{name}={v:?} is not a non-negative integer"))
                }),
            }
        };
        let d = VgpuOptions::default();
        Ok(VgpuOptions {
            seed: var("VPR_VGPU_SEED")?.unwrap_or(d.seed),
            os_threads: var("VPR_VGPU_THREADS")?.map_or(d.os_threads, |v| v.max(1) as u32),
            stack_kib: var("VPR_VGPU_STACK_KB")?
                .map_or(d.stack_kib, |v| v.clamp(16, 1 << 20) as u32),
            lenient_barrier: false,
        })
    }

    pub fn with_seed(seed: u64) -> Self {
        VgpuOptions {
            seed,
            ..Self::default()
        }
    }
}

pub struct VgpuDriver {
    options: VgpuOptions,
    /// Size of each live allocation, needed to free it.
    sizes: Mutex<HashMap<u64, usize>>,
}

const ALIGN: usize = 256; // cudaMalloc's guarantee

impl VgpuDriver {
    pub fn new(options: VgpuOptions) -> Self {
        VgpuDriver {
            options,
            sizes: Mutex::new(HashMap::new()),
        }
    }
}

impl Driver for VgpuDriver {
    fn describe(&self) -> String {
        format!(
            "virtual GPU: kernels built for the host, emulating sm_90a, {} OS thread(s), schedule {}",
            self.options.os_threads,
            if self.options.seed == 0 {
                "in order".to_string()
            } else {
                format!("shuffled (seed {})", self.options.seed)
            }
        )
    }

    fn compute_capability(&self) -> (u32, u32) {
        (9, 0)
    }

    /// Few, so that persistent kernels walk several tiles per block even in small tests.
    fn multiprocessors(&self) -> u32 {
        2
    }

    fn alloc_granularity(&self) -> usize {
        1
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        let p = self.alloc_host(bytes)?;
        self.sizes.lock().unwrap().insert(p as u64, bytes.max(1));
        Ok(p as u64)
    }

    unsafe fn free(&self, ptr: u64) {
        if let Some(size) = self.sizes.lock().unwrap().remove(&ptr) {
            // SAFETY: ptr came from `alloc`, that is from alloc_host(size).
            unsafe { self.free_host(ptr as *mut u8, size) };
        }
    }

    /// Host memory is all the virtual GPU has: device and page-locked memory alike are ordinary
    /// aligned allocations.
    fn alloc_host(&self, bytes: usize) -> Result<*mut u8> {
        let layout = Layout::from_size_align(bytes.max(1), ALIGN)
            .map_err(|e| Error::Argument(e.to_string()))?;
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::Device(format!(
                "vgpu: out of host memory allocating {bytes} bytes"
            )));
        }
        Ok(p)
    }

    unsafe fn free_host(&self, ptr: *mut u8, bytes: usize) {
        // SAFETY: the caller guarantees ptr came from alloc_host(bytes), which used this layout.
        unsafe { std::alloc::dealloc(ptr, Layout::from_size_align_unchecked(bytes.max(1), ALIGN)) };
    }

    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()> {
        // SAFETY: the caller guarantees dst..dst+len is inside one of our allocations.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        // SAFETY: the caller guarantees src..src+len is inside one of our allocations.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees both ranges are inside our allocations; they may overlap.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<[u64; 16]> {
        let mut map = [0u64; 16];
        let mut err = [0u8; 512];
        // SAFETY: `map` has the 128 bytes the encoder writes; dims, strides and box hold the
        // rank (3) and rank - 1 entries it reads; err is writable for its length.
        let rc = unsafe {
            emu_encode_tensor_map(
                map.as_mut_ptr() as *mut c_void,
                3,
                desc.address,
                desc.dims.as_ptr(),
                desc.strides.as_ptr(),
                desc.box_dims.as_ptr(),
                2,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc != 0 {
            let why = CStr::from_bytes_until_nul(&err)
                .map_or(String::new(), |c| c.to_string_lossy().into_owned());
            return Err(Error::Argument(format!(
                "{desc:?} is outside what the TMA accepts: {why}"
            )));
        }
        Ok(map)
    }

    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        // SAFETY: the caller guarantees the range is inside one of our allocations.
        unsafe { std::ptr::write_bytes(dst as *mut u8, byte, bytes) };
        Ok(())
    }

    unsafe fn launch(
        &self,
        module: &'static KernelModule,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        let entry = module_entry(module.name).ok_or_else(|| {
            Error::Argument(format!(
                "kernel file {} is not built into the virtual GPU",
                module.name
            ))
        })?;
        let name = CString::new(kernel)
            .map_err(|_| Error::Argument(format!("bad kernel name {kernel:?}")))?;
        let opt = LaunchOptions {
            seed: self.options.seed,
            os_threads: self.options.os_threads,
            stack_bytes: self.options.stack_kib * 1024,
            lenient_barrier: self.options.lenient_barrier as c_int,
        };
        let (g, b) = (cfg.grid, cfg.block);
        let mut err = vec![0u8; 4096];
        // SAFETY: the caller guarantees `args` match the kernel's parameters and that its memory
        // accesses are in bounds; err is a writable buffer of the length passed.
        let rc = unsafe {
            entry(
                name.as_ptr(),
                Dim3 {
                    x: g.0,
                    y: g.1,
                    z: g.2,
                },
                Dim3 {
                    x: b.0,
                    y: b.1,
                    z: b.2,
                },
                cfg.shared_bytes,
                args.as_mut_ptr(),
                &opt,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        match rc {
            0 => Ok(()),
            -1 => Err(Error::Argument(format!(
                "kernels/{}.cu has no kernel named {kernel}",
                module.name
            ))),
            _ => {
                let msg = CStr::from_bytes_until_nul(&err)
                    .map(|c| c.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let seed = if self.options.seed != 0 {
                    format!(" (schedule seed VPR_VGPU_SEED={})", self.options.seed)
                } else {
                    String::new()
                };
                Err(Error::Vgpu {
                    kernel: kernel.to_string(),
                    message: format!("{msg}{seed}"),
                })
            }
        }
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}
