//! Medians, spreads and percentiles.

use serde_json::{Value, json};

/// Percentile P (0..=100) of SAMPLES, nearest-rank; NaN when empty.
pub fn percentile(samples: &[f64], p: f64) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank within a small vector"
    )]
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Median of SAMPLES (mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    }
}

/// `{median, min, max, p50, p99, n, samples}` of SAMPLES.
pub fn summary(samples: &[f64]) -> Value {
    let finite: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
    json!({
        "n": finite.len(),
        "median": finite_or_null(median(&finite)),
        "min": finite.iter().copied().reduce(f64::min),
        "max": finite.iter().copied().reduce(f64::max),
        "p50": finite_or_null(percentile(&finite, 50.0)),
        "p99": finite_or_null(percentile(&finite, 99.0)),
        "samples": finite,
    })
}

fn finite_or_null(value: f64) -> Value {
    if value.is_finite() {
        json!(value)
    } else {
        Value::Null
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let samples: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&samples, 50.0) - 50.0).abs() < f64::EPSILON);
        assert!((percentile(&samples, 99.0) - 99.0).abs() < f64::EPSILON);
        assert!((median(&[3.0, 1.0, 2.0, 10.0]) - 2.5).abs() < f64::EPSILON);
        assert!(median(&[]).is_nan());
        assert_eq!(summary(&[]).get("median"), Some(&Value::Null));
    }
}
