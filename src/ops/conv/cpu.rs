//! CPU convolution in f32: im2col (multi-threaded) and a GEMM per group through the `gemm` crate,
//! then one pass for bias, residual and ReLU; backward as a GEMM and a col2im gather (dgrad) and
//! a GEMM (wgrad). A 1x1 stride-1 unpadded convolution uses the input as the im2col matrix.
//! The forward pass of a convolution with many output rows gives each thread a run of rows and
//! works through it in tiles: the im2col block of a tile (`TILE_BUDGET` floats), its GEMM on that
//! thread, then bias, residual and ReLU while the tile is still in the core's cache; those tiles
//! multiply by a `[K, O]` copy of the weight made once per call (the layout the crate packs
//! cheaply). Backward passes build im2col (or its gradient) in chunks of output rows near
//! `COL_BUDGET` floats. These matrices live in a per-thread scratch buffer reused across calls.
//! GEMMs of few rows (late layers at batch 1) split their columns over the threads themselves.
//!
//! For f16/bf16 (converted to f32 by the caller) the GEMM results are rounded to the dtype before
//! the epilogue or col2im, where the GPU's GEMM stores them in the dtype: the same rounding points
//! as the kernels, so the CPU is their twin.

use super::ConvGeom;
use crate::dtype::DType;
use crate::ops::cpu::parallel_rows;
use gemm::Parallelism;

/// Floats of im2col (or its gradient) built at a time.
const COL_BUDGET: usize = 1 << 22;
/// A matrix inside a slice: its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Mat {
    offset: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    fn new(offset: usize, rs: usize, cs: usize) -> Mat {
        Mat { offset, rs, cs }
    }

    /// True when every element of a `rows x cols` matrix lies inside `len` elements.
    fn fits(&self, rows: usize, cols: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < len
    }
}

/// Whether a GEMM may use every core or runs on the calling thread (inside our own split).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Threads {
    All,
    One,
}

/// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)` through the `gemm` crate.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    d: Mat,
    accumulate: bool,
    lhs: &[f32],
    a: Mat,
    rhs: &[f32],
    b: Mat,
    threads: Threads,
) {
    assert!(
        d.fits(m, n, dst.len()) && a.fits(m, k, lhs.len()) && b.fits(k, n, rhs.len()),
        "conv gemm operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[d.offset + i * d.rs + j * d.cs] = 0.0;
                }
            }
        }
        return;
    }
    let threads = match threads {
        Threads::All => std::thread::available_parallelism().map_or(1, |t| t.get()),
        Threads::One => 1,
    };
    if m > SPLIT_N_MAX_M || threads == 1 || n < SPLIT_N_MIN_COLS * threads {
        // SAFETY: the assertion above checked that every element the three matrices address
        // lies inside its slice; dst is borrowed mutably, so nothing else touches it meanwhile.
        unsafe {
            gemm_raw(
                (m, n, k),
                dst.as_mut_ptr(),
                d,
                accumulate,
                lhs,
                a,
                rhs,
                b,
                threads > 1,
            )
        };
        return;
    }
    // Few rows (late layers at batch 1): the crate's own split leaves a core idle, so give each
    // thread a block of columns (output channels) and the weights that go with it.
    let per = n.div_ceil(threads).next_multiple_of(16);
    let dst_addr = dst.as_mut_ptr() as usize;
    std::thread::scope(|scope| {
        for j0 in (0..n).step_by(per) {
            let cols = per.min(n - j0);
            scope.spawn(move || {
                let d = Mat::new(d.offset + j0 * d.cs, d.rs, d.cs);
                let b = Mat::new(b.offset + j0 * b.cs, b.rs, b.cs);
                // SAFETY: as above, every address lies inside its slice; the threads write
                // disjoint column blocks of dst (columns j0..j0 + cols each), and dst stays
                // borrowed mutably by this function until the scope has joined them.
                unsafe {
                    gemm_raw(
                        (m, cols, k),
                        dst_addr as *mut f32,
                        d,
                        accumulate,
                        lhs,
                        a,
                        rhs,
                        b,
                        false,
                    )
                };
            });
        }
    });
}

/// Rows up to which `gemm_f32` splits the columns over threads itself.
const SPLIT_N_MAX_M: usize = 256;
/// Columns per thread at least, for that split.
const SPLIT_N_MIN_COLS: usize = 32;

/// The `gemm` crate's call for `gemm_f32`, on `dst` (the start of the destination slice),
/// multi-threaded by the crate when `parallel`.
///
/// # Safety
/// Every element the three matrices address must lie inside `dst`'s allocation, `lhs` and
/// `rhs`, and nothing else may access the addressed part of `dst` during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    d: Mat,
    accumulate: bool,
    lhs: &[f32],
    a: Mat,
    rhs: &[f32],
    b: Mat,
    parallel: bool,
) {
    // SAFETY: the caller guarantees the bounds and exclusive access.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.add(d.offset),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr().add(a.offset),
            a.cs as isize,
            a.rs as isize,
            rhs.as_ptr().add(b.offset),
            b.cs as isize,
            b.rs as isize,
            1.0, // dst = 1 * dst + 1 * lhs @ rhs (the crate's alpha scales dst)
            1.0,
            false,
            false,
            false,
            if parallel {
                Parallelism::Rayon(0)
            } else {
                Parallelism::None
            },
        )
    }
}

thread_local! {
    /// The im2col matrix (or its gradient) of this thread's last convolution, kept for the next
    /// one: a fresh buffer of several MB costs a page fault per 4 KB on first touch, about as
    /// long as filling it. About `COL_BUDGET` floats per thread, or one image's dgrad matrix
    /// where that is larger.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

thread_local! {
    /// The transposed weight of this thread's last tiled convolution forward, kept for the same
    /// reason as `SCRATCH`.
    static WEIGHT_SCRATCH: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch buffer of `len` floats (stale contents: `f` must write before reading).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&SCRATCH, len, f)
}

/// `with_scratch` on the buffer for a transposed weight.
fn with_weight_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_buffer(&WEIGHT_SCRATCH, len, f)
}

fn with_buffer<R>(
    key: &'static std::thread::LocalKey<std::cell::RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Rounds GEMM results to `dtype` (nothing to do for f32), in place.
fn round_to(v: &mut [f32], dtype: DType) {
    match dtype {
        DType::F16 => v
            .iter_mut()
            .for_each(|x| *x = half::f16::from_f32(*x).to_f32()),
        DType::BF16 => v
            .iter_mut()
            .for_each(|x| *x = half::bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// Output rows per chunk so that `cols` floats per row stay near `COL_BUDGET`.
fn rows_per_chunk(cols: usize, total: usize) -> usize {
    (COL_BUDGET / cols.max(1)).max(64).min(total.max(1))
}

/// The im2col rows `first..first + rows` of `x` into `col` (`rows x groups * K`, zero padding),
/// on several threads when `col` is large.
fn im2col(x: &[f32], g: &ConvGeom, first: usize, col: &mut [f32]) {
    parallel_rows(col, g.groups * g.k(), |row0, chunk| {
        im2col_serial(x, g, first + row0, chunk)
    });
}

/// `im2col` on the calling thread.
fn im2col_serial(x: &[f32], g: &ConvGeom, first: usize, col: &mut [f32]) {
    for (i, row) in col.chunks_mut(g.groups * g.k()).enumerate() {
        let r = first + i;
        let (n, oh, ow) = (r / (g.oh * g.ow), (r / g.ow) % g.oh, r % g.ow);
        if g.groups == 1 && g.dil[1] == 1 {
            im2col_row_runs(x, g, (n, oh, ow), row);
        } else {
            im2col_row(x, g, (n, oh, ow), row);
        }
    }
}

/// One im2col row, `C/groups` channels at a time.
fn im2col_row(x: &[f32], g: &ConvGeom, (n, oh, ow): (usize, usize, usize), row: &mut [f32]) {
    let cg = g.cg();
    let mut dst = row.chunks_mut(cg);
    for group in 0..g.groups {
        for kh in 0..g.kh {
            let ih = (oh * g.stride[0] + kh * g.dil[0]).checked_sub(g.pad[0]);
            for kw in 0..g.kw {
                let iw = (ow * g.stride[1] + kw * g.dil[1]).checked_sub(g.pad[1]);
                let out = dst.next().expect("im2col row holds groups * K values");
                match (ih, iw) {
                    (Some(ih), Some(iw)) if ih < g.h && iw < g.w => {
                        let at = ((n * g.h + ih) * g.w + iw) * g.c + group * cg;
                        out.copy_from_slice(&x[at..at + cg]);
                    }
                    _ => out.fill(0.0),
                }
            }
        }
    }
}

/// One im2col row of a one-group convolution with no dilation along W: the taps of a kernel row
/// that fall inside the input are one contiguous run of `x` (a single copy of up to KW * C
/// values, which matters for the 3-channel stem), the ones in the padding zeros.
fn im2col_row_runs(x: &[f32], g: &ConvGeom, (n, oh, ow): (usize, usize, usize), row: &mut [f32]) {
    let c = g.c;
    // taps kw in lo..hi read iw = ow * stride - pad + kw inside [0, W)
    let start = (ow * g.stride[1]) as isize - g.pad[1] as isize;
    let lo = (-start).clamp(0, g.kw as isize) as usize;
    let hi = (g.w as isize - start).clamp(lo as isize, g.kw as isize) as usize;
    for (kh, out) in row.chunks_mut(g.kw * c).enumerate() {
        let ih = (oh * g.stride[0] + kh * g.dil[0]).checked_sub(g.pad[0]);
        match ih {
            Some(ih) if ih < g.h && hi > lo => {
                let iw = (start + lo as isize) as usize;
                let at = ((n * g.h + ih) * g.w + iw) * c;
                out[..lo * c].fill(0.0);
                out[lo * c..hi * c].copy_from_slice(&x[at..at + (hi - lo) * c]);
                out[hi * c..].fill(0.0);
            }
            _ => out.fill(0.0),
        }
    }
}

/// `relu(out + bias + residual)` in place on rows of `o` outputs, `residual` holding the same
/// rows as `out`.
fn epilogue(out: &mut [f32], o: usize, bias: Option<&[f32]>, residual: Option<&[f32]>, relu: bool) {
    for (i, row) in out.chunks_mut(o).enumerate() {
        if let Some(b) = bias {
            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
        }
        if let Some(res) = residual {
            let r = &res[i * o..][..o];
            row.iter_mut().zip(r).for_each(|(v, r)| *v += r);
        }
        if relu {
            // max(v, 0) that keeps NaN, as the relu op does; a select, not a branch, so the loop
            // vectorises and half-negative outputs cost no mispredictions
            row.iter_mut()
                .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
        }
    }
}

/// Floats of im2col per tile of output rows in the row-tiled forward: small enough that a tile's
/// block stays in the core's L2 cache from being written to being multiplied.
const TILE_BUDGET: usize = 1 << 18;

/// `relu(conv(x, w) + bias + residual)`, all dense f32 (x NHWC, w OHWI, residual like the output).
pub fn conv_forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    relu: bool,
    g: &ConvGeom,
    dtype: DType,
) -> Vec<f32> {
    let (m, o, og, k) = (g.m(), g.o, g.og(), g.k());
    let ktot = g.groups * k;
    let mut out = vec![0f32; m * o];
    // out[:, group] = col[:, group] @ w[group]^T, w[group] read as a K x Og matrix
    let product = |col: &[f32], rows: usize, dst: &mut [f32], w: Weight, threads: Threads| {
        for group in 0..g.groups {
            gemm_f32(
                (rows, og, k),
                dst,
                Mat::new(group * og, o, 1),
                false,
                col,
                Mat::new(group * k, ktot, 1),
                w.data,
                w.group_kxo(group, og),
                threads,
            );
        }
    };
    // rows `first..` of the output (`dst`): im2col of those rows (unless the input is the im2col
    // matrix) into `col`, the GEMM, rounding and epilogue, all while the rows are in cache
    let rows_done =
        |first: usize, dst: &mut [f32], col: &mut [f32], w: Weight, threads: Threads| {
            let rows = dst.len() / o;
            let lhs = if g.pointwise() {
                &x[first * ktot..][..rows * ktot]
            } else {
                let col = &mut col[..rows * ktot];
                match threads {
                    Threads::All => im2col(x, g, first, col),
                    Threads::One => im2col_serial(x, g, first, col),
                }
                &*col
            };
            product(lhs, rows, dst, w, threads);
            let residual = residual.map(|r| &r[first * o..][..rows * o]);
            let finish = |row0: usize, chunk: &mut [f32]| {
                round_to(chunk, dtype);
                let residual = residual.map(|r| &r[row0 * o..][..chunk.len()]);
                epilogue(chunk, o, bias, residual, relu);
            };
            match threads {
                Threads::All => parallel_rows(dst, o, finish),
                Threads::One => finish(0, dst),
            }
        };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if g.pointwise() || m <= SPLIT_N_MAX_M * cores {
        // a 1x1 convolution (the input is the im2col matrix: the crate's own split of the whole
        // GEMM measured faster than tiles), or few rows (late layers at batch 1): one im2col
        // over the threads, then a GEMM that splits the output channels where the rows are few
        let col_len = if g.pointwise() { 0 } else { m * ktot };
        let w = Weight::ohwi(w, k);
        with_scratch(col_len, |col| rows_done(0, &mut out, col, w, Threads::All));
        return out;
    }
    // many rows: each thread takes a run of rows and works through it a tile at a time. Every
    // tile's GEMM packs the whole weight (the crate's lhs, after it transposes the problem for
    // our row-major output) into panels of output channels: a strided gather from OHWI, repeated
    // per tile, but a contiguous copy from [K, O]. So the weight is transposed once per call,
    // which costs a pass over it against one per tile (benches/RESULTS.md, "gemm layout").
    let tile = (TILE_BUDGET / ktot.max(1)).clamp(16, m);
    let per = m.div_ceil(cores).next_multiple_of(tile);
    let col_len = if g.pointwise() { 0 } else { tile * ktot };
    with_weight_scratch(o * k, |w_t| {
        transpose_into(w, o, k, w_t);
        let w = Weight::transposed(w_t, o);
        with_scratch(cores * col_len, |scratch| {
            let mut cols = scratch.chunks_mut(col_len.max(1));
            std::thread::scope(|s| {
                for (t, dst) in out.chunks_mut(per * o).enumerate() {
                    let col = cols.next().unwrap_or_default();
                    let rows_done = &rows_done;
                    s.spawn(move || {
                        for (i, dst) in dst.chunks_mut(tile * o).enumerate() {
                            rows_done(t * per + i * tile, dst, col, w, Threads::One);
                        }
                    });
                }
            });
        });
    });
    out
}

/// A convolution weight as the forward's GEMMs read it: `[O, K]` (OHWI, as stored) or its
/// `[K, O]` transpose, K = KH * KW * C/groups.
#[derive(Clone, Copy)]
struct Weight<'a> {
    data: &'a [f32],
    /// Distance between consecutive K entries of one output channel.
    k_stride: usize,
    /// Distance between consecutive output channels.
    o_stride: usize,
}

impl<'a> Weight<'a> {
    fn ohwi(data: &'a [f32], k: usize) -> Weight<'a> {
        Weight {
            data,
            k_stride: 1,
            o_stride: k,
        }
    }

    fn transposed(data: &'a [f32], o: usize) -> Weight<'a> {
        Weight {
            data,
            k_stride: o,
            o_stride: 1,
        }
    }

    /// The K x Og matrix of group `group`.
    fn group_kxo(&self, group: usize, og: usize) -> Mat {
        Mat::new(group * og * self.o_stride, self.k_stride, self.o_stride)
    }
}

/// Output channels per block of `transpose_into`: a block reads whole cache lines of K values
/// from this many weight rows.
const TRANSPOSE_BLOCK: usize = 16;

/// `w` (`o x k`, row-major) into `w_t` (`k x o`, row-major), on several threads when large.
fn transpose_into(w: &[f32], o: usize, k: usize, w_t: &mut [f32]) {
    parallel_rows(w_t, o, |k0, rows| {
        for (kb, block) in rows.chunks_mut(TRANSPOSE_BLOCK * o).enumerate() {
            let k_first = k0 + kb * TRANSPOSE_BLOCK;
            let k_len = block.len() / o;
            for (oi, w_row) in w.chunks(k).enumerate() {
                for (j, v) in w_row[k_first..k_first + k_len].iter().enumerate() {
                    block[j * o + oi] = *v;
                }
            }
        }
    });
}

/// The input gradient `[N, H, W, C]` from the output gradient `dy [M, O]`.
pub fn conv_dgrad(dy: &[f32], w: &[f32], g: &ConvGeom, dtype: DType) -> Vec<f32> {
    let (o, og, cg, k) = (g.o, g.og(), g.cg(), g.k());
    let ktot = g.groups * k;
    let mut dx = vec![0f32; g.n * g.h * g.w * g.c];
    if g.pointwise() {
        // dx[:, group] = dy[:, group] @ w[group] (Og x Cg)
        for group in 0..g.groups {
            gemm_f32(
                (g.m(), cg, og),
                &mut dx,
                Mat::new(group * cg, g.c, 1),
                false,
                dy,
                Mat::new(group * og, o, 1),
                w,
                Mat::new(group * og * cg, cg, 1),
                Threads::All,
            );
        }
        round_to(&mut dx, dtype);
        return dx;
    }
    // whole images at a time: col2im needs every output pixel that reads an input pixel
    let pixels = g.oh * g.ow;
    let images = (COL_BUDGET / (pixels * ktot).max(1)).clamp(1, g.n.max(1));
    let image_len = g.h * g.w * g.c;
    with_scratch(images * pixels * ktot, |dcol| {
        for (chunk, dx_chunk) in dx.chunks_mut(images * image_len).enumerate() {
            let n0 = chunk * images;
            let rows = dx_chunk.len() / image_len * pixels;
            let dcol = &mut dcol[..rows * ktot];
            let dy_chunk = &dy[n0 * pixels * o..][..rows * o];
            for group in 0..g.groups {
                gemm_f32(
                    (rows, k, og),
                    dcol,
                    Mat::new(group * k, ktot, 1),
                    false,
                    dy_chunk,
                    Mat::new(group * og, o, 1),
                    w,
                    Mat::new(group * og * k, k, 1),
                    Threads::All,
                );
            }
            round_to(dcol, dtype);
            col2im(dcol, g, dx_chunk);
        }
    });
    dx
}

/// Sums the im2col gradient `dcol` (whole images) into the input gradient `dx` of those images:
/// every input pixel gathers the (output pixel, kh, kw) entries that read it.
fn col2im(dcol: &[f32], g: &ConvGeom, dx: &mut [f32]) {
    let (cg, ktot) = (g.cg(), g.groups * g.k());
    let row_len = g.w * g.c;
    // the output position that reads input `i` through kernel tap `t`, if any
    let source = |i: usize, t: usize, axis: usize, out_len: usize| -> Option<usize> {
        let shifted = (i + g.pad[axis]).checked_sub(t * g.dil[axis])?;
        (shifted % g.stride[axis] == 0 && shifted / g.stride[axis] < out_len)
            .then_some(shifted / g.stride[axis])
    };
    parallel_rows(dx, row_len, |row0, chunk| {
        for (i, row) in chunk.chunks_mut(row_len).enumerate() {
            let (n, ih) = ((row0 + i) / g.h, (row0 + i) % g.h);
            for kh in 0..g.kh {
                let Some(oh) = source(ih, kh, 0, g.oh) else {
                    continue;
                };
                for (iw, pixel) in row.chunks_mut(g.c).enumerate() {
                    for kw in 0..g.kw {
                        let Some(ow) = source(iw, kw, 1, g.ow) else {
                            continue;
                        };
                        let r = (n * g.oh + oh) * g.ow + ow;
                        for group in 0..g.groups {
                            let at = r * ktot + group * g.k() + (kh * g.kw + kw) * cg;
                            let src = &dcol[at..at + cg];
                            let dst = &mut pixel[group * cg..][..cg];
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            }
        }
    });
}

/// The weight gradient `[O, KH, KW, Cg]` from the input and the output gradient `dy [M, O]`.
pub fn conv_wgrad(x: &[f32], dy: &[f32], g: &ConvGeom) -> Vec<f32> {
    let (m, o, og, k) = (g.m(), g.o, g.og(), g.k());
    let ktot = g.groups * k;
    let mut dw = vec![0f32; o * k];
    // dw[group] (Og x K) += dy[:, group]^T (Og x rows, strides (1, O)) @ col[:, group]
    let product = |col: &[f32], dy: &[f32], rows: usize, dw: &mut [f32], accumulate: bool| {
        for group in 0..g.groups {
            gemm_f32(
                (og, k, rows),
                dw,
                Mat::new(group * og * k, k, 1),
                accumulate,
                dy,
                Mat::new(group * og, 1, o),
                col,
                Mat::new(group * k, ktot, 1),
                Threads::All,
            );
        }
    };
    if g.pointwise() {
        product(x, dy, m, &mut dw, false);
        return dw;
    }
    let chunk = rows_per_chunk(ktot, m);
    with_scratch(chunk.min(m) * ktot, |col| {
        for first in (0..m).step_by(chunk) {
            let rows = chunk.min(m - first);
            let col = &mut col[..rows * ktot];
            im2col(x, g, first, col);
            product(col, &dy[first * o..][..rows * o], rows, &mut dw, first > 0);
        }
    });
    dw
}
