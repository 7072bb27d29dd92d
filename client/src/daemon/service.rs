//! `modelcache.v1.Agent` over gRPC: the daemon's calls as messages, its errors as codes.

use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use futures::Stream;
use modelcache_proto::Reference;
use modelcache_proto::auth::{Action, authorize};
use modelcache_proto::v1::agent_server::{Agent as AgentApi, AgentServer};
use modelcache_proto::v1::{
    AgentPrefetchRequest, AgentPrefetchResponse, EnsureEvent, EnsureRequest, EnsureResponse,
    EvictRequest, EvictResponse, FetchProgress, LocalModelStatus, ReleaseRequest, ReleaseResponse,
    StatusRequest, StatusResponse, ensure_event,
};
use tonic::{Code, Request, Response, Status};

use super::socket::{ConnInfo, Tracked};
use super::{Daemon, Ensured};
use crate::error::AgentError;

/// How often `EnsureProgress` reports while a model is fetched.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// The gRPC status a worker gets for an agent error: the same code a node would send,
/// and the agent's message (what failed, on which model, what to do).
pub fn status_of(e: &AgentError) -> Status {
    let code = match e {
        AgentError::InvalidReference(_) | AgentError::Invalid { .. } => Code::InvalidArgument,
        AgentError::NotFound { .. } | AgentError::NotPresent { .. } => Code::NotFound,
        AgentError::Unreachable { .. }
        | AgentError::Unavailable { .. }
        | AgentError::Stalled { .. } => Code::Unavailable,
        AgentError::Aborted { .. } => Code::Aborted,
        AgentError::FailedPrecondition { .. }
        | AgentError::UnsafePath { .. }
        | AgentError::Incompatible { .. }
        | AgentError::WeightFile { .. }
        | AgentError::Busy { .. } => Code::FailedPrecondition,
        AgentError::Denied { code, .. } | AgentError::Node { code, .. } => *code,
        AgentError::NoSpace { .. } => Code::ResourceExhausted,
        AgentError::Protocol { .. } | AgentError::Integrity { .. } | AgentError::Corrupt { .. } => {
            Code::DataLoss
        }
        AgentError::Io { .. } | AgentError::Daemon { .. } | AgentError::Config { .. } => {
            Code::Internal
        }
    };
    Status::new(code, e.to_string())
}

fn reference(text: &str) -> Result<Reference, Status> {
    Reference::parse(text).map_err(|e| Status::invalid_argument(e.to_string()))
}

fn response(e: Ensured, lease_id: String) -> EnsureResponse {
    EnsureResponse {
        path: e.path.display().to_string(),
        reference: e.reference.to_string(),
        revision: e.revision,
        size: e.size,
        lease_id,
        fetched_bytes: e.fetched,
        offline: e.offline,
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

struct Service(Arc<Daemon>);

impl Service {
    /// `Ensure` with its lease: taken before the fetch (so a model a worker waits for is
    /// never evicted under it), dropped again when the fetch fails.
    async fn ensure(&self, request: Request<EnsureRequest>) -> Result<EnsureResponse, Status> {
        let conn = request.extensions().get::<ConnInfo>().map(|c| c.id);
        let r = reference(&request.get_ref().reference)?;
        authorize(request.extensions(), Action::Fetch, Some(r.name()))?;
        // The caller's trace continues here: from `traceparent` in the request, else
        // from its gRPC metadata (a worker whose own gRPC client propagates context).
        let span = tracing::info_span!("ensure", reference = %request.get_ref().reference);
        let headers = request.metadata().clone().into_headers();
        let req = request.into_inner();
        if req.traceparent.is_empty() {
            modelcache_telemetry::propagation::adopt(&span, &headers);
        } else {
            modelcache_telemetry::propagation::adopt_traceparent(&span, &req.traceparent, "");
        }
        let lease = req.lease.then(|| self.0.lease(&r, conn));
        match self.0.ensure(&r, req.refresh).instrument(span).await {
            Ok(e) => Ok(response(e, lease.unwrap_or_default())),
            Err(s) => {
                if let Some(id) = lease {
                    self.0.release(&id);
                }
                Err(s)
            }
        }
    }
}

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<EnsureEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for Service {
    async fn ensure(
        &self,
        request: Request<EnsureRequest>,
    ) -> Result<Response<EnsureResponse>, Status> {
        Service::ensure(self, request).await.map(Response::new)
    }

    type EnsureProgressStream = EventStream;

    async fn ensure_progress(
        &self,
        request: Request<EnsureRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = reference(&request.get_ref().reference)?;
        authorize(request.extensions(), Action::Fetch, Some(r.name()))?;
        let daemon = self.0.clone();
        let this = Service(self.0.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let ensure = this.ensure(request);
            tokio::pin!(ensure);
            let mut tick = tokio::time::interval(PROGRESS_EVERY);
            let last = loop {
                tokio::select! {
                    done = &mut ensure => break done,
                    _ = tick.tick() => {
                        // Once the transfer started (its size known).
                        if let Some((done, total)) = daemon.progress_of(&r).filter(|p| p.1 > 0) {
                            let event = EnsureEvent {
                                event: Some(ensure_event::Event::Progress(FetchProgress {
                                    reference: r.to_string(),
                                    done_bytes: done,
                                    total_bytes: total,
                                })),
                            };
                            if tx.send(Ok(event)).await.is_err() {
                                // The caller left; the fetch goes on for the next one.
                                return;
                            }
                        }
                    }
                }
            };
            let event = last.map(|ready| EnsureEvent {
                event: Some(ensure_event::Event::Ready(ready)),
            });
            let _ = tx.send(event).await;
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn prefetch(
        &self,
        request: Request<AgentPrefetchRequest>,
    ) -> Result<Response<AgentPrefetchResponse>, Status> {
        let refs = request
            .get_ref()
            .references
            .iter()
            .map(|s| {
                let r = reference(s)?;
                authorize(request.extensions(), Action::Prefetch, Some(r.name()))?;
                Ok(r)
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let queued = self.0.queue(&refs) as u32;
        Ok(Response::new(AgentPrefetchResponse { queued }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        authorize(request.extensions(), Action::Fetch, None)?;
        let released = self.0.release(&request.into_inner().lease_id);
        Ok(Response::new(ReleaseResponse { released }))
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        authorize(request.extensions(), Action::Fetch, None)?;
        let s = self.0.snapshot().await;
        Ok(Response::new(StatusResponse {
            dir: s.dir.display().to_string(),
            used_bytes: s.used_bytes,
            max_bytes: s.max_bytes.unwrap_or(0),
            models: s
                .models
                .into_iter()
                .map(|m| LocalModelStatus {
                    reference: m.reference.to_string(),
                    revision: m.revision,
                    path: m.path.display().to_string(),
                    size: m.size,
                    last_used_unix_ms: unix_ms(m.last_used),
                    leases: m.leases,
                })
                .collect(),
            in_flight: s
                .in_flight
                .into_iter()
                .map(|(r, done, total)| FetchProgress {
                    reference: r.to_string(),
                    done_bytes: done,
                    total_bytes: total,
                })
                .collect(),
            queued: s.queued.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn evict(
        &self,
        request: Request<EvictRequest>,
    ) -> Result<Response<EvictResponse>, Status> {
        let r = reference(&request.get_ref().reference)?;
        authorize(request.extensions(), Action::Admin, Some(r.name()))?;
        let freed = self.0.evict(&r, request.get_ref().force).await?;
        Ok(Response::new(EvictResponse {
            evicted: freed.is_some(),
            freed_bytes: freed.unwrap_or(0),
        }))
    }
}

/// Serves the daemon on `incoming` (with health and reflection) until `shutdown`.
pub async fn serve(
    daemon: Arc<Daemon>,
    incoming: std::pin::Pin<
        Box<dyn Stream<Item = std::io::Result<Tracked<super::socket::Conn>>> + Send>,
    >,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<AgentServer<Service>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(modelcache_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let daemon_error = |e: String| AgentError::Daemon { message: e };
    let v1 = reflection()
        .build_v1()
        .map_err(|e| daemon_error(format!("reflection: {e}")))?;
    let v1alpha = reflection()
        .build_v1alpha()
        .map_err(|e| daemon_error(format!("reflection: {e}")))?;
    let tokens = daemon.options.tokens.clone();
    let watch = tokens
        .clone()
        .map(|t| tokio::spawn(modelcache_proto::auth::watch(t)));
    let certificates = daemon
        .options
        .tls
        .clone()
        .map(|t| tokio::spawn(modelcache_proto::tls::watch(t)));
    let served = tonic::transport::Server::builder()
        .layer(super::auth::RequireToken(tokens))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha)
        .add_service(AgentServer::new(Service(daemon)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|e| daemon_error(format!("serving: {e}")));
    for watch in watch.into_iter().chain(certificates) {
        watch.abort();
        let _ = watch.await;
    }
    served
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
}
