//! A new revision reuses the files of the previous one whose bytes did not change (same
//! size and the same chunk digests, or the same SHA-256): they are hard-linked into the
//! partial directory (copied where links are not possible) instead of downloaded, and the
//! transfer fetches the other files only (`Fetch` up to `end_file`, SPEC §4).

use std::path::Path;

use modelcache_proto::Reference;
use modelcache_proto::v1;

use super::resume::DownloadState;
use crate::layout::{Layout, LocalFile, LocalManifest};

/// For each file of `m`, the chunk digests of the previous revision's identical file when
/// it was put in place in `partial`; `None` for the files to fetch.
pub(super) fn link_unchanged(
    layout: &Layout,
    reference: &Reference,
    m: &v1::Manifest,
    previous: Option<&LocalManifest>,
    partial: &Path,
    state: &DownloadState,
) -> Vec<Option<Vec<String>>> {
    let mut reused = vec![None; m.files.len()];
    let Some(prev) = previous.filter(|p| p.revision != m.revision && m.file_ranges) else {
        return reused;
    };
    let prev_dir = layout.revision_dir(reference, &prev.revision);
    let (from, offset) = state.resume_at();
    for (i, f) in m.files.iter().enumerate().skip(from) {
        if f.size == 0 || (i == from && offset > 0) {
            continue;
        }
        let Some(same) = prev.files.iter().find(|p| unchanged(p, f, m.chunk_size)) else {
            continue;
        };
        let source = prev_dir.join(&same.path);
        let target = partial.join(&f.path);
        if std::fs::symlink_metadata(&source).is_ok_and(|md| md.is_file() && md.len() == f.size)
            && place(&source, &target).is_ok()
        {
            reused[i] = Some(same.chunk_blake3.clone());
        }
    }
    let count = reused.iter().flatten().count();
    if count > 0 {
        tracing::info!(%reference, revision = %m.revision, files = count, from = %prev.revision, "unchanged files reused");
    }
    reused
}

/// Whether the local file `p` has the bytes the node describes as `f`.
fn unchanged(p: &LocalFile, f: &v1::FileEntry, chunk_size: u64) -> bool {
    if p.size != f.size || p.chunk_blake3.len() as u64 != f.size.div_ceil(chunk_size) {
        return false;
    }
    let same_chunks = !f.chunk_blake3.is_empty()
        && f.chunk_blake3.len() == p.chunk_blake3.len()
        && f.chunk_blake3
            .iter()
            .zip(&p.chunk_blake3)
            .all(|(a, b)| hex::encode(a) == *b);
    let same_sha = !f.sha256.is_empty() && p.sha256.as_deref() == Some(f.sha256.as_str());
    same_chunks || same_sha
}

/// Puts `source` at `target`: a hard link, else a copy.
fn place(source: &Path, target: &Path) -> std::io::Result<()> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::hard_link(source, target).or_else(|_| std::fs::copy(source, target).map(|_| ()))
}
