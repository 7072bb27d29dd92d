//! Where the daemon listens — a unix socket (the default) or a TCP address — and which
//! connection each request came on: a lease ends when its connection closes.
//!
//! A unix socket path is only ever removed when it is a socket nobody answers on (left
//! by a daemon that died) and this daemon holds the path's lock file (`PATH.lock`); a
//! live socket, or anything else at that path, is an error and is left alone.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use futures::Stream;
use modelcache_proto::tls::ServerTls;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tonic::transport::server::Connected;

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "unix:///run/modelcache/agent.sock";

/// A parsed `--listen`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(format!("{s:?}: no socket path (e.g. {DEFAULT_LISTEN})"));
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        addr.parse().map(Listen::Tcp).map_err(|e| {
            format!("{s:?}: {e} (expected unix:///PATH or HOST:PORT, e.g. 127.0.0.1:7071)")
        })
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(path) => write!(f, "unix://{}", path.display()),
            Listen::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// Which connection a request came on; in every request's extensions. The connection's
/// close is announced once it and every request on it are gone.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub id: u64,
    _guard: Arc<CloseGuard>,
}

#[derive(Debug)]
struct CloseGuard {
    id: u64,
    closed: mpsc::UnboundedSender<u64>,
}

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let _ = self.closed.send(self.id);
    }
}

/// An accepted connection that carries its `ConnInfo`.
pub struct Tracked<IO> {
    io: IO,
    info: ConnInfo,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<IO> Connected for Tracked<IO> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

/// Accepts connections on `listener`, each with a fresh `ConnInfo`; closed connections'
/// ids arrive on the returned receiver.
pub struct Acceptor {
    next: AtomicU64,
    closed: mpsc::UnboundedSender<u64>,
}

impl Acceptor {
    pub fn new() -> (Self, mpsc::UnboundedReceiver<u64>) {
        let (closed, rx) = mpsc::unbounded_channel();
        let this = Self {
            next: AtomicU64::new(1),
            closed,
        };
        (this, rx)
    }

    fn track<IO>(&self, io: IO) -> Tracked<IO> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let guard = CloseGuard {
            id,
            closed: self.closed.clone(),
        };
        Tracked {
            io,
            info: ConnInfo {
                id,
                _guard: Arc::new(guard),
            },
        }
    }

    /// The accepted connections of a bound listener, for `serve_with_incoming`, through
    /// TLS handshakes when `tls` is given. Accept errors (e.g. out of file descriptors) are
    /// logged and retried, never fatal.
    pub fn incoming(
        self,
        listener: Bound,
        tls: Option<Arc<ServerTls>>,
    ) -> Pin<Box<dyn Stream<Item = io::Result<Tracked<Conn>>> + Send>> {
        use futures::StreamExt;
        let this = Arc::new(self);
        let accepted = futures::stream::unfold(Arc::new(listener), |listener| async move {
            loop {
                let accepted = match &listener.socket {
                    Socket::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
                    Socket::Tcp(l) => l.accept().await.map(|(s, _)| {
                        let _ = s.set_nodelay(true);
                        Conn::Tcp(s)
                    }),
                };
                match accepted {
                    Ok(conn) => return Some((Ok(conn), listener)),
                    Err(e) => {
                        tracing::warn!("accepting a connection: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let conns: Pin<Box<dyn Stream<Item = io::Result<Conn>> + Send>> = match tls {
            Some(tls) => Box::pin(
                modelcache_proto::tls::incoming(accepted, tls, TLS_HANDSHAKE)
                    .map(|c| c.map(|c| Conn::Tls(Box::new(c)))),
            ),
            None => Box::pin(accepted),
        };
        Box::pin(conns.map(move |c| c.map(|c| this.track(c))))
    }
}

/// Longest a TLS handshake may take.
const TLS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection on either kind of listener.
pub enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
    /// A TCP connection made TLS (`daemon --tls-cert`).
    Tls(Box<tokio_rustls::server::TlsStream<Conn>>),
}

impl Connected for Conn {
    /// The client's address, on TCP.
    type ConnectInfo = Option<std::net::SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Unix(_) => None,
            Conn::Tcp(s) => s.peer_addr().ok(),
            Conn::Tls(s) => s.get_ref().0.connect_info(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

enum Socket {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

/// A bound listener; a unix socket it created is removed when it is dropped (if the path
/// still is that socket).
pub struct Bound {
    socket: Socket,
    unix: Option<UnixPath>,
    /// Where it listens (a TCP port of 0 resolved).
    pub address: String,
}

struct UnixPath {
    path: PathBuf,
    inode: u64,
    _lock: std::fs::File,
}

impl Drop for UnixPath {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && m.ino() == self.inode)
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds `listen`. A unix socket's folder is created when missing, and the socket gets
/// permissions `mode` (workers need read and write on it).
pub async fn bind(listen: &Listen, mode: u32) -> Result<Bound, String> {
    match listen {
        Listen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            let address = l
                .local_addr()
                .map_or_else(|_| addr.to_string(), |a| a.to_string());
            Ok(Bound {
                socket: Socket::Tcp(l),
                unix: None,
                address,
            })
        }
        Listen::Unix(path) => bind_unix(path, mode),
    }
}

fn bind_unix(path: &Path, mode: u32) -> Result<Bound, String> {
    let shown = path.display();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {} for the socket: {e}", parent.display()))?;
    }
    let lock_path = PathBuf::from(format!("{}.lock", path.display()));
    if std::fs::symlink_metadata(&lock_path).is_ok_and(|m| !m.is_file()) {
        return Err(format!(
            "{} exists and is not a lock file of cache-agent; not touching it",
            lock_path.display()
        ));
    }
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            return Err(format!(
                "another cache-agent daemon is serving {shown} (it holds {})",
                lock_path.display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("cannot lock {}: {e}", lock_path.display()));
        }
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{shown} is a socket another process answers on; not replacing it"
                ));
            }
            // A socket nobody answers on, while we hold the lock: left by a daemon that
            // died.
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {shown}: {e}"))?;
            tracing::info!(socket = %shown, "removed a stale socket");
        }
        Ok(m) => {
            let kind = if m.file_type().is_symlink() {
                "a symlink"
            } else if m.is_dir() {
                "a directory"
            } else {
                "a file"
            };
            return Err(format!(
                "{shown} exists and is {kind}, not a socket; not touching it (give another --listen)"
            ));
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {shown}: {e}"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("cannot set the permissions of {shown}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{shown}: {e}"))?;
    let inode = std::fs::symlink_metadata(path)
        .map_err(|e| format!("{shown}: {e}"))?
        .ino();
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|e| format!("{shown}: {e}"))?;
    Ok(Bound {
        socket: Socket::Unix(listener),
        unix: Some(UnixPath {
            path: path.to_owned(),
            inode,
            _lock: lock,
        }),
        address: format!("unix://{shown}"),
    })
}

impl Bound {
    /// The socket's path, for a unix socket.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|u| u.path.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            DEFAULT_LISTEN.parse::<Listen>().unwrap(),
            Listen::Unix("/run/modelcache/agent.sock".into())
        );
        assert_eq!(
            "unix:agent.sock".parse::<Listen>().unwrap(),
            Listen::Unix("agent.sock".into())
        );
        assert_eq!(
            "127.0.0.1:7071".parse::<Listen>().unwrap(),
            Listen::Tcp("127.0.0.1:7071".parse().unwrap())
        );
        assert_eq!(
            "tcp://[::1]:7071".parse::<Listen>().unwrap(),
            Listen::Tcp("[::1]:7071".parse().unwrap())
        );
        assert!("unix://".parse::<Listen>().is_err());
        assert!(
            "localhost"
                .parse::<Listen>()
                .unwrap_err()
                .contains("unix:///PATH")
        );
    }

    #[tokio::test]
    async fn a_path_that_is_not_our_socket_is_an_error_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("taken");
        std::fs::write(&file, b"precious").unwrap();
        let err = bind(&Listen::Unix(file.clone()), 0o660)
            .await
            .err()
            .unwrap();
        assert!(err.contains("is a file, not a socket"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let err = bind(&Listen::Unix(link.clone()), 0o660)
            .await
            .err()
            .unwrap();
        assert!(err.contains("is a symlink"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        // Someone else's live socket.
        let live = dir.path().join("live.sock");
        let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let err = bind(&Listen::Unix(live.clone()), 0o660)
            .await
            .err()
            .unwrap();
        assert!(err.contains("another process answers"), "{err}");
        assert!(live.exists());

        // A dead socket is replaced, and removed again when the daemon's listener goes.
        let dead = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        let bound = bind(&Listen::Unix(dead.clone()), 0o660).await.unwrap();
        assert_eq!(bound.unix_path(), Some(dead.as_path()));
        // A second daemon on the same path is refused.
        let err = bind(&Listen::Unix(dead.clone()), 0o660)
            .await
            .err()
            .unwrap();
        assert!(err.contains("another cache-agent daemon"), "{err}");
        drop(bound);
        assert!(!dead.exists());
    }
}
