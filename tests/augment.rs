//! The training augmentation (ColorJitter, RandomResizedCrop): torchvision's numbers for given
//! parameters and the distributions of its parameter draws (tests/fixtures/augment.safetensors,
//! written by tools/fixtures/augment.py), the virtual GPU (and a real one when present) against the
//! CPU twin on odd sizes (device outputs are poisoned with NaN, so an unwritten element fails),
//! identities, views, errors.

mod common;

use common::{assert_tensor_close, fixture_tensors, gpu_devices, seed, ODD_SIZES};
use std::collections::HashMap;
use vpr_engine::check::max_error;
use vpr_engine::device::VgpuOptions;
use vpr_engine::ops::augment::{CropBox, JitterParams};
use vpr_engine::tensor::Rng;
use vpr_engine::{DType, Device, Error, Tensor};

type Fixture = HashMap<String, (Vec<usize>, Vec<f64>)>;

fn tensor(f: &Fixture, key: &str) -> Tensor {
    let (shape, v) = &f[key];
    Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
}

fn all_devices() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    devices
}

/// The fixture's per-image jitter parameters of `case`.
fn jitter_params(f: &Fixture, case: &str) -> Vec<JitterParams> {
    let order = &f[&format!("jitter.{case}.order")].1;
    let factor = &f[&format!("jitter.{case}.factor")].1;
    (0..2)
        .map(|n| JitterParams {
            order: std::array::from_fn(|k| order[4 * n + k] as u8),
            brightness: factor[4 * n] as f32,
            contrast: factor[4 * n + 1] as f32,
            saturation: factor[4 * n + 2] as f32,
            hue: factor[4 * n + 3] as f32,
        })
        .collect()
}

fn cases(f: &Fixture, prefix: &str, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = f
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.strip_suffix(suffix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn color_jitter_matches_torchvision() {
    let f = fixture_tensors("augment.safetensors");
    let images = tensor(&f, "images");
    let names = cases(&f, "jitter.", ".order");
    assert_eq!(names.len(), 11, "{names:?}");
    for device in all_devices() {
        let x = images.to_device(&device).unwrap();
        for case in &names {
            let got = x.color_jitter(&jitter_params(&f, case)).unwrap();
            let want = tensor(&f, &format!("jitter.{case}.output"));
            let err = max_error(&got.to_f64_vec().unwrap(), &want.to_f64_vec().unwrap());
            println!("color_jitter {case} on {device}: max error against torchvision {err:e}");
            // values in [0, 1]: the error is an absolute one
            assert_tensor_close(&got, &want, 1e-5, &format!("{case} on {device}"), 0);
        }
    }
}

#[test]
fn resized_crops_match_torchvision() {
    let f = fixture_tensors("augment.safetensors");
    let images = tensor(&f, "crop.images");
    let names = cases(&f, "crop.", ".box");
    assert_eq!(names.len(), 6, "{names:?}");
    for device in all_devices() {
        let x = images.to_device(&device).unwrap();
        for case in &names {
            let b = &f[&format!("crop.{case}.box")].1;
            let boxes: Vec<CropBox> = (0..2)
                .map(|n| CropBox {
                    top: b[4 * n] as usize,
                    left: b[4 * n + 1] as usize,
                    height: b[4 * n + 2] as usize,
                    width: b[4 * n + 3] as usize,
                })
                .collect();
            for (key, aa) in [("aa", true), ("plain", false)] {
                let want = tensor(&f, &format!("crop.{case}.{key}"));
                let (oh, ow) = (want.shape()[1], want.shape()[2]);
                let got = x.resized_crops(&boxes, oh, ow, aa).unwrap();
                let err = max_error(&got.to_f64_vec().unwrap(), &want.to_f64_vec().unwrap());
                println!(
                    "resized_crops {case} {key} on {device}: max error against torchvision {err:e}"
                );
                assert_tensor_close(&got, &want, 1e-5, &format!("{case} {key} on {device}"), 0);
            }
        }
    }
}

/// Mean, variance and fourth central moment of `v`.
fn moments(v: &[f64]) -> [f64; 3] {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let central = |p: i32| v.iter().map(|x| (x - mean).powi(p)).sum::<f64>() / n;
    [mean, central(2), central(4)]
}

/// Asserts that two samples' means and variances agree within `Z` standard errors of their
/// difference (the variance's standard error from the fourth moment).
fn assert_same_distribution(what: &str, ours: [f64; 3], theirs: &[f64], draws: f64, s: u64) {
    const Z: f64 = 5.0;
    let [mean, var, m4] = ours;
    let (t_mean, t_var, t_m4) = (theirs[0], theirs[1], theirs[2]);
    let se_mean = ((var + t_var) / draws).sqrt();
    let se_var = (((m4 - var * var) + (t_m4 - t_var * t_var)).max(0.0) / draws).sqrt();
    // a constant quantity (a fallback box) has no sampling error; the fixture's f32 rounding stays
    let close = |a: f64, b: f64, se: f64| (a - b).abs() <= Z * se + 1e-6 * b.abs().max(1.0);
    assert!(
        close(mean, t_mean, se_mean) && close(var, t_var, se_var),
        "{what}: mean {mean} vs torchvision's {t_mean} (standard error {se_mean:e}), variance \
         {var} vs {t_var} (standard error {se_var:e}); replay with VPR_TEST_SEED={s}"
    );
}

#[test]
fn samplers_follow_torchvision_distributions() {
    let s = seed("augment sampler statistics");
    let f = fixture_tensors("augment.safetensors");
    let draws = f["stats.draws"].1[0];
    let mut rng = Rng::new(s);
    let jitter: Vec<JitterParams> = (0..draws as usize)
        .map(|_| JitterParams::sample(&mut rng, 0.7, 0.7, 0.7, 0.5))
        .collect();
    type Factor = fn(&JitterParams) -> f32;
    let factors: [(&str, Factor); 4] = [
        ("brightness", |p| p.brightness),
        ("contrast", |p| p.contrast),
        ("saturation", |p| p.saturation),
        ("hue", |p| p.hue),
    ];
    for (name, get) in factors {
        let v: Vec<f64> = jitter.iter().map(|p| get(p) as f64).collect();
        let theirs = &f[&format!("stats.jitter.{name}")].1;
        assert_same_distribution(&format!("jitter {name}"), moments(&v), theirs, draws, s);
    }
    let theirs = &f["stats.jitter.position"].1;
    for step in 0..4u8 {
        for position in 0..4 {
            let p = jitter.iter().filter(|j| j.order[position] == step).count() as f64 / draws;
            let t = theirs[step as usize * 4 + position];
            let se = ((p * (1.0 - p) + t * (1.0 - t)) / draws).sqrt();
            assert!(
                (p - t).abs() <= 5.0 * se,
                "step {step} at position {position}: frequency {p} vs torchvision's {t}; replay \
                 with VPR_TEST_SEED={s}"
            );
        }
    }
    // a box's quantity given the image's area
    type Quantity = fn(&CropBox, f64) -> f64;
    for (h, w) in [(512, 512), (13, 17), (480, 640), (20, 200)] {
        let boxes: Vec<CropBox> = (0..draws as usize)
            .map(|_| CropBox::sample(&mut rng, h, w, (0.5, 1.0), (0.75, 4.0 / 3.0)))
            .collect();
        assert!(boxes.iter().all(|b| b.height > 0
            && b.width > 0
            && b.top + b.height <= h
            && b.left + b.width <= w));
        let quantities: [(&str, Quantity); 6] = [
            ("top", |b, _| b.top as f64),
            ("left", |b, _| b.left as f64),
            ("height", |b, _| b.height as f64),
            ("width", |b, _| b.width as f64),
            ("area", |b, area| (b.height * b.width) as f64 / area),
            ("log_ratio", |b, _| (b.width as f64 / b.height as f64).ln()),
        ];
        for (q, get) in quantities {
            let v: Vec<f64> = boxes.iter().map(|b| get(b, (h * w) as f64)).collect();
            let theirs = &f[&format!("stats.crop.{h}x{w}.{q}")].1;
            let what = format!("crops of {h} x {w}: {q}");
            assert_same_distribution(&what, moments(&v), theirs, draws, s);
        }
    }
}

#[test]
fn crop_sampling_edge_cases() {
    let s = seed("augment crop edge cases");
    let mut rng = Rng::new(s);
    // a single pixel: every try fits only when rounding gives 1 x 1
    for _ in 0..100 {
        let b = CropBox::sample(&mut rng, 1, 1, (0.5, 1.0), (0.75, 4.0 / 3.0));
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 0,
                height: 1,
                width: 1
            }
        );
    }
    // every try too wide for a 3 x 100 strip (area fraction >= 1 needs width > 100): the
    // fallback's central crop of ratio 4/3
    let b = CropBox::sample(&mut rng, 3, 100, (1.0, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!(
        b,
        CropBox {
            top: 0,
            left: 48,
            height: 3,
            width: 4
        },
        "VPR_TEST_SEED={s}"
    );
    let b = CropBox::sample(&mut rng, 100, 3, (1.0, 1.0), (0.75, 4.0 / 3.0));
    assert_eq!(
        b,
        CropBox {
            top: 48,
            left: 0,
            height: 4,
            width: 3
        },
        "VPR_TEST_SEED={s}"
    );
    // an image whose ratio is allowed and a scale it can only meet whole
    let b = CropBox::sample(&mut rng, 30, 40, (1.0, 1.0), (4.0 / 3.0, 4.0 / 3.0));
    assert_eq!(
        b,
        CropBox {
            top: 0,
            left: 0,
            height: 30,
            width: 40
        }
    );
    // strengths of 0 give the identity
    assert_eq!(
        JitterParams::sample(&mut rng, 0.0, 0.0, 0.0, 0.0).brightness,
        1.0
    );
    let p = JitterParams::sample(&mut rng, 0.0, 0.0, 0.0, 0.0);
    assert_eq!(
        (p.brightness, p.contrast, p.saturation, p.hue),
        (1.0, 1.0, 1.0, 0.0)
    );
    let mut sorted = p.order;
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2, 3]);
}

#[test]
fn gpus_match_the_cpu_twin_on_odd_sizes() {
    let s = seed("augment odd sizes");
    let mut rng = Rng::new(s);
    for device in gpu_devices() {
        for (j, (&h, &w)) in ODD_SIZES.iter().zip(ODD_SIZES.iter().rev()).enumerate() {
            let n = 1 + j % 3;
            let x = Tensor::rand_uniform(
                &[n, h, w, 3],
                0.0,
                1.0,
                s + j as u64,
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let params: Vec<JitterParams> = (0..n)
                .map(|_| JitterParams::sample(&mut rng, 0.7, 0.7, 0.7, 0.5))
                .collect();
            let got = x.to_device(&device).unwrap().color_jitter(&params).unwrap();
            let want = x.color_jitter(&params).unwrap();
            let what = format!("color_jitter [{n}, {h}, {w}, 3] on {device}");
            assert_tensor_close(&got, &want, 1e-5, &what, s);
            let boxes: Vec<CropBox> = (0..n)
                .map(|_| CropBox::sample(&mut rng, h, w, (0.5, 1.0), (0.75, 4.0 / 3.0)))
                .collect();
            for (oh, ow) in [(7, 33), (1, 1), (h.min(64), w.min(64))] {
                for aa in [true, false] {
                    let got = x
                        .to_device(&device)
                        .unwrap()
                        .resized_crops(&boxes, oh, ow, aa)
                        .unwrap();
                    let want = x.resized_crops(&boxes, oh, ow, aa).unwrap();
                    let what = format!("resized_crops [{n}, {h}, {w}, 3] {boxes:?} to {oh} x {ow} aa={aa} on {device}");
                    assert_tensor_close(&got, &want, 1e-5, &what, s);
                }
            }
        }
    }
}

#[test]
fn conformance_rows_pass_on_gpus() {
    common::assert_conformance(vpr_engine::ops::augment::conformance, "augment conformance");
}

/// The conformance rows under shuffled thread schedules, where a missing barrier in the block
/// reduction of the grey means would give a wrong mean.
#[test]
fn conformance_rows_pass_under_shuffled_schedules() {
    let s = seed("augment shuffled schedules");
    for schedule in [s % 1000 + 1, s / 1000 % 1000 + 1001] {
        let device = Device::vgpu_with(VgpuOptions {
            seed: schedule,
            os_threads: 2,
            ..VgpuOptions::default()
        });
        let rows = vpr_engine::ops::augment::conformance(&device, s).unwrap();
        for r in rows {
            assert!(
                r.passed(),
                "{} {}: {:e} {:?}; VPR_VGPU_SEED={schedule}, VPR_TEST_SEED={s}",
                r.kernel,
                r.shape,
                r.max_err,
                r.error
            );
        }
    }
}

#[test]
fn identities_change_nothing() {
    let s = seed("augment identities");
    for device in all_devices() {
        let x = Tensor::rand_uniform(&[2, 9, 11, 3], 0.0, 1.0, s, DType::F32, &Device::Cpu)
            .unwrap()
            .to_device(&device)
            .unwrap();
        let y = x.color_jitter(&[JitterParams::IDENTITY; 2]).unwrap();
        assert_tensor_close(&y, &x, 0.0, &format!("identity jitter on {device}"), s);
        let whole = CropBox {
            top: 0,
            left: 0,
            height: 9,
            width: 11,
        };
        for aa in [true, false] {
            let y = x.resized_crops(&[whole; 2], 9, 11, aa).unwrap();
            assert_tensor_close(&y, &x, 0.0, &format!("whole crop aa={aa} on {device}"), s);
        }
        // a box of the output's size is a plain crop
        let b = CropBox {
            top: 2,
            left: 3,
            height: 5,
            width: 4,
        };
        let y = x.resized_crops(&[b; 2], 5, 4, true).unwrap();
        let want = x.narrow(1, 2, 5).unwrap().narrow(2, 3, 4).unwrap();
        assert_tensor_close(&y, &want, 0.0, &format!("plain crop on {device}"), s);
        // constant images stay constant through the resize
        let grey = Tensor::full(&[1, 9, 11, 3], 0.375, DType::F32, &device).unwrap();
        let y = grey.resized_crops(&[b], 13, 2, true).unwrap();
        let want = Tensor::full(&[1, 13, 2, 3], 0.375, DType::F32, &Device::Cpu).unwrap();
        assert_tensor_close(&y, &want, 1e-6, &format!("constant on {device}"), s);
    }
}

#[test]
fn views_are_read_through_their_layout() {
    let s = seed("augment views");
    // an NCHW tensor permuted to NHWC is a strided view
    let nchw = Tensor::rand_uniform(&[2, 3, 9, 8], 0.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    let mut rng = Rng::new(s);
    let params: Vec<JitterParams> = (0..2)
        .map(|_| JitterParams::sample(&mut rng, 0.7, 0.7, 0.7, 0.5))
        .collect();
    let b = CropBox::sample(&mut rng, 9, 8, (0.5, 1.0), (0.75, 4.0 / 3.0));
    for device in all_devices() {
        let view = nchw
            .to_device(&device)
            .unwrap()
            .permute(&[0, 2, 3, 1])
            .unwrap();
        let dense = view.contiguous().unwrap();
        let got = view.color_jitter(&params).unwrap();
        let want = dense.color_jitter(&params).unwrap();
        assert_tensor_close(
            &got,
            &want,
            0.0,
            &format!("jitter of a view on {device}"),
            s,
        );
        let got = view.resized_crops(&[b, b], 5, 6, true).unwrap();
        let want = dense.resized_crops(&[b, b], 5, 6, true).unwrap();
        assert_tensor_close(&got, &want, 0.0, &format!("crops of a view on {device}"), s);
    }
}

#[test]
fn bad_arguments_are_errors_naming_them() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[2, 5, 7, 3], DType::F32, &cpu).unwrap();
    let id = JitterParams::IDENTITY;
    let whole = CropBox {
        top: 0,
        left: 0,
        height: 5,
        width: 7,
    };
    let message = |r: vpr_engine::Result<Tensor>| r.expect_err("an error").to_string();
    for shape in [&[5, 7, 3][..], &[2, 5, 7, 4], &[2, 0, 7, 3]] {
        let bad = Tensor::zeros(shape, DType::F32, &cpu).unwrap();
        let m = message(bad.color_jitter(&[id; 2]));
        assert!(m.contains(&format!("{shape:?}")), "{m}");
        let m = message(bad.resized_crops(&[whole; 2], 3, 3, true));
        assert!(m.contains(&format!("{shape:?}")), "{m}");
    }
    let half = Tensor::zeros(&[2, 5, 7, 3], DType::F16, &cpu).unwrap();
    assert!(matches!(half.color_jitter(&[id; 2]), Err(Error::DType(_))));
    assert!(matches!(
        half.resized_crops(&[whole; 2], 3, 3, true),
        Err(Error::DType(_))
    ));
    let m = message(x.color_jitter(&[id; 3]));
    assert!(
        m.contains("3 parameter sets") && m.contains("[2, 5, 7, 3]"),
        "{m}"
    );
    let m = message(x.resized_crops(&[whole], 3, 3, true));
    assert!(m.contains("1 boxes") && m.contains("[2, 5, 7, 3]"), "{m}");
    let m = message(x.resized_crops(&[whole; 2], 0, 3, true));
    assert!(m.contains("0 x 3"), "{m}");
    for (i, b) in [
        CropBox { top: 1, ..whole },
        CropBox {
            left: 3,
            width: 5,
            ..whole
        },
        CropBox { height: 0, ..whole },
    ]
    .into_iter()
    .enumerate()
    {
        let m = message(x.resized_crops(&[whole, b], 3, 3, false));
        assert!(m.contains("box 1") && m.contains("5 x 7"), "case {i}: {m}");
    }
    let bad_order = JitterParams {
        order: [0, 1, 1, 3],
        ..id
    };
    let m = message(x.color_jitter(&[id, bad_order]));
    assert!(m.contains("[0, 1, 1, 3]") && m.contains("image 1"), "{m}");
    for (name, p) in [
        (
            "brightness",
            JitterParams {
                brightness: -0.1,
                ..id
            },
        ),
        (
            "contrast",
            JitterParams {
                contrast: f32::NAN,
                ..id
            },
        ),
        (
            "saturation",
            JitterParams {
                saturation: f32::INFINITY,
                ..id
            },
        ),
        ("hue", JitterParams { hue: 0.6, ..id }),
    ] {
        let m = message(x.color_jitter(&[p, id]));
        assert!(m.contains(name) && m.contains("image 0"), "{m}");
    }
    let graded = x.clone().requires_grad();
    let m = message(graded.color_jitter(&[id; 2]));
    assert!(m.contains("no backward"), "{m}");
    let m = message(graded.resized_crops(&[whole; 2], 3, 3, true));
    assert!(m.contains("no backward"), "{m}");
    // no images: nothing to do, but the counts still have to agree
    let empty = Tensor::zeros(&[0, 5, 7, 3], DType::F32, &cpu).unwrap();
    assert_eq!(empty.color_jitter(&[]).unwrap().shape(), &[0, 5, 7, 3]);
    assert_eq!(
        empty.resized_crops(&[], 4, 2, true).unwrap().shape(),
        &[0, 4, 2, 3]
    );
}
