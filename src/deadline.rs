//! Timers for the per-request path that cost little while they have not
//! fired.
//!
//! Polling a tokio `Sleep` re-registers the task's waker each time (about
//! 350 instructions, several times per request). A [`LazySleep`] polls it
//! once, then only when it has fired or the task's waker changed: the timer
//! keeps the waker it was given.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pin_project_lite::pin_project! {
    /// A `Sleep` that is polled only when it may have fired.
    pub struct LazySleep {
        // The timer itself; polled only as described above.
        #[pin]
        sleep: Sleep,
        // The waker the timer will wake, once registered.
        waker: Option<Waker>,
    }
}

impl LazySleep {
    pub fn until(deadline: Instant) -> LazySleep {
        LazySleep {
            sleep: tokio::time::sleep_until(deadline),
            waker: None,
        }
    }

    /// Moves the deadline; the next [`poll_fired`](Self::poll_fired)
    /// registers again.
    pub fn reset(self: Pin<&mut Self>, deadline: Instant) {
        let this = self.project();
        this.sleep.reset(deadline);
        *this.waker = None;
    }

    /// Whether the deadline has passed, by the clock (registers nothing).
    pub fn passed(&self) -> bool {
        Instant::now() >= self.sleep.deadline()
    }

    /// Whether the deadline has passed; if not, the task is woken when it
    /// does.
    pub fn poll_fired(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        // Fired, read without polling: a future that spends the task's coop
        // budget on every poll (a shadow reading an endless body as fast as
        // it comes) would have each poll of the timer refused.
        if this.sleep.is_elapsed() {
            return true;
        }
        let registered = this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered {
            return false;
        }
        // Out of coop budget, tokio returns Pending without registering
        // (and has the task polled again): read the clock instead, and
        // register on a later poll, which the task is woken for as tokio
        // would: nothing else may be left to wake it (a stalled body).
        if !tokio::task::coop::has_budget_remaining() {
            let passed = Instant::now() >= this.sleep.deadline();
            if !passed {
                cx.waker().wake_by_ref();
            }
            return passed;
        }
        if this.sleep.poll(cx).is_ready() {
            return true;
        }
        *this.waker = Some(cx.waker().clone());
        false
    }
}

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `tokio::time::timeout` with a [`LazySleep`].
    pub struct Deadline<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: LazySleep,
    }
}

/// Runs `future` for at most `limit`.
pub fn within<F: Future>(limit: Duration, future: F) -> Deadline<F> {
    Deadline {
        future,
        sleep: LazySleep::until(Instant::now() + limit),
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(done) = this.future.poll(cx) {
            return Poll::Ready(Ok(done));
        }
        if this.sleep.poll_fired(cx) {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_deadline_cuts_a_future_that_never_finishes() {
        let cut = within(Duration::from_secs(5), std::future::pending::<()>()).await;
        assert_eq!(cut, Err(Elapsed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_finishes_in_time_keeps_its_output() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            7
        };
        assert_eq!(within(Duration::from_secs(5), slow).await, Ok(7));
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_poll_without_coop_budget_still_fires_later() {
        let start = Instant::now();
        let mut sleep = std::pin::pin!(LazySleep::until(start + Duration::from_secs(1)));
        // Spend the task's budget, then poll the timer for the first time.
        std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
            }
            Poll::Ready(sleep.as_mut().poll_fired(cx))
        })
        .await;
        // Had the refused poll kept the waker, nothing would wake this.
        let fired = std::future::poll_fn(|cx| {
            if sleep.as_mut().poll_fired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let fired = tokio::time::timeout(Duration::from_secs(60), fired).await;
        assert!(fired.is_ok(), "the timer never woke the task");
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    /// The body read timeout's case: the timer is the only thing left to
    /// wake the task (the client sends nothing), and its first poll comes
    /// when the task's budget is spent.
    #[tokio::test(start_paused = true)]
    async fn a_first_poll_without_coop_budget_has_the_task_polled_again() {
        let start = Instant::now();
        let task = tokio::spawn(async move {
            let mut sleep = std::pin::pin!(LazySleep::until(start + Duration::from_secs(1)));
            let mut first = true;
            std::future::poll_fn(|cx| {
                if std::mem::take(&mut first) {
                    while tokio::task::coop::has_budget_remaining() {
                        let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
                    }
                }
                match sleep.as_mut().poll_fired(cx) {
                    true => Poll::Ready(()),
                    false => Poll::Pending,
                }
            })
            .await
        });
        let fired = tokio::time::timeout(Duration::from_secs(60), task).await;
        assert!(fired.is_ok(), "nothing woke the task");
        assert_eq!(Instant::now() - start, Duration::from_secs(1));
    }

    /// Real time: a task that never idles does not let paused time move.
    #[tokio::test]
    async fn a_future_that_spends_its_budget_on_every_poll_is_still_cut() {
        let busy = std::future::poll_fn(|cx| {
            while tokio::task::coop::has_budget_remaining() {
                let _ = std::pin::pin!(tokio::task::consume_budget()).poll(cx);
            }
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        let cut = tokio::time::timeout(
            Duration::from_secs(10),
            within(Duration::from_millis(20), busy),
        )
        .await;
        assert_eq!(cut, Ok(Err(Elapsed)), "the deadline was never seen");
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_sleep_fires_at_its_new_deadline() {
        let start = Instant::now();
        let mut sleep = std::pin::pin!(LazySleep::until(start + Duration::from_secs(1)));
        let fired = std::future::poll_fn(|cx| Poll::Ready(sleep.as_mut().poll_fired(cx))).await;
        assert!(!fired);
        sleep.as_mut().reset(start + Duration::from_secs(3));
        std::future::poll_fn(|cx| {
            if sleep.as_mut().poll_fired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert_eq!(Instant::now() - start, Duration::from_secs(3));
    }
}
