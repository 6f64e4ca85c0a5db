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
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};

use super::{encode_head, invalid, replayable, BodyFraming, Head, Lines, MAX_HEAD, MAX_HEADERS};
use crate::metrics::RouteStats;
use crate::proxy::pool::{Conn, Outgoing, Pool, Primary, SendError};

/// A primary's response body, read off its lean connection as the client
/// takes it.
pub struct Streamed<B: Outgoing> {
    /// The connection and the pool it goes back to, until the body ends.
    #[allow(clippy::type_complexity)]
    conn: Option<(Box<Conn<Primary<B>>>, Arc<Pool<Primary<B>>>)>,
    state: State,
    /// The response let the connection stay open.
    keep_alive: bool,
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
    /// Sends a bodiless `request` (origin-form URI, Host header set) on a
    /// pooled or new connection and returns the response once its head is
    /// in, its body to be streamed. While a connection is dialled for it,
    /// the request counts as pending in `stats`.
    pub(in crate::proxy) async fn send_lean(
        self: &Arc<Self>,
        request: Request<B>,
        stats: Option<&RouteStats>,
    ) -> Result<Response<Streamed<B>>, SendError> {
        let (parts, mut body) = request.into_parts();
        let (head, framing) =
            encode_head(&parts, &body).map_err(|e| SendError::Exchange(e.into()))?;
        let head_only = parts.method == Method::HEAD;
        let replayable = replayable(&parts.method, framing);
        loop {
            let (mut conn, pooled) = self.take(stats, Primary::open_lean).await?;
            let Some(lean) = conn.link.lean() else {
                // hyper's client read past its last response on it.
                continue;
            };
            lean.clean = false;
            let result = match lean.send(&head, framing, &mut body).await {
                Ok(()) => lean.read_head(Lines::Locate).await,
                Err(failed) => Err(failed),
            };
            conn.served += 1;
            match result {
                Ok(head) => {
                    // The head, its header values sliced out of it.
                    let bytes = lean.buf.split_to(head.length).freeze();
                    return respond(conn, self.clone(), head, bytes, head_only);
                }
                Err(failed) if pooled && failed.resend && replayable => {
                    tracing::debug!(error = %failed.error, "pooled connection closed; sending again on another");
                }
                Err(failed) => return Err(SendError::Exchange(failed.error.into())),
            }
        }
    }
}

/// The response for `head`, whose `bytes` its header map is made of
/// slices of.
fn respond<B: Outgoing>(
    conn: Box<Conn<Primary<B>>>,
    pool: Arc<Pool<Primary<B>>>,
    head: Head,
    bytes: Bytes,
    head_only: bool,
) -> Result<Response<Streamed<B>>, SendError> {
    if head.status == StatusCode::SWITCHING_PROTOCOLS {
        // Only an upgrade may be answered so, and upgrades go through hyper.
        return Err(SendError::Exchange(
            invalid("101 Switching Protocols to a request that asked for no upgrade").into(),
        ));
    }
    let mut headers = HeaderMap::with_capacity(head.located.len());
    for line in &head.located {
        // httparse let through only token names and visible values.
        let name = HeaderName::from_bytes(&bytes[line.name.clone()]);
        let value = HeaderValue::from_maybe_shared(bytes.slice(line.value.clone()));
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    let state = match head.body {
        _ if head.bodiless(head_only) => State::Done,
        BodyFraming::Length(length) => State::Length(length),
        BodyFraming::Chunked => State::ChunkSize,
        BodyFraming::ToEnd => State::ToEnd,
    };
    let mut body = Streamed {
        conn: Some((conn, pool)),
        state,
        keep_alive: head.keep_alive,
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
                State::ChunkSize => {
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
                        Ok(httparse::Status::Partial) if lean.buf.len() < MAX_HEAD => {
                            ready!(lean.poll_fill(cx, "body"))?
                        }
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
