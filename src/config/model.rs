//! The validated, resolved configuration that the data plane runs on.
//!
//! `config::load` turns Istio YAML into these types; everything downstream
//! (`routing`, `proxy`, `mirror`, `analysis`) reads only these, never the raw
//! Istio resources. Every value here has already been checked, so the request
//! path never has to handle a configuration error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName as HttpHeaderName;
use regex::Regex;
use serde::Serialize;

/// The whole resolved configuration: one immutable snapshot, swapped
/// atomically on reload.
#[derive(Debug, Default, Serialize)]
pub struct Config {
    /// VirtualServices in load order (file order, then document order).
    pub virtual_services: Vec<VirtualService>,
    /// Every upstream a route or mirror can send to, keyed by
    /// `Destination::key`, so routes share one pooled client per destination.
    pub destinations: BTreeMap<String, Arc<Destination>>,
    /// `ShadowAnalysis` settings per VirtualService name (absent = defaults).
    pub analysis: BTreeMap<String, AnalysisSettings>,
    /// Non-fatal findings (unsupported fields, skipped kinds, deprecations).
    #[serde(skip)]
    pub warnings: Vec<Diagnostic>,
    /// Files the config names beside itself: the certificates, keys and
    /// revocation lists of DestinationRules' `tls`, to watch for rotation.
    #[serde(skip)]
    pub files: Vec<std::path::PathBuf>,
}

/// Where in which file a finding points, plus the human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong and how to fix it, in one or two sentences.
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// One `VirtualService`.
#[derive(Debug, Serialize)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// Host patterns this service answers for, as written.
    pub hosts: Vec<HostPattern>,
    /// `http[]` rules, evaluated in order; the first match wins.
    pub routes: Vec<Arc<Route>>,
}

/// A `hosts[]` entry. Matching ignores case and any `:port` on the request.
#[derive(Debug, Clone, Serialize)]
pub enum HostPattern {
    /// `httpbin` or `api.example.com`. Short names (no dot) also match
    /// `NAME.NAMESPACE.svc.cluster.local` and `NAME.NAMESPACE`.
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    /// `*`.
    Any,
}

/// One `http[]` rule with everything needed to serve and mirror it.
#[derive(Debug, Serialize)]
pub struct Route {
    /// `http[].name`, or `VS_NAME.http[INDEX]` when unnamed. Metric label.
    pub name: String,
    /// The owning VirtualService's name (metric label, analysis key).
    pub virtual_service: String,
    /// Empty means "match everything"; otherwise any one must match (OR).
    pub matches: Vec<RequestMatch>,
    /// Weighted destinations; weights are relative and sum above 0 (a
    /// single destination's is 100).
    pub destinations: Vec<WeightedDestination>,
    /// Whole-request timeout; `None` means no timeout (Istio's default).
    pub timeout: Option<Duration>,
    pub retries: Option<RetryPolicy>,
    pub rewrite: Option<Rewrite>,
    /// Route-level header rules (merged with the destination's as Istio's
    /// Envoy config does: `proxy::headers::apply_route`).
    pub headers: HeaderRules,
    /// Mirror targets, each sampled independently.
    pub mirrors: Vec<Mirror>,
    /// Mirror behaviour from `umbra.io/` annotations on the VirtualService.
    pub mirror_policy: MirrorPolicy,
    /// Istio's `fault`: delays and aborts injected before the request goes
    /// anywhere, as Envoy's fault filter does ahead of its router.
    pub fault: Option<Fault>,
    /// Istio's `redirect` or `directResponse`: umbra answers itself, as
    /// Envoy's router does, and `destinations` and `mirrors` are empty.
    pub answer: Option<Answer>,
    /// Istio's `corsPolicy`, run as Envoy's CORS filter.
    pub cors: Option<Cors>,
}

/// A route's CORS policy, its header values joined as Istio joins them for
/// Envoy (`,`).
#[derive(Debug, Serialize)]
pub struct Cors {
    /// `allowOrigins` (the deprecated `allowOrigin` as exact matches). One
    /// that matches `*` allows every origin, as in Envoy.
    pub origins: Vec<StringMatch>,
    /// `*` echoes the preflight's `Access-Control-Request-Method`.
    pub methods: Option<String>,
    /// `*` echoes the preflight's `Access-Control-Request-Headers`.
    pub headers: Option<String>,
    pub expose: Option<String>,
    /// Whole seconds.
    pub max_age: Option<u64>,
    pub credentials: bool,
    /// A preflight from an origin not allowed goes upstream (Envoy's
    /// default); `unmatchedPreflights: IGNORE` answers it, without CORS
    /// headers.
    pub forward_unmatched: bool,
}

/// A route's own answer instead of forwarding.
#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    Redirect(Redirect),
    Direct {
        status: u16,
        #[serde(serialize_with = "lossy")]
        body: bytes::Bytes,
    },
}

fn lossy<S: serde::Serializer>(body: &bytes::Bytes, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&String::from_utf8_lossy(body))
}

/// Istio's `HTTPRedirect`, as Envoy's `RedirectAction`: each part of the
/// request's URL the redirect does not name is kept.
#[derive(Debug, Serialize)]
pub struct Redirect {
    /// Replaces the path; the request's query is kept unless it has one.
    pub uri: Option<String>,
    /// Replaces the host, port included.
    pub authority: Option<String>,
    pub port: RedirectPort,
    pub scheme: Option<String>,
    /// 301 (Istio's default), 302, 303, 307 or 308.
    pub code: u16,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedirectPort {
    /// `derivePort: FROM_PROTOCOL_DEFAULT` or none: the request's port,
    /// dropped when the scheme changes from its own default.
    Default,
    /// `derivePort: FROM_REQUEST_PORT`: the port the request came to.
    FromRequest,
    Port(u16),
}

/// A route's fault injection: a delay, then an abort, each drawn apart.
#[derive(Debug, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Serialize)]
pub struct FaultDelay {
    pub fixed: Duration,
    /// Requests delayed, per million.
    pub per_million: u32,
}

#[derive(Debug, Serialize)]
pub struct FaultAbort {
    pub reply: AbortReply,
    /// Requests aborted, per million.
    pub per_million: u32,
}

/// What an aborted request is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum AbortReply {
    /// This HTTP status.
    Http(u16),
    /// HTTP 200 with this `grpc-status` (a gRPC trailers-only response).
    Grpc(u8),
}

/// One `match[]` entry: every present condition must hold (AND).
#[derive(Debug, Default, Serialize)]
pub struct RequestMatch {
    pub uri: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    pub headers: Vec<(Header, StringMatch)>,
    pub query_params: Vec<(String, StringMatch)>,
    /// Headers that must be absent, or present without matching.
    pub without_headers: Vec<(Header, StringMatch)>,
    /// `ignoreUriCase`: compare `uri` case-insensitively.
    pub ignore_uri_case: bool,
    /// `port`: the port the client addressed (see [`crate::routing::matches`]).
    pub port: Option<u16>,
}

/// Istio's `StringMatch`. Regexes are RE2-style and must match the whole
/// value, so they are stored anchored (`^(?:...)$`).
#[derive(Debug, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(#[serde(serialize_with = "regex_as_str")] Regex),
    /// An empty `{}` matcher in `headers`: the header only has to be present.
    Present,
}

/// A header name that also serializes (for `/config_dump`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Header(pub HttpHeaderName);

impl Serialize for Header {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

fn methods_as_str<S: serde::Serializer>(
    methods: &Option<Vec<http::Method>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    let names: Option<Vec<&str>> = methods
        .as_ref()
        .map(|ms| ms.iter().map(http::Method::as_str).collect());
    names.serialize(s)
}

fn regex_as_str<S: serde::Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

#[derive(Debug, Serialize)]
pub struct WeightedDestination {
    pub weight: u32,
    pub destination: Arc<Destination>,
    /// Destination-level `headers` rules.
    pub headers: HeaderRules,
}

/// A resolved upstream: host + subset + port, with its endpoints and
/// connection policy. Shared by every route that sends to it.
#[derive(Debug, Serialize)]
pub struct Destination {
    /// `host|subset|port`, unique per upstream; pool and metric key.
    pub key: String,
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Endpoints whose labels contain the subset's labels. Empty means every
    /// request to it gets a 503.
    pub endpoints: Vec<Endpoint>,
    pub lb: LoadBalancer,
    pub protocol: UpstreamProtocol,
    pub pool: PoolSettings,
    /// `trafficPolicy.outlierDetection`: `None` ejects no endpoint.
    pub outlier: Option<OutlierPolicy>,
    /// `trafficPolicy.tls`: `None` sends plaintext.
    pub tls: Option<Arc<UpstreamTls>>,
}

impl Destination {
    /// How metrics, logs and reports name it as a mirror target:
    /// `host/subset`, else `host:port`, else `host` (no spaces, so the
    /// access log and the metrics spell it alike).
    pub fn label(&self) -> String {
        match (&self.subset, self.port) {
            (Some(subset), _) => format!("{}/{}", self.host, subset),
            (None, Some(port)) => format!("{}:{}", self.host, port),
            (None, None) => self.host.clone(),
        }
    }

    /// [`Destination::label`] with the port in it (`host:port/subset`),
    /// for a target that shares its host and subset with another.
    pub fn label_with_port(&self) -> String {
        match (&self.subset, self.port) {
            (Some(subset), Some(port)) => format!("{}:{}/{}", self.host, port, subset),
            _ => self.label(),
        }
    }
}

/// TLS umbra originates to a destination (`trafficPolicy.tls` SIMPLE or
/// MUTUAL), its files read and checked when the config loads.
#[derive(Debug, Serialize)]
pub struct UpstreamTls {
    /// `SIMPLE` or `MUTUAL`.
    pub mode: &'static str,
    /// Sent as SNI; the certificate must carry it unless
    /// `subject_alt_names` are given.
    pub sni: String,
    /// `subjectAltNames`: the certificate must carry one of them.
    pub subject_alt_names: Vec<String>,
    /// The CA bundle trusted; `None`: the system's trust store.
    pub ca_certificates: Option<String>,
    /// `caCrl`: the revocation lists the server's chain is checked against.
    pub ca_crl: Option<String>,
    /// Presented for MUTUAL.
    pub client_certificate: Option<String>,
    pub insecure_skip_verify: bool,
    /// A digest of the files' bytes: part of the destination's fingerprint,
    /// so a reload that finds a rotated certificate builds new connections.
    pub files_digest: u64,
    /// Built once per config: its session cache lets reconnections resume.
    #[serde(skip)]
    pub client: Arc<rustls::ClientConfig>,
    #[serde(skip)]
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// One address to dial. `address` is an IP literal or a DNS name
/// (resolved at connect time for `resolution: DNS` or direct hosts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    Random,
    LeastRequest,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// Prior-knowledge HTTP/2 (port protocol HTTP2/GRPC or h2UpgradePolicy UPGRADE).
    Http2,
}

/// `DestinationRule` connection pool settings that umbra honours.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSettings {
    pub connect_timeout: Duration,
    /// `tcp.maxConnections`: HTTP/1.1 connections in use at once (each
    /// carries one request); past it requests wait for one.
    pub max_connections: Option<u32>,
    /// `http1MaxPendingRequests`: requests allowed to wait for a connection.
    pub max_pending_requests: Option<u32>,
    /// `http2MaxRequests`: requests on the wire at once, either protocol.
    pub max_requests: Option<u32>,
    /// `maxRequestsPerConnection`: close a connection after this many.
    pub max_requests_per_connection: Option<u32>,
    /// `maxRetries`: retries outstanding at once, over the destination
    /// (Envoy's `max_retries`); past it a failed try stands.
    pub max_retries: Option<u32>,
    /// `idleTimeout`: close pooled connections idle this long.
    pub idle_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            // Envoy's default connect timeout.
            connect_timeout: Duration::from_secs(10),
            max_connections: None,
            max_pending_requests: None,
            max_requests: None,
            max_requests_per_connection: None,
            max_retries: None,
            // Envoy's default upstream idle timeout is 1h; we keep pools
            // leaner, 90s matches hyper-util's default.
            idle_timeout: Duration::from_secs(90),
        }
    }
}

/// `outlierDetection`, as Envoy runs it for a primary's endpoints: an
/// endpoint that fails so many times in a row is ejected from the load
/// balancer for `base_ejection_time` × the times it was ejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierPolicy {
    /// `consecutive5xxErrors` (default 5; 0: off): 5xx responses, and
    /// exchanges without one (connect failure, reset, per-try timeout).
    pub consecutive_5xx: u32,
    /// `consecutiveGatewayErrors` (default 0: off): 502, 503, 504, and
    /// exchanges without a response.
    pub consecutive_gateway: u32,
    /// `baseEjectionTime` (default 30 s).
    pub base_ejection_time: Duration,
    /// `maxEjectionPercent` (default 10): of the endpoints, at most this
    /// share ejected at once (none under 10 endpoints at 10%, as in Envoy).
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
        }
    }
}

/// `retries`. Only requests that can be replayed safely (no body) retry.
#[derive(Debug, Clone, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// `backoff`: the base of Envoy's fully jittered exponential back-off
    /// between tries (see [`RetryPolicy::backoff`]).
    pub backoff: Duration,
}

impl RetryPolicy {
    /// Envoy's default back-off base.
    pub const BACKOFF: Duration = Duration::from_millis(25);

    /// How long to wait before `retry` (1 for the first): a random time
    /// under a ceiling that starts at the base and doubles with each
    /// retry, up to ten times the base (Envoy's
    /// `JitteredExponentialBackOffStrategy`), so that clients retrying
    /// together spread out.
    pub fn backoff(&self, retry: u32, random: f64) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1 << retry.saturating_sub(1).min(4));
        doubled.min(self.backoff.saturating_mul(10)).mul_f64(random)
    }
}

/// The `retryOn` conditions umbra understands, with Envoy's meaning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, or no response (connect failure, reset,
    /// per-try timeout).
    pub server_error: bool,
    /// `gateway-error`: 502, 503, 504, or no response, as `5xx`.
    pub gateway_error: bool,
    /// `connect-failure`.
    pub connect_failure: bool,
    /// `reset`: no response (connect failure, reset, per-try timeout).
    pub reset: bool,
    /// `refused-stream`.
    pub refused_stream: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// HTTP status codes written in `retryOn` (`"503"`), which Istio turns
    /// into Envoy's `retriable-status-codes`.
    pub statuses: Vec<u16>,
}

impl RetryOn {
    /// Istio's conditions for `retries` without `retryOn` (its
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes`
    /// with 503; the gRPC ones are not umbra's).
    pub fn istio_default() -> RetryOn {
        RetryOn {
            connect_failure: true,
            refused_stream: true,
            statuses: vec![503],
            ..RetryOn::default()
        }
    }

    /// Whether a response with this status is retried.
    pub fn on_status(&self, status: u16) -> bool {
        (self.server_error && (500..600).contains(&status))
            || (self.gateway_error && matches!(status, 502..=504))
            || (self.retriable_4xx && status == 409)
            || self.statuses.contains(&status)
    }

    /// Whether an exchange that got no response (reset, per-try timeout)
    /// is retried: Envoy retries these under `reset`, `5xx` and
    /// `gateway-error` alike.
    pub fn on_no_response(&self) -> bool {
        self.reset || self.server_error || self.gateway_error
    }

    /// Whether a stream an HTTP/2 upstream refused is retried: under
    /// `refused-stream`, and as a reset.
    pub fn on_refused_stream(&self) -> bool {
        self.refused_stream || self.on_no_response()
    }

    /// Whether a connect failure is retried: under `connect-failure`, and
    /// under each condition that retries any exchange without a response.
    pub fn on_connect_failure(&self) -> bool {
        self.connect_failure || self.on_no_response()
    }
}

/// `rewrite`.
#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    /// Envoy's `prefix_rewrite`: replaces the matched prefix (for prefix
    /// matches, and `/` for a match without `uri`) or the whole path.
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// Istio's `uriRegexRewrite`, as Envoy's `regex_rewrite`.
    pub uri_regex: Option<RegexRewrite>,
}

/// Every match of `pattern` in the path (not the query) is replaced by
/// `substitution`, where `\1`… name the match's groups (RE2's syntax).
#[derive(Debug, Clone, Serialize)]
pub struct RegexRewrite {
    #[serde(serialize_with = "regex_as_str")]
    pub pattern: Regex,
    pub substitution: String,
}

/// `headers.request` and `headers.response`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderRules {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeaderOps {
    pub set: Vec<(Header, String)>,
    pub add: Vec<(Header, String)>,
    pub remove: Vec<Header>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// One mirror target (from `mirror` + `mirrorPercentage`, or a `mirrors[]` entry).
#[derive(Debug, Serialize)]
pub struct Mirror {
    pub destination: Arc<Destination>,
    /// Sampling rate in parts per million (Istio: percent × 10000).
    pub per_million: u32,
    /// A short label for metrics: the destination host and subset.
    pub label: String,
}

/// Mirror behaviour set by `umbra.io/` annotations on the VirtualService.
#[derive(Debug, Clone, Serialize)]
pub struct MirrorPolicy {
    /// `umbra.io/mirror-sampling: request-id`: sample by a hash of
    /// `x-request-id` so every mirror gets the same requests.
    pub sample_by_request_id: bool,
    /// `umbra.io/shadow-host-suffix: "false"` turns this off.
    pub host_suffix: bool,
    /// `umbra.io/mirror-methods`; `None` means every method (Istio's default).
    #[serde(serialize_with = "methods_as_str")]
    pub methods: Option<Vec<http::Method>>,
    /// `umbra.io/mirror-remove-headers`.
    pub remove_headers: Vec<Header>,
    /// `umbra.io/mirror-max-body-bytes`: bodies over this abort the shadow.
    pub max_body_bytes: u64,
}

impl Default for MirrorPolicy {
    fn default() -> Self {
        MirrorPolicy {
            sample_by_request_id: false,
            host_suffix: true,
            methods: None,
            remove_headers: Vec::new(),
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// `ShadowAnalysis` (umbra.io/v1alpha1) tuning for one VirtualService.
#[derive(Debug, Clone, Serialize)]
pub struct AnalysisSettings {
    pub enabled: bool,
    /// Extra headers to ignore (lowercase), on top of the built-in noise list.
    pub ignore_headers: Vec<String>,
    /// Body field paths to ignore, e.g. `body.meta.generatedAt` or
    /// `body.items[*].etag`.
    pub ignore_paths: Vec<String>,
    /// A second copy of the primary version, mirrored like the shadow, used
    /// for Diffy-style three-way noise removal.
    pub baseline: Option<Arc<Destination>>,
    /// Bytes of each response body to capture.
    pub max_capture_bytes: usize,
    /// Comparisons needed before a verdict other than HOLD.
    pub min_samples: u64,
    /// Diffy: relative difference threshold (0.2 = 20%).
    pub relative_threshold: f64,
    /// Diffy: absolute difference threshold (0.0003 = 0.03%).
    pub absolute_threshold: f64,
    /// Above this fraction of comparisons with non-noise differences: REJECT.
    pub max_mismatch_rate: f64,
    /// Confidence for the error-rate and latency tests (0.98).
    pub confidence: f64,
    /// Minimum latency effect size (shadow p50 / primary p50 − 1) to flag.
    pub latency_effect: f64,
    /// Minimum p50 difference to flag.
    pub latency_margin: Duration,
}

impl Default for AnalysisSettings {
    fn default() -> Self {
        AnalysisSettings {
            enabled: true,
            ignore_headers: Vec::new(),
            ignore_paths: Vec::new(),
            baseline: None,
            max_capture_bytes: 256 * 1024,
            min_samples: 100,
            relative_threshold: 0.2,
            absolute_threshold: 0.0003,
            max_mismatch_rate: 0.01,
            confidence: 0.98,
            latency_effect: 0.2,
            latency_margin: Duration::from_millis(1),
        }
    }
}
