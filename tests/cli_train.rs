//! `vpr-engine train` end to end on a small synthetic city (`vpr-engine synth`) with the tiny
//! converted ResNet-18 of the model tests as `--init`: the run folder's files, the trained model
//! in `extract`, resuming bit for bit, EigenPlaces on panoramas, and bad input.
mod common;

use common::vpr_engine;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vpr_engine::io::weights::WeightsFile;

fn tiny_init() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cnn_cosplace_resnet18.safetensors")
        .display()
        .to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vpr-cli-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// One synthetic city for every test of this binary.
fn city() -> &'static Path {
    static CITY: OnceLock<PathBuf> = OnceLock::new();
    CITY.get_or_init(|| {
        let dir = scratch("city");
        let d = dir.display().to_string();
        let (code, out, err) = vpr_engine(&[
            "synth",
            "--out",
            &d,
            "--places",
            "6",
            "--image-size",
            "48",
            "--seed",
            "3",
        ]);
        assert_eq!(code, 0, "{out}{err}");
        dir
    })
}

/// A short CosPlace run: the tiny network, one group of every class, 48x48 crops trained at 32.
fn cosplace_args<'a>(dataset: &'a str, out: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--method",
        "cosplace",
        "--dataset",
        dataset,
        "--out",
        out,
        "--init",
        Box::leak(tiny_init().into_boxed_str()),
        "--dim",
        "8",
        "--epochs",
        epochs,
        "--iterations-per-epoch",
        "3",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--N",
        "1",
        "--L",
        "1",
        "--groups-num",
        "1",
        "--device",
        "cpu",
        "--seed",
        "5",
        "--loader-threads",
        "2",
    ]
}

/// The step losses of a run's metrics.jsonl, as written.
fn step_losses(run: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter(|l| l.contains("\"iteration\""))
        .map(|l| {
            let start = l.find("\"loss\": ").unwrap() + 8;
            l[start..].split(',').next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn cosplace_trains_writes_its_run_and_the_model_extracts() {
    let data = city().display().to_string();
    let run = scratch("cosplace");
    let r = run.display().to_string();
    let (code, out, err) = vpr_engine(&cosplace_args(&data, &r, "2"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("best validation R@1"), "{out}");
    assert!(out.contains("test R@1"), "{out}");
    assert!(err.contains("epoch 2: loss"), "{err}");
    for f in [
        "best.safetensors",
        "last.safetensors",
        "state.safetensors",
        "config.json",
        "metrics.jsonl",
        "init.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"iteration\""))
            .count(),
        6
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("val_recall@1"))
            .count(),
        2
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("test_recall@1"))
            .count(),
        1
    );
    assert!(step_losses(&run)
        .iter()
        .all(|l| l.parse::<f64>().unwrap().is_finite()));
    let config = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(
        config.contains("\"method\": \"cosplace\"") && config.contains("\"image_size\": 32"),
        "{config}"
    );
    // the trained model goes straight into extract
    let npy = run.join("d.npy").display().to_string();
    let images = city().join("val/queries").display().to_string();
    let best = run.join("best.safetensors").display().to_string();
    let (code, out, err) = vpr_engine(&[
        "extract",
        "--weights",
        &best,
        "--images",
        &images,
        "--out",
        &npy,
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(", 8]"), "{out}");
    // a second run into the same folder is refused
    let (code, _, err) = vpr_engine(&cosplace_args(&data, &r, "2"));
    assert_ne!(code, 0);
    assert!(
        err.contains("already holds a training run") && err.contains("--resume"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn a_resumed_run_repeats_the_uninterrupted_one() {
    let data = city().display().to_string();
    let whole = scratch("whole");
    let cut = scratch("cut");
    let (w, c) = (whole.display().to_string(), cut.display().to_string());
    let (code, out, err) = vpr_engine(&cosplace_args(&data, &w, "3"));
    assert_eq!(code, 0, "{out}{err}");
    // stopped after one epoch, then continued with the settings of its config.json
    let (code, out, err) = vpr_engine(&cosplace_args(&data, &c, "1"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = vpr_engine(&["train", "--resume", &c, "--epochs", "3"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("resuming"), "{err}");
    assert_eq!(step_losses(&whole), step_losses(&cut));
    assert_eq!(step_losses(&whole).len(), 9);
    let (a, b) = (
        WeightsFile::open(&whole.join("last.safetensors")).unwrap(),
        WeightsFile::open(&cut.join("last.safetensors")).unwrap(),
    );
    assert_eq!(a.names(), b.names());
    for name in a.names() {
        let same = a.read_f64(&name).unwrap() == b.read_f64(&name).unwrap();
        assert!(same, "the resumed run ends with another {name}");
    }
    // with --resume the settings are the run's own
    let (code, _, err) = vpr_engine(&["train", "--resume", &c, "--lr", "0.1"]);
    assert_ne!(code, 0);
    assert!(err.contains("--lr cannot be given with --resume"), "{err}");
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&cut);
}

/// `cosplace_args` with `iterations` per epoch.
fn longer_epochs<'a>(
    dataset: &'a str,
    out: &'a str,
    epochs: &'a str,
    iterations: &'a str,
) -> Vec<&'a str> {
    let mut args = cosplace_args(dataset, out, epochs);
    let at = args
        .iter()
        .position(|a| *a == "--iterations-per-epoch")
        .unwrap()
        + 1;
    args[at] = iterations;
    args
}

#[test]
fn a_run_killed_mid_epoch_resumes_as_if_never_stopped() {
    let data = city().display().to_string();
    let whole = scratch("uncut");
    let killed = scratch("killed");
    let (w, k) = (whole.display().to_string(), killed.display().to_string());
    let (code, out, err) = vpr_engine(&longer_epochs(&data, &w, "2", "100"));
    assert_eq!(code, 0, "{out}{err}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vpr-engine"))
        .args(longer_epochs(&data, &k, "2", "100"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // SIGKILL (no chance to tidy up) once the second epoch's steps have begun
    let metrics = killed.join("metrics.jsonl");
    let started = Instant::now();
    while !std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .contains("{\"epoch\": 1, \"iteration\"")
    {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no second epoch"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let steps_before_kill = step_losses(&killed).len();
    assert!(
        (101..200).contains(&steps_before_kill),
        "killed after {steps_before_kill} steps, not inside the second epoch"
    );
    let (code, out, err) = vpr_engine(&["train", "--resume", &k]);
    assert_eq!(code, 0, "{out}{err}");
    // the cut epoch's lines were replaced by the resumed run's, which match the uncut run's
    assert_eq!(step_losses(&whole), step_losses(&killed));
    let validation = |run: &Path| -> Vec<String> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        text.lines()
            .filter(|l| l.contains("val_recall@1"))
            .map(|l| l[..l.find(", \"seconds\"").unwrap()].to_string())
            .collect()
    };
    assert_eq!(validation(&whole), validation(&killed));
    for file in ["last.safetensors", "best.safetensors"] {
        let (a, b) = (
            WeightsFile::open(&whole.join(file)).unwrap(),
            WeightsFile::open(&killed.join(file)).unwrap(),
        );
        assert_eq!(a.names(), b.names());
        for name in a.names() {
            let same = a.read_f64(&name).unwrap() == b.read_f64(&name).unwrap();
            assert!(same, "the resumed run's {file} holds another {name}");
        }
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&killed);
}

#[test]
fn eigenplaces_trains_on_panoramas() {
    let data = city().display().to_string();
    let run = scratch("eigen");
    let r = run.display().to_string();
    let init = tiny_init();
    let (code, out, err) = vpr_engine(&[
        "train",
        "--method",
        "eigenplaces",
        "--dataset",
        &data,
        "--out",
        &r,
        "--init",
        &init,
        "--backbone",
        "resnet18",
        "--dim",
        "8",
        "--epochs",
        "1",
        "--iterations-per-epoch",
        "2",
        "--batch-size",
        "2",
        "--image-size",
        "32",
        "--N",
        "1",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(
        metrics.contains("loss_lateral") && metrics.contains("loss_frontal"),
        "{metrics}"
    );
    let _ = std::fs::remove_dir_all(&run);
}

#[test]
fn bad_input_is_one_clear_error() {
    let empty = scratch("empty");
    std::fs::create_dir_all(empty.join("train")).unwrap();
    let e = empty.display().to_string();
    let r = scratch("bad-run").display().to_string();
    let (code, _, err) = vpr_engine(&cosplace_args(&e, &r, "1"));
    assert_ne!(code, 0);
    assert!(err.contains("error:") && err.contains("train"), "{err}");
    let (code, _, err) =
        vpr_engine(&["train", "--method", "netvlad", "--dataset", &e, "--out", &r]);
    assert_ne!(code, 0);
    assert!(
        err.contains("'netvlad' is not cosplace or eigenplaces"),
        "{err}"
    );
    let (code, _, err) = vpr_engine(&["train", "--resume", &e]);
    assert_ne!(code, 0);
    assert!(err.contains("config.json"), "{err}");
    let data = city().display().to_string();
    let mut args = cosplace_args(&data, &r, "1");
    args.extend(["--backbone", "resnet18"]);
    let at = args.iter().position(|a| *a == "--batch-size").unwrap() + 1;
    args[at] = "100000";
    let (code, _, err) = vpr_engine(&args);
    assert_ne!(code, 0);
    assert!(err.contains("fewer than the batch size 100000"), "{err}");
    let _ = std::fs::remove_dir_all(&empty);
}
