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
        Ok(Tensor::from_parts(
            storage,
            layout,
            self.dtype(),
            self.device().clone(),
        ))
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
        Ok(Tensor::from_parts(
            storage,
            layout,
            dtype,
            self.device().clone(),
        ))
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
        Ok(Tensor::from_parts(
            storage,
            Layout::contiguous(self.shape())?,
            src.dtype(),
            device.clone(),
        ))
    }
}

/// Fill, strided copy and every cast, on `device` against the CPU.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    let shape = [3, 33, 7];
    for (i, &dtype) in DType::ALL.iter().enumerate() {
        let size = dtype.size_in_bytes();
        let src =
            Tensor::rand_uniform(&shape, -100.0, 100.0, seed + i as u64, dtype, &Device::Cpu)?;
        let view = |t: &Tensor| t.permute(&[2, 0, 1])?.narrow(2, 1, 31)?.contiguous();
        let got = src.to_device(device).and_then(|t| view(&t));
        rows.push(compare(
            &format!("copy_strided_b{size}"),
            dtype,
            &[7, 3, 31],
            got,
            view(&src),
            0.0,
        ));
        let (got, want) = (
            Tensor::full(&[257], 7.0, dtype, device),
            Tensor::full(&[257], 7.0, dtype, &Device::Cpu),
        );
        rows.push(compare(
            &format!("fill_b{size}"),
            dtype,
            &[257],
            got,
            want,
            0.0,
        ));
        for &to in DType::ALL.iter().filter(|&&d| d != dtype) {
            // conversions to u8 are defined for values in its range only
            let src = if to == DType::U8 {
                Tensor::rand_uniform(&shape, 0.0, 250.0, seed, dtype, &Device::Cpu)?
            } else {
                src.clone()
            };
            let got = src.to_device(device).and_then(|t| t.to_dtype(to));
            rows.push(compare(
                &format!("cast_{dtype}_{to}"),
                dtype,
                &shape,
                got,
                src.to_dtype(to),
                0.0,
            ));
        }
    }
    Ok(rows)
}

/// Rejects tensors whose layout would reach past their storage (never produced by our own views,
/// but checked before a kernel trusts a layout).
pub(crate) fn check_extent(t: &Tensor) -> Result<()> {
    let len = match t.storage() {
        Storage::Cpu(s) => s.len(),
        Storage::Gpu(b) => b.len_bytes() / t.dtype().size_in_bytes(),
    };
    if t.layout().storage_extent() > len {
        return Err(Error::Shape(format!(
            "view {:?} reaches past its storage of {len} elements",
            t.layout()
        )));
    }
    Ok(())
}
