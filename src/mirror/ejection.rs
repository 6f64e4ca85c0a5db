//! Ejection of a mirror target that stops answering, as Envoy's outlier
//! detection ejects a host after consecutive gateway failures, but for the
//! target as a whole and with a single probe to let it back.
//!
//! Without it, a dead v2 costs the primary path what a live one does: every
//! request still dials it (a refused connection is a socket, a connect and a
//! close), and a blackhole takes a fresh connection per shadow every time
//! the last ones time out, up to the in-flight cap at once. So after
//! `after` failures in a row (no connection, no answer within the timeout,
//! a broken exchange) the target is ejected: its shadows are dropped and
//! counted (`dropped_unresponsive`) without touching the network. When the
//! ejection has run its time one shadow probes the target; if it answers,
//! the target is back, otherwise it is ejected again for longer. Any HTTP
//! answer counts, 5xx included: v2's errors are what the analysis is for.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The longest ejection, however often the target failed its probes
/// (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// A mirror target's standing: answering, ejected, or being probed.
pub struct Ejection {
    /// Failures in a row that eject the target; 0: never ejected.
    after: u32,
    /// The first ejection's length; the nth in a row lasts n times as long,
    /// up to [`MAX_EJECTION`] (Envoy's `baseEjectionTime` scaling).
    base: Duration,
    /// What `until` counts from.
    epoch: Instant,
    /// Failures since the target last answered.
    failures: AtomicU32,
    /// Milliseconds after `epoch` at which the ejection ends, plus one;
    /// 0 while the target is not ejected (the one load on the hot path).
    until: AtomicU64,
    /// Ejections since the target last answered a probe.
    ejections: AtomicU32,
    /// The ejection has run its time and one shadow is out testing the
    /// target; the others are still dropped.
    probing: AtomicBool,
}

/// Whether a shadow may go to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Open,
    /// Yes, as the probe of an ejected target: report its end with
    /// `probe: true`.
    Probe,
    Ejected,
}

/// What became of a shadow's exchange, as far as its target's standing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An HTTP response arrived, whatever its status.
    Answered,
    /// No connection, no answer in time, or a broken exchange.
    Failed,
    /// It never reached the target (umbra's own limits), or broke off for
    /// the client's sake (the primary's body failed): says nothing about
    /// the target.
    NotJudged,
}

/// A change of standing worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Ejected(Duration),
    Back,
}

impl Ejection {
    /// Ejects after `after` failures in a row (0: never) for `base`, then
    /// twice `base`, and so on while probes fail.
    pub fn new(after: u32, base: Duration) -> Ejection {
        Ejection {
            after,
            base,
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// A target that is never ejected.
    pub fn never() -> Ejection {
        Ejection::new(0, Duration::ZERO)
    }

    /// Whether the next shadow may go; `now` is only read while ejected.
    pub fn admit(&self, now: impl FnOnce() -> Instant) -> Admission {
        let until = self.until.load(Ordering::Acquire);
        if until == 0 {
            Admission::Open
        } else if self.stamp(now()) >= until && !self.probing.swap(true, Ordering::AcqRel) {
            // The ejection has run its time and no probe is out yet.
            Admission::Probe
        } else {
            Admission::Ejected
        }
    }

    /// Records how a shadow ended (`probe`: it was admitted as the probe).
    /// Called before the shadow gives up its place, so that shadows waiting
    /// for one see an ejection before they are sent.
    pub fn record(&self, verdict: Verdict, probe: bool, now: Instant) -> Option<Change> {
        match verdict {
            Verdict::Answered => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                // A late answer from before the ejection does not end it:
                // only a probe sent after it has run its time does.
                probe.then(|| {
                    self.ejections.store(0, Ordering::Relaxed);
                    self.until.store(0, Ordering::Release);
                    self.probing.store(false, Ordering::Release);
                    Change::Back
                })
            }
            Verdict::Failed if self.after == 0 => None,
            Verdict::Failed if probe => {
                let length = self.eject(now);
                self.probing.store(false, Ordering::Release);
                Some(Change::Ejected(length))
            }
            Verdict::Failed => {
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                // Exactly once per run of failures: the shadows already out
                // when it was ejected fail too, and must not lengthen it.
                (failures == self.after && self.until.load(Ordering::Acquire) == 0)
                    .then(|| Change::Ejected(self.eject(now)))
            }
            Verdict::NotJudged => {
                if probe {
                    self.probing.store(false, Ordering::Release);
                }
                None
            }
        }
    }

    fn eject(&self, now: Instant) -> Duration {
        let nth = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = self
            .base
            .saturating_mul(nth)
            .min(MAX_EJECTION.max(self.base));
        self.until
            .store(self.stamp(now + length), Ordering::Release);
        length
    }

    /// `at` in milliseconds after `epoch`, plus one (0 means "not ejected").
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(30);

    fn fail(ejection: &Ejection, times: usize, now: Instant) -> Vec<Option<Change>> {
        (0..times)
            .map(|_| ejection.record(Verdict::Failed, false, now))
            .collect()
    }

    #[test]
    fn failures_in_a_row_eject_once_and_answers_reset_the_count() {
        let start = Instant::now();
        let ejection = Ejection::new(3, BASE);
        fail(&ejection, 2, start);
        ejection.record(Verdict::Answered, false, start);
        assert_eq!(fail(&ejection, 2, start), [None, None], "the run restarted");
        assert_eq!(ejection.admit(|| start), Admission::Open);
        assert_eq!(
            ejection.record(Verdict::Failed, false, start),
            Some(Change::Ejected(BASE))
        );
        // The shadows already out fail as well: still one ejection.
        assert!(fail(&ejection, 100, start).iter().all(Option::is_none));
        assert_eq!(ejection.admit(|| start + BASE / 2), Admission::Ejected);
        // Shadows that never reached it say nothing.
        assert_eq!(ejection.record(Verdict::NotJudged, false, start), None);
    }

    #[test]
    fn one_probe_after_the_ejection_lets_the_target_back() {
        let start = Instant::now();
        let ejection = Ejection::new(1, BASE);
        ejection.record(Verdict::Failed, false, start);
        let later = start + BASE + Duration::from_millis(1);
        assert_eq!(ejection.admit(|| later), Admission::Probe);
        assert_eq!(ejection.admit(|| later), Admission::Ejected, "one probe");
        // A late answer from before the ejection does not end it.
        assert_eq!(ejection.record(Verdict::Answered, false, later), None);
        assert_eq!(ejection.admit(|| later), Admission::Ejected);
        assert_eq!(
            ejection.record(Verdict::Answered, true, later),
            Some(Change::Back)
        );
        assert_eq!(ejection.admit(|| later), Admission::Open);
        // Back to counting from zero, and to the base length.
        assert_eq!(
            ejection.record(Verdict::Failed, false, later),
            Some(Change::Ejected(BASE))
        );
    }

    #[test]
    fn failed_probes_eject_for_longer_up_to_the_maximum() {
        let mut now = Instant::now();
        let ejection = Ejection::new(1, BASE);
        let mut lengths = vec![ejection.record(Verdict::Failed, false, now)];
        for _ in 0..11 {
            let Some(Change::Ejected(length)) = lengths.last().copied().flatten() else {
                panic!("not ejected: {lengths:?}");
            };
            now += length;
            assert_eq!(ejection.admit(|| now), Admission::Probe);
            lengths.push(ejection.record(Verdict::Failed, true, now));
        }
        let secs: Vec<u64> = lengths
            .iter()
            .map(|c| match c {
                Some(Change::Ejected(d)) => d.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            secs,
            [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]
        );
    }

    #[test]
    fn a_probe_that_never_went_out_lets_another_probe() {
        let start = Instant::now();
        let ejection = Ejection::new(1, BASE);
        ejection.record(Verdict::Failed, false, start);
        let later = start + BASE;
        assert_eq!(ejection.admit(|| later), Admission::Probe);
        assert_eq!(ejection.record(Verdict::NotJudged, true, later), None);
        assert_eq!(ejection.admit(|| later), Admission::Probe);
    }

    #[test]
    fn zero_failures_means_never_ejected() {
        let start = Instant::now();
        let ejection = Ejection::never();
        assert!(fail(&ejection, 1000, start).iter().all(Option::is_none));
        assert_eq!(ejection.admit(|| start), Admission::Open);
    }
}
