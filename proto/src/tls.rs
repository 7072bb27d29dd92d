//! TLS and mutual TLS on every link (rustls, with the `ring` provider): the server side of
//! a node or an agent daemon (`--tls-cert`, `--tls-key`, `--tls-client-ca`) and the client
//! side of an agent, a daemon or a node calling its peers (`--ca`, `--cert`, `--key`).
//!
//! Certificates and keys are PEM files, read again when their contents change (checked
//! every second by [`watch`]): a renewed certificate, a rotated key or a new client CA take
//! effect for the next connection, with no restart; connections already open keep the
//! keys they were made with. A file that no longer loads (half written, a key that does
//! not match the certificate) is reported and what was loaded before stays in force.
//!
//! `https://` always means TLS: a client never falls back to plaintext.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::codegen::http::Uri;
use tonic::transport::server::Connected;

/// Files that could not be made into a TLS configuration; says which and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// CA bundles of the common distributions, tried in order when a client is given no `--ca`
/// (after `SSL_CERT_FILE`).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// A file read whole, with its path for messages.
fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("reading the {what} {}: {e}", path.display())))
}

fn certificates(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError(format!("{}: not PEM certificates: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError(format!(
            "{}: holds no certificate (expected PEM, -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

fn private_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
        TlsError(format!(
            "{}: no private key in it (expected PEM, PKCS#8, PKCS#1 or SEC1): {e}",
            path.display()
        ))
    })
}

fn roots(pem: &[u8], path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(pem, path)? {
        store.add(cert).map_err(|e| {
            TlsError(format!(
                "{}: not a usable CA certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(Arc::new(store))
}

/// A certificate chain and the key that goes with it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What a configuration was built from: the files and their contents when read.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Read(Vec<(PathBuf, Vec<u8>)>);

impl Read {
    fn of(files: &[(&Path, &str)]) -> Result<Self, TlsError> {
        files
            .iter()
            .map(|(path, what)| Ok((path.to_path_buf(), read(path, what)?)))
            .collect::<Result<_, _>>()
            .map(Read)
    }

    fn bytes(&self, index: usize) -> (&[u8], &Path) {
        let (path, bytes) = &self.0[index];
        (bytes, path)
    }
}

/// A configuration kept current with its files.
struct Current<C> {
    config: RwLock<Arc<C>>,
    /// The contents the config was built from, and the last contents that failed.
    read: Mutex<(Read, Option<Read>)>,
}

impl<C> fmt::Debug for Current<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(the configuration as of the last good read)")
    }
}

impl<C> Current<C> {
    fn new(config: C, read: Read) -> Self {
        Self {
            config: RwLock::new(Arc::new(config)),
            read: Mutex::new((read, None)),
        }
    }

    fn get(&self) -> Arc<C> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Builds the config again when the files' contents changed; a failure is reported
    /// once per distinct contents, and the config before stays in force.
    fn refresh(
        &self,
        files: &[(&Path, &str)],
        build: impl FnOnce(&Read) -> Result<C, TlsError>,
    ) -> Result<bool, TlsError> {
        let now = Read::of(files)?;
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        if read.0 == now || read.1.as_ref() == Some(&now) {
            return Ok(false);
        }
        match build(&now) {
            Ok(config) => {
                *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                *read = (now, None);
                Ok(true)
            }
            Err(e) => {
                read.1 = Some(now);
                Err(e)
            }
        }
    }
}

/// Something whose files [`watch`] keeps reading.
pub trait Reload: Send + Sync + 'static {
    /// Reads the files again if they changed; an error leaves the config as it was.
    fn reload_if_changed(&self) -> Result<bool, TlsError>;
    /// What it is, for the log: "server certificate node.pem".
    fn describe(&self) -> String;
}

/// Reads `tls`'s files again whenever they change (checked every `every`) until the task
/// is dropped.
pub async fn watch(tls: Arc<dyn Reload>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!("{} read again", tls.describe()),
            Ok(false) => {}
            Err(e) => tracing::error!("{e}; the certificates loaded before stay in force"),
        }
    }
}

/// The server side: a certificate and key, and when `client_ca` is given, mutual TLS
/// (every client must present a certificate that CA signed).
#[derive(Debug)]
pub struct ServerTls {
    identity: Identity,
    client_ca: Option<PathBuf>,
    current: Current<ServerConfig>,
}

impl ServerTls {
    /// Reads the files; anything missing, malformed or mismatched is an error naming it.
    pub fn load(identity: Identity, client_ca: Option<PathBuf>) -> Result<Arc<Self>, TlsError> {
        let read = Read::of(&Self::files(&identity, client_ca.as_deref()))?;
        let config = Self::build(&read)?;
        Ok(Arc::new(Self {
            identity,
            client_ca,
            current: Current::new(config, read),
        }))
    }

    fn files<'a>(identity: &'a Identity, client_ca: Option<&'a Path>) -> Vec<(&'a Path, &'a str)> {
        let mut files = vec![
            (identity.cert.as_path(), "certificate"),
            (identity.key.as_path(), "private key"),
        ];
        files.extend(client_ca.map(|ca| (ca, "client CA")));
        files
    }

    fn build(read: &Read) -> Result<ServerConfig, TlsError> {
        let (cert_pem, cert_path) = read.bytes(0);
        let (key_pem, key_path) = read.bytes(1);
        let certs = certificates(cert_pem, cert_path)?;
        let key = private_key(key_pem, key_path)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| TlsError(format!("TLS versions: {e}")))?;
        let builder = match read.0.get(2) {
            Some((ca_path, ca_pem)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    roots(ca_pem, ca_path)?,
                    provider(),
                )
                .build()
                .map_err(|e| TlsError(format!("client CA {}: {e}", ca_path.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(certs, key).map_err(|e| {
            TlsError(format!(
                "{} with {}: {e} (does the key belong to the certificate?)",
                cert_path.display(),
                key_path.display()
            ))
        })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Whether clients must present certificates.
    pub fn mutual(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The identity this side presents; a node presents it to its peers too.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The client CA, when clients must present certificates.
    pub fn client_ca(&self) -> Option<&Path> {
        self.client_ca.as_deref()
    }

    /// An acceptor with the configuration as of now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.get())
    }
}

impl Reload for ServerTls {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        self.current.refresh(
            &Self::files(&self.identity, self.client_ca.as_deref()),
            Self::build,
        )
    }

    fn describe(&self) -> String {
        format!("TLS certificate {}", self.identity.cert.display())
    }
}

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

/// The client side: the CAs a server's certificate must chain to (`--ca`, else the
/// system's bundle) and, for mutual TLS, the identity to present (`--cert`, `--key`).
#[derive(Debug)]
pub struct ClientTls {
    ca: Option<PathBuf>,
    identity: Option<Identity>,
    current: Current<ClientConfig>,
}

impl ClientTls {
    /// Reads the files; without `ca`, the system's CA bundle (`SSL_CERT_FILE`, else the
    /// usual paths) is trusted.
    pub fn load(ca: Option<PathBuf>, identity: Option<Identity>) -> Result<Arc<Self>, TlsError> {
        let ca = match ca {
            Some(ca) => ca,
            None => system_bundle()?,
        };
        let read = Read::of(&Self::files(&ca, identity.as_ref()))?;
        let config = Self::build(&read)?;
        Ok(Arc::new(Self {
            ca: Some(ca),
            identity,
            current: Current::new(config, read),
        }))
    }

    fn files<'a>(ca: &'a Path, identity: Option<&'a Identity>) -> Vec<(&'a Path, &'a str)> {
        let mut files = vec![(ca, "CA certificate")];
        if let Some(identity) = identity {
            files.push((&identity.cert, "client certificate"));
            files.push((&identity.key, "client key"));
        }
        files
    }

    fn build(read: &Read) -> Result<ClientConfig, TlsError> {
        let (ca_pem, ca_path) = read.bytes(0);
        let verifier =
            WebPkiServerVerifier::builder_with_provider(roots(ca_pem, ca_path)?, provider())
                .build()
                .map_err(|e| TlsError(format!("CA {}: {e}", ca_path.display())))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(rustls::DEFAULT_VERSIONS)
            .map_err(|e| TlsError(format!("TLS versions: {e}")))?
            .with_webpki_verifier(verifier);
        let mut config = if read.0.len() == 3 {
            let (cert_pem, cert_path) = read.bytes(1);
            let (key_pem, key_path) = read.bytes(2);
            builder
                .with_client_auth_cert(
                    certificates(cert_pem, cert_path)?,
                    private_key(key_pem, key_path)?,
                )
                .map_err(|e| {
                    TlsError(format!(
                        "{} with {}: {e} (does the key belong to the certificate?)",
                        cert_path.display(),
                        key_path.display()
                    ))
                })?
        } else {
            builder.with_no_client_auth()
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// A connector for `https://` channels (see [`Connect`]) that checks the server's
    /// certificate against `name`, or against the host of the URI when `None` (a peer
    /// reached by its resolved address is checked against the name it was listed by).
    pub fn connect(self: &Arc<Self>, name: Option<String>) -> Connect {
        Connect {
            tls: self.clone(),
            name,
        }
    }
}

impl Reload for ClientTls {
    fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let ca = self.ca.as_deref().expect("a client always has a CA file");
        self.current
            .refresh(&Self::files(ca, self.identity.as_ref()), Self::build)
    }

    fn describe(&self) -> String {
        match &self.identity {
            Some(identity) => format!("TLS client certificate {}", identity.cert.display()),
            None => format!(
                "TLS CA {}",
                self.ca.as_deref().unwrap_or(Path::new("")).display()
            ),
        }
    }
}

fn system_bundle() -> Result<PathBuf, TlsError> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    from_env
        .into_iter()
        .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            TlsError(format!(
                "no CA to check servers' certificates against: give --ca FILE (the CA that \
                 signed the node's certificate); no system bundle at SSL_CERT_FILE or {}",
                SYSTEM_BUNDLES.join(", ")
            ))
        })
}

/// Whether `url` asks for TLS.
pub fn is_https(url: &str) -> bool {
    url.starts_with("https://")
}

/// The `http://` form of an `https://` URL: tonic's own connector would refuse an
/// `https://` URI it has no TLS settings for, so a channel that [`Connect`] wraps in TLS is
/// made with this one, and TLS is done by the connector.
pub fn plain_uri(url: &str) -> String {
    match url.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => url.to_owned(),
    }
}

/// A tonic connector (`Endpoint::connect_with_connector`) that opens a TCP connection and
/// makes it TLS with the configuration as of that moment, checking the server's
/// certificate against the host of the URI.
#[derive(Clone, Debug)]
pub struct Connect {
    tls: Arc<ClientTls>,
    name: Option<String>,
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
fn host_port(uri: &Uri, default_port: u16) -> io::Result<(String, u16)> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_malformed_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity {
            cert: dir.path().join("node.pem"),
            key: dir.path().join("node-key.pem"),
        };
        let e = ServerTls::load(identity.clone(), None).unwrap_err();
        assert!(e.to_string().contains("reading the certificate"), "{e}");
        assert!(e.to_string().contains("node.pem"), "{e}");
        std::fs::write(&identity.cert, "hello\n").unwrap();
        std::fs::write(&identity.key, "hello\n").unwrap();
        let e = ServerTls::load(identity, None).unwrap_err();
        assert!(e.to_string().contains("holds no certificate"), "{e}");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nnot base64 !\n").unwrap();
        let e = ClientTls::load(Some(ca), None).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }

    #[test]
    fn plain_uri_and_hosts() {
        assert_eq!(plain_uri("https://node-a:7070"), "http://node-a:7070");
        assert_eq!(plain_uri("http://node-a:7070"), "http://node-a:7070");
        let uri: Uri = "http://[::1]:7070".parse().unwrap();
        assert_eq!(host_port(&uri, 443).unwrap(), ("::1".to_owned(), 7070));
    }
}
