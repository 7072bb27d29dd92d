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
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::crypto::{CryptoProvider, ring};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

mod accept;
mod connect;

pub use accept::incoming;
pub use connect::{ClientStream, Connect, PlainConnect, PlainStream, Primed};

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

impl Identity {
    /// The identity of a `--cert`/`--key` pair of options, when both are given (the
    /// command lines require each with the other).
    pub fn of(cert: Option<&PathBuf>, key: Option<&PathBuf>) -> Option<Identity> {
        Some(Identity {
            cert: cert?.clone(),
            key: key?.clone(),
        })
    }
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

/// Reads `tls`'s files again whenever they change (checked every
/// [`FILES_CHECKED_EVERY`](crate::FILES_CHECKED_EVERY)) until the task is dropped.
pub async fn watch(tls: Arc<dyn Reload>) {
    loop {
        tokio::time::sleep(crate::FILES_CHECKED_EVERY).await;
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
        let uri: tonic::codegen::http::Uri = "http://[::1]:7070".parse().unwrap();
        assert_eq!(
            connect::host_port(&uri, 443).unwrap(),
            ("::1".to_owned(), 7070)
        );
    }
}
