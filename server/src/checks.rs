//! Origin checks: each file of an original, once per revision, compared with the checksum
//! its origin publishes (`checksum`), before the revision counts as verified.
//!
//! The check reads the file through the tiers in order, in a task of its own, while the
//! streams that asked for it go on: on a cold fetch it follows the origin reads, mostly
//! from the memory tier. `Fetch` ends each file with the result (SPEC §4) and the finisher
//! awaits every file's before it saves the manifest. A mismatch drops the file's chunks
//! and the revision's record: the next read of the file goes to the origin again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::{FutureExt, TryStreamExt};
use tokio::sync::Semaphore;

use crate::catalog::Catalog;
use crate::checksum::{self, CheckOutcome, ChecksumPolicy, Hasher, OriginCheck};
use crate::chunks::ChunkReader;
use crate::error::Error;
use crate::manifest::Revision;
use crate::tasks::Background;

/// Checksums of file versions remembered after a mismatch, at most.
const REMEMBERED: usize = 1024;

pub struct OriginChecks {
    reader: Arc<ChunkReader>,
    catalog: Arc<Catalog>,
    background: Background,
    policy: ChecksumPolicy,
    /// Checks that read at once.
    permits: Arc<Semaphore>,
    /// What a file version's bytes hashed to when they disagreed with the origin: the
    /// same value from a second read means the bytes are what the origin holds and its
    /// checksum does not describe them (an ETag that is not an MD5 after all).
    disagreed: Mutex<HashMap<String, String>>,
}

impl OriginChecks {
    pub fn new(
        reader: Arc<ChunkReader>,
        catalog: Arc<Catalog>,
        background: Background,
        policy: ChecksumPolicy,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            reader,
            catalog,
            background,
            policy,
            permits: Arc::new(Semaphore::new(cores.max(2))),
            disagreed: Mutex::new(HashMap::new()),
        }
    }

    /// The origin check of file `file` of `rev`: settled, awaited, or started here. `Err`
    /// when it could not be made this time (the origin did not answer); it is tried
    /// again by the next party that asks.
    pub async fn check(self: &Arc<Self>, rev: &Arc<Revision>, file: usize) -> CheckOutcome {
        if let Some(check) = self.not_applicable(rev, file) {
            return Ok(check);
        }
        let cell = &rev.files[file].origin_check;
        cell.get_or_start(|| self.computation(rev, file)).await
    }

    /// Starts the origin check of file `file` of `rev` in the background, if it applies
    /// and is not settled or running: a transfer does so at the file's first chunk, so
    /// that the check follows the bytes and is ready soon after the last one.
    pub fn begin(self: &Arc<Self>, rev: &Arc<Revision>, file: usize) {
        if self.not_applicable(rev, file).is_none() {
            let cell = &rev.files[file].origin_check;
            cell.begin(|| self.computation(rev, file));
        }
    }

    /// The result for a file no origin checksum can apply to.
    fn not_applicable(&self, rev: &Revision, file: usize) -> Option<OriginCheck> {
        let reason = if !rev.is_original() || rev.files[file].built {
            "part of a variant built by this node; the original's files are checked when \
             read from the origin"
        } else if self.policy == ChecksumPolicy::Off {
            "origin checks are off on this node (--origin-checksums off)"
        } else if self.reader.origin().is_local() {
            "a local-directory origin publishes no checksums"
        } else {
            return None;
        };
        Some(OriginCheck::Unchecked {
            reason: reason.into(),
        })
    }

    /// The check's computation, as a task of its own.
    fn computation(
        self: &Arc<Self>,
        rev: &Arc<Revision>,
        file: usize,
    ) -> futures::future::BoxFuture<'static, CheckOutcome> {
        let (this, rev) = (self.clone(), rev.clone());
        let task = self
            .background
            .spawn(async move { Ok(this.compute(&rev, file).await) });
        async move {
            match task.await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("the check stopped: {e}")),
            }
        }
        .boxed()
    }

    /// The error that ends a transfer after `check`, if it is a mismatch.
    pub fn mismatch_error(
        &self,
        rev: &Revision,
        file: usize,
        check: &OriginCheck,
    ) -> Option<Error> {
        let OriginCheck::Mismatch {
            algorithm,
            expected,
            found,
        } = check
        else {
            return None;
        };
        Some(Error::OriginChecksumMismatch {
            origin: self.reader.origin().display().to_owned(),
            name: rev.name.clone(),
            path: rev.files[file].origin.path.clone(),
            detail: checksum::mismatch(algorithm.name(), expected, found),
        })
    }

    async fn compute(&self, rev: &Arc<Revision>, file: usize) -> CheckOutcome {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| "the node is shutting down".to_owned())?;
        let record = &rev.files[file];
        let published = self
            .reader
            .origin()
            .published_checksum(
                &rev.name,
                &record.origin,
                self.policy == ChecksumPolicy::All,
            )
            .await
            .map_err(|e| e.to_string())?;
        let Some(published) = published else {
            return Ok(OriginCheck::Unchecked {
                reason: self.nothing_published(),
            });
        };
        let algorithm = published.algorithm;
        let mut hasher = Hasher::new(algorithm);
        let mut chunks = self.reader.file_chunks(rev, file);
        while let Some(data) = chunks.try_next().await.map_err(|e| e.to_string())? {
            hasher = tokio::task::spawn_blocking(move || {
                hasher.update(&data);
                hasher
            })
            .await
            .map_err(|e| format!("hashing: {e}"))?;
        }
        let found = hasher.finish(algorithm);
        if found == published.value {
            if algorithm == checksum::Algorithm::Sha256 {
                let _ = record.sha256.set(checksum::readable(&published));
            }
            return Ok(OriginCheck::Verified { algorithm });
        }
        let computed = checksum::readable(&checksum::Published {
            algorithm,
            value: found.clone(),
        });
        let expected = checksum::readable(&published);
        let version = format!(
            "{}\0{}\0{}",
            rev.name, record.origin.path, record.origin.etag
        );
        if self.seen_before(version, &found) {
            tracing::warn!(
                model = %rev.name, path = %record.origin.path, algorithm = algorithm.name(),
                %expected, %computed,
                "two reads of this file from the origin agree with each other but not with \
                 the origin's checksum; serving it unchecked"
            );
            return Ok(OriginCheck::Unchecked {
                reason: format!(
                    "two reads from the origin agree with each other but not with its {} \
                     ({expected}); the origin's checksum does not describe these bytes",
                    algorithm.name()
                ),
            });
        }
        tracing::warn!(
            model = %rev.name, path = %record.origin.path, algorithm = algorithm.name(),
            %expected, %computed,
            "the bytes read differ from the origin's checksum; dropping them to read the file again"
        );
        for key in &record.keys {
            self.reader.originals().remove(key);
        }
        self.catalog.discard(rev);
        Ok(OriginCheck::Mismatch {
            algorithm,
            expected,
            found: computed,
        })
    }

    /// Records `found` for `version`; whether it was recorded already.
    fn seen_before(&self, version: String, found: &str) -> bool {
        let mut disagreed = self.disagreed.lock().expect("checks lock poisoned");
        if disagreed.get(&version).is_some_and(|f| f == found) {
            return true;
        }
        if disagreed.len() >= REMEMBERED {
            disagreed.clear();
        }
        disagreed.insert(version, found.to_owned());
        false
    }

    fn nothing_published(&self) -> String {
        if self.policy == ChecksumPolicy::Checksums {
            "the origin publishes no full-object checksum for it (MD5 ETags are not used: \
             --origin-checksums checksums)"
                .into()
        } else {
            "the origin publishes no checksum for it (a multipart or encrypted upload \
             without a full-object checksum)"
                .into()
        }
    }
}

/// What a transfer sends after its manifest: chunks, and after each file's last chunk,
/// the file's origin check (SPEC §4).
pub enum Sent<T> {
    Chunk(T),
    Checked { file: usize, check: OriginCheck },
}

type CheckFuture = futures::future::BoxFuture<'static, OriginCheck>;

/// A piece of a file in a transfer: which file, and where in it the piece ends.
pub trait FilePiece {
    fn file(&self) -> usize;
    fn end(&self) -> u64;
}

/// `chunks` (in file order, from file `first` on) with each file's origin check sent after
/// its last chunk. A check starts, as a task of its own, when its file's first chunk
/// passes, so that it follows the transfer instead of waiting for it; it is awaited once
/// the file is complete, while later files' chunks go on. After a mismatch the stream ends
/// with `mismatch`'s error.
pub struct WithChecks<S> {
    chunks: Option<S>,
    rev: Arc<Revision>,
    /// Called once a mismatch is seen (the node forgets that it finished the revision).
    on_mismatch: Box<dyn Fn() + Send>,
    checks: Arc<OriginChecks>,
    /// Checks due, in file order.
    due: futures::stream::FuturesOrdered<futures::future::BoxFuture<'static, (usize, OriginCheck)>>,
    /// Files before this one are complete (their checks are due or sent).
    next_file: usize,
    /// The transfer ends before this file.
    end_file: usize,
    /// The error that ends the stream after a mismatch was sent.
    failed: Option<crate::error::Error>,
    done: bool,
}

impl<S> WithChecks<S> {
    pub fn new(
        chunks: S,
        rev: Arc<Revision>,
        files: std::ops::Range<usize>,
        checks: Arc<OriginChecks>,
        on_mismatch: Box<dyn Fn() + Send>,
    ) -> Self {
        Self {
            chunks: Some(chunks),
            rev,
            on_mismatch,
            checks,
            due: futures::stream::FuturesOrdered::new(),
            next_file: files.start,
            end_file: files.end,
            failed: None,
            done: false,
        }
    }

    fn check_future(&self, file: usize) -> CheckFuture {
        let checks = self.checks.clone();
        let rev = self.rev.clone();
        async move {
            checks
                .check(&rev, file)
                .await
                .unwrap_or_else(|reason| OriginCheck::Unchecked {
                    reason: format!("the origin check could not be made this time: {reason}"),
                })
        }
        .boxed()
    }

    /// Files before `end` are complete: their checks are due.
    fn complete_until(&mut self, end: usize) {
        while self.next_file < end {
            let file = self.next_file;
            let check = self.check_future(file);
            self.due.push_back(check.map(move |c| (file, c)).boxed());
            self.next_file += 1;
        }
    }
}

impl<S, T> futures::Stream for WithChecks<S>
where
    S: futures::Stream<Item = crate::error::Result<T>> + Unpin,
    T: FilePiece,
{
    type Item = crate::error::Result<Sent<T>>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use futures::StreamExt;
        use std::task::Poll;
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(error) = this.failed.take() {
            this.done = true;
            return Poll::Ready(Some(Err(error)));
        }
        loop {
            if let Poll::Ready(Some((file, check))) = this.due.poll_next_unpin(cx) {
                if let Some(error) = this.checks.mismatch_error(&this.rev, file, &check) {
                    this.failed = Some(error);
                    this.chunks = None;
                    (this.on_mismatch)();
                }
                return Poll::Ready(Some(Ok(Sent::Checked { file, check })));
            }
            let Some(chunks) = this.chunks.as_mut() else {
                if this.due.is_empty() {
                    this.done = true;
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            };
            match chunks.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let file = chunk.file();
                    let last = chunk.end() >= this.rev.files[file].origin.size;
                    this.complete_until(file);
                    this.checks.begin(&this.rev, file);
                    if last {
                        this.complete_until(file + 1);
                    }
                    return Poll::Ready(Some(Ok(Sent::Chunk(chunk))));
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    this.chunks = None;
                    this.complete_until(this.end_file);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
