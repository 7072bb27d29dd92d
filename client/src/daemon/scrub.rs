//! The daemon's background re-check of what is on disk: every chunk of every local model
//! re-hashed at a bounded rate (`--verify-rate`), so a host with hundreds of GB of
//! models serves at once and still finds bit rot. A chunk that fails is recorded
//! (`Layout::mark_damaged`) and the model queued: the next fetch replaces only the bad
//! chunks, and `Ensure` fetches before answering while the mark is there.

use std::sync::Arc;
use std::time::Duration;

use super::Daemon;
use crate::layout::BadChunk;
use crate::verify::chunk_blake3;

/// When the first pass starts (after the daemon serves), and how long between passes.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(5);
const PASS_EVERY: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn run(daemon: Arc<Daemon>) {
    let rate = daemon.options.verify_rate;
    if rate == 0 {
        return;
    }
    tokio::time::sleep(FIRST_PASS_AFTER).await;
    loop {
        let layout = daemon.agent.layout().clone();
        let models = {
            let layout = layout.clone();
            tokio::task::spawn_blocking(move || layout.list())
                .await
                .unwrap_or_default()
        };
        let mut checked = 0u64;
        // One chunk buffer for the pass, lent to each blocking read.
        let mut buf = Vec::new();
        for model in models {
            let r = model.reference;
            if daemon.progress_of(&r).is_some() {
                continue;
            }
            let Some(manifest) = layout.current(&r) else {
                continue;
            };
            let dir = layout.revision_dir(&r, &manifest.revision);
            let mut bad = Vec::new();
            for file in &manifest.files {
                for (index, expected) in file.chunk_blake3.iter().enumerate() {
                    let start = index as u64 * manifest.chunk_size;
                    let len = (file.size - start).min(manifest.chunk_size);
                    let path = dir.join(&file.path);
                    let chunk_size = manifest.chunk_size;
                    let expected = expected.clone();
                    let mut chunk_buf = std::mem::take(&mut buf);
                    chunk_buf.resize(chunk_size as usize, 0);
                    let (good, back) = tokio::task::spawn_blocking(move || {
                        let found = chunk_blake3(&path, index as u64, chunk_size, &mut chunk_buf);
                        (found.map(|h| h == expected), chunk_buf)
                    })
                    .await
                    .unwrap_or((Ok(true), Vec::new()));
                    buf = back;
                    let good = good.unwrap_or(false);
                    if !good {
                        bad.push(BadChunk {
                            path: file.path.clone(),
                            chunk: index as u64,
                        });
                    }
                    checked += len;
                    tokio::time::sleep(Duration::from_secs_f64(len as f64 / rate as f64)).await;
                }
            }
            if !bad.is_empty() {
                tracing::warn!(
                    reference = %r, revision = %manifest.revision, chunks = bad.len(),
                    "local copy has chunks that fail their BLAKE3 check; fetching them again"
                );
                if let Err(e) = layout.mark_damaged(&r, &manifest.revision, &bad) {
                    tracing::warn!(reference = %r, "cannot record the damage: {e}");
                }
                daemon.queue(&[r]);
            }
        }
        tracing::info!(bytes = checked, "background check of local models done");
        tokio::time::sleep(PASS_EVERY).await;
    }
}
