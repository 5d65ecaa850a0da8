//! Recall@N with the protocol of the VPR community's evaluation tools: a query is found at N
//! when any of its first N predictions is a positive, and every query counts in the
//! denominator, with or without positives.

use crate::error::{Error, Result};

/// Each query's top-k database indices, best first, row-major `[queries, k]`, and their squared
/// L2 distances.
#[derive(Clone, Debug, PartialEq)]
pub struct Predictions {
    pub k: usize,
    pub indices: Vec<usize>,
    pub distances: Vec<f32>,
}

impl Predictions {
    /// Predictions with their lengths checked: `k >= 1`, and `indices` and `distances` both
    /// hold `k` entries per query.
    pub fn new(k: usize, indices: Vec<usize>, distances: Vec<f32>) -> Result<Predictions> {
        let predictions = Predictions {
            k,
            indices,
            distances,
        };
        predictions.check()?;
        Ok(predictions)
    }

    /// The number of queries (rows).
    pub fn queries(&self) -> usize {
        self.indices.len().checked_div(self.k).unwrap_or(0)
    }

    /// The database indices predicted for query `q`, best first (panics if `q >= queries()`).
    pub fn row(&self, q: usize) -> &[usize] {
        &self.indices[q * self.k..(q + 1) * self.k]
    }

    /// The squared L2 distances of `row(q)`.
    pub fn distances_of(&self, q: usize) -> &[f32] {
        &self.distances[q * self.k..(q + 1) * self.k]
    }

    /// An `Error::Argument` unless `k >= 1` and both lists are whole rows of `k`.
    pub fn check(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::Argument(
                "predictions: k must be at least 1".to_string(),
            ));
        }
        if self.indices.len() % self.k != 0 || self.distances.len() != self.indices.len() {
            return Err(Error::Argument(format!(
                "predictions: {} indices and {} distances are not rows of k = {}",
                self.indices.len(),
                self.distances.len(),
                self.k
            )));
        }
        Ok(())
    }
}

/// Checks that the predictions have a row for each of the (one or more) queries of `positives`.
fn check_queries(predictions: &Predictions, positives: &[Vec<usize>]) -> Result<usize> {
    predictions.check()?;
    let queries = predictions.queries();
    if queries != positives.len() {
        return Err(Error::Argument(format!(
            "predictions for {queries} queries but positives for {}",
            positives.len()
        )));
    }
    if queries == 0 {
        return Err(Error::Argument(
            "no queries: recall is undefined".to_string(),
        ));
    }
    Ok(queries)
}

/// For each query, the 0-based rank of its first prediction that is a positive, if any.
fn first_hits<'a>(
    predictions: &'a Predictions,
    positives: &'a [Vec<usize>],
) -> impl Iterator<Item = Option<usize>> + 'a {
    positives.iter().enumerate().map(|(q, positive)| {
        predictions
            .row(q)
            .iter()
            .position(|index| positive.binary_search(index).is_ok())
    })
}

/// `count / queries * 100` in f64, in numpy's order, so values print as the Python tools print
/// them.
fn percent(count: usize, queries: usize) -> f64 {
    count as f64 / queries as f64 * 100.0
}

/// Recall@N in percent for each N of `ns`: a query counts at N when any of its first N
/// predictions is one of its positives (each list sorted ascending); the denominator is every
/// query (queries without positives count as misses). Each N must be between 1 and k.
pub fn recalls(
    predictions: &Predictions,
    positives: &[Vec<usize>],
    ns: &[usize],
) -> Result<Vec<f64>> {
    let queries = check_queries(predictions, positives)?;
    if ns.is_empty() {
        return Err(Error::Argument("no recall values N given".to_string()));
    }
    if let Some(&n) = ns.iter().find(|&&n| n == 0 || n > predictions.k) {
        return Err(Error::Argument(format!(
            "recall value N = {n}: must be between 1 and the number of predictions per query, k = {}",
            predictions.k
        )));
    }
    let hits: Vec<Option<usize>> = first_hits(predictions, positives).collect();
    Ok(ns
        .iter()
        .map(|&n| {
            let found = hits
                .iter()
                .filter(|hit| hit.is_some_and(|rank| rank < n))
                .count();
            percent(found, queries)
        })
        .collect())
}

/// `R@1: 98.8, R@5: 99.7, ...`: each N with its value to one decimal, as Python's
/// `f"{x:.1f}"` writes it (Rust's `{:.1}` rounds the exact binary value half to even too).
/// Pairs `ns` and `values` as Python's `zip` does.
pub fn format_recalls(ns: &[usize], values: &[f64]) -> String {
    ns.iter()
        .zip(values)
        .map(|(n, value)| format!("R@{n}: {value:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Recall in percent at every N = 1..=k (for the Recall@N curve).
pub fn recall_curve(predictions: &Predictions, positives: &[Vec<usize>]) -> Result<Vec<f64>> {
    let queries = check_queries(predictions, positives)?;
    let mut first_hit_at = vec![0usize; predictions.k];
    for rank in first_hits(predictions, positives).flatten() {
        first_hit_at[rank] += 1;
    }
    let mut found = 0;
    Ok(first_hit_at
        .iter()
        .map(|&hits| {
            found += hits;
            percent(found, queries)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Five queries, k = 4: hits at ranks 1, 3 and 4, a query whose positives are never
    /// predicted and one without positives.
    fn example() -> (Predictions, Vec<Vec<usize>>) {
        #[rustfmt::skip]
        let indices = vec![
            7, 1, 2, 3,
            4, 5, 9, 8,
            0, 1, 2, 6,
            3, 4, 5, 0,
            1, 2, 3, 4,
        ];
        let distances = (0..20).map(|i| i as f32 * 0.5).collect();
        let positives = vec![vec![2, 7], vec![9], vec![6, 11], vec![8], vec![]];
        (Predictions::new(4, indices, distances).unwrap(), positives)
    }

    #[test]
    fn recall_counts_the_first_n_against_every_query() {
        let (predictions, positives) = example();
        assert_eq!(predictions.queries(), 5);
        assert_eq!(predictions.row(2), &[0, 1, 2, 6]);
        assert_eq!(predictions.distances_of(1), &[2.0, 2.5, 3.0, 3.5]);
        // found by N: 1 -> 1, 2 -> 1, 3 -> 2, 4 -> 3; out of 5 queries
        let got = recalls(&predictions, &positives, &[1, 2, 3, 4]).unwrap();
        assert_eq!(got, vec![20.0, 20.0, 40.0, 60.0]);
        let unordered = recalls(&predictions, &positives, &[4, 1, 3]).unwrap();
        assert_eq!(unordered, vec![60.0, 20.0, 40.0]);
        assert_eq!(
            recall_curve(&predictions, &positives).unwrap(),
            vec![20.0, 20.0, 40.0, 60.0]
        );
    }

    #[test]
    fn recall_is_count_over_queries_times_100_in_f64() {
        // 1/3 * 100 and 2/3 * 100 round differently from count * 100 / queries
        let predictions = Predictions::new(1, vec![0, 0, 0], vec![0.0; 3]).unwrap();
        let positives = vec![vec![0], vec![0], vec![]];
        let got = recalls(&predictions, &positives, &[1]).unwrap();
        assert_eq!(got[0].to_bits(), (2.0f64 / 3.0 * 100.0).to_bits());
        assert_eq!(got[0], 66.66666666666666);
        let one = recalls(&predictions, &[vec![0], vec![], vec![]], &[1]).unwrap();
        assert_eq!(one[0], 33.33333333333333);
    }

    #[test]
    fn bad_recall_values_and_shapes_are_errors() {
        let (predictions, positives) = example();
        let too_many = recalls(&predictions, &positives, &[1, 5]).unwrap_err();
        assert!(matches!(too_many, Error::Argument(_)), "{too_many}");
        let message = too_many.to_string();
        assert!(
            message.contains("N = 5") && message.contains("k = 4"),
            "{message}"
        );
        assert!(recalls(&predictions, &positives, &[0]).is_err());
        assert!(recalls(&predictions, &positives, &[]).is_err());
        let short = recalls(&predictions, &positives[..4], &[1]).unwrap_err();
        assert!(
            short.to_string().contains("5 queries but positives for 4"),
            "{short}"
        );
        let none = Predictions::new(3, vec![], vec![]).unwrap();
        assert!(recalls(&none, &[], &[1]).is_err());
        assert!(recall_curve(&none, &[]).is_err());
        assert!(Predictions::new(0, vec![], vec![]).is_err());
        assert!(Predictions::new(2, vec![1, 2, 3], vec![0.0; 3]).is_err());
        assert!(Predictions::new(2, vec![1, 2], vec![0.0; 3]).is_err());
    }

    #[test]
    fn format_rounds_like_python() {
        // Python: f"{x:.1f}" for each, the exact binary value rounded half to even
        let cases = [
            (12.25, "12.2"),
            (12.35, "12.3"),
            (0.05, "0.1"),
            (0.25, "0.2"),
            (0.45, "0.5"),
            (62.5, "62.5"),
            (99.95, "100.0"),
            (99.94999999999999, "99.9"),
            (33.35, "33.4"),
            (0.0, "0.0"),
            (100.0, "100.0"),
        ];
        for (value, want) in cases {
            assert_eq!(
                format_recalls(&[1], &[value]),
                format!("R@1: {want}"),
                "{value:?}"
            );
        }
        assert_eq!(
            format_recalls(&[1, 5, 10, 20], &[98.75, 99.7, 99.85, 100.0]),
            "R@1: 98.8, R@5: 99.7, R@10: 99.8, R@20: 100.0"
        );
    }
}
