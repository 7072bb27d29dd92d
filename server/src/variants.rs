//! Quantized variants built by the node from a model's original (SPEC §3).
//!
//! A variant is built once per (model, variant, original revision): the weight files are
//! read through the tiers (so the original gets cached on the way), transformed by
//! `modelcache-quant` on the blocking pool, and the results are cut into chunks and
//! stored in a tier of their own, separate from the originals', so that variants are
//! evicted among themselves and never push out the originals they can be rebuilt from.
//! Files a variant does not transform are the original's chunks, shared.
//!
//! Concurrent requests for a variant wait for the same build; a build runs as a
//! background task, so a client that goes away does not cancel it. Builds are bounded by
//! `--build-parallelism`. A failed build is remembered for that original revision (a
//! corrupt file stays corrupt) and reported with its reason; the original keeps being
//! served.

use std::collections::{HashMap, HashSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryStreamExt, stream};
use modelcache_proto::{CHUNK_SIZE, v1};
use modelcache_quant::{Action, Format, Provenance, QUANTIZER_VERSION, QuantError, Variant};
use sha2::Digest;
use tokio::sync::Semaphore;

use crate::cache::{ChunkCache, ChunkValue};
use crate::error::{Error, Result};
use crate::manifest::{FileRecord, Revision};
use crate::origin::OriginFile;
use crate::registry::Registry;

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

/// The node's variant tier and the builds it knows of.
pub struct Variants {
    pub(crate) cache: Arc<ChunkCache>,
    scratch: PathBuf,
    builds: Mutex<HashMap<(String, Variant), Build>>,
    permits: Semaphore,
    pub(crate) precompute: Vec<Variant>,
    /// Chunks stored between two waits for disk writes: well under what the variant
    /// memory tier holds, so a chunk a full flush queue dropped is still in memory when
    /// `persist` re-queues it.
    store_batch: usize,
}

impl Variants {
    pub fn new(
        cache: ChunkCache,
        memory_capacity: u64,
        scratch: PathBuf,
        precompute: Vec<Variant>,
        parallelism: usize,
    ) -> Result<Self> {
        // A build quantizes on half the cores at most, so that serving keeps the rest.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        modelcache_quant::set_max_threads((cores / 2).max(1));
        // Left-overs of builds interrupted by a crash.
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)
            .map_err(|e| Error::io(format!("creating {}", scratch.display()), e))?;
        Ok(Self {
            cache: Arc::new(cache),
            scratch,
            builds: Mutex::new(HashMap::new()),
            permits: Semaphore::new(parallelism.max(1)),
            precompute,
            store_batch: ((memory_capacity / CHUNK_SIZE / 4) as usize).clamp(1, STORE_BATCH),
        })
    }

    /// A variant built before a restart, whose manifest was saved: ready again (and
    /// rebuilt when it is asked for if its chunks are gone).
    pub fn restore(&self, rev: Revision) {
        let (Some(variant), Some(source)) = (Variant::parse(&rev.variant), rev.source.clone())
        else {
            return;
        };
        let name = rev.name.clone();
        let rev: BuildResult = Ok(Arc::new(rev));
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

/// A variant's revision: a digest of the original revision, the variant and the
/// quantizer version (a rebuild gives the same revision and the same bytes).
pub fn variant_id(original: &str, variant: Variant) -> String {
    let mut h = blake3::Hasher::new();
    for part in [original, variant.as_str(), QUANTIZER_VERSION] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_hex()[..32].to_owned()
}

/// Bytes of one output file.
enum Data {
    Memory(Bytes),
    File(PathBuf),
}

struct Output {
    path: String,
    data: Data,
    provenance: v1::Provenance,
}

/// The folder of a path inside a model (`""` at the top).
fn folder(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

impl Registry {
    /// The ready revision of `variant` of `original`, building it if needed (concurrent
    /// callers share one build).
    pub async fn variant(
        self: &Arc<Self>,
        original: &Arc<Revision>,
        variant: Variant,
    ) -> Result<Arc<Revision>> {
        let result = self.start_build(original, variant);
        match result.await {
            Ok(rev) if self.intact(&rev) => Ok(rev),
            Ok(rev) => {
                tracing::info!(model = %rev.name, %variant, "variant was evicted; rebuilding");
                self.variants.invalidate(&rev.name, variant, &rev.id);
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
        let mut builds = self.variants.builds();
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
        let task = self.background.spawn(async move {
            let name = source.name.clone();
            let outcome = tokio::select! {
                () = this.cancel.cancelled() => Err(Error::Cache("the node is shutting down".into())),
                outcome = this.build(source, variant) => outcome,
            };
            match &outcome {
                Ok(rev) => tracing::info!(model = %name, %variant, revision = %rev.id, size = rev.total_size, "variant built"),
                Err(e) => tracing::warn!(model = %name, %variant, "variant build failed: {e}"),
            }
            let outcome = outcome.map_err(Arc::new);
            let _ = record.set(outcome.clone());
            outcome
        });
        let result = async move {
            task.await
                .unwrap_or_else(|e| Err(Arc::new(Error::Cache(format!("variant build: {e}")))))
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
        let wanted: Vec<Variant> = applicable(original)
            .into_iter()
            .filter(|v| self.variants.precompute.contains(v))
            .collect();
        for variant in wanted {
            drop(self.start_build(original, variant));
        }
    }

    /// Whether every chunk of a ready variant is still held by a tier.
    fn intact(&self, rev: &Revision) -> bool {
        rev.files.iter().filter(|f| f.built).all(|f| {
            f.keys
                .iter()
                .all(|k| self.variants.cache.in_memory(k) || self.variants.cache.on_disk(k))
        })
    }

    /// The state of every variant that applies to `original`.
    pub fn variant_states(&self, original: &Revision) -> Vec<v1::VariantState> {
        use v1::variant_state::State;
        let builds = self.variants.builds();
        applicable(original)
            .into_iter()
            .map(|variant| {
                let mut state = v1::VariantState {
                    variant: variant.to_string(),
                    ..Default::default()
                };
                let build = builds
                    .get(&(original.name.clone(), variant))
                    .filter(|b| b.source == original.id);
                match build.map(|b| b.done.get()) {
                    None => state.set_state(State::Absent),
                    Some(None) => state.set_state(State::Building),
                    Some(Some(Ok(rev))) => {
                        state.set_state(State::Ready);
                        state.revision = rev.id.clone();
                        state.total_size = rev.total_size;
                    }
                    Some(Some(Err(e))) => {
                        state.set_state(State::Failed);
                        state.reason = e.to_string();
                    }
                }
                state
            })
            .collect()
    }

    /// Ready variants (for `List`).
    pub fn ready_variants(&self, name: &str) -> Vec<Arc<Revision>> {
        self.variants
            .builds()
            .iter()
            .filter(|((n, _), _)| n == name)
            .filter_map(|(_, b)| b.done.get().and_then(|r| r.as_ref().ok().cloned()))
            .collect()
    }

    async fn build(
        self: &Arc<Self>,
        original: Arc<Revision>,
        variant: Variant,
    ) -> Result<Arc<Revision>> {
        let name = original.name.clone();
        let paths: Vec<&str> = original
            .files
            .iter()
            .map(|f| f.origin.path.as_str())
            .collect();
        let actions =
            modelcache_quant::plan(&paths, variant).map_err(|e| Error::VariantNotApplicable {
                name: name.clone(),
                variant: variant.to_string(),
                reason: e.to_string(),
            })?;
        let _permit = self
            .variants
            .permits
            .acquire()
            .await
            .map_err(|e| Error::Cache(e.to_string()))?;
        self.stats
            .variant_builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let started = std::time::Instant::now();
        let scratch = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&self.variants.scratch)
            .map_err(|e| Error::io("creating a build folder", e))?;
        let failed = |path: &str, e: QuantError| match e {
            QuantError::NotApplicable(reason) => Error::VariantNotApplicable {
                name: name.clone(),
                variant: variant.to_string(),
                reason: format!("{path}: {reason}"),
            },
            other => Error::VariantFailed {
                name: name.clone(),
                variant: variant.to_string(),
                path: path.to_owned(),
                reason: other.to_string(),
            },
        };
        let provenance = |path: &str, sha256: &str, format: Format| v1::Provenance {
            source_path: path.to_owned(),
            source_sha256: sha256.to_owned(),
            variant: variant.to_string(),
            quantizer_version: QUANTIZER_VERSION.to_owned(),
            parameters: variant.parameters(format).to_owned(),
        };

        let mut outputs: Vec<Output> = Vec::new();
        let mut replaced: HashSet<usize> = HashSet::new();
        let mut layouts: Vec<(usize, modelcache_quant::safetensors::Layout)> = Vec::new();
        for (i, action) in actions.iter().enumerate() {
            let Action::Transform(format) = *action else {
                continue;
            };
            let path = original.files[i].origin.path.clone();
            let prov = move |sha: &str| Provenance {
                source_sha256: sha.to_owned(),
                variant,
                format,
            };
            match format {
                Format::Onnx => {
                    let bytes = self.read_whole(&original, i).await?;
                    let source = bytes.clone();
                    let dir = folder(&path).to_owned();
                    let model = tokio::task::spawn_blocking(move || {
                        modelcache_quant::onnx::Model::decode(bytes)
                    })
                    .await
                    .map_err(|e| Error::Cache(e.to_string()))?
                    .map_err(|e| failed(&path, e))?;
                    let locations = model.external_locations();
                    let mut external = HashMap::new();
                    for location in &locations {
                        let model_path = join(&dir, location);
                        let index = original.file_index(&model_path).ok_or_else(|| {
                            failed(
                                &path,
                                QuantError::invalid(format!(
                                    "its external data file {location} is not part of the model"
                                )),
                            )
                        })?;
                        let data = self.read_whole(&original, index).await?;
                        external.insert(location.clone(), data);
                        replaced.insert(index);
                    }
                    let rev = original.clone();
                    let (out, sha) = tokio::task::spawn_blocking(move || {
                        transform_onnx(model, variant, &external, &rev, i, &source, prov)
                    })
                    .await
                    .map_err(|e| Error::Cache(e.to_string()))?
                    .map_err(|e| failed(&path, e))?;
                    let meta = provenance(&path, &sha, format);
                    if let Some((location, data)) = out.external {
                        outputs.push(Output {
                            path: join(&dir, &location),
                            data: Data::Memory(Bytes::from(data)),
                            provenance: meta.clone(),
                        });
                    }
                    outputs.push(Output {
                        path: path.clone(),
                        data: Data::Memory(Bytes::from(out.model)),
                        provenance: meta,
                    });
                }
                Format::Safetensors | Format::Gguf => {
                    let source = scratch.path().join(format!("source-{i}"));
                    let sha = self.read_to_file(&original, i, &source).await?;
                    let target = scratch.path().join(format!("output-{i}"));
                    let p = prov(&sha);
                    let (src, dst) = (source.clone(), target.clone());
                    let layout = tokio::task::spawn_blocking(move || {
                        modelcache_quant::transform_file(&src, &dst, format, variant, &p)
                    })
                    .await
                    .map_err(|e| Error::Cache(e.to_string()))?
                    .map_err(|e| failed(&path, e))?;
                    let _ = std::fs::remove_file(&source);
                    if let Some(layout) = layout {
                        layouts.push((i, layout));
                    }
                    outputs.push(Output {
                        path: path.clone(),
                        data: Data::File(target),
                        provenance: provenance(&path, &sha, format),
                    });
                }
            }
            replaced.insert(i);
        }
        // JSON files that describe the weights follow them.
        for (i, action) in actions.iter().enumerate() {
            if !matches!(action, Action::Config | Action::ShardIndex) {
                continue;
            }
            let path = original.files[i].origin.path.clone();
            let bytes = self.read_whole(&original, i).await?;
            let sha = known_or_hashed(&original, i, &bytes);
            let rewritten = if *action == Action::Config {
                let refs: Vec<_> = layouts.iter().map(|(_, l)| l).collect();
                modelcache_quant::safetensors::rewrite_config(&bytes, &refs)
            } else {
                let dir = folder(&path);
                let shards: Vec<(String, _)> = layouts
                    .iter()
                    .filter(|(f, _)| folder(&original.files[*f].origin.path) == dir)
                    .map(|(f, l)| {
                        let p = &original.files[*f].origin.path;
                        (p.rsplit('/').next().unwrap_or(p).to_owned(), l.clone())
                    })
                    .collect();
                modelcache_quant::safetensors::rewrite_index(&bytes, &shards)
            }
            .map_err(|e| failed(&path, e))?;
            outputs.push(Output {
                path: path.clone(),
                data: Data::Memory(Bytes::from(rewritten)),
                provenance: provenance(&path, &sha, Format::Safetensors),
            });
            replaced.insert(i);
        }

        let id = variant_id(&original.id, variant);
        let mut records = Vec::with_capacity(original.files.len());
        let mut outputs: HashMap<String, Output> =
            outputs.into_iter().map(|o| (o.path.clone(), o)).collect();
        for (i, record) in original.files.iter().enumerate() {
            if let Some(output) = outputs.remove(&record.origin.path) {
                records.push(self.store(&name, variant, &id, output).await?);
            } else if !replaced.contains(&i) {
                // A copied file: the original's chunks, with every digest and the SHA-256
                // known, so that the variant's manifest is complete from the start.
                let sha = match record.sha256.get() {
                    Some(sha) => sha.clone(),
                    None => self.file_sha256(&original, i).await?,
                };
                let copy = record.clone();
                let _ = copy.sha256.set(sha);
                records.push(copy);
            }
        }
        let mut rev = Revision::from_records(&name, variant.as_str(), id, records);
        rev.source = Some(original.id.clone());
        let rev = Arc::new(rev);
        if let Err(e) = self.manifests.save(&rev) {
            tracing::warn!(model = %name, %variant, "could not save the variant's manifest: {e}");
        }
        tracing::debug!(model = %name, %variant, elapsed = ?started.elapsed(), "variant stored");
        Ok(rev)
    }

    /// A whole file of `rev` read through the tiers.
    async fn read_whole(self: &Arc<Self>, rev: &Arc<Revision>, file: usize) -> Result<Bytes> {
        let mut buf = BytesMut::with_capacity(rev.files[file].origin.size as usize);
        let mut chunks = self.file_chunks(rev, file);
        while let Some(data) = chunks.try_next().await? {
            buf.extend_from_slice(&data);
        }
        Ok(buf.freeze())
    }

    /// A whole file of `rev` written to `path` through the tiers; returns its SHA-256.
    async fn read_to_file(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        file: usize,
        path: &Path,
    ) -> Result<String> {
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
            .map_err(|e| Error::Cache(e.to_string()))?
            .map_err(|e| Error::io("writing a build input", e))?;
        }
        let (mut w, h) = state;
        w.flush()
            .map_err(|e| Error::io("writing a build input", e))?;
        Ok(known.unwrap_or_else(|| {
            let sha = hex::encode(h.expect("hashing").finalize());
            // The revision's background digest need not read the file again.
            let _ = rev.files[file].sha256.set(sha.clone());
            sha
        }))
    }

    fn file_chunks<'a>(
        self: &'a Arc<Self>,
        rev: &'a Arc<Revision>,
        file: usize,
    ) -> impl futures::Stream<Item = Result<Bytes>> + Unpin + 'a {
        let chunks = rev.files[file].keys.len() as u64;
        stream::iter(0..chunks)
            .map(move |i| async move { self.chunk(rev, file, i).await.map(|(v, _)| v.data) })
            .buffered(self.origin_parallelism())
            .boxed()
    }

    /// Cuts an output into chunks in the variant tier; the record has every digest.
    async fn store(
        &self,
        name: &str,
        variant: Variant,
        id: &str,
        output: Output,
    ) -> Result<FileRecord> {
        let size = match &output.data {
            Data::Memory(b) => b.len() as u64,
            Data::File(p) => std::fs::metadata(p)
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))?
                .len(),
        };
        let origin = OriginFile {
            path: output.path.clone(),
            size,
            etag: format!("{variant}:{id}"),
        };
        let mut record = FileRecord::new(name, variant.as_str(), origin);
        record.built = true;
        record.provenance = Some(output.provenance);
        let mut file = match &output.data {
            Data::File(p) => {
                Some(BufReader::new(std::fs::File::open(p).map_err(|e| {
                    Error::io(format!("reading {}", p.display()), e)
                })?))
            }
            Data::Memory(_) => None,
        };
        let mut hasher = sha2::Sha256::new();
        let mut batch = Vec::with_capacity(self.variants.store_batch);
        for (index, key) in record.keys.iter().enumerate() {
            let range = record.chunk_range(index as u64);
            let data = match (&output.data, file.as_mut()) {
                (Data::Memory(b), _) => b.slice(range.start as usize..range.end as usize),
                (_, Some(f)) => {
                    let mut buf = vec![0; (range.end - range.start) as usize];
                    f.read_exact(&mut buf)
                        .map_err(|e| Error::io("reading a built variant", e))?;
                    Bytes::from(buf)
                }
                _ => unreachable!("file data has a reader"),
            };
            hasher.update(&data);
            let value = ChunkValue::new(data);
            let _ = record.digests[index].set(value.digest);
            self.variants.cache.insert(*key, value);
            batch.push(*key);
            if batch.len() == self.variants.store_batch {
                self.variants.cache.persist(&batch).await;
                batch.clear();
            }
        }
        let missing = self.variants.cache.persist(&batch).await;
        if missing > 0 {
            tracing::warn!(model = name, %variant, missing, "variant chunks did not reach the disk tier");
        }
        let _ = record.sha256.set(hex::encode(hasher.finalize()));
        if let Data::File(p) = &output.data {
            let _ = std::fs::remove_file(p);
        }
        debug_assert_eq!(record.keys.len() as u64, size.div_ceil(CHUNK_SIZE));
        Ok(record)
    }
}

/// Builds `variant` of `model`, the ONNX file `file` of the original `rev` (whose bytes
/// are `source`), and finds the source's SHA-256 for the provenance meanwhile. The
/// provenance is asked for last, once the weights are quantized, so the digest is computed
/// on a second thread during the quantization — unless it is known already or the
/// revision's background digest is computing it. Returns the output and the digest.
fn transform_onnx(
    model: modelcache_quant::onnx::Model,
    variant: Variant,
    external: &HashMap<String, Bytes>,
    rev: &Revision,
    file: usize,
    source: &[u8],
    provenance: impl Fn(&str) -> Provenance,
) -> std::result::Result<(modelcache_quant::onnx::Output, String), QuantError> {
    std::thread::scope(|scope| {
        let hashing = (rev.files[file].sha256.get().is_none() && !background_digest_running(rev))
            .then(|| scope.spawn(|| known_or_hashed(rev, file, source)));
        let mut sha = None;
        let out = model.transform_then(
            variant,
            &mut |loc| {
                external
                    .get(loc)
                    .cloned()
                    .ok_or_else(|| QuantError::invalid(format!("external data {loc} was not read")))
            },
            || {
                let digest = match hashing {
                    Some(h) => h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    None => source_sha256(rev, file, source),
                };
                let p = provenance(&digest);
                sha = Some(digest);
                p
            },
        )?;
        Ok((
            out,
            sha.expect("the provenance is asked for before encoding"),
        ))
    })
}

fn background_digest_running(rev: &Revision) -> bool {
    rev.finishing.load(std::sync::atomic::Ordering::Acquire)
}

/// The SHA-256 of file `file` of `rev`, whose bytes are `bytes`: known already, or computed
/// and recorded on the file, so that the revision's background digest need not read the
/// file again.
fn known_or_hashed(rev: &Revision, file: usize, bytes: &[u8]) -> String {
    let record = &rev.files[file];
    if let Some(sha) = record.sha256.get() {
        return sha.clone();
    }
    // Hashed outside the cell, so that a concurrent `set` never waits on the hashing.
    let sha = hex::encode(sha2::Sha256::digest(bytes));
    let _ = record.sha256.set(sha.clone());
    sha
}

/// The SHA-256 of file `file` of the original `rev`, whose bytes are `bytes` (blocking):
/// while the revision's background digest runs, its result is awaited rather than computed
/// twice; otherwise it is computed here.
fn source_sha256(rev: &Revision, file: usize, bytes: &[u8]) -> String {
    while background_digest_running(rev) {
        if let Some(sha) = rev.files[file].sha256.get() {
            return sha.clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    known_or_hashed(rev, file, bytes)
}
