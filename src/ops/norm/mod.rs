//! Layer norm over the last axis, as `torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`:
//! `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, the statistics in f32
//! on GPUs (f64 on the CPU) for every dtype, the output in x's dtype. weight and bias are `[C]`,
//! optional, each f32 or x's dtype (f32 parameters with a bf16 input, as PyTorch allows).
//!
//! Inside an `autocast` scope layer norm runs in f32, as torch.autocast runs it (layer_norm is on
//! autocast's float32 list): f16/bf16 inputs and parameters are cast to f32 and the output is f32.
//!
//! Backward from the output's gradient dy, with xhat = (x - mean) * rstd and g = dy * weight:
//! `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` per row (`layer_norm_backward_<dtype>`),
//! `dweight = sum_rows(dy * xhat)` and `dbias = sum_rows(dy)` as a deterministic two-stage column
//! reduction (`layer_norm_param_grad_partial_<dtype>`, `layer_norm_param_grad_sum`), each gradient
//! in its tensor's dtype. The forward keeps each row's mean and rstd (f32) for it.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::layout::Layout;
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{CpuStorage, Storage, Tensor};

impl Tensor {
    /// torch.nn.functional.layer_norm over the last axis with optional `[C]` weight and bias;
    /// autograd for x, weight and bias.
    pub fn layer_norm(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        if tape::autocast_dtype().is_some() {
            let cast = |t: Option<&Tensor>| t.map(tape::autocast_to_f32).transpose();
            let (w, b) = (cast(weight)?, cast(bias)?);
            return tape::autocast_to_f32(self)?.layer_norm_recorded(w.as_ref(), b.as_ref(), eps);
        }
        self.layer_norm_recorded(weight, bias, eps)
    }

    fn layer_norm_recorded(
        &self,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        check_operands(self, weight, bias, eps)?;
        // the f32 copies are the kernels' operands; the gradients go to weight and bias themselves
        let (w32, b32) = tape::no_grad(|| -> Result<_> {
            Ok((
                weight.map(dense_f32).transpose()?,
                bias.map(dense_f32).transpose()?,
            ))
        })?;
        let (out, stats) =
            tape::no_grad(|| layer_norm_forward(self, w32.as_ref(), b32.as_ref(), eps))?;
        let inputs: Vec<&Tensor> = [Some(self), weight, bias].into_iter().flatten().collect();
        let x = self.clone();
        let (w_dtype, b_dtype) = (weight.map(Tensor::dtype), bias.map(Tensor::dtype));
        Ok(tape::record(out, &inputs, move |g, needs| {
            let g = g.to_dtype(x.dtype())?;
            let mut grads = vec![needs[0]
                .then(|| layer_norm_backward(&x, w32.as_ref(), &stats, &g))
                .transpose()?];
            let want_w = w_dtype.is_some() && needs[1];
            let want_b = b_dtype.is_some() && needs[inputs_before_bias(w_dtype.is_some())];
            let (dw, db) = if want_w || want_b {
                layer_norm_param_grads(&x, &stats, &g, (want_w, want_b))?
            } else {
                (None, None)
            };
            if let Some(dtype) = w_dtype {
                grads.push(dw.map(|t| t.to_dtype(dtype)).transpose()?);
            }
            if let Some(dtype) = b_dtype {
                grads.push(db.map(|t| t.to_dtype(dtype)).transpose()?);
            }
            Ok(grads)
        }))
    }
}

/// The position of the bias among the recorded inputs (after x and the weight, if any).
fn inputs_before_bias(has_weight: bool) -> usize {
    if has_weight {
        2
    } else {
        1
    }
}

/// Errors for a non-float or rank-0 input, parameters that are not `[C]`, of another dtype than
/// f32 or x's, or on another device, and an eps that is negative or not finite.
fn check_operands(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<()> {
    let what = || format!("layer_norm of {:?} ({})", x.shape(), x.dtype());
    x.dtype().require_float("layer_norm")?;
    let Some(&c) = x.shape().last() else {
        return shape_err!("{}: the input needs at least one dimension", what());
    };
    for (name, p) in [("weight", weight), ("bias", bias)] {
        let Some(p) = p else { continue };
        if p.shape() != [c] {
            return shape_err!("{}: {name} {:?} is not [{c}]", what(), p.shape());
        }
        if p.dtype() != DType::F32 && p.dtype() != x.dtype() {
            return Err(Error::DType(format!(
                "{}: {name} is {}, expected f32 or {}",
                what(),
                p.dtype(),
                x.dtype()
            )));
        }
        x.same_device(p, &format!("layer_norm ({name})"))?;
    }
    if !eps.is_finite() || eps < 0.0 {
        return Err(Error::Argument(format!(
            "{}: eps {eps} must be finite and >= 0",
            what()
        )));
    }
    Ok(())
}

/// `t` as a dense f32 tensor on its device.
fn dense_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// Each row's mean and rstd (f32 `[rows]`), kept by the forward for the backward.
pub(crate) struct RowStats {
    mean: Tensor,
    rstd: Tensor,
}

/// `rows` and the row length `n` of `x`'s last axis (`rows` is 0 for an empty tensor).
fn rows_and_len(x: &Tensor) -> (usize, usize) {
    let n = x.shape().last().copied().unwrap_or(1);
    (x.numel().checked_div(n).unwrap_or(0), n)
}

fn f32_tensor(storage: Storage, len: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_parts(
        storage,
        Layout::contiguous(&[len])?,
        DType::F32,
        device.clone(),
    ))
}

/// The f32 data of a dense f32 CPU tensor.
fn f32_slice(t: &Tensor) -> Result<&[f32]> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[t.layout().offset()..][..t.numel()]),
        _ => Err(Error::DType(format!(
            "layer_norm: expected f32 CPU data, got {} on {}",
            t.dtype(),
            t.device()
        ))),
    }
}

fn gpu_buffer(t: &Tensor) -> Option<&crate::device::GpuBuffer> {
    match t.storage() {
        Storage::Gpu(b) => Some(b),
        Storage::Cpu(_) => None,
    }
}

/// The GPU buffer of a saved statistic.
fn stats_buffer(t: &Tensor) -> Result<&crate::device::GpuBuffer> {
    gpu_buffer(t)
        .ok_or_else(|| Error::Device("layer_norm backward: statistics not on the GPU".into()))
}

/// The forward with f32 dense weight and bias, recording nothing: the output and the statistics.
fn layer_norm_forward(
    x: &Tensor,
    w: Option<&Tensor>,
    b: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, RowStats)> {
    let (rows, n) = rows_and_len(x);
    let device = x.device();
    if rows == 0 {
        let stats = RowStats {
            mean: Tensor::zeros(&[0], DType::F32, device)?,
            rstd: Tensor::zeros(&[0], DType::F32, device)?,
        };
        return Ok((Tensor::zeros(x.shape(), x.dtype(), device)?, stats));
    }
    let x = x.contiguous()?;
    check_extent(&x)?;
    let (y, mean, rstd) = match x.storage() {
        Storage::Cpu(s) => {
            let f = cpu::layer_norm(
                s,
                w.map(f32_slice).transpose()?,
                b.map(f32_slice).transpose()?,
                rows,
                n,
                eps,
            )?;
            (
                Storage::Cpu(f.y),
                Storage::Cpu(CpuStorage::F32(f.mean)),
                Storage::Cpu(CpuStorage::F32(f.rstd)),
            )
        }
        Storage::Gpu(buf) => {
            let (y, mean, rstd) = gpu::layer_norm(
                buf,
                w.and_then(gpu_buffer),
                b.and_then(gpu_buffer),
                x.dtype(),
                rows,
                n,
                eps as f32,
            )?;
            (Storage::Gpu(y), Storage::Gpu(mean), Storage::Gpu(rstd))
        }
    };
    let out = Tensor::from_parts(y, Layout::contiguous(x.shape())?, x.dtype(), device.clone());
    let stats = RowStats {
        mean: f32_tensor(mean, rows, device)?,
        rstd: f32_tensor(rstd, rows, device)?,
    };
    Ok((out, stats))
}

/// Checks the output gradient against the forward's input; both dense on return.
fn dense_pair(x: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    if g.shape() != x.shape() || g.dtype() != x.dtype() {
        return shape_err!(
            "layer_norm backward: gradient {:?} ({}) for an input {:?} ({})",
            g.shape(),
            g.dtype(),
            x.shape(),
            x.dtype()
        );
    }
    x.same_device(g, "layer_norm backward")?;
    let (x, g) = (x.contiguous()?, g.contiguous()?);
    check_extent(&x)?;
    check_extent(&g)?;
    Ok((x, g))
}

/// The input's gradient (x's dtype) from the forward's input, f32 dense weight and statistics and
/// the output's gradient `g` (x's shape and dtype).
fn layer_norm_backward(
    x: &Tensor,
    w: Option<&Tensor>,
    stats: &RowStats,
    g: &Tensor,
) -> Result<Tensor> {
    let (rows, n) = rows_and_len(x);
    if rows == 0 {
        return Tensor::zeros(x.shape(), x.dtype(), x.device());
    }
    let (x, g) = dense_pair(x, g)?;
    let dx = match (x.storage(), g.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(gs)) => {
            let st = cpu::Stats {
                mean: f32_slice(&stats.mean)?,
                rstd: f32_slice(&stats.rstd)?,
            };
            Storage::Cpu(cpu::layer_norm_backward(
                xs,
                w.map(f32_slice).transpose()?,
                &st,
                gs,
                n,
            )?)
        }
        (Storage::Gpu(xb), Storage::Gpu(gb)) => Storage::Gpu(gpu::layer_norm_backward(
            xb,
            w.and_then(gpu_buffer),
            stats_buffer(&stats.mean)?,
            stats_buffer(&stats.rstd)?,
            gb,
            x.dtype(),
            rows,
            n,
        )?),
        _ => unreachable!("dense_pair checked that both storages are on one device"),
    };
    Ok(Tensor::from_parts(
        dx,
        Layout::contiguous(x.shape())?,
        x.dtype(),
        x.device().clone(),
    ))
}

/// The weight's and the bias's gradients (f32 `[C]`), each only when `want` asks for it.
fn layer_norm_param_grads(
    x: &Tensor,
    stats: &RowStats,
    g: &Tensor,
    want: (bool, bool),
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (rows, n) = rows_and_len(x);
    let device = x.device();
    if rows == 0 {
        let zeros = |w: bool| {
            w.then(|| Tensor::zeros(&[n], DType::F32, device))
                .transpose()
        };
        return Ok((zeros(want.0)?, zeros(want.1)?));
    }
    let (x, g) = dense_pair(x, g)?;
    let (dw, db) = match (x.storage(), g.storage()) {
        (Storage::Cpu(xs), Storage::Cpu(gs)) => {
            let st = cpu::Stats {
                mean: f32_slice(&stats.mean)?,
                rstd: f32_slice(&stats.rstd)?,
            };
            let (dw, db) = cpu::layer_norm_param_grads(xs, &st, gs, n)?;
            let keep = |w: bool, v: Vec<f32>| w.then(|| Storage::Cpu(CpuStorage::F32(v)));
            (keep(want.0, dw), keep(want.1, db))
        }
        (Storage::Gpu(xb), Storage::Gpu(gb)) => {
            let (dw, db) = gpu::layer_norm_param_grads(
                xb,
                stats_buffer(&stats.mean)?,
                stats_buffer(&stats.rstd)?,
                gb,
                x.dtype(),
                rows,
                n,
                want,
            )?;
            (dw.map(Storage::Gpu), db.map(Storage::Gpu))
        }
        _ => unreachable!("dense_pair checked that both storages are on one device"),
    };
    let wrap = |s: Option<Storage>| s.map(|s| f32_tensor(s, n, device)).transpose();
    Ok((wrap(dw)?, wrap(db)?))
}

/// Conformance cases: a group of lanes per row (C = 1, 7, 33, 384, 1000), a block per row (1025,
/// 1536, 4099), every dtype, f32 or input-dtype parameters, without weight or bias; forward output
/// and statistics, the input's gradient and the parameters' two-stage column sums each a row.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let cpu = Device::Cpu;
    let shapes: [&[usize]; 9] = [
        &[1, 1],
        &[3, 7],
        &[5, 33],
        &[2, 3, 384],
        &[37, 1000],
        &[2, 1025],
        &[3, 1536],
        &[2, 4099],
        &[300, 64],
    ];
    let mut rows = Vec::new();
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &shape) in shapes.iter().enumerate() {
            let sd = seed.wrapping_add(16 * (i * 16 + j) as u64);
            let c = shape[shape.len() - 1];
            // parameters: f32 or x's dtype alternately; the 4th case has neither, the 5th no bias
            let p_dtype = if j % 2 == 0 { DType::F32 } else { dtype };
            let x = Tensor::randn(shape, 2.0, 3.0, sd, dtype, &cpu)?;
            let dy = Tensor::randn(shape, 0.0, 1.0, sd + 1, dtype, &cpu)?;
            let w = (j != 3)
                .then(|| Tensor::randn(&[c], 1.0, 0.5, sd + 2, p_dtype, &cpu))
                .transpose()?;
            let b = (j != 3 && j != 4)
                .then(|| Tensor::randn(&[c], 0.0, 0.5, sd + 3, p_dtype, &cpu))
                .transpose()?;
            let (w32, b32) = (
                w.as_ref().map(dense_f32).transpose()?,
                b.as_ref().map(dense_f32).transpose()?,
            );
            let (want_y, want_stats) = layer_norm_forward(&x, w32.as_ref(), b32.as_ref(), 1e-6)?;
            let on = |t: &Option<Tensor>| t.as_ref().map(|t| t.to_device(device)).transpose();
            let got = x.to_device(device).and_then(|xd| {
                layer_norm_forward(&xd, on(&w32)?.as_ref(), on(&b32)?.as_ref(), 1e-6)
            });
            let (got_y, got_stats) = match got {
                Ok((y, s)) => (Ok(y), Ok(s)),
                Err(e) => (Err(Error::Argument(e.to_string())), Err(e)),
            };
            let tol = dtype.tolerance();
            let params = match (w.is_some(), b.is_some()) {
                (true, true) => format!("weight, bias {p_dtype}"),
                (true, false) => format!("weight {p_dtype}"),
                _ => "no weight".to_string(),
            };
            let name = |k: &str, what: &str| format!("{k}_{dtype} ({params}{what})");
            rows.push(compare(
                &name("layer_norm", ""),
                dtype,
                shape,
                got_y,
                Ok(want_y),
                tol,
            ));
            let (got_mean, got_rstd) = match &got_stats {
                Ok(s) => (Ok(s.mean.clone()), Ok(s.rstd.clone())),
                Err(e) => (
                    Err(Error::Argument(e.to_string())),
                    Err(Error::Argument(e.to_string())),
                ),
            };
            let want_mean = Ok(want_stats.mean.clone());
            let want_rstd = Ok(want_stats.rstd.clone());
            rows.push(compare(
                &name("layer_norm", ", mean"),
                dtype,
                shape,
                got_mean,
                want_mean,
                1e-5,
            ));
            rows.push(compare(
                &name("layer_norm", ", rstd"),
                dtype,
                shape,
                got_rstd,
                want_rstd,
                1e-5,
            ));
            // the backward from the CPU's statistics, so both sides start from the same numbers
            let stats_on = || -> Result<RowStats> {
                Ok(RowStats {
                    mean: want_stats.mean.to_device(device)?,
                    rstd: want_stats.rstd.to_device(device)?,
                })
            };
            let got = (|| {
                layer_norm_backward(
                    &x.to_device(device)?,
                    on(&w32)?.as_ref(),
                    &stats_on()?,
                    &dy.to_device(device)?,
                )
            })();
            let want = layer_norm_backward(&x, w32.as_ref(), &want_stats, &dy);
            rows.push(compare(
                &name("layer_norm_backward", ""),
                dtype,
                shape,
                got,
                want,
                tol,
            ));
            let want_grads = (w.is_some(), b.is_some());
            if want_grads == (false, false) {
                continue;
            }
            let got = (|| {
                layer_norm_param_grads(
                    &x.to_device(device)?,
                    &stats_on()?,
                    &dy.to_device(device)?,
                    want_grads,
                )
            })();
            let want = layer_norm_param_grads(&x, &want_stats, &dy, want_grads)?;
            let (got_w, got_b) = match got {
                Ok(p) => (Ok(p.0), Ok(p.1)),
                Err(e) => (Err(Error::Argument(e.to_string())), Err(e)),
            };
            let kernels =
                format!("layer_norm_param_grad_partial_{dtype}+layer_norm_param_grad_sum");
            for (what, got, want) in [("dweight", got_w, want.0), ("dbias", got_b, want.1)] {
                let Some(want) = want else { continue };
                let got = got.and_then(|g| g.ok_or_else(|| Error::Argument(format!("no {what}"))));
                rows.push(compare(
                    &format!("{kernels} ({what})"),
                    dtype,
                    shape,
                    got,
                    Ok(want),
                    tol,
                ));
            }
        }
    }
    Ok(rows)
}
