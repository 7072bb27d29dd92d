//! The daemon's own metrics, on `--metrics-listen` (off unless given), served like the
//! node's (`modelcache_telemetry::metrics_http`). Every metric is exported from start.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Ensure` latency buckets, in seconds: a model on disk answers in about a millisecond,
/// a fetch takes seconds to minutes.
const ENSURE_SECONDS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0,
];

/// Counted as the daemon works.
#[derive(Debug)]
pub struct Metrics {
    /// Bytes received from nodes by the daemon's fetches.
    pub fetched_bytes: Counter,
    /// Fetches that ended, by `outcome` (`ok`, `failed`).
    pub fetches: Family<[(&'static str, &'static str); 1], Counter>,
    /// `Ensure` calls answered from the local copy without asking a node.
    pub local_hits: Counter,
    /// Models removed: by the budget or by `Evict`.
    pub evictions: Counter,
    /// Bytes those evictions freed.
    pub evicted_bytes: Counter,
    /// How long `Ensure` calls took, answered or failed.
    pub ensure_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            fetched_bytes: Counter::default(),
            fetches: Family::default(),
            local_hits: Counter::default(),
            evictions: Counter::default(),
            evicted_bytes: Counter::default(),
            ensure_seconds: Histogram::new(ENSURE_SECONDS),
        }
    }
}

impl Metrics {
    /// A fetch ended, `ok` or not.
    pub fn fetch_ended(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.fetches.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// A registry exporting these metrics.
    pub fn registry(&self) -> Arc<Registry> {
        let mut r = Registry::default();
        r.register(
            "modelcache_agent_fetched_bytes",
            "Bytes received from cache nodes by the daemon's fetches.",
            self.fetched_bytes.clone(),
        );
        // Both outcomes from start, at 0.
        for outcome in ["ok", "failed"] {
            drop(self.fetches.get_or_create(&[("outcome", outcome)]));
        }
        r.register(
            "modelcache_agent_fetches",
            "Fetches by the daemon that ended, by outcome (ok: the model present and verified).",
            self.fetches.clone(),
        );
        r.register(
            "modelcache_agent_local_hits",
            "Ensure calls answered from the local copy without asking a node.",
            self.local_hits.clone(),
        );
        r.register(
            "modelcache_agent_evictions",
            "Models the daemon removed (over --max-size, or by Evict).",
            self.evictions.clone(),
        );
        r.register(
            "modelcache_agent_evicted_bytes",
            "Bytes those evictions freed.",
            self.evicted_bytes.clone(),
        );
        r.register(
            "modelcache_agent_ensure_seconds",
            "How long Ensure calls took, answered or failed.",
            self.ensure_seconds.clone(),
        );
        Arc::new(r)
    }
}

/// Serves `registry` on `--metrics-listen`, when given: the task, or the error naming the
/// address that could not be bound.
pub async fn serve(
    listen: Option<std::net::SocketAddr>,
    registry: Arc<Registry>,
) -> Result<Option<tokio::task::JoinHandle<()>>, crate::error::AgentError> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        crate::error::AgentError::Daemon {
            message: format!("--metrics-listen {addr}: {e}"),
        }
    })?;
    let ready = Arc::new(|| Ok(()));
    Ok(Some(tokio::spawn(
        modelcache_telemetry::metrics_http::serve(listener, registry, ready),
    )))
}
