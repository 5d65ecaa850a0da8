//! 2-D max pooling, channels-last, with PyTorch's `MaxPool2d` semantics (floor mode, padding that
//! never wins as if it were -inf, dilation 1): `[N, H, W, C] -> [N, OH, OW, C]`,
//! `OH = (H + 2 pad - kernel) / stride + 1`, padding at most half the kernel.
//!
//! The forward also yields, per output element, the index `ih * W + iw` of the input element it
//! took (i32): the first largest in the window in (kh, kw) order, or the last NaN, as PyTorch's
//! CPU kernel picks it. Backward routes each output gradient to that element; windows overlap
//! when the stride is smaller than the kernel, so an input element sums the gradients of every
//! window that picked it (on the CPU a scatter per image, on GPUs a gather per input element: kernels/pool.cu).

mod cpu;
pub(crate) mod gpu;

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::layout::Layout;
use crate::tape;
use crate::tensor::{Storage, Tensor};

/// Every size of one pooling, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolGeom {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    fn new(x: &[usize], kernel: usize, stride: usize, pad: usize) -> Result<PoolGeom> {
        let what = || {
            format!("max_pool2d of {x:?} (NHWC), kernel {kernel}, stride {stride}, padding {pad}")
        };
        if x.len() != 4 {
            return shape_err!("{}: the input must have rank 4", what());
        }
        if kernel == 0 || stride == 0 {
            return shape_err!("{}: kernel and stride must be >= 1", what());
        }
        if 2 * pad > kernel {
            return shape_err!("{}: padding must be at most half the kernel", what());
        }
        let (n, h, w, c) = (x[0], x[1], x[2], x[3]);
        if h + 2 * pad < kernel || w + 2 * pad < kernel {
            return shape_err!("{}: the kernel is larger than the padded input", what());
        }
        Ok(PoolGeom {
            n,
            h,
            w,
            c,
            kernel,
            stride,
            pad,
            oh: (h + 2 * pad - kernel) / stride + 1,
            ow: (w + 2 * pad - kernel) / stride + 1,
        })
    }

    pub fn out_shape(&self) -> [usize; 4] {
        [self.n, self.oh, self.ow, self.c]
    }

    pub fn in_shape(&self) -> [usize; 4] {
        [self.n, self.h, self.w, self.c]
    }
}

impl Tensor {
    /// PyTorch MaxPool2d (floor mode, -inf padding, dilation 1) on [N,H,W,C] -> [N,OH,OW,C]; autograd.
    pub fn max_pool2d(&self, kernel: usize, stride: usize, padding: usize) -> Result<Tensor> {
        let geom = PoolGeom::new(self.shape(), kernel, stride, padding)?;
        self.dtype().require_float("max_pool2d")?;
        let (out, idx) = tape::no_grad(|| max_pool_forward(self, &geom))?;
        let dtype = self.dtype();
        Ok(tape::record(out, &[self], move |g, _| {
            Ok(vec![Some(max_pool_backward(
                &idx,
                &g.to_dtype(dtype)?,
                &geom,
            )?)])
        }))
    }
}

/// The pooled values and the index (i32, `ih * W + iw`) each was taken from.
fn max_pool_forward(x: &Tensor, geom: &PoolGeom) -> Result<(Tensor, Tensor)> {
    let x = x.contiguous()?;
    let (out, idx) = match x.storage() {
        Storage::Cpu(s) => {
            let (out, idx) = cpu::max_pool(s, x.layout().offset(), geom)?;
            (Storage::Cpu(out), Storage::Cpu(idx))
        }
        Storage::Gpu(b) => {
            let offset = x.layout().offset() * x.dtype().size_in_bytes();
            let (out, idx) = gpu::max_pool(b, offset, x.dtype(), geom)?;
            (Storage::Gpu(out), Storage::Gpu(idx))
        }
    };
    let layout = Layout::contiguous(&geom.out_shape())?;
    Ok((
        Tensor::from_parts(out, layout.clone(), x.dtype(), x.device().clone()),
        Tensor::from_parts(idx, layout, DType::I32, x.device().clone()),
    ))
}

/// The input gradient from the output gradient `g` and the forward's indices.
fn max_pool_backward(idx: &Tensor, g: &Tensor, geom: &PoolGeom) -> Result<Tensor> {
    if g.shape() != geom.out_shape() {
        return shape_err!(
            "max_pool2d backward: gradient {:?} for an output {:?}",
            g.shape(),
            geom.out_shape()
        );
    }
    idx.same_device(g, "max_pool2d backward")?;
    let g = g.contiguous()?;
    let dx = match (idx.storage(), g.storage()) {
        (Storage::Cpu(i), Storage::Cpu(gs)) => {
            Storage::Cpu(cpu::max_pool_backward(i, gs, g.layout().offset(), geom)?)
        }
        (Storage::Gpu(i), Storage::Gpu(gb)) => {
            let offset = g.layout().offset() * g.dtype().size_in_bytes();
            Storage::Gpu(gpu::max_pool_backward(i, gb, offset, g.dtype(), geom)?)
        }
        _ => unreachable!("same_device checked that both storages are on one device"),
    };
    Ok(Tensor::from_parts(
        dx,
        Layout::contiguous(&geom.in_shape())?,
        g.dtype(),
        g.device().clone(),
    ))
}

/// Conformance cases: 3x3/2 with padding 1 on odd and even sizes (overlapping windows, so the
/// backward sums several windows), 2x2/2 in floor mode, 5x5/3, batch 1 and 2, every dtype.
pub fn conformance(
    device: &crate::device::Device,
    seed: u64,
) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    use crate::device::Device;
    let cases: [([usize; 4], usize, usize, usize); 5] = [
        ([2, 9, 7, 3], 3, 2, 1),
        ([1, 8, 10, 5], 3, 2, 1),
        ([2, 7, 5, 4], 2, 2, 0),
        ([1, 11, 9, 3], 5, 3, 2),
        ([1, 3, 4, 2], 1, 1, 0),
    ];
    let mut rows = Vec::new();
    for (di, &dtype) in DType::FLOATS.iter().enumerate() {
        for (ci, &(xs, k, s, p)) in cases.iter().enumerate() {
            let geom = PoolGeom::new(&xs, k, s, p)?;
            let sd = seed.wrapping_add(10 * (di * 8 + ci) as u64);
            let x = Tensor::randn(&xs, 0.0, 1.0, sd, dtype, &Device::Cpu)?;
            let dy = Tensor::randn(&geom.out_shape(), 0.0, 1.0, sd + 1, dtype, &Device::Cpu)?;
            let shape = [xs.as_slice(), &[k, s, p]].concat();
            let (want_y, idx) = max_pool_forward(&x, &geom)?;
            let (got_y, got_i) = crate::check::split_pair(
                x.to_device(device)
                    .and_then(|xd| max_pool_forward(&xd, &geom)),
            );
            let name = format!("max_pool_{dtype}");
            rows.push(compare(&name, dtype, &shape, got_y, Ok(want_y), 0.0));
            let name = format!("max_pool_{dtype} (indices)");
            rows.push(compare(&name, dtype, &shape, got_i, Ok(idx.clone()), 0.0));
            // backward from the CPU's indices, so both sides route the same way
            let got = idx
                .to_device(device)
                .and_then(|i| max_pool_backward(&i, &dy.to_device(device)?, &geom));
            rows.push(compare(
                &format!("max_pool_backward_{dtype}"),
                dtype,
                &shape,
                got,
                max_pool_backward(&idx, &dy, &geom),
                dtype.tolerance(),
            ));
        }
    }
    Ok(rows)
}
