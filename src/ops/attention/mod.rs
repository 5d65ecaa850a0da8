//! Fused scaled dot-product attention, `softmax(q k^T * scale) v` per batch entry and head, as
//! torch's `scaled_dot_product_attention` without mask or dropout. On the GPU a flash-attention
//! kernel (kernels/attention.cu) that never stores the [L, L] scores; on the CPU a blocked twin
//! (cpu.rs). Both save the log-sum-exp of every query row, from which the backward recomputes the
//! probabilities: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = scale dS K,
//! dK = scale dS^T Q.

mod cpu;
pub(crate) mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{CpuStorage, Storage, Tensor};

impl Tensor {
    /// `softmax(q kᵀ · scale) v` per batch entry and head, as torch's
    /// `scaled_dot_product_attention` (no mask, no dropout). `self` (q), `k` and `v` are
    /// `[B, H, L, D]` of one float dtype on one device, with any strides (the views of a fused
    /// qkv projection are read in place when their last axis has stride 1; other views are copied
    /// first). The result is `[B, H, L, D]` stored as a dense `[B, L, H, D]` tensor permuted, so
    /// `out.transpose(1, 2)` is contiguous and reshapes to `[B, L, H * D]` for free. Gradients
    /// flow to q, k and v. Inside an `autocast` scope the inputs are cast to the autocast dtype,
    /// as torch.autocast does. The GPU kernels take head dimensions up to 128.
    pub fn attention(&self, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        match tape::autocast_dtype() {
            Some(low)
                if [self, k, v].iter().all(|t| t.dtype().is_float())
                    && [self, k, v].iter().any(|t| t.dtype() != low) =>
            {
                self.to_dtype(low)?
                    .attention_recorded(&k.to_dtype(low)?, &v.to_dtype(low)?, scale)
            }
            _ => self.attention_recorded(k, v, scale),
        }
    }

    fn attention_recorded(&self, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        check_inputs(self, k, v, scale)?;
        let (q, k, v) = (stride_one(self)?, stride_one(k)?, stride_one(v)?);
        let (out, lse) = tape::no_grad(|| attention_forward(&q, &k, &v, scale))?;
        if !tape::is_grad_enabled() || ![&q, &k, &v].iter().any(|t| t.is_requires_grad()) {
            return Ok(out);
        }
        let saved = [q.detach(), k.detach(), v.detach(), out.detach()];
        Ok(tape::record(out, &[&q, &k, &v], move |g, needs| {
            let [q, k, v, o] = &saved;
            let grads = attention_backward(q, k, v, o, &lse, g, scale)?;
            Ok(grads
                .into_iter()
                .zip(needs)
                .map(|(t, &need)| need.then_some(t))
                .collect())
        }))
    }
}

/// Shapes, dtypes, devices and the scale of an attention call.
fn check_inputs(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<()> {
    let what = || {
        format!(
            "attention(q {:?}, k {:?}, v {:?})",
            q.shape(),
            k.shape(),
            v.shape()
        )
    };
    if q.rank() != 4 || k.shape() != q.shape() || v.shape() != q.shape() {
        return shape_err!(
            "{}: q, k and v must be [batch, heads, length, head_dim] of one shape",
            what()
        );
    }
    q.dtype().require_float(&what())?;
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return dtype_err!(
            "{}: q is {}, k {}, v {}; they must be one dtype",
            what(),
            q.dtype(),
            k.dtype(),
            v.dtype()
        );
    }
    q.same_device(k, &what())?;
    q.same_device(v, &what())?;
    if !scale.is_finite() {
        return Err(Error::Argument(format!(
            "{}: scale {scale} is not finite",
            what()
        )));
    }
    if q.device().gpu().is_some() && q.shape()[3] > gpu::MAX_HEAD_DIM {
        return shape_err!(
            "{} on {}: head_dim {} is above the GPU kernels' {}",
            what(),
            q.device(),
            q.shape()[3],
            gpu::MAX_HEAD_DIM
        );
    }
    Ok(())
}

/// `t` itself when its last axis has stride 1 (or length 1), else a dense copy.
fn stride_one(t: &Tensor) -> Result<Tensor> {
    if t.shape()[3] <= 1 || t.layout().strides()[3] == 1 {
        Ok(t.clone())
    } else {
        t.contiguous()
    }
}

/// An f32 CPU tensor's values as a `[B, H, L, D]` view for cpu.rs.
fn head_view(t: &Tensor) -> Result<cpu::HeadView<'_>> {
    let data = match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_slice(),
        _ => {
            return dtype_err!(
                "attention (cpu): expected f32 CPU storage, got {}",
                t.dtype()
            )
        }
    };
    let s = t.layout().strides();
    Ok(cpu::HeadView {
        data,
        offset: t.layout().offset(),
        strides: [s[0], s[1], s[2]],
    })
}

/// f32 and with a stride-1 last axis (f16/bf16 converted; f32 read in place).
fn cpu_f32(t: &Tensor) -> Result<Tensor> {
    stride_one(&t.to_dtype(DType::F32)?)
}

fn dims(q: &Tensor) -> cpu::Dims {
    let s = q.shape();
    cpu::Dims {
        b: s[0],
        h: s[1],
        l: s[2],
        d: s[3],
    }
}

/// The output (`[B, H, L, D]` stored as a dense `[B, L, H, D]`) and the log-sum-exp of every
/// query row (f32 `[B, H, L]`), recording nothing. The inputs are checked, with stride-1 last axes.
fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let [b, h, l, d] = [q.shape()[0], q.shape()[1], q.shape()[2], q.shape()[3]];
    let device = q.device();
    if q.numel() == 0 {
        let out = Tensor::zeros(&[b, l, h, d], q.dtype(), device)?.transpose(1, 2)?;
        return Ok((out, Tensor::zeros(&[b, h, l], DType::F32, device)?));
    }
    for t in [q, k, v] {
        check_extent(t)?;
    }
    if device.gpu().is_some() {
        return gpu::forward(q, k, v, scale);
    }
    let (qf, kf, vf) = (cpu_f32(q)?, cpu_f32(k)?, cpu_f32(v)?);
    let (out, lse) = cpu::forward(
        head_view(&qf)?,
        head_view(&kf)?,
        head_view(&vf)?,
        dims(q),
        scale as f32,
    );
    let out = Tensor::from_vec(out, &[b, h, l, d], &Device::Cpu)?
        .transpose(1, 2)?
        .contiguous()?
        .to_dtype(q.dtype())?
        .transpose(1, 2)?;
    Ok((out, Tensor::from_vec(lse, &[b, h, l], &Device::Cpu)?))
}

/// The gradients of q, k and v (dense `[B, H, L, D]`, the inputs' dtype) from the forward's
/// inputs, output `o`, log-sum-exp and the output's gradient `g`.
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<Vec<Tensor>> {
    if g.shape() != q.shape() {
        return shape_err!(
            "attention backward: gradient {:?} for an output {:?}",
            g.shape(),
            q.shape()
        );
    }
    q.same_device(g, "attention backward")?;
    let dtype = q.dtype();
    if q.numel() == 0 {
        let zero = Tensor::zeros(q.shape(), dtype, q.device())?;
        return Ok(vec![zero.clone(), zero.clone(), zero]);
    }
    let g = stride_one(&g.to_dtype(dtype)?)?;
    check_extent(&g)?;
    if q.device().gpu().is_some() {
        return Ok(gpu::backward(q, k, v, o, lse, &g, scale)?.to_vec());
    }
    let f32s = [q, k, v, o, &g].map(cpu_f32);
    let [qf, kf, vf, of, gf] = f32s;
    let (qf, kf, vf, of, gf) = (qf?, kf?, vf?, of?, gf?);
    let lse = lse.to_vec::<f32>()?;
    let grads = cpu::backward(
        head_view(&qf)?,
        head_view(&kf)?,
        head_view(&vf)?,
        head_view(&of)?,
        &lse,
        head_view(&gf)?,
        dims(q),
        scale as f32,
    );
    grads
        .into_iter()
        .map(|gr| Tensor::from_vec(gr, q.shape(), &Device::Cpu)?.to_dtype(dtype))
        .collect()
}

/// Forward (output and log-sum-exp) and backward (dq, dk, dv) of every dtype on `device` against
/// the CPU: lengths 1, 7, 257 and 261, head dimensions 64, 128 and 80, q, k and v as the strided
/// views of a fused qkv projection and as separate tensors.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    // (batch, heads, length, head_dim, from a fused qkv tensor)
    let cases: [(usize, usize, usize, usize, bool); 6] = [
        (1, 1, 1, 64, false),
        (2, 3, 7, 64, true),
        (1, 2, 257, 64, true),
        (2, 1, 261, 128, false),
        (1, 2, 261, 64, true),
        (1, 1, 70, 80, false),
    ];
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &(b, h, l, d, fused)) in cases.iter().enumerate() {
            let case_seed = seed + (i * 16 + j) as u64 * 4;
            let shape = [b, h, l, d];
            // q, k, v on the CPU and on the device; fused: views of one [B, L, 3, H, D] tensor,
            // qkv[:, :, p].permute(0, 2, 1, 3), on each side
            let ([q, k, v], [qd, kd, vd]) = if fused {
                let qkv =
                    Tensor::randn(&[b, l, 3, h, d], 0.0, 1.0, case_seed, dtype, &Device::Cpu)?;
                let parts = |t: &Tensor| -> Result<[Tensor; 3]> {
                    let part = |p: usize| t.narrow(2, p, 1)?.squeeze(2)?.permute(&[0, 2, 1, 3]);
                    Ok([part(0)?, part(1)?, part(2)?])
                };
                (parts(&qkv)?, parts(&qkv.to_device(device)?)?)
            } else {
                let r =
                    |s: u64| Tensor::randn(&shape, 0.0, 1.0, case_seed + s, dtype, &Device::Cpu);
                let cpu = [r(0)?, r(1)?, r(2)?];
                let dev = [
                    cpu[0].to_device(device)?,
                    cpu[1].to_device(device)?,
                    cpu[2].to_device(device)?,
                ];
                (cpu, dev)
            };
            let scale = 1.0 / (d as f64).sqrt();
            let got = attention_forward(&qd, &kd, &vd, scale);
            let want = attention_forward(&q, &k, &v, scale);
            let (got_out, got_lse) = crate::check::split_pair(got);
            let (want_out, want_lse) = crate::check::split_pair(want);
            let tol = dtype.tolerance();
            let dmax = gpu::head_dim_bound(d);
            let forward = gpu::forward_kernel(dtype, dmax);
            rows.push(compare(&forward, dtype, &shape, got_out, want_out, tol));
            rows.push(compare(
                &format!("{forward} (lse)"),
                dtype,
                &shape,
                got_lse,
                want_lse,
                tol,
            ));

            // the backward from the CPU's output and log-sum-exp and a random output gradient
            let (o, lse) = attention_forward(&q, &k, &v, scale)?;
            let g = Tensor::randn(&shape, 0.0, 1.0, case_seed + 3, dtype, &Device::Cpu)?;
            let got = (|| {
                attention_backward(
                    &qd,
                    &kd,
                    &vd,
                    &o.to_device(device)?,
                    &lse.to_device(device)?,
                    &g.to_device(device)?,
                    scale,
                )
            })();
            let want = attention_backward(&q, &k, &v, &o, &lse, &g, scale);
            let names = ["dq", "dk", "dv"];
            for (n, name) in names.iter().enumerate() {
                let kernel = if n == 0 {
                    format!("attention_backward_dot_{dtype}+attention_backward_dq_{dtype}_d{dmax} ({name})")
                } else {
                    format!("attention_backward_dkv_{dtype}_d{dmax} ({name})")
                };
                let pick = |r: &Result<Vec<Tensor>>| match r {
                    Ok(v) => Ok(v[n].clone()),
                    Err(e) => Err(Error::Argument(e.to_string())),
                };
                rows.push(compare(
                    &kernel,
                    dtype,
                    &shape,
                    pick(&got),
                    pick(&want),
                    tol,
                ));
            }
        }
    }
    Ok(rows)
}
