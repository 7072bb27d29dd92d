//! The agent's disk filling up mid-prefetch: a clear error, no partial model left behind.

use std::process::Command;

use cache_agent::{AgentError, Progress};
use modelcache_proto::Reference;
use modelcache_tests::*;

const MIB: usize = 1024 * 1024;

/// A small tmpfs mounted for the test's lifetime (needs root, as CI has).
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size_mib: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a small tmpfs and needs root (as CI runs)"
        );
        Self { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_mid_prefetch_is_a_clear_error_and_leaves_nothing() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![
        ("a.json".into(), b"{}".to_vec()),
        ("model.onnx".into(), data(40, 12 * MIB)),
    ];
    seed(&s3, "resnet50", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let node = TestNode::start(node_config(&s3, cache.path())).await;
    let disk = SmallDisk::mount(6);
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
    let roomy = SmallDisk::mount(64);
    let fetched = node
        .agent(roomy.dir.path())
        .prefetch(&Reference::parse("resnet50").unwrap(), &Progress::hidden())
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
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
