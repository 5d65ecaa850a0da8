//! Elementwise ops on float tensors (f32, f16, bf16) with f32 math inside, results rounded to the
//! input dtype to nearest even: unary maps ([`UnaryOp`]) and binary ops with NumPy broadcasting
//! ([`BinaryOp`]). Inputs may be any strided view; outputs are dense.
//!
//! Every op goes through [`Tensor::unary`] or [`Tensor::binary`], so a backward rule can name the
//! op it needs as a value (`UnaryOp::Affine(..)`, `BinaryOp::Mul` ...) and call the same code.
//!
//! Backward rules: neg, exp, log, affine and the arithmetic binary ops compose existing ops (one
//! pass each over the gradient); the unary ops whose derivative would take several passes
//! (sqrt, rsqrt, relu, gelu, sigmoid, abs, powf, clamp) and maximum, minimum and pow have fused
//! kernels `<op>_backward_<dtype>`. Gradients of broadcast operands are summed back with
//! `Tensor::sum_to_shape`. Non-differentiable points follow torch: relu' = 0 at x <= 0, abs' = 0
//! at 0, clamp passes the gradient strictly inside (lo, hi), maximum/minimum split ties evenly.

mod cpu;
mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::{broadcast_shapes, Layout};
use crate::ops::copy::check_extent;
use crate::tape;
use crate::tensor::{Storage, Tensor};

/// A map applied to every element. Scalar parameters are f32, as the kernels compute in f32.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    /// max(x, 0), with relu(NaN) = NaN.
    Relu,
    /// x * Φ(x) with the exact erf, as torch.nn.GELU().
    Gelu,
    Sigmoid,
    Abs,
    /// x^p.
    Powf(f32),
    /// min(max(x, lo), hi) as torch.clamp: NaN propagates, lo > hi gives hi.
    Clamp(f32, f32),
    /// x * mul + add.
    Affine(f32, f32),
}

impl UnaryOp {
    /// Every op with sample parameters (for tests and the conformance table).
    pub const ALL: [UnaryOp; 12] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Relu,
        UnaryOp::Gelu,
        UnaryOp::Sigmoid,
        UnaryOp::Abs,
        UnaryOp::Powf(1.7),
        UnaryOp::Clamp(-0.5, 1.25),
        UnaryOp::Affine(-1.5, 0.25),
    ];

    /// The op's name in kernel names (`unary_<name>_<dtype>`).
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Relu => "relu",
            UnaryOp::Gelu => "gelu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Abs => "abs",
            UnaryOp::Powf(_) => "powf",
            UnaryOp::Clamp(..) => "clamp",
            UnaryOp::Affine(..) => "affine",
        }
    }

    /// Whether the backward is a fused kernel `<name>_backward_<dtype>` (else it composes ops).
    pub fn fused_backward(self) -> bool {
        !matches!(
            self,
            UnaryOp::Neg | UnaryOp::Exp | UnaryOp::Log | UnaryOp::Affine(..)
        )
    }

    /// The two scalar parameters the kernels take (unused ones are 0).
    fn params(self) -> (f32, f32) {
        match self {
            UnaryOp::Powf(p) => (p, 0.0),
            UnaryOp::Clamp(lo, hi) => (lo, hi),
            UnaryOp::Affine(mul, add) => (mul, add),
            _ => (0.0, 0.0),
        }
    }
}

/// An op on two tensors broadcast against each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    /// NaN-propagating, as torch.maximum.
    Maximum,
    /// NaN-propagating, as torch.minimum.
    Minimum,
    Pow,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Maximum,
        BinaryOp::Minimum,
        BinaryOp::Pow,
    ];

    /// Whether the backward is a fused kernel `<name>_backward_<dtype>` (else it composes ops).
    pub fn fused_backward(self) -> bool {
        matches!(self, BinaryOp::Maximum | BinaryOp::Minimum | BinaryOp::Pow)
    }

    /// The op's name in kernel names (`binary_<name>_<dtype>`).
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Pow => "pow",
        }
    }
}

impl Tensor {
    /// `op` applied to every element; the result is dense, with this tensor's shape and dtype.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        let out = self.unary_forward(op)?;
        if !self.is_requires_grad() || !tape::is_grad_enabled() {
            return Ok(out);
        }
        // keep alive only what the rule reads: the output for exp, nothing for the linear ops, else
        // the input
        let (dtype, saved) = match op {
            UnaryOp::Neg | UnaryOp::Affine(..) => (self.dtype(), None),
            UnaryOp::Exp => (self.dtype(), Some(out.clone())),
            _ => (self.dtype(), Some(self.clone())),
        };
        Ok(tape::record(out, &[self], move |g, _| {
            let g = g.to_dtype(dtype)?;
            let dx = match op {
                UnaryOp::Neg => g.neg()?,
                UnaryOp::Affine(mul, _) => g.mul_scalar(mul as f64)?,
                UnaryOp::Exp => g.mul(saved_tensor(&saved)?)?,
                UnaryOp::Log => g.div(saved_tensor(&saved)?)?,
                _ => Tensor::unary_backward(saved_tensor(&saved)?, &g, op)?,
            };
            Ok(vec![Some(dx)])
        }))
    }

    /// The forward of [`Tensor::unary`], recording nothing.
    fn unary_forward(&self, op: UnaryOp) -> Result<Tensor> {
        self.dtype().require_float(op.name())?;
        check_extent(self)?;
        let layout = Layout::contiguous(self.shape())?;
        let storage = match self.storage() {
            Storage::Cpu(s) => Storage::Cpu(cpu::unary(s, self.layout(), op)?),
            Storage::Gpu(b) => Storage::Gpu(gpu::unary(b, self.layout(), self.dtype(), op)?),
        };
        Ok(Tensor::from_parts(
            storage,
            layout,
            self.dtype(),
            self.device().clone(),
        ))
    }

    /// `op(self, rhs)` elementwise over the broadcast shape of both (NumPy rules). Both must have
    /// the same float dtype and live on the same device.
    pub fn binary(&self, op: BinaryOp, rhs: &Tensor) -> Result<Tensor> {
        let out = self.binary_forward(op, rhs)?;
        let tracked = self.is_requires_grad() || rhs.is_requires_grad();
        if !tracked || !tape::is_grad_enabled() {
            return Ok(out);
        }
        // keep alive only what the rule reads (d/da of a * b reads b, d/db reads a, ...)
        let (need_a, need_b) = (self.is_requires_grad(), rhs.is_requires_grad());
        let keep = |t: &Tensor, used: bool| used.then(|| t.clone());
        let (a, b, y) = match op {
            BinaryOp::Add | BinaryOp::Sub => (None, None, None),
            BinaryOp::Mul => (keep(self, need_b), keep(rhs, need_a), None),
            BinaryOp::Div => (None, Some(rhs.clone()), keep(&out, need_b)),
            BinaryOp::Maximum | BinaryOp::Minimum | BinaryOp::Pow => {
                (Some(self.clone()), Some(rhs.clone()), None)
            }
        };
        let shapes = [self.shape().to_vec(), rhs.shape().to_vec()];
        let dtype = self.dtype();
        Ok(tape::record(out, &[self, rhs], move |g, needs| {
            let g = g.to_dtype(dtype)?;
            if op.fused_backward() {
                let (a, b) = (saved_tensor(&a)?, saved_tensor(&b)?);
                let grads = Tensor::binary_backward(a, b, &g, op, [needs[0], needs[1]])?;
                return grads
                    .into_iter()
                    .zip(&shapes)
                    .map(|(t, shape)| t.map(|t| t.sum_to_shape(shape)).transpose())
                    .collect();
            }
            // each operand's gradient over the output's shape up to its sign, computed only when
            // needed; the sign is applied after summing back over broadcast dimensions
            let full = |operand: usize| -> Result<Tensor> {
                match (op, operand) {
                    (BinaryOp::Add | BinaryOp::Sub, _) => Ok(g.clone()),
                    (BinaryOp::Mul, 0) => g.mul(saved_tensor(&b)?),
                    (BinaryOp::Mul, _) => g.mul(saved_tensor(&a)?),
                    (BinaryOp::Div, 0) => g.div(saved_tensor(&b)?),
                    // d/db a/b = -g a / b² = -(g / b) y
                    (BinaryOp::Div, _) => g.div(saved_tensor(&b)?)?.mul(saved_tensor(&y)?),
                    _ => unreachable!("fused backward ops returned above"),
                }
            };
            let negated =
                |operand: usize| matches!((op, operand), (BinaryOp::Sub | BinaryOp::Div, 1));
            shapes
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    needs[i]
                        .then(|| {
                            let t = full(i)?.sum_to_shape(shape)?;
                            if negated(i) {
                                t.neg()
                            } else {
                                Ok(t)
                            }
                        })
                        .transpose()
                })
                .collect()
        }))
    }

    /// The forward of [`Tensor::binary`], recording nothing.
    fn binary_forward(&self, op: BinaryOp, rhs: &Tensor) -> Result<Tensor> {
        let name = op.name();
        if self.dtype() != rhs.dtype() {
            return dtype_err!(
                "{name}: operands have different dtypes {} and {} (shapes {:?} and {:?})",
                self.dtype(),
                rhs.dtype(),
                self.shape(),
                rhs.shape()
            );
        }
        self.dtype().require_float(name)?;
        self.same_device(rhs, name)?;
        let shape = broadcast_shapes(self.shape(), rhs.shape()).map_err(|e| match e {
            Error::Shape(m) => Error::Shape(format!("{name}: {m}")),
            other => other,
        })?;
        check_extent(self)?;
        check_extent(rhs)?;
        let (a, b) = (
            self.layout().broadcast_to(&shape)?,
            rhs.layout().broadcast_to(&shape)?,
        );
        let storage = match (self.storage(), rhs.storage()) {
            (Storage::Cpu(x), Storage::Cpu(y)) => Storage::Cpu(cpu::binary(x, &a, y, &b, op)?),
            (Storage::Gpu(x), Storage::Gpu(y)) => {
                Storage::Gpu(gpu::binary(x, &a, y, &b, self.dtype(), op)?)
            }
            _ => unreachable!("same_device checked that both storages are on one device"),
        };
        Ok(Tensor::from_parts(
            storage,
            Layout::contiguous(&shape)?,
            self.dtype(),
            self.device().clone(),
        ))
    }

    /// `dy * op'(x)` through the fused `<op>_backward_<dtype>` kernel (or its CPU twin).
    pub(crate) fn unary_backward(x: &Tensor, dy: &Tensor, op: UnaryOp) -> Result<Tensor> {
        if x.shape() != dy.shape() || x.dtype() != dy.dtype() {
            return shape_err!(
                "{} backward: input {} {:?}, gradient {} {:?}",
                op.name(),
                x.dtype(),
                x.shape(),
                dy.dtype(),
                dy.shape()
            );
        }
        x.same_device(dy, op.name())?;
        let (x, dy) = (x.contiguous()?, dy.contiguous()?);
        let n = x.numel();
        let storage = match (x.storage(), dy.storage()) {
            (Storage::Cpu(xs), Storage::Cpu(gs)) => {
                Storage::Cpu(cpu::unary_backward(xs, gs, n, op)?)
            }
            (Storage::Gpu(xb), Storage::Gpu(gb)) => {
                Storage::Gpu(gpu::unary_backward(xb, gb, n, x.dtype(), op)?)
            }
            _ => unreachable!("same_device checked that both storages are on one device"),
        };
        Ok(Tensor::from_parts(
            storage,
            Layout::contiguous(x.shape())?,
            x.dtype(),
            x.device().clone(),
        ))
    }

    /// The gradients of `a` and `b` over the output's shape (not yet summed over broadcast
    /// dimensions) for maximum, minimum and pow, each only where `need` asks.
    pub(crate) fn binary_backward(
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
        op: BinaryOp,
        need: [bool; 2],
    ) -> Result<[Option<Tensor>; 2]> {
        let shape = broadcast_shapes(a.shape(), b.shape())?;
        if dy.shape() != shape.as_slice() || a.dtype() != b.dtype() || a.dtype() != dy.dtype() {
            return shape_err!(
                "{} backward: operands {} {:?} and {} {:?}, gradient {} {:?}",
                op.name(),
                a.dtype(),
                a.shape(),
                b.dtype(),
                b.shape(),
                dy.dtype(),
                dy.shape()
            );
        }
        a.same_device(b, op.name())?;
        a.same_device(dy, op.name())?;
        let dy = dy.contiguous()?;
        let (la, lb) = (
            a.layout().broadcast_to(&shape)?,
            b.layout().broadcast_to(&shape)?,
        );
        let layout = Layout::contiguous(&shape)?;
        let wrap =
            |s: Storage| Tensor::from_parts(s, layout.clone(), a.dtype(), a.device().clone());
        match (a.storage(), b.storage(), dy.storage()) {
            (Storage::Cpu(x), Storage::Cpu(y), Storage::Cpu(g)) => {
                let (da, db) = cpu::binary_backward(x, &la, y, &lb, g, op)?;
                let mut grads = [Some(Storage::Cpu(da)), Some(Storage::Cpu(db))];
                for (g, &w) in grads.iter_mut().zip(&need) {
                    if !w {
                        *g = None;
                    }
                }
                Ok(grads.map(|g| g.map(wrap)))
            }
            (Storage::Gpu(x), Storage::Gpu(y), Storage::Gpu(g)) => {
                let grads = gpu::binary_backward((x, &la), (y, &lb), g, a.dtype(), op, need)?;
                Ok(grads.map(|g| g.map(|b| wrap(Storage::Gpu(b)))))
            }
            _ => unreachable!("same_device checked that the storages are on one device"),
        }
    }

    /// The gradient of picking, along `dim` of a tensor of `shape`, the element at `idx` (i64, one
    /// per slice, shaped like the reduction's output with or without keepdim) from the gradient
    /// `g` of the picks: `g` at the picked elements, 0 elsewhere (the backward of max and min).
    pub(crate) fn select_backward(
        idx: &Tensor,
        g: &Tensor,
        shape: &[usize],
        dim: usize,
    ) -> Result<Tensor> {
        let (outer, n, inner) = (
            shape[..dim].iter().product::<usize>(),
            shape[dim],
            shape[dim + 1..].iter().product::<usize>(),
        );
        if idx.dtype() != DType::I64 || idx.numel() != outer * inner || g.numel() != outer * inner {
            return shape_err!(
                "select backward along {dim} of {shape:?}: indices {} {:?}, gradient {:?}",
                idx.dtype(),
                idx.shape(),
                g.shape()
            );
        }
        g.dtype().require_float("select backward")?;
        idx.same_device(g, "select backward")?;
        let (idx, g) = (idx.contiguous()?, g.contiguous()?);
        let storage = match (idx.storage(), g.storage()) {
            (Storage::Cpu(i), Storage::Cpu(gs)) => {
                Storage::Cpu(cpu::select_backward(i, gs, outer, n, inner)?)
            }
            (Storage::Gpu(i), Storage::Gpu(gb)) => {
                Storage::Gpu(gpu::select_backward(i, gb, (outer, n, inner), g.dtype())?)
            }
            _ => unreachable!("same_device checked that both storages are on one device"),
        };
        Ok(Tensor::from_parts(
            storage,
            Layout::contiguous(shape)?,
            g.dtype(),
            g.device().clone(),
        ))
    }

    pub fn neg(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Neg)
    }
    pub fn exp(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Exp)
    }
    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Log)
    }
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sqrt)
    }
    /// 1 / sqrt(x).
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Rsqrt)
    }
    pub fn relu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Relu)
    }
    /// GELU with the exact erf (torch.nn.GELU's default, not the tanh approximation).
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Gelu)
    }
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Sigmoid)
    }
    pub fn abs(&self) -> Result<Tensor> {
        self.unary(UnaryOp::Abs)
    }
    /// x^p for a scalar exponent.
    pub fn powf(&self, p: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Powf(p as f32))
    }
    /// torch.clamp(x, lo, hi); pass an infinity for a one-sided clamp.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp(lo as f32, hi as f32))
    }
    /// x * mul + add.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(mul as f32, add as f32))
    }
    pub fn add_scalar(&self, s: f64) -> Result<Tensor> {
        self.affine(1.0, s)
    }
    pub fn mul_scalar(&self, s: f64) -> Result<Tensor> {
        self.affine(s, 0.0)
    }

    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Add, rhs)
    }
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Sub, rhs)
    }
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Mul, rhs)
    }
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Div, rhs)
    }
    /// Elementwise max, NaN-propagating (torch.maximum).
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Maximum, rhs)
    }
    /// Elementwise min, NaN-propagating (torch.minimum).
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Minimum, rhs)
    }
    /// self^rhs elementwise.
    pub fn pow(&self, rhs: &Tensor) -> Result<Tensor> {
        self.binary(BinaryOp::Pow, rhs)
    }
}

/// A tensor a backward rule saved at record time; saved whenever the rule can read it, so a
/// missing one is a bug in the rule, reported rather than panicking.
fn saved_tensor(t: &Option<Tensor>) -> Result<&Tensor> {
    t.as_ref().ok_or_else(|| {
        Error::Argument("elementwise backward: a needed tensor was not saved".into())
    })
}

/// The error function, within 2e-15 of the true value. The CPU GELU uses it (Rust's `f64::erf`
/// is not stable yet), and tests use it as a reference.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let r = if a < 3.0 {
        // erf(a) = 2/√π e^(-a²) Σ (2a²)^n a / (1·3·5···(2n+1)): every term is positive, so unlike
        // the alternating Maclaurin series nothing cancels; at a < 3 it converges within 80 terms.
        let two_a2 = 2.0 * a * a;
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term > 1e-17 * sum {
            n += 1.0;
            term *= two_a2 / (2.0 * n + 1.0);
            sum += term;
        }
        sum * (-a * a).exp() * std::f64::consts::FRAC_2_SQRT_PI
    } else if a < 6.0 {
        // erfc(a) = e^(-a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...)))), Laplace's continued
        // fraction, evaluated from the tail; 60 levels reach f64 precision for a ≥ 3.
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0 // erfc(6) = 2e-17
    };
    r.copysign(x)
}

/// Every elementwise kernel and dtype on `device` against the CPU: a dense case (odd size, so the
/// vector loop has a tail) and a strided case per unary op; dense, broadcast and transposed cases
/// per binary op.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    let cpu = Device::Cpu;
    for (d, &dtype) in DType::FLOATS.iter().enumerate() {
        let tol = dtype.tolerance();
        for (i, &op) in UnaryOp::ALL.iter().enumerate() {
            let (lo, hi) = unary_domain(op);
            let s = seed.wrapping_add((d * 100 + i) as u64);
            let dense = Tensor::rand_uniform(&[7, 37], lo, hi, s, dtype, &cpu)?;
            let got = dense.to_device(device).and_then(|t| t.unary(op));
            rows.push(compare(
                &format!("unary_{}_{dtype}", op.name()),
                dtype,
                &[7, 37],
                got,
                dense.unary(op),
                tol,
            ));
            // transposed and narrowed: a non-contiguous view with an offset
            let view = |t: &Tensor| t.t()?.narrow(0, 2, 33);
            let got = dense.to_device(device).and_then(|t| view(&t)?.unary(op));
            rows.push(compare(
                &format!("unary_{}_strided_{dtype}", op.name()),
                dtype,
                &[33, 7],
                got,
                view(&dense)?.unary(op),
                tol,
            ));
        }
        for (i, &op) in BinaryOp::ALL.iter().enumerate() {
            let ((alo, ahi), (blo, bhi)) = binary_domain(op);
            let s = seed.wrapping_add((d * 100 + 50 + i) as u64);
            // same shapes (dense kernel), then both sides broadcasting (strided kernel)
            let cases: [(&str, &[usize], &[usize]); 2] = [
                ("", &[3, 5, 67], &[3, 5, 67]),
                ("_strided", &[3, 1, 67], &[5, 1]),
            ];
            for (suffix, ashape, bshape) in cases {
                let a = Tensor::rand_uniform(ashape, alo, ahi, s, dtype, &cpu)?;
                let b = Tensor::rand_uniform(bshape, blo, bhi, s + 1, dtype, &cpu)?;
                let got = a
                    .to_device(device)
                    .and_then(|x| x.binary(op, &b.to_device(device)?));
                let want = a.binary(op, &b);
                rows.push(compare(
                    &format!("binary_{}{suffix}_{dtype}", op.name()),
                    dtype,
                    &[3, 5, 67],
                    got,
                    want,
                    tol,
                ));
            }
            // a transposed left operand
            let a = Tensor::rand_uniform(&[33, 9], alo, ahi, s + 2, dtype, &cpu)?;
            let b = Tensor::rand_uniform(&[9, 33], blo, bhi, s + 3, dtype, &cpu)?;
            let got = a
                .to_device(device)
                .and_then(|x| x.t()?.binary(op, &b.to_device(device)?));
            rows.push(compare(
                &format!("binary_{}_strided_{dtype}", op.name()),
                dtype,
                &[9, 33],
                got,
                a.t()?.binary(op, &b),
                tol,
            ));
        }
        rows.extend(backward_conformance(
            device,
            seed.wrapping_add(d as u64 * 100),
            dtype,
        )?);
    }
    Ok(rows)
}

/// The fused backward kernels on `device` against their CPU twins: unary (odd size, so the vector
/// loop has a tail), binary with both operands broadcasting, and select.
fn backward_conformance(
    device: &Device,
    seed: u64,
    dtype: DType,
) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let (cpu, tol) = (Device::Cpu, dtype.tolerance());
    let on = |t: &Tensor| t.to_device(device);
    let mut rows = Vec::new();
    for (i, &op) in UnaryOp::ALL.iter().enumerate() {
        if !op.fused_backward() {
            continue;
        }
        let (lo, hi) = unary_domain(op);
        let s = seed.wrapping_add(1000 + 2 * i as u64);
        let x = Tensor::rand_uniform(&[7, 37], lo, hi, s, dtype, &cpu)?;
        let g = Tensor::rand_uniform(&[7, 37], -2.0, 2.0, s + 1, dtype, &cpu)?;
        rows.push(compare(
            &format!("{}_backward_{dtype}", op.name()),
            dtype,
            &[7, 37],
            Tensor::unary_backward(&on(&x)?, &on(&g)?, op),
            Tensor::unary_backward(&x, &g, op),
            tol,
        ));
    }
    for (i, &op) in BinaryOp::ALL.iter().enumerate() {
        if !op.fused_backward() {
            continue;
        }
        let ((alo, ahi), (blo, bhi)) = binary_domain(op);
        let s = seed.wrapping_add(1100 + 3 * i as u64);
        let a = Tensor::rand_uniform(&[3, 1, 67], alo, ahi, s, dtype, &cpu)?;
        let b = Tensor::rand_uniform(&[5, 1], blo, bhi, s + 1, dtype, &cpu)?;
        // maximum and minimum: a tie, on which the gradient splits, at output (0, 4, 5)
        let b = if op == BinaryOp::Pow {
            b
        } else {
            let tie = a.narrow(0, 0, 1)?.narrow(2, 5, 1)?.reshape(&[1, 1])?;
            Tensor::cat(&[&b.narrow(0, 0, 4)?, &tie], 0)?
        };
        let g = Tensor::rand_uniform(&[3, 5, 67], -2.0, 2.0, s + 2, dtype, &cpu)?;
        let got = Tensor::binary_backward(&on(&a)?, &on(&b)?, &on(&g)?, op, [true, true]);
        let want = Tensor::binary_backward(&a, &b, &g, op, [true, true]);
        let (got, want) = (split_pair(got), split_pair(want));
        for (which, got, want) in [("da", got.0, want.0), ("db", got.1, want.1)] {
            rows.push(compare(
                &format!("{}_backward_{dtype} ({which})", op.name()),
                dtype,
                &[3, 5, 67],
                got,
                want,
                tol,
            ));
        }
    }
    // max along the middle axis of [3, 33, 7]: picks at every position of the reduced axis
    let x = Tensor::randn(
        &[3, 33, 7],
        0.0,
        1.0,
        seed.wrapping_add(1200),
        DType::F32,
        &cpu,
    )?;
    let idx = x.argmax(1, false)?;
    let g = Tensor::rand_uniform(&[3, 7], -2.0, 2.0, seed.wrapping_add(1201), dtype, &cpu)?;
    rows.push(compare(
        &format!("select_backward_{dtype}"),
        dtype,
        &[3, 33, 7],
        Tensor::select_backward(&on(&idx)?, &on(&g)?, &[3, 33, 7], 1),
        Tensor::select_backward(&idx, &g, &[3, 33, 7], 1),
        0.0,
    ));
    Ok(rows)
}

/// Both gradients of a fused binary backward as results of their own (an error goes to both).
fn split_pair(r: Result<[Option<Tensor>; 2]>) -> (Result<Tensor>, Result<Tensor>) {
    let missing = || Error::Argument("no gradient computed".into());
    match r {
        Ok([a, b]) => (a.ok_or_else(missing), b.ok_or_else(missing)),
        Err(e) => (Err(Error::Argument(e.to_string())), Err(e)),
    }
}

/// Input range where `op` is defined and well conditioned (for conformance cases and tests).
pub fn unary_domain(op: UnaryOp) -> (f64, f64) {
    match op {
        UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Powf(_) => (0.05, 4.0),
        _ => (-4.0, 4.0),
    }
}

/// Input ranges of the left and right operands of `op` (for conformance cases and tests).
pub fn binary_domain(op: BinaryOp) -> ((f64, f64), (f64, f64)) {
    match op {
        BinaryOp::Div => ((-4.0, 4.0), (0.5, 3.0)),
        BinaryOp::Pow => ((0.05, 3.0), (-2.0, 2.0)),
        _ => ((-4.0, 4.0), (-4.0, 4.0)),
    }
}
