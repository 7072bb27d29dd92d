//! Re-checking local copies against their manifests: sizes and chunk BLAKE3 on all cores,
//! and on request each file's SHA-256.

use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::Digest;

use crate::layout::LocalManifest;

/// One problem found in a local copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub path: String,
    pub detail: String,
    /// The chunk that failed its BLAKE3, when the problem is one chunk (repairable by
    /// fetching that chunk alone).
    pub chunk: Option<u64>,
}

/// Checks sizes and chunk digests of every file in `dir`.
pub fn check_chunks(dir: &Path, manifest: &LocalManifest) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut work = Vec::new();
    for file in &manifest.files {
        let path = dir.join(&file.path);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() && m.len() == file.size => {
                for (i, digest) in file.chunk_blake3.iter().enumerate() {
                    work.push((file.path.clone(), i as u64, digest.clone()));
                }
            }
            Ok(m) if m.is_file() => problems.push(Problem {
                path: file.path.clone(),
                detail: format!("size is {} bytes, expected {}", m.len(), file.size),
                chunk: None,
            }),
            Ok(_) => problems.push(Problem {
                path: file.path.clone(),
                detail: "is not a regular file".into(),
                chunk: None,
            }),
            Err(e) => problems.push(Problem {
                path: file.path.clone(),
                detail: e.to_string(),
                chunk: None,
            }),
        }
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk_size = manifest.chunk_size;
    let per_thread = work.len().div_ceil(threads).max(1);
    let found: Vec<Problem> = std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    let mut bad = Vec::new();
                    let mut buf = vec![0u8; chunk_size as usize];
                    for (rel, index, expected) in part {
                        let result = chunk_blake3(&dir.join(rel), *index, chunk_size, &mut buf);
                        match result {
                            Ok(actual) if &actual == expected => {}
                            Ok(_) => bad.push(Problem {
                                path: rel.clone(),
                                chunk: Some(*index),
                                detail: format!(
                                    "chunk {index} (bytes from {}) does not match its BLAKE3",
                                    index * chunk_size
                                ),
                            }),
                            Err(e) => bad.push(Problem {
                                path: rel.clone(),
                                detail: e.to_string(),
                                chunk: None,
                            }),
                        }
                    }
                    bad
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    problems.extend(found);
    problems
}

/// Hex BLAKE3 of chunk `index` of the file at `path`, read into `buf` (at least a chunk
/// long).
pub fn chunk_blake3(
    path: &Path,
    index: u64,
    chunk_size: u64,
    buf: &mut [u8],
) -> std::io::Result<String> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = index * chunk_size;
    let n = len.saturating_sub(start).min(chunk_size) as usize;
    f.read_exact_at(&mut buf[..n], start)?;
    Ok(blake3::hash(&buf[..n]).to_hex().to_string())
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}
