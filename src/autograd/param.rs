//! Trainable parameters: a named tensor that keeps its identity across updates, so the tape can
//! route gradients to it, plus its accumulated gradient.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

struct Inner {
    id: u64,
    name: String,
    value: RwLock<Tensor>,
    grad: Mutex<Option<Tensor>>,
    trainable: AtomicBool,
}

/// A handle to a parameter; clones share it.
#[derive(Clone)]
pub struct Parameter(Arc<Inner>);

fn registry() -> &'static Mutex<HashMap<u64, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<u64, Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

pub(super) fn lookup(id: u64) -> Option<Parameter> {
    registry()
        .lock()
        .unwrap()
        .get(&id)
        .and_then(Weak::upgrade)
        .map(Parameter)
}

impl Drop for Inner {
    fn drop(&mut self) {
        registry().lock().unwrap().remove(&self.id);
    }
}

impl Parameter {
    pub fn new(name: impl Into<String>, value: Tensor) -> Parameter {
        let id = crate::tape::next_id();
        let inner = Arc::new(Inner {
            id,
            name: name.into(),
            value: RwLock::new(value.detach()),
            grad: Mutex::new(None),
            trainable: AtomicBool::new(true),
        });
        registry()
            .lock()
            .unwrap()
            .insert(id, Arc::downgrade(&inner));
        Parameter(inner)
    }

    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The current value, as the tensor the tape knows this parameter by.
    pub fn tensor(&self) -> Tensor {
        self.0
            .value
            .read()
            .unwrap()
            .clone()
            .with_identity(self.0.id, self.is_trainable())
    }

    /// Replaces the value (an optimizer step, loading a checkpoint); shape, dtype and device must
    /// stay the same.
    pub fn set(&self, value: Tensor) -> Result<()> {
        let mut v = self.0.value.write().unwrap();
        if value.shape() != v.shape()
            || value.dtype() != v.dtype()
            || !value.device().same(v.device())
        {
            return Err(Error::Shape(format!(
                "parameter {}: new value {:?} {} on {} does not match {:?} {} on {}",
                self.0.name,
                value.shape(),
                value.dtype(),
                value.device(),
                v.shape(),
                v.dtype(),
                v.device()
            )));
        }
        *v = value.detach();
        Ok(())
    }

    /// Moves the value to `device` (and drops the gradient, which stays where it was made).
    pub fn move_to(&self, device: &crate::device::Device) -> Result<()> {
        let mut v = self.0.value.write().unwrap();
        if !v.device().same(device) {
            *v = v.to_device(device)?.detach();
            drop(v);
            self.zero_grad();
        }
        Ok(())
    }

    /// Runs `f` on the stored value itself (the optimizer's in-place CPU update); `f` keeps its
    /// shape, dtype and device.
    pub(crate) fn update_value<R>(&self, f: impl FnOnce(&mut Tensor) -> Result<R>) -> Result<R> {
        f(&mut self.0.value.write().unwrap())
    }

    pub fn grad(&self) -> Option<Tensor> {
        self.0.grad.lock().unwrap().clone()
    }

    pub fn set_grad(&self, grad: Option<Tensor>) {
        *self.0.grad.lock().unwrap() = grad;
    }

    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    pub(super) fn accumulate_grad(&self, g: Tensor) -> Result<()> {
        let mut slot = self.0.grad.lock().unwrap();
        *slot = Some(match slot.take() {
            Some(old) => old.add(&g)?,
            None => g.detach(),
        });
        Ok(())
    }

    pub fn is_trainable(&self) -> bool {
        self.0.trainable.load(Ordering::Relaxed)
    }

    /// A frozen parameter records nothing on the tape and gets no gradient.
    pub fn set_trainable(&self, on: bool) {
        self.0.trainable.store(on, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Parameter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Parameter({}, {:?})", self.0.name, self.tensor())
    }
}
