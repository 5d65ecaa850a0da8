//! The real GPU driver, on cudarc's driver API. cudarc panics when libcuda is missing, so every
//! entry point probes for the library first and turns its absence into an error.
//!
//! Kernel files are compiled by NVRTC to CUBIN for the device's own architecture the first time a
//! kernel of theirs is launched (no PTX JIT, so no PTX/driver version mismatch), cached on disk by
//! source hash, architecture and NVRTC version, and loaded once per process.

use super::gpu::{Driver, LaunchConfig, TensorMapDesc};
use super::kernels::{KernelModule, KERNEL_HEADERS};
use super::nvrtc::{Nvrtc, Target};
use crate::error::{Error, Result};
use cudarc::driver::{result, sys, CudaContext};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What `vpr-engine info` reports about CUDA on this machine.
pub struct CudaStatus {
    /// One line per device, or why there is none.
    pub devices: std::result::Result<Vec<String>, String>,
    /// NVRTC's version and path, or why it is unusable.
    pub nvrtc: std::result::Result<String, String>,
    pub cache_dir: PathBuf,
}

fn driver_present() -> bool {
    // SAFETY: only checks whether the shared library can be loaded.
    unsafe { sys::is_culib_present() }
}

/// The CUDA version the driver supports, as (major, minor).
fn driver_cuda_version() -> Option<(i32, i32)> {
    let mut v = 0;
    // SAFETY: a plain out-parameter; only called once the driver library is known to load.
    let status = unsafe { sys::cuDriverGetVersion(&mut v) };
    (status == sys::CUresult::CUDA_SUCCESS).then_some((v / 1000, v % 1000 / 10))
}

const NO_DRIVER: &str = "the NVIDIA driver library (libcuda.so) was not found on this machine";

pub fn probe() -> CudaStatus {
    let devices = if !driver_present() {
        Err(NO_DRIVER.to_string())
    } else {
        match result::init().and_then(|_| result::device::get_count()) {
            Err(e) => Err(format!("the CUDA driver reports: {}", driver_message(&e))),
            Ok(0) => Err("the CUDA driver found no GPU".to_string()),
            Ok(n) => Ok((0..n as usize)
                .map(|i| match CudaContext::new(i) {
                    Ok(ctx) => {
                        let (ma, mi) = ctx.compute_capability().unwrap_or((0, 0));
                        format!(
                            "cuda:{i} {} | compute capability {ma}.{mi} | {:.1} GiB",
                            ctx.name().unwrap_or_default(),
                            ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64
                        )
                    }
                    Err(e) => format!("cuda:{i} cannot be opened: {}", driver_message(&e)),
                })
                .collect()),
        }
    };
    let nvrtc = Nvrtc::load()
        .map(|n| format!("NVRTC {}.{} ({})", n.version().0, n.version().1, n.path()))
        .map_err(|e| e.to_string());
    CudaStatus {
        devices,
        nvrtc,
        cache_dir: cache_dir(),
    }
}

/// `$VPR_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vpr-engine/kernels`, else `~/.cache/vpr-engine/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VPR_KERNEL_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("vpr-engine").join("kernels")
}

/// FNV-1a over the module source and every header: the cache key of a compiled module.
fn source_hash(module: &KernelModule) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    };
    eat(module.source.as_bytes());
    for (name, src) in KERNEL_HEADERS {
        eat(name.as_bytes());
        eat(src.as_bytes());
    }
    h
}

/// CUBIN of `module` for `arch`, from the disk cache in `dir` or freshly compiled by NVRTC and
/// stored there. The file name carries the source hash, the architecture and the NVRTC version, so
/// a changed kernel or compiler never loads a stale binary.
pub fn cached_cubin(
    nvrtc: &Nvrtc,
    module: &KernelModule,
    arch: &str,
    dir: &Path,
) -> Result<Vec<u8>> {
    let (major, minor) = nvrtc.version();
    let name = format!(
        "{}-{:016x}-{arch}-nvrtc{major}.{minor}.cubin",
        module.name,
        source_hash(module)
    );
    let path = dir.join(name);
    if let Ok(bytes) = std::fs::read(&path) {
        return Ok(bytes);
    }
    let compiled = nvrtc.compile(module, Target::Cubin(arch), &[])?;
    // The cache is an optimisation: failing to write it is not an error. Write then rename, so a
    // concurrent reader never sees half a file.
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled.binary).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(compiled.binary)
}

struct LoadedModule {
    module: sys::CUmodule,
    functions: HashMap<String, sys::CUfunction>,
}

pub struct CudaDriver {
    ctx: Arc<CudaContext>,
    ordinal: usize,
    capability: (u32, u32),
    multiprocessors: u32,
    arch: String,
    nvrtc: Nvrtc,
    modules: Mutex<HashMap<&'static str, LoadedModule>>,
}

// SAFETY: CUmodule and CUfunction handles are plain driver handles valid in any thread that has
// the context bound; every use binds it first, and the map is behind a mutex.
unsafe impl Send for CudaDriver {}
// SAFETY: as above.
unsafe impl Sync for CudaDriver {}

/// "CUDA_ERROR_NO_DEVICE (no CUDA-capable device is detected)": cudarc's Display is its Debug.
fn driver_message(e: &result::DriverError) -> String {
    let name = format!("{:?}", e.0);
    match e.error_string().map(|s| s.to_string_lossy().into_owned()) {
        Ok(text) if text != name => format!("{name} ({text})"),
        _ => name,
    }
}

fn cuda_err(what: &str, e: result::DriverError) -> Error {
    Error::Cuda(format!("{what}: {}", driver_message(&e)))
}

impl CudaDriver {
    pub fn open(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::Device(format!(
                "cuda:{ordinal} is unavailable: {NO_DRIVER}; use --device cpu or vgpu"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::Device(format!(
                "cuda:{ordinal} is unavailable: {}",
                driver_message(&e)
            ))
        })?;
        // SAFETY: called before any allocation on this context; we use a single stream, so
        // cross-stream event tracking is pure overhead.
        unsafe { ctx.disable_event_tracking() };
        let nvrtc =
            Nvrtc::load().map_err(|e| Error::Device(format!("cuda:{ordinal} is unusable: {e}")))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| cuda_err("compute capability", e))?;
        let multiprocessors = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| cuda_err("multiprocessor count", e))?;
        Ok(CudaDriver {
            ctx,
            ordinal,
            capability: (major as u32, minor as u32),
            multiprocessors: multiprocessors.max(1) as u32,
            // 9.0 compiles for sm_90a, whose wgmma kernels run only there
            arch: if (major, minor) == (9, 0) {
                "sm_90a".to_string()
            } else {
                format!("sm_{major}{minor}")
            },
            nvrtc,
            modules: Mutex::new(HashMap::new()),
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| cuda_err("binding the context", e))
    }

    fn function(&self, module: &'static KernelModule, kernel: &str) -> Result<sys::CUfunction> {
        let mut modules = self.modules.lock().unwrap();
        if !modules.contains_key(module.name) {
            let cubin = cached_cubin(&self.nvrtc, module, &self.arch, &cache_dir())?;
            // SAFETY: the image is a complete CUBIN produced by NVRTC for this architecture.
            let m = unsafe { result::module::load_data(cubin.as_ptr() as *const c_void) }.map_err(
                |e| {
                    // The usual cause is an NVRTC newer than the driver: say both versions.
                    let (major, minor) = self.nvrtc.version();
                    let driver = driver_cuda_version()
                        .map_or("unknown".to_string(), |(a, b)| format!("{a}.{b}"));
                    cuda_err(
                        &format!(
                            "loading kernels/{}.cu ({} CUBIN from NVRTC {major}.{minor}; the \
                             driver supports CUDA {driver}; set VPR_NVRTC to an NVRTC no newer \
                             than the driver)",
                            module.name, self.arch
                        ),
                        e,
                    )
                },
            )?;
            modules.insert(
                module.name,
                LoadedModule {
                    module: m,
                    functions: HashMap::new(),
                },
            );
        }
        let loaded = modules.get_mut(module.name).unwrap();
        if let Some(f) = loaded.functions.get(kernel) {
            return Ok(*f);
        }
        let cname = CString::new(kernel)
            .map_err(|_| Error::Argument(format!("bad kernel name {kernel:?}")))?;
        // SAFETY: the module is loaded and stays loaded for the driver's lifetime.
        let f = unsafe { result::module::get_function(loaded.module, cname) }
            .map_err(|e| cuda_err(&format!("kernel {kernel} in kernels/{}.cu", module.name), e))?;
        loaded.functions.insert(kernel.to_string(), f);
        Ok(f)
    }
}

impl Driver for CudaDriver {
    fn describe(&self) -> String {
        let (major, minor) = self.nvrtc.version();
        format!(
            "cuda:{} {} ({}, {:.1} GiB), NVRTC {major}.{minor}",
            self.ordinal,
            self.ctx.name().unwrap_or_default(),
            self.arch,
            self.ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64
        )
    }

    fn compute_capability(&self) -> (u32, u32) {
        self.capability
    }

    fn multiprocessors(&self) -> u32 {
        self.multiprocessors
    }

    fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<[u64; 16]> {
        use sys::{
            CUtensorMapDataType as Data, CUtensorMapFloatOOBfill as Fill,
            CUtensorMapInterleave as Interleave, CUtensorMapL2promotion as L2,
            CUtensorMapSwizzle as Swizzle,
        };
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        let data = if desc.bf16 {
            Data::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
        } else {
            Data::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
        };
        let element_strides = [1u32; 3];
        // SAFETY: every pointer refers to a live array of the length the rank (3) implies; the
        // driver only encodes the address, it does not access the memory.
        let status = unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                data,
                3,
                desc.address as *mut c_void,
                desc.dims.as_ptr(),
                desc.strides.as_ptr(),
                desc.box_dims.as_ptr(),
                element_strides.as_ptr(),
                Interleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                Swizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                L2::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                Fill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        };
        if status != sys::CUresult::CUDA_SUCCESS {
            return Err(Error::Cuda(format!(
                "cuTensorMapEncodeTiled({desc:?}): {status:?}"
            )));
        }
        Ok(map.opaque)
    }

    fn alloc_granularity(&self) -> usize {
        512
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: a plain allocation in the bound context.
        unsafe { result::malloc_sync(bytes) }
            .map_err(|e| cuda_err(&format!("allocating {bytes} bytes"), e))
    }

    unsafe fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: the caller guarantees ptr came from alloc and is not used again.
            let _ = unsafe { result::free_sync(ptr) };
        }
    }

    fn alloc_host(&self, bytes: usize) -> Result<*mut u8> {
        self.bind()?;
        // SAFETY: a plain page-locked allocation (page-aligned) in the bound context.
        unsafe { result::malloc_host(bytes.max(1), 0) }
            .map(|p| p as *mut u8)
            .map_err(|e| {
                cuda_err(
                    &format!("allocating {bytes} bytes of page-locked host memory"),
                    e,
                )
            })
    }

    unsafe fn free_host(&self, ptr: *mut u8, _bytes: usize) {
        if self.bind().is_ok() {
            // SAFETY: the caller guarantees ptr came from alloc_host and is not used again.
            let _ = unsafe { result::free_host(ptr as *mut std::ffi::c_void) };
        }
    }

    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the destination range is allocated.
        unsafe { result::memcpy_htod_sync(dst, src) }.map_err(|e| cuda_err("copy to device", e))
    }

    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the source range is allocated.
        unsafe { result::memcpy_dtoh_sync(dst, src) }.map_err(|e| cuda_err("copy from device", e))
    }

    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees both ranges are allocated.
        unsafe { result::memcpy_dtod_sync(dst, src, bytes) }.map_err(|e| cuda_err("device copy", e))
    }

    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the range is allocated.
        unsafe { result::memset_d8_sync(dst, byte, bytes) }.map_err(|e| cuda_err("memset", e))
    }

    unsafe fn launch(
        &self,
        module: &'static KernelModule,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()> {
        self.bind()?;
        let f = self.function(module, kernel)?;
        if cfg.shared_bytes > 48 * 1024 {
            // SAFETY: f is a live function handle; the attribute only raises the opt-in limit.
            unsafe {
                result::function::set_function_attribute(
                    f,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_bytes as i32,
                )
            }
            .map_err(|e| {
                cuda_err(
                    &format!("{kernel}: {} bytes of shared memory", cfg.shared_bytes),
                    e,
                )
            })?;
        }
        // SAFETY: the caller guarantees the arguments match the kernel and its accesses are in
        // bounds; the null stream orders the launch with our synchronous copies.
        unsafe {
            result::launch_kernel(
                f,
                cfg.grid,
                cfg.block,
                cfg.shared_bytes,
                std::ptr::null_mut(),
                args,
            )
        }
        .map_err(|e| cuda_err(&format!("launching {kernel}"), e))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.ctx
            .synchronize()
            .map_err(|e| cuda_err("synchronize", e))
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            for (_, m) in self.modules.lock().unwrap().drain() {
                // SAFETY: no function of this module is used after the driver is dropped.
                let _ = unsafe { result::module::unload(m.module) };
            }
        }
    }
}
