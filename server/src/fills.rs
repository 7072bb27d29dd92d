//! Origin reads in large parts, cut into cache chunks as the bytes arrive.
//!
//! A request to the origin costs a first-byte latency (tens of milliseconds on S3, a third
//! of a second on some gateways) whatever its length, so one ranged GET per 2 MiB chunk
//! leaves most of a transfer waiting. A chunk that no tier holds is read as part of a run of
//! missing chunks of its file, up to `part_bytes` long, in one GET; the body is cut into
//! chunks as it arrives, and each chunk is digested, handed to whoever waits for it, and put
//! into the tiers at once, so a cold fetch still streams through.
//!
//! Single-flight holds per chunk across parts: a chunk that a read in flight will deliver is
//! awaited, never read twice (foyer's per-key single-flight cannot say that one read
//! delivers many keys; the in-flight table here does). A body cut short is resumed from its
//! first missing chunk with backoff; a chunk is only ever made of bytes of one response, of
//! the listed version, and complete.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::oneshot;
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt};
use modelcache_proto::{CHUNK_SIZE, chunk_count};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::buffers::{ChunkBuffer, ChunkBuffers};
use crate::cache::{ChunkCache, ChunkKey, ChunkValue};
use crate::error::{Error, Result};
use crate::origin::{Origin, OriginFile};
use crate::pacer::Pacer;
use crate::tasks::Background;

/// Rounds of a part that bring no new chunk before it fails.
const MAX_STALLED_ROUNDS: u32 = 3;

type Delivered = std::result::Result<ChunkValue, Arc<Error>>;
type Slot = Shared<BoxFuture<'static, Delivered>>;

/// How the origin is read.
#[derive(Clone, Copy, Debug)]
pub struct FillOptions {
    /// Longest ranged GET, in bytes (a whole number of chunks, at least one).
    pub part_bytes: u64,
    /// Origin requests in flight on the whole node, at most.
    pub max_requests: usize,
    /// Parts of a file read ahead of a transfer that reads it cold, beyond the chunks the
    /// transfer itself reads ahead.
    pub parts_ahead: u64,
    /// Bytes per second read from the origin by the whole node, at most.
    pub max_bandwidth: Option<u64>,
}

/// Request latency above which parts grow (requests are slow to answer, so fewer, larger
/// ones), and how much: ×2 above the first step, ×4 above the second. The origin measures
/// it on every listing and GET, so the model's listing already sets the first part's size.
const SLOW_FIRST_BYTE: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(250)];

pub struct Fills {
    origin: Arc<Origin>,
    cache: Arc<ChunkCache>,
    background: Background,
    part_chunks: u64,
    parts_ahead: u64,
    requests: Arc<Semaphore>,
    pacer: Option<Pacer>,
    inflight: Mutex<HashMap<ChunkKey, Slot>>,
    buffers: Arc<ChunkBuffers>,
}

/// Idle chunk buffers kept for the next parts (32 MiB at most).
const IDLE_BUFFERS: usize = 16;

/// One file's identity, for its chunk keys.
#[derive(Clone)]
pub struct FileRef {
    pub name: String,
    pub variant: String,
    pub file: OriginFile,
}

impl FileRef {
    fn key(&self, index: u64) -> ChunkKey {
        let f = &self.file;
        ChunkKey::new(&self.name, &self.variant, &f.path, f.size, &f.etag, index)
    }

    fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        crate::manifest::chunk_range(self.file.size, index)
    }
}

impl Fills {
    /// Large reads for an origin where a request costs latency, as `config` sets them;
    /// `None` for a local directory (read chunk by chunk) or parts of one chunk.
    pub fn for_origin(
        config: &crate::config::Config,
        origin: &Arc<Origin>,
        cache: &Arc<ChunkCache>,
        background: &Background,
    ) -> Option<Arc<Self>> {
        (!origin.is_local() && config.origin_part_size.as_u64() > CHUNK_SIZE).then(|| {
            Arc::new(Self::new(
                origin.clone(),
                cache.clone(),
                background.clone(),
                FillOptions {
                    part_bytes: config.origin_part_size.as_u64(),
                    max_requests: config.origin_max_requests,
                    parts_ahead: config.origin_parts_ahead,
                    max_bandwidth: config.origin_max_bandwidth.map(|b| b.as_u64()),
                },
            ))
        })
    }

    pub fn new(
        origin: Arc<Origin>,
        cache: Arc<ChunkCache>,
        background: Background,
        options: FillOptions,
    ) -> Self {
        Self {
            origin,
            cache,
            background,
            part_chunks: (options.part_bytes / CHUNK_SIZE).max(1),
            parts_ahead: options.parts_ahead,
            requests: Arc::new(Semaphore::new(options.max_requests.max(1))),
            pacer: options.max_bandwidth.map(Pacer::new),
            inflight: Mutex::new(HashMap::new()),
            buffers: ChunkBuffers::new(IDLE_BUFFERS),
        }
    }

    /// Chunk `index` of `file`: awaited from the part read that delivers it, or read with
    /// the run of missing chunks it starts. The caller puts it into the tiers (it reads
    /// through `ChunkCache::get_or_read`).
    pub async fn read(self: Arc<Self>, file: FileRef, index: u64) -> Result<ChunkValue> {
        let key = file.key(index);
        let slot = {
            let mut inflight = self.table();
            if let Some(slot) = inflight.get(&key) {
                slot.clone()
            } else if let Some(value) = self.cache.landed(&key) {
                return Ok(value);
            } else {
                let (slot, start, senders) = self.plan(&mut inflight, &file, index);
                self.start(file, start, senders);
                slot.expect("a part holds the chunk it was planned for")
            }
        };
        slot.await.map_err(Error::Shared)
    }

    /// Chunks per part now: `--origin-part-size`, larger while the origin is slow to
    /// answer requests.
    pub fn part_chunks(&self) -> u64 {
        let first_byte = self.origin.request_latency();
        let factor = 1 << SLOW_FIRST_BYTE.iter().filter(|&&d| first_byte > d).count();
        self.part_chunks * factor
    }

    /// A transfer reached chunk `index` of `file` (at a part boundary): keep the next
    /// `parts_ahead` parts after the one holding it in flight, so that the origin's latency
    /// is hidden behind the bytes of the parts before.
    pub fn read_ahead(self: &Arc<Self>, file: &FileRef, index: u64) {
        // Bytes read ahead of every reader must reach the disk tier before they can be
        // evicted, or they would be read again.
        if !self.cache.has_room_ahead() {
            return;
        }
        let part = self.part_chunks();
        let chunks = chunk_count(file.file.size);
        let base = index - index % part;
        for k in 1..=self.parts_ahead {
            let j = base + k * part;
            if j >= chunks {
                break;
            }
            let mut inflight = self.table();
            let key = file.key(j);
            if inflight.contains_key(&key) || self.cache.holds(&key) {
                continue;
            }
            let (_, start, senders) = self.plan(&mut inflight, file, j);
            drop(inflight);
            self.start(file.clone(), start, senders);
        }
    }

    fn start(
        self: &Arc<Self>,
        file: FileRef,
        start: u64,
        senders: Vec<oneshot::Sender<Delivered>>,
    ) {
        let this = self.clone();
        // In the span of the chunk read that started it (`Background::spawn`).
        drop(self.background.spawn(async move {
            this.run(file, start, senders).await;
            Ok(())
        }));
    }

    /// Registers the run of chunks around `index` that the next part reads: within the
    /// aligned stretch of `part_chunks` that holds `index`, every chunk next to it that is
    /// neither held nor in flight. Aligned parts keep reads that start at once (a
    /// transfer reads several chunks ahead) from cutting one another into small GETs.
    fn plan(
        &self,
        inflight: &mut HashMap<ChunkKey, Slot>,
        file: &FileRef,
        index: u64,
    ) -> (Option<Slot>, u64, Vec<oneshot::Sender<Delivered>>) {
        let missing = |j: u64| {
            let key = file.key(j);
            !inflight.contains_key(&key) && !self.cache.holds(&key)
        };
        let part = self.part_chunks();
        let base = index - index % part;
        let limit = (base + part).min(chunk_count(file.file.size));
        let mut start = index;
        while start > base && missing(start - 1) {
            start -= 1;
        }
        let mut end = index + 1;
        while end < limit && missing(end) {
            end += 1;
        }
        let mut senders = Vec::new();
        let mut first = None;
        for j in start..end {
            let (tx, rx) = oneshot::channel();
            let slot = rx
                .map(|r| r.unwrap_or_else(|_| Err(Arc::new(Error::ShuttingDown))))
                .boxed()
                .shared();
            if j == index {
                first = Some(slot.clone());
            }
            inflight.insert(file.key(j), slot);
            senders.push(tx);
        }
        (first, start, senders)
    }

    /// Reads chunks `first..first + senders.len()` of `file`, resuming a body cut short
    /// from its first missing chunk; delivers each chunk as it completes.
    async fn run(&self, file: FileRef, first: u64, senders: Vec<oneshot::Sender<Delivered>>) {
        let end = first + senders.len() as u64;
        let mut senders = senders.into_iter();
        let mut next = first;
        let mut stalled = 0;
        loop {
            let before = next;
            let outcome = self.read_part(&file, &mut next, end, &mut senders).await;
            let error = match outcome {
                Ok(()) if next == end => return,
                Ok(()) => Error::OriginReadFailed {
                    origin: self.origin.display().to_owned(),
                    name: file.name.clone(),
                    path: file.file.path.clone(),
                    start: file.chunk_range(next).start,
                    end: file.chunk_range(end - 1).end,
                    detail: "the response ended before all of these bytes came".into(),
                },
                Err(e) => e,
            };
            let resumable = matches!(
                error,
                Error::OriginTruncated { .. }
                    | Error::OriginReadFailed { .. }
                    | Error::OriginUnavailable { .. }
            );
            stalled = if next > before { 0 } else { stalled + 1 };
            if !resumable || stalled >= MAX_STALLED_ROUNDS {
                let error = Arc::new(error);
                for (j, tx) in (next..end).zip(senders.by_ref()) {
                    self.table().remove(&file.key(j));
                    let _ = tx.send(Err(error.clone()));
                }
                return;
            }
            tracing::debug!(
                model = %file.name, path = %file.file.path, chunk = next,
                "origin read cut short; resuming: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100 << stalled)).await;
        }
    }

    /// One GET of chunks `*next..end`; moves `next` past every chunk delivered.
    async fn read_part(
        &self,
        file: &FileRef,
        next: &mut u64,
        end: u64,
        senders: &mut impl Iterator<Item = oneshot::Sender<Delivered>>,
    ) -> Result<()> {
        let _request = self
            .requests
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let range = file.chunk_range(*next).start..file.chunk_range(end - 1).end;
        let span = crate::spans::origin_get(&file.name, &file.file.path, &range);
        let from = *next;
        let read = self
            .read_part_body(file, next, end, senders, range)
            .instrument(span.clone())
            .await;
        let delivered = if *next > from {
            file.chunk_range(*next - 1).end - file.chunk_range(from).start
        } else {
            0
        };
        span.record("bytes", delivered);
        read
    }

    async fn read_part_body(
        &self,
        file: &FileRef,
        next: &mut u64,
        end: u64,
        senders: &mut impl Iterator<Item = oneshot::Sender<Delivered>>,
        range: std::ops::Range<u64>,
    ) -> Result<()> {
        let mut body = self
            .origin
            .read_stream(&file.name, &file.file, range)
            .await?;
        let mut buf: Option<ChunkBuffer> = None;
        while let Some(piece) = body.next().await {
            let mut piece: Bytes = piece?;
            if let Some(pacer) = &self.pacer {
                pacer.take(piece.len() as u64).await;
            }
            self.origin.count_bytes(piece.len() as u64);
            while !piece.is_empty() && *next < end {
                let range = file.chunk_range(*next);
                let want = (range.end - range.start) as usize;
                let have = buf.as_ref().map_or(0, ChunkBuffer::len);
                let take = (want - have).min(piece.len());
                let part = piece.split_to(take);
                // A whole chunk in one piece is kept as it came, uncopied.
                let chunk = if have == 0 && take == want {
                    part
                } else {
                    let filling = buf.get_or_insert_with(|| self.buffers.take(want));
                    filling.extend_from_slice(&part);
                    if filling.len() < want {
                        continue;
                    }
                    buf.take().expect("a chunk being filled").freeze()
                };
                let tx = senders.next().expect("one sender per chunk");
                self.deliver(file.key(*next), chunk, tx);
                *next += 1;
            }
        }
        Ok(())
    }

    /// Puts a complete chunk into the tiers and hands it to its waiters. It goes into the
    /// tiers before it leaves the in-flight table, so that no planner in between takes it
    /// for missing (a waiter's own insert then finds it there and does not write it again).
    fn deliver(&self, key: ChunkKey, data: Bytes, tx: oneshot::Sender<Delivered>) {
        let value = ChunkValue::new(data);
        let mut inflight = self.table();
        self.cache.offer(key, value.clone());
        inflight.remove(&key);
        let _ = tx.send(Ok(value));
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<ChunkKey, Slot>> {
        self.inflight.lock().expect("fills lock poisoned")
    }
}
