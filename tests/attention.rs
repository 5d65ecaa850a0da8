//! Fused attention: the CPU against a naive f64 softmax(q kᵀ · scale) v and its f64 gradients,
//! finite differences, PyTorch's scaled_dot_product_attention (tests/fixtures/attention.safetensors),
//! the views of a fused qkv projection, the virtual GPU (and a real one when present) against the
//! CPU, and errors for bad input.

mod common;

use common::{assert_close, assert_tensor_close, fixture_tensors, gpu_devices, seed};
use vpr_engine::autograd::{backward_with, gradcheck};
use vpr_engine::{DType, Device, Tensor};

/// Output and gradients of q, k, v of one attention call, in f64, all `[B, H, L, D]` row-major
/// (the gradients zero when no output gradient is given).
struct Reference {
    out: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

/// Naive f64 attention per (b, h): the whole [L, L] probability matrix, then the textbook
/// gradients dV = Pᵀ dO, dP = dO Vᵀ, dS = P (dP - rowsum(P dP)), dQ = scale dS K, dK = scale dSᵀ Q.
fn reference(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    g: Option<&[f64]>,
    shape: [usize; 4],
    scale: f64,
) -> Reference {
    let [b, h, l, d] = shape;
    let n = b * h * l * d;
    let mut r = Reference {
        out: vec![0.0; n],
        dq: vec![0.0; n],
        dk: vec![0.0; n],
        dv: vec![0.0; n],
    };
    for head in 0..b * h {
        let at = |x: &[f64], i: usize, j: usize| x[(head * l + i) * d + j];
        let mut p = vec![0.0; l * l];
        for i in 0..l {
            for j in 0..l {
                p[i * l + j] = scale * (0..d).map(|e| at(q, i, e) * at(k, j, e)).sum::<f64>();
            }
            let row = &mut p[i * l..(i + 1) * l];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            row.iter_mut().for_each(|x| *x = (*x - m).exp());
            let s: f64 = row.iter().sum();
            row.iter_mut().for_each(|x| *x /= s);
        }
        let base = head * l * d;
        for i in 0..l {
            for e in 0..d {
                r.out[base + i * d + e] = (0..l).map(|j| p[i * l + j] * at(v, j, e)).sum();
            }
        }
        let Some(g) = g else { continue };
        let mut ds = vec![0.0; l * l];
        for i in 0..l {
            let dp: Vec<f64> = (0..l)
                .map(|j| (0..d).map(|e| at(g, i, e) * at(v, j, e)).sum())
                .collect();
            let dot: f64 = (0..l).map(|j| p[i * l + j] * dp[j]).sum();
            for j in 0..l {
                ds[i * l + j] = p[i * l + j] * (dp[j] - dot);
            }
        }
        for i in 0..l {
            for e in 0..d {
                r.dq[base + i * d + e] =
                    scale * (0..l).map(|j| ds[i * l + j] * at(k, j, e)).sum::<f64>();
                r.dk[base + i * d + e] =
                    scale * (0..l).map(|j| ds[j * l + i] * at(q, j, e)).sum::<f64>();
                r.dv[base + i * d + e] = (0..l).map(|j| p[j * l + i] * at(g, j, e)).sum();
            }
        }
    }
    r
}

fn randn(shape: &[usize], seed: u64, dtype: DType, device: &Device) -> Tensor {
    Tensor::randn(shape, 0.0, 1.0, seed, dtype, device).unwrap()
}

/// The forward and the tape's gradients of q, k, v for the output gradient `g`.
fn run(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, scale: f64) -> [Tensor; 4] {
    let (q, k, v) = (
        q.detach().requires_grad(),
        k.detach().requires_grad(),
        v.detach().requires_grad(),
    );
    let out = q.attention(&k, &v, scale).unwrap();
    let grads = backward_with(&out, g.clone()).unwrap();
    let grad = |t: &Tensor| grads.get(t).expect("a gradient for every input").clone();
    [out.detach(), grad(&q), grad(&k), grad(&v)]
}

#[test]
fn the_cpu_matches_the_f64_reference() {
    let s = seed("the_cpu_matches_the_f64_reference");
    let cases: &[([usize; 4], &[DType])] = &[
        ([1, 1, 1, 64], &DType::FLOATS),
        ([2, 3, 7, 64], &DType::FLOATS),
        ([1, 2, 257, 64], &[DType::F32]),
        ([1, 2, 261, 128], &[DType::F32, DType::BF16]),
        ([1, 1, 70, 80], &[DType::F16]),
        ([1, 1, 1370, 64], &[DType::F32]),
    ];
    for (c, &(shape, dtypes)) in cases.iter().enumerate() {
        for &dtype in dtypes {
            let cs = s + 8 * c as u64;
            let [q, k, v, g] = [0, 1, 2, 3].map(|i| randn(&shape, cs + i, dtype, &Device::Cpu));
            let scale = 1.0 / (shape[3] as f64).sqrt();
            let values = |t: &Tensor| t.to_f64_vec().unwrap();
            let what = format!("{dtype} {shape:?}");
            if shape[2] > 300 {
                // the forward alone at the long length (the f64 gradients take seconds there)
                let out = q.attention(&k, &v, scale).unwrap();
                let want = reference(&values(&q), &values(&k), &values(&v), None, shape, scale);
                assert_close(
                    &values(&out),
                    &want.out,
                    dtype.tolerance(),
                    &format!("{what} out"),
                    s,
                );
                continue;
            }
            let want = reference(
                &values(&q),
                &values(&k),
                &values(&v),
                Some(&values(&g)),
                shape,
                scale,
            );
            let [out, dq, dk, dv] = run(&q, &k, &v, &g, scale);
            for (name, got, want) in [
                ("out", &out, &want.out),
                ("dq", &dq, &want.dq),
                ("dk", &dk, &want.dk),
                ("dv", &dv, &want.dv),
            ] {
                assert_eq!(got.shape(), shape, "{what} {name}");
                assert_eq!(got.dtype(), dtype, "{what} {name}");
                assert_close(
                    &values(got),
                    want,
                    dtype.tolerance(),
                    &format!("{what} {name}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn gradients_match_finite_differences() {
    let s = seed("gradients_match_finite_differences");
    let shape = [1, 2, 5, 3];
    let inputs: Vec<Tensor> = (0..3)
        .map(|i| randn(&shape, s + i, DType::F32, &Device::Cpu))
        .collect();
    let check = gradcheck(|xs| xs[0].attention(&xs[1], &xs[2], 0.7), &inputs, 1e-2, s).unwrap();
    assert!(
        check.max_error <= 1e-3,
        "{} ({}); VPR_TEST_SEED={s}",
        check.max_error,
        check.worst
    );
}

#[test]
fn pytorch_scaled_dot_product_attention() {
    let s = seed("pytorch_scaled_dot_product_attention");
    let fx = fixture_tensors("attention.safetensors");
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in &devices {
        let tensor = |name: &str| {
            let (shape, values) = &fx[name];
            Tensor::from_f64(values, shape, DType::F32, device).unwrap()
        };
        let [q, k, v, g] = ["q", "k", "v", "dout"].map(tensor);
        let scale = 1.0 / (q.shape()[3] as f64).sqrt();
        let got = run(&q, &k, &v, &g, scale);
        for (name, got) in ["out", "dq", "dk", "dv"].iter().zip(&got) {
            assert_tensor_close(got, &tensor(name), 1e-5, &format!("{device} {name}"), s);
        }
    }
}

/// q, k, v as the views of a fused qkv projection `[B, L, 3, H, D]`: read in place, the output
/// transposes to a contiguous `[B, L, H, D]`, and the gradient lands in the right thirds of qkv.
#[test]
fn fused_qkv_views() {
    let s = seed("fused_qkv_views");
    let (b, l, h, d) = (2, 9, 3, 16);
    let mut devices = vec![Device::Cpu];
    devices.extend(gpu_devices());
    for device in &devices {
        let qkv = randn(&[b, l, 3, h, d], s, DType::F32, device).requires_grad();
        let part = |p: usize| {
            qkv.narrow(2, p, 1)
                .unwrap()
                .squeeze(2)
                .unwrap()
                .permute(&[0, 2, 1, 3])
                .unwrap()
        };
        let out = part(0).attention(&part(1), &part(2), 0.25).unwrap();
        assert_eq!(out.shape(), [b, h, l, d]);
        let merged = out.transpose(1, 2).unwrap();
        assert!(
            merged.is_contiguous(),
            "{device}: out.transpose(1, 2) is not contiguous"
        );
        let g = randn(&[b, h, l, d], s + 1, DType::F32, device);
        let grads = backward_with(&out, g.clone()).unwrap();
        let dqkv = grads.get(&qkv).expect("a gradient for qkv").clone();

        // the same from dense copies
        let dense = |p: usize| part(p).detach().contiguous().unwrap();
        let [want_out, dq, dk, dv] = run(&dense(0), &dense(1), &dense(2), &g, 0.25);
        assert_tensor_close(&out.detach(), &want_out, 1e-6, &format!("{device} out"), s);
        let want = Tensor::cat(
            &[dq, dk, dv]
                .map(|t| t.permute(&[0, 2, 1, 3]).unwrap().unsqueeze(2).unwrap())
                .iter()
                .collect::<Vec<_>>(),
            2,
        )
        .unwrap();
        assert_tensor_close(&dqkv, &want, 1e-6, &format!("{device} dqkv"), s);
    }
}

#[test]
fn the_gpus_match_the_cpu() {
    common::assert_conformance(vpr_engine::ops::attention::conformance, "attention");
}

/// The whole path through the tape on the GPUs: f16 views with a copied (transposed) k.
#[test]
fn the_gpus_match_the_cpu_through_autograd() {
    let s = seed("the_gpus_match_the_cpu_through_autograd");
    let shape = [2, 2, 67, 64];
    for device in gpu_devices() {
        for dtype in DType::FLOATS {
            let [q, v, g] = [0, 1, 2].map(|i| randn(&shape, s + i, dtype, &Device::Cpu));
            // k stored [B, H, D, L]: its last axis has stride L, so attention copies it
            let k = randn(&[2, 2, 64, 67], s + 3, dtype, &Device::Cpu)
                .transpose(2, 3)
                .unwrap();
            let want = run(&q, &k, &v, &g, 0.125);
            let on = |t: &Tensor| t.to_device(&device).unwrap();
            let k_on = on(&k.transpose(2, 3).unwrap()).transpose(2, 3).unwrap();
            let got = run(&on(&q), &k_on, &on(&v), &on(&g), 0.125);
            for (name, (got, want)) in ["out", "dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
                assert_tensor_close(
                    got,
                    want,
                    dtype.tolerance(),
                    &format!("{device} {dtype} {name}"),
                    s,
                );
            }
        }
    }
}

#[test]
fn empty_inputs_give_empty_outputs() {
    let q = Tensor::zeros(&[2, 3, 0, 8], DType::F32, &Device::Cpu).unwrap();
    let out = q.attention(&q, &q, 1.0).unwrap();
    assert_eq!(out.shape(), [2, 3, 0, 8]);
}

#[test]
fn bad_input_is_an_error_naming_the_problem() {
    let cpu = Device::Cpu;
    let t = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &cpu).unwrap();
    let q = t(&[1, 2, 5, 8], DType::F32);
    let error = |r: vpr_engine::Result<Tensor>| r.unwrap_err().to_string();

    let e = error(t(&[2, 5, 8], DType::F32).attention(&q, &q, 1.0));
    assert!(
        e.contains("[2, 5, 8]") && e.contains("[batch, heads, length, head_dim]"),
        "{e}"
    );
    let e = error(q.attention(&t(&[1, 2, 6, 8], DType::F32), &q, 1.0));
    assert!(e.contains("[1, 2, 6, 8]"), "{e}");
    let e = error(q.attention(&q, &t(&[1, 2, 5, 8], DType::BF16), 1.0));
    assert!(e.contains("bf16") && e.contains("one dtype"), "{e}");
    let i = t(&[1, 2, 5, 8], DType::I32);
    let e = error(i.attention(&i, &i, 1.0));
    assert!(e.contains("float"), "{e}");
    let e = error(q.attention(&q, &q, f64::NAN));
    assert!(e.contains("scale"), "{e}");
    let vgpu = Device::new("vgpu").unwrap();
    let e = error(q.attention(&q.to_device(&vgpu).unwrap(), &q, 1.0));
    assert!(e.contains("cpu") && e.contains("vgpu"), "{e}");
    let wide = Tensor::zeros(&[1, 1, 3, 129], DType::F32, &vgpu).unwrap();
    let e = error(wide.attention(&wide, &wide, 1.0));
    assert!(e.contains("129") && e.contains("128"), "{e}");
}
