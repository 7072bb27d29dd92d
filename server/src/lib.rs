//! modelcache node.
//!
//! How a request flows: the gRPC layer (`grpc` builds the server; `service`, with `Fetch`
//! framed by hand in `wire`, every RPC through the tower stack of `layers`) decodes a
//! request and asks the
//! `registry`. The registry composes the domain: the `catalog` names the model's current
//! revision, re-listing its folder in the `origin` once the cached one is older than
//! `--revalidate-after` (and serving the cached one if the origin fails); the `variants`
//! builder builds a quantized variant once per revision. `Fetch` then walks the revision's
//! chunks in order, several in flight, through the `chunks` reader: each comes from the
//! memory tier, the disk tier (`cache`, foyer) or a ranged GET to the origin, with
//! concurrent misses on one chunk sharing one GET, and goes out with its BLAKE3 digest.
//! Once a model was read in full, the `finisher` computes its files' SHA-256 in the
//! background and saves the `manifest` beside the disk tier. Background work belongs to
//! one tracker (`tasks`) that shutdown cancels and awaits.

pub mod buffers;
pub mod cache;
pub mod catalog;
pub mod checks;
pub mod checksum;
pub mod chunks;
pub mod config;
pub mod dirlock;
pub mod error;
pub mod fills;
pub mod finisher;
pub mod format;
pub mod grpc;
pub mod landing;
pub mod layers;
pub mod listener;
pub mod manifest;
pub mod origin;
pub mod readahead;
pub mod registry;
pub mod service;
pub mod stats;
pub mod tasks;
pub mod trim;
pub mod variants;
pub mod wire;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;
pub use error::{Error, Result};
pub use stats::Stats;

use crate::origin::Origin;
use crate::registry::Registry;

/// A node's state, opened but not yet serving.
pub struct Node {
    registry: Arc<Registry>,
    admission: grpc::Admission,
}

impl Node {
    /// Opens the origin and the tiers, and loads the manifests saved in the cache dir.
    pub async fn open(config: &Config) -> Result<Self> {
        let origin = Origin::open(&config.origin, &config.s3_options())?;
        Self::with_origin(config, origin).await
    }

    /// Like `open`, with an origin built by the caller (any `ObjectStore`).
    pub async fn with_origin(config: &Config, origin: Origin) -> Result<Self> {
        let registry = Registry::open(config, origin).await?;
        Ok(Self {
            registry: Arc::new(registry),
            admission: grpc::Admission {
                max_connections: config.max_connections,
                max_streams_per_connection: config.max_streams_per_connection,
                handshake_timeout: config.handshake_timeout,
            },
        })
    }

    /// The node's domain: resolving references, reading chunks, building variants.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then stops accepting, cuts
    /// open streams, finishes background work and flushes the disk tier.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let result = grpc::serve(self.registry.clone(), listener, self.admission, shutdown).await;
        self.registry.shutdown().await?;
        result
    }
}

/// Opens a node from `config` and serves it on `listener` until `shutdown`; once it is
/// open, writes the bound address to `config.ready_file`, if given.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let node = Node::open(&config).await?;
    if let Some(path) = &config.ready_file {
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))?;
        write_ready_file(path, &addr.to_string())?;
    }
    node.serve(listener, shutdown).await
}

/// Writes `addr` and a newline to `path` atomically (a reader sees all of it or nothing).
fn write_ready_file(path: &Path, addr: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Error::io(format!("writing the ready file {}", path.display()), e))
}
