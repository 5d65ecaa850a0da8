//! The CPU twins of kernels/augment.cu, in f32 with the roundings of torchvision's tensor ops (each
//! torch op rounds to f32; nothing here is fused), and torchvision's bilinear resize arithmetic,
//! which `io::image::resize` uses too.

use super::{CropBox, JitterParams, BRIGHTNESS, CONTRAST, HUE, SATURATION};
use crate::ops::cpu::parallel_rows;
use std::borrow::Cow;

const C: usize = 3;

/// rgb_to_grayscale's weights, as the f32 scalars torch multiplies with.
const GREY: [f32; 3] = [0.2989, 0.587, 0.114];

fn grey(p: &[f32; 3]) -> f32 {
    GREY[0] * p[0] + GREY[1] * p[1] + GREY[2] * p[2]
}

/// `1 - ratio` as `_blend` computes it: in f64 (Python), then rounded to f32 by the torch op.
fn complement(ratio: f32) -> f32 {
    (1.0 - ratio as f64) as f32
}

/// `_blend(x, other, ratio)` per channel, `other_term` being `(1 - ratio) * other`.
fn blend(p: &mut [f32; 3], ratio: f32, other_term: [f32; 3]) {
    for (v, o) in p.iter_mut().zip(other_term) {
        *v = (ratio * *v + o).clamp(0.0, 1.0);
    }
}

/// torchvision's `_rgb2hsv`; of its three masked hue terms only the selected one can be non-zero.
fn rgb_to_hsv([r, g, b]: [f32; 3]) -> [f32; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let grey = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if grey { 1.0 } else { maxc };
    let divisor = if grey { 1.0 } else { cr };
    let (rc, gc, bc) = (
        (maxc - r) / divisor,
        (maxc - g) / divisor,
        (maxc - b) / divisor,
    );
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // torch.fmod is C's fmod, as Rust's % on floats
    [(h / 6.0 + 1.0) % 1.0, s, maxc]
}

/// torchvision's `_hsv2rgb`: the sector's one-hot selection of v, p, q, t.
fn hsv_to_rgb([h, s, v]: [f32; 3]) -> [f32; 3] {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (i as i32).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// `adjust_hue`: the hue moved by `shift` modulo 1 with torch.remainder's sign rule.
fn adjust_hue(p: &mut [f32; 3], shift: f32) {
    let [h, s, v] = rgb_to_hsv(*p);
    let mut h = (h + shift) % 1.0;
    if h < 0.0 {
        h += 1.0;
    }
    *p = hsv_to_rgb([h, s, v]);
}

/// Step `step` of ColorJitter on one pixel; `mean` is the image's grey mean at that point
/// (contrast only). The kernel's `jitter_step` is the same arithmetic.
fn jitter_step(p: &mut [f32; 3], step: u8, factor: f32, mean: f32) {
    match step {
        BRIGHTNESS => blend(p, factor, [0.0; 3]),
        CONTRAST => blend(p, factor, [complement(factor) * mean; 3]),
        SATURATION => blend(p, factor, [complement(factor) * grey(p); 3]),
        HUE => adjust_hue(p, factor),
        _ => unreachable!("steps are checked to be 0..4"),
    }
}

fn pixel(image: &[f32], i: usize) -> [f32; 3] {
    [image[C * i], image[C * i + 1], image[C * i + 2]]
}

/// The steps of `params` in their order, skipping those whose factor changes nothing.
fn active_steps(params: &JitterParams) -> impl Iterator<Item = (u8, f32)> + '_ {
    params
        .order
        .iter()
        .map(|&s| (s, params.factor(s)))
        .filter(|&(s, f)| !JitterParams::is_identity(s, f))
}

/// The mean of the grey image of `image` after the steps of `params` that come before contrast,
/// summed in f64 and rounded to f32 (torch sums in f32; the two differ by an ulp or so).
fn grey_mean(image: &[f32], params: &JitterParams) -> f32 {
    let before: Vec<(u8, f32)> = active_steps(params)
        .take_while(|&(s, _)| s != CONTRAST)
        .collect();
    let pixels = image.len() / C;
    let sum: f64 = (0..pixels)
        .map(|i| {
            let mut p = pixel(image, i);
            for &(s, f) in &before {
                jitter_step(&mut p, s, f, 0.0);
            }
            grey(&p) as f64
        })
        .sum();
    (sum / pixels as f64) as f32
}

/// ColorJitter of the dense `[N, H, W, 3]` images `x` with `params[n]` for image n.
pub fn color_jitter(x: &[f32], pixels: usize, params: &[JitterParams]) -> Vec<f32> {
    let image_len = pixels * C;
    let mut y = vec![0f32; x.len()];
    parallel_rows(&mut y, image_len, |first, out| {
        for (k, out_image) in out.chunks_mut(image_len).enumerate() {
            let n = first + k;
            let image = &x[n * image_len..][..image_len];
            let p = &params[n];
            let contrast = active_steps(p).any(|(s, _)| s == CONTRAST);
            let mean = if contrast { grey_mean(image, p) } else { 0.0 };
            for (i, out_px) in out_image.chunks_exact_mut(C).enumerate() {
                let mut v = pixel(image, i);
                for (s, f) in active_steps(p) {
                    jitter_step(&mut v, s, f, mean);
                }
                out_px.copy_from_slice(&v);
            }
        }
    });
    y
}

/// One output position of a resampled axis: the input positions it reads and their weights, in
/// the order they are summed.
pub(crate) type Taps = Vec<(usize, f32)>;

/// PyTorch's anti-aliased bilinear weights (aten `_upsample_bilinear2d_aa`, align_corners=False):
/// a triangle filter centred on each output pixel's centre in input coordinates, widened by the
/// downscaling factor (plain bilinear when upscaling), each output's weights divided by their sum
/// (so edges renormalise instead of clamping). The f32 / f64 steps follow aten's so that the
/// weights are the same floats.
fn antialiased_taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    let support: f32 = if scale >= 1.0 { scale } else { 1.0 };
    let invscale: f32 = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let max_taps = support.ceil() as i64 * 2 + 1;
    (0..output)
        .map(|i| {
            let center = (scale as f64 * (i as f64 + 0.5)) as f32;
            let start = (((center - support) as f64 + 0.5) as i64).max(0);
            let end = (((center + support) as f64 + 0.5) as i64).min(input as i64);
            let count = (end - start).clamp(0, max_taps);
            let weights: Vec<f32> = (0..count)
                .map(|j| {
                    let x = (((j + start) as f32 - center) as f64 + 0.5) * invscale as f64;
                    (1.0 - (x as f32).abs()).max(0.0)
                })
                .collect();
            let total: f32 = weights.iter().sum();
            (0..count)
                .zip(weights)
                .map(|(j, w)| {
                    let w = if total != 0.0 { w / total } else { w };
                    ((start + j) as usize, w)
                })
                .collect()
        })
        .collect()
}

/// aten's `upsample_bilinear2d` (align_corners=False, no antialias): the two input positions
/// around each output's centre mapped to input coordinates (source `(i + 0.5) * in / out - 0.5`
/// in f32, clamped at 0; one rounding for the multiply-add, as the compiler fuses it in aten's
/// build), weights `1 - lambda` and `lambda`; at the last position both taps read it.
fn bilinear_taps(input: usize, output: usize) -> Vec<Taps> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            let source = scale.mul_add(i as f32 + 0.5, -0.5).max(0.0);
            let i0 = (source.floor() as usize).min(input - 1);
            let lambda = (source - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            vec![(i0, 1.0 - lambda), (i1, lambda)]
        })
        .collect()
}

/// The taps of torchvision's bilinear `Resize` along an axis of `input` positions resized to
/// `output` (both > 0), with or without antialias. An axis whose size does not change is left
/// alone, as aten skips it: one tap of weight 1.
pub(crate) fn resize_taps(input: usize, output: usize, antialias: bool) -> Vec<Taps> {
    if input == output {
        (0..output).map(|i| vec![(i, 1.0)]).collect()
    } else if antialias {
        antialiased_taps(input, output)
    } else {
        bilinear_taps(input, output)
    }
}

/// `taps` applied left to right in f32, as aten accumulates.
fn weighted_sum(taps: &[(usize, f32)], x: impl Fn(usize) -> f32) -> f32 {
    taps.iter().fold(0.0f32, |sum, &(i, w)| sum + x(i) * w)
}

/// torchvision's bilinear `Resize([out_h, out_w], antialias)` of the dense channels-last RGB image
/// `src` of `h` x `w` pixels: the width is resampled first, then the height, each only where its
/// size changes, as aten does (for the plain bilinear path, which aten computes in one pass, the
/// same products and sums).
pub(crate) fn resize_rgb(
    src: &[f32],
    (h, w): (usize, usize),
    (out_h, out_w): (usize, usize),
    antialias: bool,
) -> Vec<f32> {
    let row_len = out_w * C;
    let wide: Cow<[f32]> = if w == out_w {
        Cow::Borrowed(src)
    } else {
        let cols = resize_taps(w, out_w, antialias);
        let mut wide = vec![0f32; h * row_len];
        for (src_row, wide_row) in src.chunks_exact(w * C).zip(wide.chunks_exact_mut(row_len)) {
            for (taps, px) in cols.iter().zip(wide_row.chunks_exact_mut(C)) {
                for (c, v) in px.iter_mut().enumerate() {
                    *v = weighted_sum(taps, |i| src_row[i * C + c]);
                }
            }
        }
        Cow::Owned(wide)
    };
    if h == out_h {
        return wide.into_owned();
    }
    let rows = resize_taps(h, out_h, antialias);
    let mut out = vec![0f32; out_h * row_len];
    for (taps, out_row) in rows.iter().zip(out.chunks_exact_mut(row_len)) {
        for (k, v) in out_row.iter_mut().enumerate() {
            *v = weighted_sum(taps, |i| wide[i * row_len + k]);
        }
    }
    out
}

/// `resized_crop` of each image of the dense `[N, H, W, 3]` images `x` with its box, to
/// `[N, out_h, out_w, 3]`.
pub fn resized_crops(
    x: &[f32],
    (h, w): (usize, usize),
    boxes: &[CropBox],
    (out_h, out_w): (usize, usize),
    antialias: bool,
) -> Vec<f32> {
    let out_len = out_h * out_w * C;
    let mut y = vec![0f32; boxes.len() * out_len];
    parallel_rows(&mut y, out_len, |first, out| {
        for (k, out_image) in out.chunks_mut(out_len).enumerate() {
            let b = &boxes[first + k];
            let image = &x[(first + k) * h * w * C..][..h * w * C];
            let crop: Vec<f32> = (b.top..b.top + b.height)
                .flat_map(|r| &image[(r * w + b.left) * C..][..b.width * C])
                .copied()
                .collect();
            let resized = resize_rgb(&crop, (b.height, b.width), (out_h, out_w), antialias);
            out_image.copy_from_slice(&resized);
        }
    });
    y
}
