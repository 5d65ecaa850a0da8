//! Every fixture written by tools/fixtures/convert_checkpoints.py converts to the expected
//! tensors (bit for bit, official names) and metadata (every field), through the real file
//! writer; every official real-size layout is recognised with the right metadata.

mod common;

use std::collections::BTreeMap;

use convert::{arch, convert_file, Options};
use safetensors::SafeTensors;

/// Fields that depend on the file rather than the model; checked separately.
const PER_FILE: [&str; 4] = [
    "vpr.source",
    "vpr.source.format",
    "vpr.converter",
    "vpr.format",
];

#[test]
fn every_fixture_converts_bit_exact_with_full_metadata() {
    let dir = std::env::temp_dir().join(format!("convert-fixtures-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = common::good_checkpoints();
    assert!(
        files.len() > 60,
        "fixtures missing: run tools/fixtures/convert_checkpoints.py"
    );
    for path in files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let mut parts = file.split('.');
        let stem = parts.next().unwrap();
        let fmt = file.trim_end_matches(".pth").rsplit('.').next().unwrap();
        let stem = if stem == "hostile_outside" {
            "params_cosplace_resnet18"
        } else {
            stem
        };
        let want = common::expected(stem);

        let out = dir.join(format!("{file}.safetensors"));
        convert_file(&path, &out, &Options::default()).unwrap_or_else(|e| panic!("{file}: {e}"));
        let bytes = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta: BTreeMap<String, String> =
            header.metadata().clone().unwrap().into_iter().collect();

        let model_meta: BTreeMap<String, String> = meta
            .iter()
            .filter(|(k, _)| !PER_FILE.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(model_meta, want.meta, "{file}: metadata");
        assert_eq!(meta["vpr.source"], file);
        assert_eq!(meta["vpr.source.format"], fmt, "{file}");
        assert_eq!(meta["vpr.format"], "1");

        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        let want_names: Vec<String> = want.tensors.keys().cloned().collect();
        assert_eq!(names, want_names, "{file}: tensor names");
        for (name, t) in &want.tensors {
            let got = st.tensor(name).unwrap();
            assert_eq!(
                format!("{:?}", got.dtype()),
                t.dtype,
                "{file}: {name} dtype"
            );
            assert_eq!(got.shape(), &t.shape[..], "{file}: {name} shape");
            assert!(got.data() == &t.data[..], "{file}: {name} bytes differ");
        }
        std::fs::remove_file(&out).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn every_official_real_size_layout_is_recognised() {
    let dir = common::fixtures().join("manifests");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut want = BTreeMap::new();
        let mut shapes = Vec::new();
        for line in text.lines() {
            if let Some(kv) = line.strip_prefix("#meta ") {
                let (k, v) = kv.split_once('=').unwrap();
                want.insert(k.to_string(), v.to_string());
            } else {
                let (k, s) = line.split_once(' ').unwrap();
                let shape: Vec<usize> = if s.is_empty() {
                    vec![]
                } else {
                    s.split(',').map(|d| d.parse().unwrap()).collect()
                };
                // The converter drops BatchNorm counters before recognising.
                if !k.ends_with("num_batches_tracked") {
                    shapes.push((k.to_string(), shape));
                }
            }
        }
        let found = arch::recognise(&shapes, None, &format!("{name}.pth"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let got: BTreeMap<String, String> = found.meta.into_iter().collect();
        assert_eq!(got, want, "{name}");
        n += 1;
    }
    assert!(n >= 27, "manifests missing");
}

fn manifest_shapes(name: &str) -> Vec<(String, Vec<usize>)> {
    layout_shapes(&format!("manifests/{name}.txt"))
}

/// The `name shape` lines of a layout file under tests/fixtures, `#` lines skipped.
fn layout_shapes(path: &str) -> Vec<(String, Vec<usize>)> {
    let text = std::fs::read_to_string(common::fixtures().join(path)).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let (k, s) = l.split_once(' ').unwrap();
            (
                k.to_string(),
                if s.is_empty() {
                    vec![]
                } else {
                    s.split(',').map(|d| d.parse().unwrap()).collect()
                },
            )
        })
        .collect()
}

#[test]
fn manifests_have_the_key_counts_of_the_instantiated_official_models() {
    // Counts from instantiating the official model classes (PyTorch, weights=None).
    for (name, keys) in [
        ("cosplace_resnet18_512", 123),
        ("cosplace_resnet50_2048", 321),
        ("cosplace_resnet101_2048", 627),
        ("cosplace_vgg16_512", 29),
        // torchvision's classifiers, head and BatchNorm counters included
        ("torchvision_resnet18", 122),
        ("torchvision_resnet34", 218),
        ("torchvision_resnet50", 320),
        ("torchvision_resnet101", 626),
        ("torchvision_resnet152", 932),
        ("torchvision_vgg16", 32),
    ] {
        assert_eq!(manifest_shapes(name).len(), keys, "{name}");
    }
    // SelaVPR's 540 keys include the module. prefix, which does not change the count.
    assert_eq!(manifest_shapes("selavpr").len(), 540);
    // ClusVPR's 150 keys (VGG16 26, the layer 124 with 8 BatchNorm counters) from a copy of the
    // released classes with the constructor's order fixed; the layer has 3,208,368 parameters.
    assert_eq!(manifest_shapes("clusvpr").len(), 150);
}

#[test]
fn clusvpr_needs_a_gem_exponent_per_location_of_a_3_by_4_map() {
    let mut shapes = manifest_shapes("clusvpr");
    let p = shapes
        .iter_mut()
        .find(|(k, _)| k == "net_vlad.GeM_pool.p")
        .unwrap();
    p.1 = vec![1201];
    let e = arch::recognise(&shapes, Some("clusvpr"), "x.pth").unwrap_err();
    assert!(e.0.contains("1201 locations, not a 3:4 map"), "{e}");
    // a smaller 3:4 map is accepted, and sets the image size
    shapes
        .iter_mut()
        .find(|(k, _)| k == "net_vlad.GeM_pool.p")
        .unwrap()
        .1 = vec![48];
    let f = arch::recognise(&shapes, None, "x.pth").unwrap();
    assert_eq!(f.meta["vpr.clusvpr.map"], "6x8");
    assert_eq!(f.meta["vpr.input.size"], "resize:96x128");
}

#[test]
fn counters_are_accepted_by_the_recogniser_and_eigenplaces_can_be_forced() {
    // Recognition must not depend on whether num_batches_tracked was dropped first.
    let f = arch::recognise(
        &manifest_shapes("cosplace_resnet50_2048"),
        Some("eigenplaces"),
        "x.pth",
    )
    .unwrap();
    assert_eq!(f.meta["vpr.arch"], "eigenplaces");
    assert_eq!(f.meta["vpr.backbone"], "resnet50");
    assert_eq!(f.meta["vpr.dim"], "2048");
}

#[test]
fn torchvision_lookalikes_are_refused_with_the_reason() {
    // Real layouts of torchvision models that share names with the supported ones.
    let dir = common::fixtures().join("refused");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let why = text
            .lines()
            .next()
            .unwrap()
            .strip_prefix("#error ")
            .unwrap();
        let shapes: Vec<(String, Vec<usize>)> = layout_shapes(&format!("refused/{name}"))
            .into_iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .collect();
        for forced in [None, Some("torchvision")] {
            let e = arch::recognise(&shapes, forced, &name).unwrap_err();
            assert!(e.0.contains("closest is torchvision"), "{name}: {e}");
            assert!(e.0.contains(why), "{name}: expected {why:?} in {e}");
        }
        n += 1;
    }
    assert_eq!(n, 4, "refused layouts missing");
}

#[test]
fn a_torchvision_classifier_without_its_head_is_still_a_backbone() {
    for name in ["torchvision_resnet50", "torchvision_vgg16"] {
        let shapes: Vec<(String, Vec<usize>)> = manifest_shapes(name)
            .into_iter()
            .filter(|(k, _)| !k.starts_with("fc.") && !k.starts_with("classifier."))
            .collect();
        let f = arch::recognise(&shapes, None, "backbone.pth").unwrap();
        assert_eq!(f.meta["vpr.arch"], "torchvision", "{name}");
        assert!(f.dropped.is_empty() && f.notes.is_empty(), "{name}");
        // a ResNet cut after layer3 is not a classifier's backbone
        let cut: Vec<(String, Vec<usize>)> = shapes
            .into_iter()
            .filter(|(k, _)| !k.starts_with("layer4."))
            .collect();
        if name.contains("resnet") {
            let e = arch::recognise(&cut, None, "x.pth").unwrap_err();
            assert!(e.0.contains("without layer4"), "{e}");
        }
    }
}
