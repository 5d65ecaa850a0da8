//! The command line: success, `--list`, `--arch`, `--key`, and every kind of broken or
//! hostile input giving a one-line error naming the file, exit code 2 and no output file.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn run(args: &[&Path]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convert"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("convert-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `bytes` as a checkpoint, converts it, and checks the refusal: exit 2, one line
/// naming the file and containing `why`, and nothing left in the output folder.
fn refused(case: &str, bytes: &[u8], why: &str) {
    let dir = scratch(case);
    let input = dir.join(format!("{case}.pth"));
    std::fs::write(&input, bytes).unwrap();
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let output = out_dir.join("model.safetensors");
    let (code, _, err) = run(&[&input, &output]);
    assert_eq!(code, 2, "{case}: {err}");
    assert_eq!(err.lines().count(), 1, "{case}: not one line: {err}");
    assert!(
        err.contains(&format!("{case}.pth")),
        "{case}: file not named: {err}"
    );
    assert!(err.contains(why), "{case}: expected {why:?} in: {err}");
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "{case}: output left behind"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

#[test]
fn converts_and_notes_what_it_did() {
    let dir = scratch("ok");
    let out = dir.join("m.safetensors");
    let (code, _, err) = run(&[&fixtures().join("selavpr.msd.zip.pth"), &out]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("stripped the DataParallel prefix"), "{err}");
    assert!(
        err.contains("num_batches_tracked") || !err.contains("dropped"),
        "{err}"
    );
    assert!(out.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn list_prints_the_catalog() {
    let out = Command::new(env!("CARGO_BIN_EXE_convert"))
        .arg("--list")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    for name in [
        "ResNet50_2048_cosplace.pth",
        "ResNet50_2048_eigenplaces.pth",
        "vgg16_netvlad.pth",
        "dinov2_vitl14_pretrain.pth",
        "SelaVPR_msls.pth",
        "resnet50-11ad3fa6.pth",
    ] {
        assert!(text.contains(name), "{name} missing from --list");
    }
}

#[test]
fn arch_raw_and_eigenplaces_and_key() {
    let dir = scratch("flags");
    let out = dir.join("m.safetensors");
    let input = fixtures().join("cosplace_resnet18.msd.zip.pth");
    let conv = |extra: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_convert"))
            .arg(&input)
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&out).unwrap();
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        m.metadata().clone().unwrap()
    };
    assert_eq!(conv(&["--arch", "eigenplaces"])["vpr.arch"], "eigenplaces");
    assert_eq!(conv(&["--arch", "raw"])["vpr.arch"], "raw");
    assert_eq!(
        conv(&["--key", "model_state_dict"])["vpr.backbone"],
        "resnet18"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_convert"))
        .arg(&input)
        .arg(&out)
        .args(["--key", "nope"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("model_state_dict"),
        "lists the keys there"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_convert"))
        .arg(&input)
        .arg(&out)
        .args(["--arch", "selavpr"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "a forced architecture that does not fit is an error"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn code_inside_the_state_dict_is_refused_by_name() {
    // torch pickles os.system as posix.system on Linux.
    refused(
        "hostile_zip",
        &fixture("hostile_in_state_dict.zip.pth"),
        "posix.system, which is not a tensor rebuild function",
    );
    refused(
        "hostile_legacy",
        &fixture("hostile_in_state_dict.legacy.pth"),
        "posix.system",
    );
}

#[test]
fn broken_files_are_refused() {
    let good = fixture("cosplace_resnet18.bare.zip.pth");
    let legacy = fixture("cosplace_resnet18.bare.legacy.pth");
    refused("empty", b"", "file is empty");
    refused("magic", b"GIF89a and then some", "not a PyTorch checkpoint");
    refused("truncated_zip", &good[..good.len() / 2], "truncated");
    refused("truncated_zip_tail", &good[..good.len() - 10], "truncated");
    refused(
        "truncated_legacy",
        &legacy[..legacy.len() - 100],
        "truncated",
    );
    refused("truncated_legacy_pickle", &legacy[..300], "truncated");
    let mut bad_magic = legacy.clone();
    bad_magic[5] ^= 0xff;
    refused("legacy_magic", &bad_magic, "magic");

    // A zip whose storage record "data/0" is missing: rename it in both headers.
    let mut missing = good.clone();
    let needle = b"/data/0";
    let hits: Vec<usize> = missing
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(hits.len() >= 2);
    for i in hits {
        missing[i + 6] = b'Z';
    }
    refused("missing_record", &missing, "no record for storage");
}

#[test]
fn hostile_hand_made_checkpoints_are_refused() {
    let four = [0u8; 16];
    // A storage shorter than its tensor: 4 floats stored, a 3x3 view asked for.
    let pkl = dict_pickle(&[("w", tensor("0", 4, 0, &[3, 3], &[3, 1]))]);
    refused(
        "short_view",
        &checkpoint(&pkl, &[("0", &four)]),
        "reaches past its storage",
    );
    // A storage record shorter than the size its id declares.
    let pkl = dict_pickle(&[("w", tensor("0", 1000, 0, &[2], &[1]))]);
    refused(
        "short_record",
        &checkpoint(&pkl, &[("0", &four)]),
        "declares 1000 elements",
    );
    // Absurd shapes: overflowing element counts, and a broadcast view bigger than the file.
    let pkl = dict_pickle(&[(
        "w",
        tensor("0", 4, 0, &[i32::MAX, i32::MAX, i32::MAX], &[0, 0, 0]),
    )]);
    refused(
        "absurd_shape",
        &checkpoint(&pkl, &[("0", &four)]),
        "absurd shape",
    );
    let pkl = dict_pickle(&[("w", tensor("0", 4, 0, &[1 << 30], &[0]))]);
    refused(
        "broadcast",
        &checkpoint(&pkl, &[("0", &four)]),
        "more elements than its storage",
    );
    let pkl = dict_pickle(&[("w", tensor("0", 4, 0, &[-1], &[1]))]);
    refused("negative", &checkpoint(&pkl, &[("0", &four)]), "negative");

    // One 64 KiB storage named by 200 entries (through the memo): 12.8 MiB from a 64 KiB file.
    let big = vec![0u8; 65536];
    let mut first = tensor("0", 16384, 0, &[16384], &[1]);
    first.extend(b"q\x01");
    let names: Vec<String> = (0..200).map(|i| format!("w{i}")).collect();
    let mut entries = vec![(names[0].as_str(), first)];
    entries.extend(names[1..].iter().map(|n| (n.as_str(), b"h\x01".to_vec())));
    refused(
        "reuse_bomb",
        &checkpoint(&dict_pickle(&entries), &[("0", &big)]),
        "reused too often",
    );

    // A state dict entry that contains itself (a cycle) and one nested 100 000 deep.
    let mut cyc = b"\x80\x02}(X\x01\x00\x00\x00w}q\x00(X\x01\x00\x00\x00xh\x00uu.".to_vec();
    refused("cycle", &checkpoint(&cyc, &[]), "nesting deeper");
    cyc.clear();
    cyc.extend(b"\x80\x02}(X\x01\x00\x00\x00w");
    cyc.extend(std::iter::repeat_n(b'(', 100_000));
    cyc.extend(std::iter::repeat_n(b't', 100_000));
    cyc.extend(b"u.");
    refused("deep", &checkpoint(&cyc, &[]), "nesting deeper");

    // Allocation bombs: a declared 4 GiB string, and a memo bomb of 2^100 tuple nodes.
    refused(
        "huge_string",
        &checkpoint(b"\x80\x02X\xff\xff\xff\xff", &[]),
        "only 0 bytes remain",
    );
    let mut bomb = b"\x80\x02}(X\x01\x00\x00\x00w)q\x000".to_vec();
    for _ in 0..100 {
        bomb.extend(b"h\x00h\x00\x86q\x000");
    }
    bomb.extend(b"h\x00u.");
    refused("memo_bomb", &checkpoint(&bomb, &[]), "nesting deeper");

    // Not a state dict at all; an unknown layout; a pickled module object.
    refused("list", &checkpoint(b"\x80\x02]q\x00.", &[]), "not a dict");
    let pkl = dict_pickle(&[("foo.weight", tensor("0", 4, 0, &[2, 2], &[2, 1]))]);
    refused(
        "unknown_layout",
        &checkpoint(&pkl, &[("0", &four)]),
        "unrecognised layout",
    );
    let mut module = global("__main__", "Net");
    module.extend(b")\x81}b.");
    let mut pkl = b"\x80\x02".to_vec();
    pkl.extend(module);
    refused(
        "module",
        &checkpoint(&pkl, &[]),
        "pickled object of class __main__.Net",
    );
}

#[test]
fn a_zip64_locator_pointing_past_the_end_of_the_address_space_is_refused() {
    // a zip whose zip64 locator claims its record sits at offset 2^64 - 3
    let mut bytes = vec![0u8; 64];
    let eocd = bytes.len();
    bytes.extend_from_slice(&[0x50, 0x4b, 0x06, 0x07, 0, 0, 0, 0]);
    bytes.extend_from_slice(&(u64::MAX - 2).to_le_bytes());
    bytes.extend_from_slice(&[1, 0, 0, 0]);
    bytes.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06]);
    bytes.extend_from_slice(&[0u8; 18]);
    assert_eq!(bytes.len(), eocd + 20 + 22);
    bytes[..4].copy_from_slice(&[0x50, 0x4b, 0x03, 0x04]);
    let dir = std::env::temp_dir().join(format!("convert-zip64-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("far.pth");
    std::fs::write(&input, &bytes).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_convert"))
        .arg(&input)
        .arg(dir.join("far.safetensors"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("far.pth") && !text.contains("panicked"),
        "{text}"
    );
    assert!(!dir.join("far.safetensors").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_torchvision_classifier_converts_to_its_backbone_with_a_note() {
    let dir = scratch("torchvision");
    let out = dir.join("r18.safetensors");
    for extra in [&[][..], &["--arch", "torchvision"]] {
        let o = Command::new(env!("CARGO_BIN_EXE_convert"))
            .arg(fixtures().join("torchvision_resnet18.bare.zip.pth"))
            .arg(&out)
            .args(extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("dropped the ImageNet classifier (fc.weight, fc.bias)"),
            "{err}"
        );
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.names().iter().all(|n| !n.starts_with("fc.")));
        assert!(st.names().contains(&"layer4.1.bn2.running_var"));
        let (_, m) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let m = m.metadata().clone().unwrap();
        assert_eq!(m["vpr.arch"], "torchvision");
        assert_eq!(m["vpr.backbone"], "resnet18");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
