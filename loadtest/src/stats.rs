//! Latency summaries: exact percentiles over every recorded sample.

use serde_json::{Value, json};

/// Percentiles the plot draws, as fractions.
pub const CURVE: [f64; 10] = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0];

/// The sample at quantile `q` of sorted `v` (nearest rank; q = 0 is the minimum).
pub fn quantile(v: &[u32], q: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(us: u32) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

/// Summarizes latencies in microseconds as milliseconds.
pub fn summarize(mut v: Vec<u32>) -> Value {
    v.sort_unstable();
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64 / 1000.0
    };
    let curve: Vec<Value> = CURVE
        .iter()
        .map(|&q| json!([q, ms(quantile(&v, q))]))
        .collect();
    json!({
        "samples": v.len(),
        "min": ms(quantile(&v, 0.0)),
        "p50": ms(quantile(&v, 0.5)),
        "p90": ms(quantile(&v, 0.9)),
        "p99": ms(quantile(&v, 0.99)),
        "p999": ms(quantile(&v, 0.999)),
        "max": ms(quantile(&v, 1.0)),
        "mean": (mean * 1000.0).round() / 1000.0,
        "curve": curve,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.0), 1);
        assert_eq!(quantile(&v, 0.5), 50);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&v, 1.0), 100);
        assert_eq!(quantile(&[7], 0.99), 7);
        assert_eq!(quantile(&[], 0.5), 0);
    }
}
