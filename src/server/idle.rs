//! Closes downstream connections that sit idle: an HTTP/1 keep-alive
//! connection waiting for its next request, a client that opened a
//! connection and never sent one, or one trickling a request head in
//! (slowloris).
//!
//! hyper's own `header_read_timeout` does this for HTTP/1 by arming a timer
//! for every request (a boxed `Sleep` registered with and removed from the
//! timer wheel each time: ~1.9k instructions, 5% of a proxied request).
//! Here one timer per connection (a [`LazySleep`]) samples a request
//! counter a few times per timeout instead, so busy connections cost two
//! counter updates per request. The price is precision: an idle connection
//! is found between `timeout` and 1.25 × `timeout` after it went idle.
//!
//! It is then asked to finish, as a draining server asks every connection
//! ([`Drain`]): HTTP/2 sends GOAWAY, so a client that connected ahead of
//! its requests learns why the connection ends, and an idle HTTP/1
//! connection closes at once. One still idle a quarter of the timeout later
//! (a slowloris head, a client ignoring the GOAWAY) is dropped, which
//! closes the socket: at most 1.5 × `timeout` in all. One that began a
//! request meanwhile is left to finish it (keep-alive is off by then).
//!
//! The same checks find a client that stopped taking its response (nginx's
//! `send_timeout`): a response body that hyper pulled data from and then
//! did not poll again for the send timeout, because the client's socket is
//! full (HTTP/1) or the stream has no flow-control window (HTTP/2). An
//! HTTP/1 connection is dropped, which closes it and the upstream exchange
//! feeding it. An HTTP/2 stream loses its body, which ends the upstream
//! exchange at once; hyper resets the stream when the client next grants
//! it window, and the connection's other streams carry on. hyper cannot
//! reset it before (its stream task waits for window and nothing else), so
//! a stream still stalled one more send timeout later has its connection
//! dropped. A body waiting for its upstream is not the client's stall:
//! silence from the upstream (long polls, event streams) is the route
//! timeout's business. On HTTP/1, as with nginx, the time counts from the
//! last write to the client that moved bytes ([`Progress`]): a slow client
//! that keeps reading is not cut while one large chunk goes out (hyper
//! takes no new chunk while ~400 KiB wait to be written). A blocked write
//! is retried only once the kernel's send buffer has drained by about a
//! third, so the client must read that much per send timeout (up to ~1.3
//! MiB with Linux's default 4 MiB limit), as with nginx. On HTTP/2 it
//! counts from the last chunk the stream took, and streams take large
//! chunks in pieces of at most 64 KiB ([`PIECE`]): a stream whose client
//! takes less than that per send timeout is cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::Version;
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::conn::auto::UpgradeableConnection;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::deadline::LazySleep;

/// Checks per timeout; a connection is cut when it was idle at this many
/// checks in a row plus the one that started the idle stretch.
const CHECKS: u8 = 4;

/// What one downstream connection is doing, shared by its requests and its
/// [`IdleCut`].
#[derive(Default)]
pub struct Activity {
    /// Requests begun on the connection (wrapping).
    started: AtomicU32,
    /// Requests whose response is not yet fully sent.
    active: AtomicU32,
    /// Served HTTP/2: idle connections are left to HTTP/2 keep-alive.
    multiplexed: AtomicBool,
    /// Polls of response bodies (wrapping).
    polls: AtomicU32,
    /// Writes to the client that moved bytes (wrapping; by [`Progress`]).
    written: AtomicU32,
    /// The last poll of the response body found data: until the next one,
    /// the response waits for the client, not for its upstream.
    sending: AtomicBool,
    /// HTTP/2 response bodies being sent, each watched on its own (with a
    /// send timeout only).
    streams: Mutex<Vec<Weak<dyn Stalls>>>,
    /// A send timeout is set: without one, streams cost no watching.
    watch_streams: bool,
    /// A stream was added to `streams`: the checks resume if they lapsed.
    streams_added: AtomicBool,
    /// The [`IdleCut`] while its checks have lapsed.
    idle_cut: AtomicWaker,
    /// Cuts for the send timeout: HTTP/1 connections, HTTP/2 streams'
    /// upstreams, HTTP/2 connections with a stream stalled past the cut.
    send_timeouts: Counter,
    /// Set before the connection is dropped for a stalled client, so the
    /// response bodies dropped with it know why.
    stalled: AtomicBool,
    /// The connection was asked to finish (umbra's own HTTP/1.1 server
    /// reads it between requests).
    finishing: AtomicBool,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity")
            .field("started", &self.started)
            .field("active", &self.active)
            .finish_non_exhaustive()
    }
}

impl Activity {
    /// Counts cuts for the send timeout in `send_timeouts`; HTTP/2
    /// streams are watched only with `watch_streams` (a send timeout).
    pub fn new(send_timeouts: Counter, watch_streams: bool) -> Activity {
        Activity {
            send_timeouts,
            watch_streams,
            ..Activity::default()
        }
    }

    /// Marks a request begun; the connection counts as busy until the
    /// returned guard drops (held by the response body).
    pub fn begin(self: &Arc<Self>, version: Version) -> Busy {
        self.started.fetch_add(1, Relaxed);
        self.active.fetch_add(1, Relaxed);
        if version == Version::HTTP_2 {
            self.multiplexed.store(true, Relaxed);
        }
        Busy(self.clone())
    }

    /// Asks the connection to finish after its response in flight.
    pub fn finish(&self) {
        self.finishing.store(true, Relaxed);
    }

    /// Whether the connection was asked to finish.
    pub fn finishing(&self) -> bool {
        self.finishing.load(Relaxed)
    }

    /// Counts a write that moved bytes.
    #[inline]
    fn wrote(&self, written: &Poll<std::io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            // One task writes at a time (the connection's, then an upgrade's
            // tunnel, whose counts nobody reads): no read-modify-write needed.
            self.written
                .store(self.written.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    fn watch(&self, stream: Weak<dyn Stalls>) {
        let mut streams = lock(&self.streams);
        // Ended streams are pruned when the list would grow: amortised
        // O(1), and never longer than twice the most streams open at once.
        if streams.len() == streams.capacity() {
            streams.retain(|stream| stream.strong_count() > 0);
        }
        streams.push(stream);
        drop(streams);
        if !self.streams_added.swap(true, Relaxed) {
            self.idle_cut.wake();
        }
    }

    /// One send-timeout check of every HTTP/2 stream: cuts those stalled
    /// past `limit` checks in a row. Says whether any stream is left to
    /// watch, and whether one stayed stalled long past its cut.
    fn check_streams(&self, limit: u32) -> (bool, bool) {
        let mut streams = lock(&self.streams);
        let mut stuck = false;
        streams.retain(|stream| match stream.upgrade() {
            Some(stream) => {
                stuck |= stream.check(limit, &self.send_timeouts);
                true
            }
            None => false,
        });
        (!streams.is_empty(), stuck)
    }
}

pin_project_lite::pin_project! {
    /// A connection's socket that counts, in its [`Activity`], the writes
    /// that moved bytes: the send timeout runs from the last of them.
    pub struct Progress<T> {
        // The socket.
        #[pin]
        io: T,
        // Where its writes are counted.
        activity: Arc<Activity>,
    }
}

impl<T> Progress<T> {
    pub fn new(io: T, activity: Arc<Activity>) -> Progress<T> {
        Progress { io, activity }
    }
}

impl<T: AsyncRead> AsyncRead for Progress<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for Progress<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write(cx, buf);
        this.activity.wrote(&written);
        written
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let written = this.io.poll_write_vectored(cx, bufs);
        this.activity.wrote(&written);
        written
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A request in flight on its connection.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.sending.store(false, Relaxed);
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// A response body told why it is dropped before its end.
pub trait Stallable {
    /// The client took none of it for the send timeout; it is dropped next.
    fn send_timed_out(&mut self) {}
}

/// A response body that keeps its connection [`Busy`] until it is sent
/// (or dropped), and lets the connection's checks find it stalled.
pub struct Held<B: Stallable> {
    body: Holding<B>,
    busy: Busy,
}

impl<B: Stallable> Drop for Held<B> {
    fn drop(&mut self) {
        if !self.busy.0.stalled.load(Relaxed) {
            return;
        }
        match &mut self.body {
            Holding::Alone(body) => body.send_timed_out(),
            Holding::Stream(stream) => {
                if let Some(taking) = lock(&stream.body).as_mut() {
                    taking.body.send_timed_out();
                }
            }
        }
    }
}

enum Holding<B> {
    /// HTTP/1: one response at a time, watched through the [`Activity`].
    Alone(B),
    /// HTTP/2: watched on its own, so the checks can take the body away.
    Stream(Arc<Watched<B>>),
}

impl<B: Stallable> Held<B> {
    /// The response is being written to the client, whose socket may be
    /// full: the send timeout runs (a poll that found data says the same;
    /// a write after one that found none, or after the body's end, needs
    /// this).
    #[inline]
    pub fn waiting_for_client(&self) {
        self.busy.0.sending.store(true, Relaxed);
    }
}

impl<B: Body + Stallable + Send + 'static> Held<B> {
    #[inline]
    pub fn new(body: B, busy: Busy) -> Held<B> {
        let activity = &busy.0;
        let body = if activity.watch_streams
            && activity.multiplexed.load(Relaxed)
            && !body.is_end_stream()
        {
            Holding::Stream(Watched::register(body, &busy.0))
        } else {
            Holding::Alone(body)
        };
        Held { body, busy }
    }
}

/// The response was cut because the client took none of it for the send
/// timeout.
#[derive(Debug, thiserror::Error)]
#[error("client took none of the response for the send timeout")]
pub struct SendTimeout;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> Body for Held<B>
where
    B: Body<Data = Bytes> + Stallable + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let next = match &mut this.body {
            Holding::Alone(body) => {
                let activity = &this.busy.0;
                activity.polls.fetch_add(1, Relaxed);
                let next = Pin::new(body).poll_frame(cx);
                activity.sending.store(next.is_ready(), Relaxed);
                next
            }
            Holding::Stream(stream) => return stream.poll_frame(cx),
        };
        next.map(|frame| frame.map(|frame| frame.map_err(Into::into)))
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.body {
            Holding::Alone(body) => body.is_end_stream(),
            Holding::Stream(stream) => stream.is_end_stream(),
        }
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Holding::Alone(body) => body.size_hint(),
            Holding::Stream(stream) => stream.size_hint(),
        }
    }
}

impl<B> Watched<B>
where
    B: Body<Data = Bytes> + Stallable + Unpin,
    B::Error: Into<BoxError>,
{
    /// Out of line, so HTTP/1's path stays small enough to inline.
    #[inline(never)]
    fn poll_frame(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.polls.fetch_add(1, Relaxed);
        let mut taking = lock(&self.body);
        let Some(taking) = taking.as_mut() else {
            // hyper resets the stream.
            return Poll::Ready(Some(Err(SendTimeout.into())));
        };
        if !taking.rest.is_empty() {
            self.sending.store(true, Relaxed);
            let piece = taking.rest.split_to(taking.rest.len().min(PIECE));
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let next = Pin::new(&mut taking.body).poll_frame(cx);
        self.sending.store(next.is_ready(), Relaxed);
        next.map(|frame| {
            frame.map(|frame| match frame {
                Ok(frame) => Ok(taking.piece(frame)),
                Err(error) => Err(error.into()),
            })
        })
    }

    #[inline(never)]
    fn is_end_stream(&self) -> bool {
        // A body taken away must be polled to its error, not ended.
        lock(&self.body).as_ref().is_some_and(Taking::is_end_stream)
    }

    #[inline(never)]
    fn size_hint(&self) -> SizeHint {
        let taking = lock(&self.body);
        let Some(taking) = taking.as_ref() else {
            return SizeHint::default();
        };
        let body = taking.body.size_hint();
        let rest = taking.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(body.lower().saturating_add(rest));
        if let Some(upper) = body.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint
    }
}

/// The most of a chunk an HTTP/2 stream gives hyper at once. hyper takes
/// the next chunk only once h2 has sent most of the last one, and the
/// send timeout counts from the last chunk taken: a whole 400 KiB chunk
/// would let a client reading under 7 KiB/s look stalled at 60 s.
const PIECE: usize = 64 * 1024;

/// A watched body, and what is left of its last chunk.
struct Taking<B> {
    /// The response body.
    body: B,
    /// What hyper has not been given yet of the last chunk taken.
    rest: Bytes,
}

impl<B: Body> Taking<B> {
    /// Nothing more to give: the body has ended and its last chunk is out.
    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    /// `frame`, or its first [`PIECE`] bytes, the rest kept for the next
    /// polls (the split shares the chunk's buffer).
    fn piece(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        match frame.into_data() {
            Ok(mut data) => {
                if data.len() > PIECE {
                    self.rest = data.split_off(PIECE);
                }
                Frame::data(data)
            }
            Err(frame) => frame,
        }
    }
}

/// An HTTP/2 response body and what the send-timeout checks know of it.
struct Watched<B> {
    /// Taken away (and dropped, ending the upstream exchange) when the
    /// stream is cut.
    body: Mutex<Option<Taking<B>>>,
    /// Polls of the body (wrapping).
    polls: AtomicU32,
    /// The last poll found data (see [`Activity::sending`]).
    sending: AtomicBool,
    /// `polls` at the previous check.
    seen: AtomicU32,
    /// Checks in a row that found the body waiting for the client.
    stalled_checks: AtomicU32,
}

/// A stream the connection's checks can cut.
trait Stalls: Send + Sync {
    /// One check: cuts the stream's upstream (counted in `cuts`) when it
    /// has waited for the client for more than `limit` checks in a row;
    /// true when it is still waiting one more send timeout later, which
    /// only dropping the connection ends.
    fn check(&self, limit: u32, cuts: &Counter) -> bool;
}

impl<B: Body + Stallable + Send + 'static> Watched<B> {
    #[inline(never)]
    fn register(body: B, activity: &Activity) -> Arc<Watched<B>> {
        let stream = Arc::new(Watched {
            body: Mutex::new(Some(Taking {
                body,
                rest: Bytes::new(),
            })),
            polls: AtomicU32::new(0),
            // hyper polls a new stream's body at once; until then it
            // counts as waiting for the client.
            sending: AtomicBool::new(true),
            seen: AtomicU32::new(0),
            stalled_checks: AtomicU32::new(0),
        });
        let watched: Arc<dyn Stalls> = stream.clone();
        activity.watch(Arc::downgrade(&watched));
        stream
    }
}

impl<B: Body + Stallable + Send> Stalls for Watched<B> {
    fn check(&self, limit: u32, cuts: &Counter) -> bool {
        let polls = self.polls.load(Relaxed);
        let stalled = polls == self.seen.swap(polls, Relaxed) && self.sending.load(Relaxed);
        let checks = if stalled {
            self.stalled_checks.load(Relaxed).saturating_add(1)
        } else {
            0
        };
        self.stalled_checks.store(checks, Relaxed);
        if checks <= limit {
            return false;
        }
        let taken = {
            let mut body = lock(&self.body);
            // A body at its end, with nothing left of its last chunk, has
            // nothing more to take from its upstream (hyper holds that chunk).
            match body.as_ref().is_some_and(Taking::is_end_stream) {
                true => None,
                false => body.take(),
            }
        };
        if let Some(mut taking) = taken {
            // Counted first: the upstream sees its exchange end at the drop.
            cuts.inc();
            taking.body.send_timed_out();
            drop(taking);
        }
        checks > limit.saturating_mul(2).saturating_add(1)
    }
}

/// A connection that can be asked to finish: HTTP/2 sends GOAWAY and ends
/// after its open streams, HTTP/1 closes once the response in flight is
/// sent (at once when idle). hyper-util's `GracefulConnection` says the same
/// but is sealed, so no test double could stand in for a connection.
pub trait Graceful: Future {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl<I, B, S, E> Graceful for UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<hyper::body::Incoming>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: 'static,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Asks every connection to finish, then waits until they have (what
/// hyper-util's `GracefulShutdown` does, delivered through [`IdleCut`]).
pub struct Drain {
    /// Sent once to start draining; every connection holds a receiver
    /// until it ends, so `closed()` means all have.
    tx: watch::Sender<()>,
}

/// Resolves when the server drains, to the receiver that keeps the drain
/// waiting until the connection ends.
type Signal = Pin<Box<dyn Future<Output = watch::Receiver<()>> + Send>>;

/// A connection's view of the drain. Polling the signal re-registers its
/// waker under a lock (tokio's `Notify`), on every poll of the connection;
/// a task's waker does not change, so the signal is polled again only when
/// the waker is another or the drain has begun (one atomic load).
pub struct DrainWatch {
    signal: Signal,
    /// Peeks at the drain without registering anything.
    peek: watch::Receiver<()>,
    /// The waker the signal was last polled with.
    waker: Option<Waker>,
}

impl DrainWatch {
    /// Ready once the drain has begun; the watch is spent then.
    pub fn poll_begun(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.poll(cx).map(|_| ())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<watch::Receiver<()>> {
        let registered = self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        if registered && !self.peek.has_changed().unwrap_or(true) {
            return Poll::Pending;
        }
        self.waker = Some(cx.waker().clone());
        self.signal.as_mut().poll(cx)
    }
}

impl Drain {
    pub fn new() -> Drain {
        Drain {
            tx: watch::channel(()).0,
        }
    }

    /// A connection's (or a connection-to-be's) hold on the drain.
    pub fn watch(&self) -> DrainWatch {
        let mut rx = self.tx.subscribe();
        DrainWatch {
            peek: rx.clone(),
            signal: Box::pin(async move {
                let _ = rx.changed().await;
                rx
            }),
            waker: None,
        }
    }

    /// Signals every connection, then waits for all of them to end.
    pub async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

impl Default for Drain {
    fn default() -> Drain {
        Drain::new()
    }
}

pin_project_lite::pin_project! {
    /// Runs a connection until it ends, or until it has been idle for the
    /// timeout; it is then asked to finish (see the module docs) and
    /// dropped if it has not a quarter of the timeout later. Also cuts
    /// responses the client stopped taking (see the module docs).
    pub struct IdleCut<C> {
        // The hyper connection.
        #[pin]
        connection: C,
        // Fires every `period` to sample `activity`.
        #[pin]
        check: LazySleep,
        activity: Arc<Activity>,
        // A quarter of the timeout.
        period: Duration,
        // `started` at the previous check.
        seen: u32,
        // Checks in a row that found no request in flight and none begun.
        idle_checks: u8,
        // `polls` at the previous check.
        polls: u32,
        // `written` at the previous check.
        written: u32,
        // Checks in a row that found the response waiting for the client.
        stalled_checks: u32,
        // Checks in a row after which a stalled client is cut.
        send_checks: u32,
        // HTTP/2: the timer runs for the streams' checks (it lapses while
        // there are no streams).
        watching: bool,
        // Asked to finish for idleness: dropped at the next check if still
        // idle then.
        closing: bool,
        // The server's drain signal, then its receiver, held to the end.
        drain: DrainWatch,
        drained: Option<watch::Receiver<()>>,
    }
}

impl<C: Graceful> IdleCut<C> {
    /// `timeout` for idleness, `send_timeout` for a client not taking its
    /// response (zero: never).
    pub fn new(
        connection: C,
        activity: Arc<Activity>,
        timeout: Duration,
        send_timeout: Duration,
        drain: DrainWatch,
    ) -> IdleCut<C> {
        let period = timeout / u32::from(CHECKS);
        let send_checks = if send_timeout.is_zero() {
            u32::MAX
        } else {
            send_timeout.as_nanos().div_ceil(period.as_nanos().max(1)) as u32
        };
        IdleCut {
            connection,
            check: LazySleep::until(Instant::now() + period),
            activity,
            period,
            seen: 0,
            idle_checks: 0,
            polls: 0,
            written: 0,
            stalled_checks: 0,
            send_checks,
            watching: false,
            closing: false,
            drain,
            drained: None,
        }
    }
}

/// How a connection under [`IdleCut`] ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<T> {
    /// By itself, with the connection's result.
    Finished(T),
    /// Cut for idleness.
    Idle,
    /// Cut because its client stopped taking its response.
    Stalled,
}

impl<C: Graceful> Future for IdleCut<C> {
    type Output = Ended<C::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if this.drained.is_none() {
            if let Poll::Ready(rx) = this.drain.poll(cx) {
                *this.drained = Some(rx);
                this.connection.as_mut().graceful_shutdown();
            }
        }
        if let Poll::Ready(done) = this.connection.as_mut().poll(cx) {
            return Poll::Ready(match this.closing {
                true => Ended::Idle,
                false => Ended::Finished(done),
            });
        }
        let activity = &this.activity;
        if activity.multiplexed.load(Relaxed) {
            // HTTP/2 pings find dead peers: only stalled streams are looked
            // for, while there are streams.
            if !*this.watching {
                activity.idle_cut.register(cx.waker());
                if activity.streams_added.swap(false, Relaxed) {
                    *this.watching = true;
                    this.check.as_mut().reset(Instant::now() + *this.period);
                }
            }
            while *this.watching && this.check.as_mut().poll_fired(cx) {
                let (live, stuck) = activity.check_streams(*this.send_checks);
                if stuck {
                    activity.send_timeouts.inc();
                    activity.stalled.store(true, Relaxed);
                    return Poll::Ready(Ended::Stalled);
                }
                *this.watching = live;
                if live {
                    this.check.as_mut().reset(Instant::now() + *this.period);
                }
            }
            return Poll::Pending;
        }
        while this.check.as_mut().poll_fired(cx) {
            let started = activity.started.load(Relaxed);
            let quiet = activity.active.load(Relaxed) == 0;
            let begun = started != *this.seen;
            let idle = quiet && !begun;
            *this.seen = started;
            if *this.closing {
                if idle {
                    return Poll::Ready(Ended::Idle);
                }
                // A request began after all (a head completed): hyper
                // closes the connection once it is answered.
                *this.closing = false;
            }
            *this.idle_checks = match (quiet, begun) {
                (false, _) => 0,
                // Requests came and went since the last check: idle since
                // some time in the period, as after a busy stretch.
                (true, true) => 1,
                (true, false) => *this.idle_checks + 1,
            };
            // Waiting for the client, and neither a chunk taken nor a byte
            // written since the last check.
            let (polls, written) = (activity.polls.load(Relaxed), activity.written.load(Relaxed));
            let stalled =
                polls == *this.polls && written == *this.written && activity.sending.load(Relaxed);
            (*this.polls, *this.written) = (polls, written);
            *this.stalled_checks = if stalled { *this.stalled_checks + 1 } else { 0 };
            if *this.stalled_checks > *this.send_checks {
                // Dropping the connection resets the client and the
                // upstream exchange.
                activity.send_timeouts.inc();
                activity.stalled.store(true, Relaxed);
                return Poll::Ready(Ended::Stalled);
            }
            // The first idle check may follow a busy stretch; the next
            // CHECKS cover whole periods with nothing in flight.
            if *this.idle_checks > CHECKS {
                *this.closing = true;
                this.connection.as_mut().graceful_shutdown();
                // It may have finished at once (an idle HTTP/1 connection).
                if this.connection.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Ended::Idle);
                }
            }
            this.check.as_mut().reset(Instant::now() + *this.period);
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A connection that never ends by itself and counts the times it was
    /// asked to finish.
    struct Silent(Arc<AtomicUsize>);

    impl Future for Silent {
        type Output = ();
        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
    }

    impl Graceful for Silent {
        fn graceful_shutdown(self: Pin<&mut Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    const TIMEOUT: Duration = Duration::from_millis(400);

    /// An `IdleCut` over a `Silent` connection, running as a task.
    fn cut(
        drain: &Drain,
    ) -> (
        Arc<Activity>,
        Arc<AtomicUsize>,
        tokio::task::JoinHandle<Ended<()>>,
    ) {
        let activity = Arc::new(Activity::new(Counter::default(), true));
        let asked = Arc::new(AtomicUsize::new(0));
        let connection = IdleCut::new(
            Silent(asked.clone()),
            activity.clone(),
            TIMEOUT,
            TIMEOUT,
            drain.watch(),
        );
        (activity, asked, tokio::spawn(connection))
    }

    /// Sleeps until `millis` after `start`.
    async fn at(start: Instant, millis: u64) {
        tokio::time::sleep_until(start + Duration::from_millis(millis)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_asked_to_finish_then_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (_activity, asked, task) = cut(&drain);
        // Checked every 100 ms: idle at five checks in a row by 500 ms.
        at(start, 450).await;
        assert_eq!(asked.load(Relaxed), 0);
        at(start, 550).await;
        assert_eq!(asked.load(Relaxed), 1, "asked to finish");
        assert!(!task.is_finished(), "given a quarter timeout to do so");
        at(start, 650).await;
        assert_eq!(task.await.unwrap(), Ended::Idle, "cut for idleness");
    }

    /// A keep-alive connection idle after a quick request is found within
    /// 1 to 1.25 × the timeout of the request's end, not a period later.
    #[tokio::test(start_paused = true)]
    async fn idle_after_a_quick_request_is_found_in_time() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, asked, _task) = cut(&drain);
        at(start, 10).await;
        let busy = activity.begin(Version::HTTP_11);
        at(start, 20).await;
        drop(busy);
        // Idle from 20 ms; the timeout is 400 ms.
        at(start, 420).await;
        assert_eq!(asked.load(Relaxed), 0, "not before the timeout");
        at(start, 520).await;
        assert_eq!(asked.load(Relaxed), 1, "by 1.25 × the timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_begun_while_asked_to_finish_is_not_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, asked, task) = cut(&drain);
        at(start, 550).await;
        assert_eq!(asked.load(Relaxed), 1);
        // The head completes before the cut: the request must be served.
        let busy = activity.begin(Version::HTTP_11);
        at(start, 1050).await;
        assert!(!task.is_finished(), "busy connection kept");
        drop(busy);
        // Idle again from 1 s: found at 1.5 s, cut at 1.6 s.
        at(start, 1550).await;
        assert_eq!(asked.load(Relaxed), 2);
        at(start, 1650).await;
        assert_eq!(task.await.unwrap(), Ended::Idle);
    }

    /// A response body that always has data (`true`) or never (`false`),
    /// and tells when it is dropped.
    struct Stream(bool, Arc<AtomicBool>);

    impl Stream {
        fn new(data: bool) -> Stream {
            Stream(data, Arc::default())
        }
    }

    impl Body for Stream {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.0 {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
            } else {
                Poll::Pending
            }
        }
    }

    impl Drop for Stream {
        fn drop(&mut self) {
            self.1.store(true, Relaxed);
        }
    }

    impl Stallable for Stream {}

    /// Polls `body` once and returns what it gave, as hyper sees it.
    async fn poll_once<B: Body<Data = Bytes> + Stallable + Unpin>(
        body: &mut Held<B>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B::Error: Into<BoxError>,
    {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx))).await
    }

    /// Polls `body` once, as hyper does when the client's socket has room;
    /// true when it gave data.
    async fn pull<B: Body<Data = Bytes> + Stallable + Unpin>(body: &mut Held<B>) -> bool
    where
        B::Error: Into<BoxError>,
    {
        matches!(poll_once(body).await, Poll::Ready(Some(Ok(_))))
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_http2_stream_loses_its_upstream_and_the_others_carry_on() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, asked, task) = cut(&drain);
        let endless = Stream::new(true);
        let dropped = endless.1.clone();
        let mut stalled = Held::new(endless, activity.begin(Version::HTTP_2));
        let mut slow = Held::new(Stream::new(true), activity.begin(Version::HTTP_2));
        let mut waiting = Held::new(Stream::new(false), activity.begin(Version::HTTP_2));
        // hyper took a chunk, and then the client gave no more window.
        assert!(pull(&mut stalled).await);
        assert!(!pull(&mut waiting).await, "its upstream has nothing yet");
        // Checked every 100 ms: the poll is seen at 100, then five checks
        // in a row (200 to 600 ms) find it untouched, more than the four
        // of the send timeout.
        for millis in (0..=400).step_by(200) {
            at(start, millis).await;
            assert!(pull(&mut slow).await);
        }
        at(start, 550).await;
        assert!(!dropped.load(Relaxed), "within the send timeout");
        at(start, 650).await;
        assert!(
            dropped.load(Relaxed),
            "the body (its upstream exchange) is dropped"
        );
        assert_eq!(activity.send_timeouts.get(), 1);
        assert!(!stalled.is_end_stream(), "polled to its error, not ended");
        // The client gives window again: hyper resets the stream.
        let next = poll_once(&mut stalled).await;
        assert!(
            matches!(next, Poll::Ready(Some(Err(e))) if e.is::<SendTimeout>()),
            "hyper gets an error, so it resets the stream"
        );
        drop(stalled);
        for millis in (800..=3000).step_by(200) {
            at(start, millis).await;
            assert!(pull(&mut slow).await, "a stream taken slowly goes on");
        }
        assert!(
            poll_once(&mut waiting).await.is_pending(),
            "as does a waiting one"
        );
        assert!(!task.is_finished(), "the connection goes on");
        assert_eq!(asked.load(Relaxed), 0, "and is not asked to finish");
        assert_eq!(activity.send_timeouts.get(), 1, "counted once");
    }

    /// A body of one chunk.
    struct OneChunk(Option<Bytes>);

    impl Body for OneChunk {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.take().map(|chunk| Ok(Frame::data(chunk))))
        }

        fn is_end_stream(&self) -> bool {
            self.0.is_none()
        }
    }

    impl Stallable for OneChunk {}

    #[tokio::test(start_paused = true)]
    async fn an_http2_stream_takes_a_large_chunk_in_pieces_at_the_clients_pace() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, task) = cut(&drain);
        let chunk: Bytes = (0..16 * PIECE as u32 + 5).map(|i| i as u8).collect();
        let mut body = Held::new(
            OneChunk(Some(chunk.clone())),
            activity.begin(Version::HTTP_2),
        );
        let mut received = Vec::new();
        // A piece every 300 ms, the send timeout being 400 ms: 5 s for it all.
        for millis in (0..).step_by(300) {
            at(start, millis).await;
            let Poll::Ready(Some(Ok(frame))) = poll_once(&mut body).await else {
                break;
            };
            let data = frame.into_data().unwrap();
            assert!(data.len() <= PIECE, "a piece of {} bytes", data.len());
            received.extend_from_slice(&data);
            assert_eq!(body.is_end_stream(), received.len() == chunk.len());
        }
        assert_eq!(received, chunk, "the pieces make the chunk");
        assert!(!task.is_finished(), "not cut");
        assert_eq!(activity.send_timeouts.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_stream_stalled_with_pieces_left_is_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, _task) = cut(&drain);
        let chunk = Bytes::from(vec![b'x'; 2 * PIECE]);
        let mut body = Held::new(OneChunk(Some(chunk)), activity.begin(Version::HTTP_2));
        // The upstream's body has ended, but half of it waits to be given.
        assert!(pull(&mut body).await);
        at(start, 750).await;
        assert_eq!(activity.send_timeouts.get(), 1, "cut");
        let next = poll_once(&mut body).await;
        assert!(
            matches!(next, Poll::Ready(Some(Err(e))) if e.is::<SendTimeout>()),
            "hyper gets an error, so it resets the stream"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_stream_stalled_past_its_cut_drops_the_connection() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, task) = cut(&drain);
        // A first stream ends: the checks lapse with nothing to watch.
        let mut done = Held::new(Stream::new(true), activity.begin(Version::HTTP_2));
        assert!(pull(&mut done).await);
        drop(done);
        at(start, 1000).await;
        // A stream begun later wakes them again.
        let endless = Stream::new(true);
        let dropped = endless.1.clone();
        let mut stalled = Held::new(endless, activity.begin(Version::HTTP_2));
        assert!(pull(&mut stalled).await);
        // Checked every 100 ms from 1000: cut at the sixth check (1600),
        // the connection dropped at the eleventh (2100) if the client has
        // still not given the stream window.
        at(start, 1550).await;
        assert!(!dropped.load(Relaxed));
        at(start, 1650).await;
        assert!(dropped.load(Relaxed), "cut");
        at(start, 2050).await;
        assert!(!task.is_finished());
        at(start, 2150).await;
        assert_eq!(
            task.await.unwrap(),
            Ended::Stalled,
            "only dropping the connection ends it"
        );
        assert_eq!(activity.send_timeouts.get(), 2, "the cut and the drop");
        drop(stalled);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_not_taking_its_response_is_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, asked, task) = cut(&drain);
        let mut body = Held::new(Stream::new(true), activity.begin(Version::HTTP_11));
        pull(&mut body).await;
        // Checked every 100 ms: the poll is seen at 100, then five checks
        // in a row find it untouched by 600.
        at(start, 550).await;
        assert!(!task.is_finished(), "within the send timeout");
        at(start, 650).await;
        assert_eq!(task.await.unwrap(), Ended::Stalled, "cut for stalling");
        assert_eq!(asked.load(Relaxed), 0, "dropped, not asked to finish");
        assert_eq!(activity.send_timeouts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_taking_its_response_slowly_is_not_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, task) = cut(&drain);
        let mut body = Held::new(Stream::new(true), activity.begin(Version::HTTP_11));
        for millis in (0..2000).step_by(300) {
            at(start, millis).await;
            pull(&mut body).await;
        }
        assert!(!task.is_finished(), "some progress every 300 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_taking_one_large_chunk_slowly_is_not_cut() {
        use tokio::io::AsyncWriteExt;
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, task) = cut(&drain);
        let mut body = Held::new(Stream::new(true), activity.begin(Version::HTTP_11));
        // hyper took one chunk and writes it out over two seconds: no
        // second poll of the body, but writes that move bytes.
        pull(&mut body).await;
        let mut socket = Progress::new(tokio::io::sink(), activity.clone());
        for millis in (0..2000).step_by(300) {
            at(start, millis).await;
            socket.write_all(b"x").await.unwrap();
        }
        assert!(!task.is_finished(), "a write that moved bytes every 300 ms");
        at(start, 2600).await;
        assert_eq!(task.await.unwrap(), Ended::Stalled, "then none: cut");
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_waiting_for_its_upstream_is_not_cut() {
        let (start, drain) = (Instant::now(), Drain::new());
        let (activity, _asked, task) = cut(&drain);
        let mut body = Held::new(Stream::new(false), activity.begin(Version::HTTP_11));
        pull(&mut body).await;
        at(start, 2000).await;
        assert!(
            !task.is_finished(),
            "the upstream's silence is not the client's"
        );
        drop(body);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_asks_every_connection_and_waits_for_it() {
        let drain = Drain::new();
        let (_activity, asked, task) = cut(&drain);
        let shutdown = tokio::spawn(drain.shutdown());
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(asked.load(Relaxed), 1, "asked to finish");
        assert!(!shutdown.is_finished(), "waits for the connection");
        task.abort();
        let _ = task.await;
        shutdown.await.unwrap();
    }

    /// Counts its wake-ups.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    #[test]
    fn the_drain_wakes_whichever_waker_last_polled() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        let (first, second) = (
            Arc::new(Wakes(AtomicUsize::new(0))),
            Arc::new(Wakes(AtomicUsize::new(0))),
        );
        let (first_waker, second_waker) = (Waker::from(first.clone()), Waker::from(second.clone()));
        // Polls with the same waker skip the signal; a new waker is
        // registered in its place.
        assert!(watch
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(watch
            .poll(&mut Context::from_waker(&first_waker))
            .is_pending());
        assert!(watch
            .poll(&mut Context::from_waker(&second_waker))
            .is_pending());
        let _ = drain.tx.send(());
        assert_eq!(first.0.load(Relaxed), 0, "replaced");
        assert_eq!(second.0.load(Relaxed), 1, "woken");
        assert!(watch
            .poll(&mut Context::from_waker(&second_waker))
            .is_ready());
        // A connection accepted as the drain begins sees it at its first poll.
        let mut late = drain.watch();
        let _ = drain.tx.send(());
        assert!(late.poll(&mut Context::from_waker(&first_waker)).is_ready());
    }
}
