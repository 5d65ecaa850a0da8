//! CPU twins of kernels/optim.cu: the same f32 operations in the same order, so a CPU step gives
//! the bits the virtual GPU gives. Large tensors are split over threads.

use super::gpu::AdamScalars;

/// Elements per thread below which splitting does not pay.
const PER_THREAD: usize = 1 << 15;
/// Chunk of the sum of squares: partial sums over fixed chunks added in order, so the result
/// does not depend on the number of cores.
const SUMSQ_CHUNK: usize = 1 << 14;

/// Applies `op` to every element: each slice of `inout` is read and overwritten in place, each
/// slice of `ins` only read (all of the same length).
fn update<const NU: usize, const NI: usize>(
    inout: [&mut [f32]; NU],
    ins: [&[f32]; NI],
    op: impl Fn([f32; NU], [f32; NI]) -> [f32; NU] + Sync,
) {
    let n = inout[0].len();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let per = n.div_ceil(cores.min(n / PER_THREAD).max(1)).max(1);
    // per chunk: its in-place slices and input slices, with lengths that agree, so the element
    // loop needs no bounds checks
    let run = |mut inout: [&mut [f32]; NU], ins: [&[f32]; NI]| {
        for i in 0..inout[0].len() {
            let y = op(
                std::array::from_fn(|k| inout[k][i]),
                std::array::from_fn(|k| ins[k][i]),
            );
            for (o, y) in inout.iter_mut().zip(y) {
                o[i] = y;
            }
        }
    };
    let mut chunks = inout.map(|s| s.chunks_mut(per));
    std::thread::scope(|scope| {
        for start in (0..n).step_by(per) {
            let end = (start + per).min(n);
            let io: [&mut [f32]; NU] = std::array::from_fn(|k| chunks[k].next().unwrap());
            let ins: [&[f32]; NI] = std::array::from_fn(|k| &ins[k][start..end]);
            if end == n {
                run(io, ins);
            } else {
                let run = &run;
                scope.spawn(move || run(io, ins));
            }
        }
    });
}

/// SGD without momentum, in place.
pub fn sgd(p: &mut [f32], g: &[f32], neg_lr: f32, weight_decay: f32) {
    update([p], [g], |[p], [g]| {
        let mut d = g;
        if weight_decay != 0.0 {
            d += weight_decay * p;
        }
        [p + neg_lr * d]
    });
}

/// The hyper-parameters of one SGD-with-momentum step, as f32 the kernel receives.
#[derive(Debug, Clone, Copy)]
pub struct SgdMomentum {
    pub neg_lr: f32,
    pub weight_decay: f32,
    pub momentum: f32,
    pub one_minus_dampening: f32,
    pub nesterov: bool,
}

/// SGD with momentum, in place on the parameter and its momentum buffer. On the first step
/// (`first`) the buffer's contents are ignored and it starts as the gradient, as torch does.
pub fn sgd_momentum(p: &mut [f32], buf: &mut [f32], g: &[f32], first: bool, h: &SgdMomentum) {
    update([p, buf], [g], |[p, b], [g]| {
        let mut d = g;
        if h.weight_decay != 0.0 {
            d += h.weight_decay * p;
        }
        let b = if first {
            d
        } else {
            b * h.momentum + h.one_minus_dampening * d
        };
        let d = if h.nesterov { d + h.momentum * b } else { b };
        [p + h.neg_lr * d, b]
    });
}

/// torch's lerp: `self + w * (end - self)` for small weights, the mirrored form otherwise.
fn lerp(s: f32, e: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        s + w * (e - s)
    } else {
        e - (e - s) * (1.0 - w)
    }
}

/// Adam / AdamW, in place on the parameter and its first and second moments.
pub fn adam(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamScalars) {
    update([p, m, v], [g], |[p, m, v], [g]| {
        let p = p * s.decay;
        let mut d = g;
        if s.l2 != 0.0 {
            d += s.l2 * p;
        }
        let m = lerp(m, d, s.beta1_weight);
        let v = v * s.beta2 + s.one_minus_beta2 * d * d;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        [p + s.neg_step_size * m / denom, m, v]
    });
}

/// `g * inv_scale`, and whether any `g` was inf or NaN.
pub fn unscale(g: &[f32], inv_scale: f32) -> (Vec<f32>, bool) {
    let found = g.iter().any(|x| !x.is_finite());
    let mut out = g.to_vec();
    update([&mut out], [], |[x], []| [x * inv_scale]);
    (out, found)
}

/// Sum of squares (f32, fixed chunking).
pub fn sumsq(g: &[f32]) -> f32 {
    g.chunks(SUMSQ_CHUNK)
        .map(|c| c.iter().map(|x| x * x).sum::<f32>())
        .sum()
}

/// `g * factor`.
pub fn scale(g: &[f32], factor: f32) -> Vec<f32> {
    let mut out = g.to_vec();
    update([&mut out], [], |[x], []| [x * factor]);
    out
}
