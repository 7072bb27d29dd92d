//! Workers' tokens (`daemon --auth-tokens-file`, the node's file format): with a tokens
//! file, every call but health checks presents a granted token (`UNAUTHENTICATED`
//! otherwise) and stays within its scope (`PERMISSION_DENIED`, checked by the handlers
//! with `modelcache_proto::auth::authorize`): `Ensure`, `EnsureProgress`, `Status` and
//! `Release` are `fetch`, `Prefetch` is `prefetch`, `Evict` is `admin`. On a unix socket the socket's permissions already decide who connects; on
//! TCP the tokens are what keeps other hosts out.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use modelcache_proto::auth::Tokens;
use tonic::body::Body;
use tonic::codegen::http;

/// The layer that lets in only calls with a granted token (every call when `None`).
#[derive(Clone)]
pub struct RequireToken(pub Option<Arc<Tokens>>);

impl<S> tower_layer::Layer<S> for RequireToken {
    type Service = Checked<S>;

    fn layer(&self, inner: S) -> Checked<S> {
        Checked {
            inner,
            tokens: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Checked<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Checked<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(Err(refused)) = self.tokens.as_ref().map(|t| t.admit(&mut request)) {
            let refused = refused.into_http();
            return Box::pin(async move { Ok(refused) });
        }
        Box::pin(self.inner.call(request))
    }
}
