//! umbra's own HTTP/1.1 server for the requests most traffic is made of:
//! an HTTP/1.1 request with no body, on a plaintext connection or a TLS
//! one that did not negotiate `h2`. Under callgrind, hyper's
//! server side (its dispatcher, the request's body channel, the response
//! encoder, the socket reads and writes) took 8.4k of a proxied request's
//! 27k instructions, this loop 6.3k. It reads a head with httparse
//! (hyper's own parser), hands the request to [`crate::proxy::handle`]
//! as hyper's service would, writes the response head and body, and
//! reads the next head.
//!
//! Anything else on the connection — a request with a body, `HEAD`,
//! `CONNECT`, an upgrade, `Expect`, HTTP/1.0, the HTTP/2 preface, a head
//! httparse refuses or one over the size limit — hands the connection to
//! hyper for the rest of its life, with what was read of it put back in
//! front ([`Prefixed`]). Those answers and errors (400, 431, 100-continue,
//! WebSocket tunnels, HTTP/2) are therefore hyper's own, as they were
//! before this path existed. A switch only happens between requests,
//! when nothing of a response is left to write.
//!
//! The response is framed as hyper frames it: `content-length` when the
//! body's length is known, chunked otherwise, no body for 1xx, 204 and
//! 304; a `date` header when the response has none; `connection: close`
//! when the connection ends after it (the client asked, or umbra is
//! draining). A body that ends short of its length, runs past it, or fails
//! ends the connection, so the client sees a truncated response, never a
//! wrong one.

use std::future::{poll_fn, Future};
use std::io::{Error, IoSlice, Write};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::SystemTime;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::idle::{Activity, Graceful, Held, Progress};
use crate::proxy::body::ResponseBody;
use crate::proxy::headers::hop_by_hop;
use crate::proxy::lean::line_since;
use crate::proxy::lean::primary::RawHead;
use crate::proxy::{Peer, Proxy, Writer};

/// How an HTTP/2 connection starts (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// What hyper's server allows in a request head.
const MAX_HEADERS: usize = 100;
/// The read buffer's first size, and what is added when it runs low.
const READ_SIZE: usize = 8192;
/// Body chunks up to this size are copied behind the head (one write);
/// larger ones are written from where they are.
const COPY_LIMIT: usize = 16 * 1024;
/// Copied bytes are written once this many gather, even while the body
/// has more ready, so a fast upstream never grows the buffer past it.
const WRITE_AT: usize = 32 * 1024;
/// The write buffer is let go of after a response that grew it past this.
const KEEP_BUFFER: usize = 8 * 1024;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The same connection served by hyper after a request this server leaves
/// to it.
pub type Fallback = Pin<Box<dyn Graceful<Output = Result<(), BoxError>> + Send>>;

/// Starts hyper's server on a connection, given what was read of it.
pub type Handover<S> = Box<dyn FnOnce(Prefixed<Progress<S>>) -> Fallback + Send>;

/// One downstream connection: served here, then by hyper if a request
/// needs it.
pub struct Connection<S> {
    state: State<S>,
    activity: Arc<Activity>,
}

enum State<S> {
    Lean {
        serving: Pin<Box<dyn Future<Output = Result<Ended<S>, BoxError>> + Send>>,
        handover: Option<Handover<S>>,
    },
    Hyper(Fallback),
}

/// How the lean loop stopped.
enum Ended<S> {
    /// The connection is done.
    Closed,
    /// hyper takes it from here, with these bytes read ahead.
    Handover(Progress<S>, BytesMut),
}

/// A connection with bytes already read from it put back in front.
pub struct Prefixed<S> {
    read: Bytes,
    io: S,
}

/// A request this server can take, or why not. Returned by value once per
/// request: boxing the request would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// The request, and whether its client asked to close after it.
    Request(Request<Option<hyper::body::Incoming>>, bool),
    Partial,
    Hyper,
}

impl<S> Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// `limit`: the largest request head read here; longer ones go to
    /// hyper, which refuses them (431) by the same limit.
    pub fn new(
        io: Progress<S>,
        proxy: Arc<Proxy>,
        client: Arc<Peer>,
        activity: Arc<Activity>,
        limit: usize,
        handover: Handover<S>,
    ) -> Connection<S> {
        let serving = Box::pin(serve(io, proxy, client, activity.clone(), limit));
        Connection {
            state: State::Lean {
                serving,
                handover: Some(handover),
            },
            activity,
        }
    }
}

impl<S> Future for Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Lean { serving, handover } => match ready!(serving.as_mut().poll(cx)) {
                    Ok(Ended::Closed) => return Poll::Ready(Ok(())),
                    Err(error) => return Poll::Ready(Err(error)),
                    Ok(Ended::Handover(io, read)) => {
                        let Some(start) = handover.take() else {
                            return Poll::Ready(Ok(()));
                        };
                        let mut hyper = start(Prefixed::new(read.freeze(), io));
                        if this.activity.finishing() {
                            // Asked to finish while a head came in: hyper
                            // reads it first (asked before its first poll,
                            // it would close without reading), then serves
                            // it with keep-alive off.
                            if let Poll::Ready(done) = hyper.as_mut().poll(cx) {
                                return Poll::Ready(done);
                            }
                            hyper.as_mut().graceful_shutdown();
                        }
                        this.state = State::Hyper(hyper);
                    }
                },
                State::Hyper(hyper) => return hyper.as_mut().poll(cx),
            }
        }
    }
}

impl<S> Graceful for Connection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        // The lean loop looks at this between requests; the caller polls
        // the connection next, so an idle one ends at once.
        this.activity.finish();
        if let State::Hyper(hyper) = &mut this.state {
            hyper.as_mut().graceful_shutdown();
        }
    }
}

/// Serves requests until the connection ends or one is left to hyper.
async fn serve<S>(
    mut io: Progress<S>,
    proxy: Arc<Proxy>,
    client: Arc<Peer>,
    activity: Arc<Activity>,
    limit: usize,
) -> Result<Ended<S>, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut read = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::with_capacity(1024);
    let mut names = Vec::new();
    // A request was served: the connection speaks HTTP/1.1.
    let mut served = false;
    loop {
        let mut seen = 0;
        let (request, client_close) = loop {
            let parsed = match line_since(&read, seen) {
                true => parse(&mut read, &mut names),
                false => Parsed::Partial,
            };
            match parsed {
                Parsed::Request(request, close) => break (request, close),
                // hyper's HTTP/1 server closes on it too; handed over, it
                // would switch the connection to HTTP/2.
                Parsed::Hyper if served && read.starts_with(H2_PREFACE) => {
                    return Err("HTTP/2 preface after HTTP/1.1 requests".into())
                }
                Parsed::Hyper => return Ok(Ended::Handover(io, read)),
                Parsed::Partial if read.len() >= limit => return Ok(Ended::Handover(io, read)),
                Parsed::Partial => {}
            }
            seen = read.len();
            if read.capacity() - read.len() < READ_SIZE / 2 {
                read.reserve(READ_SIZE);
            }
            let more = poll_fn(|cx| {
                // Asked to finish while waiting for a request: done. A head
                // begun is left to arrive (or to the idle cut).
                if read.is_empty() && activity.finishing() {
                    return Poll::Ready(Ok(0));
                }
                pin!(io.read_buf(&mut read)).poll(cx)
            })
            .await;
            match more {
                Ok(0) | Err(_) if read.is_empty() => return Ok(Ended::Closed),
                Ok(0) => return Err("connection closed before the request head ended".into()),
                Ok(_) => {}
                Err(error) => return Err(error.into()),
            }
        };
        served = true;
        let busy = activity.begin(Version::HTTP_11);
        let mut handling = pin!(crate::proxy::handle(&proxy, &client, request, Writer::Lean));
        // A client that leaves before its response cancels the exchange.
        let response = poll_fn(|cx| match handling.as_mut().poll(cx) {
            Poll::Ready(response) => Poll::Ready(Ok(response)),
            Poll::Pending => poll_gone(&mut io, &mut read, cx).map(Err),
        })
        .await?;
        let (head, mut body) = response.into_parts();
        let raw = body.take_raw_head();
        let body = Held::new(body, busy);
        let close = client_close || activity.finishing();
        let response = (head, raw, body);
        let keep = write_response(&mut io, &mut read, &mut out, response, close).await?;
        // Asked to finish while the response went out: no request read
        // ahead is served.
        if !keep || activity.finishing() {
            let _ = io.shutdown().await;
            return Ok(Ended::Closed);
        }
    }
}

/// Ready with an error when the client closes its side (or the
/// connection fails) while its response is awaited, as hyper finds it:
/// only while nothing is read ahead, so a pipelined request is read (and
/// kept) but not watched past.
fn poll_gone<S: AsyncRead + Unpin>(
    io: &mut S,
    read: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<BoxError> {
    if !read.is_empty() {
        return Poll::Pending;
    }
    match ready!(pin!(io.read_buf(read)).poll(cx)) {
        Ok(0) => Poll::Ready("connection closed before the response was sent".into()),
        Ok(_) => Poll::Pending,
        Err(error) => Poll::Ready(error.into()),
    }
}

/// Reads a request head at the start of `read` as this server does (for
/// the fuzz target): the request when it is served here, `None` when the
/// head is not whole yet or is left to hyper; `read` keeps the rest.
pub fn read_head(read: &mut BytesMut) -> Option<Request<Option<hyper::body::Incoming>>> {
    match parse(read, &mut Vec::new()) {
        Parsed::Request(request, _) => Some(request),
        Parsed::Partial | Parsed::Hyper => None,
    }
}

/// Parses the request head at the start of `read`, taking it from the
/// buffer when this server serves it. `names` is scratch space kept
/// between requests: each header's name and where its value lies.
fn parse(read: &mut BytesMut, names: &mut Vec<(HeaderName, Range<usize>)>) -> Parsed {
    names.clear();
    // Left uninitialised, as hyper does: zeroing a hundred slots costs
    // more than parsing a small head.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut head = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut head, read, &mut slots);
    let length = match parsed {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        // hyper answers these (400, 431) or speaks HTTP/2.
        Err(_) => return Parsed::Hyper,
    };
    if head.version != Some(1) {
        return Parsed::Hyper;
    }
    let method = match head.method {
        Some("GET") => Method::GET,
        Some("HEAD" | "CONNECT") | None => return Parsed::Hyper,
        Some(other) => match Method::from_bytes(other.as_bytes()) {
            Ok(method) => method,
            Err(_) => return Parsed::Hyper,
        },
    };
    let range = |part: &[u8]| {
        let start = part.as_ptr() as usize - read.as_ptr() as usize;
        start..start + part.len()
    };
    let mut close = false;
    names.reserve(head.headers.len());
    for line in head.headers.iter() {
        let name = line.name.as_bytes();
        let is = |wanted: &[u8]| name.len() == wanted.len() && name.eq_ignore_ascii_case(wanted);
        if is(b"content-length") {
            if line.value != b"0" {
                return Parsed::Hyper;
            }
        } else if is(b"transfer-encoding") || is(b"expect") || is(b"upgrade") {
            return Parsed::Hyper;
        } else if is(b"connection") {
            for token in line.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"upgrade") {
                    return Parsed::Hyper;
                }
                close |= token.eq_ignore_ascii_case(b"close");
            }
        }
        let Ok(name) = HeaderName::from_bytes(name) else {
            return Parsed::Hyper;
        };
        names.push((name, range(line.value)));
    }
    let path = range(head.path.unwrap_or_default().as_bytes());
    // The head's bytes stay shared by the header values and the URI, as
    // hyper shares its read buffer with them.
    let bytes = read.split_to(length).freeze();
    let built = (|| -> Result<_, BoxError> {
        let uri = Uri::from_maybe_shared(bytes.slice(path))?;
        // With room for the forwarding headers and request id the proxy
        // adds, so the map is not grown again for them.
        let mut headers = HeaderMap::with_capacity(names.len() + 3);
        for (name, value) in names.drain(..) {
            headers.append(name, HeaderValue::from_maybe_shared(bytes.slice(value))?);
        }
        Ok((uri, headers))
    })();
    let Ok((uri, headers)) = built else {
        // hyper answers with 400: the head goes back in front of the rest.
        let mut whole = BytesMut::with_capacity(bytes.len() + read.len());
        whole.extend_from_slice(&bytes);
        whole.extend_from_slice(read);
        *read = whole;
        return Parsed::Hyper;
    };
    let mut request = Request::new(None);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    Parsed::Request(request, close)
}

/// How a response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are still to come.
    Length(u64),
    Chunked,
}

/// Writes `head` (status line, headers, then the `raw` lines) into `out`,
/// and says how the body goes.
fn encode_head(
    out: &mut Vec<u8>,
    head: &http::response::Parts,
    raw: Option<&RawHead>,
    size: Option<u64>,
    close: bool,
) -> Framing {
    let status = head.status;
    let reason = head.extensions.get::<hyper::ext::ReasonPhrase>();
    if status == StatusCode::OK && reason.is_none() {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        match reason {
            Some(reason) => out.extend_from_slice(reason.as_bytes()),
            None => out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes()),
        }
        out.extend_from_slice(b"\r\n");
    }
    let bodiless = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let mut length: Option<u64> = None;
    let mut dated = false;
    let mut line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        match name {
            // The body decides these; `connection` is written below.
            b"transfer-encoding" | b"connection" | b"trailer" => return,
            b"content-length" => {
                // A body of known length is framed by that (below); a
                // stated length only frames one of unknown length.
                if size.is_some() || status == StatusCode::NO_CONTENT || length.is_some() {
                    return;
                }
                length = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                if let Some(length) = length {
                    write_length(out, length);
                }
                return;
            }
            b"date" => dated = true,
            _ => {}
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    for (name, value) in head.headers.iter() {
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    let mut lower = [0u8; 32];
    for (name, value) in raw.iter().flat_map(|raw| raw.lines()) {
        // In lower case, as hyper's header map has them.
        let long;
        let name: &[u8] = match lower.get_mut(..name.len()) {
            Some(short) => {
                short.copy_from_slice(name);
                short.make_ascii_lowercase();
                short
            }
            None => {
                long = name.to_ascii_lowercase();
                &long
            }
        };
        // A plain head's hop-by-hop lines are those named in the list
        // (RFC 9110 §7.6.1, as `headers::strip_hop_by_hop` drops them).
        if hop_by_hop(name).is_none() {
            line(out, name, value);
        }
    }
    // As hyper: no length for an empty 1xx, 204 or 304 (a 304's length
    // would be the resource's, which an empty body does not give).
    let framing = if bodiless {
        Framing::Length(0)
    } else if let Some(length) = length {
        Framing::Length(length)
    } else if let Some(size) = size {
        write_length(out, size);
        Framing::Length(size)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn write_length(out: &mut Vec<u8>, length: u64) {
    // `write!` would cost ~10× more: this is on every response.
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The current time as an HTTP date, formatted once a second per thread
/// (as hyper caches it).
fn date() -> [u8; 29] {
    thread_local! {
        static CACHED: std::cell::Cell<(u64, [u8; 29])> = const { std::cell::Cell::new((0, [0; 29])) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with(|cached| {
        let (at, text) = cached.get();
        if at == second && text[0] != 0 {
            return text;
        }
        let mut text = [0; 29];
        let formatted = httpdate::fmt_http_date(now);
        if formatted.len() == text.len() {
            text.copy_from_slice(formatted.as_bytes());
        }
        cached.set((second, text));
        text
    })
}

/// One step of writing a response body.
enum Step {
    Frame(Option<Result<http_body::Frame<Bytes>, BoxError>>),
    /// The body has nothing ready: write what is gathered.
    Flush,
    /// The client left while the body waited for its upstream.
    Gone(BoxError),
}

/// Writes the response (its head, the upstream's header lines when they
/// came unparsed, its body); whether the connection can carry another
/// request.
async fn write_response<S>(
    io: &mut Progress<S>,
    read: &mut BytesMut,
    out: &mut Vec<u8>,
    (head, raw, body): (http::response::Parts, Option<RawHead>, Held<ResponseBody>),
    close: bool,
) -> Result<bool, BoxError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    out.clear();
    // hyper's rule: an ended body has length 0, whatever a header says.
    let size = match body.is_end_stream() {
        true => Some(0),
        false => body.size_hint().exact(),
    };
    let mut framing = encode_head(out, &head, raw.as_ref(), size, close);
    // The head's bytes share the upstream connection's read buffer.
    drop((head, raw));
    let mut body = pin!(body);
    let mut ended = framing == Framing::Length(0) || body.is_end_stream();
    while !ended {
        let step = poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
            Poll::Pending if out.is_empty() => poll_gone(io, read, cx).map(Step::Gone),
            Poll::Pending => Poll::Ready(Step::Flush),
        })
        .await;
        let frame = match step {
            Step::Flush => {
                send(io, out, Bytes::new(), body.as_mut()).await?;
                continue;
            }
            Step::Gone(error) => return Err(error),
            Step::Frame(None) => {
                ended = true;
                continue;
            }
            Step::Frame(Some(frame)) => frame?,
        };
        // Trailers are dropped, as hyper drops those the response did not
        // declare (umbra strips `trailer` as hop-by-hop).
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let size = data.len() as u64;
        match &mut framing {
            Framing::Length(left) => {
                if size > *left {
                    return Err("response body longer than its content-length".into());
                }
                *left -= size;
            }
            Framing::Chunked => {
                let _ = write!(out, "{size:X}\r\n");
            }
        }
        if data.len() <= COPY_LIMIT {
            out.extend_from_slice(&data);
            if out.len() >= WRITE_AT {
                send(io, out, Bytes::new(), body.as_mut()).await?;
            }
        } else {
            send(io, out, data, body.as_mut()).await?;
        }
        if framing == Framing::Chunked {
            out.extend_from_slice(b"\r\n");
        }
        ended = body.is_end_stream();
    }
    let complete = match framing {
        Framing::Length(left) => left == 0,
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
    };
    send(io, out, Bytes::new(), body.as_mut()).await?;
    io.flush().await?;
    if out.capacity() > KEEP_BUFFER {
        *out = Vec::new();
    }
    if !complete {
        return Err("response body ended before its content-length".into());
    }
    Ok(!close)
}

/// Writes what `out` gathered, then `data` from where it is (vectored),
/// and empties `out`. The response waits for the client meanwhile, so its
/// send timeout runs whatever the body's last poll found.
async fn send<S: AsyncWrite + Unpin>(
    io: &mut S,
    out: &mut Vec<u8>,
    data: Bytes,
    body: Pin<&mut Held<ResponseBody>>,
) -> Result<(), Error> {
    body.waiting_for_client();
    io.write_all_buf(&mut Buf::chain(&out[..], data)).await?;
    out.clear();
    Ok(())
}

impl<S> Prefixed<S> {
    pub fn new(read: Bytes, io: S) -> Prefixed<S> {
        Prefixed { read, io }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.read.len().min(buf.remaining());
        buf.put_slice(&this.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_head(head: &[u8]) -> (Parsed, BytesMut) {
        let mut read = BytesMut::from(head);
        let parsed = parse(&mut read, &mut Vec::new());
        (parsed, read)
    }

    fn head(status: u16, headers: &[(&str, &str)]) -> http::response::Parts {
        let mut response = http::Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response.into_parts().0
    }

    fn encoded(head: &http::response::Parts, size: Option<u64>, close: bool) -> (String, Framing) {
        let mut out = Vec::new();
        let framing = encode_head(&mut out, head, None, size, close);
        (String::from_utf8(out).unwrap(), framing)
    }

    #[test]
    fn bodiless_requests_are_served_here_and_leave_the_rest_buffered() {
        let (parsed, read) = parse_head(
            b"GET /a?b=c HTTP/1.1\r\nHost: t\r\nX-Two: 1\r\nx-two: 2\r\nConnection: keep-alive, Close\r\n\r\nGET /next",
        );
        let Parsed::Request(request, close) = parsed else {
            panic!("served here");
        };
        assert!(close);
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "/a?b=c");
        assert_eq!(request.version(), Version::HTTP_11);
        let twos: Vec<_> = request.headers().get_all("x-two").iter().collect();
        assert_eq!(twos, ["1", "2"]);
        assert!(request.body().is_none());
        assert_eq!(&read[..], b"GET /next");
        let (parsed, _) = parse_head(b"OPTIONS * HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(parsed, Parsed::Request(ref r, false) if r.method() == Method::OPTIONS));
    }

    #[test]
    fn everything_else_goes_to_hyper_with_every_byte_kept() {
        let cases: [&[u8]; 10] = [
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n",
            b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: t\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"GET / HTTP/1.1\r\nHo st: t\r\n\r\n",
            // httparse takes the target; `Uri` does not (the head is put
            // back in front of what follows).
            b"GET /a<b> HTTP/1.1\r\nHost: t\r\n\r\nmore",
        ];
        for case in cases {
            let (parsed, read) = parse_head(case);
            assert!(
                matches!(parsed, Parsed::Hyper),
                "{}",
                String::from_utf8_lossy(case)
            );
            assert_eq!(&read[..], case);
        }
        let (parsed, read) = parse_head(b"GET / HTTP/1.1\r\nHost: t\r\n");
        assert!(matches!(parsed, Parsed::Partial));
        assert_eq!(read.len(), 25);
    }

    proptest::proptest! {
        /// Any bytes: no panic; a head left to hyper or not yet whole
        /// leaves the buffer as it was, a served one takes exactly its head.
        #[test]
        fn any_bytes_are_served_handed_over_or_kept(
            start in proptest::sample::select(vec![&b"GET / HTTP/1.1\r\n"[..], b"", b"POST /x HTTP/1.1\r\nHost: h\r\n"]),
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            let input = [start, &rest[..]].concat();
            let (parsed, read) = parse_head(&input);
            match parsed {
                Parsed::Request(..) => proptest::prop_assert!(input.ends_with(&read[..])),
                Parsed::Partial | Parsed::Hyper => proptest::prop_assert_eq!(&read[..], &input[..]),
            }
        }
    }

    #[test]
    fn heads_are_framed_as_hyper_frames_them() {
        let (text, framing) = encoded(&head(200, &[("x-a", "1")]), Some(5), false);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 5\r\ndate: "));
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
        assert_eq!(framing, Framing::Length(5));

        // An upstream's length and date are kept; hop-by-hop framing is not.
        let upstream = head(
            201,
            &[
                ("content-length", "7"),
                ("date", "then"),
                ("transfer-encoding", "chunked"),
            ],
        );
        let (text, framing) = encoded(&upstream, None, true);
        assert_eq!(
            text,
            "HTTP/1.1 201 Created\r\ncontent-length: 7\r\ndate: then\r\nconnection: close\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(7));

        let (text, framing) = encoded(&head(502, &[("date", "d")]), None, false);
        assert_eq!(
            text,
            "HTTP/1.1 502 Bad Gateway\r\ndate: d\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);

        // No body, and no length, for 204; a 304 of unknown body keeps the
        // length it states.
        let (text, framing) = encoded(
            &head(204, &[("date", "d"), ("content-length", "0")]),
            Some(0),
            false,
        );
        assert_eq!(text, "HTTP/1.1 204 No Content\r\ndate: d\r\n\r\n");
        assert_eq!(framing, Framing::Length(0));
        let (text, framing) = encoded(
            &head(304, &[("date", "d"), ("content-length", "9")]),
            None,
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 304 Not Modified\r\ndate: d\r\ncontent-length: 9\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(0));
        // An ended body (what a 304 from upstream has) drops the stated
        // length, as hyper does; a 200 with one says 0.
        let (text, _) = encoded(
            &head(304, &[("date", "d"), ("content-length", "9")]),
            Some(0),
            false,
        );
        assert_eq!(text, "HTTP/1.1 304 Not Modified\r\ndate: d\r\n\r\n");
        let (text, framing) = encoded(
            &head(200, &[("date", "d"), ("content-length", "9")]),
            Some(0),
            false,
        );
        assert_eq!(
            text,
            "HTTP/1.1 200 OK\r\ndate: d\r\ncontent-length: 0\r\n\r\n"
        );
        assert_eq!(framing, Framing::Length(0));

        let mut odd = head(599, &[("date", "d")]);
        let (text, _) = encoded(&odd, Some(0), false);
        assert!(text.starts_with("HTTP/1.1 599 <none>\r\n"), "{text}");
        odd.extensions
            .insert(hyper::ext::ReasonPhrase::try_from(&b"Odd One"[..]).unwrap());
        let (text, _) = encoded(&odd, Some(0), false);
        assert!(text.starts_with("HTTP/1.1 599 Odd One\r\n"), "{text}");
    }

    /// Stands in for hyper's connection after a handover: notes when it
    /// is polled (reading what it can) and when it is asked to finish.
    struct Standin {
        io: Prefixed<Progress<tokio::io::DuplexStream>>,
        read: Vec<u8>,
        events: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Future for Standin {
        type Output = Result<(), BoxError>;

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let this = self.get_mut();
            let mut buf = [0; 256];
            loop {
                let mut chunk = ReadBuf::new(&mut buf);
                match Pin::new(&mut this.io).poll_read(cx, &mut chunk) {
                    Poll::Ready(Ok(())) if !chunk.filled().is_empty() => {
                        this.read.extend_from_slice(chunk.filled())
                    }
                    _ => break,
                }
            }
            let read = String::from_utf8_lossy(&this.read).into_owned();
            this.events.lock().unwrap().push(format!("polled: {read}"));
            Poll::Pending
        }
    }

    impl Graceful for Standin {
        fn graceful_shutdown(self: Pin<&mut Self>) {
            self.events.lock().unwrap().push("asked to finish".into());
        }
    }

    /// A connection served here, whose handover goes to a [`Standin`].
    fn served(
        io: tokio::io::DuplexStream,
    ) -> (
        Connection<tokio::io::DuplexStream>,
        Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(crate::metrics::Metrics::new(&mut registry));
        let proxy = Arc::new(Proxy::new(
            Arc::new(crate::config::model::Config::default()),
            metrics,
            crate::accesslog::AccessLog::off(),
            None,
            crate::proxy::MirrorLimits::default(),
        ));
        let addr = "127.0.0.1:1".parse().unwrap();
        let peer = Arc::new(Peer::new(
            addr,
            1,
            false,
            crate::proxy::ClientCert::NotAsked,
        ));
        let activity = Arc::new(Activity::new(Default::default(), false));
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let noted = events.clone();
        let handover: Handover<tokio::io::DuplexStream> = Box::new(move |io| {
            Box::pin(Standin {
                io,
                read: Vec::new(),
                events: noted,
            })
        });
        let io = Progress::new(io, activity.clone());
        let connection = Connection::new(io, proxy, peer, activity, 8192, handover);
        (connection, events)
    }

    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn asked_to_finish_while_idle_the_connection_ends_at_once() {
        let (_client, server) = tokio::io::duplex(1024);
        let (mut connection, _) = served(server);
        assert!(poll_once(&mut connection).is_pending());
        Pin::new(&mut connection).graceful_shutdown();
        assert!(matches!(poll_once(&mut connection), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn a_head_begun_before_the_drain_is_read_by_hyper_before_it_is_asked_to_finish() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut connection, events) = served(server);
        client
            .write_all(b"POST / HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        assert!(poll_once(&mut connection).is_pending());
        Pin::new(&mut connection).graceful_shutdown();
        // A head begun is left to arrive (the idle cut bounds how long).
        assert!(poll_once(&mut connection).is_pending());
        client
            .write_all(b"content-length: 3\r\n\r\nabc")
            .await
            .unwrap();
        assert!(poll_once(&mut connection).is_pending());
        let whole = "POST / HTTP/1.1\r\nHost: t\r\ncontent-length: 3\r\n\r\nabc";
        let events = events.lock().unwrap().clone();
        assert_eq!(
            events,
            [
                format!("polled: {whole}"),
                "asked to finish".into(),
                format!("polled: {whole}"),
            ]
        );
    }

    #[tokio::test]
    async fn a_prefixed_connection_reads_what_was_put_back_first() {
        let (mut near, far) = tokio::io::duplex(64);
        let mut prefixed = Prefixed::new(Bytes::from_static(b"read "), far);
        near.write_all(b"then more").await.unwrap();
        drop(near);
        let mut all = String::new();
        prefixed.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "read then more");
    }
}
