//! What the benches that compare against PyTorch share: choosing their parts, timing our side,
//! running their Python side.

use std::process::Command;
use std::time::Instant;

/// Median milliseconds of `steps` calls of `f`, after `warmups` untimed calls.
#[allow(dead_code)] // not every bench that includes this module times closures
pub fn median_ms(warmups: usize, steps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmups {
        f();
    }
    let mut times: Vec<f64> = (0..steps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[steps / 2]
}

/// The Python with torch the benches run (`VPR_BENCH_PYTHON`, default `python3`).
pub fn python() -> String {
    std::env::var("VPR_BENCH_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Runs `benches/<script>` with `args` and returns the comma-separated numbers it prints after
/// `key=`, or the last line of its standard error.
pub fn python_numbers(script: &str, args: &[String], key: &str) -> Result<Vec<f64>, String> {
    let path = format!("{}/benches/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python())
        .arg(path)
        .args(args)
        .output()
        .map_err(|e| format!("{}: {e}", python()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let values = l.strip_prefix(key)?.strip_prefix('=')?;
            values.split(',').map(|v| v.parse().ok()).collect()
        })
        .ok_or_else(|| {
            let err = String::from_utf8_lossy(&out.stderr);
            err.lines().last().unwrap_or("no output").to_string()
        })
}

/// Whether the command line asks for bench part `part`: every part when it names none
/// (`cargo bench --bench vit`), else the named ones (`-- cpu`); flags cargo passes are ignored.
pub fn wants(part: &str) -> bool {
    let named: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    named.is_empty() || named.iter().any(|w| w == part)
}
