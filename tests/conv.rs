//! conv2d and conv2d_fused: the CPU against a direct f64 convolution, the fused op against the
//! unfused ones, gradients by finite differences, shape errors, the GPUs against the CPU, and
//! PyTorch's numbers from tests/fixtures/conv_ops.safetensors.

mod common;

use common::{assert_close, seed};
use vpr_engine::autograd::gradcheck;
use vpr_engine::ops::conv::Conv2dOptions;
use vpr_engine::tensor::Rng;
use vpr_engine::{DType, Device, Error, Tensor};

/// One convolution: x [N, H, W, C], weight [O, KH, KW, C / groups] and options.
struct Case {
    what: &'static str,
    x: [usize; 4],
    w: [usize; 4],
    opts: Conv2dOptions,
}

fn opts(stride: usize, pad: usize, dil: usize, groups: usize) -> Conv2dOptions {
    Conv2dOptions::new()
        .stride(stride)
        .padding(pad)
        .dilation(dil)
        .groups(groups)
}

fn cases() -> Vec<Case> {
    let c = |what, x, w, opts| Case { what, x, w, opts };
    vec![
        c(
            "3x3 odd sizes",
            [2, 7, 9, 3],
            [5, 3, 3, 3],
            opts(1, 1, 1, 1),
        ),
        c(
            "3x3/2 odd input",
            [1, 9, 7, 4],
            [6, 3, 3, 4],
            opts(2, 1, 1, 1),
        ),
        c("dilation 2", [2, 8, 9, 4], [6, 3, 3, 4], opts(1, 2, 2, 1)),
        c("groups 2", [1, 7, 6, 4], [6, 3, 3, 2], opts(1, 1, 1, 2)),
        c("depthwise", [2, 6, 5, 5], [5, 3, 3, 1], opts(1, 1, 1, 5)),
        c(
            "depthwise x2, stride 2",
            [1, 7, 7, 3],
            [6, 3, 3, 1],
            opts(2, 1, 1, 3),
        ),
        c(
            "7x7/2 RGB stem",
            [1, 15, 13, 3],
            [8, 7, 7, 3],
            opts(2, 3, 1, 1),
        ),
        c("1x1", [2, 5, 7, 6], [9, 1, 1, 6], opts(1, 0, 1, 1)),
        c("1x1 groups 3", [1, 3, 5, 6], [9, 1, 1, 2], opts(1, 0, 1, 3)),
        c("1x1/2", [1, 7, 7, 6], [8, 1, 1, 6], opts(2, 0, 1, 1)),
        c(
            "2x3 kernel, stride [2, 1], padding [0, 1]",
            [2, 6, 5, 4],
            [3, 2, 3, 4],
            Conv2dOptions {
                stride: [2, 1],
                padding: [0, 1],
                dilation: [1, 1],
                groups: 1,
            },
        ),
    ]
}

/// The convolution straight from its definition, in f64, with the output size worked out here.
fn reference(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    bias: Option<&[f64]>,
    o: Conv2dOptions,
) -> (Vec<f64>, [usize; 4]) {
    let [n, h, wd, c] = xs;
    let [oc, kh, kw, cg] = ws;
    let og = oc / o.groups;
    let oh = (h + 2 * o.padding[0] - o.dilation[0] * (kh - 1) - 1) / o.stride[0] + 1;
    let ow = (wd + 2 * o.padding[1] - o.dilation[1] * (kw - 1) - 1) / o.stride[1] + 1;
    let mut out = vec![0.0; n * oh * ow * oc];
    for b in 0..n {
        for y in 0..oh {
            for xo in 0..ow {
                for m in 0..oc {
                    let group = m / og;
                    let mut s = bias.map_or(0.0, |bv| bv[m]);
                    for i in 0..kh {
                        for j in 0..kw {
                            let iy = (y * o.stride[0] + i * o.dilation[0]) as isize
                                - o.padding[0] as isize;
                            let ix = (xo * o.stride[1] + j * o.dilation[1]) as isize
                                - o.padding[1] as isize;
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                continue;
                            }
                            for ci in 0..cg {
                                let xv = x[((b * h + iy as usize) * wd + ix as usize) * c
                                    + group * cg
                                    + ci];
                                s += xv * w[((m * kh + i) * kw + j) * cg + ci];
                            }
                        }
                    }
                    out[((b * oh + y) * ow + xo) * oc + m] = s;
                }
            }
        }
    }
    (out, [n, oh, ow, oc])
}

fn rand(shape: &[usize], lo: f64, hi: f64, seed: u64, dtype: DType) -> Tensor {
    Tensor::rand_uniform(shape, lo, hi, seed, dtype, &Device::Cpu).unwrap()
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("cpu_matches_f64_reference");
    for (i, &dtype) in DType::FLOATS.iter().enumerate() {
        for (j, case) in cases().iter().enumerate() {
            let k = s + 10 * (i * 32 + j) as u64;
            let x = rand(&case.x, -1.0, 1.0, k, dtype);
            let w = rand(&case.w, -1.0, 1.0, k + 1, dtype);
            let b = rand(&[case.w[0]], -1.0, 1.0, k + 2, dtype);
            let got = x.conv2d(&w, Some(&b), case.opts).unwrap();
            let (want, shape) = reference(
                &x.to_f64_vec().unwrap(),
                case.x,
                &w.to_f64_vec().unwrap(),
                case.w,
                Some(&b.to_f64_vec().unwrap()),
                case.opts,
            );
            assert_eq!(got.shape(), shape, "{}", case.what);
            let tol = dtype.tolerance();
            let what = format!("cpu {dtype} {}", case.what);
            assert_close(&got.to_f64_vec().unwrap(), &want, tol, &what, s);
        }
    }
}

#[test]
fn fused_matches_unfused_ops() {
    let s = seed("fused_matches_unfused_ops");
    for (j, case) in cases().iter().enumerate() {
        let k = s + 10 * j as u64;
        let x = rand(&case.x, -1.0, 1.0, k, DType::F32);
        // weights scaled by 1/sqrt(fan-in), as networks initialise them, so outputs stay near
        // unit size and the f32 tolerance measures the convolution, not the size of its sums
        let bound = 1.0 / ((case.w[1] * case.w[2] * case.w[3]) as f64).sqrt();
        let w = rand(&case.w, -bound, bound, k + 1, DType::F32);
        let b = rand(&[case.w[0]], -1.0, 1.0, k + 2, DType::F32);
        let plain = x.conv2d(&w, Some(&b), case.opts).unwrap();
        let r = rand(plain.shape(), -1.0, 1.0, k + 3, DType::F32);
        let fused = x
            .conv2d_fused(&w, Some(&b), Some(&r), true, case.opts)
            .unwrap();
        let unfused = plain.add(&r).unwrap().relu().unwrap();
        let what = format!("fused {}", case.what);
        assert_close(
            &fused.to_f64_vec().unwrap(),
            &unfused.to_f64_vec().unwrap(),
            1e-6,
            &what,
            s,
        );
    }
}

/// Convolutions with enough output rows (over 512) and im2col columns that the CPU forward
/// splits the rows over threads in several tiles each, the last one short; forward only (too
/// large for finite differences).
#[test]
fn many_rows_match_reference_and_unfused() {
    let s = seed("many_rows_match_reference_and_unfused");
    let c = |what, x, w, opts| Case { what, x, w, opts };
    let cases = [
        c(
            "3x3 many rows",
            [2, 23, 29, 64],
            [9, 3, 3, 64],
            opts(1, 1, 1, 1),
        ),
        c(
            "3x3 groups 2 many rows",
            [1, 41, 37, 48],
            [6, 3, 3, 24],
            opts(1, 1, 1, 2),
        ),
    ];
    for (j, case) in cases.iter().enumerate() {
        let k = s + 10 * j as u64;
        let x = rand(&case.x, -1.0, 1.0, k, DType::F32);
        // weights scaled by 1/sqrt(fan-in), as networks initialise them, so outputs stay near
        // unit size and the f32 tolerance measures the convolution, not the size of its sums
        let bound = 1.0 / ((case.w[1] * case.w[2] * case.w[3]) as f64).sqrt();
        let w = rand(&case.w, -bound, bound, k + 1, DType::F32);
        let b = rand(&[case.w[0]], -1.0, 1.0, k + 2, DType::F32);
        let plain = x.conv2d(&w, Some(&b), case.opts).unwrap();
        let (want, shape) = reference(
            &x.to_f64_vec().unwrap(),
            case.x,
            &w.to_f64_vec().unwrap(),
            case.w,
            Some(&b.to_f64_vec().unwrap()),
            case.opts,
        );
        assert_eq!(plain.shape(), shape, "{}", case.what);
        let tol = DType::F32.tolerance();
        assert_close(&plain.to_f64_vec().unwrap(), &want, tol, case.what, s);
        let r = rand(plain.shape(), -1.0, 1.0, k + 3, DType::F32);
        let fused = x
            .conv2d_fused(&w, Some(&b), Some(&r), true, case.opts)
            .unwrap();
        let unfused = plain.add(&r).unwrap().relu().unwrap();
        let what = format!("fused {}", case.what);
        assert_close(
            &fused.to_f64_vec().unwrap(),
            &unfused.to_f64_vec().unwrap(),
            1e-6,
            &what,
            s,
        );
    }
}

type Op = Box<dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>>;

/// Values in ±[lo, hi] with random signs.
fn away_from_zero(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let m = lo + (hi - lo) * rng.uniform();
            if rng.below(2) == 0 {
                m
            } else {
                -m
            }
        })
        .collect();
    Tensor::from_f64(&v, shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("conv_gradients_match_finite_differences");
    for (j, case) in cases().iter().enumerate() {
        let k = s + 10 * j as u64;
        let o = case.opts;
        let x = rand(&case.x, -1.0, 1.0, k, DType::F32);
        let w = rand(&case.w, -1.0, 1.0, k + 1, DType::F32);
        let b = rand(&[case.w[0]], -1.0, 1.0, k + 2, DType::F32);
        let f: Op = Box::new(move |t| t[0].conv2d(&t[1], Some(&t[2]), o));
        let check = gradcheck(&f, &[x.clone(), w, b], 1e-2, k).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "conv2d {}: {} ({}); VPR_TEST_SEED={s}",
            case.what,
            check.max_error,
            check.worst
        );
        // fused with a residual and ReLU: small weights and a residual of magnitude >= 0.5 keep
        // every pre-activation > 0.1 away from the ReLU's kink, farther than a step moves it
        let cg_k = case.w[1] * case.w[2] * case.w[3];
        let scale = 0.3 / cg_k as f64;
        let w = rand(&case.w, -scale, scale, k + 4, DType::F32);
        let b = rand(&[case.w[0]], -0.05, 0.05, k + 5, DType::F32);
        let out_shape = x.conv2d(&w, None, o).unwrap().shape().to_vec();
        let r = away_from_zero(&out_shape, 0.5, 1.0, k + 6);
        let f: Op = Box::new(move |t| t[0].conv2d_fused(&t[1], Some(&t[2]), Some(&t[3]), true, o));
        let check = gradcheck(&f, &[x, w, b, r], 1e-2, k).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "conv2d_fused {}: {} ({}); VPR_TEST_SEED={s}",
            case.what,
            check.max_error,
            check.worst
        );
    }
}

fn shape_error(r: vpr_engine::Result<Tensor>, expect: &str) {
    match r {
        Err(Error::Shape(m)) => assert!(m.contains(expect), "message {m:?} lacks {expect:?}"),
        Err(e) => panic!("expected a shape error with {expect:?}, got {e}"),
        Ok(t) => panic!(
            "expected a shape error with {expect:?}, got a tensor {:?}",
            t.shape()
        ),
    }
}

#[test]
fn bad_shapes_are_clear_errors() {
    let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let o = Conv2dOptions::new();
    shape_error(t(&[5, 5, 3]).conv2d(&t(&[4, 3, 3, 3]), None, o), "rank 4");
    shape_error(
        t(&[1, 5, 5, 3]).conv2d(&t(&[4, 3, 3, 2]), None, o),
        "input channels per group",
    );
    shape_error(
        t(&[1, 5, 5, 6]).conv2d(&t(&[4, 3, 3, 2]), None, o.groups(4)),
        "must divide",
    );
    shape_error(
        t(&[1, 5, 5, 6]).conv2d(&t(&[5, 3, 3, 2]), None, o.groups(3)),
        "must divide",
    );
    shape_error(
        t(&[1, 4, 9, 3]).conv2d(&t(&[4, 7, 7, 3]), None, o.padding(1)),
        "padded input",
    );
    shape_error(
        t(&[1, 9, 9, 3]).conv2d(&t(&[4, 3, 3, 3]), Some(&t(&[3])), o),
        "bias",
    );
    shape_error(
        t(&[1, 9, 9, 3]).conv2d_fused(&t(&[4, 3, 3, 3]), None, Some(&t(&[1, 9, 9, 4])), true, o),
        "residual",
    );
    shape_error(
        t(&[1, 9, 9, 3]).conv2d(&t(&[4, 3, 3, 3]), None, o.stride(0)),
        "stride",
    );
}

#[test]
fn every_conformance_case_passes_on_the_gpus() {
    common::assert_conformance(vpr_engine::ops::conv::conformance, "conv conformance");
}

#[test]
fn matches_pytorch_fixtures() {
    let f = common::fixture_tensors("conv_ops.safetensors");
    let mut names: Vec<&str> = f
        .keys()
        .filter_map(|k| k.strip_prefix("conv.")?.strip_suffix(".opts"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "conv cases in the fixture");
    let tensor = |key: String| {
        let (shape, v) = &f[&key];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu)
            .unwrap()
            .requires_grad()
    };
    for name in names {
        let k = |part: &str| format!("conv.{name}.{part}");
        let o: Vec<usize> = f[&k("opts")].1.iter().map(|&v| v as usize).collect();
        let opts = Conv2dOptions {
            stride: [o[0], o[1]],
            padding: [o[2], o[3]],
            dilation: [o[4], o[5]],
            groups: o[6],
        };
        let (x, w, b) = (tensor(k("x")), tensor(k("w")), tensor(k("b")));
        let y = x.conv2d(&w, Some(&b), opts).unwrap();
        let check = |got: &Tensor, part: &str| {
            let (shape, want) = &f[&k(part)];
            assert_eq!(got.shape(), shape.as_slice(), "{name} {part}");
            assert_close(
                &got.to_f64_vec().unwrap(),
                want,
                1e-5,
                &format!("{name} {part}"),
                0,
            );
        };
        check(&y, "y");
        let dy = tensor(k("dy")).detach();
        let loss = y.mul(&dy).unwrap().sum_all().unwrap();
        let grads = vpr_engine::autograd::backward(&loss).unwrap();
        check(grads.get(&x).unwrap(), "dx");
        check(grads.get(&w).unwrap(), "dw");
        check(grads.get(&b).unwrap(), "db");
    }
}

/// Output and the gradients of x, w, bias and residual of a fused convolution on `device`.
fn fused_with_grads(inputs: &[Tensor; 4], opts: Conv2dOptions, device: &Device) -> Vec<Tensor> {
    let leaves: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_device(device).unwrap().requires_grad())
        .collect();
    let y = leaves[0]
        .conv2d_fused(&leaves[1], Some(&leaves[2]), Some(&leaves[3]), true, opts)
        .unwrap();
    let loss = y.mul(&y).unwrap().sum_all().unwrap();
    let grads = vpr_engine::autograd::backward(&loss).unwrap();
    std::iter::once(y.to_device(&Device::Cpu).unwrap())
        .chain(
            leaves
                .iter()
                .map(|l| grads.get(l).unwrap().to_device(&Device::Cpu).unwrap()),
        )
        .collect()
}

#[test]
fn gpu_autograd_matches_cpu() {
    let s = seed("conv_gpu_autograd_matches_cpu");
    for device in common::gpu_devices() {
        for (j, case) in cases().iter().enumerate() {
            let k = s + 10 * j as u64;
            let x = rand(&case.x, -1.0, 1.0, k, DType::F32);
            let w = rand(&case.w, -1.0, 1.0, k + 1, DType::F32);
            let b = rand(&[case.w[0]], -1.0, 1.0, k + 2, DType::F32);
            let out = x.conv2d(&w, None, case.opts).unwrap();
            let r = rand(out.shape(), -1.0, 1.0, k + 3, DType::F32);
            let inputs = [x, w, b, r];
            let want = fused_with_grads(&inputs, case.opts, &Device::Cpu);
            let got = fused_with_grads(&inputs, case.opts, &device);
            for (i, part) in ["y", "dx", "dw", "db", "dresidual"].iter().enumerate() {
                let what = format!("{device} {} {part}", case.what);
                common::assert_tensor_close(&got[i], &want[i], 1e-5, &what, s);
            }
        }
    }
}

#[test]
fn autocast_runs_in_bf16_with_f32_master_gradients() {
    let s = seed("conv_autocast");
    let case = &cases()[1];
    let x = rand(&case.x, -1.0, 1.0, s, DType::F32).requires_grad();
    let w = rand(&case.w, -1.0, 1.0, s + 1, DType::F32).requires_grad();
    let y = vpr_engine::autograd::autocast(DType::BF16, || x.conv2d(&w, None, case.opts)).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let want = x.conv2d(&w, None, case.opts).unwrap();
    common::assert_tensor_close(&y, &want, DType::BF16.tolerance(), "autocast forward", s);
    let grads = vpr_engine::autograd::backward(&y.to_dtype(DType::F32).unwrap().sum_all().unwrap())
        .unwrap();
    for t in [&x, &w] {
        assert_eq!(grads.get(t).unwrap().dtype(), DType::F32);
    }
}
