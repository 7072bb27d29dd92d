//! Replacing the bad chunks of a published revision (found by `verify` or the daemon's
//! background check and recorded by `Layout::mark_damaged`): each is fetched from the
//! node pinned to the revision (`Fetch` of one chunk), checked against the BLAKE3 the
//! local manifest recorded when it was first verified, and written in place. Only the bad
//! chunks move.

use std::os::unix::fs::FileExt;

use futures::StreamExt;
use modelcache_proto::Reference;
use modelcache_proto::parts::CHECK_PROTOCOL;
use modelcache_proto::v1::{FetchRequest, fetch_response};

use super::{Connection, protocol};
use crate::error::{AgentError, Result};
use crate::layout::{BadChunk, Layout, LocalManifest};
use crate::node::older_node;
use crate::progress::Progress;

/// Fetches and rewrites `bad` chunks of the local revision `local`; returns the bytes
/// received. The damage record is cleared once every chunk is good again.
pub(super) async fn repair(
    conn: Connection<'_>,
    layout: &Layout,
    reference: &Reference,
    local: &LocalManifest,
    bad: &[BadChunk],
    progress: &Progress,
) -> Result<u64> {
    let dir = layout.revision_dir(reference, &local.revision);
    let total: u64 = bad.iter().filter_map(|b| chunk_len(local, b)).sum();
    progress.start(reference, total, 0);
    let mut received = 0u64;
    for b in bad {
        let Some((index, file)) = local
            .files
            .iter()
            .enumerate()
            .find(|(_, f)| f.path == b.path)
        else {
            continue; // not a file of this revision: nothing to repair
        };
        let Some(expected) = file.chunk_blake3.get(b.chunk as usize) else {
            continue;
        };
        let offset = b.chunk * local.chunk_size;
        let request = FetchRequest {
            reference: reference.to_string(),
            file: file.path.clone(),
            offset,
            revision: local.revision.clone(),
            protocol: CHECK_PROTOCOL,
            max_chunks: 1,
            end_file: 0,
        };
        let older = |s| older_node(s, reference);
        let mut stream = conn
            .client
            .clone()
            .fetch(request)
            .await
            .map_err(older)?
            .into_inner();
        let mut data = None;
        while let Some(message) = tokio::time::timeout(conn.idle_timeout, stream.next())
            .await
            .map_err(|_| AgentError::Stalled {
                node: conn.node.to_owned(),
                reference: reference.to_string(),
                seconds: conn.idle_timeout.as_secs(),
            })?
        {
            match message.map_err(older)?.item {
                Some(fetch_response::Item::Manifest(m)) if m.revision != local.revision => {
                    return Err(AgentError::Aborted {
                        message: format!(
                            "{reference} is at revision {} on the node, not {}; fetching it again",
                            m.revision, local.revision
                        ),
                    });
                }
                Some(fetch_response::Item::Chunk(c)) => {
                    if c.file_index as usize != index || c.offset != offset {
                        return Err(protocol(
                            reference,
                            "the node sent another chunk than asked",
                        ));
                    }
                    data = Some(c.data);
                    break;
                }
                _ => {}
            }
        }
        let data = data.ok_or_else(|| protocol(reference, "no chunk in the node's answer"))?;
        if blake3::hash(&data).to_hex().as_str() != expected {
            return Err(AgentError::Integrity {
                reference: reference.to_string(),
                path: file.path.clone(),
                offset,
            });
        }
        let path = dir.join(&file.path);
        let n = data.len() as u64;
        tokio::task::spawn_blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.write_all_at(&data, offset).and_then(|()| f.sync_data()))
                .map_err(|e| AgentError::io(format!("repairing {}", path.display()), e))
        })
        .await
        .map_err(|e| AgentError::io("repair", std::io::Error::other(e)))??;
        received += n;
        progress.inc(n);
        progress.pace(n).await;
    }
    progress.finish();
    layout.clear_damaged(reference, &local.revision);
    tracing::info!(%reference, revision = %local.revision, chunks = bad.len(), bytes = received, "repaired");
    Ok(received)
}

fn chunk_len(local: &LocalManifest, b: &BadChunk) -> Option<u64> {
    let file = local.files.iter().find(|f| f.path == b.path)?;
    let start = b.chunk * local.chunk_size;
    (start < file.size).then(|| (file.size - start).min(local.chunk_size))
}
