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
//!
//! In a cluster (`--peers`), the `cluster` module probes the other nodes and ranks them
//! for each model; the domain sees it through `peers` only: a model another node owns is
//! resolved through that node, and its missing chunks (originals and variants) are filled
//! from it, digests checked, instead of from the origin.

pub mod access;
pub mod admin;
pub mod buffers;
pub mod cache;
pub mod catalog;
pub mod checks;
pub mod checksum;
pub mod chunks;
pub mod cluster;
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
pub mod metrics;
pub mod origin;
pub mod origin_counters;
pub mod pacer;
pub mod peers;
pub mod pinning;
pub mod pins;
pub mod quotas;
pub mod readahead;
pub mod registry;
pub mod service;
pub mod spans;
pub mod stats;
pub mod tasks;
pub mod tier_files;
pub mod tier_metrics;
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

use crate::cluster::{Cluster, ClusterOptions};
use crate::origin::Origin;
use crate::peers::Routing;
use crate::registry::Registry;

/// A node's state, opened but not yet serving.
pub struct Node {
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    /// `--advertise` as given; the bound address otherwise.
    advertise: Option<String>,
    admission: grpc::Admission,
    /// Where to serve Prometheus metrics, if anywhere.
    metrics_listen: Option<std::net::SocketAddr>,
    /// Who may call, and how much each caller may take.
    gate: layers::Gate,
}

impl Node {
    /// Opens the origin and the tiers, and loads the manifests saved in the cache dir.
    pub async fn open(config: &Config) -> Result<Self> {
        let origin = Origin::open(&config.origin, &config.s3_options())?;
        Self::with_origin(config, origin).await
    }

    /// Like `open`, with an origin built by the caller (any `ObjectStore`).
    pub async fn with_origin(config: &Config, origin: Origin) -> Result<Self> {
        std::fs::create_dir_all(&config.cache_dir).map_err(|e| {
            Error::io(
                format!("creating the cache dir {}", config.cache_dir.display()),
                e,
            )
        })?;
        let id = cluster::node_id(&config.cache_dir, config.node_id.as_deref())?;
        let peers: Vec<String> = config
            .peers
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        let tokens = config
            .auth_tokens_file
            .as_deref()
            .map(modelcache_proto::auth::Tokens::load)
            .transpose()
            .map_err(Error::Config)?;
        let peer_token = config
            .peer_token_file
            .as_deref()
            .map(|path| {
                let token = modelcache_proto::auth::read_token_file(path)?;
                modelcache_proto::auth::bearer(&token)
            })
            .transpose()
            .map_err(Error::Config)?;
        let (tls, peer_tls) = match config.tls()? {
            Some((server, client)) => (Some(server), client),
            None => (None, None),
        };
        let cluster = Cluster::new(
            id,
            ClusterOptions {
                peers: peers.clone(),
                advertise: config.advertise_address(),
                probe_interval: config.probe_interval,
                peer_timeout: config.peer_timeout,
                token: peer_token,
                tls: peer_tls,
            },
        );
        // A node alone ranks nothing: it owns every model.
        let routing = (!peers.is_empty()).then(|| cluster.clone() as Arc<dyn Routing>);
        let registry = Registry::open(config, origin, routing).await?;
        Ok(Self {
            registry: Arc::new(registry),
            cluster,
            advertise: config.advertise.clone(),
            metrics_listen: config.metrics_listen,
            gate: layers::Gate {
                quotas: config.quotas(tokens.is_some())?,
                tokens,
                tls,
            },
            admission: grpc::Admission {
                max_connections: config.max_connections,
                max_streams_per_connection: config.max_streams_per_connection,
                handshake_timeout: config.handshake_timeout,
                shutdown_grace: config.shutdown_grace,
            },
        })
    }

    /// The node's domain: resolving references, reading chunks, building variants.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Whether the node serves TLS (`--tls-cert`).
    pub fn serves_tls(&self) -> bool {
        self.gate.tls.is_some()
    }

    /// The cluster as this node sees it.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// Serves gRPC on `listener` until `shutdown` completes, then stops accepting, cuts
    /// open streams, finishes background work and flushes the disk tier. Probes the peers
    /// meanwhile; the node reports ready once it probed each once.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        if self.advertise.is_none()
            && let Ok(addr) = listener.local_addr()
            && !addr.ip().is_unspecified()
        {
            self.cluster.set_advertise(addr.to_string());
        }
        self.cluster.start();
        let metrics = match self.metrics_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| Error::io(format!("--metrics-listen {addr}"), e))?;
                let (registry, cluster) = (self.registry.clone(), self.cluster.clone());
                Some(tokio::spawn(metrics::serve(listener, registry, cluster)))
            }
            None => None,
        };
        let result = grpc::serve(
            self.registry.clone(),
            self.cluster.clone(),
            listener,
            (self.admission, self.gate.clone()),
            shutdown,
        )
        .await;
        if let Some(task) = metrics {
            task.abort();
            let _ = task.await;
        }
        self.cluster.stop().await;
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
