//! Quantized variants built by the node from a model's original (SPEC §3).
//!
//! A variant is built once per (model, variant, original revision): the weight files are
//! read through the tiers (so the original gets cached on the way), transformed by
//! `modelcache-quant` on the blocking pool (`build`), and the results are cut into chunks
//! and stored in a tier of their own, separate from the originals', so that variants are
//! evicted among themselves and never push out the originals they can be rebuilt from
//! (`store`). Files a variant does not transform are the original's chunks, shared.
//!
//! Concurrent requests for a variant wait for the same build; a build runs as a
//! background task, so a client that goes away does not cancel it. Builds are bounded by
//! `--build-parallelism`. A failed build is remembered for that original revision (a
//! corrupt file stays corrupt) and reported with its reason; the original keeps being
//! served.

mod build;
mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use modelcache_proto::CHUNK_SIZE;
use modelcache_quant::{Format, Variant};
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::chunks::ChunkReader;
use crate::error::{Error, Result};
use crate::manifest::{ManifestStore, Revision, variant_id};
use crate::stats::NodeStats;
use crate::tasks::Background;

/// Most chunks stored between two waits for the variant tier's disk writes.
const STORE_BATCH: usize = 32;

type BuildResult = std::result::Result<Arc<Revision>, Arc<Error>>;

struct Build {
    /// The original revision it is built from.
    source: String,
    /// What waiters await.
    result: Shared<BoxFuture<'static, BuildResult>>,
    /// Set by the build task itself when it ends, whether or not anybody awaits `result`.
    done: Arc<OnceLock<BuildResult>>,
}

/// Where the build of one variant of a model stands.
#[derive(Clone, Debug)]
pub enum BuildState {
    Absent,
    Building,
    Ready { revision: String, total_size: u64 },
    Failed { reason: String },
}

/// Settings of the variant builder.
pub struct BuilderOptions {
    /// Where builds keep their temporary files (emptied at start).
    pub scratch: PathBuf,
    /// Variants built as soon as an original was read in full.
    pub precompute: Vec<Variant>,
    /// Builds at once.
    pub parallelism: usize,
    /// Memory tier of the variant tier, bytes: bounds how many chunks are stored between
    /// two waits for its disk writes.
    pub memory_capacity: u64,
    /// Threads one build quantizes on.
    pub quantize_threads: usize,
}

/// The node's variant builds: the table of builds, single-flight, precompute and store.
pub struct VariantBuilder {
    reader: Arc<ChunkReader>,
    manifests: Arc<ManifestStore>,
    background: Background,
    stats: Arc<NodeStats>,
    scratch: PathBuf,
    builds: Mutex<HashMap<(String, Variant), Build>>,
    permits: Semaphore,
    precompute: Vec<Variant>,
    quantize_threads: usize,
    /// Chunks stored between two waits for disk writes: well under what the variant
    /// memory tier holds, so a chunk a full flush queue dropped is still in memory when
    /// `persist` re-queues it.
    store_batch: usize,
}

impl VariantBuilder {
    pub fn new(
        reader: Arc<ChunkReader>,
        manifests: Arc<ManifestStore>,
        background: Background,
        stats: Arc<NodeStats>,
        options: BuilderOptions,
    ) -> Result<Self> {
        let scratch = options.scratch;
        // Left-overs of builds interrupted by a crash.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Error::io(format!("creating {}", scratch.display()), e))?;
        Ok(Self {
            reader,
            manifests,
            background,
            stats,
            scratch,
            builds: Mutex::new(HashMap::new()),
            permits: Semaphore::new(options.parallelism.max(1)),
            precompute: options.precompute,
            quantize_threads: options.quantize_threads.max(1),
            store_batch: ((options.memory_capacity / CHUNK_SIZE / 4) as usize)
                .clamp(1, STORE_BATCH),
        })
    }

    /// A variant built before a restart, whose manifest was saved: ready again (and
    /// rebuilt when it is asked for if its chunks are gone).
    pub fn restore(&self, rev: Revision) {
        self.adopt(Arc::new(rev));
    }

    /// A variant the model's owner built, filled from it: ready here under the name it
    /// was asked for, and never built by this node.
    pub fn adopt(&self, rev: Arc<Revision>) {
        let (Some(variant), Some(source)) = (Variant::parse(&rev.variant), rev.source.clone())
        else {
            return;
        };
        let name = rev.name.clone();
        let rev: BuildResult = Ok(rev);
        let done = Arc::new(OnceLock::from(rev.clone()));
        let result = futures::future::ready(rev).boxed().shared();
        self.builds().insert(
            (name, variant),
            Build {
                source,
                result,
                done,
            },
        );
    }

    /// The ready revision of `variant` of the model `name` made from original revision
    /// `source`, if there is one (built here or adopted), without building anything.
    pub fn ready_of(&self, name: &str, variant: Variant, source: &str) -> Option<Arc<Revision>> {
        let builds = self.builds();
        let build = builds.get(&(name.to_owned(), variant))?;
        if build.source != source {
            return None;
        }
        build.done.get()?.as_ref().ok().cloned()
    }

    fn builds(&self) -> std::sync::MutexGuard<'_, HashMap<(String, Variant), Build>> {
        self.builds.lock().expect("variant builds lock poisoned")
    }

    /// Forgets a build whose chunks were evicted, so the next request rebuilds it.
    pub fn invalidate(&self, name: &str, variant: Variant, revision: &str) {
        let mut builds = self.builds();
        let stale = builds.get(&(name.to_owned(), variant)).is_some_and(|b| {
            b.done
                .get()
                .is_some_and(|r| r.as_ref().is_ok_and(|rev| rev.id == revision))
        });
        if stale {
            builds.remove(&(name.to_owned(), variant));
        }
    }

    /// The ready revision of `variant` of `original`, building it if needed (concurrent
    /// callers share one build); one whose chunks left the tier is built again. A variant
    /// that is another under a second name (GGUF's `int8` is its `q8_0`) is that one's
    /// build, served under the name asked for.
    pub async fn get(
        self: &Arc<Self>,
        original: &Arc<Revision>,
        variant: Variant,
    ) -> Result<Arc<Revision>> {
        let built = canonical(original, variant);
        let rev = self.get_built(original, built).await?;
        Ok(if built == variant {
            rev
        } else {
            Arc::new(rev.alias(variant))
        })
    }

    async fn get_built(
        self: &Arc<Self>,
        original: &Arc<Revision>,
        variant: Variant,
    ) -> Result<Arc<Revision>> {
        match self.start_build(original, variant).await {
            Ok(rev) if self.intact(&rev) => Ok(rev),
            Ok(rev) => {
                tracing::info!(model = %rev.name, %variant, "variant was evicted; rebuilding");
                self.invalidate(&rev.name, variant, &rev.id);
                self.start_build(original, variant)
                    .await
                    .map_err(Error::Shared)
            }
            Err(e) => Err(Error::Shared(e)),
        }
    }

    /// The build of `variant` of `original`: the running or finished one, or a new one.
    fn start_build(
        self: &Arc<Self>,
        original: &Arc<Revision>,
        variant: Variant,
    ) -> Shared<BoxFuture<'static, BuildResult>> {
        let mut builds = self.builds();
        let key = (original.name.clone(), variant);
        if let Some(build) = builds.get(&key)
            && build.source == original.id
        {
            return build.result.clone();
        }
        let this = self.clone();
        let source = original.clone();
        let done = Arc::new(OnceLock::new());
        let record = done.clone();
        // A child of the call that asked first (its trace shows the build).
        let span = crate::spans::variant_build(&source.name, &variant.to_string(), &source.id);
        let task = self.background.spawn(async move {
            let name = source.name.clone();
            let started = std::time::Instant::now();
            let outcome = this.build(source, variant).instrument(span.clone()).await;
            this.stats.variant_build_ended(outcome.is_ok(), started.elapsed());
            crate::spans::outcome(&span, &outcome);
            match &outcome {
                Ok(rev) => {
                    span.record("revision", rev.id.as_str());
                    span.record("bytes", rev.total_size);
                    tracing::info!(model = %name, %variant, revision = %rev.id, size = rev.total_size, "variant built");
                }
                Err(e) => tracing::warn!(model = %name, %variant, "variant build failed: {e}"),
            }
            let outcome: BuildResult = outcome.map_err(Arc::new);
            let _ = record.set(outcome.clone());
            Ok(outcome)
        });
        let result = async move {
            match task.await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(e) => Err(Arc::new(Error::task_failed("variant build", e))),
            }
        }
        .boxed()
        .shared();
        builds.insert(
            key,
            Build {
                source: original.id.clone(),
                result: result.clone(),
                done,
            },
        );
        result
    }

    /// Starts the configured variants of a model that was just read in full.
    pub fn precompute(self: &Arc<Self>, original: &Arc<Revision>) {
        for variant in applicable(original) {
            if self.precompute.contains(&variant) {
                drop(self.start_build(original, canonical(original, variant)));
            }
        }
    }

    /// Whether every chunk of a ready variant is still held by a tier.
    fn intact(&self, rev: &Revision) -> bool {
        let tier = self.reader.built();
        rev.files
            .iter()
            .filter(|f| f.built)
            .all(|f| f.keys.iter().all(|k| tier.in_memory(k) || tier.on_disk(k)))
    }

    /// The state of every variant that applies to `original`.
    pub fn states(&self, original: &Revision) -> Vec<(Variant, BuildState)> {
        let builds = self.builds();
        applicable(original)
            .into_iter()
            .map(|variant| {
                let build = builds
                    .get(&(original.name.clone(), canonical(original, variant)))
                    .filter(|b| b.source == original.id);
                let state = match build.map(|b| b.done.get()) {
                    None => BuildState::Absent,
                    Some(None) => BuildState::Building,
                    Some(Some(Ok(rev))) => BuildState::Ready {
                        revision: variant_id(&original.id, variant),
                        total_size: rev.total_size,
                    },
                    Some(Some(Err(e))) => BuildState::Failed {
                        reason: e.to_string(),
                    },
                };
                (variant, state)
            })
            .collect()
    }

    /// Ready variants of model `name` (for `List`).
    pub fn ready(&self, name: &str) -> Vec<Arc<Revision>> {
        self.builds()
            .iter()
            .filter(|((n, _), _)| n == name)
            .filter_map(|(_, b)| b.done.get().and_then(|r| r.as_ref().ok().cloned()))
            .collect()
    }
}

/// The variant a build of `variant` of `original` makes: for a model whose weights are all
/// GGUF, `int8` and `int4` are its `q8_0` and `q4_0` block formats, built (and stored)
/// once under those names.
fn canonical(original: &Revision, variant: Variant) -> Variant {
    let mut formats = original
        .files
        .iter()
        .filter_map(|f| Format::of(&f.origin.path));
    let gguf_only = formats.clone().next().is_some() && formats.all(|f| f == Format::Gguf);
    match variant {
        Variant::Int8 if gguf_only => Variant::Q8_0,
        Variant::Int4 if gguf_only => Variant::Q4_0,
        other => other,
    }
}

/// The variants that apply to a model's files, in the order of `Variant::ALL`.
pub fn applicable(original: &Revision) -> Vec<Variant> {
    let paths: Vec<&str> = original
        .files
        .iter()
        .map(|f| f.origin.path.as_str())
        .collect();
    Variant::ALL
        .into_iter()
        .filter(|v| modelcache_quant::plan(&paths, *v).is_ok())
        .collect()
}
