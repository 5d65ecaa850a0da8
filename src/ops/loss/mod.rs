//! Cross-entropy of logits `[N, C]` against int64 class labels `[N]`, as `F.cross_entropy`
//! computes it (log-softmax + negative log-likelihood, fused), f32 math, loss an f32 scalar; and
//! CosFace's large-margin cosine loss (`margin_cross_entropy`), the same kernels seeing
//! `s * (cos - m * onehot)` as logits.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::Layout;
use crate::ops::copy::check_extent;
use crate::tape::record;
use crate::tensor::{Storage, Tensor};

/// PyTorch's default `ignore_index`: rows with this label contribute nothing.
pub const IGNORE_INDEX: i64 = -100;

/// How the per-row losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// Sum over the rows that are not ignored, divided by their number (NaN when there are none,
    /// as in PyTorch).
    Mean,
    Sum,
}

impl Tensor {
    /// `F.cross_entropy(self, labels, reduction=...)` with the default ignore index -100.
    pub fn cross_entropy(&self, labels: &Tensor, reduction: Reduction) -> Result<Tensor> {
        self.cross_entropy_with(labels, reduction, IGNORE_INDEX)
    }

    /// Cross-entropy of logits `[N, C]` (f32, f16 or bf16) against labels `[N]` (i64, each in
    /// `0..C` or equal to `ignore_index`); an f32 scalar of shape `[]` on the logits' device.
    pub fn cross_entropy_with(
        &self,
        labels: &Tensor,
        reduction: Reduction,
        ignore_index: i64,
    ) -> Result<Tensor> {
        self.cross_entropy_of_logits(labels, reduction, ignore_index, 1.0, 0.0)
    }

    /// CosFace's loss (MarginCosineProduct followed by `CrossEntropyLoss`): the mean
    /// cross-entropy of the logits `scale * (self - margin * onehot(labels))`, where `self` holds
    /// cosines `[N, C]`; rounded as PyTorch computes those logits in f32, and fused, so the
    /// logits are never stored.
    pub fn margin_cross_entropy(&self, labels: &Tensor, scale: f32, margin: f32) -> Result<Tensor> {
        if !scale.is_finite() || !margin.is_finite() {
            return Err(Error::Argument(format!(
                "margin_cross_entropy: scale {scale} and margin {margin} must be finite"
            )));
        }
        self.cross_entropy_of_logits(labels, Reduction::Mean, IGNORE_INDEX, scale, margin)
    }

    fn cross_entropy_of_logits(
        &self,
        labels: &Tensor,
        reduction: Reduction,
        ignore_index: i64,
        scale: f32,
        margin: f32,
    ) -> Result<Tensor> {
        let what = format!(
            "cross_entropy of logits {:?} {} and labels {:?} {}",
            self.shape(),
            self.dtype(),
            labels.shape(),
            labels.dtype()
        );
        self.dtype().require_float(&what)?;
        if labels.dtype() != DType::I64 {
            return dtype_err!("{what}: labels must be i64");
        }
        if self.rank() != 2 || labels.rank() != 1 || labels.shape()[0] != self.shape()[0] {
            return shape_err!("{what}: expected logits [N, C] and labels [N]");
        }
        self.same_device(labels, "cross_entropy")?;
        // inside an autocast scope the loss reads f32 logits, as under torch.autocast
        let promoted = crate::tape::autocast_to_f32(self)?;
        if promoted.dtype() != self.dtype() {
            return promoted.cross_entropy_of_logits(
                labels,
                reduction,
                ignore_index,
                scale,
                margin,
            );
        }
        let (rows, classes) = (self.shape()[0], self.shape()[1]);
        // labels are small: validate them on the host, so a bad one is an error, not a wild read
        let host_labels = labels.to_vec::<i64>()?;
        let mut count = 0usize;
        for (r, &y) in host_labels.iter().enumerate() {
            if y == ignore_index {
                continue;
            }
            if y < 0 || y as usize >= classes {
                return Err(Error::Argument(format!(
                    "{what}: label {y} of row {r} is outside 0..{classes} (ignore index {ignore_index})"
                )));
            }
            count += 1;
        }
        let divisor = match reduction {
            Reduction::Mean => count as f32,
            Reduction::Sum => 1.0,
        };
        let logits = self.contiguous()?;
        let labels_dense = labels.contiguous()?;
        check_extent(&logits)?;
        check_extent(&labels_dense)?;
        let shape = Rows {
            rows,
            classes,
            ignore_index,
            scale,
            margin,
        };
        let (loss, lse) = match (logits.storage(), labels_dense.storage()) {
            (Storage::Cpu(x), Storage::Cpu(_)) => {
                let (loss, lse) = cpu::forward(x, &host_labels, &shape, divisor);
                (Storage::Cpu(loss), Storage::Cpu(lse))
            }
            (Storage::Gpu(x), Storage::Gpu(y)) => {
                let (loss, lse) = gpu::forward(x, y, logits.dtype(), &shape, divisor)?;
                (Storage::Gpu(loss), Storage::Gpu(lse))
            }
            _ => {
                return Err(Error::Device(format!(
                    "{what}: storages on different devices"
                )))
            }
        };
        let device = self.device().clone();
        let out = Tensor::from_parts(loss, Layout::contiguous(&[])?, DType::F32, device.clone());
        let lse = Tensor::from_parts(lse, Layout::contiguous(&[rows])?, DType::F32, device);
        Ok(record(out, &[self, labels], move |g, needs| {
            if !needs[0] {
                return Ok(vec![None, None]);
            }
            let grad = backward(
                &logits,
                &labels_dense,
                &host_labels,
                &lse,
                g,
                &shape,
                divisor,
            )?;
            Ok(vec![Some(grad), None])
        }))
    }
}

/// The problem size the kernels and their CPU twins share.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows {
    pub rows: usize,
    pub classes: usize,
    pub ignore_index: i64,
    pub scale: f32,
    pub margin: f32,
}

impl Rows {
    /// The logit the loss sees for input `x` (the kernels' `ce_logit`).
    fn logit(&self, x: f32, hot: bool) -> f32 {
        self.scale * (x - if hot { self.margin } else { 0.0 })
    }
}

/// Gradient of the loss with respect to the (dense) logits, given the loss's gradient `g`.
fn backward(
    logits: &Tensor,
    labels: &Tensor,
    host_labels: &[i64],
    lse: &Tensor,
    g: &Tensor,
    shape: &Rows,
    divisor: f32,
) -> Result<Tensor> {
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let storage = match (
        logits.storage(),
        labels.storage(),
        lse.storage(),
        g.storage(),
    ) {
        (Storage::Cpu(x), _, Storage::Cpu(lse), Storage::Cpu(g)) => {
            Storage::Cpu(cpu::backward(x, host_labels, lse, g, shape, divisor))
        }
        (Storage::Gpu(x), Storage::Gpu(y), Storage::Gpu(lse), Storage::Gpu(g)) => {
            Storage::Gpu(gpu::backward(x, y, lse, g, logits.dtype(), shape, divisor)?)
        }
        _ => {
            return Err(Error::Device(format!(
                "cross_entropy backward: gradient on {} for logits on {}",
                g.device(),
                logits.device()
            )))
        }
    };
    Ok(Tensor::from_parts(
        storage,
        Layout::contiguous(logits.shape())?,
        logits.dtype(),
        logits.device().clone(),
    ))
}

/// Forward and backward of every dtype, both reductions, with ignored rows, on `device` against
/// the CPU.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::{compare, split_pair};
    let mut rows = Vec::new();
    let cpu = Device::Cpu;
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        let (n, c) = (37, 71);
        let seed = seed + i as u64;
        let x = Tensor::randn(&[n, c], 0.0, 3.0, seed, dtype, &cpu)?;
        let mut rng = crate::tensor::Rng::new(seed ^ 0x5eed);
        let y: Vec<i64> = (0..n)
            .map(|r| {
                if r % 5 == 3 {
                    IGNORE_INDEX
                } else {
                    (rng.uniform() * c as f64) as i64 % c as i64
                }
            })
            .collect();
        let y = Tensor::from_vec(y, &[n], &cpu)?;
        for reduction in [Reduction::Mean, Reduction::Sum] {
            let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
                let xd = x.to_device(dev)?.requires_grad();
                let loss = xd.cross_entropy(&y.to_device(dev)?, reduction)?;
                let seed_grad = Tensor::full(&[], 0.75, DType::F32, dev)?;
                let grads = crate::autograd::backward_with(&loss, seed_grad)?;
                let g = grads
                    .get(&xd)
                    .cloned()
                    .ok_or_else(|| Error::Argument("cross_entropy recorded no gradient".into()))?;
                Ok((loss, g))
            };
            let (got, want) = (run(device), run(&cpu));
            let ((gl, gg), (wl, wg)) = (split_pair(got), split_pair(want));
            let tol = dtype.tolerance().max(1e-5);
            rows.push(compare(
                &format!("cross_entropy_fwd_{dtype}"),
                dtype,
                &[n, c],
                gl,
                wl,
                1e-5,
            ));
            rows.push(compare(
                &format!("cross_entropy_bwd_{dtype}"),
                dtype,
                &[n, c],
                gg,
                wg,
                tol,
            ));
        }
    }
    // CosFace's margin: the logits are rewritten inside the kernels
    for &dtype in &DType::FLOATS {
        let (n, c) = (33, 70);
        let x = Tensor::rand_uniform(&[n, c], -1.0, 1.0, seed ^ 0xc05, dtype, &cpu)?;
        let y: Vec<i64> = (0..n as i64).map(|r| (r * 13 + 5) % c as i64).collect();
        let y = Tensor::from_vec(y, &[n], &cpu)?;
        let run = |dev: &Device| -> Result<(Tensor, Tensor)> {
            let xd = x.to_device(dev)?.requires_grad();
            let loss = xd.margin_cross_entropy(&y.to_device(dev)?, 30.0, 0.4)?;
            let grads = crate::autograd::backward(&loss)?;
            let g = grads.get(&xd).cloned().ok_or_else(|| {
                Error::Argument("margin_cross_entropy recorded no gradient".into())
            })?;
            Ok((loss, g))
        };
        let ((gl, gg), (wl, wg)) = (split_pair(run(device)), split_pair(run(&cpu)));
        rows.push(compare(
            &format!("cross_entropy_fwd_{dtype} (cosface)"),
            dtype,
            &[n, c],
            gl,
            wl,
            1e-5,
        ));
        rows.push(compare(
            &format!("cross_entropy_bwd_{dtype} (cosface)"),
            dtype,
            &[n, c],
            gg,
            wg,
            dtype.tolerance().max(1e-5),
        ));
    }
    // many rows: every thread of the one-block reduction kernel sums several
    let (n, c) = (1500, 3);
    let x = Tensor::randn(&[n, c], 0.0, 2.0, seed, DType::F32, &cpu)?;
    let y: Vec<i64> = (0..n as i64)
        .map(|r| (r * 7 + seed as i64 % 3).rem_euclid(3))
        .collect();
    let y = Tensor::from_vec(y, &[n], &cpu)?;
    rows.push(compare(
        "cross_entropy_reduce_f32",
        DType::F32,
        &[n, c],
        x.to_device(device)
            .and_then(|x| x.cross_entropy(&y.to_device(device)?, Reduction::Mean)),
        x.cross_entropy(&y, Reduction::Mean),
        1e-5,
    ));
    Ok(rows)
}
