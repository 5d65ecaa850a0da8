//! A fuzz-style test on stable Rust: random truncations, byte flips, extreme integers and
//! chunk edits of every fixture. The reader must return an error or a valid result, never
//! panic, finish quickly, and never produce more tensor bytes than the file holds (so a
//! hostile file cannot make it allocate without bound). The seed is printed; rerun one with
//! `CONVERT_FUZZ_SEED=<seed> cargo test -p convert --test mutate`. `CONVERT_FUZZ_CASES`
//! sets the number of mutations per fixture (default 24).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant, SystemTime};

use convert::{convert_bytes, Options};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A position biased towards the structure (pickle at the front, zip directory at the
/// back), where a flip is most likely to reach a new code path.
fn position(rng: &mut Rng, len: usize) -> usize {
    match rng.below(3) {
        0 => rng.below(len.min(4096)),
        1 => len - 1 - rng.below(len.min(2048)),
        _ => rng.below(len),
    }
}

fn mutate(rng: &mut Rng, data: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    for _ in 0..=rng.below(3) {
        if d.is_empty() {
            break;
        }
        let len = d.len();
        match rng.below(5) {
            0 => d.truncate(rng.below(len)),
            1 => {
                for _ in 0..=rng.below(8) {
                    let p = position(rng, len);
                    d[p] ^= 1 << rng.below(8);
                }
            }
            2 => {
                let vals: [u64; 6] = [
                    0,
                    u32::MAX as u64,
                    i32::MAX as u64,
                    1 << 31,
                    1 << 40,
                    u64::MAX,
                ];
                let v = vals[rng.below(vals.len())].to_le_bytes();
                let w = [1, 2, 4, 8][rng.below(4)];
                let p = position(rng, len).min(len.saturating_sub(w));
                let end = (p + w).min(len);
                d[p..end].copy_from_slice(&v[..end - p]);
            }
            3 => {
                let p = position(rng, len);
                let n = rng.below(64).min(len - p);
                d.drain(p..p + n);
            }
            _ => {
                let p = position(rng, len);
                let n = rng.below(64).min(len - p);
                let chunk: Vec<u8> = d[p..p + n].to_vec();
                let at = position(rng, len);
                d.splice(at..at, chunk);
            }
        }
    }
    d
}

#[test]
fn mutated_fixtures_never_panic_hang_or_blow_up() {
    let seed = std::env::var("CONVERT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let cases: usize = std::env::var("CONVERT_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    println!("CONVERT_FUZZ_SEED={seed}");
    let mut rng = Rng(seed);
    let mut files = common::good_checkpoints();
    files.push(common::fixtures().join("hostile_in_state_dict.zip.pth"));
    files.push(common::fixtures().join("hostile_in_state_dict.legacy.pth"));
    let (mut ok, mut refused) = (0, 0);
    for path in files {
        let original = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        for case in 0..cases {
            let data = mutate(&mut rng, &original);
            let start = Instant::now();
            let result = catch_unwind(AssertUnwindSafe(|| {
                convert_bytes(&data, &name, &Options::default())
                    .map(|c| c.tensors.iter().map(|t| t.data.len()).sum::<usize>())
            }));
            let took = start.elapsed();
            match result {
                Err(_) => panic!("panic on {name} case {case} (CONVERT_FUZZ_SEED={seed})"),
                Ok(Ok(bytes)) => {
                    assert!(
                        bytes <= 4 * data.len(),
                        "{name} case {case}: {bytes} tensor bytes from a {}-byte file",
                        data.len()
                    );
                    ok += 1;
                }
                Ok(Err(e)) => {
                    assert!(
                        !e.0.contains('\n'),
                        "{name} case {case}: multi-line error {e}"
                    );
                    refused += 1;
                }
            }
            assert!(
                took < Duration::from_secs(2),
                "{name} case {case} took {took:?} (CONVERT_FUZZ_SEED={seed})"
            );
        }
    }
    println!("{ok} mutants converted, {refused} refused");
}
