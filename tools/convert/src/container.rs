//! The two file layouts `torch.save` has written since 0.1.10, read in place.
//!
//! **Zip** (torch >= 1.6): a zip archive whose records are all stored uncompressed, one
//! directory `<root>/` holding `data.pkl` (the pickle), `data/<key>` (one record per storage,
//! raw little-endian elements), `byteorder`, `version` and a few more. The writer pads the
//! local headers so every record starts on a 64-byte boundary, which lets us hand out slices
//! of the memory-mapped file instead of copying. Zip64 records are followed, as files over
//! 4 GiB (DINOv2 ViT-g) need them.
//!
//! **Legacy** (torch < 1.6, or `_use_new_zipfile_serialization=False`): five pickles in a
//! row (magic number, protocol version 1001, system info, the object, the sorted list of
//! storage keys), then for each key in that list an i64 element count and the raw elements.
//! The element size comes from the storage type named in the object pickle, so the data
//! section can only be walked after that pickle has been read.

use std::collections::HashMap;

use crate::error::Result;
use crate::pickle::{self, Obj, Pickle, Value};
use crate::torch::storage_dtype;
use crate::{bail, err};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Zip,
    Legacy,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Zip => "zip",
            Format::Legacy => "legacy",
        }
    }
}

/// A parsed checkpoint: the object pickle and the raw bytes of each storage, by key.
pub struct Checkpoint<'a> {
    pub format: Format,
    pub pickle: Pickle,
    storages: HashMap<String, &'a [u8]>,
}

impl<'a> Checkpoint<'a> {
    /// The bytes of storage `key`, as written (may be longer than any tensor needs).
    pub fn storage(&self, key: &str) -> Result<&'a [u8]> {
        self.storages
            .get(key)
            .copied()
            .ok_or_else(|| match self.format {
                Format::Zip => err!("zip archive has no record for storage {key:?}"),
                Format::Legacy => err!("legacy data section has no storage {key:?}"),
            })
    }
}

const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// Recognises the layout from the first bytes and parses it.
pub fn open(data: &[u8]) -> Result<Checkpoint<'_>> {
    if data.starts_with(b"PK\x03\x04") {
        read_zip(data)
    } else if data.starts_with(&[0x80, 0x02, 0x8a, 0x0a]) {
        read_legacy(data)
    } else if data.len() >= 262 && &data[257..262] == b"ustar" {
        bail!("tar checkpoint from PyTorch before 0.1.10 is not supported; re-save it with a current PyTorch")
    } else if data.is_empty() {
        bail!("file is empty")
    } else {
        let head: Vec<String> = data.iter().take(4).map(|b| format!("{b:02x}")).collect();
        bail!(
            "not a PyTorch checkpoint: starts with bytes {} (expected a zip archive or the legacy pickle magic)",
            head.join(" ")
        )
    }
}

// The readers check offsets with checked arithmetic: offsets come from the file, and one that
// succeeds proves `at` lies inside the file, so small constant offsets from it cannot overflow.
fn u16_at(d: &[u8], at: usize) -> Result<u16> {
    at.checked_add(2)
        .and_then(|end| d.get(at..end))
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| err!("zip structure is truncated at byte {at}"))
}

fn u32_at(d: &[u8], at: usize) -> Result<u32> {
    at.checked_add(4)
        .and_then(|end| d.get(at..end))
        .map(|s| u32::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or_else(|| err!("zip structure is truncated at byte {at}"))
}

fn u64_at(d: &[u8], at: usize) -> Result<u64> {
    at.checked_add(8)
        .and_then(|end| d.get(at..end))
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or_else(|| err!("zip structure is truncated at byte {at}"))
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| err!("zip {what} {v} is out of range"))
}

struct Entry {
    name: String,
    method: u16,
    flags: u16,
    size: u64,
    compressed: u64,
    local: u64,
}

/// Finds the end-of-central-directory record: the last signature whose comment length
/// accounts exactly for the bytes after it, so tensor data that happens to contain the
/// signature is not mistaken for it.
fn find_eocd(d: &[u8]) -> Result<usize> {
    if d.len() < 22 {
        bail!("zip archive is truncated: no end-of-central-directory record");
    }
    let lowest = d.len().saturating_sub(22 + 0xffff);
    for at in (lowest..=d.len() - 22).rev() {
        if d[at..at + 4] == [0x50, 0x4b, 0x05, 0x06]
            && at + 22 + u16_at(d, at + 20)? as usize == d.len()
        {
            return Ok(at);
        }
    }
    bail!("zip archive is truncated: no end-of-central-directory record")
}

fn central_directory(d: &[u8]) -> Result<Vec<Entry>> {
    let eocd = find_eocd(d)?;
    let mut count = u16_at(d, eocd + 10)? as u64;
    let mut cd_size = u32_at(d, eocd + 12)? as u64;
    let mut cd_off = u32_at(d, eocd + 16)? as u64;
    // A zip64 locator sits right before the classic record when the writer needed one.
    if eocd >= 20 && u32_at(d, eocd - 20)? == 0x0706_4b50 {
        let at = to_usize(u64_at(d, eocd - 12)?, "zip64 record offset")?;
        if u32_at(d, at)? != 0x0606_4b50 {
            bail!("zip64 end-of-central-directory record is missing");
        }
        count = u64_at(d, at + 32)?;
        cd_size = u64_at(d, at + 40)?;
        cd_off = u64_at(d, at + 48)?;
    }
    let start = to_usize(cd_off, "central directory offset")?;
    let end = start
        .checked_add(to_usize(cd_size, "central directory size")?)
        .filter(|&e| e <= d.len())
        .ok_or_else(|| err!("zip central directory lies outside the file (truncated?)"))?;
    // Each entry takes at least 46 bytes, which bounds the count a hostile file can claim.
    if count > ((end - start) / 46) as u64 {
        bail!("zip central directory claims {count} records but has room for fewer");
    }
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = start;
    for _ in 0..count {
        if u32_at(d, at)? != 0x0201_4b50 || at + 46 > end {
            bail!("zip central directory is corrupt at byte {at}");
        }
        let flags = u16_at(d, at + 8)?;
        let method = u16_at(d, at + 10)?;
        let mut compressed = u32_at(d, at + 20)? as u64;
        let mut size = u32_at(d, at + 24)? as u64;
        let name_len = u16_at(d, at + 28)? as usize;
        let extra_len = u16_at(d, at + 30)? as usize;
        let comment_len = u16_at(d, at + 32)? as usize;
        let mut local = u32_at(d, at + 42)? as u64;
        let name_at = at + 46;
        let extra_at = name_at + name_len;
        let next = extra_at + extra_len + comment_len;
        if next > end {
            bail!("zip central directory is corrupt at byte {at}");
        }
        let name = String::from_utf8_lossy(&d[name_at..extra_at]).into_owned();
        // Zip64 extra field: the 64-bit values, in this order, for each classic field
        // that holds the 0xffffffff placeholder.
        let mut x = extra_at;
        while x + 4 <= extra_at + extra_len {
            let id = u16_at(d, x)?;
            let len = u16_at(d, x + 2)? as usize;
            if id == 1 {
                let mut f = x + 4;
                for field in [&mut size, &mut compressed, &mut local] {
                    if *field == 0xffff_ffff && f + 8 <= x + 4 + len {
                        *field = u64_at(d, f)?;
                        f += 8;
                    }
                }
            }
            x += 4 + len;
        }
        entries.push(Entry {
            name,
            method,
            flags,
            size,
            compressed,
            local,
        });
        at = next;
    }
    Ok(entries)
}

/// The bytes of one record, located through its local header.
fn record<'a>(d: &'a [u8], e: &Entry) -> Result<&'a [u8]> {
    if e.method != 0 || e.compressed != e.size {
        bail!(
            "zip record {:?} is compressed (method {}); PyTorch stores records uncompressed",
            e.name,
            e.method
        );
    }
    if e.flags & 1 != 0 {
        bail!("zip record {:?} is encrypted", e.name);
    }
    let at = to_usize(e.local, "record offset")?;
    if u32_at(d, at)? != 0x0403_4b50 {
        bail!("zip record {:?} has no local header at byte {at}", e.name);
    }
    let start = at + 30 + u16_at(d, at + 26)? as usize + u16_at(d, at + 28)? as usize;
    start
        .checked_add(to_usize(e.size, "record size")?)
        .filter(|&end| end <= d.len())
        .map(|end| &d[start..end])
        .ok_or_else(|| {
            err!(
                "zip record {:?} runs past the end of the file (truncated?)",
                e.name
            )
        })
}

fn read_zip(d: &[u8]) -> Result<Checkpoint<'_>> {
    let entries = central_directory(d)?;
    // The root directory is named after the file at save time; find it through data.pkl.
    let pkl = entries
        .iter()
        .find(|e| e.name.ends_with("data.pkl") && e.name.matches('/').count() == 1)
        .ok_or_else(|| {
            err!("zip archive has no <root>/data.pkl record; not a PyTorch checkpoint")
        })?;
    let root = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let mut storages = HashMap::new();
    let data_dir = format!("{root}data/");
    for e in &entries {
        if let Some(key) = e.name.strip_prefix(&data_dir) {
            storages.insert(key.to_string(), record(d, e)?);
        } else if e.name == format!("{root}byteorder") {
            let order = record(d, e)?;
            if order != b"little" {
                bail!(
                    "checkpoint was written on a {} machine; only little-endian data is supported",
                    String::from_utf8_lossy(order)
                );
            }
        }
    }
    let pkl_bytes = record(d, pkl)?;
    let pickle = pickle::load(pkl_bytes)?;
    Ok(Checkpoint {
        format: Format::Zip,
        pickle,
        storages,
    })
}

fn read_legacy(d: &[u8]) -> Result<Checkpoint<'_>> {
    let mut pos = 0usize;
    let mut next = |what: &str| -> Result<Pickle> {
        let p = pickle::load(&d[pos..]).map_err(|e| err!("legacy {what} pickle: {e}"))?;
        pos += p.consumed;
        Ok(p)
    };
    let magic = next("magic number")?;
    if magic.root != Value::BigInt(LEGACY_MAGIC[..].into()) {
        bail!("legacy checkpoint has a wrong magic number");
    }
    let version = next("protocol version")?;
    if version.root != Value::Int(1001) {
        bail!(
            "legacy checkpoint has protocol version {}, expected 1001",
            version.describe(&version.root)
        );
    }
    let info = next("system info")?;
    if let Some(Obj::Dict(items)) = info.obj(&info.root) {
        for (k, v) in items {
            if k == &Value::Str("little_endian".into()) && v == &Value::Bool(false) {
                bail!("checkpoint was written on a big-endian machine; only little-endian data is supported");
            }
        }
    }
    let object = next("object")?;
    let keys = next("storage key list")?;
    let Some(Obj::List(key_list)) = keys.obj(&keys.root) else {
        bail!("legacy checkpoint's storage key list is not a list");
    };

    // Element sizes come from the storage types named in the object pickle.
    let mut elem_size = HashMap::new();
    for o in &object.arena {
        let Obj::PersId(id) = o else { continue };
        let Some(Obj::Tuple(f)) = object.obj(id) else {
            continue;
        };
        if let (Some(Value::Str(key)), Some((_, ty))) =
            (f.get(2), f.get(1).and_then(|t| object.global(t)))
        {
            let size = storage_dtype(ty)
                .map(|d| d.size())
                .ok_or_else(|| err!("unsupported storage type torch.{ty}"))?;
            elem_size.insert(key.to_string(), size);
        }
    }

    let mut storages = HashMap::new();
    for k in key_list {
        let Value::Str(key) = k else {
            bail!("legacy storage key is {}, not a string", keys.describe(k));
        };
        let size = *elem_size
            .get(&**key)
            .ok_or_else(|| err!("legacy storage {key:?} is listed but never used"))?;
        let numel = d
            .get(pos..pos + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
            .ok_or_else(|| err!("legacy data section is truncated at storage {key:?}"))?;
        let start = pos + 8;
        let end = numel
            .checked_mul(size as u64)
            .and_then(|n| (start as u64).checked_add(n))
            .filter(|&e| e <= d.len() as u64)
            .ok_or_else(|| err!("legacy data section is truncated at storage {key:?} ({numel} elements declared)"))?
            as usize;
        storages.insert(key.to_string(), &d[start..end]);
        pos = end;
    }
    Ok(Checkpoint {
        format: Format::Legacy,
        pickle: object,
        storages,
    })
}
