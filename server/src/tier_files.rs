//! The disk tier's files: refusing a tier the filesystem cannot hold, reserving the
//! blocks of one that fits, and removing what a failed start created.

use std::path::Path;

use crate::error::{Error, Result};

/// The disk tier's files in `dir` (foyer's file device names them `foyer-storage-…`).
pub fn tier_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let io = |e| Error::io(format!("reading {}", dir.display()), e);
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("foyer-storage-")
        {
            files.push(entry.path());
        }
    }
    Ok(files)
}

/// Refuses a tier of `capacity` bytes that the filesystem cannot hold beside what the
/// tier's `existing` files already take.
pub fn check_room(dir: &Path, capacity: u64, existing: &[std::path::PathBuf]) -> Result<()> {
    use fs4::fs_std::FileExt;
    let io = |what: &Path, e| Error::io(format!("reserving {}", what.display()), e);
    let mut allocated = 0;
    for path in existing {
        let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
        allocated += file.allocated_size().map_err(|e| io(path, e))?;
    }
    let free = fs4::available_space(dir).map_err(|e| io(dir, e))?;
    let missing = capacity.saturating_sub(allocated);
    if missing > free {
        return Err(no_room(dir, missing, free));
    }
    Ok(())
}

fn no_room(dir: &Path, missing: u64, free: u64) -> Error {
    Error::Config(format!(
        "disk tier at {} needs {} MiB more and the filesystem has {} MiB free; lower \
         --disk-capacity or --variant-capacity, or free some space",
        dir.display(),
        missing.div_ceil(1 << 20),
        free >> 20
    ))
}

/// After a failed start: removes the tier files that were not there before it.
pub fn remove_new_files(dir: &Path, existing: &[std::path::PathBuf]) {
    for path in tier_files(dir).unwrap_or_default() {
        if !existing.contains(&path) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Allocates every file of the disk tier in full. foyer creates them sparse, so a filesystem
/// that fills up later (the agent's downloads, other programs) would fail the tier's writes
/// mid-flight, and foyer panics on such failures; with the blocks reserved here, a node whose
/// tiers do not fit stops at startup with an error that says so, before allocating anything.
pub fn reserve(dir: &Path) -> Result<()> {
    use fs4::fs_std::FileExt;
    let io = |what: &Path, e| Error::io(format!("reserving {}", what.display()), e);
    // One file open at a time: foyer holds each block's file open already, and a node near
    // its open-file limit must not need twice as many for a moment.
    let open = |path: &Path| -> Result<(std::fs::File, u64)> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| io(path, e))?;
        let len = file.metadata().map_err(|e| io(path, e))?.len();
        Ok((file, len))
    };
    let files = tier_files(dir)?;
    let mut missing = 0;
    for path in &files {
        let (file, len) = open(path)?;
        missing += len.saturating_sub(file.allocated_size().map_err(|e| io(path, e))?);
    }
    let free = fs4::available_space(dir).map_err(|e| io(dir, e))?;
    if missing > free {
        return Err(no_room(dir, missing, free));
    }
    for path in &files {
        let (file, len) = open(path)?;
        match file.allocate(len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                tracing::warn!(
                    dir = %dir.display(),
                    "this filesystem cannot reserve the disk tier's space; the tier's writes \
                     will fail if the filesystem fills up"
                );
                break;
            }
            Err(e) => return Err(io(path, e)),
        }
    }
    Ok(())
}
