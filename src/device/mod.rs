//! Where tensors live and kernels run: the CPU, a real GPU (`cuda`, driven through cudarc and
//! NVRTC) or the virtual GPU (`vgpu`, the same kernel sources built for the host and run as
//! fibers). Both GPUs implement the small [`Driver`] trait, so every line of host code above it is
//! the same for both and the virtual GPU tests the real GPU's code path in CI.

#[cfg(test)]
mod abi;
pub mod cuda;
pub mod gpu;
pub mod kernels;
pub mod nvrtc;
pub mod vgpu;

pub use gpu::{Driver, Gpu, GpuBuffer, GpuKind, KernelArgs, LaunchConfig, TensorMapDesc};
pub use vgpu::VgpuOptions;

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Clone)]
pub enum Device {
    Cpu,
    Gpu(Arc<Gpu>),
}

impl Device {
    /// Parses `cpu`, `cuda`, `cuda:N` or `vgpu`. A GPU is opened once per process and shared.
    pub fn new(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "vgpu" => Ok(Device::Gpu(default_vgpu()?)),
            "cuda" => cuda_device(0),
            _ => match spec.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => cuda_device(n),
                _ => Err(Error::Device(format!(
                    "unknown device '{spec}' (expected cpu, cuda, cuda:N or vgpu)"
                ))),
            },
        }
    }

    /// `cuda` when a usable GPU exists, else `cpu`.
    pub fn default_device() -> Device {
        cuda_device(0).unwrap_or(Device::Cpu)
    }

    /// A virtual GPU of its own with these options (the seeded schedule, for instance).
    pub fn vgpu_with(options: VgpuOptions) -> Device {
        Device::Gpu(Arc::new(Gpu::new(
            GpuKind::Vgpu,
            Box::new(vgpu::VgpuDriver::new(options)),
        )))
    }

    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    pub fn gpu(&self) -> Option<&Arc<Gpu>> {
        match self {
            Device::Gpu(g) => Some(g),
            Device::Cpu => None,
        }
    }

    pub fn same(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Gpu(a), Device::Gpu(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Gpu(g) => write!(f, "{}", g.kind()),
        }
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The process's virtual GPU, set up from the environment (`VgpuOptions::from_env`) on first use.
fn default_vgpu() -> Result<Arc<Gpu>> {
    static VGPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    if let Some(g) = VGPU.get() {
        return Ok(g.clone());
    }
    let options = VgpuOptions::from_env()?;
    Ok(VGPU
        .get_or_init(|| {
            Arc::new(Gpu::new(
                GpuKind::Vgpu,
                Box::new(vgpu::VgpuDriver::new(options)),
            ))
        })
        .clone())
}

fn cuda_device(ordinal: usize) -> Result<Device> {
    static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    let mut open = OPEN.get_or_init(Default::default).lock().unwrap();
    if let Some(g) = open.get(&ordinal) {
        return Ok(Device::Gpu(g.clone()));
    }
    let driver = cuda::CudaDriver::open(ordinal)?;
    let gpu = Arc::new(Gpu::new(GpuKind::Cuda(ordinal), Box::new(driver)));
    open.insert(ordinal, gpu.clone());
    Ok(Device::Gpu(gpu))
}
