//! Reverse-mode automatic differentiation on a tape (define-by-run).
//!
//! Every op that receives an input requiring gradients records a node: the identities of its
//! output and inputs, and a closure that maps the output's gradient to the inputs' gradients.
//! `backward(loss)` walks the tape from the newest node to the oldest, runs the closures of the
//! nodes the loss depends on (and removes them), and accumulates gradients into parameters.
//! Ops whose inputs require no gradient (frozen parameters, data, anything under `no_grad`)
//! record nothing and cost nothing.

mod gradcheck;
mod param;

pub use gradcheck::{gradcheck, GradCheck};
pub use param::Parameter;

use crate::dtype::DType;
use crate::error::{shape_err, Result};
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Maps the gradient of a node's output to the gradients of its inputs (None where an input
/// needs none); the flags say which inputs need one.
type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

struct Node {
    output: u64,
    inputs: Vec<(u64, bool)>,
    backward: BackwardFn,
}

thread_local! {
    static TAPE: RefCell<Vec<Node>> = const { RefCell::new(Vec::new()) };
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
    static AUTOCAST: Cell<Option<DType>> = const { Cell::new(None) };
}

/// Records `output = op(inputs)` when gradients are enabled and an input requires them; returns
/// the output marked accordingly. Op implementations call this once per op.
pub(crate) fn record<F>(output: Tensor, inputs: &[&Tensor], backward: F) -> Tensor
where
    F: FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>> + 'static,
{
    if !is_grad_enabled() || !inputs.iter().any(|t| t.is_requires_grad()) {
        return output;
    }
    let output = output.requires_grad();
    let node = Node {
        output: output.id(),
        inputs: inputs
            .iter()
            .map(|t| (t.id(), t.is_requires_grad()))
            .collect(),
        backward: Box::new(backward),
    };
    TAPE.with(|t| t.borrow_mut().push(node));
    output
}

pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Runs `f` with gradient recording off (evaluation, optimizer updates, backward itself).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let before = GRAD_ENABLED.with(|g| g.replace(false));
    let _restore = Restore(|| GRAD_ENABLED.with(|g| g.set(before)));
    f()
}

/// Runs `f` with matrix products (and later convolutions and attention) computed in `dtype`
/// (bf16 or f16); reductions, norms, softmax and losses stay in f32.
pub fn autocast<R>(dtype: DType, f: impl FnOnce() -> R) -> R {
    let before = AUTOCAST.with(|a| a.replace(Some(dtype)));
    let _restore = Restore(|| AUTOCAST.with(|a| a.set(before)));
    f()
}

/// The dtype matrix products use inside an `autocast` scope.
pub fn autocast_dtype() -> Option<DType> {
    AUTOCAST.with(Cell::get)
}

/// Inside an `autocast` scope, an f16 or bf16 `t` cast to f32 (reductions, softmax and losses run
/// in f32 there, as under torch.autocast); otherwise `t` itself.
pub(crate) fn autocast_to_f32(t: &Tensor) -> Result<Tensor> {
    match autocast_dtype() {
        Some(_) if matches!(t.dtype(), DType::F16 | DType::BF16) => t.to_dtype(DType::F32),
        _ => Ok(t.clone()),
    }
}

/// Number of nodes waiting on this thread's tape.
pub fn tape_len() -> usize {
    TAPE.with(|t| t.borrow().len())
}

/// Drops every recorded node (e.g. after a forward pass whose loss is not needed).
pub fn clear_tape() {
    TAPE.with(|t| t.borrow_mut().clear());
}

struct Restore<F: FnMut()>(F);
impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Gradients of the leaves that required them, by tensor identity.
#[derive(Default, Debug)]
pub struct Gradients(HashMap<u64, Tensor>);

impl Gradients {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.0.get(&t.id())
    }
}

/// Back-propagates from a one-element `loss`: gradients of parameters are added to what they
/// already hold (so several backward calls accumulate until `zero_grad`), and the gradients of
/// every other leaf that requires them are returned. The nodes used are removed from the tape.
pub fn backward(loss: &Tensor) -> Result<Gradients> {
    if loss.numel() != 1 {
        return shape_err!(
            "backward needs a one-element loss, got shape {:?}",
            loss.shape()
        );
    }
    let seed = no_grad(|| Tensor::ones(loss.shape(), loss.dtype(), loss.device()))?;
    backward_with(loss, seed)
}

/// Back-propagates `grad` (the gradient of some scalar with respect to `output`).
pub fn backward_with(output: &Tensor, grad: Tensor) -> Result<Gradients> {
    if grad.shape() != output.shape() {
        return shape_err!(
            "gradient of shape {:?} for an output of shape {:?}",
            grad.shape(),
            output.shape()
        );
    }
    let nodes = TAPE.with(|t| std::mem::take(&mut *t.borrow_mut()));
    let mut grads: HashMap<u64, Tensor> = HashMap::from([(output.id(), grad)]);
    let mut kept = Vec::new();
    let result = no_grad(|| -> Result<()> {
        let mut pending = nodes.into_iter().rev();
        for node in pending.by_ref() {
            let Some(g) = grads.remove(&node.output) else {
                kept.push(node);
                continue;
            };
            let needs: Vec<bool> = node.inputs.iter().map(|&(_, r)| r).collect();
            let input_grads = (node.backward)(&g, &needs)?;
            for (&(id, requires), gi) in node.inputs.iter().zip(input_grads) {
                if let (true, Some(gi)) = (requires, gi) {
                    accumulate(&mut grads, id, gi)?;
                }
            }
        }
        Ok(())
    });
    // nodes the loss did not depend on stay for a later backward, in their original order
    kept.reverse();
    TAPE.with(|t| {
        let mut tape = t.borrow_mut();
        kept.append(&mut tape);
        *tape = kept;
    });
    result?;
    no_grad(|| {
        let mut leaves = HashMap::new();
        for (id, g) in grads {
            match param::lookup(id) {
                Some(p) => p.accumulate_grad(g)?,
                None => {
                    leaves.insert(id, g);
                }
            }
        }
        Ok(Gradients(leaves))
    })
}

fn accumulate(grads: &mut HashMap<u64, Tensor>, id: u64, g: Tensor) -> Result<()> {
    let sum = match grads.remove(&id) {
        Some(old) => old.add(&g)?,
        None => g,
    };
    grads.insert(id, sum);
    Ok(())
}

/// Sums `grad` over the dimensions that broadcasting added or stretched, giving `shape`: the
/// backward of every broadcasting op.
pub fn sum_to_shape(grad: &Tensor, shape: &[usize]) -> Result<Tensor> {
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
