//! `cargo bench --bench jpeg`: decoding speed of our PIL-exact JPEG decoder (`io::jpeg`) against
//! the `image` crate's (zune-jpeg), both to interleaved 8-bit RGB, on photo-like baseline JPEGs
//! the image crate's encoder writes (quality 90, 4:4:4) at typical dataset sizes. Times are medians of
//! several runs after warm-up, on one thread.

use image::codecs::jpeg::JpegEncoder;
use image::{ExtendedColorType, ImageEncoder};
use std::time::Instant;
use vpr_engine::io::jpeg;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `runs` calls of `f` after `warmup` calls.
fn time(warmup: usize, runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

/// Gradients, a sine pattern, hard edges and a little deterministic noise, RGB `[h, w, 3]`.
fn photo(height: usize, width: usize) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 13) as f64 - 6.0
    };
    let mut pixels = Vec::with_capacity(height * width * 3);
    for y in 0..height {
        for x in 0..width {
            let shade = if (x / 9 + y / 7) % 2 == 0 { 0.6 } else { 1.0 };
            let base = [
                x as f64 * 255.0 / width as f64,
                y as f64 * 255.0 / height as f64,
                128.0 + 100.0 * (x as f64 / 3.0).sin() * (y as f64 / 5.0).cos(),
            ];
            pixels.extend(base.map(|v| (v * shade + noise()).clamp(0.0, 255.0) as u8));
        }
    }
    pixels
}

fn main() {
    println!(
        "{:>10} {:>9} {:>12} {:>12}",
        "size", "bytes", "io::jpeg", "image crate"
    );
    for (height, width) in [(512, 512), (480, 640), (1080, 1920)] {
        let mut file = Vec::new();
        JpegEncoder::new_with_quality(&mut file, 90)
            .write_image(
                &photo(height, width),
                width as u32,
                height as u32,
                ExtendedColorType::Rgb8,
            )
            .unwrap();
        let ours = time(3, 15, || {
            std::hint::black_box(jpeg::decode(&file).unwrap());
        });
        let theirs = time(3, 15, || {
            std::hint::black_box(image::load_from_memory(&file).unwrap().to_rgb8());
        });
        println!(
            "{:>10} {:>9} {:>9.2} ms {:>9.2} ms",
            format!("{width}x{height}"),
            file.len(),
            ours * 1e3,
            theirs * 1e3
        );
    }
}
