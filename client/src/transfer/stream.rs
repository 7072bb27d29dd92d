//! The node's `Fetch` stream as verified chunks: the manifest it starts with must be the
//! revision being downloaded; each chunk's BLAKE3 is computed on the blocking pool, several
//! chunks at once (so verification uses every core while bytes arrive), and checked
//! against the digest sent with it and the one the manifest announced, and its place
//! against the next one expected.

use std::time::Duration;

use futures::{Stream, StreamExt};
use modelcache_proto::Reference;
use modelcache_proto::v1::{self, FetchRequest, fetch_response};

use super::protocol;
use super::resume::normalize;
use super::writer::Verified;
use crate::error::{AgentError, Result};
use crate::node::{NodeClient, older_node};
use modelcache_proto::parts::CHECK_PROTOCOL;

/// Chunks being hashed at once; a little more than the cores so none waits for bytes.
fn hash_pipeline_depth() -> usize {
    std::thread::available_parallelism().map_or(4, |n| n.get() * 2)
}

/// Where the next chunk must start: file index and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Position {
    pub file: usize,
    pub offset: u64,
}

/// An open `Fetch`, after its manifest.
pub(super) struct Opened {
    pub stream: tonic::Streaming<v1::FetchResponse>,
}

/// Opens `Fetch` for the revision of `m` from `at` up to file `end` (exclusive); returns
/// the stream after its manifest.
pub(super) async fn open(
    client: &mut NodeClient,
    reference: &Reference,
    m: &v1::Manifest,
    at: Position,
    end: usize,
) -> Result<Opened> {
    let request = FetchRequest {
        reference: reference.to_string(),
        file: m.files[at.file].path.clone(),
        offset: at.offset,
        revision: m.revision.clone(),
        protocol: CHECK_PROTOCOL,
        max_chunks: 0,
        end_file: if end < m.files.len() { end as u32 } else { 0 },
    };
    let older = |s| older_node(s, reference);
    let mut stream = client.fetch(request).await.map_err(older)?.into_inner();
    let first = stream
        .message()
        .await
        .map_err(older)?
        .ok_or_else(|| protocol(reference, "stream ended before the manifest"))?;
    match first.item {
        Some(fetch_response::Item::Manifest(fm)) if fm.revision == m.revision => {
            // The manifest is known from Resolve: pass over the rest of its parts.
            let mut files = fm.files.len();
            while files < fm.file_count as usize {
                let next = stream.message().await?;
                match next.and_then(|n| n.item) {
                    Some(fetch_response::Item::ManifestPart(part)) => {
                        files += part.files.iter().filter(|f| f.first_chunk == 0).count();
                    }
                    _ => return Err(protocol(reference, "the manifest's parts ended early")),
                }
            }
            Ok(Opened { stream })
        }
        Some(fetch_response::Item::Manifest(fm)) => Err(AgentError::Aborted {
            message: format!(
                "{reference} changed to revision {} during the fetch; run again",
                fm.revision
            ),
        }),
        _ => Err(protocol(reference, "first message is not the manifest")),
    }
}

/// The messages of `stream`, ended by an error when none arrives for `idle`: a node that
/// stalls mid-stream must not keep the agent waiting forever.
fn with_idle_timeout<'a>(
    stream: tonic::Streaming<v1::FetchResponse>,
    idle: Duration,
    stalled: impl Fn() -> AgentError + Clone + 'a,
) -> impl Stream<Item = Result<v1::FetchResponse>> + 'a {
    futures::stream::unfold(Some(stream), move |state| {
        let stalled = stalled.clone();
        async move {
            let mut stream = state?;
            match tokio::time::timeout(idle, stream.message()).await {
                Ok(Ok(Some(message))) => Some((Ok(message), Some(stream))),
                Ok(Ok(None)) => None,
                Ok(Err(status)) => Some((Err(status.into()), None)),
                Err(_) => Some((Err(stalled()), None)),
            }
        }
    })
}

/// What the stream brings after the manifest.
pub(super) enum Received {
    /// A chunk with the BLAKE3 digest of its bytes.
    Chunk(v1::Chunk, [u8; 32]),
    /// A file's origin check.
    Check(v1::FileCheck),
}

/// The chunks of `stream` with their BLAKE3 digests, hashed several at a time, and the
/// files' origin checks, in order; an error if the node sends nothing for `idle`.
pub(super) fn hashed<'a>(
    stream: tonic::Streaming<v1::FetchResponse>,
    reference: &'a Reference,
    node: &'a str,
    idle: Duration,
) -> impl Stream<Item = Result<Received>> + 'a {
    let stalled = move || AgentError::Stalled {
        node: node.to_owned(),
        reference: reference.to_string(),
        seconds: idle.as_secs_f64().round() as u64,
    };
    with_idle_timeout(stream, idle, stalled)
        .map(move |item| async move {
            let chunk = match item?.item {
                Some(fetch_response::Item::Chunk(c)) => c,
                Some(fetch_response::Item::FileCheck(check)) => return Ok(Received::Check(check)),
                _ => return Err(protocol(reference, "expected a chunk after the manifest")),
            };
            tokio::task::spawn_blocking(move || {
                let digest = *blake3::hash(&chunk.data).as_bytes();
                Received::Chunk(chunk, digest)
            })
            .await
            .map_err(|e| AgentError::io("hashing", std::io::Error::other(e)))
        })
        .buffered(hash_pipeline_depth())
}

/// Checks a hashed chunk against the manifest and the position expected next; returns it
/// as verified and moves `at` past it.
pub(super) fn verify(
    reference: &Reference,
    m: &v1::Manifest,
    at: &mut Position,
    chunk: v1::Chunk,
    digest: [u8; 32],
) -> Result<Verified> {
    let Position { file, offset } = *at;
    let entry = &m.files[file];
    let expected_len = (entry.size - offset).min(m.chunk_size);
    if chunk.file_index as usize != file
        || chunk.offset != offset
        || chunk.data.len() as u64 != expected_len
    {
        return Err(protocol(
            reference,
            format!(
                "expected {expected_len} bytes of {} at {offset}, got {} bytes of file #{} at {}",
                entry.path,
                chunk.data.len(),
                chunk.file_index,
                chunk.offset
            ),
        ));
    }
    let index = (offset / m.chunk_size) as usize;
    let announced = entry.chunk_blake3.get(index).map(Vec::as_slice);
    if chunk.blake3 != digest || announced.is_some_and(|d| d != digest) {
        return Err(AgentError::Integrity {
            reference: reference.to_string(),
            path: entry.path.clone(),
            offset,
        });
    }
    let (next_file, next_offset) = normalize(m, file, offset + chunk.data.len() as u64);
    *at = Position {
        file: next_file,
        offset: next_offset,
    };
    Ok(Verified {
        file,
        offset,
        data: chunk.data,
        digest,
    })
}
