//! The request-body tee: every frame the primary reads is handed, as a cheap
//! `Bytes` clone, to each shadow through an unbounded channel whose contents
//! are bounded by bytes instead of by frames. The primary never waits: when
//! a shadow's copy would pass its cap, or the process-wide buffer budget is
//! spent because shadows are not reading, that shadow is aborted (its body
//! ends in an error, so it is never delivered as if complete).

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::mpsc;

use crate::metrics::MirrorOutcome;

type ShadowFrame = Result<Frame<Bytes>, Aborted>;

/// A shadow body that ended before the request did.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("shadow request body aborted")]
pub struct Aborted;

/// Bytes handed to shadows but not yet read by them, across all requests.
#[derive(Debug)]
pub struct Budget {
    buffered: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            buffered: AtomicUsize::new(0),
            limit,
        })
    }

    fn try_take(&self, bytes: usize) -> bool {
        self.buffered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.buffered.fetch_sub(bytes, Ordering::AcqRel);
    }

    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }
}

/// Why a tap stopped early, shared with the shadow task so it reports the
/// right outcome. 0 means "not aborted by the tee".
#[derive(Debug, Default)]
pub struct AbortReason(AtomicU8);

impl AbortReason {
    fn set(&self, outcome: MirrorOutcome) {
        self.0.store(outcome as u8 + 1, Ordering::Release);
    }

    pub fn get(&self) -> Option<MirrorOutcome> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            n => MirrorOutcome::ALL.get(n as usize - 1).copied(),
        }
    }
}

/// Whether the primary's body is still being copied to the shadow given
/// this reason: its tap, which holds the other reference, is dropped when
/// the body ends (cleanly or not) or the tap is cut off.
pub fn still_feeding(reason: &Arc<AbortReason>) -> bool {
    Arc::strong_count(reason) > 1
}

/// The sending half, one per shadow.
struct Tap {
    tx: mpsc::UnboundedSender<ShadowFrame>,
    sent: u64,
    cap: u64,
    reason: Arc<AbortReason>,
}

/// Copies the primary's body frames to every live tap.
pub struct Tee {
    taps: Vec<Tap>,
    budget: Arc<Budget>,
}

impl Tee {
    pub fn new(budget: Arc<Budget>) -> Tee {
        Tee {
            taps: Vec::with_capacity(1),
            budget,
        }
    }

    /// Adds a shadow that accepts at most `cap` body bytes; returns the body
    /// to send it and the flag it reads to learn why it was cut off.
    pub fn tap(&mut self, cap: u64, size_hint: SizeHint) -> (ShadowBody, Arc<AbortReason>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let reason = Arc::new(AbortReason::default());
        self.taps.push(Tap {
            tx,
            sent: 0,
            cap,
            reason: reason.clone(),
        });
        let body = ShadowBody {
            rx: Some(rx),
            budget: Some(self.budget.clone()),
            size_hint,
        };
        (body, reason)
    }

    pub fn is_empty(&self) -> bool {
        self.taps.is_empty()
    }

    /// Offers one frame to every tap. Never blocks.
    pub fn frame(&mut self, frame: &Frame<Bytes>) {
        let budget = &self.budget;
        self.taps.retain_mut(|tap| {
            let copy = if let Some(data) = frame.data_ref() {
                let len = data.len();
                if tap.sent + len as u64 > tap.cap {
                    abort(tap, MirrorOutcome::body_too_large);
                    return false;
                }
                if !budget.try_take(len) {
                    abort(tap, MirrorOutcome::dropped_overload);
                    return false;
                }
                tap.sent += len as u64;
                Frame::data(data.clone())
            } else if let Some(trailers) = frame.trailers_ref() {
                Frame::trailers(trailers.clone())
            } else {
                return true;
            };
            let len = copy.data_ref().map_or(0, Bytes::len);
            if tap.tx.send(Ok(copy)).is_err() {
                // The shadow already gave up; nothing is buffered for it.
                budget.give_back(len);
                return false;
            }
            true
        });
    }

    /// The primary body ended cleanly: shadows get a clean end too.
    pub fn finish(&mut self) {
        self.taps.clear();
    }

    /// The primary body failed or was abandoned: shadows must not see a
    /// clean end.
    pub fn abort(&mut self) {
        for tap in self.taps.drain(..) {
            abort(&tap, MirrorOutcome::failed);
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before `finish` means the client went away mid-body.
        self.abort();
    }
}

fn abort(tap: &Tap, outcome: MirrorOutcome) {
    tap.reason.set(outcome);
    let _ = tap.tx.send(Err(Aborted));
}

/// The body a shadow request sends: the tee's frames, in order, then a clean
/// end only if the primary body ended cleanly.
pub struct ShadowBody {
    rx: Option<mpsc::UnboundedReceiver<ShadowFrame>>,
    budget: Option<Arc<Budget>>,
    size_hint: SizeHint,
}

impl ShadowBody {
    pub fn empty() -> ShadowBody {
        ShadowBody {
            rx: None,
            budget: None,
            size_hint: SizeHint::with_exact(0),
        }
    }
}

impl Body for ShadowBody {
    type Data = Bytes;
    type Error = Aborted;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Aborted>>> {
        let this = self.get_mut();
        let Some(rx) = this.rx.as_mut() else {
            return Poll::Ready(None);
        };
        let next = std::task::ready!(rx.poll_recv(cx));
        if let (Some(Ok(frame)), Some(budget)) = (&next, &this.budget) {
            budget.give_back(frame.data_ref().map_or(0, Bytes::len));
        }
        if !matches!(next, Some(Ok(_))) {
            this.rx = None;
        }
        Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.size_hint
    }
}

impl Drop for ShadowBody {
    fn drop(&mut self) {
        // Frames never read still count against the budget: return them.
        if let (Some(rx), Some(budget)) = (self.rx.as_mut(), &self.budget) {
            rx.close();
            while let Ok(frame) = rx.try_recv() {
                if let Ok(frame) = frame {
                    budget.give_back(frame.data_ref().map_or(0, Bytes::len));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn data(text: &'static str) -> Frame<Bytes> {
        Frame::data(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn clean_end_delivers_every_frame() {
        let budget = Budget::new(1024);
        let mut tee = Tee::new(budget.clone());
        let (body, reason) = tee.tap(100, SizeHint::with_exact(10));
        tee.frame(&data("hello"));
        tee.frame(&data("world"));
        assert_eq!(budget.buffered(), 10);
        tee.finish();
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"helloworld");
        assert_eq!(reason.get(), None);
        assert_eq!(budget.buffered(), 0);
    }

    #[test]
    fn a_tap_is_fed_until_the_body_ends_or_it_is_cut() {
        let mut tee = Tee::new(Budget::new(1024));
        let (_ended, ended) = tee.tap(100, SizeHint::default());
        let (_cut, cut) = tee.tap(3, SizeHint::default());
        assert!(still_feeding(&ended) && still_feeding(&cut));
        tee.frame(&data("hello"));
        assert!(still_feeding(&ended), "the body goes on");
        assert!(!still_feeding(&cut), "over its cap");
        tee.finish();
        assert!(!still_feeding(&ended));
    }

    #[tokio::test]
    async fn over_cap_aborts_instead_of_truncating() {
        let mut tee = Tee::new(Budget::new(1024));
        let (body, reason) = tee.tap(6, SizeHint::default());
        tee.frame(&data("hello"));
        tee.frame(&data("world"));
        tee.finish();
        assert!(body.collect().await.is_err());
        assert_eq!(reason.get(), Some(MirrorOutcome::body_too_large));
    }

    #[tokio::test]
    async fn exhausted_budget_aborts_the_slow_shadow() {
        let budget = Budget::new(8);
        let mut tee = Tee::new(budget.clone());
        let (body, reason) = tee.tap(1024, SizeHint::default());
        tee.frame(&data("hello"));
        tee.frame(&data("world"));
        assert_eq!(reason.get(), Some(MirrorOutcome::dropped_overload));
        drop(tee);
        assert!(body.collect().await.is_err());
        assert_eq!(budget.buffered(), 0, "unread frames are returned");
    }

    #[tokio::test]
    async fn dropping_the_tee_mid_body_aborts() {
        let mut tee = Tee::new(Budget::new(1024));
        let (body, reason) = tee.tap(1024, SizeHint::default());
        tee.frame(&data("partial"));
        drop(tee);
        assert!(body.collect().await.is_err());
        assert_eq!(reason.get(), Some(MirrorOutcome::failed));
    }
}
