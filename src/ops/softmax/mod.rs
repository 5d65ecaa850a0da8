//! softmax and log_softmax along one dimension, f32 math (f64 on the CPU), output in the input
//! dtype (f32, f16 or bf16). The kernels work on the last axis of a dense tensor; another
//! dimension is moved there and back with copies.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::{resolve_dim, Layout};
use crate::ops::copy::check_extent;
use crate::tensor::{Storage, Tensor};

impl Tensor {
    /// `exp(x - max) / sum(exp(x - max))` along `dim` (negative counts from the end).
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }

    /// `x - max - log(sum(exp(x - max)))` along `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }

    fn softmax_impl(&self, dim: isize, log: bool) -> Result<Tensor> {
        let what = format!(
            "{}(dim {dim}) of shape {:?}",
            if log { "log_softmax" } else { "softmax" },
            self.shape()
        );
        self.dtype().require_float(&what)?;
        if self.rank() == 0 {
            resolve_dim(dim, 1, &what)?;
            return self.reshape(&[1])?.softmax_impl(0, log)?.reshape(&[]);
        }
        let d = resolve_dim(dim, self.rank(), &what)?;
        let last = self.rank() - 1;
        if d != last {
            let moved = self.transpose(d as isize, -1)?.softmax_impl(-1, log)?;
            return moved.transpose(d as isize, -1)?.contiguous();
        }
        let n = self.shape()[last];
        let rows = self.numel().checked_div(n).unwrap_or(0);
        let layout = Layout::contiguous(self.shape())?;
        if rows == 0 {
            return Tensor::zeros(self.shape(), self.dtype(), self.device());
        }
        let src = self.contiguous()?;
        check_extent(&src)?;
        let storage = match src.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::softmax(s, rows, n, log)?),
            Storage::Gpu(b) => Storage::Gpu(gpu::softmax(b, src.dtype(), rows, n, log)?),
        };
        Ok(Tensor::from_parts(
            storage,
            layout,
            self.dtype(),
            self.device().clone(),
        ))
    }
}

/// softmax and log_softmax, warp-per-row and block-per-row kernels, every dtype, on `device`
/// against the CPU.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    let cases: [(&[usize], &str); 6] = [
        (&[1], "warp"),
        (&[7], "warp"),
        (&[5, 33], "warp"),
        (&[3, 257], "warp"),
        (&[2, 1024], "warp"),
        (&[2, 5000], "block"),
    ];
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &(shape, path)) in cases.iter().enumerate() {
            let src = Tensor::randn(
                shape,
                0.0,
                3.0,
                seed + (i * 16 + j) as u64,
                dtype,
                &Device::Cpu,
            )?;
            let on_device = src.to_device(device)?;
            for (name, log) in [("softmax", false), ("log_softmax", true)] {
                let got = on_device.softmax_impl(-1, log);
                let want = src.softmax_impl(-1, log);
                rows.push(compare(
                    &format!("{name}_{path}_{dtype}"),
                    dtype,
                    shape,
                    got,
                    want,
                    dtype.tolerance(),
                ));
            }
        }
    }
    Ok(rows)
}
