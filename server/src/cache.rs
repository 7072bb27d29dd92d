//! The chunk tiers: foyer's hybrid cache (memory + disk) holding fixed-size chunks.
//!
//! Every file is cut into `CHUNK_SIZE` chunks keyed by `ChunkKey` (a digest of the model,
//! the file's path, size and origin ETag, and the chunk's index), so a model can be partly
//! cached and an unchanged file is shared by successive revisions. foyer's defaults do not
//! fit: it writes to disk only on eviction, skips entries above its block size, and drops
//! entries when its flush queue is full. Here it writes on insertion, blocks hold whole
//! chunks (8 in a large tier), the flush buffers are large, and `persist` re-enqueues
//! whatever a full queue dropped, so that every chunk reaches the disk tier.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use foyer::{
    BlockEngineConfig, Code, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder,
    HybridCacheEntry, HybridCachePolicy, HybridCacheProperties, Location, LruConfig,
    PsyncIoEngineConfig, RecoverMode, Source,
};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::landing::Landing;
use crate::tier_files::{check_room, remove_new_files, reserve, tier_files};
use crate::tier_metrics::TierMetrics;
use modelcache_proto::CHUNK_SIZE;

/// Room one chunk takes in a foyer disk block: its bytes, plus a 4 KiB page for the entry
/// header, key and digest (entries are page-aligned) and one for the index of the blob it
/// was flushed in. Blocks are whole multiples of it, so a block holds exactly its chunks; a
/// power-of-two block would hold one chunk fewer (a 4 MiB block held one 2 MiB chunk).
const CHUNK_ROOM: usize = CHUNK_SIZE as usize + 2 * 4096;
/// Chunks in a foyer disk block: the largest entry it stores and the unit it evicts.
/// Tiers too small for `TARGET_DISK_BLOCKS` such blocks use smaller ones, down to
/// `MIN_BLOCK_CHUNKS`.
const BLOCK_CHUNKS: u64 = 8;
/// Fewest chunks in a block: each flusher's buffer is a block, so it can take a second
/// chunk while the first is being written, instead of dropping it.
const MIN_BLOCK_CHUNKS: u64 = 2;
/// Flush buffer shared by the flushers; a full buffer drops entries.
const FLUSH_BUFFER_SIZE: usize = 64 * 1024 * 1024;
/// Entries waiting to be flushed beyond which foyer drops new ones.
const SUBMIT_QUEUE_THRESHOLD: usize = 192 * 1024 * 1024;
const FLUSHERS: usize = 4;
/// Smallest disk tier, in blocks: eviction works on whole blocks, and foyer wants at least
/// twice as many blocks as flushers plus the clean blocks it keeps in reserve. (15 of the
/// smallest blocks make 61 MiB, so a 64 MiB tier is allowed.)
const MIN_DISK_BLOCKS: u64 = 15;
/// Blocks a tier should have when it is large enough.
const TARGET_DISK_BLOCKS: u64 = 64;
/// Blocks a tier has at most: foyer keeps one open file per block, and a node must run
/// under the usual limit of 1,024 open files with both tiers and its connections. A larger
/// tier gets larger blocks (a 20 GiB tier: 128 blocks of 80 chunks) instead of more.
const MAX_DISK_BLOCKS: u64 = 128;
/// Chunks each shard of the memory tier should hold at least: foyer splits the memory tier
/// into shards by key hash and evicts within a shard, so a shard of a few chunks would
/// evict while the tier as a whole still has room.
const SHARD_CHUNKS: u64 = 16;
const MAX_SHARDS: u64 = 8;

/// Rounds in a row without progress after which `persist` gives up on the chunks left.
const PERSIST_STALLED_ROUNDS: u32 = 3;

/// The block size for a disk tier of `capacity` bytes, or `None` if the tier is too small.
fn block_size(capacity: u64) -> Option<usize> {
    let chunks = (capacity / TARGET_DISK_BLOCKS / CHUNK_ROOM as u64)
        .clamp(MIN_BLOCK_CHUNKS, BLOCK_CHUNKS)
        .max(capacity.div_ceil(MAX_DISK_BLOCKS * CHUNK_ROOM as u64)) as usize;
    let size = chunks * CHUNK_ROOM;
    (capacity >= MIN_DISK_BLOCKS * size as u64).then_some(size)
}

/// Identifies one chunk of one file version: BLAKE3 of the model, path, size, ETag, index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkKey(pub [u8; 32]);

impl ChunkKey {
    pub fn new(name: &str, variant: &str, path: &str, size: u64, etag: &str, index: u64) -> Self {
        let mut h = blake3::Hasher::new();
        for part in [name, variant, path, etag] {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(&size.to_le_bytes());
        h.update(&index.to_le_bytes());
        Self(*h.finalize().as_bytes())
    }
}

impl Code for ChunkKey {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        writer.write_all(&self.0).map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let mut key = [0; 32];
        reader
            .read_exact(&mut key)
            .map_err(foyer::Error::io_error)?;
        Ok(Self(key))
    }

    fn estimated_size(&self) -> usize {
        32
    }
}

/// A chunk's bytes with the BLAKE3 digest computed when they came from the origin.
#[derive(Clone, Debug)]
pub struct ChunkValue {
    pub digest: [u8; 32],
    pub data: Bytes,
}

impl ChunkValue {
    pub fn new(data: Bytes) -> Self {
        Self {
            digest: *blake3::hash(&data).as_bytes(),
            data,
        }
    }

    /// Whether the bytes still match the digest (they may not after a disk error).
    pub fn is_intact(&self) -> bool {
        blake3::hash(&self.data).as_bytes() == &self.digest
    }
}

impl Code for ChunkValue {
    fn encode(&self, writer: &mut impl Write) -> foyer::Result<()> {
        writer
            .write_all(&self.digest)
            .map_err(foyer::Error::io_error)?;
        writer
            .write_all(&(self.data.len() as u64).to_le_bytes())
            .map_err(foyer::Error::io_error)?;
        writer.write_all(&self.data).map_err(foyer::Error::io_error)
    }

    fn decode(reader: &mut impl Read) -> foyer::Result<Self> {
        let mut digest = [0; 32];
        reader
            .read_exact(&mut digest)
            .map_err(foyer::Error::io_error)?;
        let mut len = [0; 8];
        reader
            .read_exact(&mut len)
            .map_err(foyer::Error::io_error)?;
        let len = u64::from_le_bytes(len);
        if len > CHUNK_SIZE {
            return Err(foyer::Error::io_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("chunk entry claims {len} bytes"),
            )));
        }
        // Read into spare capacity, not a zeroed buffer: zeroing 2 MiB per disk-tier hit
        // costs about as much as the copy.
        let mut data = Vec::with_capacity(len as usize);
        reader
            .take(len)
            .read_to_end(&mut data)
            .map_err(foyer::Error::io_error)?;
        if data.len() as u64 != len {
            return Err(foyer::Error::io_error(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("chunk entry holds {} of its {len} bytes", data.len()),
            )));
        }
        Ok(Self {
            digest,
            data: Bytes::from(data),
        })
    }

    fn estimated_size(&self) -> usize {
        40 + self.data.len()
    }
}

/// Where a chunk was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
    Origin,
}

impl Tier {
    /// `memory`, `disk` or `origin`, as metrics and spans name it.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Origin => "origin",
        }
    }
}

pub struct ChunkCache {
    hybrid: HybridCache<ChunkKey, ChunkValue>,
    /// Chunks read from the origin that the disk tier does not hold yet.
    landing: Arc<Landing<ChunkKey, ChunkValue>>,
    /// Stops the task that lands them.
    stop: CancellationToken,
    lander: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Where the disk tier lives, for messages.
    dir: String,
    disk_capacity: u64,
    block_size: u64,
    /// What foyer itself reports through its metrics hook.
    metrics: TierMetrics,
}

/// What a tier holds and has done (disk bytes: foyer's reads and writes of its files).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierUsage {
    pub memory_used: u64,
    pub memory_capacity: u64,
    pub disk_capacity: u64,
    pub disk_read_bytes: u64,
    pub disk_written_bytes: u64,
    pub memory_evictions: u64,
    /// The disk tier's blocks that hold entries (being written or full), in bytes.
    pub disk_used: u64,
    /// Blocks the disk tier reclaimed to make room, dropping the chunks in them.
    pub disk_evictions: u64,
}

/// What one `get_or_read` call's own read did.
#[derive(Default)]
struct OwnRead {
    ran: bool,
    room: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl ChunkCache {
    pub async fn open(dir: &Path, memory_capacity: u64, disk_capacity: u64) -> Result<Self> {
        let Some(block_size) = block_size(disk_capacity) else {
            let min = MIN_DISK_BLOCKS * (MIN_BLOCK_CHUNKS * CHUNK_ROOM as u64);
            return Err(Error::Config(format!(
                "disk tier at {} would be {} MiB; it needs at least {} MiB: raise \
                 --disk-capacity (or --variant-capacity for the variant tier)",
                dir.display(),
                disk_capacity >> 20,
                min.div_ceil(1 << 20)
            )));
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating cache dir {}", dir.display()), e))?;
        // Before foyer creates its files: a tier the filesystem cannot hold is refused
        // with the free space, not with whatever creating thousands of files runs into.
        let existing = tier_files(dir)?;
        check_room(dir, disk_capacity, &existing)?;
        Self::build(dir, memory_capacity, disk_capacity, block_size)
            .await
            .inspect_err(|_| remove_new_files(dir, &existing))
    }

    async fn build(
        dir: &Path,
        memory_capacity: u64,
        disk_capacity: u64,
        block_size: usize,
    ) -> Result<Self> {
        // A small tier gets a flush buffer in proportion: each flusher's share is one block
        // at most, since a buffer larger than a block stalls foyer's flushers.
        let buffer = FLUSH_BUFFER_SIZE.min(FLUSHERS * block_size);
        let shards = (memory_capacity / (SHARD_CHUNKS * CHUNK_SIZE)).clamp(1, MAX_SHARDS);
        let device = FsDeviceBuilder::new(dir)
            .with_capacity(disk_capacity as usize)
            .build()
            .map_err(|e| tier_error(dir, e))?;
        let engine = BlockEngineConfig::new(device)
            .with_block_size(block_size)
            .with_flushers(FLUSHERS)
            .with_buffer_pool_size(buffer)
            .with_submit_queue_size_threshold(SUBMIT_QUEUE_THRESHOLD.min(3 * buffer));
        let metrics = TierMetrics::default();
        let hybrid = HybridCacheBuilder::new()
            .with_name("modelcache-chunks")
            .with_metrics_registry(metrics.hook())
            .with_policy(HybridCachePolicy::WriteOnInsertion)
            // Chunks are written on insertion (and `persist` re-queues dropped ones), so
            // flushing the whole memory tier again at close would only duplicate them.
            .with_flush_on_close(false)
            .memory(memory_capacity as usize)
            .with_shards(shards as usize)
            .with_eviction_config(LruConfig::default())
            .with_weighter(|_key: &ChunkKey, value: &ChunkValue| value.data.len() + 64)
            .storage()
            .with_io_engine_config(PsyncIoEngineConfig::new())
            .with_engine_config(engine)
            .with_recover_mode(RecoverMode::Quiet)
            .build()
            .await
            .map_err(|e| tier_error(dir, e))?;
        reserve(dir)?;
        let landing = Arc::new(Landing::new(dir.display().to_string()));
        let stop = CancellationToken::new();
        let lander = tokio::spawn(landing.clone().run(hybrid.clone(), stop.clone()));
        Ok(Self {
            hybrid,
            landing,
            stop,
            lander: std::sync::Mutex::new(Some(lander)),
            dir: dir.display().to_string(),
            disk_capacity,
            block_size: block_size as u64,
            metrics,
        })
    }

    /// What the tier holds now and has done since it opened.
    pub fn usage(&self) -> TierUsage {
        TierUsage {
            memory_used: self.hybrid.memory().usage() as u64,
            memory_capacity: self.hybrid.memory().capacity() as u64,
            disk_capacity: self.disk_capacity,
            disk_read_bytes: self.hybrid.storage().statistics().disk_read_bytes() as u64,
            disk_written_bytes: self.hybrid.storage().statistics().disk_write_bytes() as u64,
            memory_evictions: self.metrics.get("foyer_memory_op_total", "evict"),
            disk_used: self.block_size
                * ["writing", "evictable"]
                    .map(|state| self.metrics.get("foyer_storage_block_engine_block", state))
                    .iter()
                    .sum::<u64>(),
            disk_evictions: self
                .metrics
                .raised("foyer_storage_block_engine_block", "reclaiming"),
        }
    }

    /// The chunk from memory, disk, or `read` (a read of the origin); concurrent misses on
    /// one key share one read. What `read` returns is written to the disk tier once, and
    /// held until the disk tier has it.
    ///
    /// foyer's own `get_or_fetch` queues the entry for the disk tier again on every call
    /// that returns it, hits and waiters included: 64 streams of one model wrote each
    /// chunk up to 64 times, and the copies evicted each other (and other chunks) from the
    /// disk tier. So memory hits are answered here, and read chunks are marked in-memory
    /// for foyer and written by this cache alone.
    pub async fn get_or_read<F>(&self, key: ChunkKey, read: F) -> Result<(ChunkValue, Tier)>
    where
        F: Future<Output = Result<ChunkValue>> + Send + 'static,
    {
        if let Some(value) = self.landed(&key) {
            return Ok((value, Tier::Memory));
        }
        // What this call's own `read` did, if it ran: a call that shared another's read
        // (or found the chunk landing) did not go to the origin, and counts as a memory
        // hit; and the landing room its read took.
        let own = Arc::new(std::sync::Mutex::new(OwnRead::default()));
        let fetch = {
            let landing = self.landing.clone();
            let hybrid = self.hybrid.clone();
            let own = own.clone();
            async move {
                if let Some(value) = landing.get(&key) {
                    return Ok(value);
                }
                let permit = landing.room().await;
                own.lock().expect("read lock").ran = true;
                let value = read.await?;
                // A large origin read may have put it into the tiers itself meanwhile.
                if landing.get(&key).is_none() && !hybrid.memory().contains(&key) {
                    own.lock().expect("read lock").room = Some(permit);
                }
                Ok(value)
            }
        };
        let entry = self.get_or_fetch(key, fetch).await?;
        let value = entry.value().clone();
        let OwnRead { ran, room } = std::mem::take(&mut *own.lock().expect("read lock"));
        if let Some(permit) = room {
            // Queued before it is held, so that landing's next round waits for this write.
            self.hybrid.storage().enqueue(entry.piece(), true);
            self.landing.hold(key, value.clone(), permit);
        }
        let tier = match tier_of(entry.source()) {
            Tier::Origin if !ran => Tier::Memory,
            tier => tier,
        };
        Ok((value, tier))
    }

    /// The chunk from memory or disk, or `None`.
    pub async fn get(&self, key: ChunkKey) -> Result<Option<(ChunkValue, Tier)>> {
        let entry = self
            .hybrid
            .get(&key)
            .await
            .map_err(|e| tier_error(Path::new(&self.dir), e))?;
        Ok(entry.map(|entry| (entry.value().clone(), tier_of(entry.source()))))
    }

    async fn get_or_fetch<F>(
        &self,
        key: ChunkKey,
        fetch: F,
    ) -> Result<HybridCacheEntry<ChunkKey, ChunkValue>>
    where
        F: Future<Output = Result<ChunkValue>> + Send + 'static,
    {
        let fetch = async move {
            match fetch.await {
                Ok(value) => Ok((
                    value,
                    HybridCacheProperties::default().with_location(Location::InMem),
                )),
                Err(e) => Err(SharedError(Arc::new(e))),
            }
        };
        self.hybrid
            .get_or_fetch(&key, move || fetch)
            .await
            .map_err(|e| unwrap_fetch_error(&self.dir, e))
    }

    /// The chunk if the landing table or the memory tier has it.
    pub fn landed(&self, key: &ChunkKey) -> Option<ChunkValue> {
        self.landing.get(key).or_else(|| {
            self.hybrid
                .memory()
                .get(key)
                .map(|entry| entry.value().clone())
        })
    }

    /// Whether the chunk is held anywhere (landing, memory, or, as far as the disk tier's
    /// index knows, disk): a large origin read leaves it out.
    pub fn holds(&self, key: &ChunkKey) -> bool {
        self.landing.get(key).is_some() || self.in_memory(key) || self.on_disk(key)
    }

    /// Whether chunks read ahead of any reader can be taken in: at least half the room for
    /// chunks on their way to the disk tier is free.
    pub fn has_room_ahead(&self) -> bool {
        self.landing.mostly_free()
    }

    /// Puts a chunk read from the origin that no reader waits for (the rest of a large
    /// read) into the tiers without waiting: held until the disk tier has it when the
    /// landing budget has room, else inserted like any other entry.
    pub fn offer(&self, key: ChunkKey, value: ChunkValue) {
        if self.landing.get(&key).is_some() || self.in_memory(&key) {
            return;
        }
        match self.landing.try_room() {
            Some(room) => {
                let properties = HybridCacheProperties::default().with_location(Location::InMem);
                let entry = self
                    .hybrid
                    .insert_with_properties(key, value.clone(), properties);
                self.hybrid.storage().enqueue(entry.piece(), true);
                self.landing.hold(key, value, room);
            }
            None => {
                self.hybrid.insert(key, value);
            }
        }
    }

    /// Inserts a chunk built on this node (a variant's bytes); it is written to disk too.
    pub fn insert(&self, key: ChunkKey, value: ChunkValue) {
        self.hybrid.insert(key, value);
    }

    pub fn remove(&self, key: &ChunkKey) {
        self.landing.forget(key);
        self.hybrid.remove(key);
    }

    pub fn in_memory(&self, key: &ChunkKey) -> bool {
        self.hybrid.memory().contains(key)
    }

    pub fn on_disk(&self, key: &ChunkKey) -> bool {
        self.hybrid.storage().may_contains(key)
    }

    /// Reads a chunk from the disk tier alone (tests use this to prove persistence).
    #[cfg(any(test, feature = "test-hooks"))]
    pub async fn load_from_disk(&self, key: &ChunkKey) -> Result<Option<ChunkValue>> {
        match self.hybrid.storage().load(key).await {
            Ok(foyer::Load::Entry { value, .. }) => Ok(Some(value)),
            Ok(foyer::Load::Piece { piece, .. }) => Ok(Some(piece.value().clone())),
            Ok(_) => Ok(None),
            Err(e) => Err(tier_error(Path::new(&self.dir), e)),
        }
    }

    /// Empties the memory tier (tests use it to force reads from disk).
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn clear_memory(&self) {
        self.hybrid.memory().clear();
    }

    /// Makes sure every chunk in `keys` reached the disk tier: waits for the flushers, and
    /// re-enqueues chunks that a full flush queue dropped while they are still in memory.
    /// Returns how many chunks are still not on disk.
    pub async fn persist(&self, keys: &[ChunkKey]) -> usize {
        let storage = self.hybrid.storage();
        let mut missing = keys.len();
        // Each round writes at least what the flushers' buffers hold, so go on while the
        // rounds make progress; only chunks gone from memory too stop it.
        let mut stalled = 0;
        while missing > 0 && stalled < PERSIST_STALLED_ROUNDS {
            storage.wait().await;
            let before = missing;
            missing = 0;
            for key in keys {
                if storage.may_contains(key) {
                    continue;
                }
                missing += 1;
                if let Some(entry) = self.hybrid.memory().get(key) {
                    storage.enqueue(entry.piece(), true);
                }
            }
            stalled = if missing < before { 0 } else { stalled + 1 };
        }
        missing
    }

    /// Lands what was read from the origin, flushes the disk tier and stops its workers.
    pub async fn close(&self) -> Result<()> {
        self.stop.cancel();
        let lander = self.lander.lock().expect("lander lock").take();
        if let Some(lander) = lander {
            let _ = lander.await;
        }
        self.hybrid
            .close()
            .await
            .map_err(|e| tier_error(Path::new(&self.dir), format!("closing: {e}")))
    }
}

fn tier_of(source: Source) -> Tier {
    match source {
        Source::Memory => Tier::Memory,
        Source::Disk => Tier::Disk,
        Source::Outer => Tier::Origin,
    }
}

fn tier_error(dir: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Tier {
        dir: dir.display().to_string(),
        detail: detail.to_string(),
    }
}

/// foyer wraps a failed fetch in its own error; give the caller ours back.
fn unwrap_fetch_error(dir: &str, err: foyer::Error) -> Error {
    match err.downcast_ref::<SharedError>() {
        Some(shared) => Error::Shared(shared.0.clone()),
        None => tier_error(Path::new(dir), err),
    }
}

/// A fetch error handed to every waiter of one shared fetch.
#[derive(Debug, Clone)]
pub struct SharedError(pub Arc<Error>);

impl std::fmt::Display for SharedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_value_round_trips_and_rejects_bad_entries() {
        let value = ChunkValue::new(Bytes::from(vec![7u8; 1000]));
        let mut buf = Vec::new();
        value.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), value.estimated_size());
        let back = ChunkValue::decode(&mut buf.as_slice()).unwrap();
        assert_eq!(back.data, value.data);
        assert!(back.is_intact());

        let truncated = &buf[..buf.len() - 1];
        assert!(ChunkValue::decode(&mut &truncated[..]).is_err());
        let mut huge = buf.clone();
        huge[32..40].copy_from_slice(&(CHUNK_SIZE + 1).to_le_bytes());
        assert!(ChunkValue::decode(&mut huge.as_slice()).is_err());

        let mut flipped = back.clone();
        flipped.data = Bytes::from(vec![8u8; 1000]);
        assert!(!flipped.is_intact());
    }

    #[test]
    fn chunk_keys_differ_by_every_part() {
        let base = ChunkKey::new("m", "original", "a.bin", 10, "e1", 0);
        assert_ne!(base, ChunkKey::new("m", "original", "a.bin", 10, "e2", 0));
        assert_ne!(base, ChunkKey::new("m", "original", "a.bin", 10, "e1", 1));
        assert_ne!(base, ChunkKey::new("m", "int8", "a.bin", 10, "e1", 0));
        assert_ne!(base, ChunkKey::new("m", "original", "a.bin", 11, "e1", 0));
        // Length-prefixed parts: moving a boundary changes the key.
        assert_ne!(
            ChunkKey::new("ab", "original", "c", 1, "", 0),
            ChunkKey::new("a", "original", "bc", 1, "", 0)
        );
    }

    /// `n` chunks of one file, each filled with its own byte (`fill(i)`).
    fn test_chunks(variant: &str, n: u64, fill: fn(u64) -> u8) -> Vec<(ChunkKey, Bytes)> {
        (0..n)
            .map(|i| {
                let key = ChunkKey::new("m", variant, "w.bin", n * CHUNK_SIZE, "e", i);
                (key, Bytes::from(vec![fill(i); CHUNK_SIZE as usize]))
            })
            .collect()
    }

    /// How many of `chunks` the disk tier alone holds, each checked byte for byte.
    async fn count_on_disk(cache: &ChunkCache, chunks: &[(ChunkKey, Bytes)]) -> usize {
        cache.clear_memory();
        let mut found = 0;
        for (i, (key, data)) in chunks.iter().enumerate() {
            if let Some(value) = cache.load_from_disk(key).await.unwrap() {
                assert!(value.is_intact(), "chunk {i}");
                assert_eq!(&value.data, data, "chunk {i}");
                found += 1;
            }
        }
        found
    }

    fn keys(chunks: &[(ChunkKey, Bytes)]) -> Vec<ChunkKey> {
        chunks.iter().map(|(k, _)| *k).collect()
    }

    /// Stores chunks the way a variant build does (insert a batch, wait for the disk) into
    /// a small tier, three quarters full: every chunk must end up on disk, readable with the
    /// memory tier cleared, even though the flush queue drops entries under such bursts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_tier_keeps_every_stored_chunk_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 64 << 20, 256 << 20)
            .await
            .unwrap();
        let chunks = test_chunks("fp16", (256 << 20) * 3 / 4 / CHUNK_SIZE, |i| i as u8);
        for batch in chunks.chunks(8) {
            for (key, data) in batch {
                cache.insert(*key, ChunkValue::new(data.clone()));
            }
            assert_eq!(cache.persist(&keys(batch)).await, 0);
        }
        assert_eq!(count_on_disk(&cache, &chunks).await, chunks.len());
        cache.close().await.unwrap();
    }

    /// A tier reopened with another capacity (so another block size) keeps what the old
    /// layout wrote, byte for byte: foyer keeps each block in a file of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tier_reopened_with_another_block_size_reads_nothing_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let chunks = test_chunks("original", 24, |i| i as u8 ^ 0x5a);
        let cache = ChunkCache::open(dir.path(), 64 << 20, 256 << 20)
            .await
            .unwrap();
        for (key, data) in &chunks {
            cache.insert(*key, ChunkValue::new(data.clone()));
        }
        assert_eq!(cache.persist(&keys(&chunks)).await, 0);
        cache.close().await.unwrap();
        drop(cache);
        for capacity in [1 << 30, 256 << 20] {
            let cache = ChunkCache::open(dir.path(), 64 << 20, capacity)
                .await
                .unwrap();
            let kept = count_on_disk(&cache, &chunks).await;
            assert_eq!(kept, chunks.len(), "chunks kept at capacity {capacity}");
            cache.close().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_tier_too_small_for_its_blocks_is_refused_with_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let err = ChunkCache::open(&dir.path().join("tiers"), 16 << 20, 48 << 20)
            .await
            .err()
            .expect("a 48 MiB tier is refused");
        let message = err.to_string();
        assert!(message.contains("needs at least 61 MiB"), "{message}");
        assert!(
            !dir.path().join("tiers").exists(),
            "created before refusing"
        );
        // Blocks hold whole chunks: 2 in a small tier, 8 in a large one, and more in a
        // tier so large that 8-chunk blocks would make more than 128 files.
        assert_eq!(block_size(64 << 20), Some(2 * CHUNK_ROOM));
        assert_eq!(block_size(2 << 30), Some(8 * CHUNK_ROOM));
        assert_eq!(block_size(20 << 30), Some(80 * CHUNK_ROOM));
        for capacity in [1u64 << 30, 20 << 30, 1 << 40] {
            let blocks = capacity / block_size(capacity).unwrap() as u64;
            assert!(blocks <= MAX_DISK_BLOCKS, "{capacity}: {blocks} blocks");
        }
    }

    /// A burst of chunks far larger than the flush buffers: foyer drops most of them, and
    /// `persist` must get every one written, however many rounds that takes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn persist_writes_every_chunk_of_a_burst_the_flush_queue_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(dir.path(), 512 << 20, 256 << 20)
            .await
            .unwrap();
        let chunks = test_chunks("int8", 48, |i| !(i as u8));
        for (key, data) in &chunks {
            cache.insert(*key, ChunkValue::new(data.clone()));
        }
        assert_eq!(cache.persist(&keys(&chunks)).await, 0);
        assert_eq!(count_on_disk(&cache, &chunks).await, chunks.len());
        cache.close().await.unwrap();
    }
}
