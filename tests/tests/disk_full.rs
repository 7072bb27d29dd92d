//! Full disks. The agent's filling up mid-prefetch: a clear error, no partial model left
//! behind. The node's filling up: its tiers' space was reserved at startup, so it keeps
//! caching; tiers that do not fit are refused at startup.

use cache_agent::{AgentError, Progress};
use modelcache_proto::Reference;
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_mid_prefetch_is_a_clear_error_and_leaves_nothing() {
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![
        ("a.json".into(), b"{}".to_vec()),
        ("model.onnx".into(), data(40, 12 * MIB)),
    ];
    sandbox.seed("resnet50", &files).await;
    let node = sandbox.node().await;
    let disk = Tmpfs::mount(6);
    let agent = node.agent(disk.dir.path());
    let err = agent
        .prefetch(&Reference::parse("resnet50").unwrap(), &Progress::hidden())
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::NoSpace { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("no space left") && text.contains(&disk.dir.path().display().to_string()),
        "{text}"
    );
    assert!(!disk.dir.path().join("resnet50/@original").exists());
    let leftovers: u64 = walk_sizes(disk.dir.path());
    assert_eq!(leftovers, 0, "the partial download was not removed");

    // With room, the same agent directory works.
    let roomy = Tmpfs::mount(64);
    let fetched = node
        .agent(roomy.dir.path())
        .prefetch(&Reference::parse("resnet50").unwrap(), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_reserves_its_tiers_so_a_full_filesystem_loses_nothing() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![("model.bin".into(), data(41, 24 * MIB + 5))];
    seed(&s3, "big", &files).await;
    let disk = Tmpfs::mount(192);
    let cache_dir = disk.dir.path().join("cache");

    // Tiers larger than the filesystem: refused at startup, nothing allocated.
    let mut config = node_config(&s3, &cache_dir);
    config.precompute = Default::default();
    config.disk_capacity = bytesize::ByteSize::mib(256);
    config.variant_capacity = bytesize::ByteSize::mib(64);
    let err = match cache_node::Node::open(&config).await {
        Ok(_) => panic!("tiers larger than the filesystem were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("needs") && err.contains("MiB free") && err.contains("--disk-capacity"),
        "{err}"
    );
    std::fs::remove_dir_all(&cache_dir).unwrap();

    // Tiers that fit; then something else takes every free byte of the filesystem.
    config.disk_capacity = bytesize::ByteSize::mib(64);
    let node = TestNode::start(config).await;
    fill(&disk.dir.path().join("filler"));
    let (_dir, fetched) = node.prefetch_fresh("big").await;
    assert_same_files(&fetched.path, &files);
    node.idle().await;

    // Every chunk reached the disk tier, byte for byte.
    let resolved = node
        .registry
        .resolve(&Reference::parse("big").unwrap())
        .await
        .unwrap();
    let cache = node.registry.tier_caches().0;
    cache.clear_memory();
    let bytes = &files[0].1;
    for (i, key) in resolved.revision.files[0].keys.iter().enumerate() {
        let value = cache
            .load_from_disk(key)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("chunk {i} not on disk"));
        let start = i * modelcache_proto::CHUNK_SIZE as usize;
        let end = (start + modelcache_proto::CHUNK_SIZE as usize).min(bytes.len());
        assert!(
            value.data[..] == bytes[start..end],
            "chunk {i} differs on disk"
        );
    }
    // And the node shuts down cleanly (the disk tier's writers did not fail).
    node.stop().await;
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; MIB];
    loop {
        match file.write_all(&block) {
            Ok(()) => continue,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = file.sync_all();
}

fn walk_sizes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                walk_sizes(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}
