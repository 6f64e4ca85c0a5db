//! Ejection of a mirror target that stops answering, after Envoy's outlier
//! detection (which ejects a host after 5 consecutive errors, connect
//! failures and timeouts among them, for `base_ejection_time` × the times
//! it was ejected), but for the target as a whole, with one probe to let it
//! back, and with v2's own 5xx counted as answers.
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

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::metrics::TargetStats;

/// The longest ejection, however often the target failed its probes
/// (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

/// `until` while the target is admitted.
const OPEN: u64 = 0;
/// `until` while one shadow is out probing the target.
const PROBING: u64 = u64::MAX;

/// A mirror target's standing: answering, ejected, or being probed.
pub struct Ejection {
    /// Failures in a row that eject the target; 0: never ejected.
    after: u32,
    /// The first ejection's length; the nth in a row lasts n times as long,
    /// up to [`MAX_EJECTION`] (Envoy's `base_ejection_time` scaling).
    base: Duration,
    /// What `until` counts from.
    epoch: Instant,
    /// Failures since the target last answered.
    failures: AtomicU32,
    /// The whole standing in one word, so that moving between states is one
    /// compare-and-swap: [`OPEN`], [`PROBING`], or the end of the ejection
    /// in milliseconds after `epoch`, plus one. Only `OPEN` is read on the
    /// hot path.
    until: AtomicU64,
    /// Ejections in a row. Written only by whoever moved `until` out of
    /// `OPEN` or `PROBING`, which one shadow at a time can do.
    ejections: AtomicU32,
    /// When a probe last found the target answering, stamped as `until`
    /// is (0: never): shadows admitted before it that fail afterwards
    /// (their timeout longer than the ejection) are old news.
    back: AtomicU64,
    /// Where the standing shows (`umbra_mirror_ejected`,
    /// `umbra_mirror_ejections_total`), set on each change.
    stats: Option<TargetStats>,
}

/// Whether a shadow may go to its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The target answers: send.
    Open,
    /// Send, as the probe of an ejected target: report its end with
    /// `probe: true`, whatever becomes of it.
    Probe,
    /// Drop it: the target is ejected, or another shadow probes it.
    Ejected,
}

/// What became of a shadow's exchange, as far as its target's standing goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// An HTTP response arrived, whatever its status.
    Answered,
    /// No connection, no answer in time, or a broken exchange.
    Failed,
    /// It never reached the target (umbra's own limits), or ended for the
    /// client's sake (the primary's body failed or was still arriving):
    /// says nothing about the target.
    NotJudged,
}

/// A change of standing worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Its shadows are dropped for this long, then one probes it.
    Ejected(Duration),
    /// A probe found it answering: shadows resume.
    Back,
}

impl Ejection {
    /// Ejects after `after` failures in a row (0: never) for `base` (at
    /// most [`MAX_EJECTION`]), then twice `base`, and so on while probes
    /// fail.
    pub fn new(after: u32, base: Duration) -> Ejection {
        Ejection {
            after,
            base: base.min(MAX_EJECTION),
            epoch: Instant::now(),
            failures: AtomicU32::new(0),
            until: AtomicU64::new(OPEN),
            ejections: AtomicU32::new(0),
            back: AtomicU64::new(0),
            stats: None,
        }
    }

    /// Shows the standing in `stats`: a fresh target is admitted.
    pub fn reporting(mut self, stats: TargetStats) -> Ejection {
        stats.ejected.set(0);
        self.stats = Some(stats);
        self
    }

    /// A target that is never ejected.
    pub fn never() -> Ejection {
        Ejection::new(0, Duration::ZERO)
    }

    /// Whether the next shadow may go; `now` is only read while ejected.
    pub fn admit(&self, now: impl FnOnce() -> Instant) -> Admission {
        let until = self.until.load(Ordering::Acquire);
        if until == OPEN {
            return Admission::Open;
        }
        if until == PROBING || self.stamp(now()) < until {
            return Admission::Ejected;
        }
        // The ejection has run its time: the first to claim the probe sends it.
        match self
            .until
            .compare_exchange(until, PROBING, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Admission::Probe,
            Err(_) => Admission::Ejected,
        }
    }

    /// Records how a shadow let go at `sent` (by [`Ejection::admit`])
    /// ended; `probe`: it was admitted as the probe (`sent` is then not
    /// read); `now` is only read when the standing changes. Called before
    /// the shadow gives up its place, so that shadows waiting for one see
    /// an ejection before they are sent.
    pub fn record(
        &self,
        verdict: Verdict,
        probe: bool,
        sent: Instant,
        now: impl FnOnce() -> Instant,
    ) -> Option<Change> {
        let change = match (verdict, probe) {
            (Verdict::Answered, false) => {
                // A late answer from before an ejection does not end it:
                // only a probe sent after it has run its time does.
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.failures.store(0, Ordering::Relaxed);
                }
                None
            }
            (Verdict::Answered, true) => {
                // Before the count restarts: a failure racing with it is
                // then either old news or counted after the reset.
                self.back.store(self.stamp(now()), Ordering::Relaxed);
                self.failures.store(0, Ordering::Relaxed);
                self.ejections.store(0, Ordering::Relaxed);
                self.until.store(OPEN, Ordering::Release);
                Some(Change::Back)
            }
            (Verdict::Failed, true) => {
                let nth = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
                let length = self.base.saturating_mul(nth).min(MAX_EJECTION);
                self.until
                    .store(self.stamp(now() + length), Ordering::Release);
                Some(Change::Ejected(length))
            }
            (Verdict::Failed, false) => {
                if self.stamp(sent) < self.back.load(Ordering::Relaxed) {
                    return None;
                }
                let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if self.after == 0 || failures < self.after {
                    return None;
                }
                // Only from OPEN, and only once: the shadows already out
                // when it was ejected fail too, and must not lengthen it.
                let until = self.stamp(now() + self.base);
                self.until
                    .compare_exchange(OPEN, until, Ordering::AcqRel, Ordering::Acquire)
                    .ok()?;
                self.ejections.store(1, Ordering::Relaxed);
                Some(Change::Ejected(self.base))
            }
            (Verdict::NotJudged, true) => {
                // An ejection that is over: the next shadow may probe.
                self.until.store(self.stamp(now()), Ordering::Release);
                None
            }
            (Verdict::NotJudged, false) => None,
        };
        if let Some(stats) = &self.stats {
            match change {
                Some(Change::Ejected(_)) => {
                    stats.ejected.set(1);
                    stats.ejections.inc();
                }
                Some(Change::Back) => {
                    stats.ejected.set(0);
                }
                None => {}
            }
        }
        change
    }

    /// `at` in milliseconds after `epoch`, plus one, so never [`OPEN`]
    /// (and [`PROBING`] only after 584 million years).
    fn stamp(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }
}

impl Drop for Ejection {
    /// A target a reload changed or removed no longer shows as ejected
    /// (its successor, if any, starts admitted and reports its own).
    fn drop(&mut self) {
        if let Some(stats) = &self.stats {
            if self.until.load(Ordering::Acquire) != OPEN {
                stats.ejected.set(0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(30);

    fn fail(ejection: &Ejection, times: usize, now: Instant) -> Vec<Option<Change>> {
        (0..times)
            .map(|_| ejection.record(Verdict::Failed, false, now, || now))
            .collect()
    }

    /// Ejects `ejection` by `after` failures at `start`, lets the
    /// ejection run its time and claims the probe; returns that moment.
    fn probing(ejection: &Ejection, after: usize, start: Instant) -> Instant {
        fail(ejection, after, start);
        let later = start + BASE;
        assert_eq!(ejection.admit(|| later), Admission::Probe);
        later
    }

    #[test]
    fn failures_in_a_row_eject_once_and_answers_reset_the_count() {
        let start = Instant::now();
        let ejection = Ejection::new(3, BASE);
        fail(&ejection, 2, start);
        ejection.record(Verdict::Answered, false, start, || start);
        assert_eq!(fail(&ejection, 2, start), [None, None], "the run restarted");
        assert_eq!(ejection.admit(|| start), Admission::Open);
        assert_eq!(
            ejection.record(Verdict::Failed, false, start, || start),
            Some(Change::Ejected(BASE))
        );
        // The shadows already out fail as well: still one ejection.
        assert!(fail(&ejection, 100, start).iter().all(Option::is_none));
        assert_eq!(ejection.admit(|| start + BASE / 2), Admission::Ejected);
        // Shadows that never reached it say nothing.
        assert_eq!(
            ejection.record(Verdict::NotJudged, false, start, || start),
            None
        );
    }

    #[test]
    fn one_probe_after_the_ejection_lets_the_target_back() {
        let start = Instant::now();
        let ejection = Ejection::new(1, BASE);
        ejection.record(Verdict::Failed, false, start, || start);
        let later = start + BASE + Duration::from_millis(1);
        assert_eq!(ejection.admit(|| later), Admission::Probe);
        assert_eq!(ejection.admit(|| later), Admission::Ejected, "one probe");
        // A late answer from before the ejection does not end it.
        assert_eq!(
            ejection.record(Verdict::Answered, false, later, || later),
            None
        );
        assert_eq!(ejection.admit(|| later), Admission::Ejected);
        assert_eq!(
            ejection.record(Verdict::Answered, true, later, || later),
            Some(Change::Back)
        );
        assert_eq!(ejection.admit(|| later), Admission::Open);
        // Back to counting from zero, and to the base length.
        assert_eq!(
            ejection.record(Verdict::Failed, false, later, || later),
            Some(Change::Ejected(BASE))
        );
    }

    #[test]
    fn failed_probes_eject_for_longer_up_to_the_maximum() {
        let mut now = Instant::now();
        let ejection = Ejection::new(1, BASE);
        let mut lengths = vec![ejection.record(Verdict::Failed, false, now, || now)];
        for _ in 0..11 {
            let Some(Change::Ejected(length)) = lengths.last().copied().flatten() else {
                panic!("not ejected: {lengths:?}");
            };
            now += length;
            assert_eq!(ejection.admit(|| now), Admission::Probe);
            lengths.push(ejection.record(Verdict::Failed, true, now, || now));
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
        let ejection = Ejection::new(1, BASE);
        let later = probing(&ejection, 1, Instant::now());
        assert_eq!(
            ejection.record(Verdict::NotJudged, true, later, || later),
            None
        );
        assert_eq!(ejection.admit(|| later), Admission::Probe);
    }

    #[test]
    fn failures_past_the_count_while_ejected_still_eject_once_back() {
        let ejection = Ejection::new(2, BASE);
        let later = probing(&ejection, 2, Instant::now());
        // Shadows from before the ejection keep failing while it probes.
        assert!(fail(&ejection, 5, later).iter().all(Option::is_none));
        assert_eq!(ejection.admit(|| later), Admission::Ejected);
        assert_eq!(
            ejection.record(Verdict::Answered, true, later, || later),
            Some(Change::Back)
        );
        assert_eq!(fail(&ejection, 2, later)[1], Some(Change::Ejected(BASE)));
    }

    #[test]
    fn failures_of_shadows_sent_before_the_target_came_back_do_not_count() {
        let start = Instant::now();
        let ejection = Ejection::new(2, BASE);
        let later = probing(&ejection, 2, start);
        let back = ejection.record(Verdict::Answered, true, later, || later);
        assert_eq!(back, Some(Change::Back));
        // Sent before the ejection, timing out only now.
        for _ in 0..5 {
            assert_eq!(
                ejection.record(Verdict::Failed, false, start, || later),
                None
            );
        }
        assert_eq!(ejection.admit(|| later), Admission::Open);
        assert_eq!(fail(&ejection, 2, later)[1], Some(Change::Ejected(BASE)));
    }

    #[test]
    fn no_ejection_is_longer_than_the_maximum() {
        let start = Instant::now();
        let ejection = Ejection::new(1, Duration::from_secs(1_000_000));
        assert_eq!(
            ejection.record(Verdict::Failed, false, start, || start),
            Some(Change::Ejected(MAX_EJECTION))
        );
        assert_eq!(ejection.admit(|| start + MAX_EJECTION), Admission::Probe);
    }

    #[test]
    fn the_standing_shows_in_its_metrics_until_the_target_goes() {
        let stats = TargetStats {
            ejected: Default::default(),
            ejections: Default::default(),
        };
        stats.ejected.set(1); // left by a predecessor a reload replaced
        let start = Instant::now();
        let ejection = Ejection::new(1, BASE).reporting(stats.clone());
        assert_eq!(stats.ejected.get(), 0, "a fresh target is admitted");
        ejection.record(Verdict::Failed, false, start, || start);
        assert_eq!((stats.ejected.get(), stats.ejections.get()), (1, 1));
        let later = start + BASE;
        assert_eq!(ejection.admit(|| later), Admission::Probe);
        ejection.record(Verdict::Failed, true, later, || later);
        assert_eq!((stats.ejected.get(), stats.ejections.get()), (1, 2));
        drop(ejection);
        assert_eq!(stats.ejected.get(), 0, "gone with its config");
    }

    #[test]
    fn zero_failures_means_never_ejected() {
        let start = Instant::now();
        let ejection = Ejection::never();
        assert!(fail(&ejection, 1000, start).iter().all(Option::is_none));
        assert_eq!(ejection.admit(|| start), Admission::Open);
    }
}
