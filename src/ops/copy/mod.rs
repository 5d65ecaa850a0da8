//! Filling, making a view dense (`contiguous`), casting between dtypes, and moving between devices.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::layout::{resolve_dim, Layout};
use crate::tape::record;
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
        let out = Tensor::from_parts(storage, layout, self.dtype(), self.device().clone());
        Ok(record(out, &[self], |g, _| Ok(vec![Some(g.clone())])))
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
        let out = Tensor::from_parts(storage, layout, dtype, self.device().clone());
        let from = self.dtype();
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.to_dtype(from)?)])
        }))
    }

    /// A copy on `device` (this tensor itself when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if self.device().same(device) {
            return Ok(self.clone());
        }
        let src = self.contiguous()?;
        let len = src.dtype().size_in_bytes() * src.numel();
        let storage = match (src.storage(), device) {
            // straight from the host storage: no copy of it first
            (Storage::Cpu(s), Device::Gpu(g)) => Storage::Gpu(g.upload(&s.as_bytes()[..len])?),
            (Storage::Gpu(b), Device::Gpu(g)) => {
                Storage::Gpu(g.upload(&b.gpu().download(b, 0, len)?)?)
            }
            (Storage::Gpu(b), Device::Cpu) => Storage::Cpu(CpuStorage::from_bytes(
                src.dtype(),
                &b.gpu().download(b, 0, len)?,
            )),
            (Storage::Cpu(s), Device::Cpu) => {
                Storage::Cpu(CpuStorage::from_bytes(src.dtype(), &s.as_bytes()[..len]))
            }
        };
        let layout = Layout::contiguous(self.shape())?;
        let out = Tensor::from_parts(storage, layout, src.dtype(), device.clone());
        let from = self.device().clone();
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.to_device(&from)?)])
        }))
    }

    /// The tensors joined along `dim`; all other dimensions must agree.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            return Err(Error::Argument("cat of no tensors".into()));
        };
        let d = resolve_dim(dim, first.rank(), "cat")?;
        let mut shape = first.shape().to_vec();
        shape[d] = 0;
        for t in tensors {
            let same_rest = t.rank() == first.rank()
                && (0..t.rank()).all(|i| i == d || t.shape()[i] == first.shape()[i]);
            if !same_rest {
                return shape_err!(
                    "cat along {dim}: shapes {:?} and {:?} differ outside that dimension",
                    first.shape(),
                    t.shape()
                );
            }
            if t.dtype() != first.dtype() {
                return Err(Error::DType(format!(
                    "cat of {} and {} tensors",
                    first.dtype(),
                    t.dtype()
                )));
            }
            first.same_device(t, "cat")?;
            shape[d] += t.shape()[d];
        }
        let mut out = Tensor::zeros(&shape, first.dtype(), first.device())?;
        let mut start = 0;
        let mut sizes = Vec::new();
        for t in tensors {
            let n = t.shape()[d];
            let view = out.layout().narrow(d, start, n)?;
            out.write_view(&view, t)?;
            sizes.push(n);
            start += n;
        }
        Ok(record(out, tensors, move |g, needs| {
            let mut start = 0;
            let mut grads = Vec::new();
            for (&n, &need) in sizes.iter().zip(needs) {
                grads.push(if need {
                    Some(g.narrow(d as isize, start, n)?.contiguous()?)
                } else {
                    None
                });
                start += n;
            }
            Ok(grads)
        }))
    }

    /// A zero tensor of `shape` holding this tensor at `start..` along `dim`: the backward of
    /// `narrow`.
    pub(crate) fn narrow_scatter(
        &self,
        shape: &[usize],
        dim: usize,
        start: usize,
    ) -> Result<Tensor> {
        let mut out = Tensor::zeros(shape, self.dtype(), self.device())?;
        let view = out.layout().narrow(dim, start, self.shape()[dim])?;
        out.write_view(&view, self)?;
        Ok(out)
    }

    /// Copies `src` into the elements of this freshly made tensor seen through `view`.
    fn write_view(&mut self, view: &Layout, src: &Tensor) -> Result<()> {
        let dtype = self.dtype();
        let storage = self
            .storage_mut()
            .ok_or_else(|| Error::Argument("write_view into shared storage".into()))?;
        match (storage, src.storage()) {
            (Storage::Cpu(d), Storage::Cpu(s)) => cpu::copy_view(s, src.layout(), d, view),
            (Storage::Gpu(d), Storage::Gpu(s)) => gpu::copy_view(s, src.layout(), d, view, dtype)?,
            _ => return Err(Error::Device("write_view between devices".into())),
        }
        Ok(())
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
