//! Upstream connection pooling: HTTP/1.1 connections are kept and reused
//! for primaries and shadows, closed after `maxRequestsPerConnection` and
//! `idleTimeout`, and a pooled connection the upstream has closed is never
//! used for a request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::support::*;

const MIRRORED: &str = "umbra_mirror_requests_total";
const MIRROR_INFLIGHT: &str = "umbra_mirror_inflight";

/// The seed mirror config with `policy` as the DestinationRule's
/// `trafficPolicy` (flow-style YAML).
fn with_policy(v1: u16, v2: u16, policy: &str) -> String {
    seed_mirror(v1, v2, "", 100.0).replace(
        "  host: httpbin\n  subsets:",
        &format!("  host: httpbin\n  trafficPolicy: {policy}\n  subsets:"),
    )
}

fn request(umbra: &Umbra, method: Method, body: &'static str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(umbra.url("/pooled"))
        .header("host", "httpbin:8000")
        .body(full(body))
        .unwrap()
}

#[tokio::test]
async fn primary_and_shadow_connections_are_reused() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await;
    let methods = [Method::GET, Method::POST, Method::HEAD, Method::PUT];
    for i in 0..20 {
        let method = methods[i % methods.len()].clone();
        let (status, headers, body) = send(request(&umbra, method.clone(), "payload")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["x-backend"], "v1");
        if method != Method::HEAD {
            assert_eq!(body, "v1");
        }
        // Shadows run on their own; the next one may only start once this
        // one is complete, or it would rightly need a second connection.
        umbra
            .wait_metric(MIRRORED, &[("outcome", "completed")], (i + 1) as f64)
            .await;
    }
    assert_eq!(v1.count(), 20);
    assert_eq!(v2.wait_for(20).await.len(), 20);
    assert_eq!(v1.connections(), 1, "primary connections");
    assert_eq!(v2.connections(), 1, "shadow connections");
}

/// Echo backends v1 and v2 and umbra mirroring every request, on two
/// worker threads.
async fn mirrored_on_two_workers() -> (Backend, Backend, Umbra) {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let setup = Setup {
        options: umbra::server::Options {
            workers: 2,
            ..Default::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&seed_mirror(v1.port(), v2.port(), "", 100.0), setup).await;
    (v1, v2, umbra)
}

/// With worker threads, each keeps its own idle connections: requests on
/// one client connection (served by one worker) reuse one upstream
/// connection, and many client connections are all served.
#[tokio::test]
async fn worker_threads_keep_their_own_pools() {
    let (v1, v2, umbra) = mirrored_on_two_workers().await;
    let client = client();
    for _ in 0..10 {
        let response = client
            .request(request(&umbra, Method::GET, ""))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        assert_eq!(body.to_bytes(), "v1");
    }
    assert_eq!(
        v1.connections(),
        1,
        "one client connection, one upstream connection"
    );
    let fresh: Vec<_> = (0..20)
        .map(|_| {
            let url = umbra.url("/");
            tokio::spawn(async move { fetch(&url, "httpbin:8000").await })
        })
        .collect();
    for fetched in fresh {
        assert_eq!(fetched.await.unwrap().0, StatusCode::OK);
    }
    assert_eq!(v1.count(), 30);
    assert_eq!(v2.wait_for(30).await.len(), 30);
}

/// Connections are spread evenly over the worker threads, however the
/// accepting threads race: no worker serves two more than another.
#[tokio::test]
async fn worker_threads_share_connections_evenly() {
    let (_v1, _v2, umbra) = mirrored_on_two_workers().await;
    // Workers are capped at the CPU count: on one CPU the check is only
    // that the one worker serves all twelve.
    let workers = umbra::server::cpus().min(2);
    let mut open = Vec::new();
    for _ in 0..12 {
        open.push(on_new_connection(&umbra, "httpbin:8000").await);
    }
    let metrics = umbra.metrics().await;
    let served: Vec<f64> = (1..=workers)
        .map(|worker| {
            let worker = worker.to_string();
            metric_value(
                &metrics,
                "umbra_downstream_connections",
                &[("worker", &worker)],
            )
        })
        .collect();
    assert_eq!(served.iter().sum::<f64>(), 12.0, "{served:?}");
    let (most, fewest) = served
        .iter()
        .fold((0.0f64, f64::MAX), |(hi, lo), &n| (hi.max(n), lo.min(n)));
    assert!(most - fewest <= 2.0, "uneven: {served:?}");
    drop(open);
}

/// Worker threads serve every listener, and stop with the server.
#[tokio::test]
async fn worker_threads_serve_every_listener() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let setup = Setup {
        second_listener: true,
        options: umbra::server::Options {
            workers: 2,
            ..Default::default()
        },
        ..Setup::default()
    };
    let mut umbra = Umbra::start_with(&seed_mirror(v1.port(), v2.port(), "", 100.0), setup).await;
    let second = format!("http://{}/", umbra.second.unwrap());
    for url in [umbra.url("/"), second] {
        for _ in 0..5 {
            let (status, _, body) = fetch(&url, "httpbin:8000").await;
            assert_eq!(status, StatusCode::OK, "{url}");
            assert_eq!(body, "v1");
        }
    }
    assert_eq!(v2.wait_for(10).await.len(), 10);
    umbra.shutdown().await;
    assert!(tokio::net::TcpStream::connect(umbra.addr).await.is_err());
}

#[tokio::test]
async fn max_requests_per_connection_is_enforced() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let yaml = with_policy(
        v1.port(),
        v2.port(),
        "{connectionPool: {http: {maxRequestsPerConnection: 2}}}",
    );
    let umbra = Umbra::start(&yaml).await;
    for i in 0..6 {
        let (status, _, _) = send(request(&umbra, Method::GET, "")).await;
        assert_eq!(status, StatusCode::OK);
        umbra
            .wait_metric(MIRRORED, &[("outcome", "completed")], (i + 1) as f64)
            .await;
    }
    assert_eq!(v1.connections(), 3, "primary: 6 requests, 2 per connection");
    assert_eq!(v2.connections(), 3, "shadow: 6 requests, 2 per connection");
    let closed = eventually(|| async { (v1.closed_connections() == 3).then_some(()) }).await;
    assert!(
        closed.is_some(),
        "umbra closes each connection after its 2nd request"
    );
}

#[tokio::test]
async fn idle_connections_close_after_idle_timeout() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let yaml = with_policy(
        v1.port(),
        v2.port(),
        "{connectionPool: {http: {idleTimeout: 50ms}}}",
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, _, _) = send(request(&umbra, Method::GET, "")).await;
    assert_eq!(status, StatusCode::OK);
    let closed = eventually(|| async {
        (v1.closed_connections() == 1 && v2.closed_connections() == 1).then_some(())
    })
    .await;
    assert!(
        closed.is_some(),
        "idle connections still open: v1 {} closed of {}, v2 {} of {}",
        v1.closed_connections(),
        v1.connections(),
        v2.closed_connections(),
        v2.connections()
    );
    // A new request after that simply opens a new connection.
    let (status, _, _) = send(request(&umbra, Method::GET, "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(v1.connections(), 2);
}

/// An upstream that answers each connection's first request as keep-alive
/// (no `Connection: close`), then closes the connection anyway and reports
/// it: a keep-alive timeout of zero, as some servers and load balancers do.
async fn closes_after_each_response() -> (u16, mpsc::UnboundedReceiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (closed, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            drop(stream);
            // On loopback the FIN is queued at umbra's socket by now.
            let _ = closed.send(());
        }
    });
    (port, rx)
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    let (port, mut closed) = closes_after_each_response().await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: closer}}\nspec:\n  hosts: [closer]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let umbra = Umbra::start(&yaml).await;
    for _ in 0..5 {
        let (status, headers, body) = fetch(&umbra.url("/"), "closer").await;
        assert_eq!(status, StatusCode::OK, "{headers:?}");
        assert_eq!(body, "ok");
        closed.recv().await.unwrap();
    }
}

/// A raw upstream on 127.0.0.1:0: on each connection it reads a request
/// head, writes `answer`, then hands the stream to `then`. Returns its port.
async fn raw_upstream<F, Fut>(answer: &'static [u8], then: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let then = std::sync::Arc::new(then);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let then = then.clone();
            tokio::spawn(async move {
                read_head(&mut stream).await;
                if stream.write_all(answer).await.is_ok() {
                    then(stream).await;
                }
            });
        }
    });
    port
}

#[tokio::test]
async fn an_upload_answered_early_does_not_hold_the_client() {
    use tokio::io::AsyncReadExt;
    // An upstream that refuses uploads as soon as it has the head, never
    // reading the body, and keeps the connection open.
    let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
    let port = raw_upstream(answer, |stream| async move {
        std::future::pending::<()>().await;
        drop(stream);
    })
    .await;
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: up}}\nspec:\n  hosts: [up]\n  http:\n  - route: [{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}]\n"
    );
    let umbra = Umbra::start(&yaml).await;
    let mut client = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    client
        .write_all(b"POST / HTTP/1.1\r\nHost: up\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    client.write_all(&[b'x'; 16 * 1024]).await.unwrap();
    // The 413 arrives; the rest of the body never will. umbra must let go
    // of the half-sent upload (the upstream connection is not reusable) so
    // the client connection is closed, not left waiting for its body.
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, client.read_to_end(&mut received)).await;
    let text = String::from_utf8_lossy(&received);
    assert!(read.is_ok(), "client connection still held: {text}");
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
}

const PENDING: &str = "umbra_upstream_pending_requests";

/// A backend whose responses send their head and a first chunk at once and
/// end only once `gate` opens: each keeps its connection busy until then.
async fn held(name: &str, gate: watch::Receiver<bool>) -> Backend {
    held_with(name, false, gate).await
}

/// `held`, over prior-knowledge HTTP/2 when `http2`.
async fn held_with(name: &str, http2: bool, gate: watch::Receiver<bool>) -> Backend {
    Backend::start_with(name, http2, move |_| Response::new(held_body(gate.clone()))).await
}

/// Host `cb` routed straight to `port`, with `policy` as the
/// DestinationRule's `trafficPolicy`; paths under `/timed` have a 300 ms
/// route timeout.
fn capped(port: u16, policy: &str) -> String {
    let destination = format!("{{destination: {{host: 127.0.0.1, port: {{number: {port}}}}}}}");
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: cb}}\nspec:\n  hosts: [cb]\n  http:\n  - match: [{{uri: {{prefix: /timed}}}}]\n    timeout: 300ms\n    route: [{destination}]\n  - route: [{destination}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: cb}}\nspec:\n  host: 127.0.0.1\n  trafficPolicy: {policy}\n"
    )
}

async fn body_text(response: Response<Incoming>) -> Bytes {
    response.into_body().collect().await.unwrap().to_bytes()
}

/// A `held` v1 behind umbra with `policy`, and a first response (to `/a`)
/// that keeps its connection busy until the returned sender opens the gate.
async fn first_held(policy: &str) -> (watch::Sender<bool>, Backend, Umbra, Response<Incoming>) {
    let (open, gate) = watch::channel(false);
    let v1 = held("v1", gate).await;
    let umbra = Umbra::start(&capped(v1.port(), policy)).await;
    let first = client().request(get(&umbra.url("/a"), "cb")).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    (open, v1, umbra, first)
}

#[tokio::test]
async fn past_max_connections_requests_wait_for_a_connection_then_overflow() {
    // Envoy's circuit breaker: with `maxConnections: 1` a second request
    // waits (pending) for the busy connection, and past
    // `http1MaxPendingRequests: 1` a third is refused at once.
    let policy = "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}";
    let (open, v1, umbra, first) = first_held(policy).await;
    let second = tokio::spawn(client().request(get(&umbra.url("/b"), "cb")));
    umbra.wait_metric(PENDING, &[], 1.0).await;
    let (status, headers, _) = fetch(&umbra.url("/c"), "cb").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-umbra-error"], "upstream_overflow");
    assert_eq!(v1.count(), 1, "the waiting request is not sent yet");

    // The first response's connection stays busy until its body ends.
    open.send(true).unwrap();
    assert_eq!(body_text(first).await, "head-end");
    let second = second.await.unwrap().unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    assert_eq!(body_text(second).await, "head-end");
    assert_eq!(umbra.metric(PENDING, &[]).await, 0.0);
    let paths: Vec<String> = v1.received().iter().map(|r| r.uri.to_string()).collect();
    assert_eq!(paths, ["/a", "/b"], "the refused request never reached v1");
    assert_eq!(v1.connections(), 1, "one connection carried both");
}

/// Envoy also counts a request as pending while a connection is dialled
/// for it: here the dial hangs (the backend's accept queue is full, so the
/// kernel drops umbra's SYN) until the route timeout.
#[tokio::test]
async fn a_request_waiting_for_its_connection_to_be_dialled_is_pending() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let port = listener.local_addr().unwrap().port();
    // Never accepted: with two in its queue, a backlog of 1 is full.
    let mut queued = Vec::new();
    for _ in 0..2 {
        queued.push(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        );
    }
    let umbra = Umbra::start(&capped(port, "{}")).await;
    let url = umbra.url("/timed");
    let request = tokio::spawn(async move { fetch(&url, "cb").await });
    umbra.wait_metric(PENDING, &[], 1.0).await;
    let (status, headers, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-umbra-error"], "upstream_timeout");
    assert_eq!(
        umbra.metric(PENDING, &[]).await,
        0.0,
        "the guard went with the dial"
    );
    drop((listener, queued));
}

#[tokio::test]
async fn a_request_waiting_for_a_connection_times_out_with_the_route() {
    let policy = "{connectionPool: {tcp: {maxConnections: 1}}}";
    let (_open, v1, umbra, _first) = first_held(policy).await;
    let (status, headers, _) = fetch(&umbra.url("/timed"), "cb").await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(headers["x-umbra-error"], "upstream_timeout");
    assert_eq!(v1.count(), 1, "the timed-out request was never sent");
    assert_eq!(umbra.metric(PENDING, &[]).await, 0.0);
}

#[tokio::test]
async fn past_http2_max_requests_requests_are_refused_at_once() {
    // `http2MaxRequests` caps active requests (both protocols): Envoy
    // refuses past it instead of queueing.
    let policy = "{connectionPool: {http: {http2MaxRequests: 1, http1MaxPendingRequests: 5}}}";
    let (open, _v1, umbra, first) = first_held(policy).await;
    let (status, headers, _) = fetch(&umbra.url("/b"), "cb").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-umbra-error"], "upstream_overflow");
    assert_eq!(umbra.metric(PENDING, &[]).await, 0.0, "nothing waited");
    open.send(true).unwrap();
    assert_eq!(body_text(first).await, "head-end");
    let (status, _, body) = fetch(&umbra.url("/c"), "cb").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"head-end"[..]));
}

#[tokio::test]
async fn a_mirror_targets_max_connections_caps_its_shadows() {
    // v2's DestinationRule allows one connection: one shadow on the wire,
    // one waiting, the third dropped and counted; the primaries never wait.
    let v1 = Backend::echo("v1").await;
    let (open, gate) = watch::channel(false);
    let v2 = held("v2", gate).await;
    let policy = "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}";
    let yaml = seed_mirror(v1.port(), v2.port(), "", 100.0).replace(
        "  - name: v2\n",
        &format!("  - name: v2\n    trafficPolicy: {policy}\n"),
    );
    assert!(yaml.contains("maxConnections"), "{yaml}");
    let umbra = Umbra::start(&yaml).await;
    for expected in 1..=3 {
        let (status, _, body) = send(request(&umbra, Method::GET, "")).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
        // The first on the wire, the second waiting, the third refused.
        umbra
            .wait_metric(MIRROR_INFLIGHT, &[], expected.min(2) as f64)
            .await;
    }
    umbra
        .wait_metric(MIRRORED, &[("outcome", "dropped_overload")], 1.0)
        .await;
    assert_eq!(umbra.metric(MIRRORED, &[("outcome", "sent")]).await, 1.0);
    open.send(true).unwrap();
    umbra
        .wait_metric(MIRRORED, &[("outcome", "completed")], 2.0)
        .await;
    assert_eq!(v2.count(), 2);
    assert_eq!(v2.connections(), 1);
}

#[tokio::test]
async fn an_upgraded_connection_holds_its_place_until_the_tunnel_closes() {
    // An upstream that switches every connection to an echo protocol.
    let switch =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n";
    let port = raw_upstream(switch, |mut stream| async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
    })
    .await;
    let policy = "{connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}}";
    let umbra = Umbra::start(&capped(port, policy)).await;
    let upgrade = || async {
        let mut client = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
        client
            .write_all(
                b"GET /chat HTTP/1.1\r\nHost: cb\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        client
    };
    let mut first = upgrade().await;
    assert!(read_head(&mut first).await.starts_with("HTTP/1.1 101"));
    let mut second = upgrade().await;
    umbra.wait_metric(PENDING, &[], 1.0).await;
    let mut third = upgrade().await;
    let refused = read_head(&mut third).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("x-umbra-error: upstream_overflow"),
        "{refused}"
    );
    // Closing the first tunnel frees its place for the second.
    drop(first);
    assert!(read_head(&mut second).await.starts_with("HTTP/1.1 101"));
    second.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_exact(&mut second, &mut echoed),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(&echoed, b"ping");
}

#[tokio::test]
async fn max_requests_per_connection_renews_http2_connections() {
    let v1 = Backend::start_with("v1", true, |_| Response::new(full("v1"))).await;
    let policy =
        "{connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxRequestsPerConnection: 2}}}";
    let umbra = Umbra::start(&capped(v1.port(), policy)).await;
    for _ in 0..6 {
        let (status, _, body) = fetch(&umbra.url("/"), "cb").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
    }
    assert!(v1
        .received()
        .iter()
        .all(|r| r.version == http::Version::HTTP_2));
    assert_eq!(v1.connections(), 3, "6 requests, 2 per connection");
    let closed = eventually(|| async { (v1.closed_connections() == 2).then_some(()) }).await;
    assert!(closed.is_some(), "the two used-up connections close");
}

#[tokio::test]
async fn http2_max_requests_caps_streams_on_an_http2_upstream() {
    // Over HTTP/2 the cap counts streams, not connections: two requests
    // share v1's one connection, a third is refused at once.
    let (open, gate) = watch::channel(false);
    let v1 = held_with("v1", true, gate).await;
    let policy = "{connectionPool: {http: {h2UpgradePolicy: UPGRADE, http2MaxRequests: 2}}}";
    let umbra = Umbra::start(&capped(v1.port(), policy)).await;
    let first = client().request(get(&umbra.url("/a"), "cb")).await.unwrap();
    let second = client().request(get(&umbra.url("/b"), "cb")).await.unwrap();
    assert_eq!(
        (first.status(), second.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    let (status, headers, _) = fetch(&umbra.url("/c"), "cb").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["x-umbra-error"], "upstream_overflow");
    open.send(true).unwrap();
    assert_eq!(body_text(first).await, "head-end");
    assert_eq!(body_text(second).await, "head-end");
    let (status, _, body) = fetch(&umbra.url("/d"), "cb").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"head-end"[..]));
    let paths: Vec<String> = v1
        .received()
        .iter()
        .map(|r| r.uri.path().to_string())
        .collect();
    assert_eq!(
        paths,
        ["/a", "/b", "/d"],
        "the refused request never reached v1"
    );
    assert_eq!(v1.connections(), 1, "the streams shared one connection");
}

#[tokio::test]
async fn retries_keep_the_place_they_were_admitted_with() {
    // With one connection allowed and nobody else waiting, a retry that
    // asked for a second place would wait for itself until the route's
    // timeout; it must reuse the first attempt's.
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    let v1 = Backend::start("v1", move |_| {
        let status = if seen.fetch_add(1, Ordering::SeqCst) < 2 {
            503
        } else {
            200
        };
        let mut response = Response::new(full("v1"));
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        response
    })
    .await;
    let yaml = capped(v1.port(), "{connectionPool: {tcp: {maxConnections: 1}}}").replace(
        "    timeout: 300ms\n",
        "    timeout: 300ms\n    retries: {attempts: 3, retryOn: 5xx}\n",
    );
    let umbra = Umbra::start(&yaml).await;
    let (status, headers, body) = fetch(&umbra.url("/timed"), "cb").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"v1"[..]),
        "{headers:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two retries");
    // Each retried 503's connection is closed (its body unread), as
    // Envoy resets the upstream stream it retries.
    assert_eq!(v1.connections(), 3);
    assert_eq!(umbra.metric(PENDING, &[]).await, 0.0);
}

/// Sends one GET for `host` on its own new client connection, which it
/// returns open, so the next such connection is accepted by the other
/// worker thread.
async fn on_new_connection(
    umbra: &Umbra,
    host: &str,
) -> hyper::client::conn::http1::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/")
        .header("host", host)
        .body(empty())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    sender
}

/// umbra on two worker threads routing host `cb` to v1 under `policy`.
async fn capped_on_two_workers(v1: &Backend, policy: &str) -> Umbra {
    let setup = Setup {
        options: umbra::server::Options {
            workers: 2,
            ..Default::default()
        },
        ..Setup::default()
    };
    Umbra::start_with(&capped(v1.port(), policy), setup).await
}

#[tokio::test]
async fn max_connections_counts_idle_connections_of_every_worker() {
    // Envoy's `maxConnections` caps open connections, idle ones included.
    // Each worker keeps its own idle connections; at the cap a worker with
    // none borrows another's instead of dialling a second one. Three
    // client connections, held open, cannot all land on one worker
    // (connections are kept within two of even).
    let v1 = Backend::echo("v1").await;
    let umbra = capped_on_two_workers(&v1, "{connectionPool: {tcp: {maxConnections: 1}}}").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(on_new_connection(&umbra, "cb").await);
    }
    let metrics = umbra.metrics().await;
    let on = |worker| {
        metric_value(
            &metrics,
            "umbra_downstream_connections",
            &[("worker", worker)],
        )
    };
    if umbra::server::cpus() >= 2 {
        assert!(
            on("1") >= 1.0 && on("2") >= 1.0,
            "both workers served: {metrics}"
        );
    }
    assert_eq!(v1.connections(), 1, "one connection served both workers");
}

#[tokio::test]
async fn max_connections_does_not_churn_connections_between_workers() {
    // Places freed on one worker are often taken by a request waiting on
    // the other: it must reuse the idle connection, not close it and dial.
    let v1 = Backend::echo("v1").await;
    let umbra = capped_on_two_workers(&v1, "{connectionPool: {tcp: {maxConnections: 2}}}").await;
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = umbra.url("/");
            tokio::spawn(async move {
                let client = client();
                for _ in 0..20 {
                    let response = client.request(get(&url, "cb")).await.unwrap();
                    assert_eq!(response.status(), StatusCode::OK);
                    response.into_body().collect().await.unwrap();
                }
            })
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    assert_eq!(v1.count(), 320);
    let dialled = v1.connections();
    assert!(
        dialled <= 6,
        "{dialled} connections dialled for 320 requests"
    );
}

/// Host `pair`: a ServiceEntry with endpoints on `ports` (round robin, in
/// that order), its DestinationRule's `trafficPolicy` and the route's
/// `retries`.
fn pair(ports: &[u16], policy: &str, retries: &str) -> String {
    let endpoints: String = (ports.iter())
        .map(|port| format!("  - {{address: 127.0.0.1, ports: {{http: {port}}}}}\n"))
        .collect();
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pair}}
spec:
  hosts: [pair]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
{endpoints}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pair}}
spec:
  host: pair
  trafficPolicy: {policy}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: pair}}
spec:
  hosts: [pair]
  http:
  - route: [{{destination: {{host: pair}}}}]
    retries: {retries}
"#
    )
}

/// Istio's `maxRetries` (Envoy's `max_retries` circuit breaker): with
/// that many retries outstanding, a further failed try stands and is
/// counted as an overflow. The first request's retry goes to an endpoint
/// that never answers, so it stays outstanding.
#[tokio::test]
async fn past_max_retries_a_failed_try_stands() {
    let busy = Backend::status("busy", 503).await;
    let hole = Blackhole::start().await;
    let policy = "{connectionPool: {http: {maxRetries: 1}}}";
    let yaml = pair(
        &[busy.port(), hole.addr.port()],
        policy,
        "{attempts: 1, retryOn: \"503\"}",
    );
    let umbra = Umbra::start(&yaml).await;
    let url = umbra.url("/first");
    let first = tokio::spawn(async move { fetch(&url, "pair").await });
    hole.wait_accepted(1).await;
    let (status, headers, body) = fetch(&umbra.url("/second"), "pair").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(headers.get("x-umbra-error").is_none(), "the upstream's 503");
    assert_eq!(body, "status 503");
    assert_eq!(busy.count(), 2, "each request tried once on it");
    const RETRIES: &str = "umbra_upstream_retries_total";
    assert_eq!(umbra.metric(RETRIES, &[("result", "retried")]).await, 1.0);
    assert_eq!(umbra.metric(RETRIES, &[("result", "overflow")]).await, 1.0);
    first.abort();
}

/// `maxRetries` counts retries outstanding: a request's retry is over once
/// its try has failed, so it holds no place against the request's next
/// retry (Envoy releases it before checking the next).
#[tokio::test]
async fn a_finished_retry_leaves_max_retries_to_the_next() {
    let a = Backend::status("a", 503).await;
    let b = Backend::status("b", 503).await;
    let policy = "{connectionPool: {http: {maxRetries: 1}}}";
    let retries = "{attempts: 2, retryOn: \"503\"}";
    let umbra = Umbra::start(&pair(&[a.port(), b.port()], policy, retries)).await;
    let (status, _, _) = fetch(&umbra.url("/"), "pair").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.count() + b.count(), 3, "the first try and both retries");
    const RETRIES: &str = "umbra_upstream_retries_total";
    assert_eq!(umbra.metric(RETRIES, &[("result", "retried")]).await, 2.0);
    assert_eq!(umbra.metric(RETRIES, &[("result", "overflow")]).await, 0.0);
}

/// A request body the client breaks is no fault of the endpoint it was
/// going to: the failed exchange does not count towards ejecting it.
#[tokio::test]
async fn a_broken_request_body_does_not_eject_the_endpoint() {
    use tokio::io::AsyncReadExt;
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let policy = "{outlierDetection: {consecutiveGatewayErrors: 1, maxEjectionPercent: 100}}";
    let umbra = Umbra::start(&pair(&[a.port(), b.port()], policy, "{attempts: 0}")).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    // Not a chunk size after the first chunk: hyper fails the body
    // mid-exchange, on the way to the first endpoint.
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: pair\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut reply))
        .await
        .expect("umbra answers and closes")
        .unwrap();
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply}");
    for _ in 0..4 {
        assert_eq!(fetch(&umbra.url("/"), "pair").await.0, StatusCode::OK);
    }
    assert_eq!((a.count(), b.count()), (2, 2), "both endpoints still in");
    let labels = [("destination", "pair||")];
    assert_eq!(
        umbra
            .metric("umbra_upstream_ejections_total", &labels)
            .await,
        0.0
    );
}

/// `outlierDetection` ejects the endpoint that fails in a row from load
/// balancing (Envoy's consecutive 5xx); at most `maxEjectionPercent` of
/// them, so with both failing one stays in, and with Istio's 10% of two
/// none goes (Envoy ejects one only if it keeps within the percentage).
#[tokio::test]
async fn outlier_detection_ejects_an_endpoint_failing_in_a_row() {
    let failing = Backend::status("failing", 500).await;
    let healthy = Backend::echo("healthy").await;
    let policy = "{outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1h, maxEjectionPercent: 50}}";
    let no_retries = "{attempts: 0}";
    let umbra = Umbra::start(&pair(&[failing.port(), healthy.port()], policy, no_retries)).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(fetch(&umbra.url("/"), "pair").await.0.as_u16());
    }
    assert_eq!(statuses, [500, 200, 500, 200, 200, 200, 200, 200, 200, 200]);
    assert_eq!(failing.count(), 2, "ejected after its second 500 in a row");
    let labels = [("destination", "pair||")];
    assert_eq!(umbra.metric("umbra_upstream_ejected", &labels).await, 1.0);
    let ejections = "umbra_upstream_ejections_total";
    assert_eq!(umbra.metric(ejections, &labels).await, 1.0);

    // Both failing: 50% of two ejects one, never both.
    let other = Backend::status("other", 503).await;
    let policy = "{outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 50}}";
    let umbra = Umbra::start(&pair(&[failing.port(), other.port()], policy, no_retries)).await;
    for _ in 0..6 {
        let (status, headers, _) = fetch(&umbra.url("/"), "pair").await;
        assert!(status.is_server_error() && headers.get("x-umbra-error").is_none());
    }
    assert_eq!(umbra.metric("umbra_upstream_ejected", &labels).await, 1.0);

    // The default 10% of two is none: both stay in, as in Envoy.
    let policy = "{outlierDetection: {consecutive5xxErrors: 1}}";
    let umbra = Umbra::start(&pair(&[failing.port(), healthy.port()], policy, no_retries)).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(fetch(&umbra.url("/"), "pair").await.0.as_u16());
    }
    assert_eq!(statuses, [500, 200, 500, 200]);
    assert_eq!(umbra.metric(ejections, &labels).await, 0.0);

    // With one of three out, the other two share its traffic evenly.
    let second = Backend::echo("second").await;
    let policy = "{outlierDetection: {consecutive5xxErrors: 1, maxEjectionPercent: 100}}";
    let ports = [failing.port(), healthy.port(), second.port()];
    let umbra = Umbra::start(&pair(&ports, policy, no_retries)).await;
    let (status, _, _) = fetch(&umbra.url("/"), "pair").await;
    assert_eq!(status.as_u16(), 500, "the first goes to the failing one");
    let (before, before_second) = (healthy.count(), second.count());
    for _ in 0..12 {
        let (status, _, _) = fetch(&umbra.url("/"), "pair").await;
        assert_eq!(status, StatusCode::OK);
    }
    let shares = (healthy.count() - before, second.count() - before_second);
    assert_eq!(
        shares,
        (6, 6),
        "not all of the ejected one's share to its neighbour"
    );
}
