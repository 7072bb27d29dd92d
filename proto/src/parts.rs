//! Manifests in parts, so that every message stays under 4 MiB.
//!
//! A manifest lists every file with its digests: 200,000 files, or the 524,288 chunk
//! digests of a 1 TiB file, make tens of MiB. The node cuts the file list into parts of at
//! most `PART_BYTES` each (`cut`), at any file and, inside a file with too many digests
//! for one part, at any chunk: a piece that continues a file carries the index of its
//! first digest in `FileEntry.first_chunk`. The receiver puts the list back together
//! (`Assembly`). Both ends share this module, so they agree on the rules.

use prost::Message;

use crate::v1::{FileEntry, Manifest};

/// The manifest protocol this build speaks: 2 reads and sends manifests in parts. Clients
/// that send 0 predate it.
pub const MANIFEST_PROTOCOL: u32 = 2;

/// The protocol that adds origin checks: each file of a `Fetch` ends with a `FileCheck`.
/// Clients send this (it includes manifests in parts).
pub const CHECK_PROTOCOL: u32 = 3;

/// Encoded bytes of the file entries in one part, at most: a quarter of the 4 MiB that
/// stock clients accept, leaving room for the manifest's other fields.
pub const PART_BYTES: usize = 1 << 20;

/// Where a part starts: a file, and a chunk of it (its digests from there on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    pub file: usize,
    pub chunk: u64,
}

impl Cursor {
    /// As a `page_token`: the revision it belongs to, the file and the chunk.
    pub fn token(&self, revision: &str) -> String {
        format!("{revision}:{}:{}", self.file, self.chunk)
    }

    /// A `page_token` of `revision`; `None` if it is malformed or of another revision.
    pub fn parse(token: &str, revision: &str) -> Option<Self> {
        let rest = token.strip_prefix(revision)?.strip_prefix(':')?;
        let (file, chunk) = rest.split_once(':')?;
        Some(Self {
            file: file.parse().ok()?,
            chunk: chunk.parse().ok()?,
        })
    }
}

/// The entries of one part from `at` on, filling at most `budget` encoded bytes, and where
/// the next part starts (`None` after the last file). `entry(i)` is file i's whole entry;
/// always makes progress, whatever the budget.
pub fn cut(
    count: usize,
    mut entry: impl FnMut(usize) -> FileEntry,
    at: Cursor,
    budget: usize,
) -> (Vec<FileEntry>, Option<Cursor>) {
    let mut part = Vec::new();
    let mut used = 0;
    let mut at = at;
    while at.file < count {
        let mut e = entry(at.file);
        let digests = std::mem::take(&mut e.chunk_blake3);
        let skip = (at.chunk as usize).min(digests.len());
        let left = digests.len() - skip;
        e.first_chunk = at.chunk;
        // The entry without digests, with its key and length in the list; each digest
        // adds 34 bytes (a key, a length, 32 bytes).
        let head = e.encoded_len() + 5;
        let room = budget.saturating_sub(used + head);
        let mut fit = (room / 34).min(left);
        if part.is_empty() {
            // Always progress: at least one digest of the file, or the file itself.
            fit = fit.max(left.min(1));
        } else if used + head > budget || (fit == 0 && left > 0) {
            break;
        }
        e.chunk_blake3 = digests[skip..skip + fit].to_vec();
        used += head + fit * 34;
        part.push(e);
        if fit < left {
            let next = Cursor {
                file: at.file,
                chunk: at.chunk + fit as u64,
            };
            return (part, Some(next));
        }
        at = Cursor {
            file: at.file + 1,
            chunk: 0,
        };
    }
    let next = (at.file < count).then_some(at);
    (part, next)
}

/// Why `resolve_whole` did not return a manifest.
#[derive(Debug)]
pub enum ResolveError {
    /// The node answered with an error.
    Status(tonic::Status),
    /// The node's answers do not make one manifest.
    Protocol(String),
}

/// The node's whole manifest of `reference`, asked for a part at a time (`page_token`)
/// when it comes in parts, and put back together.
pub async fn resolve_whole<T>(
    client: &mut crate::v1::model_cache_client::ModelCacheClient<T>,
    reference: &str,
    protocol: u32,
) -> Result<Manifest, ResolveError>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut page_token = String::new();
    let mut assembly: Option<Assembly> = None;
    loop {
        let response = client
            .resolve(crate::v1::ResolveRequest {
                reference: reference.to_owned(),
                page_token: std::mem::take(&mut page_token),
                protocol,
            })
            .await
            .map_err(ResolveError::Status)?
            .into_inner();
        let manifest = response
            .manifest
            .ok_or_else(|| ResolveError::Protocol("Resolve returned no manifest".into()))?;
        match assembly.as_mut() {
            None => assembly = Some(Assembly::new(manifest).map_err(ResolveError::Protocol)?),
            Some(so_far) => so_far.add(manifest.files).map_err(ResolveError::Protocol)?,
        }
        if response.next_page_token.is_empty() {
            break;
        }
        page_token = response.next_page_token;
    }
    let assembly = assembly.expect("at least one response");
    if !assembly.is_complete() {
        return Err(ResolveError::Protocol(format!(
            "the manifest announced {} files and its parts ended early",
            assembly.file_count()
        )));
    }
    Ok(assembly.into_manifest())
}

/// A manifest put back together from its parts.
#[derive(Debug)]
pub struct Assembly {
    manifest: Manifest,
}

impl Assembly {
    /// Starts from the first message: the manifest with the first part of its files.
    pub fn new(mut first: Manifest) -> Result<Self, String> {
        let files = std::mem::take(&mut first.files);
        let mut this = Self { manifest: first };
        this.add(files)?;
        Ok(this)
    }

    /// Files the manifest announces.
    pub fn file_count(&self) -> usize {
        (self.manifest.file_count as usize).max(self.manifest.files.len())
    }

    /// Whether every file has arrived (a manifest from a node that does not send parts is
    /// complete at once).
    pub fn is_complete(&self) -> bool {
        self.manifest.files.len() >= self.manifest.file_count as usize
    }

    /// Adds the entries of the next part.
    pub fn add(&mut self, entries: Vec<FileEntry>) -> Result<(), String> {
        for e in entries {
            if e.first_chunk == 0 {
                if self.manifest.files.len() >= self.file_count() && self.manifest.file_count > 0 {
                    return Err(format!(
                        "the manifest announced {} files and sent more",
                        self.manifest.file_count
                    ));
                }
                self.manifest.files.push(e);
                continue;
            }
            let Some(last) = self.manifest.files.last_mut() else {
                return Err("a manifest part continues a file that was never sent".into());
            };
            if last.path != e.path {
                return Err(format!(
                    "a manifest part continues {} after {}",
                    e.path, last.path
                ));
            }
            if last.chunk_blake3.len() as u64 == e.first_chunk {
                last.chunk_blake3.extend(e.chunk_blake3);
            } else {
                // The digests became known between two parts: the file's list is
                // incomplete, so it counts as not known (chunks still carry theirs).
                last.chunk_blake3.clear();
            }
        }
        Ok(())
    }

    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Manifest, ManifestPart};

    fn file(i: usize, chunks: usize) -> FileEntry {
        FileEntry {
            path: format!("shard-{i:06}/weights-{i}.bin"),
            size: chunks as u64 * crate::CHUNK_SIZE,
            etag: format!("\"{i:032x}\""),
            chunk_blake3: (0..chunks)
                .map(|c| {
                    blake3::hash(&(i * 1_000_003 + c).to_le_bytes())
                        .as_bytes()
                        .to_vec()
                })
                .collect(),
            sha256: "ab".repeat(32),
            ..Default::default()
        }
    }

    /// Cuts `files` into parts the way the node sends them in `Fetch` (a manifest, then
    /// `ManifestPart`s), checks that every message stays under 4 MiB, and puts them back.
    fn round_trip(files: Vec<FileEntry>) -> (usize, Manifest) {
        let header = Manifest {
            name: "org/huge".into(),
            revision: "r".repeat(64),
            file_count: files.len() as u32,
            ..Default::default()
        };
        let (first, mut next) = cut(
            files.len(),
            |i| files[i].clone(),
            Cursor::default(),
            PART_BYTES,
        );
        let first = Manifest {
            files: first,
            ..header.clone()
        };
        assert!(first.encoded_len() < 4 << 20);
        let mut assembly = Assembly::new(first).unwrap();
        let mut parts = 1;
        while let Some(at) = next {
            let (entries, after) = cut(files.len(), |i| files[i].clone(), at, PART_BYTES);
            assert!(!entries.is_empty(), "no progress at {at:?}");
            let part = ManifestPart { files: entries };
            assert!(part.encoded_len() < 4 << 20, "{} bytes", part.encoded_len());
            assembly.add(part.files).unwrap();
            parts += 1;
            next = after;
        }
        assert!(assembly.is_complete());
        let manifest = assembly.into_manifest();
        assert_eq!(manifest.files, files);
        (parts, manifest)
    }

    #[test]
    fn two_hundred_thousand_files_come_back_whole_in_parts_under_4_mib() {
        let files: Vec<FileEntry> = (0..200_000).map(|i| file(i, 1)).collect();
        let whole = Manifest {
            files: files.clone(),
            ..Default::default()
        };
        assert!(
            whole.encoded_len() > 4 << 20,
            "the test needs a manifest over 4 MiB"
        );
        let (parts, _) = round_trip(files);
        assert!(parts > 4, "{parts} parts");
    }

    #[test]
    fn a_one_tib_file_has_its_digests_cut_across_parts() {
        let chunks = (1usize << 40) / crate::CHUNK_SIZE as usize;
        let files = vec![file(0, 3), file(1, chunks), file(2, 2)];
        let (parts, manifest) = round_trip(files);
        assert!(parts >= 17, "{parts} parts");
        assert_eq!(manifest.files[1].chunk_blake3.len(), chunks);
    }

    #[test]
    fn a_small_manifest_is_one_part_and_tiny_budgets_still_progress() {
        let files: Vec<FileEntry> = (0..10).map(|i| file(i, 4)).collect();
        let (entries, next) = cut(10, |i| files[i].clone(), Cursor::default(), PART_BYTES);
        assert_eq!((entries.len(), next), (10, None));
        // A budget too small for one digest still sends one per part.
        let (entries, next) = cut(10, |i| files[i].clone(), Cursor::default(), 10);
        assert_eq!(entries.len(), 1);
        assert_eq!(next, Some(Cursor { file: 0, chunk: 1 }));
    }

    #[test]
    fn page_tokens_name_their_revision() {
        let at = Cursor { file: 12, chunk: 7 };
        let token = at.token("abc");
        assert_eq!(Cursor::parse(&token, "abc"), Some(at));
        assert_eq!(Cursor::parse(&token, "abd"), None);
        assert_eq!(Cursor::parse("abc:x:1", "abc"), None);
    }

    #[test]
    fn a_file_whose_digests_appeared_between_parts_counts_as_unknown() {
        let mut first = file(0, 0);
        first.size = 4 * crate::CHUNK_SIZE;
        let mut assembly = Assembly::new(Manifest {
            files: vec![first],
            file_count: 1,
            ..Default::default()
        })
        .unwrap();
        let mut later = file(0, 4);
        later.first_chunk = 2;
        later.chunk_blake3.drain(..2);
        assembly.add(vec![later]).unwrap();
        assert!(assembly.into_manifest().files[0].chunk_blake3.is_empty());
    }
}
