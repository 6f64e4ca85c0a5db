//! Test harness: umbra running in-process on `127.0.0.1:0`, recording
//! backends, hostile backends, and small HTTP client helpers.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use umbra::accesslog::AccessLog;
use umbra::proxy::{MirrorLimits, Proxy};
use umbra::server::{Handle, Options, Server};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Every wait in the tests is bounded by this, so a bug fails instead of
/// hanging. It is a guard, never a synchronisation point.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// What a backend saw.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// What the TLS handshake of its connection said, if it was TLS.
    pub tls: Option<TlsSeen>,
}

/// A TLS connection as a backend saw it.
#[derive(Debug, Clone)]
pub struct TlsSeen {
    pub sni: Option<String>,
    pub alpn: Option<String>,
    /// Whether the client presented a certificate.
    pub client_certificate: bool,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Handler = Arc<dyn Fn(&Recorded) -> Response<Body> + Send + Sync>;

/// 200 with `name` as body and in `x-backend`.
fn echo(name: &str) -> impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static {
    let label = name.to_string();
    move |_| {
        let mut response = Response::new(full(label.clone()));
        response
            .headers_mut()
            .insert("x-backend", label.parse().unwrap());
        response
    }
}

/// A real hyper server on 127.0.0.1:0 that records each complete request
/// (body fully read) before answering with its handler.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<Recorded>>>,
    count: watch::Receiver<usize>,
    /// Connections accepted, and those since closed.
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Backend {
    /// Answers 200 with the backend's name as body and in `x-backend`.
    pub async fn echo(name: &str) -> Backend {
        Backend::start(name, echo(name)).await
    }

    pub async fn status(name: &str, status: u16) -> Backend {
        Backend::start(name, move |_| {
            let mut response = Response::new(full(format!("status {status}")));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
        })
        .await
    }

    pub async fn start(
        name: &str,
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Backend {
        Backend::start_with(name, false, handler).await
    }

    /// `http2`: serve prior-knowledge HTTP/2 only.
    pub async fn start_with(
        name: &str,
        http2: bool,
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Backend {
        Backend::serve(name, http2, None, handler).await
    }

    /// Serves over TLS with `tls` (HTTP/2 if the client's ALPN asks for
    /// it), answering like [`Backend::echo`].
    pub async fn tls(name: &str, tls: Arc<rustls::ServerConfig>) -> Backend {
        Backend::tls_with(name, tls, echo(name)).await
    }

    /// Serves over TLS with `tls`, answering with `handler`.
    pub async fn tls_with(
        name: &str,
        tls: Arc<rustls::ServerConfig>,
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Backend {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        Backend::serve(name, false, Some(acceptor), handler).await
    }

    async fn serve(
        name: &str,
        http2: bool,
        tls: Option<tokio_rustls::TlsAcceptor>,
        handler: impl Fn(&Recorded) -> Response<Body> + Send + Sync + 'static,
    ) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let handler: Handler = Arc::new(handler);
        let recorder = seen.clone();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (accepts, closes) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                accepts.fetch_add(1, Ordering::SeqCst);
                let closes = closes.clone();
                let handler = handler.clone();
                let recorder = recorder.clone();
                let count_tx = count_tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let (stream, seen) = match tls {
                        None => (Either::Left(stream), None),
                        Some(acceptor) => {
                            let Ok(stream) = acceptor.accept(stream).await else {
                                closes.fetch_add(1, Ordering::SeqCst);
                                return;
                            };
                            let session = stream.get_ref().1;
                            let seen = TlsSeen {
                                sni: session.server_name().map(str::to_string),
                                alpn: session
                                    .alpn_protocol()
                                    .map(|p| String::from_utf8_lossy(p).into_owned()),
                                client_certificate: session.peer_certificates().is_some(),
                            };
                            (Either::Right(stream), Some(seen))
                        }
                    };
                    let http2 =
                        http2 || seen.as_ref().and_then(|s| s.alpn.as_deref()) == Some("h2");
                    let service = service_fn(move |request: Request<Incoming>| {
                        let seen = seen.clone();
                        let handler = handler.clone();
                        let recorder = recorder.clone();
                        let count_tx = count_tx.clone();
                        async move {
                            let (parts, body) = request.into_parts();
                            let Ok(body) = body.collect().await else {
                                // A broken request body is never recorded.
                                return Err("incomplete request body");
                            };
                            let recorded = Recorded {
                                method: parts.method,
                                uri: parts.uri,
                                version: parts.version,
                                headers: parts.headers,
                                body: body.to_bytes(),
                                tls: seen,
                            };
                            let response = handler(&recorded);
                            let total = {
                                let mut seen = recorder.lock().unwrap();
                                seen.push(recorded);
                                seen.len()
                            };
                            count_tx.send_replace(total);
                            Ok::<_, &'static str>(response)
                        }
                    });
                    match stream {
                        Either::Left(tcp) => serve_io(TokioIo::new(tcp), http2, service).await,
                        Either::Right(tls) => serve_io(TokioIo::new(tls), http2, service).await,
                    }
                    closes.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            seen,
            count,
            accepted,
            closed,
        }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections accepted and since closed (by either side).
    pub fn closed_connections(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn received(&self) -> Vec<Recorded> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Waits until at least `n` requests were recorded.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        let mut count = self.count.clone();
        tokio::time::timeout(PATIENCE, count.wait_for(|&c| c >= n))
            .await
            .unwrap_or_else(|_| panic!("{} saw {} requests, expected {n}", self.name, self.count()))
            .unwrap();
        self.received()
    }
}

/// Serves one backend connection until it closes.
async fn serve_io<I, S>(io: I, http2: bool, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if http2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

/// A port with nothing listening on it. The port stays bound (without
/// `listen`, so connections are refused) for the rest of the run: a port
/// merely freed can be handed to the next test's backend bound to port 0,
/// which then receives traffic meant to be refused.
pub async fn refused_port() -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    std::mem::forget(socket);
    port
}

/// Accepts connections and never answers; counts accepted connections.
pub struct Blackhole {
    pub addr: SocketAddr,
    accepted: watch::Receiver<usize>,
}

impl Blackhole {
    pub async fn start() -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, accepted) = watch::channel(0usize);
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                tx.send_modify(|n| *n += 1);
                // Read and discard so the client's writes never block, but
                // never answer.
                held.push(tokio::spawn(async move {
                    let mut sink = vec![0u8; 16 * 1024];
                    while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                }));
            }
        });
        Blackhole { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    /// Waits until it has accepted `n` connections.
    pub async fn wait_accepted(&self, n: usize) {
        let mut accepted = self.accepted.clone();
        tokio::time::timeout(PATIENCE, accepted.wait_for(|&seen| seen >= n))
            .await
            .expect("accepted in time")
            .unwrap();
    }
}

/// Accepts and immediately closes each connection (a reset upstream).
pub async fn resetter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            // SO_LINGER 0 turns the close into a reset.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
    });
    addr
}

/// umbra running in-process with its config in a temp dir.
pub struct Umbra {
    pub addr: SocketAddr,
    /// The second listener, when `Setup::second_listener`.
    pub second: Option<SocketAddr>,
    /// The TLS listener, when `Setup::tls`.
    pub tls: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub handle: Handle,
    pub proxy: Arc<Proxy>,
    pub config_file: PathBuf,
    pub dir: tempfile::TempDir,
    /// The admin's registry, readable after shutdown too.
    registry: Arc<prometheus_client::registry::Registry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

#[derive(Default)]
pub struct Setup {
    /// Serve on a second listener too (`Umbra::second`).
    pub second_listener: bool,
    pub limits: MirrorLimits,
    pub access_log: Option<PathBuf>,
    pub options: Options,
    pub analysis: bool,
    /// Serve on a TLS listener too (`Umbra::tls`), with this certificate.
    pub tls: Option<Arc<umbra::server::tls::Termination>>,
}

impl Umbra {
    pub async fn start(yaml: &str) -> Umbra {
        Umbra::start_with(yaml, Setup::default()).await
    }

    pub async fn start_with(yaml: &str, setup: Setup) -> Umbra {
        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join("config.yaml");
        std::fs::write(&config_file, yaml).unwrap();
        let config = umbra::config::load(&[&config_file])
            .unwrap_or_else(|e| panic!("test config does not load:\n{e}"));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut listeners = vec![listener];
        if setup.second_listener {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let tls_listeners = match setup.tls {
            Some(_) => vec![TcpListener::bind("127.0.0.1:0").await.unwrap()],
            None => Vec::new(),
        };
        let tls = tls_listeners.first().map(|l| l.local_addr().unwrap());
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listeners[0].local_addr().unwrap();
        let second = listeners.get(1).map(|l| l.local_addr().unwrap());
        let admin_addr = admin.local_addr().unwrap();
        let access_log = match &setup.access_log {
            Some(path) => AccessLog::open(
                &umbra::accesslog::Target::File(path.clone()),
                umbra::accesslog::Format::Combined,
            )
            .unwrap(),
            None => AccessLog::off(),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(umbra::metrics::Metrics::new(&mut registry));
        let analyzer = setup
            .analysis
            .then(|| umbra::analysis::Analyzer::start(None, &mut registry).unwrap());
        let proxy = Arc::new(Proxy::new(
            Arc::new(config),
            metrics,
            access_log,
            analyzer,
            setup.limits,
        ));
        let registry = Arc::new(registry);
        let server = Server {
            proxy: proxy.clone(),
            listeners,
            tls_listeners,
            tls: setup.tls,
            admin: Some(admin),
            registry: registry.clone(),
            config_paths: vec![config_file.clone()],
            watch_files: true,
            options: setup.options,
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (started_tx, started_rx) = oneshot::channel();
        let task = tokio::spawn(umbra::server::run(
            server,
            async move {
                let _ = stop_rx.await;
            },
            Some(started_tx),
        ));
        let handle = started_rx.await.expect("server started");
        Umbra {
            addr,
            second,
            tls,
            admin: admin_addr,
            handle,
            proxy,
            config_file,
            dir,
            registry,
            shutdown: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Signals shutdown without waiting for the drain.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }

    /// Starts draining; returns when `run` has returned.
    pub async fn shutdown(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("shutdown finished")
                .unwrap()
                .unwrap();
        }
    }

    /// Makes `change` to watched files and waits for the reload it sets off
    /// to succeed.
    pub async fn reloads_after(&self, change: impl FnOnce()) {
        let mut reloads = self.handle.reloads();
        let before = reloads.borrow().attempts;
        change();
        tokio::time::timeout(
            PATIENCE,
            reloads.wait_for(|s| s.attempts > before && s.last_ok),
        )
        .await
        .expect("the change set off a successful reload")
        .unwrap();
    }

    /// Writes a new config and waits for the reload it triggers.
    pub async fn reload_with(&self, yaml: &str) -> bool {
        let mut reloads = self.handle.reloads();
        let before = reloads.borrow().attempts;
        // Write to a temp file and rename, as editors and kubectl do.
        let staging = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&staging, yaml).unwrap();
        std::fs::rename(&staging, &self.config_file).unwrap();
        let status = tokio::time::timeout(PATIENCE, reloads.wait_for(|s| s.attempts > before))
            .await
            .expect("reload happened")
            .unwrap();
        status.last_ok
    }

    pub async fn admin_get(&self, path: &str) -> (StatusCode, String) {
        let response = client()
            .request(get(&format!("http://{}{}", self.admin, path), "admin"))
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// The value of the first sample of `name` whose labels include all of
    /// `labels`, or 0.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics().await, name, labels)
    }

    /// `metric`, read from the registry itself: works once the admin is
    /// gone with the shutdown.
    pub fn metric_after_shutdown(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        metric_value(&text, name, labels)
    }

    /// The analysis report once its routes have `samples` pairs in all
    /// (the worker flushed each time), or `None` if it never gets there.
    pub async fn analysed(&self, samples: u64) -> Option<umbra::analysis::Report> {
        let analyzer = self.proxy.analyzer.clone().expect("analysis on");
        eventually(|| {
            let analyzer = analyzer.clone();
            async move {
                let report = tokio::task::spawn_blocking(move || {
                    analyzer.flush();
                    analyzer.report()
                })
                .await
                .unwrap();
                let analysed: u64 = report.routes.iter().map(|r| r.samples).sum();
                (analysed == samples).then_some(report)
            }
        })
        .await
    }

    /// Polls the metrics until `name{labels}` reaches `at_least`.
    pub async fn wait_metric(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        eventually(|| async {
            let value = self.metric(name, labels).await;
            (value >= at_least).then_some(value)
        })
        .await
        .unwrap_or_else(|| panic!("{name}{labels:?} never reached {at_least}"))
    }
}

impl Drop for Umbra {
    fn drop(&mut self) {
        if let Some(stop) = self.shutdown.take() {
            let _ = stop.send(());
        }
    }
}

/// The access log at `path` once a whole line is in it (`None` if none
/// comes in time).
pub async fn logged(path: &std::path::Path) -> Option<String> {
    eventually(|| async {
        std::fs::read_to_string(path)
            .ok()
            .filter(|text| text.ends_with('\n'))
    })
    .await
}

pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(name)
                && matches!(line.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Re-checks `probe` until it yields `Some`, for at most `PATIENCE`. Used
/// only for effects with no event to await (metrics of detached tasks).
pub async fn eventually<T, F, Fut>(mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .build_http()
}

pub fn h2_client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        .build_http()
}

pub fn get(url: &str, host: &str) -> Request<Body> {
    Request::get(url)
        .header("host", host)
        .body(empty())
        .unwrap()
}

/// A body that sends `head` at once and `-end` once `gate` opens: it keeps
/// its exchange (and connection) busy until then.
pub fn held_body(mut gate: watch::Receiver<bool>) -> Body {
    let (sender, body) = channel_body();
    tokio::spawn(async move {
        sender.send(Bytes::from_static(b"head")).await.ok();
        let _ = gate.wait_for(|open| *open).await;
        sender.send(Bytes::from_static(b"-end")).await.ok();
    });
    body
}

/// Reads what umbra answers on `stream` until it closes it.
pub async fn read_reply(stream: &mut tokio::net::TcpStream) -> String {
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .expect("umbra answers and closes")
        .unwrap();
    String::from_utf8_lossy(&reply).into_owned()
}

/// Sends `bytes` as they are on a new connection to `addr` and reads
/// what umbra answers until it closes the connection.
pub async fn exchange_raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    read_reply(&mut stream).await
}

/// Sends a request and reads the whole response.
pub async fn send(request: Request<Body>) -> (StatusCode, HeaderMap, Bytes) {
    let response = tokio::time::timeout(PATIENCE, client().request(request))
        .await
        .expect("response in time")
        .expect("response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    (parts.status, parts.headers, body)
}

/// `GET url` with `Host: host`, whole response.
pub async fn fetch(url: &str, host: &str) -> (StatusCode, HeaderMap, Bytes) {
    send(get(url, host)).await
}

/// A VirtualService named `host` that routes `host` to one backend on
/// 127.0.0.1:`port`.
pub fn single_route(host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {host}}}\nspec:\n  hosts: [{host}]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    )
}

/// ServiceEntry `httpbin` (port 8000) with v1 and v2 endpoints, and the
/// DestinationRule with subsets v1 and v2.
pub fn httpbin_endpoints(v1: u16, v2: u16) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin
spec:
  hosts: [httpbin]
  ports:
  - number: 8000
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {v1}}}
    labels: {{version: v1}}
  - address: 127.0.0.1
    ports: {{http: {v2}}}
    labels: {{version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  subsets:
  - name: v1
    labels: {{version: v1}}
  - name: v2
    labels: {{version: v2}}
"#
    )
}

/// The seed scenario: 100% to v1, mirrored to v2, plus `extra` lines in the
/// route (indented to sit under `- route:`) and `annotations`.
pub fn seed(v1: u16, v2: u16, annotations: &str, extra: &str) -> String {
    format!(
        r#"{endpoints}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
  annotations: {{{annotations}}}
spec:
  hosts: [httpbin]
  http:
  - route:
    - destination: {{host: httpbin, subset: v1, port: {{number: 8000}}}}
{extra}"#,
        endpoints = httpbin_endpoints(v1, v2)
    )
}

/// The seed with a plain `mirror` to v2 at `percent`.
pub fn seed_mirror(v1: u16, v2: u16, annotations: &str, percent: f64) -> String {
    seed(
        v1,
        v2,
        annotations,
        &format!(
            "    mirror: {{host: httpbin, subset: v2, port: {{number: 8000}}}}\n    mirrorPercentage: {{value: {percent}}}\n"
        ),
    )
}

/// A request body that arrives in `chunks` pieces without a length.
pub fn chunked_body(chunks: Vec<Bytes>) -> Body {
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, Infallible>(hyper::body::Frame::data(c))),
    );
    http_body_util::StreamBody::new(stream)
        .map_err(|e| match e {})
        .boxed()
}

/// A response body the test feeds chunk by chunk.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(hyper::body::Frame::data(chunk)), rx))
    });
    let body = http_body_util::StreamBody::new(stream)
        .map_err(|e| match e {})
        .boxed();
    (tx, body)
}

/// Sends one request over a fresh prior-knowledge HTTP/2 connection to
/// `addr`, keeping the request's URI (and so its `:authority`) as given.
pub async fn h2_send(addr: SocketAddr, request: Request<Body>) -> Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("h2 response in time")
        .unwrap()
}

/// Reads up to the blank line ending a request or response head from a raw
/// stream (less if the peer closes first or goes quiet for `PATIENCE`).
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// The real `umbra` binary, with its stderr collected line by line.
pub struct Process {
    child: tokio::process::Child,
    lines: watch::Receiver<Vec<String>>,
}

impl Process {
    /// `umbra run` on 127.0.0.1:0 serving `yaml`, with `env` set; the
    /// config lives in the returned directory.
    pub fn run(
        yaml: &str,
        admin: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Process, tempfile::TempDir) {
        Process::serving(yaml, admin, env, &["--no-watch"])
    }

    /// Like [`Process::run`], reloading when the config or a file it
    /// names changes.
    pub fn watching(
        yaml: &str,
        admin: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Process, tempfile::TempDir) {
        Process::serving(yaml, admin, env, &[])
    }

    fn serving(
        yaml: &str,
        admin: &str,
        env: &[(&str, &std::ffi::OsStr)],
        more: &[&str],
    ) -> (Process, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, yaml).unwrap();
        let args = [
            "run",
            "-c",
            config.to_str().unwrap(),
            "-l",
            "127.0.0.1:0",
            "--admin",
            admin,
            "--access-log",
            "off",
        ];
        (Process::spawn(&[&args[..], more].concat(), env), dir)
    }

    pub fn spawn(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Process {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_umbra"))
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("umbra binary starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = watch::channel(Vec::new());
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut reader = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                tx.send_modify(|lines| lines.push(strip_ansi(&line)));
            }
        });
        Process { child, lines }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub async fn line(&self, needle: &str) -> String {
        let mut lines = self.lines.clone();
        let found = tokio::time::timeout(
            PATIENCE,
            lines.wait_for(|lines| lines.iter().any(|l| l.contains(needle))),
        )
        .await;
        let all = self.stderr();
        let Ok(Ok(lines)) = found else {
            panic!("no stderr line with {needle:?}:\n{all}");
        };
        let line = lines.iter().find(|l| l.contains(needle)).unwrap();
        line.clone()
    }

    pub fn stderr(&self) -> String {
        self.lines.borrow().join("\n")
    }

    /// The address logged on the first line containing `needle`.
    pub async fn logged_addr(&self, needle: &str) -> SocketAddr {
        let line = self.line(needle).await;
        let addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        addr.parse().unwrap()
    }

    pub fn terminate(&self) {
        self.signal("-TERM");
    }

    /// Sends `signal` (as `kill` spells it: `-HUP`).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("still running").to_string();
        let status = std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// The stderr lines containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines
            .borrow()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("umbra exited in time")
            .unwrap()
            .code()
    }
}

/// Drops terminal colour sequences, in case the logger adds them anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
