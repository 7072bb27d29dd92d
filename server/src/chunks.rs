//! Reading chunk i of a revision's file through the tiers: memory, then disk, then (for
//! an original) a ranged GET to the origin, with concurrent misses on one chunk sharing
//! one GET. A chunk that fails its digest is dropped and read once more from the origin.
//!
//! The reader never calls upward: what a read means for the rest of the node (it
//! completed the model's digests; a variant's chunk is gone and the variant must be built
//! again) is returned as a value or an error for the caller to act on.

use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{FutureExt, Stream, StreamExt, TryStreamExt, stream};
use sha2::Digest;
use tracing::Instrument;

use crate::cache::{ChunkCache, ChunkValue, Tier};
use crate::error::{Error, Result};
use crate::fills::{FileRef, Fills};
use crate::manifest::Revision;
use crate::origin::{Origin, OriginFile};
use crate::peers::{ChunkRequest, Route, Routing, ask_in_rank};
use crate::pins::Pins;
use crate::stats::NodeStats;

/// One chunk as read.
pub struct ChunkRead {
    pub value: ChunkValue,
    pub tier: Tier,
    /// This read recorded the last missing digest of the revision: it was read in full.
    pub completed: bool,
}

pub struct ChunkReader {
    origin: Arc<Origin>,
    /// The originals' tier.
    originals: Arc<ChunkCache>,
    /// The tier of files variants built; a miss there cannot be filled from the origin.
    built: Arc<ChunkCache>,
    /// Chunks read ahead per file or transfer.
    parallelism: usize,
    /// Large origin reads cut into chunks; `None` reads the origin chunk by chunk (a
    /// local directory, whose reads cost no request latency and are checked for rewrites
    /// chunk by chunk).
    fills: Option<Arc<Fills>>,
    /// The cluster: a chunk of a model another node owns is filled from that node.
    routing: Option<Arc<dyn Routing>>,
    /// Pinned models, read before the tiers.
    pins: Arc<Pins>,
    stats: Arc<NodeStats>,
}

/// Where a miss is read from.
pub struct ReaderParts {
    pub fills: Option<Arc<Fills>>,
    pub routing: Option<Arc<dyn Routing>>,
    pub pins: Arc<Pins>,
}

impl ChunkReader {
    pub fn new(
        origin: Arc<Origin>,
        originals: Arc<ChunkCache>,
        built: Arc<ChunkCache>,
        parallelism: usize,
        parts: ReaderParts,
        stats: Arc<NodeStats>,
    ) -> Self {
        Self {
            origin,
            originals,
            built,
            parallelism: parallelism.max(1),
            fills: parts.fills,
            routing: parts.routing,
            pins: parts.pins,
            stats,
        }
    }

    /// The members to fill a miss of model `name` from, in rank order, when another node
    /// owns it (empty when this node does, or runs alone).
    fn peer_routes(&self, name: &str) -> Vec<Route> {
        match &self.routing {
            Some(routing) => {
                let routes = routing.routes(name);
                if routes.first().is_none_or(Route::is_local) {
                    Vec::new()
                } else {
                    routes
                }
            }
            None => Vec::new(),
        }
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn pins(&self) -> &Arc<Pins> {
        &self.pins
    }

    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    /// The tier that holds the chunks of file `file` of `rev`.
    pub fn tier_of(&self, rev: &Revision, file: usize) -> &ChunkCache {
        if rev.files[file].built {
            &self.built
        } else {
            &self.originals
        }
    }

    pub fn originals(&self) -> &Arc<ChunkCache> {
        &self.originals
    }

    pub fn built(&self) -> &Arc<ChunkCache> {
        &self.built
    }

    /// Chunk `index` of file `file` of `rev`. A chunk of a built file that no tier holds
    /// intact is `Error::VariantEvicted` (it is removed from the tier first, so that the
    /// variant no longer counts as intact and is built again).
    pub async fn read(&self, rev: &Revision, file: usize, index: u64) -> Result<ChunkRead> {
        let path = &rev.files[file].origin.path;
        let span = crate::spans::chunk(&rev.name, &rev.variant, &rev.id, path, index);
        let read = self
            .read_traced(rev, file, index)
            .instrument(span.clone())
            .await;
        if let Ok(read) = &read {
            span.record("tier", read.tier.name());
            span.record("bytes", read.value.data.len());
        }
        read
    }

    async fn read_traced(&self, rev: &Revision, file: usize, index: u64) -> Result<ChunkRead> {
        let record = &rev.files[file];
        let key = record.keys[index as usize];
        let cache = self.tier_of(rev, file);
        let expected = record.digests[index as usize].get().copied();
        if let Some(data) = self.pins.read(rev, file, index).await {
            let value = ChunkValue::new(data);
            if expected.is_none_or(|d| d == value.digest) {
                self.stats.chunk_read(record.built, Tier::Disk);
                let completed = rev.record_digest(file, index, value.digest);
                return Ok(ChunkRead {
                    value,
                    tier: Tier::Disk,
                    completed,
                });
            }
            tracing::warn!(
                model = %rev.name, path = %record.origin.path, chunk = index,
                "a pinned chunk failed its digest; reading it through the tiers"
            );
            self.stats.corrupt_chunk();
        }
        let peers = self.peer_routes(&rev.name);
        for _attempt in 0..2 {
            let (value, tier) = if !peers.is_empty() {
                let fill = PeerFill {
                    routes: peers.clone(),
                    name: rev.name.clone(),
                    reference: if rev.is_original() {
                        rev.name.clone()
                    } else {
                        format!("{}:{}", rev.name, rev.variant)
                    },
                    revision: rev.id.clone(),
                    file: record.origin.clone(),
                    built: record.built,
                    index,
                    expected,
                    origin: self.origin.clone(),
                    routing: self.routing.clone(),
                    stats: self.stats.clone(),
                    evicted: evicted(rev),
                };
                // foyer may run the read as a task of its own: it stays in this span.
                cache
                    .get_or_read(key, fill.run().instrument(tracing::Span::current()))
                    .await?
            } else if record.built {
                cache.get(key).await?.ok_or_else(|| evicted(rev))?
            } else {
                let fetch = match &self.fills {
                    Some(fills) => {
                        let file = FileRef {
                            name: rev.name.clone(),
                            variant: rev.variant.clone(),
                            file: record.origin.clone(),
                        };
                        fills.clone().read(file, index).boxed()
                    }
                    None => {
                        let origin = self.origin.clone();
                        let name = rev.name.clone();
                        let origin_file = record.origin.clone();
                        let range = record.chunk_range(index);
                        async move {
                            let data = origin.read_range(&name, &origin_file, range).await?;
                            Ok(ChunkValue::new(data))
                        }
                        .boxed()
                    }
                };
                cache
                    .get_or_read(key, fetch.instrument(tracing::Span::current()))
                    .await?
            };
            // A disk entry carries the digest it was written with: check the bytes too.
            let intact = (tier != Tier::Disk || value.is_intact())
                && expected.is_none_or(|d| d == value.digest);
            if !intact {
                tracing::warn!(
                    model = %rev.name, path = %record.origin.path, chunk = index,
                    ?tier, "chunk failed its digest; reading it again"
                );
                self.stats.corrupt_chunk();
                cache.remove(&key);
                if record.built {
                    return Err(evicted(rev));
                }
                continue;
            }
            self.stats.chunk_read(record.built, tier);
            if let Some(fills) = &self.fills
                && !record.built
                && peers.is_empty()
                && index.is_multiple_of(fills.part_chunks())
            {
                let file_ref = FileRef {
                    name: rev.name.clone(),
                    variant: rev.variant.clone(),
                    file: record.origin.clone(),
                };
                fills.read_ahead(&file_ref, index);
            }
            let completed = rev.record_digest(file, index, value.digest);
            return Ok(ChunkRead {
                value,
                tier,
                completed,
            });
        }
        Err(Error::ChunkCorrupt {
            name: rev.name.clone(),
            path: record.origin.path.clone(),
            index,
        })
    }

    /// The chunks of one file in order, `parallelism` read ahead.
    pub fn file_chunks<'a>(
        &'a self,
        rev: &'a Revision,
        file: usize,
    ) -> impl Stream<Item = Result<Bytes>> + Unpin + Send + 'a {
        let chunks = rev.files[file].keys.len() as u64;
        stream::iter(0..chunks)
            .map(move |i| async move { self.read(rev, file, i).await.map(|r| r.value.data) })
            .buffered(self.parallelism)
            .boxed()
    }

    /// A whole file read through the tiers.
    pub async fn read_whole(&self, rev: &Revision, file: usize) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(rev.files[file].origin.size as usize);
        let mut chunks = self.file_chunks(rev, file);
        while let Some(data) = chunks.try_next().await? {
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// A whole file written to `path` through the tiers; returns its SHA-256, computed on
    /// the way unless it was known (and then recorded on the file).
    pub async fn read_to_file(&self, rev: &Revision, file: usize, path: &Path) -> Result<String> {
        let out = std::fs::File::create(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        let known = rev.files[file].sha256.get().cloned();
        let mut state = (BufWriter::new(out), known.is_none().then(sha2::Sha256::new));
        let mut chunks = self.file_chunks(rev, file);
        while let Some(data) = chunks.try_next().await? {
            state = tokio::task::spawn_blocking(move || {
                let (mut w, mut h) = state;
                if let Some(h) = h.as_mut() {
                    h.update(&data);
                }
                w.write_all(&data).map(|()| (w, h))
            })
            .await
            .map_err(|e| Error::task_failed("writing a build input", e))?
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
        let (mut w, h) = state;
        w.flush()
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        Ok(match (known, h) {
            (Some(sha), _) => sha,
            (None, h) => {
                let sha = hex::encode(h.expect("hashed when not known").finalize());
                // The revision's background digest need not read the file again.
                let _ = rev.files[file].sha256.set(sha.clone());
                sha
            }
        })
    }

    /// The SHA-256 of one file: known, being computed by another task (awaited), or read
    /// through the tiers and hashed on the blocking pool here.
    pub async fn file_sha256(&self, rev: &Revision, file: usize) -> Result<String> {
        rev.files[file]
            .sha256
            .get_or_try_init(|| async {
                let mut hasher = sha2::Sha256::new();
                let mut chunks = self.file_chunks(rev, file);
                while let Some(data) = chunks.try_next().await? {
                    hasher = tokio::task::spawn_blocking(move || {
                        hasher.update(&data);
                        hasher
                    })
                    .await
                    .map_err(|e| Error::task_failed("hashing a file", e))?;
                }
                Ok(hex::encode(hasher.finalize()))
            })
            .await
            .cloned()
    }
}

/// A miss of a model another node owns: filled from the first member in rank that has
/// the chunk with the right digest; from the origin (or, for a built file, not at all)
/// once the rank order reaches this node.
struct PeerFill {
    routes: Vec<Route>,
    name: String,
    reference: String,
    revision: String,
    file: OriginFile,
    built: bool,
    index: u64,
    expected: Option<[u8; 32]>,
    origin: Arc<Origin>,
    routing: Option<Arc<dyn Routing>>,
    stats: Arc<NodeStats>,
    /// What a built file's miss is when no peer has it.
    evicted: Error,
}

impl PeerFill {
    async fn run(self) -> Result<ChunkValue> {
        if let Some(routing) = &self.routing {
            let what = format!(
                "filling chunk {} of {}/{}",
                self.index, self.reference, self.file.path
            );
            let filled = ask_in_rank(
                &self.routes,
                routing.as_ref(),
                &what,
                || self.stats.peer_fill_failed(),
                |peer| {
                    peer.chunk(ChunkRequest {
                        reference: &self.reference,
                        revision: &self.revision,
                        path: &self.file.path,
                        index: self.index,
                        expected: self.expected,
                    })
                },
            )
            .await?;
            if let Some(value) = filled {
                self.stats.peer_fill(value.data.len() as u64);
                return Ok(value);
            }
        }
        if self.built {
            return Err(self.evicted);
        }
        let range = crate::manifest::chunk_range(self.file.size, self.index);
        let data = self
            .origin
            .read_range(&self.name, &self.file, range)
            .await?;
        Ok(ChunkValue::new(data))
    }
}

fn evicted(rev: &Revision) -> Error {
    Error::VariantEvicted {
        name: rev.name.clone(),
        variant: rev.variant.clone(),
    }
}
