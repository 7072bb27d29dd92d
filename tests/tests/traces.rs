//! OpenTelemetry: spans of the real binaries reach a real OTLP/gRPC receiver (the trace
//! service of the official `opentelemetry-proto` definitions, served by this test), and
//! one prefetch through agent → node → peer is one trace, with the expected span names,
//! parent links and attributes. (An RPC's span is named after its method.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use modelcache_testkit::otlp::{Got, Receiver};
use modelcache_testkit::*;

/// The variables that make a binary export to `endpoint` quickly, as `instance`.
fn otel(cmd: &mut Command, endpoint: &str, instance: &str) {
    cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("service.instance.id={instance}"),
        )
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("RUST_LOG");
}

fn agent(node: &str, dir: &Path, endpoint: &str) -> Command {
    let mut cmd = Command::new(binary("cache-agent"));
    otel(&mut cmd, endpoint, "agent");
    cmd.env_remove("CACHE_AGENT_NODE")
        .env_remove("CACHE_AGENT_DIR")
        .args(["--node", node, "--dir"])
        .arg(dir);
    cmd
}

/// The spans of `trace` as an indented tree with durations, for people.
fn tree(spans: &[&Got]) -> String {
    let ids: Vec<&[u8]> = spans.iter().map(|s| s.id.as_slice()).collect();
    let mut children: BTreeMap<Vec<u8>, Vec<&Got>> = BTreeMap::new();
    for s in spans {
        let parent = if ids.contains(&s.parent.as_slice()) {
            s.parent.clone()
        } else {
            Vec::new()
        };
        children.entry(parent).or_default().push(s);
    }
    fn walk(out: &mut String, children: &BTreeMap<Vec<u8>, Vec<&Got>>, at: &[u8], depth: usize) {
        let mut list = children.get(at).cloned().unwrap_or_default();
        list.sort_by_key(|s| s.start);
        for s in list {
            let ms = (s.end - s.start) as f64 / 1e6;
            let detail: Vec<String> = [
                "reference",
                "rpc.method",
                "tier",
                "bytes",
                "peer",
                "variant",
            ]
            .iter()
            .filter_map(|k| s.attrs.get(*k).map(|v| format!("{k}={v}")))
            .collect();
            out.push_str(&format!(
                "{:indent$}{} [{}] {ms:.1} ms {}\n",
                "",
                s.name,
                s.instance,
                detail.join(" "),
                indent = depth * 2
            ));
            walk(out, children, &s.id, depth + 1);
        }
    }
    let mut out = String::new();
    walk(&mut out, &children, &[], 0);
    out
}

/// Two nodes and an agent, each exporting to the receiver: a cold prefetch through the
/// node that does not own the model is one trace — agent `prefetch` → its `transfer` →
/// that node's `Fetch` RPC → `chunk` → `peer_fill` → the owner's `Fetch` RPC → `chunk` →
/// `origin_get` — and a variant's build is in the trace of the prefetch that asked for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prefetch_through_two_nodes_is_one_trace() {
    let receiver = Receiver::default();
    let endpoint = receiver.start().await;
    let files = safetensors_f32(11, 1024, 1536);
    let size: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let sandbox = Sandbox::with_model("st", &files).await;

    let ports = [free_port(), free_port()];
    let peers = ports.map(|p| format!("127.0.0.1:{p}")).join(",");
    let mut nodes = Vec::new();
    let mut logs = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = ["node-a", "node-b"][i];
        let dir = sandbox.dir();
        let log = dir.join("node.log");
        let mut cmd = node_command(&sandbox.s3, &dir.join("cache"), &dir.join("ready"));
        otel(&mut cmd, &endpoint, id);
        cmd.env("CACHE_NODE_LISTEN", format!("127.0.0.1:{port}"))
            .env("CACHE_NODE_PEERS", &peers)
            .env("CACHE_NODE_NODE_ID", id)
            .env("CACHE_NODE_PRECOMPUTE", "none")
            .stderr(std::fs::File::create(&log).unwrap());
        nodes.push(Child(cmd.spawn().unwrap()));
        logs.push(log);
    }
    let first = format!("http://127.0.0.1:{}", ports[0]);
    let dir = sandbox.dir();
    // Both nodes up and probed: the rank order is the cluster's.
    let mut members = serde_json::Value::Null;
    let healthy = wait_for(Duration::from_secs(60), || {
        let out = agent(&first, &dir, &endpoint)
            .args(["--json", "nodes", "st"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        members = serde_json::from_slice(&out.stdout).unwrap_or_default();
        members.as_array().is_some_and(|m| {
            m.len() == 2 && m.iter().all(|m| m["healthy"] == true && m["rank"].is_u64())
        })
    })
    .await;
    assert!(healthy, "{members}");
    let by_rank = |rank: u64| {
        members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["rank"] == rank)
            .unwrap()
            .clone()
    };
    let (owner, other) = (by_rank(1), by_rank(2));
    let owner_id = owner["id"].as_str().unwrap().to_owned();
    let other_id = other["id"].as_str().unwrap().to_owned();
    let other_url = format!("http://{}", other["address"].as_str().unwrap());

    // The original, cold, through the node that does not own it.
    let path =
        run_ok(agent(&other_url, &dir, &endpoint).args(["--direct", "--quiet", "prefetch", "st"]));
    assert_same_files(Path::new(path.trim()), &files);

    // The agent exported when it exited; the nodes export every 100 ms.
    let complete = |spans: &[Got]| {
        let Some(root) = spans
            .iter()
            .find(|s| s.service == "cache-agent" && s.name == "prefetch")
        else {
            return false;
        };
        let origin_bytes: u64 = spans
            .iter()
            .filter(|s| s.trace == root.trace && s.name == "origin_get")
            .map(|s| s.number("bytes"))
            .sum();
        origin_bytes >= size
    };
    assert!(
        wait_for(Duration::from_secs(30), || complete(&receiver.spans())).await,
        "spans received: {:#?}",
        receiver.spans()
    );
    // Let the last batches of the nodes arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let spans = receiver.spans();
    let root = spans
        .iter()
        .find(|s| s.service == "cache-agent" && s.name == "prefetch")
        .unwrap();
    let trace: Vec<&Got> = spans.iter().filter(|s| s.trace == root.trace).collect();
    eprintln!("{}", tree(&trace));
    assert!(root.parent.is_empty(), "the prefetch is the trace's root");
    assert_eq!(root.attr("reference"), "st:original");
    assert_eq!(root.attr("outcome"), "ok");
    assert_eq!(root.number("bytes"), size);
    assert_eq!(root.instance, "agent");

    let on = |instance: &str, name: &str| -> Vec<&Got> {
        trace
            .iter()
            .copied()
            .filter(|s| s.instance == instance && s.name == name)
            .collect()
    };
    let is_child = |child: &Got, parents: &[&Got]| parents.iter().any(|p| p.id == child.parent);
    for s in &trace {
        assert_eq!(
            s.service,
            if s.instance == "agent" {
                "cache-agent"
            } else {
                "cache-node"
            }
        );
    }

    // The agent: prefetch → transfer (the node it used).
    let transfers = on("agent", "transfer");
    assert!(!transfers.is_empty());
    assert!(transfers.iter().all(|t| t.parent == root.id));
    assert!(
        transfers[0]
            .attr("node")
            .contains(&other["address"].as_str().unwrap().to_owned())
    );

    // The node asked: its Fetch RPC is a child of the agent's transfer, its chunks of that
    // RPC, its peer fills of its chunks; every chunk came from the owner.
    let fetches = on(&other_id, "ModelCache/Fetch");
    assert_eq!(fetches.len(), 1, "{}", tree(&trace));
    let fetch = fetches[0];
    assert!(is_child(fetch, &transfers));
    assert_eq!(fetch.attr("reference"), "st:original");
    assert_eq!(fetch.attr("code"), "OK");
    assert!(fetch.number("bytes") > size);
    // Each chunk missed the tiers once (then the origin checks read it from memory).
    let all_chunks = on(&other_id, "chunk");
    assert!(all_chunks.iter().all(|c| is_child(c, &fetches)));
    let chunks: Vec<&Got> = all_chunks
        .iter()
        .copied()
        .filter(|c| c.attr("tier") == "origin")
        .collect();
    assert_eq!(chunks.len() as u64, size.div_ceil(2 << 20));
    assert!(
        all_chunks
            .iter()
            .all(|c| ["origin", "memory"].contains(&c.attr("tier")))
    );
    assert_eq!(chunks.iter().map(|c| c.number("bytes")).sum::<u64>(), size);
    let fills = on(&other_id, "peer_fill");
    assert_eq!(fills.len(), chunks.len(), "{}", tree(&trace));
    assert!(fills.iter().all(|f| is_child(f, &chunks)));
    assert!(fills.iter().all(|f| f.attr("peer").contains(&owner_id)));
    assert!(fills.iter().all(|f| f.attr("outcome") == "ok"));
    assert_eq!(fills.iter().map(|f| f.number("bytes")).sum::<u64>(), size);
    // It resolved through the owner too.
    let resolves = on(&other_id, "peer_resolve");
    assert!(!resolves.is_empty(), "{}", tree(&trace));

    // The owner: a Fetch RPC per peer fill, each a child of one; chunks under them; the
    // origin read once, its GETs in the trace with their ranges.
    let owner_fetches = on(&owner_id, "ModelCache/Fetch");
    assert_eq!(owner_fetches.len(), fills.len());
    assert!(owner_fetches.iter().all(|f| is_child(f, &fills)));
    assert!(
        on(&owner_id, "ModelCache/Resolve")
            .iter()
            .any(|r| is_child(r, &resolves))
    );
    let owner_chunks = on(&owner_id, "chunk");
    assert!(owner_chunks.iter().all(|c| is_child(c, &owner_fetches)));
    let gets = on(&owner_id, "origin_get");
    assert_eq!(gets.iter().map(|g| g.number("bytes")).sum::<u64>(), size);
    for g in &gets {
        assert_eq!(g.attr("model"), "st");
        assert!(g.number("range_end") > g.number("range_start"));
    }
    assert!(
        on(&other_id, "origin_get").is_empty(),
        "only the owner reads the origin"
    );

    // The access log of the node asked: one line for the Fetch, with what it sent.
    let log = std::fs::read_to_string(&logs[if other_id == "node-a" { 0 } else { 1 }]).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("method=ModelCache/Fetch") && l.contains("reference=st:original"))
        .unwrap_or_else(|| panic!("no access line for the Fetch in:\n{log}"));
    assert!(
        line.contains("code=OK") && line.contains("duration_ms="),
        "{line}"
    );

    // A variant: the owner's build is in the trace of the prefetch that asked for it.
    run_ok(agent(&other_url, &dir, &endpoint).args(["--direct", "--quiet", "prefetch", "st:int8"]));
    let built_in_trace = |spans: &[Got]| {
        let roots: Vec<&Got> = spans
            .iter()
            .filter(|s| s.name == "prefetch" && s.attr("reference") == "st:int8")
            .collect();
        // The build's reads of the original are its children.
        spans.iter().any(|s| {
            s.name == "variant_build"
                && s.instance == owner_id
                && s.attr("outcome") == "ok"
                && roots.iter().any(|r| r.trace == s.trace)
                && spans.iter().any(|c| {
                    c.name == "chunk" && c.parent == s.id && c.attr("variant") == "original"
                })
        })
    };
    assert!(
        wait_for(Duration::from_secs(30), || built_in_trace(
            &receiver.spans()
        ))
        .await,
        "{:#?}",
        receiver
            .spans()
            .iter()
            .filter(|s| s.name == "variant_build" || s.name == "prefetch")
            .collect::<Vec<_>>()
    );
    drop(nodes);
}
