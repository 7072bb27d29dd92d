//! Operator controls: `cache-agent admin revalidate|invalidate` against a real two-node
//! cluster. A model changed in the origin is served at its old revision until it is
//! trusted no longer (`--revalidate-after`, 60 s); `admin revalidate --cluster` makes
//! every node list it now, the owner first, and the next prefetch gets the new bytes.

use std::process::Command;

use modelcache_testkit::*;

fn admin(node: &str, args: &[&str]) -> std::process::Output {
    admin_command(node, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revalidate_makes_every_node_serve_the_new_revision_at_once() {
    let old: ModelFiles = vec![("model.bin".into(), data(1, 3 << 20))];
    let sandbox = Sandbox::with_model("ad", &old).await;
    let nodes = sandbox
        .cluster(2, |c| c.precompute = Default::default())
        .await;
    let (_d, first) = nodes[0].prefetch_fresh("ad").await;
    let (_d, second) = nodes[1].prefetch_fresh("ad").await;
    assert_eq!(first.revision, second.revision);

    // The origin changes; both nodes still trust the revision they listed.
    let new: ModelFiles = vec![("model.bin".into(), data(2, (3 << 20) + 5))];
    sandbox.seed("ad", &new).await;
    for node in &nodes {
        let (_d, stale) = node.prefetch_fresh("ad").await;
        assert_eq!(stale.revision, first.revision);
    }

    let out = admin(&nodes[0].url, &["revalidate", "ad", "--cluster"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    let revisions: Vec<&str> = lines
        .iter()
        .map(|l| l.split('\t').nth(2).unwrap())
        .collect();
    assert_eq!(revisions[0], revisions[1], "{stdout}");
    assert_ne!(revisions[0], first.revision, "{stdout}");
    // Every node serves the new bytes at once.
    for node in &nodes {
        let (dir, fresh) = node.prefetch_fresh("ad").await;
        assert_eq!(fresh.revision, revisions[0]);
        assert_same_files(&fresh.path, &new);
        drop(dir);
    }

    // Invalidate answers for each node; --json for scripts.
    let out = admin(&nodes[1].url, &["invalidate", "ad", "--cluster"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let out = Command::new(binary("cache-agent"))
        .args([
            "--node",
            &nodes[0].url,
            "--json",
            "admin",
            "revalidate",
            "ad",
        ])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 1);
    assert_eq!(json[0]["revision"], revisions[0]);

    // Bad input: a malformed reference is refused before any call (exit 2); an unknown
    // model fails on each node, named, and the command fails.
    let out = admin(&nodes[0].url, &["revalidate", "a b"]);
    assert_eq!(out.status.code(), Some(2));
    let out = admin(&nodes[0].url, &["revalidate", "no-such-model", "--cluster"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("error:").count(), 2, "{stdout}");
    assert!(stdout.contains("no-such-model"), "{stdout}");

    // A member that is down is named in the answer; the others still act.
    let mut nodes = nodes;
    let down = nodes.pop().unwrap();
    let down_url = down.url.clone();
    down.stop().await;
    let out = admin(&nodes[0].url, &["invalidate", "ad", "--cluster"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed: Vec<&str> = stdout.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(failed.len(), 1, "{stdout}");
    assert!(
        failed[0].contains(down_url.trim_start_matches("http://")),
        "{stdout}"
    );
}
