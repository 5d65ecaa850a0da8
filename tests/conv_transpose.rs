//! conv_transpose2d and nn::ConvTranspose2d: PyTorch's numbers and gradients from
//! tests/fixtures/conv_transpose.safetensors, the CPU against a direct f64 scatter on random
//! inputs, gradients by finite differences, the GPUs against the CPU (forward and every gradient),
//! shape errors, and a module loaded from PyTorch's weight layout.

mod common;

use common::{assert_close, seed};
use std::collections::BTreeMap;
use vpr_engine::autograd::gradcheck;
use vpr_engine::io::weights::{write_weights, WeightsFile};
use vpr_engine::nn::{load_strict, ConvTranspose2d, Module};
use vpr_engine::ops::conv::ConvTranspose2dOptions;
use vpr_engine::{DType, Device, Error, Tensor};

/// One transposed convolution: x [N, H, W, Cin], weight [Cin, KH, KW, Cout] and options.
struct Case {
    what: &'static str,
    x: [usize; 4],
    w: [usize; 4],
    opts: ConvTranspose2dOptions,
}

fn opts(stride: usize, pad: usize, output_pad: usize) -> ConvTranspose2dOptions {
    ConvTranspose2dOptions::new()
        .stride(stride)
        .padding(pad)
        .output_padding(output_pad)
}

fn cases() -> Vec<Case> {
    let c = |what, x, w, opts| Case { what, x, w, opts };
    vec![
        c(
            "k3 s2 p1 (LocalAdapt)",
            [2, 5, 4, 6],
            [6, 3, 3, 5],
            opts(2, 1, 0),
        ),
        c("k2 s2 p0", [1, 4, 5, 3], [3, 2, 2, 4], opts(2, 0, 0)),
        c("k3 s2 p1 op1", [1, 5, 6, 4], [4, 3, 3, 3], opts(2, 1, 1)),
        c("k3 s1 p1", [2, 4, 3, 5], [5, 3, 3, 6], opts(1, 1, 0)),
        c("k4 s3 p2 op2", [1, 3, 4, 3], [3, 4, 4, 2], opts(3, 2, 2)),
        c("k1 s1", [1, 3, 5, 7], [7, 1, 1, 4], opts(1, 0, 0)),
        c("one pixel", [3, 1, 1, 2], [2, 3, 3, 5], opts(2, 0, 1)),
        c(
            "2x3 kernel, stride [2, 3], padding [1, 0], output padding [1, 2]",
            [2, 3, 4, 3],
            [3, 2, 3, 4],
            ConvTranspose2dOptions {
                stride: [2, 3],
                padding: [1, 0],
                output_padding: [1, 2],
            },
        ),
    ]
}

/// The transposed convolution from its definition, in f64: every input pixel scatters
/// `x[n, i, j, :] @ w[:, kh, kw, :]` to output `(i * s - p + kh, j * s - p + kw)`.
fn reference(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    bias: &[f64],
    o: ConvTranspose2dOptions,
) -> (Vec<f64>, [usize; 4]) {
    let [n, h, wd, cin] = xs;
    let [_, kh, kw, cout] = ws;
    let oh = (h - 1) * o.stride[0] + kh + o.output_padding[0] - 2 * o.padding[0];
    let ow = (wd - 1) * o.stride[1] + kw + o.output_padding[1] - 2 * o.padding[1];
    let mut out = vec![0.0; n * oh * ow * cout];
    for (i, v) in out.iter_mut().enumerate() {
        *v = bias[i % cout];
    }
    for b in 0..n {
        for i in 0..h {
            for j in 0..wd {
                for ki in 0..kh {
                    for kj in 0..kw {
                        let y = (i * o.stride[0] + ki) as isize - o.padding[0] as isize;
                        let xo = (j * o.stride[1] + kj) as isize - o.padding[1] as isize;
                        if y < 0 || xo < 0 || y >= oh as isize || xo >= ow as isize {
                            continue;
                        }
                        let at = ((b * oh + y as usize) * ow + xo as usize) * cout;
                        for ci in 0..cin {
                            let xv = x[((b * h + i) * wd + j) * cin + ci];
                            for co in 0..cout {
                                out[at + co] += xv * w[((ci * kh + ki) * kw + kj) * cout + co];
                            }
                        }
                    }
                }
            }
        }
    }
    (out, [n, oh, ow, cout])
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::rand_uniform(shape, -1.0, 1.0, seed, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn cpu_matches_f64_reference() {
    let s = seed("conv_transpose_cpu_matches_f64_reference");
    for (j, case) in cases().iter().enumerate() {
        let k = s + 10 * j as u64;
        let (x, w, b) = (
            rand(&case.x, k),
            rand(&case.w, k + 1),
            rand(&[case.w[3]], k + 2),
        );
        let got = x.conv_transpose2d(&w, Some(&b), case.opts).unwrap();
        let f = |t: &Tensor| t.to_f64_vec().unwrap();
        let (want, shape) = reference(&f(&x), case.x, &f(&w), case.w, &f(&b), case.opts);
        assert_eq!(got.shape(), shape, "{}", case.what);
        assert_close(&f(&got), &want, 1e-5, case.what, s);
        // a non-contiguous x (a transposed view of the same values) gives the same numbers
        let [n, h, wd, c] = case.x;
        let xt = x
            .permute(&[0, 2, 1, 3])
            .unwrap()
            .contiguous()
            .unwrap()
            .permute(&[0, 2, 1, 3])
            .unwrap();
        assert_eq!(xt.shape(), [n, h, wd, c]);
        let again = xt.conv_transpose2d(&w, Some(&b), case.opts).unwrap();
        assert_close(&f(&again), &f(&got), 0.0, case.what, s);
    }
}

type Op = Box<dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>>;

#[test]
fn gradients_match_finite_differences() {
    let s = seed("conv_transpose_gradients_match_finite_differences");
    for (j, case) in cases().iter().enumerate() {
        let k = s + 10 * j as u64;
        let o = case.opts;
        let inputs = [
            rand(&case.x, k),
            rand(&case.w, k + 1),
            rand(&[case.w[3]], k + 2),
        ];
        let f: Op = Box::new(move |t| t[0].conv_transpose2d(&t[1], Some(&t[2]), o));
        let check = gradcheck(&f, &inputs, 1e-2, k).unwrap();
        assert!(
            check.max_error <= 1e-3,
            "{}: {} ({}); VPR_TEST_SEED={s}",
            case.what,
            check.max_error,
            check.worst
        );
    }
}

/// Output and the gradients of x, weight and bias under the loss sum(y * dy) on `device`.
fn with_grads(inputs: &[Tensor; 4], opts: ConvTranspose2dOptions, device: &Device) -> Vec<Tensor> {
    let on = |t: &Tensor| t.to_device(device).unwrap();
    let leaves: Vec<Tensor> = inputs[..3].iter().map(|t| on(t).requires_grad()).collect();
    let y = leaves[0]
        .conv_transpose2d(&leaves[1], Some(&leaves[2]), opts)
        .unwrap();
    let loss = y.mul(&on(&inputs[3])).unwrap().sum_all().unwrap();
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
fn gpus_match_cpu_forward_and_gradients() {
    let s = seed("conv_transpose_gpus_match_cpu");
    for device in common::gpu_devices() {
        for (j, case) in cases().iter().enumerate() {
            let k = s + 10 * j as u64;
            let (x, w, b) = (
                rand(&case.x, k),
                rand(&case.w, k + 1),
                rand(&[case.w[3]], k + 2),
            );
            let y = x.conv_transpose2d(&w, Some(&b), case.opts).unwrap();
            let dy = rand(y.shape(), k + 3);
            let inputs = [x, w, b, dy];
            let want = with_grads(&inputs, case.opts, &Device::Cpu);
            let got = with_grads(&inputs, case.opts, &device);
            for (i, part) in ["y", "dx", "dw", "db"].iter().enumerate() {
                let what = format!("{device} {} {part}", case.what);
                common::assert_tensor_close(&got[i], &want[i], 1e-5, &what, s);
            }
        }
    }
}

fn fixture_case(
    f: &std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
    name: &str,
) -> (ConvTranspose2dOptions, [Tensor; 3]) {
    let o: Vec<usize> = f[&format!("{name}.opts")]
        .1
        .iter()
        .map(|&v| v as usize)
        .collect();
    let opts = ConvTranspose2dOptions {
        stride: [o[0], o[1]],
        padding: [o[2], o[3]],
        output_padding: [o[4], o[5]],
    };
    let tensor = |part: &str| {
        let (shape, v) = &f[&format!("{name}.{part}")];
        Tensor::from_f64(v, shape, DType::F32, &Device::Cpu).unwrap()
    };
    (opts, [tensor("x"), tensor("w"), tensor("b")])
}

fn fixture_names(f: &std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>) -> Vec<String> {
    let mut names: Vec<String> = f
        .keys()
        .filter_map(|k| Some(k.strip_suffix(".opts")?.to_string()))
        .collect();
    names.sort();
    names
}

#[test]
fn matches_pytorch_fixtures() {
    let f = common::fixture_tensors("conv_transpose.safetensors");
    let names = fixture_names(&f);
    assert_eq!(names.len(), 6, "cases in the fixture");
    for name in names {
        let (opts, [x, w, b]) = fixture_case(&f, &name);
        let (x, w, b) = (x.requires_grad(), w.requires_grad(), b.requires_grad());
        let y = x.conv_transpose2d(&w, Some(&b), opts).unwrap();
        let check = |got: &Tensor, part: &str| {
            let (shape, want) = &f[&format!("{name}.{part}")];
            assert_eq!(got.shape(), shape.as_slice(), "{name} {part}");
            let what = format!("{name} {part}");
            assert_close(&got.to_f64_vec().unwrap(), want, 1e-5, &what, 0);
        };
        check(&y, "y");
        let (shape, dy) = &f[&format!("{name}.dy")];
        let dy = Tensor::from_f64(dy, shape, DType::F32, &Device::Cpu).unwrap();
        let loss = y.mul(&dy).unwrap().sum_all().unwrap();
        let grads = vpr_engine::autograd::backward(&loss).unwrap();
        check(grads.get(&x).unwrap(), "dx");
        check(grads.get(&w).unwrap(), "dw");
        check(grads.get(&b).unwrap(), "db");
    }
}

#[test]
fn module_loads_pytorch_layout_and_matches_pytorch() {
    let f = common::fixture_tensors("conv_transpose.safetensors");
    let (opts, [x, w, b]) = fixture_case(&f, "k3s2p1");
    let [cin, k, _, cout] = <[usize; 4]>::try_from(w.shape()).unwrap();
    let layer = ConvTranspose2d::new("up", cin, cout, k, opts, true, &Device::Cpu).unwrap();
    let entries = layer.state_entries();
    assert_eq!(entries[0].file_shape(), [cin, cout, k, k]);
    // the file holds PyTorch's [Cin, Cout, KH, KW]
    let torch_w = w.permute(&[0, 3, 1, 2]).unwrap().contiguous().unwrap();
    let dir = std::env::temp_dir().join(format!("conv_transpose_module_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("up.safetensors");
    let tensors = [
        ("up.weight".to_string(), torch_w.clone()),
        ("up.bias".to_string(), b),
    ];
    write_weights(&path, &tensors, &BTreeMap::new()).unwrap();
    load_strict(&entries, &WeightsFile::open(&path).unwrap(), true).unwrap();
    let y = layer.forward(&x).unwrap();
    let (shape, want) = &f["k3s2p1.y"];
    assert_eq!(y.shape(), shape.as_slice());
    assert_close(&y.to_f64_vec().unwrap(), want, 1e-5, "module forward", 0);
    let saved = entries[0].file_value().unwrap();
    assert_close(
        &saved.to_f64_vec().unwrap(),
        &torch_w.to_f64_vec().unwrap(),
        0.0,
        "weight saved back in PyTorch's layout",
        0,
    );
    std::fs::remove_dir_all(&dir).unwrap();
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
    let o = ConvTranspose2dOptions::new();
    shape_error(
        t(&[5, 5, 3]).conv_transpose2d(&t(&[3, 3, 3, 4]), None, o),
        "rank 4",
    );
    shape_error(
        t(&[1, 5, 5, 3]).conv_transpose2d(&t(&[4, 3, 3, 3]), None, o),
        "input channels",
    );
    shape_error(
        t(&[1, 5, 5, 3]).conv_transpose2d(&t(&[3, 3, 3, 4]), Some(&t(&[3])), o),
        "bias",
    );
    shape_error(
        t(&[1, 5, 5, 3]).conv_transpose2d(&t(&[3, 3, 3, 4]), None, o.stride(2).output_padding(2)),
        "output_padding",
    );
    shape_error(
        t(&[1, 5, 5, 3]).conv_transpose2d(&t(&[3, 3, 3, 4]), None, o.stride(0)),
        "stride",
    );
    shape_error(
        t(&[1, 1, 1, 3]).conv_transpose2d(&t(&[3, 1, 1, 4]), None, o.padding(1)),
        "empty",
    );
}
