//! The training augmentation of CosPlace and EigenPlaces on the device: torchvision's
//! `ColorJitter(brightness, contrast, saturation, hue)` then `RandomResizedCrop(size, scale,
//! ratio, antialias=True)`, each image of a batch with parameters of its own, as the originals
//! apply the transforms image by image. Images are channels-last f32 `[N, H, W, 3]` with values in
//! [0, 1] (ToTensor's range), on any device; f32 only.
//!
//! The random parameters are drawn on the host with the engine's generator ([`Rng`]), from
//! torchvision's distributions (`ColorJitter.get_params`, `RandomResizedCrop.get_params`), not
//! from torch's random stream. The ops apply given parameters with the arithmetic of torchvision's
//! tensor functions (`transforms.functional` on float tensors):
//! - brightness `b`: `clamp(b * x, 0, 1)`;
//! - contrast `c`: `clamp(c * x + (1 - c) * m, 0, 1)`, `m` the mean over the image of
//!   `0.2989 r + 0.587 g + 0.114 b` of the image as it is when contrast comes in the order;
//! - saturation `s`: `clamp(s * x + (1 - s) * grey(x), 0, 1)` per pixel;
//! - hue `h`: RGB to HSV, the hue plus `h` modulo 1, HSV to RGB, as torchvision's `_rgb2hsv` and
//!   `_hsv2rgb` compute them;
//! - `resized_crop`: the box cut out, then the bilinear resize (aten's `_upsample_bilinear2d_aa`
//!   with antialias, `upsample_bilinear2d` without): width first, then height, an axis whose size
//!   does not change left alone.
//!
//! Every step rounds to f32 where torch's ops do; what differs is the contrast mean (summed in f64
//! here, in f32 by torch: an ulp or so) and, on CUDA, NVRTC's fused multiply-adds (an ulp per
//! step). Measured against torchvision (tests/augment.rs): below 2e-6 for the colour steps and
//! their chains, hue included, and below 1e-6 for the crops.
//!
//! A step whose factor is the identity (1 for brightness, contrast and saturation, 0 for hue) is
//! skipped, as ColorJitter skips a step of strength 0; it only matters for hue, whose round trip
//! through HSV is not exact.
//!
//! There is no backward: augmentation applies to the input images, which never require a
//! gradient; an input that does is an error rather than a silently cut graph.

pub(crate) mod cpu;
pub(crate) mod gpu;

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{dtype_err, shape_err, Error, Result};
use crate::layout::Layout;
use crate::tensor::{CpuStorage, Rng, Storage, Tensor};

/// ColorJitter's steps, numbered as `ColorJitter.get_params` numbers them.
pub(crate) const BRIGHTNESS: u8 = 0;
pub(crate) const CONTRAST: u8 = 1;
pub(crate) const SATURATION: u8 = 2;
pub(crate) const HUE: u8 = 3;

/// The parameters of one image's ColorJitter: the steps in the order they are applied (`order[k]`
/// is 0 brightness, 1 contrast, 2 saturation or 3 hue) and each step's factor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JitterParams {
    pub order: [u8; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue: f32,
}

/// `lo + (hi - lo) * u`, u uniform in [0, 1).
fn uniform(rng: &mut Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

impl JitterParams {
    /// Parameters that change nothing.
    pub const IDENTITY: JitterParams = JitterParams {
        order: [0, 1, 2, 3],
        brightness: 1.0,
        contrast: 1.0,
        saturation: 1.0,
        hue: 0.0,
    };

    /// `ColorJitter(brightness, contrast, saturation, hue).get_params`: a uniformly random order,
    /// brightness, contrast and saturation factors uniform in `[max(0, 1 - v), 1 + v]`, the hue
    /// factor uniform in `[-hue, hue]`; a strength of 0 gives the identity factor (the step is
    /// skipped) and draws nothing.
    ///
    /// # Panics
    /// If a strength is negative or not finite, or `hue` is above 0.5 (torchvision's bounds).
    pub fn sample(
        rng: &mut Rng,
        brightness: f32,
        contrast: f32,
        saturation: f32,
        hue: f32,
    ) -> JitterParams {
        for (name, v, most) in [
            ("brightness", brightness, f32::INFINITY),
            ("contrast", contrast, f32::INFINITY),
            ("saturation", saturation, f32::INFINITY),
            ("hue", hue, 0.5),
        ] {
            assert!(
                v.is_finite() && (0.0..=most).contains(&v),
                "JitterParams::sample: {name} strength {v} is not in [0, {most}]"
            );
        }
        // torch.randperm(4): Fisher-Yates
        let mut order = [0u8, 1, 2, 3];
        for i in (1..4).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut factor = |strength: f32| {
            if strength == 0.0 {
                return 1.0;
            }
            let v = strength as f64;
            uniform(rng, (1.0 - v).max(0.0), 1.0 + v) as f32
        };
        let (brightness, contrast, saturation) =
            (factor(brightness), factor(contrast), factor(saturation));
        let hue = if hue == 0.0 {
            0.0
        } else {
            uniform(rng, -(hue as f64), hue as f64) as f32
        };
        JitterParams {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }
    }

    pub(crate) fn factor(&self, step: u8) -> f32 {
        match step {
            BRIGHTNESS => self.brightness,
            CONTRAST => self.contrast,
            SATURATION => self.saturation,
            _ => self.hue,
        }
    }

    pub(crate) fn is_identity(step: u8, factor: f32) -> bool {
        factor == if step == HUE { 0.0 } else { 1.0 }
    }

    /// Errors unless the order is a permutation of the four steps and every factor is in
    /// torchvision's domain; `image` is the index in the batch, for the message.
    fn check(&self, image: usize) -> Result<()> {
        let mut seen = [false; 4];
        for &s in &self.order {
            if s > HUE || std::mem::replace(&mut seen[s as usize], true) {
                return Err(Error::Argument(format!(
                    "color_jitter: the order {:?} of image {image} is not a permutation of the \
                     steps 0..4",
                    self.order
                )));
            }
        }
        for (name, v, lo, hi) in [
            ("brightness", self.brightness, 0.0, f32::INFINITY),
            ("contrast", self.contrast, 0.0, f32::INFINITY),
            ("saturation", self.saturation, 0.0, f32::INFINITY),
            ("hue", self.hue, -0.5, 0.5),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(Error::Argument(format!(
                    "color_jitter: the {name} factor {v} of image {image} is not in [{lo}, {hi}]"
                )));
            }
        }
        Ok(())
    }
}

/// A crop box in pixels: rows `top..top + height`, columns `left..left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl CropBox {
    /// `RandomResizedCrop.get_params` for an image of `height` x `width`: up to 10 tries of an area
    /// fraction uniform in `scale` and a log aspect ratio (width / height) uniform in
    /// `[ln ratio.0, ln ratio.1]`, the sides rounded half to even as Python's `round`, the first
    /// box that fits placed uniformly; else the central crop of the image cut to the nearest
    /// allowed aspect ratio (the whole image when its own ratio is allowed). A side the fallback
    /// would round to 0 is 1.
    ///
    /// # Panics
    /// If a side of the image is 0, or the ranges are not finite, increasing pairs with
    /// `scale.0 >= 0` and `ratio.0 > 0`.
    pub fn sample(
        rng: &mut Rng,
        height: usize,
        width: usize,
        scale: (f64, f64),
        ratio: (f64, f64),
    ) -> CropBox {
        assert!(
            height > 0 && width > 0,
            "CropBox::sample: the image is {height} x {width}"
        );
        let finite = |(a, b): (f64, f64)| a.is_finite() && b.is_finite() && a <= b;
        assert!(
            finite(scale) && scale.0 >= 0.0 && finite(ratio) && ratio.0 > 0.0,
            "CropBox::sample: scale {scale:?} or ratio {ratio:?} is not an increasing range of \
             positive numbers"
        );
        let area = (height * width) as f64;
        let log_ratio = (ratio.0.ln(), ratio.1.ln());
        for _ in 0..10 {
            let target = area * uniform(rng, scale.0, scale.1);
            let aspect = uniform(rng, log_ratio.0, log_ratio.1).exp();
            let w = (target * aspect).sqrt().round_ties_even() as usize;
            let h = (target / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = rng.below((height - h + 1) as u64) as usize;
                let left = rng.below((width - w + 1) as u64) as usize;
                return CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (h, w) = if in_ratio < ratio.0 {
            ((width as f64 / ratio.0).round_ties_even() as usize, width)
        } else if in_ratio > ratio.1 {
            (height, (height as f64 * ratio.1).round_ties_even() as usize)
        } else {
            (height, width)
        };
        let (h, w) = (h.clamp(1, height), w.clamp(1, width));
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }
}

/// `(n, h, w)` of images `[N, H, W, 3]` in f32 with pixels, not requiring a gradient.
fn image_dims(x: &Tensor, op: &str) -> Result<(usize, usize, usize)> {
    let &[n, h, w, 3] = x.shape() else {
        return shape_err!("{op}: images must be [N, H, W, 3], got {:?}", x.shape());
    };
    if h == 0 || w == 0 {
        return shape_err!("{op}: the images {:?} have no pixels", x.shape());
    }
    if x.dtype() != DType::F32 {
        return dtype_err!("{op} needs f32 images, got {}", x.dtype());
    }
    if x.is_requires_grad() {
        return Err(Error::Argument(format!(
            "{op} has no backward, but the images {:?} require a gradient",
            x.shape()
        )));
    }
    Ok((n, h, w))
}

/// The dense f32 values of a contiguous CPU tensor.
fn cpu_f32(x: &Tensor) -> &[f32] {
    match x.storage() {
        Storage::Cpu(CpuStorage::F32(v)) => &v[x.layout().offset()..][..x.numel()],
        _ => unreachable!("checked to be f32 on the CPU"),
    }
}

impl Tensor {
    /// torchvision's ColorJitter of each image of `[N, H, W, 3]` f32 images in [0, 1], with
    /// `params[n]` for image n (see the module's documentation); no gradient.
    pub fn color_jitter(&self, params: &[JitterParams]) -> Result<Tensor> {
        let (n, h, w) = image_dims(self, "color_jitter")?;
        if params.len() != n {
            return shape_err!(
                "color_jitter: {} parameter sets for the {n} images {:?}",
                params.len(),
                self.shape()
            );
        }
        for (i, p) in params.iter().enumerate() {
            p.check(i)?;
        }
        if n == 0 {
            return Tensor::zeros(self.shape(), DType::F32, self.device());
        }
        let x = self.contiguous()?;
        crate::ops::copy::check_extent(&x)?;
        let y = match x.storage() {
            Storage::Cpu(_) => Storage::Cpu(CpuStorage::F32(cpu::color_jitter(
                cpu_f32(&x),
                h * w,
                params,
            ))),
            Storage::Gpu(b) => Storage::Gpu(gpu::color_jitter(b, h * w, params)?),
        };
        Ok(Tensor::from_parts(
            y,
            Layout::contiguous(self.shape())?,
            DType::F32,
            self.device().clone(),
        ))
    }

    /// torchvision's `resized_crop(image, top, left, height, width, [out_h, out_w], bilinear,
    /// antialias)` of each image of `[N, H, W, 3]` f32 images with `boxes[n]` for image n:
    /// `[N, out_h, out_w, 3]`. Boxes must lie inside the image (torchvision pads with zeros
    /// instead); no gradient.
    pub fn resized_crops(
        &self,
        boxes: &[CropBox],
        out_h: usize,
        out_w: usize,
        antialias: bool,
    ) -> Result<Tensor> {
        let (n, h, w) = image_dims(self, "resized_crops")?;
        if boxes.len() != n {
            return shape_err!(
                "resized_crops: {} boxes for the {n} images {:?}",
                boxes.len(),
                self.shape()
            );
        }
        if out_h == 0 || out_w == 0 {
            return shape_err!(
                "resized_crops of {:?}: the output size {out_h} x {out_w} has no pixels",
                self.shape()
            );
        }
        for (i, b) in boxes.iter().enumerate() {
            if b.height == 0 || b.width == 0 || b.top + b.height > h || b.left + b.width > w {
                return shape_err!(
                    "resized_crops: box {i} {b:?} is empty or reaches outside the {h} x {w} \
                     images {:?}",
                    self.shape()
                );
            }
        }
        let shape = [n, out_h, out_w, 3];
        if n == 0 {
            return Tensor::zeros(&shape, DType::F32, self.device());
        }
        let x = self.contiguous()?;
        crate::ops::copy::check_extent(&x)?;
        let y = match x.storage() {
            Storage::Cpu(_) => Storage::Cpu(CpuStorage::F32(cpu::resized_crops(
                cpu_f32(&x),
                (h, w),
                boxes,
                (out_h, out_w),
                antialias,
            ))),
            Storage::Gpu(b) => Storage::Gpu(gpu::resized_crops(
                b,
                (h, w),
                boxes,
                (out_h, out_w),
                antialias,
            )?),
        };
        Ok(Tensor::from_parts(
            y,
            Layout::contiguous(&shape)?,
            DType::F32,
            self.device().clone(),
        ))
    }
}

/// Conformance cases. ColorJitter: parameters drawn with CosPlace's strengths (0.7, 0.7, 0.7,
/// 0.5), plus the identity and the extremes (every factor 0, hue 0.5), on odd sizes and a
/// one-pixel image; the crops: boxes drawn as RandomResizedCrop (scale [0.5, 1], ratio [3/4, 4/3])
/// and the whole image, down- and upsampling, one pixel to many, with and without antialias.
pub fn conformance(device: &Device, seed: u64) -> Result<Vec<crate::check::CheckRow>> {
    use crate::check::compare;
    let mut rows = Vec::new();
    let extreme = JitterParams {
        order: [3, 2, 1, 0],
        brightness: 0.0,
        contrast: 0.0,
        saturation: 0.0,
        hue: 0.5,
    };
    let jitter_shapes: [[usize; 3]; 4] = [[2, 13, 17], [3, 1, 1], [1, 33, 7], [4, 64, 48]];
    for (j, &[n, h, w]) in jitter_shapes.iter().enumerate() {
        let sd = seed.wrapping_add(j as u64);
        let mut rng = Rng::new(sd);
        let mut params: Vec<JitterParams> = (0..n)
            .map(|_| JitterParams::sample(&mut rng, 0.7, 0.7, 0.7, 0.5))
            .collect();
        if j == 1 {
            params[0] = JitterParams::IDENTITY;
            params[1] = extreme;
        }
        let x = Tensor::rand_uniform(&[n, h, w, 3], 0.0, 1.0, sd, DType::F32, &Device::Cpu)?;
        let got = x.to_device(device).and_then(|xd| xd.color_jitter(&params));
        let want = x.color_jitter(&params);
        rows.push(compare(
            "color_jitter_means_f32+color_jitter_f32",
            DType::F32,
            &[n, h, w, 3],
            got,
            want,
            DType::F32.tolerance(),
        ));
    }
    let crop_cases: [([usize; 3], [usize; 2]); 5] = [
        ([2, 13, 17], [11, 9]),
        ([3, 40, 30], [16, 16]),
        ([2, 9, 7], [20, 25]),
        ([1, 1, 1], [3, 4]),
        ([2, 61, 50], [5, 7]),
    ];
    for (j, &([n, h, w], [oh, ow])) in crop_cases.iter().enumerate() {
        let sd = seed.wrapping_add(16 + j as u64);
        let mut rng = Rng::new(sd);
        let mut boxes: Vec<CropBox> = (0..n)
            .map(|_| CropBox::sample(&mut rng, h, w, (0.5, 1.0), (0.75, 4.0 / 3.0)))
            .collect();
        boxes[0] = CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        };
        let x = Tensor::rand_uniform(&[n, h, w, 3], 0.0, 1.0, sd, DType::F32, &Device::Cpu)?;
        for aa in [true, false] {
            let got = x
                .to_device(device)
                .and_then(|xd| xd.resized_crops(&boxes, oh, ow, aa));
            let want = x.resized_crops(&boxes, oh, ow, aa);
            rows.push(compare(
                &format!("resized_crop_f32 (antialias {aa})"),
                DType::F32,
                &[n, h, w, 3, oh, ow],
                got,
                want,
                DType::F32.tolerance(),
            ));
        }
    }
    Ok(rows)
}
