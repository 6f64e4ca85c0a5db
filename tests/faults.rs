//! Fault injection (issue 6): shadows and primaries that refuse, hang,
//! answer late, reset, talk garbage, never stop, or go away; reloads and
//! SIGTERM while requests are in flight. The client must only ever see the
//! primary's response (or an honest error), and every bounded structure
//! must drain back to empty.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};

use crate::support::*;
use umbra::proxy::MirrorLimits;

const MIRRORED: &str = "umbra_mirror_requests_total";

/// Every way a shadow can misbehave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Refuses,
    Blackhole,
    /// Answers correctly, but only after umbra has given up on it.
    AnswersLate,
    /// Headers and part of the body, then a TCP reset.
    ResetsMidResponse,
    Garbage,
    /// A chunked body that never ends.
    EndlessBody,
    /// An HTTP/2 endpoint that takes the request, then sends GOAWAY.
    GoAway,
}

impl Fault {
    const ALL: [Fault; 7] = [
        Fault::Refuses,
        Fault::Blackhole,
        Fault::AnswersLate,
        Fault::ResetsMidResponse,
        Fault::Garbage,
        Fault::EndlessBody,
        Fault::GoAway,
    ];

    /// The mirror outcome umbra must record for every shadow sent to it.
    fn outcome(self) -> &'static str {
        match self {
            Fault::Blackhole | Fault::AnswersLate | Fault::EndlessBody => "timeout",
            Fault::Refuses | Fault::ResetsMidResponse | Fault::Garbage | Fault::GoAway => "failed",
        }
    }
}

/// A misbehaving shadow endpoint on 127.0.0.1:0 and what it observed.
struct FaultyShadow {
    port: u16,
    /// Requests read in full (for GoAway: streams accepted).
    requests: watch::Receiver<usize>,
    /// Connections umbra closed while the shadow was still holding or
    /// writing (blackhole and endless body).
    cut: watch::Receiver<usize>,
    /// Lets the late shadow answer.
    release: watch::Sender<bool>,
}

impl FaultyShadow {
    async fn start(fault: Fault) -> FaultyShadow {
        let (requests_tx, requests) = watch::channel(0usize);
        let (cut_tx, cut) = watch::channel(0usize);
        let (release, release_rx) = watch::channel(false);
        if fault == Fault::Refuses {
            return FaultyShadow {
                port: refused_port().await,
                requests,
                cut,
                release,
            };
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (requests_tx, cut_tx) = (Arc::new(requests_tx), Arc::new(cut_tx));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(misbehave(
                    fault,
                    stream,
                    requests_tx.clone(),
                    cut_tx.clone(),
                    release_rx.clone(),
                ));
            }
        });
        FaultyShadow {
            port,
            requests,
            cut,
            release,
        }
    }

    fn requests(&self) -> usize {
        *self.requests.borrow()
    }

    fn cut(&self) -> usize {
        *self.cut.borrow()
    }
}

async fn misbehave(
    fault: Fault,
    mut stream: TcpStream,
    requests: Arc<watch::Sender<usize>>,
    cut: Arc<watch::Sender<usize>>,
    mut release: watch::Receiver<bool>,
) {
    if fault == Fault::GoAway {
        let Ok(mut connection) = h2::server::handshake(stream).await else {
            return;
        };
        if let Some(Ok(stream)) = connection.accept().await {
            requests.send_modify(|n| *n += 1);
            connection.abrupt_shutdown(h2::Reason::INTERNAL_ERROR);
            // Drive the connection so the GOAWAY is written, holding the
            // stream unanswered until the connection is gone.
            while connection.accept().await.is_some() {}
            drop(stream);
        }
        return;
    }
    if !read_request(&mut stream).await {
        return;
    }
    requests.send_modify(|n| *n += 1);
    match fault {
        Fault::Refuses | Fault::GoAway => unreachable!("handled above"),
        Fault::Blackhole => {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            cut.send_modify(|n| *n += 1);
        }
        Fault::AnswersLate => {
            let _ = release.wait_for(|go| *go).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
                .await;
        }
        Fault::ResetsMidResponse => {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly some")
                .await;
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(std::time::Duration::ZERO));
        }
        Fault::Garbage => {
            let _ = stream
                .write_all(b"\x16\x03\x01\x02\x00 this is not HTTP \xff\xfe\r\n\r\n")
                .await;
        }
        Fault::EndlessBody => {
            let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let chunk = [b"4000\r\n".as_slice(), &[b'e'; 0x4000], b"\r\n"].concat();
            while stream.write_all(&chunk).await.is_ok() {}
            cut.send_modify(|n| *n += 1);
        }
    }
}

/// Reads one HTTP/1.1 request: the head, then a Content-Length or chunked
/// body. False when the peer closed first.
async fn read_request(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse::<usize>().ok());
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let body = &buf[head_end..];
        let complete = match length {
            Some(length) => body.len() >= length,
            None if chunked => body.ends_with(b"0\r\n\r\n"),
            None => true,
        };
        if complete {
            return true;
        }
        match stream.read(&mut chunk).await {
            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return false,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The primary for the shadow-fault table: its answer depends on the whole
/// request, and it sets every header itself (Date included) so a direct
/// response and a proxied one can be compared header for header.
async fn deterministic_primary() -> Backend {
    Backend::start("primary", |seen| {
        let text = format!(
            "{} {} {} bytes: {}",
            seen.method,
            seen.uri,
            seen.body.len(),
            String::from_utf8_lossy(&seen.body)
        );
        let mut response = Response::new(full(text));
        *response.status_mut() = if seen.uri.path().ends_with("/missing") {
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        let headers = response.headers_mut();
        headers.insert("date", "Thu, 01 Jan 2026 00:00:00 GMT".parse().unwrap());
        headers.insert("content-type", "text/plain".parse().unwrap());
        headers.insert("x-backend", "primary".parse().unwrap());
        headers.append("x-multi", "one".parse().unwrap());
        headers.append("x-multi", "two".parse().unwrap());
        response
    })
    .await
}

/// Request `i` of the traffic mix, to `base`: GETs, a 404, sized POSTs and
/// chunked PUTs.
fn mixed_request(base: &str, i: usize) -> Request<Body> {
    let builder = Request::builder().header("host", "app");
    match i % 5 {
        0 => builder
            .method("POST")
            .uri(format!("{base}/submit/{i}"))
            .body(full(format!("form-{i}-").repeat(100 * i + 1)))
            .unwrap(),
        1 => builder
            .method("PUT")
            .uri(format!("{base}/upload/{i}"))
            .body(chunked_body(vec![
                Bytes::from(format!("part-a-{i};")),
                Bytes::from(vec![b'b'; 3000]),
                Bytes::from_static(b";end"),
            ]))
            .unwrap(),
        2 => builder
            .uri(format!("{base}/items/{i}/missing"))
            .body(empty())
            .unwrap(),
        _ => builder
            .uri(format!("{base}/items/{i}?q={i}"))
            .body(empty())
            .unwrap(),
    }
}

/// Route `main` on host `app` to `primary`, mirroring everything to the
/// ServiceEntry `shadow` (HTTP/2 when `h2`), with a short route timeout that
/// is also the shadow timeout.
fn mirrored_to(primary: u16, shadow: u16, h2: bool) -> String {
    let protocol = if h2 { "HTTP2" } else { "HTTP" };
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow}}
spec:
  hosts: [shadow]
  ports: [{{number: 80, name: web, protocol: {protocol}}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{web: {shadow}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app}}
spec:
  hosts: [app]
  http:
  - name: main
    timeout: 1s
    route: [{{destination: {{host: 127.0.0.1, port: {{number: {primary}}}}}}}]
    mirror: {{host: shadow, port: {{number: 80}}}}
    mirrorPercentage: {{value: 100}}
"#
    )
}

/// Sends the traffic mix through umbra and directly to the primary, and
/// checks each proxied response is the direct one, byte for byte.
async fn primary_answers_untouched(fault: Fault, umbra: &Umbra, primary: &Backend, count: usize) {
    let direct_base = format!("http://{}", primary.addr);
    let proxied_base = format!("http://{}", umbra.addr);
    for i in 0..count {
        let direct = send(mixed_request(&direct_base, i)).await;
        let proxied = send(mixed_request(&proxied_base, i)).await;
        assert_eq!(proxied.0, direct.0, "{fault:?} request {i}: status");
        assert_eq!(
            primary_headers(proxied.1),
            primary_headers(direct.1),
            "{fault:?} request {i}: headers"
        );
        assert!(proxied.2 == direct.2, "{fault:?} request {i}: body");
    }
}

/// The headers a response carries, minus hop-by-hop ones (which describe
/// one connection, not the response).
fn primary_headers(mut headers: HeaderMap) -> HeaderMap {
    for name in ["connection", "keep-alive"] {
        headers.remove(name);
    }
    headers
}

async fn shadow_fault_case(fault: Fault) {
    const REQUESTS: usize = 20;
    let primary = deterministic_primary().await;
    let shadow = FaultyShadow::start(fault).await;
    let yaml = mirrored_to(primary.port(), shadow.port, fault == Fault::GoAway);
    let analysis = Setup {
        analysis: true,
        // Every shadow goes out: after a few failures in a row the target
        // would be ejected (tested in tests/mirror.rs).
        limits: MirrorLimits {
            eject_after: 0,
            ..MirrorLimits::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, analysis).await;

    // The late shadow cannot answer until this loop is over, so the
    // primary's answers never waited for it.
    primary_answers_untouched(fault, &umbra, &primary, REQUESTS).await;
    let received = primary.received();
    assert_eq!(received.len(), 2 * REQUESTS, "{fault:?}: one copy per send");
    for pair in received.chunks(2) {
        assert_eq!(pair[0].body, pair[1].body, "{fault:?}: whole request body");
    }

    let expected = fault.outcome();
    let ended = umbra
        .wait_metric(MIRRORED, &[("outcome", expected)], REQUESTS as f64)
        .await;
    shadow.release.send_replace(true);
    let metrics = umbra.metrics().await;
    let outcome = |name| metric_value(&metrics, MIRRORED, &[("outcome", name)]);
    assert_eq!(
        outcome("sent"),
        REQUESTS as f64,
        "{fault:?}: every request mirrored"
    );
    assert_eq!(ended, REQUESTS as f64, "{fault:?}: every shadow {expected}");
    for other in ["completed", "failed", "timeout", "dropped_overload"] {
        if other != expected {
            assert_eq!(outcome(other), 0.0, "{fault:?}: no shadow {other}");
        }
    }
    assert_eq!(
        metric_value(&metrics, "umbra_mirror_inflight", &[]),
        0.0,
        "{fault:?}: no shadow left in flight"
    );
    // A shadow's body may be dropped by its connection task a moment after
    // the outcome is counted; the budget must still come back to zero.
    let budget = &umbra.proxy.mirroring.budget;
    let drained = eventually(|| async { (budget.buffered() == 0).then_some(()) }).await;
    assert!(
        drained.is_some(),
        "{fault:?}: {} teed body bytes never returned to the budget",
        budget.buffered()
    );
    assert_eq!(
        metric_value(&metrics, "umbra_requests_total", &[("class", "2xx")])
            + metric_value(&metrics, "umbra_requests_total", &[("class", "4xx")]),
        REQUESTS as f64,
        "{fault:?}: every client request answered by the primary"
    );
    assert_eq!(
        metric_value(&metrics, "umbra_upstream_errors_total", &[])
            + metric_value(&metrics, "umbra_downstream_errors_total", &[]),
        0.0,
        "{fault:?}: no primary error"
    );

    match fault {
        Fault::Refuses => {}
        // HTTP/2 multiplexes, so a shadow may ride a connection that is
        // already going away and never reach the server.
        Fault::GoAway => assert!(shadow.requests() >= 1, "GOAWAY was exercised"),
        _ => {
            let all = eventually(|| async { (shadow.requests() == REQUESTS).then_some(()) });
            assert!(all.await.is_some(), "{fault:?}: saw {}", shadow.requests());
        }
    }
    // The analysis pairs every request and blames the shadow, by kind,
    // never the primary.
    let report = umbra
        .analysed(REQUESTS as u64)
        .await
        .unwrap_or_else(|| panic!("{fault:?}: {REQUESTS} pairs analysed"));
    let errors = &report.routes[0].errors;
    let blamed = match fault {
        Fault::Refuses => errors.shadow_connect_failures,
        Fault::Blackhole | Fault::AnswersLate | Fault::EndlessBody => errors.shadow_timeouts,
        Fault::ResetsMidResponse | Fault::Garbage | Fault::GoAway => errors.shadow_failures,
    };
    assert_eq!(blamed, REQUESTS as u64, "{fault:?}: {errors:?}");
    let shadow_errors =
        errors.shadow_connect_failures + errors.shadow_timeouts + errors.shadow_failures;
    assert_eq!(shadow_errors, REQUESTS as u64, "{fault:?}: {errors:?}");
    assert_eq!(errors.primary_failures + errors.primary_5xx, 0, "{fault:?}");

    if matches!(fault, Fault::Blackhole | Fault::EndlessBody) {
        // umbra, not the shadow, ended every hanging or endless exchange.
        let all = eventually(|| async { (shadow.cut() == REQUESTS).then_some(()) });
        assert!(all.await.is_some(), "{fault:?}: {} cut", shadow.cut());
    }
}

#[tokio::test]
async fn misbehaving_shadows_never_touch_the_primary_response() {
    // Concurrently: the hanging cases each wait out a 1 s shadow timeout.
    futures_util::future::join_all(Fault::ALL.map(shadow_fault_case)).await;
}

/// A primary that sends a response head and part of the body, then waits
/// for `cut` and closes (with a reset for paths containing `rst`). Paths
/// starting `/chunked` frame the body as chunked, others by Content-Length.
async fn cut_short_primary(cut: Arc<Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut head = vec![0u8; 4096];
                let n = stream.read(&mut head).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&head[..n]).into_owned();
                let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                let partial: &[u8] = if path.starts_with("/chunked") {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst"
                };
                stream.write_all(partial).await.unwrap();
                cut.notified().await;
                if path.contains("rst") {
                    #[allow(deprecated)]
                    let _ = stream.set_linger(Some(std::time::Duration::ZERO));
                }
            });
        }
    });
    addr
}

fn route_to(name: &str, prefix: &str, port: u16, extra: &str) -> String {
    format!(
        "  - name: {name}\n    match: [{{uri: {{prefix: {prefix}}}}}]\n{extra}    route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    )
}

fn virtual_service(routes: &[String]) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: app}}\nspec:\n  hosts: [app]\n  http:\n{}",
        routes.concat()
    )
}

#[tokio::test]
async fn primary_cut_mid_body_is_an_error_never_a_short_body() {
    let cut = Arc::new(Notify::new());
    let primary = cut_short_primary(cut.clone()).await;
    let ok = Backend::echo("ok").await;
    let yaml = virtual_service(&[
        route_to("ok", "/ok", ok.port(), ""),
        route_to("cut", "/", primary.port(), ""),
    ]);
    let umbra = Umbra::start(&yaml).await;
    for path in ["/length-fin", "/length-rst", "/chunked-fin", "/chunked-rst"] {
        for h2 in [false, true] {
            let case = format!("{path} over {}", if h2 { "HTTP/2" } else { "HTTP/1.1" });
            let response = if h2 {
                let request = Request::get(format!("http://app{path}"))
                    .body(empty())
                    .unwrap();
                h2_send(umbra.addr, request).await
            } else {
                tokio::time::timeout(PATIENCE, client().request(get(&umbra.url(path), "app")))
                    .await
                    .expect("response head in time")
                    .unwrap()
            };
            assert_eq!(response.status(), StatusCode::OK, "{case}");
            if !path.starts_with("/chunked") && !h2 {
                assert_eq!(response.headers()["content-length"], "100", "{case}");
            }
            let mut body = response.into_body();
            let first = tokio::time::timeout(PATIENCE, body.frame())
                .await
                .expect("first bytes in time")
                .expect("a frame")
                .expect("first bytes are fine");
            assert_eq!(
                first.data_ref().map(|d| &d[..]),
                Some(&b"first"[..]),
                "{case}"
            );
            // Only now, with the client mid-body, does the primary go away.
            cut.notify_one();
            let rest = tokio::time::timeout(PATIENCE, body.collect())
                .await
                .expect("body ends in time");
            assert!(
                rest.is_err(),
                "{case}: a cut body must fail, got {:?}",
                rest.map(|r| r.to_bytes())
            );
            let (status, _, body) = fetch(&umbra.url("/ok"), "app").await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "{case}");
        }
    }
    // Blamed on the upstream (Envoy's response code detail), never on the
    // client that was left with half a body.
    let reason = [("reason", "upstream_reset_after_response_started")];
    assert_eq!(
        umbra.metric("umbra_upstream_errors_total", &reason).await,
        8.0
    );
    assert_eq!(
        umbra.metric("umbra_downstream_errors_total", &[]).await,
        0.0
    );
}

/// A backend answering each request on a connection with `parts` in turn,
/// waiting for `next` before each part after the first. Counts accepted
/// connections.
async fn scripted_backend(
    parts: &'static [&'static [u8]],
    next: Arc<Notify>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let next = next.clone();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    // The request head (bodiless requests only).
                    let mut line = String::new();
                    while line != "\r\n" {
                        line.clear();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                    }
                    for (i, part) in parts.iter().enumerate() {
                        if i > 0 {
                            next.notified().await;
                        }
                        if stream.get_mut().write_all(part).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn bodies_ending_in_trailers_or_arriving_in_parts_are_complete_and_reuse_the_connection() {
    // Trailers are a chunked body's last frame (hyper stops polling after
    // them), and a body read over several passes ends on a pending poll:
    // neither may look like a client leaving, and the upstream connection
    // goes back to the pool after both.
    const TRAILERS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n2\r\nok\r\n0\r\nx-sum: 1\r\n\r\n",
    ];
    const PARTS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        b"4\r\nlast\r\n0\r\n\r\n",
    ];
    let next = Arc::new(Notify::new());
    let (trailers, trailers_accepted) = scripted_backend(TRAILERS, next.clone()).await;
    let (parts, parts_accepted) = scripted_backend(PARTS, next.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let setup = Setup {
        access_log: Some(log.clone()),
        ..Setup::default()
    };
    let yaml = virtual_service(&[
        route_to("trailers", "/trailers", trailers.port(), ""),
        route_to("parts", "/parts", parts.port(), ""),
    ]);
    let umbra = Umbra::start_with(&yaml, setup).await;
    let client = client();
    for _ in 0..2 {
        let (status, _, body) = fetch(&umbra.url("/trailers"), "app").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        let response = client
            .request(get(&umbra.url("/parts"), "app"))
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first");
        // The rest is written only now: the body ends on a later read.
        next.notify_one();
        let rest = tokio::time::timeout(PATIENCE, body.collect())
            .await
            .expect("the rest in time")
            .unwrap()
            .to_bytes();
        assert_eq!(&rest[..], b"last");
    }
    let lines = eventually(|| async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().count() == 4).then_some(text)
    })
    .await
    .expect("four requests logged");
    assert!(!lines.contains("error="), "{lines}");
    assert_eq!(
        umbra.metric("umbra_downstream_errors_total", &[]).await,
        0.0
    );
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
    let reused = |accepted: &std::sync::atomic::AtomicUsize| {
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    };
    assert_eq!(
        reused(&trailers_accepted),
        1,
        "one upstream connection for both"
    );
    assert_eq!(
        reused(&parts_accepted),
        1,
        "one upstream connection for both"
    );
}

#[tokio::test]
async fn a_request_body_breaking_after_the_response_head_is_the_clients_doing() {
    // The upstream answers at once and streams while the upload goes on;
    // then the client sends a malformed chunk. hyper fails the upstream
    // exchange, and so the response body, but the client broke it.
    const ANSWER: &[&[u8]] =
        &[b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"];
    let (backend, _) = scripted_backend(ANSWER, Arc::new(Notify::new())).await;
    let (umbra, log) = logging_umbra(backend.port(), Default::default()).await;
    const UPLOAD: &[u8] =
        b"POST /up HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n";
    let mut stream = mid_response(&umbra, UPLOAD).await;
    stream.write_all(b"zz\r\n\r\n").await.unwrap();
    let reason = [("reason", "downstream_request_body_error")];
    umbra
        .wait_metric("umbra_downstream_errors_total", &reason, 1.0)
        .await;
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
    let line = logged(log.path()).await.expect("the request is logged");
    assert!(
        line.contains("error=downstream_request_body_error"),
        "{line}"
    );
}

#[tokio::test]
async fn a_response_cut_mid_body_by_the_drain_timeout_is_counted_as_such() {
    let cut = Arc::new(Notify::new());
    let primary = cut_short_primary(cut.clone()).await;
    let options = umbra::server::Options {
        workers: 1,
        drain_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    };
    let (mut umbra, log) = logging_umbra(primary.port(), options).await;
    let stream = mid_response(&umbra, GET_LENGTH).await;
    umbra.shutdown().await;
    let drained = [("reason", "drain_timeout")];
    assert_eq!(
        umbra.metric_after_shutdown("umbra_downstream_errors_total", &drained),
        1.0
    );
    let left = [("reason", "downstream_body_incomplete")];
    assert_eq!(
        umbra.metric_after_shutdown("umbra_downstream_errors_total", &left),
        0.0
    );
    let line = logged(log.path()).await.expect("the request is logged");
    assert!(line.contains("error=drain_timeout"), "{line}");
    drop(stream);
    cut.notify_waiters();
}

/// umbra routing host `app` to `port`, and its access log.
async fn logging_umbra(
    port: u16,
    options: umbra::server::Options,
) -> (Umbra, tempfile::NamedTempFile) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let setup = Setup {
        access_log: Some(log.path().to_path_buf()),
        options,
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&virtual_service(&[route_to("r", "/", port, "")]), setup).await;
    (umbra, log)
}

const GET_LENGTH: &[u8] = b"GET /length HTTP/1.1\r\nHost: app\r\n\r\n";

/// Sends `request` on a connection of its own and reads until the response
/// body's `first` bytes are in.
async fn mid_response(umbra: &Umbra, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(umbra.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_until(&mut stream, b"first").await;
    stream
}

/// Reads from `stream` until `wanted` has come.
async fn read_until(stream: &mut TcpStream, wanted: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    while !got.windows(wanted.len()).any(|window| window == wanted) {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no more in time: {}", String::from_utf8_lossy(&got)))
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

#[tokio::test]
async fn a_client_leaving_mid_body_is_counted_on_its_side() {
    let cut = Arc::new(Notify::new());
    let primary = cut_short_primary(cut.clone()).await;
    let (umbra, log) = logging_umbra(primary.port(), Default::default()).await;
    let stream = mid_response(&umbra, GET_LENGTH).await;
    drop(stream);
    let reason = [("reason", "downstream_body_incomplete")];
    umbra
        .wait_metric("umbra_downstream_errors_total", &reason, 1.0)
        .await;
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
    let line = logged(log.path()).await.expect("the request is logged");
    assert!(line.contains("error=downstream_body_incomplete"), "{line}");
    cut.notify_waiters();
}

#[tokio::test]
async fn failing_primaries_get_local_replies_and_other_routes_keep_serving() {
    // Refused, timeout and no-endpoint replies are checked in detail in
    // proxy::local_errors_carry_status_and_reason; this adds the reset and
    // what comes after each failure.
    let ok = Backend::echo("ok").await;
    let hole = Blackhole::start().await;
    let reset = resets_after_request().await;
    let dead = refused_port().await;
    let mut yaml = virtual_service(&[
        route_to("ok", "/ok", ok.port(), ""),
        route_to("dead", "/dead", dead, ""),
        route_to("reset", "/reset", reset.port(), ""),
        route_to("slow", "/slow", hole.addr.port(), "    timeout: 300ms\n"),
        "  - name: none\n    match: [{uri: {prefix: /none}}]\n    route: [{destination: {host: empty, port: {number: 80}}}]\n".to_string(),
    ]);
    yaml += "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: empty}\nspec:\n  hosts: [empty]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: []\n";
    let umbra = Umbra::start(&yaml).await;
    let cases = [
        ("/dead", 502, "upstream_connect_failure"),
        ("/reset", 502, "upstream_reset"),
        ("/slow", 504, "upstream_timeout"),
        ("/none", 503, "no_healthy_upstream"),
    ];
    for round in 0..2 {
        for (path, status, reason) in cases {
            let (got, headers, _) = fetch(&umbra.url(path), "app").await;
            assert_eq!(got.as_u16(), status, "{path} round {round}");
            assert_eq!(headers["x-umbra-error"], reason, "{path} round {round}");
            let (got, headers, body) = fetch(&umbra.url("/ok"), "app").await;
            assert_eq!(got, StatusCode::OK, "after {path}");
            assert!(headers.get("x-umbra-error").is_none(), "after {path}");
            assert_eq!(&body[..], b"ok", "after {path}");
        }
    }
    assert_eq!(ok.count(), 8);
}

/// A local reply for a failed primary logs the endpoint that failed, as
/// Envoy's `%UPSTREAM_HOST%` does; `-` when none was tried.
#[tokio::test]
async fn local_replies_log_the_endpoint_that_failed() {
    let hole = Blackhole::start().await;
    let dead = refused_port().await;
    let mut yaml = virtual_service(&[
        route_to("dead", "/dead", dead, ""),
        route_to("slow", "/slow", hole.addr.port(), "    timeout: 200ms\n"),
        "  - name: none\n    match: [{uri: {prefix: /none}}]\n    route: [{destination: {host: empty, port: {number: 80}}}]\n".to_string(),
    ]);
    yaml += "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: empty}\nspec:\n  hosts: [empty]\n  ports: [{number: 80, name: http, protocol: HTTP}]\n  resolution: STATIC\n  endpoints: []\n";
    let log = tempfile::NamedTempFile::new().unwrap();
    let setup = Setup {
        access_log: Some(log.path().to_path_buf()),
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, setup).await;
    let cases = [
        ("/dead", 502, format!("upstream=127.0.0.1:{dead} ")),
        ("/slow", 504, format!("upstream={} ", hole.addr)),
        ("/none", 503, "upstream=- ".to_string()),
    ];
    for (done, (path, status, upstream)) in cases.into_iter().enumerate() {
        assert_eq!(fetch(&umbra.url(path), "app").await.0.as_u16(), status);
        let lines = eventually(|| async {
            let text = std::fs::read_to_string(log.path()).ok()?;
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            (text.ends_with('\n') && lines.len() > done).then_some(lines)
        });
        let line = lines.await.expect("logged")[done].clone();
        assert!(
            line.contains(path) && line.contains(&upstream),
            "{upstream}: {line}"
        );
    }
}

/// Reads each request, then resets the connection instead of answering.
/// (An upstream that resets before reading may surface as a connect
/// failure, depending on when the reset lands; this one cannot.)
async fn resets_after_request() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                read_request(&mut stream).await;
                #[allow(deprecated)]
                let _ = stream.set_linger(Some(std::time::Duration::ZERO));
            });
        }
    });
    addr
}

/// A backend that holds every response until the test releases it: before
/// the response head, or, for paths containing `/body`, after the first
/// KiB of the body. Each response body is [`held_body`] of its path.
struct Gate {
    addr: SocketAddr,
    arrived: watch::Receiver<usize>,
    release: watch::Sender<bool>,
}

impl Gate {
    async fn start() -> Gate {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (arrived_tx, arrived) = watch::channel(0usize);
        let (release, release_rx) = watch::channel(false);
        let arrived_tx = Arc::new(arrived_tx);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let arrived = arrived_tx.clone();
                let release = release_rx.clone();
                let service = service_fn(move |request: Request<Incoming>| {
                    let arrived = arrived.clone();
                    let mut release = release.clone();
                    async move {
                        let path = request.uri().path().to_string();
                        let _ = request.into_body().collect().await;
                        arrived.send_modify(|n| *n += 1);
                        let whole = held_body(&path);
                        if path.contains("/body") {
                            let (tx, body) = channel_body();
                            tokio::spawn(async move {
                                let _ = tx.send(whole.slice(..1024)).await;
                                let _ = release.wait_for(|go| *go).await;
                                let _ = tx.send(whole.slice(1024..)).await;
                            });
                            Ok::<_, Infallible>(Response::new(body))
                        } else {
                            let _ = release.wait_for(|go| *go).await;
                            Ok(Response::new(full(whole)))
                        }
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Gate {
            addr,
            arrived,
            release,
        }
    }

    async fn wait_arrived(&self, n: usize) {
        let mut arrived = self.arrived.clone();
        tokio::time::timeout(PATIENCE, arrived.wait_for(|&c| c >= n))
            .await
            .unwrap_or_else(|_| panic!("{} of {n} requests arrived", *self.arrived.borrow()))
            .unwrap();
    }

    fn release(&self) {
        self.release.send_replace(true);
    }
}

/// 64 KiB derived from the path, so a body from the wrong request or a
/// short one cannot pass for the right one.
fn held_body(path: &str) -> Bytes {
    path.bytes()
        .cycle()
        .take(64 * 1024)
        .collect::<Vec<u8>>()
        .into()
}

/// Starts `GET path` (Host `app`) and returns the whole response later.
/// A held request, once released, ends with 200 and the whole held body.
async fn completes_in_full(
    request: tokio::task::JoinHandle<(StatusCode, Result<Bytes, String>)>,
    path: &str,
) {
    let (status, body) = tokio::time::timeout(PATIENCE, request)
        .await
        .expect("in-flight request finished")
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{path}");
    let body = body.unwrap_or_else(|e| panic!("{path}: body broke: {e}"));
    assert!(
        body == held_body(path),
        "{path}: full body, {} bytes",
        body.len()
    );
}

fn in_flight(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Body,
    >,
    url: String,
) -> tokio::task::JoinHandle<(StatusCode, Result<Bytes, String>)> {
    let client = client.clone();
    tokio::spawn(async move {
        let response = client.request(get(&url, "app")).await.expect("response");
        let status = response.status();
        let body = response.into_body().collect().await;
        (
            status,
            body.map(|b| b.to_bytes()).map_err(|e| e.to_string()),
        )
    })
}

#[tokio::test]
async fn reload_removing_a_route_drains_its_in_flight_requests() {
    let gate = Gate::start().await;
    let other = Backend::echo("b").await;
    let with_a = virtual_service(&[
        route_to("a", "/a", gate.addr.port(), ""),
        route_to("b", "/b", other.port(), ""),
    ]);
    let umbra = Umbra::start(&with_a).await;
    let client = client();
    // One held before its response head, one after the first KiB of body.
    let head = in_flight(&client, umbra.url("/a/head"));
    let body = in_flight(&client, umbra.url("/a/body"));
    gate.wait_arrived(2).await;

    let without_a = virtual_service(&[route_to("b", "/b", other.port(), "")]);
    assert!(umbra.reload_with(&without_a).await, "reload accepted");
    let (status, headers, _) = fetch(&umbra.url("/a/head"), "app").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "route a is gone for new requests"
    );
    assert_eq!(headers["x-umbra-error"], "no_route");
    assert_eq!(&fetch(&umbra.url("/b"), "app").await.2[..], b"b");
    assert_eq!(
        *gate.arrived.borrow(),
        2,
        "the 404 never reached a's backend"
    );

    gate.release();
    completes_in_full(head, "/a/head").await;
    completes_in_full(body, "/a/body").await;
}

#[tokio::test]
async fn sigterm_under_load_drains_every_request_and_exits_zero() {
    const REQUESTS: usize = 50;
    let gate = Gate::start().await;
    let (mut umbra, _dir) = Process::run(
        &virtual_service(&[route_to("any", "/", gate.addr.port(), "")]),
        "127.0.0.1:0",
        &[],
    );
    let addr = umbra.logged_addr("umbra::server: listening").await;
    let admin = umbra.logged_addr("admin listening").await;
    let ready = || async { fetch(&format!("http://{admin}/ready"), "admin").await.0 };
    umbra.line("umbra::server: ready").await;
    assert_eq!(ready().await, 200);

    let client = client();
    let requests: Vec<_> = (0..REQUESTS)
        .map(|i| {
            // Half held before the response head, half mid-body.
            let path = if i % 2 == 0 { "head" } else { "body" };
            in_flight(&client, format!("http://{addr}/{path}/{i}"))
        })
        .collect();
    gate.wait_arrived(REQUESTS).await;

    umbra.terminate();
    umbra.line("shutting down: draining").await;
    let refused = eventually(|| async { TcpStream::connect(addr).await.is_err().then_some(()) });
    assert!(refused.await.is_some(), "no new connections while draining");
    // The admin listener stays: a load balancer sees the drain.
    assert_eq!(ready().await, 503);
    let metrics = fetch(&format!("http://{admin}/metrics"), "admin").await;
    assert_eq!(metrics.0, 200, "metrics scraped while draining");
    gate.release();

    for (i, request) in requests.into_iter().enumerate() {
        let path = format!("/{}/{i}", if i % 2 == 0 { "head" } else { "body" });
        completes_in_full(request, &path).await;
    }
    assert_eq!(umbra.exit_code().await, Some(0), "{}", umbra.stderr());
    let stderr = umbra.stderr();
    assert!(!stderr.contains("drain timeout"), "{stderr}");
    assert!(!stderr.contains("not on loopback"), "{stderr}");
}

#[tokio::test]
async fn admin_off_loopback_is_warned_about() {
    let backend = Backend::echo("b").await;
    let (mut umbra, _dir) = Process::run(
        &virtual_service(&[route_to("any", "/", backend.port(), "")]),
        "0.0.0.0:0",
        &[],
    );
    let warning = umbra.line("admin listener is not on loopback").await;
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("addr=0.0.0.0:"), "{warning}");
    umbra.terminate();
    assert_eq!(umbra.exit_code().await, Some(0), "{}", umbra.stderr());
}
