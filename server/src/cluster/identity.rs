//! A node's stable id: `--node-id` when given, else the one kept in `CACHE_DIR/node-id`,
//! generated once. Models are ranked by id, so a node that restarts (even at a new
//! address) owns what it owned.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};

const FILE: &str = "node-id";

/// The node's id: `given`, or the one saved in `cache_dir`, or a new one saved there.
pub fn node_id(cache_dir: &Path, given: Option<&str>) -> Result<String> {
    if let Some(id) = given {
        return checked(id.trim()).map(str::to_owned);
    }
    let path = cache_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => return checked(text.trim()).map(str::to_owned),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    }
    let id = generate();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{id}\n"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    tracing::info!(node_id = %id, path = %path.display(), "generated this node's id");
    Ok(id)
}

fn checked(id: &str) -> Result<&str> {
    let fine = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if fine {
        Ok(id)
    } else {
        Err(Error::Config(format!(
            "node id {id:?} is not 1-128 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// 16 random bytes in hex (from the kernel; the clock and process id if it has none).
fn generate() -> String {
    let mut bytes = [0u8; 16];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let mut h = blake3::Hasher::new();
        h.update(&format!("{:?}", std::time::SystemTime::now()).into_bytes());
        h.update(&std::process::id().to_le_bytes());
        bytes.copy_from_slice(&h.finalize().as_bytes()[..16]);
    }
    hex::encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_is_generated_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(dir.path(), None).unwrap();
        assert_eq!(first.len(), 32);
        assert_eq!(node_id(dir.path(), None).unwrap(), first);
        assert_eq!(node_id(dir.path(), Some("node-a")).unwrap(), "node-a");
        assert!(node_id(dir.path(), Some("a b")).is_err());
    }
}
