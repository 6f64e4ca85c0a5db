//! An httpbin-like HTTP server for the demo and for tests: a real hyper
//! server on `127.0.0.1:0` that answers a handful of httpbin endpoints and
//! records what it received (Host values, paths, status classes, service
//! time, the last [`RECENT`] requests) in a shared [`Recorder`].
//!
//! Endpoints: `GET /headers`, `/status/N`, `/json` (httpbin's slideshow),
//! `/delay/N` (seconds, fractional, capped at 10), `/anything` and
//! `/anything/*` (echo method, url, args, headers, body and parsed JSON),
//! `/uuid`, `/ip`. Every response carries a `date`, the request's
//! `x-request-id` echoed back, and a random `x-served-by`.
//!
//! [`Flavor::V2`] is the "new version" under test. It differs from
//! [`Flavor::V1`] on purpose, so a shadow analysis has something to find:
//! - `/json`: `slideshow.author` is `"Yours Sincerely"` instead of
//!   `"Yours Truly"` (a real body regression);
//! - `/anything/orders` (and anything below it): 500 with a JSON error,
//!   where v1 answers 200 (a real status regression);
//! - `/delay/N`: 40 ms slower (a real latency regression);
//! - noise only, which a good analysis must ignore: v2 writes JSON object
//!   keys in a different order, and on both versions `/uuid`, `x-served-by`,
//!   `date` and the `served_at` timestamp in echo bodies change per response.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tracing::debug;

use crate::metrics::StatusClass;

/// Requests kept for inspection; older ones only survive in the counters.
pub const RECENT: usize = 64;
/// Request bodies over this are refused with 413: the backend never buffers
/// an unbounded body.
const MAX_BODY_BYTES: usize = 1024 * 1024;
/// `/delay/N` never sleeps longer than this (httpbin caps at 10 s too).
const MAX_DELAY: Duration = Duration::from_secs(10);
/// How much slower v2 answers `/delay/N`: the latency regression.
pub const V2_EXTRA_DELAY: Duration = Duration::from_millis(40);

/// Which version of the service to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// The version in production: the primary.
    V1,
    /// The candidate with deliberate regressions: the shadow.
    V2,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::V1 => "v1",
            Flavor::V2 => "v2",
        }
    }
}

/// A running backend. Dropping it stops the server and closes its
/// connections.
pub struct Backend {
    /// Where it listens: `127.0.0.1` and an ephemeral port.
    addr: SocketAddr,
    flavor: Flavor,
    /// Shared with the server task, which records every answered request.
    recorder: Arc<Recorder>,
    /// Dropped with the backend, which ends the accept loop.
    _stop: oneshot::Sender<()>,
}

/// One request as the backend received it, with how it answered.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// As received: origin-form path and query.
    pub uri: Uri,
    pub headers: HeaderMap,
    /// The whole request body (empty when it was refused as too large).
    pub body: Bytes,
    /// What the backend answered.
    pub status: StatusCode,
    /// From the request head arriving to the response being produced
    /// (includes `/delay` sleeps, not the time to write the body).
    pub service_time: Duration,
}

impl Recorded {
    /// A header as text, when present and printable.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What a backend has seen so far. Shared between the server task and
/// whoever inspects it; every accessor returns a copy.
pub struct Recorder {
    state: Mutex<State>,
    /// Total so far, so tests and the demo can wait instead of polling.
    total: watch::Sender<u64>,
}

/// The counters behind one lock, so a snapshot is consistent.
struct State {
    by_host: BTreeMap<String, u64>,
    by_path: BTreeMap<String, u64>,
    by_class: BTreeMap<&'static str, u64>,
    by_path_class: BTreeMap<String, BTreeMap<&'static str, u64>>,
    recent: VecDeque<Recorded>,
    /// Service time in microseconds.
    service_time: hdrhistogram::Histogram<u64>,
}

/// A consistent snapshot of a [`Recorder`].
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub total: u64,
    /// Requests per `Host` header value (`-` when absent).
    pub by_host: BTreeMap<String, u64>,
    /// Requests per path, without the query string.
    pub by_path: BTreeMap<String, u64>,
    /// Responses per status class (`2xx`, …).
    pub by_class: BTreeMap<&'static str, u64>,
    /// Responses per path and status class: where two versions disagree.
    pub by_path_class: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Service time at the 50th and 99th percentile.
    pub service_p50: Duration,
    pub service_p99: Duration,
}

impl Backend {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }
}

/// Starts a backend of `flavor` on `127.0.0.1:0`.
pub async fn start(flavor: Flavor) -> std::io::Result<Backend> {
    start_on(TcpListener::bind("127.0.0.1:0").await?, flavor)
}

/// Starts a backend of `flavor` on an already bound listener.
pub fn start_on(listener: TcpListener, flavor: Flavor) -> std::io::Result<Backend> {
    let addr = listener.local_addr()?;
    let recorder = Arc::new(Recorder::new());
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(serve(listener, flavor, recorder.clone(), stop_rx));
    Ok(Backend {
        addr,
        flavor,
        recorder,
        _stop: stop_tx,
    })
}

async fn serve(
    listener: TcpListener,
    flavor: Flavor,
    recorder: Arc<Recorder>,
    mut stop: oneshot::Receiver<()>,
) {
    // Connections live in the set so that stopping the backend ends them
    // too, instead of leaving keep-alive connections answering.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    debug!(%error, "backend accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut stop => return,
        };
        // Reap finished connections so the set does not grow forever.
        while connections.try_join_next().is_some() {}
        let recorder = recorder.clone();
        connections.spawn(async move {
            let service = service_fn(move |request| {
                let recorder = recorder.clone();
                async move { Ok::<_, Infallible>(handle(flavor, peer, &recorder, request).await) }
            });
            let result = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                debug!(%peer, %error, "backend connection ended with an error");
            }
        });
    }
}

async fn handle(
    flavor: Flavor,
    peer: SocketAddr,
    recorder: &Recorder,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let body = Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map(|body| body.to_bytes());
    let (mut response, body) = match body {
        Ok(body) => {
            let exchange = Exchange {
                flavor,
                peer: peer.ip(),
                method: &parts.method,
                uri: &parts.uri,
                headers: &parts.headers,
                body: &body,
            };
            (answer(&exchange).await, body)
        }
        Err(error) => {
            // Too large, or the client broke off: either way there is no
            // whole body to echo.
            debug!(%error, "backend could not read the request body");
            (
                reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "text/plain",
                    "body too large\n",
                ),
                Bytes::new(),
            )
        }
    };
    decorate(flavor, &parts.headers, response.headers_mut());
    recorder.record(Recorded {
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
        status: response.status(),
        service_time: started.elapsed(),
    });
    response
}

/// The request as the endpoints see it.
struct Exchange<'a> {
    flavor: Flavor,
    peer: IpAddr,
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    body: &'a Bytes,
}

async fn answer(exchange: &Exchange<'_>) -> Response<Full<Bytes>> {
    let path = exchange.uri.path();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["headers"] => json_reply(
            StatusCode::OK,
            &json!({ "headers": headers_json(exchange.headers) }),
        ),
        ["ip"] => json_reply(StatusCode::OK, &json!({ "origin": origin(exchange) })),
        ["uuid"] => json_reply(
            StatusCode::OK,
            &json!({ "uuid": uuid::Uuid::new_v4().to_string() }),
        ),
        ["json"] => reply(
            StatusCode::OK,
            "application/json",
            slideshow(exchange.flavor),
        ),
        ["status", code] => match code.parse::<u16>().ok().and_then(valid_status) {
            Some(status) => reply(status, "text/plain", ""),
            None => reply(
                StatusCode::BAD_REQUEST,
                "text/plain",
                "invalid status code\n",
            ),
        },
        ["delay", seconds] => match seconds.parse::<f64>() {
            Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
                let mut delay = Duration::from_secs_f64(seconds).min(MAX_DELAY);
                if exchange.flavor == Flavor::V2 {
                    delay += V2_EXTRA_DELAY;
                }
                tokio::time::sleep(delay).await;
                reply(StatusCode::OK, "application/json", echo(exchange))
            }
            _ => reply(StatusCode::BAD_REQUEST, "text/plain", "invalid delay\n"),
        },
        ["anything", "orders", ..] if exchange.flavor == Flavor::V2 => json_reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": "orders backend unavailable", "version": "v2" }),
        ),
        ["anything", ..] => reply(StatusCode::OK, "application/json", echo(exchange)),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// httpbin answers `/status/N` for any code in 100..=599; anything else is
/// a client mistake.
fn valid_status(code: u16) -> Option<StatusCode> {
    if (100..=599).contains(&code) {
        StatusCode::from_u16(code).ok()
    } else {
        None
    }
}

/// httpbin's `/anything` body, in the key order of the flavor.
fn echo(exchange: &Exchange<'_>) -> String {
    let data = String::from_utf8_lossy(exchange.body).into_owned();
    let parsed: Value = serde_json::from_slice(exchange.body).unwrap_or(Value::Null);
    let args: BTreeMap<String, String> = exchange
        .uri
        .query()
        .map(|query| {
            query
                .split('&')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                    (key.to_string(), value.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let host = exchange
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("localhost");
    let url = format!(
        "http://{host}{}",
        exchange.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let fields = vec![
        ("args", json!(args)),
        ("data", json!(data)),
        ("files", json!({})),
        ("form", json!({})),
        ("headers", headers_json(exchange.headers)),
        ("json", parsed),
        ("method", json!(exchange.method.as_str())),
        ("origin", json!(origin(exchange))),
        ("url", json!(url)),
        // Not in httpbin: a per-response timestamp, so echo bodies carry
        // noise the analysis has to learn to ignore.
        (
            "served_at",
            json!(httpdate::fmt_http_date(SystemTime::now())),
        ),
    ];
    ordered(exchange.flavor, fields)
}

/// JSON object text whose key order depends on the flavor: v1 keeps the
/// given order, v2 reverses it. serde_json sorts map keys, so the text is
/// built here to keep the order.
fn ordered(flavor: Flavor, mut fields: Vec<(&str, Value)>) -> String {
    if flavor == Flavor::V2 {
        fields.reverse();
    }
    let members: Vec<String> = fields
        .iter()
        .map(|(key, value)| format!("{}: {}", json!(key), value))
        .collect();
    format!("{{{}}}", members.join(", "))
}

/// httpbin's `"origin"`: the forwarded-for chain plus the peer.
fn origin(exchange: &Exchange<'_>) -> String {
    let forwarded = exchange
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok());
    match forwarded {
        Some(chain) => format!("{chain}, {}", exchange.peer),
        None => exchange.peer.to_string(),
    }
}

/// Request headers as httpbin shows them: `Title-Case` names, repeated
/// headers joined with a comma.
fn headers_json(headers: &HeaderMap) -> Value {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(title_case(name))
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    json!(map)
}

fn title_case(name: &HeaderName) -> String {
    name.as_str()
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// httpbin's `/json`. v2 renamed the author (a real difference) and writes
/// the keys in another order (noise).
fn slideshow(flavor: Flavor) -> &'static str {
    match flavor {
        Flavor::V1 => {
            r#"{"slideshow": {"author": "Yours Truly", "date": "date of publication", "slides": [{"title": "Wake up to WonderWidgets!", "type": "all"}, {"items": ["Why <em>WonderWidgets</em> are great", "Who <em>buys</em> WonderWidgets"], "title": "Overview", "type": "all"}], "title": "Sample Slide Show"}}"#
        }
        Flavor::V2 => {
            r#"{"slideshow": {"title": "Sample Slide Show", "slides": [{"type": "all", "title": "Wake up to WonderWidgets!"}, {"type": "all", "title": "Overview", "items": ["Why <em>WonderWidgets</em> are great", "Who <em>buys</em> WonderWidgets"]}], "date": "date of publication", "author": "Yours Sincerely"}}"#
        }
    }
}

fn json_reply(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    reply(status, "application/json", value.to_string())
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Headers every response carries: the volatile ones are the noise a
/// shadow comparison must filter out.
fn decorate(flavor: Flavor, request: &HeaderMap, response: &mut HeaderMap) {
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
        response.insert(header::DATE, date);
    }
    if let Some(id) = request.get("x-request-id") {
        response.insert("x-request-id", id.clone());
    }
    let served_by = format!("{}-{:08x}", flavor.name(), rand::random::<u32>());
    if let Ok(value) = HeaderValue::from_str(&served_by) {
        response.insert("x-served-by", value);
    }
}

/// A histogram of microseconds, 1 µs to 60 s at 3 significant digits.
pub(crate) fn micros_histogram() -> hdrhistogram::Histogram<u64> {
    // The bounds are constants that satisfy `new_with_bounds`' rules
    // (low ≥ 1, high ≥ 2·low, sigfig ≤ 5): this cannot fail at run time.
    hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3)
        .expect("constant histogram bounds are valid")
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            state: Mutex::new(State {
                by_host: BTreeMap::new(),
                by_path: BTreeMap::new(),
                by_class: BTreeMap::new(),
                by_path_class: BTreeMap::new(),
                recent: VecDeque::with_capacity(RECENT),
                service_time: micros_histogram(),
            }),
            total: watch::channel(0).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves counters that are
        // still valid numbers: keep serving them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, recorded: Recorded) {
        let mut state = self.state();
        let host = recorded.header("host").unwrap_or("-").to_string();
        *state.by_host.entry(host).or_default() += 1;
        let path = recorded.uri.path().to_string();
        let class = StatusClass::of(recorded.status).as_str();
        *state.by_path.entry(path.clone()).or_default() += 1;
        *state.by_class.entry(class).or_default() += 1;
        *state
            .by_path_class
            .entry(path)
            .or_default()
            .entry(class)
            .or_default() += 1;
        let micros = u64::try_from(recorded.service_time.as_micros()).unwrap_or(u64::MAX);
        state.service_time.saturating_record(micros.max(1));
        if state.recent.len() == RECENT {
            state.recent.pop_front();
        }
        state.recent.push_back(recorded);
        drop(state);
        self.total.send_modify(|total| *total += 1);
    }

    /// Requests answered so far.
    pub fn total(&self) -> u64 {
        *self.total.borrow()
    }

    pub fn by_host(&self) -> BTreeMap<String, u64> {
        self.state().by_host.clone()
    }

    pub fn by_path(&self) -> BTreeMap<String, u64> {
        self.state().by_path.clone()
    }

    pub fn by_class(&self) -> BTreeMap<&'static str, u64> {
        self.state().by_class.clone()
    }

    /// The last [`RECENT`] requests, oldest first.
    pub fn recent(&self) -> Vec<Recorded> {
        self.state().recent.iter().cloned().collect()
    }

    pub fn stats(&self) -> Stats {
        let state = self.state();
        let quantile = |q: f64| Duration::from_micros(state.service_time.value_at_quantile(q));
        Stats {
            total: state.service_time.len(),
            by_host: state.by_host.clone(),
            by_path: state.by_path.clone(),
            by_class: state.by_class.clone(),
            by_path_class: state.by_path_class.clone(),
            service_p50: quantile(0.5),
            service_p99: quantile(0.99),
        }
    }

    /// Waits until at least `n` requests have been answered, or `patience`
    /// runs out; returns the total reached.
    pub async fn wait_for(&self, n: u64, patience: Duration) -> u64 {
        let mut total = self.total.subscribe();
        let reached = tokio::time::timeout(patience, total.wait_for(|t| *t >= n)).await;
        match reached {
            Ok(Ok(total)) => *total,
            _ => self.total(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;

    type TestClient = Client<HttpConnector, Full<Bytes>>;

    fn client() -> TestClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    async fn call(
        backend: &Backend,
        method: Method,
        path: &str,
        host: &str,
        body: &str,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", backend.addr()))
            .header("host", host)
            .header("x-request-id", "req-1")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = client().request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    }

    async fn get(backend: &Backend, path: &str) -> (StatusCode, HeaderMap, Value) {
        let (status, headers, body) = call(backend, Method::GET, path, "httpbin:8000", "").await;
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        (status, headers, value)
    }

    #[tokio::test]
    async fn headers_echoes_request_headers_and_records_the_host() {
        let backend = start(Flavor::V1).await.unwrap();
        let (status, headers, body) = get(&backend, "/headers").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["headers"]["Host"], "httpbin:8000");
        assert_eq!(body["headers"]["X-Request-Id"], "req-1");
        assert_eq!(headers["x-request-id"], "req-1");
        assert!(headers.contains_key("date"));
        assert!(headers["x-served-by"].to_str().unwrap().starts_with("v1-"));
        let recorder = backend.recorder();
        assert_eq!(recorder.total(), 1);
        assert_eq!(recorder.by_host()["httpbin:8000"], 1);
        assert_eq!(recorder.by_path()["/headers"], 1);
        assert_eq!(recorder.by_class()["2xx"], 1);
        let recent = recorder.recent();
        assert_eq!(recent[0].method, Method::GET);
        assert_eq!(recent[0].header("host"), Some("httpbin:8000"));
    }

    #[tokio::test]
    async fn status_answers_the_code_asked_for() {
        let backend = start(Flavor::V1).await.unwrap();
        assert_eq!(get(&backend, "/status/404").await.0, StatusCode::NOT_FOUND);
        assert_eq!(get(&backend, "/status/503").await.0, 503);
        assert_eq!(get(&backend, "/status/abc").await.0, 400);
        assert_eq!(get(&backend, "/status/999").await.0, 400);
        let classes = backend.recorder().by_class();
        assert_eq!(classes["4xx"], 3);
        assert_eq!(classes["5xx"], 1);
    }

    #[tokio::test]
    async fn json_differs_between_flavors_in_the_author_only() {
        let v1 = start(Flavor::V1).await.unwrap();
        let v2 = start(Flavor::V2).await.unwrap();
        let (_, _, one) = get(&v1, "/json").await;
        let (_, _, two) = get(&v2, "/json").await;
        assert_eq!(one["slideshow"]["author"], "Yours Truly");
        assert_eq!(two["slideshow"]["author"], "Yours Sincerely");
        let mut two_fixed = two.clone();
        two_fixed["slideshow"]["author"] = json!("Yours Truly");
        assert_eq!(one, two_fixed, "only the author differs once parsed");
    }

    #[tokio::test]
    async fn anything_echoes_the_request_and_v2_reorders_keys() {
        let v1 = start(Flavor::V1).await.unwrap();
        let v2 = start(Flavor::V2).await.unwrap();
        let body = r#"{"item":"widget","qty":2}"#;
        let (status, _, raw1) = call(&v1, Method::POST, "/anything/cart?a=1", "h", body).await;
        assert_eq!(status, StatusCode::OK);
        let (_, _, raw2) = call(&v2, Method::POST, "/anything/cart?a=1", "h", body).await;
        let one: Value = serde_json::from_slice(&raw1).unwrap();
        let two: Value = serde_json::from_slice(&raw2).unwrap();
        assert_eq!(one["method"], "POST");
        assert_eq!(one["url"], "http://h/anything/cart?a=1");
        assert_eq!(one["args"]["a"], "1");
        assert_eq!(one["data"], body);
        assert_eq!(one["json"]["qty"], 2);
        assert_eq!(one["origin"], "127.0.0.1");
        assert_eq!(one["headers"], two["headers"]);
        let text1 = String::from_utf8_lossy(&raw1);
        let text2 = String::from_utf8_lossy(&raw2);
        assert!(text1.starts_with(r#"{"args""#), "{text1}");
        assert!(text2.starts_with(r#"{"served_at""#), "{text2}");
        assert_eq!(v1.recorder().recent()[0].body, body);
    }

    #[tokio::test]
    async fn orders_fail_on_v2_only() {
        let v1 = start(Flavor::V1).await.unwrap();
        let v2 = start(Flavor::V2).await.unwrap();
        let (one, _, _) = call(&v1, Method::POST, "/anything/orders", "h", "{}").await;
        let (two, _, _) = call(&v2, Method::POST, "/anything/orders", "h", "{}").await;
        assert_eq!(one, StatusCode::OK);
        assert_eq!(two, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(v2.recorder().by_class()["5xx"], 1);
    }

    #[tokio::test]
    async fn delay_sleeps_and_v2_is_slower() {
        let v1 = start(Flavor::V1).await.unwrap();
        let v2 = start(Flavor::V2).await.unwrap();
        let (status, _, body) = get(&v1, "/delay/0.02").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["method"], "GET");
        get(&v2, "/delay/0.02").await;
        let one = v1.recorder().stats().service_p50;
        let two = v2.recorder().stats().service_p50;
        assert!(one >= Duration::from_millis(20), "{one:?}");
        assert!(two >= Duration::from_millis(60), "{two:?}");
        assert_eq!(get(&v1, "/delay/x").await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn uuid_ip_and_unknown_paths() {
        let backend = start(Flavor::V2).await.unwrap();
        let (_, _, a) = get(&backend, "/uuid").await;
        let (_, _, b) = get(&backend, "/uuid").await;
        assert_ne!(a["uuid"], b["uuid"]);
        assert_eq!(a["uuid"].as_str().unwrap().len(), 36);
        let (_, _, ip) = get(&backend, "/ip").await;
        assert_eq!(ip["origin"], "127.0.0.1");
        assert_eq!(get(&backend, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn recent_keeps_only_the_last_requests() {
        let backend = start(Flavor::V1).await.unwrap();
        for i in 0..RECENT + 3 {
            get(&backend, &format!("/anything/{i}")).await;
        }
        let recorder = backend.recorder();
        assert_eq!(
            recorder
                .wait_for(RECENT as u64 + 3, Duration::from_secs(5))
                .await,
            67
        );
        let recent = recorder.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].uri.path(), "/anything/3");
        assert_eq!(recorder.stats().total, RECENT as u64 + 3);
    }
}
