//! Conformance: every kernel run on random inputs against the CPU implementation. `vpr-engine check`
//! prints the table; the test suite runs the same cases on the virtual GPU. Each op family adds its
//! cases in its own `conformance` function.

use crate::device::Device;
use crate::dtype::DType;
use crate::error::Result;
use crate::tensor::Tensor;

pub struct CheckRow {
    pub kernel: String,
    pub dtype: DType,
    pub shape: String,
    /// Largest `|got - want| / max(|want|, 1)` over the elements.
    pub max_err: f64,
    pub tol: f64,
    /// Set when the case could not run or produced NaN where the reference has none.
    pub error: Option<String>,
}

impl CheckRow {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.max_err <= self.tol
    }
}

/// The error measure of the conformance table: `|got - want| / max(|want|, 1)`, NaN where exactly
/// one side is NaN (so unwritten, poisoned outputs fail).
pub fn max_error(got: &[f64], want: &[f64]) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    got.iter().zip(want).fold(0.0, |m: f64, (&g, &w)| {
        if g.is_nan() || w.is_nan() {
            return if g.is_nan() && w.is_nan() {
                m
            } else {
                f64::NAN
            };
        }
        if g == w {
            return m; // also equal infinities
        }
        let e = (g - w).abs() / w.abs().max(1.0);
        if e.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(e)
        }
    })
}

/// A table row comparing a device result with the CPU result.
pub fn compare(
    kernel: &str,
    dtype: DType,
    shape: &[usize],
    got: Result<Tensor>,
    want: Result<Tensor>,
    tol: f64,
) -> CheckRow {
    let mut row = CheckRow {
        kernel: kernel.to_string(),
        dtype,
        shape: format!("{shape:?}"),
        max_err: f64::NAN,
        tol,
        error: None,
    };
    match (
        got.and_then(|g| g.to_f64_vec()),
        want.and_then(|w| w.to_f64_vec()),
    ) {
        (Ok(g), Ok(w)) => {
            row.max_err = max_error(&g, &w);
            if row.max_err.is_nan() {
                row.error =
                    Some("NaN where the CPU result has a number (unwritten output?)".into());
            }
        }
        (Err(e), _) => row.error = Some(format!("device: {e}")),
        (_, Err(e)) => row.error = Some(format!("cpu: {e}")),
    }
    row
}

/// Both results of a fallible pair (an op with two outputs), or its error for each, so each output
/// gets its own conformance row.
pub(crate) fn split_pair(r: Result<(Tensor, Tensor)>) -> (Result<Tensor>, Result<Tensor>) {
    match r {
        Ok((a, b)) => (Ok(a), Ok(b)),
        Err(e) => (Err(crate::error::Error::Argument(e.to_string())), Err(e)),
    }
}

/// The conformance function of each op family.
type Family = fn(&Device, u64) -> Result<Vec<CheckRow>>;
const FAMILIES: &[(&str, Family)] = &[
    ("copy", crate::ops::copy::conformance),
    ("elementwise", crate::ops::elementwise::conformance),
    ("matmul", crate::ops::matmul::conformance),
    ("reduce", crate::ops::reduce::conformance),
    ("softmax", crate::ops::softmax::conformance),
    ("conv", crate::ops::conv::conformance),
    ("pool", crate::ops::pool::conformance),
    ("loss", crate::ops::loss::conformance),
    ("optim", crate::train::optim::conformance),
];

/// Every conformance case on `device`, inputs drawn from `seed`.
pub fn run(device: &Device, seed: u64) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for (family, cases) in FAMILIES {
        match cases(device, seed) {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push(CheckRow {
                kernel: format!("{family} (set-up)"),
                dtype: DType::F32,
                shape: String::new(),
                max_err: f64::NAN,
                tol: 0.0,
                error: Some(e.to_string()),
            }),
        }
    }
    rows
}
