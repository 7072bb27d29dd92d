//! Prefetch: one model variant from a node into a verified local directory.
//!
//! The node's stream (manifest, then chunks in order) is checked message by message
//! (`stream`); verified chunks go in order to a writer thread (`writer`), which records
//! how far it got (`resume`) so an interrupted prefetch resumes there. Only a complete
//! revision is published, by swapping a symlink (`Layout::install`, `Layout::publish`).

mod repair;
mod resume;
mod reuse;
mod stream;
mod writer;

use std::path::{Path, PathBuf};

use futures::StreamExt;
use modelcache_proto::v1;
use modelcache_proto::{Reference, check_file_paths};
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};
use crate::layout::{Layout, LocalFile, LocalManifest};
use crate::node::NodeClient;
use crate::progress::Progress;
use resume::{DownloadState, normalize};
use stream::{Position, Received};
use writer::{Target, Write};

/// Verified chunks queued for the writer.
const WRITE_QUEUE: usize = 8;

/// What a prefetch did.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub revision: String,
    pub total_size: u64,
    /// Bytes received from the node in this run (0 when already present).
    pub transferred: u64,
    /// No node answered: this is the local copy, whose revision could not be checked.
    pub offline: bool,
}

/// The node a transfer talks to.
pub struct Connection<'a> {
    pub client: &'a mut NodeClient,
    /// Its address, for messages.
    pub node: &'a str,
    /// How long a stream may send nothing before the attempt ends (`AgentError::Stalled`).
    pub idle_timeout: std::time::Duration,
}

pub async fn prefetch(
    conn: Connection<'_>,
    layout: &Layout,
    reference: &Reference,
    progress: &Progress,
) -> Result<Fetched> {
    let Connection {
        client,
        node,
        idle_timeout,
    } = conn;
    let manifest = resolve(client, reference, progress).await?;
    // Refuse a newer agent's directory before anything is written (recorded once a
    // model landed: a failed prefetch leaves nothing behind).
    layout.check_format(false)?;
    // One fetch of a model into this directory at a time, across processes: the others
    // wait here and then find it present. Taken once the node knows the model, so a
    // reference that fails leaves nothing behind.
    let _lock = {
        let layout = layout.clone();
        let reference = reference.clone();
        tokio::task::spawn_blocking(move || layout.lock(&reference))
            .await
            .map_err(|e| {
                AgentError::io("waiting for the model's lock", std::io::Error::other(e))
            })??
    };
    let rev = manifest.revision.clone();
    if let Some(mut fetched) = present(layout, reference, &manifest)? {
        // A check found bad chunks in it: fetch those alone.
        if let Some(local) = layout.current(reference).filter(|l| l.revision == rev)
            && let Some(bad) = layout.damaged(reference, &rev)
        {
            let conn = Connection {
                client,
                node,
                idle_timeout,
            };
            fetched.transferred =
                repair::repair(conn, layout, reference, &local, &bad, progress).await?;
        }
        return Ok(fetched);
    }

    let previous_manifest = layout.current(reference);
    let previous = previous_manifest.as_ref().map(|m| m.revision.clone());
    let keep: Vec<&str> = [Some(rev.as_str()), previous.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    layout.prune(reference, &keep);

    let partial = layout.partial_dir(reference, &rev);
    let progress_path = layout.progress_file(reference, &rev);
    let state = DownloadState::load(&progress_path, &manifest).unwrap_or_else(|| {
        let _ = std::fs::remove_dir_all(&partial);
        DownloadState::fresh(&manifest)
    });
    std::fs::create_dir_all(&partial)
        .map_err(|e| AgentError::io(format!("creating {}", partial.display()), e))?;
    let reused = reuse::link_unchanged(
        layout,
        reference,
        &manifest,
        previous_manifest.as_ref(),
        &partial,
        &state,
    );

    let done = state.done_bytes(&manifest);
    if done > 0 {
        tracing::info!(%reference, revision = %rev, bytes = done, "resuming an interrupted download");
    }
    progress.start(reference, manifest.total_size, done);
    let conn = Connection {
        client,
        node,
        idle_timeout,
    };
    let transferred =
        match receive(conn, layout, reference, &manifest, state, &reused, progress).await {
            Ok(n) => n,
            Err(e) => {
                progress.abandon();
                // ENOSPC: nothing of the partial download is worth keeping.
                if let AgentError::Io { source, .. } = &e
                    && source.kind() == std::io::ErrorKind::StorageFull
                {
                    let _ = std::fs::remove_dir_all(&partial);
                    let _ = std::fs::remove_file(&progress_path);
                    return Err(AgentError::NoSpace {
                        dir: layout.root().display().to_string(),
                        context: format!("writing {reference}"),
                    });
                }
                return Err(e);
            }
        };
    progress.finish();

    let local = local_manifest(reference, &manifest, &progress_path)?;
    layout.install(reference, &local, &partial)?;
    let _ = std::fs::remove_file(&progress_path);
    let path = layout.publish(reference, &rev)?;
    layout.prune(reference, &keep);
    tracing::info!(%reference, revision = %rev, bytes = transferred, path = %path.display(), "published");
    Ok(Fetched {
        path,
        revision: rev,
        total_size: local.total_size(),
        transferred,
        offline: false,
    })
}

/// The node's manifest of `reference`, checked before anything is written.
async fn resolve(
    client: &mut NodeClient,
    reference: &Reference,
    progress: &Progress,
) -> Result<v1::Manifest> {
    progress.waiting(reference);
    let resolved = crate::node::resolve(client, reference).await;
    // The bars take over from the spinner; clear it whatever comes next.
    progress.finish();
    let manifest = resolved?;
    check_manifest(reference, &manifest)?;
    tracing::info!(
        %reference, revision = %manifest.revision, bytes = manifest.total_size,
        files = manifest.files.len(), "resolved"
    );
    Ok(manifest)
}

/// The local copy at the manifest's revision, if one is complete (sizes checked, no
/// re-hash): published already, or downloaded and published now.
fn present(layout: &Layout, reference: &Reference, m: &v1::Manifest) -> Result<Option<Fetched>> {
    let rev = &m.revision;
    let fetched = |path| Fetched {
        path,
        revision: rev.clone(),
        total_size: m.total_size,
        transferred: 0,
        offline: false,
    };
    if let Some(local) = layout.complete_current(reference)
        && local.revision == *rev
    {
        tracing::info!(%reference, revision = %rev, "already present; nothing to fetch");
        return Ok(Some(fetched(layout.link(reference))));
    }
    let store = layout.store(reference);
    std::fs::create_dir_all(&store)
        .map_err(|e| AgentError::io(format!("creating {}", store.display()), e))?;
    if let Ok(local) = layout.read_manifest(reference, rev)
        && layout.is_complete(reference, &local)
    {
        return Ok(Some(fetched(layout.publish(reference, rev)?)));
    }
    Ok(None)
}

pub(super) fn protocol(reference: &Reference, detail: impl Into<String>) -> AgentError {
    AgentError::Protocol {
        reference: reference.to_string(),
        detail: detail.into(),
    }
}

/// Rejects a manifest whose paths or sizes cannot be trusted, before anything is written.
pub fn check_manifest(reference: &Reference, m: &v1::Manifest) -> Result<()> {
    check_file_paths(m.files.iter().map(|f| f.path.as_str())).map_err(|source| {
        AgentError::UnsafePath {
            reference: reference.to_string(),
            source,
        }
    })?;
    if m.chunk_size == 0 || m.chunk_size > modelcache_proto::wire::MAX_MESSAGE_SIZE as u64 {
        return Err(protocol(
            reference,
            format!("chunk size {} out of range", m.chunk_size),
        ));
    }
    if m.revision.is_empty() || !m.revision.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(protocol(
            reference,
            format!("revision {:?} is not a plain token", m.revision),
        ));
    }
    if m.name != reference.name() || m.variant != reference.variant() {
        return Err(protocol(
            reference,
            format!("manifest is for {}:{}", m.name, m.variant),
        ));
    }
    for f in &m.files {
        let chunks = f.size.div_ceil(m.chunk_size) as usize;
        if !f.chunk_blake3.is_empty()
            && (f.chunk_blake3.len() != chunks || f.chunk_blake3.iter().any(|d| d.len() != 32))
        {
            return Err(protocol(
                reference,
                format!("{}: wrong chunk digests", f.path),
            ));
        }
    }
    Ok(())
}

/// Receives the rest of `m` from `state` on; returns the bytes received. Files in
/// `reused` are in place already: the node is asked for the runs of other files between
/// them (`Fetch` up to `end_file`). With a node that sends origin checks, every file's
/// check must arrive before the download counts as complete; a file that fails it is
/// forgotten and the attempt ends `Aborted`, so the next one fetches it again.
async fn receive(
    conn: Connection<'_>,
    layout: &Layout,
    reference: &Reference,
    m: &v1::Manifest,
    state: DownloadState,
    reused: &[Option<Vec<String>>],
    progress: &Progress,
) -> Result<u64> {
    let (file, offset) = state.resume_at();
    let (file, offset) = normalize(m, file, offset);
    let n = m.files.len();
    if file == n {
        return Ok(0);
    }
    let checks = m.origin_checks;
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let writer = {
        let target = Target {
            dir: layout.partial_dir(reference, &m.revision),
            progress: layout.progress_file(reference, &m.revision),
            files: m.files.iter().map(|f| (f.path.clone(), f.size)).collect(),
            chunk_size: m.chunk_size,
        };
        let state = DownloadState {
            file,
            offset,
            checked: checks.then_some(file),
            ..state
        };
        tokio::task::spawn_blocking(move || writer::write_loop(rx, target, state))
    };
    let mut at = Position { file, offset };
    // The next file whose origin check is due.
    let mut next_check = if checks { file } else { n };
    let mut transferred = 0u64;
    let mut failed = None;
    'segments: while at.file < n {
        // Files in place already go to the writer as they are.
        while at.file < n && at.offset == 0 && reused[at.file].is_some() {
            let digests = reused[at.file].clone().unwrap_or_default();
            if tx.send(Write::Reused(at.file, digests)).await.is_err() {
                break 'segments;
            }
            progress.inc(m.files[at.file].size);
            if checks {
                next_check = at.file + 1;
            }
            (at.file, at.offset) = normalize(m, at.file + 1, 0);
        }
        if at.file == n {
            break;
        }
        // The files up to the next one in place.
        let end = (at.file + 1..n).find(|&i| reused[i].is_some()).unwrap_or(n);
        let opened = stream::open(conn.client, reference, m, at, end).await?;
        let mut items = std::pin::pin!(stream::hashed(
            opened.stream,
            reference,
            conn.node,
            conn.idle_timeout
        ));
        while let Some(item) = items.next().await {
            let message = match item? {
                Received::Chunk(chunk, digest) => {
                    let verified = stream::verify(reference, m, &mut at, chunk, digest)?;
                    let n = verified.data.len() as u64;
                    transferred += n;
                    progress.inc(n);
                    progress.pace(n).await;
                    Write::Chunk(verified)
                }
                Received::Check(check) => {
                    let file = check_arrived(reference, at, next_check, &check)?;
                    next_check += 1;
                    if check.result() == v1::file_check::Result::Mismatch {
                        failed = Some(AgentError::Aborted {
                            message: format!(
                                "{} of {reference} differs from its origin's checksum at the \
                                 node ({}); the node dropped it, fetching it again",
                                m.files[file].path, check.detail
                            ),
                        });
                        Write::Redo(file)
                    } else {
                        if !check.detail.is_empty() {
                            tracing::debug!(%reference, path = %m.files[file].path, "not checked against the origin: {}", check.detail);
                        }
                        Write::Checked(file)
                    }
                }
            };
            if tx.send(message).await.is_err() || failed.is_some() {
                break 'segments; // the writer stopped; its error is reported below
            }
            if at.file >= end && (!checks || next_check >= end) {
                break;
            }
        }
        if at.file < end || (checks && next_check < end) {
            break; // ended early: reported below
        }
    }
    drop(tx);
    writer
        .await
        .map_err(|e| AgentError::io("writer", std::io::Error::other(e)))??;
    if let Some(e) = failed {
        return Err(e);
    }
    if at.file != n {
        return Err(AgentError::Unavailable {
            message: format!(
                "the node's stream for {reference} ended early, in {} at byte {}; run again to resume",
                m.files[at.file].path, at.offset
            ),
        });
    }
    if next_check != n {
        return Err(AgentError::Unavailable {
            message: format!(
                "the node's stream for {reference} ended before the origin check of {}; run \
                 again to resume",
                m.files[next_check].path
            ),
        });
    }
    Ok(transferred)
}

/// Checks that `check` is the one due next, for a file received in full; returns its file.
fn check_arrived(
    reference: &Reference,
    at: Position,
    due: usize,
    check: &v1::FileCheck,
) -> Result<usize> {
    let file = check.file_index as usize;
    if file != due || file >= at.file {
        return Err(protocol(
            reference,
            format!(
                "origin check of file #{file} out of order (due: #{due}, receiving #{})",
                at.file
            ),
        ));
    }
    Ok(file)
}

/// The local manifest of a finished download: every file's size, the chunk digests the
/// writer recorded, and the SHA-256 the node knew.
fn local_manifest(
    reference: &Reference,
    m: &v1::Manifest,
    progress_path: &Path,
) -> Result<LocalManifest> {
    let state = DownloadState::load_any(progress_path);
    let mut files = Vec::with_capacity(m.files.len());
    for (i, f) in m.files.iter().enumerate() {
        let digests = state.chunk_blake3.get(i).cloned().unwrap_or_default();
        if digests.len() as u64 != f.size.div_ceil(m.chunk_size) {
            return Err(AgentError::Corrupt {
                reference: reference.to_string(),
                detail: format!("{} is incomplete after the transfer; run again", f.path),
            });
        }
        files.push(LocalFile {
            path: f.path.clone(),
            size: f.size,
            chunk_blake3: digests,
            sha256: (!f.sha256.is_empty()).then(|| f.sha256.clone()),
        });
    }
    Ok(LocalManifest {
        name: m.name.clone(),
        variant: m.variant.clone(),
        revision: m.revision.clone(),
        chunk_size: m.chunk_size,
        files,
    })
}
