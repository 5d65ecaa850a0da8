//! Matrix multiplication with PyTorch semantics: `a.matmul(&b)` multiplies the last two dimensions
//! and broadcasts the leading (batch) dimensions; `Tensor::gemm` adds `alpha` and `beta * C`.
//! f32, f16 and bf16, both operands of one dtype, the result in that dtype, accumulation in f32.
//!
//! Operands are passed to the kernels as they are stored: a transposed view (`b.t()`) becomes a
//! transpose flag and a leading dimension, broadcast batch dimensions become zero batch strides.
//! Only views with no unit stride in their last two dimensions are made contiguous first (on the
//! GPU; the CPU takes any strides).

mod cpu;
pub(crate) mod gpu;

pub use gpu::{tensor_core_paths, with_tensor_core_path, TensorCorePath};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::{broadcast_shapes, Layout};
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::Tensor;

/// One operand as the kernels see it, over the batch shape of the product: where its first
/// element is, its strides along matrix rows and columns, and per batch dimension (0 where the
/// operand is broadcast).
#[derive(Debug, Clone)]
pub(crate) struct MatOperand {
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
    pub batch: Vec<usize>,
}

impl MatOperand {
    /// `t` seen as `[batch..., rows, cols]` (broadcast to that shape).
    fn new(t: &Tensor, batch: &[usize]) -> Result<MatOperand> {
        let (rows, cols) = (t.shape()[t.rank() - 2], t.shape()[t.rank() - 1]);
        let full: Vec<usize> = batch.iter().copied().chain([rows, cols]).collect();
        let view = t.layout().broadcast_to(&full)?;
        let s = view.strides();
        let (mut rs, mut cs) = (s[s.len() - 2], s[s.len() - 1]);
        // A stride along a dimension of size 1 is never used: make it 1 so that such a matrix
        // counts as dense in either orientation.
        if cols == 1 {
            cs = 1;
        } else if rows == 1 {
            rs = 1;
        }
        Ok(MatOperand {
            offset: view.offset(),
            rs,
            cs,
            batch: s[..batch.len()].to_vec(),
        })
    }

    /// True when stored transposed (column-major): the kernels read it with a transpose flag.
    pub fn transposed(&self) -> bool {
        self.cs != 1
    }

    /// The leading dimension for the kernels (row stride, or column stride when transposed).
    pub fn ld(&self) -> usize {
        if self.transposed() {
            self.cs
        } else {
            self.rs
        }
    }
}

/// Everything a backend needs besides the storage.
#[derive(Debug, Clone)]
pub(crate) struct GemmPlan {
    pub batch: Vec<usize>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl GemmPlan {
    pub fn batch_count(&self) -> usize {
        self.batch.iter().product()
    }

    /// Offsets of batch `z` (row-major over the batch shape) for each operand.
    pub fn batch_offset(&self, z: usize, op: &MatOperand) -> usize {
        let mut z = z;
        let mut off = op.offset;
        for (d, &size) in self.batch.iter().enumerate().rev() {
            off += (z % size) * op.batch[d];
            z /= size;
        }
        off
    }
}

impl Tensor {
    /// Matrix product with `torch.matmul` semantics: the last two dimensions multiply
    /// (`[..., M, K] @ [..., K, N]`), the leading ones broadcast. A 1-D operand is a row (left)
    /// or column (right) vector whose dimension is removed from the result.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        if self.rank() == 0 || rhs.rank() == 0 {
            return shape_err!(
                "matmul needs operands of rank >= 1, got {:?} @ {:?}",
                self.shape(),
                rhs.shape()
            );
        }
        let a = if self.rank() == 1 {
            self.unsqueeze(0)?
        } else {
            self.clone()
        };
        let b = if rhs.rank() == 1 {
            rhs.unsqueeze(1)?
        } else {
            rhs.clone()
        };
        let mut out = Tensor::gemm(&a, &b, None, 1.0, 0.0).map_err(|e| match e {
            // name the caller's shapes, not the unsqueezed ones
            Error::Shape(_) if self.rank() == 1 || rhs.rank() == 1 => Error::Shape(format!(
                "matmul: shapes {:?} and {:?} do not multiply",
                self.shape(),
                rhs.shape()
            )),
            e => e,
        })?;
        if rhs.rank() == 1 {
            out = out.squeeze(-1)?;
        }
        if self.rank() == 1 {
            out = out.squeeze(if rhs.rank() == 1 { -1 } else { -2 })?;
        }
        Ok(out)
    }

    /// `alpha * a @ b + beta * c` (BLAS gemm), batched like [`Tensor::matmul`] for operands of
    /// rank >= 2; `c` broadcasts to the shape of the product. `c` is not read when `beta == 0`,
    /// so NaN in it does not propagate then; without `c` the product is only scaled by `alpha`.
    ///
    /// Inside an `autocast` scope both operands (and C) are cast to the autocast dtype and the
    /// result is in that dtype, as torch.autocast does for matmul and linear.
    pub fn gemm(
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        alpha: f32,
        beta: f32,
    ) -> Result<Tensor> {
        match tape::autocast_dtype() {
            Some(low)
                if a.dtype().is_float()
                    && b.dtype().is_float()
                    && (a.dtype() != low || b.dtype() != low) =>
            {
                let c = c.map(|c| c.to_dtype(low)).transpose()?;
                Tensor::gemm_recorded(
                    &a.to_dtype(low)?,
                    &b.to_dtype(low)?,
                    c.as_ref(),
                    alpha,
                    beta,
                )
            }
            _ => Tensor::gemm_recorded(a, b, c, alpha, beta),
        }
    }

    /// `gemm` with its backward on the tape: dA = alpha dY B^T, dB = alpha A^T dY, dC = beta dY,
    /// each summed back over the dimensions broadcasting stretched.
    fn gemm_recorded(
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        alpha: f32,
        beta: f32,
    ) -> Result<Tensor> {
        let out = tape::no_grad(|| Tensor::gemm_forward(a, b, c, alpha, beta))?;
        let inputs: Vec<&Tensor> = [a, b].into_iter().chain(c).collect();
        let (a, b) = (a.clone(), b.clone());
        let c_shape = c.map(|c| c.shape().to_vec());
        Ok(tape::record(out, &inputs, move |g, needs| {
            let scaled = |t: Tensor, s: f32| {
                if s == 1.0 {
                    Ok(t)
                } else {
                    t.mul_scalar(s as f64)
                }
            };
            // A gradient is computed in the memory order of its operand: for a transposed view
            // (`x @ w.t()`, as in a linear layer) as the transpose of a dense product, so that
            // the view's backward hands the parameter a dense gradient instead of a strided one.
            let ga = if needs[0] {
                let p = if stored_transposed(&a) {
                    b.matmul(&g.t()?)?.t()?
                } else {
                    g.matmul(&b.t()?)?
                };
                Some(scaled(p, alpha)?.sum_to_shape(a.shape())?)
            } else {
                None
            };
            let gb = if needs[1] {
                let p = if stored_transposed(&b) {
                    g.t()?.matmul(&a)?.t()?
                } else {
                    a.t()?.matmul(g)?
                };
                Some(scaled(p, alpha)?.sum_to_shape(b.shape())?)
            } else {
                None
            };
            let mut grads = vec![ga, gb];
            if let Some(shape) = &c_shape {
                grads.push(if needs[2] {
                    Some(scaled(g.sum_to_shape(shape)?, beta)?)
                } else {
                    None
                });
            }
            Ok(grads)
        }))
    }

    /// The product itself, recording nothing.
    fn gemm_forward(
        a: &Tensor,
        b: &Tensor,
        c: Option<&Tensor>,
        alpha: f32,
        beta: f32,
    ) -> Result<Tensor> {
        let (sa, sb) = (a.shape(), b.shape());
        if a.rank() < 2 || b.rank() < 2 {
            return shape_err!("gemm needs operands of rank >= 2, got {sa:?} @ {sb:?}");
        }
        if a.dtype() != b.dtype() {
            return dtype_err!(
                "matmul: operands have different dtypes: {} {sa:?} and {} {sb:?}",
                a.dtype(),
                b.dtype()
            );
        }
        let dtype = a.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return dtype_err!(
                "matmul supports f32, f16 and bf16, got {dtype} for {sa:?} @ {sb:?}"
            );
        }
        a.same_device(b, "matmul")?;
        let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
        let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
        if k != k2 {
            return shape_err!("matmul: {sa:?} @ {sb:?}: inner dimensions differ ({k} vs {k2})");
        }
        let batch = broadcast_shapes(&sa[..sa.len() - 2], &sb[..sb.len() - 2]).map_err(|_| {
            Error::Shape(format!(
                "matmul: batch dimensions of {sa:?} and {sb:?} do not broadcast"
            ))
        })?;
        let out_shape: Vec<usize> = batch.iter().copied().chain([m, n]).collect();
        let out_layout = Layout::contiguous(&out_shape)?;
        if let Some(c) = c {
            if c.dtype() != dtype {
                return dtype_err!(
                    "gemm: C is {} {:?} but the operands are {dtype}",
                    c.dtype(),
                    c.shape()
                );
            }
            a.same_device(c, "gemm")?;
            if c.layout().broadcast_to(&out_shape).is_err() {
                return shape_err!("gemm: C {:?} does not broadcast to the product shape {out_shape:?} of {sa:?} @ {sb:?}", c.shape());
            }
        }
        for t in [Some(a), Some(b), c].into_iter().flatten() {
            check_extent(t)?;
        }
        let plan = GemmPlan {
            batch,
            m,
            n,
            k,
            alpha,
            beta,
        };
        let c = c.filter(|_| beta != 0.0);
        match a.device() {
            Device::Cpu if dtype != DType::F32 => {
                // f32 accumulation and a single rounding at the end, like the tensor-core kernels
                let c32 = c.map(|c| c.to_dtype(DType::F32)).transpose()?;
                Tensor::gemm_forward(
                    &a.to_dtype(DType::F32)?,
                    &b.to_dtype(DType::F32)?,
                    c32.as_ref(),
                    alpha,
                    beta,
                )?
                .to_dtype(dtype)
            }
            Device::Cpu => cpu::gemm(a, b, c, &plan, out_layout),
            Device::Gpu(_) => {
                // the kernels need a unit stride in one of the last two dimensions
                let unit = |t: &Tensor| -> Result<Tensor> {
                    let s = t.layout().strides();
                    let (r, cl) = (t.shape()[t.rank() - 2], t.shape()[t.rank() - 1]);
                    if s[s.len() - 1] == 1 || s[s.len() - 2] == 1 || r == 1 || cl == 1 {
                        Ok(t.clone())
                    } else {
                        t.contiguous()
                    }
                };
                gpu::gemm(&unit(a)?, &unit(b)?, c, &plan, out_layout)
            }
        }
    }
}

/// True for a matrix (or batch of matrices) stored column-major, like the view `w.t()`.
fn stored_transposed(t: &Tensor) -> bool {
    let (s, n) = (t.layout().strides(), t.shape());
    let r = t.rank();
    r >= 2 && n[r - 1] > 1 && n[r - 2] > 1 && s[r - 2] == 1 && s[r - 1] != 1
}

/// Conformance cases: odd sizes, every transpose combination, a broadcast batch, alpha/beta with a
/// broadcast C, and a row stride that is not a multiple of 8 (the scalar-load path). Views are
/// taken on the device, so transposed and strided operands reach the kernels as such. bf16/f16
/// run on every tensor-core family the device has: on compute capability 9.0 wgmma with TMA (the
/// cases whose operands allow tensor maps) and with cp.async, and everywhere mma.sync.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    let mut rows = Vec::new();
    for (di, &dtype) in DType::FLOATS.iter().enumerate() {
        let paths = match device.gpu() {
            Some(gpu) => tensor_core_paths(gpu, dtype),
            None => &[None],
        };
        for &path in paths {
            let run_cases =
                || conformance_cases(device, seed.wrapping_add(1000 * di as u64), dtype, path);
            rows.extend(match path {
                Some(path) => with_tensor_core_path(path, run_cases)?,
                None => run_cases()?,
            });
        }
    }
    Ok(rows)
}

fn conformance_cases(
    device: &Device,
    mut seed: u64,
    dtype: DType,
    path: Option<TensorCorePath>,
) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    type Case = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;
    let (family, tma) = match path {
        Some(TensorCorePath::WgmmaTma) => ("gemm_tma", true),
        Some(TensorCorePath::Wgmma) => ("gemm_wgmma", false),
        _ => ("gemm", false),
    };
    let mut rows = Vec::new();
    let mut rand = |shape: &[usize]| {
        seed = seed.wrapping_add(1);
        Tensor::rand_uniform(shape, -1.0, 1.0, seed, dtype, &Device::Cpu)
    };
    let mut run = |name: String, shape: &[usize], inputs: Vec<Tensor>, f: Case| {
        let got = inputs
            .iter()
            .map(|t| t.to_device(device))
            .collect::<Result<Vec<_>>>()
            .and_then(|d| f(&d));
        rows.push(compare(
            &name,
            dtype,
            shape,
            got,
            f(&inputs),
            dtype.tolerance(),
        ));
    };
    // (m, n, k, a transposed, b transposed, leading dimensions 16-byte aligned for TMA)
    let cases = [
        (1, 1, 1, false, false, false),
        (7, 257, 33, false, false, false),
        (129, 65, 31, false, false, false),
        (65, 47, 40, false, true, true),
        (65, 47, 40, true, false, false),
        (65, 47, 40, true, true, false),
        (136, 264, 328, false, false, true),
        (136, 264, 328, false, true, true),
        (136, 264, 328, true, false, true),
        (136, 264, 328, true, true, true),
    ];
    for (m, n, k, ta, tb, aligned) in cases {
        if tma && !aligned {
            continue;
        }
        let a = if ta { rand(&[k, m])? } else { rand(&[m, k])? };
        let b = if tb { rand(&[n, k])? } else { rand(&[k, n])? };
        let view = move |t: &Tensor, tr: bool| if tr { t.t() } else { Ok(t.clone()) };
        let name = format!(
            "{family}_{dtype}_{}{}",
            if ta { 't' } else { 'n' },
            if tb { 't' } else { 'n' }
        );
        run(
            name,
            &[m, n, k],
            vec![a, b],
            Box::new(move |x| view(&x[0], ta)?.matmul(&view(&x[1], tb)?)),
        );
    }
    if tma {
        // one batch dimension: batched A against a broadcast B, and both batched
        let inputs = vec![rand(&[3, 40, 48])?, rand(&[48, 24])?];
        run(
            format!("{family}_{dtype}_nn (batch, broadcast B)"),
            &[3, 40, 24, 48],
            inputs,
            Box::new(|x| x[0].matmul(&x[1])),
        );
        let inputs = vec![rand(&[3, 40, 48])?, rand(&[3, 24, 48])?];
        run(
            format!("{family}_{dtype}_nt (batch)"),
            &[3, 40, 24, 48],
            inputs,
            Box::new(|x| x[0].matmul(&x[1].transpose(1, 2)?)),
        );
        // two batch dimensions that merge into one, as attention's [B, H]
        let inputs = vec![rand(&[2, 3, 40, 48])?, rand(&[2, 3, 48, 24])?];
        run(
            format!("{family}_{dtype}_nn (batch [2, 3])"),
            &[2, 3, 40, 24, 48],
            inputs,
            Box::new(|x| x[0].matmul(&x[1])),
        );
        // operands that start 16 bytes into their buffers (the least alignment TMA accepts)
        let inputs = vec![rand(&[40, 56])?, rand(&[48, 80])?];
        let f: Case = Box::new(|x| x[0].narrow(1, 8, 48)?.matmul(&x[1].narrow(1, 8, 72)?));
        run(
            format!("{family}_{dtype}_nn (16-byte offsets)"),
            &[40, 72, 48],
            inputs,
            f,
        );
    } else {
        let inputs = vec![rand(&[2, 1, 33, 40])?, rand(&[3, 40, 17])?];
        run(
            format!("{family}_{dtype}_nn (batch)"),
            &[2, 3, 33, 17],
            inputs,
            Box::new(|x| x[0].matmul(&x[1])),
        );
        // row stride 37: rows are not 16-byte aligned
        let inputs = vec![rand(&[40, 37])?, rand(&[35, 37])?];
        let f: Case = Box::new(|x| x[0].narrow(1, 1, 35)?.matmul(&x[1].narrow(1, 2, 33)?));
        run(
            format!("{family}_{dtype}_nn (row stride 37)"),
            &[40, 33, 35],
            inputs,
            f,
        );
    }
    let inputs = vec![rand(&[45, 24])?, rand(&[24, 72])?, rand(&[72])?];
    let f: Case = Box::new(|x| Tensor::gemm(&x[0], &x[1], Some(&x[2]), 0.5, -2.0));
    run(
        format!("{family}_{dtype}_nn (alpha, beta, bias C)"),
        &[45, 72, 24],
        inputs,
        f,
    );
    Ok(rows)
}
