//! Talking to a daemon from a worker: connect over its unix socket (or TCP address), and
//! `ensure_model`, the one call most workers need.
//!
//! ```no_run
//! # async fn load() -> Result<(), cache_agent::AgentError> {
//! let dir = cache_agent::daemon::client::ensure_model(
//!     "unix:///run/modelcache/agent.sock",
//!     "resnet50:int8",
//! )
//! .await?;
//! println!("model files are in {}", dir.display());
//! # Ok(()) }
//! ```

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use modelcache_proto::v1::EnsureRequest;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use super::socket::Listen;
use crate::error::AgentError;

pub type AgentClient = modelcache_proto::v1::agent_client::AgentClient<Channel>;

/// Connects to the daemon listening on `listen` (`unix:///PATH` or `HOST:PORT`).
pub async fn connect(listen: &str) -> Result<AgentClient, AgentError> {
    connect_with(listen, None).await
}

/// Connects to the daemon listening on `listen`; over TLS with `tls` when it listens on
/// TCP with `--tls-cert` (its certificate must name the host of `listen`).
pub async fn connect_with(
    listen: &str,
    tls: Option<Arc<modelcache_proto::tls::ClientTls>>,
) -> Result<AgentClient, AgentError> {
    let target: Listen = listen.parse().map_err(|detail| AgentError::Unreachable {
        addrs: listen.to_owned(),
        detail,
    })?;
    let unreachable = |e: tonic::transport::Error| AgentError::Unreachable {
        addrs: listen.to_owned(),
        detail: format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        ),
    };
    let channel = match target {
        Listen::Unix(path) => Endpoint::from_static("http://localhost")
            .connect_with_connector(UnixConnector(Arc::new(path)))
            .await
            .map_err(unreachable)?,
        Listen::Tcp(addr) => {
            let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(unreachable)?;
            match tls {
                Some(tls) => endpoint.connect_with_connector(tls.connect(None)).await,
                None => endpoint.connect().await,
            }
            .map_err(unreachable)?
        }
    };
    Ok(AgentClient::new(channel))
}

/// The local directory of `reference`, present and verified (fetched first if needed).
pub async fn ensure_model(listen: &str, reference: &str) -> Result<PathBuf, AgentError> {
    let mut client = connect(listen).await?;
    let response = client
        .ensure(EnsureRequest {
            reference: reference.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(Path::new(&response.path).to_owned())
}

#[derive(Clone)]
struct UnixConnector(Arc<PathBuf>);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            tokio::net::UnixStream::connect(&*path)
                .await
                .map(TokioIo::new)
        })
    }
}
