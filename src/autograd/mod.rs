//! Reverse-mode automatic differentiation on a tape (define-by-run).
//!
//! Every op that receives an input requiring gradients records a node on the tape (`crate::tape`):
//! the identities of its output and inputs, and a closure that maps the output's gradient to the
//! inputs' gradients. `backward(loss)` walks the tape from the newest node to the oldest, runs the closures of the
//! nodes the loss depends on (and removes them), and accumulates gradients into parameters.
//! Ops whose inputs require no gradient (frozen parameters, data, anything under `no_grad`)
//! record nothing and cost nothing.

mod gradcheck;
mod param;

pub use gradcheck::{gradcheck, GradCheck};
pub use param::Parameter;

pub use crate::tape::{autocast, autocast_dtype, clear_tape, is_grad_enabled, no_grad, tape_len};

use crate::error::{shape_err, Result};
use crate::tape;
use crate::tensor::Tensor;
use std::collections::HashMap;

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
    let nodes = tape::take_nodes();
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
    tape::restore_nodes(kept);
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
