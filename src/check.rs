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
    let (got, want) = match (got, want) {
        (Ok(g), Ok(w)) => (g, w),
        (Err(e), _) => {
            row.error = Some(format!("device: {e}"));
            return row;
        }
        (_, Err(e)) => {
            row.error = Some(format!("cpu: {e}"));
            return row;
        }
    };
    // the same elements in another arrangement would compare equal element by element
    if got.shape() != want.shape() {
        row.error = Some(format!(
            "device result has shape {:?}, the CPU result {:?}",
            got.shape(),
            want.shape()
        ));
        return row;
    }
    match (got.to_f64_vec(), want.to_f64_vec()) {
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
    ("norm", crate::ops::norm::conformance),
    ("interpolate", crate::ops::interpolate::conformance),
    ("conv", crate::ops::conv::conformance),
    ("pool", crate::ops::pool::conformance),
    ("knn", crate::ops::knn::conformance),
    ("mnn", crate::ops::mnn::conformance),
    ("loss", crate::ops::loss::conformance),
    ("attention", crate::ops::attention::conformance),
    ("augment", crate::ops::augment::conformance),
    ("optim", crate::train::optim::conformance),
];

/// Every conformance case on `device`, inputs drawn from `seed`.
pub fn run(device: &Device, seed: u64) -> Vec<CheckRow> {
    run_families(FAMILIES, device, seed)
}

/// The rows of `families`; a family that fails to set up, or that checks nothing, is a failed row.
fn run_families(families: &[(&str, Family)], device: &Device, seed: u64) -> Vec<CheckRow> {
    let mut rows = Vec::new();
    for (family, cases) in families {
        let error = match cases(device, seed) {
            Ok(r) if r.is_empty() => "the family checked nothing (no rows)".to_string(),
            Ok(r) => {
                rows.extend(r);
                continue;
            }
            Err(e) => e.to_string(),
        };
        rows.push(CheckRow {
            kernel: format!("{family} (set-up)"),
            dtype: DType::F32,
            shape: String::new(),
            max_err: f64::NAN,
            tol: 0.0,
            error: Some(error),
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(shape: &[usize], values: &[f32]) -> Result<Tensor> {
        Tensor::from_slice(values, shape, &Device::Cpu)
    }

    #[test]
    fn equal_results_pass() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let row = compare(
            "k",
            DType::F32,
            &[2, 3],
            cpu(&[2, 3], &v),
            cpu(&[2, 3], &v),
            0.0,
        );
        assert!(row.passed(), "{:?}", row.error);
        assert_eq!(row.max_err, 0.0);
    }

    #[test]
    fn a_result_of_another_shape_fails_even_with_the_same_elements() {
        let v = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let row = compare(
            "k",
            DType::F32,
            &[2, 3],
            cpu(&[3, 2], &v),
            cpu(&[2, 3], &v),
            0.0,
        );
        assert!(!row.passed());
        let message = row.error.unwrap();
        assert!(
            message.contains("[3, 2]") && message.contains("[2, 3]"),
            "{message}"
        );
    }

    #[test]
    fn a_family_without_rows_is_a_failed_row() {
        let nothing: Family = |_, _| Ok(Vec::new());
        let rows = run_families(&[("empty", nothing)], &Device::Cpu, 1);
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].passed());
        assert_eq!(rows[0].kernel, "empty (set-up)");
    }

    #[test]
    fn errors_and_nans_fail_the_row() {
        let v = [1.0, 2.0];
        let bad = || Err(crate::error::Error::Argument("no kernel".into()));
        let row = compare("k", DType::F32, &[2], bad(), cpu(&[2], &v), 0.0);
        assert!(row.error.unwrap().starts_with("device: "));
        let row = compare("k", DType::F32, &[2], cpu(&[2], &v), bad(), 0.0);
        assert!(row.error.unwrap().starts_with("cpu: "));
        let row = compare(
            "k",
            DType::F32,
            &[2],
            cpu(&[2], &[1.0, f32::NAN]),
            cpu(&[2], &v),
            1.0,
        );
        assert!(!row.passed() && row.error.is_some());
    }
}
