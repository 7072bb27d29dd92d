//! Prefetch: one model variant from a node into a verified local directory.
//!
//! The node's stream (manifest, then chunks in order) is checked message by message:
//! each chunk's BLAKE3 is computed on the blocking pool, several chunks at once, so
//! verification uses every core while bytes arrive; verified chunks go in order to a
//! writer thread, which records how far it got so an interrupted prefetch resumes there.
//! Only a complete revision is published, by swapping a symlink.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use modelcache_proto::v1::{self, FetchRequest, ResolveRequest, fetch_response};
use modelcache_proto::{Reference, check_file_paths};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{AgentError, Result};
use crate::layout::{Layout, LocalFile, LocalManifest, write_atomic};
use crate::node::NodeClient;
use crate::progress::Progress;

/// Chunks being hashed at once; a little more than the cores so none waits for bytes.
fn hash_pipeline_depth() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2)
}

/// Verified chunks queued for the writer.
const WRITE_QUEUE: usize = 8;
/// The writer saves its progress after this many bytes or this much time, whichever
/// comes first, and at the end of every file.
const PROGRESS_EVERY_BYTES: u64 = 64 * 1024 * 1024;
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// How far a download got: every file before `file` is complete, `file` has `offset`
/// verified bytes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct DownloadState {
    revision: String,
    file: usize,
    offset: u64,
    chunk_blake3: Vec<Vec<String>>,
}

/// What a prefetch did.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub revision: String,
    pub total_size: u64,
    /// Bytes received from the node in this run (0 when already present).
    pub transferred: u64,
}

pub async fn prefetch(
    client: &mut NodeClient,
    layout: &Layout,
    reference: &Reference,
    progress: &Progress,
) -> Result<Fetched> {
    progress.waiting(reference);
    let resolved = client
        .resolve(ResolveRequest {
            reference: reference.to_string(),
        })
        .await;
    // The bars take over from the spinner; clear it whatever comes next.
    progress.finish();
    let manifest = resolved?
        .into_inner()
        .manifest
        .ok_or_else(|| protocol(reference, "Resolve returned no manifest"))?;
    check_manifest(reference, &manifest)?;
    let rev = manifest.revision.clone();

    if let Some(local) = layout.current(reference)
        && local.revision == rev
        && layout.is_complete(reference, &local)
    {
        return Ok(Fetched {
            path: layout.link(reference),
            revision: rev,
            total_size: manifest.total_size,
            transferred: 0,
        });
    }
    let store = layout.store(reference);
    std::fs::create_dir_all(&store)
        .map_err(|e| AgentError::io(format!("creating {}", store.display()), e))?;
    if let Ok(local) = layout.read_manifest(reference, &rev)
        && layout.is_complete(reference, &local)
    {
        let path = layout.publish(reference, &rev)?;
        return Ok(Fetched {
            path,
            revision: rev,
            total_size: manifest.total_size,
            transferred: 0,
        });
    }

    let previous = layout.current(reference).map(|m| m.revision);
    let keep: Vec<&str> = [Some(rev.as_str()), previous.as_deref()]
        .into_iter()
        .flatten()
        .collect();
    layout.prune(reference, &keep);

    let partial = layout.partial_dir(reference, &rev);
    let progress_path = layout.progress_file(reference, &rev);
    let state = load_progress(&progress_path, &manifest).unwrap_or_else(|| {
        let _ = std::fs::remove_dir_all(&partial);
        DownloadState {
            revision: rev.clone(),
            file: 0,
            offset: 0,
            chunk_blake3: vec![Vec::new(); manifest.files.len()],
        }
    });
    std::fs::create_dir_all(&partial)
        .map_err(|e| AgentError::io(format!("creating {}", partial.display()), e))?;

    let done_bytes: u64 = manifest.files[..state.file.min(manifest.files.len())]
        .iter()
        .map(|f| f.size)
        .sum::<u64>()
        + state.offset;
    progress.start(reference, manifest.total_size, done_bytes);
    let transferred = match receive(client, layout, reference, &manifest, state, progress).await {
        Ok(n) => n,
        Err(e) => {
            progress.abandon();
            if let AgentError::Io { source, .. } = &e
                && source.raw_os_error() == Some(28)
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

    let local = finalize(layout, reference, &manifest, &partial, &progress_path)?;
    let path = layout.publish(reference, &rev)?;
    layout.prune(reference, &keep);
    Ok(Fetched {
        path,
        revision: rev,
        total_size: local.total_size(),
        transferred,
    })
}

fn protocol(reference: &Reference, detail: impl Into<String>) -> AgentError {
    AgentError::Protocol {
        reference: reference.to_string(),
        detail: detail.into(),
    }
}

/// Rejects a manifest whose paths or sizes cannot be trusted, before anything is written.
fn check_manifest(reference: &Reference, m: &v1::Manifest) -> Result<()> {
    check_file_paths(m.files.iter().map(|f| f.path.as_str())).map_err(|source| {
        AgentError::UnsafePath {
            reference: reference.to_string(),
            source,
        }
    })?;
    if m.chunk_size == 0 || m.chunk_size > 4 * 1024 * 1024 {
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

fn load_progress(path: &Path, m: &v1::Manifest) -> Option<DownloadState> {
    let state: DownloadState = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    (state.revision == m.revision
        && state.chunk_blake3.len() == m.files.len()
        && state.file <= m.files.len()
        && state.offset.is_multiple_of(m.chunk_size))
    .then_some(state)
}

/// The position after `(file, offset)` has been consumed, skipping empty files.
fn normalize(m: &v1::Manifest, mut file: usize, offset: u64) -> (usize, u64) {
    let mut offset = offset;
    while file < m.files.len() && offset >= m.files[file].size {
        file += 1;
        offset = 0;
    }
    (file, offset)
}

enum WriteOp {
    Chunk {
        file: usize,
        offset: u64,
        data: Bytes,
        digest: [u8; 32],
    },
}

async fn receive(
    client: &mut NodeClient,
    layout: &Layout,
    reference: &Reference,
    m: &v1::Manifest,
    state: DownloadState,
    progress: &Progress,
) -> Result<u64> {
    let (mut file, mut offset) = normalize(m, state.file, state.offset);
    if file == m.files.len() {
        return Ok(0);
    }
    let request = FetchRequest {
        reference: reference.to_string(),
        file: m.files[file].path.clone(),
        offset,
        revision: m.revision.clone(),
    };
    let partial = layout.partial_dir(reference, &m.revision);
    let progress_path = layout.progress_file(reference, &m.revision);
    let (tx, rx) = mpsc::channel(WRITE_QUEUE);
    let writer = {
        let files: Vec<(String, u64)> = m.files.iter().map(|f| (f.path.clone(), f.size)).collect();
        let chunk_size = m.chunk_size;
        let state = DownloadState {
            file,
            offset,
            ..state
        };
        tokio::task::spawn_blocking(move || {
            write_loop(rx, &partial, &progress_path, files, chunk_size, state)
        })
    };

    let mut stream = client.fetch(request).await?.into_inner();
    let first = stream
        .message()
        .await?
        .ok_or_else(|| protocol(reference, "stream ended before the manifest"))?;
    match first.item {
        Some(fetch_response::Item::Manifest(fm)) if fm.revision == m.revision => {}
        Some(fetch_response::Item::Manifest(fm)) => {
            return Err(AgentError::Node {
                code: tonic::Code::Aborted,
                message: format!(
                    "{reference} changed to revision {} during the fetch; run again",
                    fm.revision
                ),
            });
        }
        _ => return Err(protocol(reference, "first message is not the manifest")),
    }

    let mut verified = stream
        .map(|item| async move {
            let chunk = match item?.item {
                Some(fetch_response::Item::Chunk(c)) => c,
                _ => return Err(protocol(reference, "expected a chunk after the manifest")),
            };
            tokio::task::spawn_blocking(move || {
                let digest = *blake3::hash(&chunk.data).as_bytes();
                (chunk, digest)
            })
            .await
            .map_err(|e| AgentError::io("hashing", std::io::Error::other(e)))
        })
        .buffered(hash_pipeline_depth());

    let mut transferred = 0u64;
    while let Some(result) = verified.next().await {
        let (chunk, digest) = result?;
        let entry = &m.files[file];
        let expected_len = (entry.size - offset).min(m.chunk_size);
        if chunk.file_index as usize != file
            || chunk.offset != offset
            || chunk.data.len() as u64 != expected_len
        {
            return Err(protocol(
                reference,
                format!(
                    "expected {expected_len} bytes of {} at {offset}, got {} bytes of file #{} at {}",
                    entry.path,
                    chunk.data.len(),
                    chunk.file_index,
                    chunk.offset
                ),
            ));
        }
        let index = (offset / m.chunk_size) as usize;
        let announced = entry.chunk_blake3.get(index).map(Vec::as_slice);
        if chunk.blake3 != digest || announced.is_some_and(|d| d != digest) {
            return Err(AgentError::Integrity {
                reference: reference.to_string(),
                path: entry.path.clone(),
                offset,
            });
        }
        let len = chunk.data.len() as u64;
        let op = WriteOp::Chunk {
            file,
            offset,
            data: chunk.data,
            digest,
        };
        if tx.send(op).await.is_err() {
            break; // the writer stopped; its error is reported below
        }
        transferred += len;
        progress.inc(len);
        (file, offset) = normalize(m, file, offset + len);
        if file == m.files.len() {
            break;
        }
    }
    drop(tx);
    writer
        .await
        .map_err(|e| AgentError::io("writer", std::io::Error::other(e)))??;
    if file != m.files.len() {
        return Err(AgentError::Node {
            code: tonic::Code::Unavailable,
            message: format!(
                "the node's stream for {reference} ended early, in {} at byte {offset}; run again to resume",
                m.files[file].path
            ),
        });
    }
    Ok(transferred)
}

/// Writes verified chunks in order and records progress; runs on a blocking thread.
fn write_loop(
    mut rx: mpsc::Receiver<WriteOp>,
    dir: &Path,
    progress_path: &Path,
    files: Vec<(String, u64)>,
    chunk_size: u64,
    mut state: DownloadState,
) -> Result<()> {
    let (resume_file, resume_offset) = (state.file, state.offset);
    if let Some(list) = state.chunk_blake3.get_mut(resume_file) {
        list.truncate((resume_offset / chunk_size) as usize);
    }
    for list in state.chunk_blake3.iter_mut().skip(resume_file + 1) {
        list.clear();
    }
    let mut saved_at = 0u64;
    let mut saved_when = std::time::Instant::now();
    let mut written = 0u64;
    let mut open: Option<(usize, File)> = None;
    while let Some(WriteOp::Chunk {
        file,
        offset,
        data,
        digest,
    }) = rx.blocking_recv()
    {
        let path = dir.join(&files[file].0);
        if open.as_ref().is_none_or(|(f, _)| *f != file) {
            let resuming = file == resume_file && resume_offset > 0;
            open = Some((file, open_for_write(&path, resume_offset, resuming)?));
        }
        let (_, handle) = open.as_mut().expect("opened above");
        handle
            .seek(SeekFrom::Start(offset))
            .and_then(|_| handle.write_all(&data))
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))?;
        state.chunk_blake3[file].push(hex::encode(digest));
        written += data.len() as u64;
        (state.file, state.offset) = (file, offset + data.len() as u64);
        if state.offset == files[file].1 {
            state.file += 1;
            state.offset = 0;
        }
        let due =
            written - saved_at >= PROGRESS_EVERY_BYTES || saved_when.elapsed() >= PROGRESS_EVERY;
        if due || state.offset == 0 {
            write_atomic(
                progress_path,
                &serde_json::to_vec(&state).expect("progress serializes"),
            )?;
            saved_at = written;
            saved_when = std::time::Instant::now();
        }
    }
    write_atomic(
        progress_path,
        &serde_json::to_vec(&state).expect("progress serializes"),
    )
}

/// Opens a file for writing from `offset`, creating its folders; cuts it at `offset` when
/// resuming so a half-written chunk from an interrupted run is rewritten.
fn open_for_write(path: &Path, offset: u64, resuming: bool) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| AgentError::io(format!("creating {}", parent.display()), e))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(!resuming)
        .open(path)
        .map_err(|e| AgentError::io(format!("opening {}", path.display()), e))?;
    if resuming {
        file.set_len(offset)
            .map_err(|e| AgentError::io(format!("truncating {}", path.display()), e))?;
    }
    Ok(file)
}

/// Creates empty files, checks every size, writes the manifest and moves the partial
/// directory into place.
fn finalize(
    layout: &Layout,
    reference: &Reference,
    m: &v1::Manifest,
    partial: &Path,
    progress_path: &Path,
) -> Result<LocalManifest> {
    let state: DownloadState = std::fs::read(progress_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut files = Vec::with_capacity(m.files.len());
    for (i, f) in m.files.iter().enumerate() {
        let path = partial.join(&f.path);
        if f.size == 0 {
            open_for_write(&path, 0, false)?;
        }
        let len = std::fs::symlink_metadata(&path)
            .map(|md| md.len())
            .unwrap_or(u64::MAX);
        let digests = state.chunk_blake3.get(i).cloned().unwrap_or_default();
        if len != f.size || digests.len() as u64 != f.size.div_ceil(m.chunk_size) {
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
    let local = LocalManifest {
        name: m.name.clone(),
        variant: m.variant.clone(),
        revision: m.revision.clone(),
        chunk_size: m.chunk_size,
        files,
    };
    layout.write_manifest(reference, &local)?;
    let target = layout.revision_dir(reference, &m.revision);
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(partial, &target)
        .map_err(|e| AgentError::io(format!("moving {} into place", partial.display()), e))?;
    let _ = std::fs::remove_file(progress_path);
    Ok(local)
}
