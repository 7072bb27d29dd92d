//! Prometheus metrics on `--metrics-listen` (off unless given): `/metrics` in the
//! OpenMetrics text format, `/healthz` (the process answers) and `/readyz` (the tiers are
//! open, the node has probed its peers once, so it ranks models as they do, and the
//! origin or a peer has answered).
//!
//! Every metric is exported from start (counters at 0). Two names are fixed because
//! dashboards and docs use them: `modelcache_origin_bytes_total` and
//! `modelcache_served_bytes_total{tier}`.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use tokio::net::TcpListener;

use crate::cache::TierUsage;
use crate::cluster::Cluster;
use crate::registry::Registry;
use crate::stats::Stats;

/// The node's counters, read from its live stats at each scrape.
struct NodeCollector {
    registry: Arc<Registry>,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

/// One counter without labels (`_total` is added to `name`).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// One labelled family: each row its labels and value (a gauge's as a signed number).
fn family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Vec<(&'a str, &'a str)>, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let sample = family.encode_family(&labels)?;
        match kind {
            MetricType::Gauge => ConstGauge::new(value as i64).encode(sample)?,
            _ => ConstCounter::new(value).encode(sample)?,
        }
    }
    Ok(())
}

/// One counter family with one label.
fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> std::fmt::Result {
    let rows = values.iter().map(|(v, n)| (vec![(label, *v)], *n));
    family(encoder, name, help, MetricType::Counter, rows)
}

/// One figure of a tier's usage.
type UsageOf = fn(&TierUsage) -> u64;

/// The tiers' families: capacity and usage (gauges), disk I/O and evictions (counters),
/// each by cache (`originals`, `variants`).
fn tiers(e: &mut DescriptorEncoder, usage: &[(&str, TierUsage)]) -> std::fmt::Result {
    let capacity = usage.iter().flat_map(|(cache, u)| {
        [("memory", u.memory_capacity), ("disk", u.disk_capacity)]
            .map(|(tier, bytes)| (vec![("cache", *cache), ("tier", tier)], bytes))
    });
    family(
        e,
        "modelcache_tier_capacity_bytes",
        "Configured size of each tier, by cache and tier (memory, disk).",
        MetricType::Gauge,
        capacity,
    )?;
    let used = usage.iter().flat_map(|(cache, u)| {
        [("memory", u.memory_used), ("disk", u.disk_used)]
            .map(|(tier, bytes)| (vec![("cache", *cache), ("tier", tier)], bytes))
    });
    family(
        e,
        "modelcache_tier_used_bytes",
        "Bytes each tier holds now, by cache and tier (disk: its blocks in use, whole).",
        MetricType::Gauge,
        used,
    )?;
    let counters_of: [(&str, &str, UsageOf); 4] = [
        (
            "modelcache_disk_tier_read_bytes",
            "Bytes read from the disk tier's files (foyer's device statistics), by cache.",
            |u| u.disk_read_bytes,
        ),
        (
            "modelcache_disk_tier_written_bytes",
            "Bytes written to the disk tier's files (foyer's device statistics), by cache.",
            |u| u.disk_written_bytes,
        ),
        (
            "modelcache_memory_tier_evictions",
            "Chunks the memory tier evicted to make room, by cache (they stay on disk).",
            |u| u.memory_evictions,
        ),
        (
            "modelcache_disk_tier_evictions",
            "Blocks the disk tier reclaimed to make room, by cache: every chunk in them is \
             gone from the node.",
            |u| u.disk_evictions,
        ),
    ];
    for (name, help, value) in counters_of {
        let rows = usage
            .iter()
            .map(|(cache, u)| (vec![("cache", *cache)], value(u)));
        family(e, name, help, MetricType::Counter, rows)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s: Stats = self.registry.stats();
        let e = &mut encoder;
        counter(
            e,
            "modelcache_origin_bytes",
            "Object bytes read from the origin.",
            s.origin_bytes,
        )?;
        counter(
            e,
            "modelcache_origin_requests",
            "Requests sent to the origin (listings, ranged GETs, checksum HEADs).",
            s.origin_requests,
        )?;
        counter(
            e,
            "modelcache_origin_errors",
            "Origin requests that failed (after object_store's retries), and bodies cut \
             short.",
            s.origin_errors,
        )?;
        counters(
            e,
            "modelcache_served_bytes",
            "Chunk bytes sent to clients by Fetch, by the tier that held them (origin: in \
             neither tier, read from the origin or filled from a peer for this request).",
            "tier",
            &[
                ("memory", s.served_memory),
                ("disk", s.served_disk),
                ("origin", s.served_origin),
            ],
        )?;
        let reads = self.registry.node_stats().reads_by_cache();
        let reads = reads.iter().flat_map(|(cache, by_tier)| {
            ["memory", "disk", "origin"]
                .into_iter()
                .zip(*by_tier)
                .map(|(tier, n)| (vec![("cache", *cache), ("tier", tier)], n))
        });
        family(
            e,
            "modelcache_chunk_reads",
            "Chunks read, by cache (originals, variants) and by where they were found \
             (memory and disk are hits; origin is a miss: read from the origin or a peer).",
            MetricType::Counter,
            reads,
        )?;
        counter(
            e,
            "modelcache_corrupt_chunks",
            "Chunks that failed their digest in a tier and were read again.",
            s.corrupt_chunks,
        )?;
        counter(
            e,
            "modelcache_variant_builds",
            "Variant builds started.",
            s.variant_builds,
        )?;
        counter(
            e,
            "modelcache_rpcs",
            "RPCs received, every service and method.",
            s.rpcs,
        )?;
        counter(
            e,
            "modelcache_fetch_rpcs",
            "ModelCache.Fetch calls received.",
            s.fetch_rpcs,
        )?;
        counter(
            e,
            "modelcache_peer_fill_bytes",
            "Chunk bytes filled from peer nodes (digests checked).",
            s.peer_fill_bytes,
        )?;
        counter(
            e,
            "modelcache_peer_fill_failures",
            "Chunk requests to peers that failed.",
            s.peer_fill_failures,
        )?;
        let live = self.registry.node_stats();
        tiers(e, &live.tier_usage())?;
        let (revalidations, stale) = live.revalidations();
        counter(
            e,
            "modelcache_revalidations",
            "Listings of a model the node had a revision of, older than --revalidate-after.",
            revalidations,
        )?;
        counter(
            e,
            "modelcache_stale_serves",
            "Requests answered with a revision the origin had not just confirmed (its \
             listing still under way, or failed).",
            stale,
        )?;
        let (built, failed) = live.builds_ended();
        counters(
            e,
            "modelcache_variant_builds_ended",
            "Variant builds that ended, by outcome.",
            "outcome",
            &[("ok", built), ("failed", failed)],
        )?;
        let (models, bytes) = self.registry.pins().totals();
        for (name, help, value) in [
            (
                "modelcache_pinned_models",
                "Models pinned on this node.",
                models,
            ),
            (
                "modelcache_pinned_bytes",
                "Bytes of the pinned models' files, kept outside the tiers.",
                bytes,
            ),
        ] {
            let gauge = ConstGauge::new(value as i64);
            gauge.encode(e.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let gauge = ConstGauge::new(live.fetches_in_flight() as i64);
        gauge.encode(e.encode_descriptor(
            "modelcache_fetches_in_flight",
            "Fetch streams open now.",
            None,
            gauge.metric_type(),
        )?)?;
        let by_client = live.rpcs_by_client();
        family(
            e,
            "modelcache_client_rpcs",
            "RPCs that ended, by the name of the token that let them in (--auth-tokens-file) \
             and gRPC status code.",
            MetricType::Counter,
            by_client
                .iter()
                .map(|(client, code, n)| (vec![("client", client.as_str()), ("code", *code)], *n)),
        )?;
        let handled = live.rpcs_by_code();
        family(
            e,
            "modelcache_rpcs_handled",
            "RPCs that ended, by method (Service/Method) and gRPC status code (CANCELLED: \
             the client went away).",
            MetricType::Counter,
            handled
                .iter()
                .map(|(method, code, n)| (vec![("method", method.as_str()), ("code", *code)], *n)),
        )
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until the task is dropped,
/// and meanwhile asks the origin until it answers once.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, cluster: Arc<Cluster>) {
    let mut prom = prometheus_client::registry::Registry::default();
    prom.register(
        "modelcache_variant_build_seconds",
        "How long variant builds took (quantizing and storing), in seconds.",
        registry.node_stats().build_seconds().clone(),
    );
    prom.register_collector(Box::new(NodeCollector {
        registry: registry.clone(),
    }));
    let ready = {
        let registry = registry.clone();
        Arc::new(move || readiness(&registry, &cluster))
    };
    let http = modelcache_telemetry::metrics_http::serve(listener, Arc::new(prom), ready);
    tokio::join!(http, wait_for_origin(&registry));
}

/// Ready: the peers were probed once, and the origin or a healthy peer answered.
fn readiness(registry: &Registry, cluster: &Cluster) -> Result<(), String> {
    if !cluster.is_ready() {
        return Err("the first round of peer probes has not finished".to_owned());
    }
    let peer = cluster.members().iter().any(|m| !m.local && m.healthy);
    if peer || registry.origin_source().ever_answered() {
        Ok(())
    } else {
        Err(format!(
            "neither the origin ({}) nor a peer has answered yet",
            registry.origin()
        ))
    }
}

/// Lists the origin's top folder until it answers once (a request already sent by a
/// client counts), pausing 1 s, then twice as long each time up to 30 s.
async fn wait_for_origin(registry: &Registry) {
    let origin = registry.origin_source();
    let mut pause = Duration::from_secs(1);
    while !origin.ever_answered() {
        match origin.probe().await {
            Ok(()) => break,
            Err(e) => tracing::warn!(
                origin = %origin.display(),
                "not ready: the origin does not answer yet: {e}"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}
