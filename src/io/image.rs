//! Images as the PyTorch pipelines of the VPR systems prepare them: decoded to 8-bit RGB as
//! PIL's `Image.open(path).convert("RGB")` does, `ToTensor` (`/ 255` in f32), `Normalize`
//! (`(x - mean) / std` per channel), then torchvision's `Resize(size)` on that float tensor, with
//! antialias (torchvision >= 0.17's default) or without (what the benchmark and SelaVPR ran, on
//! torchvision < 0.17). Everything here is channels-last: pixels `[H, W, 3]`, row-major.

use super::io_error;
use super::jpeg::{self, JpegError};
use crate::error::{Error, Result};
use ::image::{DynamicImage, ImageReader};
use std::io::Cursor;
use std::path::Path;

/// An 8-bit RGB image, pixels `[height, width, 3]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub height: usize,
    pub width: usize,
    pub pixels: Vec<u8>,
}

/// A float image `[height, width, 3]` row-major (one item of an NHWC batch).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageF32 {
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// Reads a JPEG or PNG file (the format is told by its contents, as PIL does) as 8-bit RGB.
/// Baseline JPEGs are decoded by [`jpeg::decode`], pixel for pixel as PIL decodes them; the
/// JPEGs it leaves out (progressive, arithmetic-coded, CMYK, 12-bit ...) and PNGs by the
/// `image` crate, whose JPEG pixels are close to PIL's but not identical.
pub fn decode(path: &Path) -> Result<Rgb8> {
    let format_err = |message: String| Error::Format {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
    // the JPEG signature PIL and the image crate look for
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        match jpeg::decode(&bytes) {
            Ok(image) => return Ok(image),
            Err(JpegError::Corrupt(reason)) => {
                return Err(format_err(format!(
                    "cannot decode the image: corrupt JPEG: {reason}"
                )))
            }
            Err(JpegError::Unsupported(_)) => {}
        }
    }
    let decoded = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| io_error(path, source))?
        .decode()
        .map_err(|e| {
            // the decoders' messages may span lines; an error here is one line
            let reason = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            format_err(format!("cannot decode the image: {reason}"))
        })?;
    Ok(to_rgb8(decoded))
}

/// PIL's `convert("RGB")` of the mode PIL opens each kind of PNG/JPEG in: grey is repeated in
/// the three channels, alpha is dropped (not composited), palettes are looked up (the decoder
/// already did), 16-bit colour keeps its high byte, and 16-bit grey (PIL's mode `I;16`) is
/// clipped to 255 rather than scaled.
fn to_rgb8(image: DynamicImage) -> Rgb8 {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels: Vec<u8> = match image {
        DynamicImage::ImageRgb8(im) => im.into_raw(),
        DynamicImage::ImageRgba8(im) => im
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma8(im) => im.iter().flat_map(|&v| [v; 3]).collect(),
        DynamicImage::ImageLumaA8(im) => im.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        DynamicImage::ImageLuma16(im) => im.iter().flat_map(|&v| [v.min(255) as u8; 3]).collect(),
        DynamicImage::ImageLumaA16(im) => im
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        DynamicImage::ImageRgb16(im) => im.iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(im) => im
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
            .collect(),
        // float images come from neither PNG nor JPEG
        other => other.to_rgb8().into_raw(),
    };
    Rgb8 {
        height,
        width,
        pixels,
    }
}

/// `Normalize(mean, std)(ToTensor()(image))`, channels-last: `(v / 255 - mean[c]) / std[c]`,
/// each step rounded to f32 as PyTorch does.
pub fn to_normalized_tensor(image: &Rgb8, mean: [f32; 3], std: [f32; 3]) -> ImageF32 {
    let data = image
        .pixels
        .chunks_exact(3)
        .flat_map(|p| {
            std::array::from_fn::<f32, 3, _>(|c| (p[c] as f32 / 255.0 - mean[c]) / std[c])
        })
        .collect();
    ImageF32 {
        height: image.height,
        width: image.width,
        data,
    }
}

/// The taps of one output position of a resampled axis: source positions `start..start +
/// weights.len()`, weights summing to 1.
struct Taps {
    start: usize,
    weights: Vec<f32>,
}

/// PyTorch's anti-aliased bilinear weights for one axis (aten `_upsample_bilinear2d_aa`,
/// align_corners=False): a triangle filter centred on each output pixel's centre in input
/// coordinates, widened by the downscaling factor (plain bilinear when upscaling), and each
/// output's weights divided by their sum (so edges renormalise instead of clamping). The f32 /
/// f64 steps follow aten's so that the weights are the same floats.
fn axis_taps(input: usize, output: usize) -> Vec<Taps> {
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
            let mut weights: Vec<f32> = (0..count)
                .map(|j| {
                    let x = (((j + start) as f32 - center) as f64 + 0.5) * invscale as f64;
                    (1.0 - (x as f32).abs()).max(0.0)
                })
                .collect();
            let total: f32 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            Taps {
                start: start as usize,
                weights,
            }
        })
        .collect()
}

/// torchvision `Resize([height, width], antialias)` (bilinear) of a float image.
pub fn resize(image: &ImageF32, height: usize, width: usize, antialias: bool) -> ImageF32 {
    if antialias {
        resize_antialiased(image, height, width)
    } else {
        resize_bilinear(image, height, width)
    }
}

/// aten's `upsample_bilinear2d` (align_corners=False, no antialias): each output reads the 2x2
/// input pixels around its centre mapped to input coordinates, `(x00 w0 + x01 w1) h0 +
/// (x10 w0 + x11 w1) h1` in f32 as aten evaluates it; an unchanged axis is copied.
fn resize_bilinear(image: &ImageF32, height: usize, width: usize) -> ImageF32 {
    const C: usize = 3;
    let (rows, cols) = (
        bilinear_taps(image.height, height),
        bilinear_taps(image.width, width),
    );
    let mut data = Vec::with_capacity(height * width * C);
    let px = |y: usize, x: usize, c: usize| image.data[(y * image.width + x) * C + c];
    for &(y0, y1, h0, h1) in &rows {
        for &(x0, x1, w0, w1) in &cols {
            data.extend((0..C).map(|c| {
                (px(y0, x0, c) * w0 + px(y0, x1, c) * w1) * h0
                    + (px(y1, x0, c) * w0 + px(y1, x1, c) * w1) * h1
            }));
        }
    }
    ImageF32 {
        height,
        width,
        data,
    }
}

/// Per output position of an axis: the two input positions and their weights, as aten's
/// `compute_source_index_and_lambda` (source `(i + 0.5) * in / out - 0.5` in f32, clamped at 0;
/// one rounding for the multiply-add, as the compiler fuses it in aten's build).
fn bilinear_taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| {
            if input == output {
                return (i, i, 1.0, 0.0);
            }
            let source = scale.mul_add(i as f32 + 0.5, -0.5).max(0.0);
            let i0 = (source.floor() as usize).min(input - 1);
            let lambda = (source - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - lambda, lambda)
        })
        .collect()
}

/// `Resize(antialias=True)`: the width is resampled first, then the height, each only when it
/// changes, accumulating in f32 in the order PyTorch does.
fn resize_antialiased(image: &ImageF32, height: usize, width: usize) -> ImageF32 {
    const C: usize = 3;
    let mut current = image.clone();
    if width != current.width {
        let taps = axis_taps(current.width, width);
        let mut out = vec![0.0f32; current.height * width * C];
        for (src_row, out_row) in current
            .data
            .chunks_exact(current.width * C)
            .zip(out.chunks_exact_mut(width * C))
        {
            for (t, out_px) in taps.iter().zip(out_row.chunks_exact_mut(C)) {
                for (c, o) in out_px.iter_mut().enumerate() {
                    *o = weighted_sum(&t.weights, |j| src_row[(t.start + j) * C + c]);
                }
            }
        }
        current = ImageF32 {
            height: current.height,
            width,
            data: out,
        };
    }
    if height != current.height {
        let taps = axis_taps(current.height, height);
        let row_len = width * C;
        let mut out = vec![0.0f32; height * row_len];
        for (t, out_row) in taps.iter().zip(out.chunks_exact_mut(row_len)) {
            for (k, o) in out_row.iter_mut().enumerate() {
                *o = weighted_sum(&t.weights, |j| current.data[(t.start + j) * row_len + k]);
            }
        }
        current = ImageF32 {
            height,
            width,
            data: out,
        };
    }
    current
}

/// `w[0] * x(0) + w[1] * x(1) + ...`, left to right in f32.
fn weighted_sum(weights: &[f32], x: impl Fn(usize) -> f32) -> f32 {
    weights
        .iter()
        .enumerate()
        .fold(0.0f32, |sum, (j, w)| sum + x(j) * w)
}
