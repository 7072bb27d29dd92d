//! The server's tower stack: layers every RPC passes through, the hand-framed `Fetch`
//! included, since they wrap the whole router (`Server::builder().layer(…)`) rather than
//! one generated service.
//!
//! [`Observe`] gives each RPC its span (a child of the caller's `traceparent`, so a load
//! is one trace across agent, node and peers) and its access record (`access`), and,
//! when the node requires tokens, lets in only a call that presents one of them (health
//! checks excepted) and within its client's quotas: the grant's `Caller` goes into the
//! request's extensions, where the handlers check its scope
//! (`modelcache_proto::auth::authorize`). Refusals go through the same access record, so
//! they are logged and counted like any call.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::transport::server::TcpConnectInfo;
use tower_layer::{Layer, Stack};
use tracing::Instrument;

use modelcache_proto::auth::Tokens;
use modelcache_proto::tls::ServerTls;

use crate::access::{Access, RpcNote};
use crate::quotas::{PacedBody, Quotas};
use crate::stats::NodeStats;
use crate::wire::FETCH_PATH;

/// Who may call, and how much each caller may take.
#[derive(Clone, Default)]
pub struct Gate {
    /// The grants a call must present one of; `None`: every call is let in.
    pub tokens: Option<Arc<Tokens>>,
    /// Limits per token name; `None`: no limits.
    pub quotas: Option<Arc<Quotas>>,
    /// The TLS the node serves; with a client CA, only clients with a certificate it
    /// signed get as far as a call. `None`: plaintext.
    pub tls: Option<Arc<ServerTls>>,
}

/// The stack, outermost layer last.
pub fn stack(stats: Arc<NodeStats>, gate: Gate) -> Stack<Observe, tower_layer::Identity> {
    Stack::new(Observe { stats, gate }, tower_layer::Identity::new())
}

#[derive(Clone)]
pub struct Observe {
    stats: Arc<NodeStats>,
    gate: Gate,
}

impl<S> Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            stats: self.stats.clone(),
            gate: self.gate.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    stats: Arc<NodeStats>,
    gate: Gate,
}

impl<S, B> tower_service::Service<http::Request<B>> for Observed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let fetch = path == FETCH_PATH;
        // `/modelcache.v1.ModelCache/Fetch` → `ModelCache/Fetch`.
        let method = path
            .trim_start_matches('/')
            .rsplit_once('.')
            .map_or(path, |(_, m)| m)
            .to_owned();
        // Health probes (peers send one every few seconds) and reflection log at debug.
        let routine = path.starts_with("/grpc.");
        self.stats.rpc(fetch);
        let peer = request
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        let span = if routine {
            tracing::debug_span!("rpc", otel.name = %method, rpc.method = %method)
        } else {
            tracing::info_span!(
                "rpc",
                otel.name = %method,
                otel.kind = "server",
                rpc.system = "grpc",
                rpc.method = %method,
                peer = peer.map(tracing::field::display),
                reference = tracing::field::Empty,
                bytes = tracing::field::Empty,
                code = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            )
        };
        modelcache_telemetry::propagation::adopt(&span, request.headers());
        let note = RpcNote::default();
        request.extensions_mut().insert(note.clone());
        let mut access = Access::new(
            method,
            peer,
            routine,
            fetch,
            note,
            span.clone(),
            &self.stats,
        );
        let mut admitted = None;
        if let Some(tokens) = &self.gate.tokens {
            // Let in by a token, then within its client's quotas; refusals are logged and
            // counted through the call's access record like any call.
            let admission = tokens.admit(&mut request).and_then(|caller| {
                let Some(caller) = caller else {
                    return Ok(());
                };
                access.client = Some(caller.name.clone());
                if let Some(quotas) = &self.gate.quotas {
                    admitted = Some(quotas.admit(&caller.name, fetch)?);
                }
                Ok(())
            });
            if let Err(refused) = admission {
                let refused = refused.into_http();
                return Box::pin(async move { Ok(access.observe(refused)) });
            }
        }
        let response = self.inner.call(request).instrument(span);
        Box::pin(async move {
            let response = response.await?;
            let response = match admitted {
                Some(admitted) => response.map(|body| Body::new(PacedBody::new(body, admitted))),
                None => response,
            };
            Ok(access.observe(response))
        })
    }
}
