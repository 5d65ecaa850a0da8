//! The GPU seen from the host: a [`Driver`] (real or virtual) plus a caching allocator and the
//! launch plumbing shared by both.

use super::kernels::{module_of, KernelModule};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::c_void;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a GPU backend must do. Device pointers are plain integers (`CUdeviceptr` on the real GPU,
/// host addresses on the virtual one).
pub trait Driver: Send + Sync {
    /// One line for `vpr-engine info`: the device, its architecture, memory and compiler.
    fn describe(&self) -> String;
    /// (major, minor): which kernels may run. The virtual GPU emulates 9.0 (Hopper).
    fn compute_capability(&self) -> (u32, u32);
    /// Streaming multiprocessors, the size of a persistent grid.
    fn multiprocessors(&self) -> u32;
    /// Allocation sizes are rounded up to a multiple of this before caching. The virtual GPU uses
    /// 1, so AddressSanitizer sees every overflow; the real GPU rounds to reuse blocks.
    fn alloc_granularity(&self) -> usize;
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// # Safety
    /// `ptr` came from `alloc` of this driver and is not used again.
    unsafe fn free(&self, ptr: u64);
    /// `bytes` (at least 1) of page-locked host memory aligned to 64 bytes: the device copies from
    /// it by DMA, at full bus speed and without the staging copy pageable memory needs.
    fn alloc_host(&self, bytes: usize) -> Result<*mut u8>;
    /// # Safety
    /// `ptr` came from `alloc_host(bytes)` of this driver and is not used again.
    unsafe fn free_host(&self, ptr: *mut u8, bytes: usize);
    /// # Safety
    /// `[dst, dst + src.len())` lies inside one allocation of this driver.
    unsafe fn htod(&self, src: &[u8], dst: u64) -> Result<()>;
    /// # Safety
    /// `[src, src + dst.len())` lies inside one allocation of this driver.
    unsafe fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// # Safety
    /// Both ranges lie inside allocations of this driver.
    unsafe fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()>;
    /// # Safety
    /// The range lies inside one allocation of this driver.
    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()>;
    /// # Safety
    /// `args` point at values matching the kernel's parameters, device pointers among them
    /// valid for every access the kernel makes with this configuration.
    unsafe fn launch(
        &self,
        module: &'static KernelModule,
        kernel: &str,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<()>;
    fn synchronize(&self) -> Result<()>;
    /// The 128 bytes of a tensor map for the tensor memory accelerator (compute capability 9.0).
    fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<[u64; 16]>;
}

/// A tiled 3-D view of a global tensor of 16-bit floats for the tensor memory accelerator (TMA), in
/// the terms of `cuTensorMapEncodeTiled`: dimensions innermost first, byte strides of dimensions 1
/// and 2, a box of `box_dims` elements written densely to shared memory with the 128-byte swizzle,
/// elements outside the tensor read as zero.
#[derive(Debug, Clone, Copy)]
pub struct TensorMapDesc {
    pub bf16: bool,
    pub address: u64,
    pub dims: [u64; 3],
    pub strides: [u64; 2],
    pub box_dims: [u32; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuKind {
    Cuda(usize),
    Vgpu,
}

impl fmt::Display for GpuKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuKind::Cuda(n) => write!(f, "cuda:{n}"),
            GpuKind::Vgpu => f.write_str("vgpu"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl LaunchConfig {
    /// A 1-D launch of `threads`-thread blocks covering `n` items, at most `max_blocks` blocks
    /// (kernels use grid-stride loops, so fewer blocks than items is fine).
    pub fn linear(n: usize, threads: u32, max_blocks: u32) -> Self {
        let blocks = n.div_ceil(threads as usize).clamp(1, max_blocks as usize) as u32;
        LaunchConfig {
            grid: (blocks, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: 0,
        }
    }
}

/// Kernel arguments in launch order, each stored at 8-byte alignment, handed to the driver as the
/// `void**` array that `cuLaunchKernel` takes.
#[derive(Default)]
pub struct KernelArgs {
    slots: Vec<Box<[u64]>>,
}

impl KernelArgs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push<T: bytemuck::Pod>(&mut self, value: T) -> &mut Self {
        let bytes = bytemuck::bytes_of(&value);
        let mut slot = vec![0u64; bytes.len().div_ceil(8).max(1)].into_boxed_slice();
        bytemuck::cast_slice_mut::<u64, u8>(&mut slot)[..bytes.len()].copy_from_slice(bytes);
        self.slots.push(slot);
        self
    }

    /// The device address `byte_offset` bytes into `buf`.
    pub fn ptr(&mut self, buf: &GpuBuffer, byte_offset: usize) -> &mut Self {
        debug_assert!(byte_offset <= buf.bytes);
        self.push(buf.ptr + byte_offset as u64)
    }

    fn pointers(&mut self) -> Vec<*mut c_void> {
        self.slots
            .iter_mut()
            .map(|s| s.as_mut_ptr() as *mut c_void)
            .collect()
    }
}

pub struct Gpu {
    kind: GpuKind,
    driver: Box<dyn Driver>,
    /// Freed blocks by rounded size, reused before asking the driver again, so that a training
    /// step does not call cudaMalloc.
    cache: Mutex<HashMap<usize, Vec<u64>>>,
    /// Fill every new allocation with 0xFF (NaN in every float type), so that output elements a
    /// kernel fails to write show up. Always on for the virtual GPU; `check` turns it on for CUDA.
    poison: AtomicBool,
    /// Allocations the cache could not serve (calls into the driver), for tests and diagnostics.
    driver_allocations: AtomicUsize,
    /// The page-locked host buffer `upload_staged` writes into: (address, bytes), grown when a
    /// larger upload comes, kept for the next (a training loop uploads one batch size).
    staging: Mutex<Option<(usize, usize)>>,
}

impl Gpu {
    pub fn new(kind: GpuKind, driver: Box<dyn Driver>) -> Self {
        let poison = AtomicBool::new(kind == GpuKind::Vgpu);
        Gpu {
            kind,
            driver,
            cache: Mutex::new(HashMap::new()),
            poison,
            driver_allocations: AtomicUsize::new(0),
            staging: Mutex::new(None),
        }
    }

    /// How many allocations went to the driver because the cache had no block of the size.
    pub fn driver_allocations(&self) -> usize {
        self.driver_allocations.load(Ordering::Relaxed)
    }

    pub fn set_poison(&self, on: bool) {
        self.poison.store(on, Ordering::Relaxed);
    }

    pub fn kind(&self) -> GpuKind {
        self.kind
    }

    pub fn describe(&self) -> String {
        self.driver.describe()
    }

    pub fn compute_capability(&self) -> (u32, u32) {
        self.driver.compute_capability()
    }

    pub fn multiprocessors(&self) -> u32 {
        self.driver.multiprocessors()
    }

    /// A tensor map over `[address, ...)` as `desc` describes; the caller keeps the memory alive
    /// while kernels use the map.
    pub fn encode_tensor_map(&self, desc: &TensorMapDesc) -> Result<[u64; 16]> {
        self.driver.encode_tensor_map(desc)
    }

    /// Bytes held in the allocation cache.
    pub fn cached_bytes(&self) -> usize {
        self.cache
            .lock()
            .unwrap()
            .iter()
            .map(|(size, v)| size * v.len())
            .sum()
    }

    /// An uninitialised buffer of `bytes` bytes.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<GpuBuffer> {
        let g = self.driver.alloc_granularity();
        let size = bytes.max(1).div_ceil(g) * g;
        let cached = self.cache.lock().unwrap().get_mut(&size).and_then(Vec::pop);
        let ptr = match cached {
            Some(p) => p,
            None => match self.driver_alloc(size) {
                Ok(p) => p,
                Err(_) => {
                    // out of memory: give the cached blocks back and try once more
                    self.release_cache();
                    self.driver_alloc(size)?
                }
            },
        };
        if self.poison.load(Ordering::Relaxed) {
            // SAFETY: the block holds `size` bytes.
            unsafe { self.driver.memset(ptr, 0xFF, size)? };
        }
        Ok(GpuBuffer {
            gpu: self.clone(),
            ptr,
            bytes,
            capacity: size,
        })
    }

    fn driver_alloc(&self, size: usize) -> Result<u64> {
        self.driver_allocations.fetch_add(1, Ordering::Relaxed);
        self.driver.alloc(size)
    }

    /// Frees every cached block.
    pub fn release_cache(&self) {
        let blocks: Vec<u64> = self
            .cache
            .lock()
            .unwrap()
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        for p in blocks {
            // SAFETY: cached blocks came from this driver's alloc and no buffer refers to them.
            unsafe { self.driver.free(p) };
        }
    }

    pub fn upload(self: &Arc<Self>, data: &[u8]) -> Result<GpuBuffer> {
        let buf = self.alloc(data.len())?;
        // SAFETY: buf holds at least data.len() bytes.
        unsafe { self.driver.htod(data, buf.ptr)? };
        Ok(buf)
    }

    /// Uploads the `bytes` bytes that `fill` writes, through this GPU's page-locked staging
    /// buffer: the producer writes straight into memory the device reads by DMA, with no copy into
    /// pageable memory before it. `fill` gets zeroed bytes, aligned to 64.
    pub fn upload_staged(
        self: &Arc<Self>,
        bytes: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<GpuBuffer> {
        let mut staging = self.staging.lock().unwrap();
        let ptr = match *staging {
            Some((ptr, capacity)) if capacity >= bytes => ptr,
            old => {
                if let Some((ptr, capacity)) = old {
                    *staging = None;
                    // SAFETY: the block came from alloc_host(capacity) and the lock is held, so
                    // no other upload uses it.
                    unsafe { self.driver.free_host(ptr as *mut u8, capacity) };
                }
                let capacity = bytes.max(1);
                let ptr = self.driver.alloc_host(capacity)? as usize;
                *staging = Some((ptr, capacity));
                ptr
            }
        };
        // SAFETY: the block holds at least `bytes` bytes, owned by this GPU and used only under
        // the lock held here; zeroing first makes every byte of the slice initialised.
        let host = unsafe {
            std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
            std::slice::from_raw_parts_mut(ptr as *mut u8, bytes)
        };
        fill(host);
        self.upload(host)
    }

    pub fn download(&self, buf: &GpuBuffer, byte_offset: usize, len: usize) -> Result<Vec<u8>> {
        check_range(buf, byte_offset, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: the range was checked against the buffer.
        unsafe { self.driver.dtoh(buf.ptr + byte_offset as u64, &mut out)? };
        Ok(out)
    }

    pub fn copy(
        &self,
        src: &GpuBuffer,
        src_offset: usize,
        dst: &GpuBuffer,
        dst_offset: usize,
        len: usize,
    ) -> Result<()> {
        check_range(src, src_offset, len)?;
        check_range(dst, dst_offset, len)?;
        // SAFETY: both ranges were checked against their buffers.
        unsafe {
            self.driver.dtod(
                src.ptr + src_offset as u64,
                dst.ptr + dst_offset as u64,
                len,
            )
        }
    }

    /// Launches a kernel by name. The caller guarantees that `args` match the kernel's parameters
    /// and that every buffer access the kernel makes for this configuration is in bounds; the op
    /// layer establishes this with its shape checks.
    pub fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &mut KernelArgs) -> Result<()> {
        let module = module_of(kernel)
            .ok_or_else(|| Error::Argument(format!("no kernel named {kernel}")))?;
        let mut ptrs = args.pointers();
        // SAFETY: see this function's contract; ptrs point into `args`, alive for the call.
        unsafe { self.driver.launch(module, kernel, cfg, &mut ptrs) }
    }

    pub fn synchronize(&self) -> Result<()> {
        self.driver.synchronize()
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        self.release_cache();
        if let Some((ptr, capacity)) = self.staging.lock().unwrap().take() {
            // SAFETY: the block came from alloc_host(capacity); the GPU is going away.
            unsafe { self.driver.free_host(ptr as *mut u8, capacity) };
        }
    }
}

fn check_range(buf: &GpuBuffer, offset: usize, len: usize) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > buf.bytes) {
        return Err(Error::Argument(format!(
            "device copy of {len} bytes at offset {offset} overruns a buffer of {} bytes",
            buf.bytes
        )));
    }
    Ok(())
}

/// Device memory owned by a tensor; returned to the allocation cache when dropped.
pub struct GpuBuffer {
    gpu: Arc<Gpu>,
    ptr: u64,
    bytes: usize,
    capacity: usize,
}

impl GpuBuffer {
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
    /// The device address of the first byte (for tensor maps, which hold addresses).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.gpu
            .cache
            .lock()
            .unwrap()
            .entry(self.capacity)
            .or_default()
            .push(self.ptr);
    }
}
