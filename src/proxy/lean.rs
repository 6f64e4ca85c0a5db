//! umbra's own HTTP/1.1 exchange: every shadow's, and the primary's when
//! the request has no body ([`primary`]). A shadow's response is read to
//! its end and dropped (or its head and a prefix of its body kept for the
//! analysis), never streamed anywhere, so it needs none of what hyper's
//! client is built for: no request and response channels between a
//! sending task and a connection task, no body stream handed on, no
//! response head parsed into a header map nobody reads. Measured under
//! callgrind, hyper's client took 16k of the 25k instructions a shadow
//! cost.
//!
//! So the exchange is written out here, with httparse (hyper's own parser)
//! for the response head and chunk sizes: write the request (its body
//! held to the `content-length` it was sent with, or chunked), skip `1xx`
//! heads, then read the body as RFC 9112 §6.3 frames it (none,
//! `content-length`, chunked, or to the connection's end), counting it and
//! keeping what the analysis wants. While a request body goes out the
//! connection is read too: an upstream that answers early (a 413, say)
//! and stops reading is heard at once, whether it closes the connection
//! or not (a `1xx` is not an answer); the connection, its request cut
//! short, is then closed.
//!
//! The primary's exchange shares the request writing and the head parsing,
//! and streams the body instead of reading it ([`primary`]).
//!
//! A connection goes back to the pool only after a complete exchange with
//! nothing left over. A pooled connection the peer closed while it sat
//! idle is noticed when taken from the pool (it reads as ended); if the
//! peer closes it just after, a bodiless GET, HEAD, OPTIONS or TRACE is
//! sent again, once, on a newly dialled connection (as Go's client does:
//! those are safe to replay; never on another pooled one, so a request
//! that makes its upstream close is not sent once per idle connection),
//! anything else fails.

use std::future::{poll_fn, Future};
use std::io::{Cursor, Error, ErrorKind};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::buf::Chain;
use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::dial::Stream;
use super::pool::{Link, Outgoing, Pool, SendError};

pub mod primary;

/// A shadow's response head longer than this is refused (Envoy's default
/// limit is 60 KiB); so is a chunk-size line or a trailer section.
const MAX_HEAD: usize = 64 * 1024;
/// A primary's response head may be as long as hyper's client allows (its
/// read buffer's limit), so a response is read alike whether its request
/// had a body (hyper's exchange) or not (this one).
const MAX_PRIMARY_HEAD: usize = 8192 + 4096 * 100;
/// At most this many header lines, as hyper's client allows.
const MAX_HEADERS: usize = 100;
/// The longest header name `http::HeaderName` takes.
const MAX_NAME: usize = u16::MAX as usize;
/// The smallest read; reads grow while they fill the buffer, as hyper's
/// adaptive reads do, so a large body is not read 8 KiB at a time.
const READ_SIZE: usize = 8 * 1024;
/// The largest read.
const MAX_READ: usize = 256 * 1024;

/// What the caller keeps of a response.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// The response headers (for the analysis); without them the head is
    /// parsed but no header map built.
    pub headers: bool,
    /// Up to this many bytes of the body.
    pub body: usize,
}

/// A shadow's response as far as umbra looks at it.
#[derive(Debug)]
pub struct Answer {
    /// The final status (`1xx` heads are skipped).
    pub status: StatusCode,
    /// Empty unless [`Keep::headers`].
    pub headers: HeaderMap,
    /// The body's first [`Keep::body`] bytes.
    pub kept: Bytes,
    /// The whole body's length.
    pub body_len: u64,
}

/// One upstream connection for umbra's own exchange (`IO` other than a
/// socket in the tests and the fuzz target).
pub struct Lean<IO = Stream> {
    /// The socket, plain or TLS.
    io: IO,
    /// Read buffer, kept across exchanges (empty between them).
    buf: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    /// The last exchange ended cleanly on a connection that stays open.
    clean: bool,
}

/// How the request body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes, as the request's `content-length` says.
    Length(u64),
    Chunked,
}

/// A request body on its way out.
struct Outbound<'a> {
    framing: Framing,
    /// The request's head while it has not gone out: it goes with the
    /// body's first piece when that is ready, one write for both.
    head: &'a [u8],
    /// What is left of its `content-length`.
    left: u64,
    /// What is being written: the head if it has not gone out, then a
    /// chunk's size line, data and CRLF, or the last chunk; for a
    /// `content-length` body, the data alone.
    piece: Option<Piece<'a>>,
    /// Some of the body was taken from its source: the request can no
    /// longer be sent again.
    taken: bool,
    /// The body has ended (its last piece queued).
    ended: bool,
    /// How far the buffer was looked at for an answer.
    seen: usize,
    /// Bytes of `1xx` heads at the buffer's start, left for `receive`.
    interim: usize,
}

type Piece<'a> = Chain<&'a [u8], Chain<Chain<Cursor<SizeLine>, Bytes>, &'static [u8]>>;

/// A chunk's size line (`{hex}\r\n`), kept inline: no allocation per
/// chunk.
#[derive(Default)]
struct SizeLine {
    /// Room for 16 hex digits and CRLF.
    bytes: [u8; 18],
    len: usize,
}

impl SizeLine {
    fn of(size: usize) -> Cursor<SizeLine> {
        let mut line = SizeLine::default();
        let mut rest = &mut line.bytes[..];
        // At most 16 hex digits and CRLF: it fits.
        let _ = std::io::Write::write_fmt(&mut rest, format_args!("{size:x}\r\n"));
        line.len = 18 - rest.len();
        Cursor::new(line)
    }

    fn none() -> Cursor<SizeLine> {
        Cursor::new(SizeLine::default())
    }
}

impl AsRef<[u8]> for SizeLine {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl<'a> Outbound<'a> {
    /// What goes on the wire for `frame`, if anything.
    fn piece_of(&mut self, frame: http_body::Frame<Bytes>) -> Result<Option<Piece<'a>>, Failed> {
        // Trailers are not sent (nor are they by hyper's client unless
        // the request declares them).
        let Ok(data) = frame.into_data() else {
            return Ok(None);
        };
        if data.is_empty() {
            return Ok(None);
        }
        self.taken = true;
        if self.framing == Framing::Chunked {
            return Ok(Some(self.piece(SizeLine::of(data.len()), data, b"\r\n")));
        }
        // More than it said would be read as another request.
        self.left = (self.left.checked_sub(data.len() as u64))
            .ok_or_else(|| invalid("request body longer than its content-length"))?;
        Ok(Some(self.piece(SizeLine::none(), data, b"")))
    }

    /// What goes on the wire once the body has ended.
    fn last_piece(&mut self) -> Result<Option<Piece<'a>>, Failed> {
        match self.framing {
            Framing::Chunked => {
                let last = Bytes::from_static(b"0\r\n\r\n");
                Ok(Some(self.piece(SizeLine::none(), last, b"")))
            }
            _ if self.left > 0 => {
                Err(invalid("request body shorter than its content-length").into())
            }
            _ => Ok(self.head_alone()),
        }
    }

    /// The head by itself, if it has not gone out: a body with nothing
    /// ready must not keep it from the upstream.
    fn head_alone(&mut self) -> Option<Piece<'a>> {
        (!self.head.is_empty()).then(|| self.piece(SizeLine::none(), Bytes::new(), b""))
    }

    /// A piece on the wire: the head if it has not gone out, size line
    /// (chunked), data, end of chunk.
    fn piece(&mut self, line: Cursor<SizeLine>, data: Bytes, end: &'static [u8]) -> Piece<'a> {
        let head = std::mem::take(&mut self.head);
        Buf::chain(head, Buf::chain(Buf::chain(line, data), end))
    }

    /// Writing a piece failed: the request may go again only if nothing
    /// of its body was taken (as when its head alone fails; a failed flush
    /// or read comes after the whole head was written, and may not).
    fn failed(&self, error: Error) -> Failed {
        Failed {
            error,
            resend: !self.taken,
            write: true,
        }
    }
}

/// Writes some of `piece`, vectored where the stream can.
fn poll_write_piece<IO: AsyncWrite>(
    mut io: Pin<&mut IO>,
    cx: &mut Context<'_>,
    piece: &mut Piece<'_>,
) -> Poll<Result<(), Error>> {
    let written = if io.is_write_vectored() {
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        let count = piece.chunks_vectored(&mut slices);
        ready!(io.as_mut().poll_write_vectored(cx, &slices[..count]))?
    } else {
        ready!(io.as_mut().poll_write(cx, piece.chunk()))?
    };
    if written == 0 {
        return Poll::Ready(Err(ErrorKind::WriteZero.into()));
    }
    piece.advance(written);
    Poll::Ready(Ok(()))
}

/// A request ready to go out.
pub struct Prepared {
    /// The request line and headers.
    head: Vec<u8>,
    framing: Framing,
    /// A HEAD: the response has no body whatever its headers say.
    head_only: bool,
    /// It may be sent again when a pooled connection turns out closed
    /// under it.
    replayable: bool,
}

/// An exchange that failed.
#[derive(Debug)]
struct Failed {
    error: Error,
    /// The request may go out again on another connection: nothing of the
    /// response came, and the request can be replayed.
    resend: bool,
    /// Writing to the socket failed (not the body's source): the upstream
    /// may have answered before it stopped reading.
    write: bool,
}

/// How the response body is framed.
#[derive(Debug, PartialEq, Eq)]
enum BodyFraming {
    Length(u64),
    Chunked,
    ToEnd,
}

/// What [`parse_head`] makes of the header lines besides the framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lines {
    /// Nothing (a shadow nobody analyses).
    Skip,
    /// A header map of copies (a shadow's, for the analysis).
    Copy,
    /// Where each line sits in the head (a primary's: its header map is
    /// made of slices of the head, not copies).
    Locate,
}

/// A header line's name and value, as byte ranges of the head.
#[derive(Debug)]
struct Located {
    name: Range<usize>,
    value: Range<usize>,
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    /// Bytes of the head, blank line included.
    length: usize,
    status: StatusCode,
    /// HTTP/1.0 rather than 1.1.
    http10: bool,
    /// The reason phrase, when it is not the status's usual one
    /// ([`Lines::Locate`] only).
    reason: Option<Bytes>,
    /// Empty unless [`Lines::Copy`].
    headers: HeaderMap,
    /// Empty unless [`Lines::Locate`].
    located: Vec<Located>,
    body: BodyFraming,
    /// The connection stays open after this response.
    keep_alive: bool,
    /// Its hop-by-hop headers are only the usual ones: no `Connection`
    /// option but `keep-alive` (an option names a header to drop, even
    /// `close`), no `te`, no `content-length` beside `transfer-encoding`
    /// (dropped, RFC 9112 §6.3), no name too long for a header map. Such a
    /// head can be passed on line by line ([`primary::RawHead`]).
    plain: bool,
}

/// A response body as it streams past: its length, and a prefix kept.
struct Capture {
    /// The first bytes, up to `limit`.
    kept: BytesMut,
    /// [`Keep::body`].
    limit: usize,
    /// Every body byte seen.
    len: u64,
}

impl Failed {
    /// Writing the request (past its head), or reading while it went
    /// out, failed.
    fn writing(error: Error) -> Failed {
        Failed {
            error,
            resend: false,
            write: true,
        }
    }
}

impl From<Error> for Failed {
    fn from(error: Error) -> Failed {
        Failed {
            error,
            resend: false,
            write: false,
        }
    }
}

impl Link for Lean {
    /// An idle connection has nothing to read: bytes or an end mean the
    /// peer closed it or broke the protocol.
    fn reusable(&mut self) -> bool {
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        let cx = &mut Context::from_waker(Waker::noop());
        matches!(
            Pin::new(&mut self.io).poll_read(cx, &mut probe),
            Poll::Pending
        )
    }

    fn poolable(&self) -> bool {
        self.clean
    }
}

fn invalid(what: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidData, what.into())
}

impl Pool<Lean> {
    /// Sends `request` (origin-form URI, Host header set) on a pooled or
    /// new connection and reads the whole response, keeping what `keep`
    /// says.
    pub async fn exchange<B: Outgoing>(
        self: &Arc<Self>,
        request: Request<B>,
        keep: Keep,
    ) -> Result<Answer, SendError> {
        let (parts, body) = request.into_parts();
        self.exchange_prepared(Prepared::new(&parts, &body)?, body, keep)
            .await
    }

    /// [`Pool::exchange`] for a request already encoded.
    pub async fn exchange_prepared<B: Outgoing>(
        self: &Arc<Self>,
        out: Prepared,
        body: B,
        keep: Keep,
    ) -> Result<Answer, SendError> {
        let mut again = false;
        let mut body = Some(body);
        loop {
            let (mut conn, pooled) = self.take(again, |_| true, None, Lean::open).await?;
            conn.served += 1;
            conn.link.clean = false;
            let sent = match &mut body {
                Some(body) => conn.link.send(&out.head, out.framing, body).await,
                // Never: only a replayable request goes again, and its
                // body is kept for that.
                None => Err(invalid("request body already sent").into()),
            };
            if !out.replayable {
                // Never sent again, so what is left of the body (cut short
                // by an early answer: a tee's share of the budget, say) is
                // let go before the answer is read.
                body = None;
            }
            let result = match sent {
                Ok(whole) => (conn.link.receive(out.head_only, keep).await).inspect(|_| {
                    // Part of the request was never sent.
                    conn.link.clean &= whole;
                }),
                // It stopped reading the request: maybe it answered first.
                Err(failed) if failed.write => match conn.link.receive(out.head_only, keep).await {
                    Ok(answer) => {
                        conn.link.clean = false;
                        Ok(answer)
                    }
                    Err(_) => Err(failed),
                },
                Err(failed) => Err(failed),
            };
            match result {
                Ok(answer) => {
                    self.put(conn);
                    return Ok(answer);
                }
                Err(failed) if pooled && failed.resend && out.replayable => {
                    tracing::debug!(error = %failed.error, "pooled shadow connection closed; sending again on a new one");
                    again = true;
                }
                Err(failed) => return Err(SendError::Exchange(failed.error.into())),
            }
        }
    }
}

/// What a shadow changes of its primary's head, so its own is encoded
/// straight from the primary's parts (no copy of its header map).
pub struct Edit<'a, F: Fn(&HeaderName) -> bool> {
    /// The Host to send, in pieces written one after the other; `None`:
    /// the primary's.
    pub host: Option<[&'a str; 3]>,
    /// Whether a header goes out; one that does not is neither sent nor
    /// read for the framing.
    pub keep: F,
}

impl Prepared {
    fn new<B: Body>(parts: &http::request::Parts, body: &B) -> Result<Prepared, SendError> {
        let edit = Edit {
            host: None,
            keep: |_: &HeaderName| true,
        };
        Prepared::edited(parts, body, &edit)
    }

    /// The request `parts` describes, changed by `edit`.
    pub fn edited<B: Body, F: Fn(&HeaderName) -> bool>(
        parts: &http::request::Parts,
        body: &B,
        edit: &Edit<'_, F>,
    ) -> Result<Prepared, SendError> {
        let (head, framing) =
            encode_head(parts, body, edit).map_err(|e| SendError::Exchange(e.into()))?;
        // Safe to send twice (RFC 9110 §9.2.1), and nothing of a body to
        // replay (Go's client's rule).
        let replayable = matches!(framing, Framing::Empty | Framing::Length(0))
            && matches!(
                parts.method,
                Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
            );
        Ok(Prepared {
            head,
            framing,
            head_only: parts.method == Method::HEAD,
            replayable,
        })
    }
}

/// The request line and headers, and how the body is framed: by the
/// `content-length` the request carries, else chunked unless it is
/// known to be empty.
fn encode_head<B: Body, F: Fn(&HeaderName) -> bool>(
    parts: &http::request::Parts,
    body: &B,
    edit: &Edit<'_, F>,
) -> Result<(Vec<u8>, Framing), Error> {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(parts.method.as_str().as_bytes());
    head.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host =
        (edit.host.filter(|_| (edit.keep)(&header::HOST))).map(|pieces| pieces.map(str::as_bytes));
    let mut line = |name: &HeaderName, value: &[&[u8]]| {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        value.iter().for_each(|piece| head.extend_from_slice(piece));
        head.extend_from_slice(b"\r\n");
    };
    for (name, value) in &parts.headers {
        // Hop-by-hop framing is umbra's to set for this connection.
        if name == header::TRANSFER_ENCODING || !(edit.keep)(name) {
            continue;
        }
        match (name == header::HOST, &edit.host) {
            // Sent once, in place of the first.
            (true, Some(_)) => {
                if let Some(pieces) = host.take() {
                    line(name, &pieces);
                }
            }
            _ => line(name, &[value.as_bytes()]),
        }
    }
    if let Some(pieces) = host {
        line(&header::HOST, &pieces);
    }
    let length = Some(&header::CONTENT_LENGTH)
        .filter(|name| (edit.keep)(name))
        .and_then(|name| parts.headers.get(name));
    let framing = match length {
        Some(length) => {
            let length = (length.to_str().ok())
                .and_then(|l| l.parse::<u64>().ok())
                .ok_or_else(|| invalid("invalid content-length in the request"))?;
            Framing::Length(length)
        }
        None if body.is_end_stream() => Framing::Empty,
        None => {
            head.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Framing::Chunked
        }
    };
    head.extend_from_slice(b"\r\n");
    Ok((head, framing))
}

/// Reads one response from `io` as a shadow's is read (what the fuzz
/// target drives with arbitrary bytes).
pub async fn read_response<IO>(io: IO, head_only: bool, keep: Keep) -> Result<Answer, Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut lean = Lean::new(io);
    lean.receive(head_only, keep)
        .await
        .map_err(|failed| failed.error)
}

impl Lean {
    /// A fresh connection made a lean one (it sends nothing).
    async fn open(io: hyper_util::rt::TokioIo<Stream>) -> Result<Lean, SendError> {
        Ok(Lean::new(io.into_inner()))
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Lean<IO> {
    pub(super) fn new(io: IO) -> Lean<IO> {
        Lean {
            io,
            buf: BytesMut::new(),
            read_size: READ_SIZE,
            clean: false,
        }
    }

    /// The socket, to be handed to hyper's client; `None` if bytes past
    /// the last response are buffered (the connection cannot go on).
    pub(super) fn into_io(self) -> Option<IO> {
        self.buf.is_empty().then_some(self.io)
    }

    /// Writes the head and the body, held to its framing; the head goes
    /// in one write with the body's first piece when that is ready. A
    /// failure before any of the body was taken may be sent again; one
    /// after may not. While a body goes out the connection is watched: a
    /// final response head that comes first ends the sending
    /// (`Ok(false)`), as an upstream that refuses a body early (413, 401)
    /// may stop reading it and would otherwise hold the exchange until its
    /// timeout. The request is then incomplete, so the connection must not
    /// be reused.
    async fn send<B: Outgoing>(
        &mut self,
        head: &[u8],
        framing: Framing,
        body: &mut B,
    ) -> Result<bool, Failed> {
        if framing == Framing::Empty {
            if let Err(error) = self.io.write_all(head).await {
                return Err(Failed {
                    error,
                    resend: true,
                    write: true,
                });
            }
            // TLS may hold the last records until flushed.
            return self
                .io
                .flush()
                .await
                .map(|()| true)
                .map_err(Failed::writing);
        }
        let mut out = Outbound {
            framing,
            head,
            left: match framing {
                Framing::Length(length) => length,
                _ => 0,
            },
            piece: None,
            taken: false,
            ended: false,
            seen: 0,
            interim: 0,
        };
        poll_fn(|cx| self.poll_send_body(cx, &mut out, body)).await
    }

    /// Moves the request body along: `true` once it is all written and
    /// flushed, `false` if a final response head came first.
    fn poll_send_body<B: Outgoing>(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbound<'_>,
        body: &mut B,
    ) -> Poll<Result<bool, Failed>> {
        loop {
            if let Some(piece) = &mut out.piece {
                match poll_write_piece(Pin::new(&mut self.io), cx, piece) {
                    Poll::Ready(Ok(())) => {
                        if !piece.has_remaining() {
                            out.piece = None;
                        }
                        continue;
                    }
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(out.failed(error))),
                    Poll::Pending => {}
                }
            } else if !out.ended {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        out.piece = out.piece_of(frame)?;
                        continue;
                    }
                    Poll::Ready(Some(Err(error))) => {
                        return Poll::Ready(Err(Error::other(error.into()).into()))
                    }
                    Poll::Ready(None) => {
                        out.ended = true;
                        out.piece = out.last_piece()?;
                        continue;
                    }
                    Poll::Pending if !out.head.is_empty() => {
                        out.piece = out.head_alone();
                        continue;
                    }
                    Poll::Pending => {}
                }
            } else {
                // TLS may hold the last records until flushed.
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(flushed) => {
                        return Poll::Ready(flushed.map(|()| true).map_err(Failed::writing))
                    }
                    Poll::Pending => {}
                }
            }
            // Waiting on the socket or on the body: has the upstream
            // answered? A read error counts as a write's: whatever answer
            // came before it is still read.
            return match ready!(self.poll_read_some(cx)) {
                Ok(0) => Poll::Ready(Ok(false)),
                Ok(_) if self.answer_came(out) => Poll::Ready(Ok(false)),
                Ok(_) => continue,
                Err(error) => Poll::Ready(Err(Failed::writing(error))),
            };
        }
    }

    /// Whether the buffer holds a final response head past any `1xx` (or
    /// bytes that are no head, or a head over the limit, for `receive` to
    /// report). Parses again only when a line has ended since the last
    /// look, from past the `1xx` heads already seen.
    fn answer_came(&self, out: &mut Outbound) -> bool {
        while self.line_since(out.seen) {
            match parse_head(&self.buf[out.interim..], Lines::Skip) {
                Ok(Some(head)) if head.interim() => {
                    out.interim += head.length;
                    out.seen = out.interim;
                }
                Ok(Some(_)) | Err(_) => return true,
                Ok(None) => out.seen = self.buf.len(),
            }
        }
        // Bounded: `1xx` heads without end, or an endless head, stop the
        // sending too.
        self.buf.len() >= MAX_HEAD
    }

    /// Reads more into the buffer; an end is an error naming `during`.
    async fn fill(&mut self, during: &str) -> Result<(), Error> {
        poll_fn(|cx| self.poll_fill(cx, during)).await
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, during: &str) -> Poll<Result<(), Error>> {
        match ready!(self.poll_read_some(cx))? {
            0 => Poll::Ready(Err(Error::new(
                ErrorKind::UnexpectedEof,
                format!("connection closed during the response {during}"),
            ))),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Reads what has come into the buffer (0: the connection ended).
    fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<Result<usize, Error>> {
        if self.buf.capacity() - self.buf.len() < self.read_size / 2 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        // The future keeps no state between polls: made anew each time.
        let read = ready!(pin!(self.io.read_buf(&mut self.buf)).poll(cx))?;
        self.read_size = next_read_size(self.read_size, read, room);
        Poll::Ready(Ok(read))
    }

    /// Whether a line ended in the buffer past its first `seen` bytes.
    fn line_since(&self, seen: usize) -> bool {
        line_since(&self.buf, seen)
    }

    /// Reads the response: `1xx` heads skipped, the final head, the body.
    async fn receive(&mut self, head_only: bool, keep: Keep) -> Result<Answer, Failed> {
        let lines = if keep.headers {
            Lines::Copy
        } else {
            Lines::Skip
        };
        let head = self.read_head(lines, MAX_HEAD).await?;
        self.buf.advance(head.length);
        let mut body = Capture::new(keep.body);
        let to_end = match head.body {
            _ if head.bodiless(head_only) => false,
            BodyFraming::Length(length) => {
                self.take(length, &mut body).await?;
                false
            }
            BodyFraming::Chunked => {
                self.chunks(&mut body).await?;
                false
            }
            BodyFraming::ToEnd => {
                self.rest(&mut body).await?;
                true
            }
        };
        // Bytes past the response would be a response to nothing.
        self.clean =
            !to_end && head.keep_alive && self.buf.is_empty() && head.status.as_u16() != 101;
        Ok(Answer {
            status: head.status,
            headers: head.headers,
            kept: body.kept.freeze(),
            body_len: body.len,
        })
    }

    /// Reads up to the final response head (`1xx` heads skipped), which is
    /// left at the start of the buffer; a head over `limit` bytes is an
    /// error.
    async fn read_head(&mut self, lines: Lines, limit: usize) -> Result<Head, Failed> {
        let mut anything = false;
        let mut seen = 0;
        loop {
            let parsed = match self.line_since(seen) {
                true => parse_head(&self.buf, lines)?,
                false => None,
            };
            match parsed {
                Some(head) if head.interim() => {
                    self.buf.advance(head.length);
                    seen = 0;
                }
                Some(head) => return Ok(head),
                None if self.buf.len() >= limit => {
                    let error = format!("response head over {} KiB", limit / 1024);
                    return Err(invalid(error).into());
                }
                None => {
                    seen = self.buf.len();
                    if let Err(error) = self.fill("head").await {
                        // Nothing at all came: the peer closed (or reset) a
                        // pooled connection as the request went out.
                        let resend = !anything
                            && matches!(
                                error.kind(),
                                ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                            );
                        return Err(Failed {
                            error,
                            resend,
                            write: false,
                        });
                    }
                    anything = true;
                }
            }
        }
    }

    /// Takes `length` body bytes.
    async fn take(&mut self, mut length: u64, body: &mut Capture) -> Result<(), Error> {
        while length > 0 {
            if self.buf.is_empty() {
                self.fill("body").await?;
            }
            let n = self
                .buf
                .len()
                .min(usize::try_from(length).unwrap_or(usize::MAX));
            body.add(&self.buf[..n]);
            self.buf.advance(n);
            length -= n as u64;
        }
        Ok(())
    }

    /// Takes everything up to the connection's end.
    async fn rest(&mut self, body: &mut Capture) -> Result<(), Error> {
        loop {
            body.add(&self.buf);
            self.buf.clear();
            if poll_fn(|cx| self.poll_read_some(cx)).await? == 0 {
                return Ok(());
            }
        }
    }

    /// Takes a chunked body, trailers dropped.
    async fn chunks(&mut self, body: &mut Capture) -> Result<(), Error> {
        loop {
            let mut seen = 0;
            let size = loop {
                if !self.line_since(seen) && self.buf.len() < MAX_HEAD {
                    seen = self.buf.len();
                    self.fill("body").await?;
                    continue;
                }
                // httparse reads an empty line as a last chunk of size 0.
                let starts_hex = self.buf.first().map(u8::is_ascii_hexdigit);
                match httparse::parse_chunk_size(&self.buf) {
                    Ok(httparse::Status::Complete((length, size))) if starts_hex == Some(true) => {
                        self.buf.advance(length);
                        break size;
                    }
                    _ => return Err(invalid("invalid chunk size line in the response body")),
                }
            };
            if size == 0 {
                return self.trailers().await;
            }
            self.take(size, body).await?;
            while self.buf.len() < 2 {
                self.fill("body").await?;
            }
            if &self.buf[..2] != b"\r\n" {
                return Err(invalid(
                    "chunk data not followed by CRLF in the response body",
                ));
            }
            self.buf.advance(2);
        }
    }

    /// Skips the trailer section after the last chunk: lines up to an
    /// empty one, at most `MAX_HEAD` bytes in all.
    async fn trailers(&mut self) -> Result<(), Error> {
        let (mut skipped, mut seen) = (0, 0);
        loop {
            if !self.line_since(seen) && skipped + self.buf.len() < MAX_HEAD {
                seen = self.buf.len();
                self.fill("trailers").await?;
                continue;
            }
            match memchr::memmem::find(&self.buf, b"\r\n") {
                Some(0) => {
                    self.buf.advance(2);
                    return Ok(());
                }
                Some(end) if skipped + end < MAX_HEAD => {
                    skipped += end + 2;
                    self.buf.advance(end + 2);
                    seen = 0;
                }
                None if skipped + self.buf.len() < MAX_HEAD => self.fill("trailers").await?,
                _ => return Err(invalid("response trailers over 64 KiB")),
            }
        }
    }
}

impl Capture {
    fn new(limit: usize) -> Capture {
        Capture {
            kept: BytesMut::new(),
            limit,
            len: 0,
        }
    }

    /// Counts `bytes`, keeping what the limit still allows. Copied: a
    /// slice of the read buffer would pin it until the analysis ran.
    fn add(&mut self, bytes: &[u8]) {
        let room = self.limit - self.kept.len();
        if room > 0 {
            self.kept.extend_from_slice(&bytes[..room.min(bytes.len())]);
        }
        self.len += bytes.len() as u64;
    }
}

/// The next read's size after `read` bytes came into `room`: twice as
/// much while reads fill the buffer, half as much once they come in at a
/// quarter of it or less.
fn next_read_size(current: usize, read: usize, room: usize) -> usize {
    if read >= room {
        (current * 2).min(MAX_READ)
    } else if read <= current / 4 {
        (current / 2).max(READ_SIZE)
    } else {
        current
    }
}

impl Head {
    /// A `1xx` head the final one follows (`101` ends the exchange).
    fn interim(&self) -> bool {
        self.status.is_informational() && self.status != StatusCode::SWITCHING_PROTOCOLS
    }

    /// Whether the response has no body whatever its headers say (RFC
    /// 9112 §6.3): to a HEAD, `1xx`, `204` and `304`.
    fn bodiless(&self, head_only: bool) -> bool {
        head_only
            || self.status.is_informational()
            || self.status == StatusCode::NO_CONTENT
            || self.status == StatusCode::NOT_MODIFIED
    }
}

/// Whether a line ended in `buf` past its first `seen` bytes: only then
/// can a head, a chunk-size line or a trailer section be complete, so one
/// trickled in is not parsed again for every byte (the server's request
/// heads too).
pub(crate) fn line_since(buf: &[u8], seen: usize) -> bool {
    buf.get(seen..)
        .is_some_and(|new| memchr::memchr(b'\n', new).is_some())
}

/// Parses a complete response head at the start of `buf` (`None`: not all
/// of it is in yet), its header lines kept as `lines` says.
fn parse_head(buf: &[u8], lines: Lines) -> Result<Option<Head>, Error> {
    // Left uninitialised, as hyper does: zeroing a hundred slots costs
    // more than parsing a small head.
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let length = match parser.parse_response_with_uninit_headers(&mut response, buf, &mut slots) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(invalid(format!("invalid response head: {error}"))),
    };
    let status = (response.code)
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| invalid("invalid response status"))?;
    let http10 = response.version == Some(0);
    let reason = match (lines, response.reason) {
        (Lines::Locate, Some(reason)) if Some(reason) != status.canonical_reason() => {
            Some(Bytes::copy_from_slice(reason.as_bytes()))
        }
        _ => None,
    };
    let (mut close, mut keep_alive_token, mut plain) = (false, false, true);
    let mut length_header: Option<u64> = None;
    // The last transfer coding, when there is a Transfer-Encoding.
    let mut coding: Option<&[u8]> = None;
    let mut headers = HeaderMap::new();
    let mut located = Vec::new();
    match lines {
        Lines::Skip => {}
        Lines::Copy => headers.reserve(response.headers.len()),
        Lines::Locate => located.reserve_exact(response.headers.len()),
    }
    // A slice of `buf` as a range of it.
    let range = |part: &[u8]| {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + part.len()
    };
    for line in response.headers.iter() {
        let name = line.name.as_bytes();
        // By length first: most headers are none of these three.
        let is = |wanted: &[u8]| name.len() == wanted.len() && name.eq_ignore_ascii_case(wanted);
        if is(b"content-length") {
            // Repeated values must agree (RFC 9112 §6.3).
            for value in line.value.split(|&b| b == b',') {
                let value = std::str::from_utf8(value.trim_ascii()).ok();
                let parsed = value
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| invalid("invalid content-length in the response"))?;
                if length_header.is_some_and(|seen| seen != parsed) {
                    return Err(invalid("conflicting content-length values in the response"));
                }
                length_header = Some(parsed);
            }
        } else if is(b"transfer-encoding") {
            let last = line.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            coding = Some(last.trim_ascii());
        } else if is(b"connection") {
            for token in line.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                let (is_close, is_keep_alive) = (
                    token.eq_ignore_ascii_case(b"close"),
                    token.eq_ignore_ascii_case(b"keep-alive"),
                );
                close |= is_close;
                keep_alive_token |= is_keep_alive;
                plain &= is_keep_alive || token.is_empty();
            }
        } else if is(b"te") || name.len() > MAX_NAME {
            plain = false;
        }
        match lines {
            Lines::Skip => {}
            Lines::Copy => {
                let name = HeaderName::from_bytes(name);
                let value = HeaderValue::from_bytes(line.value);
                if let (Ok(name), Ok(value)) = (name, value) {
                    headers.append(name, value);
                }
            }
            Lines::Locate => located.push(Located {
                name: range(name),
                value: range(line.value),
            }),
        }
    }
    let mut keep_alive = !close && (!http10 || keep_alive_token);
    plain &= coding.is_none() || length_header.is_none();
    if http10 && coding.is_some() {
        // RFC 9112 §6.1: faulty framing (hyper's client refuses it too).
        return Err(invalid("transfer-encoding in an HTTP/1.0 response"));
    }
    // RFC 9112 §6.3: Transfer-Encoding wins over Content-Length, and then
    // the connection cannot be trusted; a last coding other than chunked is
    // read to the connection's end.
    let body = match (coding, length_header) {
        (Some(coding), length) => {
            keep_alive &= length.is_none();
            if coding.eq_ignore_ascii_case(b"chunked") {
                BodyFraming::Chunked
            } else {
                keep_alive = false;
                BodyFraming::ToEnd
            }
        }
        (None, Some(length)) => BodyFraming::Length(length),
        // Unless the response has no body at all (HEAD, 204, 304), which
        // the exchange knows: then the connection stays open.
        (None, None) => BodyFraming::ToEnd,
    };
    Ok(Some(Head {
        length,
        status,
        http10,
        reason,
        headers,
        located,
        body,
        keep_alive,
        plain,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes(), Lines::Copy).unwrap().unwrap()
    }

    #[test]
    fn heads_are_framed_as_rfc_9112_says() {
        let plain = head("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello");
        assert_eq!((plain.length, plain.status), (46, StatusCode::OK));
        assert_eq!(plain.body, BodyFraming::Length(5));
        assert!(plain.keep_alive);
        assert_eq!(plain.headers["x-a"], "1");

        let chunked = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(chunked.body, BodyFraming::Chunked);
        assert!(chunked.keep_alive);
        let not_last = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n");
        assert_eq!(not_last.body, BodyFraming::ToEnd);
        assert!(!not_last.keep_alive);
        let coded = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(
            coded.body,
            BodyFraming::ToEnd,
            "a coding other than chunked: to the end"
        );
        assert!(!coded.keep_alive);
        let old_close =
            head("HTTP/1.0 200 OK\r\nconnection: close, keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(!old_close.keep_alive, "close wins");

        let both =
            head("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(both.body, BodyFraming::Chunked);
        assert!(!both.keep_alive, "a response framed both ways closes");

        let repeated = head("HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n");
        assert_eq!(repeated.body, BodyFraming::Length(4));
        let close = head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n");
        assert!(!close.keep_alive);
        let old = head("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert!(!old.keep_alive);
        let old_kept =
            head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n");
        assert!(old_kept.keep_alive);
        let unframed = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(unframed.body, BodyFraming::ToEnd);

        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le", Lines::Copy)
            .unwrap()
            .is_none());
        let unkept = parse_head(b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n", Lines::Skip);
        assert!(unkept.unwrap().unwrap().headers.is_empty());
    }

    #[test]
    fn bad_heads_are_errors() {
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 4, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length:\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
            // No transfer codings in HTTP/1.0 (RFC 9112 §6.1).
            "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert!(parse_head(bad.as_bytes(), Lines::Skip).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_grow_while_they_fill_the_buffer_and_shrink_when_they_do_not() {
        let mut size = READ_SIZE;
        for _ in 0..10 {
            size = next_read_size(size, size, size);
        }
        assert_eq!(size, MAX_READ, "doubled up to the cap");
        assert_eq!(
            next_read_size(size, size / 2, size),
            size,
            "half full: kept"
        );
        assert_eq!(next_read_size(size, 100, size), size / 2);
        assert_eq!(next_read_size(READ_SIZE, 1, READ_SIZE), READ_SIZE, "floor");
    }

    #[test]
    fn request_heads_carry_their_framing() {
        let request = |builder: http::request::Builder, body: &'static str| {
            let body = http_body_util::Full::new(Bytes::from_static(body.as_bytes()));
            let request = builder.body(body).unwrap();
            let (parts, body) = request.into_parts();
            let edit = Edit {
                host: None,
                keep: |_: &HeaderName| true,
            };
            let (head, framing) = encode_head(&parts, &body, &edit).unwrap();
            (String::from_utf8(head).unwrap(), framing)
        };
        let (head, framing) = request(
            Request::get("/a?b=1")
                .header("host", "svc-shadow")
                .header("transfer-encoding", "chunked"),
            "",
        );
        assert_eq!(head, "GET /a?b=1 HTTP/1.1\r\nhost: svc-shadow\r\n\r\n");
        assert_eq!(framing, Framing::Empty);
        let (head, framing) = request(Request::post("/").header("content-length", "2"), "hi");
        assert_eq!(head, "POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n");
        assert_eq!(framing, Framing::Length(2));
        let (head, framing) = request(Request::put("/x"), "hi");
        assert_eq!(
            head,
            "PUT /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(framing, Framing::Chunked);
    }

    #[test]
    fn an_edited_head_swaps_the_host_once_and_leaves_out_what_it_drops() {
        let encode = |request: Request<http_body_util::Empty<Bytes>>, host, dropped: &str| {
            let (parts, body) = request.into_parts();
            let edit = Edit {
                host,
                keep: |name: &HeaderName| name.as_str() != dropped,
            };
            let (head, framing) = encode_head(&parts, &body, &edit).unwrap();
            (String::from_utf8(head).unwrap(), framing)
        };
        let request = || {
            Request::delete("/d?x")
                .header("host", "svc:80")
                .header("x-secret", "1")
                .header("host", "other")
                .header("content-length", "0")
                .body(http_body_util::Empty::new())
                .unwrap()
        };
        let shadow = Some(["svc", "-shadow", ":80"]);
        assert_eq!(
            encode(request(), shadow, "x-secret"),
            (
                "DELETE /d?x HTTP/1.1\r\nhost: svc-shadow:80\r\ncontent-length: 0\r\n\r\n".into(),
                Framing::Length(0)
            )
        );
        // Without its content-length the body's own end frames it.
        let (head, framing) = encode(request(), None, "content-length");
        assert_eq!(
            (head.as_str(), framing),
            (
                "DELETE /d?x HTTP/1.1\r\nhost: svc:80\r\nhost: other\r\nx-secret: 1\r\n\r\n",
                Framing::Empty
            )
        );
        // A request without a Host gets the shadow's; one whose Host is
        // dropped gets none.
        let bare = Request::get("/")
            .body(http_body_util::Empty::new())
            .unwrap();
        let (head, _) = encode(bare, shadow, "");
        assert_eq!(head, "GET / HTTP/1.1\r\nhost: svc-shadow:80\r\n\r\n");
        let (head, _) = encode(request(), shadow, "host");
        assert!(!head.contains("host:"), "{head}");
    }

    /// What a scripted upstream saw: each request, raw, and how many
    /// connections it accepted.
    #[derive(Default)]
    pub(super) struct Seen {
        pub(super) requests: Vec<String>,
        pub(super) connections: usize,
    }

    /// An upstream answering the n-th connection's requests with
    /// `script[n]`, one response per request, then closing it. An empty
    /// response closes it as that request arrives: a keep-alive connection
    /// the upstream drops just as the next request reaches it.
    pub(super) async fn scripted<L: Link>(
        script: Vec<Vec<&'static [u8]>>,
    ) -> (Arc<Pool<L>>, Arc<std::sync::Mutex<Seen>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint: http::Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        let record = seen.clone();
        tokio::spawn(async move {
            for responses in script {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                record.lock().unwrap().connections += 1;
                let record = record.clone();
                tokio::spawn(async move {
                    for response in responses {
                        let Some(request) = read_request(&mut stream).await else {
                            return;
                        };
                        record.lock().unwrap().requests.push(request);
                        if response.is_empty() {
                            return;
                        }
                        stream.write_all(response).await.unwrap();
                    }
                });
            }
        });
        (pool_to(endpoint), seen)
    }

    /// A pool for the upstream at `endpoint`.
    fn pool_to<L: Link>(endpoint: http::Uri) -> Arc<Pool<L>> {
        let dialer = super::super::dial::Dialer::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
            endpoint,
            None,
            std::time::Duration::from_secs(5),
        );
        Arc::new(Pool::new(
            dialer,
            std::time::Duration::from_secs(60),
            None,
            None,
        ))
    }

    /// One request off `stream`: its head, and a content-length or
    /// chunked body.
    pub(super) async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<String> {
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            (stream.read(&mut byte).await.ok()? == 1).then_some(())?;
            raw.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        if let Some(length) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            let mut body = vec![0u8; length.trim().parse().unwrap()];
            stream.read_exact(&mut body).await.ok()?;
            raw.extend_from_slice(&body);
        } else if head.contains("transfer-encoding: chunked") {
            while !raw.ends_with(b"\r\n0\r\n\r\n") {
                (stream.read(&mut byte).await.ok()? == 1).then_some(())?;
                raw.push(byte[0]);
            }
        }
        Some(String::from_utf8_lossy(&raw).into_owned())
    }

    pub(super) fn get(path: &str) -> Request<http_body_util::Empty<Bytes>> {
        Request::get(path)
            .header("host", "svc-shadow")
            .body(Default::default())
            .unwrap()
    }

    /// `pool.exchange`, bounded: a framing mistake would hang, not fail.
    async fn exchange<B: Outgoing>(
        pool: &Arc<Pool<Lean>>,
        request: Request<B>,
        keep: Keep,
    ) -> Result<Answer, SendError> {
        let patience = std::time::Duration::from_secs(10);
        let exchange = pool.exchange(request, keep);
        tokio::time::timeout(patience, exchange)
            .await
            .expect("the exchange hung")
    }

    const EVERYTHING: Keep = Keep {
        headers: true,
        body: usize::MAX,
    };

    #[tokio::test]
    async fn bodies_are_read_by_their_framing_and_connections_reused() {
        let (pool, seen) = scripted(vec![vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-v: 2\r\n\r\nhello",
            b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: t\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n",
        ]])
        .await;
        let first = exchange(&pool, get("/a"), EVERYTHING).await.unwrap();
        assert_eq!((first.status, first.body_len), (StatusCode::OK, 5));
        assert_eq!(first.headers["x-v"], "2");
        assert_eq!(&first.kept[..], b"hello");
        let keep = Keep {
            headers: false,
            body: 4,
        };
        let chunked = exchange(&pool, get("/b"), keep).await.unwrap();
        assert_eq!((chunked.status, chunked.body_len), (StatusCode::CREATED, 5));
        assert_eq!(&chunked.kept[..], b"abcd", "4 bytes, across chunks");
        assert!(chunked.headers.is_empty());
        let empty = exchange(&pool, get("/c"), EVERYTHING).await.unwrap();
        assert_eq!((empty.status, empty.body_len), (StatusCode::NO_CONTENT, 0));
        let head = Request::head("/d")
            .header("host", "svc-shadow")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let head = exchange(&pool, head, EVERYTHING).await.unwrap();
        assert_eq!(
            (head.status, head.body_len),
            (StatusCode::OK, 0),
            "HEAD: no body"
        );
        assert_eq!(pool.idle_count(), 1);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 1, "one connection carried all four");
        assert_eq!(
            seen.requests[0],
            "GET /a HTTP/1.1\r\nhost: svc-shadow\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn a_body_to_the_connections_end_is_read_and_the_connection_closed() {
        let (pool, _) = scripted(vec![vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end"]]).await;
        let answer = exchange(&pool, get("/"), EVERYTHING);
        let patience = std::time::Duration::from_secs(10);
        let answer = tokio::time::timeout(patience, answer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&answer.kept[..], b"until the end");
        assert_eq!(pool.idle_count(), 0, "read to its end, it is not pooled");
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_under_the_request_is_replaced() {
        let (pool, seen) = scripted(vec![
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b""],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"],
        ])
        .await;
        exchange(&pool, get("/1"), EVERYTHING).await.unwrap();
        // The upstream closes the pooled connection as the second request
        // reaches it: sent again on a new one.
        let second = exchange(&pool, get("/2"), EVERYTHING).await.unwrap();
        assert_eq!(&second.kept[..], b"ok");
        let seen = seen.lock().unwrap();
        assert_eq!(seen.connections, 2);
        let paths: Vec<&str> = seen.requests.iter().map(|r| &r[..6]).collect();
        assert_eq!(paths, ["GET /1", "GET /2", "GET /2"]);
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_goes_chunked() {
        use http_body::Frame;
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (pool, seen) = scripted(vec![vec![ok]]).await;
        let frames = ["ab", "", "cde"]
            .map(|part| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(part))));
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let request = Request::post("/up")
            .header("host", "svc-shadow")
            .body(body)
            .unwrap();
        exchange(&pool, request, EVERYTHING).await.unwrap();
        assert_eq!(
            seen.lock().unwrap().requests[0],
            "POST /up HTTP/1.1\r\nhost: svc-shadow\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn garbage_and_short_bodies_are_errors() {
        let (pool, _) = scripted(vec![
            vec![b"\x16\x03\x01 not http\r\n\r\n"],
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"],
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"],
        ])
        .await;
        for expected in [
            "invalid response head",
            "connection closed during the response body",
            "invalid chunk size",
        ] {
            let error = exchange(&pool, get("/"), EVERYTHING).await.unwrap_err();
            assert!(error.to_string().contains(expected), "{error}");
        }
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn only_safe_bodiless_requests_are_sent_again() {
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (pool, seen) = scripted(vec![vec![ok, b""], vec![ok]]).await;
        exchange(&pool, get("/1"), EVERYTHING).await.unwrap();
        let post = Request::post("/charge")
            .header("host", "svc-shadow")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let error = exchange(&pool, post, EVERYTHING).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains("closed during the response head"),
            "{error}"
        );
        let seen = seen.lock().unwrap();
        assert_eq!(
            (seen.connections, seen.requests.len()),
            (1, 2),
            "the POST went out once"
        );
    }

    #[tokio::test]
    async fn a_body_is_held_to_its_content_length() {
        use http_body::Frame;
        let ok: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (pool, seen) = scripted(vec![vec![ok], vec![ok]]).await;
        let post = |length: &str, parts: &'static [&'static str]| {
            let frames = parts
                .iter()
                .map(|p| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(*p))));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            Request::post("/")
                .header("host", "svc-shadow")
                .header("content-length", length)
                .body(body)
                .unwrap()
        };
        let smuggled = post("2", &["hi", "GET /smuggled HTTP/1.1\r\n\r\n"]);
        let error = exchange(&pool, smuggled, EVERYTHING).await.unwrap_err();
        assert!(
            error.to_string().contains("longer than its content-length"),
            "{error}"
        );
        let short = post("5", &["hi"]);
        let error = exchange(&pool, short, EVERYTHING).await.unwrap_err();
        assert!(
            error
                .to_string()
                .contains("shorter than its content-length"),
            "{error}"
        );
        assert_eq!(pool.idle_count(), 0, "neither connection is pooled");
        assert!(seen
            .lock()
            .unwrap()
            .requests
            .iter()
            .all(|r| !r.contains("smuggled")));
    }

    #[tokio::test]
    async fn connections_with_leftovers_or_closing_are_not_pooled() {
        let (pool, _) = scripted(vec![
            vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA"],
            vec![b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"],
            vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n\r\n\r\n"],
        ])
        .await;
        for _ in 0..2 {
            let answer = exchange(&pool, get("/"), EVERYTHING).await.unwrap();
            assert_eq!(&answer.kept[..], b"ok");
            assert_eq!(pool.idle_count(), 0);
        }
        // An empty line is not a last chunk.
        let error = exchange(&pool, get("/"), EVERYTHING).await.unwrap_err();
        assert!(error.to_string().contains("invalid chunk size"), "{error}");
        assert_eq!(pool.idle_count(), 0);
    }

    /// Thousands of one-byte chunks, all kept: linear work (summing what
    /// was kept at every chunk took minutes).
    #[tokio::test]
    async fn tiny_chunks_are_kept_in_linear_time() {
        let mut response = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..50_000 {
            response.extend_from_slice(b"1\r\nx\r\n");
        }
        response.extend_from_slice(b"0\r\n\r\n");
        let (pool, _) = scripted(vec![vec![response.leak()]]).await;
        let answer = exchange(&pool, get("/"), EVERYTHING).await.unwrap();
        assert_eq!((answer.body_len, answer.kept.len()), (50_000, 50_000));
    }

    /// An endless request body of 1 KiB chunks.
    fn endless() -> impl Outgoing {
        static CHUNK: [u8; 1024] = [b'x'; 1024];
        let chunks = futures_util::stream::repeat_with(|| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(&CHUNK)))
        });
        http_body_util::StreamBody::new(chunks)
    }

    #[test]
    fn size_lines_fit_any_chunk() {
        let line = |size| SizeLine::of(size).into_inner().as_ref().to_vec();
        assert_eq!(line(0x3f66), b"3f66\r\n");
        assert_eq!(line(usize::MAX), b"ffffffffffffffff\r\n");
    }

    #[tokio::test]
    async fn a_final_answer_while_the_body_goes_out_ends_the_sending() {
        let (io, mut upstream) = tokio::io::duplex(4096);
        let mut lean = Lean::new(io);
        let refusal = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
        upstream.write_all(refusal).await.unwrap();
        let head = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut body = endless();
        let sending = lean.send(head, Framing::Chunked, &mut body);
        let sent = tokio::time::timeout(std::time::Duration::from_secs(10), sending)
            .await
            .expect("the sending never ended");
        assert!(!sent.unwrap(), "cut short by the answer");
        let answer = lean.receive(false, EVERYTHING).await.unwrap();
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test]
    async fn an_interim_answer_does_not_end_the_sending() {
        use futures_util::FutureExt;
        let (io, mut upstream) = tokio::io::duplex(64 << 10);
        let mut lean = Lean::new(io);
        let (frames, waiting) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stream = futures_util::stream::unfold(waiting, |mut waiting| async move {
            let frame = http_body::Frame::data(waiting.recv().await?);
            Some((Ok::<_, std::convert::Infallible>(frame), waiting))
        });
        let mut body = http_body_util::StreamBody::new(Box::pin(stream));
        upstream
            .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .unwrap();
        {
            let head = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
            let mut sending = std::pin::pin!(lean.send(head, Framing::Chunked, &mut body));
            // Waiting for the body, it has read the 100 and goes on.
            assert!(sending.as_mut().now_or_never().is_none());
            frames.send(Bytes::from_static(b"abc")).unwrap();
            drop(frames);
            assert!(sending.await.unwrap(), "sent whole");
        }
        assert!(lean.buf.starts_with(b"HTTP/1.1 100"), "read while sending");
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        upstream.write_all(ok).await.unwrap();
        let answer = lean.receive(false, EVERYTHING).await.unwrap();
        assert_eq!(
            (answer.status, &answer.kept[..]),
            (StatusCode::OK, &b"ok"[..])
        );
        let mut sent = [0u8; 256];
        let length = upstream.read(&mut sent).await.unwrap();
        assert_eq!(
            &sent[..length],
            b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        );
    }

    #[tokio::test]
    async fn an_endless_head_while_the_body_goes_out_is_bounded() {
        let (io, mut upstream) = tokio::io::duplex(4096);
        let mut lean = Lean::new(io);
        let head = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut body = endless();
        let endless_head = async move {
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\nx-long: ")
                .await
                .unwrap();
            loop {
                if upstream.write_all(&[b'a'; 1024]).await.is_err() {
                    return;
                }
            }
        };
        let sending = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            lean.send(head, Framing::Chunked, &mut body),
        );
        let sent = tokio::select! {
            sent = sending => sent.expect("the sending never ended"),
            () = endless_head => unreachable!("the upstream stops only when the exchange is gone"),
        };
        assert!(!sent.unwrap(), "cut short");
        assert!(
            lean.buf.len() < MAX_HEAD + MAX_READ,
            "{} bytes held",
            lean.buf.len()
        );
        let error = lean.receive(false, EVERYTHING).await.unwrap_err();
        assert!(
            error.error.to_string().contains("over 64 KiB"),
            "{:?}",
            error
        );
    }

    /// An upstream that refuses the body at once, then neither reads nor
    /// closes: its refusal is the answer (not the shadow's timeout), and
    /// the connection, its request cut short, is not pooled (with a
    /// `content-length` body the rest would be read as the next request).
    #[tokio::test]
    async fn an_early_answer_on_a_connection_left_open_is_heard() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (done, held) = tokio::sync::watch::channel(());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut held = held.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        stream.read_exact(&mut byte).await.unwrap();
                        head.push(byte[0]);
                    }
                    let refusal = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n";
                    stream.write_all(refusal).await.unwrap();
                    // Open and unread until the test is over.
                    let _ = held.changed().await;
                });
            }
        });
        let pool = pool_to(endpoint);
        let chunked = Request::post("/upload")
            .header("host", "svc-shadow")
            .body(http_body_util::Either::Left(endless()))
            .unwrap();
        let big = Bytes::from(vec![b'x'; 64 << 20]);
        let sized = Request::post("/upload")
            .header("host", "svc-shadow")
            .header("content-length", big.len().to_string())
            .body(http_body_util::Either::Right(http_body_util::Full::new(
                big,
            )))
            .unwrap();
        for request in [chunked, sized] {
            let answer = exchange(&pool, request, EVERYTHING).await.unwrap();
            assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
            assert_eq!(pool.idle_count(), 0);
        }
        drop(done);
    }

    /// A pool to an upstream that hands its first connection to `serve`.
    async fn serving_once<F>(
        serve: impl FnOnce(tokio::net::TcpStream) -> F + Send + 'static,
    ) -> Arc<Pool<Lean>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            serve(stream).await;
        });
        pool_to(endpoint)
    }

    /// An upstream that closes while the body goes out, with no answer:
    /// an error, not a hang.
    #[tokio::test]
    async fn an_upstream_closing_while_the_body_goes_out_is_an_error() {
        let pool = serving_once(|mut stream| async move {
            let mut head = [0u8; 64];
            let _ = stream.read(&mut head).await;
        })
        .await;
        let request = Request::post("/upload")
            .header("host", "svc-shadow")
            .body(endless())
            .unwrap();
        exchange(&pool, request, EVERYTHING).await.unwrap_err();
        assert_eq!(pool.idle_count(), 0);
    }

    /// An upstream that answers before reading the body, then closes: its
    /// answer is read although writing the body failed.
    #[tokio::test]
    async fn an_early_answer_is_heard_when_the_upstream_stops_reading() {
        let pool = serving_once(|mut stream| async move {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let refusal =
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
            stream.write_all(refusal).await.unwrap();
            // Closed with the body unread: the kernel resets the connection.
        })
        .await;
        let big = Bytes::from(vec![b'x'; 16 << 20]);
        let request = Request::post("/upload")
            .header("host", "svc-shadow")
            .header("content-length", big.len().to_string())
            .body(http_body_util::Full::new(big))
            .unwrap();
        let answer = exchange(&pool, request, EVERYTHING).await.unwrap();
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(pool.idle_count(), 0);
    }

    /// An upstream that refuses the body, then sends the rest of its
    /// answer only once the body is let go: the body (a tee's share of
    /// the budget, for a shadow) must not wait for the answer's end.
    #[tokio::test]
    async fn an_early_answer_lets_go_of_the_body_before_it_is_read() {
        let (dropped, let_go) = tokio::sync::oneshot::channel::<()>();
        let pool = serving_once(|mut stream| async move {
            let mut head = [0u8; 1024];
            let _ = stream.read(&mut head).await;
            let refusal = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 4\r\n\r\n";
            stream.write_all(refusal).await.unwrap();
            let patience = std::time::Duration::from_secs(10);
            if tokio::time::timeout(patience, let_go).await.is_ok() {
                stream.write_all(b"nope").await.unwrap();
            }
            // Open and unread until the exchange is over.
            let _ = stream.read(&mut [0u8; 1]).await;
        })
        .await;
        let chunks = futures_util::stream::repeat_with(move || {
            let _held = &dropped;
            let data = Bytes::from_static(&[b'x'; 1024]);
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(data))
        });
        let request = Request::post("/upload")
            .header("host", "svc-shadow")
            .body(http_body_util::StreamBody::new(chunks))
            .unwrap();
        let answer = exchange(&pool, request, EVERYTHING).await.unwrap();
        assert_eq!(
            (answer.status, &answer.kept[..]),
            (StatusCode::PAYLOAD_TOO_LARGE, &b"nope"[..])
        );
    }

    /// What each write to the upstream carried.
    struct Writes {
        io: tokio::io::DuplexStream,
        seen: Vec<Vec<u8>>,
    }

    impl AsyncRead for Writes {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            slices: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, slices))?;
            let mut seen: Vec<u8> = slices.iter().flat_map(|slice| slice.to_vec()).collect();
            seen.truncate(written);
            self.seen.push(seen);
            Poll::Ready(Ok(written))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// One write for the head and a body that is ready with it (one
    /// syscall, one segment on the wire); a body still to come does not
    /// hold the head back; an empty body leaves the head alone.
    #[tokio::test]
    async fn the_head_goes_with_the_first_piece_of_the_body() {
        use futures_util::FutureExt;
        let (io, mut upstream) = tokio::io::duplex(64 << 10);
        let mut lean = Lean::new(Writes {
            io,
            seen: Vec::new(),
        });
        let head = b"PUT / HTTP/1.1\r\ncontent-length: 5\r\n\r\n";
        let mut ready = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let sent = lean.send(head, Framing::Length(5), &mut ready).await;
        assert!(sent.unwrap());
        let whole = [&head[..], b"hello"].concat();
        assert_eq!(lean.io.seen, std::slice::from_ref(&whole));
        upstream
            .read_exact(&mut vec![0u8; whole.len()])
            .await
            .unwrap();

        lean.io.seen.clear();
        let (frames, waiting) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stream = futures_util::stream::unfold(waiting, |mut waiting| async move {
            let frame = http_body::Frame::data(waiting.recv().await?);
            Some((Ok::<_, std::convert::Infallible>(frame), waiting))
        });
        let mut later = http_body_util::StreamBody::new(Box::pin(stream));
        let head = b"PUT / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        {
            let mut sending = std::pin::pin!(lean.send(head, Framing::Chunked, &mut later));
            assert!(sending.as_mut().now_or_never().is_none());
            let mut arrived = vec![0u8; head.len()];
            upstream.read_exact(&mut arrived).await.unwrap();
            assert_eq!(arrived, head, "the head before the body's first frame");
            frames.send(Bytes::from_static(b"abc")).unwrap();
            drop(frames);
            assert!(sending.await.unwrap());
        }
        let pieces: [&[u8]; 3] = [head, b"3\r\nabc\r\n", b"0\r\n\r\n"];
        assert_eq!(lean.io.seen, pieces);

        for (framing, last) in [
            (Framing::Length(0), &b""[..]),
            (Framing::Chunked, b"0\r\n\r\n"),
        ] {
            lean.io.seen.clear();
            let mut empty = http_body_util::Empty::<Bytes>::new();
            assert!(lean.send(head, framing, &mut empty).await.unwrap());
            assert_eq!(lean.io.seen, [[&head[..], last].concat()], "{framing:?}");
        }
    }
}
