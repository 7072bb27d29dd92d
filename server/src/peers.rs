//! What the node's domain needs from the cluster, without gRPC: for a model, the members
//! in rank order (this node among them), and, for each other member, a way to resolve a
//! reference through it and to read one chunk of a pinned revision from it. The
//! `cluster` module implements both over the network; a node without `--peers` has no
//! routing and does everything itself.

use std::sync::Arc;

use futures::future::BoxFuture;
use modelcache_proto::Reference;
use std::future::Future;

use crate::cache::ChunkValue;
use crate::error::Result;
use crate::manifest::{FileRecord, Provenance, Revision};
use crate::origin::OriginFile;

/// Where one step of a model's rank order goes.
#[derive(Clone)]
pub enum Route {
    /// This node: it lists the origin and builds variants itself.
    Local,
    /// Another member, healthy as far as this node knows.
    Peer(Arc<dyn Peer>),
}

impl Route {
    pub fn is_local(&self) -> bool {
        matches!(self, Route::Local)
    }
}

/// Who owns which model, as this node sees the cluster.
pub trait Routing: Send + Sync {
    /// The healthy members in `model`'s rank order, owner first; this node is always in
    /// it (as `Route::Local`).
    fn routes(&self, model: &str) -> Vec<Route>;

    /// Peer `id` failed a request: rank it down until its next probe succeeds.
    fn suspect(&self, _id: &str, _detail: &str) {}

    /// Whether this node is the first in rank for `model`.
    fn owns(&self, model: &str) -> bool {
        self.routes(model).first().is_none_or(Route::is_local)
    }
}

/// Another member of the cluster.
pub trait Peer: Send + Sync {
    /// Its node id.
    fn id(&self) -> &str;

    /// Its address, for messages.
    fn address(&self) -> &str;

    /// The manifest `reference` resolves to on the peer, every part of it.
    fn resolve<'a>(&'a self, reference: &'a Reference) -> BoxFuture<'a, Result<RemoteManifest>>;

    /// Chunk `index` of file `path` of revision `revision` of `reference`, its digest
    /// checked against the one the peer sent and, when given, against `expected`.
    fn chunk<'a>(&'a self, request: ChunkRequest<'a>) -> BoxFuture<'a, Result<ChunkValue>>;
}

/// Asks the members in `routes` one by one, in rank order, until one answers: `Some`
/// with its answer; `None` once the order reaches this node (`Route::Local`) or runs out,
/// so that the caller does the work itself. A peer that fails in a way the next may not
/// (unreachable, stalled, wrong bytes, another revision) is logged, ranked down, counted
/// with `failed`, and passed over; any other failure is the answer.
pub async fn ask_in_rank<'a, T, F>(
    routes: &'a [Route],
    routing: &dyn Routing,
    what: &str,
    mut failed: impl FnMut(),
    mut ask: impl FnMut(&'a dyn Peer) -> F,
) -> Result<Option<T>>
where
    F: Future<Output = Result<T>>,
{
    for route in routes {
        let Route::Peer(peer) = route else { break };
        match ask(peer.as_ref()).await {
            Ok(answer) => return Ok(Some(answer)),
            Err(e) if e.try_next_peer() => {
                failed();
                tracing::warn!(peer = peer.id(), "{what}: {e}; trying the next in rank");
                routing.suspect(peer.id(), &e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One chunk asked of a peer.
#[derive(Clone, Copy)]
pub struct ChunkRequest<'a> {
    pub reference: &'a str,
    pub revision: &'a str,
    pub path: &'a str,
    pub index: u64,
    /// The digest this node has on record for the chunk, if any.
    pub expected: Option<[u8; 32]>,
}

/// A manifest as a peer sent it.
#[derive(Clone, Debug)]
pub struct RemoteManifest {
    /// The peer that sent it, for messages (`ID at ADDRESS`).
    pub peer: String,
    pub name: String,
    pub variant: String,
    pub revision: String,
    pub files: Vec<RemoteFile>,
}

#[derive(Clone, Debug)]
pub struct RemoteFile {
    pub path: String,
    pub size: u64,
    pub etag: String,
    /// Every chunk's BLAKE3 digest, or empty when the peer does not know them all yet.
    pub chunk_blake3: Vec<[u8; 32]>,
    /// Lower-case hex SHA-256, when the peer knows it.
    pub sha256: Option<String>,
    /// Set on a file a variant built.
    pub provenance: Option<Provenance>,
}

impl RemoteFile {
    /// The file as the owner listed it from the origin (or, built, as it named it).
    pub fn origin_file(&self) -> OriginFile {
        OriginFile {
            path: self.path.clone(),
            size: self.size,
            etag: self.etag.clone(),
        }
    }
}

impl RemoteManifest {
    /// The files as the owner listed them.
    pub fn origin_files(&self) -> Vec<OriginFile> {
        self.files.iter().map(RemoteFile::origin_file).collect()
    }

    /// The revision of a variant its owner built, as this node keeps it: the built files'
    /// chunks in the variant tier, the copied files' in the originals' (the same keys as
    /// the original's), every digest the owner sent on record. `source` is the original
    /// revision it was built from.
    pub fn variant_revision(&self, source: &str) -> Revision {
        let records = self
            .files
            .iter()
            .map(|f| {
                let built = f.provenance.is_some();
                let origin = f.origin_file();
                let variant = if built {
                    self.variant.as_str()
                } else {
                    modelcache_proto::reference::ORIGINAL
                };
                let mut record = FileRecord::new(&self.name, variant, origin);
                record.built = built;
                record.provenance = f.provenance.clone();
                for (slot, digest) in record.digests.iter().zip(&f.chunk_blake3) {
                    let _ = slot.set(*digest);
                }
                if let Some(sha) = &f.sha256 {
                    let _ = record.sha256.set(sha.clone());
                }
                record
            })
            .collect();
        let mut rev =
            Revision::from_records(&self.name, &self.variant, self.revision.clone(), records);
        rev.source = Some(source.to_owned());
        rev
    }
}
