//! Launches of kernels/elementwise.cu.

use super::{BinaryOp, UnaryOp};
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::{coalesce, Layout};
use crate::ops::{StridedDesc, LINEAR_MAX_BLOCKS, LINEAR_THREADS};

/// The launch of a dense kernel over `n` elements whose operands start at these byte offsets:
/// one thread per 16-byte pack when all are 16-byte aligned (the kernel takes the vector path),
/// else one per element. Buffers themselves are at least 256-byte aligned.
fn dense_launch(n: usize, byte_offsets: &[usize], dtype: DType) -> LaunchConfig {
    let per_pack = 16 / dtype.size_in_bytes();
    let items = if byte_offsets.iter().all(|o| o % 16 == 0) {
        n.div_ceil(per_pack)
    } else {
        n
    };
    LaunchConfig::linear(items, LINEAR_THREADS, LINEAR_MAX_BLOCKS)
}

pub fn unary(x: &GpuBuffer, layout: &Layout, dtype: DType, op: UnaryOp) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let (n, size) = (layout.numel(), dtype.size_in_bytes());
    let out = gpu.alloc(n * size)?;
    if n == 0 {
        return Ok(out);
    }
    let (p0, p1) = op.params();
    let x_offset = layout.offset() * size;
    let mut args = KernelArgs::new();
    args.ptr(x, x_offset);
    if layout.is_contiguous() {
        args.ptr(&out, 0).push(n as i64).push(p0).push(p1);
        gpu.launch(
            &format!("unary_{}_{dtype}", op.name()),
            dense_launch(n, &[x_offset], dtype),
            &mut args,
        )?;
    } else {
        let (shape, [strides]) = coalesce(layout.shape(), [layout.strides()]);
        args.push(StridedDesc::from_parts(&shape, &strides))
            .ptr(&out, 0)
            .push(n as i64)
            .push(p0)
            .push(p1);
        let cfg = LaunchConfig::linear(n, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
        gpu.launch(
            &format!("unary_{}_strided_{dtype}", op.name()),
            cfg,
            &mut args,
        )?;
    }
    Ok(out)
}

/// `la` and `lb` are views with the output's shape (broadcast dimensions have stride 0).
pub fn binary(
    a: &GpuBuffer,
    la: &Layout,
    b: &GpuBuffer,
    lb: &Layout,
    dtype: DType,
    op: BinaryOp,
) -> Result<GpuBuffer> {
    let gpu = a.gpu();
    let (n, size) = (la.numel(), dtype.size_in_bytes());
    let out = gpu.alloc(n * size)?;
    if n == 0 {
        return Ok(out);
    }
    let (a_offset, b_offset) = (la.offset() * size, lb.offset() * size);
    let mut args = KernelArgs::new();
    // Both views have the output's shape, so contiguous means element i of each is at offset + i.
    if la.is_contiguous() && lb.is_contiguous() {
        args.ptr(a, a_offset)
            .ptr(b, b_offset)
            .ptr(&out, 0)
            .push(n as i64);
        gpu.launch(
            &format!("binary_{}_{dtype}", op.name()),
            dense_launch(n, &[a_offset, b_offset], dtype),
            &mut args,
        )?;
    } else {
        let (shape, [sa, sb]) = coalesce(la.shape(), [la.strides(), lb.strides()]);
        args.ptr(a, a_offset)
            .push(StridedDesc::from_parts(&shape, &sa))
            .ptr(b, b_offset)
            .push(StridedDesc::from_parts(&shape, &sb))
            .ptr(&out, 0)
            .push(n as i64);
        let cfg = LaunchConfig::linear(n, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
        gpu.launch(
            &format!("binary_{}_strided_{dtype}", op.name()),
            cfg,
            &mut args,
        )?;
    }
    Ok(out)
}

/// `<op>_backward_<dtype>`: dx = dy * op'(x) over `n` elements of dense `x` and `dy` (both at
/// offset 0).
pub fn unary_backward(
    x: &GpuBuffer,
    dy: &GpuBuffer,
    n: usize,
    dtype: DType,
    op: UnaryOp,
) -> Result<GpuBuffer> {
    let gpu = x.gpu();
    let out = gpu.alloc(n * dtype.size_in_bytes())?;
    if n == 0 {
        return Ok(out);
    }
    let (p0, p1) = op.params();
    let mut args = KernelArgs::new();
    args.ptr(x, 0)
        .ptr(dy, 0)
        .ptr(&out, 0)
        .push(n as i64)
        .push(p0)
        .push(p1);
    gpu.launch(
        &format!("{}_backward_{dtype}", op.name()),
        dense_launch(n, &[0], dtype),
        &mut args,
    )?;
    Ok(out)
}

/// `<op>_backward_<dtype>` of maximum, minimum or pow: the gradients of `a` and `b` (views with the
/// output's shape) over the output's shape, each only when `need` says so. `dy` is dense at
/// offset 0.
pub fn binary_backward(
    (a, la): (&GpuBuffer, &Layout),
    (b, lb): (&GpuBuffer, &Layout),
    dy: &GpuBuffer,
    dtype: DType,
    op: BinaryOp,
    need: [bool; 2],
) -> Result<[Option<GpuBuffer>; 2]> {
    let gpu = a.gpu();
    let (n, size) = (la.numel(), dtype.size_in_bytes());
    let outs = need.map(|w| w.then(|| gpu.alloc(n * size)).transpose());
    let [da, db] = outs;
    let (da, db) = (da?, db?);
    if n == 0 {
        return Ok([da, db]);
    }
    let (shape, [sa, sb]) = coalesce(la.shape(), [la.strides(), lb.strides()]);
    let mut args = KernelArgs::new();
    args.ptr(a, la.offset() * size)
        .push(StridedDesc::from_parts(&shape, &sa))
        .ptr(b, lb.offset() * size)
        .push(StridedDesc::from_parts(&shape, &sb))
        .ptr(dy, 0);
    for out in [&da, &db] {
        match out {
            Some(buf) => args.ptr(buf, 0),
            None => args.push(0u64), // a null pointer: the kernel skips that gradient
        };
    }
    args.push(n as i64);
    let cfg = LaunchConfig::linear(n, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch(&format!("{}_backward_{dtype}", op.name()), cfg, &mut args)?;
    Ok([da, db])
}

/// `select_backward_<dtype>`: the dense `[outer, n, inner]` gradient of picking element `idx` (i64,
/// dense over `[outer, inner]`) of each slice, from the dense gradient `g` of the picks.
pub fn select_backward(
    idx: &GpuBuffer,
    g: &GpuBuffer,
    (outer, n, inner): (usize, usize, usize),
    dtype: DType,
) -> Result<GpuBuffer> {
    let gpu = g.gpu();
    let total = outer * n * inner;
    let out = gpu.alloc(total * dtype.size_in_bytes())?;
    if total == 0 {
        return Ok(out);
    }
    let mut args = KernelArgs::new();
    args.ptr(idx, 0)
        .ptr(g, 0)
        .ptr(&out, 0)
        .push(n as i64)
        .push(inner as i64)
        .push(total as i64);
    let cfg = LaunchConfig::linear(total, LINEAR_THREADS, LINEAR_MAX_BLOCKS);
    gpu.launch(&format!("select_backward_{dtype}"), cfg, &mut args)?;
    Ok(out)
}
