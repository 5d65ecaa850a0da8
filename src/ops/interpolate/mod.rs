//! Bicubic interpolation of channels-last images, as
//! `F.interpolate(x, mode="bicubic", align_corners=False, antialias=...)` on the NCHW view of the
//! same tensor: `[N, H, W, C] -> [N, OH, OW, C]`. DINOv2 resizes its position embeddings with it.
//!
//! The output size and the source coordinates follow PyTorch exactly:
//! - `ResizeTo::ScaleFactor([sh, sw])`: `OH = floor(H * sh)`, and output row d samples source row
//!   `(d + 0.5) / sh - 0.5` with the GIVEN factor, not H / OH (DINOv2's `interpolate_offset` 0.1
//!   path relies on this: (16 + 0.1) / 37 gives 16 rows that differ from a plain resize to 16);
//! - `ResizeTo::Size([oh, ow])`: the factor is OH / H.
//!
//! Without antialias: Keys' cubic convolution with a = -0.75 over the four neighbours, indices
//! clamped to the border (aten's upsample_bicubic2d). With antialias: aten's
//! `_upsample_bicubic2d_aa` (Pillow's resampling): the cubic with a = -0.5, widened by the factor
//! when downsampling, over a window cut to the input and normalised; an axis whose size does not
//! change is copied, as PyTorch skips it. On GPUs the source coordinates are f64 and the weights
//! and sums f32 (the CPU computes in f64) for every float dtype; the output has the input's dtype.
//! PyTorch's own f32 path rounds the step to f32, which moves DINOv2's 37 -> 16 outputs by up to
//! ~1e-5 from the exact values (float64); ours stay within ~3e-6 of them.
//!
//! Backward: each input element gathers the output gradients that read it, times the weights they
//! read it with (the transposed taps, tabulated on the host in f64; `interpolate_bicubic_backward_*`
//! on GPUs with the weights rounded to f32), as PyTorch's backward scatters them.

mod cpu;
pub(crate) mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::layout::Layout;
use crate::tape;
use crate::tensor::{Storage, Tensor};

/// The output size of an interpolation: explicit, or scale factors per axis (height, width).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ResizeTo {
    Size([usize; 2]),
    ScaleFactor([f64; 2]),
}

/// Every size of one interpolation, checked, and the source step per output along each axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct InterpGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub step_h: f64,
    pub step_w: f64,
    pub antialias: bool,
}

impl InterpGeom {
    fn new(x: &[usize], to: ResizeTo, antialias: bool) -> Result<InterpGeom> {
        let what = || format!("interpolate_bicubic of {x:?} (NHWC) to {to:?}");
        let &[n, h, w, c] = x else {
            return shape_err!("{}: the input must have rank 4", what());
        };
        if h == 0 || w == 0 {
            return shape_err!("{}: the input has no pixels", what());
        }
        let (oh, ow, step_h, step_w) = match to {
            ResizeTo::Size([oh, ow]) => (oh, ow, h as f64 / oh as f64, w as f64 / ow as f64),
            ResizeTo::ScaleFactor([sh, sw]) => {
                if !(sh.is_finite() && sw.is_finite() && sh > 0.0 && sw > 0.0) {
                    return Err(Error::Argument(format!(
                        "{}: scale factors must be finite and > 0",
                        what()
                    )));
                }
                let size = |len: usize, s: f64| (len as f64 * s).floor();
                let (oh, ow) = (size(h, sh), size(w, sw));
                if oh > u32::MAX as f64 || ow > u32::MAX as f64 {
                    return shape_err!("{}: the output would be {oh} x {ow}", what());
                }
                (oh as usize, ow as usize, 1.0 / sh, 1.0 / sw)
            }
        };
        if oh == 0 || ow == 0 {
            return shape_err!("{}: the output would be {oh} x {ow}", what());
        }
        // PyTorch's antialiased path leaves an axis whose size does not change alone
        let keep = |len: usize, out: usize, step: f64| {
            if antialias && len == out {
                1.0
            } else {
                step
            }
        };
        Ok(InterpGeom {
            n,
            h,
            w,
            c,
            oh,
            ow,
            step_h: keep(h, oh, step_h),
            step_w: keep(w, ow, step_w),
            antialias,
        })
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.c]
    }
}

impl Tensor {
    /// torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias) of a
    /// channels-last `[N, H, W, C]` tensor; autograd.
    pub fn interpolate_bicubic(&self, to: ResizeTo, antialias: bool) -> Result<Tensor> {
        let geom = InterpGeom::new(self.shape(), to, antialias)?;
        self.dtype().require_float("interpolate_bicubic")?;
        let out = tape::no_grad(|| bicubic_forward(self, &geom))?;
        let dtype = self.dtype();
        Ok(tape::record(out, &[self], move |g, _| {
            Ok(vec![Some(bicubic_backward(&g.to_dtype(dtype)?, &geom)?)])
        }))
    }
}

fn bicubic_forward(x: &Tensor, geom: &InterpGeom) -> Result<Tensor> {
    let shape = geom.out_shape();
    if shape.iter().product::<usize>() == 0 {
        return Tensor::zeros(&shape, x.dtype(), x.device());
    }
    let x = x.contiguous()?;
    crate::ops::copy::check_extent(&x)?;
    let y = match x.storage() {
        Storage::Cpu(s) => Storage::Cpu(cpu::bicubic(s, x.layout().offset(), geom)?),
        Storage::Gpu(b) => Storage::Gpu(gpu::bicubic(b, x.dtype(), geom)?),
    };
    Ok(Tensor::from_parts(
        y,
        Layout::contiguous(&shape)?,
        x.dtype(),
        x.device().clone(),
    ))
}

/// The input's gradient from the output's gradient `g`.
fn bicubic_backward(g: &Tensor, geom: &InterpGeom) -> Result<Tensor> {
    if g.shape() != geom.out_shape() {
        return shape_err!(
            "interpolate_bicubic backward: gradient {:?} for an output {:?}",
            g.shape(),
            geom.out_shape()
        );
    }
    let shape = [geom.n, geom.h, geom.w, geom.c];
    if shape.iter().product::<usize>() == 0 {
        return Tensor::zeros(&shape, g.dtype(), g.device());
    }
    let g = g.contiguous()?;
    crate::ops::copy::check_extent(&g)?;
    let dx = match g.storage() {
        Storage::Cpu(s) => Storage::Cpu(cpu::bicubic_backward(s, g.layout().offset(), geom)?),
        Storage::Gpu(b) => Storage::Gpu(gpu::bicubic_backward(b, g.dtype(), geom)?),
    };
    Ok(Tensor::from_parts(
        dx,
        Layout::contiguous(&shape)?,
        g.dtype(),
        g.device().clone(),
    ))
}

/// Conformance cases: DINOv2's position-embedding resizes (37 x 37 by (16 + 0.1) / 37 and
/// (37 + 0.1) / 37, to 16 x 16 by size with antialias, 16 -> 37 with antialias), odd sizes and
/// channel counts, mixed factors, strong downsampling with antialias (wide windows), a 1 x 1
/// input (every tap clamped to one pixel), every dtype; forward and backward each a row.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let dino = |m: f64| (m + 0.1) / 37.0;
    let cases: [([usize; 4], ResizeTo, bool); 10] = [
        (
            [1, 37, 37, 8],
            ResizeTo::ScaleFactor([dino(16.0), dino(16.0)]),
            false,
        ),
        (
            [1, 37, 37, 8],
            ResizeTo::ScaleFactor([dino(37.0), dino(37.0)]),
            false,
        ),
        ([1, 37, 37, 8], ResizeTo::Size([16, 16]), true),
        ([1, 16, 16, 8], ResizeTo::Size([37, 37]), true),
        ([2, 7, 5, 3], ResizeTo::Size([13, 2]), false),
        ([1, 9, 11, 5], ResizeTo::ScaleFactor([0.45, 2.3]), false),
        ([2, 9, 11, 5], ResizeTo::ScaleFactor([0.45, 2.3]), true),
        (
            [1, 37, 37, 3],
            ResizeTo::ScaleFactor([dino(16.0), dino(37.0)]),
            true,
        ),
        ([1, 61, 50, 2], ResizeTo::Size([5, 7]), true),
        ([3, 1, 1, 33], ResizeTo::Size([3, 4]), false),
    ];
    let mut rows = Vec::new();
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &(shape, to, aa)) in cases.iter().enumerate() {
            let geom = InterpGeom::new(&shape, to, aa)?;
            let sd = seed.wrapping_add((i * 16 + j) as u64);
            let x = Tensor::randn(&shape, 0.0, 1.0, sd, dtype, &Device::Cpu)?;
            let got = x
                .to_device(device)
                .and_then(|xd| bicubic_forward(&xd, &geom));
            let want = bicubic_forward(&x, &geom);
            let name = if aa {
                format!("interpolate_bicubic_aa_{dtype}")
            } else {
                format!("interpolate_bicubic_{dtype}")
            };
            let label = [shape.as_slice(), &[geom.oh, geom.ow]].concat();
            rows.push(compare(&name, dtype, &label, got, want, dtype.tolerance()));
            let dy = Tensor::randn(&geom.out_shape(), 0.0, 1.0, sd + 7, dtype, &Device::Cpu)?;
            let got = dy
                .to_device(device)
                .and_then(|d| bicubic_backward(&d, &geom));
            let name = format!("interpolate_bicubic_backward_{dtype} (aa {aa})");
            let want = bicubic_backward(&dy, &geom);
            rows.push(compare(&name, dtype, &label, got, want, dtype.tolerance()));
        }
    }
    Ok(rows)
}
