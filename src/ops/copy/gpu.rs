use crate::device::{Gpu, GpuBuffer, KernelArgs, LaunchConfig};
use crate::dtype::DType;
use crate::error::Result;
use crate::layout::{coalesce, Layout};
use crate::ops::{StridedDesc, LINEAR_MAX_BLOCKS, LINEAR_THREADS};
use std::sync::Arc;

fn linear(n: usize) -> LaunchConfig {
    LaunchConfig::linear(n, LINEAR_THREADS, LINEAR_MAX_BLOCKS)
}

pub fn full(gpu: &Arc<Gpu>, n: usize, value: f64, dtype: DType) -> Result<GpuBuffer> {
    let out = gpu.alloc(n * dtype.size_in_bytes())?;
    if n == 0 {
        return Ok(out);
    }
    let pattern = super::cpu::full(1, value, dtype);
    let bytes = pattern.as_bytes();
    let mut args = KernelArgs::new();
    args.ptr(&out, 0);
    let kernel = match bytes.len() {
        1 => args.push(bytes[0]).push(n as i64) as &mut KernelArgs,
        2 => args
            .push(u16::from_le_bytes([bytes[0], bytes[1]]))
            .push(n as i64),
        4 => args
            .push(u32::from_le_bytes(bytes.try_into().unwrap()))
            .push(n as i64),
        _ => args
            .push(u64::from_le_bytes(bytes.try_into().unwrap()))
            .push(n as i64),
    };
    gpu.launch(&format!("fill_b{}", bytes.len()), linear(n), kernel)?;
    Ok(out)
}

/// A dense copy of the elements of `buf` seen through `layout`.
pub fn gather(buf: &GpuBuffer, layout: &Layout, dtype: DType) -> Result<GpuBuffer> {
    let out = buf.gpu().alloc(layout.numel() * dtype.size_in_bytes())?;
    copy_view(
        buf,
        layout,
        &out,
        &Layout::contiguous(layout.shape())?,
        dtype,
    )?;
    Ok(out)
}

/// Writes the elements of `src` seen through `src_layout` to `dst` seen through `dst_layout`.
pub fn copy_view(
    src: &GpuBuffer,
    src_layout: &Layout,
    dst: &GpuBuffer,
    dst_layout: &Layout,
    dtype: DType,
) -> Result<()> {
    let n = src_layout.numel();
    if n == 0 {
        return Ok(());
    }
    let size = dtype.size_in_bytes();
    let (shape, [s, d]) = coalesce(
        src_layout.shape(),
        [src_layout.strides(), dst_layout.strides()],
    );
    let mut args = KernelArgs::new();
    args.ptr(src, src_layout.offset() * size)
        .push(StridedDesc::from_parts(&shape, &s))
        .ptr(dst, dst_layout.offset() * size)
        .push(StridedDesc::from_parts(&shape, &d))
        .push(n as i64);
    src.gpu()
        .launch(&format!("copy_strided_b{size}"), linear(n), &mut args)
}

pub fn cast(buf: &GpuBuffer, n: usize, from: DType, to: DType) -> Result<GpuBuffer> {
    let gpu = buf.gpu();
    let out = gpu.alloc(n * to.size_in_bytes())?;
    if n == 0 {
        return Ok(out);
    }
    let mut args = KernelArgs::new();
    args.ptr(buf, 0).ptr(&out, 0).push(n as i64);
    gpu.launch(&format!("cast_{from}_{to}"), linear(n), &mut args)?;
    Ok(out)
}
