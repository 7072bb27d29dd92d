//! End to end: S3 server → cache node → gRPC stream → agent → verified local copy.

use std::sync::atomic::Ordering;

use cache_agent::{AgentError, Progress};
use modelcache_proto::{CHUNK_SIZE, Reference};
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

fn multi_file_model() -> ModelFiles {
    vec![
        (
            "config.json".into(),
            br#"{"architectures":["ResNet"]}"#.to_vec(),
        ),
        ("empty.txt".into(), Vec::new()),
        (
            "1_Pooling/config.json".into(),
            b"{\"pooling\": \"mean\"}".to_vec(),
        ),
        ("deep/er/still/weights.bin".into(), data(7, 3 * MIB + 12345)),
        ("model.safetensors".into(), data(1, 9 * MIB + 17)),
    ]
}

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_file_model_arrives_byte_identical_and_warm_fetch_skips_origin() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files = multi_file_model();
    sandbox.seed("org/minilm", &files).await;
    let node = sandbox.node().await;

    let (dir1, fetched) = node.prefetch_fresh("org/minilm").await;
    assert_eq!(fetched.path, dir1.path().join("org/minilm/@original"));
    assert_same_files(&fetched.path, &files);
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(fetched.transferred as usize, total);
    let cold_bytes = s3.tap.get_bytes.load(Ordering::SeqCst);
    assert_eq!(
        cold_bytes as usize, total,
        "a cold fetch reads each byte from the origin once"
    );

    // Warm node, empty agent directory: nothing from the origin (revalidation is a LIST).
    s3.tap.reset();
    let (dir2, fetched) = node.prefetch_fresh("org/minilm").await;
    assert_same_files(&fetched.path, &files);
    assert_eq!(
        s3.tap.get_count(),
        0,
        "warm fetch read objects: {:?}",
        s3.tap.gets()
    );
    assert_eq!(s3.tap.get_bytes.load(Ordering::SeqCst), 0);

    // Present at the node's revision: no transfer at all.
    let again = node
        .agent(dir2.path())
        .prefetch(&r("org/minilm"), &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(again.transferred, 0);

    // The node computes every file's SHA-256 in the background; verify --sha256 checks them.
    node.idle().await;
    let reports = node
        .agent(dir2.path())
        .verify(Some(&r("org/minilm")), true)
        .await
        .unwrap();
    assert_eq!(reports[0].problems, vec![]);
    assert_eq!(reports[0].sha256_checked, files.len());
    let manifest = node
        .agent(dir2.path())
        .stat(&r("org/minilm"))
        .await
        .unwrap();
    for (path, bytes) in &files {
        let entry = manifest.files.iter().find(|f| &f.path == path).unwrap();
        assert_eq!(entry.sha256, sha256(bytes), "{path}");
        assert_eq!(entry.size as usize, bytes.len());
    }

    // Every RPC passed the server's layer stack, the hand-framed Fetch included: two
    // transfers (the third found the model present), and Resolve or Fetch for each call.
    let stats = node.stats();
    assert_eq!(stats.fetch_rpcs, 2, "{stats:?}");
    assert!(stats.rpcs > 2 + 3, "{stats:?}");
    // The node's own counters agree with the origin's: the cold fetch's chunks came from
    // the origin, the warm one's from the tiers.
    assert_eq!(stats.origin_bytes as usize, total, "{stats:?}");
    assert!(
        stats.misses > 0 && stats.memory_hits + stats.disk_hits > 0,
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_fetches_read_each_chunk_from_origin_once() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(3, 24 * MIB + 5)),
        ("b.bin".into(), data(4, 5 * MIB)),
    ];
    sandbox.seed("resnet50", &files).await;
    s3.tap.get_delay_ms.store(30, Ordering::SeqCst);
    let node = sandbox.node().await;
    let dirs: Vec<_> = (0..16).map(|_| tempfile::tempdir().unwrap()).collect();
    let fetches = dirs.iter().map(|d| {
        let agent = node.agent(d.path());
        async move { agent.prefetch(&r("resnet50"), &Progress::hidden()).await }
    });
    let results = futures::future::join_all(fetches).await;
    for (result, dir) in results.into_iter().zip(&dirs) {
        let fetched = result.unwrap();
        assert!(fetched.path.starts_with(dir.path()));
        assert_same_files(&fetched.path, &files);
    }
    let gets = s3.tap.gets();
    for (path, bytes) in &files {
        let ranges = &gets[&format!("models/resnet50/{path}")];
        let chunks = bytes.len().div_ceil(CHUNK_SIZE as usize);
        assert_read_once(ranges, bytes.len() as u64);
        // Large reads: fewer requests than chunks once a file spans several.
        assert!(ranges.len() <= chunks.div_ceil(2), "{path}: {ranges:?}");
    }
    let size: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(s3.tap.get_bytes.load(Ordering::SeqCst) as usize, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarted_node_serves_from_disk_with_origin_stopped() {
    let mut s3 = S3Server::start().await;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(5, 11 * MIB + 3)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    seed(&s3, "resnet50", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let warm_dir = tempfile::tempdir().unwrap();
    node.agent(warm_dir.path())
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    node.idle().await;
    node.stop().await;

    // Within --revalidate-after of the last listing, a restarted node does not even ask
    // the origin.
    s3.tap.reset();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    assert_eq!(
        s3.tap.requests.load(Ordering::SeqCst),
        0,
        "the origin was asked: {:?}",
        s3.tap.gets()
    );
    node.stop().await;

    // Past it, with the origin gone, the node serves its disk tier and says it is stale.
    s3.stop();
    let mut config = node_config(&s3, cache.path());
    config.revalidate_after = std::time::Duration::ZERO;
    let node = TestNode::start(config).await;
    let (dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    let manifest = node.agent(dir.path()).stat(&r("resnet50")).await.unwrap();
    assert!(manifest.stale, "Resolve says the revision is served stale");
    assert!(
        manifest.stale_reason.contains("unreachable"),
        "{}",
        manifest.stale_reason
    );
    assert_eq!(node.stats().misses, 0);
    assert!(node.stats().disk_hits > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disk_tier_holds_every_chunk() {
    let s3 = S3Server::start().await;
    // More than the memory tier holds, so chunks are also evicted from memory on the way.
    let files: ModelFiles = vec![
        ("model.bin".into(), data(9, 40 * MIB + 1)),
        ("small.json".into(), b"[1]".to_vec()),
    ];
    seed(&s3, "big", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = node_config(&s3, cache.path());
    config.memory_capacity = bytesize::ByteSize::mib(16);
    let node = TestNode::start(config).await;
    let dir = tempfile::tempdir().unwrap();
    node.agent(dir.path())
        .prefetch(&r("big"), &Progress::hidden())
        .await
        .unwrap();
    node.idle().await;

    let resolved = node.registry.resolve(&r("big")).await.unwrap();
    let cache = node.registry.tier_caches().0;
    cache.clear_memory();
    for (file, (_, bytes)) in resolved.revision.files.iter().zip(&files) {
        for (i, key) in file.keys.iter().enumerate() {
            let value = cache
                .load_from_disk(key)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{} chunk {i} not on disk", file.origin.path));
            let start = i * CHUNK_SIZE as usize;
            let end = (start + CHUNK_SIZE as usize).min(bytes.len());
            assert!(
                value.data[..] == bytes[start..end],
                "{} chunk {i} differs on disk",
                file.origin.path
            );
        }
    }
    let tiers = node.registry.tier_counts(&resolved.revision);
    assert_eq!(tiers.disk_chunks, tiers.total_chunks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_sharing_one_directory_take_turns_and_transfer_once() {
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(40, 9 * MIB + 7)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    sandbox.seed("resnet50", &files).await;
    let node = sandbox.node().await;
    let dir = sandbox.dir();
    let reference = r("resnet50");
    let progress = Progress::hidden();
    for round in 0..3 {
        let agents: Vec<_> = (0..4).map(|_| node.agent(&dir)).collect();
        let fetches = agents
            .iter()
            .map(|agent| agent.prefetch(&reference, &progress));
        let results = futures::future::join_all(fetches).await;
        let mut transferred = 0;
        for result in results {
            let fetched = result.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_same_files(&fetched.path, &files);
            transferred += fetched.transferred;
        }
        let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
        let expected = if round == 1 { 0 } else { total };
        assert_eq!(transferred, expected, "round {round}");
        // The next round starts from nothing but the published copy.
        if round == 1 {
            assert!(node.agent(&dir).rm(&r("resnet50")).unwrap());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn formats_are_recorded_and_a_newer_format_is_never_misread() {
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![("model.onnx".into(), data(44, 3 * MIB))];
    sandbox.seed("resnet50", &files).await;
    let config = sandbox.node_config();
    let node = TestNode::start(config.clone()).await;
    let dir = sandbox.dir();
    node.agent(&dir)
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap();
    node.idle().await;
    node.stop().await;
    let format = std::fs::read_to_string(config.cache_dir.join("format")).unwrap();
    assert_eq!(format, "modelcache-cache 1\n");
    let agent_format = std::fs::read_to_string(dir.join(".modelcache-format")).unwrap();
    assert_eq!(agent_format, "modelcache-agent-dir 1\n");

    // A cache from before formats were recorded is reused: served from disk, no origin GET.
    std::fs::remove_file(config.cache_dir.join("format")).unwrap();
    sandbox.s3.tap.reset();
    let node = TestNode::start(config.clone()).await;
    let (_d, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    assert_eq!(sandbox.s3.tap.get_count(), 0);
    node.stop().await;

    // A newer node's cache (after a downgrade) is dropped, not misread: the model comes
    // from the origin again, byte for byte.
    std::fs::write(config.cache_dir.join("format"), "modelcache-cache 7\n").unwrap();
    sandbox.s3.tap.reset();
    let node = TestNode::start(config.clone()).await;
    let (_d, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    assert!(sandbox.s3.tap.get_count() > 0);

    // A newer agent's directory is refused, naming both formats, and left as it was.
    std::fs::write(dir.join(".modelcache-format"), "modelcache-agent-dir 9\n").unwrap();
    let err = node
        .agent(&dir)
        .prefetch(&r("resnet50"), &Progress::hidden())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Incompatible { .. }), "{err:?}");
    assert!(
        err.to_string().contains("format 9") && err.to_string().contains("up to 1"),
        "{err}"
    );
    let agent_format = std::fs::read_to_string(dir.join(".modelcache-format")).unwrap();
    assert_eq!(agent_format, "modelcache-agent-dir 9\n");
}

/// 64 streams of one cold model at once, on a memory tier far smaller than the model: each
/// chunk is still read from the origin once, and every chunk reaches the disk tier. (The
/// streams drift apart, so a lagging one asks for chunks the memory tier has already let
/// go of; they must come from the disk tier or from the read still in flight.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_cold_streams_read_each_chunk_once_and_persist_all() {
    const STREAMS: usize = 64;
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![("model.bin".into(), data(21, 128 * CHUNK_SIZE as usize))];
    sandbox.seed("wide", &files).await;
    s3.tap.get_delay_ms.store(5, Ordering::SeqCst);
    let mut config = sandbox.node_config();
    config.memory_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start(config).await;
    let expected = blake3::hash(&files[0].1);
    let streams = (0..STREAMS).map(|_| async {
        let mut stream = node.fetch_stream("wide").await;
        let mut hasher = blake3::Hasher::new();
        while let Some(message) = stream.message().await.unwrap() {
            if let Some(modelcache_proto::v1::fetch_response::Item::Chunk(c)) = message.item {
                hasher.update(&c.data);
            }
        }
        hasher.finalize()
    });
    for got in futures::future::join_all(streams).await {
        assert_eq!(got, expected);
    }
    // The finisher's SHA-256 pass reads the model once more, through the tiers.
    node.idle().await;
    let gets = s3.tap.gets();
    let ranges = &gets["models/wide/model.bin"];
    assert_read_once(ranges, files[0].1.len() as u64);
    // 256 MiB in parts of 16 MiB: a few dozen requests at most, not one per chunk.
    assert!(ranges.len() <= 32, "{} requests: {ranges:?}", ranges.len());
    let resolved = node.registry.resolve(&r("wide")).await.unwrap();
    let tiers = node.registry.tier_counts(&resolved.revision);
    assert_eq!(tiers.disk_chunks, tiers.total_chunks, "{tiers:?}");
    // And they are really there: the disk tier alone gives every chunk back intact.
    let originals = node.registry.tier_caches().0;
    originals.clear_memory();
    for (i, key) in resolved.revision.files[0].keys.iter().enumerate() {
        let value = originals.load_from_disk(key).await.unwrap();
        assert!(
            value.is_some_and(|v| v.is_intact()),
            "chunk {i} not on disk"
        );
    }
}

/// 10,000 streams of a memory-served model at once, 2,000 on each of five connections:
/// beyond a connection's stream limit and the read-ahead budget they wait their turn, and
/// every one of them completes with the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_streams_of_a_memory_served_model_all_complete() {
    const STREAMS: usize = 10_000;
    const CONNECTIONS: usize = 5;
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![("model.bin".into(), data(31, 48 * 1024))];
    sandbox.seed("many", &files).await;
    let node = sandbox.node().await;
    node.prefetch_fresh("many").await;
    let expected = blake3::hash(&files[0].1);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(node.client().await);
    }
    let streams = (0..STREAMS).map(|i| {
        let mut client = clients[i % CONNECTIONS].clone();
        async move {
            let mut stream = client
                .fetch(modelcache_proto::v1::FetchRequest {
                    reference: "many".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut hasher = blake3::Hasher::new();
            while let Some(message) = stream.message().await? {
                if let Some(modelcache_proto::v1::fetch_response::Item::Chunk(c)) = message.item {
                    hasher.update(&c.data);
                }
            }
            Ok::<_, tonic::Status>(hasher.finalize())
        }
    });
    let results = futures::future::join_all(streams).await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {STREAMS} streams failed, e.g. {:?}",
        failed.len(),
        failed[0]
    );
    assert!(results.iter().all(|r| r.as_ref().ok() == Some(&expected)));
    assert_eq!(node.stats().fetch_rpcs, STREAMS as u64 + 1);
}

/// A cold file is read in large parts (not a GET per chunk), and a body cut in the middle
/// of a part is resumed from its first missing chunk: the copy is byte-identical and only
/// the cut chunk's bytes are read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_origin_reads_are_cut_into_chunks_and_resumed_when_cut_short() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let size = 64 * MIB + 7;
    let files: ModelFiles = vec![("model.bin".into(), data(31, size))];
    sandbox.seed("big", &files).await;
    let node = sandbox.node().await;
    // The first GET dies 1 MiB and 123 bytes into the part's third chunk.
    let cut = 2 * CHUNK_SIZE + MIB as u64 + 123;
    s3.tap.cut_after.store(cut, Ordering::SeqCst);
    s3.tap.cut_times.store(1, Ordering::SeqCst);
    let (_dir, fetched) = node.prefetch_fresh("big").await;
    assert_same_files(&fetched.path, &files);
    let ranges = s3.tap.gets()["models/big/model.bin"].clone();
    // 64 MiB in parts of 16 MiB, plus the resumed rest of the cut one.
    assert!(ranges.len() <= 6, "{ranges:?}");
    // Resumed where the bytes stopped (at the latest, at the first chunk missing), not
    // from the part's start.
    let starts: Vec<u64> = ranges
        .iter()
        .map(|r| {
            r["bytes=".len()..]
                .split('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    const PART: u64 = 16 * MIB as u64;
    let resumed: Vec<u64> = starts
        .iter()
        .map(|s| s % PART)
        .filter(|&s| s != 0)
        .collect();
    assert_eq!(resumed.len(), 1, "{ranges:?}");
    assert!(
        resumed[0] >= 2 * CHUNK_SIZE && resumed[0] <= cut,
        "{ranges:?}"
    );
    // At most the cut chunk's bytes are read twice.
    let read = s3.tap.get_bytes.load(Ordering::SeqCst);
    assert!(
        read >= size as u64 && read <= size as u64 + (cut - 2 * CHUNK_SIZE),
        "{read} bytes read for {size}"
    );

    // Cut again and again (more often than the S3 client's own retries allow for one
    // request): the node resumes from the first missing chunk each time it gives up.
    let files: ModelFiles = vec![("model.bin".into(), data(32, size))];
    sandbox.seed("big2", &files).await;
    s3.tap.cut_after.store(MIB as u64 + 123, Ordering::SeqCst);
    s3.tap.cut_times.store(1000, Ordering::SeqCst);
    let (_dir, fetched) = node.prefetch_fresh("big2").await;
    assert_same_files(&fetched.path, &files);
    s3.tap.cut_after.store(0, Ordering::SeqCst);
}

/// A cold 512 MiB file costs the origin a few dozen requests in all (counted at the S3
/// server: the listing, any HEAD, every ranged GET), each byte is read once, and the copy
/// is byte-identical. Where each request is slow to answer, the node reads fewer, larger
/// parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_512_mib_file_costs_the_origin_a_few_dozen_requests() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let size = 512 * MIB;
    let files: ModelFiles = vec![("model.bin".into(), data(51, size))];
    sandbox.seed("large", &files).await;
    let mut config = sandbox.node_config();
    config.disk_capacity = bytesize::ByteSize::mib(1536);
    let node = TestNode::start(config).await;
    s3.tap.reset();
    let (_dir, fetched) = node.prefetch_fresh("large").await;
    assert_same_files(&fetched.path, &files);
    node.idle().await;
    let ranges = s3.tap.gets()["models/large/model.bin"].clone();
    assert_read_once(&ranges, size as u64);
    let requests = s3.tap.requests.load(Ordering::SeqCst);
    eprintln!("loopback: {requests} requests, {} GETs", ranges.len());
    // 16 MiB parts: 32 GETs, and the listing.
    assert!(requests <= 40, "{requests} requests: {ranges:?}");

    // The same size behind an origin that takes 300 ms to answer each GET: 64 MiB parts
    // once the node has seen how slow its requests are.
    let files: ModelFiles = vec![("model.bin".into(), data(52, size))];
    sandbox.seed("slow", &files).await;
    s3.tap.reset();
    s3.tap.get_delay_ms.store(300, Ordering::SeqCst);
    let (_dir, fetched) = node.prefetch_fresh("slow").await;
    s3.tap.get_delay_ms.store(0, Ordering::SeqCst);
    assert_same_files(&fetched.path, &files);
    node.idle().await;
    let ranges = s3.tap.gets()["models/slow/model.bin"].clone();
    assert_read_once(&ranges, size as u64);
    eprintln!("300 ms per GET: {} GETs", ranges.len());
    assert!(ranges.len() <= 16, "{} GETs: {ranges:?}", ranges.len());
}
