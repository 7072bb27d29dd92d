//! Where models live on the inference host.
//!
//! ```text
//! DIR/resnet50/@int8                  -> .int8/3f2a…   (symlink, swapped atomically)
//! DIR/resnet50/.int8/3f2a…/           the files of revision 3f2a…, complete and verified
//! DIR/resnet50/.int8/3f2a….json       its manifest (sizes, chunk BLAKE3, SHA-256)
//! DIR/resnet50/.int8/9c41….partial/   a download in progress
//! DIR/resnet50/.int8/9c41….progress.json   how far it got, for resuming
//! DIR/resnet50/.int8/3f2a….damaged.json    chunks a check found bad, fetched again next
//! DIR/resnet50/.int8.lock             the per-model lock processes take turns on
//! DIR/resnet50/.int8.used             its modification time: the model's last use
//! DIR/org/minilm/@original            -> .original/…
//! DIR/.trash/…                        evicted models being deleted (cleaned at start)
//! ```
//!
//! Name segments never start with `.` and never contain `@`, so `@VARIANT` links and
//! `.VARIANT` stores cannot collide with another model's folders: `a:int8` lives at
//! `DIR/a/@int8`, a model named `a/int8` at `DIR/a/int8/@original`.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use modelcache_proto::Reference;
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, Result};

/// The manifest kept beside each complete revision.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalManifest {
    pub name: String,
    pub variant: String,
    pub revision: String,
    pub chunk_size: u64,
    pub files: Vec<LocalFile>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LocalFile {
    pub path: String,
    pub size: u64,
    /// Hex BLAKE3 of each chunk, as verified while receiving.
    pub chunk_blake3: Vec<String>,
    /// Hex SHA-256 of the file, when the node knew it.
    #[serde(default)]
    pub sha256: Option<String>,
}

impl LocalManifest {
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A model present locally.
#[derive(Clone, Debug)]
pub struct LocalModel {
    pub reference: Reference,
    pub revision: String,
    pub path: PathBuf,
    pub size: u64,
}

/// The layout of `DIR` this agent reads and writes (symlinks to revision dirs, manifests,
/// progress files, lock files), recorded in `DIR/.modelcache-format`.
pub const DIR_FORMAT: u32 = 1;
const FORMAT_FILE: &str = ".modelcache-format";
const FORMAT_PREFIX: &str = "modelcache-agent-dir ";

/// A chunk of a local file that failed its BLAKE3 check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadChunk {
    pub path: String,
    pub chunk: u64,
}

const TRASH: &str = ".trash";

/// Bytes a path really takes on disk (allocated blocks), symlinks not followed, and a
/// file linked several times (a revision reusing the previous one's files) counted once.
pub fn disk_usage(path: &Path) -> u64 {
    fn walk(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return 0;
        };
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            return 0;
        }
        let own = meta.blocks() * 512;
        if !meta.is_dir() {
            return own;
        }
        let children: u64 = std::fs::read_dir(path)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| walk(&e.path(), seen))
            .sum();
        own + children
    }
    walk(path, &mut std::collections::HashSet::new())
}

/// A held lock of one (name, variant) in a directory.
#[derive(Debug)]
pub struct ModelLock {
    _file: File,
}

#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn model_dir(&self, r: &Reference) -> PathBuf {
        r.name()
            .split('/')
            .fold(self.root.clone(), |p, s| p.join(s))
    }

    /// The stable path of (name, variant): a symlink to the current revision.
    pub fn link(&self, r: &Reference) -> PathBuf {
        self.model_dir(r).join(format!("@{}", r.variant()))
    }

    pub fn store(&self, r: &Reference) -> PathBuf {
        self.model_dir(r).join(format!(".{}", r.variant()))
    }

    pub fn revision_dir(&self, r: &Reference, rev: &str) -> PathBuf {
        self.store(r).join(rev)
    }

    pub fn partial_dir(&self, r: &Reference, rev: &str) -> PathBuf {
        self.store(r).join(format!("{rev}.partial"))
    }

    pub fn progress_file(&self, r: &Reference, rev: &str) -> PathBuf {
        self.store(r).join(format!("{rev}.progress.json"))
    }

    pub fn manifest_file(&self, r: &Reference, rev: &str) -> PathBuf {
        self.store(r).join(format!("{rev}.json"))
    }

    /// Checks that this agent can read `DIR` (a newer agent's is refused, naming both
    /// formats, and left alone); with `record`, writes the format where none is recorded
    /// yet (a directory from before formats were recorded has today's layout).
    pub fn check_format(&self, record: bool) -> Result<()> {
        let path = self.root.join(FORMAT_FILE);
        let found = match std::fs::read_to_string(&path) {
            Ok(text) => text
                .trim()
                .strip_prefix(FORMAT_PREFIX)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(u32::MAX),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(AgentError::io(format!("reading {}", path.display()), e)),
        };
        if found > DIR_FORMAT {
            return Err(AgentError::Incompatible {
                dir: self.root.display().to_string(),
                found,
                supported: DIR_FORMAT,
            });
        }
        if record && found < DIR_FORMAT {
            std::fs::create_dir_all(&self.root)
                .map_err(|e| AgentError::io(format!("creating {}", self.root.display()), e))?;
            write_atomic(&path, format!("{FORMAT_PREFIX}{DIR_FORMAT}\n").as_bytes())?;
        }
        Ok(())
    }

    /// The lock file of (name, variant), beside its store.
    fn lock_file(&self, r: &Reference) -> PathBuf {
        self.model_dir(r).join(format!(".{}.lock", r.variant()))
    }

    /// Waits for, then holds, the lock of (name, variant) in this directory: processes
    /// (and tasks) that fetch the same model into one directory take turns, so the second
    /// finds it present instead of racing on the same partial download. Blocking; released
    /// when dropped.
    pub fn lock(&self, r: &Reference) -> Result<ModelLock> {
        let (file, path) = self.open_lock_file(r)?;
        file.lock()
            .map_err(|e| AgentError::io(format!("locking {}", path.display()), e))?;
        Ok(ModelLock { _file: file })
    }

    fn open_lock_file(&self, r: &Reference) -> Result<(File, PathBuf)> {
        let path = self.lock_file(r);
        self.check_inside(&path)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| AgentError::io(format!("opening {}", path.display()), e))?;
        Ok((file, path))
    }

    /// Like `lock`, without waiting: `Busy` when another process holds it.
    pub fn try_lock(&self, r: &Reference) -> Result<ModelLock> {
        let (file, path) = self.open_lock_file(r)?;
        match file.try_lock() {
            Ok(()) => Ok(ModelLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(AgentError::Busy {
                reference: r.to_string(),
                detail: "another process is fetching it into the same directory".into(),
            }),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(AgentError::io(format!("locking {}", path.display()), e))
            }
        }
    }

    /// Refuses a path whose folders between `DIR` and it include a symlink (or that is a
    /// symlink itself): removing through one would reach outside `DIR`.
    fn check_inside(&self, path: &Path) -> Result<()> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| AgentError::Corrupt {
                reference: path.display().to_string(),
                detail: format!("not inside {}", self.root.display()),
            })?;
        let mut at = self.root.clone();
        for part in rel.components() {
            at.push(part);
            if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink())
                && at != path
            {
                return Err(AgentError::Corrupt {
                    reference: path.display().to_string(),
                    detail: format!(
                        "{} is a symlink; not following it out of {}",
                        at.display(),
                        self.root.display()
                    ),
                });
            }
        }
        Ok(())
    }

    fn used_file(&self, r: &Reference) -> PathBuf {
        self.model_dir(r).join(format!(".{}.used", r.variant()))
    }

    /// Records a use of the model now (for least-recently-used eviction); best effort.
    pub fn touch(&self, r: &Reference) {
        let path = self.used_file(r);
        if self.check_inside(&path).is_err() {
            return;
        }
        let _ = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()));
    }

    /// When the model was last used: its last `touch`, else when its link was made.
    pub fn last_used(&self, r: &Reference) -> std::time::SystemTime {
        std::fs::metadata(self.used_file(r))
            .or_else(|_| std::fs::symlink_metadata(self.link(r)))
            .and_then(|m| m.modified())
            .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
    }

    /// Bytes the model takes on disk: every revision, partial downloads, progress files.
    pub fn model_disk_usage(&self, r: &Reference) -> u64 {
        disk_usage(&self.store(r))
    }

    fn damaged_file(&self, r: &Reference, rev: &str) -> PathBuf {
        self.store(r).join(format!("{rev}.damaged.json"))
    }

    /// Records chunks of revision `rev` that failed their check (added to those known).
    pub fn mark_damaged(&self, r: &Reference, rev: &str, bad: &[BadChunk]) -> Result<()> {
        let mut all = self.damaged(r, rev).unwrap_or_default();
        for b in bad {
            if !all.contains(b) {
                all.push(b.clone());
            }
        }
        write_atomic(
            &self.damaged_file(r, rev),
            &serde_json::to_vec_pretty(&all).expect("damage serializes"),
        )
    }

    /// The chunks of `rev` known to be bad, if any.
    pub fn damaged(&self, r: &Reference, rev: &str) -> Option<Vec<BadChunk>> {
        let bytes = std::fs::read(self.damaged_file(r, rev)).ok()?;
        serde_json::from_slice::<Vec<BadChunk>>(&bytes)
            .ok()
            .filter(|v| !v.is_empty())
    }

    pub fn clear_damaged(&self, r: &Reference, rev: &str) {
        let _ = std::fs::remove_file(self.damaged_file(r, rev));
    }

    /// Takes the model out of `DIR` at once, without waiting for the bytes to be deleted:
    /// its link is removed and its store renamed into `DIR/.trash`, whose contents the
    /// caller deletes (and the next start cleans). `None` when it was not there; `Busy`
    /// when another process is fetching it.
    pub fn detach(&self, r: &Reference) -> Result<Option<PathBuf>> {
        let link = self.link(r);
        let store = self.store(r);
        self.check_inside(&store)?;
        let present = link.symlink_metadata().is_ok() || store.symlink_metadata().is_ok();
        if !present {
            return Ok(None);
        }
        let _lock = self.try_lock(r)?;
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .map_err(|e| AgentError::io(format!("removing {}", link.display()), e))?;
        }
        let _ = std::fs::remove_file(self.used_file(r));
        if store.symlink_metadata().is_err() {
            return Ok(None);
        }
        let trash = self.root.join(TRASH);
        std::fs::create_dir_all(&trash)
            .map_err(|e| AgentError::io(format!("creating {}", trash.display()), e))?;
        let unique = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let target = trash.join(format!("{}-{unique}", std::process::id()));
        std::fs::rename(&store, &target)
            .map_err(|e| AgentError::io(format!("moving {} to the trash", store.display()), e))?;
        Ok(Some(target))
    }

    /// Deletes what an earlier process left behind: evicted models not yet deleted, and
    /// temporary links of publishes cut short.
    pub fn clean_leftovers(&self) {
        let trash = self.root.join(TRASH);
        if trash.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            let _ = std::fs::remove_dir_all(&trash);
        }
    }

    /// The revision the link points at, with its manifest.
    pub fn current(&self, r: &Reference) -> Option<LocalManifest> {
        let target = std::fs::read_link(self.link(r)).ok()?;
        let rev = target.file_name()?.to_str()?.to_owned();
        self.read_manifest(r, &rev).ok()
    }

    pub fn read_manifest(&self, r: &Reference, rev: &str) -> Result<LocalManifest> {
        let path = self.manifest_file(r, rev);
        let bytes = std::fs::read(&path)
            .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Corrupt {
            reference: r.to_string(),
            detail: format!("{} is not a valid manifest: {e}", path.display()),
        })
    }

    pub fn write_manifest(&self, r: &Reference, manifest: &LocalManifest) -> Result<()> {
        let path = self.manifest_file(r, &manifest.revision);
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(manifest).expect("manifest serializes"),
        )
    }

    /// The published revision's manifest, when every file of it is present with its size
    /// (no re-hash): what `prefetch`, `get` offline and the daemon's `Ensure` trust.
    pub fn complete_current(&self, r: &Reference) -> Option<LocalManifest> {
        self.current(r).filter(|m| self.is_complete(r, m))
    }

    /// Whether every file of `manifest` is present in its revision dir with its size.
    pub fn is_complete(&self, r: &Reference, manifest: &LocalManifest) -> bool {
        let dir = self.revision_dir(r, &manifest.revision);
        manifest.files.iter().all(|f| {
            std::fs::symlink_metadata(dir.join(&f.path))
                .is_ok_and(|m| m.is_file() && m.len() == f.size)
        })
    }

    /// Moves a finished download in `partial` into place as the revision of `manifest`:
    /// creates its empty files, checks every file's size, and writes the manifest.
    pub fn install(&self, r: &Reference, manifest: &LocalManifest, partial: &Path) -> Result<()> {
        for f in &manifest.files {
            let path = partial.join(&f.path);
            if f.size == 0 {
                open_for_write(&path, 0, false)?;
            }
            let len = std::fs::symlink_metadata(&path)
                .map(|md| md.len())
                .unwrap_or(u64::MAX);
            if len != f.size {
                return Err(AgentError::Corrupt {
                    reference: r.to_string(),
                    detail: format!("{} is incomplete after the transfer; run again", f.path),
                });
            }
        }
        self.write_manifest(r, manifest)?;
        let target = self.revision_dir(r, &manifest.revision);
        let _ = std::fs::remove_dir_all(&target);
        std::fs::rename(partial, &target)
            .map_err(|e| AgentError::io(format!("moving {} into place", partial.display()), e))
    }

    /// Points the link at `rev`: a new symlink renamed over the old one, so readers see the
    /// old revision or the new one, never a mix.
    pub fn publish(&self, r: &Reference, rev: &str) -> Result<PathBuf> {
        let link = self.link(r);
        let tmp = link.with_file_name(format!(".@{}.{}.tmp", r.variant(), std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let target = PathBuf::from(format!(".{}", r.variant())).join(rev);
        std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &link))
            .map_err(|e| AgentError::io(format!("publishing {}", link.display()), e))?;
        Ok(link)
    }

    /// Removes revisions (and downloads in progress) other than those in `keep`; callers
    /// keep the previous revision for readers that still have it open.
    pub fn prune(&self, r: &Reference, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(self.store(r)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let rev = name
                .trim_end_matches(".partial")
                .trim_end_matches(".progress.json")
                .trim_end_matches(".damaged.json")
                .trim_end_matches(".json");
            if keep.contains(&rev) {
                continue;
            }
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }

    /// Removes a model variant entirely; true if something was there.
    pub fn remove(&self, r: &Reference) -> Result<bool> {
        let link = self.link(r);
        let store = self.store(r);
        self.check_inside(&store)?;
        let _ = std::fs::remove_file(self.used_file(r));
        let existed = link.symlink_metadata().is_ok() || store.exists();
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)
                .map_err(|e| AgentError::io(format!("removing {}", link.display()), e))?;
        }
        if store.exists() {
            std::fs::remove_dir_all(&store)
                .map_err(|e| AgentError::io(format!("removing {}", store.display()), e))?;
        }
        let _ = std::fs::remove_file(self.lock_file(r));
        // Drop folders left empty, up to the root.
        let mut dir = self.model_dir(r);
        while dir != self.root && std::fs::remove_dir(&dir).is_ok() {
            dir.pop();
        }
        Ok(existed)
    }

    /// Every model variant with a published revision.
    pub fn list(&self) -> Vec<LocalModel> {
        let mut out = Vec::new();
        self.walk(&self.root, &mut Vec::new(), &mut out);
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        out
    }

    fn walk(&self, dir: &Path, segments: &mut Vec<String>, out: &mut Vec<LocalModel>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if let Some(variant) = name.strip_prefix('@') {
                let Ok(reference) = Reference::new(&segments.join("/"), variant) else {
                    continue;
                };
                if let Some(manifest) = self.current(&reference) {
                    out.push(LocalModel {
                        path: self.link(&reference),
                        size: manifest.total_size(),
                        revision: manifest.revision,
                        reference,
                    });
                }
            } else if !name.starts_with('.') && meta.is_dir() {
                segments.push(name);
                self.walk(&entry.path(), segments, out);
                segments.pop();
            }
        }
    }
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| AgentError::io(format!("writing {}", path.display()), e))
}

/// Opens a file for writing from `offset`, creating its folders; cuts it at `offset` when
/// resuming so a half-written chunk from an interrupted run is rewritten.
pub fn open_for_write(path: &Path, offset: u64, resuming: bool) -> Result<File> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap()
    }

    #[test]
    fn distinct_name_variant_pairs_never_share_or_nest_paths() {
        let layout = Layout::new("/cache");
        let refs = [
            r("a:int8"),
            r("a/int8"),
            r("a"),
            r("a/int8:fp16"),
            r("a-int8"),
            r("a/b/c:original"),
        ];
        let mut owned: Vec<(PathBuf, PathBuf)> = refs
            .iter()
            .map(|x| (layout.link(x), layout.store(x)))
            .collect();
        assert_eq!(layout.link(&r("a:int8")), PathBuf::from("/cache/a/@int8"));
        assert_eq!(
            layout.link(&r("a/int8")),
            PathBuf::from("/cache/a/int8/@original")
        );
        owned.sort();
        for (i, (link_a, store_a)) in owned.iter().enumerate() {
            for (link_b, store_b) in owned.iter().skip(i + 1) {
                for a in [link_a, store_a] {
                    for b in [link_b, store_b] {
                        assert!(
                            !a.starts_with(b) && !b.starts_with(a),
                            "{} vs {}",
                            a.display(),
                            b.display()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn publish_swaps_the_link_and_list_finds_models() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let reference = r("org/minilm:original");
        for rev in ["rev1", "rev2"] {
            std::fs::create_dir_all(layout.revision_dir(&reference, rev)).unwrap();
            let manifest = LocalManifest {
                name: "org/minilm".into(),
                variant: "original".into(),
                revision: rev.into(),
                chunk_size: 4,
                files: vec![],
            };
            layout.write_manifest(&reference, &manifest).unwrap();
            layout.publish(&reference, rev).unwrap();
            assert_eq!(layout.current(&reference).unwrap().revision, rev);
        }
        let listed = layout.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].reference, reference);
        assert!(layout.remove(&reference).unwrap());
        assert!(layout.list().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "empty folders are removed"
        );
    }
}
