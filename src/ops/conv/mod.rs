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
//! pre-activation was > 0; the elementwise `relu_backward` kernel applied to the output): the bias gets `gm` summed over `M`, the residual `gm`, the weights
//! `wgrad[group] = gm[:, group]^T @ col[:, group]` and the input the col2im of
//! `dcol[:, group] = gm[:, group] @ w[group]` (every input element sums the `dcol` entries of the
//! (output pixel, kh, kw) positions that read it: a gather, with no atomics on the GPU).
//!
//! On the CPU f32 runs through the `gemm` crate (its AVX-512 kernels where the CPU has them);
//! im2col, col2im and the epilogue are multi-threaded; f16/bf16 compute in f32 and round where
//! the GPU does (the GEMM's result, then the output). Depthwise and other many-group convolutions
//! run a small GEMM per group there, correct but slow (no model in the engine needs them fast
//! yet). On GPUs (kernels/conv.cu) the im2col, epilogue and col2im
//! kernels surround batched GEMMs (a batch entry per group) through `Tensor::matmul`, so f16/bf16
//! run on the tensor-core families (mma.sync, wgmma); the GEMM rounds to the dtype before the
//! epilogue adds in f32. A true implicit-GEMM tensor-core kernel, which would not write the im2col
//! matrix to memory and would apply the epilogue in registers, is a follow-up; so is splitting a
//! large batch into chunks on GPUs (the CPU bounds its im2col matrix that way).
//!
//! Inside an `autocast` scope the convolution runs in the autocast dtype, as matmul does.

mod cpu;
pub(crate) mod gpu;
mod transpose;

pub use transpose::ConvTranspose2dOptions;

use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Result};
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
                        .then(|| {
                            // (a sum inside autocast would come back in f32)
                            gm.reshape(&[geom.m(), geom.o])?
                                .sum(0, false)?
                                .to_dtype(gm.dtype())
                        })
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

/// `t` as a dense f32 CPU tensor: itself when it already is one (no copy), else converted.
fn dense_f32(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

/// The elements of a dense f32 CPU tensor.
fn f32_data(t: &Tensor) -> Result<&[f32]> {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(&v[t.layout().offset()..][..t.numel()]),
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
        return gpu::conv_forward(x, w, bias, residual, relu, geom);
    }
    let (xt, wt) = (dense_f32(x)?, dense_f32(w)?);
    let bt = bias.map(dense_f32).transpose()?;
    let rt = residual.map(dense_f32).transpose()?;
    let out = cpu::conv_forward(
        f32_data(&xt)?,
        f32_data(&wt)?,
        bt.as_ref().map(f32_data).transpose()?,
        rt.as_ref().map(f32_data).transpose()?,
        relu,
        geom,
        x.dtype(),
    );
    cpu_result(out, &geom.out_shape(), x.dtype())
}

/// The input's gradient from the (masked) output gradient `g`.
fn conv_dgrad(g: &Tensor, w: &Tensor, geom: &ConvGeom) -> Result<Tensor> {
    if !g.device().is_cpu() {
        return gpu::conv_dgrad(g, w, geom);
    }
    let dx = cpu::conv_dgrad(
        f32_data(&dense_f32(g)?)?,
        f32_data(&dense_f32(w)?)?,
        geom,
        g.dtype(),
    );
    cpu_result(dx, &[geom.n, geom.h, geom.w, geom.c], g.dtype())
}

/// The weights' gradient from the input and the (masked) output gradient `g`.
fn conv_wgrad(x: &Tensor, g: &Tensor, geom: &ConvGeom) -> Result<Tensor> {
    if !g.device().is_cpu() {
        return gpu::conv_wgrad(x, g, geom);
    }
    let dw = cpu::conv_wgrad(f32_data(&dense_f32(x)?)?, f32_data(&dense_f32(g)?)?, geom);
    cpu_result(dw, &[geom.o, geom.kh, geom.kw, geom.cg()], g.dtype())
}

/// Conformance cases: odd sizes, stride 2 on odd input, padding, dilation 2, groups 2, depthwise
/// (and with a channel multiplier), batch 1, the 7x7/2 RGB stem, 1x1 (no im2col) and 1x1/2, and
/// GEMM sizes that are no multiple of any tile; the forward with bias, residual and ReLU, dgrad
/// and wgrad each a row. f16/bf16 run on the device's default GEMM family and, where it has
/// wgmma, on mma.sync too.
pub fn conformance(
    device: &crate::device::Device,
    seed: u64,
) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    use crate::device::Device;
    use crate::ops::matmul::{with_tensor_core_path, TensorCorePath};
    let o = |stride: usize, pad: usize, dil: usize, groups: usize| {
        Conv2dOptions::new()
            .stride(stride)
            .padding(pad)
            .dilation(dil)
            .groups(groups)
    };
    // (what, x, weight, options, bias, residual, relu)
    type Case = (
        &'static str,
        [usize; 4],
        [usize; 4],
        Conv2dOptions,
        bool,
        bool,
        bool,
    );
    let cases: [Case; 10] = [
        (
            "3x3",
            [2, 7, 9, 3],
            [5, 3, 3, 3],
            o(1, 1, 1, 1),
            true,
            false,
            false,
        ),
        (
            "3x3/2 odd",
            [1, 9, 7, 4],
            [6, 3, 3, 4],
            o(2, 1, 1, 1),
            true,
            true,
            true,
        ),
        (
            "dilation 2",
            [1, 8, 9, 4],
            [6, 3, 3, 4],
            o(1, 2, 2, 1),
            false,
            false,
            true,
        ),
        (
            "groups 2",
            [1, 7, 6, 4],
            [6, 3, 3, 2],
            o(1, 1, 1, 2),
            true,
            false,
            true,
        ),
        (
            "depthwise",
            [2, 6, 5, 5],
            [5, 3, 3, 1],
            o(1, 1, 1, 5),
            true,
            false,
            false,
        ),
        (
            "depthwise x2 /2",
            [1, 7, 7, 3],
            [6, 3, 3, 1],
            o(2, 1, 1, 3),
            false,
            true,
            false,
        ),
        (
            "7x7/2 stem",
            [1, 15, 13, 3],
            [8, 7, 7, 3],
            o(2, 3, 1, 1),
            true,
            false,
            true,
        ),
        (
            "1x1",
            [2, 5, 7, 6],
            [9, 1, 1, 6],
            o(1, 0, 1, 1),
            true,
            true,
            true,
        ),
        (
            "1x1/2",
            [1, 7, 7, 6],
            [8, 1, 1, 6],
            o(2, 0, 1, 1),
            false,
            false,
            false,
        ),
        (
            "tails",
            [1, 11, 13, 19],
            [35, 3, 3, 19],
            o(1, 1, 1, 1),
            true,
            true,
            true,
        ),
    ];
    let has_wgmma = device
        .gpu()
        .is_some_and(|g| crate::ops::matmul::tensor_core_paths(g, DType::BF16).len() > 1);
    let mut rows = Vec::new();
    for (di, &dtype) in DType::FLOATS.iter().enumerate() {
        let mut families = vec![(None, "")];
        if dtype != DType::F32 && has_wgmma {
            families.push((Some(TensorCorePath::MmaSync), " mma.sync"));
        }
        for (ci, &(what, xs, ws, opts, has_bias, has_res, relu)) in cases.iter().enumerate() {
            let geom = ConvGeom::new(&xs, &ws, &opts)?;
            let s = seed.wrapping_add(100 * (di * 16 + ci) as u64);
            let rand = |shape: &[usize], k: u64| {
                Tensor::rand_uniform(shape, -1.0, 1.0, s + k, dtype, &Device::Cpu)
            };
            let (x, w, b) = (rand(&xs, 0)?, rand(&ws, 1)?, rand(&[ws[0]], 2)?);
            let r = rand(&geom.out_shape(), 3)?;
            let dy = rand(&geom.out_shape(), 4)?;
            let bias = has_bias.then_some(&b);
            let res = has_res.then_some(&r);
            let dev = |t: &Tensor| t.to_device(device);
            let shape = [xs.as_slice(), ws.as_slice()].concat();
            let (fwd, dgrad, wgrad) = if geom.pointwise() {
                (
                    format!("conv_epilogue_{dtype}"),
                    format!("conv_col2im_{dtype}"),
                    format!("gemm (conv wgrad {dtype})"),
                )
            } else {
                (
                    format!("conv_im2col_{dtype}+conv_epilogue_{dtype}"),
                    format!("conv_col2im_{dtype}"),
                    format!("conv_im2col_{dtype}"),
                )
            };
            for &(path, family) in &families {
                let on_family = |f: &dyn Fn() -> Result<Tensor>| match path {
                    Some(p) => with_tensor_core_path(p, f),
                    None => f(),
                };
                let label = |kernel: &str, part: &str| {
                    format!(
                        "{kernel} ({what}{}{part}{family})",
                        if part.is_empty() { "" } else { ", " }
                    )
                };
                let got = on_family(&|| {
                    let (bd, rd) = (bias.map(dev).transpose()?, res.map(dev).transpose()?);
                    conv_forward(&dev(&x)?, &dev(&w)?, bd.as_ref(), rd.as_ref(), relu, &geom)
                });
                let want = conv_forward(&x, &w, bias, res, relu, &geom);
                let epi = [(has_bias, "bias"), (has_res, "residual"), (relu, "relu")]
                    .iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, n)| *n)
                    .collect::<Vec<_>>()
                    .join("+");
                rows.push(compare(
                    &label(&fwd, &epi),
                    dtype,
                    &shape,
                    got,
                    want,
                    dtype.tolerance(),
                ));
                let got = on_family(&|| conv_dgrad(&dev(&dy)?, &dev(&w)?, &geom));
                let want = conv_dgrad(&dy, &w, &geom);
                rows.push(compare(
                    &label(&dgrad, "dgrad"),
                    dtype,
                    &shape,
                    got,
                    want,
                    dtype.tolerance(),
                ));
                let got = on_family(&|| conv_wgrad(&dev(&x)?, &dev(&dy)?, &geom));
                let want = conv_wgrad(&x, &dy, &geom);
                rows.push(compare(
                    &label(&wgrad, "wgrad"),
                    dtype,
                    &shape,
                    got,
                    want,
                    dtype.tolerance(),
                ));
            }
        }
    }
    Ok(rows)
}
