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
    /// Names lower-cased, in the order sent.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
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
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
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
