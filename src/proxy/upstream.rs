//! One connection pool per destination endpoint, built once per config (and
//! kept across reloads while the destination is unchanged), plus endpoint
//! selection by the DestinationRule's load-balancing policy. HTTP/1.1 uses
//! umbra's own pool ([`super::pool`]); HTTP/2 multiplexes over hyper-util's
//! client, whose connection tasks serve many requesting tasks at once.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::request::Parts;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::dial::Dialer;
use super::lean::Lean;
use super::outlier::Outliers;
use super::pool::{owned, Budget, Link, Pool, Primary};
pub use super::pool::{HeaderLines, Outgoing, SendError, UpstreamBody};
use crate::config::model::{Destination, LoadBalancer, UpstreamProtocol};
use crate::metrics::RouteStats;
use crate::metrics::TargetStats;
use crate::mirror::ejection::Ejection;

/// A destination's connection pool and endpoint picker. `B` is the request
/// body type: primaries and shadows use different bodies and never share a
/// pool, so a misbehaving shadow cannot exhaust primary connections.
pub struct Upstream<B: Outgoing> {
    pub destination: Arc<Destination>,
    /// One pool per endpoint, so a request's URI need not name the endpoint:
    /// over HTTP/2 it carries the Host as `:authority`.
    pools: Pools<B>,
    /// `host:port` of each endpoint, parsed once.
    authorities: Box<[Authority]>,
    /// Round-robin cursor.
    next: AtomicUsize,
    /// In-flight requests per endpoint, for LEAST_REQUEST.
    active: Arc<[AtomicUsize]>,
    /// Requests on the wire at once ([`Caps::on_wire`]).
    limit: Option<Arc<Semaphore>>,
    /// When requests may wait for a place under `limit`: admits `limit`
    /// plus that many waiting, and refuses the rest. `None`: requests
    /// beyond `limit` are refused at once.
    queue: Option<Arc<Semaphore>>,
    /// Retries outstanding at once (`maxRetries`); `None`: unlimited.
    retries: Option<Arc<Semaphore>>,
    /// Endpoints ejected for failing (a primary's `outlierDetection`).
    outliers: Option<Outliers>,
    /// For a mirror target: whether it still answers, or is ejected
    /// (never for a primary).
    ejection: Ejection,
}

/// How many requests an upstream carries at once and how many more may wait
/// for a place: its circuit breaker, as Envoy's thresholds are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// Requests on the wire at once; `None`: unlimited.
    pub on_wire: Option<usize>,
    /// Requests that may wait for a place; the rest are refused (503
    /// `upstream_overflow` for a primary, `dropped_overload` for a shadow).
    pub waiting: usize,
}

impl Caps {
    /// The DestinationRule's `connectionPool`, with Envoy's semantics:
    /// over HTTP/1.1 each request in flight holds a connection, so past
    /// `maxConnections` requests wait for one, up to
    /// `http1MaxPendingRequests`; past `http2MaxRequests` (active requests,
    /// both protocols) they are refused at once.
    pub fn of(destination: &Destination) -> Caps {
        let pool = &destination.pool;
        let count = |n: Option<u32>| n.map(|n| n as usize);
        let connections = match destination.protocol {
            UpstreamProtocol::Http1 => count(pool.max_connections),
            // One multiplexed connection per endpoint.
            UpstreamProtocol::Http2 => None,
        };
        let requests = count(pool.max_requests);
        match (connections, requests) {
            (Some(c), r) if r.is_none_or(|r| c <= r) => Caps {
                on_wire: Some(c),
                waiting: count(pool.max_pending_requests).unwrap_or(usize::MAX),
            },
            (_, r) => Caps {
                on_wire: r,
                waiting: 0,
            },
        }
    }

    /// A mirror target's caps: umbra's per-target limits, tightened by the
    /// target's own DestinationRule (a user capping v2's connections is
    /// obeyed by its shadows too).
    pub fn shadow(destination: &Destination, on_wire: usize, waiting: usize) -> Caps {
        let rule = Caps::of(destination);
        match rule.on_wire {
            Some(n) if n <= on_wire => Caps {
                on_wire: Some(n),
                waiting: rule.waiting.min(waiting),
            },
            _ => Caps {
                on_wire: Some(on_wire),
                waiting,
            },
        }
    }
}

enum Pools<B: Outgoing> {
    /// A primary destination's HTTP/1.1 pools: bodiless requests go out
    /// lean, the rest through hyper's client ([`Primary`]).
    Http1(Box<[Arc<Pool<Primary<B>>>]>),
    /// A mirror target's HTTP/1.1 pools: shadows' responses are read, not
    /// streamed on ([`super::lean`]).
    Shadow(Box<[Arc<Pool<Lean>>]>),
    Http2(Box<[H2Client<B>]>),
}

/// One endpoint's HTTP/2 client: hyper-util multiplexes every request over
/// one connection. For `maxRequestsPerConnection` a fresh client (with a
/// fresh connection) takes over after that many requests; the old
/// connection finishes its streams and closes when its last request drops
/// the old client.
struct H2Client<B: Outgoing> {
    client: ArcSwap<Client<Dialer, B>>,
    /// `None`: one connection for good (hyper-util reconnects if it dies).
    renew: Option<Renew>,
}

/// What it takes to start a fresh connection, and when.
struct Renew {
    builder: hyper_util::client::legacy::Builder,
    dial: Dialer,
    max_requests: u32,
    /// Requests sent through this endpoint so far.
    sent: AtomicU32,
}

impl<B: Outgoing> H2Client<B> {
    /// The client for the next request: after every `max_requests`, a new
    /// one. Concurrent requests at the turn may go either way, so a
    /// connection carries about `max_requests`, as with Envoy's per-worker
    /// pools.
    fn next(&self) -> Arc<Client<Dialer, B>> {
        if let Some(renew) = &self.renew {
            let n = renew.sent.fetch_add(1, Ordering::Relaxed);
            if n > 0 && n % renew.max_requests == 0 {
                self.client
                    .store(Arc::new(renew.builder.build(renew.dial.clone())));
            }
        }
        self.client.load_full()
    }
}

/// Keeps an endpoint's in-flight count up until the exchange ends.
pub struct EndpointGuard {
    active: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.active[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// What keeps a request counted against its upstream until its response
/// ends, as its connection stays busy until then: its admission, its place
/// under the caps, and its endpoint's in-flight count (for LEAST_REQUEST).
#[derive(Default)]
pub struct Busy {
    pub admitted: Option<OwnedSemaphorePermit>,
    pub place: Option<OwnedSemaphorePermit>,
    pub endpoint: Option<EndpointGuard>,
}

impl Busy {
    /// Whether dropping it would change anything: false for an upstream
    /// without caps and without LEAST_REQUEST, the common case, so the
    /// response needs nothing kept for it.
    pub fn matters(&self) -> bool {
        self.admitted.is_some() || self.place.is_some() || self.endpoint.is_some()
    }
}

/// A picked endpoint: where to send, and the guard that counts it busy.
pub struct Picked {
    pub authority: Authority,
    pub guard: EndpointGuard,
}

impl Picked {
    /// The endpoint's position, for [`Upstream::send`].
    pub fn index(&self) -> usize {
        self.guard.index
    }
}

impl<B: Outgoing> Upstream<B> {
    /// An upstream carrying at most `caps.on_wire` requests at once, with
    /// `caps.waiting` more waiting for a place (see [`Upstream::place`]).
    pub fn new(destination: Arc<Destination>, caps: Caps) -> Self {
        Upstream::build(destination, caps, false)
    }

    /// A mirror target's upstream: over HTTP/1.1 its shadows are sent with
    /// [`Upstream::lean`]'s pools.
    pub fn shadow(destination: Arc<Destination>, caps: Caps) -> Self {
        Upstream::build(destination, caps, true)
    }

    fn build(destination: Arc<Destination>, caps: Caps, shadow: bool) -> Self {
        let pool = &destination.pool;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(pool.connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let authorities: Box<[Authority]> = destination
            .endpoints
            .iter()
            .filter_map(|endpoint| authority(&endpoint.address, endpoint.port))
            .collect();
        let dialers = authorities.iter().map(|a| {
            Dialer::new(
                connector.clone(),
                endpoint_uri(a, None),
                destination.tls.clone(),
                pool.connect_timeout,
            )
        });
        let pools = match destination.protocol {
            UpstreamProtocol::Http1 if shadow => Pools::Shadow(http1_pools(&destination, dialers)),
            UpstreamProtocol::Http1 => Pools::Http1(http1_pools(&destination, dialers)),
            UpstreamProtocol::Http2 => {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(pool.idle_timeout)
                    .http2_only(true);
                Pools::Http2(
                    dialers
                        .map(|dial| H2Client {
                            client: ArcSwap::from_pointee(builder.build(dial.clone())),
                            renew: pool.max_requests_per_connection.map(|max_requests| Renew {
                                builder: builder.clone(),
                                dial,
                                max_requests: max_requests.max(1),
                                sent: AtomicU32::new(0),
                            }),
                        })
                        .collect(),
                )
            }
        };
        let active = (0..authorities.len())
            .map(|_| AtomicUsize::new(0))
            .collect();
        let limit = caps.on_wire.map(|n| n.clamp(1, Semaphore::MAX_PERMITS / 2));
        let queue = limit.filter(|_| caps.waiting > 0).map(|n| {
            Arc::new(Semaphore::new(
                n.saturating_add(caps.waiting).min(Semaphore::MAX_PERMITS),
            ))
        });
        let limit = limit.map(|n| Arc::new(Semaphore::new(n)));
        let retries = (pool.max_retries)
            .map(|n| Arc::new(Semaphore::new((n as usize).min(Semaphore::MAX_PERMITS))));
        Upstream {
            destination,
            pools,
            authorities,
            next: AtomicUsize::new(0),
            active,
            limit,
            queue,
            retries,
            outliers: None,
            ejection: Ejection::never(),
        }
    }

    /// This upstream, for a primary: its endpoints ejected as its
    /// `outlierDetection` says, counted in `stats`.
    pub fn with_outliers(self, stats: impl FnOnce() -> TargetStats) -> Self {
        let outliers = (self.destination.outlier.clone())
            .map(|policy| Outliers::new(policy, self.authorities.len(), stats()));
        Upstream { outliers, ..self }
    }

    /// How the exchange with endpoint `index` ended, for outlier
    /// detection: its status, or `None` for no answer.
    pub fn observe(&self, index: usize, status: Option<u16>) {
        if let Some(outliers) = &self.outliers {
            match status {
                Some(status) => outliers.answered(index, status),
                None => outliers.unanswered(index),
            }
        }
    }

    /// This upstream, for a mirror target: ejected as `ejection` says
    /// when it stops answering.
    pub fn ejecting(self, ejection: Ejection) -> Self {
        Upstream { ejection, ..self }
    }

    /// Whether this mirror target is admitted, ejected or probed.
    pub fn ejection(&self) -> &Ejection {
        &self.ejection
    }

    /// Lets a request in under this upstream's limit (with a queue: into
    /// the queue, see [`Upstream::place`]), or `None` when full. Always
    /// `Some` for unlimited upstreams.
    pub fn try_admit(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match self.queue.as_ref().or(self.limit.as_ref()) {
            None => Some(None),
            Some(gate) => gate.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// A place for one retry under `maxRetries`, held while it is tried;
    /// `None`: as many retries are outstanding already.
    pub fn try_retry(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match &self.retries {
            None => Some(None),
            Some(retries) => retries.clone().try_acquire_owned().ok().map(Some),
        }
    }

    /// Waits for a place under the limit, for a request admitted to the
    /// queue; hold it until the exchange ends. `None` when there is
    /// nothing to wait for (no queue: admission was the place itself).
    pub async fn place(&self) -> Option<OwnedSemaphorePermit> {
        if let Some(place) = self.try_place() {
            return place;
        }
        // Never closed, so this only ends with a permit.
        self.limit.as_ref()?.clone().acquire_owned().await.ok()
    }

    /// [`Upstream::place`] without waiting: `None` when the request would
    /// have to wait.
    pub fn try_place(&self) -> Option<Option<OwnedSemaphorePermit>> {
        match (&self.queue, &self.limit) {
            (Some(_), Some(limit)) => limit.clone().try_acquire_owned().ok().map(Some),
            _ => Some(None),
        }
    }

    /// Whether endpoints' in-flight counts are read (LEAST_REQUEST over
    /// several endpoints), so a request's [`EndpointGuard`] must be held
    /// until its response ends.
    pub fn counts_endpoints(&self) -> bool {
        self.destination.lb == LoadBalancer::LeastRequest && self.authorities.len() > 1
    }

    /// The address of endpoint `index`, as [`Upstream::pick`] gives it.
    pub fn authority(&self, index: usize) -> Option<&Authority> {
        self.authorities.get(index)
    }

    /// The next endpoint by the load-balancing policy; `None` when the
    /// destination has no endpoints.
    pub fn pick(&self) -> Option<Picked> {
        let index = match &self.outliers {
            None => self.choose()?,
            // Chosen again past an ejected endpoint, so that the others
            // share its traffic evenly (round robin moves on; random and
            // least-request draw again); after as many tries as there are
            // endpoints, the first one in.
            Some(outliers) => {
                let first = self.choose()?;
                let mut index = first;
                for _ in 1..self.authorities.len() {
                    if outliers.is_in(index) {
                        break;
                    }
                    index = self.choose()?;
                }
                match outliers.is_in(index) {
                    true => index,
                    false => outliers.first_in(first)?,
                }
            }
        };
        self.active[index].fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            authority: self.authorities[index].clone(),
            guard: EndpointGuard {
                active: self.active.clone(),
                index,
            },
        })
    }

    /// An endpoint by the load-balancing policy, ejections aside.
    fn choose(&self) -> Option<usize> {
        let count = self.authorities.len();
        let index = match count {
            0 => return None,
            1 => 0,
            _ => match self.destination.lb {
                LoadBalancer::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % count,
                LoadBalancer::Random => rand::rng().random_range(0..count),
                LoadBalancer::LeastRequest => {
                    // Power of two choices, as Envoy does.
                    let mut rng = rand::rng();
                    let a = rng.random_range(0..count);
                    let b = rng.random_range(0..count);
                    let load = |i: usize| self.active[i].load(Ordering::Relaxed);
                    if load(b) < load(a) {
                        b
                    } else {
                        a
                    }
                }
            },
        };
        Some(index)
    }

    /// The pool of the endpoint at `index` for a shadow's HTTP/1.1
    /// exchange (`None`: send it with [`Upstream::send`]).
    pub fn lean(&self, index: usize) -> Option<&Arc<Pool<Lean>>> {
        match &self.pools {
            Pools::Shadow(pools) => pools.get(index),
            _ => None,
        }
    }

    /// Sends to the endpoint at `index` (from [`Picked::index`]); counts
    /// the request pending in `stats` while a connection is dialled for it
    /// (HTTP/1.1 only: hyper-util's HTTP/2 client dials out of sight).
    /// `lines`: how an HTTP/1.1 response brings its header lines.
    pub async fn send(
        &self,
        index: usize,
        request: Request<B>,
        stats: Option<&RouteStats>,
        lines: HeaderLines,
    ) -> Result<http::Response<UpstreamBody<B>>, SendError> {
        let (mut parts, body) = request.into_parts();
        (self.send_parts(index, &mut parts, body, false, stats, lines)).await
    }

    /// [`Upstream::send`] for a request in pieces; `again`: `parts` are
    /// kept for a retry (see [`Pool::send_parts`]).
    pub async fn send_parts(
        &self,
        index: usize,
        parts: &mut Parts,
        body: B,
        again: bool,
        stats: Option<&RouteStats>,
        lines: HeaderLines,
    ) -> Result<http::Response<UpstreamBody<B>>, SendError> {
        match &self.pools {
            Pools::Http1(pools) => {
                (pools[index].send_parts(parts, body, again, stats, lines)).await
            }
            Pools::Shadow(_) => Err(SendError::Exchange(
                "a shadow pool sends with Upstream::lean".into(),
            )),
            Pools::Http2(clients) => {
                // `:authority` carries the Host (see `uri`); one it could
                // not be parsed from would differ from it, which a strict
                // server refuses (RFC 9113 §8.3.1), so it is not sent.
                let mut request = owned(parts, body, again);
                let authority = request.uri().authority().map(|a| a.as_str().as_bytes());
                if (request.headers().get(header::HOST))
                    .is_some_and(|h| Some(h.as_bytes()) != authority)
                {
                    request.headers_mut().remove(header::HOST);
                }
                match clients[index].next().request(request).await {
                    Ok(response) => Ok(response.map(UpstreamBody::detached)),
                    Err(e) if e.is_connect() => Err(SendError::Connect(e.into())),
                    Err(e) => Err(SendError::Exchange(e.into())),
                }
            }
        }
    }

    /// The URI to send with. HTTP/1.1 sends origin-form, with the Host
    /// header. HTTP/2 takes `:authority` from the URI, so there it carries
    /// the request's Host, as Envoy sends it (the shadow's is the `-shadow`
    /// one), falling back to the endpoint, and `:scheme` is `https` over
    /// TLS.
    pub fn uri(&self, picked: &Picked, headers: &HeaderMap, path: Option<&PathAndQuery>) -> Uri {
        let path = path
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        match self.destination.protocol {
            UpstreamProtocol::Http1 => Uri::from(path),
            UpstreamProtocol::Http2 => {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok());
                let uri = endpoint_uri(host.as_ref().unwrap_or(&picked.authority), Some(&path));
                match self.destination.tls {
                    None => uri,
                    Some(_) => {
                        let mut parts = uri.into_parts();
                        parts.scheme = Some(Scheme::HTTPS);
                        Uri::from_parts(parts).unwrap_or_default()
                    }
                }
            }
        }
    }
}

/// One HTTP/1.1 pool per endpoint, under the destination's
/// `maxConnections` together.
fn http1_pools<L: Link>(
    destination: &Destination,
    dialers: impl Iterator<Item = Dialer>,
) -> Box<[Arc<Pool<L>>]> {
    let settings = &destination.pool;
    let budget = settings.max_connections.map(|n| Budget::new(n as usize));
    let pools: Box<[_]> = dialers
        .map(|dialer| {
            Arc::new(Pool::new(
                dialer,
                settings.idle_timeout,
                settings.max_requests_per_connection,
                budget.clone(),
            ))
        })
        .collect();
    if let Some(budget) = &budget {
        budget.cover(&pools);
    }
    pools
}

/// `http://AUTHORITY/PATH?QUERY`.
pub fn endpoint_uri(authority: &Authority, path: Option<&PathAndQuery>) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        path.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    // Scheme, authority and path are all present and valid.
    Uri::from_parts(parts).unwrap_or_default()
}

fn authority(address: &str, port: u16) -> Option<Authority> {
    let text = if address.contains(':') && !address.starts_with('[') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    };
    text.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn destination(
        protocol: UpstreamProtocol,
        connections: Option<u32>,
        pending: Option<u32>,
        requests: Option<u32>,
    ) -> Destination {
        let pool = crate::config::model::PoolSettings {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
            ..Default::default()
        };
        Destination {
            key: "d".into(),
            host: "d".into(),
            subset: None,
            port: None,
            endpoints: Vec::new(),
            lb: LoadBalancer::RoundRobin,
            protocol,
            pool,
            outlier: None,
            tls: None,
        }
    }

    fn caps(on_wire: Option<usize>, waiting: usize) -> Caps {
        Caps { on_wire, waiting }
    }

    #[test]
    fn caps_follow_envoys_circuit_breakers() {
        use UpstreamProtocol::{Http1, Http2};
        let of = |p, c, q, r| Caps::of(&destination(p, c, q, r));
        assert_eq!(of(Http1, None, None, None), caps(None, 0), "unlimited");
        assert_eq!(
            of(Http1, None, Some(5), None),
            caps(None, 0),
            "pending needs a connection cap to wait on"
        );
        assert_eq!(of(Http1, Some(2), None, None), caps(Some(2), usize::MAX));
        assert_eq!(of(Http1, Some(2), Some(5), Some(9)), caps(Some(2), 5));
        assert_eq!(
            of(Http1, Some(9), Some(5), Some(2)),
            caps(Some(2), 0),
            "past maxRequests: refused, not queued"
        );
        assert_eq!(
            of(Http2, Some(2), Some(5), None),
            caps(None, 0),
            "one multiplexed connection: maxConnections does not bind"
        );
        assert_eq!(of(Http2, None, Some(5), Some(3)), caps(Some(3), 0));
    }

    #[test]
    fn a_shadows_caps_are_the_tighter_of_umbras_and_the_rules() {
        let rule = destination(UpstreamProtocol::Http1, Some(2), Some(5), None);
        assert_eq!(Caps::shadow(&rule, 1024, 1024), caps(Some(2), 5));
        assert_eq!(Caps::shadow(&rule, 1024, 3), caps(Some(2), 3));
        assert_eq!(Caps::shadow(&rule, 1, 7), caps(Some(1), 7));
        let equal = destination(UpstreamProtocol::Http2, None, None, Some(4));
        assert_eq!(
            Caps::shadow(&equal, 4, 1024),
            caps(Some(4), 0),
            "a rule refusing past its cap still refuses at umbra's equal cap"
        );
        let unlimited = destination(UpstreamProtocol::Http1, None, None, None);
        assert_eq!(Caps::shadow(&unlimited, 1024, 1024), caps(Some(1024), 1024));
    }

    #[test]
    fn authority_brackets_ipv6() {
        assert_eq!(authority("::1", 80).unwrap().as_str(), "[::1]:80");
        assert_eq!(authority("10.0.0.1", 80).unwrap().as_str(), "10.0.0.1:80");
        assert_eq!(authority("backend", 8080).unwrap().as_str(), "backend:8080");
    }

    #[test]
    fn endpoint_uri_keeps_path_and_query() {
        let authority = authority("127.0.0.1", 9).unwrap();
        let path = PathAndQuery::from_static("/a/b?x=1");
        assert_eq!(
            endpoint_uri(&authority, Some(&path)).to_string(),
            "http://127.0.0.1:9/a/b?x=1"
        );
    }
}
