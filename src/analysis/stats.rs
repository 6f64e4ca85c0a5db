//! The statistics behind verdicts: a one-sided two-proportion z-test for
//! error rates and a one-sided Mann-Whitney U test (normal approximation
//! with tie correction, as Kayenta uses) for latency, plus the bounded
//! reservoir that feeds it.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Standard normal CDF, via the Abramowitz–Stegun 7.1.26 erf approximation
/// (absolute error below 1.5e-7, ample for p-values at 0.98 confidence).
pub fn normal_cdf(z: f64) -> f64 {
    if z.is_nan() {
        return 0.5;
    }
    0.5 * (1.0 + erf(z / std::f64::consts::SQRT_2))
}

fn erf(x: f64) -> f64 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let x = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    sign * (1.0 - poly * (-x * x).exp())
}

/// The result of a one-sided test that "the second group is worse".
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Test {
    pub statistic: f64,
    /// P-value of the one-sided alternative; 1.0 when there is no evidence.
    pub p: f64,
}

impl Test {
    pub fn significant(&self, confidence: f64) -> bool {
        self.p < 1.0 - confidence
    }
}

/// Is the shadow's error proportion (`b_errors / b_total`) higher than the
/// primary's? Pooled two-proportion z-test, one-sided.
pub fn two_proportion(a_errors: u64, a_total: u64, b_errors: u64, b_total: u64) -> Test {
    if a_total == 0 || b_total == 0 {
        return Test {
            statistic: 0.0,
            p: 1.0,
        };
    }
    let (a_n, b_n) = (a_total as f64, b_total as f64);
    let (pa, pb) = (a_errors as f64 / a_n, b_errors as f64 / b_n);
    let pooled = (a_errors + b_errors) as f64 / (a_n + b_n);
    let variance = pooled * (1.0 - pooled) * (1.0 / a_n + 1.0 / b_n);
    if variance <= 0.0 {
        // All errors or none on both sides: no difference to test.
        return Test {
            statistic: 0.0,
            p: 1.0,
        };
    }
    let z = (pb - pa) / variance.sqrt();
    Test {
        statistic: z,
        p: 1.0 - normal_cdf(z),
    }
}

/// Are `b`'s values stochastically larger than `a`'s? Mann-Whitney U with
/// midranks for ties and the tie-corrected normal approximation.
pub fn mann_whitney_greater(a: &[f64], b: &[f64]) -> Test {
    let (n1, n2) = (a.len(), b.len());
    if n1 == 0 || n2 == 0 {
        return Test {
            statistic: 0.0,
            p: 1.0,
        };
    }
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&v| (v, false))
        .chain(b.iter().map(|&v| (v, true)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = all.len();
    let mut rank_sum_b = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let ties = (j - i + 1) as f64;
        let midrank = (i + j) as f64 / 2.0 + 1.0;
        for item in &all[i..=j] {
            if item.1 {
                rank_sum_b += midrank;
            }
        }
        tie_term += ties * ties * ties - ties;
        i = j + 1;
    }
    let (n1f, n2f, nf) = (n1 as f64, n2 as f64, n as f64);
    let u_b = rank_sum_b - n2f * (n2f + 1.0) / 2.0;
    let mean = n1f * n2f / 2.0;
    let variance = n1f * n2f / 12.0 * ((nf + 1.0) - tie_term / (nf * (nf - 1.0)).max(1.0));
    if variance <= 0.0 {
        return Test {
            statistic: 0.0,
            p: 1.0,
        };
    }
    // Continuity correction toward the null.
    let z = (u_b - mean - 0.5) / variance.sqrt();
    Test {
        statistic: z,
        p: 1.0 - normal_cdf(z),
    }
}

/// A uniform sample of at most `CAPACITY` values (Vitter's algorithm R), so
/// the latency test sees the whole history in bounded memory.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Reservoir {
    pub values: Vec<f64>,
    pub seen: u64,
}

impl Reservoir {
    pub const CAPACITY: usize = 2000;

    pub fn add(&mut self, value: f64) {
        self.add_capped(value, Self::CAPACITY);
    }

    pub fn add_capped(&mut self, value: f64, capacity: usize) {
        self.seen += 1;
        if self.values.len() < capacity {
            self.values.push(value);
        } else {
            let slot = rand::rng().random_range(0..self.seen);
            if (slot as usize) < capacity {
                self.values[slot as usize] = value;
            }
        }
    }
}

/// The median of a sample (0 when empty).
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_tables() {
        for (z, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_7),
            (-1.0, 0.158_655_3),
            (2.053_749, 0.98),
            (3.0, 0.998_650_1),
        ] {
            assert!(
                (normal_cdf(z) - want).abs() < 1e-6,
                "Φ({z}) = {}",
                normal_cdf(z)
            );
        }
    }

    #[test]
    fn two_proportion_flags_a_real_rise_only() {
        // 1% vs 10% errors over 1000 requests each: clearly worse.
        let worse = two_proportion(10, 1000, 100, 1000);
        assert!(worse.significant(0.98), "{worse:?}");
        assert!(worse.statistic > 8.0);
        // 1% vs 1.3%: within noise.
        assert!(!two_proportion(10, 1000, 13, 1000).significant(0.98));
        // The shadow being better is never "significantly higher".
        assert!(!two_proportion(100, 1000, 10, 1000).significant(0.98));
    }

    #[test]
    fn two_proportion_edge_cases_have_no_nan() {
        for (a, an, b, bn) in [
            (0, 0, 0, 0),
            (0, 100, 0, 100),
            (100, 100, 100, 100),
            (0, 100, 0, 0),
        ] {
            let t = two_proportion(a, an, b, bn);
            assert_eq!(t.p, 1.0, "{a}/{an} vs {b}/{bn}");
            assert!(!t.statistic.is_nan());
        }
        // All errors on the shadow, none on the primary.
        assert!(two_proportion(0, 100, 100, 100).significant(0.98));
    }

    #[test]
    fn mann_whitney_detects_a_shift_and_not_identity() {
        let a: Vec<f64> = (0..200).map(|i| 10.0 + (i % 7) as f64).collect();
        let slower: Vec<f64> = a.iter().map(|v| v + 5.0).collect();
        assert!(mann_whitney_greater(&a, &slower).significant(0.98));
        assert!(
            !mann_whitney_greater(&slower, &a).significant(0.98),
            "faster is not slower"
        );
        let same = mann_whitney_greater(&a, &a);
        assert!(!same.significant(0.98), "{same:?}");
        // All values tied: variance collapses, no evidence.
        assert_eq!(mann_whitney_greater(&[5.0; 50], &[5.0; 50]).p, 1.0);
    }

    #[test]
    fn mann_whitney_u_matches_a_hand_computation() {
        // a = [1, 2], b = [3, 4]: U_b = 4 (every b beats every a), mean 2,
        // variance 2·2·5/12 = 5/3; z = (4 - 2 - 0.5)/sqrt(5/3) ≈ 1.1619.
        let t = mann_whitney_greater(&[1.0, 2.0], &[3.0, 4.0]);
        assert!((t.statistic - 1.161_895).abs() < 1e-5, "{t:?}");
    }

    #[test]
    fn reservoir_stays_bounded() {
        let mut r = Reservoir::default();
        for i in 0..10_000 {
            r.add(i as f64);
        }
        assert_eq!(r.values.len(), Reservoir::CAPACITY);
        assert_eq!(r.seen, 10_000);
        let mean = r.values.iter().sum::<f64>() / r.values.len() as f64;
        assert!(
            (3500.0..6500.0).contains(&mean),
            "uniform sample, mean {mean}"
        );
    }
}
