//! Bad input gets a clear, typed error and changes nothing.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cache_agent::{AgentError, Progress};
use futures::StreamExt;
use modelcache_proto::Reference;
use modelcache_proto::v1::{FetchRequest, ResolveRequest, fetch_response};
use modelcache_testkit::*;
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

async fn node_with(s3: &S3Server) -> (TestNode, tempfile::TempDir) {
    let cache = tempfile::tempdir().unwrap();
    (TestNode::start(node_config(s3, cache.path())).await, cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_and_folder_are_not_found_with_names() {
    let s3 = S3Server::start().await;
    seed(
        &s3,
        "org/minilm",
        &vec![("config.json".into(), b"{}".to_vec())],
    )
    .await;
    let (node, _cache) = node_with(&s3).await;
    let mut client = node.client().await;

    let err = client
        .resolve(ResolveRequest {
            reference: "nosuchmodel".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("\"nosuchmodel\""),
        "{}",
        err.message()
    );

    let err = client
        .resolve(ResolveRequest {
            reference: "org".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("org/minilm"),
        "lists the models inside: {}",
        err.message()
    );

    let dir = tempfile::tempdir().unwrap();
    let err = node
        .agent(dir.path())
        .prefetch(&r("nosuchmodel"), &Progress::hidden())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    assert!(err.to_string().contains("nosuchmodel"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );

    let err = client
        .resolve(ResolveRequest {
            reference: "org/minilm:int8".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    // The model has no weight file int8 applies to.
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("int8"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_references_are_invalid_argument_before_any_io() {
    let s3 = S3Server::start().await;
    let (node, _cache) = node_with(&s3).await;
    let mut client = node.client().await;
    s3.tap.reset();
    let long = "a".repeat(300);
    for bad in [
        "../x",
        "/abs",
        "a//b",
        "",
        long.as_str(),
        "a:",
        "x/.hidden",
        "a\u{7}b",
        "a b",
    ] {
        let err = client
            .resolve(ResolveRequest {
                reference: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
        assert!(
            err.message().contains("invalid model reference"),
            "{}",
            err.message()
        );
        let err = client
            .fetch(FetchRequest {
                reference: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}");
    }
    assert_eq!(
        s3.tap.requests.load(Ordering::SeqCst),
        0,
        "the origin was touched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_is_named() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}");
    let dir = tempfile::tempdir().unwrap();
    let agent = cache_agent::Agent::new(vec![url.clone()], dir.path());
    let err = agent
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains(&url), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_with_nothing_cached_is_unavailable() {
    let mut s3 = S3Server::start().await;
    let (node, _cache) = node_with(&s3).await;
    s3.stop();
    let mut client = node.client().await;
    let err = client
        .resolve(ResolveRequest {
            reference: "resnet50".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("s3://models"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_refusing_credentials_is_failed_precondition_naming_origin() {
    let sandbox = Sandbox::start().await;
    sandbox
        .seed("resnet50", &vec![("model.onnx".into(), data(1, 1000))])
        .await;
    let mut config = sandbox.node_config();
    config.s3_secret_access_key = Some("wrong-secret".into());
    let node = TestNode::start(config).await;
    let mut client = node.client().await;
    let err = client
        .resolve(ResolveRequest {
            reference: "resnet50".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("s3://models"), "{}", err.message());
    assert!(err.message().contains("credentials"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_origin_response_is_an_error_and_nothing_bad_is_cached() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![("model.onnx".into(), data(2, 5 * MIB))];
    seed(&s3, "resnet50", &files).await;
    let (node, _cache) = node_with(&s3).await;
    s3.tap.cut_after.store(1000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let agent = node.agent(dir.path());
    let err = agent
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unavailable), "{err:?}");
    assert!(err.to_string().contains("cut short"), "{err}");
    assert!(!dir.path().join("resnet50/@original").exists());

    s3.tap.cut_after.store(0, Ordering::SeqCst);
    let fetched = agent
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_object_beside_its_own_folder_is_refused() {
    // A filesystem cannot hold `x` beside `x/y`, but an object store can: use an in-memory
    // store as the origin.
    use object_store::{ObjectStoreExt, memory::InMemory, path::Path};
    let store = std::sync::Arc::new(InMemory::new());
    store
        .put(&Path::from("evil/x"), b"file".to_vec().into())
        .await
        .unwrap();
    store
        .put(&Path::from("evil/x/y"), b"nested".to_vec().into())
        .await
        .unwrap();
    let origin = cache_node::origin::Origin::new(store, Path::default(), "memory://");
    let cache = tempfile::tempdir().unwrap();
    let mut config = cache_node::Config::with_origin("unused", cache.path());
    config.disk_capacity = bytesize::ByteSize::mib(256);
    config.variant_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start_with(
        cache_node::Node::with_origin(&config, origin)
            .await
            .unwrap(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let err = node
        .agent(dir.path())
        .prefetch(&r("evil"), &Progress::hidden())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err:?}");
    assert!(err.to_string().contains("\"x\""), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_stream_does_not_hurt_others() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![("model.onnx".into(), data(8, 20 * MIB))];
    seed(&s3, "resnet50", &files).await;
    let (node, _cache) = node_with(&s3).await;
    s3.tap.get_delay_ms.store(20, Ordering::SeqCst);
    for _ in 0..3 {
        let mut client = node.client().await;
        let mut stream = client
            .fetch(FetchRequest {
                reference: "resnet50".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert!(matches!(
            first.item,
            Some(fetch_response::Item::Manifest(_))
        ));
        let second = stream.next().await.unwrap().unwrap();
        assert!(matches!(second.item, Some(fetch_response::Item::Chunk(_))));
        drop(stream);
        drop(client);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_origin_is_a_new_revision_and_errors_serve_stale() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let v1: ModelFiles = vec![("model.onnx".into(), data(10, 3 * MIB))];
    sandbox.seed("resnet50", &v1).await;
    let mut config = sandbox.node_config();
    config.revalidate_after = Duration::from_millis(1500);
    let node = TestNode::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    let agent = node.agent(dir.path());
    let first = agent
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&first.path, &v1);
    let old_dir = std::fs::canonicalize(&first.path).unwrap();

    // The in-process S3 server lists no ETags, so the node versions its objects by size
    // and modification time there: change the size too.
    let v2: ModelFiles = vec![("model.onnx".into(), data(11, 3 * MIB + 1))];
    sandbox.seed("resnet50", &v2).await;
    // Within revalidate-after the cached revision is still served.
    let manifest = agent.stat(&r("resnet50")).await.unwrap();
    assert_eq!(manifest.revision, first.revision);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let second = agent
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    assert_ne!(second.revision, first.revision);
    assert_same_files(&second.path, &v2);
    // The previous revision stays readable for workers that still have it open.
    assert!(old_dir.join("model.onnx").exists());

    // Origin errors after expiry: the cached revision is served, flagged stale once the
    // revalidation (with the client's retries) has failed; never an error.
    s3.tap.fail_all.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let manifest = loop {
        let manifest = agent.stat(&r("resnet50")).await.unwrap();
        assert_eq!(manifest.revision, second.revision);
        if manifest.stale || std::time::Instant::now() > deadline {
            break manifest;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(manifest.stale, "{manifest:?}");
    assert!(
        manifest.stale_reason.contains("unreachable") && !manifest.stale_reason.contains("nothing"),
        "{}",
        manifest.stale_reason
    );
    let (_dir2, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_changing_mid_transfer_is_fetched_again_never_mixed() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let v1: ModelFiles = vec![("model.onnx".into(), data(90, 8 * MIB))];
    sandbox.seed("resnet50", &v1).await;
    let mut config = sandbox.node_config();
    config.revalidate_after = Duration::from_millis(100);
    config.origin_parallelism = 1;
    let node = TestNode::start(config).await;
    let first = node
        .registry
        .resolve(&r("resnet50"))
        .await
        .unwrap()
        .revision
        .id
        .clone();
    // Versions here are modification times in seconds: let the second tick over first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s3.tap.get_delay_ms.store(300, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let agent = node.agent(dir.path());
    let fetch =
        tokio::spawn(async move { agent.prefetch(&r("resnet50"), &Progress::hidden()).await });
    assert!(wait_for(Duration::from_secs(10), || s3.tap.get_count() >= 1).await);
    let v2: ModelFiles = vec![("model.onnx".into(), data(91, 8 * MIB + 1))];
    sandbox.seed("resnet50", &v2).await;
    s3.tap.get_delay_ms.store(0, Ordering::SeqCst);
    let fetched = fetch.await.unwrap().unwrap();
    assert_ne!(
        fetched.revision, first,
        "the transfer started on the first revision"
    );
    assert_same_files(&fetched.path, &v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_deleted_mid_transfer_ends_not_found_and_publishes_nothing() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    sandbox
        .seed("resnet50", &vec![("model.onnx".into(), data(92, 8 * MIB))])
        .await;
    let mut config = sandbox.node_config();
    config.revalidate_after = Duration::from_millis(100);
    config.origin_parallelism = 1;
    let node = TestNode::start(config).await;
    s3.tap.get_delay_ms.store(300, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let agent = node.agent(dir.path());
    let fetch =
        tokio::spawn(async move { agent.prefetch(&r("resnet50"), &Progress::hidden()).await });
    assert!(wait_for(Duration::from_secs(10), || s3.tap.get_count() >= 1).await);
    s3.delete("resnet50/model.onnx").await;
    s3.tap.get_delay_ms.store(0, Ordering::SeqCst);
    let err = fetch.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err:?}");
    assert!(err.to_string().contains("resnet50"), "{err}");
    assert!(!dir.path().join("resnet50/@original").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_stalls_mid_stream_ends_the_attempt_and_the_next_node_finishes() {
    let files: ModelFiles = vec![("model.onnx".into(), data(95, 6 * MIB))];
    // Two origins with the same bytes (the same ETags, so the same revision): the first
    // node's origin answers ranged reads only after 5 s, so its stream stalls after the
    // manifest.
    let slow = Sandbox::with_model("resnet50", &files).await;
    let fast = Sandbox::with_model("resnet50", &files).await;
    let stalling = slow.node().await;
    let good = fast.node().await;
    slow.s3.tap.get_delay_ms.store(5_000, Ordering::SeqCst);
    let idle = Duration::from_millis(500);

    // Alone, the stalling node ends each attempt after the idle time, with a message that
    // says what to do; the agent does not wait for it.
    let dir = slow.dir();
    let alone = cache_agent::Agent::new(vec![stalling.url.clone()], &dir).with_idle_timeout(idle);
    let started = std::time::Instant::now();
    let err = alone
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Stalled { .. }), "{err:?}");
    assert!(err.to_string().contains("run again to resume"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // With a second node, the agent moves on to it and the model arrives whole.
    let both = cache_agent::Agent::new(vec![stalling.url.clone(), good.url.clone()], &dir)
        .with_idle_timeout(idle);
    let fetched = both
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_the_connection_cap_makes_others_wait() {
    use std::io::Read;
    let sandbox = Sandbox::with_model("m", &vec![("model.bin".into(), data(12, 1000))]).await;
    let mut config = sandbox.node_config();
    config.max_connections = 1;
    config.handshake_timeout = Duration::from_secs(3);
    let node = TestNode::start(config).await;
    let addr = node.url.trim_start_matches("http://").to_owned();

    // A connection that never speaks HTTP/2 holds the only slot...
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let opened = std::time::Instant::now();
    // ...so a client's request waits for it (it is not answered within half a second)...
    let waiting = tokio::time::timeout(Duration::from_millis(500), async {
        node.client()
            .await
            .resolve(ResolveRequest {
                reference: "m".into(),
                ..Default::default()
            })
            .await
    })
    .await;
    assert!(
        waiting.is_err() || opened.elapsed() > Duration::from_secs(3),
        "answered while the silent connection held the only slot: {waiting:?}"
    );
    // ...until the node closes the silent one after the handshake timeout; then it is
    // served.
    // (The node's own HTTP/2 settings arrive first; then the connection ends.)
    let closed = tokio::task::spawn_blocking(move || {
        let mut silent = silent;
        let mut buf = [0u8; 64];
        loop {
            match silent.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .unwrap();
    assert!(
        closed.is_ok(),
        "the silent connection was not closed: {closed:?}"
    );
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(&fetched.path, &vec![("model.bin".into(), data(12, 1000))]);
}
