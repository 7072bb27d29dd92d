//! The registry of models a node knows: resolving a name to its current revision
//! (revalidating against the origin, stale-if-error), reading chunks through the tiers,
//! and the background work that follows a full read (file SHA-256, disk persistence).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use modelcache_proto::{Reference, v1};
use sha2::Digest;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::{ChunkCache, ChunkKey, ChunkValue, Tier};
use crate::error::{Error, Result};
use crate::manifest::{ManifestStore, Revision};
use crate::origin::Origin;
use crate::variants::Variants;

/// Counters exposed for metrics and tests.
#[derive(Debug, Default)]
pub struct NodeStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_served: AtomicU64,
    pub corrupt_chunks: AtomicU64,
    /// Variant builds started (each runs once per model, variant and revision).
    pub variant_builds: AtomicU64,
}

/// What a request resolved to.
pub struct Resolved {
    pub revision: Arc<Revision>,
    /// Set when the origin could not be re-listed and a cached revision is served.
    pub stale_reason: Option<String>,
}

#[derive(Default)]
struct SlotState {
    current: Option<Arc<Revision>>,
    validated_at: Option<Instant>,
    stale_reason: Option<String>,
}

/// One model's state; `refresh` makes concurrent revalidations share one listing.
#[derive(Default)]
struct ModelSlot {
    state: Mutex<SlotState>,
    refresh: tokio::sync::Mutex<()>,
}

pub struct Registry {
    origin: Arc<Origin>,
    cache: Arc<ChunkCache>,
    pub(crate) manifests: ManifestStore,
    revalidate_after: Duration,
    origin_parallelism: usize,
    models: Mutex<HashMap<String, Arc<ModelSlot>>>,
    pub(crate) variants: Variants,
    pub(crate) background: TaskTracker,
    pub(crate) cancel: CancellationToken,
    /// Bounds background SHA-256 work so that serving keeps the cores.
    hash_permits: Semaphore,
    pub stats: NodeStats,
}

impl Registry {
    pub fn new(
        origin: Origin,
        cache: ChunkCache,
        manifests: ManifestStore,
        variants: Variants,
        revalidate_after: Duration,
        origin_parallelism: usize,
    ) -> Self {
        let mut models = HashMap::new();
        let (originals, built): (Vec<Revision>, Vec<Revision>) = manifests
            .load_all()
            .into_iter()
            .partition(|r| r.variant == modelcache_proto::reference::ORIGINAL);
        for rev in built {
            // Only variants of the original revision this node still has.
            if originals
                .iter()
                .any(|o| o.name == rev.name && Some(&o.id) == rev.source.as_ref())
            {
                variants.restore(rev);
            } else {
                manifests.remove(&rev.name, &rev.variant);
            }
        }
        for rev in originals {
            let name = rev.name.clone();
            // A revision the origin confirmed less than `revalidate_after` ago is trusted
            // for the rest of that time: a restarted node serves without asking the origin.
            let validated_at = rev
                .confirmed_ago()
                .filter(|ago| *ago < revalidate_after)
                .and_then(|ago| Instant::now().checked_sub(ago));
            let slot = ModelSlot {
                state: Mutex::new(SlotState {
                    current: Some(Arc::new(rev)),
                    validated_at,
                    ..SlotState::default()
                }),
                ..ModelSlot::default()
            };
            models.insert(name, Arc::new(slot));
        }
        Self {
            origin: Arc::new(origin),
            cache: Arc::new(cache),
            manifests,
            revalidate_after,
            origin_parallelism: origin_parallelism.max(1),
            models: Mutex::new(models),
            variants,
            background: TaskTracker::new(),
            cancel: CancellationToken::new(),
            hash_permits: Semaphore::new(1),
            stats: NodeStats::default(),
        }
    }

    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The tier of built variants.
    pub fn variant_cache(&self) -> &ChunkCache {
        &self.variants.cache
    }

    pub fn origin_parallelism(&self) -> usize {
        self.origin_parallelism
    }

    fn slot(&self, name: &str) -> Arc<ModelSlot> {
        let mut models = self.models.lock().expect("registry lock poisoned");
        models.entry(name.to_owned()).or_default().clone()
    }

    /// The revision to serve for `reference`, re-listing the origin when the cached one is
    /// older than `revalidate_after`.
    pub async fn resolve(self: &Arc<Self>, reference: &Reference) -> Result<Resolved> {
        let variant = if reference.is_original() {
            None
        } else {
            Some(
                modelcache_quant::Variant::parse(reference.variant()).ok_or_else(|| {
                    Error::UnknownVariant {
                        variant: reference.variant().to_owned(),
                    }
                })?,
            )
        };
        let resolved = self.resolve_name(reference.name()).await?;
        match variant {
            None => Ok(resolved),
            Some(variant) => Ok(Resolved {
                revision: self.variant(&resolved.revision, variant).await?,
                stale_reason: resolved.stale_reason,
            }),
        }
    }

    async fn resolve_name(self: &Arc<Self>, name: &str) -> Result<Resolved> {
        let slot = self.slot(name);
        if let Some(fresh) = self.fresh(&slot) {
            return Ok(fresh);
        }
        let _refresh = slot.refresh.lock().await;
        if let Some(fresh) = self.fresh(&slot) {
            return Ok(fresh);
        }
        let listed = self.origin.list_model(name).await.and_then(|files| {
            modelcache_proto::check_file_paths(files.iter().map(|f| f.path.as_str())).map_err(
                |source| Error::UnsafeModelPath {
                    name: name.to_owned(),
                    origin: self.origin.display().to_owned(),
                    source,
                },
            )?;
            Ok(files)
        });
        let mut state = slot.state.lock().expect("slot lock poisoned");
        match listed {
            Ok(files) => {
                let unchanged = state
                    .current
                    .as_ref()
                    .filter(|cur| cur.id == crate::manifest::revision_id(&files))
                    .cloned();
                let revision = match unchanged {
                    Some(cur) => {
                        cur.confirm();
                        cur
                    }
                    None => {
                        let rev = Arc::new(Revision::new(name, files, state.current.as_deref()));
                        rev.confirm();
                        if let Err(e) = self.manifests.save(&rev) {
                            tracing::warn!(model = name, "could not save manifest: {e}");
                        }
                        tracing::info!(model = name, revision = %rev.id, "new revision");
                        if rev.all_digests_known() && !rev.has_all_sha256() {
                            self.finish_in_background(rev.clone());
                        }
                        rev
                    }
                };
                state.current = Some(revision.clone());
                state.validated_at = Some(Instant::now());
                state.stale_reason = None;
                Ok(Resolved {
                    revision,
                    stale_reason: None,
                })
            }
            Err(e @ (Error::ModelNotFound { .. } | Error::UnsafeModelPath { .. })) => {
                if state.current.take().is_some() {
                    self.manifests
                        .remove(name, modelcache_proto::reference::ORIGINAL);
                }
                Err(e)
            }
            Err(e) => match state.current.clone() {
                Some(revision) => {
                    let reason = e.to_string();
                    tracing::warn!(model = name, "serving cached revision: {reason}");
                    state.validated_at = Some(Instant::now());
                    state.stale_reason = Some(reason.clone());
                    Ok(Resolved {
                        revision,
                        stale_reason: Some(reason),
                    })
                }
                None => Err(e),
            },
        }
    }

    fn fresh(&self, slot: &ModelSlot) -> Option<Resolved> {
        let state = slot.state.lock().expect("slot lock poisoned");
        let validated = state.validated_at?;
        if validated.elapsed() > self.revalidate_after {
            return None;
        }
        Some(Resolved {
            revision: state.current.clone()?,
            stale_reason: state.stale_reason.clone(),
        })
    }

    /// One chunk, from memory, disk or the origin; a chunk that fails its digest on disk
    /// is dropped and read again from the origin.
    pub async fn chunk(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        file: usize,
        index: u64,
    ) -> Result<(ChunkValue, Tier)> {
        let record = &rev.files[file];
        let key = record.keys[index as usize];
        let cache = if record.built {
            &self.variants.cache
        } else {
            &self.cache
        };
        for _attempt in 0..2 {
            let (value, tier) = if record.built {
                self.built_chunk(rev, key).await?
            } else {
                let fetch = {
                    let origin = self.origin.clone();
                    let name = rev.name.clone();
                    let origin_file = record.origin.clone();
                    let range = record.chunk_range(index);
                    async move {
                        let data = origin.read_range(&name, &origin_file, range).await?;
                        Ok(ChunkValue::new(data))
                    }
                };
                cache.get_or_fetch(key, fetch).await?
            };
            let expected = record.digests[index as usize].get().copied();
            let intact = match tier {
                Tier::Disk => value.is_intact() && expected.is_none_or(|d| d == value.digest),
                _ => expected.is_none_or(|d| d == value.digest),
            };
            if !intact {
                tracing::warn!(
                    model = %rev.name, path = %record.origin.path, chunk = index,
                    ?tier, "chunk failed its digest; reading it again from the origin"
                );
                self.stats.corrupt_chunks.fetch_add(1, Ordering::Relaxed);
                cache.remove(&key);
                continue;
            }
            if rev.record_digest(file, index, value.digest)
                && rev.variant == modelcache_proto::reference::ORIGINAL
            {
                self.finish_in_background(rev.clone());
            }
            let counter = match tier {
                Tier::Memory => &self.stats.memory_hits,
                Tier::Disk => &self.stats.disk_hits,
                Tier::Origin => &self.stats.misses,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Ok((value, tier));
        }
        Err(Error::Cache(format!(
            "chunk {index} of {}/{} fails its digest after a fresh read",
            rev.name, record.origin.path
        )))
    }

    /// A chunk of a built variant. One that left the variant tier (evicted, or unreadable
    /// on disk) while the variant was being sent is built again and served: a rebuild gives
    /// the same revision and the same bytes. Only if the original changed meanwhile does
    /// the transfer end (`ABORTED`; the agent then fetches the new revision).
    async fn built_chunk(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        key: ChunkKey,
    ) -> Result<(ChunkValue, Tier)> {
        let evicted = || Error::VariantEvicted {
            name: rev.name.clone(),
            variant: rev.variant.clone(),
        };
        let cache = &self.variants.cache;
        let missing = || std::future::ready(Err(evicted()));
        if let Ok(found) = cache.get_or_fetch(key, missing()).await {
            return Ok(found);
        }
        let variant = modelcache_quant::Variant::parse(&rev.variant).ok_or_else(evicted)?;
        // Whatever a tier still claims to hold under this key is unusable; without it the
        // build no longer counts as intact, so `variant` builds it again.
        cache.remove(&key);
        let original = self.resolve_name(&rev.name).await?.revision;
        if rev.source.as_deref() != Some(original.id.as_str()) {
            self.variants.invalidate(&rev.name, variant, &rev.id);
            return Err(evicted());
        }
        tracing::info!(
            model = %rev.name, %variant,
            "a chunk left the variant tier during a transfer; building the variant again"
        );
        let rebuilt = self.variant(&original, variant).await?;
        if rebuilt.id != rev.id {
            return Err(evicted());
        }
        cache.get_or_fetch(key, missing()).await
    }

    /// Reads every chunk of a model into the tiers; returns the bytes read from the origin.
    pub async fn warm(self: &Arc<Self>, rev: &Arc<Revision>) -> Result<u64> {
        let plan = chunk_plan(rev, 0, 0);
        let origin_bytes = stream::iter(plan)
            .map(|(f, i)| async move { self.chunk(rev, f, i).await })
            .buffered(self.origin_parallelism)
            .try_fold(0u64, |acc, (value, tier)| async move {
                Ok(acc
                    + if tier == Tier::Origin {
                        value.data.len() as u64
                    } else {
                        0
                    })
            })
            .await?;
        Ok(origin_bytes)
    }

    /// How many chunks of `rev` each tier holds.
    pub fn tiers(&self, rev: &Revision) -> v1::TierPresence {
        let mut tiers = v1::TierPresence::default();
        for file in &rev.files {
            let cache = if file.built {
                &self.variants.cache
            } else {
                &self.cache
            };
            tiers.total_chunks += file.keys.len() as u64;
            tiers.memory_chunks += file.keys.iter().filter(|k| cache.in_memory(k)).count() as u64;
            tiers.disk_chunks += file.keys.iter().filter(|k| cache.on_disk(k)).count() as u64;
        }
        tiers
    }

    pub fn manifest(&self, resolved: &Resolved) -> v1::Manifest {
        let rev = &resolved.revision;
        let mut manifest = rev.to_proto(resolved.stale_reason.as_deref(), self.tiers(rev));
        if rev.variant == modelcache_proto::reference::ORIGINAL {
            manifest.variants = self.variant_states(rev);
        }
        manifest
    }

    /// After a model was read in full: compute each file's SHA-256 (once per revision, in
    /// the background, one file at a time), make sure every chunk reached the disk tier,
    /// and save the manifest with all digests.
    pub fn finish_in_background(self: &Arc<Self>, rev: Arc<Revision>) {
        if rev.finishing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        self.background.spawn(async move {
            tokio::select! {
                () = this.cancel.cancelled() => {
                    rev.finishing.store(false, Ordering::Release);
                }
                result = this.finish(&rev) => if let Err(e) = result {
                    tracing::warn!(model = %rev.name, "background digest failed: {e}");
                    rev.finishing.store(false, Ordering::Release);
                }
            }
        });
    }

    async fn finish(self: &Arc<Self>, rev: &Arc<Revision>) -> Result<()> {
        let _permit = self
            .hash_permits
            .acquire()
            .await
            .map_err(|e| Error::Cache(e.to_string()))?;
        for (f, record) in rev.files.iter().enumerate() {
            if record.sha256.get().is_none() {
                let sha = self.file_sha256(rev, f).await?;
                let _ = record.sha256.set(sha);
            }
        }
        // Only originals come here: a variant's revision has every digest from its build.
        let missing = self.cache.persist(&rev.chunk_keys()).await;
        if missing > 0 {
            tracing::warn!(model = %rev.name, missing, "chunks did not reach the disk tier");
        }
        self.manifests.save(rev)?;
        self.precompute(rev);
        Ok(())
    }

    /// The SHA-256 of one file of `rev`, read through the tiers and hashed on the
    /// blocking pool.
    pub(crate) async fn file_sha256(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        file: usize,
    ) -> Result<String> {
        let mut hasher = sha2::Sha256::new();
        for i in 0..rev.files[file].keys.len() as u64 {
            let (value, _) = self.chunk(rev, file, i).await?;
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&value.data);
                hasher
            })
            .await
            .map_err(|e| Error::Cache(e.to_string()))?;
        }
        Ok(hex::encode(hasher.finalize()))
    }

    /// Waits until background work for every model read so far is done (tests, shutdown).
    pub async fn wait_idle(&self) {
        loop {
            let pending = self.background.len();
            if pending == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Models in the origin (or, if it cannot be listed, those cached) with their state.
    pub async fn list(&self) -> Result<Vec<v1::ModelInfo>> {
        let mut names = match self.origin.list_models().await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("listing origin failed, listing cached models only: {e}");
                Vec::new()
            }
        };
        let cached: Vec<Arc<Revision>> = {
            let models = self.models.lock().expect("registry lock poisoned");
            models
                .values()
                .filter_map(|s| s.state.lock().expect("slot lock poisoned").current.clone())
                .collect()
        };
        names.extend(cached.iter().map(|r| r.name.clone()));
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| {
                let original = cached.iter().find(|r| r.name == name);
                let ready = if original.is_some() {
                    self.ready_variants(&name)
                } else {
                    Vec::new()
                };
                v1::ModelInfo {
                    cached: original
                        .into_iter()
                        .chain(ready.iter())
                        .map(|r| v1::CachedVariant {
                            variant: r.variant.clone(),
                            revision: r.id.clone(),
                            total_size: r.total_size,
                            tiers: Some(self.tiers(r)),
                        })
                        .collect(),
                    variants: original.map(|r| self.variant_states(r)).unwrap_or_default(),
                    name,
                }
            })
            .collect())
    }

    /// Stops background work, saves manifests and flushes the disk tier.
    pub async fn shutdown(&self) -> Result<()> {
        self.cancel.cancel();
        self.background.close();
        self.background.wait().await;
        let revisions: Vec<Arc<Revision>> = {
            let models = self.models.lock().expect("registry lock poisoned");
            models
                .values()
                .filter_map(|s| s.state.lock().expect("slot lock poisoned").current.clone())
                .collect()
        };
        for rev in revisions {
            if let Err(e) = self.manifests.save(&rev) {
                tracing::warn!(model = %rev.name, "could not save manifest: {e}");
            }
        }
        self.variants.cache.close().await?;
        self.cache.close().await
    }
}

/// Every (file, chunk) from `start_file` at chunk `start_chunk` to the model's end.
pub fn chunk_plan(rev: &Revision, start_file: usize, start_chunk: u64) -> Vec<(usize, u64)> {
    let mut plan = Vec::new();
    for (f, record) in rev.files.iter().enumerate().skip(start_file) {
        let first = if f == start_file { start_chunk } else { 0 };
        plan.extend((first..record.keys.len() as u64).map(|i| (f, i)));
    }
    plan
}
