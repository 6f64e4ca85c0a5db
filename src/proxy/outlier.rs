//! Outlier detection for a primary's endpoints (DestinationRule
//! `outlierDetection`), as Envoy runs it with the settings Istio gives it:
//! an endpoint that fails `consecutive5xxErrors` times in a row (or
//! `consecutiveGatewayErrors` times, counting 502–504 only) is left out of
//! load balancing for `baseEjectionTime` × the times it was ejected, up to
//! [`MAX_EJECTION`]; an exchange without a response (connect failure,
//! reset, per-try timeout) counts as both kinds, as Envoy counts
//! locally-originated errors when they are not split out. At most
//! `maxEjectionPercent` of the endpoints are out at once: under 10 endpoints,
//! Istio's default 10% ejects none (Envoy checks the share with the new
//! ejection counted; Istio never sets its `always_eject_one_host`). When
//! every endpoint is out, requests get 503 `no_healthy_upstream`
//! (Istio's default `minHealthPercent` of 0 turns off Envoy's panic mode).
//!
//! Unlike Envoy, an endpoint comes back as soon as its time is up (Envoy
//! waits for its next `interval` sweep), and its ejection count starts
//! again at its first success (Envoy lowers it one step per healthy
//! interval).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::model::OutlierPolicy;
use crate::metrics::TargetStats;

/// The longest ejection (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// `until` of an endpoint in the load balancer.
const IN: u64 = 0;

/// The standing of each endpoint of one primary destination.
pub struct Outliers {
    policy: OutlierPolicy,
    /// What `until` counts from.
    epoch: Instant,
    endpoints: Box<[Standing]>,
    /// Endpoints out now.
    ejected: AtomicUsize,
    /// How many may be out at once.
    max_ejected: usize,
    /// `umbra_upstream_ejected` and `umbra_upstream_ejections_total`.
    stats: TargetStats,
}

#[derive(Default)]
struct Standing {
    /// 5xx answers and exchanges without an answer, in a row.
    errors: AtomicU32,
    /// 502–504 answers and exchanges without an answer, in a row.
    gateway_errors: AtomicU32,
    /// [`IN`], or the end of its ejection in milliseconds after `epoch`,
    /// plus one.
    until: AtomicU64,
    /// Ejections since its last success: the next lasts one more base.
    ejections: AtomicU32,
}

impl Outliers {
    pub fn new(policy: OutlierPolicy, endpoints: usize, stats: TargetStats) -> Outliers {
        let share = endpoints * policy.max_ejection_percent as usize / 100;
        Outliers {
            policy,
            epoch: Instant::now(),
            endpoints: (0..endpoints).map(|_| Standing::default()).collect(),
            ejected: AtomicUsize::new(0),
            // Envoy's `ejectHost`: only while (ejected + 1) / endpoints
            // stays within the percentage.
            max_ejected: share,
            stats,
        }
    }

    /// The first endpoint from `index` on (wrapping) that is in the load
    /// balancer; `None` when all are out.
    pub fn first_in(&self, index: usize) -> Option<usize> {
        let count = self.endpoints.len();
        (0..count)
            .map(|offset| (index + offset) % count)
            .find(|&i| self.is_in(i))
    }

    /// Whether endpoint `index` is in the load balancer, letting it back
    /// once its ejection has run its time.
    pub fn is_in(&self, index: usize) -> bool {
        let standing = &self.endpoints[index];
        let until = standing.until.load(Ordering::Acquire);
        if until == IN {
            return true;
        }
        if self.now() < until {
            return false;
        }
        if (standing
            .until
            .compare_exchange(until, IN, Ordering::AcqRel, Ordering::Acquire))
        .is_ok()
        {
            standing.errors.store(0, Ordering::Relaxed);
            standing.gateway_errors.store(0, Ordering::Relaxed);
            self.ejected.fetch_sub(1, Ordering::AcqRel);
            self.stats.ejected.dec();
        }
        true
    }

    /// An answer with `status` from endpoint `index`.
    pub fn answered(&self, index: usize, status: u16) {
        let Some(standing) = self.endpoints.get(index) else {
            return;
        };
        if status >= 500 {
            return self.failed(standing, matches!(status, 502..=504));
        }
        standing.errors.store(0, Ordering::Relaxed);
        standing.gateway_errors.store(0, Ordering::Relaxed);
        if standing.ejections.load(Ordering::Relaxed) > 0 {
            standing.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// An exchange with endpoint `index` that got no answer.
    pub fn unanswered(&self, index: usize) {
        if let Some(standing) = self.endpoints.get(index) {
            self.failed(standing, true);
        }
    }

    /// A 5xx, or no answer; `gateway`: one of those that counts as a
    /// gateway error too.
    fn failed(&self, standing: &Standing, gateway: bool) {
        let reached = |count: &AtomicU32, threshold: u32| {
            threshold > 0 && count.fetch_add(1, Ordering::Relaxed) + 1 >= threshold
        };
        let by_5xx = reached(&standing.errors, self.policy.consecutive_5xx);
        let by_gateway = if gateway {
            reached(&standing.gateway_errors, self.policy.consecutive_gateway)
        } else {
            standing.gateway_errors.store(0, Ordering::Relaxed);
            false
        };
        if by_5xx || by_gateway {
            self.eject(standing);
        }
    }

    /// Takes `standing` out, unless it is out already or as many
    /// endpoints as may be are.
    fn eject(&self, standing: &Standing) {
        let admitted = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_ejected).then_some(n + 1)
            });
        if admitted.is_err() {
            return;
        }
        let times = standing.ejections.load(Ordering::Relaxed) + 1;
        let length = (self.policy.base_ejection_time)
            .saturating_mul(times)
            .min(MAX_EJECTION.max(self.policy.base_ejection_time));
        let until = self.now().saturating_add(length.as_millis() as u64).max(1);
        if (standing
            .until
            .compare_exchange(IN, until, Ordering::AcqRel, Ordering::Acquire))
        .is_ok()
        {
            standing.ejections.store(times, Ordering::Relaxed);
            standing.errors.store(0, Ordering::Relaxed);
            standing.gateway_errors.store(0, Ordering::Relaxed);
            self.stats.ejected.inc();
            self.stats.ejections.inc();
        } else {
            // Another failure ejected it first.
            self.ejected.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Milliseconds since `epoch`, plus one (so never [`IN`]).
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Drop for Outliers {
    /// A reload that rebuilt the destination starts its endpoints afresh:
    /// its ejections leave the gauge.
    fn drop(&mut self) {
        (self.stats.ejected).dec_by(*self.ejected.get_mut() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outliers(policy: OutlierPolicy, endpoints: usize) -> Outliers {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = crate::metrics::Metrics::new(&mut registry);
        Outliers::new(policy, endpoints, metrics.destination_ejections("d"))
    }

    fn policy(consecutive_5xx: u32, consecutive_gateway: u32, max_percent: u32) -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx,
            consecutive_gateway,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: max_percent,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_errors_eject_for_longer_each_time() {
        let o = outliers(policy(3, 0, 100), 2);
        o.answered(0, 500);
        o.unanswered(0);
        assert_eq!(o.first_in(0), Some(0), "two in a row");
        o.answered(0, 503);
        assert_eq!(o.first_in(0), Some(1), "the third ejects it");
        assert_eq!(o.stats.ejected.get(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(o.first_in(0), Some(0), "back after the base time");
        assert_eq!(o.stats.ejected.get(), 0);
        for _ in 0..3 {
            o.answered(0, 500);
        }
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(o.first_in(0), Some(1), "the second ejection lasts 60 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(o.first_in(0), Some(0));
        assert_eq!(o.stats.ejections.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_breaks_the_run_and_a_4xx_is_one() {
        let o = outliers(policy(2, 0, 100), 1);
        o.answered(0, 500);
        o.answered(0, 404);
        o.answered(0, 500);
        assert_eq!(o.first_in(0), Some(0));
        o.answered(0, 500);
        assert_eq!(o.first_in(0), None, "every endpoint out");
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_count_only_502_to_504() {
        let o = outliers(policy(0, 2, 100), 1);
        o.answered(0, 502);
        o.answered(0, 500);
        o.answered(0, 504);
        assert_eq!(o.first_in(0), Some(0), "the 500 broke the run");
        o.unanswered(0);
        assert_eq!(o.first_in(0), None);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_max_percent_are_out() {
        let o = outliers(policy(1, 0, 10), 3);
        o.answered(0, 500);
        assert_eq!(o.first_in(0), Some(0), "10% of 3 is none");
        assert_eq!(o.stats.ejected.get(), 0);
        let o = outliers(policy(1, 0, 34), 3);
        o.answered(0, 500);
        o.answered(1, 500);
        assert_eq!(o.first_in(0), Some(1), "34% of 3 is one");
        assert_eq!(o.first_in(1), Some(1));
        let o = outliers(policy(1, 0, 50), 4);
        for index in 0..4 {
            o.answered(index, 500);
        }
        assert_eq!(o.stats.ejected.get(), 2);
    }
}
