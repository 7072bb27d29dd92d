//! Counters the node keeps as it serves, and the snapshot of them it exposes (`Node::stats`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::Tier;

/// Live counters, shared by the parts that count.
#[derive(Debug, Default)]
pub struct NodeStats {
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    misses: AtomicU64,
    bytes_served: AtomicU64,
    corrupt_chunks: AtomicU64,
    variant_builds: AtomicU64,
    rpcs: AtomicU64,
    fetch_rpcs: AtomicU64,
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
    /// Chunks that failed their digest in a tier and were read again.
    pub corrupt_chunks: u64,
    /// Variant builds started (each runs once per model, variant and revision).
    pub variant_builds: u64,
    /// Requests sent to the origin (listings and ranged GETs).
    pub origin_requests: u64,
    /// Object bytes read from the origin.
    pub origin_bytes: u64,
    /// RPCs received, every service and method counted by the server's layer stack.
    pub rpcs: u64,
    /// Of those, `ModelCache.Fetch` calls.
    pub fetch_rpcs: u64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl NodeStats {
    /// A chunk was read from `tier`.
    pub fn chunk_read(&self, tier: Tier) {
        let counter = match tier {
            Tier::Memory => &self.memory_hits,
            Tier::Disk => &self.disk_hits,
            Tier::Origin => &self.misses,
        };
        add(counter, 1);
    }

    pub fn served(&self, bytes: u64) {
        add(&self.bytes_served, bytes);
    }

    pub fn corrupt_chunk(&self) {
        add(&self.corrupt_chunks, 1);
    }

    pub fn variant_build(&self) {
        add(&self.variant_builds, 1);
    }

    /// An RPC arrived; `fetch` when it is `ModelCache.Fetch`.
    pub fn rpc(&self, fetch: bool) {
        add(&self.rpcs, 1);
        if fetch {
            add(&self.fetch_rpcs, 1);
        }
    }

    /// The counters now, with the origin's `(requests, bytes)`.
    pub fn snapshot(&self, origin: (u64, u64)) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            memory_hits: get(&self.memory_hits),
            disk_hits: get(&self.disk_hits),
            misses: get(&self.misses),
            bytes_served: get(&self.bytes_served),
            corrupt_chunks: get(&self.corrupt_chunks),
            variant_builds: get(&self.variant_builds),
            origin_requests: origin.0,
            origin_bytes: origin.1,
            rpcs: get(&self.rpcs),
            fetch_rpcs: get(&self.fetch_rpcs),
        }
    }
}
