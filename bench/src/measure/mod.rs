//! The parts of the benchmark: timing and checks here, the reference tools
//! (`references`), the processes measured (`processes`), and the table (`table`).

mod processes;
mod references;
mod table;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use sha2::Digest;

pub use processes::*;
pub use references::*;
pub use table::{Row, Table};

/// Flushes dirty pages and drops the page cache (root only; a no-op otherwise), so each
/// timed run starts from the same state and does not pay for the previous run's writeback.
pub fn drop_page_cache() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Runs `f` after `drop_page_cache`, and times it.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    drop_page_cache();
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed()))
}

pub async fn timed_async<T>(f: impl Future<Output = Result<T>>) -> Result<(T, Duration)> {
    drop_page_cache();
    let start = Instant::now();
    let out = f.await?;
    Ok((out, start.elapsed()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn check_sha(path: &Path, expected: &str) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    ensure!(
        hex::encode(hasher.finalize()) == expected,
        "{} differs from the origin",
        path.display()
    );
    Ok(())
}

/// A gRPC client that fetches a model from the node and discards the bytes; with `verify`
/// it checks every chunk's BLAKE3 first, as the agent does. Returns the bytes received.
pub async fn fetch_discard(url: &str, reference: &str, verify: bool) -> Result<u64> {
    let mut client = cache_agent::node::connect(&[url.to_owned()], &credentials()).await?;
    let mut stream = client
        .fetch(modelcache_proto::v1::FetchRequest {
            reference: reference.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(msg) = stream.message().await? {
        if let Some(modelcache_proto::v1::fetch_response::Item::Chunk(c)) = msg.item {
            bytes += c.data.len() as u64;
            if verify {
                let ok = tokio::task::spawn_blocking(move || {
                    blake3::hash(&c.data).as_bytes().as_slice() == c.blake3.as_slice()
                })
                .await?;
                ensure!(ok, "a chunk failed its BLAKE3");
            }
        }
    }
    Ok(bytes)
}

/// Removes a file or a directory tree, ignoring what is not there.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    let _ = std::fs::remove_file(path);
}
