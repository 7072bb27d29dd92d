//! How far a download got, saved beside the partial directory so that an interrupted
//! prefetch resumes there: every file before `file` is complete, `file` has `offset`
//! verified bytes, and the digests of the chunks written so far; with a node that sends
//! origin checks, every file before `checked` also passed its check.

use std::path::Path;

use modelcache_proto::v1;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layout::write_atomic;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct DownloadState {
    pub revision: String,
    pub file: usize,
    pub offset: u64,
    pub chunk_blake3: Vec<Vec<String>>,
    /// Files before this one passed their origin check; absent when the node sent none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<usize>,
}

impl DownloadState {
    /// Nothing downloaded yet of `m`.
    pub fn fresh(m: &v1::Manifest) -> Self {
        Self {
            revision: m.revision.clone(),
            file: 0,
            offset: 0,
            chunk_blake3: vec![Vec::new(); m.files.len()],
            checked: None,
        }
    }

    /// Where to resume: where the bytes stop, or, when origin checks are recorded, at the
    /// first file whose check did not arrive (a file complete but unchecked is fetched
    /// again: it is published only after its check).
    pub fn resume_at(&self) -> (usize, u64) {
        match self.checked {
            Some(checked) if checked < self.file => (checked, 0),
            _ => (self.file, self.offset),
        }
    }

    /// Forgets file `file` and everything after it: they are fetched again.
    pub fn redo_from(&mut self, file: usize) {
        self.file = file;
        self.offset = 0;
        for list in self.chunk_blake3.iter_mut().skip(file) {
            list.clear();
        }
        self.checked = Some(file.min(self.checked.unwrap_or(file)));
    }

    /// The saved state at `path`, if it belongs to `m` and makes sense for it.
    pub fn load(path: &Path, m: &v1::Manifest) -> Option<Self> {
        let state: Self = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        (state.revision == m.revision
            && state.chunk_blake3.len() == m.files.len()
            && state.file <= m.files.len()
            && state.offset.is_multiple_of(m.chunk_size))
        .then_some(state)
    }

    /// The saved state at `path`, whatever it is (for the digests of a finished download).
    pub fn load_any(path: &Path) -> Self {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(
            path,
            &serde_json::to_vec(self).expect("progress serializes"),
        )
    }

    /// Bytes of `m` already downloaded.
    pub fn done_bytes(&self, m: &v1::Manifest) -> u64 {
        let whole: u64 = m.files[..self.file.min(m.files.len())]
            .iter()
            .map(|f| f.size)
            .sum();
        whole + self.offset
    }
}

/// The position after `(file, offset)` has been consumed, skipping empty files.
pub(super) fn normalize(m: &v1::Manifest, mut file: usize, mut offset: u64) -> (usize, u64) {
    while file < m.files.len() && offset >= m.files[file].size {
        file += 1;
        offset = 0;
    }
    (file, offset)
}
