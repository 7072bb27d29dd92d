//! Pinned models: whole files kept under `<cache-dir>/pins`, outside the tiers and their
//! eviction, and read before the tiers are asked. What `pins.json` lists is served from
//! there (each chunk checked against the digest its revision knows); a stored file it does
//! not list (a pin cut short by a crash) is removed when the node starts.
//!
//! This module keeps and looks up; `pinning` resolves a model and writes its files.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use modelcache_proto::Reference;

use crate::cache::ChunkKey;
use crate::error::{Error, Result};
use crate::manifest::{Revision, chunk_range};

const LIST: &str = "pins.json";
const FILES: &str = "files";
const STAGING: &str = "staging";

/// One pinned model, as `pins.json` keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub name: String,
    pub variant: String,
    pub revision: String,
    pub bytes: u64,
    pub files: Vec<PinnedFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedFile {
    pub path: String,
    pub size: u64,
    pub etag: String,
    pub sha256: String,
}

impl Pin {
    /// `name:variant`.
    pub fn reference(&self) -> String {
        format!("{}:{}", self.name, self.variant)
    }

    fn is(&self, reference: &Reference) -> bool {
        self.name == reference.name() && self.variant == reference.variant()
    }
}

impl PinnedFile {
    /// Its name under `pins/files`: the hex of its identity.
    fn stored(&self, pin: &Pin) -> String {
        hex::encode(self.id(pin).0)
    }

    fn id(&self, pin: &Pin) -> ChunkKey {
        file_id(&pin.name, &pin.variant, &self.path, self.size, &self.etag)
    }
}

/// A file's identity: model, variant, path, size and version, as the key its chunk
/// `u64::MAX` would have.
fn file_id(name: &str, variant: &str, path: &str, size: u64, etag: &str) -> ChunkKey {
    ChunkKey::new(name, variant, path, size, etag, u64::MAX)
}

#[derive(Default)]
struct State {
    pins: Vec<Pin>,
    /// Every pinned file by its identity.
    files: HashMap<ChunkKey, PathBuf>,
}

pub struct Pins {
    dir: PathBuf,
    state: RwLock<State>,
    /// One pin or unpin at a time rewrites `pins.json`.
    writing: tokio::sync::Mutex<()>,
}

fn io_error(what: &Path, e: std::io::Error) -> Error {
    Error::io(format!("pins: {}", what.display()), e)
}

impl Pins {
    /// Opens `dir` (created if missing): reads `pins.json`, drops a pin whose files are
    /// missing or the wrong size (with a warning), and removes every stored file no pin
    /// lists and whatever an interrupted pin left in staging.
    pub fn open(dir: &Path) -> Result<Self> {
        let files = dir.join(FILES);
        std::fs::create_dir_all(&files).map_err(|e| io_error(&files, e))?;
        let _ = std::fs::remove_dir_all(dir.join(STAGING));
        let list = dir.join(LIST);
        let saved: Vec<Pin> = match std::fs::read(&list) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                Error::Config(format!(
                    "{} is not a list of pins: {e}; move it away to start without pins (the \
                     models stay in the origin), then pin them again",
                    list.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error(&list, e)),
        };
        let intact = |pin: &Pin| {
            pin.files.iter().all(|f| {
                std::fs::metadata(files.join(f.stored(pin))).is_ok_and(|m| m.len() == f.size)
            })
        };
        let (kept, lost): (Vec<Pin>, Vec<Pin>) = saved.into_iter().partition(intact);
        for pin in &lost {
            tracing::warn!(reference = %pin.reference(), "a pinned file is missing; unpinned");
        }
        let pins = Self {
            dir: dir.to_owned(),
            state: RwLock::new(State::default()),
            writing: tokio::sync::Mutex::new(()),
        };
        pins.install(kept)?;
        if !lost.is_empty() {
            pins.save()?;
        }
        Ok(pins)
    }

    /// Makes `pins` the list served, and removes the stored files none of them lists.
    fn install(&self, pins: Vec<Pin>) -> Result<()> {
        let dir = self.dir.join(FILES);
        let mut files = HashMap::new();
        for pin in &pins {
            for f in &pin.files {
                files.insert(f.id(pin), dir.join(f.stored(pin)));
            }
        }
        let listed: HashSet<&PathBuf> = files.values().collect();
        for entry in std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let path = entry.map_err(|e| io_error(&dir, e))?.path();
            if !listed.contains(&path) {
                let _ = std::fs::remove_file(&path);
            }
        }
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = State { pins, files };
        Ok(())
    }

    /// Writes `pins.json` from the list served (a temporary file renamed over it).
    fn save(&self) -> Result<()> {
        let pins = self.list();
        let text = serde_json::to_vec_pretty(&pins).expect("pins serialize");
        let (list, tmp) = (self.dir.join(LIST), self.dir.join("pins.json.tmp"));
        std::fs::write(&tmp, text).map_err(|e| io_error(&tmp, e))?;
        std::fs::rename(&tmp, &list).map_err(|e| io_error(&list, e))
    }

    /// Where the pins live (`<cache-dir>/pins`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every pin, in the order they were made.
    pub fn list(&self) -> Vec<Pin> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .pins
            .clone()
    }

    /// The pin of `reference`, if any.
    pub fn get(&self, reference: &Reference) -> Option<Pin> {
        self.list().into_iter().find(|p| p.is(reference))
    }

    /// A folder to write a pin's files into before `commit`; removed when dropped.
    pub fn staging(&self) -> Result<tempfile::TempDir> {
        let dir = self.dir.join(STAGING);
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        tempfile::tempdir_in(&dir).map_err(|e| io_error(&dir, e))
    }

    /// Refuses a pin of `bytes` the filesystem has no room for.
    pub fn check_room(&self, reference: &Reference, bytes: u64) -> Result<()> {
        let free = fs4::available_space(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        if bytes > free {
            return Err(Error::NoRoomToPin {
                reference: reference.to_string(),
                dir: self.dir.display().to_string(),
                needed: bytes,
                free,
            });
        }
        Ok(())
    }

    /// Serves `pin`, whose file `i` was written to `staged[i]`, in place of any earlier
    /// pin of the same reference; returns that earlier pin.
    pub async fn commit(&self, pin: Pin, staged: Vec<PathBuf>) -> Result<Option<Pin>> {
        let _writing = self.writing.lock().await;
        let dir = self.dir.join(FILES);
        for (file, from) in pin.files.iter().zip(&staged) {
            let to = dir.join(file.stored(&pin));
            std::fs::rename(from, &to).map_err(|e| io_error(&to, e))?;
        }
        let mut pins = self.list();
        let earlier = pins
            .iter()
            .position(|p| (&p.name, &p.variant) == (&pin.name, &pin.variant))
            .map(|i| pins.remove(i));
        pins.push(pin);
        self.install(pins)?;
        self.save()?;
        Ok(earlier)
    }

    /// Stops serving the pin of `reference` and removes its files.
    pub async fn unpin(&self, reference: &Reference) -> Result<Pin> {
        let _writing = self.writing.lock().await;
        let mut pins = self.list();
        let Some(i) = pins.iter().position(|p| p.is(reference)) else {
            return Err(Error::NotPinned {
                reference: reference.to_string(),
            });
        };
        let pin = pins.remove(i);
        self.install(pins)?;
        self.save()?;
        Ok(pin)
    }

    /// Pinned models and their bytes.
    pub fn totals(&self) -> (u64, u64) {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let bytes = state.pins.iter().map(|p| p.bytes).sum();
        (state.pins.len() as u64, bytes)
    }

    /// Chunk `index` of file `file` of `rev` from a pinned copy, or `None` when no pin
    /// holds that file (or reading it failed: the tiers answer instead).
    pub async fn read(&self, rev: &Revision, file: usize, index: u64) -> Option<Bytes> {
        let record = &rev.files[file].origin;
        let path = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            if state.files.is_empty() {
                return None;
            }
            let id = file_id(
                &rev.name,
                &rev.variant,
                &record.path,
                record.size,
                &record.etag,
            );
            state.files.get(&id)?.clone()
        };
        let range = chunk_range(record.size, index);
        let read = tokio::task::spawn_blocking(move || read_at(&path, range)).await;
        match read {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(e)) => {
                tracing::warn!(model = %rev.name, path = %record.path, "reading a pinned file: {e}");
                None
            }
            Err(_) => None,
        }
    }
}

/// The bytes of `range` of the file at `path`, read into spare capacity (no zero-fill of
/// a 2 MiB buffer per chunk); a file shorter than the range is an error.
fn read_at(path: &Path, range: std::ops::Range<u64>) -> std::io::Result<Bytes> {
    use std::io::{Read, Seek};
    let len = range.end - range.start;
    let mut file = std::fs::File::open(path)?;
    file.seek(std::io::SeekFrom::Start(range.start))?;
    let mut buf = Vec::with_capacity(len as usize);
    file.take(len).read_to_end(&mut buf)?;
    if buf.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("{} ends before byte {}", path.display(), range.end),
        ));
    }
    Ok(Bytes::from(buf))
}
