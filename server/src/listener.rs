//! The connections a node admits: at most `--max-connections` at once (beyond it, new ones
//! wait in the listen backlog until one closes), and each must speak (send its first
//! bytes, the HTTP/2 preface) within `--handshake-timeout` or it is closed, so connections
//! that never speak HTTP/2 cannot use up the node's file descriptors.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Accepted connections, `max` at a time, each with `handshake` to speak.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    handshake: Duration,
) -> impl Stream<Item = io::Result<Admitted>> {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, slots), move |(listener, slots)| async move {
        let permit = slots.clone().acquire_owned().await.ok()?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let admitted = Admitted {
                        stream,
                        _slot: permit,
                        handshake: Some(Box::pin(tokio::time::sleep(handshake))),
                    };
                    return Some((Ok(admitted), (listener, slots)));
                }
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted:
                    // wait a moment rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// An admitted connection: holds its slot until it closes.
pub struct Admitted {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the first bytes arrive.
    handshake: Option<Pin<Box<Sleep>>>,
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    this.handshake = None;
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                let expired = this
                    .handshake
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing within the handshake timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// An admitted connection, made TLS when the node serves TLS.
pub enum Conn {
    Plain(Admitted),
    Tls(Box<tokio_rustls::server::TlsStream<Admitted>>),
}

impl Conn {
    fn io(self: Pin<&mut Self>) -> Pin<&mut (dyn AsyncReadWrite + Unpin)> {
        match self.get_mut() {
            Conn::Plain(c) => Pin::new(c),
            Conn::Tls(c) => Pin::new(&mut **c),
        }
    }
}

/// Both halves of a connection, for [`Conn::io`].
pub trait AsyncReadWrite: AsyncRead + AsyncWrite {}

impl<T: AsyncRead + AsyncWrite> AsyncReadWrite for T {}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(c) => c.is_write_vectored(),
            Conn::Tls(c) => c.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    /// The client's address either way, so logs and the access record read it alike.
    fn connect_info(&self) -> TcpConnectInfo {
        match self {
            Conn::Plain(c) => c.connect_info(),
            Conn::Tls(c) => c.get_ref().0.connect_info(),
        }
    }
}

/// The connections of `admitted`, through TLS handshakes when `tls` is given.
pub fn maybe_tls(
    admitted: impl Stream<Item = io::Result<Admitted>> + Send + 'static,
    tls: Option<Arc<modelcache_proto::tls::ServerTls>>,
    handshake: Duration,
) -> Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>> {
    use futures::StreamExt;
    match tls {
        Some(tls) => Box::pin(
            modelcache_proto::tls::incoming(admitted, tls, handshake)
                .map(|c| c.map(|c| Conn::Tls(Box::new(c)))),
        ),
        None => Box::pin(admitted.map(|c| c.map(Conn::Plain))),
    }
}
