//! Another node, asked over gRPC: its manifest of a reference (`Resolve`, every part), and
//! one chunk of a pinned revision (`Fetch` of one chunk), with every digest checked.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use modelcache_proto::Reference;
use modelcache_proto::auth::WithToken;
use modelcache_proto::parts::{Assembly, MANIFEST_PROTOCOL, ResolveError, resolve_whole};
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_proto::v1::{self, FetchRequest, fetch_response};
use modelcache_proto::{CHUNK_SIZE, wire};
use modelcache_telemetry::propagation::Traced;
use tonic::transport::Channel;
use tracing::Instrument;

use crate::cache::ChunkValue;
use crate::error::{Error, PeerFailure, Result};
use crate::manifest::Provenance;
use crate::peers::{ChunkRequest, Peer, RemoteFile, RemoteManifest};

pub struct GrpcPeer {
    id: String,
    address: String,
    /// The channel, presenting this node's peer token when it has one.
    channel: WithToken<Channel>,
    /// Longest a request may take, a chunk's included: a stalled peer is given up on.
    timeout: Duration,
}

impl GrpcPeer {
    pub fn new(
        id: String,
        address: String,
        channel: WithToken<Channel>,
        timeout: Duration,
    ) -> Self {
        Self {
            id,
            address,
            channel,
            timeout,
        }
    }

    /// A client whose calls carry the current span's trace context (and the token).
    fn client(&self) -> ModelCacheClient<Traced<WithToken<Channel>>> {
        ModelCacheClient::new(Traced(self.channel.clone()))
            .max_decoding_message_size(wire::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(wire::MAX_MESSAGE_SIZE)
    }

    /// `ID at ADDRESS`, for messages.
    fn name(&self) -> String {
        format!("{} at {}", self.id, self.address)
    }

    fn error(&self, failure: PeerFailure, message: impl Into<String>) -> Error {
        Error::Peer {
            peer: self.name(),
            failure,
            message: message.into(),
        }
    }

    fn status(&self, status: &tonic::Status) -> Error {
        use tonic::Code;
        let failure = match status.code() {
            Code::NotFound => PeerFailure::NotFound,
            Code::InvalidArgument | Code::OutOfRange => PeerFailure::Refused,
            Code::Aborted => PeerFailure::Mismatch,
            Code::FailedPrecondition | Code::PermissionDenied | Code::Unauthenticated => {
                PeerFailure::Failed
            }
            _ => PeerFailure::Unavailable,
        };
        self.error(failure, status.message())
    }

    /// `work`, or an `Unavailable` failure once `self.timeout` has passed.
    async fn bounded<T>(&self, what: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(self.error(
                    PeerFailure::Unavailable,
                    format!(
                        "{what} did not finish within {} s; the peer is stalled",
                        self.timeout.as_secs_f64()
                    ),
                ))
            })
    }

    async fn resolve_all(&self, reference: &Reference) -> Result<RemoteManifest> {
        let span = crate::spans::peer_resolve(&self.name(), &reference.to_string());
        let resolved = self
            .resolve_remote(reference)
            .instrument(span.clone())
            .await;
        if let Ok(manifest) = &resolved {
            span.record("revision", manifest.revision.as_str());
        }
        crate::spans::outcome(&span, &resolved);
        resolved
    }

    async fn resolve_remote(&self, reference: &Reference) -> Result<RemoteManifest> {
        let manifest = resolve_whole(
            &mut self.client(),
            &reference.to_string(),
            MANIFEST_PROTOCOL,
        )
        .await
        .map_err(|e| match e {
            ResolveError::Status(s) => self.status(&s),
            ResolveError::Protocol(detail) => self.error(PeerFailure::Mismatch, detail),
        })?;
        self.remote(manifest)
    }

    fn remote(&self, manifest: v1::Manifest) -> Result<RemoteManifest> {
        let files = manifest
            .files
            .into_iter()
            .map(|f| {
                let chunks = modelcache_proto::chunk_count(f.size) as usize;
                let chunk_blake3 = if f.chunk_blake3.len() == chunks {
                    f.chunk_blake3
                        .iter()
                        .map(|d| <[u8; 32]>::try_from(d.as_slice()))
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map_err(|_| {
                            self.error(PeerFailure::Mismatch, "a chunk digest is not 32 bytes")
                        })?
                } else {
                    Vec::new()
                };
                Ok(RemoteFile {
                    path: f.path,
                    size: f.size,
                    etag: f.etag,
                    chunk_blake3,
                    sha256: (!f.sha256.is_empty()).then_some(f.sha256),
                    provenance: f.provenance.map(|p| Provenance {
                        source_path: p.source_path,
                        source_sha256: p.source_sha256,
                        variant: p.variant,
                        quantizer_version: p.quantizer_version,
                        parameters: p.parameters,
                    }),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RemoteManifest {
            peer: self.name(),
            name: manifest.name,
            variant: manifest.variant,
            revision: manifest.revision,
            files,
        })
    }

    async fn fetch_chunk(&self, request: ChunkRequest<'_>) -> Result<ChunkValue> {
        let span = crate::spans::peer_fill(
            &self.name(),
            request.reference,
            request.revision,
            request.path,
            request.index,
        );
        let filled = self.fetch_remote(request).instrument(span.clone()).await;
        if let Ok(value) = &filled {
            span.record("bytes", value.data.len());
        }
        crate::spans::outcome(&span, &filled);
        filled
    }

    async fn fetch_remote(&self, request: ChunkRequest<'_>) -> Result<ChunkValue> {
        let offset = request.index * CHUNK_SIZE;
        let mut stream = self
            .client()
            .fetch(FetchRequest {
                reference: request.reference.to_owned(),
                file: request.path.to_owned(),
                offset,
                revision: request.revision.to_owned(),
                protocol: MANIFEST_PROTOCOL,
                max_chunks: 1,
                end_file: 0,
            })
            .await
            .map_err(|s| self.status(&s))?
            .into_inner();
        let mut assembly: Option<Assembly> = None;
        let unexpected = |what: &str| self.error(PeerFailure::Mismatch, what.to_owned());
        loop {
            let message = stream
                .message()
                .await
                .map_err(|s| self.status(&s))?
                .ok_or_else(|| unexpected("the stream ended before the chunk"))?;
            match message.item {
                Some(fetch_response::Item::Manifest(m)) if assembly.is_none() => {
                    if m.revision != request.revision {
                        return Err(unexpected("the peer serves another revision"));
                    }
                    assembly = Some(Assembly::new(m).map_err(|e| unexpected(&e))?);
                }
                Some(fetch_response::Item::ManifestPart(part)) => assembly
                    .as_mut()
                    .ok_or_else(|| unexpected("a manifest part came before the manifest"))?
                    .add(part.files)
                    .map_err(|e| unexpected(&e))?,
                Some(fetch_response::Item::Chunk(chunk)) => {
                    let manifest = assembly
                        .map(Assembly::into_manifest)
                        .ok_or_else(|| unexpected("a chunk came before the manifest"))?;
                    return self.check(request, &manifest, chunk);
                }
                _ => return Err(unexpected("an unexpected message")),
            }
        }
    }

    /// The chunk, if it is the one asked for and its bytes match every digest known.
    fn check(
        &self,
        request: ChunkRequest<'_>,
        manifest: &v1::Manifest,
        chunk: v1::Chunk,
    ) -> Result<ChunkValue> {
        let file = manifest.files.get(chunk.file_index as usize);
        if file.is_none_or(|f| f.path != request.path) || chunk.offset != request.index * CHUNK_SIZE
        {
            return Err(self.error(PeerFailure::Mismatch, "the peer sent another chunk"));
        }
        let value = ChunkValue::new(chunk.data);
        let listed = file
            .and_then(|f| f.chunk_blake3.get(request.index as usize))
            .map(Vec::as_slice);
        let sent = chunk.blake3.as_slice();
        let expected = request.expected.as_ref().map(<[u8; 32]>::as_slice);
        let matches = [Some(sent), listed, expected]
            .into_iter()
            .flatten()
            .all(|d| d == value.digest.as_slice());
        if !matches {
            return Err(self.error(
                PeerFailure::Corrupt,
                format!(
                    "chunk {} of {}/{} fails its BLAKE3 digest; the bytes were dropped",
                    request.index, request.reference, request.path
                ),
            ));
        }
        Ok(value)
    }
}

impl Peer for GrpcPeer {
    fn id(&self) -> &str {
        &self.id
    }

    fn address(&self) -> &str {
        &self.address
    }

    fn resolve<'a>(&'a self, reference: &'a Reference) -> BoxFuture<'a, Result<RemoteManifest>> {
        if reference.is_original() {
            self.bounded("resolving through the peer", self.resolve_all(reference))
                .boxed()
        } else {
            // The owner answers once it has built the variant, which takes minutes for a
            // large model: no deadline here; a peer that dies meanwhile is noticed by the
            // connection's keep-alive (`--peer-timeout` after a missed ping).
            self.resolve_all(reference).boxed()
        }
    }

    fn chunk<'a>(&'a self, request: ChunkRequest<'a>) -> BoxFuture<'a, Result<ChunkValue>> {
        self.bounded("a chunk from the peer", self.fetch_chunk(request))
            .boxed()
    }
}
