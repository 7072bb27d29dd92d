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

use crate::cache::{ChunkCache, ChunkValue, Tier};
use crate::error::{Error, Result};
use crate::fills::{FileRef, Fills};
use crate::manifest::Revision;
use crate::origin::Origin;
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
    stats: Arc<NodeStats>,
}

impl ChunkReader {
    pub fn new(
        origin: Arc<Origin>,
        originals: Arc<ChunkCache>,
        built: Arc<ChunkCache>,
        parallelism: usize,
        fills: Option<Arc<Fills>>,
        stats: Arc<NodeStats>,
    ) -> Self {
        Self {
            origin,
            originals,
            built,
            parallelism: parallelism.max(1),
            fills,
            stats,
        }
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
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
        let record = &rev.files[file];
        let key = record.keys[index as usize];
        let cache = self.tier_of(rev, file);
        let expected = record.digests[index as usize].get().copied();
        for _attempt in 0..2 {
            let (value, tier) = if record.built {
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
                cache.get_or_read(key, fetch).await?
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
            self.stats.chunk_read(tier);
            if let Some(fills) = &self.fills
                && !record.built
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

fn evicted(rev: &Revision) -> Error {
    Error::VariantEvicted {
        name: rev.name.clone(),
        variant: rev.variant.clone(),
    }
}
