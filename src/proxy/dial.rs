//! Opening an upstream connection: TCP to one endpoint, then TLS when the
//! destination's `trafficPolicy.tls` asks for it. Both pools (umbra's
//! HTTP/1.1 one and hyper-util's HTTP/2 client) dial through here.

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tower_service::Service;

use super::pool::SendError;
use crate::config::model::UpstreamTls;

/// An upstream connection, in the clear or over TLS.
pub enum Stream {
    Plain(TcpStream),
    /// Boxed: TLS state is large, and a plaintext connection should not
    /// carry its size.
    Tls(Box<TlsStream<TcpStream>>),
}

/// Dials one endpoint, whatever URI it is asked for.
#[derive(Clone)]
pub struct Dialer {
    tcp: HttpConnector,
    /// `http://host:port` of the endpoint, for the TCP connector.
    endpoint: Uri,
    tls: Option<Arc<UpstreamTls>>,
    /// Bounds the TLS handshake too: a connection is not open until then.
    connect_timeout: Duration,
    /// The last handshake failed (shared by the dialer's clones).
    failing: Arc<AtomicBool>,
}

impl Dialer {
    pub fn new(
        tcp: HttpConnector,
        endpoint: Uri,
        tls: Option<Arc<UpstreamTls>>,
        connect_timeout: Duration,
    ) -> Dialer {
        Dialer {
            tcp,
            endpoint,
            tls,
            connect_timeout,
            failing: Arc::default(),
        }
    }

    pub async fn dial(&self) -> Result<TokioIo<Stream>, SendError> {
        let started = Instant::now();
        let tcp = self
            .tcp
            .clone()
            .call(self.endpoint.clone())
            .await
            .map_err(|e| SendError::Connect(e.into()))?
            .into_inner();
        match &self.tls {
            None => Ok(TokioIo::new(Stream::Plain(tcp))),
            // Boxed: inline, the handshake's state would grow every
            // plaintext request's future (and boxed shadow) by a kilobyte.
            Some(tls) => Box::pin(self.handshake(tls, tcp, started)).await,
        }
    }

    /// The TLS handshake, within what `connectTimeout` has left after the
    /// TCP connect (one budget for both, as Envoy counts it).
    async fn handshake(
        &self,
        tls: &UpstreamTls,
        tcp: TcpStream,
        started: Instant,
    ) -> Result<TokioIo<Stream>, SendError> {
        let left = self.connect_timeout.saturating_sub(started.elapsed());
        let connector = tokio_rustls::TlsConnector::from(tls.client.clone());
        let handshake = connector.connect(tls.server_name.clone(), tcp);
        let error = match tokio::time::timeout(left, handshake).await {
            Ok(Ok(stream)) => {
                self.failing.store(false, Ordering::Relaxed);
                return Ok(TokioIo::new(Stream::Tls(Box::new(stream))));
            }
            Ok(Err(e)) => format!("TLS handshake: {e}"),
            Err(_) => "TLS handshake timed out".to_string(),
        };
        // The first failure in a row is a warning, the next ones (until a
        // handshake succeeds) debug lines: a misconfigured destination would
        // otherwise log once per request.
        let endpoint = &self.endpoint;
        if self.failing.swap(true, Ordering::Relaxed) {
            tracing::debug!(%endpoint, sni = %tls.sni, %error, "upstream TLS handshake failed");
        } else {
            tracing::warn!(%endpoint, sni = %tls.sni, %error, "upstream TLS handshake failed");
        }
        Err(SendError::Connect(error.into()))
    }
}

/// For hyper-util's HTTP/2 client.
impl Service<Uri> for Dialer {
    type Response = TokioIo<Stream>;
    type Error = SendError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, SendError>> + Send>>;

    #[inline]
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move { dialer.dial().await })
    }
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(tcp) => tcp.connected(),
            Stream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                if session.alpn_protocol() == Some(b"h2") {
                    connected.negotiated_h2()
                } else {
                    connected
                }
            }
        }
    }
}

impl AsyncRead for Stream {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_write_vectored(cx, bufs),
        }
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
        }
    }

    #[inline]
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
        }
    }
}
