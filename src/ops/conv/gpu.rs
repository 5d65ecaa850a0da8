//! Launches of kernels/conv.cu (its header comment explains the kernels) around the GEMMs, which
//! go through `Tensor::matmul` on the device and so through its tested families (SIMT f32;
//! mma.sync and, on compute capability 9.0, wgmma for f16/bf16). Each group is one batch entry of
//! a batched product, read in place through strided views of the im2col matrix and the weights.

use super::ConvGeom;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::error::{dtype_err, Result};
use crate::layout::Layout;
use crate::ops::{LINEAR_MAX_BLOCKS, LINEAR_THREADS};
use crate::tensor::{Storage, Tensor};

/// Mirrors `struct ConvShape` in kernels/conv.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ConvShape {
    pub(crate) n: i64,
    pub(crate) h: i64,
    pub(crate) w: i64,
    pub(crate) c: i64,
    pub(crate) o: i64,
    pub(crate) kh: i64,
    pub(crate) kw: i64,
    pub(crate) oh: i64,
    pub(crate) ow: i64,
    pub(crate) sh: i64,
    pub(crate) sw: i64,
    pub(crate) ph: i64,
    pub(crate) pw: i64,
    pub(crate) dh: i64,
    pub(crate) dw: i64,
    pub(crate) groups: i64,
}

impl ConvShape {
    fn new(g: &ConvGeom) -> ConvShape {
        let i = |v: usize| v as i64;
        ConvShape {
            n: i(g.n),
            h: i(g.h),
            w: i(g.w),
            c: i(g.c),
            o: i(g.o),
            kh: i(g.kh),
            kw: i(g.kw),
            oh: i(g.oh),
            ow: i(g.ow),
            sh: i(g.stride[0]),
            sw: i(g.stride[1]),
            ph: i(g.pad[0]),
            pw: i(g.pad[1]),
            dh: i(g.dil[0]),
            dw: i(g.dil[1]),
            groups: i(g.groups),
        }
    }
}

/// A grid-stride launch over `n` elements.
fn linear(n: usize) -> LaunchConfig {
    let blocks = n
        .div_ceil(LINEAR_THREADS as usize)
        .clamp(1, LINEAR_MAX_BLOCKS as usize);
    LaunchConfig {
        grid: (blocks as u32, 1, 1),
        block: (LINEAR_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

/// The buffer of a dense device tensor and the byte offset of its first element.
fn dense(t: &Tensor) -> Result<(Tensor, usize)> {
    let t = t.contiguous()?;
    let offset = t.layout().offset() * t.dtype().size_in_bytes();
    Ok((t, offset))
}

fn buffer(t: &Tensor) -> Result<&GpuBuffer> {
    match t.storage() {
        Storage::Gpu(b) => Ok(b),
        Storage::Cpu(_) => dtype_err!("conv2d: expected a GPU tensor, got one on {}", t.device()),
    }
}

fn wrap(buf: GpuBuffer, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_parts(
        Storage::Gpu(buf),
        Layout::contiguous(shape)?,
        like.dtype(),
        like.device().clone(),
    ))
}

/// The im2col matrix `[M, G * K]` of `x`, or `x` itself as `[M, C]` for a 1x1 stride-1
/// unpadded convolution.
fn im2col(x: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    if g.pointwise() {
        return x.contiguous()?.reshape(&[g.m(), g.c]);
    }
    let (x, x_off) = dense(x)?;
    let src = buffer(&x)?;
    let len = g.m() * g.groups * g.k();
    let col = src.gpu().alloc(len * x.dtype().size_in_bytes())?;
    if len > 0 {
        let mut args = KernelArgs::new();
        args.ptr(src, x_off).ptr(&col, 0).push(ConvShape::new(g));
        src.gpu().launch(
            &format!("conv_im2col_{}", x.dtype()),
            linear(len),
            &mut args,
        )?;
    }
    wrap(col, &[g.m(), g.groups * g.k()], &x)
}

/// `[rows, G * cols]` seen as `[G, rows, cols]` (a view).
fn by_group(t: &Tensor, groups: usize) -> Result<Tensor> {
    let (rows, cols) = (t.shape()[0], t.shape()[1] / groups);
    t.reshape(&[rows, groups, cols])?.transpose(0, 1)
}

/// `relu(conv(x, w) + bias + residual)`.
pub fn conv_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    g: &ConvGeom,
) -> Result<Tensor> {
    let col = im2col(x, g)?;
    // prod [G, M, Og] = col[G, M, K] @ w[G, Og, K]^T
    let wg = w.contiguous()?.reshape(&[g.groups, g.og(), g.k()])?;
    let prod = by_group(&col, g.groups)?.matmul(&wg.transpose(1, 2)?)?;
    let (prod, prod_off) = dense(&prod)?;
    let src = buffer(&prod)?;
    let len = g.m() * g.o;
    let out = src.gpu().alloc(len * x.dtype().size_in_bytes())?;
    if len > 0 {
        let bias = bias.map(dense).transpose()?;
        let residual = residual.map(dense).transpose()?;
        let mut args = KernelArgs::new();
        args.ptr(src, prod_off);
        for t in [&bias, &residual] {
            match t {
                Some((t, off)) => args.ptr(buffer(t)?, *off),
                None => args.push(0u64), // a null pointer: no such operand
            };
        }
        args.ptr(&out, 0)
            .push(g.m() as i64)
            .push(g.o as i64)
            .push(g.groups as i64)
            .push(relu as i32);
        src.gpu().launch(
            &format!("conv_epilogue_{}", x.dtype()),
            linear(len),
            &mut args,
        )?;
    }
    wrap(out, &g.out_shape(), x)
}

/// The input gradient from the output gradient `dy [N, OH, OW, O]`.
pub fn conv_dgrad(dy: &Tensor, w: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    // dcol [G, M, K] = dy[G, M, Og] @ w[G, Og, K]
    let dyg = by_group(&dy.reshape(&[g.m(), g.o])?, g.groups)?;
    let wg = w.contiguous()?.reshape(&[g.groups, g.og(), g.k()])?;
    let (dcol, dcol_off) = dense(&dyg.matmul(&wg)?)?;
    let src = buffer(&dcol)?;
    let len = g.n * g.h * g.w * g.c;
    let dx = src.gpu().alloc(len * dy.dtype().size_in_bytes())?;
    if len > 0 {
        let mut args = KernelArgs::new();
        args.ptr(src, dcol_off).ptr(&dx, 0).push(ConvShape::new(g));
        src.gpu().launch(
            &format!("conv_col2im_{}", dy.dtype()),
            linear(len),
            &mut args,
        )?;
    }
    wrap(dx, &[g.n, g.h, g.w, g.c], dy)
}

/// The weight gradient `[O, KH, KW, Cg]` from the input and the output gradient.
pub fn conv_wgrad(x: &Tensor, dy: &Tensor, g: &ConvGeom) -> Result<Tensor> {
    // dw [G, Og, K] = dy[G, M, Og]^T @ col[G, M, K]
    let dyg = by_group(&dy.reshape(&[g.m(), g.o])?, g.groups)?.transpose(1, 2)?;
    let colg = by_group(&im2col(x, g)?, g.groups)?;
    dyg.matmul(&colg)?.reshape(&[g.o, g.kh, g.kw, g.cg()])
}
