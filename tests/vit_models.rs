//! DINOv2 and SelaVPR against PyTorch: tiny networks with the official structure and key names
//! (tools/fixtures/vit_models.py), converted by our converter, give PyTorch's float64 tokens,
//! descriptors, local features and adapter gradients on the CPU and the virtual GPU, and the frozen
//! backbone gets no gradient.

mod common;

use std::path::{Path, PathBuf};
use vpr_engine::autograd::backward;
use vpr_engine::io::weights::WeightsFile;
use vpr_engine::models::{self, Dinov2, SelaVpr};
use vpr_engine::nn::Module;
use vpr_engine::{DType, Device, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("{name}.safetensors"))
}

fn expected(model: &str) -> WeightsFile {
    WeightsFile::open(&fixture(&format!("{model}.expected"))).unwrap()
}

/// `max |got - want| / max |want|`.
fn relative_error(got: &Tensor, want: &[f64]) -> f64 {
    common::max_relative_error(&got.to_f64_vec().unwrap(), want)
}

/// f32 networks of a few layers against a float64 reference of the same (f16-rounded) weights
/// stay within a few 1e-7 of the largest value; 1e-5 leaves room for the order of sums.
const F32_TOLERANCE: f64 = 1e-5;

fn check(what: &str, got: &Tensor, want: &WeightsFile, name: &str) {
    let err = relative_error(got, &want.read_f64(name).unwrap());
    eprintln!("{what} {name}: max error {err:.2e}");
    assert!(err <= F32_TOLERANCE, "{what} {name}: max error {err:e}");
    assert_eq!(got.shape(), want.shape(name).unwrap(), "{what} {name}");
}

#[test]
fn dinov2_tokens_match_pytorch_on_the_cpu_and_the_virtual_gpu_with_mlp_or_swiglu() {
    // the third has ViT-g's SwiGLU feed-forward in place of the MLP
    for model in ["vit_dinov2", "vit_dinov2_reg4", "vit_dinov2_swiglu"] {
        let want = expected(model);
        for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
            let file = WeightsFile::open(&fixture(model)).unwrap();
            if model.ends_with("swiglu") {
                assert_eq!(file.meta("vpr.vit.ffn"), Some("swiglu"));
            }
            let net = Dinov2::from_file(&file, &device).unwrap();
            for i in 0..2 {
                let input = want
                    .tensor(&format!("input.{i}"), DType::F32, &device)
                    .unwrap();
                let f = net.features(&input).unwrap();
                let what = format!("{model} on {device}");
                check(&what, &f.cls, &want, &format!("cls.{i}"));
                check(&what, &f.patches, &want, &format!("patches.{i}"));
                if model.ends_with("reg4") {
                    check(&what, &f.registers, &want, &format!("registers.{i}"));
                }
            }
        }
    }
}

#[test]
fn dinov2_loads_as_a_place_model_whose_descriptor_is_the_class_token() {
    let model = models::load(&fixture("vit_dinov2"), &Device::Cpu).unwrap();
    assert_eq!(model.describe(), "dinov2 dinov2_custom -> 128");
    assert_eq!(model.dim(), 128);
    let want = expected("vit_dinov2");
    let input = want.tensor("input.1", DType::F32, &Device::Cpu).unwrap();
    check(
        "descriptors",
        &model.descriptors(&input).unwrap(),
        &want,
        "cls.1",
    );
}

#[test]
fn selavpr_descriptors_local_features_and_adapter_gradients_match_pytorch() {
    let want = expected("vit_selavpr");
    for device in [Device::Cpu, Device::new("vgpu").unwrap()] {
        let file = WeightsFile::open(&fixture("vit_selavpr")).unwrap();
        let net = SelaVpr::from_file(&file, &device).unwrap();
        let what = format!("selavpr on {device}");
        let input = want.tensor("input", DType::F32, &device).unwrap();
        let (global, local) = net.forward(&input).unwrap();
        check(&what, &global, &want, "global");
        check(&what, &local, &want, "local");

        let r_global = want.tensor("r_global", DType::F32, &device).unwrap();
        let r_local = want.tensor("r_local", DType::F32, &device).unwrap();
        let loss = global
            .mul(&r_global)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&local.mul(&r_local).unwrap().sum_all().unwrap())
            .unwrap();
        backward(&loss).unwrap();
        let mut trained = 0;
        for p in net.parameters() {
            let name = p.name().to_string();
            let trainable = name.contains("adapter")
                || name.starts_with("aggregation.")
                || name.starts_with("LocalAdapt.");
            assert_eq!(p.is_trainable(), trainable, "{name}");
            match p.grad() {
                Some(g) if trainable => {
                    // a transposed convolution's weight [in, kh, kw, out] in the file's
                    // layout, PyTorch's [in, out, kh, kw]
                    let g = if g.rank() == 4 {
                        g.permute(&[0, 3, 1, 2]).unwrap()
                    } else {
                        g
                    };
                    let want_g = want.read_f64(&format!("grad.{name}")).unwrap();
                    let err = relative_error(&g, &want_g);
                    eprintln!("{what} grad.{name}: max error {err:.2e}");
                    // gradients pass through more sums than the forward; stored as f32
                    assert!(err <= 1e-4, "{what} grad.{name}: max error {err:e}");
                    trained += 1;
                }
                None if !trainable => {}
                other => panic!(
                    "{what} {name}: gradient {:?}",
                    other.map(|g| g.shape().to_vec())
                ),
            }
        }
        // 2 blocks x 2 adapters x 4 tensors, GeM p, 2 transposed convolutions x 2 tensors
        assert_eq!(trained, 2 * 2 * 4 + 1 + 4, "{what}");

        let model = models::load(&fixture("vit_selavpr"), &device).unwrap();
        assert_eq!(model.describe(), "selavpr dinov2_custom -> 64");
        check(&what, &model.descriptors(&input).unwrap(), &want, "global");
    }
}
