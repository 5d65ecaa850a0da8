//! `.npy` descriptor files: byte-identical to `numpy.save` (tests/fixtures/descriptors_3x5.npy,
//! written by tools/fixtures/npy.py), read back exactly, and clear errors for files that are not
//! float32 `[N, dim]`.

mod common;

use std::path::{Path, PathBuf};
use vpr_engine::io::npy::{self, Matrix};
use vpr_engine::{DType, Device, Tensor};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/descriptors_3x5.npy")
}

/// A fresh folder under the target dir for one test.
fn temp_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("npy-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The matrix tools/fixtures/npy.py saved: i * 5 + j + 0.25, negated on odd rows.
fn fixture_matrix() -> Matrix {
    let data = (0..15)
        .map(|k| {
            let v = k as f32 + 0.25;
            if (k / 5) % 2 == 1 {
                -v
            } else {
                v
            }
        })
        .collect();
    Matrix {
        rows: 3,
        cols: 5,
        data,
    }
}

/// The files in `dir`, by name.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn writes_the_bytes_numpy_writes() {
    let dir = temp_dir("numpy-bytes");
    let out = dir.join("d.npy");
    npy::write(&out, &fixture_matrix()).unwrap();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(fixture()).unwrap()
    );
    // nothing but the file itself is left in the folder
    assert_eq!(listing(&dir), ["d.npy"]);
}

#[test]
fn headers_match_numpy_for_long_and_empty_matrices() {
    // numpy.lib.format.write_array_header_1_0 for these shapes (numpy 2.4): the header leaves
    // room for the first axis to grow, and the data starts at byte 128
    let cases = [
        (
            100_000,
            1,
            "(100000, 1), }                                                     \n",
        ),
        (
            0,
            512,
            "(0, 512), }                                                        \n",
        ),
    ];
    let dir = temp_dir("headers");
    for (rows, cols, tail) in cases {
        let out = dir.join(format!("{rows}x{cols}.npy"));
        let m = Matrix {
            rows,
            cols,
            data: vec![1.5; rows * cols],
        };
        npy::write(&out, &m).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tail}");
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([bytes[8], bytes[9]]), 118);
        assert_eq!(std::str::from_utf8(&bytes[10..128]).unwrap(), header);
        assert_eq!(bytes.len(), 128 + rows * cols * 4);
        assert_eq!(npy::read(&out).unwrap(), m);
    }
}

#[test]
fn reads_what_numpy_wrote_and_round_trips_random_matrices() {
    assert_eq!(npy::read(&fixture()).unwrap(), fixture_matrix());
    let seed = common::seed("npy_round_trip");
    let dir = temp_dir("round-trip");
    for (k, (rows, cols)) in [(1, 1), (7, 13), (33, 512)].into_iter().enumerate() {
        let values = Tensor::randn(
            &[rows, cols],
            0.0,
            1.0,
            seed + k as u64,
            DType::F32,
            &Device::Cpu,
        );
        let m = Matrix {
            rows,
            cols,
            data: values.unwrap().to_vec().unwrap(),
        };
        let out = dir.join("m.npy");
        npy::write(&out, &m).unwrap();
        assert_eq!(npy::read(&out).unwrap(), m, "[{rows}, {cols}], seed {seed}");
    }
}

#[test]
fn files_that_are_not_float32_matrices_are_clear_errors() {
    let dir = temp_dir("bad");
    let good = std::fs::read(fixture()).unwrap();
    // numpy's header for another dtype/order/rank, keeping the fixture's length and padding
    let with_header = |from: &str, to: &str| {
        let text = std::str::from_utf8(&good[10..128]).unwrap();
        let changed = text.replacen(from, to, 1);
        let pad = 118 - changed.trim_end().len() - 1;
        let header = format!("{}{}\n", changed.trim_end(), " ".repeat(pad));
        let mut bytes = good[..10].to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&good[128..]);
        bytes
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "f8.npy",
            with_header("'<f4'", "'<f8'"),
            "dtype '<f8' is not float32",
        ),
        (
            "fortran.npy",
            with_header("False", "True"),
            "Fortran-order arrays are not supported",
        ),
        (
            "1d.npy",
            with_header("(3, 5)", "(15,)"),
            "shape (15,) is not 2-D [N, dim]",
        ),
        (
            "3d.npy",
            with_header("(3, 5)", "(3, 5, 1)"),
            "shape (3, 5, 1) is not 2-D [N, dim]",
        ),
        (
            "truncated.npy",
            good[..good.len() - 3].to_vec(),
            "needs 60 bytes of float32 data, the file has 57 (truncated)",
        ),
        (
            "long.npy",
            [good.clone(), vec![0; 4]].concat(),
            "needs 60 bytes of float32 data, the file has 64",
        ),
        (
            "short-header.npy",
            good[..40].to_vec(),
            "truncated .npy header",
        ),
        ("text.npy", b"rows,cols\n1,2\n".to_vec(), "not a .npy file"),
    ];
    for (name, bytes, message) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let err = npy::read(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains(message),
            "{name}: {err}"
        );
    }
    let missing = dir.join("missing.npy");
    let err = npy::read(&missing).unwrap_err().to_string();
    assert!(err.contains("missing.npy"), "{err}");
}

#[test]
fn a_failed_write_leaves_nothing_behind() {
    let dir = temp_dir("failed-write");
    let out = dir.join("d.npy");
    let wrong = Matrix {
        rows: 2,
        cols: 3,
        data: vec![0.0; 5],
    };
    let err = npy::write(&out, &wrong).unwrap_err().to_string();
    assert!(err.contains("5 values do not fill [2, 3]"), "{err}");
    // a prepared file that is dropped instead of committed disappears
    drop(npy::prepare(&out, &fixture_matrix()).unwrap());
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    let err = npy::write(&dir.join("no-such-folder/d.npy"), &fixture_matrix())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no-such-folder"), "{err}");
}

#[test]
fn arrays_of_rows_are_written_and_read_a_block_at_a_time() {
    let dir = temp_dir("rows");
    let out = dir.join("local.npy");
    let shape = [3, 2, 5, 4];
    let values: Vec<f32> = (0..120).map(|i| i as f32 * 0.5 - 7.0).collect();
    let mut writer = npy::RowWriter::create(&out, &shape).unwrap();
    // nothing is in place before the commit
    assert!(!out.exists());
    writer.write_rows(2, &values[80..]).unwrap();
    writer.write_rows(0, &values[..80]).unwrap();
    assert!(writer.write_rows(3, &values[..40]).is_err(), "past the end");
    assert!(
        writer.write_rows(0, &values[..7]).is_err(),
        "not whole rows"
    );
    writer.commit().unwrap();
    let bytes = std::fs::read(&out).unwrap();
    // numpy.save's bytes for an array of this shape (numpy 2.4)
    let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2, 5, 4), }";
    assert_eq!(&bytes[..10], b"\x93NUMPY\x01\x00\x76\x00");
    assert_eq!(
        std::str::from_utf8(&bytes[10..128]).unwrap().trim_end(),
        header
    );
    assert_eq!(bytes[127], b'\n');
    assert_eq!(bytes.len(), 608);
    let mapped = npy::MappedMatrix::open_rows(&out).unwrap();
    assert_eq!(
        (mapped.rows, mapped.cols, &mapped.shape[..]),
        (3, 40, &shape[..])
    );
    assert_eq!(mapped.read_rows(1, 2), values[40..]);
    // a matrix reader refuses it
    let err = npy::MappedMatrix::open(&out).err().unwrap().to_string();
    assert!(err.contains("not 2-D"), "{err}");
    assert_eq!(listing(&dir), ["local.npy"]);

    // dropped uncommitted, the writer leaves nothing
    let gone = dir.join("gone.npy");
    drop(npy::RowWriter::create(&gone, &shape).unwrap());
    assert_eq!(listing(&dir), ["local.npy"]);
}
