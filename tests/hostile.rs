//! Hostile input: request smuggling shapes, oversized heads, HTTP/2 abuse,
//! pipelining and Host attacks. None may panic umbra or desynchronise a
//! connection, and the backend must only ever see well-framed requests.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

async fn app() -> (Backend, Umbra) {
    let backend = Backend::start("app", |seen| {
        let mut response = http::Response::new(full(format!(
            "{} {} body={}",
            seen.method,
            seen.uri,
            String::from_utf8_lossy(&seen.body)
        )));
        response
            .headers_mut()
            .insert("x-backend", "app".parse().unwrap());
        response
    })
    .await;
    let yaml = single_route("app", backend.port());
    let umbra = Umbra::start(&yaml).await;
    (backend, umbra)
}

/// Writes raw bytes, then reads until umbra closes the connection (or the
/// patience runs out, which fails the test).
async fn exchange(umbra: &Umbra, raw: &[u8]) -> String {
    let mut stream = TcpStream::connect(umbra.addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("umbra closed the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_read_as_chunked_and_closed() {
    let (backend, umbra) = app().await;
    let raw = b"POST /a HTTP/1.1\r\nHost: app\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";
    let reply = exchange(&umbra, raw).await;
    assert_eq!(statuses(&reply), vec![200], "{reply}");
    let seen = backend.received();
    assert_eq!(
        seen.len(),
        1,
        "the smuggled request never reached the backend"
    );
    assert_eq!(&seen[0].body[..], b"hello");
    assert!(seen[0].header("content-length").is_none_or(|cl| cl == "5"));
}

#[tokio::test]
async fn malformed_framing_is_rejected_before_the_backend() {
    let (backend, umbra) = app().await;
    let cases: [&[u8]; 5] = [
        // Conflicting Content-Length values.
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        // Chunked is not the final coding.
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        // Malformed chunk size.
        b"POST / HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        // obs-fold in a request header.
        b"GET / HTTP/1.1\r\nHost: app\r\nX-Folded: a\r\n b\r\n\r\n",
        // Invalid Content-Length.
        b"POST / HTTP/1.1\r\nHost: app\r\nContent-Length: -1\r\n\r\n",
    ];
    for raw in cases {
        let reply = exchange(&umbra, raw).await;
        // A bad head is a 400; a body that breaks mid-stream can only abort
        // the exchange (400 or 502). Never a success.
        let codes = statuses(&reply);
        assert!(
            codes.iter().all(|&c| c == 400 || c == 502),
            "{}: {reply}",
            String::from_utf8_lossy(raw)
        );
    }
    assert_eq!(backend.count(), 0, "nothing malformed was forwarded");
}

#[tokio::test]
async fn bare_lf_requests_stay_in_sync() {
    let (backend, umbra) = app().await;
    let raw = b"GET /one HTTP/1.1\nHost: app\n\nGET /two HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n";
    let reply = exchange(&umbra, raw).await;
    let codes = statuses(&reply);
    // Either both parse (in order) or the first is refused and the
    // connection closed; never a response for a request nobody sent.
    if codes == vec![200, 200] {
        let seen: Vec<String> = backend
            .received()
            .iter()
            .map(|r| r.uri.to_string())
            .collect();
        assert_eq!(seen, vec!["/one", "/two"]);
    } else {
        assert_eq!(codes, vec![400], "{reply}");
        assert_eq!(backend.count(), 0);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_backend, umbra) = app().await;
    let mut raw = Vec::new();
    for i in 0..10 {
        raw.extend_from_slice(format!("GET /p{i} HTTP/1.1\r\nHost: app\r\n\r\n").as_bytes());
    }
    raw.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n");
    let reply = exchange(&umbra, &raw).await;
    assert_eq!(statuses(&reply).len(), 11, "{reply}");
    let order: Vec<usize> = (0..10)
        .map(|i| {
            reply
                .find(&format!("GET /p{i} body="))
                .expect("each response present")
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "responses in request order"
    );
    assert!(reply.rfind("GET /last").unwrap() > order[9]);
}

#[tokio::test]
async fn oversized_heads_get_431_or_414() {
    let (backend, umbra) = app().await;
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: app\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let reply = exchange(&umbra, long_uri.as_bytes()).await;
    let codes = statuses(&reply);
    assert!(codes == vec![431] || codes == vec![414], "{codes:?}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: app\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let reply = exchange(&umbra, many.as_bytes()).await;
    assert_eq!(statuses(&reply), vec![431], "too many headers");
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn host_attacks_are_refused() {
    let (backend, umbra) = app().await;
    // Absolute-form to another host: umbra is never an open proxy.
    let reply = exchange(
        &umbra,
        b"GET http://evil.example/ HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&reply), vec![404], "{reply}");
    assert!(reply.contains("x-umbra-error: no_route"));
    // Invalid ports and characters.
    for host in ["app:99999", "app:abc", "a pp", "app\\x"] {
        let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let reply = exchange(&umbra, raw.as_bytes()).await;
        assert_eq!(statuses(&reply), vec![400], "{host}: {reply}");
    }
    // Two Host lines (RFC 9112 §3.2), without a body and with one (the two
    // go through different servers), and under an absolute-form target.
    for raw in [
        &b"GET / HTTP/1.1\r\nHost: app\r\nHost: evil.example\r\nConnection: close\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: app\r\nHost: evil.example\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        b"GET http://app/ HTTP/1.1\r\nHost: app\r\nhost: app\r\nConnection: close\r\n\r\n",
    ] {
        let reply = exchange(&umbra, raw).await;
        assert_eq!(statuses(&reply), vec![400], "{reply}");
        assert!(reply.contains("x-umbra-error: invalid_host"), "{reply}");
    }
    assert_eq!(backend.count(), 0);
}

#[tokio::test]
async fn http2_host_naming_another_authority_is_refused() {
    // RFC 9113 §8.3.1: a Host that differs from `:authority` makes an
    // HTTP/2 request malformed; routing by one while the upstream reads
    // the other would let a client reach what its route does not allow.
    let (backend, umbra) = app().await;
    let h2 = |authority: &str, host: Option<&str>| {
        let mut request = Request::get(format!("http://{authority}/"));
        if let Some(host) = host {
            request = request.header("host", host);
        }
        h2_send(umbra.addr, request.body(empty()).unwrap())
    };
    let refused = h2("app", Some("evil.example")).await;
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(refused.headers()["x-umbra-error"], "invalid_host");
    assert_eq!(backend.count(), 0);
    // The same entity written another way is not a difference: the name's
    // case, and the scheme's default port.
    for (authority, host) in [("app", Some("APP")), ("app", Some("app:80")), ("app", None)] {
        let response = h2(authority, host).await;
        assert_eq!(response.status(), StatusCode::OK, "{authority} {host:?}");
    }
    assert_eq!(backend.count(), 3);
    let replies = umbra
        .metric("umbra_local_replies_total", &[("reason", "invalid_host")])
        .await;
    assert_eq!(replies, 1.0);
}

#[tokio::test]
async fn an_h2c_upgrade_offer_is_not_passed_upstream() {
    // h2c smuggling: an upstream that took the offer and switched would
    // serve every later request on the tunnel past umbra's routing. umbra
    // speaks cleartext HTTP/2 itself (prior knowledge), so the offer is
    // dropped and the request proxied as a plain one, as Envoy does.
    let (backend, umbra) = app().await;
    let reply = exchange(
        &umbra,
        b"GET /private HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&reply), vec![200], "{reply}");
    let seen = backend.wait_for(1).await;
    for name in ["upgrade", "http2-settings", "connection"] {
        assert!(
            !seen[0].headers.contains_key(name),
            "{name} reached the upstream: {:?}",
            seen[0].headers
        );
    }
    // Another protocol offered beside h2c still upgrades, without h2c.
    let mut both = get(&umbra.url("/"), "app");
    let headers = both.headers_mut();
    headers.insert("connection", "upgrade".parse().unwrap());
    headers.insert("upgrade", "h2c, echo".parse().unwrap());
    let (status, _, _) = send(both).await;
    assert_eq!(status, StatusCode::OK);
    let seen = backend.wait_for(2).await;
    assert_eq!(seen[1].headers["upgrade"], "echo");
}

#[tokio::test]
async fn connect_is_refused_not_tunnelled() {
    let (backend, umbra) = app().await;
    let reply = exchange(
        &umbra,
        b"CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(statuses(&reply), vec![405], "{reply}");
    assert!(reply.contains("x-umbra-error: connect_not_supported"));
    assert_eq!(backend.count(), 0);
    let replies = umbra
        .metric(
            "umbra_local_replies_total",
            &[("reason", "connect_not_supported")],
        )
        .await;
    assert_eq!(replies, 1.0);
}

#[tokio::test]
async fn client_supplied_shadow_host_is_just_a_host() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await;
    // No VirtualService claims httpbin-shadow: a 404, not a shadow request.
    let (status, headers, _) = fetch(&umbra.url("/"), "httpbin-shadow:8000").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-umbra-error"], "no_route");
    assert_eq!(v1.count() + v2.count(), 0);
    assert_eq!(umbra.metric("umbra_mirror_requests_total", &[]).await, 0.0);
}

#[tokio::test]
async fn http2_rapid_reset_is_bounded() {
    let (backend, umbra) = app().await;
    let stream = TcpStream::connect(umbra.addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(stream).await.unwrap();
    let driver = tokio::spawn(connection);
    // Open and immediately reset far more streams than umbra allows. The
    // connection may be torn down (GOAWAY) part way; either way umbra must
    // keep serving new connections.
    for _ in 0..2000 {
        let request = Request::get("http://app/").body(()).unwrap();
        let Ok((response, _)) = client.send_request(request, true) else {
            break;
        };
        drop(response);
        match tokio::time::timeout(Duration::from_millis(200), client.clone().ready()).await {
            Ok(Ok(ready)) => client = ready,
            _ => break,
        }
    }
    driver.abort();
    let (status, _, _) = fetch(&umbra.url("/after"), "app").await;
    assert_eq!(status, StatusCode::OK);
    assert!(backend.count() <= 2001);
}

#[tokio::test]
async fn http2_header_bomb_is_refused() {
    let (backend, umbra) = app().await;
    let mut request = Request::get("http://app/").body(empty()).unwrap();
    for i in 0..2000 {
        let name = http::HeaderName::try_from(format!("x-bomb-{i}")).unwrap();
        request
            .headers_mut()
            .append(name, "v".repeat(64).parse().unwrap());
    }
    let stream = TcpStream::connect(umbra.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let result = tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("answered in time");
    // Refused either with a 431 or by resetting the stream.
    if let Ok(response) = result {
        assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }
    assert_eq!(
        backend.count(),
        0,
        "an oversized header list never reaches the backend"
    );
    let (status, _, _) = fetch(&umbra.url("/"), "app").await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn many_concurrent_streams_are_capped_not_fatal() {
    let (_backend, umbra) = app().await;
    let stream = TcpStream::connect(umbra.addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let mut tasks = Vec::new();
    for i in 0..600 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let request = Request::get(format!("http://app/s{i}"))
                .body(full(Bytes::new()))
                .unwrap();
            sender.send_request(request).await.map(|r| r.status())
        }));
    }
    let mut ok = 0;
    for task in tasks {
        if let Ok(Ok(StatusCode::OK)) = task.await {
            ok += 1;
        }
    }
    assert_eq!(
        ok, 600,
        "streams over the limit wait for a slot instead of failing"
    );
}

/// umbra with a short send timeout and an access log, before a backend
/// whose `/endless` response never ends. Other paths get "ok".
struct EndlessApp {
    _backend: Backend,
    umbra: Umbra,
    /// Turns true once the `/endless` response's upstream exchange is cut.
    stopped: tokio::sync::watch::Receiver<bool>,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl EndlessApp {
    /// The one send-timeout cut shows in its counter, once in the
    /// downstream error family (counted when the response ended, as the
    /// log line was written) and in the access log.
    async fn assert_cut_once(&self, path: &str) {
        // Waited for first: the counters have moved by the time it is in.
        let line = self.line(path).await;
        assert!(line.contains("error=downstream_send_timeout"), "{line}");
        assert_eq!(self.umbra.metric(SEND_TIMEOUTS, &[]).await, 1.0);
        let reason = [("reason", "downstream_send_timeout")];
        let errors = self.umbra.metric("umbra_downstream_errors_total", &reason);
        assert_eq!(errors.await, 1.0);
    }

    /// The access-log line of the request for `path`, once written.
    async fn line(&self, path: &str) -> String {
        eventually(|| async {
            let text = std::fs::read_to_string(&self.log).ok()?;
            text.lines()
                .find(|line| line.contains(path))
                .map(str::to_owned)
        })
        .await
        .expect("the cut request is logged")
    }
}

async fn endless_app() -> EndlessApp {
    let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
    let stopped_tx = std::sync::Arc::new(stopped_tx);
    let backend = Backend::start("endless", move |seen| {
        // `/trickle`: 16 KiB at a time with a pause between, so the
        // response waits for its upstream after every chunk.
        let trickle = match seen.uri.path() {
            "/endless" => false,
            "/trickle" => true,
            _ => return http::Response::new(full("ok")),
        };
        let (sender, body) = channel_body();
        let stopped_tx = stopped_tx.clone();
        tokio::spawn(async move {
            let size = if trickle { 16 * 1024 } else { 64 * 1024 };
            let chunk = Bytes::from(vec![b'x'; size]);
            while sender.send(chunk.clone()).await.is_ok() {
                if trickle {
                    // The slow upstream under test, not a wait for an event.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            stopped_tx.send_replace(true);
        });
        http::Response::new(body)
    })
    .await;
    let yaml = single_route("app", backend.port());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let setup = Setup {
        access_log: Some(log.clone()),
        options: umbra::server::Options {
            header_read_timeout: Duration::from_millis(400),
            send_timeout: Duration::from_millis(400),
            ..Default::default()
        },
        ..Setup::default()
    };
    let umbra = Umbra::start_with(&yaml, setup).await;
    EndlessApp {
        _backend: backend,
        umbra,
        stopped,
        log,
        _dir: dir,
    }
}

const SEND_TIMEOUTS: &str = "umbra_downstream_send_timeouts_total";

/// A client that requests an endless response and never reads it (a slow
/// read attack) is cut after `send_timeout`, and so is the upstream
/// exchange feeding it: it cannot hold a backend connection for good.
#[tokio::test]
async fn a_client_not_reading_its_response_is_cut_with_the_upstream() {
    not_reading_is_cut("/endless").await;
}

/// The same when the response waits for its upstream after every chunk:
/// the write that blocks follows a poll of the body that found nothing.
#[tokio::test]
async fn a_client_not_reading_a_trickled_response_is_cut_with_the_upstream() {
    not_reading_is_cut("/trickle").await;
}

async fn not_reading_is_cut(path: &str) {
    let mut app = endless_app().await;
    let (umbra, stopped) = (&app.umbra, &mut app.stopped);
    let mut stream = TcpStream::connect(umbra.addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: app\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    // Never read: the socket buffers fill, then nothing moves.
    tokio::time::timeout(PATIENCE, stopped.wait_for(|stopped| *stopped))
        .await
        .expect("the stalled response's upstream exchange is cut")
        .unwrap();
    let mut sink = vec![0u8; 1024 * 1024];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client's connection is closed");
    assert_eq!(
        umbra
            .metric("umbra_downstream_idle_closed_total", &[])
            .await,
        0.0,
        "a stall is not idleness"
    );
    app.assert_cut_once(path).await;
    assert_eq!(umbra.metric("umbra_upstream_errors_total", &[]).await, 0.0);
}

/// Over HTTP/2 the client stalls one stream by granting it no more window
/// (its connection's window is wide open). That stream's upstream exchange
/// is cut after `send_timeout`, the stream is reset once the client reads
/// again (within another send timeout, or the connection is dropped), and
/// the connection's other streams are served meanwhile.
#[tokio::test]
async fn an_http2_stream_not_read_is_cut_and_the_connection_goes_on() {
    let mut app = endless_app().await;
    let (umbra, stopped) = (&app.umbra, &mut app.stopped);
    let stream = TcpStream::connect(umbra.addr).await.unwrap();
    let (mut client, connection) = h2::client::Builder::new()
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(stream)
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = |path: &str| Request::get(format!("http://app{path}")).body(()).unwrap();
    let (response, _) = client.send_request(request("/endless"), true).unwrap();
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("response head in time")
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Not read: the stream's 64 KiB window is used up, then nothing moves.
    let mut stalled = response.into_body();
    tokio::time::timeout(PATIENCE, stopped.wait_for(|stopped| *stopped))
        .await
        .expect("the stalled stream's upstream exchange is cut")
        .unwrap();
    assert_eq!(umbra.metric(SEND_TIMEOUTS, &[]).await, 1.0);

    let mut client = client.ready().await.unwrap();
    let (response, _) = client.send_request(request("/other"), true).unwrap();
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("another stream is served")
        .unwrap();
    let mut body = response.into_body();
    let chunk = body.data().await.unwrap().unwrap();
    assert_eq!(&chunk[..], b"ok");

    // Reading again gives window back: hyper then finds the body gone and
    // resets the stream.
    let mut received = 0;
    let ended = tokio::time::timeout(PATIENCE, async {
        while let Some(next) = stalled.data().await {
            match next {
                Ok(chunk) => {
                    received += chunk.len();
                    let _ = stalled.flow_control().release_capacity(chunk.len());
                }
                Err(error) => return Some(error),
            }
        }
        None
    })
    .await
    .expect("the stalled stream ends");
    let error = ended.expect("reset, not ended as if complete");
    assert!(error.is_reset(), "{error}");
    // The stream's window and a chunk or two, not an endless response.
    assert!(received <= 256 * 1024, "{received} bytes got through");
    // Once, though the stream was both cut and then reset.
    app.assert_cut_once("/endless").await;
}
