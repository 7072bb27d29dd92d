//! Several nodes as one cache (SPEC §7), in one process against the test S3 server: each
//! model read from the origin once and built once, whichever node agents ask; peers that
//! fail, stall or lie do not poison anybody's cache.

use std::time::Duration;

use cache_agent::{Agent, Progress};
use futures::future::join_all;
use modelcache_proto::Reference;
use modelcache_testkit::{ModelFiles, Sandbox, TestNode, assert_same_files, data};

const IDS: [&str; 3] = ["node-0", "node-1", "node-2"];

/// The index of the owner of `model` among `IDS`.
fn owner(model: &str) -> usize {
    let id = modelcache_proto::rank::owner(model, IDS).unwrap();
    IDS.iter().position(|i| *i == id).unwrap()
}

/// Object bytes the S3 server has sent in GET bodies.
fn origin_bytes(sandbox: &Sandbox) -> u64 {
    sandbox
        .s3
        .tap
        .get_bytes
        .load(std::sync::atomic::Ordering::SeqCst)
}

/// `agents` agents, agent i asking node i mod 3 directly, all for `reference` at once;
/// each copy checked against `files`.
async fn prefetch_everywhere(
    sandbox: &Sandbox,
    nodes: &[TestNode],
    reference: &str,
    agents: usize,
) -> Vec<cache_agent::Fetched> {
    let reference = Reference::parse(reference).unwrap();
    let runs = (0..agents).map(|i| {
        let agent =
            Agent::new(vec![nodes[i % nodes.len()].url.clone()], sandbox.dir()).with_direct(true);
        let reference = reference.clone();
        async move {
            agent
                .prefetch(&reference, &Progress::hidden())
                .await
                .unwrap_or_else(|e| panic!("agent {i}: {e}"))
        }
    });
    join_all(runs).await
}

fn model(seed: u64) -> ModelFiles {
    vec![
        ("weights-1.bin".into(), data(seed, 200 << 20)),
        ("weights-2.bin".into(), data(seed + 1, (56 << 20) + 12345)),
        ("config.json".into(), br#"{"layers": 2}"#.to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_four_agents_on_three_nodes_read_a_cold_model_from_the_origin_once() {
    let files = model(1);
    let size: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let sandbox = Sandbox::with_model("big", &files).await;
    let nodes = sandbox
        .cluster(3, |c| c.precompute = Default::default())
        .await;
    sandbox.s3.tap.reset();

    let fetched = prefetch_everywhere(&sandbox, &nodes, "big", 24).await;
    for f in &fetched {
        assert_same_files(&f.path, &files);
    }
    let read = origin_bytes(&sandbox);
    assert!(
        read as f64 <= size as f64 * 1.05,
        "the origin sent {read} bytes for a model of {size}"
    );
    let own = owner("big");
    eprintln!(
        "origin bytes {read} for a model of {size} ({:.4}x); peer-fill bytes per node {:?}, owner node-{own}",
        read as f64 / size as f64,
        nodes
            .iter()
            .map(|n| n.stats().peer_fill_bytes)
            .collect::<Vec<_>>()
    );
    for (i, node) in nodes.iter().enumerate() {
        let stats = node.stats();
        if i == own {
            assert_eq!(stats.peer_fill_bytes, 0, "the owner filled from a peer");
        } else {
            assert!(
                stats.peer_fill_bytes > 0,
                "node {i} filled nothing from the owner: {stats:?}"
            );
            assert_eq!(stats.origin_bytes, 0, "non-owner {i} read the origin");
        }
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_variant_is_built_once_in_the_cluster_and_filled_from_its_builder() {
    let files = modelcache_testkit::safetensors_f32(3, 1024, 4096);
    let sandbox = Sandbox::with_model("st", &files).await;
    let nodes = sandbox
        .cluster(3, |c| c.precompute = Default::default())
        .await;

    let fetched = prefetch_everywhere(&sandbox, &nodes, "st:int8", 6).await;
    let first = std::fs::read(fetched[0].path.join("model.safetensors")).unwrap();
    for f in &fetched {
        assert_eq!(
            std::fs::read(f.path.join("model.safetensors")).unwrap(),
            first,
            "{} differs",
            f.path.display()
        );
        assert_eq!(f.revision, fetched[0].revision);
    }
    let builds: Vec<u64> = nodes.iter().map(|n| n.stats().variant_builds).collect();
    assert_eq!(builds.iter().sum::<u64>(), 1, "builds per node: {builds:?}");
    assert_eq!(
        builds[owner("st")],
        1,
        "the owner did not build it: {builds:?}"
    );
    let size = files[0].1.len() as u64;
    assert!(origin_bytes(&sandbox) as f64 <= size as f64 * 1.05);
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_members_rpc_lists_every_node_with_its_id_and_health() {
    let sandbox = Sandbox::start().await;
    let nodes = sandbox.cluster(3, |_| {}).await;
    let members = nodes[1].members().await.unwrap();
    assert_eq!(members.node_id, "node-1");
    assert!(members.ready);
    let ids: Vec<&str> = members.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, ["node-1", "node-0", "node-2"], "{members:?}");
    assert!(members.members.iter().all(|m| m.healthy));
    assert!(members.members[0].local);
    for (m, node) in members
        .members
        .iter()
        .zip([&nodes[1], &nodes[0], &nodes[2]])
    {
        assert_eq!(format!("http://{}", m.address), node.url);
    }
    let mut nodes = nodes;
    let last = nodes.pop().unwrap();
    last.stop().await;
    // The node that left is seen down within a few probes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let members = nodes[0].members().await.unwrap();
        let gone = members.members.iter().find(|m| m.id == "node-2").unwrap();
        if !gone.healthy {
            assert!(!gone.detail.is_empty());
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{members:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in nodes {
        node.stop().await;
    }
}

/// The ranking as SPEC §7 describes it, written again here: weight = the first 8 bytes
/// (little-endian) of BLAKE3 over the model name and the node id, each prefixed by its
/// length as 8 little-endian bytes; highest weight first.
fn rank_independently(model: &str, ids: &[&str]) -> Vec<String> {
    let mut weighted: Vec<(u64, String)> = ids
        .iter()
        .map(|id| {
            let mut input = Vec::new();
            input.extend_from_slice(&(model.len() as u64).to_le_bytes());
            input.extend_from_slice(model.as_bytes());
            input.extend_from_slice(&(id.len() as u64).to_le_bytes());
            input.extend_from_slice(id.as_bytes());
            let hash = blake3::hash(&input);
            let weight = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap());
            (weight, id.to_string())
        })
        .collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    weighted.into_iter().map(|(_, id)| id).collect()
}

#[test]
fn members_leaving_or_joining_move_only_their_share_of_models() {
    let names: Vec<String> = (0..1000).map(|i| format!("org/model-{i}")).collect();
    let three = ["node-0", "node-1", "node-2"];
    let four = ["node-0", "node-1", "node-2", "node-3"];
    let two = ["node-0", "node-2"];
    let owner = |name: &str, ids: &[&str]| rank_independently(name, ids)[0].clone();
    for name in &names {
        // The nodes and agents rank exactly as the formula says.
        assert_eq!(
            modelcache_proto::rank::rank(name, three),
            rank_independently(name, &three)
        );
    }
    // node-1 leaves: only what it owned moves, each to its second in rank.
    let mut moved = 0;
    for name in &names {
        let before = owner(name, &three);
        let after = owner(name, &two);
        if before == "node-1" {
            moved += 1;
            assert_eq!(after, rank_independently(name, &three)[1]);
        } else {
            assert_eq!(before, after, "{name} moved although its owner stayed");
        }
    }
    assert!((250..420).contains(&moved), "node-1 owned {moved} of 1000");
    // node-3 joins: it takes about a quarter, all from the others, and nothing else moves.
    let mut taken = 0;
    for name in &names {
        let after = owner(name, &four);
        if after == "node-3" {
            taken += 1;
        } else {
            assert_eq!(
                after,
                owner(name, &three),
                "{name} moved between old members"
            );
        }
    }
    assert!((180..320).contains(&taken), "node-3 took {taken} of 1000");
    eprintln!("node-1 leaving moved {moved} of 1000 models; node-3 joining took {taken}");
}
