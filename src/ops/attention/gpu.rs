//! Launches of kernels/attention.cu; the file's header comment explains the kernels.

use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::layout::Layout;
use crate::tensor::{Storage, Tensor};

/// The largest head dimension the kernels hold in registers.
pub(crate) const MAX_HEAD_DIM: usize = 128;
/// Mirror the constants of namespace `attn` in kernels/attention.cu (SIMT kernels).
const THREADS: u32 = 256;
const ROWS: usize = 64;
const FWD_COLS: usize = 64;
const BWD_COLS: usize = 32;
/// Mirror the constants of namespace `attn_tc`: threads per block, padding of a shared row.
const MMA_THREADS: u32 = 128;
const MMA_PAD: usize = 8;

/// Mirrors `struct AttentionParams` in kernels/attention.cu (layout tested in src/device/abi.rs).
/// Strides in elements of the batch, head and position axes of q, k, v, the output o and its
/// gradient g.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttentionParams {
    pub(crate) heads: i64,
    pub(crate) len: i64,
    pub(crate) dim: i64,
    pub(crate) q: [i64; 3],
    pub(crate) k: [i64; 3],
    pub(crate) v: [i64; 3],
    pub(crate) o: [i64; 3],
    pub(crate) g: [i64; 3],
    pub(crate) scale: f64,
}

/// The device buffer of a GPU tensor and the byte offset of its view.
fn buffer(t: &Tensor) -> Result<(&GpuBuffer, usize)> {
    match t.storage() {
        Storage::Gpu(b) => Ok((b, t.layout().offset() * t.dtype().size_in_bytes())),
        Storage::Cpu(_) => Err(Error::Device(
            "attention: a CPU tensor reached the GPU launch".into(),
        )),
    }
}

fn head_strides(t: &Tensor) -> [i64; 3] {
    let s = t.layout().strides();
    [s[0] as i64, s[1] as i64, s[2] as i64]
}

/// `[B, H, L, D]` and the kernel suffix for the head dimension.
fn dims(q: &Tensor) -> Result<([usize; 4], usize)> {
    let s = q.shape();
    let d = s[3];
    if d > MAX_HEAD_DIM {
        return shape_err!(
            "attention on {}: head dimension {d} (q {s:?}) is above the GPU kernels' {MAX_HEAD_DIM}",
            q.device()
        );
    }
    Ok(([s[0], s[1], s[2], d], head_dim_bound(d)))
}

/// The template bound of the kernels for head dimension `d` (<= 128).
pub(crate) fn head_dim_bound(d: usize) -> usize {
    if d <= 64 {
        64
    } else {
        128
    }
}

/// A block per 64 resident rows of each (b, h).
fn grid(b: usize, h: usize, l: usize) -> Result<u32> {
    let blocks = b * h * l.div_ceil(ROWS);
    u32::try_from(blocks).map_err(|_| {
        Error::Shape(format!(
            "attention: [{b}, {h}, {l}, _] needs {blocks} blocks, more than a grid holds"
        ))
    })
}

fn params(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: [i64; 3],
    g: [i64; 3],
    scale: f64,
) -> AttentionParams {
    let s = q.shape();
    AttentionParams {
        heads: s[1] as i64,
        len: s[2] as i64,
        dim: s[3] as i64,
        q: head_strides(q),
        k: head_strides(k),
        v: head_strides(v),
        o,
        g,
        scale,
    }
}

/// `attention_forward_<dtype>_d<64|128>`: the output, `[B, H, L, D]` stored as a dense
/// `[B, L, H, D]`, and the log-sum-exp of every query row, f32 `[B, H, L]`. The inputs are
/// non-empty `[B, H, L, D]` views with a stride-1 last axis.
pub fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<(Tensor, Tensor)> {
    let ([b, h, l, d], dmax) = dims(q)?;
    let dtype = q.dtype();
    let (qb, qo) = buffer(q)?;
    let (kb, ko) = buffer(k)?;
    let (vb, vo) = buffer(v)?;
    let gpu = qb.gpu();
    let out = gpu.alloc(b * h * l * d * dtype.size_in_bytes())?;
    let lse = gpu.alloc(b * h * l * 4)?;
    let o_strides = [(l * h * d) as i64, d as i64, (h * d) as i64];
    let p = params(q, k, v, o_strides, [0; 3], scale);
    let mut args = KernelArgs::new();
    args.ptr(qb, qo)
        .ptr(kb, ko)
        .ptr(vb, vo)
        .ptr(&out, 0)
        .ptr(&lse, 0)
        .push(p);
    gpu.launch(
        &forward_kernel(dtype, dmax),
        forward_launch(b, h, l, d, dtype)?,
        &mut args,
    )?;
    let device = q.device().clone();
    let out = Tensor::from_parts(
        Storage::Gpu(out),
        Layout::contiguous(&[b, l, h, d])?,
        dtype,
        device.clone(),
    )
    .transpose(1, 2)?;
    let lse = Tensor::from_parts(
        Storage::Gpu(lse),
        Layout::contiguous(&[b, h, l])?,
        DType::F32,
        device,
    );
    Ok((out, lse))
}

/// The forward kernel of a dtype and head-dimension bound: tensor cores for bf16/f16.
pub(crate) fn forward_kernel(dtype: DType, dmax: usize) -> String {
    match dtype {
        DType::F32 => format!("attention_forward_{dtype}_d{dmax}"),
        _ => format!("attention_forward_mma_{dtype}_d{dmax}"),
    }
}

fn forward_launch(b: usize, h: usize, l: usize, d: usize, dtype: DType) -> Result<LaunchConfig> {
    let (threads, shared) = match dtype {
        // Q, K and V tiles of 64 rows as stored, padded to the kernel's head-dimension bound
        DType::F16 | DType::BF16 => {
            let dmax = head_dim_bound(d);
            (
                MMA_THREADS,
                3 * ROWS * (dmax + MMA_PAD) * dtype.size_in_bytes(),
            )
        }
        // Q and one K/V tile as f32, and the probabilities
        _ => (
            THREADS,
            ((ROWS + FWD_COLS) * (d + 1) + ROWS * (FWD_COLS + 1)) * 4,
        ),
    };
    Ok(LaunchConfig {
        grid: (grid(b, h, l)?, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: shared as u32,
    })
}

/// The gradients of q, k and v (dense `[B, H, L, D]`) from the forward's inputs, its output `o`,
/// its log-sum-exp and the output's gradient `g` (views with a stride-1 last axis, one dtype).
pub fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<[Tensor; 3]> {
    let ([b, h, l, d], dmax) = dims(q)?;
    let dtype = q.dtype();
    let (qb, qo) = buffer(q)?;
    let (kb, ko) = buffer(k)?;
    let (vb, vo) = buffer(v)?;
    let (ob, oo) = buffer(o)?;
    let (gb, go) = buffer(g)?;
    let (lb, lo) = buffer(lse)?;
    let gpu = qb.gpu();
    let p = params(q, k, v, head_strides(o), head_strides(g), scale);

    let rows = b * h * l;
    let dvec = gpu.alloc(rows * 4)?;
    let warps = (THREADS / 32) as usize;
    let dot = LaunchConfig {
        grid: (rows.div_ceil(warps).min(4096) as u32, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: 0,
    };
    let mut args = KernelArgs::new();
    args.ptr(ob, oo)
        .ptr(gb, go)
        .ptr(&dvec, 0)
        .push(p)
        .push(rows as i64);
    gpu.launch(&format!("attention_backward_dot_{dtype}"), dot, &mut args)?;

    let bytes = rows * d * dtype.size_in_bytes();
    let (dq, dk, dv) = (gpu.alloc(bytes)?, gpu.alloc(bytes)?, gpu.alloc(bytes)?);
    let cfg = LaunchConfig {
        grid: (grid(b, h, l)?, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: (((2 * ROWS + 2 * BWD_COLS) * (d + 1) + 2 * ROWS * (BWD_COLS + 1)) * 4)
            as u32,
    };
    let inputs = |args: &mut KernelArgs| {
        args.ptr(qb, qo)
            .ptr(kb, ko)
            .ptr(vb, vo)
            .ptr(gb, go)
            .ptr(lb, lo)
            .ptr(&dvec, 0);
    };
    let mut args = KernelArgs::new();
    inputs(&mut args);
    args.ptr(&dq, 0).push(p);
    gpu.launch(
        &format!("attention_backward_dq_{dtype}_d{dmax}"),
        cfg,
        &mut args,
    )?;
    let mut args = KernelArgs::new();
    inputs(&mut args);
    args.ptr(&dk, 0).ptr(&dv, 0).push(p);
    gpu.launch(
        &format!("attention_backward_dkv_{dtype}_d{dmax}"),
        cfg,
        &mut args,
    )?;

    let layout = Layout::contiguous(&[b, h, l, d])?;
    let wrap =
        |buf| Tensor::from_parts(Storage::Gpu(buf), layout.clone(), dtype, q.device().clone());
    Ok([wrap(dq), wrap(dk), wrap(dv)])
}
