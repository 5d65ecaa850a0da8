//! 2-D convolution, channels-last: `x [N, H, W, C]` with weights `[O, KH, KW, C/groups]` ("OHWI")
//! and an optional bias `[O]` gives `[N, OH, OW, O]`, with PyTorch's `F.conv2d` semantics (zero
//! padding, stride, dilation, groups; `OH = (H + 2 pad - dil (KH - 1) - 1) / stride + 1`).
//! `conv2d_fused` adds a residual of the output's shape and a ReLU in the same pass over the
//! output, as a ResNet block ends.
//!
//! The convolution is a GEMM per group over an im2col matrix `col [M, groups * K]` with
//! `M = N * OH * OW` rows (one per output pixel) and `K = KH * KW * C/groups` columns per group, in
//! `(kh, kw, c)` order so that a row reads runs of `C/groups` contiguous input channels:
//! `out[:, group] = col[:, group] @ w[group]^T`. A 1x1 convolution with stride 1 and no padding
//! needs no im2col at all: channels-last, the input itself is `col`.
//!
//! Backward, with `gm` the output gradient through the ReLU mask (`out > 0`, which is where the
//! pre-activation was > 0): the bias gets `gm` summed over `M`, the residual `gm`, the weights
//! `wgrad[group] = gm[:, group]^T @ col[:, group]` and the input the col2im of
//! `dcol[:, group] = gm[:, group] @ w[group]` (every input element sums the `dcol` entries of the
//! (output pixel, kh, kw) positions that read it: a gather, with no atomics on the GPU).
//!
//! On the CPU f32 runs through the `gemm` crate (f16/bf16 in f32, rounded once); im2col, col2im
//! and the epilogue are multi-threaded. GPUs are not supported yet.
//!
//! Inside an `autocast` scope the convolution runs in the autocast dtype, as matmul does.

mod cpu;

use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::Layout;
use crate::ops::elementwise::UnaryOp;
use crate::tape;
use crate::tensor::{CpuStorage, Storage, Tensor};

/// Stride, zero padding, dilation (each the same along height and width when set with the
/// builder, or per axis `[h, w]` through the fields) and groups of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dOptions {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub dilation: [usize; 2],
    pub groups: usize,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl Conv2dOptions {
    /// Stride 1, no padding, dilation 1, one group.
    pub fn new() -> Self {
        Conv2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }

    pub fn stride(self, s: usize) -> Self {
        Conv2dOptions {
            stride: [s, s],
            ..self
        }
    }

    pub fn padding(self, p: usize) -> Self {
        Conv2dOptions {
            padding: [p, p],
            ..self
        }
    }

    pub fn dilation(self, d: usize) -> Self {
        Conv2dOptions {
            dilation: [d, d],
            ..self
        }
    }

    pub fn groups(self, g: usize) -> Self {
        Conv2dOptions { groups: g, ..self }
    }
}

/// Every size of one convolution, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub oh: usize,
    pub ow: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    pub dil: [usize; 2],
    pub groups: usize,
}

impl ConvGeom {
    /// The geometry of `x * weight`, or a shape error naming both shapes and the options.
    fn new(x: &[usize], weight: &[usize], opts: &Conv2dOptions) -> Result<ConvGeom> {
        let what = || format!("conv2d of x {x:?} (NHWC) with weight {weight:?} (OHWI), {opts:?}");
        if x.len() != 4 || weight.len() != 4 {
            return shape_err!("{}: x and weight must both have rank 4", what());
        }
        if opts.groups == 0 || opts.stride.contains(&0) || opts.dilation.contains(&0) {
            return shape_err!("{}: groups, stride and dilation must be >= 1", what());
        }
        let (n, h, w, c) = (x[0], x[1], x[2], x[3]);
        let (o, kh, kw, cg) = (weight[0], weight[1], weight[2], weight[3]);
        let groups = opts.groups;
        if c % groups != 0 || o % groups != 0 {
            return shape_err!(
                "{}: groups {groups} must divide the input channels {c} and the output channels {o}",
                what()
            );
        }
        if cg != c / groups {
            return shape_err!(
                "{}: the weight takes {cg} input channels per group, x has {c} / {groups} groups = {}",
                what(),
                c / groups
            );
        }
        if kh == 0 || kw == 0 {
            return shape_err!("{}: empty kernel", what());
        }
        let out_size = |size: usize, k: usize, axis: usize| -> Result<usize> {
            let padded = size + 2 * opts.padding[axis];
            let span = opts.dilation[axis] * (k - 1) + 1;
            if span > padded {
                return shape_err!(
                    "{}: the (dilated) kernel spans {span} but the padded input is only {padded} along {}",
                    what(),
                    ["H", "W"][axis]
                );
            }
            Ok((padded - span) / opts.stride[axis] + 1)
        };
        Ok(ConvGeom {
            n,
            h,
            w,
            c,
            o,
            kh,
            kw,
            oh: out_size(h, kh, 0)?,
            ow: out_size(w, kw, 1)?,
            stride: opts.stride,
            pad: opts.padding,
            dil: opts.dilation,
            groups,
        })
    }

    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.groups
    }

    /// Columns of im2col per group (the GEMM's K).
    pub fn k(&self) -> usize {
        self.kh * self.kw * self.cg()
    }

    /// Output pixels over the batch (the GEMM's M).
    pub fn m(&self) -> usize {
        self.n * self.oh * self.ow
    }

    /// True when the input itself is the im2col matrix: 1x1, stride 1, no padding.
    pub fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.o]
    }
}

impl Tensor {
    /// x [N,H,W,C] * w [O,KH,KW,C/groups] (+ bias [O]) -> [N,OH,OW,O]; autograd for x, w, bias.
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        opts: Conv2dOptions,
    ) -> Result<Tensor> {
        self.conv2d_fused(weight, bias, None, false, opts)
    }

    /// relu(conv2d(x) + bias + residual), one pass over the output where the device can; the same
    /// numbers as the unfused ops; autograd too. residual has the output's shape.
    pub fn conv2d_fused(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        relu: bool,
        opts: Conv2dOptions,
    ) -> Result<Tensor> {
        match tape::autocast_dtype() {
            Some(low)
                if [Some(self), Some(weight), bias, residual]
                    .into_iter()
                    .flatten()
                    .any(|t| t.dtype().is_float() && t.dtype() != low) =>
            {
                let cast = |t: Option<&Tensor>| t.map(|t| t.to_dtype(low)).transpose();
                self.to_dtype(low)?.conv2d_recorded(
                    &weight.to_dtype(low)?,
                    cast(bias)?.as_ref(),
                    cast(residual)?.as_ref(),
                    relu,
                    opts,
                )
            }
            _ => self.conv2d_recorded(weight, bias, residual, relu, opts),
        }
    }

    /// The fused convolution with its backward on the tape.
    fn conv2d_recorded(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        residual: Option<&Tensor>,
        relu: bool,
        opts: Conv2dOptions,
    ) -> Result<Tensor> {
        let geom = check_operands(self, weight, bias, residual, &opts)?;
        let out = tape::no_grad(|| conv_forward(self, weight, bias, residual, relu, &geom))?;
        let inputs: Vec<&Tensor> = [Some(self), Some(weight), bias, residual]
            .into_iter()
            .flatten()
            .collect();
        let (x, w) = (self.clone(), weight.clone());
        let (has_bias, has_residual) = (bias.is_some(), residual.is_some());
        let y = relu.then(|| out.clone());
        Ok(tape::record(out, &inputs, move |g, needs| {
            let g = g.to_dtype(x.dtype())?;
            let gm = match &y {
                Some(y) => Tensor::unary_backward(y, &g, UnaryOp::Relu)?,
                None => g.contiguous()?,
            };
            let mut grads = vec![
                needs[0].then(|| conv_dgrad(&gm, &w, &geom)).transpose()?,
                needs[1].then(|| conv_wgrad(&x, &gm, &geom)).transpose()?,
            ];
            let mut next = 2;
            if has_bias {
                grads.push(
                    needs[next]
                        .then(|| gm.reshape(&[geom.m(), geom.o])?.sum(0, false))
                        .transpose()?,
                );
                next += 1;
            }
            if has_residual {
                grads.push(needs[next].then_some(gm));
            }
            Ok(grads)
        }))
    }
}

/// The geometry after checking every operand's shape, dtype and device.
fn check_operands(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    opts: &Conv2dOptions,
) -> Result<ConvGeom> {
    let geom = ConvGeom::new(x.shape(), weight.shape(), opts)?;
    let dtype = x.dtype();
    dtype.require_float("conv2d")?;
    for (name, t) in [
        ("weight", Some(weight)),
        ("bias", bias),
        ("residual", residual),
    ] {
        if let Some(t) = t {
            if t.dtype() != dtype {
                return dtype_err!(
                    "conv2d: x is {dtype} but the {name} {:?} is {}",
                    t.shape(),
                    t.dtype()
                );
            }
            x.same_device(t, "conv2d")?;
        }
    }
    if let Some(b) = bias {
        if b.shape() != [geom.o] {
            return shape_err!(
                "conv2d: bias {:?} for weight {:?}: expected [{}]",
                b.shape(),
                weight.shape(),
                geom.o
            );
        }
    }
    if let Some(r) = residual {
        if r.shape() != geom.out_shape() {
            return shape_err!(
                "conv2d: residual {:?} for an output {:?} (x {:?}, weight {:?})",
                r.shape(),
                geom.out_shape(),
                x.shape(),
                weight.shape()
            );
        }
    }
    Ok(geom)
}

/// Contiguous f32 CPU data of `t` (converted from f16/bf16).
fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v[t.layout().offset()..][..t.numel()].to_vec()),
        _ => dtype_err!(
            "conv2d: expected f32 CPU data, got {} on {}",
            t.dtype(),
            t.device()
        ),
    }
}

/// An f32 CPU result as a tensor of `dtype` (rounded once).
fn cpu_result(v: Vec<f32>, shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_parts(
        Storage::Cpu(CpuStorage::F32(v)),
        Layout::contiguous(shape)?,
        DType::F32,
        crate::device::Device::Cpu,
    )
    .to_dtype(dtype)
}

fn gpu_not_yet(op: &str) -> Error {
    Error::Device(format!(
        "{op} is not implemented on GPUs yet (only on the cpu)"
    ))
}

/// The forward, recording nothing.
fn conv_forward(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    relu: bool,
    geom: &ConvGeom,
) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return Err(gpu_not_yet("conv2d"));
    }
    let (xv, wv) = (cpu_f32(x)?, cpu_f32(w)?);
    let bv = bias.map(cpu_f32).transpose()?;
    let rv = residual.map(cpu_f32).transpose()?;
    let out = cpu::conv_forward(&xv, &wv, bv.as_deref(), rv.as_deref(), relu, geom);
    cpu_result(out, &geom.out_shape(), x.dtype())
}

/// The input's gradient from the (masked) output gradient `g`.
fn conv_dgrad(g: &Tensor, w: &Tensor, geom: &ConvGeom) -> Result<Tensor> {
    if !g.device().is_cpu() {
        return Err(gpu_not_yet("conv2d backward"));
    }
    let dx = cpu::conv_dgrad(&cpu_f32(g)?, &cpu_f32(w)?, geom);
    cpu_result(dx, &[geom.n, geom.h, geom.w, geom.c], g.dtype())
}

/// The weights' gradient from the input and the (masked) output gradient `g`.
fn conv_wgrad(x: &Tensor, g: &Tensor, geom: &ConvGeom) -> Result<Tensor> {
    if !g.device().is_cpu() {
        return Err(gpu_not_yet("conv2d backward"));
    }
    let dw = cpu::conv_wgrad(&cpu_f32(x)?, &cpu_f32(g)?, geom);
    cpu_result(dw, &[geom.o, geom.kh, geom.kw, geom.cg()], g.dtype())
}
