//! Full-size model weights that need no download and no committed file: every tensor is a pure
//! function of its position in the official key layout (the converter's manifests), bit-identical
//! to what `tools/fixtures/full_size_models.py` feeds PyTorch (a counter-based splitmix64 stream
//! made uniform in f64 and rounded once to f32).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Tensor names and shapes in state-dict order.
pub type Layout = Vec<(String, Vec<usize>)>;

/// The converter's manifest of an official layout: its `vpr.*` metadata and every tensor name
/// and shape in state-dict order, counters (which the converter drops) left out.
pub fn manifest(name: &str) -> (HashMap<String, String>, Layout) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tools/convert/tests/fixtures/manifests")
        .join(format!("{name}.txt"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut meta = HashMap::new();
    let mut keys = Vec::new();
    for line in text.lines() {
        if let Some(kv) = line.strip_prefix("#meta ") {
            let (k, v) = kv.split_once('=').expect("#meta key=value");
            meta.insert(k.to_string(), v.to_string());
            continue;
        }
        let mut parts = line.split_whitespace();
        let key = parts.next().expect("a tensor name");
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        let dims = parts.next().expect("a shape");
        keys.push((
            key.to_string(),
            dims.split(',').map(|d| d.parse().unwrap()).collect(),
        ));
    }
    meta.insert("vpr.format".into(), "1".into());
    (meta, keys)
}

/// `n` numbers in [-1, 1) of stream `stream`: splitmix64 of `(stream << 32) + i + 1`.
fn splitmix_uniform(stream: u64, n: usize) -> impl Iterator<Item = f64> {
    (1..=n as u64).map(move |i| {
        let mut z = (stream << 32).wrapping_add(i);
        z = z.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        2.0 * ((z >> 11) as f64 * 2f64.powi(-53)) - 1.0
    })
}

/// The manifest's `index`-th tensor; the rule depends on the tensor's role only.
pub fn synthetic_tensor(index: usize, name: &str, shape: &[usize]) -> Vec<f32> {
    let n = shape.iter().product();
    let value = |v: f64| -> f64 {
        if name.ends_with("running_var") {
            0.75 + 0.25 * (v + 1.0)
        } else if name.ends_with("running_mean") {
            0.1 * v
        } else if name.ends_with(".p") {
            3.0 + 0.25 * v
        } else if name.ends_with(".conv.weight") {
            // NetVLAD's assignment weights: logits of a few units over unit-length inputs, so
            // that the soft assignment is far from uniform, as trained ones are
            8.0 * v
        } else if name == "pca_layer.bias" {
            // the size of the projection's outputs, so that the bias does not drown them
            0.01 * v
        } else if name.ends_with(".weight") && shape.len() == 4 {
            (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt() * v
        } else if name.ends_with(".weight") && shape.len() == 2 {
            v / (shape[1] as f64).sqrt()
        } else if name.ends_with(".weight") {
            1.0 + 0.1 * v
        } else {
            0.1 * v
        }
    };
    splitmix_uniform(index as u64, n)
        .map(|v| value(v) as f32)
        .collect()
}

/// Writes the synthetic weights of manifest `name` as a converted safetensors file at `path`,
/// with the manifest's metadata and `overrides` on top (e.g. `vpr.arch=eigenplaces`).
pub fn write_weights(name: &str, overrides: &[(&str, &str)], path: &Path) {
    let (mut meta, keys) = manifest(name);
    for (k, v) in overrides {
        meta.insert(k.to_string(), v.to_string());
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = keys
        .iter()
        .enumerate()
        .map(|(i, (k, shape))| {
            let values = synthetic_tensor(i, k, shape);
            (
                k.clone(),
                shape.clone(),
                bytemuck::cast_slice(&values).to_vec(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (k.clone(), view)
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, Some(meta), path).unwrap();
}
