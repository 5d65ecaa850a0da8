//! softmax and log_softmax along one dimension, f32 math (f64 on the CPU), output in the input
//! dtype (f32, f16 or bf16). The kernels work on the last axis of a dense tensor; another
//! dimension is moved there and back with copies.
//!
//! Backward, from the output y and its gradient dy along the same dimension: softmax gives
//! `y * (dy - sum(dy * y))`, log_softmax `dy - exp(y) * sum(dy)`, through the fused kernels
//! `softmax_backward_<dtype>` / `log_softmax_backward_<dtype>` (CPU twins in f64).

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::layout::{resolve_dim, Layout};
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{Storage, Tensor};

impl Tensor {
    /// `exp(x - max) / sum(exp(x - max))` along `dim` (negative counts from the end).
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        tape::autocast_to_f32(self)?.softmax_impl(dim, false)
    }

    /// `x - max - log(sum(exp(x - max)))` along `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        tape::autocast_to_f32(self)?.softmax_impl(dim, true)
    }

    fn softmax_impl(&self, dim: isize, log: bool) -> Result<Tensor> {
        let out = tape::no_grad(|| self.softmax_forward(dim, log))?;
        if !self.is_requires_grad() || !tape::is_grad_enabled() {
            return Ok(out);
        }
        let y = out.clone();
        Ok(tape::record(out, &[self], move |g, _| {
            Ok(vec![Some(softmax_backward(&y, g, dim, log)?)])
        }))
    }

    /// The forward of softmax / log_softmax, recording nothing.
    fn softmax_forward(&self, dim: isize, log: bool) -> Result<Tensor> {
        let what = format!(
            "{}(dim {dim}) of shape {:?}",
            if log { "log_softmax" } else { "softmax" },
            self.shape()
        );
        self.dtype().require_float(&what)?;
        if self.rank() == 0 {
            resolve_dim(dim, 1, &what)?;
            return self.reshape(&[1])?.softmax_forward(0, log)?.reshape(&[]);
        }
        let d = resolve_dim(dim, self.rank(), &what)?;
        let last = self.rank() - 1;
        if d != last {
            let moved = self.transpose(d as isize, -1)?.softmax_forward(-1, log)?;
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

/// The gradient of the input of softmax (or log_softmax) along `dim` from its output `y` and the
/// output's gradient `g`.
fn softmax_backward(y: &Tensor, g: &Tensor, dim: isize, log: bool) -> Result<Tensor> {
    let g = g.to_dtype(y.dtype())?;
    if g.shape() != y.shape() {
        return shape_err!(
            "softmax backward: gradient {:?} for an output {:?}",
            g.shape(),
            y.shape()
        );
    }
    y.same_device(&g, "softmax backward")?;
    if y.rank() == 0 {
        return softmax_backward(&y.reshape(&[1])?, &g.reshape(&[1])?, 0, log)?.reshape(&[]);
    }
    let d = resolve_dim(dim, y.rank(), "softmax backward")?;
    let last = y.rank() - 1;
    if d != last {
        let (yt, gt) = (y.transpose(d as isize, -1)?, g.transpose(d as isize, -1)?);
        return softmax_backward(&yt, &gt, -1, log)?
            .transpose(d as isize, -1)?
            .contiguous();
    }
    let n = y.shape()[last];
    let rows = y.numel().checked_div(n).unwrap_or(0);
    if rows == 0 {
        return Tensor::zeros(y.shape(), y.dtype(), y.device());
    }
    let (y, g) = (y.contiguous()?, g.contiguous()?);
    check_extent(&y)?;
    check_extent(&g)?;
    let storage = match (y.storage(), g.storage()) {
        (Storage::Cpu(ys), Storage::Cpu(gs)) => {
            Storage::Cpu(cpu::softmax_backward(ys, gs, rows, n, log)?)
        }
        (Storage::Gpu(yb), Storage::Gpu(gb)) => {
            Storage::Gpu(gpu::softmax_backward(yb, gb, y.dtype(), rows, n, log)?)
        }
        _ => unreachable!("same_device checked that both storages are on one device"),
    };
    Ok(Tensor::from_parts(
        storage,
        Layout::contiguous(y.shape())?,
        y.dtype(),
        y.device().clone(),
    ))
}

/// softmax and log_softmax, warp-per-row, block-per-row and split-row kernels, every dtype, on
/// `device` against the CPU.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    let cases: [(&[usize], &str); 8] = [
        (&[1], "warp"),
        (&[7], "warp"),
        (&[5, 33], "warp"),
        (&[3, 257], "warp"),
        (&[2, 1024], "warp"),
        (&[2, 5000], "block"),
        (&[1, 70001], "split"),
        (&[3, 16391], "split"),
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
                // a split row runs two kernels: the row names both
                let (forward, backward) = if path == "split" {
                    (
                        format!("softmax_split_stats_{dtype}+{name}_split_write_{dtype}"),
                        format!("{name}_split_grad_sum_{dtype}+{name}_split_grad_write_{dtype}"),
                    )
                } else {
                    (
                        format!("{name}_{path}_{dtype}"),
                        format!("{name}_backward_{dtype} ({path})"),
                    )
                };
                let got = on_device.softmax_forward(-1, log);
                let want = src.softmax_forward(-1, log);
                rows.push(compare(
                    &forward,
                    dtype,
                    shape,
                    got,
                    want,
                    dtype.tolerance(),
                ));
                // the backward from the CPU's output and a random gradient, same work split
                let y = src.softmax_forward(-1, log)?;
                let g = Tensor::randn(
                    shape,
                    0.0,
                    1.0,
                    seed + 7 + (i * 16 + j) as u64,
                    dtype,
                    &Device::Cpu,
                )?;
                let got = softmax_backward(&y.to_device(device)?, &g.to_device(device)?, -1, log);
                rows.push(compare(
                    &backward,
                    dtype,
                    shape,
                    got,
                    softmax_backward(&y, &g, -1, log),
                    dtype.tolerance(),
                ));
            }
        }
    }
    Ok(rows)
}
