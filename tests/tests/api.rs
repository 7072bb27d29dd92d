//! The gRPC API as other clients see it: Prefetch, List, Fetch from an offset, revision
//! pinning, health and reflection; and a corrupted disk-tier entry.

use std::sync::atomic::Ordering;

use cache_agent::Progress;
use futures::StreamExt;
use modelcache_proto::v1::{FetchRequest, ListRequest, PrefetchRequest, fetch_response};
use modelcache_proto::{CHUNK_SIZE, Reference};
use modelcache_testkit::*;
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_warms_the_node_and_list_shows_tiers() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(50, 7 * MIB + 1)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    sandbox.seed("resnet50", &files).await;
    sandbox
        .seed(
            "org/minilm",
            &vec![
                ("config.json".into(), b"{}".to_vec()),
                ("1_Pooling/config.json".into(), b"{}".to_vec()),
            ],
        )
        .await;
    let node = sandbox.node().await;
    let mut client = node.client().await;

    let response = client
        .prefetch(PrefetchRequest {
            references: vec!["resnet50".into(), "nosuch".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let size: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(response.results[0].error, "");
    assert_eq!(response.results[0].origin_bytes as usize, size);
    assert_eq!(response.results[0].total_size as usize, size);
    assert!(
        response.results[1].error.contains("nosuch"),
        "{:?}",
        response.results[1]
    );
    assert_eq!(s3.tap.get_bytes.load(Ordering::SeqCst) as usize, size);

    // A bad reference fails the whole call before any work.
    let err = client
        .prefetch(PrefetchRequest {
            references: vec!["../x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    s3.tap.reset();
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    assert_eq!(
        s3.tap.get_count(),
        0,
        "prefetched model read again: {:?}",
        s3.tap.gets()
    );

    node.idle().await;
    let models = client
        .list(ListRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let names: Vec<_> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["org/minilm", "resnet50"],
        "folders inside a model are not models"
    );
    let resnet = &models[1];
    assert_eq!(resnet.cached.len(), 1);
    let tiers = resnet.cached[0].tiers.unwrap();
    assert_eq!(tiers.total_chunks, 5);
    assert_eq!(tiers.disk_chunks, 5);
    assert!(models[0].cached.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_from_an_offset_and_pinned_revisions() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![
        ("a.bin".into(), data(60, 5 * MIB)),
        ("b.bin".into(), data(61, 3 * MIB)),
    ];
    sandbox.seed("m", &files).await;
    let node = sandbox.node().await;
    let mut client = node.client().await;

    // Resume inside a.bin, not on a chunk boundary: the node starts at the chunk holding it.
    let mut stream = client
        .fetch(FetchRequest {
            reference: "m".into(),
            file: "a.bin".into(),
            offset: CHUNK_SIZE + 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let manifest = match stream.next().await.unwrap().unwrap().item {
        Some(fetch_response::Item::Manifest(m)) => m,
        other => panic!("{other:?}"),
    };
    let mut got = Vec::new();
    while let Some(msg) = stream.next().await {
        match msg.unwrap().item {
            Some(fetch_response::Item::Chunk(c)) => {
                assert_eq!(
                    blake3::hash(&c.data).as_bytes().as_slice(),
                    c.blake3.as_slice()
                );
                got.push((c.file_index, c.offset, c.data.len()));
            }
            other => panic!("{other:?}"),
        }
    }
    let expected = vec![
        (0, CHUNK_SIZE, CHUNK_SIZE as usize),
        (0, 2 * CHUNK_SIZE, MIB),
        (1, 0, CHUNK_SIZE as usize),
        (1, CHUNK_SIZE, MIB),
    ];
    assert_eq!(got, expected);

    // The model is now (at least partly) cached: a full fetch reads only what is missing,
    // so over both fetches every byte came from the origin once.
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(&fetched.path, &files);
    let gets = s3.tap.gets();
    for (path, bytes) in &files {
        assert_read_once(&gets[&format!("models/m/{path}")], bytes.len() as u64);
    }

    let err = client
        .fetch(FetchRequest {
            reference: "m".into(),
            revision: "0123456789abcdef".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert!(
        err.message().contains(&manifest.revision),
        "{}",
        err.message()
    );
    let err = client
        .fetch(FetchRequest {
            reference: "m".into(),
            file: "c.bin".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("c.bin"));
    // A message quotes at most the first 100 characters of what the client sent.
    let err = client
        .fetch(FetchRequest {
            reference: "m".into(),
            file: "x".repeat(50_000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().len() < 300, "{} bytes", err.message().len());
    let err = client
        .fetch(FetchRequest {
            reference: "m".into(),
            file: "b.bin".into(),
            offset: 4 * MIB as u64,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let s3 = S3Server::start().await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let channel = tonic::transport::Endpoint::from_shared(node.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();

    // SERVING once the node finished its first round of peer probes (at once alone, but
    // in a task of its own).
    let mut status = 0;
    for _ in 0..100 {
        status = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: "modelcache.v1.ModelCache".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, ServingStatus::Serving as i32);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"modelcache.v1.ModelCache"), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");

    // The older protocol version, as older grpcurl and Python's reflection helper ask.
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "grpc.health.v1.Health".into(),
            )),
        };
        let mut responses = ServerReflectionClient::new(channel)
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.next().await.unwrap().unwrap().message_response;
        let Some(MessageResponse::FileDescriptorResponse(files)) = response else {
            panic!("no descriptor for the health service: {response:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_disk_entry_is_detected_and_read_again() {
    let s3 = S3Server::start().await;
    let bytes = data(70, 6 * MIB);
    let files: ModelFiles = vec![("model.bin".into(), bytes.clone())];
    seed(&s3, "m", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = node_config(&s3, cache.path());
    config.disk_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start(config.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    node.agent(dir.path())
        .prefetch(&r("m"), &Progress::hidden())
        .await
        .unwrap();
    node.idle().await;
    node.stop().await;

    // Flip one byte of the second chunk where the disk tier stored it.
    let needle = &bytes[CHUNK_SIZE as usize + 4096..CHUNK_SIZE as usize + 4096 + 64];
    let mut flipped = 0;
    let mut stack = vec![cache.path().join("tiers")];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
                continue;
            }
            let mut content = std::fs::read(entry.path()).unwrap();
            let positions: Vec<usize> = memchr::memmem::find_iter(&content, needle).collect();
            for pos in positions {
                content[pos + 10] ^= 0x55;
                flipped += 1;
            }
            std::fs::write(entry.path(), &content).unwrap();
        }
    }
    assert!(flipped >= 1, "the chunk was not found on disk");

    s3.tap.reset();
    let node = TestNode::start(config).await;
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(&fetched.path, &files);
    let gets = s3.tap.gets();
    assert_eq!(
        gets.values().map(Vec::len).sum::<usize>(),
        1,
        "only the corrupted chunk is read again: {gets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_fetch_streams_before_the_object_is_read() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![("model.bin".into(), data(80, 20 * MIB))];
    seed(&s3, "m", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let mut config = node_config(&s3, cache.path());
    config.origin_parallelism = 2;
    let node = TestNode::start(config).await;
    s3.tap.get_delay_ms.store(100, Ordering::SeqCst);
    let mut stream = node.fetch_stream("m").await;
    let _manifest = stream.next().await.unwrap().unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first.item, Some(fetch_response::Item::Chunk(ref c)) if c.offset == 0));
    let reads_so_far = s3.tap.get_count();
    assert!(
        reads_so_far < 10,
        "the first chunk came only after {reads_so_far} of 10 origin reads"
    );
    let mut chunks = 1;
    while let Some(msg) = stream.next().await {
        msg.unwrap();
        chunks += 1;
    }
    assert_eq!(chunks, 10);
}

/// `tests/py/grpc_fetch.py` (grpcio and protobuf classes generated from cache.proto) run
/// against `node`: the parsed JSON it prints.
async fn fetch_with_grpcio(node: &TestNode, reference: &str) -> serde_json::Value {
    let target = node.url.trim_start_matches("http://").to_owned();
    let reference = reference.to_owned();
    let (stdout, status) = tokio::task::spawn_blocking(move || {
        let proto = workspace().join("proto");
        run_python(
            "grpc_fetch.py",
            &[proto.as_os_str(), target.as_ref(), reference.as_ref()],
        )
    })
    .await
    .unwrap();
    assert!(status.success(), "grpc_fetch.py failed: {stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_grpc_client_fetches_byte_identical_and_gets_errors() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(61, 5 * MIB + 3)),
        ("config.json".into(), b"{\"a\": 1}".to_vec()),
    ];
    sandbox.seed("resnet50", &files).await;
    let node = sandbox.node().await;

    // Cold (the node reads the origin while it streams), then warm from the memory tier.
    for _ in 0..2 {
        let got = fetch_with_grpcio(&node, "resnet50").await;
        assert_eq!(got["code"], "OK", "{got}");
        assert_eq!(
            got["manifest"],
            serde_json::json!(["config.json", "model.onnx"])
        );
        assert_eq!(got["chunks"], 4, "{got}");
        for (path, bytes) in &files {
            assert_eq!(got["files"][path]["size"], bytes.len(), "{path}: {got}");
            assert_eq!(got["files"][path]["sha256"], sha256(bytes), "{path}");
        }
    }

    // An error before the first message: a trailers-only response.
    let got = fetch_with_grpcio(&node, "nosuch").await;
    assert_eq!(got["code"], "NOT_FOUND", "{got}");
    assert!(got["details"].as_str().unwrap().contains("nosuch"), "{got}");
    let got = fetch_with_grpcio(&node, "Bad Name!").await;
    assert_eq!(got["code"], "INVALID_ARGUMENT", "{got}");

    // An error after the manifest went out: the status arrives in the trailers.
    sandbox
        .seed("other", &vec![("model.onnx".into(), data(62, 3 * MIB))])
        .await;
    s3.tap.cut_after.store(1000, Ordering::SeqCst);
    let got = fetch_with_grpcio(&node, "other").await;
    assert_eq!(got["code"], "UNAVAILABLE", "{got}");
    assert!(
        got["details"].as_str().unwrap().contains("cut short"),
        "{got}"
    );
    assert_eq!(got["manifest"], serde_json::json!(["model.onnx"]), "{got}");
    assert_eq!(got["chunks"], 0, "{got}");
}

/// The revision the node serves of `wide`, through the agent.
async fn agent_revision(node: &TestNode) -> String {
    let dir = tempfile::tempdir().unwrap();
    node.agent(dir.path())
        .stat(&r("wide"))
        .await
        .unwrap()
        .revision
}

/// A model of 40,000 files: its manifest is over the 1 MiB a part holds, so `Resolve`
/// pages it and `Fetch` sends it as a manifest and `ManifestPart`s. The agent reads it
/// whole and downloads the model; a client that does not read parts (manifest protocol 0,
/// as every client before it) is told so, with both sides' versions, while small models
/// reach it exactly as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_manifest_too_large_for_one_message_comes_in_parts() {
    use modelcache_proto::parts::MANIFEST_PROTOCOL;
    use modelcache_proto::v1::ResolveRequest;
    const FILES: usize = 40_000;
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir().join("origin");
    let mut files: ModelFiles = (0..FILES)
        .map(|i| {
            (
                format!("shard-{:03}/part-{i:05}.json", i / 1000),
                format!("[{i}]").into_bytes(),
            )
        })
        .collect();
    // A model is a folder with files of its own (the rest may sit in subfolders).
    files.push(("config.json".into(), b"{}".to_vec()));
    files.sort();
    for (path, bytes) in &files {
        let path = origin.join("wide").join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::create_dir_all(origin.join("small")).unwrap();
    std::fs::write(origin.join("small/config.json"), b"{}").unwrap();
    let node = TestNode::start(sandbox.local_config(&origin)).await;
    let mut client = node.client().await;

    // Older clients: refused for the large model, naming both versions ...
    for status in [
        client
            .resolve(ResolveRequest {
                reference: "wide".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        client
            .fetch(FetchRequest {
                reference: "wide".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("40001 files")
                && message.contains("protocol 0")
                && message.contains(&format!("cache-node {}", env!("CARGO_PKG_VERSION"))),
            "{message}"
        );
    }
    // ... and served as before for a model that fits one message.
    let small = client
        .resolve(ResolveRequest {
            reference: "small".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(small.next_page_token.is_empty());
    assert_eq!(small.manifest.unwrap().files.len(), 1);

    // Resolve in pages, each under the 1 MiB a part holds.
    let mut token = String::new();
    let mut pages = 0;
    let mut listed = Vec::new();
    loop {
        let page = client
            .resolve(ResolveRequest {
                reference: "wide".into(),
                page_token: token,
                protocol: MANIFEST_PROTOCOL,
            })
            .await
            .unwrap()
            .into_inner();
        let manifest = page.manifest.unwrap();
        assert_eq!(manifest.file_count as usize, FILES + 1);
        assert!(prost::Message::encoded_len(&manifest) < 2 << 20);
        listed.extend(manifest.files.into_iter().map(|f| f.path));
        pages += 1;
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert!(pages >= 2, "{pages} pages");
    // A token of another revision means the model changed: start over; a mangled one is
    // the client's mistake.
    let revision = agent_revision(&node).await;
    for (token, code) in [
        ("0123:1:0".to_string(), Code::Aborted),
        (format!("{revision}:x:0"), Code::InvalidArgument),
    ] {
        let status = client
            .resolve(ResolveRequest {
                reference: "wide".into(),
                page_token: token,
                protocol: MANIFEST_PROTOCOL,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{status:?}");
    }
    assert_eq!(
        listed,
        files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
    );

    // The agent reads the manifest whole and downloads every file.
    let (_dir, fetched) = node.prefetch_fresh("wide").await;
    assert_same_files(&fetched.path, &files);
    node.idle().await;
    // Now every digest is known and the manifest is larger still: it comes back whole.
    let agent = node.agent(sandbox.dir().as_path());
    let manifest = agent.stat(&r("wide")).await.unwrap();
    assert_eq!(manifest.files.len(), FILES + 1);
    assert!(
        manifest
            .files
            .iter()
            .all(|f| f.chunk_blake3.len() == 1 && !f.sha256.is_empty())
    );

    // Fetch from the last file: the manifest, its parts, then that file's one chunk.
    let (last, bytes) = files.last().unwrap();
    let mut stream = client
        .fetch(FetchRequest {
            reference: "wide".into(),
            file: last.clone(),
            protocol: MANIFEST_PROTOCOL,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = 0;
    let mut parts = 0;
    let mut chunks = Vec::new();
    while let Some(message) = stream.next().await {
        match message.unwrap().item.unwrap() {
            fetch_response::Item::Manifest(m) => entries += m.files.len(),
            fetch_response::Item::ManifestPart(p) => {
                assert!(chunks.is_empty(), "a manifest part after the chunks");
                entries += p.files.len();
                parts += 1;
            }
            fetch_response::Item::Chunk(c) => chunks.push(c),
            fetch_response::Item::FileCheck(c) => {
                panic!("a file check sent to a protocol-2 client: {c:?}")
            }
        }
    }
    assert_eq!(entries, FILES + 1);
    assert!(parts >= 2, "{parts} parts");
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].file_index as usize, FILES);
    assert_eq!(&chunks[0].data[..], &bytes[..]);
}
