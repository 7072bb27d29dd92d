//! The node's domain, composed: the catalog names each model's revision, the chunk reader
//! reads through the tiers, the variant builder builds variants, and the finisher computes
//! digests once a model was read in full. The registry is the one place that needs them
//! together: it starts the finisher when a read completes a model, and builds a variant
//! again when one of its chunks leaves the tier during a transfer.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt, stream};
use modelcache_proto::{CHUNK_SIZE, Reference};
use modelcache_quant::Variant;
use tracing::Instrument;

use crate::cache::{ChunkCache, Tier};
use crate::catalog::{Catalog, Resolved};
use crate::checks::{FilePiece, OriginChecks, Sent, WithChecks};
use crate::chunks::{ChunkRead, ChunkReader, ReaderParts};
use crate::config::Config;
use crate::dirlock::DirLock;
use crate::error::{Error, PeerFailure, Result, quote};
use crate::fills::Fills;
use crate::finisher::Finisher;
use crate::manifest::{ManifestStore, Revision};
use crate::origin::Origin;
use crate::peers::{Routing, ask_in_rank};
use crate::pins::Pins;
use crate::readahead::{ReadAhead, ReadAheadBudget, Ticket};
use crate::stats::{NodeStats, Stats};
use crate::tasks::Background;
use crate::variants::{BuildState, BuilderOptions, VariantBuilder};

/// How many chunks of a revision each tier holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierCounts {
    pub total_chunks: u64,
    pub memory_chunks: u64,
    pub disk_chunks: u64,
}

/// A resolved revision as `Resolve` and `Fetch` describe it.
pub struct ManifestView {
    pub resolved: Resolved,
    pub tiers: TierCounts,
    /// For an original: the state of each variant that applies to it.
    pub variants: Vec<(Variant, BuildState)>,
}

/// A model in `List`: what is cached of it, and its variants' states.
pub struct ModelListing {
    pub name: String,
    /// The original (if cached) and every ready variant, with their tiers.
    pub cached: Vec<(Arc<Revision>, TierCounts)>,
    pub variants: Vec<(Variant, BuildState)>,
}

/// What `Fetch` asked for.
pub struct FetchRequest {
    pub reference: Reference,
    /// Empty: whatever revision is current.
    pub revision: String,
    /// Empty: from the first file.
    pub file: String,
    pub offset: u64,
    /// Send at most this many chunks (0: to the end), and no file from `end_file` on.
    pub max_chunks: u32,
    pub end_file: Option<usize>,
    /// End each file with its origin check (clients of protocol 3 or later).
    pub with_checks: bool,
}

/// One chunk of a transfer.
pub struct Chunk {
    pub file_index: u32,
    pub offset: u64,
    pub data: Bytes,
    pub digest: [u8; 32],
    pub tier: Tier,
}

impl FilePiece for Chunk {
    fn file(&self) -> usize {
        self.file_index as usize
    }

    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

/// An open `Fetch`: the manifest to send first, then the chunks in order, each file
/// ended by its origin check when asked for.
pub struct Transfer {
    pub manifest: ManifestView,
    pub items: BoxStream<'static, Result<Sent<Chunk>>>,
}

/// What `Prefetch` did for one model.
pub struct Warmed {
    pub revision: String,
    pub total_size: u64,
    pub origin_bytes: u64,
}

pub struct Registry {
    /// The cache dir is this node's while the registry lives.
    _lock: DirLock,
    catalog: Arc<Catalog>,
    reader: Arc<ChunkReader>,
    variants: Arc<VariantBuilder>,
    finisher: Arc<Finisher>,
    checks: Arc<OriginChecks>,
    manifests: Arc<ManifestStore>,
    background: Background,
    stats: Arc<NodeStats>,
    /// Room for chunks streams read ahead of their clients.
    read_ahead: ReadAheadBudget,
    /// The cluster; `None` when this node runs alone.
    routing: Option<Arc<dyn Routing>>,
}

impl Registry {
    /// Opens the tiers under `config.cache_dir`, loads the manifests saved there, and
    /// composes the node's parts over `origin`.
    pub async fn open(
        config: &Config,
        origin: Origin,
        routing: Option<Arc<dyn Routing>>,
    ) -> Result<Self> {
        // Before anything is created in the cache dir: a refused start leaves nothing.
        let lock = DirLock::acquire(&config.cache_dir)?;
        crate::format::prepare(&config.cache_dir)?;
        let (memory, dir) = (config.memory_capacity.as_u64(), &config.cache_dir);
        let disk = config.disk_capacity.as_u64();
        let originals = Arc::new(ChunkCache::open(&dir.join("tiers"), memory, disk).await?);
        let variant_disk = config.variant_capacity.as_u64();
        let built = ChunkCache::open(&dir.join("variants"), memory / 4, variant_disk).await?;
        let built = Arc::new(built);
        let manifests = Arc::new(ManifestStore::open(&config.cache_dir)?);
        let stats = Arc::new(NodeStats::watching(&originals, &built));
        let background = Background::default();
        let origin = Arc::new(origin);
        let fills = Fills::for_origin(config, &origin, &originals, &background);
        let pins = Arc::new(Pins::open(&dir.join("pins"))?);
        let reader = Arc::new(ChunkReader::new(
            origin.clone(),
            originals,
            built,
            config.origin_parallelism,
            ReaderParts {
                fills,
                routing: routing.clone(),
                pins,
            },
            stats.clone(),
        ));
        // A build quantizes on half the cores at most, so that serving keeps the rest.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let variants = VariantBuilder::new(
            reader.clone(),
            manifests.clone(),
            background.clone(),
            stats.clone(),
            BuilderOptions {
                scratch: config.cache_dir.join("build"),
                precompute: config.precompute.0.clone(),
                parallelism: config.build_parallelism,
                memory_capacity: memory / 4,
                quantize_threads: (cores / 2).max(1),
            },
        )?;
        let (catalog, saved_variants) = Catalog::open(
            origin,
            manifests.clone(),
            config.revalidate_after,
            background.clone(),
            routing.clone(),
            stats.clone(),
        );
        for rev in saved_variants {
            variants.restore(rev);
        }
        let catalog = Arc::new(catalog);
        let checks = Arc::new(OriginChecks::new(
            reader.clone(),
            catalog.clone(),
            background.clone(),
            config.origin_checksums,
        ));
        let finisher = Finisher::new(
            reader.clone(),
            checks.clone(),
            manifests.clone(),
            background.clone(),
        );
        for rev in catalog.cached() {
            if rev.all_digests_known() && rev.has_all_sha256() {
                finisher.finished(&rev);
            }
        }
        Ok(Self {
            catalog,
            reader,
            variants: Arc::new(variants),
            finisher: Arc::new(finisher),
            checks,
            manifests,
            background,
            stats,
            read_ahead: ReadAheadBudget::for_memory_capacity(memory),
            routing,
            _lock: lock,
        })
    }

    /// The room streams read ahead in.
    pub fn read_ahead(&self) -> &ReadAheadBudget {
        &self.read_ahead
    }

    /// How the origin is named in messages.
    pub fn origin(&self) -> &str {
        self.reader.origin().display()
    }

    /// Reads chunks through the tiers (and writes whole files, as pins do).
    pub fn reader(&self) -> &ChunkReader {
        &self.reader
    }

    /// The models pinned on this node.
    pub fn pins(&self) -> &Arc<Pins> {
        self.reader.pins()
    }

    /// The origin itself: its counters, and a probe for readiness.
    pub fn origin_source(&self) -> &crate::origin::Origin {
        self.reader.origin()
    }

    pub fn stats(&self) -> Stats {
        self.stats.snapshot(self.reader.origin().totals())
    }

    pub(crate) fn node_stats(&self) -> &Arc<NodeStats> {
        &self.stats
    }

    /// The revision to serve for `reference`: the original, revalidated as needed, or a
    /// variant of it, built if needed.
    pub async fn resolve(self: &Arc<Self>, reference: &Reference) -> Result<Resolved> {
        let span = crate::spans::resolve(reference);
        let resolved = self
            .resolve_variant(reference)
            .instrument(span.clone())
            .await;
        crate::spans::record_ok(&span, "revision", &resolved, |r| r.revision.id.clone());
        resolved
    }

    async fn resolve_variant(self: &Arc<Self>, reference: &Reference) -> Result<Resolved> {
        let variant = if reference.is_original() {
            None
        } else {
            Some(
                Variant::parse(reference.variant()).ok_or_else(|| Error::UnknownVariant {
                    variant: reference.variant().to_owned(),
                })?,
            )
        };
        let resolved = self.resolve_original(reference.name()).await?;
        let Some(variant) = variant else {
            return Ok(resolved);
        };
        if let Some(filled) = self
            .owners_variant(reference, &resolved.revision, variant)
            .await?
        {
            return Ok(Resolved {
                revision: filled,
                stale_reason: resolved.stale_reason,
            });
        }
        let built = self.variants.get(&resolved.revision, variant).await;
        // A build reads the original's files: it may have completed the model.
        self.finish_if_complete(&resolved.revision);
        Ok(Resolved {
            revision: built?,
            stale_reason: resolved.stale_reason,
        })
    }

    /// For a model another node owns: the owner's build of `variant` of `original`, as
    /// this node has it or as the first member in rank that answers describes it (its
    /// chunks are filled from there). `None` when the rank order reaches this node: it
    /// builds the variant itself.
    async fn owners_variant(
        &self,
        reference: &Reference,
        original: &Arc<Revision>,
        variant: Variant,
    ) -> Result<Option<Arc<Revision>>> {
        let Some(routing) = self.routing.as_ref().filter(|r| !r.owns(reference.name())) else {
            return Ok(None);
        };
        if let Some(rev) = self
            .variants
            .ready_of(reference.name(), variant, &original.id)
        {
            return Ok(Some(rev));
        }
        let routes = routing.routes(reference.name());
        let what = format!("resolving {reference} through a peer");
        let Some(remote) = ask_in_rank(
            &routes,
            routing.as_ref(),
            &what,
            || {},
            |peer| peer.resolve(reference),
        )
        .await?
        else {
            return Ok(None);
        };
        let expected = crate::manifest::variant_id(&original.id, variant);
        if remote.revision != expected {
            // The owner built it from another revision of the original (one of the two
            // has not revalidated yet) or with another quantizer version.
            return Err(Error::Peer {
                peer: remote.peer,
                failure: PeerFailure::Mismatch,
                message: format!(
                    "{reference} was built there as revision {}, but this node's original \
                     (revision {}) gives {expected}: the nodes disagree on the original's \
                     revision (they agree within --revalidate-after) or run other versions; \
                     fetch again",
                    remote.revision, original.id
                ),
            });
        }
        let rev = Arc::new(remote.variant_revision(&original.id));
        self.variants.adopt(rev.clone());
        Ok(Some(rev))
    }

    async fn resolve_original(self: &Arc<Self>, name: &str) -> Result<Resolved> {
        let resolved = self.catalog.resolve(name).await?;
        // A new revision can know every chunk from its predecessor's unchanged files.
        self.finish_if_complete(&resolved.revision);
        Ok(resolved)
    }

    /// The manifest of a resolved revision, with its tiers and variant states.
    pub fn describe(&self, resolved: Resolved) -> ManifestView {
        let rev = &resolved.revision;
        let tiers = self.tier_counts(rev);
        let variants = if rev.is_original() {
            self.variants.states(rev)
        } else {
            Vec::new()
        };
        ManifestView {
            resolved,
            tiers,
            variants,
        }
    }

    /// Opens a transfer: checks the request against the current revision and plans its
    /// chunks from the requested file and offset on.
    pub async fn open_fetch(self: &Arc<Self>, request: FetchRequest) -> Result<Transfer> {
        let resolved = self.resolve(&request.reference).await?;
        let rev = resolved.revision.clone();
        if !request.revision.is_empty() && request.revision != rev.id {
            return Err(Error::RevisionChanged {
                name: rev.name.clone(),
                requested: quote(&request.revision),
                current: rev.id.clone(),
            });
        }
        let start_file = if request.file.is_empty() {
            0
        } else {
            rev.file_index(&request.file)
                .ok_or_else(|| Error::FileNotFound {
                    name: rev.name.clone(),
                    path: quote(&request.file),
                })?
        };
        if let Some(record) = rev.files.get(start_file)
            && request.offset > record.origin.size
        {
            return Err(Error::OffsetOutOfRange {
                name: rev.name.clone(),
                path: record.origin.path.clone(),
                offset: request.offset,
                size: record.origin.size,
            });
        }
        let end_file = request.end_file.unwrap_or(usize::MAX).min(rev.files.len());
        let mut plan = rev.chunk_plan(start_file..end_file, request.offset / CHUNK_SIZE);
        if request.max_chunks > 0 {
            plan.truncate(request.max_chunks as usize);
        }
        let this = self.clone();
        // Chunks are read as the client's stream is polled, outside the call's span.
        let span = tracing::Span::current();
        let read_chunk = move |(f, i): (usize, u64), ticket: Ticket| {
            let this = this.clone();
            let rev = rev.clone();
            let span = span.clone();
            async move {
                let read = this.chunk(&rev, f, i).await?;
                this.stats.served(read.value.data.len() as u64, read.tier);
                Ok(Chunk {
                    file_index: f as u32,
                    offset: i * CHUNK_SIZE,
                    data: ticket.attach(read.value.data),
                    digest: read.value.digest,
                    tier: read.tier,
                })
            }
            .instrument(span)
        };
        let chunks = ReadAhead::new(
            plan,
            self.reader.parallelism(),
            self.read_ahead.clone(),
            read_chunk,
        );
        // Open until the client's stream is dropped: the finisher waits for it.
        let guard = resolved.revision.transfer();
        let chunks = chunks.inspect(move |_| {
            let _ = &guard;
        });
        let items = if request.with_checks {
            let finisher = self.finisher.clone();
            let forget = resolved.revision.clone();
            WithChecks::new(
                chunks,
                resolved.revision.clone(),
                start_file..end_file.max(start_file),
                self.checks.clone(),
                Box::new(move || finisher.forget(&forget)),
            )
            .boxed()
        } else {
            chunks.map_ok(Sent::Chunk).boxed()
        };
        Ok(Transfer {
            manifest: self.describe(resolved),
            items,
        })
    }

    /// One chunk through the tiers. A read that completes an original starts its
    /// finisher; a variant's chunk that left the tier has the variant built again.
    async fn chunk(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        file: usize,
        index: u64,
    ) -> Result<ChunkRead> {
        match self.reader.read(rev, file, index).await {
            Ok(read) => {
                if read.completed && rev.is_original() {
                    self.finish(rev.clone());
                }
                Ok(read)
            }
            Err(e @ Error::VariantEvicted { .. }) => {
                self.rebuild(rev).await.map_err(|_| e)?;
                self.reader.read(rev, file, index).await
            }
            Err(Error::ChunkCorrupt { name, path, index }) if rev.is_original() => {
                // A fresh read from the origin disagrees with the digest on record (a saved
                // record gone bad, or bytes changed under an unchanged ETag): the origin
                // wins. The record is rebuilt from a fresh listing; the client fetches again.
                self.catalog.discard(rev);
                self.finisher.forget(rev);
                Err(Error::RecordDiscarded { name, path, index })
            }
            Err(e) => {
                // The origin holds another version of a file: the next resolve lists it
                // again, so the client's retry gets the new revision at once.
                if matches!(
                    e.root(),
                    Error::OriginChanged { .. } | Error::OriginFileGone { .. }
                ) {
                    self.catalog.invalidate(&rev.name);
                }
                Err(e)
            }
        }
    }

    /// Builds `rev`, a variant whose chunks left the tier during a transfer, again. A
    /// rebuild gives the same revision and the same bytes; only if the original changed
    /// meanwhile does this fail (the transfer then ends `ABORTED`, and the agent fetches
    /// the new revision).
    async fn rebuild(self: &Arc<Self>, rev: &Arc<Revision>) -> Result<()> {
        let Some(variant) = Variant::parse(&rev.variant) else {
            return Err(Error::UnknownVariant {
                variant: rev.variant.clone(),
            });
        };
        let original = self.resolve_original(&rev.name).await?.revision;
        if rev.source.as_deref() != Some(original.id.as_str()) {
            self.variants.invalidate(&rev.name, variant, &rev.id);
            return Err(Error::VariantEvicted {
                name: rev.name.clone(),
                variant: rev.variant.clone(),
            });
        }
        tracing::info!(
            model = %rev.name, %variant,
            "a chunk left the variant tier during a transfer; building the variant again"
        );
        let rebuilt = self.variants.get(&original, variant).await?;
        if rebuilt.id != rev.id {
            return Err(Error::VariantEvicted {
                name: rev.name.clone(),
                variant: rev.variant.clone(),
            });
        }
        Ok(())
    }

    /// Finishes an original that is read in full, once (a build or a new revision can
    /// complete it without a read of `chunk` saying so).
    fn finish_if_complete(self: &Arc<Self>, rev: &Arc<Revision>) {
        if rev.is_original() && rev.all_digests_known() {
            self.finish(rev.clone());
        }
    }

    /// Computes the digests of an original read in full, then precomputes its variants.
    fn finish(self: &Arc<Self>, rev: Arc<Revision>) {
        let variants = self.variants.clone();
        let routing = self.routing.clone();
        self.finisher.start(rev, move |rev| {
            // Variants are built by the model's owner only; the others fill theirs from it.
            if routing.as_ref().is_none_or(|r| r.owns(&rev.name)) {
                variants.precompute(rev);
            }
        });
    }

    /// Reads every chunk of a model into the tiers (`Prefetch`).
    pub async fn warm(self: &Arc<Self>, reference: &Reference) -> Result<Warmed> {
        let rev = self.resolve(reference).await?.revision;
        let plan = rev.chunk_plan(0..rev.files.len(), 0);
        let origin_bytes = stream::iter(plan)
            .map(|(f, i)| {
                let rev = &rev;
                async move { self.chunk(rev, f, i).await }
            })
            .buffered(self.reader.parallelism())
            .try_fold(0u64, |acc, read| async move {
                let fetched = read.tier == Tier::Origin;
                Ok(acc
                    + if fetched {
                        read.value.data.len() as u64
                    } else {
                        0
                    })
            })
            .await?;
        Ok(Warmed {
            revision: rev.id.clone(),
            total_size: rev.total_size,
            origin_bytes,
        })
    }

    /// How many chunks of `rev` each tier holds.
    pub fn tier_counts(&self, rev: &Revision) -> TierCounts {
        let mut counts = TierCounts::default();
        for (f, file) in rev.files.iter().enumerate() {
            let cache = self.reader.tier_of(rev, f);
            counts.total_chunks += file.keys.len() as u64;
            counts.memory_chunks += file.keys.iter().filter(|k| cache.in_memory(k)).count() as u64;
            counts.disk_chunks += file.keys.iter().filter(|k| cache.on_disk(k)).count() as u64;
        }
        counts
    }

    /// Models in the origin (or, if it cannot be listed, those cached) with their state.
    pub async fn list(&self) -> Vec<ModelListing> {
        let cached = self.catalog.cached();
        self.catalog
            .names()
            .await
            .into_iter()
            .map(|name| {
                let original = cached.iter().find(|r| r.name == name);
                let ready = if original.is_some() {
                    self.variants.ready(&name)
                } else {
                    Vec::new()
                };
                ModelListing {
                    cached: original
                        .into_iter()
                        .chain(ready.iter())
                        .map(|r| (r.clone(), self.tier_counts(r)))
                        .collect(),
                    variants: original
                        .map(|r| self.variants.states(r))
                        .unwrap_or_default(),
                    name,
                }
            })
            .collect()
    }

    /// The revisions the node trusts for its models (operator controls reach it here).
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Waits until the background work started so far (digests, builds) has ended.
    pub async fn wait_idle(&self) {
        self.background.idle().await;
    }

    /// Stops background work, saves manifests and flushes the disk tiers.
    pub async fn shutdown(&self) -> Result<()> {
        self.background.shutdown().await;
        for rev in self.catalog.cached() {
            if let Err(e) = self.manifests.save(&rev) {
                tracing::warn!(model = %rev.name, "could not save manifest: {e}");
            }
        }
        self.reader.built().close().await?;
        self.reader.originals().close().await
    }

    /// The originals' tier and the variants' tier.
    #[cfg(feature = "test-hooks")]
    pub fn tier_caches(&self) -> (&ChunkCache, &ChunkCache) {
        (self.reader.originals(), self.reader.built())
    }
}
