//! `vpr-engine extract` end to end: the tiny converted CosPlace ResNet-18
//! (tests/fixtures/cnn_cosplace_resnet18.safetensors) on tests/fixtures/extract_images/ against
//! PyTorch's descriptors of the same files (tests/fixtures/extract_e2e.expected.safetensors,
//! written by tools/fixtures/extract_e2e.py), and every kind of bad input: one line on standard
//! error, exit code 2, and nothing left in the output folder.

mod common;

use common::vpr_engine;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use vpr_engine::io::npy;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model() -> PathBuf {
    fixtures().join("cnn_cosplace_resnet18.safetensors")
}

/// A fresh folder for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-extract-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// PyTorch's descriptors `[N, D]` (float64 in the file) and the relative image paths.
fn expected(name: &str) -> (Vec<f64>, Vec<usize>, Vec<String>) {
    let bytes = std::fs::read(fixtures().join("extract_e2e.expected.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let paths = meta.metadata().as_ref().unwrap()["paths"]
        .lines()
        .map(String::from)
        .collect();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let values = t
        .data()
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (values, t.shape().to_vec(), paths)
}

#[test]
fn descriptors_match_pytorch_end_to_end() {
    let images = fixtures().join("extract_images");
    let model = model();
    let dir = temp_dir("end-to-end");
    for (case, extra, batch_size) in [
        ("descriptors.any", None, "4"),
        ("descriptors.any", None, "1"),
        ("descriptors.resize_40x48", Some("40x48"), "3"),
    ] {
        let out = dir.join(format!("{}-{batch_size}.npy", case.replace('.', "_")));
        let mut args = vec![
            "extract",
            "--weights",
            model.to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--batch-size",
            batch_size,
        ];
        if let Some(size) = extra {
            args.extend(["--resize", size]);
        }
        let (code, stdout, stderr) = vpr_engine(&args);
        assert_eq!(code, 0, "{stdout}{stderr}");
        // no progress bar when standard error is not a terminal
        assert_eq!(stderr, "");
        assert!(
            stdout.starts_with(&format!("5 images -> {} [5, 8]", out.display())),
            "{stdout}"
        );

        let (want, shape, relative) = expected(case);
        let got = npy::read(&out).unwrap();
        assert_eq!([got.rows, got.cols], shape[..]);
        let err = got
            .data
            .iter()
            .zip(&want)
            .map(|(&g, w)| (g as f64 - w).abs() / w.abs().max(1.0))
            .fold(0.0, f64::max);
        eprintln!("{case}, batch size {batch_size}: max error against PyTorch {err:.2e}");
        assert!(err <= 1e-5, "{case}: max error {err:e}");

        let listing = std::fs::read_to_string(extract_paths_file(&out)).unwrap();
        let want_listing: String = relative
            .iter()
            .map(|r| format!("{}\n", images.join(r).display()))
            .collect();
        assert_eq!(listing, want_listing);
    }
}

fn extract_paths_file(out: &Path) -> PathBuf {
    out.with_extension("paths.txt")
}

#[test]
fn bad_inputs_are_one_line_errors_that_leave_nothing_behind() {
    let dir = temp_dir("bad-inputs");
    let good = dir.join("good");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::copy(fixtures().join("extract_images/b.png"), good.join("b.png")).unwrap();
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::copy(
        fixtures().join("extract_images/b.png"),
        corrupt.join("a.png"),
    )
    .unwrap();
    std::fs::write(corrupt.join("b.jpg"), b"\xff\xd8\xff\xe0 cut short").unwrap();
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "no images here").unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("d.npy");

    let model = model();
    let not_a_model = fixtures().join("mlp_training.safetensors");
    let not_safetensors = good.join("b.png");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![s(&model), s(&corrupt), "cpu".into()],
            format!("{}", corrupt.join("b.jpg").display()),
        ),
        (
            vec![s(&model), s(&empty), "cpu".into()],
            "no .jpg, .jpeg or .png image under".into(),
        ),
        (
            vec![s(&model), s(&dir.join("missing")), "cpu".into()],
            "missing: No such file or directory".into(),
        ),
        (
            vec![s(&not_a_model), s(&good), "cpu".into()],
            "mlp_training.safetensors".into(),
        ),
        (
            vec![s(&not_safetensors), s(&good), "cpu".into()],
            "b.png".into(),
        ),
        (
            vec![s(&model), s(&good), "tpu".into()],
            "unknown device 'tpu'".into(),
        ),
    ];
    for (args, needle) in cases {
        let (code, stdout, stderr) = vpr_engine(&[
            "extract",
            "--weights",
            &args[0],
            "--images",
            &args[1],
            "--device",
            &args[2],
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(
            stderr.starts_with("error: ")
                && stderr.lines().count() == 1
                && stderr.contains(&needle),
            "{args:?}: expected one line with {needle:?}, got {stderr:?}"
        );
        assert!(
            files_in(&out_dir).is_empty(),
            "{args:?}: left {:?}",
            files_in(&out_dir)
        );
    }

    let flags: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--resize", "48"], "--resize '48' is not HEIGHTxWIDTH"),
        (
            vec!["--resize", "0x10"],
            "--resize '0x10' is not HEIGHTxWIDTH",
        ),
        (
            vec!["--resize", "tallxwide"],
            "--resize 'tallxwide' is not HEIGHTxWIDTH",
        ),
        (vec!["--batch-size", "0"], "--batch-size must be at least 1"),
    ];
    for (flag, needle) in flags {
        let mut args = vec![
            "extract",
            "--weights",
            model.to_str().unwrap(),
            "--images",
            good.to_str().unwrap(),
            "--device",
            "cpu",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(&flag);
        let (code, stdout, stderr) = vpr_engine(&args);
        assert_eq!(code, 2, "{flag:?}: {stdout}{stderr}");
        assert!(
            stderr.lines().count() == 1 && stderr.contains(needle),
            "{flag:?}: {stderr:?}"
        );
        assert!(files_in(&out_dir).is_empty());
    }

    // an output folder that does not exist is refused before any work
    let nowhere = dir.join("no-such-folder/d.npy");
    let (code, _, stderr) = vpr_engine(&[
        "extract",
        "--weights",
        model.to_str().unwrap(),
        "--images",
        good.to_str().unwrap(),
        "--device",
        "cpu",
        "--out",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("not a file in an existing folder") && stderr.lines().count() == 1,
        "{stderr}"
    );
}
