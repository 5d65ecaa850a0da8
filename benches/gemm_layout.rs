//! `cargo bench --bench gemm_layout`: the `gemm` crate's f32 GEMM at the shapes of our CPU
//! convolutions and linear layers, once per layout of the weight, to choose the layout it is fast
//! with. Each product is called as the engine calls it (src/ops/conv/cpu.rs: per-thread tiles of
//! output rows in the convolution forward, the crate's own split for 1x1 convolutions, a column
//! split for <= 256 rows; chunks of rows for dgrad and wgrad; one call for a linear layer), on
//! random data. The layouts alternate within each round, so both see the same load; the table has
//! the median of the rounds, the ratio, and whether both layouts gave the same bits.
//!
//! Weight layouts: `[O, K]` (PyTorch's, with K = KH * KW * Cin: OHWI for a convolution, [out, in]
//! for a linear layer) against `[K, O]` (HWIO, [in, out]). Forward `y = x w^T` reads the weight as
//! the right-hand K x O operand, dgrad `dx = dy w` as O x K, wgrad writes it.

use gemm::Parallelism;
use std::time::Instant;

/// Which of the two weight layouts.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    /// `[O, K]` row-major.
    OK,
    /// `[K, O]` row-major.
    KO,
}

/// A row-major or strided matrix operand: pointer offset 0, row and column strides.
#[derive(Clone, Copy)]
struct Strides {
    rs: usize,
    cs: usize,
}

const fn st(rs: usize, cs: usize) -> Strides {
    Strides { rs, cs }
}

/// `dst (m x n) [+]= lhs (m x k) @ rhs (k x n)`.
#[allow(clippy::too_many_arguments)]
fn gemm(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    d: Strides,
    accumulate: bool,
    lhs: &[f32],
    a: Strides,
    rhs: &[f32],
    b: Strides,
    par: Parallelism,
) {
    assert!(m == 0 || n == 0 || (m - 1) * d.rs + (n - 1) * d.cs < dst.len());
    assert!(m == 0 || k == 0 || (m - 1) * a.rs + (k - 1) * a.cs < lhs.len());
    assert!(k == 0 || n == 0 || (k - 1) * b.rs + (n - 1) * b.cs < rhs.len());
    // SAFETY: the assertions check that every addressed element lies inside its slice; dst is
    // borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            d.cs as isize,
            d.rs as isize,
            accumulate,
            lhs.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            rhs.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// The weight read as the K x O right-hand side of `y = x w^T`.
fn w_kxo(layout: Layout, k: usize, o: usize) -> Strides {
    match layout {
        Layout::OK => st(1, k),
        Layout::KO => st(o, 1),
    }
}

/// The weight read as the O x K right-hand side of `dx = dy w`.
fn w_oxk(layout: Layout, k: usize, o: usize) -> Strides {
    match layout {
        Layout::OK => st(k, 1),
        Layout::KO => st(1, o),
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |t| t.get())
}

/// Forward `y (m x o) = col (m x k) @ w^T` as `conv_forward` runs it. `x` holds `m x k` values
/// when `pointwise`, else one tile per thread (stale im2col: the values do not matter).
fn conv_forward(
    (m, k, o): (usize, usize, usize),
    pointwise: bool,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    l: Layout,
) {
    let cores = threads();
    let b = w_kxo(l, k, o);
    if pointwise || m <= 256 * cores {
        if m <= 256 && cores > 1 && o >= 32 * cores {
            let per = o.div_ceil(cores).next_multiple_of(16);
            let y_addr = y.as_mut_ptr() as usize;
            let y_len = y.len();
            std::thread::scope(|s| {
                for j0 in (0..o).step_by(per) {
                    let cols = per.min(o - j0);
                    s.spawn(move || {
                        // SAFETY: each thread writes its own columns j0..j0 + cols of y.
                        let y =
                            unsafe { std::slice::from_raw_parts_mut(y_addr as *mut f32, y_len) };
                        let w_off = j0 * b.cs;
                        gemm(
                            (m, cols, k),
                            &mut y[j0..],
                            st(o, 1),
                            false,
                            x,
                            st(k, 1),
                            &w[w_off..],
                            b,
                            Parallelism::None,
                        );
                    });
                }
            });
        } else {
            gemm(
                (m, o, k),
                y,
                st(o, 1),
                false,
                x,
                st(k, 1),
                w,
                b,
                Parallelism::Rayon(0),
            );
        }
        return;
    }
    let tile = ((1 << 18) / k).clamp(16, m);
    let per = m.div_ceil(cores).next_multiple_of(tile);
    std::thread::scope(|s| {
        for (t, dst) in y.chunks_mut(per * o).enumerate() {
            let col = &x[t * tile * k..][..tile * k];
            s.spawn(move || {
                for dst in dst.chunks_mut(tile * o) {
                    let rows = dst.len() / o;
                    gemm(
                        (rows, o, k),
                        dst,
                        st(o, 1),
                        false,
                        col,
                        st(k, 1),
                        w,
                        b,
                        Parallelism::None,
                    );
                }
            });
        }
    });
}

/// dgrad `dcol (rows x k) = dy (rows x o) @ w` over chunks of whole images, as `conv_dgrad`.
fn conv_dgrad(
    (m, k, o): (usize, usize, usize),
    pixels: usize,
    dy: &[f32],
    w: &[f32],
    dcol: &mut [f32],
    l: Layout,
) {
    let images = ((1 << 22) / (pixels * k)).clamp(1, m / pixels);
    let rows = images * pixels;
    for first in (0..m).step_by(rows) {
        let rows = rows.min(m - first);
        let dy = &dy[first * o..][..rows * o];
        gemm(
            (rows, k, o),
            &mut dcol[..rows * k],
            st(k, 1),
            false,
            dy,
            st(o, 1),
            w,
            w_oxk(l, k, o),
            Parallelism::Rayon(0),
        );
    }
}

/// wgrad `dw += dy^T @ col` (dw in layout `l`) over chunks of rows, as `conv_wgrad`.
fn conv_wgrad(m: usize, k: usize, o: usize, dy: &[f32], col: &[f32], dw: &mut [f32], l: Layout) {
    let chunk = ((1 << 22) / k).max(64).min(m);
    for first in (0..m).step_by(chunk) {
        let rows = chunk.min(m - first);
        let dy = &dy[first * o..];
        let acc = first > 0;
        match l {
            Layout::OK => gemm(
                (o, k, rows),
                dw,
                st(k, 1),
                acc,
                dy,
                st(1, o),
                col,
                st(k, 1),
                Parallelism::Rayon(0),
            ),
            Layout::KO => gemm(
                (k, o, rows),
                dw,
                st(o, 1),
                acc,
                col,
                st(1, k),
                dy,
                st(o, 1),
                Parallelism::Rayon(0),
            ),
        }
    }
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `[O, K]` -> `[K, O]`, blocked over 16 K entries (whole cache lines) as the engine does it.
fn transpose(w: &[f32], o: usize, k: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for k0 in (0..k).step_by(16) {
        let k1 = (k0 + 16).min(k);
        for (i, row) in w.chunks(k).enumerate() {
            for (j, v) in row[k0..k1].iter().enumerate() {
                t[(k0 + j) * o + i] = *v;
            }
        }
    }
    t
}

/// Median seconds of each of two closures, alternating them `rounds` times after a warm-up.
fn ab(rounds: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    a();
    b();
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let t = Instant::now();
        a();
        ta.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        b();
        tb.push(t.elapsed().as_secs_f64());
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(ta), median(tb))
}

/// A convolution: batch, output H (= W), Cin, Cout, kernel, stride, how often the net has it.
#[derive(Clone, Copy)]
struct Conv {
    ohw: usize,
    c: usize,
    o: usize,
    kk: usize,
    stride: usize,
    count: usize,
}

const fn cv(ohw: usize, c: usize, o: usize, kk: usize, stride: usize, count: usize) -> Conv {
    Conv {
        ohw,
        c,
        o,
        kk,
        stride,
        count,
    }
}

/// Every distinct convolution of ResNet-18 at 224x224 (output size first).
const RESNET18: &[Conv] = &[
    cv(112, 3, 64, 7, 2, 1),
    cv(56, 64, 64, 3, 1, 4),
    cv(28, 64, 128, 3, 2, 1),
    cv(28, 64, 128, 1, 2, 1),
    cv(28, 128, 128, 3, 1, 3),
    cv(14, 128, 256, 3, 2, 1),
    cv(14, 128, 256, 1, 2, 1),
    cv(14, 256, 256, 3, 1, 3),
    cv(7, 256, 512, 3, 2, 1),
    cv(7, 256, 512, 1, 2, 1),
    cv(7, 512, 512, 3, 1, 3),
];

/// Every distinct convolution of ResNet-50 at 224x224 (torchvision, stride on the 3x3).
const RESNET50: &[Conv] = &[
    cv(112, 3, 64, 7, 2, 1),
    cv(56, 64, 64, 1, 1, 1),
    cv(56, 64, 64, 3, 1, 3),
    cv(56, 64, 256, 1, 1, 4),
    cv(56, 256, 64, 1, 1, 2),
    cv(56, 256, 128, 1, 1, 1),
    cv(28, 128, 128, 3, 2, 1),
    cv(28, 128, 512, 1, 1, 4),
    cv(28, 256, 512, 1, 2, 1),
    cv(28, 512, 128, 1, 1, 3),
    cv(28, 128, 128, 3, 1, 3),
    cv(28, 512, 256, 1, 1, 1),
    cv(14, 256, 256, 3, 2, 1),
    cv(14, 256, 1024, 1, 1, 6),
    cv(14, 512, 1024, 1, 2, 1),
    cv(14, 1024, 256, 1, 1, 5),
    cv(14, 256, 256, 3, 1, 5),
    cv(14, 1024, 512, 1, 1, 1),
    cv(7, 512, 512, 3, 2, 1),
    cv(7, 512, 2048, 1, 1, 3),
    cv(7, 1024, 2048, 1, 2, 1),
    cv(7, 2048, 512, 1, 1, 2),
    cv(7, 512, 512, 3, 1, 2),
];

#[derive(Clone, Copy, PartialEq)]
enum Pass {
    Forward,
    Dgrad,
    Wgrad,
}

/// Times one pass of one convolution in both layouts: (ms [O,K], ms [K,O], same bits).
fn conv_case(n: usize, s: Conv, pass: Pass, rounds: usize) -> (f64, f64, bool) {
    let (m, k, o, pixels) = (n * s.ohw * s.ohw, s.kk * s.kk * s.c, s.o, s.ohw * s.ohw);
    let pointwise = s.kk == 1 && s.stride == 1;
    let w_ok = random(o * k, 1);
    let w_ko = transpose(&w_ok, o, k);
    let (mut out_a, mut out_b);
    let (ta, tb) = match pass {
        Pass::Forward => {
            let x_len = if pointwise {
                m * k
            } else {
                threads() * ((1 << 18) / k).clamp(16, m) * k
            };
            let x = random(x_len.max(m.min(256 * threads()) * k), 2);
            out_a = vec![0f32; m * o];
            out_b = vec![0f32; m * o];
            ab(
                rounds,
                || conv_forward((m, k, o), pointwise, &x, &w_ok, &mut out_a, Layout::OK),
                || conv_forward((m, k, o), pointwise, &x, &w_ko, &mut out_b, Layout::KO),
            )
        }
        Pass::Dgrad => {
            let dy = random(m * o, 3);
            let rows = (((1 << 22) / (pixels * k)).clamp(1, n)) * pixels;
            out_a = vec![0f32; rows * k];
            out_b = vec![0f32; rows * k];
            ab(
                rounds,
                || conv_dgrad((m, k, o), pixels, &dy, &w_ok, &mut out_a, Layout::OK),
                || conv_dgrad((m, k, o), pixels, &dy, &w_ko, &mut out_b, Layout::KO),
            )
        }
        Pass::Wgrad => {
            let dy = random(m * o, 3);
            let col = random(((1 << 22) / k).max(64).min(m) * k, 4);
            out_a = vec![0f32; o * k];
            out_b = vec![0f32; o * k];
            let r = ab(
                rounds,
                || conv_wgrad(m, k, o, &dy, &col, &mut out_a, Layout::OK),
                || conv_wgrad(m, k, o, &dy, &col, &mut out_b, Layout::KO),
            );
            out_b = transpose(&out_b, k, o);
            r
        }
    };
    (ta * 1e3, tb * 1e3, same_bits(&out_a, &out_b))
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn conv_table(net: &str, convs: &[Conv], n: usize, passes: &[Pass], rounds: usize) {
    println!("\n## {net}, batch {n}: ms per call, median of {rounds} (weighted total: x count)\n");
    println!("| conv | M | K | O | pass | [O,K] ms | [K,O] ms | [O,K] / [K,O] | same bits |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &pass in passes {
        let (mut total_a, mut total_b) = (0.0, 0.0);
        for &s in convs {
            let (ta, tb, same) = conv_case(n, s, pass, rounds);
            total_a += ta * s.count as f64;
            total_b += tb * s.count as f64;
            let name = format!("{}x{}/{} {}->{} @{}", s.kk, s.kk, s.stride, s.c, s.o, s.ohw);
            println!(
                "| {name} x{} | {} | {} | {} | {} | {ta:.2} | {tb:.2} | {:.2} | {} |",
                s.count,
                n * s.ohw * s.ohw,
                s.kk * s.kk * s.c,
                s.o,
                pass_name(pass),
                ta / tb,
                if same { "yes" } else { "no" }
            );
        }
        println!(
            "| **all** | | | | {} | {total_a:.1} | {total_b:.1} | {:.2} | |",
            pass_name(pass),
            total_a / total_b
        );
    }
}

fn pass_name(p: Pass) -> &'static str {
    match p {
        Pass::Forward => "fwd",
        Pass::Dgrad => "dgrad",
        Pass::Wgrad => "wgrad",
    }
}

/// ViT-B/14 linear layers at 257 tokens: `y = x W^T` with W [out, in] against W stored [in, out].
fn linear_table(rounds: usize) {
    let t = 257;
    println!("\n## ViT-B linears, 257 tokens: ms per call, median of {rounds}\n");
    println!(
        "| layer | in | out | pass | [out,in] ms | [in,out] ms | [out,in] / [in,out] | same bits |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, i, o) in [
        ("qkv", 768, 2304),
        ("proj", 768, 768),
        ("fc1", 768, 3072),
        ("fc2", 3072, 768),
    ] {
        let x = random(t * i, 1);
        let dy = random(t * o, 2);
        let w_oi = random(o * i, 3);
        let w_io = transpose(&w_oi, o, i);
        for pass in [Pass::Forward, Pass::Dgrad, Pass::Wgrad] {
            let ((ta, tb), same) = match pass {
                Pass::Forward => {
                    let (mut a, mut b) = (vec![0f32; t * o], vec![0f32; t * o]);
                    let r = ab(
                        rounds,
                        || {
                            gemm(
                                (t, o, i),
                                &mut a,
                                st(o, 1),
                                false,
                                &x,
                                st(i, 1),
                                &w_oi,
                                st(1, i),
                                Parallelism::Rayon(0),
                            )
                        },
                        || {
                            gemm(
                                (t, o, i),
                                &mut b,
                                st(o, 1),
                                false,
                                &x,
                                st(i, 1),
                                &w_io,
                                st(o, 1),
                                Parallelism::Rayon(0),
                            )
                        },
                    );
                    (r, same_bits(&a, &b))
                }
                Pass::Dgrad => {
                    let (mut a, mut b) = (vec![0f32; t * i], vec![0f32; t * i]);
                    let r = ab(
                        rounds,
                        || {
                            gemm(
                                (t, i, o),
                                &mut a,
                                st(i, 1),
                                false,
                                &dy,
                                st(o, 1),
                                &w_oi,
                                st(i, 1),
                                Parallelism::Rayon(0),
                            )
                        },
                        || {
                            gemm(
                                (t, i, o),
                                &mut b,
                                st(i, 1),
                                false,
                                &dy,
                                st(o, 1),
                                &w_io,
                                st(1, o),
                                Parallelism::Rayon(0),
                            )
                        },
                    );
                    (r, same_bits(&a, &b))
                }
                Pass::Wgrad => {
                    let (mut a, mut b) = (vec![0f32; o * i], vec![0f32; o * i]);
                    let r = ab(
                        rounds,
                        || {
                            gemm(
                                (o, i, t),
                                &mut a,
                                st(i, 1),
                                false,
                                &dy,
                                st(1, o),
                                &x,
                                st(i, 1),
                                Parallelism::Rayon(0),
                            )
                        },
                        || {
                            gemm(
                                (i, o, t),
                                &mut b,
                                st(o, 1),
                                false,
                                &x,
                                st(1, i),
                                &dy,
                                st(o, 1),
                                Parallelism::Rayon(0),
                            )
                        },
                    );
                    (r, same_bits(&a, &transpose(&b, i, o)))
                }
            };
            println!(
                "| {name} | {i} | {o} | {} | {:.2} | {:.2} | {:.2} | {} |",
                pass_name(pass),
                ta * 1e3,
                tb * 1e3,
                ta / tb,
                if same { "yes" } else { "no" }
            );
        }
    }
}

fn main() {
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("threads {}, load {}", threads(), load().trim());
    let all = [Pass::Forward, Pass::Dgrad, Pass::Wgrad];
    let want = |p: &str| {
        let named: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| !a.starts_with('-'))
            .collect();
        named.is_empty() || named.iter().any(|w| w == p)
    };
    if want("transpose") {
        let (o, k) = (512, 4608);
        let w = random(o * k, 1);
        let (t, _) = ab(9, || drop(transpose(&w, o, k)), || {});
        println!(
            "\ntranspose [{o}, {k}] -> [{k}, {o}], one thread: {:.2} ms",
            t * 1e3
        );
    }
    if want("vit") {
        linear_table(15);
    }
    if want("r18") {
        conv_table("ResNet-18", RESNET18, 1, &[Pass::Forward], 15);
        conv_table("ResNet-18", RESNET18, 32, &all, 3);
    }
    if want("r50") {
        conv_table("ResNet-50", RESNET50, 1, &all, 9);
    }
    println!("\nload {}", load().trim());
}
