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

/// Mean and 95% confidence interval of SAMPLES (normal approximation;
/// at least 2 samples, else the interval is the mean itself).
#[must_use]
pub fn mean_ci95(samples: &[f64]) -> (f64, f64, f64) {
    #[expect(clippy::cast_precision_loss, reason = "a count of blocks")]
    let n = samples.len() as f64;
    if samples.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mean = samples.iter().sum::<f64>() / n;
    if samples.len() < 2 {
        return (mean, mean, mean);
    }
    let variance = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = 1.96 * (variance / n).sqrt();
    (mean, mean - half, mean + half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_of_constant_samples_is_the_value() {
        assert_eq!(mean_ci95(&[1.0, 1.0, 1.0]), (1.0, 1.0, 1.0));
    }

    #[test]
    fn interval_is_mean_plus_minus_1_96_standard_errors() {
        // 0, 2, 4: mean 2, sample variance (4 + 0 + 4) / 2 = 4, n 3.
        let (mean, lo, hi) = mean_ci95(&[0.0, 2.0, 4.0]);
        let half = 1.96 * (4.0_f64 / 3.0).sqrt();
        assert!((mean - 2.0).abs() < 1e-12);
        assert!((lo - (2.0 - half)).abs() < 1e-12);
        assert!((hi - (2.0 + half)).abs() < 1e-12);
    }

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
