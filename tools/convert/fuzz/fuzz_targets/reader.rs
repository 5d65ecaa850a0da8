//! Any byte string: the reader returns a result or an error, never panics, and never
//! produces more tensor bytes than four times the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = convert::convert_bytes(data, "fuzz.pth", &convert::Options::default()) {
        let bytes: usize = c.tensors.iter().map(|t| t.data.len()).sum();
        assert!(bytes <= 4 * data.len());
    }
});
