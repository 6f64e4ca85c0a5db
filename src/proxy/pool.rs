//! The HTTP/1.1 connection pool of one endpoint.
//!
//! A connection is driven by whichever task is using it: the client's
//! connection task for a primary, the shadow's own task for a mirror. The
//! upstream socket is read and written in the same poll as the downstream
//! one, as in Envoy's and nginx's event loops, so a request costs no task
//! hop, no channel wake-up and no pool-key hashing (hyper-util's pool spawns
//! a task per connection and hashes `(scheme, authority)` on every checkout
//! and return). An idle connection is polled by nobody; it is checked when
//! taken (closed or expired ones are dropped) and a reaper closes the ones
//! idle past `idleTimeout`. Each worker thread keeps its own idle list, so a
//! connection stays on the thread (and I/O driver) that opened it.
//!
//! A primary's connection serves bodiless requests with umbra's own
//! exchange and the others through hyper's client, handed from one to the
//! other as the requests need ([`Primary`]); a shadow's always with umbra's
//! own. Upgrade requests (WebSocket) get a connection of their own, driven
//! by a task, which hands the socket over on `101 Switching Protocols`.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::dial::{Dialer, Stream};
use super::lean::primary::{RawHead, Streamed};
use super::lean::Lean;
use crate::metrics::RouteStats;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body umbra can send upstream (the primary's and the shadow's).
pub trait Outgoing: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<T> Outgoing for T where T: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: refused, unreachable, timed out or unresolvable. The
    /// request never reached the upstream.
    #[error("connect failed: {0}")]
    Connect(BoxError),
    /// The connection failed during the exchange.
    #[error("{0}")]
    Exchange(BoxError),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }

    /// Whether an HTTP/2 upstream refused the stream (`REFUSED_STREAM`,
    /// RFC 9113 §8.7): it never processed the request.
    pub fn is_refused_stream(&self) -> bool {
        let SendError::Exchange(error) = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
        while let Some(error) = cause {
            if let Some(h2) = error.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            cause = error.source();
        }
        false
    }
}

/// A destination's `maxConnections` as a cap on open HTTP/1.1
/// connections, idle ones included, over all its endpoints and worker
/// threads, as Envoy's circuit breaker counts them. Requests on the wire are
/// capped at the same number (`upstream::Caps`), so a request that must dial
/// at the cap finds a connection idle elsewhere (another worker's, or
/// another endpoint's) and closes it first.
pub struct Budget<L: Link> {
    /// `maxConnections`.
    limit: usize,
    /// Connections dialling or open; shared with their [`Opened`] guards.
    open: Arc<AtomicUsize>,
    /// Every endpoint's pool, to find an idle connection to close; weak,
    /// as the pools hold the budget.
    pools: OnceLock<Box<[Weak<Pool<L>>]>>,
}

impl<L: Link> Budget<L> {
    pub fn new(limit: usize) -> Arc<Budget<L>> {
        Arc::new(Budget {
            limit,
            open: Arc::new(AtomicUsize::new(0)),
            pools: OnceLock::new(),
        })
    }

    /// The pools whose idle connections may be closed to make room.
    pub fn cover(&self, pools: &[Arc<Pool<L>>]) {
        let _ = self.pools.set(pools.iter().map(Arc::downgrade).collect());
    }

    /// At the cap: a new connection needs an idle one closed first.
    fn full(&self) -> bool {
        self.open.load(Ordering::Relaxed) >= self.limit
    }

    fn over(&self) -> bool {
        self.open.load(Ordering::Relaxed) > self.limit
    }

    /// Counts a connection about to be dialled; at the cap, closes an idle
    /// one first (one to another endpoint: an idle one to this endpoint
    /// would have been taken instead).
    fn open(&self) -> Opened {
        let before = self.open.fetch_add(1, Ordering::Relaxed);
        let opened = Opened(self.open.clone());
        if before >= self.limit {
            self.close_idle();
        }
        opened
    }

    /// Closes the connection idle longest, over every endpoint and worker
    /// (none found: the cap is passed until one is returned, which then
    /// closes instead of pooling).
    fn close_idle(&self) {
        let Some(pools) = self.pools.get() else {
            return;
        };
        let pools: Vec<_> = pools.iter().filter_map(Weak::upgrade).collect();
        // Each list is oldest first.
        let coldest = pools
            .iter()
            .flat_map(|pool| (0..pool.idle.len()).map(move |slot| (pool, slot)))
            .filter_map(|(pool, slot)| {
                let since = pool.lock_slot(slot).conns.first()?.idle_since;
                Some((since, pool, slot))
            })
            .min_by_key(|(since, _, _)| *since);
        if let Some((_, pool, slot)) = coldest {
            let closed = {
                let mut idle = pool.lock_slot(slot);
                (!idle.conns.is_empty()).then(|| idle.conns.remove(0))
            };
            // Closed here, outside the lock.
            drop(closed);
        }
    }
}

/// One connection counted against a [`Budget`] until it closes.
struct Opened(Arc<AtomicUsize>);

impl Drop for Opened {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a pool holds: a primary's connection ([`Primary`]), or a shadow's
/// ([`super::lean::Lean`]).
pub trait Link: Send + 'static {
    /// Whether a connection taken from the idle list can carry another
    /// request right now: still open, and the peer has not closed it.
    fn reusable(&mut self) -> bool;
    /// Whether it may go back to the idle list after an exchange: open,
    /// and that exchange complete.
    fn poolable(&self) -> bool;
}

/// One endpoint's idle HTTP/1.1 connections and how to open more.
pub struct Pool<L: Link> {
    dialer: Dialer,
    /// Close connections idle this long (`idleTimeout`).
    idle_timeout: Duration,
    /// Close connections after this many requests (`maxRequestsPerConnection`).
    max_requests: u32,
    /// Idle connections per worker thread: a connection stays with the
    /// thread (and I/O driver) it was opened on.
    idle: Box<[Mutex<Idle<L>>]>,
    /// The destination's `maxConnections`, shared with its other endpoints.
    budget: Option<Arc<Budget<L>>>,
}

struct Idle<L: Link> {
    /// Most recently returned last, so the warmest connection is reused
    /// first and the coldest ones age out. Boxed: a connection moves
    /// through every request future, and a pointer is cheaper to move.
    #[allow(clippy::vec_box)]
    conns: Vec<Box<Conn<L>>>,
    /// Whether a reaper task is watching `conns`.
    reaping: bool,
}

/// A pooled connection and its bookkeeping.
pub struct Conn<L: Link> {
    pub(super) link: L,
    /// Requests sent on it so far.
    pub(super) served: u32,
    idle_since: Instant,
    /// Counts it against `maxConnections` until it closes.
    _opened: Option<Opened>,
}

/// hyper's client connection: the handle requests are sent on and the
/// state machine that moves its bytes, polled by whoever holds it.
pub struct Hyper<B: Outgoing> {
    sender: http1::SendRequest<B>,
    /// `None` once finished. Dropped at once then: a request still queued
    /// for it is only handed back (to be sent elsewhere) when it drops.
    driver: Option<http1::Connection<TokioIo<Stream>, B>>,
}

impl<B: Outgoing> Hyper<B> {
    /// Moves the connection's I/O along; false once it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if Pin::new(driver).poll(cx).is_ready() {
                self.driver = None;
            }
        }
        self.driver.is_some()
    }
}

impl<B: Outgoing> Link for Hyper<B> {
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Not ready means the request is still going out (the upstream
    /// answered before reading all of it): pooled undriven, it would hold
    /// the client's body.
    fn poolable(&self) -> bool {
        self.driver.is_some() && self.sender.is_ready()
    }
}

/// A primary's pooled connection. A bodiless request is exchanged on it
/// lean ([`super::lean::primary`]); any other goes through hyper's client,
/// so the socket is handed to hyper for it and taken back by the next
/// bodiless request. One pool for both keeps one set of connections per
/// endpoint and worker under one `maxConnections`, as Envoy's pool does.
// Unboxed variants: a pooled connection is boxed whole ([`Conn`]) already.
#[allow(clippy::large_enum_variant)]
pub enum Primary<B: Outgoing> {
    Lean(Lean),
    Hyper(Hyper<B>),
    /// Between the two, or failed to change: never pooled.
    Taken,
}

impl<B: Outgoing> Link for Primary<B> {
    fn reusable(&mut self) -> bool {
        match self {
            Primary::Lean(lean) => lean.reusable(),
            Primary::Hyper(hyper) => hyper.reusable(),
            Primary::Taken => false,
        }
    }

    fn poolable(&self) -> bool {
        match self {
            Primary::Lean(lean) => lean.poolable(),
            Primary::Hyper(hyper) => hyper.poolable(),
            Primary::Taken => false,
        }
    }
}

impl<B: Outgoing> Primary<B> {
    /// A fresh connection for a bodiless request.
    pub(super) async fn open_lean(io: TokioIo<Stream>) -> Result<Primary<B>, SendError> {
        Ok(Primary::Lean(Lean::new(io.into_inner())))
    }

    /// Whether hyper's client has it: a request with a body then goes out
    /// without a hand-over, and a bodiless one prefers another.
    pub(super) fn is_hyper(&self) -> bool {
        matches!(self, Primary::Hyper(_))
    }

    /// A fresh connection for hyper's client.
    async fn open_hyper(io: TokioIo<Stream>) -> Result<Primary<B>, SendError> {
        Ok(Primary::Hyper(Hyper::handshake(io).await?))
    }

    /// The connection as a lean one, taken back from hyper's client if it
    /// had it (`None`: hyper had read past its last response, so the
    /// connection cannot carry another).
    pub(super) fn lean(&mut self) -> Option<&mut Lean> {
        if let Primary::Hyper(hyper) = self {
            // Taken only when idle (pooled after a complete exchange, so
            // `is_ready`): hyper then has nothing queued to write, and
            // what it read past the response is in `read_buf`.
            let parts = hyper.driver.take()?.into_parts();
            *self = if parts.read_buf.is_empty() {
                Primary::Lean(Lean::new(parts.io.into_inner()))
            } else {
                Primary::Taken
            };
        }
        match self {
            Primary::Lean(lean) => Some(lean),
            _ => None,
        }
    }

    /// The connection handed to hyper's client, if it is not already.
    async fn hyper(&mut self) -> Result<&mut Hyper<B>, SendError> {
        if matches!(self, Primary::Lean(_)) {
            if let Primary::Lean(lean) = std::mem::replace(self, Primary::Taken) {
                if let Some(io) = lean.into_io() {
                    *self = Primary::Hyper(Hyper::handshake(TokioIo::new(io)).await?);
                }
            }
        }
        match self {
            Primary::Hyper(hyper) => Ok(hyper),
            _ => Err(SendError::Exchange(
                "pooled connection had unread bytes".into(),
            )),
        }
    }

    /// Moves hyper's connection along (nothing to do for a lean one);
    /// false once it has closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match self {
            Primary::Hyper(hyper) => hyper.drive(cx),
            Primary::Lean(_) => true,
            Primary::Taken => false,
        }
    }
}

impl<L: Link> Pool<L> {
    pub fn new(
        dialer: Dialer,
        idle_timeout: Duration,
        max_requests: Option<u32>,
        budget: Option<Arc<Budget<L>>>,
    ) -> Pool<L> {
        Pool {
            dialer,
            idle_timeout,
            max_requests: max_requests.unwrap_or(u32::MAX).max(1),
            idle: (0..crate::server::worker_slots())
                .map(|_| {
                    Mutex::new(Idle {
                        conns: Vec::new(),
                        reaping: false,
                    })
                })
                .collect(),
            budget,
        }
    }

    /// A connection for one request: the pooled one [`Pool::checkout`]
    /// finds (`true`), `preferred` if one is, unless `fresh` (a request sent
    /// again after its pooled connection closed under it goes out on a new
    /// one, so it is not sent once per idle connection), else a new one made
    /// a link by `handshake`, counted as pending in `stats` while it is
    /// dialled (as Envoy's pending requests are).
    pub(super) async fn take<F>(
        &self,
        fresh: bool,
        preferred: fn(&L) -> bool,
        stats: Option<&RouteStats>,
        handshake: impl FnOnce(TokioIo<Stream>) -> F,
    ) -> Result<(Box<Conn<L>>, bool), SendError>
    where
        F: Future<Output = Result<L, SendError>>,
    {
        if let Some(conn) = (!fresh).then(|| self.checkout(preferred)).flatten() {
            return Ok((conn, true));
        }
        let _pending = stats.map(RouteStats::pending);
        Ok((self.connect(handshake).await?, false))
    }

    /// Dials a connection counted against `maxConnections`, made a link by
    /// `handshake`.
    async fn connect<F>(
        &self,
        handshake: impl FnOnce(TokioIo<Stream>) -> F,
    ) -> Result<Box<Conn<L>>, SendError>
    where
        F: Future<Output = Result<L, SendError>>,
    {
        let opened = self.budget.as_ref().map(|budget| budget.open());
        let link = handshake(self.dialer.dial().await?).await?;
        Ok(Box::new(Conn {
            link,
            served: 0,
            idle_since: Instant::now(),
            _opened: opened,
        }))
    }

    /// The most recently used idle connection that can still carry a
    /// request: this worker's, or at the destination's `maxConnections`
    /// another worker's (its I/O is then woken through that worker's event
    /// loop, which beats closing it to dial a new one on every handover).
    /// Of those, the most recent `preferred` one, if any is.
    fn checkout(&self, preferred: fn(&L) -> bool) -> Option<Box<Conn<L>>> {
        let own = self.slot();
        if let Some(conn) = self.checkout_slot(own, preferred) {
            return Some(conn);
        }
        if !self.budget.as_ref().is_some_and(|budget| budget.full()) {
            return None;
        }
        (0..self.idle.len())
            .filter(|&slot| slot != own)
            .find_map(|slot| self.checkout_slot(slot, preferred))
    }

    fn checkout_slot(&self, slot: usize, preferred: fn(&L) -> bool) -> Option<Box<Conn<L>>> {
        loop {
            let mut conn = {
                let mut idle = self.lock_slot(slot);
                let newest = idle.conns.len().checked_sub(1)?;
                let at = (idle.conns.iter())
                    .rposition(|conn| preferred(&conn.link))
                    .unwrap_or(newest);
                if idle.conns[at].idle_since.elapsed() >= self.idle_timeout {
                    // Those before it went idle earlier still; close them
                    // unlocked, and look again among the newer ones.
                    let expired: Vec<_> = idle.conns.drain(..=at).collect();
                    drop(idle);
                    drop(expired);
                    continue;
                }
                idle.conns.remove(at)
            };
            if conn.link.reusable() {
                return Some(conn);
            }
        }
    }

    /// Takes a connection back after a complete exchange. It is checked
    /// (and dropped if it closed) at checkout, not here: for hyper's, the
    /// response's last chunk still shares the read buffer now, so the read
    /// that finishes the exchange would allocate a new buffer; at checkout
    /// the chunk has been sent and the buffer is reused.
    pub(super) fn put(self: &Arc<Self>, mut conn: Box<Conn<L>>) {
        if conn.served >= self.max_requests || !conn.link.poolable() {
            return;
        }
        if self.budget.as_ref().is_some_and(|budget| budget.over()) {
            // A race dialled past `maxConnections`: closing this one
            // brings the count back.
            return;
        }
        // The reaper is a task: without a runtime (shutting down) the
        // connection is closed instead of pooled.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        conn.idle_since = Instant::now();
        let slot = self.slot();
        let mut idle = self.lock_slot(slot);
        idle.conns.push(conn);
        if !idle.reaping {
            idle.reaping = true;
            runtime.spawn(reap(Arc::downgrade(self), slot, self.idle_timeout));
        }
    }

    /// This thread's slot.
    fn slot(&self) -> usize {
        crate::server::worker_index() % self.idle.len()
    }

    fn lock_slot(&self, slot: usize) -> MutexGuard<'_, Idle<L>> {
        // The critical sections only push, pop and drain: a panic in one
        // cannot leave the list inconsistent.
        self.idle[slot]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Which kind each idle connection is, in this thread's slot (tests).
    #[cfg(test)]
    pub(super) fn idle_links(&self) -> Vec<&'static str>
    where
        L: std::any::Any,
    {
        let idle = self.lock_slot(self.slot());
        (idle.conns.iter())
            .map(|conn| {
                let link: &dyn std::any::Any = &conn.link;
                match link.downcast_ref::<Primary<http_body_util::Full<Bytes>>>() {
                    Some(Primary::Lean(_)) => "lean",
                    Some(Primary::Hyper(_)) => "hyper",
                    Some(Primary::Taken) => "taken",
                    None => "other",
                }
            })
            .collect()
    }

    /// Connections idle right now (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        (0..self.idle.len())
            .map(|slot| self.lock_slot(slot).conns.len())
            .sum()
    }
}

impl<B: Outgoing> Pool<Primary<B>> {
    /// [`Pool::send_parts`] for a whole request.
    #[cfg(test)]
    pub async fn send(
        self: &Arc<Self>,
        request: Request<B>,
        stats: Option<&RouteStats>,
        lines: HeaderLines,
    ) -> Result<Response<UpstreamBody<B>>, SendError> {
        let (mut parts, body) = request.into_parts();
        self.send_parts(&mut parts, body, false, stats, lines).await
    }

    /// Sends the request of `parts` (origin-form URI, Host header set) and
    /// `body` on a pooled or new connection: lean if it has no body, else
    /// through hyper's client. A pooled connection the peer closed before
    /// taking the request is skipped: the request goes out on the next
    /// one. While a new connection is dialled for it, the request counts
    /// as pending in `stats` (as Envoy's pending requests do). `again`:
    /// `parts` are kept for a retry; the lean path encodes its head
    /// straight from them, so only hyper's takes a copy then.
    pub async fn send_parts(
        self: &Arc<Self>,
        parts: &mut Parts,
        body: B,
        again: bool,
        stats: Option<&RouteStats>,
        lines: HeaderLines,
    ) -> Result<Response<UpstreamBody<B>>, SendError> {
        let upgrade = parts.headers.contains_key(header::UPGRADE);
        if !upgrade && body.is_end_stream() {
            let response = self.send_lean(parts, body, stats, lines).await?;
            return Ok(response.map(UpstreamBody::Lean));
        }
        let mut request = owned(parts, body, again);
        if upgrade {
            return self.send_upgrade(request).await;
        }
        loop {
            let (conn, pooled) =
                (self.take(false, Primary::is_hyper, stats, Primary::open_hyper)).await?;
            match self.exchange(conn, request).await {
                Ok(response) => return Ok(response),
                Err((error, Some(unsent))) if pooled => {
                    tracing::debug!(%error, "pooled connection closed; retrying on another");
                    request = unsent;
                }
                Err((error, _)) => return Err(SendError::Exchange(error)),
            }
        }
    }

    /// Runs one exchange on `conn` through hyper's client, driving it until
    /// the response head is in; the response body keeps it and drives it
    /// from then on.
    async fn exchange(
        self: &Arc<Self>,
        mut conn: Box<Conn<Primary<B>>>,
        request: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, (BoxError, Option<Request<B>>)> {
        conn.served += 1;
        let hyper = match conn.link.hyper().await {
            Ok(hyper) => hyper,
            Err(error) => return Err((error.into(), Some(request))),
        };
        let mut response = std::pin::pin!(hyper.sender.try_send_request(request));
        let result = poll_fn(|cx| {
            hyper.drive(cx);
            response.as_mut().poll(cx)
        })
        .await;
        match result {
            Ok(response) => {
                let lease = Lease {
                    conn,
                    pool: self.clone(),
                };
                Ok(response.map(|body| UpstreamBody::new(body, Some(lease))))
            }
            Err(mut error) => {
                let unsent = error.take_message();
                Err((error.into_error().into(), unsent))
            }
        }
    }

    /// A dedicated connection for an upgrade, driven by its own task so the
    /// socket is handed over on `101` whatever happens to the response.
    async fn send_upgrade(
        &self,
        request: Request<B>,
    ) -> Result<Response<UpstreamBody<B>>, SendError> {
        let opened = self.budget.as_ref().map(|budget| budget.open());
        let io = self.dialer.dial().await?;
        let (mut sender, driver) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        tokio::spawn(async move {
            // Counted until the switch; the tunnel then holds the request's
            // place under the caps instead.
            let _opened = opened;
            if let Err(error) = driver.with_upgrades().await {
                tracing::debug!(%error, "upgraded upstream connection failed");
            }
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| SendError::Exchange(e.into()))?;
        Ok(response.map(|body| UpstreamBody::new(body, None)))
    }
}

impl<B: Outgoing> Hyper<B> {
    /// hyper's HTTP/1.1 handshake on a fresh connection (it sends nothing).
    async fn handshake(io: TokioIo<Stream>) -> Result<Hyper<B>, SendError> {
        let (sender, driver) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        Ok(Hyper {
            sender,
            driver: Some(driver),
        })
    }
}

/// `parts` and `body` as a request to hand to hyper: a copy of the parts
/// if they are to be sent `again` (a retry), else the parts themselves.
pub(super) fn owned<B>(parts: &mut Parts, body: B, again: bool) -> Request<B> {
    if !again {
        let (empty, ()) = Request::new(()).into_parts();
        return Request::from_parts(std::mem::replace(parts, empty), body);
    }
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request
}

/// Closes connections idle past `timeout` in one slot until none are left
/// (the next return starts a new reaper) or the pool is gone.
async fn reap<L: Link>(pool: Weak<Pool<L>>, slot: usize, timeout: Duration) {
    /// Clears `reaping` if the reaper is dropped unfinished (its runtime
    /// shutting down), so the next return starts a new one.
    struct Unfinished<L: Link>(Option<Weak<Pool<L>>>, usize);
    impl<L: Link> Drop for Unfinished<L> {
        fn drop(&mut self) {
            if let Some(pool) = self.0.take().and_then(|pool| pool.upgrade()) {
                pool.lock_slot(self.1).reaping = false;
            }
        }
    }
    let mut unfinished = Unfinished(Some(pool.clone()), slot);
    let every = (timeout / 2).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let (expired, empty) = {
            let mut idle = pool.lock_slot(slot);
            // Returned oldest first: the expired ones are a prefix.
            let fresh = idle
                .conns
                .iter()
                .position(|conn| conn.idle_since.elapsed() < timeout)
                .unwrap_or(idle.conns.len());
            let expired: Vec<_> = idle.conns.drain(..fresh).collect();
            let empty = idle.conns.is_empty();
            if empty {
                // Decided under the lock: from now on a return starts a
                // new reaper.
                idle.reaping = false;
                unfinished.0 = None;
            }
            (expired, empty)
        };
        // Sockets are closed outside the lock.
        drop(expired);
        if empty {
            return;
        }
    }
}

/// A connection on loan to a response body.
struct Lease<B: Outgoing> {
    conn: Box<Conn<Primary<B>>>,
    pool: Arc<Pool<Primary<B>>>,
}

/// How a primary's response brings its header lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderLines {
    /// In the response's header map.
    Map,
    /// Where the exchange is lean and the head [plain](super::lean), as a
    /// [`RawHead`] in the body, the map left empty: for umbra's own
    /// HTTP/1.1 server, when no route rule edits them and no analysis
    /// keeps them. Otherwise in the map.
    Raw,
}

/// An upstream response body: hyper's, or one read off a lean connection
/// ([`super::lean::primary`]).
pub enum UpstreamBody<B: Outgoing> {
    Hyper(HyperBody<B>),
    Lean(Streamed<B>),
}

/// hyper's response body. Over a pooled HTTP/1.1 connection it drives the
/// connection as it is read, and returns it to the pool once complete.
pub struct HyperBody<B: Outgoing> {
    body: Incoming,
    lease: Option<Lease<B>>,
}

impl<B: Outgoing> UpstreamBody<B> {
    fn new(body: Incoming, lease: Option<Lease<B>>) -> UpstreamBody<B> {
        let mut body = HyperBody { body, lease };
        if body.body.is_end_stream() {
            // Nothing to read (HEAD, 204, 304, empty): the connection is
            // free before the response even reaches the client.
            body.release();
        }
        UpstreamBody::Hyper(body)
    }

    /// A body whose connection is driven elsewhere (HTTP/2, upgrades).
    pub fn detached(body: Incoming) -> UpstreamBody<B> {
        UpstreamBody::Hyper(HyperBody { body, lease: None })
    }

    /// The response's header lines, when they came as [`HeaderLines::Raw`].
    pub fn take_raw_head(&mut self) -> Option<RawHead> {
        match self {
            UpstreamBody::Lean(body) => body.take_raw_head(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

impl<B: Outgoing> HyperBody<B> {
    fn release(&mut self) {
        if let Some(Lease { conn, pool }) = self.lease.take() {
            pool.put(conn);
        }
    }
}

impl<B: Outgoing> Body for UpstreamBody<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
            UpstreamBody::Lean(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|frame| frame.map(|frame| frame.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(body) => body.is_end_stream(),
            UpstreamBody::Lean(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(body) => body.size_hint(),
            UpstreamBody::Lean(body) => body.size_hint(),
        }
    }
}

impl<B: Outgoing> Body for HyperBody<B> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        // hyper reads on past the head while the body is at hand, so a
        // small body is usually in already: taken without a pass through
        // the connection's state machine. Only when none is in, the
        // connection is driven and the body polled again, now to wait.
        let frame = match &mut this.lease {
            Some(lease) => {
                let noop = &mut Context::from_waker(Waker::noop());
                match Pin::new(&mut this.body).poll_frame(noop) {
                    Poll::Ready(frame) => frame,
                    Poll::Pending => {
                        if !lease.conn.link.drive(cx) {
                            // Closed: what it read is still buffered in the body.
                            this.lease = None;
                        }
                        std::task::ready!(Pin::new(&mut this.body).poll_frame(cx))
                    }
                }
            }
            // HTTP/2 and upgrades: the connection is driven elsewhere.
            None => std::task::ready!(Pin::new(&mut this.body).poll_frame(cx)),
        };
        match &frame {
            // Trailers end a body too; nothing is read after them.
            Some(Ok(frame)) if frame.is_trailers() || this.body.is_end_stream() => this.release(),
            None => this.release(),
            Some(Err(_)) => this.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<B: Outgoing> Drop for HyperBody<B> {
    fn drop(&mut self) {
        // A body complete but not polled to its end still leaves a reusable
        // connection; one dropped midway does not, and closes with the lease.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    fn get() -> Request<Empty<Bytes>> {
        Request::builder()
            .uri("/")
            .header(header::HOST, "upstream")
            .body(Empty::new())
            .unwrap_or_default()
    }

    /// A link that is always reusable, of one kind or the other.
    struct Kind(bool);

    impl Link for Kind {
        fn reusable(&mut self) -> bool {
            true
        }

        fn poolable(&self) -> bool {
            true
        }
    }

    #[test]
    fn checkout_prefers_a_kind_and_drops_only_what_expired() {
        let dialer = Dialer::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            "http://127.0.0.1:9".parse().unwrap(),
            None,
            Duration::from_secs(1),
        );
        let timeout = Duration::from_secs(60);
        let pool = Pool::<Kind>::new(dialer, timeout, None, None);
        let now = Instant::now();
        let idle = |kind, since| {
            Box::new(Conn {
                link: Kind(kind),
                served: 0,
                idle_since: since,
                _opened: None,
            })
        };
        let fill = |conns: Vec<Box<Conn<Kind>>>| pool.lock_slot(pool.slot()).conns = conns;
        let kinds = || -> Vec<bool> {
            let idle = pool.lock_slot(pool.slot());
            idle.conns.iter().map(|conn| conn.link.0).collect()
        };
        let preferred: fn(&Kind) -> bool = |kind| kind.0;
        let expired = (now.checked_sub(2 * timeout)).expect("up for two minutes");
        // The preferred one, even when older than the newest.
        fill(vec![idle(false, now), idle(true, now), idle(false, now)]);
        assert!(pool.checkout(preferred).unwrap().link.0);
        assert_eq!(kinds(), [false, false]);
        // None of the kind: the newest.
        assert!(!pool.checkout(preferred).unwrap().link.0);
        assert_eq!(kinds(), [false]);
        // The preferred one expired: it and those before it close, and the
        // newest after it serves.
        fill(vec![
            idle(false, expired),
            idle(true, expired),
            idle(false, now),
        ]);
        assert!(!pool.checkout(preferred).unwrap().link.0);
        assert_eq!(kinds(), Vec::<bool>::new());
        // All expired: none.
        fill(vec![idle(true, expired), idle(false, expired)]);
        assert!(pool.checkout(preferred).is_none());
        assert_eq!(kinds(), Vec::<bool>::new());
    }

    /// A pooled connection whose peer closes after the checkout check, just
    /// before the request is driven out: the request must come back unsent
    /// (so `send` retries it elsewhere), not wait forever on a connection
    /// that has finished.
    #[tokio::test]
    async fn a_request_queued_on_a_connection_that_closed_comes_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint: http::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (close_tx, close_rx) = oneshot::channel::<()>();
        let (closed_tx, closed_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            let _ = close_rx.await;
            drop(stream);
            let _ = closed_tx.send(());
        });
        let dialer = Dialer::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            endpoint,
            None,
            Duration::from_secs(10),
        );
        let pool: Arc<Pool<Primary<Empty<Bytes>>>> =
            Arc::new(Pool::new(dialer, Duration::from_secs(60), None, None));
        let response = pool.send(get(), None, HeaderLines::Map).await.unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1, "an empty keep-alive response pools");

        let _ = close_tx.send(());
        closed_rx.await.unwrap();
        // Let the reactor see the FIN (loopback delivered it on close).
        tokio::task::yield_now().await;
        let conn = pool.lock_slot(pool.slot()).conns.pop().unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), pool.exchange(conn, get()))
            .await
            .expect("the request hung on a finished connection");
        match result {
            Err((_, unsent)) => assert!(unsent.is_some(), "request not handed back"),
            Ok(_) => panic!("a closed connection answered"),
        }
    }
}
