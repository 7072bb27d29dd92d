//! The gRPC layer: decode the request, call the registry, translate the result. Every
//! `v1::` message the node sends is built here (and framed in `wire`); the table that
//! maps the domain's errors to gRPC codes is `code`.

use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use modelcache_proto::auth::{Action, Caller, authorize};
use modelcache_proto::parts::{self, CHECK_PROTOCOL, Cursor, MANIFEST_PROTOCOL, PART_BYTES};
use modelcache_proto::v1::model_cache_server::ModelCache;
use modelcache_proto::v1::{
    self, FetchResponse, ListRequest, ListResponse, MembersRequest, MembersResponse,
    PrefetchRequest, PrefetchResponse, PrefetchResult, ResolveRequest, ResolveResponse,
    fetch_response,
};
use modelcache_proto::{CHUNK_SIZE, Reference};
use modelcache_quant::Variant;
use tonic::{Code, Request, Response, Status};

use crate::access::RpcNote;
use crate::checks::Sent;
use crate::checksum::OriginCheck;
use crate::cluster::Cluster;
use crate::error::{Error, PeerFailure, quote};
use crate::manifest::{FileRecord, Provenance, Revision};
use crate::registry::{Chunk, FetchRequest, ManifestView, ModelListing, Registry, TierCounts};
use crate::variants::BuildState;

pub struct NodeService {
    registry: Arc<Registry>,
    cluster: Arc<Cluster>,
}

impl NodeService {
    pub fn new(registry: Arc<Registry>, cluster: Arc<Cluster>) -> Self {
        Self { registry, cluster }
    }
}

/// The gRPC code of each kind of error: what a client can do about it.
pub fn code(error: &Error) -> Code {
    match error {
        Error::InvalidReference(_)
        | Error::UnknownVariant { .. }
        | Error::VariantNotApplicable { .. } => Code::InvalidArgument,
        Error::ModelNotFound { .. } | Error::FileNotFound { .. } | Error::NotPinned { .. } => {
            Code::NotFound
        }
        Error::NoRoomToPin { .. } => Code::ResourceExhausted,
        Error::OffsetOutOfRange { .. } => Code::OutOfRange,
        Error::UnsafeModelPath { .. }
        | Error::OriginUnusableKey { .. }
        | Error::OriginSymlinkLoop { .. }
        | Error::OriginDenied { .. }
        | Error::VariantFailed { .. } => Code::FailedPrecondition,
        Error::OriginUnavailable { .. }
        | Error::OriginTruncated { .. }
        | Error::OriginReadFailed { .. }
        | Error::Origin { .. }
        | Error::ShuttingDown => Code::Unavailable,
        Error::OriginChanged { .. }
        | Error::OriginFileGone { .. }
        | Error::RevisionChanged { .. }
        | Error::RecordDiscarded { .. }
        | Error::OriginChecksumMismatch { .. }
        | Error::VariantEvicted { .. } => Code::Aborted,
        Error::Shared(inner) => code(inner),
        Error::Peer { failure, .. } => match failure {
            PeerFailure::Unavailable | PeerFailure::Corrupt => Code::Unavailable,
            PeerFailure::Mismatch => Code::Aborted,
            PeerFailure::NotFound => Code::NotFound,
            PeerFailure::Refused => Code::InvalidArgument,
            PeerFailure::Failed => Code::FailedPrecondition,
        },
        Error::ChunkCorrupt { .. }
        | Error::TaskFailed { .. }
        | Error::Tier { .. }
        | Error::ManifestIo { .. }
        | Error::Config(_)
        | Error::Cli(_)
        | Error::Io { .. } => Code::Internal,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        Status::new(code(&err), err.to_string())
    }
}

fn parse(reference: &str) -> Result<Reference, Status> {
    Reference::parse(reference).map_err(|e| Error::from(e).into())
}

/// The request's reference, parsed, once its caller may `action` it.
fn allowed<T>(request: &Request<T>, reference: &str, action: Action) -> Result<Reference, Status> {
    let reference = parse(reference)?;
    authorize(request.extensions(), action, Some(reference.name()))?;
    Ok(reference)
}

#[tonic::async_trait]
impl ModelCache for NodeService {
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        RpcNote::reference(request.extensions(), &request.get_ref().reference);
        let reference = allowed(&request, &request.get_ref().reference, Action::Fetch)?;
        let request = request.into_inner();
        let resolved = self.registry.resolve(&reference).await?;
        let rev = resolved.revision.clone();
        let at = if request.page_token.is_empty() {
            Cursor::default()
        } else {
            Cursor::parse(&request.page_token, &rev.id).ok_or_else(|| {
                if request.page_token.starts_with(&format!("{}:", rev.id)) {
                    Status::invalid_argument(format!(
                        "page_token {} is not one this node sent for {reference}; pass \
                         next_page_token back unchanged",
                        quote(&request.page_token)
                    ))
                } else {
                    Status::aborted(format!(
                        "{reference} is at revision {} now, not the one this page token \
                         belongs to; resolve it again from the start",
                        rev.id
                    ))
                }
            })?
        };
        let (files, next) = part(&rev, at);
        if (at != Cursor::default() || next.is_some()) && request.protocol < MANIFEST_PROTOCOL {
            return Err(too_old(&rev, request.protocol));
        }
        let mut manifest = manifest(self.registry.describe(resolved));
        manifest.files = files;
        manifest.origin_checks = request.protocol >= CHECK_PROTOCOL;
        Ok(Response::new(ResolveResponse {
            manifest: Some(manifest),
            next_page_token: next.map(|n| n.token(&rev.id)).unwrap_or_default(),
        }))
    }

    type FetchStream = BoxStream<'static, Result<FetchResponse, Status>>;

    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        RpcNote::reference(request.extensions(), &request.get_ref().reference);
        let reference = allowed(&request, &request.get_ref().reference, Action::Fetch)?;
        let req = request.into_inner();
        let protocol = req.protocol;
        let transfer = self
            .registry
            .open_fetch(FetchRequest {
                reference,
                revision: req.revision,
                file: req.file,
                offset: req.offset,
                max_chunks: req.max_chunks,
                end_file: (req.end_file > 0).then_some(req.end_file as usize),
                with_checks: protocol >= CHECK_PROTOCOL,
            })
            .await?;
        let rev = transfer.manifest.resolved.revision.clone();
        let (files, next) = part(&rev, Cursor::default());
        if next.is_some() && protocol < MANIFEST_PROTOCOL {
            return Err(too_old(&rev, protocol));
        }
        let mut first = manifest(transfer.manifest);
        first.files = files;
        first.origin_checks = protocol >= CHECK_PROTOCOL;
        let first = FetchResponse {
            item: Some(fetch_response::Item::Manifest(first)),
        };
        // The rest of the file list, a part at a time, then the chunks.
        let parts = stream::unfold(next, move |at| {
            let rev = rev.clone();
            async move {
                let (files, next) = part(&rev, at?);
                let message = FetchResponse {
                    item: Some(fetch_response::Item::ManifestPart(v1::ManifestPart {
                        files,
                    })),
                };
                Some((Ok(message), next))
            }
        });
        let chunks = transfer.items.map_ok(sent).map_err(Status::from);
        let body = stream::once(std::future::ready(Ok(first)))
            .chain(parts)
            .chain(chunks);
        Ok(Response::new(body.boxed()))
    }

    async fn prefetch(
        &self,
        request: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        RpcNote::reference(
            request.extensions(),
            &request.get_ref().references.join(","),
        );
        let references = request
            .get_ref()
            .references
            .iter()
            .map(|r| allowed(&request, r, Action::Prefetch))
            .collect::<Result<Vec<_>, _>>()?;
        let mut results = Vec::with_capacity(references.len());
        for reference in references {
            let mut result = PrefetchResult {
                reference: reference.to_string(),
                ..Default::default()
            };
            match self.registry.warm(&reference).await {
                Ok(warmed) => {
                    result.revision = warmed.revision;
                    result.total_size = warmed.total_size;
                    result.origin_bytes = warmed.origin_bytes;
                }
                Err(e) => result.error = e.to_string(),
            }
            results.push(result);
        }
        Ok(Response::new(PrefetchResponse { results }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        authorize(request.extensions(), Action::Fetch, None)?;
        let caller = request.extensions().get::<Caller>();
        let models = self.registry.list().await;
        Ok(Response::new(ListResponse {
            models: models
                .into_iter()
                .filter(|m| caller.is_none_or(|c| c.sees(&m.name)))
                .map(model_info)
                .collect(),
        }))
    }

    async fn members(
        &self,
        request: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        authorize(request.extensions(), Action::Fetch, None)?;
        let members = self
            .cluster
            .members()
            .into_iter()
            .map(|m| v1::Member {
                id: m.id,
                address: m.address,
                healthy: m.healthy,
                local: m.local,
                detail: m.detail,
            })
            .collect();
        Ok(Response::new(MembersResponse {
            node_id: self.cluster.id().to_owned(),
            members,
            ready: self.cluster.is_ready(),
        }))
    }
}

fn sent(sent: Sent<Chunk>) -> FetchResponse {
    let item = match sent {
        Sent::Chunk(chunk) => fetch_response::Item::Chunk(v1::Chunk {
            file_index: chunk.file_index,
            offset: chunk.offset,
            data: chunk.data,
            blake3: chunk.digest.to_vec(),
        }),
        Sent::Checked { file, check } => fetch_response::Item::FileCheck(file_check(file, check)),
    };
    FetchResponse { item: Some(item) }
}

fn file_check(file: usize, check: OriginCheck) -> v1::FileCheck {
    use v1::file_check::Result as Found;
    let (result, algorithm, detail) = match check {
        OriginCheck::Verified { algorithm } => (Found::Verified, algorithm.name(), String::new()),
        OriginCheck::Unchecked { reason } => (Found::Unchecked, "", reason),
        OriginCheck::Mismatch {
            algorithm,
            expected,
            found,
        } => (
            Found::Mismatch,
            algorithm.name(),
            format!(
                "the origin's {} is {expected}; the bytes read give {found}",
                algorithm.name()
            ),
        ),
    };
    v1::FileCheck {
        file_index: file as u32,
        result: result as i32,
        algorithm: algorithm.to_owned(),
        detail,
    }
}

/// The part of `rev`'s file list from `at` on that fits in one message, and where the next
/// part starts.
fn part(rev: &Revision, at: Cursor) -> (Vec<v1::FileEntry>, Option<Cursor>) {
    parts::cut(
        rev.files.len(),
        |i| file_entry(&rev.files[i]),
        at,
        PART_BYTES,
    )
}

/// A client that cannot read a manifest in parts, asking for one that needs them.
fn too_old(rev: &Revision, protocol: u32) -> Status {
    Status::failed_precondition(format!(
        "the manifest of {} ({} files) does not fit in one message and comes in parts, which \
         this client does not read (it speaks manifest protocol {protocol}; this node, \
         cache-node {}, speaks {MANIFEST_PROTOCOL}); upgrade the client to cache-agent {} or \
         later",
        rev.name,
        rev.files.len(),
        env!("CARGO_PKG_VERSION"),
        env!("CARGO_PKG_VERSION"),
    ))
}

/// The manifest's header, without files (`part` gives them a part at a time).
fn manifest(view: ManifestView) -> v1::Manifest {
    let rev = &view.resolved.revision;
    let stale_reason = view.resolved.stale_reason;
    v1::Manifest {
        name: rev.name.clone(),
        variant: rev.variant.clone(),
        revision: rev.id.clone(),
        chunk_size: CHUNK_SIZE,
        files: Vec::new(),
        file_count: rev.files.len() as u32,
        total_size: rev.total_size,
        stale: stale_reason.is_some(),
        stale_reason: stale_reason.unwrap_or_default(),
        tiers: Some(tiers(view.tiers)),
        variants: view.variants.into_iter().map(variant_state).collect(),
        // Set by the caller, which knows the client's protocol.
        origin_checks: false,
        file_ranges: true,
    }
}

fn file_entry(file: &FileRecord) -> v1::FileEntry {
    v1::FileEntry {
        path: file.origin.path.clone(),
        size: file.origin.size,
        etag: file.origin.etag.clone(),
        chunk_blake3: file
            .all_digests()
            .map(|d| d.iter().map(|x| x.to_vec()).collect())
            .unwrap_or_default(),
        sha256: file.sha256.get().cloned().unwrap_or_default(),
        provenance: file.provenance.clone().map(provenance),
        first_chunk: 0,
    }
}

fn provenance(p: Provenance) -> v1::Provenance {
    v1::Provenance {
        source_path: p.source_path,
        source_sha256: p.source_sha256,
        variant: p.variant,
        quantizer_version: p.quantizer_version,
        parameters: p.parameters,
    }
}

fn tiers(counts: TierCounts) -> v1::TierPresence {
    v1::TierPresence {
        total_chunks: counts.total_chunks,
        memory_chunks: counts.memory_chunks,
        disk_chunks: counts.disk_chunks,
    }
}

fn variant_state((variant, state): (Variant, BuildState)) -> v1::VariantState {
    use v1::variant_state::State;
    let mut out = v1::VariantState {
        variant: variant.to_string(),
        ..Default::default()
    };
    match state {
        BuildState::Absent => out.set_state(State::Absent),
        BuildState::Building => out.set_state(State::Building),
        BuildState::Ready {
            revision,
            total_size,
        } => {
            out.set_state(State::Ready);
            out.revision = revision;
            out.total_size = total_size;
        }
        BuildState::Failed { reason } => {
            out.set_state(State::Failed);
            out.reason = reason;
        }
    }
    out
}

fn model_info(model: ModelListing) -> v1::ModelInfo {
    v1::ModelInfo {
        name: model.name,
        cached: model
            .cached
            .into_iter()
            .map(
                |(rev, counts): (Arc<Revision>, TierCounts)| v1::CachedVariant {
                    variant: rev.variant.clone(),
                    revision: rev.id.clone(),
                    total_size: rev.total_size,
                    tiers: Some(tiers(counts)),
                },
            )
            .collect(),
        variants: model.variants.into_iter().map(variant_state).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_is_unavailable_and_shared_errors_keep_their_code() {
        assert_eq!(code(&Error::ShuttingDown), Code::Unavailable);
        let shared = Error::Shared(Arc::new(Error::UnknownVariant {
            variant: "int3".into(),
        }));
        assert_eq!(code(&shared), Code::InvalidArgument);
        let status = Status::from(Error::ShuttingDown);
        assert_eq!(status.code(), Code::Unavailable);
        assert!(status.message().contains("shutting down"), "{status:?}");
        let failed = Error::task_failed("building a variant", "panicked");
        assert_eq!(code(&failed), Code::Internal);
    }
}
