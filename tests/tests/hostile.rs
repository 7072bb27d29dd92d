//! A hostile node (or a peer impersonating one) cannot make the agent write outside its
//! directory: manifests with unsafe paths are refused before anything is written, and
//! chunks that do not match their digests are never kept.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use cache_agent::{AgentError, Progress};
use futures::stream::{self, BoxStream};
use modelcache_proto::v1::model_cache_server::{ModelCache, ModelCacheServer};
use modelcache_proto::v1::*;
use modelcache_proto::{CHUNK_SIZE, Reference};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Serves one fixed manifest and the given chunk bytes, whatever is asked.
#[derive(Clone)]
struct HostileNode {
    files: Vec<(String, Bytes)>,
    /// Digest to announce for each chunk; `None` = the true one.
    wrong_digest: bool,
    /// What it says of origin checks.
    checks: Checks,
}

/// The origin checks a hostile node claims.
#[derive(Clone, Copy, Default, PartialEq)]
enum Checks {
    /// None, like a node from before checks.
    #[default]
    Absent,
    /// Announced in the manifest, never sent.
    Promised,
    /// Every file fails its check.
    Mismatch,
}

impl HostileNode {
    fn manifest(&self, reference: &str) -> Manifest {
        let r = Reference::parse(reference).unwrap();
        Manifest {
            name: r.name().into(),
            variant: r.variant().into(),
            revision: "abcdef".into(),
            chunk_size: CHUNK_SIZE,
            files: self
                .files
                .iter()
                .map(|(p, b)| FileEntry {
                    path: p.clone(),
                    size: b.len() as u64,
                    ..Default::default()
                })
                .collect(),
            total_size: self.files.iter().map(|(_, b)| b.len() as u64).sum(),
            origin_checks: self.checks != Checks::Absent,
            ..Default::default()
        }
    }
}

#[tonic::async_trait]
impl ModelCache for HostileNode {
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        Ok(Response::new(ResolveResponse {
            manifest: Some(self.manifest(&request.get_ref().reference)),
            next_page_token: String::new(),
        }))
    }

    type FetchStream = BoxStream<'static, Result<FetchResponse, Status>>;

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let mut items = vec![Ok(FetchResponse {
            item: Some(fetch_response::Item::Manifest(
                self.manifest(&request.get_ref().reference),
            )),
        })];
        for (i, (_, bytes)) in self.files.iter().enumerate() {
            for (c, piece) in bytes.chunks(CHUNK_SIZE as usize).enumerate() {
                let mut digest = blake3::hash(piece).as_bytes().to_vec();
                if self.wrong_digest {
                    digest[0] ^= 1;
                }
                items.push(Ok(FetchResponse {
                    item: Some(fetch_response::Item::Chunk(Chunk {
                        file_index: i as u32,
                        offset: c as u64 * CHUNK_SIZE,
                        data: Bytes::copy_from_slice(piece),
                        blake3: digest,
                    })),
                }));
            }
            if self.checks == Checks::Mismatch {
                items.push(Ok(FetchResponse {
                    item: Some(fetch_response::Item::FileCheck(FileCheck {
                        file_index: i as u32,
                        result: file_check::Result::Mismatch as i32,
                        algorithm: "md5".into(),
                        detail: "the origin's md5 is 00; the bytes read give 11".into(),
                    })),
                }));
                items.push(Err(Status::aborted("the bytes differ from the origin's")));
                break;
            }
        }
        Ok(Response::new(Box::pin(stream::iter(items))))
    }

    async fn prefetch(
        &self,
        _: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        Err(Status::unimplemented("hostile"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("hostile"))
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Err(Status::unimplemented("hostile"))
    }
}

async fn serve(node: HostileNode) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(ModelCacheServer::new(node))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (addr, task)
}

/// A prefetch of `victim` from the node at `addr` into a fresh directory, which must fail.
async fn prefetch_victim(addr: SocketAddr) -> (tempfile::TempDir, AgentError) {
    let dir = tempfile::tempdir().unwrap();
    let agent = cache_agent::Agent::new(vec![format!("http://{addr}")], dir.path());
    let err = agent
        .prefetch(&Reference::parse("victim").unwrap(), &Progress::hidden())
        .await
        .unwrap_err();
    (dir, err)
}

/// Everything below `root`, relative.
fn tree(root: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            out.push(e.path().strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

/// A 300-byte file name: S3 keys may hold it, local filesystems cannot.
const LONG_NAME: &str = "nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn.bin";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_are_refused_and_nothing_lands_outside() {
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("../x", b"escape")],
        vec![("/etc/x", b"absolute")],
        vec![("x", b"file"), ("x/y", b"nested")],
        vec![("a/../../x", b"escape")],
        vec![("ok.txt", b"fine"), ("a\0b", b"nul")],
        vec![
            ("ok.txt", b"fine"),
            (LONG_NAME, b"no filesystem holds this name"),
        ],
    ];
    for files in cases {
        let sandbox = tempfile::tempdir().unwrap();
        let dir = sandbox.path().join("agent");
        let node = HostileNode {
            files: files
                .iter()
                .map(|(p, b)| ((*p).to_owned(), Bytes::copy_from_slice(b)))
                .collect(),
            wrong_digest: false,
            checks: Checks::Absent,
        };
        let (addr, task) = serve(node).await;
        let agent = cache_agent::Agent::new(vec![format!("http://{addr}")], &dir);
        let err = agent
            .prefetch(&Reference::parse("victim").unwrap(), &Progress::hidden())
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::UnsafePath { .. }),
            "{files:?}: {err:?}"
        );
        let shown = format!("{err}");
        assert!(shown.contains("unsafe file path"), "{shown}");
        let everything = tree(sandbox.path());
        assert!(
            everything
                .iter()
                .all(|p| p == "agent" || p.starts_with("agent/")),
            "{everything:?}"
        );
        assert!(
            !everything
                .iter()
                .any(|p| p.ends_with("x") || p.contains("@")),
            "{everything:?}"
        );
        task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_failing_their_digest_are_never_published() {
    let data = Arc::new(modelcache_testkit::data(3, 3 * CHUNK_SIZE as usize));
    let node = HostileNode {
        files: vec![("model.onnx".into(), Bytes::from(data.to_vec()))],
        wrong_digest: true,
        checks: Checks::Absent,
    };
    let (addr, task) = serve(node).await;
    let (dir, err) = prefetch_victim(addr).await;
    assert!(matches!(err, AgentError::Integrity { .. }), "{err:?}");
    assert!(!dir.path().join("victim/@original").exists());
    task.abort();
}

/// A file is published only after its origin check: a node that announces checks and
/// never sends them, or reports a mismatch every time, gets nothing published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_published_only_after_their_origin_check() {
    let data = modelcache_testkit::data(4, 3 * CHUNK_SIZE as usize + 5);
    for (checks, expected) in [
        (Checks::Promised, "before the origin check of model.bin"),
        (Checks::Mismatch, "differs from its origin's checksum"),
    ] {
        let (addr, task) = serve(HostileNode {
            files: vec![("model.bin".into(), Bytes::from(data.clone()))],
            wrong_digest: false,
            checks,
        })
        .await;
        let (dir, err) = prefetch_victim(addr).await;
        assert!(err.to_string().contains(expected), "{err}");
        assert!(
            tree(dir.path()).iter().all(|p| !p.contains("@original")),
            "{:?}",
            tree(dir.path())
        );
        task.abort();
    }
}

/// A node from before manifests came in parts sends a large manifest whole; the agent's
/// 4 MiB limit trips, and it says the node is older and needs an upgrade (instead of a
/// bare "message length too large").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_node_sending_a_manifest_over_4_mib_is_named_as_older() {
    let files = (0..60_000)
        .map(|i| {
            (
                format!("layers/{i:05}/{}.bin", "w".repeat(60)),
                Bytes::new(),
            )
        })
        .collect();
    let (addr, _task) = serve(HostileNode {
        files,
        wrong_digest: false,
        checks: Checks::Absent,
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let agent = cache_agent::Agent::new(vec![format!("http://{addr}")], dir.path());
    let reference = Reference::parse("org/wide").unwrap();
    for err in [
        agent.stat(&reference).await.unwrap_err(),
        agent
            .prefetch(&reference, &Progress::hidden())
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err, AgentError::FailedPrecondition { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("cache-node older than") && message.contains("upgrade the node"),
            "{message}"
        );
    }
    assert!(tree(dir.path()).iter().all(|p| !p.contains("@original")));
}
