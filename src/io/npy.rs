//! NumPy `.npy` files of float32 arrays: matrices `[rows, cols]` (what `extract` writes and what
//! `eval --query-descriptors` reads) and arrays of rows of any shape (local feature maps
//! `[N, h, w, C]`, written and read a block of rows at a time through a memory map). Written
//! exactly as `numpy.save` writes such an array (format 1.0, `'<f4'`, C order, the header padded
//! with spaces to a multiple of 64 bytes, with numpy's spare room for a growing first axis), so
//! the bytes are numpy's own.

use super::{io_error, AtomicFile};
use crate::error::{Error, Result};
use std::path::Path;

const MAGIC: &[u8] = b"\x93NUMPY";
/// numpy aligns the data to this many bytes.
const ALIGN: usize = 64;
/// numpy leaves room in the header for the first axis to grow to this many digits.
const GROWTH_AXIS_MAX_DIGITS: usize = 21;

/// A float32 matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// The header numpy writes for a C-order float32 array of this shape (rank 1 or more), magic to
/// newline.
fn header(shape: &[usize]) -> Vec<u8> {
    let mut dict = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': {}, }}",
        python_tuple(shape)
    );
    let first_axis_digits = shape[0].to_string().len();
    dict.push_str(&" ".repeat(GROWTH_AXIS_MAX_DIGITS.saturating_sub(first_axis_digits)));
    // magic (6) + version (2) + length (2) + dict + padding + '\n'; numpy pads by 1 to 64 spaces
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    let pad = ALIGN - unpadded % ALIGN;
    let len = dict.len() + pad + 1;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad));
    out.push(b'\n');
    out
}

/// Writes `m` to `path` atomically (a temporary file in the same folder, renamed into place).
pub fn write(path: &Path, m: &Matrix) -> Result<()> {
    prepare(path, m)?.commit()
}

/// Writes `m` under a temporary name beside `path`; the caller commits it (to put several files
/// in place together) or drops it (to leave nothing behind).
pub fn prepare(path: &Path, m: &Matrix) -> Result<AtomicFile> {
    if m.data.len() != m.rows * m.cols {
        return Err(Error::Shape(format!(
            "{}: {} values do not fill [{}, {}]",
            path.display(),
            m.data.len(),
            m.rows,
            m.cols
        )));
    }
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(&header(&[m.rows, m.cols]))?;
    let bytes: Vec<u8> = m.data.iter().flat_map(|x| x.to_le_bytes()).collect();
    file.write_bytes(&bytes)?;
    Ok(file)
}

/// A float32 C-order `.npy` file (format 1.0, 2.0 or 3.0) mapped into memory as rows (the first
/// axis), so that a database larger than RAM is read a block of rows at a time.
pub struct MappedMatrix {
    pub rows: usize,
    /// Values per row: the product of the other axes.
    pub cols: usize,
    /// The array's whole shape.
    pub shape: Vec<usize>,
    map: memmap2::Mmap,
    data_start: usize,
}

impl MappedMatrix {
    /// Maps the 2-D array in `path`, checking its header and size.
    pub fn open(path: &Path) -> Result<MappedMatrix> {
        let m = MappedMatrix::open_rows(path)?;
        if m.shape.len() != 2 {
            return Err(Error::Format {
                path: path.display().to_string(),
                message: format!("shape {} is not 2-D [N, dim]", python_tuple(&m.shape)),
            });
        }
        Ok(m)
    }

    /// Maps the array of any rank (at least 1) in `path` as rows of its first axis.
    pub fn open_rows(path: &Path) -> Result<MappedMatrix> {
        let file = std::fs::File::open(path).map_err(|source| io_error(path, source))?;
        // SAFETY: the map is only read, and descriptor files are written once (to a temporary
        // file that is then renamed), never modified in place while they are searched.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| io_error(path, source))?;
        let (shape, data_start) = parse_header(&map).map_err(|message| Error::Format {
            path: path.display().to_string(),
            message,
        })?;
        Ok(MappedMatrix {
            rows: shape[0],
            cols: shape[1..].iter().product(),
            shape,
            map,
            data_start,
        })
    }

    /// Rows `start..start + count` as f32 values, row-major.
    pub fn read_rows(&self, start: usize, count: usize) -> Vec<f32> {
        assert!(
            start + count <= self.rows,
            "rows {start}..{} of {}",
            start + count,
            self.rows
        );
        let from = self.data_start + start * self.cols * 4;
        self.map[from..from + count * self.cols * 4]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// Reads a float32 2-D C-order `.npy` file (format 1.0, 2.0 or 3.0).
pub fn read(path: &Path) -> Result<Matrix> {
    let m = MappedMatrix::open(path)?;
    Ok(Matrix {
        rows: m.rows,
        cols: m.cols,
        data: m.read_rows(0, m.rows),
    })
}

/// `shape` as Python writes a tuple: `(3, 5)`, `(15,)`.
fn python_tuple(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// `(shape, offset of the data)` of a float32 C-order `.npy` file of rank 1 or more, or why it is
/// not one.
fn parse_header(bytes: &[u8]) -> std::result::Result<(Vec<usize>, usize), String> {
    if bytes.len() < MAGIC.len() + 2 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let major = bytes[MAGIC.len()];
    let (len_bytes, start) = match major {
        1 => (2, MAGIC.len() + 4),
        2 | 3 => (4, MAGIC.len() + 6),
        v => return Err(format!(".npy format version {v} is not supported")),
    };
    if bytes.len() < start {
        return Err("truncated .npy header".into());
    }
    let len_field = &bytes[MAGIC.len() + 2..start];
    let header_len = if len_bytes == 2 {
        u16::from_le_bytes([len_field[0], len_field[1]]) as usize
    } else {
        u32::from_le_bytes([len_field[0], len_field[1], len_field[2], len_field[3]]) as usize
    };
    let data_start = start + header_len;
    let header = bytes
        .get(start..data_start)
        .ok_or_else(|| "truncated .npy header".to_string())?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;

    let descr =
        header_value(header, "descr").ok_or_else(|| format!("no 'descr' in header {header:?}"))?;
    if descr != "'<f4'" {
        return Err(format!("dtype {descr} is not float32 ('<f4')"));
    }
    match header_value(header, "fortran_order") {
        Some("False") => {}
        Some("True") => {
            return Err("Fortran-order arrays are not supported (save it in C order)".into())
        }
        _ => return Err(format!("no 'fortran_order' in header {header:?}")),
    }
    let shape =
        header_value(header, "shape").ok_or_else(|| format!("no 'shape' in header {header:?}"))?;
    let dims: Vec<usize> = shape
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().map_err(|_| format!("bad shape {shape}")))
        .collect::<std::result::Result<_, _>>()?;
    if dims.is_empty() {
        return Err(format!("shape {shape} is a scalar, not rows"));
    }
    let expected = dims
        .iter()
        .try_fold(4usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| format!("shape {shape} is too large"))?;
    let data = bytes.len() - data_start;
    if data != expected {
        return Err(format!(
            "shape {shape} needs {expected} bytes of float32 data, the file has {data}{}",
            if data < expected { " (truncated)" } else { "" }
        ));
    }
    Ok((dims, data_start))
}

/// A float32 `.npy` array `[N, ...]` written a block of rows at a time through a memory map, so
/// that arrays larger than RAM (the local features of a whole database) never are in memory: the
/// file is created at its full size under a temporary name beside `path` and renamed into place
/// by `commit`; dropped uncommitted, it is deleted.
pub struct RowWriter {
    file: AtomicFile,
    map: memmap2::MmapMut,
    data_start: usize,
    row_len: usize,
}

impl RowWriter {
    pub fn create(path: &Path, shape: &[usize]) -> Result<RowWriter> {
        if shape.len() < 2 {
            return Err(Error::Shape(format!(
                "{}: rows of an array need a shape of rank 2 or more, got {shape:?}",
                path.display()
            )));
        }
        let row_len: usize = shape[1..].iter().product();
        let head = header(shape);
        let len = shape
            .iter()
            .try_fold(4usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(head.len()))
            .ok_or_else(|| {
                Error::Shape(format!("{}: shape {shape:?} is too large", path.display()))
            })?;
        let mut file = AtomicFile::create(path)?;
        file.write_bytes(&head)?;
        let mut map = file.map_whole(len as u64)?;
        map[..head.len()].copy_from_slice(&head);
        Ok(RowWriter {
            file,
            map,
            data_start: head.len(),
            row_len,
        })
    }

    /// Writes rows `start..` from `values` (whole rows).
    pub fn write_rows(&mut self, start: usize, values: &[f32]) -> Result<()> {
        let from = self.data_start + start * self.row_len * 4;
        let to = from + values.len() * 4;
        if values.len() % self.row_len != 0 || to > self.map.len() {
            return Err(Error::Shape(format!(
                "{} values from row {start} are not whole rows of {} inside the array",
                values.len(),
                self.row_len
            )));
        }
        for (dst, v) in self.map[from..to].chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Flushes the map and renames the file into place.
    pub fn commit(self) -> Result<()> {
        self.map
            .flush()
            .map_err(|source| io_error(self.file.path(), source))?;
        drop(self.map);
        self.file.commit()
    }
}

/// The text of `'key': VALUE` in a header dict: a quoted string, a tuple, or a word.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let rest = header[header.find(&format!("'{key}'"))? + key.len() + 2..].trim_start();
    let rest = rest.strip_prefix(':')?.trim_start();
    let end = match rest.chars().next()? {
        '(' => rest.find(')')? + 1,
        q @ ('\'' | '"') => rest[1..].find(q)? + 2,
        _ => rest.find([',', '}'])?,
    };
    Some(rest[..end].trim())
}
