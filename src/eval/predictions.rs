//! The predictions of an evaluation as CSV: one line per query and rank.

use crate::error::{Error, Result};
use crate::eval::dataset::EvalDataset;
use crate::eval::recall::Predictions;
use crate::io::AtomicFile;
use std::borrow::Cow;
use std::path::Path;

/// Writes `path` (a temporary file renamed into place when complete): the header
/// `query,rank,prediction,distance,positive`, then one line per query and rank, best first:
/// the query's path, the rank from 1, the predicted database image's path, the squared L2
/// distance (Rust's shortest round-trip f32 text) and `true` or `false` for whether the
/// prediction is among the query's positives (lists sorted ascending). Fields that hold a comma,
/// a quote or a line break are quoted (RFC 4180); lines end with `\n`.
pub fn write_csv(
    path: &Path,
    dataset: &EvalDataset,
    predictions: &Predictions,
    positives: &[Vec<usize>],
) -> Result<()> {
    predictions.check()?;
    let queries = dataset.queries.len();
    if predictions.queries() != queries || positives.len() != queries {
        return Err(Error::Argument(format!(
            "{}: {queries} queries, but predictions for {} and positives for {}",
            path.display(),
            predictions.queries(),
            positives.len()
        )));
    }
    if let Some(&index) = predictions
        .indices
        .iter()
        .find(|&&i| i >= dataset.database.len())
    {
        return Err(Error::Argument(format!(
            "{}: prediction {index} is past the {} database images",
            path.display(),
            dataset.database.len()
        )));
    }
    let mut file = AtomicFile::create(path)?;
    file.write_bytes(b"query,rank,prediction,distance,positive\n")?;
    let mut lines = String::new();
    for (q, query) in dataset.queries.iter().enumerate() {
        let query = csv_field(utf8(query)?);
        lines.clear();
        let ranked = predictions.row(q).iter().zip(predictions.distances_of(q));
        for (rank, (&index, distance)) in ranked.enumerate() {
            let prediction = csv_field(utf8(&dataset.database[index])?);
            let positive = positives[q].binary_search(&index).is_ok();
            lines.push_str(&format!(
                "{query},{},{prediction},{distance},{positive}\n",
                rank + 1
            ));
        }
        file.write_bytes(lines.as_bytes())?;
    }
    file.commit()
}

/// The text of a path, which must be UTF-8 to be written as it is.
fn utf8(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| {
        Error::Argument(format!(
            "{}: the path is not UTF-8, so it cannot be written to the CSV as it is",
            path.display()
        ))
    })
}

/// `text` as a CSV field: quoted, with its quotes doubled, when it holds a comma, a quote or a
/// line break.
fn csv_field(text: &str) -> Cow<'_, str> {
    if text.contains([',', '"', '\n', '\r']) {
        Cow::Owned(format!("\"{}\"", text.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::csv_field;

    #[test]
    fn fields_are_quoted_only_when_they_must_be() {
        assert_eq!(csv_field("db/@1@2@.jpg"), "db/@1@2@.jpg");
        assert_eq!(csv_field("a b;c'd"), "a b;c'd");
        assert_eq!(csv_field("db/a,b.jpg"), "\"db/a,b.jpg\"");
        assert_eq!(csv_field("db/say \"hi\".jpg"), "\"db/say \"\"hi\"\".jpg\"");
        assert_eq!(csv_field("db/two\nlines.jpg"), "\"db/two\nlines.jpg\"");
        assert_eq!(csv_field("db/cr\r.jpg"), "\"db/cr\r.jpg\"");
        assert_eq!(csv_field("\""), "\"\"\"\"");
    }
}
