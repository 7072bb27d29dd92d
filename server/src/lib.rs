//! modelcache node.
//!
//! How a request flows: the gRPC layer (`service`) parses a reference and asks the
//! `registry` for the model's current revision; the registry re-lists the model's folder in
//! the `origin` when its cached revision is older than `--revalidate-after` (and keeps
//! serving the cached one if the origin fails). `Fetch` then walks the revision's chunks in
//! order, several in flight: each comes from the memory tier, the disk tier (`cache`, foyer)
//! or a ranged GET to the origin, with concurrent misses on one chunk sharing one GET. Each
//! chunk goes out with its BLAKE3 digest; once a model was read in full, the node computes
//! its files' SHA-256 in the background and saves the manifest beside the disk tier.

pub mod cache;
pub mod config;
pub mod error;
pub mod manifest;
pub mod origin;
pub mod registry;
pub mod service;
pub mod variants;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use modelcache_proto::v1::model_cache_server::ModelCacheServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::Config;
pub use error::{Error, Result};

use crate::cache::ChunkCache;
use crate::manifest::ManifestStore;
use crate::origin::Origin;
use crate::registry::Registry;
use crate::service::NodeService;
use crate::variants::Variants;

/// HTTP/2 flow-control window per stream. hyper's default (64 KiB) stalls a bulk stream on
/// every round trip; 8 MiB keeps four 2 MiB chunks in flight to each client.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
/// HTTP/2 flow-control window per connection, shared by its streams.
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
/// Largest HTTP/2 frame: fewer, larger frames per chunk (the protocol's default is 16 KiB).
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024 - 1;
/// Largest gRPC message accepted or sent: a chunk (2 MiB) plus its framing, under the
/// 4 MiB that stock clients accept.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// A node's state, opened but not yet serving.
pub struct Node {
    registry: Arc<Registry>,
}

impl Node {
    /// Opens the origin and the tiers, and loads the manifests saved in the cache dir.
    pub async fn open(config: &Config) -> Result<Self> {
        let origin = Origin::open(&config.origin, &config.s3_options())?;
        Self::with_origin(config, origin).await
    }

    /// Like `open`, with an origin built by the caller (any `ObjectStore`).
    pub async fn with_origin(config: &Config, origin: Origin) -> Result<Self> {
        let cache = ChunkCache::open(
            &config.cache_dir.join("tiers"),
            config.memory_capacity.as_u64(),
            config.disk_capacity.as_u64(),
        )
        .await?;
        let manifests = ManifestStore::open(&config.cache_dir)?;
        let variant_cache = ChunkCache::open(
            &config.cache_dir.join("variants"),
            config.memory_capacity.as_u64() / 4,
            config.variant_capacity.as_u64(),
        )
        .await?;
        let variants = Variants::new(
            variant_cache,
            config.memory_capacity.as_u64() / 4,
            config.cache_dir.join("build"),
            config.precompute.0.clone(),
            config.build_parallelism,
        )?;
        let registry = Registry::new(
            origin,
            cache,
            manifests,
            variants,
            config.revalidate_after,
            config.origin_parallelism,
        );
        Ok(Self {
            registry: Arc::new(registry),
        })
    }

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
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("listener address", e))?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                %addr,
                "authentication is OFF and this node listens beyond loopback: anyone who can \
                 reach {addr} can read every model in the origin"
            );
        }
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<ModelCacheServer<NodeService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(modelcache_proto::v1::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Config(format!("reflection: {e}")))?;
        let service =
            wire::ModelCacheService::new(NodeService::new(self.registry.clone()), MAX_MESSAGE_SIZE);
        tracing::info!(%addr, origin = self.registry.origin().display(), "cache-node serving");
        let result = tonic::transport::Server::builder()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health)
            .add_service(reflection)
            .add_service(service)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
            .await;
        self.registry.shutdown().await?;
        result.map_err(|e| Error::Config(format!("gRPC server: {e}")))
    }
}

/// Opens a node from `config` and serves it on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    Node::open(&config).await?.serve(listener, shutdown).await
}
