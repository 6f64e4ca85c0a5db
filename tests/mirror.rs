//! Mirroring: Envoy/Istio semantics, and the isolation property: a slow,
//! dead or misbehaving shadow never slows, breaks or bloats the primary.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};

use crate::support::*;
use umbra::proxy::MirrorLimits;

const SENT: &str = "umbra_mirror_requests_total";
const EJECTED: &str = "umbra_mirror_ejected";
const EJECTIONS: &str = "umbra_mirror_ejections_total";

fn outcome(name: &'static str) -> [(&'static str, &'static str); 1] {
    [("outcome", name)]
}

/// Shadows per target: `per_target` on the wire, `queued` more waiting.
fn shadow_caps(per_target: usize, queued: usize) -> Setup {
    Setup {
        limits: MirrorLimits {
            per_target,
            queued_per_target: queued,
            ..MirrorLimits::default()
        },
        ..Setup::default()
    }
}

#[tokio::test]
async fn seed_walkthrough_mirrors_with_shadow_host() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await;
    let request = Request::get(umbra.url("/headers"))
        .header("host", "httpbin:8000")
        .header("x-custom", "kept")
        .body(empty())
        .unwrap();
    let (status, headers, body) = send(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"v1", "the client only ever sees v1");
    assert_eq!(headers["x-backend"], "v1");

    let shadow = v2.wait_for(1).await.remove(0);
    let primary = v1.received().remove(0);
    assert_eq!(v1.count(), 1, "v1 never sees the shadow copy");
    assert_eq!(primary.header("host"), Some("httpbin:8000"));
    assert_eq!(shadow.header("host"), Some("httpbin-shadow:8000"));
    assert_eq!(shadow.method, primary.method);
    assert_eq!(shadow.uri, primary.uri);
    let mut expected = primary.headers.clone();
    expected.insert("host", "httpbin-shadow:8000".parse().unwrap());
    assert_eq!(shadow.headers, expected, "everything but Host is equal");
    umbra.wait_metric(SENT, &outcome("completed"), 1.0).await;
}

#[tokio::test]
async fn ten_percent_is_mirrored() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 10.0)).await;
    let total = 2000;
    for _ in 0..total {
        fetch(&umbra.url("/"), "httpbin").await;
    }
    // Skips are counted as the request is decided; `sent` once each
    // shadow task puts its request on the wire.
    let skipped = umbra.metric(SENT, &outcome("skipped_sampling")).await;
    let sent = umbra
        .wait_metric(SENT, &outcome("sent"), total as f64 - skipped)
        .await;
    assert_eq!(sent + skipped, total as f64);
    // Binomial(2000, 0.1): mean 200, σ ≈ 13.4; ±6σ.
    assert!(
        (120.0..=280.0).contains(&sent),
        "mirrored {sent} of {total}"
    );
    v2.wait_for(sent as usize).await;
    assert_eq!(v2.count(), sent as usize, "every sampled mirror arrives");
}

fn two_mirrors(v1: u16, v2: u16, v3: u16, annotations: &str) -> String {
    let extra = format!(
        r#"    mirrors:
    - destination: {{host: httpbin, subset: v2, port: {{number: 8000}}}}
      percentage: {{value: 50}}
    - destination: {{host: 127.0.0.1, port: {{number: {v3}}}}}
      percentage: {{value: 50}}
"#
    );
    seed(v1, v2, annotations, &extra)
}

async fn overlap_of_two_mirrors(annotations: &str) -> (usize, usize, usize) {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let v3 = Backend::echo("v3").await;
    let umbra = Umbra::start(&two_mirrors(v1.port(), v2.port(), v3.port(), annotations)).await;
    let total = 1000;
    for i in 0..total {
        let request = Request::get(umbra.url("/"))
            .header("host", "httpbin")
            .header("x-request-id", format!("req-{i}"))
            .body(empty())
            .unwrap();
        send(request).await;
    }
    // Every admitted shadow has ended, so `sent` is final.
    eventually(|| async {
        (umbra.metric("umbra_mirror_inflight", &[]).await == 0.0).then_some(())
    })
    .await;
    let sent = umbra.metric(SENT, &outcome("sent")).await as usize;
    let both_done = eventually(|| async { (v2.count() + v3.count() == sent).then_some(()) }).await;
    assert!(both_done.is_some(), "all {sent} mirrors arrived");
    let ids = |b: &Backend| -> std::collections::HashSet<String> {
        b.received()
            .iter()
            .map(|r| r.header("x-request-id").unwrap().to_string())
            .collect()
    };
    let (a, b) = (ids(&v2), ids(&v3));
    (a.len(), b.len(), a.intersection(&b).count())
}

#[tokio::test]
async fn mirrors_sample_independently() {
    let (a, b, both) = overlap_of_two_mirrors("").await;
    // Independent 50% samples of 1000 overlap ~250 (σ ≈ 13.7), never ~500.
    assert!(
        (400..=600).contains(&a) && (400..=600).contains(&b),
        "{a} {b}"
    );
    assert!((160..=340).contains(&both), "overlap {both}");
}

#[tokio::test]
async fn request_id_sampling_sends_the_same_requests_everywhere() {
    let (a, b, both) = overlap_of_two_mirrors("umbra.io/mirror-sampling: request-id").await;
    assert!((400..=600).contains(&a), "{a}");
    assert_eq!(a, b);
    assert_eq!(both, a, "the same ids went to both mirrors");
}

#[tokio::test]
async fn bodies_are_mirrored_byte_for_byte() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let annotations = "umbra.io/mirror-max-body-bytes: '8388608'";
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), annotations, 100.0)).await;

    let small = Request::put(umbra.url("/put"))
        .header("host", "httpbin")
        .body(full("hello shadow"))
        .unwrap();
    send(small).await;
    assert_eq!(&v2.wait_for(1).await[0].body[..], b"hello shadow");

    // 4 MiB, streamed in 64 KiB chunks with no Content-Length.
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let chunks = payload
        .chunks(64 * 1024)
        .map(Bytes::copy_from_slice)
        .collect();
    let big = Request::post(umbra.url("/upload"))
        .header("host", "httpbin")
        .body(chunked_body(chunks))
        .unwrap();
    let (status, _, _) = send(big).await;
    assert_eq!(status, StatusCode::OK);
    let shadow = v2.wait_for(2).await.remove(1);
    assert_eq!(shadow.body.len(), payload.len());
    assert!(
        shadow.body[..] == payload[..],
        "shadow body is byte-identical"
    );
    assert!(v1.received()[1].body[..] == payload[..]);
}

#[tokio::test]
async fn body_over_the_cap_aborts_the_shadow_not_the_primary() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let annotations = "umbra.io/mirror-max-body-bytes: '1024'";
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), annotations, 100.0)).await;

    // Known length over the cap: skipped before any shadow connection.
    let sized = Request::post(umbra.url("/a"))
        .header("host", "httpbin")
        .body(full(vec![b'x'; 10_000]))
        .unwrap();
    assert_eq!(send(sized).await.0, StatusCode::OK);
    assert_eq!(umbra.metric(SENT, &outcome("body_too_large")).await, 1.0);

    // Unknown length: the shadow starts, then is aborted mid-body.
    let chunks = (0..10).map(|_| Bytes::from(vec![b'y'; 1000])).collect();
    let streamed = Request::post(umbra.url("/b"))
        .header("host", "httpbin")
        .body(chunked_body(chunks))
        .unwrap();
    assert_eq!(send(streamed).await.0, StatusCode::OK);
    umbra
        .wait_metric(SENT, &outcome("body_too_large"), 2.0)
        .await;

    let primaries = v1.received();
    assert_eq!(primaries.len(), 2);
    assert_eq!(
        primaries[0].body.len(),
        10_000,
        "primary got the whole body"
    );
    assert_eq!(primaries[1].body.len(), 10_000);
    assert_eq!(v2.count(), 0, "no truncated body was delivered as complete");
}

#[tokio::test]
async fn blackholed_shadow_never_blocks_and_excess_is_dropped() {
    let v1 = Backend::echo("v1").await;
    let hole = Blackhole::start().await;
    let yaml = seed_mirror(v1.port(), hole.addr.port(), "", 100.0);
    let umbra = Umbra::start_with(&yaml, shadow_caps(4, 3)).await;
    for i in 0..20 {
        let (status, _, body) = fetch(&umbra.url(&format!("/{i}")), "httpbin").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&body[..], b"v1");
    }
    assert_eq!(v1.count(), 20);
    // 4 on the wire, 3 waiting for a place, the rest dropped and counted.
    assert_eq!(umbra.metric(SENT, &outcome("dropped_overload")).await, 13.0);
    // Seven admitted (in flight): four are sent and connect, three wait
    // and are not sent.
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 7.0);
    umbra.wait_metric(SENT, &outcome("sent"), 4.0).await;
    eventually(|| async { (hole.accepted() == 4).then_some(()) }).await;
    assert_eq!(hole.accepted(), 4, "waiting shadows hold no connection");
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 4.0);
}

#[tokio::test]
async fn only_shadows_without_a_body_wait_for_a_place() {
    let v1 = Backend::echo("v1").await;
    let hole = Blackhole::start().await;
    let yaml = seed_mirror(v1.port(), hole.addr.port(), "", 100.0);
    let umbra = Umbra::start_with(&yaml, shadow_caps(1, 2)).await;
    let post = |path: &str| {
        Request::post(umbra.url(path))
            .header("host", "httpbin")
            .body(full("upload"))
            .unwrap()
    };
    assert_eq!(send(post("/first")).await.0, StatusCode::OK);
    eventually(|| async { (hole.accepted() == 1).then_some(()) }).await;
    // The only place is taken: an upload's shadow would hold its body while
    // waiting, so it is dropped at once; a GET's shadow waits.
    assert_eq!(send(post("/second")).await.0, StatusCode::OK);
    assert_eq!(umbra.metric(SENT, &outcome("dropped_overload")).await, 1.0);
    assert_eq!(
        fetch(&umbra.url("/third"), "httpbin").await.0,
        StatusCode::OK
    );
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 2.0);
    assert_eq!(umbra.metric(SENT, &outcome("dropped_overload")).await, 1.0);
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 1.0);
    assert_eq!(v1.count(), 3);
}

#[tokio::test]
async fn shadow_past_the_cap_waits_for_a_place_then_is_sent() {
    let v1 = Backend::echo("v1").await;
    // The first shadow's response body is held until the test lets go.
    let (release, held) = channel_body();
    let held = std::sync::Mutex::new(Some(held));
    let v2 = Backend::start("v2", move |_| {
        let body = held.lock().unwrap().take();
        http::Response::new(body.unwrap_or_else(|| full("v2")))
    })
    .await;
    let yaml = seed_mirror(v1.port(), v2.port(), "", 100.0);
    let umbra = Umbra::start_with(&yaml, shadow_caps(1, 1)).await;
    for i in 0..3 {
        let (status, _, body) = fetch(&umbra.url(&format!("/{i}")), "httpbin").await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
    }
    // One on the wire (its answer unfinished), one waiting, one dropped.
    assert_eq!(umbra.metric(SENT, &outcome("dropped_overload")).await, 1.0);
    assert_eq!(v2.wait_for(1).await.len(), 1);
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 2.0);
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 1.0);
    assert_eq!(umbra.metric(SENT, &outcome("completed")).await, 0.0);

    drop(release);
    let seen = v2.wait_for(2).await;
    assert_eq!(
        seen.len(),
        2,
        "the waiting shadow went out once a place was free"
    );
    umbra.wait_metric(SENT, &outcome("completed"), 2.0).await;
    assert_eq!(umbra.metric(SENT, &outcome("dropped_overload")).await, 1.0);
}

#[tokio::test]
async fn time_spent_waiting_for_a_place_is_not_the_shadows_timeout() {
    let v1 = Backend::echo("v1").await;
    // Each shadow's response body is held until the test lets it go.
    let (first, first_body) = channel_body();
    let (second, second_body) = channel_body();
    let bodies = std::sync::Mutex::new(vec![second_body, first_body]);
    let v2 = Backend::start("v2", move |_| {
        http::Response::new(bodies.lock().unwrap().pop().unwrap_or_else(|| full("v2")))
    })
    .await;
    let yaml = seed(
        v1.port(),
        v2.port(),
        "",
        "    mirror: {host: httpbin, subset: v2, port: {number: 8000}}\n    timeout: 1s\n",
    );
    let umbra = Umbra::start_with(&yaml, shadow_caps(1, 1)).await;
    assert_eq!(fetch(&umbra.url("/1"), "httpbin").await.0, StatusCode::OK);
    v2.wait_for(1).await;
    assert_eq!(fetch(&umbra.url("/2"), "httpbin").await.0, StatusCode::OK);
    // The second shadow waits 600 ms for the place, then its exchange
    // takes 600 ms: 1.2 s in all, each part within the 1 s timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(first);
    v2.wait_for(2).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    drop(second);
    umbra.wait_metric(SENT, &outcome("completed"), 2.0).await;
    assert_eq!(umbra.metric(SENT, &outcome("timeout")).await, 0.0);
}

#[tokio::test]
async fn shadow_that_waits_past_its_timeout_is_an_overload_drop() {
    let v1 = Backend::echo("v1").await;
    let hole = Blackhole::start().await;
    // Two routes share the blackholed shadow: /hold's shadow takes the only
    // place for 30 s, the other route's shadow waits and gives up at 200 ms.
    let yaml = format!(
        r#"{endpoints}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: httpbin}}
spec:
  hosts: [httpbin]
  http:
  - match: [{{uri: {{prefix: /hold}}}}]
    timeout: 30s
    route: [{{destination: {{host: httpbin, subset: v1, port: {{number: 8000}}}}}}]
    mirror: {{host: httpbin, subset: v2, port: {{number: 8000}}}}
  - timeout: 0.2s
    route: [{{destination: {{host: httpbin, subset: v1, port: {{number: 8000}}}}}}]
    mirror: {{host: httpbin, subset: v2, port: {{number: 8000}}}}
"#,
        endpoints = httpbin_endpoints(v1.port(), hole.addr.port()),
    );
    let umbra = Umbra::start_with(&yaml, shadow_caps(1, 1)).await;
    assert_eq!(
        fetch(&umbra.url("/hold"), "httpbin").await.0,
        StatusCode::OK
    );
    eventually(|| async { (hole.accepted() == 1).then_some(()) }).await;
    assert_eq!(
        fetch(&umbra.url("/other"), "httpbin").await.0,
        StatusCode::OK
    );

    umbra
        .wait_metric(SENT, &outcome("dropped_overload"), 1.0)
        .await;
    assert_eq!(
        umbra.metric(SENT, &outcome("sent")).await,
        1.0,
        "only the shadow on the wire was sent"
    );
    assert_eq!(
        umbra.metric(SENT, &outcome("timeout")).await,
        0.0,
        "never sent, so not v2's timeout"
    );
    assert_eq!(hole.accepted(), 1, "the waiting shadow never connected");
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 1.0);
}

#[tokio::test]
async fn refusing_or_resetting_shadow_leaves_primary_intact() {
    let v1 = Backend::echo("v1").await;
    for shadow_port in [refused_port().await, resetter().await.port()] {
        let umbra = Umbra::start(&seed_mirror(v1.port(), shadow_port, "", 100.0)).await;
        for _ in 0..5 {
            let post = Request::post(umbra.url("/x"))
                .header("host", "httpbin")
                .body(full("data"))
                .unwrap();
            let (status, _, body) = send(post).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(&body[..], b"v1");
        }
        umbra.wait_metric(SENT, &outcome("failed"), 5.0).await;
    }
}

#[tokio::test]
async fn slow_reading_shadow_does_not_hold_the_primary() {
    use tokio::io::AsyncReadExt;
    let v1 = Backend::echo("v1").await;
    // Reads the request head, then never reads again.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut head = [0u8; 512];
            let _ = stream.read(&mut head).await;
            held.push(stream);
        }
    });
    let annotations = "umbra.io/mirror-max-body-bytes: '67108864'";
    let umbra = Umbra::start(&seed_mirror(v1.port(), slow_port, annotations, 100.0)).await;
    let payload = Bytes::from(vec![b'z'; 8 * 1024 * 1024]);
    let chunks = (0..128)
        .map(|i| payload.slice(i * 65536..(i + 1) * 65536))
        .collect();
    let post = Request::post(umbra.url("/big"))
        .header("host", "httpbin")
        .body(chunked_body(chunks))
        .unwrap();
    let (status, _, body) = send(post).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"v1");
    assert_eq!(v1.received()[0].body.len(), payload.len());
}

#[tokio::test]
async fn method_and_header_annotations() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let annotations = "umbra.io/mirror-methods: 'GET,HEAD', umbra.io/mirror-remove-headers: 'authorization,cookie'";
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), annotations, 100.0)).await;
    let post = Request::post(umbra.url("/"))
        .header("host", "httpbin")
        .body(full("side effect"))
        .unwrap();
    send(post).await;
    assert_eq!(umbra.metric(SENT, &outcome("skipped_method")).await, 1.0);
    let get = Request::get(umbra.url("/"))
        .header("host", "httpbin")
        .header("authorization", "Bearer t")
        .header("cookie", "session=1")
        .header("x-other", "kept")
        .body(empty())
        .unwrap();
    send(get).await;
    let shadow = v2.wait_for(1).await.remove(0);
    assert_eq!(v2.count(), 1, "the POST was not mirrored");
    assert_eq!(shadow.method, http::Method::GET);
    assert_eq!(shadow.header("authorization"), None);
    assert_eq!(shadow.header("cookie"), None);
    assert_eq!(shadow.header("x-other"), Some("kept"));
    let primary = &v1.received()[1];
    assert_eq!(primary.header("authorization"), Some("Bearer t"));
}

#[tokio::test]
async fn shadow_host_suffix_can_be_turned_off() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let annotations = "umbra.io/shadow-host-suffix: 'false'";
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), annotations, 100.0)).await;
    fetch(&umbra.url("/"), "httpbin:8000").await;
    assert_eq!(v2.wait_for(1).await[0].header("host"), Some("httpbin:8000"));
}

#[tokio::test]
async fn upgrade_requests_are_not_mirrored() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await;
    let request = Request::get(umbra.url("/ws"))
        .header("host", "httpbin")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(empty())
        .unwrap();
    send(request).await;
    assert_eq!(umbra.metric(SENT, &outcome("skipped_upgrade")).await, 1.0);
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 0.0);
}

#[tokio::test]
async fn client_gone_mid_body_aborts_the_shadow() {
    use tokio::io::AsyncWriteExt;
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let umbra = Umbra::start(&seed_mirror(v1.port(), v2.port(), "", 100.0)).await;
    let mut stream = tokio::net::TcpStream::connect(umbra.addr).await.unwrap();
    stream
        .write_all(
            b"POST /upload HTTP/1.1\r\nHost: httpbin\r\nContent-Length: 100000\r\n\r\npartial",
        )
        .await
        .unwrap();
    umbra.wait_metric(SENT, &outcome("sent"), 1.0).await;
    drop(stream);
    umbra.wait_metric(SENT, &outcome("failed"), 1.0).await;
    assert_eq!(v2.count(), 0, "the shadow never got a complete request");
}

#[tokio::test]
async fn shadow_lines_join_primary_lines_by_request_id() {
    let v1 = Backend::echo("v1").await;
    let v2 = Backend::echo("v2").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let umbra = Umbra::start_with(
        &seed_mirror(v1.port(), v2.port(), "", 100.0),
        Setup {
            access_log: Some(log.clone()),
            ..Setup::default()
        },
    )
    .await;
    // Over HTTP/2, to an HTTP/1.1 upstream: both lines show the client's
    // protocol.
    let request = Request::get("http://httpbin/joined")
        .header("x-request-id", "join-me")
        .body(empty())
        .unwrap();
    let response = h2_send(umbra.addr, request).await;
    assert_eq!(response.status(), StatusCode::OK);
    let text = eventually(|| async {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.lines().count() >= 2)
    })
    .await
    .expect("two log lines");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.iter().all(|l| l.contains("request_id=join-me")),
        "{text}"
    );
    let shadow: Vec<&&str> = lines.iter().filter(|l| l.contains(" shadow=")).collect();
    assert_eq!(shadow.len(), 1, "{text}");
    assert!(shadow[0].contains("host=httpbin-shadow"), "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("\"GET /joined HTTP/2.0\" 200 ")),
        "{text}"
    );
    // Both lines name the route that mirrored.
    assert!(
        lines.iter().all(|l| l.contains(" route=httpbin.http[0] ")),
        "{text}"
    );
}

/// What [`Fickle`] does with each request it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mood {
    /// Holds the request unanswered until the mood changes.
    Hold,
    /// Resets the connection.
    Reset,
    Answer,
}

/// A shadow whose behaviour the test changes as it goes; counts the
/// connections it accepted.
struct Fickle {
    port: u16,
    accepted: tokio::sync::watch::Receiver<usize>,
    mood: std::sync::Arc<tokio::sync::watch::Sender<Mood>>,
}

impl Fickle {
    async fn start(mood: Mood) -> Fickle {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (count, accepted) = tokio::sync::watch::channel(0usize);
        let mood = std::sync::Arc::new(tokio::sync::watch::channel(mood).0);
        let moods = mood.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.send_modify(|n| *n += 1);
                let mut mood = moods.subscribe();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // Requests without a body: the head is the request.
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                                _ => return,
                            }
                        }
                        head.clear();
                        let now = *mood.wait_for(|m| *m != Mood::Hold).await.unwrap();
                        if now == Mood::Reset {
                            #[allow(deprecated)]
                            let _ = stream.set_linger(Some(Duration::ZERO));
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nv2";
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Fickle {
            port,
            accepted,
            mood,
        }
    }

    fn accepted(&self) -> usize {
        *self.accepted.borrow()
    }

    fn turn(&self, mood: Mood) {
        self.mood.send_replace(mood);
    }
}

/// [`shadow_caps`], and targets ejected after `after` failures for `time`.
fn ejecting(after: u32, time: Duration, per_target: usize, queued: usize) -> Setup {
    let mut setup = shadow_caps(per_target, queued);
    setup.limits.eject_after = after;
    setup.limits.eject_for = time;
    setup
}

#[tokio::test]
async fn a_target_failing_in_a_row_is_ejected_then_let_back_by_one_probe() {
    let v1 = Backend::echo("v1").await;
    let v2 = Fickle::start(Mood::Reset).await;
    let yaml = seed_mirror(v1.port(), v2.port, "", 100.0);
    let limits = MirrorLimits::default();
    // Long enough for the ejected phase below on a loaded machine, short
    // enough to wait out within `eventually`'s patience. Real time: the
    // exchange runs over real sockets, which paused time would not drive.
    let setup = ejecting(3, Duration::from_secs(4), limits.per_target, 0);
    let umbra = Umbra::start_with(&yaml, setup).await;
    let get_v1 = |path: &'static str| {
        let url = umbra.url(path);
        async move {
            let (status, _, body) = fetch(&url, "httpbin").await;
            assert_eq!((status, &body[..]), (StatusCode::OK, &b"v1"[..]));
        }
    };
    for _ in 0..3 {
        get_v1("/failing").await;
    }
    umbra.wait_metric(SENT, &outcome("failed"), 3.0).await;

    // Ejected: shadows are dropped and counted without touching v2.
    for _ in 0..5 {
        get_v1("/ejected").await;
    }
    assert_eq!(
        umbra.metric(SENT, &outcome("dropped_unresponsive")).await,
        5.0
    );
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 3.0);
    assert_eq!(v2.accepted(), 3, "no connection while ejected");
    assert_eq!(umbra.metric(EJECTED, &[]).await, 1.0);
    assert_eq!(umbra.metric(EJECTIONS, &[]).await, 1.0);

    // Once the ejection has run its time, one probe finds v2 answering.
    v2.turn(Mood::Answer);
    let back = eventually(|| async {
        get_v1("/probing").await;
        let completed = umbra.metric(SENT, &outcome("completed")).await;
        (completed >= 1.0).then_some(completed)
    })
    .await;
    let completed = back.expect("no probe answered after the ejection");
    for _ in 0..3 {
        get_v1("/back").await;
    }
    umbra
        .wait_metric(SENT, &outcome("completed"), completed + 3.0)
        .await;
    assert_eq!(umbra.metric(SENT, &outcome("failed")).await, 3.0);
    assert_eq!(umbra.metric(EJECTED, &[]).await, 0.0, "back");
    assert_eq!(umbra.metric(EJECTIONS, &[]).await, 1.0);
}

#[tokio::test]
async fn shadows_waiting_for_a_place_are_dropped_once_their_target_is_ejected() {
    let v1 = Backend::echo("v1").await;
    let v2 = Fickle::start(Mood::Hold).await;
    let yaml = seed_mirror(v1.port(), v2.port, "", 100.0);
    let umbra = Umbra::start_with(&yaml, ejecting(1, Duration::from_secs(60), 1, 3)).await;
    assert_eq!(fetch(&umbra.url("/a"), "httpbin").await.0, StatusCode::OK);
    eventually(|| async { (v2.accepted() == 1).then_some(()) }).await;
    for path in ["/b", "/c"] {
        assert_eq!(fetch(&umbra.url(path), "httpbin").await.0, StatusCode::OK);
    }
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 3.0);

    // The shadow on the wire fails: the two waiting for its place are
    // dropped when they get it, not sent to a target just found dead.
    v2.turn(Mood::Reset);
    umbra
        .wait_metric(SENT, &outcome("dropped_unresponsive"), 2.0)
        .await;
    assert_eq!(umbra.metric(SENT, &outcome("failed")).await, 1.0);
    assert_eq!(umbra.metric(SENT, &outcome("sent")).await, 1.0);
    assert_eq!(v2.accepted(), 1);
    assert_eq!(umbra.metric("umbra_mirror_inflight", &[]).await, 0.0);
}
