//! Calling a node: TLS for `https://` ([`Connect`]), and plaintext that refuses to talk
//! past a TLS server for `http://` ([`PlainConnect`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::codegen::http::Uri;

use super::ClientTls;

#[derive(Clone, Debug)]
pub struct Connect {
    pub(super) tls: Arc<ClientTls>,
    pub(super) name: Option<String>,
}

/// Bytes read from a new connection at most, and how long to wait for them.
const FIRST_READ: usize = 16 * 1024;
const FIRST_WORD: Duration = Duration::from_secs(2);

/// A client's TLS connection.
pub type ClientStream = TokioIo<Primed<tokio_rustls::client::TlsStream<TcpStream>>>;

type Connecting = Pin<Box<dyn Future<Output = io::Result<ClientStream>> + Send>>;

/// A connection whose first bytes were read ahead (they are read again first), and whose
/// first `skip` bytes written were already sent (the HTTP/2 preface of [`PlainConnect`]).
#[derive(Debug)]
pub struct Primed<IO> {
    io: IO,
    first: Vec<u8>,
    at: usize,
    skip: usize,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Primed<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.at < self.first.len() {
            let n = (self.first.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            if self.at == self.first.len() {
                self.first = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Primed<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.skip > 0 && !buf.is_empty() {
            let n = self.skip.min(buf.len());
            self.skip -= n;
            return Poll::Ready(Ok(n));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.skip > 0 {
            let first = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &b[..]);
            return self.poll_write(cx, first);
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl tower_service::Service<Uri> for Connect {
    type Response = ClientStream;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = TlsConnector::from(self.tls.current.get());
        let named = self.name.clone();
        Box::pin(async move {
            let (host, port) = host_port(&uri, 443)?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let named = named.unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(named.clone()).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{named}: not a server name: {e}"),
                )
            })?;
            let failed = |e: io::Error| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "TLS handshake with {host}:{port} failed: {e}{}",
                        handshake_hint(&e)
                    ),
                )
            };
            let mut stream = connector.connect(name, tcp).await.map_err(failed)?;
            // TLS 1.3 checks a client's certificate after the client's side of the
            // handshake: a refusal is the server's first word, before its HTTP/2 settings.
            // Read that word here, so that a refused certificate fails the connection with
            // the reason rather than a later call with "transport error".
            let mut first = vec![0; FIRST_READ];
            let first = match tokio::time::timeout(FIRST_WORD, stream.read(&mut first)).await {
                Ok(Ok(0)) => {
                    return Err(failed(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server closed the connection after the handshake",
                    )));
                }
                Ok(Ok(n)) => {
                    first.truncate(n);
                    first
                }
                Ok(Err(e)) => return Err(failed(e)),
                // A server slow to speak: HTTP/2 will wait for it.
                Err(_) => Vec::new(),
            };
            Ok(TokioIo::new(Primed {
                io: stream,
                first,
                at: 0,
                skip: 0,
            }))
        })
    }
}

/// The host (IPv6 without brackets) and port of `uri`.
pub(super) fn host_port(uri: &Uri, default_port: u16) -> io::Result<(String, u16)> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri}: no host")))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16().unwrap_or(default_port)))
}

/// What a failed client handshake most likely means, for the message.
fn handshake_hint(e: &io::Error) -> &'static str {
    let text = e.to_string().to_lowercase();
    let says = |words: &[&str]| words.iter().any(|w| text.contains(w));
    if says(&["corrupt message", "invalidcontenttype"]) {
        " (is the server plaintext? then use http://)"
    } else if says(&["unknownissuer", "unknown issuer"]) {
        " (the server's certificate is not signed by the CA given with --ca)"
    } else if says(&["expired"]) {
        " (a certificate is out of its validity period)"
    } else if says(&["notvalidforname", "not valid for name"]) {
        " (the server's certificate does not name the host used to reach it)"
    } else if says(&["alert"]) {
        " (the server refused this client's certificate: give --cert and --key signed by its \
         client CA)"
    } else {
        ""
    }
}

/// The HTTP/2 client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A tonic connector for `http://` channels that never talks past a TLS server: it sends
/// the HTTP/2 preface itself and reads the server's first bytes. An HTTP/2 server answers
/// with its settings; a TLS server with an alert record, which this turns into an error
/// saying to use `https://` (without it, the alert would surface later as a call failing
/// with "transport error", or not at all).
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainConnect;

/// A client's plaintext connection.
pub type PlainStream = TokioIo<Primed<TcpStream>>;

impl tower_service::Service<Uri> for PlainConnect {
    type Response = PlainStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PlainStream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let (host, port) = host_port(&uri, 80)?;
            let mut tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            tcp.write_all(PREFACE).await?;
            let speaks_tls = || {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{host}:{port} answered plaintext HTTP/2 with TLS: the node serves TLS; \
                         use https:// (and --ca)"
                    ),
                )
            };
            let mut first = vec![0; FIRST_READ];
            let first = match tokio::time::timeout(FIRST_WORD, tcp.read(&mut first)).await {
                // A TLS record: 0x15 an alert, 0x16 a handshake.
                Ok(Ok(n)) if n > 0 && matches!(first[0], 0x15 | 0x16) => return Err(speaks_tls()),
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "{host}:{port} closed the connection at once (if the node serves \
                             TLS, use https://)"
                        ),
                    ));
                }
                Ok(Ok(n)) => {
                    first.truncate(n);
                    first
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => Vec::new(),
            };
            Ok(TokioIo::new(Primed {
                io: tcp,
                first,
                at: 0,
                skip: PREFACE.len(),
            }))
        })
    }
}
