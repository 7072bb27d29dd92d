//! The writer: verified chunks, in order, into the partial directory, on a blocking
//! thread, with the download's progress saved as it goes (every `PROGRESS_EVERY_BYTES` or
//! `PROGRESS_EVERY`, whichever comes first, and at the end of every file).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write as _};
use std::path::PathBuf;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::resume::DownloadState;
use crate::error::{AgentError, Result};
use crate::layout::open_for_write;

const PROGRESS_EVERY_BYTES: u64 = 64 * 1024 * 1024;
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// What the writer is told, in stream order.
pub(super) enum Write {
    Chunk(Verified),
    /// File `.0` passed its origin check (or has none to pass).
    Checked(usize),
    /// File `.0` failed its origin check: it and everything after it are fetched again.
    Redo(usize),
    /// File `.0` is in place already, linked from the previous revision, with these chunk
    /// digests (verified when that revision was fetched).
    Reused(usize, Vec<String>),
}

/// A verified chunk to write.
pub(super) struct Verified {
    pub file: usize,
    pub offset: u64,
    pub data: Bytes,
    pub digest: [u8; 32],
}

/// Where the writer writes.
pub(super) struct Target {
    /// The partial directory.
    pub dir: PathBuf,
    /// Where progress is saved.
    pub progress: PathBuf,
    /// Each file's path and size.
    pub files: Vec<(String, u64)>,
    pub chunk_size: u64,
}

/// Writes the chunks `rx` brings, from `state` on; returns when the sender is dropped.
pub(super) fn write_loop(
    mut rx: mpsc::Receiver<Write>,
    target: Target,
    mut state: DownloadState,
) -> Result<()> {
    let (resume_file, resume_offset) = (state.file, state.offset);
    if let Some(list) = state.chunk_blake3.get_mut(resume_file) {
        list.truncate((resume_offset / target.chunk_size) as usize);
    }
    for list in state.chunk_blake3.iter_mut().skip(resume_file + 1) {
        list.clear();
    }
    let mut saved_at = 0u64;
    let mut saved_when = std::time::Instant::now();
    let mut written = 0u64;
    let mut open: Option<(usize, File)> = None;
    while let Some(message) = rx.blocking_recv() {
        let chunk = match message {
            Write::Chunk(chunk) => chunk,
            Write::Checked(file) => {
                state.checked = Some(file + 1);
                continue;
            }
            Write::Reused(file, digests) => {
                state.chunk_blake3[file] = digests;
                (state.file, state.offset) = (file + 1, 0);
                if state.checked == Some(file) {
                    state.checked = Some(file + 1);
                }
                continue;
            }
            Write::Redo(file) => {
                state.redo_from(file);
                state.save(&target.progress)?;
                return Ok(());
            }
        };
        let file = chunk.file;
        let path = target.dir.join(&target.files[file].0);
        if open.as_ref().is_none_or(|(f, _)| *f != file) {
            let resuming = file == resume_file && resume_offset > 0;
            open = Some((file, open_for_write(&path, resume_offset, resuming)?));
        }
        let (_, handle) = open.as_mut().expect("opened above");
        handle
            .seek(SeekFrom::Start(chunk.offset))
            .and_then(|_| handle.write_all(&chunk.data))
            .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))?;
        state.chunk_blake3[file].push(hex::encode(chunk.digest));
        written += chunk.data.len() as u64;
        (state.file, state.offset) = (file, chunk.offset + chunk.data.len() as u64);
        if state.offset == target.files[file].1 {
            state.file += 1;
            state.offset = 0;
        }
        let due =
            written - saved_at >= PROGRESS_EVERY_BYTES || saved_when.elapsed() >= PROGRESS_EVERY;
        // Not at every file's end: the state holds every digest so far, and rewriting it
        // after each of 40,000 small files made a download quadratic.
        if due {
            state.save(&target.progress)?;
            saved_at = written;
            saved_when = std::time::Instant::now();
        }
    }
    state.save(&target.progress)
}
