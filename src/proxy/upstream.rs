//! One connection pool per destination endpoint, built once per config (and
//! kept across reloads while the destination is unchanged), plus endpoint
//! selection by the DestinationRule's load-balancing policy. HTTP/1.1 uses
//! umbra's own pool ([`super::pool`]); HTTP/2 multiplexes over hyper-util's
//! client, whose connection tasks serve many requesting tasks at once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderMap, Request, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::pool::Pool;
pub use super::pool::{Outgoing, SendError, UpstreamBody};
use crate::config::model::{Destination, LoadBalancer, UpstreamProtocol};

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
    /// `http1MaxPendingRequests` (or a mirror's per-target limit): requests
    /// on the wire at once.
    limit: Option<Arc<Semaphore>>,
    /// When requests may wait for a place under `limit`: admits `limit`
    /// plus that many waiting, and refuses the rest. `None`: requests
    /// beyond `limit` are refused at once.
    queue: Option<Arc<Semaphore>>,
}

enum Pools<B: Outgoing> {
    Http1(Box<[Arc<Pool<B>>]>),
    Http2(Box<[Client<Dial, B>]>),
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

/// Dials one endpoint whatever the request URI says.
#[derive(Clone)]
pub struct Dial {
    connector: HttpConnector,
    endpoint: Uri,
}

impl Service<Uri> for Dial {
    type Response = <HttpConnector as Service<Uri>>::Response;
    type Error = <HttpConnector as Service<Uri>>::Error;
    type Future = <HttpConnector as Service<Uri>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connector.poll_ready(cx)
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        self.connector.call(self.endpoint.clone())
    }
}

impl<B: Outgoing> Upstream<B> {
    /// `limit` caps concurrent requests (None = unbounded); `queued` more
    /// may wait for a place (see [`Upstream::place`]).
    pub fn new(destination: Arc<Destination>, limit: Option<usize>, queued: usize) -> Self {
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
        let endpoints = authorities.iter().map(|a| endpoint_uri(a, None));
        let pools = match destination.protocol {
            UpstreamProtocol::Http1 => Pools::Http1(
                endpoints
                    .map(|endpoint| {
                        Arc::new(Pool::new(
                            connector.clone(),
                            endpoint,
                            pool.idle_timeout,
                            pool.max_requests_per_connection,
                        ))
                    })
                    .collect(),
            ),
            UpstreamProtocol::Http2 => {
                let mut builder = Client::builder(TokioExecutor::new());
                builder
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .pool_idle_timeout(pool.idle_timeout)
                    .http2_only(true);
                Pools::Http2(
                    endpoints
                        .map(|endpoint| {
                            builder.build(Dial {
                                connector: connector.clone(),
                                endpoint,
                            })
                        })
                        .collect(),
                )
            }
        };
        let active = (0..authorities.len())
            .map(|_| AtomicUsize::new(0))
            .collect();
        let limit = limit
            .or(pool.max_pending_requests.map(|n| n as usize))
            .map(|n| n.clamp(1, Semaphore::MAX_PERMITS / 2));
        let queue = limit.filter(|_| queued > 0).map(|n| {
            Arc::new(Semaphore::new(
                n.saturating_add(queued).min(Semaphore::MAX_PERMITS),
            ))
        });
        let limit = limit.map(|n| Arc::new(Semaphore::new(n)));
        Upstream {
            destination,
            pools,
            authorities,
            next: AtomicUsize::new(0),
            active,
            limit,
            queue,
        }
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

    /// The next endpoint by the load-balancing policy; `None` when the
    /// destination has no endpoints.
    pub fn pick(&self) -> Option<Picked> {
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
        self.active[index].fetch_add(1, Ordering::Relaxed);
        Some(Picked {
            authority: self.authorities[index].clone(),
            guard: EndpointGuard {
                active: self.active.clone(),
                index,
            },
        })
    }

    /// Sends to the endpoint at `index` (from [`Picked::index`]).
    pub async fn send(
        &self,
        index: usize,
        request: Request<B>,
    ) -> Result<http::Response<UpstreamBody<B>>, SendError> {
        match &self.pools {
            Pools::Http1(pools) => pools[index].send(request).await,
            Pools::Http2(clients) => match clients[index].request(request).await {
                Ok(response) => Ok(response.map(UpstreamBody::detached)),
                Err(e) if e.is_connect() => Err(SendError::Connect(e.into())),
                Err(e) => Err(SendError::Exchange(e.into())),
            },
        }
    }

    /// The URI to send with. HTTP/1.1 sends origin-form, with the Host
    /// header. HTTP/2 takes `:authority` from the URI, so there it carries
    /// the request's Host, as Envoy sends it (the shadow's is the `-shadow`
    /// one), falling back to the endpoint.
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
                endpoint_uri(host.as_ref().unwrap_or(&picked.authority), Some(&path))
            }
        }
    }
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
