//! Chunks read from the origin, held until the disk tier has them.
//!
//! foyer writes a chunk to disk when it is inserted, but drops the write when its queues
//! are full, and the memory tier may evict the chunk before that is noticed: a stream that
//! lags behind others then misses both tiers and reads the chunk from the origin again (64
//! streams of one cold model read it 1.9 times over, and left chunks off the disk tier).
//! Landing keeps each chunk read from the origin until the disk tier holds it: reads find
//! it here, and a task writes again whatever foyer dropped. It holds at most
//! `LANDING_BUDGET` bytes; an origin read waits for room, so the origin is never read
//! faster than the disk tier takes the bytes in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use foyer::{HybridCache, StorageKey, StorageValue};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use modelcache_proto::CHUNK_SIZE;

/// Bytes of chunks read from the origin and not yet on disk, at most.
const LANDING_BUDGET: u64 = 256 << 20;
/// The budget is counted in KiB (a semaphore counts in `u32`).
const UNIT: u64 = 1024;
/// Writes of one chunk after which landing gives up on it (the disk tier is failing).
const MAX_ATTEMPTS: u32 = 8;

/// Generic over the tier's key and value, which `cache.rs` defines.
pub struct Landing<K, V> {
    /// The disk tier's directory, for messages.
    dir: String,
    entries: Mutex<HashMap<K, Entry<V>>>,
    /// Bumped at the start of each round; an entry is checked only by a round that began
    /// after it arrived, so the disk write its arrival queued has been waited for.
    round: AtomicU64,
    room: Arc<Semaphore>,
    wake: Notify,
}

struct Entry<V> {
    value: V,
    round: u64,
    attempts: u32,
    _room: OwnedSemaphorePermit,
}

impl<K: StorageKey + Clone, V: StorageValue + Clone> Landing<K, V> {
    pub fn new(dir: String) -> Self {
        Self {
            dir,
            entries: Mutex::new(HashMap::new()),
            round: AtomicU64::new(0),
            room: Arc::new(Semaphore::new((LANDING_BUDGET / UNIT) as usize)),
            wake: Notify::new(),
        }
    }

    /// A chunk read from the origin that the disk tier does not hold yet.
    pub fn get(&self, key: &K) -> Option<V> {
        self.entries
            .lock()
            .expect("landing lock")
            .get(key)
            .map(|e| e.value.clone())
    }

    /// Room for one chunk; waits while the budget is held by chunks not yet on disk.
    pub async fn room(&self) -> OwnedSemaphorePermit {
        self.room
            .clone()
            .acquire_many_owned((CHUNK_SIZE / UNIT) as u32)
            .await
            .expect("the landing budget is never closed")
    }

    /// Whether at least half the budget is free.
    pub fn mostly_free(&self) -> bool {
        self.room.available_permits() as u64 * UNIT >= LANDING_BUDGET / 2
    }

    /// Room for one chunk if the budget has it now.
    pub fn try_room(&self) -> Option<OwnedSemaphorePermit> {
        self.room
            .clone()
            .try_acquire_many_owned((CHUNK_SIZE / UNIT) as u32)
            .ok()
    }

    /// Holds a chunk just read from the origin (and inserted into the tiers) until the
    /// disk tier has it.
    pub fn hold(&self, key: K, value: V, room: OwnedSemaphorePermit) {
        let round = self.round.load(Ordering::SeqCst);
        self.entries.lock().expect("landing lock").insert(
            key,
            Entry {
                value,
                round,
                attempts: 0,
                _room: room,
            },
        );
        self.wake.notify_one();
    }

    /// Drops a chunk found damaged, so that it is read again.
    pub fn forget(&self, key: &K) {
        self.entries.lock().expect("landing lock").remove(key);
    }

    fn is_empty(&self) -> bool {
        self.entries.lock().expect("landing lock").is_empty()
    }

    /// Lets go of the chunks the disk tier holds and writes the others again, round after
    /// round, until `stop`; then drains what it can.
    pub async fn run(self: Arc<Self>, hybrid: HybridCache<K, V>, stop: CancellationToken) {
        loop {
            if self.is_empty() {
                tokio::select! {
                    () = self.wake.notified() => continue,
                    () = stop.cancelled() => return,
                }
            }
            self.round_once(&hybrid).await;
            if stop.is_cancelled() {
                // Closing: writes still going on are finished, not started again forever.
                for _ in 0..3 {
                    if self.is_empty() {
                        break;
                    }
                    self.round_once(&hybrid).await;
                }
                return;
            }
        }
    }

    /// One round, traced: how many chunks it waited for and how many it wrote again.
    async fn round_once(&self, hybrid: &HybridCache<K, V>) {
        let chunks = self.entries.lock().expect("landing lock").len();
        let span = crate::spans::disk_write(&self.dir, chunks);
        let rewritten = self.round_untraced(hybrid).instrument(span.clone()).await;
        span.record("rewritten", rewritten);
    }

    async fn round_untraced(&self, hybrid: &HybridCache<K, V>) -> usize {
        let round = self.round.fetch_add(1, Ordering::SeqCst);
        let storage = hybrid.storage();
        storage.wait().await;
        let mut again = Vec::new();
        self.entries
            .lock()
            .expect("landing lock")
            .retain(|key, entry| {
                if entry.round > round {
                    return true;
                }
                if storage.may_contains(key) {
                    return false;
                }
                entry.attempts += 1;
                if entry.attempts > MAX_ATTEMPTS {
                    tracing::warn!(
                        dir = %self.dir,
                        "a chunk read from the origin could not be written to the disk tier \
                         at {} after {MAX_ATTEMPTS} attempts (it will be read from the origin \
                         again when asked for); check that filesystem for errors",
                        self.dir
                    );
                    return false;
                }
                entry.round = round + 1;
                again.push((key.clone(), entry.value.clone()));
                true
            });
        let rewritten = again.len();
        for (key, value) in again {
            let entry = match hybrid.memory().get(&key) {
                Some(entry) => entry,
                None => hybrid.memory().insert(key, value),
            };
            storage.enqueue(entry.piece(), true);
        }
        if !self.is_empty() {
            // Let the flushers gather what the next round will wait for.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        rewritten
    }
}
