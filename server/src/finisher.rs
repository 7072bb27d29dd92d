//! What follows a full read of an original: each file's origin check and SHA-256 (once per
//! revision, in the background, one model at a time so that serving keeps the cores),
//! every chunk made sure to be on the disk tier, and the manifest saved with all digests.
//! A revision counts as verified (its manifest is saved) only once every file passed its
//! origin check.
//!
//! A party that needs a file's SHA-256 while the finisher computes it (a variant build
//! recording its source) awaits the same computation through the file's `sha256` cell
//! instead of hashing the file again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::checks::OriginChecks;
use crate::chunks::ChunkReader;
use crate::error::{Error, Result};
use crate::manifest::{ManifestStore, Revision};
use crate::tasks::Background;

/// How long the finisher waits for a revision's open transfers to end before it hashes.
const TRANSFERS_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Finisher {
    reader: Arc<ChunkReader>,
    checks: Arc<OriginChecks>,
    manifests: Arc<ManifestStore>,
    background: Background,
    /// Revisions (by id) finished or being finished: each is finished once.
    seen: Mutex<HashSet<String>>,
    /// One model's digests at a time.
    permits: Semaphore,
}

impl Finisher {
    pub fn new(
        reader: Arc<ChunkReader>,
        checks: Arc<OriginChecks>,
        manifests: Arc<ManifestStore>,
        background: Background,
    ) -> Self {
        Self {
            reader,
            checks,
            manifests,
            background,
            seen: Mutex::new(HashSet::new()),
            permits: Semaphore::new(1),
        }
    }

    /// Finishes `rev` in the background unless it was finished (or is being finished)
    /// already, then calls `then` with it (the node starts the variants to precompute
    /// there). A finish that fails is tried again the next time.
    pub fn start(
        self: &Arc<Self>,
        rev: Arc<Revision>,
        then: impl FnOnce(&Arc<Revision>) + Send + 'static,
    ) {
        if !self.seen().insert(rev.id.clone()) {
            return;
        }
        let this = self.clone();
        drop(self.background.spawn(async move {
            match this.finish(&rev).await {
                Ok(()) => then(&rev),
                Err(Error::ShuttingDown) => {}
                Err(e) => {
                    tracing::warn!(model = %rev.name, "background digest failed: {e}");
                    this.seen().remove(&rev.id);
                }
            }
            Ok(())
        }));
    }

    /// Records that `rev` needs no finishing: a revision restored complete from its saved
    /// manifest.
    pub fn finished(&self, rev: &Revision) {
        self.seen().insert(rev.id.clone());
    }

    /// Lets a revision whose record was discarded be finished again.
    pub fn forget(&self, rev: &Revision) {
        self.seen().remove(&rev.id);
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.seen.lock().expect("finisher lock poisoned")
    }

    async fn finish(&self, rev: &Arc<Revision>) -> Result<()> {
        // The SHA-256 pass waits for the transfers that completed the model to end, so
        // that it does not take their cores at the end of a cold fetch.
        rev.transfers_ended(TRANSFERS_GRACE).await;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        for file in 0..rev.files.len() {
            self.check(rev, file).await?;
            self.reader.file_sha256(rev, file).await?;
        }
        let missing = self.reader.originals().persist(&rev.chunk_keys()).await;
        if missing > 0 {
            tracing::warn!(model = %rev.name, missing, "chunks did not reach the disk tier");
        }
        self.manifests.save(rev)
    }

    async fn check(&self, rev: &Arc<Revision>, file: usize) -> Result<()> {
        match self.checks.check(rev, file).await {
            Ok(check) => self
                .checks
                .mismatch_error(rev, file, &check)
                .map_or(Ok(()), Err),
            Err(detail) => Err(Error::Origin {
                origin: self.reader.origin().display().to_owned(),
                detail: format!(
                    "checking {}/{} against its checksum: {detail}",
                    rev.name, rev.files[file].origin.path
                ),
            }),
        }
    }
}
