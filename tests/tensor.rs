//! Tensors, views, copies and casts: CPU against plain Rust references, the virtual GPU against
//! the CPU, and the errors of bad input.

mod common;

use common::{assert_close, gpu_devices, seed};
use vpr_engine::{DType, Device, Error, Tensor};

fn iota(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|i| i as f32).collect(), shape, &Device::Cpu).unwrap()
}

#[test]
fn views_index_like_pytorch() {
    let t = iota(&[2, 3, 4]);
    // t.permute(2, 0, 1)[1] == [[1, 5, 9], [13, 17, 21]]
    let p = t.permute(&[2, 0, 1]).unwrap().narrow(0, 1, 1).unwrap();
    assert_eq!(
        p.to_vec::<f32>().unwrap(),
        vec![1.0, 5.0, 9.0, 13.0, 17.0, 21.0]
    );
    let tr = t.transpose(0, -1).unwrap();
    assert_eq!(tr.shape(), &[4, 3, 2]);
    assert_eq!(tr.to_vec::<f32>().unwrap()[..4], [0.0, 12.0, 4.0, 16.0]);
    let b = Tensor::from_vec(vec![1.0f32, 2.0, 3.0], &[3, 1], &Device::Cpu)
        .unwrap()
        .broadcast_to(&[2, 3, 4])
        .unwrap();
    assert_eq!(
        b.to_vec::<f32>().unwrap()[..8],
        [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    );
    let r = t.narrow(1, 1, 2).unwrap().reshape(&[usize::MAX]).unwrap();
    assert_eq!(r.shape(), &[16]);
    assert_eq!(r.to_vec::<f32>().unwrap()[..5], [4.0, 5.0, 6.0, 7.0, 8.0]);
    assert_eq!(t.unsqueeze(1).unwrap().shape(), &[2, 1, 3, 4]);
    assert_eq!(
        t.unsqueeze(1).unwrap().squeeze(1).unwrap().shape(),
        &[2, 3, 4]
    );
}

#[test]
fn copies_and_casts_match_the_cpu_on_gpus() {
    common::assert_conformance(vpr_engine::ops::copy::conformance, "copy conformance");
}

#[test]
fn casts_round_to_nearest_even_and_truncate_to_integers() {
    let vals = [
        1.0f32 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -2.7,
        65519.0,
        65520.0,
        f32::NAN,
    ];
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        let t = Tensor::from_slice(&vals, &[6], &device).unwrap();
        let b = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_vec::<half::bf16>()
            .unwrap();
        assert_eq!(b[0].to_bits(), 0x3f80, "ties go to even");
        assert_eq!(b[1].to_bits(), 0x3f82);
        assert_eq!(b[5].to_bits(), 0x7fff, "NaN becomes the canonical NaN");
        let h = t
            .to_dtype(DType::F16)
            .unwrap()
            .to_vec::<half::f16>()
            .unwrap();
        assert_eq!(h[3].to_f32(), 65504.0);
        assert!(h[4].to_f32().is_infinite(), "65520 rounds to inf in f16");
        assert_eq!(h[5].to_bits(), 0x7fff);
        let i = t
            .narrow(0, 0, 3)
            .unwrap()
            .to_dtype(DType::I32)
            .unwrap()
            .to_vec::<i32>()
            .unwrap();
        assert_eq!(i, vec![1, 1, -2]);
    }
}

#[test]
fn f16_and_bf16_conversions_agree_with_the_half_crate_on_many_values() {
    let s = seed("conversions");
    let mut rng = vpr_engine::tensor::Rng::new(s);
    // random bit patterns cover normals, subnormals, infinities and NaNs
    let vals: Vec<f32> = (0..4096)
        .map(|_| f32::from_bits(rng.next_u64() as u32))
        .collect();
    let vgpu = Device::new("vgpu").unwrap();
    let t = Tensor::from_slice(&vals, &[vals.len()], &vgpu).unwrap();
    let h = t
        .to_dtype(DType::F16)
        .unwrap()
        .to_vec::<half::f16>()
        .unwrap();
    let b = t
        .to_dtype(DType::BF16)
        .unwrap()
        .to_vec::<half::bf16>()
        .unwrap();
    for (i, &v) in vals.iter().enumerate() {
        if v.is_nan() {
            assert_eq!(
                (h[i].to_bits(), b[i].to_bits()),
                (0x7fff, 0x7fff),
                "seed {s}"
            );
        } else {
            assert_eq!(h[i], half::f16::from_f32(v), "f16 of {v:e} (seed {s})");
            assert_eq!(b[i], half::bf16::from_f32(v), "bf16 of {v:e} (seed {s})");
        }
    }
}

#[test]
fn device_round_trips_keep_values_and_views() {
    let s = seed("round_trips");
    for device in gpu_devices() {
        for dtype in DType::ALL {
            let t = Tensor::rand_uniform(&[5, 1, 9], 0.0, 100.0, s, dtype, &Device::Cpu).unwrap();
            let back = t
                .to_device(&device)
                .unwrap()
                .transpose(0, 2)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            let want = t.transpose(0, 2).unwrap();
            assert_close(
                &back.to_f64_vec().unwrap(),
                &want.to_f64_vec().unwrap(),
                0.0,
                &format!("{dtype} round trip"),
                s,
            );
        }
        let empty = Tensor::zeros(&[0, 3], DType::F32, &device).unwrap();
        assert_eq!(
            empty
                .t()
                .unwrap()
                .contiguous()
                .unwrap()
                .to_vec::<f32>()
                .unwrap(),
            Vec::<f32>::new()
        );
        assert_eq!(empty.to_dtype(DType::BF16).unwrap().numel(), 0);
    }
}

#[test]
fn seeded_random_tensors_are_reproducible() {
    let a = Tensor::randn(&[1000], 0.0, 1.0, 42, DType::F32, &Device::Cpu)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    let b = Tensor::randn(&[1000], 0.0, 1.0, 42, DType::F32, &Device::Cpu)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    assert_eq!(a, b);
    let mean = a.iter().sum::<f64>() / 1000.0;
    let var = a.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 1000.0;
    assert!(
        mean.abs() < 0.1 && (var - 1.0).abs() < 0.15,
        "mean {mean}, var {var}"
    );
    let u = Tensor::rand_uniform(&[1000], -2.0, 3.0, 7, DType::F32, &Device::Cpu)
        .unwrap()
        .to_f64_vec()
        .unwrap();
    assert!(u.iter().all(|&x| (-2.0..3.0).contains(&x)));
}

#[test]
fn bad_input_gives_errors_that_name_the_problem() {
    let t = iota(&[2, 3]);
    let e = t.reshape(&[4, 2]).unwrap_err().to_string();
    assert!(e.contains("[2, 3]") && e.contains("[4, 2]"), "{e}");
    let e = t.permute(&[0, 0]).unwrap_err().to_string();
    assert!(e.contains("[0, 0]"), "{e}");
    assert!(matches!(t.narrow(1, 2, 2), Err(Error::Shape(_))));
    assert!(matches!(t.broadcast_to(&[3, 3]), Err(Error::Shape(_))));
    assert!(matches!(t.transpose(0, 5), Err(Error::Shape(_))));
    let e = t.to_vec::<half::f16>().unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains("f32"), "{e}");
    assert!(matches!(
        Tensor::from_vec(vec![1.0f32; 5], &[2, 3], &Device::Cpu),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        Tensor::zeros(&[1; 9], DType::F32, &Device::Cpu),
        Err(Error::Shape(_))
    ));
    for bad in ["gpu", "cuda:x", "cuda:", "CPU", ""] {
        let e = Device::new(bad).unwrap_err().to_string();
        assert!(e.contains("unknown device"), "{bad}: {e}");
    }
}

#[test]
fn asking_for_cuda_without_a_gpu_explains_why() {
    match Device::new("cuda:0") {
        Ok(d) => eprintln!("a GPU is present ({d}); nothing to check"),
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("cuda:0 is unavailable"), "{msg}");
        }
    }
}

#[test]
fn float_to_integer_casts_saturate_identically_on_every_device() {
    let vals = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        3e9,
        -3e9,
        300.0,
        -1.0,
        2.7,
        -2.7,
    ];
    let i32s = [0, i32::MAX, i32::MIN, i32::MAX, i32::MIN, 300, -1, 2, -2];
    let u8s = [0u8, 255, 0, 255, 0, 44, 255, 2, 254];
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        for dtype in DType::FLOATS {
            let t = Tensor::from_slice(&vals, &[vals.len()], &device)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            // f16 and bf16 cannot hold 3e9 exactly, but it stays out of i32's range
            assert_eq!(
                t.to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
                i32s,
                "{device} {dtype}"
            );
            assert_eq!(
                t.to_dtype(DType::U8).unwrap().to_vec::<u8>().unwrap(),
                u8s,
                "{device} {dtype}"
            );
            let i64s = t.to_dtype(DType::I64).unwrap().to_vec::<i64>().unwrap();
            assert_eq!(
                (i64s[0], i64s[1], i64s[2], i64s[5], i64s[8]),
                (0, i64::MAX, i64::MIN, 300, -2),
                "{device} {dtype}"
            );
        }
    }
}

#[test]
fn large_views_made_dense_on_the_cpu_keep_every_element() {
    // large enough to be split over threads; the reference reads the view element by element
    let s = seed("large_views");
    let t = Tensor::rand_uniform(&[3, 300, 257], -1.0, 1.0, s, DType::F32, &Device::Cpu).unwrap();
    for view in [
        t.permute(&[2, 0, 1]).unwrap(),
        t.narrow(1, 7, 250).unwrap().transpose(0, 2).unwrap(),
        t.narrow(2, 1, 1)
            .unwrap()
            .broadcast_to(&[2, 3, 300, 5])
            .unwrap(),
    ] {
        let dense = view.contiguous().unwrap();
        assert!(dense.is_contiguous());
        assert_close(
            &dense.to_f64_vec().unwrap(),
            &view.to_f64_vec().unwrap(),
            0.0,
            "dense copy",
            s,
        );
    }
}
