//! Accepting TLS connections: a handshake task per connection, failures logged and the
//! client left to read the alert.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use std::{fmt, io};

use futures_core::Stream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tonic::transport::server::Connected;

use super::ServerTls;

/// The TLS connections of `plain`: each handshake runs on its own task, at most `timeout`
/// long, so a client that stalls in it holds up no one else. Failed handshakes (an
/// untrusted or expired certificate, a plaintext client) are logged with the client's
/// address and dropped.
pub fn incoming<S, IO>(
    plain: S,
    tls: Arc<ServerTls>,
    timeout: Duration,
) -> impl Stream<Item = io::Result<tokio_rustls::server::TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: fmt::Debug,
{
    let (done, handshaken) = tokio::sync::mpsc::channel(64);
    let accepting = tokio::spawn(async move {
        let mut plain = std::pin::pin!(plain);
        while let Some(next) = std::future::poll_fn(|cx| plain.as_mut().poll_next(cx)).await {
            let io = match next {
                Ok(io) => io,
                Err(e) => {
                    if done.send(Err(e)).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let acceptor = tls.acceptor();
            let done = done.clone();
            tokio::spawn(async move {
                let client = io.connect_info();
                match tokio::time::timeout(timeout, acceptor.accept(io).into_fallible()).await {
                    Ok(Ok(stream)) => {
                        let _ = done.send(Ok(stream)).await;
                    }
                    Ok(Err((e, io))) => {
                        tracing::info!(?client, "TLS handshake failed: {e}");
                        linger(io).await;
                    }
                    Err(_) => tracing::info!(
                        ?client,
                        ?timeout,
                        "TLS handshake not finished within the handshake timeout"
                    ),
                }
            });
        }
    });
    Handshaken {
        handshaken,
        _accepting: AbortOnDrop(accepting),
    }
}

/// Ends a connection whose handshake failed so that the client reads the alert sent: its
/// unread bytes are drained for a moment first, since closing with them unread resets
/// the connection and the client would see only "broken pipe".
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(mut io: IO) {
    use tokio::io::AsyncWriteExt;
    let _ = io.shutdown().await;
    let mut sink = [0u8; 4096];
    let drain = async { while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// How long a refused connection is drained.
const LINGER: Duration = Duration::from_secs(1);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Handshaken<T> {
    handshaken: tokio::sync::mpsc::Receiver<io::Result<T>>,
    _accepting: AbortOnDrop,
}

impl<T> Stream for Handshaken<T> {
    type Item = io::Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.handshaken.poll_recv(cx)
    }
}
