//! The build of one variant of one model. `modelcache-quant` does the format work
//! (`model::build`: which files change, quantizing, external data, config and index
//! rewrites); the node hands it the original's files through its tiers (`TierSource`),
//! on the blocking pool, and assembles the variant's revision from the outputs (stored in
//! the variant tier) and the original's records of the files copied unchanged.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use modelcache_quant::model::{self, BuildError, BuildOptions, ModelSource, OutputData};
use modelcache_quant::{QUANTIZER_VERSION, QuantError, Variant};
use sha2::Digest;
use tokio::runtime::Handle;

use super::VariantBuilder;
use crate::chunks::ChunkReader;
use crate::error::{Error, Result};
use crate::manifest::{Provenance, Revision, variant_id};
use crate::tasks::Background;

/// One output file, with its provenance, to store.
pub(super) struct Output {
    pub path: String,
    pub data: OutputData,
    pub provenance: Provenance,
}

impl VariantBuilder {
    pub(super) async fn build(
        self: &Arc<Self>,
        original: Arc<Revision>,
        variant: Variant,
    ) -> Result<Arc<Revision>> {
        let paths: Vec<String> = original
            .files
            .iter()
            .map(|f| f.origin.path.clone())
            .collect();
        // Refused before anything is read or waits for a build slot.
        modelcache_quant::plan(
            &paths.iter().map(String::as_str).collect::<Vec<_>>(),
            variant,
        )
        .map_err(|e| Error::VariantNotApplicable {
            name: original.name.clone(),
            variant: variant.to_string(),
            reason: e.to_string(),
        })?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        self.stats.variant_build();
        let started = std::time::Instant::now();
        let scratch = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(&self.scratch)
            .map_err(|e| Error::io("creating a build folder", e))?;
        let options = BuildOptions {
            threads: self.quantize_threads,
            scratch: scratch.path().to_owned(),
        };
        let source = TierSource {
            reader: self.reader.clone(),
            original: original.clone(),
            runtime: Handle::current(),
            background: self.background.clone(),
        };
        // The build's reads of the original stay in the build's span (its trace).
        let span = tracing::Span::current();
        let built = tokio::task::spawn_blocking(move || {
            let _in_build = span.enter();
            let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
            model::build(&paths, variant, &source, &options)
        })
        .await
        .map_err(|e| Error::task_failed("building a variant", e))?
        .map_err(|e| build_error(&original, variant, e))?;
        let rev = self.assemble(&original, variant, built).await?;
        if let Err(e) = self.manifests.save(&rev) {
            tracing::warn!(model = %rev.name, %variant, "could not save the variant's manifest: {e}");
        }
        tracing::debug!(model = %rev.name, %variant, elapsed = ?started.elapsed(), "variant stored");
        Ok(rev)
    }

    /// The variant's revision: its outputs stored in the variant tier, in the original's
    /// file order, and the original's records of the files copied unchanged.
    async fn assemble(
        &self,
        original: &Arc<Revision>,
        variant: Variant,
        built: model::BuiltModel,
    ) -> Result<Arc<Revision>> {
        let id = variant_id(&original.id, variant);
        let mut outputs: HashMap<String, Output> = built
            .files
            .into_iter()
            .map(|f| {
                let provenance = Provenance {
                    source_path: f.source_path,
                    source_sha256: f.source_sha256,
                    variant: variant.to_string(),
                    quantizer_version: QUANTIZER_VERSION.to_owned(),
                    parameters: variant.parameters(f.format).to_owned(),
                };
                let output = Output {
                    path: f.path.clone(),
                    data: f.data,
                    provenance,
                };
                (f.path, output)
            })
            .collect();
        let mut records = Vec::with_capacity(original.files.len());
        for (i, record) in original.files.iter().enumerate() {
            if let Some(output) = outputs.remove(&record.origin.path) {
                records.push(self.store(&original.name, variant, &id, output).await?);
            } else if !built.dropped.contains(&record.origin.path) {
                // A copied file: the original's chunks, with every digest and the SHA-256
                // known, so that the variant's manifest is complete from the start.
                let sha = self.reader.file_sha256(original, i).await?;
                let copy = record.clone();
                let _ = copy.sha256.set(sha);
                records.push(copy);
            }
        }
        let mut rev = Revision::from_records(&original.name, variant.as_str(), id, records);
        rev.source = Some(original.id.clone());
        Ok(Arc::new(rev))
    }
}

/// What a failed build means to the node: a variant that does not apply, a file that
/// cannot be transformed, or the node's own failure reading the original.
fn build_error(original: &Revision, variant: Variant, e: BuildError) -> Error {
    let (name, variant) = (original.name.clone(), variant.to_string());
    let at = |reason: String| {
        if e.path.is_empty() {
            reason
        } else {
            format!("{}: {reason}", e.path)
        }
    };
    match e.error {
        QuantError::Source(inner) => match inner.downcast::<Error>() {
            Ok(inner) => *inner,
            Err(other) => Error::TaskFailed {
                what: format!("reading {} for {name}:{variant}", e.path),
                detail: other.to_string(),
            },
        },
        QuantError::NotApplicable(reason) => Error::VariantNotApplicable {
            name,
            variant,
            reason: at(reason),
        },
        other => Error::VariantFailed {
            name,
            variant,
            path: e.path.clone(),
            reason: other.to_string(),
        },
    }
}

/// The original's files as a build reads them: through the tiers, from the blocking
/// thread the build runs on.
struct TierSource {
    reader: Arc<ChunkReader>,
    original: Arc<Revision>,
    runtime: Handle,
    /// A shutdown ends the build's reads (the blocking thread is not a task to cancel).
    background: Background,
}

impl TierSource {
    /// Runs `read` on the runtime from the build's blocking thread, unless the node shuts
    /// down first.
    fn run<T>(
        &self,
        read: impl std::future::Future<Output = Result<T>>,
    ) -> modelcache_quant::Result<T> {
        let cancelled = self.background.cancelled();
        self.runtime
            .block_on(async {
                tokio::select! {
                    () = cancelled => Err(Error::ShuttingDown),
                    result = read => result,
                }
            })
            .map_err(source_error)
    }

    fn index(&self, path: &str) -> modelcache_quant::Result<usize> {
        self.original
            .file_index(path)
            .ok_or_else(|| QuantError::NotFound(path.to_owned()))
    }
}

fn source_error(e: Error) -> QuantError {
    QuantError::Source(Box::new(e))
}

impl ModelSource for TierSource {
    fn read(&self, path: &str) -> modelcache_quant::Result<Bytes> {
        let file = self.index(path)?;
        self.run(self.reader.read_whole(&self.original, file))
    }

    fn copy_to(&self, path: &str, to: &std::path::Path) -> modelcache_quant::Result<String> {
        let file = self.index(path)?;
        self.run(self.reader.read_to_file(&self.original, file, to))
    }

    /// Known already; awaited if the revision's background digest is computing it; else
    /// computed here from `bytes` and recorded, so the background digest need not read
    /// the file again.
    fn sha256(&self, path: &str, bytes: &Bytes) -> modelcache_quant::Result<String> {
        let file = self.index(path)?;
        let cell = &self.original.files[file].sha256;
        let digest = cell
            .get_or_try_init(|| async { Ok::<_, Error>(hex::encode(sha2::Sha256::digest(bytes))) });
        self.run(async { digest.await.cloned() })
    }
}
