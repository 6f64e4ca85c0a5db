//! The proxy: takes a downstream request, routes it, forwards it to the
//! primary destination and streams the primary's response back, unchanged
//! but for hop-by-hop headers and the route's header rules. Mirroring hooks
//! in here (`mirror::dispatch` before the primary is sent), and so does
//! analysis (the response body captures a prefix as it streams).
//!
//! Each request reads one [`Table`] snapshot from start to end, so a reload
//! never mixes two configs in one request.

pub mod body;
pub mod dial;
pub mod headers;
pub mod lean;
mod outlier;
pub mod pool;
pub mod upstream;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, SizeHint};
use hyper::body::Incoming;
use rand::Rng;
use smallvec::SmallVec;

use crate::accesslog::{AccessLog, Entry};
use crate::analysis::{Analyzer, Captured, Outcome, Sample};
use crate::config::model::{
    AbortReply, Answer, Config, Cors, Destination, Fault, HeaderOps, Redirect, RedirectPort,
    RegexRewrite, RequestMatch, Route, StringMatch, UpstreamProtocol,
};
use crate::metrics::{Blame, Metrics, RouteStats};
use crate::mirror::ejection::Ejection;
use crate::mirror::tee::ShadowBody;
use crate::mirror::{self, MirrorTarget, Mirroring};
use crate::routing::{self, Router};
use body::{Ending, Failures, OnEnd, RequestBody, ResponseBody, RouteTimer, Upload};
use headers::X_UMBRA_ERROR;
use upstream::{Busy, Caps, HeaderLines, Upstream, UpstreamBody};

/// Process-wide proxy state: the current table plus everything that
/// outlives a config reload.
pub struct Proxy {
    table: ArcSwap<Table>,
    pub metrics: Arc<Metrics>,
    pub mirroring: Mirroring,
    pub analyzer: Option<Arc<Analyzer>>,
    pub access_log: AccessLog,
    /// Pools kept across reloads while their destination is unchanged.
    cache: Mutex<UpstreamCache>,
    limits: MirrorLimits,
    /// The drain timeout ran out: requests still in flight are being cut.
    stopping: Arc<AtomicBool>,
}

/// In-flight caps for shadows.
#[derive(Debug, Clone, Copy)]
pub struct MirrorLimits {
    /// Shadows admitted (sent or waiting) across all targets.
    pub global: usize,
    /// Shadow exchanges on the wire per target: each holds an upstream
    /// connection and its buffers (~20 KiB against a blackhole).
    pub per_target: usize,
    /// Shadows without a body, per target, that may wait for one of those
    /// places; a waiting shadow is only its request and task (~2 KiB).
    pub queued_per_target: usize,
    pub buffer_bytes: usize,
    /// Failures in a row after which a target is ejected (0: never; see
    /// `mirror::ejection`).
    pub eject_after: u32,
    /// A target's first ejection (at most `mirror::ejection::MAX_EJECTION`).
    pub eject_for: Duration,
}

impl Default for MirrorLimits {
    /// A shadow that keeps up has about as many requests in flight as the
    /// primary (500 for 50 HTTP/2 clients × 10 streams), but in bursts up to
    /// twice that and more, as its latency is not tied to the primary's. So
    /// Envoy's defaults: 1024 requests and 1024 pending per cluster, and
    /// room globally for two targets at their full caps.
    fn default() -> Self {
        MirrorLimits {
            global: 4096,
            per_target: 1024,
            queued_per_target: 1024,
            buffer_bytes: 64 * 1024 * 1024,
            // Envoy's `consecutive_gateway_failure` and `base_ejection_time`.
            eject_after: 5,
            eject_for: Duration::from_secs(30),
        }
    }
}

/// One config snapshot, ready to serve.
pub struct Table {
    pub config: Arc<Config>,
    router: Router,
    /// `routes[vs][route]`, parallel to the config's VirtualServices.
    routes: Vec<Vec<RouteRuntime>>,
}

struct RouteRuntime {
    route: Arc<Route>,
    /// The route name shared by log lines and samples without copying.
    name: Arc<str>,
    /// Its VirtualService's name, shared likewise.
    virtual_service: Arc<str>,
    destinations: Vec<DestinationRuntime>,
    total_weight: u32,
    mirrors: Vec<Arc<MirrorTarget>>,
    /// Bytes of each response to capture for analysis; `None` = off.
    capture: Option<usize>,
    /// For what the route answers itself (`route.answer`, CORS
    /// preflights): its counters, under the destination `redirect`,
    /// `direct_response` or `cors_preflight`.
    answered: Option<Arc<RouteStats>>,
}

struct DestinationRuntime {
    /// `host|subset|port`, shared by samples without copying.
    key: Arc<str>,
    upstream: Arc<Upstream<RequestBody>>,
    /// Shared with the response bodies, which count failures mid-body.
    stats: Arc<RouteStats>,
}

#[derive(Default)]
struct UpstreamCache {
    primary: HashMap<String, (String, Arc<Upstream<RequestBody>>)>,
    shadow: HashMap<String, (String, Arc<Upstream<ShadowBody>>)>,
}

/// The cache key is the destination key; the fingerprint detects changes.
fn fingerprint(destination: &Destination) -> String {
    serde_json::to_string(destination).unwrap_or_default()
}

impl Proxy {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
        analyzer: Option<Arc<Analyzer>>,
        limits: MirrorLimits,
    ) -> Proxy {
        let proxy = Proxy {
            table: ArcSwap::from_pointee(Table {
                config: Arc::new(Config::default()),
                router: Router::default(),
                routes: Vec::new(),
            }),
            metrics,
            mirroring: Mirroring {
                global: Arc::new(tokio::sync::Semaphore::new(limits.global)),
                budget: mirror::tee::Budget::new(limits.buffer_bytes),
                access_log: access_log.clone(),
                workers: std::sync::OnceLock::new(),
            },
            analyzer,
            access_log,
            cache: Mutex::new(UpstreamCache::default()),
            limits,
            stopping: Arc::new(AtomicBool::new(false)),
        };
        proxy.install(config);
        proxy
    }

    /// Marks what is still in flight as cut by the server, not by clients
    /// leaving (see `Abandoned`).
    pub fn cut_in_flight(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Builds a table for `config` and swaps it in atomically.
    pub fn install(&self, config: Arc<Config>) {
        if let Some(analyzer) = &self.analyzer {
            analyzer.set_settings(config.analysis.clone());
        }
        let table = self.build(config);
        if let Some(analyzer) = &self.analyzer {
            let routes = table.routes.iter().flatten();
            let targets = routes.flat_map(|route| route.mirrors.iter());
            analyzer.keep_routes(targets.map(|t| t.analysed_as.clone()).collect());
        }
        self.table.store(Arc::new(table));
    }

    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    fn build(&self, config: Arc<Config>) -> Table {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut primary = HashMap::new();
        let mut shadow = HashMap::new();
        let mut routes = Vec::with_capacity(config.virtual_services.len());
        for vs in &config.virtual_services {
            let settings = config.analysis.get(&vs.name);
            let vs_name: Arc<str> = Arc::from(vs.name.as_str());
            let mut vs_routes = Vec::with_capacity(vs.routes.len());
            for route in &vs.routes {
                let destinations = route
                    .destinations
                    .iter()
                    .map(|weighted| {
                        let destination = &weighted.destination;
                        let upstream = primary
                            .entry(destination.key.clone())
                            .or_insert_with(|| {
                                reuse(&mut cache.primary, destination, || {
                                    let stats =
                                        || self.metrics.destination_ejections(&destination.key);
                                    Upstream::new(destination.clone(), Caps::of(destination))
                                        .with_outliers(stats)
                                })
                            })
                            .clone();
                        DestinationRuntime {
                            key: Arc::from(destination.key.as_str()),
                            upstream,
                            stats: Arc::new(self.metrics.route(&route.name, &destination.key)),
                        }
                    })
                    .collect();
                let mut targets: Vec<(Arc<Destination>, u32, String, bool)> = route
                    .mirrors
                    .iter()
                    .map(|m| (m.destination.clone(), m.per_million, m.label.clone(), false))
                    .collect();
                let analysis_on = self.analyzer.is_some()
                    && !route.mirrors.is_empty()
                    && settings.is_none_or(|s| s.enabled);
                if let (true, Some(baseline)) =
                    (analysis_on, settings.and_then(|s| s.baseline.clone()))
                {
                    // The baseline samples with the first shadow's rate, by
                    // request id when that is on, so it sees the same traffic.
                    let rate = route.mirrors.first().map_or(1_000_000, |m| m.per_million);
                    let label = format!("baseline:{}", baseline.label());
                    targets.push((baseline, rate, label, true));
                }
                let MirrorLimits {
                    per_target,
                    queued_per_target,
                    eject_after,
                    eject_for,
                    ..
                } = self.limits;
                // Each shadow target analysed on its own (see MirrorTarget).
                let several = targets.iter().filter(|t| !t.3).count() > 1;
                let mirrors = targets
                    .into_iter()
                    .map(|(destination, per_million, label, baseline)| {
                        let upstream = shadow
                            .entry(destination.key.clone())
                            .or_insert_with(|| {
                                reuse(&mut cache.shadow, &destination, || {
                                    let caps =
                                        Caps::shadow(&destination, per_target, queued_per_target);
                                    let stats = self.metrics.mirror_target(&label);
                                    let ejection =
                                        Ejection::new(eject_after, eject_for).reporting(stats);
                                    Upstream::shadow(destination.clone(), caps).ejecting(ejection)
                                })
                            })
                            .clone();
                        let analysed_as = match several && !baseline {
                            true => Arc::from(format!("{} → {label}", route.name)),
                            false => Arc::from(route.name.as_str()),
                        };
                        Arc::new(MirrorTarget {
                            stats: self.metrics.mirror(&route.name, &label),
                            label: Arc::from(label),
                            per_million,
                            upstream,
                            baseline,
                            analysed_as,
                        })
                    })
                    .collect();
                vs_routes.push(RouteRuntime {
                    total_weight: routing::total_weight(&route.destinations),
                    name: Arc::from(route.name.as_str()),
                    virtual_service: vs_name.clone(),
                    route: route.clone(),
                    destinations,
                    mirrors,
                    capture: analysis_on
                        .then(|| settings.map_or(256 * 1024, |s| s.max_capture_bytes)),
                    answered: {
                        let kind = match (&route.answer, &route.cors) {
                            (Some(Answer::Redirect(_)), _) => Some("redirect"),
                            (Some(Answer::Direct { .. }), _) => Some("direct_response"),
                            (None, Some(_)) => Some("cors_preflight"),
                            (None, None) => None,
                        };
                        kind.map(|kind| Arc::new(self.metrics.route(&route.name, kind)))
                    },
                });
            }
            routes.push(vs_routes);
        }
        // Pools no longer referenced by any route close when dropped here.
        cache.primary = primary
            .into_iter()
            .map(|(key, up)| (key, (fingerprint(&up.destination), up)))
            .collect();
        cache.shadow = shadow
            .into_iter()
            .map(|(key, up)| (key, (fingerprint(&up.destination), up)))
            .collect();
        Table {
            router: Router::new(&config),
            config,
            routes,
        }
    }
}

fn reuse<B: upstream::Outgoing>(
    cache: &mut HashMap<String, (String, Arc<Upstream<B>>)>,
    destination: &Arc<Destination>,
    build: impl FnOnce() -> Upstream<B>,
) -> Arc<Upstream<B>> {
    let print = fingerprint(destination);
    match cache.get(&destination.key) {
        Some((old, upstream)) if *old == print => upstream.clone(),
        _ => Arc::new(build()),
    }
}

/// Why umbra answered a request itself. The text is the `x-umbra-error`
/// header; the side says whom to blame (never v2 for a client's mistake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalReply {
    InvalidHost,
    ConnectNotSupported,
    NoRoute,
    NoHealthyUpstream,
    Overflow,
    ConnectFailure,
    Reset,
    /// An HTTP/2 upstream refused the stream: it never processed the
    /// request. Answered as a reset.
    RefusedStream,
    Timeout,
    /// The client's request body was malformed mid-exchange.
    RequestBody,
    /// The client sent none of its request body for the body read
    /// timeout (nginx's `client_body_timeout`).
    RequestTimeout,
    /// The client went away mid-request (logged only: nobody is there).
    ClientGone,
}

impl LocalReply {
    fn status(self) -> StatusCode {
        match self {
            LocalReply::InvalidHost => StatusCode::BAD_REQUEST,
            LocalReply::ConnectNotSupported => StatusCode::METHOD_NOT_ALLOWED,
            LocalReply::NoRoute => StatusCode::NOT_FOUND,
            LocalReply::NoHealthyUpstream | LocalReply::Overflow => StatusCode::SERVICE_UNAVAILABLE,
            LocalReply::ConnectFailure | LocalReply::Reset | LocalReply::RefusedStream => {
                StatusCode::BAD_GATEWAY
            }
            LocalReply::Timeout => StatusCode::GATEWAY_TIMEOUT,
            LocalReply::RequestBody => StatusCode::BAD_REQUEST,
            LocalReply::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            // nginx's "client closed request".
            LocalReply::ClientGone => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            LocalReply::InvalidHost => "invalid_host",
            LocalReply::ConnectNotSupported => "connect_not_supported",
            LocalReply::NoRoute => "no_route",
            LocalReply::NoHealthyUpstream => "no_healthy_upstream",
            LocalReply::Overflow => "upstream_overflow",
            LocalReply::ConnectFailure => "upstream_connect_failure",
            LocalReply::Reset | LocalReply::RefusedStream => "upstream_reset",
            LocalReply::Timeout => "upstream_timeout",
            LocalReply::RequestBody => "downstream_request_body_error",
            LocalReply::RequestTimeout => "request_body_timeout",
            // Envoy's response code details for it.
            LocalReply::ClientGone => "downstream_remote_disconnect",
        }
    }

    fn body(self) -> &'static str {
        match self {
            LocalReply::InvalidHost => "invalid or missing Host header\n",
            LocalReply::ConnectNotSupported => "CONNECT is not supported\n",
            LocalReply::NoRoute => "no route for this host and path\n",
            LocalReply::NoHealthyUpstream => "no healthy upstream\n",
            LocalReply::Overflow => "upstream connection pool is full\n",
            LocalReply::ConnectFailure => "upstream connect failure\n",
            LocalReply::Reset => "upstream connection reset\n",
            LocalReply::RefusedStream => "upstream refused the stream\n",
            LocalReply::Timeout => "upstream request timeout\n",
            LocalReply::RequestBody => "malformed request body\n",
            LocalReply::RequestTimeout => "request body timeout\n",
            LocalReply::ClientGone => "client closed request\n",
        }
    }

    pub fn response(self) -> Response<ResponseBody> {
        let mut response = Response::new(ResponseBody::local(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(
            X_UMBRA_ERROR.clone(),
            HeaderValue::from_static(self.reason()),
        );
        response
    }

    /// Which error family counts this reply.
    fn blame(self) -> Blame {
        match self {
            LocalReply::NoHealthyUpstream
            | LocalReply::Overflow
            | LocalReply::ConnectFailure
            | LocalReply::Reset
            | LocalReply::RefusedStream
            | LocalReply::Timeout => Blame::Upstream,
            LocalReply::InvalidHost
            | LocalReply::ConnectNotSupported
            | LocalReply::NoRoute
            | LocalReply::RequestBody
            | LocalReply::RequestTimeout
            | LocalReply::ClientGone => Blame::Downstream,
        }
    }

    fn outcome(self) -> Outcome {
        match self {
            LocalReply::Timeout => Outcome::Timeout,
            LocalReply::ConnectFailure | LocalReply::NoHealthyUpstream => Outcome::ConnectFailure,
            other => Outcome::Failed(other.reason().to_string()),
        }
    }
}

/// The client end of a downstream connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The port of the listener it came to, for `match.port`.
    listener_port: u16,
    /// How long it may send none of a request body (`None`: forever).
    body_read_timeout: Option<Duration>,
    /// Rendered once per connection rather than once per request.
    forwarded_for: HeaderValue,
    /// It came over TLS (`x-forwarded-proto: https`).
    secure: bool,
    /// Its verified certificate, for `x-forwarded-client-cert`.
    client_cert: ClientCert,
}

impl Peer {
    pub fn new(
        addr: SocketAddr,
        listener_port: u16,
        secure: bool,
        client_cert: ClientCert,
    ) -> Peer {
        Peer {
            ip: addr.ip(),
            listener_port,
            body_read_timeout: None,
            forwarded_for: headers::forwarded_for(addr.ip()),
            secure,
            client_cert,
        }
    }

    /// Its request bodies end in an error once it has sent none of one for
    /// `limit` (zero: never).
    pub fn with_body_read_timeout(self, limit: Duration) -> Peer {
        let body_read_timeout = (!limit.is_zero()).then_some(limit);
        Peer {
            body_read_timeout,
            ..self
        }
    }
}

/// What a connection's requests carry upstream as `x-forwarded-client-cert`.
#[derive(Debug, Clone)]
pub enum ClientCert {
    /// umbra asks no client for a certificate: the header passes as sent.
    NotAsked,
    /// None on this connection: a client's own header is removed, so that
    /// it cannot pass for one umbra verified.
    Absent,
    /// The value for the certificate the client presented and umbra verified.
    Verified(HeaderValue),
}

impl ClientCert {
    /// Sets or removes the header in a client's request.
    fn apply(&self, headers: &mut HeaderMap) {
        match self {
            ClientCert::NotAsked => {}
            ClientCert::Absent => {
                headers.remove(&headers::X_FORWARDED_CLIENT_CERT);
            }
            ClientCert::Verified(value) => {
                headers.insert(headers::X_FORWARDED_CLIENT_CERT.clone(), value.clone());
            }
        }
    }
}

/// Who writes the response to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// hyper's server (HTTP/2, requests with a body, upgrades): it writes
    /// the response's header map.
    Hyper,
    /// umbra's own HTTP/1.1 server (`server::lean`), which also writes
    /// header lines passed on as the upstream sent them
    /// ([`ResponseBody::take_raw_head`]).
    Lean,
}

/// Serves one downstream request. Never fails: every problem becomes a
/// local reply with `x-umbra-error`.
pub async fn handle(
    proxy: &Proxy,
    peer: &Peer,
    request: Request<Option<Incoming>>,
    writer: Writer,
) -> Response<ResponseBody> {
    let started = Instant::now();
    let client = peer.ip;
    let table = proxy.table.load_full();
    let (mut parts, body) = request.into_parts();
    let host = match request_host(&parts) {
        Ok(host) => host,
        Err(reply) => return finish_local(proxy, &parts, client, started, None, reply),
    };
    if parts.method == Method::CONNECT {
        let reply = LocalReply::ConnectNotSupported;
        return finish_local(proxy, &parts, client, started, Some(&host), reply);
    }
    // Before routing, as Envoy sanitises it: a route matching on the
    // header sees umbra's value, never one the client made up.
    peer.client_cert.apply(&mut parts.headers);
    let Some(index) = (table.router).route(&table.config, &host, &parts, peer.listener_port) else {
        return finish_local(
            proxy,
            &parts,
            client,
            started,
            Some(&host),
            LocalReply::NoRoute,
        );
    };
    let runtime = &table.routes[index.virtual_service][index.route];
    let route = &runtime.route;
    if let Some(answer) = &route.answer {
        let response = answer_itself(answer, &route.headers.response, &parts, &host, peer);
        return own_answer(proxy, runtime, &parts, client, host, started, response);
    }
    // Istio's `corsPolicy`, as Envoy's CORS filter ahead of the fault
    // filter and the router: a preflight is answered here; an allowed
    // origin's response (umbra's own replies included) gets the CORS
    // headers. Boxed: one word in every request's state.
    let mut allowed_origin = None;
    if let Some(cors) = &route.cors {
        match cors_check(cors, &parts) {
            CorsCheck::Preflight(response) => {
                return own_answer(proxy, runtime, &parts, client, host, started, *response);
            }
            CorsCheck::Allowed(origin) => allowed_origin = Some(Box::new(origin)),
            CorsCheck::Other => {}
        }
    }

    let pick = if runtime.destinations.len() == 1 {
        0
    } else {
        routing::pick_weighted(
            &route.destinations,
            rand::rng().random_range(0..runtime.total_weight),
        )
    };
    let destination = &runtime.destinations[pick];
    let weighted = &route.destinations[pick];

    let upgrade = upgrade_protocol(&parts);
    let downstream_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let matched = index.matched.and_then(|i| route.matches.get(i));
    let request_id = prepare_request(&mut parts, &host, peer, route, matched, weighted);
    if let Some(protocol) = &upgrade {
        // Hop-by-hop stripping removed these; an upgrade needs them end to end.
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    // The access log shows the client's protocol, as nginx's
    // `$server_protocol` and Envoy's `%PROTOCOL%` do.
    let downstream_version = parts.version;
    parts.version = match destination.upstream.destination.protocol {
        UpstreamProtocol::Http1 => Version::HTTP_11,
        UpstreamProtocol::Http2 => Version::HTTP_2,
    };

    let log = proxy.access_log.enabled().then(|| LogLine {
        version: downstream_version,
        ..LogLine::new(
            proxy,
            &parts,
            client,
            host.clone(),
            value_string(&request_id),
            runtime.name.clone(),
            started,
        )
    });

    // From here a client that leaves is logged (an injected delay
    // included, as Envoy logs it).
    let tried = Tried::default();
    let abandoned = Abandoned {
        destination,
        log: &log,
        stopping: &proxy.stopping,
        tried: &tried,
        armed: true,
    };
    // Istio's `fault`, as Envoy's fault filter ahead of its router: an
    // aborted request goes nowhere, mirrors included.
    if let Some(fault) = &route.fault {
        // Boxed: its timer would otherwise make every request's state
        // larger.
        if let Some(reply) = Box::pin(inject(fault, &destination.stats)).await {
            abandoned.disarm();
            let mut response = fault_response(reply);
            if let (Some(cors), Some(origin)) = (&route.cors, allowed_origin) {
                cors_headers(cors, *origin, response.headers_mut());
            }
            let status = response.status();
            return match log {
                Some(log) => response.map(|b| b.with_end(Finish::fault(log, status))),
                None => response,
            };
        }
    }

    let size = body
        .as_ref()
        .map_or_else(|| SizeHint::with_exact(0), Body::size_hint);
    let upload = Upload::of(body.as_ref());
    let (tee, pairing) = if runtime.mirrors.is_empty() {
        (None, None)
    } else {
        let bodiless = size.exact() == Some(0);
        let make_pairing = |bodies: bool| {
            let limit = runtime.capture?;
            let analyzer = proxy.analyzer.as_ref()?;
            Some(Pairing::new(
                analyzer.clone(),
                if bodies { limit } else { 0 },
                Meta {
                    virtual_service: runtime.virtual_service.clone(),
                    primary_destination: destination.key.clone(),
                    host: host.clone(),
                    suffixed_host: (route.mirror_policy.host_suffix)
                        .then(|| mirror::upstream_host(&parts, &host).to_string()),
                    method: parts.method.clone(),
                    path: parts.uri.path().to_string(),
                    request_id: value_string(&request_id),
                    fingerprint: request_fingerprint(&parts, bodiless),
                },
            ))
        };
        mirror::dispatch(
            &proxy.mirroring,
            route,
            &runtime.name,
            &runtime.mirrors,
            &mirror::Primary {
                parts: &parts,
                host: &host,
                request_id: &request_id,
                client,
                version: downstream_version,
                upgrade: upgrade.is_some(),
                body: size,
                upload: &upload,
            },
            make_pairing,
        )
    };

    // Header lines nothing here reads or edits are passed on unparsed.
    let lines = match writer {
        Writer::Lean
            if upgrade.is_none()
                && pairing.is_none()
                && allowed_origin.is_none()
                && route.headers.response.is_empty()
                && weighted.headers.response.is_empty() =>
        {
            HeaderLines::Raw
        }
        _ => HeaderLines::Map,
    };
    let body = RequestBody::new(body, tee, upload.clone(), peer.body_read_timeout);
    // The route timeout covers the whole response, body included, as in
    // Envoy.
    let mut timeout = route
        .timeout
        .map(|limit| Box::pin(RouteTimer::new(limit, upload.clone())));
    let bound = timeout.as_mut().map(Pin::as_mut);
    let sent = forward(runtime, destination, parts, body, bound, lines, &tried).await;
    abandoned.disarm();
    match sent {
        Ok((mut response, endpoint, mut busy)) => {
            let elapsed = started.elapsed().as_secs_f64();
            destination.stats.response(response.status(), elapsed);
            let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
            let upgraded = match (switching, downstream_upgrade) {
                (true, Some(downstream)) => {
                    // The tunnel keeps the upstream connection: it holds the
                    // request's place under the caps until it closes.
                    let busy = std::mem::take(&mut busy);
                    tunnel(hyper::upgrade::on(&mut response), downstream, busy);
                    response.headers().get(header::UPGRADE).cloned()
                }
                _ => None,
            };
            let (mut head, body) = response.into_parts();
            headers::strip_hop_by_hop(&mut head.headers);
            if let Some(protocol) = upgraded {
                head.headers
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                head.headers.insert(header::UPGRADE, protocol);
            }
            headers::apply_route(
                &route.headers.response,
                &weighted.headers.response,
                route.destinations.len() == 1,
                &mut head.headers,
            );
            let primary = pairing.map(|pairing| {
                let mut headers = head.headers.clone();
                headers::detach(&mut headers);
                PrimaryCapture {
                    pairing,
                    status: head.status,
                    headers,
                }
            });
            // After the analysis' copy: the shadow's response has none.
            if let (Some(cors), Some(origin)) = (&route.cors, allowed_origin) {
                cors_headers(cors, *origin, &mut head.headers);
            }
            let capture = primary.as_ref().map(|p| p.pairing.capture_limit());
            let end: Option<Box<dyn OnEnd>> =
                if log.is_some() || primary.is_some() || busy.matters() {
                    Some(Box::new(Finish {
                        log,
                        status: head.status,
                        endpoint,
                        primary,
                        reply: None,
                        _busy: busy,
                    }))
                } else {
                    None
                };
            let failures = Failures {
                stats: destination.stats.clone(),
                request: upload,
                stopping: proxy.stopping.clone(),
            };
            Response::from_parts(
                head,
                ResponseBody::upstream(body, capture, end, timeout, failures),
            )
        }
        Err((reply, tried)) => {
            destination.stats.failure(reply.blame(), reply.reason());
            if let Some(pairing) = pairing {
                match reply.blame() {
                    Blame::Upstream => pairing.fill_primary(reply.outcome()),
                    Blame::Downstream => pairing.skip_primary(),
                }
            }
            let mut response = reply.response();
            if let (Some(cors), Some(origin)) = (&route.cors, allowed_origin) {
                cors_headers(cors, *origin, response.headers_mut());
            }
            match log {
                Some(log) => response.map(|b| b.with_end(Finish::local(log, reply, tried))),
                None => response,
            }
        }
    }
}

/// The reason an injected abort gives (Envoy's response code details).
const FAULT_ABORT: &str = "fault_filter_abort";

/// Counts and logs what umbra answered for the route itself (a redirect,
/// a direct response, a CORS preflight).
fn own_answer(
    proxy: &Proxy,
    runtime: &RouteRuntime,
    parts: &Parts,
    client: IpAddr,
    host: String,
    started: Instant,
    response: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let status = response.status();
    if let Some(stats) = &runtime.answered {
        stats.response(status, started.elapsed().as_secs_f64());
    }
    if !proxy.access_log.enabled() {
        return response;
    }
    let route = runtime.name.clone();
    let log = LogLine::new(proxy, parts, client, host, sent_id(parts), route, started);
    response.map(|b| b.with_end(Finish::answered(log, status)))
}

/// What a route's CORS policy makes of a request.
enum CorsCheck {
    /// A preflight umbra answers (boxed: rare, and large).
    Preflight(Box<Response<ResponseBody>>),
    /// A request from an allowed origin: its response gets the CORS
    /// headers.
    Allowed(HeaderValue),
    Other,
}

/// Envoy's CORS filter's `decodeHeaders`: a request with an `Origin` is a
/// CORS request; an `OPTIONS` with `Access-Control-Request-Method` too is a
/// preflight, answered 200 here (its CORS headers only for an allowed
/// origin) unless its origin is not allowed and unmatched preflights go
/// upstream.
fn cors_check(cors: &Cors, parts: &Parts) -> CorsCheck {
    let Some(origin) = parts.headers.get(header::ORIGIN).filter(|o| !o.is_empty()) else {
        return CorsCheck::Other;
    };
    let allowed = origin.to_str().is_ok_and(|origin| {
        (cors.origins.iter())
            .any(|m| routing::string_match(m, "*") || routing::string_match(m, origin))
    });
    let request = &parts.headers;
    let requested = request
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .filter(|method| !method.is_empty());
    match requested {
        Some(method) if parts.method == Method::OPTIONS && (allowed || !cors.forward_unmatched) => {
            let mut response = Response::new(ResponseBody::local(""));
            let headers = response.headers_mut();
            if allowed {
                headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            }
            if cors.credentials {
                let yes = HeaderValue::from_static("true");
                headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, yes);
            }
            if let Some(methods) = preflight_list(&cors.methods, Some(method)) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, methods);
            }
            let asked = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS);
            if let Some(names) = preflight_list(&cors.headers, asked) {
                headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, names);
            }
            if let Some(age) = cors.max_age {
                headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
            }
            CorsCheck::Preflight(Box::new(response))
        }
        _ if allowed => CorsCheck::Allowed(origin.clone()),
        _ => CorsCheck::Other,
    }
}

/// A preflight's allowed methods or headers: the configured list, or for
/// `*` what the preflight asked for, as in Envoy.
fn preflight_list(configured: &Option<String>, asked: Option<&HeaderValue>) -> Option<HeaderValue> {
    match configured.as_deref()? {
        "*" => asked.cloned(),
        list => HeaderValue::from_str(list).ok(),
    }
}

/// Envoy's CORS filter's `encodeHeaders`, for an allowed origin.
fn cors_headers(cors: &Cors, origin: HeaderValue, headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if cors.credentials {
        let yes = HeaderValue::from_static("true");
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, yes);
    }
    if let Some(expose) = cors
        .expose
        .as_deref()
        .and_then(|e| HeaderValue::from_str(e).ok())
    {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose);
    }
}

/// A route's `redirect` or `directResponse`, as Envoy's router answers
/// them: nothing is forwarded or mirrored, and the route's response header
/// rules apply.
fn answer_itself(
    answer: &Answer,
    rules: &HeaderOps,
    parts: &Parts,
    host: &str,
    peer: &Peer,
) -> Response<ResponseBody> {
    let mut response = match answer {
        Answer::Redirect(redirect) => {
            let mut response = Response::new(ResponseBody::local(""));
            *response.status_mut() =
                StatusCode::from_u16(redirect.code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            let location = redirect_location(redirect, parts, host, peer);
            // Built from a validated authority and path and the request's
            // own, so always a valid value; never a panic if not.
            if let Ok(location) = HeaderValue::try_from(location) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Answer::Direct { status, body } => {
            // 204 and 304 have no content at all. (To HEAD, hyper sends
            // the head alone, its length included.)
            let body = match status {
                204 | 304 => Bytes::new(),
                _ => body.clone(),
            };
            let text = !body.is_empty();
            let mut response = Response::new(ResponseBody::bytes(body));
            *response.status_mut() = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
            if text {
                // As Envoy's local replies with a body.
                let text = HeaderValue::from_static("text/plain");
                response.headers_mut().insert(header::CONTENT_TYPE, text);
            }
            response
        }
    };
    headers::apply_route(rules, &HeaderOps::default(), true, response.headers_mut());
    response
}

/// Where a redirect sends the client, as Envoy's `RedirectAction` builds
/// it: the request's URL with the parts the redirect names replaced. With
/// the request's host, its port is dropped for a new `port`, and for a new
/// scheme when it was the old scheme's default (`:80` for http).
fn redirect_location(redirect: &Redirect, parts: &Parts, host: &str, peer: &Peer) -> String {
    let own_scheme = if peer.secure { "https" } else { "http" };
    let scheme = redirect.scheme.as_deref().unwrap_or(own_scheme);
    let port = match redirect.port {
        RedirectPort::Default => None,
        RedirectPort::FromRequest => Some(peer.listener_port),
        RedirectPort::Port(port) => Some(port),
    };
    let host = match &redirect.authority {
        Some(authority) => authority.as_str(),
        None => {
            let (name, own_port) = split_port(host);
            let default = match own_scheme {
                "https" => ":443",
                _ => ":80",
            };
            let drop = port.is_some() || (scheme != own_scheme && own_port == Some(default));
            if drop {
                name
            } else {
                host
            }
        }
    };
    let request = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let path = match &redirect.uri {
        // A query in the redirect's path replaces the request's.
        Some(uri) if uri.contains('?') => uri.clone(),
        Some(uri) => match request.find('?') {
            Some(query) => format!("{uri}{}", &request[query..]),
            None => uri.clone(),
        },
        None => request.to_string(),
    };
    let slash = if path.starts_with('/') { "" } else { "/" };
    let port = port.map(|port| format!(":{port}")).unwrap_or_default();
    format!("{scheme}://{host}{port}{slash}{path}")
}

/// `host[:port]` split into the host and `:port` (IPv6 in brackets).
fn split_port(host: &str) -> (&str, Option<&str>) {
    let colon = match host.strip_prefix('[') {
        Some(_) => host.rfind("]:").map(|at| at + 1),
        None => host.rfind(':'),
    };
    match colon {
        Some(at) => (&host[..at], Some(&host[at..])),
        None => (host, None),
    }
}

/// Runs a route's `fault`: the delay, if drawn, then the abort's reply, if
/// drawn (each drawn apart, as in Envoy).
async fn inject(fault: &Fault, stats: &RouteStats) -> Option<AbortReply> {
    let drawn = |per_million: u32| rand::rng().random_range(0..1_000_000) < per_million;
    if let Some(delay) = fault.delay.as_ref().filter(|d| drawn(d.per_million)) {
        stats.fault("delay");
        tokio::time::sleep(delay.fixed).await;
    }
    let abort = fault.abort.as_ref().filter(|a| drawn(a.per_million))?;
    stats.fault("abort");
    Some(abort.reply)
}

/// An injected abort's response: the status with Envoy's body, or, for
/// `grpcStatus`, a gRPC trailers-only response (200, no body).
fn fault_response(reply: AbortReply) -> Response<ResponseBody> {
    let (status, body, content_type) = match reply {
        AbortReply::Http(code) => (code, "fault filter abort\n", "text/plain"),
        AbortReply::Grpc(_) => (200, "", "application/grpc"),
    };
    let mut response = Response::new(ResponseBody::local(body));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(X_UMBRA_ERROR.clone(), HeaderValue::from_static(FAULT_ABORT));
    if let AbortReply::Grpc(code) = reply {
        headers.insert("grpc-status", HeaderValue::from(u16::from(code)));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("fault filter abort"),
        );
    }
    response
}

/// Sends to the primary, with retries, until the response head or the
/// route's `timeout`. Returns the response, the endpoint it came from, and that
/// endpoint's busy guard; or the local reply and the endpoint last tried,
/// if any (for the access log, as Envoy's `%UPSTREAM_HOST%`), which is
/// also kept in `tried` for when the client leaves first.
async fn forward(
    runtime: &RouteRuntime,
    destination: &DestinationRuntime,
    parts: Parts,
    body: RequestBody,
    mut timeout: Option<Pin<&mut RouteTimer>>,
    lines: HeaderLines,
    tried: &Tried,
) -> Result<
    (Response<UpstreamBody<RequestBody>>, Option<Authority>, Busy),
    (LocalReply, Option<Authority>),
> {
    let route = &runtime.route;
    let upstream = &destination.upstream;
    let Some(admitted) = upstream.try_admit() else {
        return Err((LocalReply::Overflow, None));
    };
    // Past `maxConnections`, wait for a connection to come free, as
    // Envoy's pending requests do, within the route's timeout.
    let place = match upstream.try_place() {
        Some(place) => place,
        None => {
            let _pending = destination.stats.pending();
            match timeout.as_mut() {
                Some(timer) => timer
                    .as_mut()
                    .bound(upstream.place())
                    .await
                    .map_err(|_| (LocalReply::Timeout, None))?,
                None => upstream.place().await,
            }
        }
    };
    let replayable = body.is_end_stream();
    // How far the client's upload got, and whether it broke (nothing
    // without a body).
    let upload = body.upload();
    let retries = route.retries.as_ref().filter(|_| replayable);
    let attempts = 1u32.saturating_add(retries.map_or(0, |r| r.attempts));
    // Every attempt, as Envoy's `per_try_timeout`: also the only one of a
    // request whose body rules out retries.
    let per_try = route.retries.as_ref().and_then(|r| r.per_try_timeout);
    let idempotent = is_idempotent(&parts.method);

    // The upstream's request is umbra's own: nothing the client's server
    // hung on it goes along.
    let mut parts = parts;
    parts.extensions.clear();
    let attempt_loop = async {
        let mut body = Some(body);
        let mut last = LocalReply::NoHealthyUpstream;
        // The place of the retry under way, under `maxRetries`.
        let mut _retrying = None;
        for attempt in 1..=attempts {
            let Some(picked) = upstream.pick() else {
                return Err(LocalReply::NoHealthyUpstream);
            };
            tried.set(picked.index());
            parts.uri = upstream.uri(&picked, &parts.headers, parts.uri.path_and_query());
            let body = body.take().unwrap_or_else(RequestBody::empty);
            let more = attempt < attempts;
            let stats = Some(&*destination.stats);
            let send = upstream.send_parts(picked.index(), &mut parts, body, more, stats, lines);
            let result = match per_try {
                // Boxed: inline, the timer would make every request's
                // state larger, with or without a per-try timeout.
                Some(limit) => match Box::pin(RouteTimer::new(limit, upload.clone()))
                    .as_mut()
                    .bound(send)
                    .await
                {
                    Ok(result) => result.map_err(classify),
                    Err(_) => Err(LocalReply::Timeout),
                },
                None => send.await.map_err(classify),
            };
            // A request body the client broke (malformed, gone, stalled)
            // failed the exchange, however the upstream reported it: the
            // client's doing, neither the endpoint's nor one to retry.
            let result = result.map_err(|reply| upload.reply().unwrap_or(reply));
            match &result {
                Ok(response) => upstream.observe(picked.index(), Some(response.status().as_u16())),
                Err(LocalReply::ConnectFailure | LocalReply::Reset)
                | Err(LocalReply::RefusedStream | LocalReply::Timeout) => {
                    upstream.observe(picked.index(), None)
                }
                Err(_) => {}
            }
            let retry_on = retries.map(|r| &r.retry_on);
            let retry = more
                && retry_on.is_some_and(|on| match &result {
                    Ok(response) => idempotent && on.on_status(response.status().as_u16()),
                    // A connect failure or refused stream never reached the
                    // upstream's handler, so any method may retry it; other
                    // failures only idempotent ones.
                    Err(LocalReply::ConnectFailure) => on.on_connect_failure(),
                    Err(LocalReply::RefusedStream) => on.on_refused_stream(),
                    // A reset or a per-try timeout.
                    Err(LocalReply::Reset | LocalReply::Timeout) => {
                        idempotent && on.on_no_response()
                    }
                    Err(_) => false,
                });
            // The retry just tried is over: its place goes back before
            // the next is asked for, as Envoy's does, so a request never
            // holds two. Past the destination's `maxRetries`, the try stands.
            _retrying = None;
            let place = retry.then(|| upstream.try_retry()).flatten();
            if retry {
                destination.stats.retry(place.is_some());
            }
            match (result, place) {
                (Ok(response), None) => {
                    let endpoint = upstream.counts_endpoints().then_some(picked.guard);
                    return Ok((response, Some(picked.authority), endpoint));
                }
                (Err(reply), None) => return Err(reply),
                (Ok(_), Some(place)) => _retrying = place,
                (Err(reply), Some(place)) => (last, _retrying) = (reply, place),
            }
            if let Some(policy) = retries {
                let random = rand::rng().random::<f64>();
                tokio::time::sleep(policy.backoff(attempt, random)).await;
            }
        }
        Err(last)
    };
    let result = match timeout {
        Some(timer) => timer
            .bound(attempt_loop)
            .await
            .unwrap_or(Err(LocalReply::Timeout)),
        None => attempt_loop.await,
    };
    let result = result.map_err(|reply| (reply, tried.authority(upstream)));
    result.map(|(response, authority, endpoint)| {
        let busy = Busy {
            admitted,
            place,
            endpoint,
        };
        (response, authority, busy)
    })
}

/// The `Upgrade` protocol of an HTTP/1.1 upgrade request (WebSocket and
/// friends): both `Connection: upgrade` and `Upgrade` must be present.
/// `h2c` is left out, as Envoy strips it: umbra serves cleartext HTTP/2
/// itself, by prior knowledge, and an upstream that switched to it would
/// take every later request on the tunnel past umbra's routing (h2c
/// smuggling). A request that offered only `h2c` is proxied as a plain one.
fn upgrade_protocol(parts: &Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let connection = parts.headers.get(header::CONNECTION)?.to_str().ok()?;
    let wants = connection
        .split(',')
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let upgrade = parts.headers.get(header::UPGRADE)?;
    let offered = upgrade.to_str().ok()?;
    let is_h2c = |token: &str| token.trim().eq_ignore_ascii_case("h2c");
    if !offered.split(',').any(is_h2c) {
        return Some(upgrade.clone());
    }
    let rest: Vec<&str> = offered
        .split(',')
        .filter(|token| !is_h2c(token))
        .map(str::trim)
        .collect();
    HeaderValue::from_str(&rest.join(", "))
        .ok()
        .filter(|value| !value.is_empty())
}

/// Splices the client's and the upstream's upgraded connections together
/// once both sides have switched protocols, counted against the upstream's
/// caps (`busy`) until either side closes.
fn tunnel(upstream: hyper::upgrade::OnUpgrade, downstream: hyper::upgrade::OnUpgrade, busy: Busy) {
    tokio::spawn(async move {
        let _busy = busy;
        let (Ok(upstream), Ok(downstream)) = tokio::join!(upstream, downstream) else {
            return;
        };
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        let mut downstream = hyper_util::rt::TokioIo::new(downstream);
        let _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await;
    });
}

fn classify(error: upstream::SendError) -> LocalReply {
    if error.is_connect() {
        LocalReply::ConnectFailure
    } else if error.is_refused_stream() {
        LocalReply::RefusedStream
    } else {
        LocalReply::Reset
    }
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The Host/authority the request names: the URI's authority for HTTP/2 and
/// absolute-form requests, else the Host header. Rejects malformed ones,
/// and more than one Host line (RFC 9112 §3.2: a backend reading the last
/// would see a host the route was not chosen for).
fn request_host(parts: &Parts) -> Result<String, LocalReply> {
    let mut lines = parts.headers.get_all(header::HOST).iter();
    let (line, another) = (lines.next(), lines.next());
    if another.is_some() {
        return Err(LocalReply::InvalidHost);
    }
    let host = match parts.uri.authority() {
        // RFC 9113 §8.3.1: over HTTP/2 a Host naming another entity than
        // `:authority` makes the request malformed (routing by one while the
        // upstream reads the other is a confused deputy). HTTP/1.1's
        // absolute-form URI is different: there Host is ignored (RFC 9112
        // §3.2.2).
        Some(authority) if parts.version == Version::HTTP_2 => match line {
            Some(line) if !same_authority(line.as_bytes(), authority, parts.uri.scheme_str()) => {
                return Err(LocalReply::InvalidHost)
            }
            _ => authority.as_str(),
        },
        Some(authority) => authority.as_str(),
        None => line
            .and_then(|h| h.to_str().ok())
            .ok_or(LocalReply::InvalidHost)?,
    };
    if valid_host(host) {
        Ok(host.to_string())
    } else {
        Err(LocalReply::InvalidHost)
    }
}

/// Whether a Host line names the entity `:authority` does, compared as
/// RFC 3986 §6.2 normalises them: the name in any case, and the scheme's
/// default port written or not.
fn same_authority(host: &[u8], authority: &Authority, scheme: Option<&str>) -> bool {
    let default_port = match scheme {
        Some("https") => 443,
        _ => 80,
    };
    let port = |parsed: &Authority| parsed.port_u16().unwrap_or(default_port);
    match Authority::try_from(host) {
        Ok(host) => {
            host.host().eq_ignore_ascii_case(authority.host()) && port(&host) == port(authority)
        }
        Err(_) => false,
    }
}

/// `name[:port]` or `[ipv6][:port]` with a port in 1..=65535.
pub fn valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, port)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ("v6", port),
            _ => return false,
        }
    } else {
        // A byte search: `rsplit_once(':')` goes through the char searcher.
        match host.bytes().rposition(|b| b == b':') {
            Some(colon) => host.split_at(colon),
            None => (host, ""),
        }
    };
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(digits) => {
            !digits.is_empty()
                && digits.len() <= 5
                && digits.bytes().all(|b| b.is_ascii_digit())
                && digits
                    .parse::<u32>()
                    .is_ok_and(|p| (1..=65535).contains(&p))
        }
    };
    let name_ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    port_ok && name_ok
}

/// Rewrites the request in place for the upstream and returns its id
/// (before the route's header rules, which may change the header).
fn prepare_request(
    parts: &mut Parts,
    host: &str,
    peer: &Peer,
    route: &Route,
    matched: Option<&RequestMatch>,
    weighted: &crate::config::model::WeightedDestination,
) -> HeaderValue {
    let headers = &mut parts.headers;
    headers::strip_hop_by_hop(headers);
    // Room for the forwarding headers and the request id: one resize of the
    // map hyper sized to the parsed headers, instead of one per insert
    // (umbra's own server sizes it with this room already).
    headers.reserve(3);
    if !headers.contains_key(header::HOST) || parts.uri.authority().is_some() {
        if let Ok(value) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, value);
        }
    }
    headers::add_forwarded(headers, &peer.forwarded_for, peer.secure);
    let request_id = headers::ensure_request_id(headers);
    if let Some(rewrite) = &route.rewrite {
        if let Some(authority) = &rewrite.authority {
            if let Ok(value) = HeaderValue::from_str(authority) {
                headers.insert(header::HOST, value);
            }
        }
        if let Some(replacement) = &rewrite.uri {
            rewrite_path(parts, matched, replacement);
        }
        if let Some(regex) = &rewrite.uri_regex {
            rewrite_path_by_regex(parts, regex);
        }
    }
    headers::apply_route(
        &route.headers.request,
        &weighted.headers.request,
        route.destinations.len() == 1,
        &mut parts.headers,
    );
    request_id
}

/// Istio's `rewrite.uri`, which it gives Envoy as `prefix_rewrite`: the
/// path an exact or regex `uri` matched is replaced whole, and the prefix a
/// prefix `uri` matched is replaced by it; a match without `uri` (or no
/// `match` at all) is Istio's `prefix: /`, so only the leading `/` is
/// replaced (`/v2/` makes `/users` `/v2/users`). The query string is kept.
/// `matched` is the `match[]` entry the router found, read before any
/// header rule edited the request.
fn rewrite_path(parts: &mut Parts, matched: Option<&RequestMatch>, replacement: &str) {
    let path = parts.uri.path();
    let matched_prefix = match matched.and_then(|m| m.uri.as_ref()) {
        Some(StringMatch::Prefix(prefix)) => Some(prefix.len()),
        Some(_) => None,
        None => Some(1).filter(|_| path.starts_with('/')),
    };
    let rest = matched_prefix.and_then(|len| path.get(len..));
    let mut new_path = replacement.to_string();
    if let Some(rest) = rest {
        new_path.push_str(rest);
    }
    set_path(parts, new_path);
}

/// Makes `path`, with the request's query, the request's path; one that
/// is not a valid path leaves the request as it was.
fn set_path(parts: &mut Parts, mut path: String) {
    if let Some(query) = parts.uri.query() {
        path.push('?');
        path.push_str(query);
    }
    if let Ok(path_and_query) = path.parse::<http::uri::PathAndQuery>() {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.path_and_query = Some(path_and_query);
        parts.uri = http::Uri::from_parts(uri).unwrap_or_default();
    }
}

/// Istio's `uriRegexRewrite`, as Envoy's `regex_rewrite`: every match of
/// the pattern in the path is replaced, the query kept.
fn rewrite_path_by_regex(parts: &mut Parts, regex: &RegexRewrite) {
    let path = parts.uri.path();
    if !regex.pattern.is_match(path) {
        return;
    }
    let new_path = regex
        .pattern
        .replace_all(path, |groups: &regex::Captures<'_>| {
            substitute(groups, &regex.substitution)
        })
        .into_owned();
    set_path(parts, new_path);
}

/// RE2's rewrite string for one match: `\0`…`\9` are its groups (an
/// unmatched one is empty), `\\` a backslash; anything else is itself.
fn substitute(groups: &regex::Captures<'_>, template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(digit @ '0'..='9') => {
                let index = digit as usize - '0' as usize;
                out.push_str(groups.get(index).map_or("", |m| m.as_str()));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// Equal for identical bodiless requests; unique otherwise, since the body
/// is not read and two bodies may differ.
fn request_fingerprint(parts: &Parts, bodiless: bool) -> u64 {
    if !bodiless {
        return rand::rng().random();
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    parts.method.hash(&mut hasher);
    parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .hash(&mut hasher);
    hasher.finish()
}

/// A header's value as an owned string (for the access log: a copy, not a
/// slice of the connection's read buffer).
pub(crate) fn header_string(
    headers: &HeaderMap,
    name: impl header::AsHeaderName,
) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A header value as text; lossy only for bytes that are not visible
/// ASCII (rare, and slower).
fn value_string(value: &HeaderValue) -> String {
    match value.to_str() {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
    }
}

fn finish_local(
    proxy: &Proxy,
    parts: &Parts,
    client: IpAddr,
    started: Instant,
    host: Option<&str>,
    reply: LocalReply,
) -> Response<ResponseBody> {
    proxy.metrics.local_reply(reply.reason());
    let response = reply.response();
    if !proxy.access_log.enabled() {
        return response;
    }
    let log = LogLine::new(
        proxy,
        parts,
        client,
        host.unwrap_or("-").to_string(),
        sent_id(parts),
        Arc::from("-"),
        started,
    );
    response.map(|body| body.with_end(Finish::local(log, reply, None)))
}

/// The request id the client sent, for the log of a request umbra
/// answers before making one (`-` without).
fn sent_id(parts: &Parts) -> String {
    header_string(&parts.headers, &headers::X_REQUEST_ID).unwrap_or_else(|| "-".into())
}

/// What the access log line needs, captured before the request is sent.
struct LogLine {
    client: IpAddr,
    method: Method,
    uri: String,
    version: Version,
    host: String,
    referer: Option<String>,
    user_agent: Option<String>,
    request_id: String,
    route: Arc<str>,
    started: Instant,
    log: AccessLog,
}

impl LogLine {
    /// The line of the request in `parts`, read from them (its version
    /// too: the client's, before the upstream's is set).
    fn new(
        proxy: &Proxy,
        parts: &Parts,
        client: IpAddr,
        host: String,
        request_id: String,
        route: Arc<str>,
        started: Instant,
    ) -> LogLine {
        LogLine {
            client,
            method: parts.method.clone(),
            uri: parts
                .uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.to_string()),
            version: parts.version,
            host,
            referer: header_string(&parts.headers, header::REFERER),
            user_agent: header_string(&parts.headers, header::USER_AGENT),
            request_id,
            route,
            started,
            log: proxy.access_log.clone(),
        }
    }

    fn write(&self, status: u16, bytes: u64, upstream: &str, error: Option<&str>) {
        self.log.write(&Entry {
            client: self.client,
            method: &self.method,
            uri: &self.uri,
            version: self.version,
            status,
            bytes,
            host: &self.host,
            referer: self.referer.as_deref(),
            user_agent: self.user_agent.as_deref(),
            upstream,
            duration: self.started.elapsed(),
            request_id: &self.request_id,
            route: &self.route,
            shadow: None,
            error,
        });
    }
}

/// Held across the wait for the upstream response head. If the client goes
/// away first (its connection closes or its HTTP/2 stream is reset), hyper
/// drops the request's future, and with it the upstream exchange, which
/// closes that upstream connection; this guard then counts and logs the
/// request, as nginx's 499 and Envoy's `downstream_remote_disconnect` do.
struct Abandoned<'a> {
    destination: &'a DestinationRuntime,
    log: &'a Option<LogLine>,
    /// Set when the drain timeout cuts what is still in flight: then the
    /// client did not leave, umbra did.
    stopping: &'a AtomicBool,
    /// The endpoint the dropped exchange was waiting on, for the log.
    tried: &'a Tried,
    /// Cleared once the response head is in.
    armed: bool,
}

impl Abandoned<'_> {
    /// The response head arrived (or umbra answered): nothing to report.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.armed || std::thread::panicking() {
            return;
        }
        let (status, reason) = if self.stopping.load(Ordering::Relaxed) {
            // No response was sent.
            (0, "drain_timeout")
        } else {
            let gone = LocalReply::ClientGone;
            (gone.status().as_u16(), gone.reason())
        };
        self.destination.stats.failure(Blame::Downstream, reason);
        if let Some(line) = self.log {
            let endpoint = self.tried.authority(&self.destination.upstream);
            let endpoint = endpoint.as_ref().map_or("-", Authority::as_str);
            line.write(status, 0, endpoint, Some(reason));
        }
    }
}

/// The endpoint index of the primary attempt under way, set by `forward`
/// and read after it returns or is dropped (a route timeout, a client
/// that left); atomic only so the request's future stays `Send`.
struct Tried(AtomicUsize);

impl Default for Tried {
    fn default() -> Self {
        Tried(AtomicUsize::new(usize::MAX))
    }
}

impl Tried {
    fn set(&self, index: usize) {
        self.0.store(index, Ordering::Relaxed);
    }

    fn authority(&self, upstream: &Upstream<RequestBody>) -> Option<Authority> {
        upstream.authority(self.0.load(Ordering::Relaxed)).cloned()
    }
}

/// The primary side of an analysis pair, filled when the body ends.
struct PrimaryCapture {
    pairing: Pairing,
    status: StatusCode,
    headers: HeaderMap,
}

/// End-of-response bookkeeping for the primary exchange.
struct Finish {
    log: Option<LogLine>,
    status: StatusCode,
    endpoint: Option<Authority>,
    primary: Option<PrimaryCapture>,
    /// Why umbra answered itself, for the log's `error=`.
    reply: Option<&'static str>,
    /// Keeps the request counted against its upstream until the body ends.
    _busy: Busy,
}

impl Finish {
    /// Logs a route's own answer (`redirect`, `directResponse`) when its
    /// body has been sent.
    fn answered(log: LogLine, status: StatusCode) -> Box<Finish> {
        Box::new(Finish {
            log: Some(log),
            status,
            endpoint: None,
            primary: None,
            reply: None,
            _busy: Busy::default(),
        })
    }

    /// Logs an injected abort when its body has been sent.
    fn fault(log: LogLine, status: StatusCode) -> Box<Finish> {
        Box::new(Finish {
            log: Some(log),
            status,
            endpoint: None,
            primary: None,
            reply: Some(FAULT_ABORT),
            _busy: Busy::default(),
        })
    }

    /// Logs a local reply when its body has been sent; `endpoint`: the
    /// one that failed, if one was tried.
    fn local(log: LogLine, reply: LocalReply, endpoint: Option<Authority>) -> Box<Finish> {
        Box::new(Finish {
            log: Some(log),
            status: reply.status(),
            endpoint,
            primary: None,
            reply: Some(reply.reason()),
            _busy: Busy::default(),
        })
    }
}

impl OnEnd for Finish {
    fn on_end(self: Box<Self>, bytes: u64, ending: Ending, captured: Option<Bytes>) {
        // hyper never reads the body of a response to HEAD (umbra's own
        // replies have one): left unread, it is whole, not cut short.
        let ending = match (&self.log, ending) {
            (Some(line), Ending::ClientGone) if line.method == Method::HEAD && bytes == 0 => {
                Ending::Complete
            }
            (_, ending) => ending,
        };
        if let Some(primary) = self.primary {
            let outcome = match ending {
                Ending::Complete => {
                    let body = captured.unwrap_or_default();
                    Some(Outcome::Response(Captured {
                        status: primary.status,
                        headers: primary.headers,
                        truncated: bytes > body.len() as u64,
                        body,
                        body_len: bytes,
                        latency: primary.pairing.0.started.elapsed(),
                    }))
                }
                Ending::TimedOut => Some(Outcome::Timeout),
                // The reason code, as local replies give theirs.
                unfinished => match unfinished.failure() {
                    // The client left, stopped reading or broke its
                    // upload: nothing to compare, and no fault of v1's.
                    Some((Blame::Downstream, _)) => None,
                    failed => Some(Outcome::Failed(failed.map_or("", |(_, r)| r).to_string())),
                },
            };
            match outcome {
                Some(outcome) => primary.pairing.fill_primary(outcome),
                None => primary.pairing.skip_primary(),
            }
        }
        if let Some(line) = self.log {
            let endpoint = self.endpoint.as_ref().map_or("-", Authority::as_str);
            let error = ending.failure().map(|(_, reason)| reason).or(self.reply);
            line.write(self.status.as_u16(), bytes, endpoint, error);
        }
    }
}

/// Request facts the analysis sample carries.
#[derive(Clone)]
pub struct Meta {
    virtual_service: Arc<str>,
    primary_destination: Arc<str>,
    host: String,
    /// See [`Sample::suffixed_host`].
    suffixed_host: Option<String>,
    method: Method,
    path: String,
    request_id: String,
    fingerprint: u64,
}

/// Joins a primary response with its shadow (and baseline) responses for
/// one request. Whichever side finishes last submits the samples: one per
/// shadow target, each with the primary and the baseline.
pub struct Pairing(Arc<PairInner>);

struct PairInner {
    analyzer: Arc<Analyzer>,
    capture: usize,
    /// When the mirrors were dispatched and the primary about to be sent:
    /// the primary's latency counts from here, as each shadow's counts
    /// from its sending (not from the request's arrival: an injected
    /// delay, say, is no part of v1's latency).
    started: Instant,
    state: Mutex<PairState>,
}

struct PairState {
    meta: Option<Meta>,
    primary: Option<Outcome>,
    /// One per shadow target that sent (or was ejected), in slot order;
    /// inline for the usual one target (no allocation per request).
    shadows: SmallVec<[ShadowSide; 1]>,
    baseline: Option<Outcome>,
    /// Sides still to report (the primary counts as one).
    pending: u32,
    baseline_slot: bool,
    /// The baseline never delivered the request: no three-way comparison
    /// for any shadow, so nothing is submitted.
    abandoned: bool,
}

/// One shadow target's side of a pair.
struct ShadowSide {
    /// Its mirror label, the report's `shadow`.
    label: Arc<str>,
    /// The route name it is analysed under (`MirrorTarget::analysed_as`).
    route: Arc<str>,
    /// `None` until it reports, and if it never delivered the request.
    outcome: Option<Outcome>,
}

/// One mirror's side of a pair: the baseline, or shadow `Some(index)`.
pub struct PairSlot {
    pair: Arc<PairInner>,
    shadow: Option<usize>,
}

impl Pairing {
    fn new(analyzer: Arc<Analyzer>, capture: usize, meta: Meta) -> Pairing {
        Pairing(Arc::new(PairInner {
            analyzer,
            capture,
            started: Instant::now(),
            state: Mutex::new(PairState {
                meta: Some(meta),
                primary: None,
                shadows: SmallVec::new(),
                baseline: None,
                pending: 1,
                baseline_slot: false,
                abandoned: false,
            }),
        }))
    }

    fn capture_limit(&self) -> usize {
        self.0.capture
    }

    /// `target`'s slot in this request's pair (a route has one baseline).
    pub fn slot_for(&self, target: &MirrorTarget) -> Option<PairSlot> {
        let mut state = self.0.state.lock().ok()?;
        let shadow = if target.baseline {
            if std::mem::replace(&mut state.baseline_slot, true) {
                return None;
            }
            None
        } else {
            state.shadows.push(ShadowSide {
                label: target.label.clone(),
                route: target.analysed_as.clone(),
                outcome: None,
            });
            Some(state.shadows.len() - 1)
        };
        state.pending += 1;
        Some(PairSlot {
            pair: self.0.clone(),
            shadow,
        })
    }

    fn fill_primary(&self, outcome: Outcome) {
        self.0.report(|state| state.primary = Some(outcome));
    }

    /// The primary's side ends without an outcome to compare: its client
    /// left or broke the request. No sample is made.
    fn skip_primary(&self) {
        self.0.report(|_| ());
    }
}

impl PairSlot {
    pub fn capture_limit(&self) -> usize {
        self.pair.capture
    }

    pub fn fill(self, outcome: Outcome) {
        let shadow = self.shadow;
        self.pair.report(|state| match shadow {
            Some(index) => state.shadows[index].outcome = Some(outcome),
            None => state.baseline = Some(outcome),
        });
    }

    /// This mirror never delivered the request: its target has nothing to
    /// compare (the baseline: no shadow has).
    pub fn abandon(self) {
        if self.shadow.is_none() {
            self.pair.report(|state| state.abandoned = true);
        } else {
            self.pair.report(|_| ());
        }
    }
}

impl PairInner {
    fn report(&self, update: impl FnOnce(&mut PairState)) {
        let (meta, primary, shadows, baseline) = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            update(&mut state);
            state.pending -= 1;
            if state.pending > 0 || state.abandoned {
                return;
            }
            let (Some(meta), Some(primary)) = (state.meta.take(), state.primary.take()) else {
                return;
            };
            let shadows = std::mem::take(&mut state.shadows);
            (meta, primary, shadows, state.baseline.take())
        };
        let mut compared = (shadows.into_iter())
            .filter_map(|side| Some((side.label, side.route, side.outcome?)))
            .peekable();
        while let Some(shadow) = compared.next() {
            // Copies for all but the last: most routes have one target.
            if compared.peek().is_none() {
                self.analyzer
                    .submit(sample(meta, primary, baseline, shadow));
                return;
            }
            let sample = sample(meta.clone(), primary.clone(), baseline.clone(), shadow);
            self.analyzer.submit(sample);
        }
    }
}

/// The analysis sample of one shadow target's side of a pair: its label,
/// the route it is analysed under, and its outcome.
fn sample(
    meta: Meta,
    primary: Outcome,
    baseline: Option<Outcome>,
    (label, route, shadow): (Arc<str>, Arc<str>, Outcome),
) -> Sample {
    Sample {
        virtual_service: meta.virtual_service,
        route,
        primary_destination: meta.primary_destination,
        shadow_destination: label,
        host: meta.host,
        suffixed_host: meta.suffixed_host,
        method: meta.method,
        path: meta.path,
        request_id: meta.request_id,
        request_fingerprint: meta.fingerprint,
        primary,
        shadow,
        baseline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_validation() {
        for good in [
            "httpbin",
            "httpbin:8000",
            "a.b-c_d.example",
            "[::1]:80",
            "[::1]",
            "x:65535",
        ] {
            assert!(valid_host(good), "{good}");
        }
        for bad in [
            "",
            "a b",
            "host:",
            "host:0",
            "host:65536",
            "host:80a",
            "[::1",
            "[zz]:80",
            "a/b",
            "h:123456",
        ] {
            assert!(!valid_host(bad), "{bad}");
        }
    }
}
