//! The downstream HTTP/1.1 server on the wire: umbra's own for plaintext
//! requests without a body, hyper's for everything after a request it
//! leaves to hyper. Raw sockets, so framing, pipelining and the handover
//! are seen as a client sees them.

use bytes::Bytes;
use http::{Response, StatusCode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::*;

/// One response as read off the wire.
#[derive(Debug)]
struct Wire {
    status_line: String,
    /// Names as sent, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn status(&self) -> u16 {
        self.status_line[9..12].parse().unwrap()
    }
}

/// Reads one response: `content-length`, chunked, or no body (`bodiless`:
/// the status has none, or the request was HEAD).
async fn read_response(reader: &mut BufReader<TcpStream>, bodiless: bool) -> Wire {
    let mut line = String::new();
    let read = async {
        reader.read_line(&mut line).await.unwrap();
        let status_line = line.trim_end().to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header line");
            headers.push((name.to_string(), value.trim().to_string()));
        }
        let mut wire = Wire {
            status_line,
            headers,
            body: Vec::new(),
        };
        let code = wire.status();
        if bodiless || code == 204 || code == 304 {
            return wire;
        }
        if wire.header("transfer-encoding") == Some("chunked") {
            loop {
                let mut size = String::new();
                reader.read_line(&mut size).await.unwrap();
                let size = usize::from_str_radix(size.trim_end(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk).await.unwrap();
                assert_eq!(&chunk[size..], b"\r\n", "a chunk ends with CRLF");
                if size == 0 {
                    return wire;
                }
                wire.body.extend_from_slice(&chunk[..size]);
            }
        }
        let length: usize = wire.header("content-length").unwrap().parse().unwrap();
        wire.body = vec![0; length];
        reader.read_exact(&mut wire.body).await.unwrap();
        wire
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("a whole response")
}

/// A backend that answers with what it was asked: method, path and body.
async fn mirror_backend() -> Backend {
    Backend::start("b", |seen| {
        let body = format!(
            "{} {} {}",
            seen.method,
            seen.uri.path(),
            String::from_utf8_lossy(&seen.body)
        );
        Response::new(full(body))
    })
    .await
}

async fn connect(umbra: &Umbra) -> BufReader<TcpStream> {
    BufReader::new(TcpStream::connect(umbra.addr).await.unwrap())
}

/// The connection ends: nothing more is read before the end.
async fn assert_closed(reader: &mut BufReader<TcpStream>) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut rest))
        .await
        .expect("the connection closes");
    assert!(read.is_err() || rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_handover_to_hyper() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    // Two requests umbra's own server takes, one with a body (hyper's from
    // then on), and one more: all in one write.
    reader
        .get_mut()
        .write_all(
            b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n\
              DELETE /two HTTP/1.1\r\nHost: t\r\ncontent-length: 0\r\n\r\n\
              POST /three HTTP/1.1\r\nHost: t\r\ncontent-length: 3\r\n\r\nabc\
              GET /four HTTP/1.1\r\nHost: t\r\n\r\n",
        )
        .await
        .unwrap();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let response = read_response(&mut reader, false).await;
        assert_eq!(response.status(), 200, "{response:?}");
        assert!(response.header("date").is_some(), "{response:?}");
        bodies.push(String::from_utf8(response.body).unwrap());
    }
    assert_eq!(
        bodies,
        ["GET /one ", "DELETE /two ", "POST /three abc", "GET /four "]
    );
    assert_eq!(backend.count(), 4);
    // Still open for another.
    reader
        .get_mut()
        .write_all(b"GET /five HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut reader, false).await;
    assert_eq!(response.body, b"GET /five ");
}

#[tokio::test]
async fn a_client_asking_to_close_gets_connection_close_and_the_end() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut reader, false).await;
    assert_eq!(response.body, b"GET /bye ");
    assert_eq!(response.header("connection"), Some("close"));
    assert_closed(&mut reader).await;
}

#[tokio::test]
async fn streamed_responses_go_out_chunked_and_empty_statuses_without_a_body() {
    // A chunk too big to copy, then many small ones that are.
    let mut parts = vec![
        Bytes::from_static(b"first "),
        Bytes::from(vec![b'x'; 40 * 1024]),
    ];
    parts.extend((0..100u8).map(|i| Bytes::from(vec![b'a' + i % 26; 1000])));
    parts.push(Bytes::from_static(b" last"));
    let expected: Vec<u8> = parts.concat();
    let backend = Backend::start("b", move |seen| match seen.uri.path() {
        "/stream" => Response::new(chunked_body(parts.clone())),
        "/none" => {
            let mut response = Response::new(empty());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        _ => Response::new(full("plain")),
    })
    .await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    let stream = reader.get_mut();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut reader, false).await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.header("content-length"), None);
    assert_eq!(response.body, expected);
    // A 204 carries no framing at all; the next response on the connection
    // starts right after its head.
    for path in ["/none", "/plain"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
        reader
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .unwrap();
    }
    let none = read_response(&mut reader, false).await;
    assert_eq!(none.status(), 204);
    assert_eq!(none.header("content-length"), None, "{none:?}");
    assert_eq!(none.header("transfer-encoding"), None, "{none:?}");
    let plain = read_response(&mut reader, false).await;
    assert_eq!(plain.status(), 200);
    assert_eq!(plain.header("content-length"), Some("5"));
    assert_eq!(plain.body, b"plain");
}

#[tokio::test]
async fn local_replies_are_framed_and_dated() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let missing = read_response(&mut reader, false).await;
    assert_eq!(missing.status(), 404, "{missing:?}");
    assert!(missing.header("date").unwrap().ends_with(" GMT"));
    assert_eq!(
        missing.header("content-length").map(str::parse::<usize>),
        Some(Ok(missing.body.len()))
    );
    let after = read_response(&mut reader, false).await;
    assert_eq!(after.body, b"GET /after ");
}

#[tokio::test]
async fn heads_umbra_does_not_serve_get_hyper_answers() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;

    // HTTP/1.0: hyper answers, and closes without keep-alive.
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"GET /old HTTP/1.0\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let old = read_response(&mut reader, false).await;
    assert!(old.status_line.starts_with("HTTP/1.0 200"), "{old:?}");
    assert_eq!(old.body, b"GET /old ");
    assert_closed(&mut reader).await;

    // HEAD: the length of the body that is not sent.
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /g HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let head = read_response(&mut reader, true).await;
    assert_eq!(head.header("content-length"), Some("8"), "{head:?}");
    let get = read_response(&mut reader, false).await;
    assert_eq!(get.body, b"GET /g ");

    // A head httparse refuses, and one over the size limit.
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHo st: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut reader, false).await.status(), 400);
    let mut reader = connect(&umbra).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: t\r\nx-big: {}\r\n\r\n",
        "y".repeat(70 * 1024)
    );
    reader.get_mut().write_all(big.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut reader, false).await.status(), 431);
    assert_eq!(backend.count(), 3, "neither bad head reached the backend");
}

#[tokio::test]
async fn a_request_trickled_in_byte_by_byte_is_served() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    for byte in b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n" {
        let stream = reader.get_mut();
        stream.write_all(&[*byte]).await.unwrap();
        stream.flush().await.unwrap();
    }
    let response = read_response(&mut reader, false).await;
    assert_eq!(response.body, b"GET /slow ");
}

#[tokio::test]
async fn an_http2_preface_after_http1_requests_closes_the_connection() {
    let backend = mirror_backend().await;
    let umbra = Umbra::start(&single_route("t", backend.port())).await;
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut reader, false).await.body, b"GET /first ");
    reader
        .get_mut()
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_closed(&mut reader).await;
    assert_eq!(backend.count(), 1);
}

/// An upstream that writes its responses by hand, header names in the
/// case and order given, whatever hyper would make of them: `/named` and
/// `/close` answer with a `Connection` option naming a header to drop,
/// `/both` with both framings, `/empty` with a 204, anything else with
/// `HAND_WRITTEN`. Reads heads and `content-length` bodies.
async fn hand_written_upstream() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut request_line = String::new();
                    if reader.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        reader.read_line(&mut line).await.unwrap();
                        let line = line.trim_end().to_ascii_lowercase();
                        if line.is_empty() {
                            break;
                        }
                        if let Some(value) = line.strip_prefix("content-length:") {
                            length = value.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).await.unwrap();
                    let path = request_line.split(' ').nth(1).unwrap_or_default();
                    let response: &[u8] = match path {
                        "/named" => b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Drop\r\nX-Drop: secret\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
                        "/close" => b"HTTP/1.1 200 OK\r\nConnection: close\r\nClose: secret\r\nContent-Length: 2\r\n\r\nok",
                        "/both" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                        "/empty" => b"HTTP/1.1 204 No Content\r\nX-E: 1\r\nContent-Length: 0\r\n\r\n",
                        _ => HAND_WRITTEN,
                    };
                    reader.get_mut().write_all(response).await.unwrap();
                }
            });
        }
    });
    port
}

/// Every hop-by-hop header a plain head may carry, a name longer than
/// the server's stack buffer for lower-casing, repeated names.
const HAND_WRITTEN: &[u8] = b"HTTP/1.1 200 OK\r\nServer: by-hand\r\nX-Custom: One\r\n\
Set-Cookie: a=1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
Proxy-Authenticate: Basic\r\nProxy-Authorization: Basic eA==\r\nTrailer: x-t\r\nUpgrade: h2c\r\n\
Connection: keep-alive\r\nx-custom: two\r\nSet-Cookie: b=2\r\nDate: Sat, 28 Nov 2026 10:00:00 GMT\r\n\
X-A-Header-Name-Longer-Than-Thirty-Two: Long\r\nContent-Length: 5\r\n\r\nhello";

#[tokio::test]
async fn response_headers_go_out_alike_whether_passed_on_unparsed_or_through_a_header_map() {
    let port = hand_written_upstream().await;
    // `plain` has no response rules: its header lines pass unparsed.
    // `edited` sets one, so its response goes through a header map.
    let yaml = format!(
        "{}---\n{}    headers:\n      response:\n        set: {{x-edited: yes}}\n",
        single_route("plain", port),
        single_route("edited", port)
    );
    let umbra = Umbra::start(&yaml).await;
    let mut reader = connect(&umbra).await;
    reader
        .get_mut()
        .write_all(
            b"GET / HTTP/1.1\r\nHost: plain\r\n\r\n\
              GET / HTTP/1.1\r\nHost: edited\r\n\r\n\
              GET /named HTTP/1.1\r\nHost: plain\r\n\r\n\
              GET /close HTTP/1.1\r\nHost: plain\r\n\r\n\
              GET /both HTTP/1.1\r\nHost: plain\r\n\r\n\
              GET /empty HTTP/1.1\r\nHost: plain\r\n\r\n\
              POST / HTTP/1.1\r\nHost: plain\r\ncontent-length: 3\r\n\r\nabc",
        )
        .await
        .unwrap();
    let unparsed = read_response(&mut reader, false).await;
    let edited = read_response(&mut reader, false).await;
    let named = read_response(&mut reader, false).await;
    let close = read_response(&mut reader, false).await;
    let both = read_response(&mut reader, false).await;
    let empty = read_response(&mut reader, false).await;
    // A request with a body is hyper's to serve, through a header map.
    let by_hyper = read_response(&mut reader, false).await;

    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    };
    // In the upstream's order, names lower-cased as hyper writes them,
    // hop-by-hop lines gone, its own date and length kept.
    assert_eq!(
        unparsed.headers,
        pairs(&[
            ("server", "by-hand"),
            ("x-custom", "One"),
            ("set-cookie", "a=1"),
            ("x-custom", "two"),
            ("set-cookie", "b=2"),
            ("date", "Sat, 28 Nov 2026 10:00:00 GMT"),
            ("x-a-header-name-longer-than-thirty-two", "Long"),
            ("content-length", "5"),
        ])
    );
    assert_eq!(unparsed.body, b"hello");
    // A header map groups a name's values; the set is the same.
    let sorted = |wire: &Wire, without: &str| {
        let mut headers: Vec<_> = wire
            .headers
            .iter()
            .filter(|(name, _)| name != without)
            .cloned()
            .collect();
        headers.sort();
        headers
    };
    let mut expected = unparsed.headers.clone();
    expected.sort();
    assert_eq!(sorted(&edited, "x-edited"), expected, "{edited:?}");
    assert_eq!(edited.header("x-edited"), Some("yes"));
    assert_eq!(sorted(&by_hyper, ""), expected, "{by_hyper:?}");
    assert_eq!(
        (edited.body, by_hyper.body),
        (b"hello".to_vec(), b"hello".to_vec())
    );
    // A header the upstream's `Connection` names is dropped with it.
    assert_eq!(named.header("x-drop"), None, "{named:?}");
    assert_eq!(named.header("x-kept"), Some("yes"));
    assert_eq!(named.header("connection"), None);
    assert_eq!(named.body, b"ok");
    // `close` names a header too (RFC 9110 §7.6.1); the client's
    // connection stays open.
    assert_eq!(
        (close.header("close"), close.header("connection")),
        (None, None)
    );
    assert_eq!(close.body, b"ok");
    // With both framings the body is chunked and its stated length goes.
    assert_eq!(both.header("content-length"), None, "{both:?}");
    assert_eq!(both.header("transfer-encoding"), Some("chunked"));
    assert_eq!(both.body, b"ok");
    assert_eq!(empty.status(), 204);
    assert_eq!(
        empty
            .headers
            .iter()
            .filter(|(n, _)| n != "date")
            .collect::<Vec<_>>(),
        [&("x-e".to_string(), "1".to_string())]
    );
}
