//! Body wrappers on the request path. [`RequestBody`] streams the client's
//! body to the primary and feeds the mirror tee as it goes;
//! [`ResponseBody`] streams the primary's response to the client, captures a
//! prefix for analysis, and runs the end-of-exchange bookkeeping (access
//! log, analysis join) when the body ends or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::lean::primary::RawHead;
use super::pool::BoxError;
use super::upstream::UpstreamBody;
use super::LocalReply;
use crate::deadline::{Elapsed, LazySleep};
use crate::metrics::{Blame, RouteStats};
use crate::mirror::tee::Tee;

/// The primary request body: the client's stream (or nothing, for retries
/// of bodiless requests), teed to shadows when any are listening.
pub struct RequestBody {
    inner: Option<Incoming>,
    tee: Option<Tee>,
    upload: Upload,
    /// Frames read so far.
    frames: u32,
    /// Ends the body when the client sends nothing for a while.
    stall: Option<Stall>,
}

/// nginx's `client_body_timeout`: a client that sends none of its body for
/// `limit` (between two reads, not for the whole body) has it ended with
/// an error, so it holds neither its connection nor the upstream exchange.
struct Stall {
    limit: Duration,
    /// Made at the first wait; moved on at each wait after data came.
    timer: Option<Pin<Box<LazySleep>>>,
    /// Data came since the timer was last moved.
    moved: bool,
}

impl Stall {
    /// Whether the client has now sent nothing for `limit`; if not, the
    /// task is woken when it has.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = || Instant::now() + self.limit;
        let timer = match &mut self.timer {
            Some(timer) if self.moved => {
                timer.as_mut().reset(deadline());
                timer
            }
            Some(timer) => timer,
            None => self.timer.insert(Box::pin(LazySleep::until(deadline()))),
        };
        self.moved = false;
        timer.as_mut().poll_fired(cx)
    }
}

/// The client sent none of its request body for the body read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client sent none of its request body for {0:?}")]
pub struct BodyStalled(Duration);

impl RequestBody {
    /// `None`: a request that has no body (umbra's own HTTP/1.1 server
    /// reads only those).
    /// `stall_limit`: how long the client may send none of it (`None`:
    /// forever).
    /// `upload`: [`Upload::of`] the same body.
    pub fn new(
        inner: Option<Incoming>,
        tee: Option<Tee>,
        upload: Upload,
        stall_limit: Option<Duration>,
    ) -> RequestBody {
        let empty = inner.as_ref().is_none_or(Body::is_end_stream);
        let stall = stall_limit.filter(|_| !empty).map(|limit| Stall {
            limit,
            timer: None,
            moved: false,
        });
        let mut body = RequestBody {
            inner,
            tee,
            upload,
            frames: 0,
            stall,
        };
        if empty {
            // hyper never polls an empty body, so finish the tee now.
            body.finish_tee();
        }
        body
    }

    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            tee: None,
            upload: Upload::none(),
            frames: 0,
            stall: None,
        }
    }

    /// Where this body will record its progress and failure.
    pub fn upload(&self) -> Upload {
        self.upload.clone()
    }

    fn finish_tee(&mut self) {
        if let Some(mut tee) = self.tee.take() {
            tee.finish();
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let next = match Pin::new(&mut *inner).poll_frame(cx) {
            Poll::Ready(next) => {
                if let Some(stall) = &mut this.stall {
                    stall.moved = true;
                }
                this.upload.awaiting_client(false);
                next
            }
            Poll::Pending => {
                this.upload.awaiting_client(true);
                let Some(stall) = this.stall.as_mut() else {
                    return Poll::Pending;
                };
                if !stall.poll_expired(cx) {
                    return Poll::Pending;
                }
                let error = BodyStalled(stall.limit);
                this.upload.stalled();
                this.inner = None;
                // Dropping the tee aborts every shadow.
                this.tee = None;
                return Poll::Ready(Some(Err(error.into())));
            }
        };
        match &next {
            Some(Ok(frame)) => {
                if let Some(tee) = this.tee.as_mut() {
                    tee.frame(frame);
                }
                this.frames = this.frames.wrapping_add(1);
                this.upload.read(this.frames);
                // hyper stops polling once a body reports its end, so the
                // tee and the upload must learn about it here, not from a
                // `None`.
                if inner.is_end_stream() {
                    this.finish_tee();
                    this.upload.ended();
                }
            }
            None => {
                this.finish_tee();
                this.upload.ended();
            }
            Some(Err(error)) => {
                this.upload.failed(error);
                // Dropping the tee aborts every shadow.
                this.tee = None;
            }
        }
        Poll::Ready(next.map(|frame| frame.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for RequestBody {
    /// A body let go before its end (the exchange answered early or
    /// failed) sends no more: the route's timeouts count from here, as
    /// from an upload's end. (Otherwise a body left waiting for the client
    /// would put them off for as long as the response takes.)
    fn drop(&mut self) {
        self.upload.ended();
    }
}

/// What the client's request body tells the handler as it streams: how
/// far the upload has got, for the route's timeouts, which count from its
/// end (see [`RouteTimer`]); and how it failed, if it did. The upstream
/// exchange then fails too, but not always with that error: hyper's HTTP/2
/// client polls the body in a task of its own and reports only a stream
/// reset. So the body records it here, for the handler to blame the client.
/// Nothing for a request without a body.
#[derive(Clone)]
pub struct Upload(Option<Arc<UploadState>>);

#[derive(Default)]
struct UploadState {
    /// 0 until it fails, then GONE, MALFORMED or STALLED.
    failure: AtomicU8,
    /// Frames read so far (wrapping).
    frames: AtomicU32,
    /// The body was last left waiting for the client's next frame.
    awaiting_client: AtomicBool,
    /// When its last frame was read.
    ended: OnceLock<Instant>,
}

impl Upload {
    /// For the client's request `body`.
    pub fn of(body: Option<&Incoming>) -> Upload {
        let empty = body.is_none_or(Body::is_end_stream);
        Upload((!empty).then(Arc::default))
    }

    /// For a request without a body.
    pub fn none() -> Upload {
        Upload(None)
    }

    const GONE: u8 = 1;
    const MALFORMED: u8 = 2;
    const STALLED: u8 = 3;

    fn read(&self, frames: u32) {
        if let Some(state) = &self.0 {
            state.frames.store(frames, Ordering::Relaxed);
        }
    }

    fn awaiting_client(&self, waiting: bool) {
        if let Some(state) = &self.0 {
            state.awaiting_client.store(waiting, Ordering::Relaxed);
        }
    }

    fn ended(&self) {
        if let Some(state) = &self.0 {
            let _ = state.ended.set(Instant::now());
        }
    }

    fn stalled(&self) {
        if let Some(state) = &self.0 {
            state.failure.store(Upload::STALLED, Ordering::Relaxed);
        }
    }

    fn failed(&self, error: &hyper::Error) {
        if let Some(state) = &self.0 {
            let kind = if client_gone(error) {
                Upload::GONE
            } else {
                Upload::MALFORMED
            };
            state.failure.store(kind, Ordering::Relaxed);
        }
    }

    /// The reply that blames the client, if its body failed.
    pub fn reply(&self) -> Option<LocalReply> {
        match self.0.as_ref()?.failure.load(Ordering::Relaxed) {
            Upload::GONE => Some(LocalReply::ClientGone),
            Upload::MALFORMED => Some(LocalReply::RequestBody),
            Upload::STALLED => Some(LocalReply::RequestTimeout),
            _ => None,
        }
    }

    /// Frames read so far, if there is a body.
    fn frames(&self) -> u32 {
        self.0
            .as_ref()
            .map_or(0, |state| state.frames.load(Ordering::Relaxed))
    }
}

pin_project_lite::pin_project! {
    /// A route's `timeout` or `perTryTimeout`, or a shadow's timeout. Envoy
    /// starts the first two when it has the client's whole request, so a
    /// slow upload does not use them up.
    /// umbra reads the body as it sends it, so the timer starts with the
    /// exchange (a request waiting for a connection has its time counted,
    /// as Envoy's buffered one has) and, on firing, looks at the upload:
    /// over, the timeout is moved to `limit` past its end; still under way,
    /// it waits `limit` more if the exchange moved since last looked at
    /// (a frame of the upload, or of a response already streaming back: a
    /// bidirectional stream) or if umbra is waiting for the client's next
    /// frame (a client that stalls is the body read timeout's to end, as
    /// the client's failure), and fires if neither: the upstream, or the
    /// wait for one, holds the upload up.
    pub struct RouteTimer {
        #[pin]
        sleep: LazySleep,
        limit: Duration,
        upload: Upload,
        // The upload's frame count when last looked at.
        frames: u32,
        // Response data came since last looked at.
        heard: bool,
    }
}

impl RouteTimer {
    /// Started now.
    pub fn new(limit: Duration, upload: Upload) -> RouteTimer {
        RouteTimer {
            sleep: LazySleep::until(Instant::now() + limit),
            limit,
            frames: upload.frames(),
            upload,
            heard: false,
        }
    }

    /// Whether it has fired; if not, the task is woken when it may have.
    pub fn poll_fired(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        while self.as_mut().project().sleep.poll_fired(cx) {
            if !self.as_mut().put_off() {
                return true;
            }
        }
        false
    }

    /// Whether it has fired, by the clock (registers nothing): for a body
    /// whose data keeps coming.
    pub fn passed(mut self: Pin<&mut Self>) -> bool {
        while self.sleep.passed() {
            if !self.as_mut().put_off() {
                return true;
            }
        }
        false
    }

    /// Response data came.
    pub fn heard(self: Pin<&mut Self>) {
        *self.project().heard = true;
    }

    /// Runs `future` until it finishes or the timer fires. (A future of
    /// its own rather than an async fn, which would hold `future` twice.)
    pub fn bound<F: Future>(self: Pin<&mut Self>, future: F) -> Bound<'_, F> {
        Bound {
            timer: self,
            future,
        }
    }

    /// Called when the deadline has passed: moves it if the upload gives
    /// the request more time (see the type's description).
    fn put_off(self: Pin<&mut Self>) -> bool {
        let this = self.project();
        let Some(state) = &this.upload.0 else {
            return false;
        };
        let now = Instant::now();
        let later = match state.ended.get() {
            Some(&end) => Some(end + *this.limit).filter(|&at| at > now),
            None => {
                let frames = state.frames.load(Ordering::Relaxed);
                let moved = std::mem::replace(this.frames, frames) != frames;
                let heard = std::mem::take(this.heard);
                let awaiting = state.awaiting_client.load(Ordering::Relaxed);
                (moved || heard || awaiting).then(|| now + *this.limit)
            }
        };
        match later {
            Some(at) => {
                this.sleep.reset(at);
                true
            }
            None => false,
        }
    }
}

pin_project_lite::pin_project! {
    /// [`RouteTimer::bound`].
    pub struct Bound<'a, F> {
        timer: Pin<&'a mut RouteTimer>,
        #[pin]
        future: F,
    }
}

impl<F: Future> Future for Bound<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(output) = this.future.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        match this.timer.as_mut().poll_fired(cx) {
            true => Poll::Ready(Err(Elapsed)),
            false => Poll::Pending,
        }
    }
}

/// Whether a body error means the client went away (its connection ended
/// mid-body) rather than sent something malformed.
fn client_gone(error: &hyper::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut next = std::error::Error::source(error);
    while let Some(cause) = next {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
            );
        }
        next = cause.source();
    }
    error.is_incomplete_message() || error.is_canceled()
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    /// The upstream broke off mid-body (reset, closed early, protocol
    /// error); the client's response is broken off too.
    UpstreamCut,
    /// The client went away before the body was sent.
    ClientGone,
    /// The client's request body turned out malformed after the response
    /// head, failing the upstream exchange.
    RequestBodyError,
    /// The client stopped sending its request body after the response
    /// head, for the body read timeout.
    RequestBodyTimeout,
    /// The drain timeout cut the response at shutdown.
    Drained,
    /// The route's `timeout` ran out mid-body; the client's stream is reset.
    TimedOut,
    /// The client took none of it for `--send-timeout`.
    SendTimeout,
}

impl Ending {
    /// Whose failure an unfinished body was, and its reason for the
    /// access log and the error families (Envoy's response code details).
    pub fn failure(self) -> Option<(Blame, &'static str)> {
        match self {
            Ending::Complete => None,
            Ending::UpstreamCut => Some((Blame::Upstream, "upstream_reset_after_response_started")),
            Ending::TimedOut => Some((Blame::Upstream, "upstream_response_timeout")),
            Ending::ClientGone => Some((Blame::Downstream, "downstream_body_incomplete")),
            Ending::SendTimeout => Some((Blame::Downstream, "downstream_send_timeout")),
            Ending::RequestBodyError => Some((Blame::Downstream, "downstream_request_body_error")),
            Ending::RequestBodyTimeout => Some((Blame::Downstream, "request_body_timeout")),
            Ending::Drained => Some((Blame::Downstream, "drain_timeout")),
        }
    }
}

/// What a primary response body that does not finish is counted against.
pub struct Failures {
    pub stats: Arc<RouteStats>,
    /// A request body that broke fails the upstream's response body too:
    /// the client's doing, not the upstream's.
    pub request: Upload,
    /// Set when the drain timeout cuts what is in flight: a body dropped
    /// unfinished then was cut by the server, not left by its client.
    pub stopping: Arc<AtomicBool>,
}

impl Failures {
    /// `ending` with the blame put where it belongs.
    fn refine(&self, ending: Ending) -> Ending {
        match (ending, self.request.reply()) {
            (Ending::UpstreamCut | Ending::ClientGone, Some(LocalReply::RequestBody)) => {
                Ending::RequestBodyError
            }
            (Ending::UpstreamCut | Ending::ClientGone, Some(LocalReply::RequestTimeout)) => {
                Ending::RequestBodyTimeout
            }
            (Ending::UpstreamCut | Ending::ClientGone, Some(_)) => Ending::ClientGone,
            (Ending::ClientGone, None) if self.stopping.load(Ordering::Relaxed) => Ending::Drained,
            (other, _) => other,
        }
    }
}

/// Called once when a response body finishes.
pub trait OnEnd: Send + 'static {
    fn on_end(self: Box<Self>, bytes: u64, ending: Ending, captured: Option<Bytes>);
}

/// The route's `timeout` ran out while the response body was streaming.
#[derive(Debug, thiserror::Error)]
#[error("upstream response timed out (route timeout)")]
pub struct ResponseTimeout;

/// The response sent to the client: the primary's body, or umbra's own
/// short error body.
pub struct ResponseBody {
    kind: Kind,
    /// The route's `timeout`, which covers the whole response as in Envoy;
    /// polled while the upstream body is pending, compared with the clock
    /// when a chunk arrives.
    timeout: Option<Pin<Box<RouteTimer>>>,
    bytes: u64,
    /// Prefix captured for analysis, and how much may still be kept.
    capture: Option<(Vec<Bytes>, usize)>,
    end: Option<Box<dyn OnEnd>>,
    /// Counts the body's failure if it does not finish (taken when it ends).
    failures: Option<Failures>,
}

enum Kind {
    Upstream(UpstreamBody<RequestBody>),
    Local(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(
        body: UpstreamBody<RequestBody>,
        capture_limit: Option<usize>,
        end: Option<Box<dyn OnEnd>>,
        timeout: Option<Pin<Box<RouteTimer>>>,
        failures: Failures,
    ) -> ResponseBody {
        let mut body = ResponseBody {
            kind: Kind::Upstream(body),
            timeout,
            bytes: 0,
            capture: capture_limit.map(|limit| (Vec::new(), limit)),
            end,
            failures: Some(failures),
        };
        if body.is_end_stream() {
            body.finish(Ending::Complete);
        }
        body
    }

    /// `text` as the body (none if empty: the response head ends the
    /// stream).
    pub fn local(text: &'static str) -> ResponseBody {
        ResponseBody::bytes(Bytes::from_static(text.as_bytes()))
    }

    /// A body umbra has in full (a route's `directResponse`).
    pub fn bytes(body: Bytes) -> ResponseBody {
        ResponseBody {
            kind: Kind::Local((!body.is_empty()).then_some(body)),
            timeout: None,
            bytes: 0,
            capture: None,
            end: None,
            failures: None,
        }
    }

    pub fn with_end(mut self, end: Box<dyn OnEnd>) -> ResponseBody {
        self.end = Some(end);
        if self.is_end_stream() {
            self.finish(Ending::Complete);
        }
        self
    }

    /// The upstream response's header lines, when they came as
    /// [`HeaderLines::Raw`](super::upstream::HeaderLines::Raw), for the
    /// server to write.
    pub fn take_raw_head(&mut self) -> Option<RawHead> {
        match &mut self.kind {
            Kind::Upstream(body) => body.take_raw_head(),
            Kind::Local(_) => None,
        }
    }

    /// Ends it for the client's stall (`--send-timeout`), before it drops.
    pub fn end_for_send_timeout(&mut self) {
        self.finish(Ending::SendTimeout);
    }

    fn finish(&mut self, mut ending: Ending) {
        if let Some(failures) = self.failures.take() {
            ending = failures.refine(ending);
            if let Some((blame, reason)) = ending.failure() {
                failures.stats.failure(blame, reason);
            }
        }
        if let Some(end) = self.end.take() {
            let captured = self
                .capture
                .take()
                .map(|(chunks, _)| crate::mirror::concat(chunks));
            end.on_end(self.bytes, ending, captured);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let next = match &mut this.kind {
            Kind::Local(bytes) => bytes.take().map(|b| Ok(Frame::data(b))),
            Kind::Upstream(body) => {
                let next = Pin::new(body).poll_frame(cx);
                let expired = match (&next, this.timeout.as_mut()) {
                    (Poll::Pending, Some(timeout)) => timeout.as_mut().poll_fired(cx),
                    // Data keeps coming, but a client reading slowly must
                    // not stretch the route's timeout past Envoy's.
                    (Poll::Ready(Some(_)), Some(timeout)) => {
                        timeout.as_mut().heard();
                        timeout.as_mut().passed()
                    }
                    _ => false,
                };
                if expired {
                    // Dropping the upstream body closes its connection.
                    this.kind = Kind::Local(None);
                    this.timeout = None;
                    this.finish(Ending::TimedOut);
                    return Poll::Ready(Some(Err(ResponseTimeout.into())));
                }
                match next {
                    Poll::Ready(next) => next,
                    Poll::Pending => return Poll::Pending,
                }
            }
        };
        match &next {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                    if let Some((chunks, room)) = this.capture.as_mut() {
                        if *room > 0 {
                            let take = data.len().min(*room);
                            // A refcounted slice, not a copy.
                            chunks.push(data.slice(..take));
                            *room -= take;
                        }
                    }
                }
                // Trailers are the last frame: hyper stops polling after them.
                if frame.is_trailers() || this.is_end_stream() {
                    this.finish(Ending::Complete);
                }
            }
            None => this.finish(Ending::Complete),
            Some(Err(_)) => this.finish(Ending::UpstreamCut),
        }
        Poll::Ready(next)
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Local(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Local(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Local(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Still pending here means the client disconnected mid-body.
        self.finish(Ending::ClientGone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload left waiting for the client puts the route timer off;
    /// once its body is let go unfinished, the timer counts from then.
    #[tokio::test(start_paused = true)]
    async fn a_body_let_go_unfinished_starts_the_route_timeout() {
        let upload = Upload(Some(Arc::default()));
        let body = RequestBody {
            inner: None,
            tee: None,
            upload: upload.clone(),
            frames: 0,
            stall: None,
        };
        upload.awaiting_client(true);
        let limit = Duration::from_millis(100);
        let started = Instant::now();
        let timer = std::pin::pin!(RouteTimer::new(limit, upload));
        let exchange = async move {
            // The paused clock's timeline: the exchange lets the body go
            // at 250 ms and never answers.
            tokio::time::sleep(Duration::from_millis(250)).await;
            drop(body);
            std::future::pending::<()>().await
        };
        let bounded = tokio::time::timeout(Duration::from_secs(60), timer.bound(exchange));
        assert!(
            matches!(bounded.await, Ok(Err(Elapsed))),
            "the timer must fire"
        );
        assert_eq!(started.elapsed(), Duration::from_millis(350));
    }
}
