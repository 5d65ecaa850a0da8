//! Transposed 2-D convolution (`F.conv_transpose2d`), channels-last, built from the convolution's
//! own parts: a transposed convolution is the input gradient of the convolution that maps its
//! output back to its input, so its forward is that convolution's dgrad (GEMM + col2im), its input
//! gradient that convolution's forward (im2col + GEMM), and its weight gradient that convolution's
//! wgrad with the two activations' roles swapped. No kernel of its own.
//!
//! Weights are `[Cin, KH, KW, Cout]`: PyTorch's `[Cin, Cout, KH, KW]` with the output channels moved
//! last, once at load (the same permutation as OIHW -> OHWI, so `Slot::ConvWeight` converts it).
//! Read as a convolution weight `[O, KH, KW, I]` it is exactly the OHWI weight of the adjoint
//! convolution (O = Cin, I = Cout), so every pass uses it in place, with no per-call transpose.
//!
//! Sizes: `OH = (H - 1) * stride - 2 * padding + KH + output_padding`; the adjoint convolution of an
//! `[N, OH, OW, Cout]` input with that weight, stride and padding has exactly `H x W` outputs because
//! `output_padding < stride` (PyTorch's rule, checked here). The bias is added by the broadcasting
//! `add` op, which also gives its gradient.

use super::{conv_dgrad, conv_forward, conv_wgrad, Conv2dOptions, ConvGeom};
use crate::error::{shape_err, Result};
use crate::tape;
use crate::tensor::Tensor;

/// Stride, zero padding and output padding of a transposed convolution (each the same along
/// height and width when set with the builder, or per axis `[h, w]` through the fields).
/// Groups and dilation are 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTranspose2dOptions {
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub output_padding: [usize; 2],
}

impl Default for ConvTranspose2dOptions {
    fn default() -> Self {
        Self::new()
    }
}

impl ConvTranspose2dOptions {
    /// Stride 1, no padding, no output padding.
    pub fn new() -> Self {
        ConvTranspose2dOptions {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [0, 0],
        }
    }

    pub fn stride(self, s: usize) -> Self {
        ConvTranspose2dOptions {
            stride: [s, s],
            ..self
        }
    }

    pub fn padding(self, p: usize) -> Self {
        ConvTranspose2dOptions {
            padding: [p, p],
            ..self
        }
    }

    pub fn output_padding(self, p: usize) -> Self {
        ConvTranspose2dOptions {
            output_padding: [p, p],
            ..self
        }
    }
}

/// The geometry of the adjoint convolution (its input is the transposed convolution's output),
/// or a shape error naming both shapes and the options.
fn adjoint_geometry(
    x: &[usize],
    weight: &[usize],
    opts: &ConvTranspose2dOptions,
) -> Result<ConvGeom> {
    let what = || {
        format!("conv_transpose2d of x {x:?} (NHWC) with weight {weight:?} ([Cin, KH, KW, Cout]), {opts:?}")
    };
    if x.len() != 4 || weight.len() != 4 {
        return shape_err!("{}: x and weight must both have rank 4", what());
    }
    if opts.stride.contains(&0) {
        return shape_err!("{}: the stride must be >= 1", what());
    }
    let (n, h, w, cin) = (x[0], x[1], x[2], x[3]);
    let (wcin, kh, kw, cout) = (weight[0], weight[1], weight[2], weight[3]);
    if wcin != cin {
        return shape_err!(
            "{}: the weight takes {wcin} input channels, x has {cin}",
            what()
        );
    }
    if kh == 0 || kw == 0 {
        return shape_err!("{}: empty kernel", what());
    }
    let mut out = [0usize; 2];
    for (axis, (&size, k)) in [h, w].iter().zip([kh, kw]).enumerate() {
        let (s, p, op) = (
            opts.stride[axis],
            opts.padding[axis],
            opts.output_padding[axis],
        );
        if op >= s {
            return shape_err!(
                "{}: output_padding {op} must be smaller than the stride {s} along {}",
                what(),
                ["H", "W"][axis]
            );
        }
        let full = size.saturating_sub(1) * s + k + op;
        if size == 0 || full <= 2 * p {
            return shape_err!(
                "{}: the output would be empty along {} ((H - 1) * stride - 2 * padding + kernel + \
                 output_padding = {} - {})",
                what(),
                ["H", "W"][axis],
                full,
                2 * p
            );
        }
        out[axis] = full - 2 * p;
    }
    let adjoint = Conv2dOptions {
        stride: opts.stride,
        padding: opts.padding,
        dilation: [1, 1],
        groups: 1,
    };
    let geom = ConvGeom::new(&[n, out[0], out[1], cout], weight, &adjoint)?;
    debug_assert_eq!((geom.oh, geom.ow), (h, w));
    Ok(geom)
}

impl Tensor {
    /// torch.nn.functional.conv_transpose2d on channels-last `x [N, H, W, Cin]` with `weight
    /// [Cin, KH, KW, Cout]` (PyTorch's `[Cin, Cout, KH, KW]` with Cout moved last, once at load: read
    /// as `[O, KH, KW, I]` it is the OHWI weight of the convolution whose input gradient this is,
    /// so the convolution's GEMMs use it in place) and an optional bias `[Cout]`: `[N, (H - 1) *
    /// stride - 2 * padding + KH + output_padding, (likewise for W), Cout]`. Autograd for x, weight
    /// and bias; inside an `autocast` scope it runs in the autocast dtype, as conv2d does.
    pub fn conv_transpose2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        opts: ConvTranspose2dOptions,
    ) -> Result<Tensor> {
        let low = tape::autocast_dtype().filter(|&low| {
            [Some(self), Some(weight), bias]
                .into_iter()
                .flatten()
                .any(|t| t.dtype().is_float() && t.dtype() != low)
        });
        let (x, weight, bias) = match low {
            Some(low) => (
                self.to_dtype(low)?,
                weight.to_dtype(low)?,
                bias.map(|b| b.to_dtype(low)).transpose()?,
            ),
            None => (self.clone(), weight.clone(), bias.cloned()),
        };
        let geom = check_operands(&x, &weight, bias.as_ref(), &opts)?;
        // the convolution's passes read x as a dense [N * H * W, Cin] matrix
        let x = x.contiguous()?;
        let out = tape::no_grad(|| conv_dgrad(&x, &weight, &geom))?;
        let (xs, ws) = (x.clone(), weight.clone());
        let out = tape::record(out, &[&x, &weight], move |g, needs| {
            let g = g.to_dtype(xs.dtype())?.contiguous()?;
            Ok(vec![
                needs[0]
                    .then(|| conv_forward(&g, &ws, None, None, false, &geom))
                    .transpose()?,
                needs[1].then(|| conv_wgrad(&g, &xs, &geom)).transpose()?,
            ])
        });
        match bias {
            Some(b) => out.add(&b),
            None => Ok(out),
        }
    }
}

/// The adjoint geometry after checking every operand's shape, dtype and device.
fn check_operands(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &ConvTranspose2dOptions,
) -> Result<ConvGeom> {
    let geom = adjoint_geometry(x.shape(), weight.shape(), opts)?;
    let dtype = x.dtype();
    dtype.require_float("conv_transpose2d")?;
    for (name, t) in [("weight", Some(weight)), ("bias", bias)] {
        if let Some(t) = t {
            if t.dtype() != dtype {
                return crate::error::dtype_err!(
                    "conv_transpose2d: x is {dtype} but the {name} {:?} is {}",
                    t.shape(),
                    t.dtype()
                );
            }
            x.same_device(t, "conv_transpose2d")?;
        }
    }
    if let Some(b) = bias {
        if b.shape() != [geom.c] {
            return shape_err!(
                "conv_transpose2d: bias {:?} for weight {:?}: expected [{}]",
                b.shape(),
                weight.shape(),
                geom.c
            );
        }
    }
    Ok(geom)
}
