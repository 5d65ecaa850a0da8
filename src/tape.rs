//! The tape: the low-level half of autograd that tensors and ops use. Every op that receives an
//! input requiring gradients records a node here (the identities of its output and inputs and a
//! closure mapping the output's gradient to the inputs'); the thread's gradient and autocast
//! switches live here too. `autograd` (above the ops) walks the tape in `backward`.

use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(crate) fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Maps the gradient of a node's output to the gradients of its inputs (None where an input
/// needs none); the flags say which inputs need one.
pub(crate) type BackwardFn = Box<dyn FnOnce(&Tensor, &[bool]) -> Result<Vec<Option<Tensor>>>>;

pub(crate) struct Node {
    pub(crate) output: u64,
    pub(crate) inputs: Vec<(u64, bool)>,
    pub(crate) backward: BackwardFn,
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

/// Takes every node off this thread's tape (for `backward`).
pub(crate) fn take_nodes() -> Vec<Node> {
    TAPE.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

/// Puts `kept` back in front of the nodes recorded since `take_nodes`, keeping the tape's order.
pub(crate) fn restore_nodes(mut kept: Vec<Node>) {
    TAPE.with(|t| {
        let mut tape = t.borrow_mut();
        kept.append(&mut tape);
        *tape = kept;
    });
}
