//! Launches of kernels/optim.cu; the file's header comment explains the kernels.

use super::cpu::SgdMomentum;
use crate::device::{GpuBuffer, KernelArgs, LaunchConfig};
use crate::error::Result;
use crate::ops::{LINEAR_MAX_BLOCKS, LINEAR_THREADS};

/// Mirrors `struct AdamScalars` in kernels/optim.cu: one step's scalars, computed in f64 on the
/// host as torch does and rounded to f32.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AdamScalars {
    pub decay: f32,
    pub l2: f32,
    pub beta1_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub neg_step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
}

/// Threads of the one-block kernels.
const ONE_BLOCK_THREADS: u32 = 256;
/// Elements per block of the sum-of-squares partials, and the most blocks per tensor (two per
/// H100 SM): enough to stream a large gradient at full bandwidth, few partials to add up.
const SUMSQ_PER_BLOCK: usize = 4096;
const SUMSQ_MAX_BLOCKS: usize = 264;

/// A launch over `n` elements processed 4 at a time.
fn linear(n: usize) -> LaunchConfig {
    LaunchConfig::linear(n.div_ceil(4), LINEAR_THREADS, LINEAR_MAX_BLOCKS)
}

fn one_block() -> LaunchConfig {
    LaunchConfig {
        grid: (1, 1, 1),
        block: (ONE_BLOCK_THREADS, 1, 1),
        shared_bytes: 0,
    }
}

fn alloc_like(buf: &GpuBuffer, n: usize) -> Result<GpuBuffer> {
    buf.gpu().alloc(n * 4)
}

pub fn sgd(p: &GpuBuffer, g: &GpuBuffer, n: usize, neg_lr: f32, wd: f32) -> Result<GpuBuffer> {
    let out = alloc_like(p, n)?;
    if n > 0 {
        let mut args = KernelArgs::new();
        args.ptr(p, 0)
            .ptr(g, 0)
            .ptr(&out, 0)
            .push(n as i64)
            .push(neg_lr)
            .push(wd);
        p.gpu().launch("sgd_f32", linear(n), &mut args)?;
    }
    Ok(out)
}

pub fn sgd_momentum(
    p: &GpuBuffer,
    g: &GpuBuffer,
    buf: Option<&GpuBuffer>,
    n: usize,
    h: &SgdMomentum,
) -> Result<(GpuBuffer, GpuBuffer)> {
    let (p_out, b_out) = (alloc_like(p, n)?, alloc_like(p, n)?);
    if n > 0 {
        let mut args = KernelArgs::new();
        // the first step does not read the buffer; any valid pointer will do
        args.ptr(p, 0)
            .ptr(g, 0)
            .ptr(buf.unwrap_or(g), 0)
            .ptr(&p_out, 0)
            .ptr(&b_out, 0)
            .push(n as i64)
            .push(h.neg_lr)
            .push(h.weight_decay)
            .push(h.momentum)
            .push(h.one_minus_dampening)
            .push(h.nesterov as i32)
            .push(buf.is_none() as i32);
        p.gpu().launch("sgd_momentum_f32", linear(n), &mut args)?;
    }
    Ok((p_out, b_out))
}

pub fn adam(
    p: &GpuBuffer,
    g: &GpuBuffer,
    m: &GpuBuffer,
    v: &GpuBuffer,
    n: usize,
    s: &AdamScalars,
) -> Result<(GpuBuffer, GpuBuffer, GpuBuffer)> {
    let outs = (alloc_like(p, n)?, alloc_like(p, n)?, alloc_like(p, n)?);
    if n > 0 {
        let mut args = KernelArgs::new();
        args.ptr(p, 0)
            .ptr(g, 0)
            .ptr(m, 0)
            .ptr(v, 0)
            .ptr(&outs.0, 0)
            .ptr(&outs.1, 0)
            .ptr(&outs.2, 0)
            .push(n as i64)
            .push(*s);
        p.gpu().launch("adam_f32", linear(n), &mut args)?;
    }
    Ok(outs)
}

/// `g * inv_scale`; sets the int at `found_inf` to 1 when any `g` is not finite.
pub fn unscale(
    g: &GpuBuffer,
    n: usize,
    inv_scale: f32,
    found_inf: &GpuBuffer,
) -> Result<GpuBuffer> {
    let out = alloc_like(g, n)?;
    if n > 0 {
        let mut args = KernelArgs::new();
        args.ptr(g, 0)
            .ptr(&out, 0)
            .push(n as i64)
            .push(inv_scale)
            .ptr(found_inf, 0);
        g.gpu().launch("amp_unscale_f32", linear(n), &mut args)?;
    }
    Ok(out)
}

/// How many partial sums `sumsq_partials` writes for a tensor of `n` elements.
pub fn sumsq_blocks(n: usize) -> usize {
    n.div_ceil(SUMSQ_PER_BLOCK).clamp(1, SUMSQ_MAX_BLOCKS)
}

/// Writes `sumsq_blocks(n)` partial sums of squares of `g` at float index `slot` of `partials`.
pub fn sumsq_partials(g: &GpuBuffer, n: usize, partials: &GpuBuffer, slot: usize) -> Result<()> {
    let blocks = sumsq_blocks(n);
    let mut args = KernelArgs::new();
    args.ptr(g, 0).push(n as i64).ptr(partials, slot * 4);
    let cfg = LaunchConfig {
        grid: (blocks as u32, 1, 1),
        block: (LINEAR_THREADS, 1, 1),
        shared_bytes: 0,
    };
    g.gpu().launch("sumsq_partial_f32", cfg, &mut args)
}

/// Two floats: the total norm (sqrt of the sum of the `count` partials) and the clip coefficient.
pub fn clip_coef(partials: &GpuBuffer, count: usize, max_norm: f32) -> Result<GpuBuffer> {
    let out = partials.gpu().alloc(8)?;
    let mut args = KernelArgs::new();
    args.ptr(partials, 0)
        .push(count as i64)
        .push(max_norm)
        .ptr(&out, 0);
    partials
        .gpu()
        .launch("clip_coef_f32", one_block(), &mut args)?;
    Ok(out)
}

/// `g * factor` where the factor is the float at byte offset `factor_offset` of `factor`.
pub fn scale_by(
    g: &GpuBuffer,
    n: usize,
    factor: &GpuBuffer,
    factor_offset: usize,
) -> Result<GpuBuffer> {
    let out = alloc_like(g, n)?;
    if n > 0 {
        let mut args = KernelArgs::new();
        args.ptr(g, 0)
            .ptr(factor, factor_offset)
            .ptr(&out, 0)
            .push(n as i64);
        g.gpu().launch("scale_by_f32", linear(n), &mut args)?;
    }
    Ok(out)
}
