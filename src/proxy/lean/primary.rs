//! The primary's HTTP/1.1 exchange on a lean connection, for requests
//! without a body (GET, HEAD, DELETE and the like: most of what a proxy
//! carries). Callgrind put hyper's client at 13k of the 35k instructions a
//! proxied request cost: the request and response channels between the
//! requesting future and the connection's state machine, the dispatcher,
//! and the machine itself. None of that is needed to write one head and
//! read one response.
//!
//! The request head goes out with one write, as for a shadow. The response
//! head is parsed with httparse into a header map whose values are slices
//! of the head (no copies), and its body is streamed to the client as it
//! is framed ([`Streamed`]): data frames are slices of the read buffer,
//! chunked bodies are decoded, their trailers passed on as a trailers
//! frame. Once the body ends cleanly the connection goes back to the pool;
//! a body dropped midway (the client left, the route timed out) closes it.
//!
//! Requests with a body, and upgrades, stay with hyper's client: they need
//! the body streamed upstream while the response may already be coming
//! back, and the socket handed over on `101`. The connections are shared:
//! a pooled connection is handed to hyper for a request with a body and
//! taken back by the next bodiless one ([`Primary`]).

use std::io::Error;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use super::{
    invalid, BodyFraming, Head, Lines, Located, Prepared, MAX_HEAD, MAX_HEADERS, MAX_PRIMARY_HEAD,
};
use crate::metrics::RouteStats;
use crate::proxy::pool::{Conn, HeaderLines, Outgoing, Pool, Primary, SendError};

/// A primary's response body, read off its lean connection as the client
/// takes it.
pub struct Streamed<B: Outgoing> {
    /// The connection and the pool it goes back to, until the body ends.
    #[allow(clippy::type_complexity)]
    conn: Option<(Box<Conn<Primary<B>>>, Arc<Pool<Primary<B>>>)>,
    state: State,
    /// The response let the connection stay open.
    keep_alive: bool,
    /// Bytes of the buffer already searched for the end of a chunk-size
    /// line or trailer section ([`super::Lean::line_since`]).
    seen: usize,
    /// The header lines, when they were not put in the response's map
    /// ([`HeaderLines::Raw`]), until the server takes them.
    raw: Option<RawHead>,
}

/// A response's header lines as its upstream wrote them: for umbra's own
/// HTTP/1.1 server to write when nothing on the way reads or edits them,
/// instead of a header map built, walked and dropped for each response.
/// Only a [`Head::plain`] head is kept so: every hop-by-hop line in it is
/// one the server drops by its name.
#[derive(Debug)]
pub struct RawHead {
    bytes: Bytes,
    lines: Vec<Located>,
}

impl RawHead {
    /// Each line's name and value, in the upstream's order and case.
    pub fn lines(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.iter().map(|line| {
            (
                &self.bytes[line.name.clone()],
                &self.bytes[line.value.clone()],
            )
        })
    }
}

/// Where reading the body stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes still to come (`content-length`).
    Length(u64),
    /// Before a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk still to come.
    Chunk(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// The trailer section after the last chunk.
    Trailers,
    /// Everything up to the connection's end.
    ToEnd,
    Done,
}

impl<B: Outgoing> Pool<Primary<B>> {
    /// Sends the bodiless request of `parts` (origin-form URI, Host header
    /// set) on a pooled or new connection and returns the response once
    /// its head is in, its body to be streamed. While a connection is dialled for it,
    /// the request counts as pending in `stats`.
    pub(in crate::proxy) async fn send_lean(
        self: &Arc<Self>,
        parts: &Parts,
        mut body: B,
        stats: Option<&RouteStats>,
        lines: HeaderLines,
    ) -> Result<Response<Streamed<B>>, SendError> {
        let out = Prepared::new(parts, &body)?;
        let mut again = false;
        loop {
            let (mut conn, pooled) = self
                .take(again, |link| !link.is_hyper(), stats, Primary::open_lean)
                .await?;
            let Some(lean) = conn.link.lean() else {
                // hyper's client read past its last response on it.
                continue;
            };
            lean.clean = false;
            let result = match lean.send(&out.head, out.framing, &mut body).await {
                // Bodiless: never cut short (only a body's sending
                // watches for an early answer).
                Ok(_) => lean.read_head(Lines::Locate, MAX_PRIMARY_HEAD).await,
                Err(failed) => Err(failed),
            };
            conn.served += 1;
            match result {
                Ok(head) => {
                    // The head, its header values sliced out of it.
                    let bytes = lean.buf.split_to(head.length).freeze();
                    return respond(conn, self.clone(), head, bytes, out.head_only, lines);
                }
                Err(failed) if pooled && failed.resend && out.replayable => {
                    tracing::debug!(error = %failed.error, "pooled connection closed; sending again on a new one");
                    again = true;
                }
                Err(failed) => return Err(SendError::Exchange(failed.error.into())),
            }
        }
    }
}

/// The response for `head`, whose `bytes` its header map is made of
/// slices of (or which the body keeps as a [`RawHead`]).
fn respond<B: Outgoing>(
    conn: Box<Conn<Primary<B>>>,
    pool: Arc<Pool<Primary<B>>>,
    head: Head,
    bytes: Bytes,
    head_only: bool,
    lines: HeaderLines,
) -> Result<Response<Streamed<B>>, SendError> {
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // Only an upgrade may be answered so, and upgrades go through hyper.
        return Err(SendError::Exchange(
            invalid("101 Switching Protocols to a request that asked for no upgrade").into(),
        ));
    }
    let state = match head.body {
        _ if head.bodiless(head_only) => State::Done,
        BodyFraming::Length(length) => State::Length(length),
        BodyFraming::Chunked => State::ChunkSize,
        BodyFraming::ToEnd => State::ToEnd,
    };
    let mut headers = HeaderMap::new();
    let mut raw = None;
    if lines == HeaderLines::Raw && head.plain {
        raw = Some(RawHead {
            bytes,
            lines: head.located,
        });
    } else {
        headers.reserve(head.located.len());
        for line in &head.located {
            // httparse let through only token names and visible values.
            let name = HeaderName::from_bytes(&bytes[line.name.clone()]);
            let value = HeaderValue::from_maybe_shared(bytes.slice(line.value.clone()));
            if let (Ok(name), Ok(value)) = (name, value) {
                headers.append(name, value);
            }
        }
    }
    let mut body = Streamed {
        conn: Some((conn, pool)),
        state,
        keep_alive: head.keep_alive,
        seen: 0,
        raw,
    };
    if matches!(state, State::Done | State::Length(0)) {
        // Nothing to read: the connection is free before the response
        // even reaches the client.
        body.end(true);
    }
    let mut response = Response::new(body);
    *response.status_mut() = head.status;
    *response.headers_mut() = headers;
    if head.http10 {
        *response.version_mut() = Version::HTTP_10;
    }
    if let Some(reason) = head.reason {
        if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason) {
            response.extensions_mut().insert(reason);
        }
    }
    Ok(response)
}

impl<B: Outgoing> Streamed<B> {
    pub(in crate::proxy) fn take_raw_head(&mut self) -> Option<RawHead> {
        self.raw.take()
    }

    /// The body is over: its connection goes back to the pool if the
    /// exchange ended cleanly (`complete`, kept alive, nothing left over),
    /// else it closes.
    fn end(&mut self, complete: bool) {
        self.state = State::Done;
        if let Some((mut conn, pool)) = self.conn.take() {
            if let Some(lean) = conn.link.lean() {
                lean.clean = complete && self.keep_alive && lean.buf.is_empty();
                pool.put(conn);
            }
        }
    }

    /// The next frame, `None` at the end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
        loop {
            let Some((conn, _)) = &mut self.conn else {
                return Poll::Ready(Ok(None));
            };
            let Some(lean) = conn.link.lean() else {
                return Poll::Ready(Err(invalid("the connection is no longer lean")));
            };
            match self.state {
                State::Done => return Poll::Ready(Ok(None)),
                State::Length(left) | State::Chunk(left) => {
                    if lean.buf.is_empty() {
                        ready!(lean.poll_fill(cx, "body"))?;
                    }
                    let n = lean
                        .buf
                        .len()
                        .min(usize::try_from(left).unwrap_or(usize::MAX));
                    let data = lean.buf.split_to(n).freeze();
                    let left = left - n as u64;
                    match self.state {
                        State::Length(_) if left == 0 => self.end(true),
                        State::Length(_) => self.state = State::Length(left),
                        _ if left == 0 => self.state = State::ChunkEnd,
                        _ => self.state = State::Chunk(left),
                    }
                    return Poll::Ready(Ok(Some(Frame::data(data))));
                }
                State::ToEnd => {
                    if !lean.buf.is_empty() {
                        let data = lean.buf.split().freeze();
                        return Poll::Ready(Ok(Some(Frame::data(data))));
                    }
                    if ready!(lean.poll_read_some(cx))? == 0 {
                        self.end(false);
                        return Poll::Ready(Ok(None));
                    }
                }
                State::ChunkSize | State::Trailers
                    if !lean.line_since(self.seen) && lean.buf.len() < MAX_HEAD =>
                {
                    self.seen = lean.buf.len();
                    ready!(lean.poll_fill(cx, "body"))?;
                }
                State::ChunkSize => {
                    self.seen = 0;
                    // httparse reads an empty line as a last chunk of size 0.
                    let starts_hex = lean.buf.first().map(u8::is_ascii_hexdigit);
                    match httparse::parse_chunk_size(&lean.buf) {
                        Ok(httparse::Status::Complete((length, size)))
                            if starts_hex == Some(true) =>
                        {
                            lean.buf.advance(length);
                            self.state = match size {
                                0 => State::Trailers,
                                size => State::Chunk(size),
                            };
                        }
                        // A line ended, yet incomplete: a partial line is
                        // past the limit (or the line is not a chunk size).
                        _ => {
                            return Poll::Ready(Err(invalid(
                                "invalid chunk size line in the response body",
                            )))
                        }
                    }
                }
                State::ChunkEnd => {
                    if lean.buf.len() < 2 {
                        ready!(lean.poll_fill(cx, "body"))?;
                        continue;
                    }
                    if &lean.buf[..2] != b"\r\n" {
                        return Poll::Ready(Err(invalid(
                            "chunk data not followed by CRLF in the response body",
                        )));
                    }
                    lean.buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => {
                    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    match httparse::parse_headers(&lean.buf, &mut lines) {
                        Ok(httparse::Status::Complete((length, lines))) => {
                            let mut trailers = HeaderMap::with_capacity(lines.len());
                            for line in lines.iter() {
                                let name = HeaderName::from_bytes(line.name.as_bytes());
                                let value = HeaderValue::from_bytes(line.value);
                                if let (Ok(name), Ok(value)) = (name, value) {
                                    trailers.append(name, value);
                                }
                            }
                            lean.buf.advance(length);
                            self.end(true);
                            if trailers.is_empty() {
                                return Poll::Ready(Ok(None));
                            }
                            return Poll::Ready(Ok(Some(Frame::trailers(trailers))));
                        }
                        Ok(httparse::Status::Partial) if lean.buf.len() < MAX_HEAD => {
                            // Lines ended, but not the section yet.
                            self.seen = lean.buf.len();
                            ready!(lean.poll_fill(cx, "trailers"))?
                        }
                        Ok(httparse::Status::Partial) => {
                            return Poll::Ready(Err(invalid("response trailers over 64 KiB")))
                        }
                        Err(error) => {
                            return Poll::Ready(Err(invalid(format!(
                                "invalid response trailers: {error}"
                            ))))
                        }
                    }
                }
            }
        }
    }
}

impl<B: Outgoing> Body for Streamed<B> {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match ready!(this.poll_next(cx)) {
            Ok(frame) => Poll::Ready(frame.map(Ok)),
            Err(error) => {
                // Broken off: the connection closes with it.
                this.state = State::Done;
                this.conn = None;
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(left) => SizeHint::with_exact(left),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::dial::Dialer;
    use crate::proxy::lean::tests::{get, read_request, scripted};
    use crate::proxy::lean::{Keep, Lean};
    use crate::proxy::pool::{Link, UpstreamBody};
    use http::{Method, Request};
    use http_body_util::{BodyExt, Empty, Full};
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    type Primaries<B> = Arc<Pool<Primary<B>>>;

    fn pool_at<L: Link>(addr: SocketAddr, max_requests: Option<u32>) -> Arc<Pool<L>> {
        let dialer = Dialer::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            format!("http://{addr}").parse().unwrap(),
            None,
            Duration::from_secs(5),
        );
        Arc::new(Pool::new(
            dialer,
            Duration::from_secs(60),
            max_requests,
            None,
        ))
    }

    /// An upstream answering every request on any number of connections
    /// with the next of `script`, `step` bytes at a time (a millisecond
    /// apart), closing the connection once the script is spent; counts
    /// connections.
    async fn upstream(script: Vec<&'static [u8]>, step: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        let script = Arc::new(std::sync::Mutex::new(script.into_iter()));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let script = script.clone();
                tokio::spawn(async move {
                    while read_request(&mut stream).await.is_some() {
                        let Some(response) = script.lock().unwrap().next() else {
                            return;
                        };
                        for piece in response.chunks(step) {
                            if stream.write_all(piece).await.is_err() {
                                return;
                            }
                            if step < response.len() {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                        }
                        if script.lock().unwrap().len() == 0 {
                            // Spent: closed, which ends a body read to the end.
                            return;
                        }
                    }
                });
            }
        });
        (addr, connections)
    }

    /// An upstream answering `ok` on any number of connections, except
    /// that a `GET /poison` makes it close the connection unanswered;
    /// counts the poison requests.
    async fn poisoned_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let poisoned = Arc::new(AtomicUsize::new(0));
        let count = poisoned.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    while let Some(raw) = read_request(&mut stream).await {
                        if raw.starts_with("GET /poison ") {
                            count.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, poisoned)
    }

    /// Sends `request` through the pool (lean or hyper, as `send` picks)
    /// and reads the whole response: status, headers, reason phrase, body
    /// and trailers.
    async fn fetch<B: Outgoing>(
        pool: &Primaries<B>,
        request: Request<B>,
    ) -> Result<(Response<()>, Bytes, Option<HeaderMap>), String> {
        let exchange = async {
            let response = pool
                .send(request, None, HeaderLines::Map)
                .await
                .map_err(|e| e.to_string())?;
            let (head, body) = response.into_parts();
            let collected = body.collect().await.map_err(|e| e.to_string())?;
            let trailers = collected.trailers().cloned();
            Ok((
                Response::from_parts(head, ()),
                collected.to_bytes(),
                trailers,
            ))
        };
        tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .expect("the exchange hung")
    }

    #[tokio::test]
    async fn responses_stream_by_their_framing_on_one_pooled_connection() {
        let (pool, seen): (Primaries<Empty<Bytes>>, _) = scripted(vec![vec![
            b"HTTP/1.1 200 Fine\r\ncontent-length: 5\r\nx-a: 1\r\nX-A: 2\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 9\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n",
        ]])
        .await;
        let (head, body, trailers) = fetch(&pool, get("/a?q=1")).await.unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(head.version(), Version::HTTP_11);
        let values: Vec<_> = head.headers().get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"], "repeated headers kept, in order");
        let reason = head.extensions().get::<hyper::ext::ReasonPhrase>();
        assert_eq!(reason.map(|r| r.as_bytes()), Some(&b"Fine"[..]));
        assert_eq!((&body[..], trailers), (&b"hello"[..], None));

        let (head, body, trailers) = fetch(&pool, get("/chunked")).await.unwrap();
        assert_eq!(head.status(), StatusCode::OK, "1xx skipped");
        assert!(head
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .is_none());
        assert_eq!(&body[..], b"abcde");
        assert_eq!(trailers.unwrap()["x-t"], "9");

        let (_, body, trailers) = fetch(&pool, get("/no-trailers")).await.unwrap();
        assert_eq!((&body[..], trailers), (&b"z"[..], None));

        let head_request = Request::head("/h")
            .header("host", "svc")
            .body(Empty::new())
            .unwrap();
        let response = pool
            .send(head_request, None, HeaderLines::Map)
            .await
            .unwrap();
        assert!(
            response.body().is_end_stream(),
            "HEAD: no body whatever it says"
        );
        assert_eq!(pool.idle_count(), 1, "pooled before the body is read");
        drop(response);

        let (head, body, _) = fetch(&pool, get("/empty")).await.unwrap();
        assert_eq!(
            (head.status(), &body[..]),
            (StatusCode::NO_CONTENT, &b""[..])
        );
        assert_eq!(pool.idle_count(), 1);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1, "every exchange reused the connection");
        assert_eq!(
            seen.requests[0],
            "GET /a?q=1 HTTP/1.1\r\nhost: svc-shadow\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn raw_header_lines_come_in_the_body_unless_connection_or_te_name_more() {
        let (pool, _): (Primaries<Empty<Bytes>>, _) = scripted(vec![
            vec![
                b"HTTP/1.1 200 OK\r\nX-A: 1\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nConnection: , keep-alive\r\ncontent-length: 2\r\n\r\nok",
                // Not plain: their hop-by-hop headers are more than a list
                // of names to drop (the map path's `strip_hop_by_hop` decides).
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-a\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nupgrade: h2c\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nTE: trailers\r\ncontent-length: 2\r\n\r\nok",
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nclose: 1\r\ncontent-length: 2\r\n\r\nok",
            ],
            // Both framings: the connection cannot be kept.
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        ])
        .await;
        let lines = |body: &mut UpstreamBody<Empty<Bytes>>| {
            body.take_raw_head().map(|raw| {
                raw.lines()
                    .map(|(n, v)| {
                        format!(
                            "{}={}",
                            String::from_utf8_lossy(n),
                            String::from_utf8_lossy(v)
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        // Asked for a map, a plain head comes in the map.
        let (head, mut body) = pool
            .send(get("/"), None, HeaderLines::Map)
            .await
            .unwrap()
            .into_parts();
        assert_eq!((lines(&mut body), head.headers.len()), (None, 2));
        body.collect().await.unwrap();
        let (head, mut body) = pool
            .send(get("/"), None, HeaderLines::Raw)
            .await
            .unwrap()
            .into_parts();
        assert!(head.headers.is_empty(), "{:?}", head.headers);
        assert_eq!(
            lines(&mut body).unwrap(),
            ["X-A=1", "Connection=Keep-Alive", "content-length=2"]
        );
        assert_eq!(lines(&mut body), None, "taken once");
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"ok");
        let (_, mut body) = pool
            .send(get("/"), None, HeaderLines::Raw)
            .await
            .unwrap()
            .into_parts();
        assert_eq!(
            lines(&mut body).unwrap(),
            ["Connection=, keep-alive", "content-length=2"]
        );
        body.collect().await.unwrap();
        for _ in 0..5 {
            let (head, mut body) = pool
                .send(get("/"), None, HeaderLines::Raw)
                .await
                .unwrap()
                .into_parts();
            assert_eq!(lines(&mut body), None, "in the map instead");
            assert!(head.headers.contains_key("content-length"));
            body.collect().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_body_to_the_connections_end_closes_it() {
        let (pool, _): (Primaries<Empty<Bytes>>, _) = scripted(vec![vec![
            b"HTTP/1.0 200 OK\r\nx-b: 1\r\n\r\nuntil the end",
        ]])
        .await;
        let (head, body, _) = fetch(&pool, get("/")).await.unwrap();
        assert_eq!(head.version(), Version::HTTP_10);
        assert_eq!(&body[..], b"until the end");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_cut_short_or_dropped_midway_closes_its_connection() {
        let (pool, seen): (Primaries<Empty<Bytes>>, _) = scripted(vec![
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf", b""],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"],
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n"],
        ])
        .await;
        let response = pool
            .send(get("/dropped"), None, HeaderLines::Map)
            .await
            .unwrap();
        let mut body = response.into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "half");
        assert_eq!(body.size_hint().exact(), Some(6));
        drop(body);
        assert_eq!(pool.idle_count(), 0, "dropped midway: closed");

        let error = fetch(&pool, get("/cut")).await.unwrap_err();
        assert!(error.contains("closed during the response body"), "{error}");
        let error = fetch(&pool, get("/garbled")).await.unwrap_err();
        assert!(error.contains("invalid chunk size"), "{error}");
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(seen.lock().unwrap().connections, 3);
    }

    #[tokio::test]
    async fn a_get_is_sent_again_when_its_pooled_connection_closed_but_a_delete_is_not() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (pool, seen): (Primaries<Empty<Bytes>>, _) =
            scripted(vec![vec![OK, b""], vec![OK, b""], vec![OK]]).await;
        fetch(&pool, get("/1")).await.unwrap();
        let (_, body, _) = fetch(&pool, get("/2")).await.unwrap();
        assert_eq!(&body[..], b"ok", "sent again on a new connection");
        let delete = Request::delete("/3")
            .header("host", "svc")
            .body(Empty::new())
            .unwrap();
        let error = fetch(&pool, delete).await.unwrap_err();
        assert!(error.contains("closed"), "{error}");
        assert_eq!(seen.lock().unwrap().connections, 2);
    }

    /// A request to `/` with `body` (none if empty).
    fn request(method: Method, body: &'static str) -> Request<Full<Bytes>> {
        let mut request = Request::builder()
            .method(method)
            .uri("/")
            .header("host", "svc");
        if !body.is_empty() {
            request = request.header("content-length", body.len());
        }
        request
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test]
    async fn a_connection_passes_between_lean_and_hyper_exchanges() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // One more response than requests: the upstream closes once its
        // script is spent, which hyper would notice and not pool.
        let (pool, seen): (Primaries<Full<Bytes>>, _) = scripted(vec![vec![OK; 6]]).await;
        let kinds = [["lean"], ["hyper"], ["hyper"], ["lean"], ["hyper"]];
        let steps = [
            (Method::GET, ""),
            (Method::POST, "payload"),
            (Method::POST, "again"),
            (Method::GET, ""),
            (Method::PUT, "last"),
        ];
        for ((method, body), kind) in steps.into_iter().zip(kinds) {
            let (head, answer, _) = fetch(&pool, request(method, body)).await.unwrap();
            assert_eq!((head.status(), &answer[..]), (StatusCode::OK, &b"ok"[..]));
            assert_eq!(pool.idle_links(), kind);
        }
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1, "one connection for both kinds");
        assert!(
            seen.requests[1].ends_with("\r\n\r\npayload"),
            "{:?}",
            seen.requests[1]
        );
        assert!(seen.requests[4].starts_with("PUT / HTTP/1.1\r\n"));
    }

    #[tokio::test]
    async fn a_request_prefers_an_idle_connection_of_its_kind() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (pool, seen): (Primaries<Full<Bytes>>, _) =
            scripted(vec![vec![OK; 8], vec![OK; 8]]).await;
        // Two connections: a GET's (lean) held while a POST takes another
        // (hyper's).
        let held = pool
            .send(request(Method::GET, ""), None, HeaderLines::Map)
            .await
            .unwrap();
        fetch(&pool, request(Method::POST, "first")).await.unwrap();
        held.into_body().collect().await.unwrap();
        let steps = [
            (Method::GET, ""),
            (Method::POST, "a"),
            (Method::PUT, "b"),
            (Method::GET, ""),
            (Method::DELETE, ""),
            (Method::POST, "c"),
        ];
        for (method, body) in steps {
            let (head, _, _) = fetch(&pool, request(method, body)).await.unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            let mut kinds = pool.idle_links();
            kinds.sort_unstable();
            assert_eq!(kinds, ["hyper", "lean"], "no hand-over between kinds");
        }
        assert_eq!(seen.lock().unwrap().connections, 2);
    }

    #[tokio::test]
    async fn switching_protocols_to_a_plain_request_is_an_error() {
        let (pool, _): (Primaries<Empty<Bytes>>, _) = scripted(vec![vec![
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        ]])
        .await;
        let error = fetch(&pool, get("/")).await.unwrap_err();
        assert!(error.contains("101"), "{error}");
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_get_that_makes_its_upstream_close_is_sent_at_most_twice() {
        // Sent again once, on a new connection: never once per idle one.
        let (addr, poisoned) = poisoned_upstream().await;
        let pool: Primaries<Empty<Bytes>> = pool_at(addr, None);
        let warm = (0..4).map(|_| fetch(&pool, get("/")));
        for done in futures_util::future::join_all(warm).await {
            done.unwrap();
        }
        assert_eq!(pool.idle_count(), 4);
        fetch(&pool, get("/poison")).await.unwrap_err();
        assert_eq!(poisoned.load(Ordering::SeqCst), 2);

        let shadows: Arc<Pool<Lean>> = pool_at(addr, None);
        let keep = Keep {
            headers: false,
            body: 0,
        };
        for _ in 0..4 {
            shadows.exchange(get("/"), keep).await.unwrap();
        }
        shadows.exchange(get("/poison"), keep).await.unwrap_err();
        assert_eq!(poisoned.load(Ordering::SeqCst), 4, "shadows alike");
    }

    #[tokio::test]
    async fn a_large_response_head_is_read_as_hyper_reads_it() {
        let big: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(100 * 1024)
        )
        .into_bytes()
        .leak();
        let (addr, _) = upstream(vec![big; 2], usize::MAX).await;
        let pool: Primaries<Full<Bytes>> = pool_at(addr, None);
        let post = Request::post("/")
            .header("host", "svc")
            .header("content-length", 1)
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap();
        let get = Request::get("/")
            .header("host", "svc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        for request in [post, get] {
            let (head, body, _) = fetch(&pool, request).await.unwrap();
            assert_eq!(head.headers()["x-big"].len(), 100 * 1024);
            assert_eq!(&body[..], b"ok");
        }
    }

    #[tokio::test]
    async fn a_response_trickled_a_byte_at_a_time_is_framed_alike() {
        const TRICKLED: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3;e=\"x\"\r\nabc\r\nA\r\n0123456789\r\n0\r\nx-t: 9\r\n\r\n";
        let (addr, connections) = upstream(vec![TRICKLED; 2], 1).await;
        let pool: Primaries<Empty<Bytes>> = pool_at(addr, None);
        for _ in 0..2 {
            let (head, body, trailers) = fetch(&pool, get("/")).await.unwrap();
            assert_eq!(head.status(), StatusCode::OK);
            assert_eq!(&body[..], b"abc0123456789");
            assert_eq!(trailers.unwrap()["x-t"], "9");
        }
        assert_eq!(connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn only_clean_exchanges_are_pooled() {
        let cases: [(&'static [u8], &[u8], usize); 7] = [
            (b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", b"ok", 1),
            (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", b"ok", 0),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA", b"ok", 0),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok", 0),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx: y\r\n\r\nEXTRA", b"ok", 0),
            (b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n", b"", 1),
            (b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\n\r\nto the end", b"to the end", 0),
        ];
        for (response, body, idle) in cases {
            let (addr, _) = upstream(vec![response], usize::MAX).await;
            let pool: Primaries<Empty<Bytes>> = pool_at(addr, None);
            let (_, got, _) = fetch(&pool, get("/")).await.unwrap();
            let shown = String::from_utf8_lossy(response);
            assert_eq!(&got[..], body, "{shown:?}");
            assert_eq!(pool.idle_count(), idle, "{shown:?}");
        }
    }

    #[tokio::test]
    async fn max_requests_per_connection_holds_for_lean_exchanges() {
        const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (addr, connections) = upstream(vec![OK; 3], usize::MAX).await;
        let pool: Primaries<Empty<Bytes>> = pool_at(addr, Some(2));
        for _ in 0..3 {
            fetch(&pool, get("/")).await.unwrap();
        }
        assert_eq!(connections.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_head_arrived_closes_the_connection() {
        const HALF: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-le";
        // Two in the script, so the upstream keeps the connection open.
        let (addr, _) = upstream(vec![HALF, HALF], usize::MAX).await;
        let pool: Primaries<Empty<Bytes>> = pool_at(addr, None);
        let waited = tokio::time::timeout(
            Duration::from_millis(200),
            pool.send(get("/"), None, HeaderLines::Map),
        );
        assert!(waited.await.is_err(), "the head never completes");
        assert_eq!(pool.idle_count(), 0);
    }
}
