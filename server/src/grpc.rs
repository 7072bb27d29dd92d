//! The gRPC server: HTTP/2 sized for bulk streams, the tower stack every RPC passes
//! through (`layers`), and the services: health, reflection, and `ModelCache` (with
//! `Fetch` framed by `wire`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use modelcache_proto::tls;
use modelcache_proto::v1::admin_server::AdminServer;
use modelcache_proto::v1::model_cache_server::ModelCacheServer;
use modelcache_proto::wire::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, STREAM_WINDOW};
use tokio::net::TcpListener;

use crate::admin::AdminService;
use crate::cluster::Cluster;
use crate::error::{Error, Result};
use crate::layers::Gate;
use crate::registry::Registry;
use crate::service::NodeService;
use crate::{layers, listener, wire};

/// Which connections the server admits (`listener`).
#[derive(Clone, Copy, Debug)]
pub struct Admission {
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub handshake_timeout: Duration,
    /// How long open streams may go on after the shutdown signal.
    pub shutdown_grace: Duration,
}

/// How long connections may stay open after the grace, once their streams were ended
/// (a call waiting on something else, like a variant build, is cut then).
const AFTER_GRACE: Duration = Duration::from_secs(5);

/// How often pinned models are checked for a new revision.
const PIN_CHECK: Duration = Duration::from_secs(60);

/// Serves `registry` on `listener` until `shutdown` completes, then stops accepting and
/// cuts open streams.
pub async fn serve(
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
    listener: TcpListener,
    (admission, gate): (Admission, Gate),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("listener address", e))?;
    let mutual = gate.tls.as_ref().is_some_and(|t| t.mutual());
    if !addr.ip().is_loopback() && gate.tokens.is_none() && !mutual {
        tracing::warn!(
            %addr,
            "authentication is OFF and this node listens beyond loopback: anyone who can \
             reach {addr} can read every model in the origin (--auth-tokens-file, \
             --tls-client-ca)"
        );
    } else if !addr.ip().is_loopback() && gate.tls.is_none() {
        tracing::warn!(
            %addr,
            "this node listens beyond loopback without TLS: tokens and models cross the \
             network in plaintext (--tls-cert, --tls-key)"
        );
    }
    let tokens_watch = gate
        .tokens
        .clone()
        .map(|t| tokio::spawn(modelcache_proto::auth::watch(t)));
    let certificates: Vec<Arc<dyn tls::Reload>> = [
        gate.tls.clone().map(|t| t as Arc<dyn tls::Reload>),
        cluster.tls().cloned().map(|t| t as Arc<dyn tls::Reload>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let certificates_watch = certificates
        .into_iter()
        .map(|t| tokio::spawn(tls::watch(t)));
    let tokens_watch: Vec<_> = tokens_watch.into_iter().chain(certificates_watch).collect();
    if let Some(tls) = &gate.tls {
        tracing::info!(
            mutual = tls.mutual(),
            cert = %tls.identity().cert.display(),
            "serving TLS{}",
            if tls.mutual() { " (clients must present certificates)" } else { "" }
        );
    }
    let (health_reporter, health) = tonic_health::server::health_reporter();
    // The process answers at once (`""` is SERVING: peers probe that); the model service
    // is ready once the node has probed its peers, so that it ranks models as they do.
    health_reporter
        .set_not_serving::<ModelCacheServer<NodeService>>()
        .await;
    let readiness = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            cluster.wait_ready().await;
            health_reporter
                .set_serving::<ModelCacheServer<NodeService>>()
                .await;
            tracing::info!(
                node_id = cluster.id(),
                members = cluster.members().len(),
                "ready"
            );
        })
    };
    // Reflection in both versions clients speak (grpcurl, Python's helper, older tools
    // ask for v1alpha), describing the health service too.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(modelcache_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let stats = registry.node_stats().clone();
    let tls = gate.tls.clone();
    let admin = AdminService::new(registry.clone(), cluster.clone());
    let trimmer = tokio::spawn(crate::trim::return_freed_memory(
        registry.read_ahead().clone(),
    ));
    let pin_keeper = tokio::spawn(crate::pinning::keep_current(registry.clone(), PIN_CHECK));
    tracing::info!(%addr, origin = registry.origin(), "cache-node serving");
    // Ended when the grace after the shutdown signal is over: open streams then end with
    // UNAVAILABLE.
    let cut = tokio_util::sync::CancellationToken::new();
    let service = wire::ModelCacheService::new(
        NodeService::new(registry, cluster),
        MAX_MESSAGE_SIZE,
        cut.clone(),
    );
    let (stopping, stopped) = tokio::sync::oneshot::channel();
    let shutdown = async move {
        shutdown.await;
        let _ = stopping.send(());
    };
    let grace = admission.shutdown_grace;
    let deadline = async move {
        if stopped.await.is_err() {
            return std::future::pending().await;
        }
        tracing::info!(
            ?grace,
            "stopping: no new connections; open streams may finish"
        );
        tokio::time::sleep(grace).await;
        tracing::warn!(
            ?grace,
            "--shutdown-grace is over: ending open streams with UNAVAILABLE"
        );
        cut.cancel();
        tokio::time::sleep(AFTER_GRACE).await;
    };
    let served = tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_concurrent_streams(admission.max_streams_per_connection.max(1))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .layer(layers::stack(stats, gate))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(AdminServer::new(admin))
        .serve_with_incoming_shutdown(
            listener::maybe_tls(
                listener::incoming(
                    listener,
                    admission.max_connections,
                    admission.handshake_timeout,
                ),
                tls,
                admission.handshake_timeout,
            ),
            shutdown,
        );
    let served = tokio::select! {
        served = served => served.map_err(|e| Error::Config(format!("gRPC server: {e}"))),
        () = deadline => {
            tracing::warn!("connections still open after the grace; closing them");
            Ok(())
        }
    };
    // Every task of the server stops and is waited for.
    for task in [trimmer, readiness, pin_keeper]
        .into_iter()
        .chain(tokens_watch)
    {
        task.abort();
        let _ = task.await;
    }
    served
}
