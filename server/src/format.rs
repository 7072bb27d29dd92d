//! The cache directory's format, recorded in `CACHE_DIR/format`, so that a node never
//! misreads a cache another version of it wrote. A cache from before formats were recorded
//! has today's layout and is reused; one of another format (a newer node's, after a
//! downgrade) is dropped with a log line: its tiers, saved manifests and build leftovers
//! are removed, and the node starts empty.

use std::path::Path;

use crate::error::{Error, Result};

/// The layout this node reads and writes: `tiers/` and `variants/` (foyer), `manifests/`
/// (JSON with a checksum), `build/` (scratch).
pub const CACHE_FORMAT: u32 = 1;

const FILE: &str = "format";
const PREFIX: &str = "modelcache-cache ";
/// What a cache of another format holds that this node would misread.
const DROPPED: [&str; 4] = ["tiers", "variants", "manifests", "build"];

/// Makes `dir` a cache of `CACHE_FORMAT`: reused if it is one (or predates formats),
/// emptied if it is of another; returns the format found (0: none recorded).
pub fn prepare(dir: &Path) -> Result<u32> {
    let path = dir.join(FILE);
    let found = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .strip_prefix(PREFIX)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(u32::MAX),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    if found != 0 && found != CACHE_FORMAT {
        tracing::warn!(
            dir = %dir.display(), found, supported = CACHE_FORMAT,
            "the cache dir was written by another cache-node format; dropping its contents"
        );
        for name in DROPPED {
            let sub = dir.join(name);
            match std::fs::remove_dir_all(&sub) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", sub.display()), e)),
            }
        }
    }
    if found != CACHE_FORMAT {
        std::fs::write(&path, format!("{PREFIX}{CACHE_FORMAT}\n"))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_caches_are_reused_and_other_formats_dropped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
        std::fs::write(dir.path().join("manifests/a.json"), b"{}").unwrap();
        // Before formats were recorded: reused as it is, and recorded.
        assert_eq!(prepare(dir.path()).unwrap(), 0);
        assert!(dir.path().join("manifests/a.json").exists());
        assert_eq!(prepare(dir.path()).unwrap(), CACHE_FORMAT);
        // A newer node's cache: emptied, then recorded as ours.
        std::fs::write(dir.path().join(FILE), "modelcache-cache 99\n").unwrap();
        assert_eq!(prepare(dir.path()).unwrap(), 99);
        assert!(!dir.path().join("manifests").exists());
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text, format!("modelcache-cache {CACHE_FORMAT}\n"));
        // Something unreadable counts as another format.
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert_eq!(prepare(dir.path()).unwrap(), u32::MAX);
    }
}
