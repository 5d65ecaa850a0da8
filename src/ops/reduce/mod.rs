//! Reductions along one axis (sum, sum of squares, mean, max, min, argmax) and `sum_all`. Float
//! inputs (f32, f16, bf16), f32 accumulation on the GPU (f64 on the CPU); the output has the input
//! dtype, except argmax which gives i64 indices. NaN follows torch: max, min and argmax return the
//! NaN (argmax its first index); argmax ties go to the first index. An empty reduced axis gives 0
//! for sum and sum_sq, NaN for mean, and an error for max, min and argmax.
//!
//! Backward: sum and mean broadcast the gradient back over the reduced axis (mean divides by its
//! length), sum_sq gives 2 x g. max and min give each slice's gradient to one element, the one
//! argmax picks (for min, argmax of -x): the first index among equal extremes, the NaN where the
//! slice holds one. torch.max(dim) also routes a tie to a single index (which one is up to its
//! kernels); torch.amax would split it. argmax is not differentiable and records nothing.

mod cpu;
mod gpu;

pub(crate) use gpu::lanes_per_row;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::layout::{resolve_dim, Layout};
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{Storage, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    SumSq,
    Mean,
    Max,
    Min,
    ArgMax,
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 6] = [
        ReduceOp::Sum,
        ReduceOp::SumSq,
        ReduceOp::Mean,
        ReduceOp::Max,
        ReduceOp::Min,
        ReduceOp::ArgMax,
    ];

    /// The op's part of the kernel names (`reduce_rows_warp_sum_sq_f16` ...).
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::SumSq => "sum_sq",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::ArgMax => "argmax",
        }
    }

    /// The dtype of the result for an input of `dtype`.
    pub fn out_dtype(self, dtype: DType) -> DType {
        if self == ReduceOp::ArgMax {
            DType::I64
        } else {
            dtype
        }
    }
}

/// The contiguous input seen as `[outer, n, inner]` with `n` the reduced axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub outer: usize,
    pub n: usize,
    pub inner: usize,
}

impl Tensor {
    /// This gradient summed over the dimensions that broadcasting added or stretched, giving
    /// `shape`: the backward of every broadcasting op.
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        let grad = self;
        if grad.shape() == shape {
            return Ok(grad.clone());
        }
        let lead = grad.rank().checked_sub(shape.len());
        let Some(lead) = lead else {
            return shape_err!(
                "cannot sum a gradient of shape {:?} to {shape:?}",
                grad.shape()
            );
        };
        let mut g = grad.clone();
        for _ in 0..lead {
            g = g.sum(0, false)?;
        }
        for (d, &n) in shape.iter().enumerate() {
            if n == 1 && g.shape()[d] != 1 {
                g = g.sum(d as isize, true)?;
            } else if g.shape()[d] != n {
                return shape_err!(
                    "cannot sum a gradient of shape {:?} to {shape:?}",
                    grad.shape()
                );
            }
        }
        Ok(g)
    }

    /// Sum along `dim` (negative counts from the end); `keepdim` keeps it as a size-1 dimension.
    pub fn sum(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Sum, dim, keepdim)
    }

    /// Sum of squares along `dim`.
    pub fn sum_sq(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::SumSq, dim, keepdim)
    }

    /// Mean along `dim` (NaN where the axis is empty, as torch).
    pub fn mean(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Mean, dim, keepdim)
    }

    /// Largest value along `dim`; NaN when the slice holds one.
    pub fn max(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Max, dim, keepdim)
    }

    /// Smallest value along `dim`; NaN when the slice holds one.
    pub fn min(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::Min, dim, keepdim)
    }

    /// Index (i64) of the largest value along `dim`: the first one among equals, the first NaN if any.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        self.reduce(ReduceOp::ArgMax, dim, keepdim)
    }

    /// Sum of all elements, as a tensor of shape `[]` (0 for an empty tensor).
    pub fn sum_all(&self) -> Result<Tensor> {
        let flat = self.reshape(&[self.numel()])?;
        flat.reduce(ReduceOp::Sum, 0, false)?.reshape(&[])
    }

    /// `op` along `dim`. A tensor of rank 0 accepts dim 0 or -1 and reduces its one element, as
    /// torch does.
    /// Inside an `autocast` scope, sums and means of f16/bf16 tensors are computed and returned
    /// in f32, as under torch.autocast.
    pub fn reduce(&self, op: ReduceOp, dim: isize, keepdim: bool) -> Result<Tensor> {
        if matches!(op, ReduceOp::Sum | ReduceOp::Mean | ReduceOp::SumSq) {
            let promoted = tape::autocast_to_f32(self)?;
            if promoted.dtype() != self.dtype() {
                return promoted.reduce(op, dim, keepdim);
            }
        }
        let out = tape::no_grad(|| self.reduce_forward(op, dim, keepdim))?;
        if op == ReduceOp::ArgMax || !self.is_requires_grad() || !tape::is_grad_enabled() {
            return Ok(out);
        }
        // sum and mean need only the input's shape; the others read the input
        let x = matches!(op, ReduceOp::SumSq | ReduceOp::Max | ReduceOp::Min).then(|| self.clone());
        let (shape, dtype) = (self.shape().to_vec(), self.dtype());
        Ok(tape::record(out, &[self], move |g, _| {
            let g = g.to_dtype(dtype)?;
            Ok(vec![Some(reduce_backward(
                op,
                dim,
                &shape,
                x.as_ref(),
                &g,
            )?)])
        }))
    }

    /// The forward of [`Tensor::reduce`], recording nothing.
    fn reduce_forward(&self, op: ReduceOp, dim: isize, keepdim: bool) -> Result<Tensor> {
        let what = format!("{}(dim {dim}) of shape {:?}", op.name(), self.shape());
        self.dtype().require_float(&what)?;
        if self.rank() == 0 {
            resolve_dim(dim, 1, &what)?;
            return self
                .reshape(&[1])?
                .reduce_forward(op, 0, false)?
                .reshape(&[]);
        }
        let d = resolve_dim(dim, self.rank(), &what)?;
        let shape = self.shape();
        let dims = Dims {
            outer: shape[..d].iter().product(),
            n: shape[d],
            inner: shape[d + 1..].iter().product(),
        };
        let mut out_shape = shape.to_vec();
        if keepdim {
            out_shape[d] = 1;
        } else {
            out_shape.remove(d);
        }
        let out_dtype = op.out_dtype(self.dtype());
        let outputs = dims.outer * dims.inner;
        if dims.n == 0 {
            return match op {
                ReduceOp::Sum | ReduceOp::SumSq => {
                    Tensor::zeros(&out_shape, out_dtype, self.device())
                }
                ReduceOp::Mean => Tensor::full(&out_shape, f64::NAN, out_dtype, self.device()),
                _ => shape_err!(
                    "{what}: the reduced dimension is empty and {} has no identity",
                    op.name()
                ),
            };
        }
        if outputs == 0 {
            return Tensor::zeros(&out_shape, out_dtype, self.device());
        }
        let src = self.contiguous()?;
        check_extent(&src)?;
        let storage = match src.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::reduce(s, op, dims)?),
            Storage::Gpu(b) => Storage::Gpu(gpu::reduce(b, src.dtype(), op, dims)?),
        };
        Ok(Tensor::from_parts(
            storage,
            Layout::contiguous(&out_shape)?,
            out_dtype,
            self.device().clone(),
        ))
    }
}

/// The gradient of the input (of `shape`; the input itself `x` where the rule reads it) of `op`
/// (not argmax) along `dim`, from the gradient `g` of the output (with or without keepdim).
fn reduce_backward(
    op: ReduceOp,
    dim: isize,
    shape: &[usize],
    x: Option<&Tensor>,
    g: &Tensor,
) -> Result<Tensor> {
    if shape.iter().product::<usize>() == 0 {
        return Tensor::zeros(shape, g.dtype(), g.device());
    }
    // rank 0 reduces its one element, like a [1] tensor along 0
    let full: Vec<usize> = if shape.is_empty() {
        vec![1]
    } else {
        shape.to_vec()
    };
    let d = resolve_dim(dim, full.len(), "reduce backward")?;
    let mut kept = full.clone();
    kept[d] = 1;
    // the output gradient with the reduced dimension as size 1, broadcasting against the input
    let g = g.reshape(&kept)?;
    let input = || -> Result<Tensor> {
        match x {
            Some(x) => x.reshape(&full),
            None => Err(crate::error::Error::Argument(format!(
                "{} backward: the input was not saved",
                op.name()
            ))),
        }
    };
    let dx = match op {
        ReduceOp::Sum => g.broadcast_to(&full)?.contiguous()?,
        ReduceOp::Mean => g
            .mul_scalar(1.0 / full[d] as f64)?
            .broadcast_to(&full)?
            .contiguous()?,
        ReduceOp::SumSq => input()?.mul(&g.mul_scalar(2.0)?)?,
        ReduceOp::Max => {
            Tensor::select_backward(&input()?.argmax(d as isize, true)?, &g, &full, d)?
        }
        ReduceOp::Min => {
            let picks = input()?.neg()?.argmax(d as isize, true)?;
            Tensor::select_backward(&picks, &g, &full, d)?
        }
        ReduceOp::ArgMax => {
            return Err(crate::error::Error::Argument(
                "argmax is not differentiable".into(),
            ))
        }
    };
    dx.reshape(shape)
}

/// Every reduction kernel (each launch path: warp rows, block rows, split rows, columns, split
/// columns) in every dtype on `device`, against the CPU.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    // (shape, dim, the kernel the row is named after); the split cases (a long axis and few
    // outputs) run a rows or cols kernel per segment and then `reduce_partials`.
    let cases: [(&[usize], isize, &str); 9] = [
        (&[1], 0, "rows_warp"),
        (&[7, 33], -1, "rows_warp"),
        (&[3, 257], 1, "rows_warp"),
        (&[2, 5000], -1, "rows_block"),
        (&[1, 20011], 1, "partials"),
        (&[33, 7], 0, "cols"),
        (&[3, 7, 257], 1, "cols"),
        (&[5, 2, 1], 0, "cols"),
        (&[6000, 3], 0, "partials"),
    ];
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, &(shape, dim, path)) in cases.iter().enumerate() {
            let src = Tensor::randn(
                shape,
                0.5,
                2.0,
                seed + (i * 16 + j) as u64,
                dtype,
                &Device::Cpu,
            )?;
            let on_device = src.to_device(device)?;
            for op in ReduceOp::ALL {
                // Sums in f16/bf16 round once at the end, so their error is the dtype's rounding.
                let tol = if matches!(op, ReduceOp::Max | ReduceOp::Min | ReduceOp::ArgMax) {
                    0.0
                } else {
                    dtype.tolerance()
                };
                let kernel = format!("reduce_{path}_{}_{dtype}", op.name());
                rows.push(compare(
                    &kernel,
                    dtype,
                    shape,
                    on_device.reduce(op, dim, false),
                    src.reduce(op, dim, false),
                    tol,
                ));
            }
        }
    }
    Ok(rows)
}
