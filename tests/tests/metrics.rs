//! `--metrics-listen`: a node's `/metrics` scraped over HTTP and parsed by the Prometheus
//! project's own parser; counters move by exactly the bytes known operations moved.

use std::collections::BTreeMap;
use std::time::Duration;

use modelcache_testkit::metrics::{self, get, scrape};
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

/// A node with `--metrics-listen` on a free port (its config changed by `tweak`), once
/// `/metrics` answers.
async fn metrics_node(
    sandbox: &Sandbox,
    tweak: impl FnOnce(&mut cache_node::Config),
) -> (TestNode, std::net::SocketAddr) {
    let addr: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut config = sandbox.node_config();
    config.metrics_listen = Some(addr);
    tweak(&mut config);
    let node = TestNode::start(config).await;
    assert!(
        wait_for(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok())
        .await
    );
    (node, addr)
}

fn served(samples: &BTreeMap<String, f64>, tier: &str) -> f64 {
    samples[&format!("modelcache_served_bytes_total{{tier=\"{tier}\"}}")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_exactly_the_bytes_served_by_tier_and_read_from_the_origin() {
    let files: ModelFiles = vec![
        ("model.bin".into(), data(1, 5 * MIB + 7)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    let size = (5 * MIB + 9) as f64;
    let sandbox = Sandbox::with_model("pi", &files).await;
    // Variants only when asked for, so that the build counts are the test's.
    let (node, addr) = metrics_node(&sandbox, |c| c.precompute = Default::default()).await;

    // Everything exported from start, at 0; the two fixed names among them.
    let (start, families) = scrape(addr);
    for family in [
        "modelcache_origin_bytes",
        "modelcache_served_bytes",
        "modelcache_origin_requests",
        "modelcache_origin_errors",
        "modelcache_chunk_reads",
        "modelcache_peer_fill_bytes",
        "modelcache_variant_builds",
        "modelcache_variant_builds_ended",
        "modelcache_rpcs_handled",
    ] {
        assert_eq!(families[family], "counter", "{families}");
    }
    assert_eq!(families["modelcache_fetches_in_flight"], "gauge");
    assert_eq!(families["modelcache_tier_capacity_bytes"], "gauge");
    assert_eq!(families["modelcache_tier_used_bytes"], "gauge");
    for family in [
        "modelcache_disk_tier_read_bytes",
        "modelcache_disk_tier_written_bytes",
        "modelcache_memory_tier_evictions",
        "modelcache_disk_tier_evictions",
    ] {
        assert_eq!(families[family], "counter", "{families}");
    }
    // The tiers' sizes as configured (the variant tier's memory is a quarter).
    for (cache, tier, bytes) in [
        ("originals", "memory", 256 * MIB),
        ("originals", "disk", 1024 * MIB),
        ("variants", "memory", 64 * MIB),
        ("variants", "disk", 256 * MIB),
    ] {
        let key = format!("modelcache_tier_capacity_bytes{{cache=\"{cache}\",tier=\"{tier}\"}}");
        assert_eq!(start[&key], bytes as f64, "{key}");
    }
    for tier in ["memory", "disk"] {
        let key = format!("modelcache_tier_used_bytes{{cache=\"originals\",tier=\"{tier}\"}}");
        assert_eq!(start[&key], 0.0, "{key}");
    }
    assert_eq!(families["modelcache_variant_build_seconds"], "histogram");
    assert_eq!(start["modelcache_fetches_in_flight"], 0.0);
    assert_eq!(start["modelcache_variant_build_seconds_count"], 0.0);
    assert_eq!(
        start["modelcache_variant_builds_ended_total{outcome=\"failed\"}"],
        0.0
    );
    assert_eq!(start["modelcache_origin_bytes_total"], 0.0);
    for tier in ["memory", "disk", "origin"] {
        assert_eq!(served(&start, tier), 0.0);
    }
    assert_eq!(get(addr, "/healthz").0, 200);
    // Ready once the origin answered the node's first listing.
    assert!(wait_for(Duration::from_secs(10), || get(addr, "/readyz").0 == 200).await);
    assert_eq!(scrape(addr).0["modelcache_origin_errors_total"], 0.0);
    assert_eq!(get(addr, "/nothing").0, 404);

    // Cold: every byte read from the origin once and served from none of the tiers.
    node.prefetch_fresh("pi").await;
    let (cold, _) = scrape(addr);
    assert_eq!(cold["modelcache_origin_bytes_total"], size);
    let served_cold: f64 = ["memory", "disk", "origin"]
        .iter()
        .map(|t| served(&cold, t))
        .sum();
    assert_eq!(served_cold, size);
    // Read from the origin for this transfer, or joined to the read the node's origin
    // check of the same chunk started (then counted as memory); never from disk.
    assert!(served(&cold, "origin") > 0.0, "{cold:?}");
    assert_eq!(served(&cold, "disk"), 0.0);
    // Four chunks (5 MiB + 7 bytes in 2 MiB chunks, and the config) missed the tiers.
    let missed = "modelcache_chunk_reads_total{cache=\"originals\",tier=\"origin\"}";
    assert_eq!(cold[missed], 4.0);
    // The chunks are in memory and reach the disk tier's files.
    assert!(cold["modelcache_tier_used_bytes{cache=\"originals\",tier=\"memory\"}"] >= size);
    let written = "modelcache_disk_tier_written_bytes_total{cache=\"originals\"}";
    let disk_used = "modelcache_tier_used_bytes{cache=\"originals\",tier=\"disk\"}";
    assert!(
        wait_for(Duration::from_secs(10), || {
            let (now, _) = scrape(addr);
            now[written] >= size && now[disk_used] >= size
        })
        .await,
        "{:?}",
        scrape(addr).0
    );
    // Warm: the same bytes again, all from memory, none from the origin.
    node.prefetch_fresh("pi").await;
    let (warm, _) = scrape(addr);
    assert_eq!(warm["modelcache_origin_bytes_total"], size);
    assert_eq!(served(&warm, "memory") - served(&cold, "memory"), size);
    assert_eq!(served(&warm, "origin"), served(&cold, "origin"));
    assert_eq!(served(&warm, "disk"), served(&cold, "disk"));
    assert_eq!(warm[missed], 4.0);
    assert!(warm["modelcache_fetch_rpcs_total"] >= 2.0);
    // Each Fetch counted once it ended, by method and code; none open now.
    let fetches_ok = "modelcache_rpcs_handled_total{code=\"OK\",method=\"ModelCache/Fetch\"}";
    let ended = wait_for(Duration::from_secs(10), || {
        let (now, _) = scrape(addr);
        now.get(fetches_ok) == Some(&2.0) && now["modelcache_fetches_in_flight"] == 0.0
    })
    .await;
    assert!(ended, "{:?}", scrape(addr).0);

    // A variant build: counted by outcome, its duration in the histogram.
    let st = safetensors_f32(5, 256, 1024);
    sandbox.seed("st", &st).await;
    node.prefetch_fresh("st:int8").await;
    let (built, _) = scrape(addr);
    assert_eq!(
        built["modelcache_variant_builds_ended_total{outcome=\"ok\"}"],
        1.0
    );
    assert_eq!(built["modelcache_variant_build_seconds_count"], 1.0);
    // The variant's chunks were read from the variant tier.
    let variant_hits: f64 = ["memory", "disk"]
        .iter()
        .map(|t| built[&format!("modelcache_chunk_reads_total{{cache=\"variants\",tier=\"{t}\"}}")])
        .sum();
    assert!(variant_hits >= 1.0, "{built:?}");
    assert!(built["modelcache_variant_build_seconds_sum"] > 0.0);
    // A failed call is counted with its code.
    let mut client = node.client().await;
    let missing = client
        .resolve(modelcache_proto::v1::ResolveRequest {
            reference: "no-such-model".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    let not_found =
        "modelcache_rpcs_handled_total{code=\"NOT_FOUND\",method=\"ModelCache/Resolve\"}";
    assert!(
        wait_for(Duration::from_secs(10), || scrape(addr).0.get(not_found)
            == Some(&1.0))
        .await,
        "{:?}",
        scrape(addr).0
    );
}

/// `docs/operations.md` lists every metric family a node exports, and names none it does
/// not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_doc_lists_exactly_the_metrics_a_node_exports() {
    let sandbox = Sandbox::start().await;
    let (_node, addr) = metrics_node(&sandbox, |_| {}).await;
    let (_, families) = scrape(addr);
    metrics::assert_documented(&families);
    let families = families.as_object().unwrap();
    let doc = std::fs::read_to_string(workspace().join("docs/operations.md")).unwrap();
    for word in doc.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        // The agent daemon's metrics are checked against the daemon (daemon.rs).
        let Some(name) = word
            .strip_prefix("modelcache_")
            .filter(|n| !n.starts_with("agent_"))
        else {
            continue;
        };
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            families.contains_key(&format!("modelcache_{family}")),
            "docs/operations.md names modelcache_{name}, which the node does not export"
        );
    }
}

/// A node that trusts a revision for no time lists the model again on every resolve after
/// the first: each is one revalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_of_a_cached_model_counts_as_a_revalidation() {
    let sandbox = Sandbox::with_model("rv", &vec![("config.json".into(), b"{}".to_vec())]).await;
    let (node, addr) = metrics_node(&sandbox, |c| c.revalidate_after = Duration::ZERO).await;
    let (start, families) = scrape(addr);
    assert_eq!(families["modelcache_revalidations"], "counter");
    assert_eq!(families["modelcache_stale_serves"], "counter");
    assert_eq!(start["modelcache_revalidations_total"], 0.0);
    let mut client = node.client().await;
    for _ in 0..3 {
        client
            .resolve(modelcache_proto::v1::ResolveRequest {
                reference: "rv".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let (after, _) = scrape(addr);
    assert_eq!(after["modelcache_revalidations_total"], 2.0);
}

/// `/readyz` says why a node whose origin does not answer is not ready, and its failed
/// requests are counted; a node whose origin answers is ready and counts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_origin_and_its_failures_are_counted() {
    let sandbox = Sandbox::with_model("pi", &vec![("config.json".into(), b"{}".to_vec())]).await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (node, addr) = metrics_node(&sandbox, |c| c.s3_endpoint = Some(dead)).await;
    assert_eq!(get(addr, "/healthz").0, 200);
    let (status, body) = get(addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("neither the origin (s3://models) nor a peer"),
        "{body}"
    );
    let before = scrape(addr).0["modelcache_origin_errors_total"];
    let mut client = node.client().await;
    let failed = client
        .resolve(modelcache_proto::v1::ResolveRequest {
            reference: "pi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    let after = scrape(addr).0["modelcache_origin_errors_total"];
    assert!(after > before, "{before} -> {after}");
    assert_eq!(get(addr, "/readyz").0, 503);

    let (_good, addr) = metrics_node(&sandbox, |_| {}).await;
    assert!(wait_for(Duration::from_secs(10), || get(addr, "/readyz").0 == 200).await);
    assert_eq!(scrape(addr).0["modelcache_origin_errors_total"], 0.0);
}

/// A model larger than the disk tier: the tier reclaims blocks to make room (counted as
/// evictions) and never holds more than its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_tier_counts_its_evictions() {
    let files: ModelFiles = vec![("model.bin".into(), data(3, 96 * MIB))];
    let sandbox = Sandbox::with_model("big", &files).await;
    let (node, addr) = metrics_node(&sandbox, |c| {
        c.precompute = Default::default();
        c.memory_capacity = bytesize::ByteSize::mib(16);
        c.disk_capacity = bytesize::ByteSize::mib(64);
    })
    .await;
    let (start, _) = scrape(addr);
    let evicted = "modelcache_disk_tier_evictions_total{cache=\"originals\"}";
    let used = "modelcache_tier_used_bytes{cache=\"originals\",tier=\"disk\"}";
    assert_eq!(start[evicted], 0.0);
    let (_dir, fetched) = node.prefetch_fresh("big").await;
    assert_same_files(&fetched.path, &files);
    node.idle().await;
    assert!(
        wait_for(Duration::from_secs(20), || scrape(addr).0[evicted] >= 1.0).await,
        "{:?}",
        scrape(addr).0
    );
    let (now, _) = scrape(addr);
    assert!(now[used] > 0.0 && now[used] <= (64 * MIB) as f64, "{now:?}");
}
