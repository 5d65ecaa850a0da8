//! Filling, making a view dense (`contiguous`), casting between dtypes, and moving between devices.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::tensor::{CpuStorage, Storage, Tensor};

impl Tensor {
    /// A tensor of `shape` with every element equal to `value` (converted to `dtype`).
    pub fn full(shape: &[usize], value: f64, dtype: DType, device: &Device) -> Result<Tensor> {
        let layout = Layout::contiguous(shape)?;
        let storage = match device {
            Device::Cpu => Storage::Cpu(cpu::full(layout.numel(), value, dtype)),
            Device::Gpu(g) => Storage::Gpu(gpu::full(g, layout.numel(), value, dtype)?),
        };
        Ok(Tensor::from_parts(storage, layout, dtype, device.clone()))
    }

    /// A dense row-major copy, or this tensor itself when it already is one.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() && self.layout().offset() == 0 {
            return Ok(self.clone());
        }
        let layout = Layout::contiguous(self.shape())?;
        let storage = match self.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::gather(s, self.layout())),
            Storage::Gpu(b) => Storage::Gpu(gpu::gather(b, self.layout(), self.dtype())?),
        };
        Ok(Tensor::from_parts(storage, layout, self.dtype(), self.device().clone()))
    }

    /// This tensor converted to `dtype`, rounding to nearest even; float to integer truncates.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let src = self.contiguous()?;
        let layout = Layout::contiguous(self.shape())?;
        let storage = match src.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::cast(s, dtype)),
            Storage::Gpu(b) => Storage::Gpu(gpu::cast(b, src.numel(), src.dtype(), dtype)?),
        };
        Ok(Tensor::from_parts(storage, layout, dtype, self.device().clone()))
    }

    /// A copy on `device` (this tensor itself when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same(device) {
            return Ok(self.clone());
        }
        let src = self.contiguous()?;
        let (bytes_per, n) = (src.dtype().size_in_bytes(), src.numel());
        let bytes: Vec<u8> = match src.storage() {
            Storage::Cpu(s) => s.as_bytes()[..n * bytes_per].to_vec(),
            Storage::Gpu(b) => b.gpu().download(b, 0, n * bytes_per)?,
        };
        let storage = match device {
            Device::Cpu => Storage::Cpu(CpuStorage::from_bytes(src.dtype(), &bytes)),
            Device::Gpu(g) => Storage::Gpu(g.upload(&bytes)?),
        };
        Ok(Tensor::from_parts(storage, Layout::contiguous(self.shape())?, src.dtype(), device.clone()))
    }
}

/// Rejects tensors whose layout would reach past their storage (never produced by our own views,
/// but checked before any kernel trusts a layout).
pub(crate) fn check_extent(t: &Tensor) -> Result<()> {
    let len = match t.storage() {
        Storage::Cpu(s) => s.len(),
        Storage::Gpu(b) => b.len_bytes() / t.dtype().size_in_bytes(),
    };
    if t.layout().storage_extent() > len {
        return Err(Error::Shape(format!("view {:?} reaches past its storage of {len} elements", t.layout())));
    }
    Ok(())
}
