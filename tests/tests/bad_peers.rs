//! A peer that owns a model but sends wrong bytes, stalls, or serves another revision does
//! not poison another node's cache: the node checks digests and the revision on every
//! fill, gives a stalled peer up within `--peer-timeout`, and reads the origin instead.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_proto::v1::model_cache_server::{ModelCache, ModelCacheServer};
use modelcache_proto::v1::*;
use modelcache_testkit::*;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// Flips a byte of every chunk and sends the digest of the bytes it had.
    WrongBytes,
    /// Sends the manifest, then nothing.
    Stall,
    /// Says its stream is of another revision.
    OtherRevision,
}

/// A peer with id `liar` that answers from a real node (`honest`) and lies as told.
struct Liar {
    honest: ModelCacheClient<Channel>,
    lie: Lie,
    address: String,
}

#[tonic::async_trait]
impl ModelCache for Liar {
    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        self.honest.clone().resolve(request.into_inner()).await
    }

    type FetchStream = BoxStream<'static, Result<FetchResponse, Status>>;

    async fn fetch(
        &self,
        request: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let honest = self.honest.clone().fetch(request.into_inner()).await?;
        let lie = self.lie;
        let stream = honest.into_inner().map_ok(move |mut message| {
            match (&mut message.item, lie) {
                (Some(fetch_response::Item::Chunk(chunk)), Lie::WrongBytes) => {
                    let mut data = chunk.data.to_vec();
                    data[7] ^= 0x40;
                    chunk.data = data.into();
                }
                (Some(fetch_response::Item::Manifest(m)), Lie::OtherRevision) => {
                    m.revision = "0".repeat(32);
                }
                _ => {}
            }
            message
        });
        let stream = if lie == Lie::Stall {
            stream.take(1).chain(futures::stream::pending()).boxed()
        } else {
            stream.boxed()
        };
        Ok(Response::new(stream))
    }

    async fn prefetch(
        &self,
        _: Request<PrefetchRequest>,
    ) -> Result<Response<PrefetchResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("liar"))
    }

    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        Ok(Response::new(MembersResponse {
            node_id: "liar".into(),
            members: vec![Member {
                id: "liar".into(),
                address: self.address.clone(),
                healthy: true,
                local: true,
                detail: String::new(),
            }],
            ready: true,
        }))
    }
}

async fn serve_liar(honest: &TestNode, lie: Lie) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let liar = Liar {
        honest: honest.client().await,
        lie,
        address: addr.to_string(),
    };
    let (_reporter, health) = tonic_health::server::health_reporter();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ModelCacheServer::new(liar))
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await;
    });
    (addr, task)
}

/// A model name the liar owns against `victim`.
fn owned_by_liar() -> String {
    (0..)
        .map(|i| format!("m{i}"))
        .find(|name| modelcache_proto::rank::owner(name, ["liar", "victim"]) == Some("liar"))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_stalled_or_other_revision_fills_are_refused_and_the_origin_read_instead() {
    let name = owned_by_liar();
    let files: ModelFiles = vec![("weights.bin".into(), data(51, 9 << 20))];
    let sandbox = Sandbox::with_model(&name, &files).await;
    // The honest node the liar forwards to: it reads the origin on its own.
    let honest = sandbox.node().await;
    for lie in [Lie::WrongBytes, Lie::Stall, Lie::OtherRevision] {
        let (liar, task) = serve_liar(&honest, lie).await;
        let mut config = sandbox.node_config();
        config.peers = vec![liar.to_string()];
        config.node_id = Some("victim".into());
        config.probe_interval = Duration::from_millis(200);
        config.peer_timeout = Duration::from_secs(2);
        config.precompute = Default::default();
        let victim = TestNode::start(config).await;
        victim.wait_members(2).await;

        let started = Instant::now();
        let (_dir, fetched) = victim.prefetch_fresh(&name).await;
        let took = started.elapsed();
        assert_same_files(&fetched.path, &files);
        let stats = victim.stats();
        assert!(
            stats.peer_fill_failures > 0 && stats.peer_fill_bytes == 0,
            "{lie:?}: {stats:?}"
        );
        assert!(stats.origin_bytes >= 9 << 20, "{lie:?}: {stats:?}");
        if lie == Lie::Stall {
            // Given up on within the peer timeout, then marked down until a probe says
            // otherwise: not one timeout per chunk.
            assert!(took < Duration::from_secs(30), "{took:?}");
        }
        // What the victim keeps is the origin's bytes: a second copy from its tiers alone.
        let (_again, second) = victim.prefetch_fresh(&name).await;
        assert_same_files(&second.path, &files);
        victim.stop().await;
        task.abort();
    }
    honest.stop().await;
}
