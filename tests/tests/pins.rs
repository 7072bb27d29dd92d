//! Pinning (`cache-agent admin pin|unpin|pins`): a pinned model is kept whole on the
//! node's disk outside the tiers, so it is served without the origin after the tiers
//! evicted it and after a restart; the pin follows the model to a new revision on every
//! member; bad references, unknown models and a full disk are clear errors.

use std::path::Path;

use modelcache_proto::v1::AdminRequest;
use modelcache_proto::v1::admin_client::AdminClient;
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

fn admin(node: &str, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = admin_command(node, args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status, text(&out.stdout), text(&out.stderr))
}

/// The files the pin store `pins` holds.
fn pinned_files(pins: &Path) -> usize {
    std::fs::read_dir(pins.join("files")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_model_is_served_without_the_origin_after_eviction_and_restart() {
    let keep: ModelFiles = vec![
        ("model.bin".into(), data(1, 24 * MIB + 3)),
        ("config.json".into(), b"{\"pinned\": true}".to_vec()),
    ];
    let flood: ModelFiles = vec![("model.bin".into(), data(2, 96 * MIB))];
    let sandbox = Sandbox::with_model("keep", &keep).await;
    sandbox.seed("flood", &flood).await;
    sandbox.seed("st", &safetensors_f32(3, 256, 1024)).await;
    let mut config = sandbox.node_config();
    config.precompute = Default::default();
    config.memory_capacity = bytesize::ByteSize::mib(16);
    config.disk_capacity = bytesize::ByteSize::mib(64);
    let cache_dir = config.cache_dir.clone();
    let node = TestNode::start(config.clone()).await;

    // Pinning prints the revision and size; a variant is built and pinned too.
    let (status, out, err) = admin(&node.url, &["pin", "keep"]);
    assert!(status.success(), "{out}{err}");
    let fields: Vec<&str> = out.trim().split('\t').collect();
    assert_eq!(fields.len(), 4, "{out}");
    assert_eq!(fields[3], "24.0 MiB", "{out}");
    let (status, out, err) = admin(&node.url, &["pin", "st:int8"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(pinned_files(&cache_dir.join("pins")), 3);
    let (_d, int8) = node.prefetch_fresh("st:int8").await;
    let int8_files = read_dir_files(&int8.path);

    // A model larger than the disk tier pushes everything else out of the tiers.
    let (_d, fetched) = node.prefetch_fresh("flood").await;
    assert_same_files(&fetched.path, &flood);
    node.idle().await;
    let before = node.stats().origin_bytes;
    let (_d, fetched) = node.prefetch_fresh("keep").await;
    assert_same_files(&fetched.path, &keep);
    let (_d, again) = node.prefetch_fresh("st:int8").await;
    assert_same_files(&again.path, &int8_files);
    assert_eq!(
        node.stats().origin_bytes,
        before,
        "a pinned model read the origin"
    );
    // An unpinned model was evicted: it comes from the origin again.
    let (_d, fetched) = node.prefetch_fresh("flood").await;
    assert_same_files(&fetched.path, &flood);
    assert!(node.stats().origin_bytes > before);
    node.stop().await;

    // After a restart, the pins are listed and served at once, still without the origin.
    let node = TestNode::start(config).await;
    let (status, out, err) = admin(&node.url, &["pins"]);
    assert!(status.success(), "{out}{err}");
    let pinned: Vec<&str> = out.lines().map(|l| l.split('\t').nth(2).unwrap()).collect();
    assert_eq!(pinned, ["keep:original", "st:int8"], "{out}");
    let (_d, fetched) = node.prefetch_fresh("keep").await;
    assert_same_files(&fetched.path, &keep);
    assert_eq!(node.stats().origin_bytes, 0);

    // Unpinning removes the files; a second unpin, an unknown model and a malformed
    // reference are errors that say so.
    let (status, out, err) = admin(&node.url, &["unpin", "keep"]);
    assert!(status.success(), "{out}{err}");
    let (status, out, err) = admin(&node.url, &["unpin", "st:int8"]);
    assert!(status.success(), "{out}{err}");
    assert_eq!(pinned_files(&cache_dir.join("pins")), 0);
    let (status, out, _) = admin(&node.url, &["unpin", "keep"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        out.contains("keep:original is not pinned on this node"),
        "{out}"
    );
    let (status, out, _) = admin(&node.url, &["pin", "no-such-model"]);
    assert_eq!(status.code(), Some(1));
    assert!(out.contains("no model named \"no-such-model\""), "{out}");
    let (status, _, err) = admin(&node.url, &["pin", "a b"]);
    assert_eq!(status.code(), Some(2), "{err}");
    let (status, out, _) = admin(&node.url, &["pins"]);
    assert!(status.success());
    assert!(out.trim().ends_with("\tno pins"), "{out}");
    let (status, out, _) = admin(&node.url, &["--json", "pins"]);
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json[0]["pins"], serde_json::json!([]), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pin_follows_its_model_to_a_new_revision_on_every_member() {
    let old: ModelFiles = vec![("model.bin".into(), data(4, 3 * MIB))];
    let sandbox = Sandbox::with_model("moving", &old).await;
    let nodes = sandbox
        .cluster(2, |c| c.precompute = Default::default())
        .await;
    let (status, out, err) = admin(&nodes[0].url, &["pin", "moving", "--cluster"]);
    assert!(status.success(), "{out}{err}");
    let first: Vec<&str> = out.lines().map(|l| l.split('\t').nth(2).unwrap()).collect();
    assert_eq!(first.len(), 2, "{out}");
    assert_eq!(first[0], first[1], "{out}");

    let new: ModelFiles = vec![("model.bin".into(), data(5, 3 * MIB + 11))];
    sandbox.seed("moving", &new).await;
    let (status, out, err) = admin(&nodes[1].url, &["revalidate", "moving", "--cluster"]);
    assert!(status.success(), "{out}{err}");
    let (status, out, err) = admin(&nodes[1].url, &["pins", "--cluster"]);
    assert!(status.success(), "{out}{err}");
    let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(lines.len(), 2, "{out}");
    for line in &lines {
        assert_eq!(line[2], "moving:original", "{out}");
        assert_ne!(line[3], first[0], "{out}");
        assert_eq!(line[4], "3.0 MiB", "{out}");
    }
    for node in &nodes {
        let (_d, fetched) = node.prefetch_fresh("moving").await;
        assert_eq!(fetched.revision, lines[0][3]);
        assert_same_files(&fetched.path, &new);
        // The earlier revision's pinned file is gone.
        assert_eq!(pinned_files(node.registry.pins().dir()), 1);
    }
}

/// A pin the disk has no room for is refused with the sizes, and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_without_room_is_refused_with_the_sizes() {
    let big: ModelFiles = vec![("model.bin".into(), data(6, 48 * MIB))];
    let sandbox = Sandbox::with_model("big", &big).await;
    let disk = Tmpfs::mount(160);
    let mut config = sandbox.node_config();
    config.cache_dir = disk.path().join("cache");
    config.precompute = Default::default();
    config.memory_capacity = bytesize::ByteSize::mib(64);
    config.disk_capacity = bytesize::ByteSize::mib(64);
    config.variant_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start(config).await;
    let mut client = AdminClient::connect(node.url.clone()).await.unwrap();
    let err = client
        .pin(AdminRequest {
            reference: "big".into(),
            cluster: false,
        })
        .await
        .unwrap()
        .into_inner()
        .nodes
        .remove(0)
        .error;
    assert!(
        err.contains("pinning big:original needs 48 MiB") && err.contains("MiB free"),
        "{err}"
    );
    assert_eq!(pinned_files(&disk.path().join("cache/pins")), 0);
    // The model itself is still served, from the tiers.
    let (_d, fetched) = node.prefetch_fresh("big").await;
    assert_same_files(&fetched.path, &big);
}
