//! Counters the node keeps as it serves, and the snapshot of them it exposes (`Node::stats`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use prometheus_client::metrics::histogram::Histogram;

use std::sync::Arc;

use crate::cache::{ChunkCache, Tier, TierUsage};

/// Buckets of the variant-build duration histogram, in seconds: a small model builds in
/// about a second, a 7B model's GGUF in minutes.
pub const BUILD_SECONDS_BUCKETS: [f64; 9] = [0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

/// Live counters, shared by the parts that count.
pub struct NodeStats {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    bytes_served: AtomicU64,
    /// Of those, by the tier that held them: memory, disk, neither (origin or peer).
    served_by_tier: [AtomicU64; 3],
    corrupt_chunks: AtomicU64,
    variant_builds: AtomicU64,
    rpcs: AtomicU64,
    fetch_rpcs: AtomicU64,
    peer_fill_bytes: AtomicU64,
    peer_fill_failures: AtomicU64,
    /// `Fetch` streams open now.
    fetches_in_flight: AtomicI64,
    /// Chunks read, by cache (originals, variants) and tier (memory, disk, origin).
    reads_by_cache: [[AtomicU64; 3]; 2],
    /// Listings of a model the node had a revision of (it was older than
    /// `--revalidate-after`).
    revalidations: AtomicU64,
    /// Requests answered with a revision the origin had not just confirmed: while its
    /// listing was still under way, or after it failed.
    stale_serves: AtomicU64,
    /// Variant builds that ended, by outcome: succeeded, failed.
    builds_ended: [AtomicU64; 2],
    /// How long variant builds took, in seconds.
    build_seconds: Histogram,
    /// RPCs that ended, by method (`ModelCache/Fetch`) and status code (`OK`).
    rpcs_by_code: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// RPCs that ended, by the name of the token that let them in and code.
    rpcs_by_client: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// The two tiers, `originals` and `variants`, read at each scrape.
    tiers: Vec<(&'static str, Arc<ChunkCache>)>,
}

impl Default for NodeStats {
    fn default() -> Self {
        Self {
            memory_hits: AtomicU64::new(0),
            disk_hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            bytes_served: AtomicU64::new(0),
            served_by_tier: Default::default(),
            corrupt_chunks: AtomicU64::new(0),
            variant_builds: AtomicU64::new(0),
            rpcs: AtomicU64::new(0),
            fetch_rpcs: AtomicU64::new(0),
            peer_fill_bytes: AtomicU64::new(0),
            peer_fill_failures: AtomicU64::new(0),
            fetches_in_flight: AtomicI64::new(0),
            reads_by_cache: Default::default(),
            revalidations: AtomicU64::new(0),
            stale_serves: AtomicU64::new(0),
            builds_ended: Default::default(),
            build_seconds: Histogram::new(BUILD_SECONDS_BUCKETS),
            rpcs_by_code: Mutex::default(),
            rpcs_by_client: Mutex::default(),
            tiers: Vec::new(),
        }
    }
}

/// What the node has done since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunks read from the memory tier.
    pub memory_hits: u64,
    /// Chunks read from the disk tier.
    pub disk_hits: u64,
    /// Chunks read from the origin.
    pub misses: u64,
    /// Chunk bytes sent to clients by `Fetch`.
    pub bytes_served: u64,
    /// Of those, held by the memory tier.
    pub served_memory: u64,
    /// Held by the disk tier.
    pub served_disk: u64,
    /// In neither tier: read from the origin (or filled from a peer) for the request.
    pub served_origin: u64,
    /// Chunks that failed their digest in a tier and were read again.
    pub corrupt_chunks: u64,
    /// Variant builds started (each runs once per model, variant and revision).
    pub variant_builds: u64,
    /// Requests sent to the origin (listings and ranged GETs).
    pub origin_requests: u64,
    /// Object bytes read from the origin.
    pub origin_bytes: u64,
    /// Origin requests that failed, and bodies cut short.
    pub origin_errors: u64,
    /// RPCs received, every service and method counted by the server's layer stack.
    pub rpcs: u64,
    /// Of those, `ModelCache.Fetch` calls.
    pub fetch_rpcs: u64,
    /// Chunk bytes filled from peer nodes (their digests checked).
    pub peer_fill_bytes: u64,
    /// Chunk requests to peers that failed (unreachable, stalled, wrong bytes or revision).
    pub peer_fill_failures: u64,
}

fn tier_index(tier: Tier) -> usize {
    match tier {
        Tier::Memory => 0,
        Tier::Disk => 1,
        Tier::Origin => 2,
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl NodeStats {
    /// Counters that also report the usage of the two tiers.
    pub fn watching(originals: &Arc<ChunkCache>, variants: &Arc<ChunkCache>) -> Self {
        Self {
            tiers: vec![
                ("originals", originals.clone()),
                ("variants", variants.clone()),
            ],
            ..Self::default()
        }
    }

    /// Each tier's usage, by cache (`originals`, `variants`).
    pub fn tier_usage(&self) -> Vec<(&'static str, TierUsage)> {
        self.tiers
            .iter()
            .map(|(name, c)| (*name, c.usage()))
            .collect()
    }

    /// A chunk of an original (`variant` false) or of a built variant was read from `tier`.
    pub fn chunk_read(&self, variant: bool, tier: Tier) {
        let counter = match tier {
            Tier::Memory => &self.memory_hits,
            Tier::Disk => &self.disk_hits,
            Tier::Origin => &self.misses,
        };
        add(counter, 1);
        add(
            &self.reads_by_cache[usize::from(variant)][tier_index(tier)],
            1,
        );
    }

    /// Chunks read, by cache (`originals`, `variants`) and tier (memory, disk, origin).
    pub fn reads_by_cache(&self) -> [(&'static str, [u64; 3]); 2] {
        let get = |c: &[AtomicU64; 3]| c.each_ref().map(|n| n.load(Ordering::Relaxed));
        [
            ("originals", get(&self.reads_by_cache[0])),
            ("variants", get(&self.reads_by_cache[1])),
        ]
    }

    /// `bytes` of a chunk found in `tier` were sent to a client.
    pub fn served(&self, bytes: u64, tier: Tier) {
        add(&self.bytes_served, bytes);
        add(&self.served_by_tier[tier_index(tier)], bytes);
    }

    pub fn corrupt_chunk(&self) {
        add(&self.corrupt_chunks, 1);
    }

    pub fn variant_build(&self) {
        add(&self.variant_builds, 1);
    }

    /// A chunk of `bytes` was filled from a peer.
    pub fn peer_fill(&self, bytes: u64) {
        add(&self.peer_fill_bytes, bytes);
    }

    /// A chunk request to a peer failed.
    pub fn peer_fill_failed(&self) {
        add(&self.peer_fill_failures, 1);
    }

    /// An RPC arrived; `fetch` when it is `ModelCache.Fetch`.
    pub fn rpc(&self, fetch: bool) {
        add(&self.rpcs, 1);
        if fetch {
            add(&self.fetch_rpcs, 1);
        }
    }

    /// A variant build ended (`ok`: it succeeded) after `took`.
    pub fn variant_build_ended(&self, ok: bool, took: std::time::Duration) {
        add(&self.builds_ended[usize::from(!ok)], 1);
        self.build_seconds.observe(took.as_secs_f64());
    }

    /// Variant builds that ended: `(succeeded, failed)`.
    pub fn builds_ended(&self) -> (u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (get(&self.builds_ended[0]), get(&self.builds_ended[1]))
    }

    /// How long variant builds took.
    pub fn build_seconds(&self) -> &Histogram {
        &self.build_seconds
    }

    /// A cached revision is being listed again.
    pub fn revalidation(&self) {
        add(&self.revalidations, 1);
    }

    /// A request was answered with a revision the origin had not just confirmed.
    pub fn stale_serve(&self) {
        add(&self.stale_serves, 1);
    }

    /// `(revalidations, stale serves)` so far.
    pub fn revalidations(&self) -> (u64, u64) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (get(&self.revalidations), get(&self.stale_serves))
    }

    /// A `Fetch` stream opened.
    pub fn fetch_started(&self) {
        self.fetches_in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A `Fetch` stream ended.
    pub fn fetch_ended(&self) {
        self.fetches_in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// `Fetch` streams open now.
    pub fn fetches_in_flight(&self) -> u64 {
        self.fetches_in_flight.load(Ordering::Relaxed).max(0) as u64
    }

    /// An RPC to `method` ended with `code`.
    pub fn rpc_ended(&self, method: &str, code: &'static str) {
        let mut by_code = self.rpcs_by_code.lock().expect("rpc counter lock");
        *by_code.entry((method.to_owned(), code)).or_default() += 1;
    }

    /// An RPC let in by the token named `client` ended with `code`.
    pub fn client_rpc_ended(&self, client: &str, code: &'static str) {
        let mut by_client = self.rpcs_by_client.lock().expect("rpc counter lock");
        *by_client.entry((client.to_owned(), code)).or_default() += 1;
    }

    /// RPCs that ended, by client and code.
    pub fn rpcs_by_client(&self) -> Vec<(String, &'static str, u64)> {
        let by_client = self.rpcs_by_client.lock().expect("rpc counter lock");
        by_client
            .iter()
            .map(|((c, code), n)| (c.clone(), *code, *n))
            .collect()
    }

    /// RPCs that ended, by method and code.
    pub fn rpcs_by_code(&self) -> Vec<(String, &'static str, u64)> {
        let by_code = self.rpcs_by_code.lock().expect("rpc counter lock");
        by_code
            .iter()
            .map(|((m, c), n)| (m.clone(), *c, *n))
            .collect()
    }

    /// The counters now, with the origin's.
    pub fn snapshot(&self, origin: crate::origin_counters::OriginTotals) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            memory_hits: get(&self.memory_hits),
            disk_hits: get(&self.disk_hits),
            misses: get(&self.misses),
            bytes_served: get(&self.bytes_served),
            served_memory: get(&self.served_by_tier[0]),
            served_disk: get(&self.served_by_tier[1]),
            served_origin: get(&self.served_by_tier[2]),
            corrupt_chunks: get(&self.corrupt_chunks),
            variant_builds: get(&self.variant_builds),
            origin_requests: origin.requests,
            origin_bytes: origin.bytes,
            origin_errors: origin.errors,
            rpcs: get(&self.rpcs),
            fetch_rpcs: get(&self.fetch_rpcs),
            peer_fill_bytes: get(&self.peer_fill_bytes),
            peer_fill_failures: get(&self.peer_fill_failures),
        }
    }
}
