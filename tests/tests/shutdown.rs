//! SIGTERM while a client is in the middle of a stream: the node stops accepting, lets
//! the stream go on for `--shutdown-grace`, then ends it with UNAVAILABLE and exits 0; the
//! agent resumes on its next run, from a node reopened on the same (intact) disk tier.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

fn start_node(s3: &S3Server, cache: &Path, ready: &Path) -> Child {
    let _ = std::fs::remove_file(ready);
    let mut cmd = node_command(s3, cache, ready);
    Child(cmd.env("CACHE_NODE_SHUTDOWN_GRACE", "1s").spawn().unwrap())
}

async fn url_of(ready: &Path) -> String {
    assert!(wait_for(Duration::from_secs(30), || ready.exists()).await);
    format!("http://{}", std::fs::read_to_string(ready).unwrap().trim())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_ends_open_streams_after_the_grace_and_the_agent_resumes_after() {
    let sandbox = Sandbox::start().await;
    let files: ModelFiles = vec![("model.bin".into(), data(5, 64 * MIB))];
    sandbox.seed("rho", &files).await;
    let cache = sandbox.dir();
    let ready = sandbox.dir().join("ready");
    let dir = sandbox.dir();
    let mut node = start_node(&sandbox.s3, &cache, &ready);
    let url = url_of(&ready).await;
    // 64 MiB at 2 MiB/s: still streaming when SIGTERM comes, for half a minute more.
    sandbox
        .s3
        .tap
        .bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let agent = |url: &str| {
        let mut cmd = Command::new(binary("cache-agent"));
        cmd.env_remove("CACHE_AGENT_NODE")
            .env_remove("CACHE_AGENT_DIR")
            .args(["--node", url, "--dir"])
            .arg(&dir)
            .args(["--direct", "prefetch", "rho"]);
        cmd
    };
    let running = agent(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let store = dir.join("rho/.original");
    assert!(download_started(&store).await, "the transfer never started");
    let term = Instant::now();
    let status = node.terminate();
    let took = term.elapsed();
    assert!(status.success(), "node exited with {status}");
    // Bounded by the grace (1 s) and the flush; at 2 MiB/s the stream had 25+ s to go.
    println!("node exited {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let out = running.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // Ended, not hung: the agent found no node to go on with, and says so.
    assert!(
        err.contains("cannot reach") || err.contains("shutting down"),
        "{err}"
    );
    assert!(!dir.join("rho/@original").exists());

    // A node on the same cache dir serves what its disk tier kept; the agent resumes.
    sandbox.s3.tap.bytes_per_sec.store(0, Ordering::SeqCst);
    let _node = start_node(&sandbox.s3, &cache, &ready);
    let url = url_of(&ready).await;
    let out = agent(&url).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_files(&dir.join("rho/@original"), &files);
}
