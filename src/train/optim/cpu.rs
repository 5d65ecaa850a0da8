//! CPU twins of kernels/optim.cu: the same f32 operations in the same order, so a CPU step gives
//! the bits the virtual GPU gives. Large tensors are split over threads.

use super::gpu::AdamScalars;

/// Elements per thread below which splitting does not pay.
const PER_THREAD: usize = 1 << 15;
/// Chunk of the sum of squares: partial sums over fixed chunks added in order, so the result
/// does not depend on the number of cores.
const SUMSQ_CHUNK: usize = 1 << 14;

/// `NO` outputs of `op` applied to each element of the `NI` inputs (all of length `n`).
fn map<const NI: usize, const NO: usize>(
    ins: [&[f32]; NI],
    n: usize,
    op: impl Fn([f32; NI]) -> [f32; NO] + Sync,
) -> [Vec<f32>; NO] {
    let mut outs: [Vec<f32>; NO] = std::array::from_fn(|_| vec![0.0; n]);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let threads = cores.min(n / PER_THREAD).max(1);
    let per = n.div_ceil(threads).max(1);
    let mut chunks: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(per)).map(|_| Vec::new()).collect();
    for out in outs.iter_mut() {
        for (c, chunk) in out.chunks_mut(per).enumerate() {
            chunks[c].push(chunk);
        }
    }
    let run = |c: usize, mut list: Vec<&mut [f32]>| {
        let start = c * per;
        for i in 0..list.first().map_or(0, |l| l.len()) {
            let y = op(std::array::from_fn(|k| ins[k][start + i]));
            for (k, o) in list.iter_mut().enumerate() {
                o[i] = y[k];
            }
        }
    };
    if threads == 1 {
        chunks.into_iter().enumerate().for_each(|(c, l)| run(c, l));
    } else {
        std::thread::scope(|s| {
            for (c, list) in chunks.into_iter().enumerate() {
                let run = &run;
                s.spawn(move || run(c, list));
            }
        });
    }
    outs
}

/// SGD without momentum: the new parameter.
pub fn sgd(p: &[f32], g: &[f32], neg_lr: f32, weight_decay: f32) -> Vec<f32> {
    let [out] = map([p, g], p.len(), |[p, g]| {
        let mut d = g;
        if weight_decay != 0.0 {
            d += weight_decay * p;
        }
        [p + neg_lr * d]
    });
    out
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

/// SGD with momentum: the new parameter and momentum buffer (`buf` is None on the first step).
pub fn sgd_momentum(
    p: &[f32],
    g: &[f32],
    buf: Option<&[f32]>,
    h: &SgdMomentum,
) -> (Vec<f32>, Vec<f32>) {
    let decayed = |p: f32, g: f32| {
        if h.weight_decay != 0.0 {
            g + h.weight_decay * p
        } else {
            g
        }
    };
    let [p_out, b_out] = match buf {
        None => map([p, g], p.len(), |[p, g]| {
            let mut d = decayed(p, g);
            let b = d;
            if h.nesterov {
                d += h.momentum * b;
            }
            [p + h.neg_lr * d, b]
        }),
        Some(buf) => map([p, g, buf], p.len(), |[p, g, b]| {
            let d = decayed(p, g);
            let b = b * h.momentum + h.one_minus_dampening * d;
            let d = if h.nesterov { d + h.momentum * b } else { b };
            [p + h.neg_lr * d, b]
        }),
    };
    (p_out, b_out)
}

/// torch's lerp: `self + w * (end - self)` for small weights, the mirrored form otherwise.
fn lerp(s: f32, e: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        s + w * (e - s)
    } else {
        e - (e - s) * (1.0 - w)
    }
}

/// Adam / AdamW: the new parameter, first and second moments.
pub fn adam(
    p: &[f32],
    g: &[f32],
    m: &[f32],
    v: &[f32],
    s: &AdamScalars,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let [p_out, m_out, v_out] = map([p, g, m, v], p.len(), |[p, g, m, v]| {
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
    (p_out, m_out, v_out)
}

/// `g * inv_scale`, and whether any `g` was inf or NaN.
pub fn unscale(g: &[f32], inv_scale: f32) -> (Vec<f32>, bool) {
    let found = g.iter().any(|x| !x.is_finite());
    let [out] = map([g], g.len(), |[x]| [x * inv_scale]);
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
    let [out] = map([g], g.len(), |[x]| [x * factor]);
    out
}
