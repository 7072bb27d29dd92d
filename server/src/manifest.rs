//! A model revision: its files with sizes, ETags, chunk digests and SHA-256, and how it
//! is saved next to the disk tier so that a restarted node can serve without the origin.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use modelcache_proto::{CHUNK_SIZE, chunk_count};
use modelcache_quant::{QUANTIZER_VERSION, Variant};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use crate::cache::ChunkKey;
use crate::checksum::{CheckCell, OriginCheck};
use crate::error::{Error, Result};
use crate::origin::OriginFile;

#[derive(Clone)]
pub struct FileRecord {
    /// The file as listed by the origin, or, for a file a variant built, its path, size
    /// and a version tag derived from the variant's revision.
    pub origin: OriginFile,
    /// Built by a variant: its chunks live in the variant tier and cannot be read from
    /// the origin (a miss means the variant was evicted and must be rebuilt).
    pub built: bool,
    /// Where a built file came from.
    pub provenance: Option<Provenance>,
    pub keys: Vec<ChunkKey>,
    /// Filled in as chunks are read from the origin (or found in a saved manifest).
    pub digests: Vec<OnceLock<[u8; 32]>>,
    /// The whole file's SHA-256. Whoever computes it does so inside the cell's
    /// `get_or_try_init`, so a second party that needs it waits for that computation
    /// instead of hashing the file again.
    pub sha256: OnceCell<String>,
    /// The comparison with the checksum the origin publishes, once made.
    pub origin_check: CheckCell,
}

/// Where a file a variant built came from (SPEC §3: recorded in the manifest and, where
/// the format has a place for it, in the file itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    pub source_path: String,
    pub source_sha256: String,
    /// Absent in manifests saved before it was recorded; the variant's own name then.
    #[serde(default)]
    pub variant: String,
    pub quantizer_version: String,
    pub parameters: String,
}

impl FileRecord {
    pub fn new(name: &str, variant: &str, origin: OriginFile) -> Self {
        let chunks = chunk_count(origin.size);
        let keys = (0..chunks)
            .map(|i| ChunkKey::new(name, variant, &origin.path, origin.size, &origin.etag, i))
            .collect();
        Self {
            origin,
            built: false,
            provenance: None,
            keys,
            digests: (0..chunks).map(|_| OnceLock::new()).collect(),
            sha256: OnceCell::new(),
            origin_check: CheckCell::default(),
        }
    }

    pub fn chunk_range(&self, index: u64) -> std::ops::Range<u64> {
        chunk_range(self.origin.size, index)
    }

    /// Every chunk's digest, once all are known.
    pub fn all_digests(&self) -> Option<Vec<[u8; 32]>> {
        self.digests.iter().map(|d| d.get().copied()).collect()
    }
}

/// The bytes of chunk `index` of a file of `size` bytes.
pub fn chunk_range(size: u64, index: u64) -> std::ops::Range<u64> {
    let start = index * CHUNK_SIZE;
    start..(start + CHUNK_SIZE).min(size)
}

pub struct Revision {
    pub name: String,
    pub variant: String,
    pub id: String,
    /// For a variant: the original revision it was built from.
    pub source: Option<String>,
    pub files: Vec<FileRecord>,
    pub total_size: u64,
    pub total_chunks: u64,
    /// How many of `files`' chunk digests are set: a count kept beside them, so that
    /// "this digest completed the model" is known without scanning every file.
    known_chunks: AtomicU64,
    /// When the origin last listed exactly this revision (saved, so that a restarted node
    /// trusts it for the rest of `--revalidate-after` without asking the origin).
    confirmed_at: Mutex<Option<SystemTime>>,
    /// Transfers (`Fetch` streams) of this revision open right now.
    transfers: tokio::sync::watch::Sender<usize>,
}

/// An open transfer of a revision; dropping it ends it.
pub struct TransferGuard(std::sync::Arc<Revision>);

impl Drop for TransferGuard {
    fn drop(&mut self) {
        self.0.transfers.send_modify(|n| *n -= 1);
    }
}

/// A variant's revision: a digest of the original revision, the variant and the
/// quantizer version (a rebuild gives the same revision and the same bytes).
pub fn variant_id(original: &str, variant: Variant) -> String {
    let mut h = blake3::Hasher::new();
    for part in [original, variant.as_str(), QUANTIZER_VERSION] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.finalize().to_hex()[..32].to_owned()
}

/// The revision of a file list: BLAKE3 over every path, size and ETag, in path order.
pub fn revision_id(files: &[OriginFile]) -> String {
    let mut h = blake3::Hasher::new();
    for f in files {
        h.update(&(f.path.len() as u64).to_le_bytes());
        h.update(f.path.as_bytes());
        h.update(&f.size.to_le_bytes());
        h.update(&(f.etag.len() as u64).to_le_bytes());
        h.update(f.etag.as_bytes());
    }
    h.finalize().to_hex()[..32].to_owned()
}

impl Revision {
    /// Every (file, chunk) of `files`, from chunk `start_chunk` of the first.
    pub fn chunk_plan(&self, files: std::ops::Range<usize>, start_chunk: u64) -> Vec<(usize, u64)> {
        let first = files.start;
        let chunks = move |f: usize| {
            let from = if f == first { start_chunk } else { 0 };
            (from..self.files[f].keys.len() as u64).map(move |i| (f, i))
        };
        files.flat_map(chunks).collect()
    }

    /// A revision of `files`, reusing what `previous` knew of files that did not change.
    pub fn new(name: &str, files: Vec<OriginFile>, previous: Option<&Revision>) -> Self {
        let id = revision_id(&files);
        let variant = modelcache_proto::reference::ORIGINAL;
        let files: Vec<FileRecord> = files
            .into_iter()
            .map(|f| {
                let record = FileRecord::new(name, variant, f);
                if let Some(old) =
                    previous.and_then(|p| p.files.iter().find(|o| o.origin == record.origin))
                {
                    copy_known(old, &record);
                }
                record
            })
            .collect();
        Self::from_records(name, variant, id, files)
    }

    /// A revision of records built elsewhere (a variant's files).
    pub fn from_records(name: &str, variant: &str, id: String, files: Vec<FileRecord>) -> Self {
        let total_size = files.iter().map(|f| f.origin.size).sum();
        let total_chunks = files.iter().map(|f| f.keys.len() as u64).sum();
        let rev = Self {
            name: name.to_owned(),
            variant: variant.to_owned(),
            id,
            source: None,
            files,
            total_size,
            total_chunks,
            known_chunks: AtomicU64::new(0),
            confirmed_at: Mutex::new(None),
            transfers: tokio::sync::watch::channel(0).0,
        };
        rev.recount();
        rev
    }

    /// Counts a transfer of this revision until the guard is dropped.
    pub fn transfer(self: &std::sync::Arc<Self>) -> TransferGuard {
        self.transfers.send_modify(|n| *n += 1);
        TransferGuard(self.clone())
    }

    /// Waits until no transfer of this revision is open, or `limit` passed.
    pub async fn transfers_ended(&self, limit: Duration) {
        let mut open = self.transfers.subscribe();
        let _ = tokio::time::timeout(limit, open.wait_for(|n| *n == 0)).await;
    }

    fn recount(&self) {
        let known = self
            .files
            .iter()
            .flat_map(|f| &f.digests)
            .filter(|d| d.get().is_some())
            .count();
        self.known_chunks.store(known as u64, Ordering::Release);
    }

    /// This variant's files served under another variant's name (GGUF's `int8` is the
    /// `q8_0` build): the same records, the alias's own revision.
    pub fn alias(&self, variant: Variant) -> Revision {
        let source = self.source.clone().unwrap_or_default();
        let mut rev = Revision::from_records(
            &self.name,
            variant.as_str(),
            variant_id(&source, variant),
            self.files.clone(),
        );
        rev.source = Some(source);
        rev
    }

    /// Whether this is the bytes as stored (not a variant).
    pub fn is_original(&self) -> bool {
        self.variant == modelcache_proto::reference::ORIGINAL
    }

    /// Records a chunk's digest; true when this completed the model's digests.
    pub fn record_digest(&self, file: usize, index: u64, digest: [u8; 32]) -> bool {
        if self.files[file].digests[index as usize].set(digest).is_ok() {
            return self.known_chunks.fetch_add(1, Ordering::AcqRel) + 1 == self.total_chunks;
        }
        false
    }

    /// Records that the origin just listed this revision.
    pub fn confirm(&self) {
        *self.confirmed_at.lock().expect("revision lock poisoned") = Some(SystemTime::now());
    }

    /// How long ago the origin last listed this revision, if it ever did.
    pub fn confirmed_ago(&self) -> Option<Duration> {
        let at = (*self.confirmed_at.lock().expect("revision lock poisoned"))?;
        Some(SystemTime::now().duration_since(at).unwrap_or_default())
    }

    /// Whether every chunk's digest is known (the model was read in full).
    pub fn all_digests_known(&self) -> bool {
        self.known_chunks.load(Ordering::Acquire) == self.total_chunks
    }

    pub fn file_index(&self, path: &str) -> Option<usize> {
        self.files.iter().position(|f| f.origin.path == path)
    }

    pub fn chunk_keys(&self) -> Vec<ChunkKey> {
        self.files
            .iter()
            .flat_map(|f| f.keys.iter().copied())
            .collect()
    }

    pub fn has_all_sha256(&self) -> bool {
        self.files.iter().all(|f| f.sha256.get().is_some())
    }

    /// Whether every file's origin check is settled (a revision restored from a manifest
    /// saved before checks were made counts as checked: it was served as verified then).
    pub fn has_all_checks(&self) -> bool {
        self.files
            .iter()
            .all(|f| f.origin_check.settled().is_some())
    }
}

fn copy_known(from: &FileRecord, to: &FileRecord) {
    for (a, b) in from.digests.iter().zip(&to.digests) {
        if let Some(d) = a.get() {
            let _ = b.set(*d);
        }
    }
    if let Some(s) = from.sha256.get() {
        let _ = to.sha256.set(s.clone());
    }
    if let Some(check) = from.origin_check.settled()
        && check.saved().is_some()
    {
        to.origin_check.settle(check);
    }
}

/// The on-disk form of a revision.
#[derive(Serialize, Deserialize)]
struct SavedRevision {
    /// The cache format it was written in (`crate::format::CACHE_FORMAT`; absent before
    /// formats were recorded). One from a newer format is skipped, never misread.
    #[serde(default)]
    format: u32,
    name: String,
    /// Absent in manifests of originals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    variant: Option<String>,
    /// For a variant: the original revision it was built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<String>,
    revision: String,
    /// Unix time (seconds) when the origin last listed this revision.
    #[serde(default)]
    confirmed_unix: Option<u64>,
    files: Vec<SavedFile>,
    /// BLAKE3 of the manifest's compact JSON without this field: a manifest damaged on
    /// disk is skipped (and the model listed again) instead of trusted. Absent in
    /// manifests saved before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksum: Option<String>,
}

impl SavedRevision {
    fn digest(&self) -> String {
        let compact = serde_json::to_vec(self).expect("a manifest serializes to JSON");
        blake3::hash(&compact).to_hex().to_string()
    }

    /// Seals the manifest with its checksum.
    fn seal(mut self) -> Self {
        self.checksum = None;
        self.checksum = Some(self.digest());
        self
    }

    /// Whether the manifest is as it was sealed (or predates checksums).
    fn intact(&mut self) -> bool {
        let Some(checksum) = self.checksum.take() else {
            return true;
        };
        let intact = self.digest() == checksum;
        self.checksum = Some(checksum);
        intact
    }
}

#[derive(Serialize, Deserialize)]
struct SavedFile {
    path: String,
    size: u64,
    etag: String,
    chunk_blake3: Vec<Option<String>>,
    sha256: Option<String>,
    /// A variant's own file (its chunks are in the variant tier), with its provenance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    provenance: Option<Provenance>,
    /// The origin check's result (`verified:ALGORITHM` or `unchecked:REASON`); absent
    /// while not made, and in manifests saved before checks were made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin_check: Option<String>,
}

/// Saved manifests, one JSON file per model under `CACHE_DIR/manifests/`.
pub struct ManifestStore {
    dir: PathBuf,
}

impl ManifestStore {
    pub fn open(cache_dir: &std::path::Path) -> Result<Self> {
        let dir = cache_dir.join("manifests");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        Ok(Self { dir })
    }

    fn file_for(&self, name: &str, variant: &str) -> PathBuf {
        let key = if variant == modelcache_proto::reference::ORIGINAL {
            name.to_owned()
        } else {
            format!("{name}:{variant}")
        };
        self.dir.join(format!(
            "{}.json",
            &blake3::hash(key.as_bytes()).to_hex()[..32]
        ))
    }

    pub fn save(&self, rev: &Revision) -> Result<()> {
        let confirmed = *rev.confirmed_at.lock().expect("revision lock poisoned");
        let original = rev.variant == modelcache_proto::reference::ORIGINAL;
        let saved = SavedRevision {
            format: crate::format::CACHE_FORMAT,
            name: rev.name.clone(),
            variant: (!original).then(|| rev.variant.clone()),
            source: rev.source.clone(),
            revision: rev.id.clone(),
            confirmed_unix: confirmed
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            files: rev
                .files
                .iter()
                .map(|f| SavedFile {
                    path: f.origin.path.clone(),
                    size: f.origin.size,
                    etag: f.origin.etag.clone(),
                    chunk_blake3: f.digests.iter().map(|d| d.get().map(hex::encode)).collect(),
                    sha256: f.sha256.get().cloned(),
                    provenance: f.provenance.clone(),
                    origin_check: f.origin_check.settled().and_then(|c| c.saved()),
                })
                .collect(),
            checksum: None,
        };
        let path = self.file_for(&rev.name, &rev.variant);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&saved.seal()).expect("a manifest serializes to JSON");
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| Error::ManifestIo { path, source })
    }

    pub fn remove(&self, name: &str, variant: &str) {
        let _ = std::fs::remove_file(self.file_for(name, variant));
    }

    /// Every saved revision; unreadable files are skipped with a warning.
    pub fn load_all(&self) -> Vec<Revision> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                .and_then(restore)
            {
                Ok(rev) => out.push(rev),
                Err(e) => tracing::warn!(path = %path.display(), "skipping saved manifest: {e}"),
            }
        }
        out
    }
}

fn restore(mut saved: SavedRevision) -> Result<Revision, String> {
    if saved.format > crate::format::CACHE_FORMAT {
        return Err(format!(
            "it was written in cache format {}, and this node reads up to {}",
            saved.format,
            crate::format::CACHE_FORMAT
        ));
    }
    if !saved.intact() {
        return Err(
            "its checksum does not match its contents (damaged on disk); the model \
                    is listed again"
                .into(),
        );
    }
    modelcache_proto::Reference::parse(&saved.name).map_err(|e| e.to_string())?;
    modelcache_proto::check_file_paths(saved.files.iter().map(|f| f.path.as_str()))
        .map_err(|e| e.to_string())?;
    let origin_file = |f: &SavedFile| OriginFile {
        path: f.path.clone(),
        size: f.size,
        etag: f.etag.clone(),
    };
    let rev = match &saved.variant {
        None => {
            let files: Vec<OriginFile> = saved.files.iter().map(origin_file).collect();
            let rev = Revision::new(&saved.name, files, None);
            if rev.id != saved.revision {
                return Err("revision does not match its file list".into());
            }
            rev
        }
        Some(variant) => {
            let parsed = modelcache_quant::Variant::parse(variant)
                .ok_or_else(|| format!("unknown variant {variant:?}"))?;
            let source = saved.source.clone().ok_or("a variant without its source")?;
            if variant_id(&source, parsed) != saved.revision {
                return Err("built by another quantizer version".into());
            }
            let records = saved
                .files
                .iter()
                .map(|f| match &f.provenance {
                    Some(p) => {
                        let mut record = FileRecord::new(&saved.name, variant, origin_file(f));
                        record.built = true;
                        let mut provenance = p.clone();
                        if provenance.variant.is_empty() {
                            provenance.variant.clone_from(variant);
                        }
                        record.provenance = Some(provenance);
                        record
                    }
                    None => FileRecord::new(
                        &saved.name,
                        modelcache_proto::reference::ORIGINAL,
                        origin_file(f),
                    ),
                })
                .collect();
            let mut rev =
                Revision::from_records(&saved.name, variant, saved.revision.clone(), records);
            rev.source = Some(source);
            rev
        }
    };
    for (record, saved) in rev.files.iter().zip(&saved.files) {
        if saved.chunk_blake3.len() != record.digests.len() {
            return Err(format!("{}: wrong number of chunk digests", saved.path));
        }
        for (slot, digest) in record.digests.iter().zip(&saved.chunk_blake3) {
            if let Some(d) = digest {
                let bytes: [u8; 32] = hex::decode(d)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .ok_or_else(|| format!("{}: bad chunk digest", saved.path))?;
                let _ = slot.set(bytes);
            }
        }
        if let Some(s) = &saved.sha256 {
            let _ = record.sha256.set(s.clone());
        }
        if let Some(check) = saved
            .origin_check
            .as_deref()
            .and_then(OriginCheck::from_saved)
        {
            record.origin_check.settle(check);
        }
    }
    rev.recount();
    *rev.confirmed_at.lock().expect("fresh lock") = saved
        .confirmed_unix
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
    Ok(rev)
}
