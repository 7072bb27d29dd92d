//! A cluster of real `cache-node` processes losing the owner of a model mid-transfer:
//! agents go on from the bytes they reached on the next node in rank, in the same run.

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cache_agent::{Agent, Progress};
use futures::future::join_all;
use modelcache_proto::Reference;
use modelcache_proto::v1::MembersRequest;
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_testkit::*;

const IDS: [&str; 3] = ["node-0", "node-1", "node-2"];

/// Three node processes peering with one another; their URLs once each sees all three.
async fn start_cluster(s3: &S3Server, dirs: &[tempfile::TempDir]) -> (Vec<Child>, Vec<String>) {
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let mut children = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        children.push(Child(
            Command::new(binary("cache-node"))
                .env("CACHE_NODE_ORIGIN", "s3://models")
                .env("CACHE_NODE_LISTEN", addr)
                .env("CACHE_NODE_PEERS", addrs.join(","))
                .env("CACHE_NODE_NODE_ID", IDS[i])
                .env("CACHE_NODE_PROBE_INTERVAL", "200ms")
                .env("CACHE_NODE_PEER_TIMEOUT", "3s")
                .env("CACHE_NODE_CACHE_DIR", dirs[i].path())
                .env("CACHE_NODE_MEMORY_CAPACITY", "128MiB")
                .env("CACHE_NODE_DISK_CAPACITY", "512MiB")
                .env("CACHE_NODE_VARIANT_CAPACITY", "128MiB")
                .env("CACHE_NODE_PRECOMPUTE", "none")
                .env("AWS_ENDPOINT_URL", s3.endpoint())
                .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
                .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
                .env("AWS_REGION", s3::REGION)
                .env("AWS_ALLOW_HTTP", "true")
                .env_remove("RUST_LOG")
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    for url in &urls {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let members = match ModelCacheClient::connect(url.clone()).await {
                Ok(mut c) => c
                    .members(MembersRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner()),
                Err(_) => None,
            };
            if members
                .as_ref()
                .is_some_and(|m| m.ready && m.members.iter().filter(|m| m.healthy).count() == 3)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{url} never saw the cluster: {members:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    (children, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_finish_on_the_next_node_when_the_owner_dies_mid_stream() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![
        ("weights.bin".into(), data(41, 96 << 20)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    seed(&s3, "llm", &files).await;
    seed(&s3, "other", &vec![("w.bin".into(), data(42, 3 << 20))]).await;
    // A slow origin, so that the owner dies with the transfers well under way.
    s3.tap.bytes_per_sec.store(6 << 20, Ordering::SeqCst);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (mut children, urls) = start_cluster(&s3, &dirs).await;
    let owner_id = modelcache_proto::rank::owner("llm", IDS).unwrap();
    let owner = IDS.iter().position(|i| *i == owner_id).unwrap();

    // The agents are given every node and route by themselves: the owner first.
    let agent_dirs: Vec<tempfile::TempDir> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();
    let listed = Agent::new(urls.clone(), agent_dirs[0].path())
        .members(Some("llm"))
        .await
        .unwrap();
    assert_eq!(listed[0].id, owner_id, "{listed:?}");
    assert_eq!(listed[0].rank, Some(1));

    let reference = Reference::parse("llm").unwrap();
    let mut recorders = Vec::new();
    let mut runs = Vec::new();
    for dir in &agent_dirs {
        let (progress, recorder) = Progress::recording();
        recorders.push(recorder);
        let agent = Agent::new(urls.clone(), dir.path());
        let reference = reference.clone();
        runs.push(tokio::spawn(async move {
            agent.prefetch(&reference, &progress).await
        }));
    }
    // Once every agent has 16 MiB, the owner dies (SIGKILL: no goodbye to anyone).
    assert!(
        wait_for(Duration::from_secs(60), || recorders
            .iter()
            .all(|r| r.received() >= 16 << 20))
        .await,
        "the transfers did not get going"
    );
    let _ = children[owner].0.kill();
    let cut = Instant::now();
    s3.tap.bytes_per_sec.store(0, Ordering::SeqCst);

    let results = join_all(runs).await;
    let size: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let mut waits = Vec::new();
    for (result, recorder) in results.into_iter().zip(&recorders) {
        let fetched = result
            .unwrap()
            .unwrap_or_else(|e| panic!("agent failed: {e}"));
        assert_same_files(&fetched.path, &files);
        let starts = recorder.starts();
        assert!(starts.len() >= 2, "no failover: {starts:?}");
        let resumed = starts[1];
        // It went on from where it was, not from the start.
        assert!(resumed.done >= 16 << 20, "{starts:?}");
        assert!(recorder.received() < size + (32 << 20), "{starts:?}");
        waits.push(resumed.first_bytes.unwrap().duration_since(cut));
    }
    eprintln!("cut to first byte from the next node, per agent: {waits:?}");

    // The other nodes keep serving.
    for (i, url) in urls.iter().enumerate().filter(|(i, _)| *i != owner) {
        let dir = tempfile::tempdir().unwrap();
        let fetched = Agent::new(vec![url.clone()], dir.path())
            .with_direct(true)
            .prefetch(&Reference::parse("other").unwrap(), &Progress::hidden())
            .await
            .unwrap_or_else(|e| panic!("node {i} after the owner died: {e}"));
        assert_eq!(fetched.total_size, 3 << 20);
    }
    drop(children);
}
