//! `cache-agent daemon`: the real binary on a unix socket (or TCP), a real node, real
//! gRPC workers (`modelcache.v1.Agent`), bytes checked by sha256 and counted at the node.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cache_agent::daemon::client::{AgentClient, connect};
use modelcache_proto::v1::{
    EnsureRequest, EvictRequest, ReleaseRequest, StatusRequest, ensure_event,
};
use modelcache_testkit::resnet;
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

/// A model of `files` files of `mib` MiB each, different for each seed.
fn model(seed: u64, files: usize, mib: usize) -> ModelFiles {
    (0..files)
        .map(|i| {
            (
                format!("part-{i}.bin"),
                data(seed * 100 + i as u64, mib * MIB),
            )
        })
        .collect()
}

/// A daemon process, killed when dropped; `address` is what it printed once serving.
struct Daemon {
    child: Child,
    address: String,
    log: PathBuf,
}

fn agent_cmd(node: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(binary("cache-agent"));
    for var in cache_agent::cli::Cli::env_vars() {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_LOG");
    cmd.arg("--node").arg(node).arg("--dir").arg(dir);
    cmd
}

impl Daemon {
    fn start(node: &str, dir: &Path, args: &[&str]) -> Daemon {
        Self::try_start(node, dir, args).unwrap_or_else(|e| panic!("daemon did not start: {e}"))
    }

    /// Starts the daemon (its log in `DIR.log`); its log when it exits instead of
    /// serving.
    fn try_start(node: &str, dir: &Path, args: &[&str]) -> Result<Daemon, String> {
        use std::io::BufRead;
        let log = dir.with_extension("log");
        let mut cmd = agent_cmd(node, dir);
        cmd.arg("-v").arg("daemon").args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut child = Child(child);
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        if line.trim().is_empty() {
            let _ = child.0.wait();
            return Err(std::fs::read_to_string(&log).unwrap_or_default());
        }
        Ok(Daemon {
            child,
            address: line.trim().to_owned(),
            log,
        })
    }

    async fn client(&self) -> AgentClient {
        connect(&self.address).await.unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

fn ensure_req(reference: &str) -> EnsureRequest {
    EnsureRequest {
        reference: reference.into(),
        ..Default::default()
    }
}

/// Runs `cmd`, which must succeed; its output.
fn succeeded(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn lease_req(reference: &str) -> EnsureRequest {
    EnsureRequest {
        lease: true,
        ..ensure_req(reference)
    }
}

fn evict_req(reference: &str, force: bool) -> EvictRequest {
    EvictRequest {
        reference: reference.into(),
        force,
    }
}

fn socket_in(dir: &Path) -> String {
    format!("unix://{}", dir.join("agent.sock").display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_prefetch_list_fills_the_directory_before_workers_ask_and_ensure_needs_no_node() {
    let sandbox = Sandbox::start().await;
    let (a, b) = (model(1, 2, 3), model(2, 1, 2));
    sandbox.seed("alpha", &a).await;
    sandbox.seed("beta", &b).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let list = run.join("models.txt");
    std::fs::write(
        &list,
        "# what this host serves\nalpha\n\nnot a reference!\nbeta:original  # the small one\n:\n",
    )
    .unwrap();
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &[
            "--listen",
            &socket_in(&run),
            "--prefetch-file",
            list.to_str().unwrap(),
        ],
    );
    assert!(daemon.address.starts_with("unix://"), "{}", daemon.address);
    // Filled before any worker asks.
    assert!(
        wait_for(Duration::from_secs(60), || dir
            .join("alpha/@original")
            .exists()
            && dir.join("beta/@original").exists())
        .await,
        "{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("line 4: \"not a reference!\""), "{log}");
    assert!(log.contains("line 6: \":\""), "{log}");
    // No node from here on: Ensure answers from the directory.
    node.stop().await;
    let mut client = daemon.client().await;
    for (name, files) in [("alpha", &a), ("beta", &b)] {
        let got = client.ensure(ensure_req(name)).await.unwrap().into_inner();
        assert_eq!(got.fetched_bytes, 0);
        assert!(!got.offline, "present copies are not an offline answer");
        assert_eq!(
            got.size,
            files.iter().map(|(_, d)| d.len() as u64).sum::<u64>()
        );
        assert_same_files(Path::new(&got.path), files);
    }
    // Many calls for a present model: the figure docs/agent.md quotes (not asserted).
    let mut times = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        client.ensure(ensure_req("alpha")).await.unwrap();
        times.push(t.elapsed());
    }
    times.sort();
    println!(
        "Ensure of a present model over a unix socket: median {:?}, p99 {:?}",
        times[100], times[198]
    );
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.models.len(), 2, "{status:?}");
    assert!(status.used_bytes >= 8 * MIB as u64, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ensures_and_concurrent_cli_runs_each_cause_one_transfer() {
    let sandbox = Sandbox::start().await;
    let files = model(3, 3, 4);
    let size: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
    sandbox.seed("gamma", &files).await;
    sandbox.seed("delta", &files).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let daemon = Daemon::start(&node.url, &dir, &["--listen", "127.0.0.1:0"]);
    let before = node.stats().bytes_served;
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let address = daemon.address.clone();
            tokio::spawn(async move {
                let mut client = connect(&address).await.unwrap();
                client
                    .ensure(ensure_req("gamma"))
                    .await
                    .unwrap()
                    .into_inner()
            })
        })
        .collect();
    let mut fetched = 0;
    for call in calls {
        let got = call.await.unwrap();
        assert_same_files(Path::new(&got.path), &files);
        fetched += got.fetched_bytes;
    }
    assert_eq!(
        node.stats().bytes_served - before,
        size,
        "one transfer for ten calls"
    );
    assert_eq!(
        fetched,
        10 * size,
        "each call reports the one shared transfer"
    );

    // Four CLI runs into the daemon's directory at once: all succeed, one transfer.
    let before = node.stats().bytes_served;
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let mut cmd = agent_cmd(&node.url, &dir);
            cmd.args(["prefetch", "delta"]);
            cmd.spawn_output()
        })
        .collect();
    for run in runs {
        let out = run.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            dir.join("delta/@original").to_str().unwrap()
        );
    }
    assert_eq!(node.stats().bytes_served - before, size);
    assert_same_files(&dir.join("delta/@original"), &files);
}

trait SpawnOutput {
    fn spawn_output(self) -> std::thread::JoinHandle<std::process::Output>;
}

impl SpawnOutput for Command {
    fn spawn_output(mut self) -> std::thread::JoinHandle<std::process::Output> {
        std::thread::spawn(move || self.output().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_evicts_the_least_recently_used_model_and_never_a_leased_one() {
    let sandbox = Sandbox::start().await;
    let names = ["m1", "m2", "m3"];
    for (i, name) in names.iter().enumerate() {
        sandbox.seed(name, &model(10 + i as u64, 1, 3)).await;
    }
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    // Room for two 3 MiB models, not three.
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &["--listen", "127.0.0.1:0", "--max-size", "7MiB"],
    );
    // m1 leased by a worker whose connection stays open.
    let mut holder = daemon.client().await;
    let leased = holder.ensure(lease_req("m1")).await.unwrap().into_inner();
    assert!(!leased.lease_id.is_empty());
    let mut other = daemon.client().await;
    other.ensure(ensure_req("m2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    other.ensure(ensure_req("m3")).await.unwrap();
    // m2 is the least recently used unleased model: it goes; m1 stays although older.
    assert!(
        wait_for(Duration::from_secs(10), || !dir
            .join("m2/@original")
            .exists())
        .await,
        "{}",
        daemon.log()
    );
    assert!(dir.join("m1/@original").exists() && dir.join("m3/@original").exists());
    // Within budget once the evicted bytes are deleted (right after the link goes).
    let within = || cache_agent::layout::disk_usage(&dir) <= 7 * MIB as u64;
    assert!(
        wait_for(Duration::from_secs(10), within).await,
        "{} bytes on disk",
        cache_agent::layout::disk_usage(&dir)
    );
    // Evicting a leased model is refused, and works once the lease ends.
    let refused = other.evict(evict_req("m1", false)).await.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(refused.message().contains("lease"), "{refused:?}");
    let released = other
        .release(ReleaseRequest {
            lease_id: leased.lease_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(released.released);
    let evicted = other
        .evict(evict_req("m1", false))
        .await
        .unwrap()
        .into_inner();
    assert!(
        evicted.evicted && evicted.freed_bytes >= 3 * MIB as u64,
        "{evicted:?}"
    );
    assert!(!dir.join("m1").join("@original").exists());
    // A lease ends with its worker's connection: a forced evict waits for that.
    let mut worker = daemon.client().await;
    let lease = worker.ensure(lease_req("m3")).await.unwrap().into_inner();
    assert!(!lease.lease_id.is_empty());
    let address = daemon.address.clone();
    let forced = tokio::spawn(async move {
        let mut client = connect(&address).await.unwrap();
        client.evict(evict_req("m3", true)).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!forced.is_finished(), "a forced evict waits for the lease");
    assert!(dir.join("m3/@original").exists());
    drop(worker);
    let done = tokio::time::timeout(Duration::from_secs(20), forced)
        .await
        .expect("the lease ended with its connection")
        .unwrap()
        .unwrap()
        .into_inner();
    assert!(done.evicted);
    assert!(!dir.join("m3/@original").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_killed_mid_fetch_never_shows_a_partial_model_and_finishes_after_restart() {
    let sandbox = Sandbox::start().await;
    let files = model(20, 2, 8);
    sandbox.seed("big", &files).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    // 16 MiB at 4 MiB/s: the kill lands mid-transfer.
    sandbox
        .s3
        .tap
        .bytes_per_sec
        .store(4 << 20, Ordering::SeqCst);
    let mut daemon = Daemon::start(&node.url, &dir, &["--listen", &socket_in(&run)]);
    let address = daemon.address.clone();
    let waiting = tokio::spawn(async move {
        let mut client = connect(&address).await.unwrap();
        client.ensure(ensure_req("big")).await
    });
    let store = dir.join("big/.original");
    assert!(download_started(&store).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.kill9();
    let cut = waiting.await.unwrap();
    assert!(cut.is_err(), "the worker saw the daemon die");
    assert!(
        !dir.join("big/@original").exists(),
        "no partial model is published"
    );
    sandbox.s3.tap.bytes_per_sec.store(0, Ordering::SeqCst);
    // The restarted daemon replaces the dead socket, resumes and verifies.
    let daemon = Daemon::start(&node.url, &dir, &["--listen", &socket_in(&run)]);
    let mut client = daemon.client().await;
    let got = client.ensure(ensure_req("big")).await.unwrap().into_inner();
    assert_same_files(Path::new(&got.path), &files);
    assert!(
        got.fetched_bytes < 16 * MIB as u64,
        "resumed: {} bytes",
        got.fetched_bytes
    );
}

/// Flips one byte in the middle of `path`.
fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flipped_byte_is_found_and_only_its_chunk_is_fetched_again() {
    let sandbox = Sandbox::start().await;
    let files = model(30, 1, 9);
    sandbox.seed("eps", &files).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let out = agent_cmd(&node.url, &dir)
        .args(["prefetch", "eps"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let file = dir.join("eps/@original/part-0.bin");
    // The CLI: verify finds it, prefetch fetches one chunk (2 MiB), not 9 MiB.
    flip_byte(&file, 5 * MIB as u64 + 17);
    let verify = agent_cmd(&node.url, &dir)
        .args(["verify", "eps"])
        .output()
        .unwrap();
    assert!(!verify.status.success());
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(stderr.contains("chunk 2"), "{stderr}");
    let before = node.stats().bytes_served;
    succeeded(agent_cmd(&node.url, &dir).args(["prefetch", "eps"]));
    assert_eq!(node.stats().bytes_served - before, 2 * MIB as u64);
    assert_same_files(&dir.join("eps/@original"), &files);
    let verify = agent_cmd(&node.url, &dir)
        .args(["verify", "eps"])
        .output()
        .unwrap();
    assert!(verify.status.success());

    // The daemon's background check finds it on its own and repairs the same way.
    flip_byte(&file, 8 * MIB as u64 + 3);
    let before = node.stats().bytes_served;
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &["--listen", "127.0.0.1:0", "--verify-rate", "1GiB"],
    );
    let expected = sha256(&files[0].1);
    assert!(
        wait_for(Duration::from_secs(60), || sha256_file(&file) == expected).await,
        "{}",
        daemon.log()
    );
    // The last chunk: 1 MiB.
    assert_eq!(node.stats().bytes_served - before, MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_node_down_get_returns_the_local_copy_and_ensure_names_the_nodes_tried() {
    let sandbox = Sandbox::start().await;
    let files = model(40, 1, 1);
    sandbox.seed("zeta", &files).await;
    sandbox.seed("eta", &files).await;
    let node = sandbox.node().await;
    let url = node.url.clone();
    let run = sandbox.dir();
    let dir = run.join("models");
    let out = agent_cmd(&url, &dir)
        .args(["get", "zeta"])
        .output()
        .unwrap();
    assert!(out.status.success());
    node.stop().await;
    let out = succeeded(agent_cmd(&url, &dir).args(["get", "zeta"]));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        dir.join("zeta/@original").to_str().unwrap()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("could not be checked for a newer revision"),
        "{stderr}"
    );
    // --offline does not ask.
    let out = agent_cmd(&url, &dir)
        .args(["--offline", "get", "zeta"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = agent_cmd(&url, &dir)
        .args(["--offline", "get", "eta"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("eta:original is not in"));

    let daemon = Daemon::start(&url, &dir, &["--listen", "127.0.0.1:0"]);
    let mut client = daemon.client().await;
    let present = client
        .ensure(EnsureRequest {
            reference: "zeta".into(),
            refresh: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        present.offline,
        "asked to refresh, no node answered: {present:?}"
    );
    assert_same_files(Path::new(&present.path), &files);
    let missing = client.ensure(ensure_req("eta")).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::Unavailable, "{missing:?}");
    let address = url.trim_start_matches("http://");
    assert!(missing.message().contains(address), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_references_and_a_socket_path_that_is_not_ours_get_clear_errors() {
    let sandbox = Sandbox::start().await;
    sandbox.seed("theta", &model(50, 1, 1)).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let daemon = Daemon::start(&node.url, &dir, &["--listen", &socket_in(&run)]);
    let mut client = daemon.client().await;
    let unknown = client
        .ensure(ensure_req("no-such-model"))
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    assert!(unknown.message().contains("no-such-model"), "{unknown:?}");
    for bad in ["", "a b", "../x", "theta:"] {
        let err = client.ensure(ensure_req(bad)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    let unknown_variant = client.ensure(ensure_req("theta:int3")).await.unwrap_err();
    assert_eq!(
        unknown_variant.code(),
        tonic::Code::InvalidArgument,
        "{unknown_variant:?}"
    );
    // A second daemon on the same socket is refused; the first keeps serving.
    let second = Daemon::try_start(&node.url, &dir, &["--listen", &socket_in(&run)]);
    let err = second.err().expect("refused");
    assert!(err.contains("another cache-agent daemon"), "{err}");
    client.ensure(ensure_req("theta")).await.unwrap();
    // A file where the socket would go is left alone.
    let other = sandbox.dir();
    let taken = other.join("agent.sock");
    std::fs::write(&taken, b"not a socket").unwrap();
    let err = Daemon::try_start(&node.url, &dir, &["--listen", &socket_in(&other)])
        .err()
        .expect("refused");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&taken).unwrap(), b"not a socket");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_worker_example_gets_resnet50_int8_from_the_daemon_and_runs_it() {
    let sandbox = Sandbox::start().await;
    let origin = sandbox.dir();
    std::fs::write(origin.join("model.onnx"), resnet::resnet50(50)).unwrap();
    seed(&sandbox.s3, "resnet50", &read_dir_files(&origin)).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let daemon = Daemon::start(&node.url, &dir, &["--listen", &socket_in(&run)]);
    let example = workspace().join("examples/python");
    let out = Command::new(python())
        .arg(example.join("worker.py"))
        .args(["--socket", &daemon.address, "resnet50:int8"])
        .env("MODELCACHE_AGENT_STUBS", run.join("stubs"))
        .current_dir(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        line["model_dir"],
        dir.join("resnet50/@int8").to_str().unwrap()
    );
    assert_eq!(line["output"], serde_json::json!([1, 1000]));
    // The bytes it ran are the node's int8 variant, verified.
    let manifest = node
        .agent(&sandbox.dir())
        .stat(&"resnet50:int8".parse().unwrap())
        .await
        .unwrap();
    let local = dir.join("resnet50/@int8/model.onnx");
    assert_eq!(sha256_file(&local), manifest.files[0].sha256);
    // The Rust worker example gets the same directory.
    let rust = Command::new(env!("CARGO"))
        .args([
            "run",
            "--quiet",
            "-p",
            "cache-agent",
            "--example",
            "worker",
            "--",
        ])
        .args([&daemon.address, "resnet50:int8"])
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(
        rust.status.success(),
        "{}",
        String::from_utf8_lossy(&rust.stderr)
    );
    let text = String::from_utf8_lossy(&rust.stdout);
    assert!(text.contains("model.onnx"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_revision_moves_only_the_file_that_changed() {
    let sandbox = Sandbox::start().await;
    let mut files = model(60, 5, 2);
    files[4].1.truncate(MIB + 5);
    sandbox.seed("iota", &files).await;
    let mut config = sandbox.node_config();
    config.revalidate_after = Duration::ZERO;
    let node = TestNode::start(config).await;
    let dir = sandbox.dir().join("models");
    let prefetch = || {
        let out = succeeded(agent_cmd(&node.url, &dir).args(["--json", "prefetch", "iota"]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v[0].clone()
    };
    let first = prefetch();
    // One file of five changes in the origin (its size too: the test S3 server's ETags
    // come from size and modification time, which may not move within a second).
    let changed = 2 * MIB + 3;
    files[2].1 = data(61, changed);
    sandbox.s3.put("iota/part-2.bin", &files[2].1).await;
    let before = node.stats().bytes_served;
    let second = prefetch();
    assert_ne!(first["revision"], second["revision"]);
    assert_eq!(second["transferred"], changed as u64, "{second}");
    assert_eq!(node.stats().bytes_served - before, changed as u64);
    assert_same_files(&dir.join("iota/@original"), &files);
    succeeded(agent_cmd(&node.url, &dir).args(["verify", "--sha256", "iota"]));
    // Counted once on disk although two revisions hold the unchanged files.
    let used = cache_agent::layout::disk_usage(&dir);
    assert!(used < 12 * MIB as u64, "{used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_fetches_keep_to_max_bandwidth_until_a_worker_asks() {
    let sandbox = Sandbox::start().await;
    let files = model(70, 1, 4);
    sandbox.seed("kappa", &files).await;
    let node = sandbox.node().await;
    let dir = sandbox.dir().join("models");
    // 64 KiB/s: 4 MiB would take a minute in the background.
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &["--listen", "127.0.0.1:0", "--max-bandwidth", "64KiB/s"],
    );
    let mut client = daemon.client().await;
    let queued = client
        .prefetch(modelcache_proto::v1::AgentPrefetchRequest {
            references: vec!["kappa".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queued.queued, 1);
    // Under way, and paced: after the first chunks it is far from done.
    let mut progress = None;
    for _ in 0..100 {
        let status = client.status(StatusRequest {}).await.unwrap().into_inner();
        if let Some(p) = status.in_flight.iter().find(|p| p.done_bytes > 0) {
            progress = Some(p.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let progress = progress.expect("the background fetch started");
    assert_eq!(progress.total_bytes, 4 * MIB as u64);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    let paced = &status.in_flight[0];
    assert!(paced.done_bytes < paced.total_bytes, "{status:?}");
    assert!(!dir.join("kappa/@original").exists());
    // A worker asks: it joins the fetch, which is no longer throttled (it would take a
    // minute more if it were).
    let got = tokio::time::timeout(Duration::from_secs(30), client.ensure(ensure_req("kappa")))
        .await
        .expect("a worker's fetch is not throttled")
        .unwrap()
        .into_inner();
    assert_same_files(Path::new(&got.path), &files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listing_commands_speak_json_for_scripts() {
    let sandbox = Sandbox::start().await;
    let files = model(80, 2, 1);
    sandbox.seed("lambda", &files).await;
    let node = sandbox.node().await;
    let dir = sandbox.dir().join("models");
    let json = |args: &[&str]| -> serde_json::Value {
        let out = succeeded(agent_cmd(&node.url, &dir).arg("--json").args(args));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let got = json(&["get", "lambda"]);
    assert_eq!(got["path"], dir.join("lambda/@original").to_str().unwrap());
    let ls = json(&["ls"]);
    assert_eq!(ls[0]["reference"], "lambda:original");
    assert_eq!(ls[0]["size"], 2 * MIB as u64);
    let stat = json(&["stat", "lambda"]);
    assert_eq!(stat["name"], "lambda");
    assert_eq!(stat["files"].as_array().unwrap().len(), 2);
    assert_eq!(stat["revision"], ls[0]["revision"]);
    let models = json(&["models"]);
    assert!(
        models
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "lambda"),
        "{models}"
    );
    let nodes = json(&["--direct", "nodes", "lambda"]);
    assert_eq!(nodes.as_array().unwrap().len(), 1, "{nodes}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ensure_progress_streams_progress_then_the_ready_answer() {
    let sandbox = Sandbox::start().await;
    let files = model(90, 1, 6);
    sandbox.seed("mu", &files).await;
    let node = sandbox.node().await;
    let dir = sandbox.dir().join("models");
    // 6 MiB at 2 MiB/s from the origin: a few progress events on the way.
    sandbox
        .s3
        .tap
        .bytes_per_sec
        .store(2 << 20, Ordering::SeqCst);
    let daemon = Daemon::start(&node.url, &dir, &["--listen", "127.0.0.1:0"]);
    let mut client = daemon.client().await;
    let mut events = client
        .ensure_progress(ensure_req("mu"))
        .await
        .unwrap()
        .into_inner();
    let mut progress = Vec::new();
    let mut ready = None;
    while let Some(event) = events.message().await.unwrap() {
        match event.event.unwrap() {
            ensure_event::Event::Progress(p) => progress.push(p),
            ensure_event::Event::Ready(r) => ready = Some(r),
        }
    }
    let ready = ready.expect("the stream ends with the answer");
    assert_same_files(Path::new(&ready.path), &files);
    assert!(
        !progress.is_empty(),
        "no progress while 6 MiB came at 2 MiB/s"
    );
    assert!(
        progress
            .iter()
            .all(|p| p.total_bytes == 6 * MIB as u64 && p.reference == "mu:original")
    );
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].done_bytes <= w[1].done_bytes),
        "{progress:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_prefetch_file_is_read_again_when_it_changes_and_on_sighup() {
    let sandbox = Sandbox::start().await;
    for (i, name) in ["nu", "xi", "omicron"].iter().enumerate() {
        sandbox.seed(name, &model(100 + i as u64, 1, 1)).await;
    }
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let dir = run.join("models");
    let list = run.join("list.txt");
    std::fs::write(&list, "nu\n").unwrap();
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &[
            "--listen",
            "127.0.0.1:0",
            "--prefetch-file",
            list.to_str().unwrap(),
        ],
    );
    let landed = |name: &str| dir.join(name).join("@original").exists();
    assert!(wait_for(Duration::from_secs(30), || landed("nu")).await);
    // Edited: noticed within seconds.
    std::fs::write(&list, "nu\nxi\n").unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || landed("xi")).await,
        "{}",
        daemon.log()
    );
    // SIGHUP re-reads it (and does not end the daemon).
    std::fs::write(&list, "nu\nxi\nomicron\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &daemon.child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    assert!(
        wait_for(Duration::from_secs(30), || landed("omicron")).await,
        "{}",
        daemon.log()
    );
    assert!(daemon.log().contains("re-read"), "{}", daemon.log());
    let mut client = daemon.client().await;
    let status = client.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.models.len(), 3, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rm_and_evict_never_follow_a_symlink_out_of_the_directory() {
    let sandbox = Sandbox::start().await;
    let node = sandbox.node().await;
    let dir = sandbox.dir().join("models");
    std::fs::create_dir_all(&dir).unwrap();
    // Someone else's files, reachable through a symlink planted in DIR.
    let outside = sandbox.dir();
    let precious = outside.join("x/.original/precious.txt");
    std::fs::create_dir_all(precious.parent().unwrap()).unwrap();
    std::fs::write(&precious, b"keep me").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("org")).unwrap();
    let out = agent_cmd(&node.url, &dir)
        .args(["rm", "org/x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is a symlink"), "{err}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
    let daemon = Daemon::start(&node.url, &dir, &["--listen", "127.0.0.1:0"]);
    let mut client = daemon.client().await;
    let refused = client.evict(evict_req("org/x", false)).await.unwrap_err();
    assert!(refused.message().contains("is a symlink"), "{refused:?}");
    assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
}

/// `--metrics-listen`: the daemon's counters, read with the Prometheus parser, move by
/// exactly what known calls did: a cold `Ensure` fetches one model's bytes, a second one
/// is a local hit, both are in the latency histogram, an `Evict` counts the bytes it
/// freed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exports_fetched_bytes_local_hits_evictions_and_ensure_latency() {
    let files = model(31, 2, 1);
    let size = (2 * MIB) as f64;
    let sandbox = Sandbox::with_model("mx", &files).await;
    let node = sandbox.node().await;
    let dir = sandbox.dir().join("models");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start(
        &node.url,
        &dir,
        &["--listen", "127.0.0.1:0", "--metrics-listen", &listen],
    );
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    let (start, families) = metrics::scrape(addr);
    for family in [
        "modelcache_agent_fetched_bytes",
        "modelcache_agent_fetches",
        "modelcache_agent_local_hits",
        "modelcache_agent_evictions",
        "modelcache_agent_evicted_bytes",
    ] {
        assert_eq!(families[family], "counter", "{families}");
    }
    assert_eq!(families["modelcache_agent_ensure_seconds"], "histogram");
    // docs/operations.md lists each of them.
    metrics::assert_documented(&families);
    assert_eq!(start["modelcache_agent_fetched_bytes_total"], 0.0);
    assert_eq!(
        start["modelcache_agent_fetches_total{outcome=\"failed\"}"],
        0.0
    );
    assert_eq!(metrics::get(addr, "/healthz").0, 200);

    let mut client = daemon.client().await;
    client.ensure(ensure_req("mx")).await.unwrap();
    client.ensure(ensure_req("mx")).await.unwrap();
    let missing = client.ensure(ensure_req("no-such-model")).await;
    assert_eq!(missing.unwrap_err().code(), tonic::Code::NotFound);
    let (after, _) = metrics::scrape(addr);
    assert_eq!(after["modelcache_agent_fetched_bytes_total"], size);
    assert_eq!(after["modelcache_agent_fetches_total{outcome=\"ok\"}"], 1.0);
    assert_eq!(
        after["modelcache_agent_fetches_total{outcome=\"failed\"}"],
        1.0
    );
    assert_eq!(after["modelcache_agent_local_hits_total"], 1.0);
    assert_eq!(after["modelcache_agent_ensure_seconds_count"], 3.0);
    assert_same_files(&dir.join("mx/@original"), &files);

    client.evict(evict_req("mx", false)).await.unwrap();
    let (evicted, _) = metrics::scrape(addr);
    assert_eq!(evicted["modelcache_agent_evictions_total"], 1.0);
    assert!(evicted["modelcache_agent_evicted_bytes_total"] >= size);
}

/// On TCP with `--auth-tokens-file`: a worker without a token, or with one no grant
/// holds, is refused UNAUTHENTICATED; a token limited to fetching one prefix gets its
/// model and is refused PERMISSION_DENIED for another model and for `Evict`; health
/// checks need no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_on_tcp_present_a_token_and_stay_within_its_scope() {
    let sandbox = Sandbox::start().await;
    let files = model(60, 1, 1);
    sandbox.seed("team/small", &files).await;
    sandbox.seed("other", &model(61, 1, 1)).await;
    let node = sandbox.node().await;
    let run = sandbox.dir();
    let tokens = run.join("tokens");
    std::fs::write(&tokens, "worker:worker-token-0123456789:fetch:team/\n").unwrap();
    let daemon = Daemon::start(
        &node.url,
        &run.join("models"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--auth-tokens-file",
            tokens.to_str().unwrap(),
        ],
    );
    let mut client = daemon.client().await;
    let none = client.ensure(ensure_req("team/small")).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none:?}");
    let wrong = client
        .ensure(with_token(
            "wrong-token-0123456789",
            ensure_req("team/small"),
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    let ok = client
        .ensure(with_token(
            "worker-token-0123456789",
            ensure_req("team/small"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_same_files(Path::new(&ok.path), &files);
    let outside = client
        .ensure(with_token("worker-token-0123456789", ensure_req("other")))
        .await
        .unwrap_err();
    assert_eq!(outside.code(), tonic::Code::PermissionDenied, "{outside:?}");
    assert!(outside.message().contains("team/"), "{outside:?}");
    let evict = client
        .evict(with_token(
            "worker-token-0123456789",
            evict_req("team/small", false),
        ))
        .await
        .unwrap_err();
    assert_eq!(evict.code(), tonic::Code::PermissionDenied, "{evict:?}");
    assert!(evict.message().contains("may not admin"), "{evict:?}");
    let url = format!("http://{}", daemon.address.trim_start_matches("tcp://"));
    let health = health_check(&url).await;
    assert!(health.is_ok(), "{health:?}");
}

/// `request` with `authorization: Bearer TOKEN`, as a worker sends it.
fn with_token<T>(token: &str, request: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(request);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_reach_the_daemon_over_mutual_tls_and_the_daemon_reaches_a_tls_node() {
    use modelcache_proto::tls::{ClientTls, Identity};
    use modelcache_testkit::pki::{Ca, Validity};
    let sandbox = Sandbox::start().await;
    let files = model(62, 1, 1);
    sandbox.seed("small", &files).await;
    let run = sandbox.dir();
    let ca = Ca::new(&run, "fleet");
    let names = ["localhost", "127.0.0.1"];
    let node_cert = ca.issue(&run, "node", &names, Validity::Current);
    let daemon_cert = ca.issue(&run, "daemon", &names, Validity::Current);
    let worker = ca.issue(&run, "worker", &["worker"], Validity::Current);
    let mut config = sandbox.node_config();
    config.tls_cert = Some(node_cert.cert.clone());
    config.tls_key = Some(node_cert.key.clone());
    config.tls_client_ca = Some(ca.cert.clone());
    let node = TestNode::start(config).await;
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    // The daemon calls the node with its own certificate (global --ca, --cert, --key),
    // and serves workers over mutual TLS.
    let daemon = Daemon::start(
        &node.url,
        &run.join("models"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            &path(&daemon_cert.cert),
            "--tls-key",
            &path(&daemon_cert.key),
            "--tls-client-ca",
            &path(&ca.cert),
            "--ca",
            &path(&ca.cert),
            "--cert",
            &path(&daemon_cert.cert),
            "--key",
            &path(&daemon_cert.key),
        ],
    );
    let address = daemon.address.trim_start_matches("tcp://").to_owned();
    let tls = |cert: Option<&modelcache_testkit::pki::Issued>| {
        ClientTls::load(
            Some(ca.cert.clone()),
            cert.map(|c| Identity {
                cert: c.cert.clone(),
                key: c.key.clone(),
            }),
        )
        .unwrap()
    };
    let mut client = cache_agent::daemon::client::connect_with(&address, Some(tls(Some(&worker))))
        .await
        .unwrap();
    let ok = client
        .ensure(ensure_req("small"))
        .await
        .unwrap()
        .into_inner();
    assert_same_files(Path::new(&ok.path), &files);
    // A worker without a certificate, or speaking plaintext, gets nothing.
    let bare = cache_agent::daemon::client::connect_with(&address, Some(tls(None))).await;
    let refused = match bare {
        Ok(mut c) => c
            .ensure(ensure_req("small"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        refused.is_err(),
        "a worker without a certificate was served"
    );
    let plain = match connect(&address).await {
        Ok(mut c) => c
            .ensure(ensure_req("small"))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(plain.is_err(), "a plaintext worker was served");
    // The daemon went on serving the worker with a certificate.
    let again = client
        .ensure(ensure_req("small"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.path, ok.path);
    assert!(
        daemon.log().contains("TLS handshake failed"),
        "{}",
        daemon.log()
    );
}
