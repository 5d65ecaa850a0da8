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

/// torchvision `Resize([height, width], antialias)` (bilinear) of a float image: aten's
/// `_upsample_bilinear2d_aa` with antialias, `upsample_bilinear2d` (align_corners=False) without,
/// with their f32 arithmetic. The arithmetic is the augmentation's (`ops::augment`), whose device
/// crops resize the same way.
pub fn resize(image: &ImageF32, height: usize, width: usize, antialias: bool) -> ImageF32 {
    ImageF32 {
        height,
        width,
        data: crate::ops::augment::cpu::resize_rgb(
            &image.data,
            (image.height, image.width),
            (height, width),
            antialias,
        ),
    }
}
