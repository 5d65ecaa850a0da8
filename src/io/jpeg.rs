//! Baseline JPEG decoding that gives exactly the pixels PIL gives.
//!
//! PyTorch pipelines read images with `PIL.Image.open(p).convert("RGB")`, and PIL decodes JPEGs
//! with libjpeg-turbo at its defaults. The `image` crate's decoder (zune-jpeg) rounds
//! differently at three stages, so its pixels, and the descriptors computed from them, differ
//! from the PyTorch ones. This decoder repeats libjpeg-turbo's arithmetic instead, stage by
//! stage as `tools/jpeg/pil_model.py` models it (that model was checked pixel for pixel against
//! PIL):
//!   1. Huffman decoding of baseline and extended sequential scans (SOF0, SOF1; 8-bit samples,
//!      8- and 16-bit quantisation tables, interleaved and single-component scans, restart
//!      intervals);
//!   2. jidctint.c's `jpeg_idct_islow` (13-bit constants, 2 extra bits between the column and
//!      the row pass) with the output wrapped through libjpeg's range-limit table;
//!   3. jdsample.c's "fancy" chroma upsampling of the component's real samples (edge samples
//!      repeated): h2v2 in one step with a single rounding, h2v1 and h1v2 with biases 1 and 2,
//!      and plain replication when a horizontally halved component is 2 samples wide or less;
//!   4. jdcolor.c's YCbCr->RGB conversion with 16-bit fixed-point tables (or none for Adobe RGB
//!      files), grey repeated into R, G and B as `convert("RGB")` does.
//!
//! Valid files that use what is not implemented here (progressive or arithmetic coding,
//! lossless or hierarchical modes, 12-bit samples, CMYK, sampling ratios other than 1 and 2,
//! Motion-JPEG frames without Huffman tables) are [`JpegError::Unsupported`];
//! `io::image::decode` hands those to the `image` crate, whose pixels are close to PIL's but
//! not identical. Anything malformed or cut short is [`JpegError::Corrupt`], never a panic;
//! frames over 2^28 pixels are refused before anything is allocated for them.
//!
//! tests/image.rs compares the output with PIL's, value for value, on JPEGs that
//! tools/fixtures/jpeg.py writes with PIL and with a small encoder of its own for the layouts
//! PIL does not write (4:4:0, one scan per component, mixed sampling factors).

use super::image::Rgb8;
use std::fmt;

/// Why a JPEG was not decoded here.
#[derive(Debug, PartialEq, Eq)]
pub enum JpegError {
    /// A valid JPEG using a feature this decoder leaves to the `image` crate.
    Unsupported(String),
    /// Not a well-formed JPEG: what is wrong, and where when it is known.
    Corrupt(String),
}

impl fmt::Display for JpegError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JpegError::Unsupported(m) => write!(f, "unsupported JPEG: {m}"),
            JpegError::Corrupt(m) => write!(f, "corrupt JPEG: {m}"),
        }
    }
}

type Parse<T> = Result<T, JpegError>;

fn corrupt<T>(message: impl Into<String>) -> Parse<T> {
    Err(JpegError::Corrupt(message.into()))
}

fn unsupported<T>(message: impl Into<String>) -> Parse<T> {
    Err(JpegError::Unsupported(message.into()))
}

/// The largest frame decoded, in pixels: a bogus header cannot ask for more memory than that.
const MAX_PIXELS: u64 = 1 << 28;

/// The natural (row-major) index of each zigzag position.
const ZIGZAG: [usize; 64] = [
    0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5, 12, 19, 26, 33, 40, 48, 41, 34, 27, 20,
    13, 6, 7, 14, 21, 28, 35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51, 58, 59,
    52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
];

/// Decodes a JPEG file's bytes to 8-bit RGB as PIL's `Image.open(p).convert("RGB")` does.
pub fn decode(data: &[u8]) -> Parse<Rgb8> {
    if !data.starts_with(&[0xFF, 0xD8]) {
        return corrupt("no SOI marker at the start");
    }
    let mut state = State::default();
    let mut pos = 2;
    loop {
        let marker_at = pos;
        let (marker, after) = marker_at_pos(data, pos)?;
        pos = after;
        match marker {
            0xD9 => break,
            // parameterless markers outside a scan carry nothing
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return corrupt(format!("a second SOI marker at byte {marker_at}")),
            _ => {}
        }
        let body = segment_body(data, pos, marker)?;
        pos += 2 + body.len();
        let mut seg = Segment::new(body, marker);
        match marker {
            0xC0 | 0xC1 => state.read_frame(&mut seg)?,
            0xC2 | 0xC6 => return unsupported("progressive coding"),
            0xC3 | 0xC7 => return unsupported("lossless coding"),
            0xC5 | 0xDE | 0xDF => return unsupported("hierarchical coding"),
            0xC9..=0xCF => return unsupported("arithmetic coding"),
            0xC4 => state.read_huffman_tables(&mut seg)?,
            0xDB => state.read_quantisation_tables(&mut seg)?,
            0xDD => {
                state.restart_interval = seg.u16()? as usize;
                seg.end()?;
            }
            0xDA => pos = state.read_scan(&mut seg, data, pos)?,
            0xDC => return unsupported("a DNL marker (the height given after the scan)"),
            0xE0 => state.jfif |= body.len() >= 14 && body.starts_with(b"JFIF\0"),
            0xEE if body.len() >= 12 && body.starts_with(b"Adobe") => {
                state.adobe_transform = Some(body[11])
            }
            0xE1..=0xEF | 0xFE => {}
            _ => return corrupt(format!("unknown marker 0x{marker:02X} at byte {marker_at}")),
        }
    }
    state.finish()
}

/// The marker whose 0xFF (possibly several fill bytes of 0xFF) starts at `pos`, and the
/// position after it.
fn marker_at_pos(data: &[u8], pos: usize) -> Parse<(u8, usize)> {
    match data.get(pos) {
        None => return corrupt(format!("the file ends at byte {pos} without an EOI marker")),
        Some(0xFF) => {}
        Some(b) => {
            return corrupt(format!(
                "byte {pos} is 0x{b:02X} where a marker should start"
            ))
        }
    }
    let mut at = pos + 1;
    while data.get(at) == Some(&0xFF) {
        at += 1;
    }
    match data.get(at) {
        Some(&marker) => Ok((marker, at + 1)),
        None => corrupt(format!("the file ends at byte {at} inside a marker")),
    }
}

/// The position of the next marker's 0xFF at or after `pos` in entropy-coded data (where 0xFF
/// 0x00 is a stuffed 0xFF byte).
fn next_marker(data: &[u8], pos: usize) -> Option<usize> {
    let mut at = pos;
    loop {
        let ff = at + data.get(at..)?.iter().position(|&b| b == 0xFF)?;
        match data.get(ff + 1)? {
            0x00 => at = ff + 2,
            _ => return Some(ff),
        }
    }
}

/// The bytes of the marker segment whose length field is at `pos`.
fn segment_body(data: &[u8], pos: usize, marker: u8) -> Parse<&[u8]> {
    let length = match data.get(pos..pos + 2) {
        Some(b) => u16::from_be_bytes([b[0], b[1]]) as usize,
        None => {
            return corrupt(format!(
                "the file ends inside the length of marker 0x{marker:02X} at byte {pos}"
            ))
        }
    };
    if length < 2 {
        return corrupt(format!(
            "marker 0x{marker:02X} at byte {pos} has length {length}"
        ));
    }
    data.get(pos + 2..pos + length).ok_or_else(|| {
        JpegError::Corrupt(format!(
            "the file ends inside marker 0x{marker:02X} (length {length} at byte {pos})"
        ))
    })
}

/// Big-endian fields of one marker segment, failing cleanly past its end.
struct Segment<'a> {
    bytes: &'a [u8],
    pos: usize,
    marker: u8,
}

impl<'a> Segment<'a> {
    fn new(bytes: &'a [u8], marker: u8) -> Self {
        Segment {
            bytes,
            pos: 0,
            marker,
        }
    }

    fn take(&mut self, n: usize) -> Parse<&'a [u8]> {
        let taken = self.bytes.get(self.pos..self.pos + n).ok_or_else(|| {
            JpegError::Corrupt(format!(
                "marker 0x{:02X}: its segment of {} bytes is too short",
                self.marker,
                self.bytes.len()
            ))
        })?;
        self.pos += n;
        Ok(taken)
    }

    fn u8(&mut self) -> Parse<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Parse<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn is_done(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    /// Fails unless the whole segment was read.
    fn end(&self) -> Parse<()> {
        if self.is_done() {
            Ok(())
        } else {
            corrupt(format!(
                "marker 0x{:02X}: its segment has {} bytes where {} are expected",
                self.marker,
                self.bytes.len(),
                self.pos
            ))
        }
    }
}

/// One component of the frame, and its samples once decoded.
struct Component {
    id: u8,
    /// Horizontal and vertical sampling factors.
    h: usize,
    v: usize,
    quant_table: usize,
    /// Blocks per row and rows of blocks of `samples` (whole MCUs, so padded past the image).
    blocks_wide: usize,
    blocks_high: usize,
    /// The component's samples after the IDCT, `blocks_wide * 8` per row.
    samples: Vec<u8>,
    /// Whether a scan has carried this component.
    decoded: bool,
}

struct Frame {
    width: usize,
    height: usize,
    h_max: usize,
    v_max: usize,
    components: Vec<Component>,
}

impl Frame {
    fn mcus_wide(&self) -> usize {
        self.width.div_ceil(8 * self.h_max)
    }

    fn mcus_high(&self) -> usize {
        self.height.div_ceil(8 * self.v_max)
    }

    /// The component's real size in samples (libjpeg's `downsampled_width`/`_height`).
    fn samples_size(&self, c: &Component) -> (usize, usize) {
        (
            (self.width * c.h).div_ceil(self.h_max),
            (self.height * c.v).div_ceil(self.v_max),
        )
    }
}

#[derive(Default)]
struct State {
    quant_tables: [Option<[u16; 64]>; 4],
    dc_tables: [Option<Huffman>; 4],
    ac_tables: [Option<Huffman>; 4],
    restart_interval: usize,
    frame: Option<Frame>,
    jfif: bool,
    adobe_transform: Option<u8>,
}

impl State {
    fn read_frame(&mut self, seg: &mut Segment) -> Parse<()> {
        if self.frame.is_some() {
            return corrupt("a second frame header (SOF)");
        }
        let precision = seg.u8()?;
        if precision != 8 {
            return unsupported(format!("{precision}-bit samples"));
        }
        let height = seg.u16()? as usize;
        let width = seg.u16()? as usize;
        if width == 0 || height == 0 {
            return corrupt(format!("the frame is {width}x{height} pixels"));
        }
        if (width * height) as u64 > MAX_PIXELS {
            return corrupt(format!(
                "the frame is {width}x{height} pixels, more than the {MAX_PIXELS} decoded"
            ));
        }
        let count = seg.u8()? as usize;
        match count {
            1 | 3 => {}
            0 => return corrupt("the frame has no components"),
            _ => return unsupported(format!("{count} colour components")),
        }
        let mut components: Vec<Component> = Vec::with_capacity(count);
        for _ in 0..count {
            let id = seg.u8()?;
            let factors = seg.u8()?;
            let quant_table = seg.u8()? as usize;
            let (h, v) = ((factors >> 4) as usize, (factors & 15) as usize);
            if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
                return corrupt(format!("component {id} has sampling factors {h}x{v}"));
            }
            if quant_table > 3 {
                return corrupt(format!(
                    "component {id} uses quantisation table {quant_table}"
                ));
            }
            if components.iter().any(|c| c.id == id) {
                return unsupported(format!("two components with the id {id}"));
            }
            components.push(Component {
                id,
                h,
                v,
                quant_table,
                blocks_wide: 0,
                blocks_high: 0,
                samples: Vec::new(),
                decoded: false,
            });
        }
        seg.end()?;
        let h_max = components.iter().map(|c| c.h).max().unwrap_or(1);
        let v_max = components.iter().map(|c| c.v).max().unwrap_or(1);
        for c in &components {
            let ratio_ok = |f: usize, max: usize| max % f == 0 && max / f <= 2;
            if !ratio_ok(c.h, h_max) || !ratio_ok(c.v, v_max) {
                return unsupported(format!(
                    "sampling factors {}",
                    components
                        .iter()
                        .map(|c| format!("{}x{}", c.h, c.v))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let mut frame = Frame {
            width,
            height,
            h_max,
            v_max,
            components,
        };
        let (mcus_wide, mcus_high) = (frame.mcus_wide(), frame.mcus_high());
        for c in &mut frame.components {
            c.blocks_wide = mcus_wide * c.h;
            c.blocks_high = mcus_high * c.v;
        }
        self.frame = Some(frame);
        Ok(())
    }

    fn read_huffman_tables(&mut self, seg: &mut Segment) -> Parse<()> {
        while !seg.is_done() {
            let class_and_id = seg.u8()?;
            let (class, id) = ((class_and_id >> 4) as usize, (class_and_id & 15) as usize);
            if class > 1 || id > 3 {
                return corrupt(format!("a Huffman table of class {class} and number {id}"));
            }
            let counts: [u8; 16] = seg.take(16)?.try_into().expect("16 bytes");
            let total: usize = counts.iter().map(|&n| n as usize).sum();
            if total > 256 {
                return corrupt(format!("a Huffman table with {total} codes"));
            }
            let symbols = seg.take(total)?;
            if class == 0 && symbols.iter().any(|&s| s > 15) {
                return corrupt("a DC Huffman table with a symbol over 15");
            }
            let table = Huffman::new(&counts, symbols)?;
            let tables = if class == 0 {
                &mut self.dc_tables
            } else {
                &mut self.ac_tables
            };
            tables[id] = Some(table);
        }
        Ok(())
    }

    fn read_quantisation_tables(&mut self, seg: &mut Segment) -> Parse<()> {
        while !seg.is_done() {
            let precision_and_id = seg.u8()?;
            let (wide, id) = (precision_and_id >> 4, (precision_and_id & 15) as usize);
            if wide > 1 || id > 3 {
                return corrupt(format!(
                    "quantisation table {id} with precision code {wide}"
                ));
            }
            let mut table = [0u16; 64];
            for &natural in &ZIGZAG {
                table[natural] = if wide == 1 {
                    seg.u16()?
                } else {
                    seg.u8()? as u16
                };
            }
            self.quant_tables[id] = Some(table);
        }
        Ok(())
    }

    /// Reads a scan header and its entropy-coded data (from `pos`); returns the position of
    /// the marker after the data.
    fn read_scan(&mut self, seg: &mut Segment, data: &[u8], pos: usize) -> Parse<usize> {
        let Some(frame) = self.frame.as_mut() else {
            return corrupt("a scan (SOS) before the frame header (SOF)");
        };
        let count = seg.u8()? as usize;
        if count == 0 || count > frame.components.len() {
            return corrupt(format!("a scan of {count} components"));
        }
        let mut scan = Vec::with_capacity(count);
        for _ in 0..count {
            let id = seg.u8()?;
            let tables = seg.u8()?;
            let Some(index) = frame.components.iter().position(|c| c.id == id) else {
                return corrupt(format!("a scan of component {id}, not in the frame"));
            };
            if scan.iter().any(|s: &ScanComponent| s.index == index) {
                return corrupt(format!("a scan lists component {id} twice"));
            }
            let c = &frame.components[index];
            if c.decoded {
                return corrupt(format!("component {id} is in two scans"));
            }
            let (dc, ac) = ((tables >> 4) as usize, (tables & 15) as usize);
            let dc_table = self.dc_tables.get(dc).and_then(Option::as_ref);
            let ac_table = self.ac_tables.get(ac).and_then(Option::as_ref);
            let (Some(dc_table), Some(ac_table)) = (dc_table, ac_table) else {
                // libjpeg-turbo then uses the standard tables, as Motion-JPEG frames expect
                return unsupported(format!(
                    "component {id} uses Huffman tables DC {dc} and AC {ac}, not both defined"
                ));
            };
            let Some(quant) = self.quant_tables[c.quant_table] else {
                return corrupt(format!(
                    "component {id} uses quantisation table {}, not defined",
                    c.quant_table
                ));
            };
            scan.push(ScanComponent {
                index,
                dc_table,
                ac_table,
                quant,
                prediction: 0,
            });
        }
        // spectral selection and successive approximation (3 bytes) mean nothing here
        seg.take(3)?;
        seg.end()?;
        let blocks_per_mcu: usize = scan
            .iter()
            .map(|s| frame.components[s.index].h * frame.components[s.index].v)
            .sum();
        if count > 1 && blocks_per_mcu > 10 {
            return corrupt(format!(
                "an interleaved scan of {blocks_per_mcu} blocks per MCU (at most 10)"
            ));
        }
        for s in &scan {
            let c = &mut frame.components[s.index];
            c.samples = vec![0; c.blocks_wide * 8 * c.blocks_high * 8];
            c.decoded = true;
        }
        let mut reader = BitReader::new(data, pos);
        decode_scan(frame, &mut scan, &mut reader, self.restart_interval)?;
        next_marker(data, reader.pos)
            .ok_or_else(|| JpegError::Corrupt("the file ends after a scan without EOI".into()))
    }

    /// Upsamples and converts the decoded components to RGB.
    fn finish(self) -> Parse<Rgb8> {
        let Some(frame) = self.frame else {
            return corrupt("no frame header (SOF) before EOI");
        };
        if let Some(c) = frame.components.iter().find(|c| !c.decoded) {
            return corrupt(format!("no scan carries component {}", c.id));
        }
        let planes: Vec<Vec<u8>> = frame
            .components
            .iter()
            .map(|c| upsample(&frame, c))
            .collect();
        let (width, height) = (frame.width, frame.height);
        let pixels = if let [grey] = &planes[..] {
            grey.iter().flat_map(|&v| [v; 3]).collect()
        } else {
            let ids: Vec<u8> = frame.components.iter().map(|c| c.id).collect();
            // jdapimin.c's guess of the colour space of a 3-component file
            let rgb = !self.jfif
                && match self.adobe_transform {
                    Some(transform) => transform == 0,
                    None => ids == b"RGB",
                };
            if rgb {
                (0..width * height)
                    .flat_map(|i| [planes[0][i], planes[1][i], planes[2][i]])
                    .collect()
            } else {
                ycbcr_to_rgb(&planes[0], &planes[1], &planes[2])
            }
        };
        Ok(Rgb8 {
            height,
            width,
            pixels,
        })
    }
}

/// A component as one scan codes it.
struct ScanComponent<'a> {
    index: usize,
    dc_table: &'a Huffman,
    ac_table: &'a Huffman,
    /// Its quantisation table, natural order.
    quant: [u16; 64],
    /// The DC value of its previous block.
    prediction: i32,
}

/// Decodes every MCU of a scan into the components' sample planes.
fn decode_scan(
    frame: &mut Frame,
    scan: &mut [ScanComponent],
    reader: &mut BitReader,
    restart_interval: usize,
) -> Parse<()> {
    // a single-component scan codes only the component's own blocks, one per MCU
    let (mcus_wide, mcus_high) = if let [only] = scan {
        let c = &frame.components[only.index];
        let (w, h) = frame.samples_size(c);
        (w.div_ceil(8), h.div_ceil(8))
    } else {
        (frame.mcus_wide(), frame.mcus_high())
    };
    let interleaved = scan.len() > 1;
    let mut next_restart = 0u8;
    for mcu in 0..mcus_wide * mcus_high {
        if restart_interval > 0 && mcu > 0 && mcu % restart_interval == 0 {
            reader.restart(next_restart)?;
            next_restart = (next_restart + 1) % 8;
            scan.iter_mut().for_each(|s| s.prediction = 0);
        }
        let (mcu_x, mcu_y) = (mcu % mcus_wide, mcu / mcus_wide);
        for s in scan.iter_mut() {
            let c = &mut frame.components[s.index];
            let (h, v) = if interleaved { (c.h, c.v) } else { (1, 1) };
            for block_y in mcu_y * v..mcu_y * v + v {
                for block_x in mcu_x * h..mcu_x * h + h {
                    let mut coefficients = [0i32; 64];
                    let dc_only = decode_block(reader, s, &mut coefficients)?;
                    let stride = c.blocks_wide * 8;
                    let start = block_y * 8 * stride + block_x * 8;
                    idct_islow(&coefficients, dc_only, &mut c.samples[start..], stride);
                }
            }
        }
        reader.check_overrun()?;
    }
    Ok(())
}

/// Decodes one block's dequantised coefficients (natural order); true when it has only DC.
fn decode_block(
    reader: &mut BitReader,
    s: &mut ScanComponent,
    coefficients: &mut [i32; 64],
) -> Parse<bool> {
    reader.refill();
    let size = reader.symbol(s.dc_table)? as u32;
    let difference = extend(reader.bits(size), size);
    s.prediction = s.prediction.checked_add(difference).ok_or_else(|| {
        JpegError::Corrupt(format!(
            "DC values overflow near byte {} (corrupt data)",
            reader.pos
        ))
    })?;
    // libjpeg keeps coefficients in 16 bits (JCOEF)
    coefficients[0] = s.prediction as i16 as i32 * s.quant[0] as i32;
    let mut dc_only = true;
    let mut k = 1;
    while k < 64 {
        reader.refill();
        let fast = s.ac_table.fast_ac[reader.peek_lookup_bits()];
        if fast != 0 {
            reader.bits((fast & 0xFF) as u32);
            k += ((fast >> 8) & 15) as usize;
            if k > 63 {
                return corrupt(format!(
                    "a block with more than 64 coefficients near byte {}",
                    reader.pos
                ));
            }
            let natural = ZIGZAG[k];
            coefficients[natural] = (fast >> 16) * s.quant[natural] as i32;
            dc_only = false;
            k += 1;
            continue;
        }
        let run_size = reader.symbol(s.ac_table)?;
        let (run, size) = ((run_size >> 4) as usize, (run_size & 15) as u32);
        if size == 0 {
            if run != 15 {
                break; // end of block
            }
            k += 16;
            continue;
        }
        k += run;
        if k > 63 {
            return corrupt(format!(
                "a block with more than 64 coefficients near byte {}",
                reader.pos
            ));
        }
        let natural = ZIGZAG[k];
        coefficients[natural] = extend(reader.bits(size), size) * s.quant[natural] as i32;
        dc_only = false;
        k += 1;
    }
    Ok(dc_only)
}

/// The signed value of the `size`-bit field `bits` (JPEG's EXTEND).
fn extend(bits: u32, size: u32) -> i32 {
    if size > 0 && bits < 1 << (size - 1) {
        bits as i32 - (1 << size) + 1
    } else {
        bits as i32
    }
}

/// Entropy-coded bits, with stuffed bytes removed. At a marker or the end of the file it
/// supplies zeros and counts them, so that a scan reading past its data is caught.
struct BitReader<'a> {
    data: &'a [u8],
    /// The next byte to load.
    pos: usize,
    /// Loaded bits, the next one in the most significant place.
    buffer: u64,
    count: u32,
    /// How many of the last loaded bits are zeros supplied past the data.
    padding: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8], pos: usize) -> Self {
        BitReader {
            data,
            pos,
            buffer: 0,
            count: 0,
            padding: 0,
        }
    }

    /// Loads bytes until at least 57 bits are buffered (a Huffman code and its value need 31).
    fn refill(&mut self) {
        while self.count <= 56 {
            let byte = match self.data.get(self.pos) {
                Some(0xFF) if self.data.get(self.pos + 1) == Some(&0) => {
                    self.pos += 2;
                    0xFF
                }
                Some(0xFF) | None => {
                    self.padding += 8;
                    0
                }
                Some(&b) => {
                    self.pos += 1;
                    b
                }
            };
            self.buffer |= (byte as u64) << (56 - self.count);
            self.count += 8;
        }
    }

    /// The next `n` (at most 16) bits; `refill` must have run since 31 bits were last taken.
    fn bits(&mut self, n: u32) -> u32 {
        if n == 0 {
            return 0;
        }
        let value = (self.buffer >> (64 - n)) as u32;
        self.buffer <<= n;
        self.count -= n;
        value
    }

    /// The next `LOOKUP_BITS` bits, without taking them.
    fn peek_lookup_bits(&self) -> usize {
        (self.buffer >> (64 - LOOKUP_BITS)) as usize
    }

    /// The next Huffman-coded symbol.
    fn symbol(&mut self, table: &Huffman) -> Parse<u8> {
        let peek = (self.buffer >> 48) as u32;
        let entry = table.lookup[self.peek_lookup_bits()];
        if entry != 0 {
            self.bits((entry >> 8) as u32);
            return Ok(entry as u8);
        }
        for length in LOOKUP_BITS + 1..=16 {
            let code = (peek >> (16 - length)) as i32;
            if code <= table.max_code[length as usize] {
                self.bits(length);
                let index = (code + table.value_offset[length as usize]) as usize;
                return Ok(table.symbols[index]);
            }
        }
        corrupt(format!("an invalid Huffman code near byte {}", self.pos))
    }

    /// Fails when the scan has read past its data.
    fn check_overrun(&self) -> Parse<()> {
        if self.count < self.padding {
            let what = if self.pos >= self.data.len() {
                "the file ends"
            } else {
                "a marker comes"
            };
            return corrupt(format!(
                "{what} at byte {} before the scan's data does",
                self.pos
            ));
        }
        Ok(())
    }

    /// Moves past the restart marker RSTn (`n` = `number`) that ends an interval.
    fn restart(&mut self, number: u8) -> Parse<()> {
        let Some(at) = next_marker(self.data, self.pos) else {
            return corrupt(format!("the file ends before restart marker RST{number}"));
        };
        let marker = self.data[at + 1];
        if marker != 0xD0 + number {
            return corrupt(format!(
                "marker 0x{marker:02X} at byte {at} where RST{number} should be"
            ));
        }
        *self = BitReader::new(self.data, at + 2);
        Ok(())
    }
}

/// Codes up to this length are decoded by one table look-up.
const LOOKUP_BITS: u32 = 9;

/// A Huffman table (JPEG Annex C canonical codes).
struct Huffman {
    /// By the next `LOOKUP_BITS` bits: `length << 8 | symbol`, or 0 for a longer code.
    lookup: [u16; 1 << LOOKUP_BITS],
    /// For AC tables, by the next `LOOKUP_BITS` bits when they hold a whole nonzero
    /// coefficient, code and value: `value << 16 | run << 8 | bits taken`; else 0.
    fast_ac: [i32; 1 << LOOKUP_BITS],
    /// The largest code of each length (-1 when none).
    max_code: [i32; 17],
    /// Index into `symbols` of a code of each length, less that code.
    value_offset: [i32; 17],
    symbols: [u8; 256],
}

impl Huffman {
    fn new(counts: &[u8; 16], symbols: &[u8]) -> Parse<Huffman> {
        let mut table = Huffman {
            lookup: [0; 1 << LOOKUP_BITS],
            fast_ac: [0; 1 << LOOKUP_BITS],
            max_code: [-1; 17],
            value_offset: [0; 17],
            symbols: [0; 256],
        };
        table.symbols[..symbols.len()].copy_from_slice(symbols);
        let (mut code, mut index) = (0i32, 0usize);
        for length in 1..=16u32 {
            let count = counts[length as usize - 1] as usize;
            table.value_offset[length as usize] = index as i32 - code;
            for _ in 0..count {
                // no code may be all ones (jdhuff.c's check), so none overflows its length
                if code + 1 >= 1 << length {
                    return corrupt("a Huffman table whose code lengths overflow");
                }
                if length <= LOOKUP_BITS {
                    let shift = LOOKUP_BITS - length;
                    let first = (code as usize) << shift;
                    let entry = (length as u16) << 8 | symbols[index] as u16;
                    table.lookup[first..first + (1 << shift)].fill(entry);
                }
                code += 1;
                index += 1;
            }
            if count > 0 {
                table.max_code[length as usize] = code - 1;
            }
            code <<= 1;
        }
        for (bits, &entry) in table.lookup.iter().enumerate() {
            let (length, run_size) = ((entry >> 8) as u32, entry & 0xFF);
            let (run, size) = ((run_size >> 4) as i32, (run_size & 15) as u32);
            if entry != 0 && size != 0 && length + size <= LOOKUP_BITS {
                let field = (bits as u32 >> (LOOKUP_BITS - length - size)) & ((1 << size) - 1);
                let value = extend(field, size);
                table.fast_ac[bits] = value << 16 | run << 8 | (length + size) as i32;
            }
        }
        Ok(table)
    }
}

/// libjpeg's post-IDCT range limit: the 10 low bits of an output, less 128 .. 895, mapped to
/// a sample (wrapping, as libjpeg's table does, rather than clamping outliers).
const RANGE_LIMIT: [u8; 1024] = {
    let mut table = [0u8; 1024];
    let mut x = 0;
    while x < 1024 {
        table[x] = if x < 128 {
            (x + 128) as u8
        } else if x < 512 {
            255
        } else if x < 896 {
            0
        } else {
            (x - 896) as u8
        };
        x += 1;
    }
    table
};

fn range_limit(x: i64) -> u8 {
    RANGE_LIMIT[(x & 1023) as usize]
}

/// One 1-D pass of jidctint.c's `jpeg_idct_islow` over `s`, descaled by `shift` bits.
fn islow_pass(s: [i64; 8], shift: u32) -> [i64; 8] {
    let z1 = (s[2] + s[6]) * 4433;
    let tmp2 = z1 - s[6] * 15137;
    let tmp3 = z1 + s[2] * 6270;
    let tmp0 = (s[0] + s[4]) << 13;
    let tmp1 = (s[0] - s[4]) << 13;
    let (t10, t13, t11, t12) = (tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2);
    let (a0, a1, a2, a3) = (s[7], s[5], s[3], s[1]);
    let z5 = (a0 + a2 + a1 + a3) * 9633;
    let z1 = (a0 + a3) * -7373;
    let z2 = (a1 + a2) * -20995;
    let z3 = (a0 + a2) * -16069 + z5;
    let z4 = (a1 + a3) * -3196 + z5;
    let b0 = a0 * 2446 + z1 + z3;
    let b1 = a1 * 16819 + z2 + z4;
    let b2 = a2 * 25172 + z2 + z3;
    let b3 = a3 * 12299 + z1 + z4;
    let round = 1 << (shift - 1);
    [
        t10 + b3,
        t11 + b2,
        t12 + b1,
        t13 + b0,
        t13 - b0,
        t12 - b1,
        t11 - b2,
        t10 - b3,
    ]
    .map(|v| (v + round) >> shift)
}

/// `jpeg_idct_islow` of dequantised coefficients (natural order) into an 8x8 block of `out`
/// (rows `stride` apart). Columns and rows whose AC terms are zero take libjpeg's shortcuts,
/// which give the same values as the full passes.
fn idct_islow(coefficients: &[i32; 64], dc_only: bool, out: &mut [u8], stride: usize) {
    if dc_only {
        // the column pass gives DC << 2 everywhere (kept in an int, as libjpeg's workspace)
        let column = ((coefficients[0] as i64) << 2) as i32 as i64;
        let value = range_limit((column + 16) >> 5);
        for row in out.chunks_mut(stride).take(8) {
            row[..8].fill(value);
        }
        return;
    }
    // column pass; libjpeg's workspace holds ints
    let mut workspace = [0i32; 64];
    for x in 0..8 {
        let column: [i64; 8] = std::array::from_fn(|y| coefficients[y * 8 + x] as i64);
        let result = if column[1..].iter().all(|&v| v == 0) {
            [column[0] << 2; 8]
        } else {
            islow_pass(column, 11)
        };
        for (y, v) in result.into_iter().enumerate() {
            workspace[y * 8 + x] = v as i32;
        }
    }
    for (row_in, row_out) in workspace.chunks_exact(8).zip(out.chunks_mut(stride)) {
        let row: [i64; 8] = std::array::from_fn(|x| row_in[x] as i64);
        let result = if row[1..].iter().all(|&v| v == 0) {
            [(row[0] + 16) >> 5; 8]
        } else {
            islow_pass(row, 18)
        };
        for (o, v) in row_out[..8].iter_mut().zip(result) {
            *o = range_limit(v);
        }
    }
}

/// A component's samples brought to the frame's size as libjpeg-turbo's jdsample.c does by
/// default: "fancy" (triangle) upsampling of the real samples, edge samples repeated, for
/// halved components; replication when a horizontally halved component is at most 2 samples
/// wide (libjpeg's `downsampled_width > 2` test).
fn upsample(frame: &Frame, c: &Component) -> Vec<u8> {
    let (width, height) = (frame.width, frame.height);
    let (samples_wide, samples_high) = frame.samples_size(c);
    let (h2, v2) = (c.h < frame.h_max, c.v < frame.v_max);
    let stride = c.blocks_wide * 8;
    let row = |y: usize| &c.samples[y * stride..y * stride + samples_wide];
    let mut out = vec![0u8; width * height];
    let mut column_sums = vec![0u16; samples_wide];
    for (y, out_row) in out.chunks_exact_mut(width).enumerate() {
        // the nearest source row and the next nearest (above for even rows, below for odd)
        let (near, far, odd_row) = if v2 {
            let near = y / 2;
            let far = if y % 2 == 0 {
                near.saturating_sub(1)
            } else {
                (near + 1).min(samples_high - 1)
            };
            (near, far, y % 2 == 1)
        } else {
            (y, y, false)
        };
        if h2 && samples_wide <= 2 {
            let src = row(near);
            for (x, o) in out_row.iter_mut().enumerate() {
                *o = src[x / 2];
            }
            continue;
        }
        match (h2, v2) {
            (false, false) => out_row.copy_from_slice(&row(y)[..width]),
            (false, true) => {
                let bias = if odd_row { 2 } else { 1 };
                for ((o, &n), &f) in out_row.iter_mut().zip(row(near)).zip(row(far)) {
                    *o = ((3 * n as u16 + f as u16 + bias) >> 2) as u8;
                }
            }
            (true, false) => {
                let src = row(near);
                for (x, o) in out_row.iter_mut().enumerate() {
                    let (i, odd) = (x / 2, x % 2 == 1);
                    let neighbour = if odd {
                        (i + 1).min(samples_wide - 1)
                    } else {
                        i.saturating_sub(1)
                    };
                    let bias = if odd { 2 } else { 1 };
                    *o = ((3 * src[i] as u16 + src[neighbour] as u16 + bias) >> 2) as u8;
                }
            }
            (true, true) => {
                for ((sum, &n), &f) in column_sums.iter_mut().zip(row(near)).zip(row(far)) {
                    *sum = 3 * n as u16 + f as u16;
                }
                for (x, o) in out_row.iter_mut().enumerate() {
                    let (i, odd) = (x / 2, x % 2 == 1);
                    let neighbour = if odd {
                        (i + 1).min(samples_wide - 1)
                    } else {
                        i.saturating_sub(1)
                    };
                    let bias = if odd { 7 } else { 8 };
                    *o = ((3 * column_sums[i] + column_sums[neighbour] + bias) >> 4) as u8;
                }
            }
        }
    }
    out
}

/// jdcolor.c's YCbCr->RGB tables: `FIX(x)` is `x` in 16-bit fixed point, rounded.
struct ColourTables {
    cr_r: [i32; 256],
    cb_b: [i32; 256],
    cr_g: [i32; 256],
    cb_g: [i32; 256],
}

const COLOUR: ColourTables = {
    const HALF: i32 = 1 << 15;
    let mut t = ColourTables {
        cr_r: [0; 256],
        cb_b: [0; 256],
        cr_g: [0; 256],
        cb_g: [0; 256],
    };
    let mut i = 0;
    while i < 256 {
        let x = i as i32 - 128;
        t.cr_r[i] = (91881 * x + HALF) >> 16; // FIX(1.40200)
        t.cb_b[i] = (116130 * x + HALF) >> 16; // FIX(1.77200)
        t.cr_g[i] = -46802 * x; // -FIX(0.71414)
        t.cb_g[i] = -22554 * x + HALF; // -FIX(0.34414), with the rounding half
        i += 1;
    }
    t
};

/// Interleaved RGB from full-size Y, Cb and Cr planes (jdcolor.c `ycc_rgb_convert`).
fn ycbcr_to_rgb(y: &[u8], cb: &[u8], cr: &[u8]) -> Vec<u8> {
    let clamp = |v: i32| v.clamp(0, 255) as u8;
    let mut rgb = vec![0u8; y.len() * 3];
    for (((px, &y), &cb), &cr) in rgb.chunks_exact_mut(3).zip(y).zip(cb).zip(cr) {
        let (y, cb, cr) = (y as i32, cb as usize, cr as usize);
        px[0] = clamp(y + COLOUR.cr_r[cr]);
        px[1] = clamp(y + ((COLOUR.cb_g[cb] + COLOUR.cr_g[cr]) >> 16));
        px[2] = clamp(y + COLOUR.cb_b[cb]);
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libjpeg's column-then-row islow IDCT in i64 throughout, without shortcuts.
    fn reference_idct(coefficients: &[i32; 64]) -> [u8; 64] {
        let mut workspace = [[0i64; 8]; 8];
        for x in 0..8 {
            let column = std::array::from_fn(|y| coefficients[y * 8 + x] as i64);
            for (y, v) in islow_pass(column, 11).into_iter().enumerate() {
                workspace[y][x] = v as i32 as i64; // libjpeg's workspace holds ints
            }
        }
        let mut out = [0u8; 64];
        for (y, row) in workspace.iter().enumerate() {
            for (x, v) in islow_pass(*row, 18).into_iter().enumerate() {
                out[y * 8 + x] = range_limit(v);
            }
        }
        out
    }

    /// The IDCT with libjpeg's shortcuts (DC-only blocks, columns and rows without AC terms)
    /// gives the reference's samples, on random blocks from sparse and small to dense and
    /// large (the range-limit table wraps those as libjpeg's does).
    #[test]
    fn idct_shortcuts_give_the_full_passes_samples() {
        let seed = crate::test_seed("idct_shortcuts_give_the_full_passes_samples");
        let mut state = seed | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut dc_only_blocks = 0;
        for case in 0..6000 {
            let magnitude = [300u64, 2000, 8191, 40000, 1 << 30][case % 5];
            let density = [64, 8, 2][case % 3];
            let mut coefficients = [0i32; 64];
            for (i, c) in coefficients.iter_mut().enumerate() {
                if i == 0 || next() % 64 < density {
                    *c = (next() % (2 * magnitude + 1)) as i32 - magnitude as i32;
                }
            }
            let dc_only = coefficients[1..].iter().all(|&c| c == 0);
            let mut got = [0u8; 64];
            idct_islow(&coefficients, dc_only, &mut got, 8);
            assert_eq!(got, reference_idct(&coefficients), "{coefficients:?}");
            dc_only_blocks += dc_only as usize;
        }
        assert!(dc_only_blocks > 100, "{dc_only_blocks} DC-only blocks");
    }
}
