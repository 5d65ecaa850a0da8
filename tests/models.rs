//! CosPlace / EigenPlaces models against PyTorch: tiny networks with torchvision's exact layouts
//! (ResNet-18 BasicBlocks, ResNet-50 Bottlenecks, VGG16), converted by `convert`, with the
//! descriptors, gradients and BatchNorm running statistics PyTorch computed
//! in float64 (tests/fixtures/cnn_*.safetensors, written by tools/fixtures/cnn_models.py), on the
//! CPU and the GPUs (virtual, and CUDA when present). Also strict-loading errors, metadata rules,
//! f16/bf16 files, freezing, bf16 autocast, the tape staying empty during inference, BatchNorm
//! folding, layer gradients against finite differences, and saving a trained network.

mod common;

use common::{assert_close, max_relative_error as relative_error, seed};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use vpr_engine::autograd::{autocast, backward, gradcheck, tape_len};
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::models::{self, CosPlaceNet, InputSize};
use vpr_engine::nn::{l2_normalize, BatchNorm2d, Conv2d, GeM, Module};
use vpr_engine::ops::conv::Conv2dOptions;
use vpr_engine::{DType, Device, Tensor};

const MODELS: [&str; 3] = [
    "cnn_cosplace_resnet18",
    "cnn_eigenplaces_resnet50",
    "cnn_cosplace_vgg16",
];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"))
}

/// PyTorch's results for a model.
struct Expected(WeightsFile);

impl Expected {
    fn open(model: &str) -> Expected {
        Expected(WeightsFile::open(&fixture(&format!("{model}.expected"))).unwrap())
    }

    fn get(&self, name: &str, device: &Device) -> Tensor {
        self.0.tensor(name, DType::F32, device).unwrap()
    }

    fn values(&self, name: &str) -> Vec<f64> {
        self.0.read_f64(name).unwrap()
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_f64_vec().unwrap()
}

/// A tensor read back from a safetensors file, to be rewritten.
struct Entry {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Writes a modified copy of fixture `model` (tensors and metadata) into the temp folder.
fn rewrite(
    model: &str,
    tag: &str,
    edit: impl FnOnce(&mut HashMap<String, Entry>, &mut HashMap<String, String>),
) -> PathBuf {
    let bytes = std::fs::read(fixture(model)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap_or_default();
    let mut tensors: HashMap<String, Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let entry = Entry {
                dtype: v.dtype(),
                shape: v.shape().to_vec(),
                data: v.data().to_vec(),
            };
            (name, entry)
        })
        .collect();
    edit(&mut tensors, &mut meta);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, e)| {
            let view = TensorView::new(e.dtype, e.shape.clone(), &e.data).unwrap();
            (n.clone(), view)
        })
        .collect();
    let path = std::env::temp_dir().join(format!(
        "vpr-models-{}-{model}-{tag}.safetensors",
        std::process::id()
    ));
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::tensor::serialize_to_file(views, meta, &path).unwrap();
    path
}

fn f32_entry(shape: &[usize], values: &[f32]) -> Entry {
    Entry {
        dtype: StDtype::F32,
        shape: shape.to_vec(),
        data: bytemuck::cast_slice(values).to_vec(),
    }
}

fn load_error(path: &Path) -> String {
    match models::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn descriptors_match_pytorch_on_cpu() {
    for model in MODELS {
        let expected = Expected::open(model);
        let inference = models::load(&fixture(model), &Device::Cpu).unwrap();
        let net = CosPlaceNet::load(&fixture(model), &Device::Cpu).unwrap();
        assert_eq!(inference.dim(), expected.values("descriptors.0").len());
        for i in 0..2 {
            let x = expected.get(&format!("input.{i}"), &Device::Cpu);
            let want = expected.values(&format!("descriptors.{i}"));
            let folded = values(&inference.descriptors(&x).unwrap());
            let unfolded = values(&net.forward(&x).unwrap());
            eprintln!(
                "{model} image {i}: max error folded {:.1e}, unfolded {:.1e}",
                relative_error(&folded, &want),
                relative_error(&unfolded, &want)
            );
            assert_close(&folded, &want, 1e-5, &format!("{model} image {i}"), 0);
            assert_close(&unfolded, &want, 1e-5, &format!("{model} eval {i}"), 0);
        }
    }
}

#[test]
fn metadata_describes_the_model() {
    let m = models::load(&fixture("cnn_eigenplaces_resnet50"), &Device::Cpu).unwrap();
    assert_eq!(m.describe(), "eigenplaces resnet50 -> 6");
    assert_eq!(m.dim(), 6);
    assert_eq!(m.input().mean, [0.485, 0.456, 0.406]);
    assert_eq!(m.input().std, [0.229, 0.224, 0.225]);
    assert_eq!(m.input().size, InputSize::Any);
    let m = models::load(&fixture("cnn_cosplace_vgg16"), &Device::Cpu).unwrap();
    assert_eq!(m.describe(), "cosplace vgg16 -> 8");
    assert!(m.device().is_cpu());
}

#[test]
fn resnet_truncated_at_conv4() {
    let path = rewrite("cnn_cosplace_resnet18", "conv4", |tensors, meta| {
        tensors.retain(|name, _| !name.starts_with("backbone.7."));
        meta.insert("vpr.backbone.truncate".into(), "conv4".into());
    });
    let expected = Expected::open("cnn_cosplace_resnet18");
    let model = models::load(&path, &Device::Cpu).unwrap();
    for i in 0..2 {
        let x = expected.get(&format!("input.{i}"), &Device::Cpu);
        let got = values(&model.descriptors(&x).unwrap());
        let want = expected.values(&format!("conv4.descriptors.{i}"));
        assert_close(&got, &want, 1e-5, &format!("conv4 image {i}"), 0);
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn train_mode_gradients_and_running_stats_match_pytorch() {
    for model in MODELS {
        let expected = Expected::open(model);
        let net = CosPlaceNet::load(&fixture(model), &Device::Cpu).unwrap();
        net.set_train(true);
        let x = expected.get("train.input", &Device::Cpu);
        let desc = net.forward(&x).unwrap();
        assert_close(
            &values(&desc),
            &expected.values("train.descriptors"),
            1e-5,
            &format!("{model} train-mode descriptors"),
            0,
        );
        let r = expected.get("train.r", &Device::Cpu);
        backward(&desc.mul(&r).unwrap().sum_all().unwrap()).unwrap();
        let mut worst = (0.0, String::new());
        for p in net.parameters() {
            let grad = p
                .grad()
                .unwrap_or_else(|| panic!("{model}: no gradient for {}", p.name()));
            // conv weights are OHWI here, OIHW in PyTorch
            let grad = if grad.rank() == 4 {
                grad.permute(&[0, 3, 1, 2]).unwrap().contiguous().unwrap()
            } else {
                grad
            };
            let want = expected.values(&format!("grad.{}", p.name()));
            let err = relative_error(&values(&grad), &want);
            // 1e-4, or 4x PyTorch's own float32 error where the gradient is ill-conditioned
            // (train-mode BatchNorm through the 16 bottlenecks of the narrow ResNet-50)
            let torch_f32 = expected.values(&format!("f32_error.grad.{}", p.name()))[0];
            let tol = f64::max(1e-4, 4.0 * torch_f32);
            assert!(
                err <= tol,
                "{model}: gradient of {} off by {err:.1e} (relative; PyTorch in f32: {torch_f32:.1e})",
                p.name()
            );
            if err > worst.0 {
                worst = (err, format!("{}, PyTorch in f32 {torch_f32:.1e}", p.name()));
            }
        }
        eprintln!(
            "{model}: worst gradient error {:.1e} ({})",
            worst.0, worst.1
        );
        for b in net.buffers() {
            let name = b.name();
            if name.ends_with("num_batches_tracked") {
                // converted files leave the counter out: it starts at 0
                assert_eq!(b.tensor().to_vec::<i64>().unwrap(), [1], "{name}");
                continue;
            }
            let want = expected.values(&format!("after.{name}"));
            assert_close(&values(&b.tensor()), &want, 1e-5, name, 0);
        }
        assert_eq!(tape_len(), 0, "{model}: backward left nodes on the tape");
    }
}

#[test]
fn inference_records_nothing_on_the_tape() {
    let expected = Expected::open("cnn_cosplace_resnet18");
    let model = models::load(&fixture("cnn_cosplace_resnet18"), &Device::Cpu).unwrap();
    let x = expected.get("input.1", &Device::Cpu);
    let before = tape_len();
    model.descriptors(&x).unwrap();
    model.descriptors(&x.clone().requires_grad()).unwrap();
    assert_eq!(tape_len(), before);
    // the trainable network in evaluation mode, frozen, records nothing either
    let net = CosPlaceNet::load(&fixture("cnn_cosplace_resnet18"), &Device::Cpu).unwrap();
    for p in net.parameters() {
        p.set_trainable(false);
    }
    net.forward(&x).unwrap();
    assert_eq!(tape_len(), before);
}

#[test]
fn cosplace_freezing_rule() {
    let r18 = CosPlaceNet::load(&fixture("cnn_cosplace_resnet18"), &Device::Cpu).unwrap();
    r18.freeze_cosplace();
    for p in r18.parameters() {
        let trained = ["backbone.6.", "backbone.7.", "aggregation."]
            .iter()
            .any(|prefix| p.name().starts_with(prefix));
        assert_eq!(p.is_trainable(), trained, "{}", p.name());
    }
    let vgg = CosPlaceNet::load(&fixture("cnn_cosplace_vgg16"), &Device::Cpu).unwrap();
    vgg.freeze_cosplace();
    let trainable: Vec<String> = vgg
        .parameters()
        .iter()
        .filter(|p| p.is_trainable())
        .map(|p| p.name().to_string())
        .collect();
    let want = [
        "backbone.24.weight",
        "backbone.24.bias",
        "backbone.26.weight",
        "backbone.26.bias",
        "backbone.28.weight",
        "backbone.28.bias",
        "aggregation.1.p",
        "aggregation.3.weight",
        "aggregation.3.bias",
    ];
    assert_eq!(trainable, want);

    // frozen layers get no gradient, but their BatchNorms still use and update batch statistics
    let expected = Expected::open("cnn_cosplace_resnet18");
    r18.set_train(true);
    let desc = r18
        .forward(&expected.get("train.input", &Device::Cpu))
        .unwrap();
    let r = expected.get("train.r", &Device::Cpu);
    backward(&desc.mul(&r).unwrap().sum_all().unwrap()).unwrap();
    for p in r18.parameters() {
        assert_eq!(p.grad().is_some(), p.is_trainable(), "{}", p.name());
    }
    let stem = r18.buffers()[0].clone();
    assert_eq!(stem.name(), "backbone.1.running_mean");
    assert_close(
        &values(&stem.tensor()),
        &expected.values("after.backbone.1.running_mean"),
        1e-5,
        "frozen bn1 running mean",
        0,
    );
}

#[test]
fn missing_unexpected_and_misshaped_keys_are_listed() {
    let model = "cnn_cosplace_resnet18";
    let path = rewrite(model, "bad-keys", |tensors, _| {
        tensors.remove("backbone.4.0.bn1.running_var");
        tensors.insert("backbone.9.weight".into(), f32_entry(&[2], &[1.0, 2.0]));
        tensors.insert(
            "backbone.5.0.bn2.bias".into(),
            f32_entry(&[3], &[0.0, 0.0, 0.0]),
        );
    });
    let e = load_error(&path);
    assert!(e.contains(&path.display().to_string()), "{e}");
    assert!(
        e.contains("missing keys (1): backbone.4.0.bn1.running_var"),
        "{e}"
    );
    assert!(e.contains("unexpected keys (1): backbone.9.weight"), "{e}");
    assert!(
        e.contains("mis-shaped keys (1): backbone.5.0.bn2.bias (file [3], model [8])"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();

    // a key that gives a layer's width: reported as missing too
    let path = rewrite(model, "no-width", |tensors, _| {
        tensors.remove("backbone.6.0.conv1.weight");
    });
    let e = load_error(&path);
    assert!(
        e.contains("missing keys (1): backbone.6.0.conv1.weight"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();

    // integers where floats belong
    let path = rewrite(model, "ints", |tensors, _| {
        let e = tensors.get_mut("aggregation.1.p").unwrap();
        e.dtype = StDtype::I32;
    });
    let e = load_error(&path);
    assert!(
        e.contains("mis-typed keys (1): aggregation.1.p (the model holds floats)"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();

    // a conv weight with the right count in the wrong layout
    let path = rewrite(model, "layout", |tensors, _| {
        let w = tensors.get_mut("backbone.4.1.conv2.weight").unwrap();
        w.shape = vec![4, 3, 3, 4];
    });
    let e = load_error(&path);
    assert!(
        e.contains("backbone.4.1.conv2.weight (file [4, 3, 3, 4], model [4, 4, 3, 3])"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn files_that_are_not_cosplace_are_refused() {
    let model = "cnn_cosplace_resnet18";
    let path = rewrite(model, "no-meta", |_, meta| meta.clear());
    let e = load_error(&path);
    assert!(e.contains("no vpr.arch metadata"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    std::fs::remove_file(&path).unwrap();

    let path = rewrite(model, "mixvpr", |_, meta| {
        meta.insert("vpr.arch".into(), "mixvpr".into());
    });
    let e = load_error(&path);
    assert!(e.contains("vpr.arch 'mixvpr' is not supported"), "{e}");
    std::fs::remove_file(&path).unwrap();

    let path = rewrite(model, "wrong-backbone", |_, meta| {
        meta.insert("vpr.backbone".into(), "vgg16".into());
    });
    let e = load_error(&path);
    assert!(e.contains("backbone 'vgg16' truncated at 'conv5'"), "{e}");
    std::fs::remove_file(&path).unwrap();

    // metadata that says ResNet-50 over ResNet-18 weights: every bottleneck key is missing
    let path = rewrite(model, "wrong-depth", |_, meta| {
        meta.insert("vpr.backbone".into(), "resnet50".into());
    });
    let e = load_error(&path);
    assert!(e.contains("missing keys"), "{e}");
    assert!(e.contains("backbone.4.0.conv3.weight"), "{e}");
    std::fs::remove_file(&path).unwrap();

    let path = rewrite(model, "huge-dim", |_, meta| {
        meta.insert("vpr.dim".into(), "1000000000000".into());
    });
    let e = load_error(&path);
    assert!(
        e.contains("vpr.dim 1000000000000 is not a descriptor size"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();

    // a width beyond any real layer is refused before anything that wide is allocated
    let path = rewrite(model, "huge-width", |tensors, _| {
        tensors.insert(
            "backbone.4.0.conv1.weight".into(),
            f32_entry(&[70_000, 1, 1, 1], &vec![0.0; 70_000]),
        );
    });
    let e = load_error(&path);
    assert!(
        e.contains("tensor 'backbone.4.0.conv1.weight' has 70000 along axis 0"),
        "{e}"
    );
    std::fs::remove_file(&path).unwrap();

    let path = rewrite(model, "bad-size", |_, meta| {
        meta.insert("vpr.input.size".into(), "resize:0x5".into());
    });
    let e = load_error(&path);
    assert!(e.contains("vpr.input.size 'resize:0x5'"), "{e}");
    std::fs::remove_file(&path).unwrap();

    let e = load_error(Path::new("/nonexistent/model.safetensors"));
    assert!(e.contains("/nonexistent/model.safetensors"), "{e}");
}

#[test]
fn half_precision_files_load_into_f32_models() {
    let model = "cnn_cosplace_resnet18";
    let reference = CosPlaceNet::load(&fixture(model), &Device::Cpu).unwrap();
    for (tag, dtype) in [("f16", StDtype::F16), ("bf16", StDtype::BF16)] {
        let path = rewrite(model, tag, |tensors, _| {
            for e in tensors.values_mut() {
                let v: &[f32] = bytemuck::cast_slice(&e.data);
                e.data = match dtype {
                    StDtype::F16 => v
                        .iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .collect(),
                    _ => v
                        .iter()
                        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                        .collect(),
                };
                e.dtype = dtype;
            }
        });
        let net = CosPlaceNet::load(&path, &Device::Cpu).unwrap();
        for (p, r) in net.parameters().iter().zip(reference.parameters()) {
            assert_eq!(p.name(), r.name());
            let t = p.tensor();
            assert_eq!(t.dtype(), DType::F32);
            let want: Vec<f32> = r
                .tensor()
                .to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|&x| match dtype {
                    StDtype::F16 => half::f16::from_f32(x).to_f32(),
                    _ => half::bf16::from_f32(x).to_f32(),
                })
                .collect();
            assert_eq!(t.to_vec::<f32>().unwrap(), want, "{tag} {}", p.name());
        }
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn batchnorm_folding_matches_unfolded() {
    let s = seed("batchnorm_folding_matches_unfolded");
    let cpu = Device::Cpu;
    let (cin, cout) = (5, 7);
    let options = Conv2dOptions::new().stride(2).padding(1);
    let conv = Conv2d::new("conv", cin, cout, 3, options, false, &cpu).unwrap();
    let bn = BatchNorm2d::new("bn", cout, &cpu).unwrap();
    let set = |t: &Tensor, lo: f64, hi: f64, k: u64| {
        Tensor::rand_uniform(t.shape(), lo, hi, s.wrapping_add(k), DType::F32, &cpu).unwrap()
    };
    bn.weight
        .set(set(&bn.weight.tensor(), 0.5, 2.0, 1))
        .unwrap();
    bn.bias.set(set(&bn.bias.tensor(), -1.0, 1.0, 2)).unwrap();
    bn.running_mean
        .set(set(&bn.running_mean.tensor(), -1.0, 1.0, 3))
        .unwrap();
    bn.running_var
        .set(set(&bn.running_var.tensor(), 0.01, 3.0, 4))
        .unwrap();
    let x = Tensor::randn(
        &[2, 13, 11, cin],
        0.0,
        1.0,
        s.wrapping_add(5),
        DType::F32,
        &cpu,
    )
    .unwrap();
    let unfolded = bn.forward(&conv.forward(&x).unwrap()).unwrap();
    let folded = conv
        .fold(&bn)
        .unwrap()
        .forward_fused(&x, None, false)
        .unwrap();
    let (got, want) = (values(&folded), values(&unfolded));
    let err = relative_error(&got, &want);
    eprintln!("batchnorm folding: max error {err:.1e} relative to the largest output");
    assert!(err <= 1e-6, "folding off by {err:e}; VPR_TEST_SEED={s}");
}

#[test]
fn batchnorm_training_needs_more_than_one_value_per_channel() {
    let bn = BatchNorm2d::new("bn", 3, &Device::Cpu).unwrap();
    bn.set_train(true);
    let x = Tensor::ones(&[1, 1, 1, 3], DType::F32, &Device::Cpu).unwrap();
    let e = bn.forward(&x).unwrap_err().to_string();
    assert!(
        e.contains("bn.weight: training mode needs more than one value"),
        "{e}"
    );
}

#[test]
fn descriptors_and_gradients_on_gpu_devices() {
    // the smaller image through each model, and one train-mode step of ResNet-18: the virtual
    // GPU is slow
    for device in common::gpu_devices() {
        for model in MODELS {
            let expected = Expected::open(model);
            let m = models::load(&fixture(model), &device).unwrap();
            let x = expected.get("input.1", &device);
            let got = values(&m.descriptors(&x).unwrap());
            let want = expected.values("descriptors.1");
            eprintln!(
                "{model} on {device}: max error {:.1e}",
                relative_error(&got, &want)
            );
            assert_close(&got, &want, 1e-5, &format!("{model} on {device}"), 0);
        }
        let model = "cnn_cosplace_resnet18";
        let expected = Expected::open(model);
        let net = CosPlaceNet::load(&fixture(model), &device).unwrap();
        net.set_train(true);
        let desc = net.forward(&expected.get("train.input", &device)).unwrap();
        let r = expected.get("train.r", &device);
        backward(&desc.mul(&r).unwrap().sum_all().unwrap()).unwrap();
        let mut worst = 0.0f64;
        for p in net.parameters() {
            let grad = p.grad().unwrap();
            let grad = if grad.rank() == 4 {
                grad.permute(&[0, 3, 1, 2]).unwrap().contiguous().unwrap()
            } else {
                grad
            };
            let err = relative_error(
                &values(&grad),
                &expected.values(&format!("grad.{}", p.name())),
            );
            let torch_f32 = expected.values(&format!("f32_error.grad.{}", p.name()))[0];
            assert!(
                err <= f64::max(1e-4, 4.0 * torch_f32),
                "{device}: gradient of {} off by {err:.1e}",
                p.name()
            );
            worst = worst.max(err);
        }
        eprintln!("{model} train mode on {device}: worst gradient error {worst:.1e}");
        for b in net.buffers() {
            if !b.name().ends_with("num_batches_tracked") {
                let want = expected.values(&format!("after.{}", b.name()));
                let what = format!("{} on {device}", b.name());
                assert_close(&values(&b.tensor()), &want, 1e-5, &what, 0);
            }
        }
    }
}

#[test]
fn train_mode_under_bf16_autocast() {
    // convolutions in bf16, BatchNorm statistics and the head in f32
    let model = "cnn_cosplace_resnet18";
    let expected = Expected::open(model);
    let net = CosPlaceNet::load(&fixture(model), &Device::Cpu).unwrap();
    net.set_train(true);
    let x = expected.get("train.input", &Device::Cpu);
    let desc = autocast(DType::BF16, || net.forward(&x)).unwrap();
    assert_eq!(desc.dtype(), DType::F32);
    let err = relative_error(&values(&desc), &expected.values("train.descriptors"));
    eprintln!("{model} train mode under bf16 autocast: max error {err:.1e}");
    // measured 2.3e-2: bf16 keeps 8 significant bits, through 20 layers with batch statistics
    assert!(err <= 4e-2, "bf16 autocast descriptors off by {err:e}");
    for b in net.buffers() {
        if b.name().ends_with("running_var") {
            assert_eq!(b.tensor().dtype(), DType::F32, "{}", b.name());
            let want = expected.values(&format!("after.{}", b.name()));
            let err = relative_error(&values(&b.tensor()), &want);
            assert!(err <= 4e-2, "{}: off by {err:e} under autocast", b.name());
        }
    }
    let r = expected.get("train.r", &Device::Cpu);
    backward(&desc.mul(&r).unwrap().sum_all().unwrap()).unwrap();
    for p in net.parameters() {
        let g = p.grad().unwrap();
        assert_eq!(g.dtype(), DType::F32, "{}", p.name());
        assert!(values(&g).iter().all(|v| v.is_finite()), "{}", p.name());
    }
}

#[test]
fn layer_gradients_match_finite_differences() {
    let s = seed("layer_gradients_match_finite_differences");
    let cpu = Device::Cpu;
    let check = |what: &str, f: &dyn Fn(&[Tensor]) -> vpr_engine::Result<Tensor>, x: Tensor| {
        let report = gradcheck(f, &[x], 1e-2, s).unwrap();
        assert!(
            report.max_error <= 1e-3,
            "{what}: {} ({}); VPR_TEST_SEED={s}",
            report.max_error,
            report.worst
        );
    };
    let bn = BatchNorm2d::new("bn", 3, &cpu).unwrap();
    let w = Tensor::rand_uniform(&[3], 0.5, 1.5, s.wrapping_add(1), DType::F32, &cpu).unwrap();
    bn.weight.set(w).unwrap();
    bn.set_train(true);
    let x = Tensor::randn(&[2, 3, 5, 3], 0.0, 1.0, s.wrapping_add(2), DType::F32, &cpu).unwrap();
    check("batchnorm (train)", &|t| bn.forward(&t[0]), x.clone());
    bn.set_train(false);
    check("batchnorm (eval)", &|t| bn.forward(&t[0]), x.clone());

    let gem = GeM::new("p", 2.7, 1e-6, &cpu).unwrap();
    let positive =
        Tensor::rand_uniform(&[2, 3, 5, 4], 0.1, 1.0, s.wrapping_add(3), DType::F32, &cpu).unwrap();
    check("gem", &|t| gem.forward(&t[0]), positive.clone());
    // norms bounded away from 0, where central differences with step 1e-2 stay accurate
    check("l2_normalize", &|t| l2_normalize(&t[0], -1), positive);
}

#[test]
fn a_trained_network_saves_and_loads_back() {
    let model = "cnn_cosplace_resnet18";
    let expected = Expected::open(model);
    let net = CosPlaceNet::load(&fixture(model), &Device::Cpu).unwrap();
    // a train-mode forward changes the running statistics; a changed weight stands for a step
    net.set_train(true);
    net.forward(&expected.get("train.input", &Device::Cpu))
        .unwrap();
    net.set_train(false);
    let w = &net.parameters()[0];
    w.set(w.tensor().mul_scalar(0.5).unwrap()).unwrap();
    let path = std::env::temp_dir().join(format!(
        "vpr-models-{}-saved.safetensors",
        std::process::id()
    ));
    net.save(&path).unwrap();
    let back = CosPlaceNet::load(&path, &Device::Cpu).unwrap();
    for (a, b) in net.parameters().iter().zip(back.parameters()) {
        assert_eq!(a.name(), b.name());
        assert_eq!(values(&a.tensor()), values(&b.tensor()), "{}", a.name());
    }
    for (a, b) in net.buffers().iter().zip(back.buffers()) {
        assert_eq!(a.name(), b.name());
        assert_eq!(values(&a.tensor()), values(&b.tensor()), "{}", a.name());
    }
    let file = WeightsFile::open(&path).unwrap();
    let original = WeightsFile::open(&fixture(model)).unwrap();
    assert_eq!(file.metadata(), original.metadata());
    // the official layout: OIHW convolutions and the counters PyTorch keeps
    assert_eq!(file.shape("backbone.0.weight"), Some(&[4, 3, 7, 7][..]));
    assert_eq!(
        file.read_f64("backbone.1.num_batches_tracked").unwrap(),
        [1.0]
    );
    let x = expected.get("input.1", &Device::Cpu);
    let inference = models::load(&path, &Device::Cpu).unwrap();
    assert_close(
        &values(&inference.descriptors(&x).unwrap()),
        &values(&net.forward(&x).unwrap()),
        1e-6,
        "saved model",
        0,
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn input_size_rules_are_read_from_metadata() {
    let cases = [
        (
            "resize:480x640",
            InputSize::Resize {
                height: 480,
                width: 640,
            },
        ),
        (
            "fixed:224x224",
            InputSize::Fixed {
                height: 224,
                width: 224,
            },
        ),
        ("multiple:14", InputSize::Multiple(14)),
    ];
    for (i, (text, want)) in cases.into_iter().enumerate() {
        let path = rewrite("cnn_cosplace_vgg16", &format!("size{i}"), |_, meta| {
            meta.insert("vpr.input.size".into(), text.into());
            meta.insert("vpr.input.std".into(), "0.00392156862745098,0.5,1".into());
        });
        let m = models::load(&path, &Device::Cpu).unwrap();
        assert_eq!(m.input().size, want, "{text}");
        assert_eq!(m.input().std, [1.0 / 255.0, 0.5, 1.0]);
        std::fs::remove_file(path).unwrap();
    }
    for (key, bad) in [
        ("vpr.input.mean", "0.5,0.5"),
        ("vpr.input.std", "0.2,0,0.2"),
        ("vpr.input.size", "multiple:0"),
        ("vpr.input.size", "crop:224"),
    ] {
        let path = rewrite("cnn_cosplace_vgg16", "bad-input", |_, meta| {
            meta.insert(key.into(), bad.into());
        });
        let e = load_error(&path);
        assert!(e.contains(bad), "{key}={bad}: {e}");
        std::fs::remove_file(path).unwrap();
    }
}

/// `tools/convert`'s tiny torchvision classifier fixture `stem`, converted into the temp folder
/// (`tag` keeps tests running in parallel apart).
fn converted_torchvision(stem: &str, tag: &str) -> PathBuf {
    let input = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("tools/convert/tests/fixtures/{stem}.bare.zip.pth"));
    let out = std::env::temp_dir().join(format!(
        "vpr-models-{}-{stem}-{tag}.safetensors",
        std::process::id()
    ));
    convert::convert_file(&input, &out, &convert::Options::default()).unwrap();
    out
}

#[test]
fn initial_weights_take_every_tensor_of_a_converted_torchvision_backbone() {
    for (stem, backbone) in [
        ("torchvision_resnet18", "resnet18"),
        ("torchvision_resnet50", "resnet50"),
        ("torchvision_vgg16", "vgg16"),
    ] {
        let path = converted_torchvision(stem, "init");
        let file = WeightsFile::open(&path).unwrap();
        assert_eq!(file.meta("vpr.arch"), Some("torchvision"));
        assert_eq!(file.meta("vpr.backbone"), Some(backbone));
        let models::InitialWeights {
            tensors,
            metadata: meta,
            copied,
        } = models::initial_weights("cosplace", backbone, 8, Some(&file), 0).unwrap();
        // torchvision's module names to CosPlace's Sequential indices, written out here
        let cosplace_name = |key: &str| -> String {
            let (head, rest) = key.split_once('.').unwrap();
            let index = match head {
                "features" => return format!("backbone.{rest}"),
                "conv1" => 0,
                "bn1" => 1,
                layer => 3 + layer["layer".len()..].parse::<usize>().unwrap(),
            };
            format!("backbone.{index}.{rest}")
        };
        let names = file.names();
        assert!(!names
            .iter()
            .any(|n| n.starts_with("fc.") || n.starts_with("classifier.")));
        assert_eq!(copied, names.len(), "{stem}");
        let got: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        assert_eq!(got.len(), names.len() + 3, "{stem}: backbone + GeM p + FC");
        for name in &names {
            let want = file.read_f64(name).unwrap();
            let t = got[cosplace_name(name).as_str()];
            assert_eq!(t.shape(), file.shape(name).unwrap(), "{stem}: {name}");
            assert_eq!(values(t), want, "{stem}: {name}");
        }
        assert_eq!(meta["vpr.backbone"], backbone);
        assert_eq!(meta["vpr.dim"], "8");
        // the file says which backbone it holds
        let other = if backbone == "vgg16" {
            "resnet18"
        } else {
            "vgg16"
        };
        let Err(e) = models::initial_weights("cosplace", other, 8, Some(&file), 0) else {
            panic!("{stem}: a {backbone} file taken as {other}");
        };
        assert!(
            e.to_string()
                .contains(&format!("holds a {backbone} backbone")),
            "{e}"
        );
        drop(file);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn a_torchvision_backbone_is_not_a_place_recognition_model() {
    let path = converted_torchvision("torchvision_resnet18", "load");
    let e = load_error(&path);
    assert!(
        e.contains("torchvision ImageNet backbone checkpoint"),
        "{e}"
    );
    assert!(e.contains("vpr-engine train --init"), "{e}");
    assert!(e.contains(&path.display().to_string()), "{e}");
    std::fs::remove_file(&path).unwrap();
}
