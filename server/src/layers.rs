//! The server's tower stack: layers every RPC passes through, the hand-framed `Fetch`
//! included, since they wrap the whole router (`Server::builder().layer(…)`) rather than
//! one generated service. Limits, access logs, trace propagation and authentication each
//! go in as one more layer of `stack`.

use std::sync::Arc;
use std::task::{Context, Poll};

use tower_layer::{Layer, Stack};

use crate::stats::NodeStats;
use crate::wire::FETCH_PATH;

/// The stack, outermost layer last.
pub fn stack(stats: Arc<NodeStats>) -> Stack<CountRpcs, tower_layer::Identity> {
    Stack::new(CountRpcs { stats }, tower_layer::Identity::new())
}

/// Counts every RPC that reaches the node (`Stats::rpcs`, `Stats::fetch_rpcs`).
#[derive(Clone)]
pub struct CountRpcs {
    stats: Arc<NodeStats>,
}

impl<S> Layer<S> for CountRpcs {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            stats: self.stats.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Counted<S> {
    inner: S,
    stats: Arc<NodeStats>,
}

impl<S, B> tower_service::Service<http::Request<B>> for Counted<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        self.stats.rpc(request.uri().path() == FETCH_PATH);
        self.inner.call(request)
    }
}
