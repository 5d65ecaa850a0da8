//! Optimizers over f32 master weights with torch.optim's exact update formulas: SGD (momentum,
//! dampening, Nesterov, L2 weight decay), Adam (L2 weight decay) and AdamW (decoupled decay).
//! Parameters come in groups, each with its own hyper-parameters; each parameter's update is one
//! fused kernel launch (`kernels/optim.cu`) or its CPU twin.

pub(crate) mod cpu;
pub(crate) mod gpu;

use crate::autograd::{no_grad, Parameter};
use crate::device::{Device, GpuBuffer};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::tensor::{CpuStorage, Storage, Tensor};
use std::collections::{HashMap, HashSet};

/// torch.optim.SGD hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Sgd {
    /// Plain SGD (no momentum, no decay), as `torch.optim.SGD(params, lr)`.
    pub fn new(lr: f64) -> Sgd {
        Sgd {
            lr,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// torch.optim.Adam / AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: `p *= 1 - lr * weight_decay` before the update, instead of adding
    /// `weight_decay * p` to the gradient.
    pub decoupled: bool,
}

impl Adam {
    /// `torch.optim.Adam(params, lr)` defaults.
    pub fn new(lr: f64) -> Adam {
        Adam {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        }
    }

    /// `torch.optim.AdamW(params, lr)` defaults (weight decay 0.01).
    pub fn adamw(lr: f64) -> Adam {
        Adam {
            weight_decay: 1e-2,
            decoupled: true,
            ..Adam::new(lr)
        }
    }
}

/// The hyper-parameters of one group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hyper {
    Sgd(Sgd),
    Adam(Adam),
}

impl From<Sgd> for Hyper {
    fn from(h: Sgd) -> Hyper {
        Hyper::Sgd(h)
    }
}

impl From<Adam> for Hyper {
    fn from(h: Adam) -> Hyper {
        Hyper::Adam(h)
    }
}

impl Hyper {
    pub fn lr(&self) -> f64 {
        match self {
            Hyper::Sgd(h) => h.lr,
            Hyper::Adam(h) => h.lr,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Hyper::Sgd(h) => h.lr = lr,
            Hyper::Adam(h) => h.lr = lr,
        }
    }

    /// The name of the algorithm ("sgd", "adam", "adamw"), as checkpoints record it.
    pub fn kind(&self) -> &'static str {
        match self {
            Hyper::Sgd(_) => "sgd",
            Hyper::Adam(h) if h.decoupled => "adamw",
            Hyper::Adam(_) => "adam",
        }
    }

    /// The checks torch.optim makes in its constructors.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Argument(format!("{}: {what}", self.kind())));
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        match self {
            Hyper::Sgd(h) => {
                if !finite_nonneg(h.lr)
                    || !finite_nonneg(h.momentum)
                    || !finite_nonneg(h.weight_decay)
                {
                    return bad(format!(
                        "lr {}, momentum {} and weight decay {} must be finite and >= 0",
                        h.lr, h.momentum, h.weight_decay
                    ));
                }
                if !h.dampening.is_finite() {
                    return bad(format!("dampening {} must be finite", h.dampening));
                }
                if h.nesterov && (h.momentum <= 0.0 || h.dampening != 0.0) {
                    return bad(format!(
                        "Nesterov momentum needs momentum > 0 and dampening 0 (got {} and {})",
                        h.momentum, h.dampening
                    ));
                }
            }
            Hyper::Adam(h) => {
                if !finite_nonneg(h.lr) || !finite_nonneg(h.eps) || !finite_nonneg(h.weight_decay) {
                    return bad(format!(
                        "lr {}, eps {} and weight decay {} must be finite and >= 0",
                        h.lr, h.eps, h.weight_decay
                    ));
                }
                let (b1, b2) = h.betas;
                if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
                    return bad(format!("betas ({b1}, {b2}) must lie in [0, 1)"));
                }
            }
        }
        Ok(())
    }
}

/// Parameters that share hyper-parameters (torch's param_groups).
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub params: Vec<Parameter>,
    pub hyper: Hyper,
}

impl ParamGroup {
    pub fn new(params: Vec<Parameter>, hyper: impl Into<Hyper>) -> ParamGroup {
        ParamGroup {
            params,
            hyper: hyper.into(),
        }
    }
}

/// What the optimizer keeps per parameter: the number of updates it received and the buffers
/// of its algorithm (f32, the parameter's shape and device).
#[derive(Debug, Clone, Default)]
pub struct ParamState {
    pub step: u64,
    /// SGD with momentum.
    pub momentum_buffer: Option<Tensor>,
    /// Adam / AdamW first and second moments.
    pub exp_avg: Option<Tensor>,
    pub exp_avg_sq: Option<Tensor>,
}

pub struct Optimizer {
    groups: Vec<ParamGroup>,
    /// By parameter name (unique within an optimizer).
    state: HashMap<String, ParamState>,
}

impl Optimizer {
    /// An optimizer over `groups`; parameter names must be unique and parameters f32.
    pub fn new(groups: Vec<ParamGroup>) -> Result<Optimizer> {
        let mut names = HashSet::new();
        for g in &groups {
            g.hyper.validate()?;
            for p in &g.params {
                if !names.insert(p.name().to_string()) {
                    return Err(Error::Argument(format!(
                        "parameter '{}' appears twice in the optimizer (names must be unique)",
                        p.name()
                    )));
                }
                let dtype = p.tensor().dtype();
                if dtype != DType::F32 {
                    return Err(Error::DType(format!(
                        "optimizer: parameter '{}' is {dtype}; master weights must be f32",
                        p.name()
                    )));
                }
            }
        }
        Ok(Optimizer {
            groups,
            state: HashMap::new(),
        })
    }

    /// One group of `params` with `hyper`.
    pub fn single(params: Vec<Parameter>, hyper: impl Into<Hyper>) -> Result<Optimizer> {
        Optimizer::new(vec![ParamGroup::new(params, hyper)])
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// The hyper-parameters of group `i` (e.g. to change its learning rate).
    pub fn hyper_mut(&mut self, group: usize) -> Result<&mut Hyper> {
        let n = self.groups.len();
        self.groups
            .get_mut(group)
            .map(|g| &mut g.hyper)
            .ok_or_else(|| Error::Argument(format!("no parameter group {group} (there are {n})")))
    }

    /// Every parameter, group by group.
    pub fn parameters(&self) -> Vec<Parameter> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().cloned())
            .collect()
    }

    /// Drops every parameter's gradient (torch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&self) {
        for g in &self.groups {
            for p in &g.params {
                p.zero_grad();
            }
        }
    }

    /// The state of the parameter called `name`, once it has been updated.
    pub fn state(&self, name: &str) -> Option<&ParamState> {
        self.state.get(name)
    }

    pub(crate) fn replace_state(&mut self, state: HashMap<String, ParamState>) {
        self.state = state;
    }

    /// Moves `params` and their state to `device`: CosPlace keeps the classifiers of the groups
    /// it is not training in host memory.
    pub fn move_to(&mut self, params: &[Parameter], device: &Device) -> Result<()> {
        for p in params {
            p.move_to(device)?;
            if let Some(state) = self.state.get_mut(p.name()) {
                for buffer in [
                    &mut state.momentum_buffer,
                    &mut state.exp_avg,
                    &mut state.exp_avg_sq,
                ]
                .into_iter()
                .flatten()
                {
                    *buffer = buffer.to_device(device)?;
                }
            }
        }
        Ok(())
    }

    /// One update of every trainable parameter that has a gradient; the others are untouched.
    pub fn step(&mut self) -> Result<()> {
        no_grad(|| {
            for group in &self.groups {
                for p in &group.params {
                    if !p.is_trainable() {
                        continue;
                    }
                    let Some(grad) = p.grad() else { continue };
                    let state = self.state.entry(p.name().to_string()).or_default();
                    update(p, &grad, &group.hyper, state)?;
                }
            }
            Ok(())
        })
    }
}

/// Updates one parameter and its state.
fn update(p: &Parameter, grad: &Tensor, hyper: &Hyper, state: &mut ParamState) -> Result<()> {
    let value = p.tensor().detach();
    check_grad(p.name(), &value, grad)?;
    let buffers = [
        ("momentum_buffer", &state.momentum_buffer),
        ("exp_avg", &state.exp_avg),
        ("exp_avg_sq", &state.exp_avg_sq),
    ];
    for (what, t) in buffers {
        if let Some(t) = t {
            check_state(p.name(), what, &value, t)?;
        }
    }
    let grad = grad.contiguous()?;
    if value.device().is_cpu() {
        let shape = value.shape().to_vec();
        // our handle would share the parameter's storage and force a copy
        drop(value);
        update_cpu(p, &shape, f32s(&grad), hyper, state)?;
    } else {
        update_gpu(p, &value.contiguous()?, &grad, hyper, state)?;
    }
    state.step += 1;
    Ok(())
}

fn sgd_momentum_hyper(h: &Sgd) -> cpu::SgdMomentum {
    cpu::SgdMomentum {
        neg_lr: -h.lr as f32,
        weight_decay: h.weight_decay as f32,
        momentum: h.momentum as f32,
        one_minus_dampening: (1.0 - h.dampening) as f32,
        nesterov: h.nesterov,
    }
}

/// The CPU update, in place on the parameter and its state: every step would otherwise write
/// fresh buffers, and first-touch page faults double the cost of this memory-bound loop.
fn update_cpu(
    p: &Parameter,
    shape: &[usize],
    g: &[f32],
    hyper: &Hyper,
    state: &mut ParamState,
) -> Result<()> {
    let zeros = || Tensor::zeros(shape, DType::F32, &Device::Cpu);
    p.update_value(|value| {
        let pv = exclusive_f32(value)?;
        match hyper {
            Hyper::Sgd(h) if h.momentum == 0.0 => {
                cpu::sgd(pv, g, -h.lr as f32, h.weight_decay as f32)
            }
            Hyper::Sgd(h) => {
                let first = state.momentum_buffer.is_none();
                if first {
                    state.momentum_buffer = Some(zeros()?);
                }
                let b = exclusive_f32(state.momentum_buffer.as_mut().expect("set above"))?;
                cpu::sgd_momentum(pv, b, g, first, &sgd_momentum_hyper(h));
            }
            Hyper::Adam(h) => {
                if state.exp_avg.is_none() {
                    state.exp_avg = Some(zeros()?);
                }
                if state.exp_avg_sq.is_none() {
                    state.exp_avg_sq = Some(zeros()?);
                }
                let m = exclusive_f32(state.exp_avg.as_mut().expect("set above"))?;
                let v = exclusive_f32(state.exp_avg_sq.as_mut().expect("set above"))?;
                cpu::adam(pv, m, v, g, &adam_scalars(h, state.step + 1));
            }
        }
        Ok(())
    })
}

/// The values of a dense f32 CPU tensor to update in place. A tensor whose storage someone else
/// shares (or that is a view) is first replaced by a private dense copy, so the update is seen
/// through this tensor only, as tensors are values.
fn exclusive_f32(t: &mut Tensor) -> Result<&mut [f32]> {
    if t.f32_slice_mut().is_none() {
        *t = f32_tensor(t.to_vec::<f32>()?, t.shape())?;
    }
    Ok(t.f32_slice_mut()
        .expect("a fresh dense f32 tensor is exclusive"))
}

/// The GPU update: one fused kernel writing new buffers (cheap with the caching allocator).
fn update_gpu(
    p: &Parameter,
    value: &Tensor,
    grad: &Tensor,
    hyper: &Hyper,
    state: &mut ParamState,
) -> Result<()> {
    let (shape, device) = (value.shape().to_vec(), value.device().clone());
    let n = value.numel();
    match hyper {
        Hyper::Sgd(h) if h.momentum == 0.0 => {
            let (neg_lr, wd) = (-h.lr as f32, h.weight_decay as f32);
            let b = gpu::sgd(buf(value)?, buf(grad)?, n, neg_lr, wd)?;
            p.set(buf_tensor(b, &shape, &device)?)?;
        }
        Hyper::Sgd(h) => {
            let old = state
                .momentum_buffer
                .as_ref()
                .map(Tensor::contiguous)
                .transpose()?;
            let old_buf = old.as_ref().map(buf).transpose()?;
            let k = sgd_momentum_hyper(h);
            let (a, b) = gpu::sgd_momentum(buf(value)?, buf(grad)?, old_buf, n, &k)?;
            p.set(buf_tensor(a, &shape, &device)?)?;
            state.momentum_buffer = Some(buf_tensor(b, &shape, &device)?);
        }
        Hyper::Adam(h) => {
            let zeros = || Tensor::zeros(&shape, DType::F32, &device);
            let m = match &state.exp_avg {
                Some(m) => m.contiguous()?,
                None => zeros()?,
            };
            let v = match &state.exp_avg_sq {
                Some(v) => v.contiguous()?,
                None => zeros()?,
            };
            let s = adam_scalars(h, state.step + 1);
            let (a, b, c) = gpu::adam(buf(value)?, buf(grad)?, buf(&m)?, buf(&v)?, n, &s)?;
            p.set(buf_tensor(a, &shape, &device)?)?;
            state.exp_avg = Some(buf_tensor(b, &shape, &device)?);
            state.exp_avg_sq = Some(buf_tensor(c, &shape, &device)?);
        }
    }
    Ok(())
}

/// The scalars of Adam step number `step` (1-based), computed in f64 as torch does in Python.
pub(crate) fn adam_scalars(h: &Adam, step: u64) -> gpu::AdamScalars {
    let (b1, b2) = h.betas;
    let t = step as f64;
    let bc1 = 1.0 - b1.powf(t);
    let bc2 = 1.0 - b2.powf(t);
    gpu::AdamScalars {
        decay: if h.decoupled {
            (1.0 - h.lr * h.weight_decay) as f32
        } else {
            1.0
        },
        l2: if h.decoupled {
            0.0
        } else {
            h.weight_decay as f32
        },
        beta1_weight: (1.0 - b1) as f32,
        beta2: b2 as f32,
        one_minus_beta2: (1.0 - b2) as f32,
        neg_step_size: (-(h.lr / bc1)) as f32,
        bc2_sqrt: bc2.sqrt() as f32,
        eps: h.eps as f32,
    }
}

fn check_grad(name: &str, value: &Tensor, grad: &Tensor) -> Result<()> {
    if grad.shape() != value.shape()
        || grad.dtype() != DType::F32
        || !grad.device().same(value.device())
    {
        return Err(Error::Shape(format!(
            "parameter '{name}' {:?} f32 on {} has a gradient {:?} {} on {}",
            value.shape(),
            value.device(),
            grad.shape(),
            grad.dtype(),
            grad.device()
        )));
    }
    Ok(())
}

/// A state buffer, checked against its parameter.
fn check_state(name: &str, what: &str, value: &Tensor, t: &Tensor) -> Result<()> {
    if t.shape() != value.shape() || t.dtype() != DType::F32 || !t.device().same(value.device()) {
        return Err(Error::Shape(format!(
            "optimizer state {what} of parameter '{name}' is {:?} {} on {}, the parameter {:?} f32 on {}",
            t.shape(),
            t.dtype(),
            t.device(),
            value.shape(),
            value.device()
        )));
    }
    Ok(())
}

/// The values of a dense f32 CPU tensor (checked by the callers).
pub(crate) fn f32s(t: &Tensor) -> &[f32] {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => &v[..t.numel()],
        _ => unreachable!("f32s of a dense f32 CPU tensor"),
    }
}

/// The buffer of a dense GPU tensor.
pub(crate) fn buf(t: &Tensor) -> Result<&GpuBuffer> {
    match t.storage() {
        Storage::Gpu(b) => Ok(b),
        Storage::Cpu(_) => Err(Error::Device(format!(
            "optimizer: a CPU tensor {:?} among GPU tensors",
            t.shape()
        ))),
    }
}

pub(crate) fn f32_tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_parts(
        Storage::Cpu(CpuStorage::F32(v)),
        Layout::contiguous(shape)?,
        DType::F32,
        Device::Cpu,
    ))
}

pub(crate) fn buf_tensor(b: GpuBuffer, shape: &[usize], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_parts(
        Storage::Gpu(b),
        Layout::contiguous(shape)?,
        DType::F32,
        device.clone(),
    ))
}

/// Every kernel of kernels/optim.cu through the public API (two steps of each optimizer, the
/// scaler's unscale with an inf, clipping), on `device` against the CPU. The tensors have an odd
/// number of elements, so both the 16-byte vector loop and the scalar tail run.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::{compare, split_pair};
    use crate::train::{clip_grad_norm, GradScaler};
    let shape = [3, 257];
    let cpu = Device::Cpu;
    let init = Tensor::randn(&shape, 0.0, 1.0, seed, DType::F32, &cpu)?;
    let grads = [
        Tensor::randn(&shape, 0.0, 1.0, seed + 1, DType::F32, &cpu)?,
        Tensor::randn(&shape, 0.0, 1.0, seed + 2, DType::F32, &cpu)?,
    ];
    // the parameter after two steps of `hyper` on `dev`
    let train = |hyper: Hyper, dev: &Device| -> Result<Tensor> {
        let p = Parameter::new("w", init.to_device(dev)?);
        let mut opt = Optimizer::single(vec![p.clone()], hyper)?;
        for g in &grads {
            p.set_grad(Some(g.to_device(dev)?));
            opt.step()?;
        }
        Ok(p.tensor())
    };
    let momentum = Sgd {
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 1e-3,
        ..Sgd::new(0.05)
    };
    let cases: [(&str, Hyper); 5] = [
        (
            "sgd_f32",
            Sgd {
                weight_decay: 1e-2,
                ..Sgd::new(0.1)
            }
            .into(),
        ),
        ("sgd_momentum_f32", momentum.into()),
        (
            "sgd_momentum_f32",
            Sgd {
                nesterov: true,
                dampening: 0.0,
                ..momentum
            }
            .into(),
        ),
        (
            "adam_f32",
            Adam {
                weight_decay: 1e-2,
                ..Adam::new(1e-3)
            }
            .into(),
        ),
        ("adam_f32", Adam::adamw(1e-3).into()),
    ];
    let mut rows = Vec::new();
    for (name, hyper) in cases {
        rows.push(compare(
            name,
            DType::F32,
            &shape,
            train(hyper, device),
            train(hyper, &cpu),
            1e-5,
        ));
    }
    // unscale by 1/1024 with one inf among the gradients: same values, flag raised on both
    let unscale = |dev: &Device| -> Result<Tensor> {
        let mut g = grads[0].to_vec::<f32>()?;
        g[700] = f32::INFINITY;
        let p = Parameter::new("w", init.to_device(dev)?);
        p.set_grad(Some(Tensor::from_vec(g, &shape, dev)?));
        let opt = Optimizer::single(vec![p.clone()], Sgd::new(0.1))?;
        let mut scaler = GradScaler::with_options(1024.0, 2.0, 0.5, 10)?;
        if !scaler.unscale(&opt)? {
            return Err(Error::Argument("unscale missed an inf gradient".into()));
        }
        p.grad()
            .ok_or_else(|| Error::Argument("unscale dropped the gradient".into()))
    };
    rows.push(compare(
        "amp_unscale_f32",
        DType::F32,
        &shape,
        unscale(device),
        unscale(&cpu),
        1e-5,
    ));
    // clipping: three gradients, one large enough for several partial blocks
    let clip = |dev: &Device| -> Result<(Tensor, Tensor)> {
        let big = Tensor::randn(&[9000], 0.0, 1.0, seed + 3, DType::F32, &cpu)?;
        let params: Vec<Parameter> = [&grads[0], &grads[1], &big]
            .iter()
            .enumerate()
            .map(|(i, g)| -> Result<Parameter> {
                let p = Parameter::new(format!("p{i}"), g.to_device(dev)?);
                p.set_grad(Some(g.to_device(dev)?));
                Ok(p)
            })
            .collect::<Result<_>>()?;
        let norm = clip_grad_norm(&params, 2.5)?;
        let g = params[2]
            .grad()
            .ok_or_else(|| Error::Argument("clip dropped a gradient".into()))?;
        Ok((norm, g))
    };
    let ((got_norm, got_grad), (want_norm, want_grad)) =
        (split_pair(clip(device)), split_pair(clip(&cpu)));
    let again = |r: &Result<Tensor>| match r {
        Ok(t) => Ok(t.clone()),
        Err(e) => Err(Error::Argument(e.to_string())),
    };
    // the norm comes out of both reduction kernels; the coefficient shows in the scaled gradients
    rows.push(compare(
        "sumsq_partial_f32",
        DType::F32,
        &[9000],
        again(&got_norm),
        again(&want_norm),
        1e-5,
    ));
    rows.push(compare(
        "clip_coef_f32",
        DType::F32,
        &[9000],
        got_norm,
        want_norm,
        1e-5,
    ));
    rows.push(compare(
        "scale_by_f32",
        DType::F32,
        &[9000],
        got_grad,
        want_grad,
        1e-5,
    ));
    Ok(rows)
}
