//! Helpers shared by the integration tests: fixture discovery, the `.expected` format
//! written by tools/fixtures/convert_checkpoints.py, and builders for hand-made hostile
//! checkpoints (raw pickle opcodes inside a minimal stored zip).
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Every checkpoint fixture that must convert, sorted.
pub fn good_checkpoints() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pth"))
        .filter(|p| {
            !p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("hostile_in")
        })
        .collect();
    v.sort();
    v
}

pub struct ExpectedTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub struct Expected {
    pub meta: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, ExpectedTensor>,
}

/// Parses `<stem>.expected`: text lines (`meta k=v`, `tensor name dtype [shape] off len`),
/// a `data` line, then the concatenated tensor bytes.
pub fn expected(stem: &str) -> Expected {
    let raw = std::fs::read(fixtures().join(format!("{stem}.expected"))).unwrap();
    let split = raw.windows(6).position(|w| w == b"\ndata\n").unwrap();
    let text = std::str::from_utf8(&raw[..split]).unwrap();
    let blob = &raw[split + 6..];
    let mut e = Expected {
        meta: BTreeMap::new(),
        tensors: BTreeMap::new(),
    };
    for line in text.lines().skip(1) {
        if let Some(kv) = line.strip_prefix("meta ") {
            let (k, v) = kv.split_once('=').unwrap();
            e.meta.insert(k.into(), v.into());
        } else if let Some(t) = line.strip_prefix("tensor ") {
            let f: Vec<&str> = t.split(' ').collect();
            let dims = f[2].trim_matches(['[', ']']);
            let shape = if dims.is_empty() {
                vec![]
            } else {
                dims.split(',').map(|d| d.parse().unwrap()).collect()
            };
            let (off, len): (usize, usize) = (f[3].parse().unwrap(), f[4].parse().unwrap());
            e.tensors.insert(
                f[0].into(),
                ExpectedTensor {
                    dtype: f[1].into(),
                    shape,
                    data: blob[off..off + len].to_vec(),
                },
            );
        }
    }
    e
}

// ---- hand-made pickles ----

pub fn uni(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

pub fn int(i: i32) -> Vec<u8> {
    let mut v = vec![b'J'];
    v.extend(i.to_le_bytes());
    v
}

pub fn tuple(items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = vec![b'('];
    items.iter().for_each(|i| v.extend(i));
    v.push(b't');
    v
}

pub fn global(module: &str, name: &str) -> Vec<u8> {
    format!("c{module}\n{name}\n").into_bytes()
}

/// `_rebuild_tensor_v2` of a FloatStorage `key` declaring `numel` elements.
pub fn tensor(key: &str, numel: i32, offset: i32, size: &[i32], stride: &[i32]) -> Vec<u8> {
    let mut v = global("torch._utils", "_rebuild_tensor_v2");
    let storage = tuple(&[
        uni("storage"),
        global("torch", "FloatStorage"),
        uni(key),
        uni("cpu"),
        int(numel),
    ]);
    let mut pers = storage;
    pers.push(b'Q');
    let sizes: Vec<Vec<u8>> = size.iter().map(|&s| int(s)).collect();
    let strides: Vec<Vec<u8>> = stride.iter().map(|&s| int(s)).collect();
    v.extend(tuple(&[
        pers,
        int(offset),
        tuple(&sizes),
        tuple(&strides),
        vec![0x89],
        b"}".to_vec(),
    ]));
    v.push(b'R');
    v
}

/// A protocol-2 pickle of a dict of `entries` (values are raw pickle fragments).
pub fn dict_pickle(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut v = b"\x80\x02}(".to_vec();
    for (k, val) in entries {
        v.extend(uni(k));
        v.extend(val);
    }
    v.extend(b"u.");
    v
}

/// A minimal stored zip with records under `archive/`, the way torch lays them out.
pub fn zip(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in records {
        let name = format!("archive/{name}");
        let offset = out.len() as u32;
        let header = |sig: u32, central: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central {
                h.extend([20, 0]);
            }
            h.extend([20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // version, flags, method, time, date, crc
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend([0, 0]); // extra
            if central {
                h.extend([0u8; 6]); // comment, disk, internal attrs
                h.extend([0u8; 4]); // external attrs
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend(*data);
        central.extend(header(0x0201_4b50, true));
    }
    let cd_off = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((records.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_off.to_le_bytes());
    out.extend([0, 0]);
    out
}

/// A zip checkpoint with pickle `pkl` and storage records `data/<key>`.
pub fn checkpoint(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let names: Vec<String> = storages.iter().map(|(k, _)| format!("data/{k}")).collect();
    let mut recs: Vec<(&str, &[u8])> = vec![("data.pkl", pkl)];
    recs.extend(
        names
            .iter()
            .zip(storages)
            .map(|(n, (_, d))| (n.as_str(), *d)),
    );
    recs.push(("byteorder", b"little"));
    zip(&recs)
}
