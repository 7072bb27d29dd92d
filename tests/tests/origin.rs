//! The origin boundary and what a node does when the origin changes under it: names with
//! any character, symlinks of a local origin, a local origin that disappears, a model
//! updated in the middle of transfers, and one node per cache directory.

use std::sync::atomic::Ordering;
use std::time::Duration;

use cache_agent::{AgentError, Progress};
use modelcache_proto::Reference;
use modelcache_proto::v1::ResolveRequest;
use modelcache_testkit::*;
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn r(s: &str) -> Reference {
    Reference::parse(s).unwrap()
}

/// Files whose names `object_store` percent-encodes, and one that looks encoded already.
fn odd_names() -> ModelFiles {
    vec![
        ("naïve ü.bin".into(), data(1, 3 * MIB)),
        ("a#b?c.txt".into(), b"hash and question".to_vec()),
        ("100%.json".into(), b"{\"p\":1}".to_vec()),
        ("sub dir/%41.txt".into(), b"not an A".to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_name_fetches_from_s3_and_from_a_local_origin() {
    let sandbox = Sandbox::start().await;
    let files = odd_names();
    for (path, bytes) in &files {
        sandbox.s3.put_key(&format!("odd/{path}"), bytes).await;
    }
    let node = sandbox.node().await;
    let (_dir, fetched) = node.prefetch_fresh("odd").await;
    assert_same_files(&fetched.path, &files);
    node.stop().await;

    let origin = sandbox.dir();
    for (path, bytes) in &files {
        let file = origin.join("odd").join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }
    let node = TestNode::start(sandbox.local_config(&origin)).await;
    let (_dir, fetched) = node.prefetch_fresh("odd").await;
    assert_same_files(&fetched.path, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_origin_never_serves_what_its_symlinks_point_to_outside_it() {
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir();
    let outside = sandbox.dir();
    std::fs::write(outside.join("secret"), b"outside the origin").unwrap();
    std::fs::create_dir_all(outside.join("etc")).unwrap();
    std::fs::write(outside.join("etc/passwd"), b"root:x:0:0").unwrap();
    let model = origin.join("m");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model.bin"), data(2, 1000)).unwrap();
    std::fs::write(origin.join("shared.bin"), b"inside the origin").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), model.join("leak")).unwrap();
    std::os::unix::fs::symlink(outside.join("etc"), model.join("etc")).unwrap();
    // A link that stays inside the origin is served.
    std::os::unix::fs::symlink(origin.join("shared.bin"), model.join("inside")).unwrap();
    // A folder of links only is no model at all.
    std::fs::create_dir_all(origin.join("linked")).unwrap();
    std::os::unix::fs::symlink(outside.join("etc"), origin.join("linked/etc")).unwrap();

    let node = TestNode::start(sandbox.local_config(&origin)).await;
    let mut client = node.client().await;
    let manifest = client
        .resolve(ResolveRequest {
            reference: "m".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .manifest
        .unwrap();
    let paths: Vec<&str> = manifest.files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["inside", "model.bin"]);
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(
        &fetched.path,
        &vec![
            ("inside".into(), b"inside the origin".to_vec()),
            ("model.bin".into(), data(2, 1000)),
        ],
    );
    let status = client
        .resolve(ResolveRequest {
            reference: "linked/etc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let models = node.agent(&sandbox.dir()).models().await.unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert!(!names.iter().any(|n| n.starts_with("linked")), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_origin_that_disappears_is_an_outage_not_a_deletion() {
    let sandbox = Sandbox::start().await;
    let root = sandbox.dir();
    let origin = root.join("models");
    let files: ModelFiles = vec![("model.onnx".into(), data(3, 3 * MIB))];
    std::fs::create_dir_all(origin.join("resnet50")).unwrap();
    std::fs::write(origin.join("resnet50/model.onnx"), &files[0].1).unwrap();
    let mut config = sandbox.local_config(&origin);
    config.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    node.prefetch_fresh("resnet50").await;

    // Unmounted or renamed: the node serves what it has, flagged stale, and keeps it.
    std::fs::rename(&origin, root.join("moved")).unwrap();
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    let manifest = node
        .agent(&sandbox.dir())
        .stat(&r("resnet50"))
        .await
        .unwrap();
    assert!(manifest.stale, "{manifest:?}");
    assert!(
        manifest.stale_reason.contains("is gone"),
        "{}",
        manifest.stale_reason
    );
    std::fs::rename(root.join("moved"), &origin).unwrap();
    let manifest = node
        .agent(&sandbox.dir())
        .stat(&r("resnet50"))
        .await
        .unwrap();
    assert!(!manifest.stale, "{manifest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_updated_mid_transfer_is_served_at_its_new_revision_at_once() {
    let sandbox = Sandbox::start().await;
    let v1: ModelFiles = vec![("model.onnx".into(), data(90, 8 * MIB))];
    sandbox.seed("resnet50", &v1).await;
    let mut config = sandbox.node_config();
    // Revalidation alone would not see the change for a minute.
    config.revalidate_after = Duration::from_secs(60);
    config.origin_parallelism = 1;
    let node = TestNode::start(config).await;
    let first = node
        .registry
        .resolve(&r("resnet50"))
        .await
        .unwrap()
        .revision;
    // Versions here are modification times in seconds: let the second tick over first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let v2: ModelFiles = vec![("model.onnx".into(), data(91, 8 * MIB))];
    sandbox.seed("resnet50", &v2).await;

    // The node's first ranged read sees the new ETag; the agent's retry gets the new
    // revision, byte for byte, well before `--revalidate-after`.
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &v2);
    assert_ne!(fetched.revision, first.id);
    let now = node
        .registry
        .resolve(&r("resnet50"))
        .await
        .unwrap()
        .revision;
    assert_eq!(now.id, fetched.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_one_cache_dir_is_refused_and_creates_nothing() {
    let sandbox = Sandbox::start().await;
    sandbox
        .seed("m", &vec![("model.bin".into(), data(5, 1000))])
        .await;
    let config = sandbox.node_config();
    let node = TestNode::start(config.clone()).await;
    let listing = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing(&config.cache_dir);
    let err = cache_node::Node::open(&config)
        .await
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("in use") && message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );
    assert_eq!(listing(&config.cache_dir), before);
    // The first node goes on serving; once it stopped, the dir is free again.
    node.prefetch_fresh("m").await;
    node.stop().await;
    TestNode::start(config).await.prefetch_fresh("m").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_leave_no_state_and_are_not_listed_again_at_once() {
    let sandbox = Sandbox::start().await;
    sandbox
        .seed("m", &vec![("model.bin".into(), data(6, 1000))])
        .await;
    let node = sandbox.node().await;
    let agent = node.agent(&sandbox.dir());
    for i in 0..200 {
        let err = agent
            .prefetch(&r(&format!("nosuch-{i}")), &Progress::hidden())
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::NotFound { .. }), "{err:?}");
    }
    assert_eq!(node.registry.catalog().model_count(), 0);
    // A name asked for again at once is answered from the negative cache: no LIST.
    let requests = sandbox.s3.tap.requests.load(Ordering::SeqCst);
    let err = agent
        .prefetch(&r("nosuch-199"), &Progress::hidden())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("nosuch-199"), "{err}");
    assert_eq!(sandbox.s3.tap.requests.load(Ordering::SeqCst), requests);
    // A model that appears is found once the brief negative entry expires.
    sandbox
        .seed("nosuch-199", &vec![("model.bin".into(), data(7, 10))])
        .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    agent
        .prefetch(&r("nosuch-199"), &Progress::hidden())
        .await
        .unwrap();
    assert_eq!(node.registry.catalog().model_count(), 1);
}

/// A local origin holding `m/model.bin`, a node on it that read the model in full and
/// saved its record, and that record's cache dir.
async fn recorded_model(
    sandbox: &Sandbox,
    bytes: &[u8],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let origin = sandbox.dir();
    std::fs::create_dir_all(origin.join("m")).unwrap();
    std::fs::write(origin.join("m/model.bin"), bytes).unwrap();
    let config = sandbox.local_config(&origin);
    let cache_dir = config.cache_dir.clone();
    let node = TestNode::start(config).await;
    node.prefetch_fresh("m").await;
    node.idle().await;
    node.stop().await;
    (origin, cache_dir)
}

fn saved_manifests(cache_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(cache_dir.join("manifests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_record_damaged_on_disk_is_not_trusted() {
    let sandbox = Sandbox::start().await;
    let bytes = data(30, 5 * MIB);
    let (origin, cache_dir) = recorded_model(&sandbox, &bytes).await;
    // One character of one chunk digest changes on disk.
    let saved = &saved_manifests(&cache_dir)[0];
    let text = std::fs::read_to_string(saved).unwrap();
    let list = text.find("\"chunk_blake3\"").unwrap() + "\"chunk_blake3\"".len();
    let digit = list + text[list..].find('"').unwrap() + 1;
    assert!(text.as_bytes()[digit].is_ascii_hexdigit(), "{text}");
    let mut damaged = text.into_bytes();
    damaged[digit] = if damaged[digit] == b'0' { b'1' } else { b'0' };
    std::fs::write(saved, damaged).unwrap();

    let mut config = sandbox.local_config(&origin);
    config.cache_dir = cache_dir;
    let node = TestNode::start(config).await;
    // The damaged record is not used at all: the first transfer goes through.
    let status = stream_status(node.fetch_stream("m").await).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(&fetched.path, &vec![("model.bin".into(), bytes)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_origin_contradicts_is_discarded_and_the_retry_gets_the_origin_bytes() {
    let sandbox = Sandbox::start().await;
    let (origin, cache_dir) = recorded_model(&sandbox, &data(31, 5 * MIB)).await;
    // The file is rewritten in place, same size, its modification time put back: the
    // origin's version tag does not change, its bytes do.
    let file = origin.join("m/model.bin");
    let modified = std::fs::metadata(&file).unwrap().modified().unwrap();
    let rewritten = data(32, 5 * MIB);
    std::fs::write(&file, &rewritten).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // A node with the saved record and empty tiers reads every chunk from the origin.
    let config = sandbox.local_config(&origin);
    std::fs::create_dir_all(config.cache_dir.join("manifests")).unwrap();
    for saved in saved_manifests(&cache_dir) {
        std::fs::copy(
            &saved,
            config
                .cache_dir
                .join("manifests")
                .join(saved.file_name().unwrap()),
        )
        .unwrap();
    }
    let node = TestNode::start(config).await;
    let mut client = node.client().await;
    let stream = node.fetch_stream("m").await;
    let status = stream_status(stream).await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("fetch again"), "{status:?}");
    drop(
        client
            .resolve(ResolveRequest {
                reference: "m".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
    );
    // The agent retries an ABORTED transfer by itself, and gets the origin's bytes.
    let (_dir, fetched) = node.prefetch_fresh("m").await;
    assert_same_files(&fetched.path, &vec![("model.bin".into(), rewritten)]);
}

/// Reads a `Fetch` stream to its end; the status that ended it.
async fn stream_status(
    mut stream: tonic::Streaming<modelcache_proto::v1::FetchResponse>,
) -> tonic::Status {
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return tonic::Status::ok(""),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_origin_does_not_hold_up_a_cached_model() {
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![("model.onnx".into(), data(33, 3 * MIB))];
    sandbox.seed("resnet50", &files).await;
    let mut config = sandbox.node_config();
    config.revalidate_after = Duration::from_millis(200);
    let node = TestNode::start(config).await;
    node.prefetch_fresh("resnet50").await;

    // The origin stops answering; the cached revision is due for revalidation.
    sandbox.s3.tap.delay_all_ms.store(60_000, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = node.client().await;
    let resolve = |mut client: modelcache_proto::v1::model_cache_client::ModelCacheClient<
        tonic::transport::Channel,
    >| async move {
        client
            .resolve(ResolveRequest {
                reference: "resnet50".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .manifest
            .unwrap()
    };
    // Served at once from what the node has, not marked stale while the listing runs; a
    // transfer needs nothing from the origin either.
    let started = std::time::Instant::now();
    let manifest = resolve(client.clone()).await;
    assert!(!manifest.stale, "{manifest:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "resolve waited {:?} for a hung origin",
        started.elapsed()
    );
    let (_dir, fetched) = node.prefetch_fresh("resnet50").await;
    assert_same_files(&fetched.path, &files);
    // Once the revalidation gave up (10 s), the revision is reported stale, with why.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let manifest = loop {
        let manifest = resolve(client.clone()).await;
        if manifest.stale || std::time::Instant::now() > deadline {
            break manifest;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(manifest.stale, "never reported stale");
    assert!(
        manifest.stale_reason.contains("did not finish within"),
        "{}",
        manifest.stale_reason
    );
    sandbox.s3.tap.delay_all_ms.store(0, Ordering::SeqCst);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_unusable_name_leaves_out_its_model_and_lists_the_rest() {
    use std::os::unix::ffi::OsStrExt;
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir();
    for model in ["good", "bad", "zeta"] {
        std::fs::create_dir_all(origin.join(model)).unwrap();
        std::fs::write(origin.join(model).join("model.bin"), data(9, 100)).unwrap();
    }
    // A file name that is not UTF-8: no object key can name it.
    let unusable = std::ffi::OsStr::from_bytes(b"\xff.bin");
    std::fs::write(origin.join("bad").join(unusable), b"x").unwrap();
    let node = TestNode::start(sandbox.local_config(&origin)).await;

    // `List` leaves out the folder with the bad name and lists the rest from the origin
    // (nothing is cached yet, so these names can only come from a listing).
    let models = node.agent(&sandbox.dir()).models().await.unwrap();
    let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["good", "zeta"]);
    // The model itself is refused as a problem of the origin's, naming it.
    let status = node
        .client()
        .await
        .resolve(ResolveRequest {
            reference: "bad".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("\"bad\""), "{status:?}");
    node.prefetch_fresh("good").await;
}

/// A local origin tells a name too long for its filesystem, and a symlink loop, for what
/// they are: not "origin unreachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_name_too_long_or_a_symlink_loop_is_named_for_what_it_is() {
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir();
    std::fs::create_dir_all(origin.join("ok")).unwrap();
    std::fs::write(origin.join("ok/config.json"), b"{}").unwrap();
    std::os::unix::fs::symlink(origin.join("looped"), origin.join("looped")).unwrap();
    std::fs::create_dir_all(origin.join("walks/sub")).unwrap();
    std::fs::write(origin.join("walks/config.json"), b"{}").unwrap();
    std::os::unix::fs::symlink(origin.join("walks"), origin.join("walks/sub/again")).unwrap();
    let node = TestNode::start(sandbox.local_config(&origin)).await;
    let mut client = node.client().await;
    let mut resolve = async |reference: String| {
        client
            .resolve(ResolveRequest {
                reference,
                ..Default::default()
            })
            .await
    };

    // A name longer than a file name may be is over the reference limit first (256 bytes
    // as `NAME:VARIANT`), and refused as such before the origin is asked.
    let status = resolve("n".repeat(256)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("265 bytes long") && status.message().contains("limit is 256"),
        "{status:?}"
    );
    for name in ["looped", "walks"] {
        let status = resolve(name.into()).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{name}: {status:?}"
        );
        assert!(
            status.message().contains("symlink loop") && !status.message().contains("unreachable"),
            "{name}: {status:?}"
        );
    }
    // The origin itself is fine.
    assert!(resolve("ok".into()).await.is_ok());
}

/// A local file rewritten in place, keeping its inode, its size and (set back) its
/// modification time, is still seen as changed: the local version includes the change
/// time, which no rewrite can keep. The next fetch gets the new bytes, never the old ones
/// or a mix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_file_rewritten_in_place_with_its_old_mtime_is_a_new_revision() {
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir();
    let model = origin.join("m");
    std::fs::create_dir_all(&model).unwrap();
    let weights = model.join("weights.bin");
    std::fs::write(&weights, data(1, 3 * 1024 * 1024)).unwrap();
    std::fs::write(model.join("config.json"), b"{}").unwrap();
    let mut config = sandbox.local_config(&origin);
    config.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    let (_dir, first) = node.prefetch_fresh("m").await;
    assert_eq!(
        sha256_file(&first.path.join("weights.bin")),
        sha256(&data(1, 3 * 1024 * 1024))
    );

    let modified = std::fs::metadata(&weights).unwrap().modified().unwrap();
    {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(&weights)
            .unwrap();
        file.write_all(&data(2, 3 * 1024 * 1024)).unwrap();
        file.set_modified(modified).unwrap();
    }
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        modified
    );
    let (_dir, second) = node.prefetch_fresh("m").await;
    assert_ne!(second.revision, first.revision);
    assert_eq!(
        sha256_file(&second.path.join("weights.bin")),
        sha256(&data(2, 3 * 1024 * 1024))
    );
}
