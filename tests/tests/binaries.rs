//! The real `cache-node` and `cache-agent` binaries, used the way a person would.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;

fn agent_cmd(node: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(binary("cache-agent"));
    cmd.env_remove("CACHE_AGENT_NODE")
        .env_remove("CACHE_AGENT_DIR")
        .env_remove("RUST_LOG");
    cmd.arg("--node").arg(node).arg("--dir").arg(dir);
    cmd
}

/// The address a node started with `--ready-file ready` serves on: it writes the address
/// it bound (one line) to that file once it serves.
async fn ready_addr(ready: &Path) -> std::net::SocketAddr {
    assert!(
        wait_for(Duration::from_secs(30), || ready.exists()).await,
        "node did not start"
    );
    let addr = std::fs::read_to_string(ready).unwrap();
    assert!(
        addr.ends_with('\n') && addr.lines().count() == 1,
        "{addr:?}"
    );
    let addr: std::net::SocketAddr = addr.trim().parse().unwrap();
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    addr
}

/// Bytes a download of `name` has recorded as verified and written (its progress file).
fn recorded_progress(dir: &Path, name: &str, sizes: &[u64]) -> u64 {
    let store = dir.join(name).join(".original");
    std::fs::read_dir(&store)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".progress.json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| {
            let file = v["file"].as_u64().unwrap_or(0) as usize;
            sizes[..file.min(sizes.len())].iter().sum::<u64>() + v["offset"].as_u64().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_agent_resumes_and_final_path_never_shows_a_partial_model() {
    let sandbox = Sandbox::start().await;
    let s3 = &sandbox.s3;
    let files: ModelFiles = vec![
        ("config.json".into(), b"{\"a\": 1}".to_vec()),
        ("model.bin".into(), data(21, 40 * MIB + 99)),
        ("z/empty".into(), Vec::new()),
    ];
    sandbox.seed("big", &files).await;
    let mut config = sandbox.node_config();
    config.origin_parallelism = 1;
    let node = TestNode::start(config).await;
    // Slow enough that the first run can be caught in the middle.
    s3.tap.bytes_per_sec.store(2_000_000, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("big/@original");

    // Watch the final path the whole time: when it exists, the model must be whole.
    let watching = Arc::new(AtomicBool::new(true));
    let violations = Arc::new(AtomicUsize::new(0));
    let sightings = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (watching, violations, sightings, link) = (
            watching.clone(),
            violations.clone(),
            sightings.clone(),
            link.clone(),
        );
        let expected: Vec<(String, u64)> = files
            .iter()
            .map(|(p, b)| (p.clone(), b.len() as u64))
            .collect();
        std::thread::spawn(move || {
            while watching.load(Ordering::SeqCst) {
                if link.exists() {
                    sightings.fetch_add(1, Ordering::SeqCst);
                    let whole = expected.iter().all(|(p, size)| {
                        std::fs::metadata(link.join(p)).is_ok_and(|m| m.len() == *size)
                    });
                    if !whole {
                        violations.fetch_add(1, Ordering::SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };

    let mut first = Child(
        agent_cmd(&node.url, dir.path())
            .args(["prefetch", "big"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let sizes: Vec<u64> = files.iter().map(|(_, b)| b.len() as u64).collect();
    let got_some = wait_for(Duration::from_secs(60), || {
        recorded_progress(dir.path(), "big", &sizes) >= 8 * MIB as u64
    })
    .await;

    assert!(got_some, "the first run never got going");
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    assert!(!link.exists(), "a killed prefetch published its model");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let served_before = node.stats().bytes_served;
    s3.tap.bytes_per_sec.store(0, Ordering::SeqCst);
    let out = run_ok(agent_cmd(&node.url, dir.path()).args(["prefetch", "big"]));
    assert_eq!(out.trim(), link.display().to_string());
    let served_second = node.stats().bytes_served - served_before;
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert!(
        served_second > 0 && (served_second as usize) < total - 6 * MIB,
        "second run moved {served_second} of {total} bytes"
    );
    assert_same_files(&link, &files);

    watching.store(false, Ordering::SeqCst);
    watcher.join().unwrap();
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "the final path showed a partial model"
    );
    assert!(sightings.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_and_agent_binaries_as_a_user_runs_them() {
    let s3 = S3Server::start().await;
    let files: ModelFiles = vec![
        ("model.onnx".into(), data(30, 5 * MIB + 1)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    seed(&s3, "resnet50", &files).await;
    let cache = tempfile::tempdir().unwrap();
    let ready = cache.path().join("node.addr");
    let mut node = Child(node_command(&s3, cache.path(), &ready).spawn().unwrap());
    let addr = ready_addr(&ready).await;
    let url = format!("http://{addr}");
    let dir = tempfile::tempdir().unwrap();

    let out = run_ok(agent_cmd(&url, dir.path()).args(["prefetch", "resnet50"]));
    let path = dir.path().join("resnet50/@original");
    assert_eq!(out, format!("{}\n", path.display()));
    assert_same_files(&path, &files);

    let out = run_ok(agent_cmd(&url, dir.path()).args(["get", "--weights", "resnet50"]));
    assert_eq!(out.trim(), path.join("model.onnx").display().to_string());

    let out = run_ok(agent_cmd(&url, dir.path()).arg("ls"));
    assert!(out.starts_with("resnet50:original\t"), "{out}");

    // Logs go to stderr, never stdout: nothing but warnings by default, what the agent
    // does with -v, errors only with -q.
    let quiet_by_default = agent_cmd(&url, dir.path())
        .args(["get", "resnet50"])
        .output()
        .unwrap();
    assert!(quiet_by_default.status.success());
    assert_eq!(String::from_utf8_lossy(&quiet_by_default.stderr), "");
    let verbose = agent_cmd(&url, dir.path())
        .args(["-v", "get", "resnet50"])
        .output()
        .unwrap();
    assert!(verbose.status.success());
    assert_eq!(
        String::from_utf8_lossy(&verbose.stdout),
        format!("{}\n", path.display())
    );
    let log = String::from_utf8_lossy(&verbose.stderr);
    assert!(
        log.contains("resolved") && log.contains("already present"),
        "{log}"
    );
    let quiet = agent_cmd(&url, dir.path())
        .args(["-q", "prefetch", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(quiet.status.code(), Some(1));
    let err = String::from_utf8_lossy(&quiet.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");

    // The node computes SHA-256 after the transfer; wait until `stat` shows it.
    let shown = wait_for(Duration::from_secs(30), || {
        let out = run_ok(agent_cmd(&url, dir.path()).args(["stat", "resnet50"]));
        out.contains(&sha256(&files[0].1))
    })
    .await;
    assert!(shown, "stat never showed the SHA-256");
    let out = run_ok(agent_cmd(&url, dir.path()).args(["verify", "--sha256"]));
    assert!(out.starts_with("ok\tresnet50:original"), "{out}");
    assert!(out.contains("sha256 2 checked"), "{out}");

    // Corrupt one byte: verify fails with exit 1 and names the file.
    let weights = std::fs::canonicalize(path.join("model.onnx")).unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes[3 * MIB] ^= 0xff;
    std::fs::write(&weights, &bytes).unwrap();
    let out = agent_cmd(&url, dir.path()).arg("verify").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model.onnx: chunk 1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = run_ok(agent_cmd(&url, dir.path()).arg("models"));
    assert!(out.starts_with("resnet50\toriginal"), "{out}");

    run_ok(agent_cmd(&url, dir.path()).args(["rm", "resnet50"]));
    assert!(!path.exists() && !dir.path().join("resnet50").exists());

    // Errors: one clear line on stderr and a non-zero status.
    let out = agent_cmd(&url, dir.path())
        .args(["prefetch", "a//b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("invalid model reference \"a//b\""), "{err}");

    let out = agent_cmd(&url, dir.path())
        .args(["prefetch", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model named \"nosuch\""));

    // A variant the node does not know is a malformed reference too: status 2.
    let out = agent_cmd(&url, dir.path())
        .args(["get", "resnet50:int9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown variant \"int9\""));

    // Output piped into a reader that has gone (`| head -0`): a quiet exit 0, no panic.
    let mut piped = agent_cmd(&url, dir.path())
        .args(["get", "resnet50"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(piped.stdout.take());
    let out = piped.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Nothing on stderr but the plain progress lines of a stderr that is not a terminal.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().all(|l| l.starts_with("resnet50:original: ")),
        "{stderr}"
    );

    // No node answers: the verified local copy, said to be unchecked; without one, an
    // error naming the node.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = agent_cmd(&dead, dir.path())
        .args(["prefetch", "resnet50"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("could not be checked for a newer revision"),
        "{err}"
    );
    let empty = tempfile::tempdir().unwrap();
    let out = agent_cmd(&dead, empty.path())
        .args(["prefetch", "resnet50"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dead) && err.lines().count() == 1, "{err}");

    // SIGTERM: graceful shutdown, exit 0.
    let status = node.terminate();
    assert!(status.success(), "node exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_rejects_bad_flags_with_one_line() {
    let out = Command::new(binary("cache-node"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--revalidate-after"));
    let out = Command::new(binary("cache-node"))
        .arg("--no-such-flag")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
    let out = Command::new(binary("cache-node"))
        .args(["--revalidate-after", "soon"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("soon")
            || String::from_utf8_lossy(&out.stdout).contains("soon")
    );
    // A misspelt log level is an error, not a silent `info`; from RUST_LOG too.
    let out = Command::new(binary("cache-node"))
        .args(["--log", "debgu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"debgu\" is not a level"));
    let out = Command::new(binary("cache-node"))
        .env("RUST_LOG", "verbose")
        .env_remove("CACHE_NODE_LOG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RUST_LOG") && err.lines().count() == 1,
        "{err}"
    );
    // JSON logs: one object per line (here, the line saying why it stopped).
    let out = Command::new(binary("cache-node"))
        .args(["--log-format", "json", "--log", "debug"])
        .args(["--origin", "/nonexistent/models", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    let json_lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        json_lines
            .iter()
            .any(|l| l["level"].is_string() && l["fields"].is_object()),
        "{logs}"
    );
    let out = Command::new(binary("cache-node"))
        .args(["--origin", "/nonexistent/models", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/models"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_raises_its_open_file_limit_to_the_hard_limit() {
    let origin = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let ready = cache.path().join("node.addr");
    // Started with the usual soft limit lowered further; foyer's one file per disk block
    // and one per connection need more.
    let node = Child(
        Command::new("sh")
            .arg("-c")
            .arg("ulimit -Sn 256 && exec \"$0\" \"$@\"")
            .arg(binary("cache-node"))
            .args(["--listen", "127.0.0.1:0", "--disk-capacity", "64MiB"])
            .args(["--variant-capacity", "64MiB", "--origin"])
            .arg(origin.path())
            .arg("--cache-dir")
            .arg(cache.path())
            .arg("--ready-file")
            .arg(&ready)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    ready_addr(&ready).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", node.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
}

/// Starts a node command with `--ready-file` in `dir`; the child and its URL once it serves.
/// A node that exits first, or does not serve within a minute, fails the test with its
/// log.
async fn start_ready(cmd: &mut Command, dir: &Path) -> (Child, String) {
    let ready = dir.join("node.addr");
    let log = dir.join("node.log");
    let mut node = Child(
        cmd.arg("--ready-file")
            .arg(&ready)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut exited = None;
    let served = wait_for(Duration::from_secs(60), || {
        exited = node.0.try_wait().unwrap();
        ready.exists() || exited.is_some()
    })
    .await;
    assert!(
        served && ready.exists(),
        "node did not serve within 60 s (exit status: {exited:?}); its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let url = format!("http://{}", ready_addr(&ready).await);
    (node, url)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// 200 clients open a `Fetch` of a disk-served model, each at another offset and on a
/// connection of its own, and never read it. The node holds one chunk per stream (the
/// one HTTP/2 is sending) and read-ahead within one budget: it grows by far less than
/// 512 MiB, a normal prefetch alongside them completes, and closing the streams gives the
/// memory back to the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_that_never_read_hold_bounded_memory_and_others_go_on() {
    const STREAMS: usize = 200;
    const CHUNKS: usize = 80;
    let origin = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let files: ModelFiles = vec![("weights.bin".into(), data(77, CHUNKS * 2 * MIB))];
    let model = origin.path().join("big");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("weights.bin"), &files[0].1).unwrap();
    let (node, url) = start_ready(
        Command::new(binary("cache-node"))
            .args(["--listen", "127.0.0.1:0", "--memory-capacity", "64MiB"])
            .args(["--disk-capacity", "512MiB", "--variant-capacity", "64MiB"])
            .arg("--origin")
            .arg(origin.path())
            .arg("--cache-dir")
            .arg(cache.path().join("node")),
        cache.path(),
    )
    .await;
    let pid = node.0.id();
    let reference = modelcache_proto::Reference::parse("big").unwrap();
    // Warm: every chunk on disk, most of them no longer in memory.
    let warm = tempfile::tempdir().unwrap();
    cache_agent::Agent::new(vec![url.clone()], warm.path())
        .prefetch(&reference, &cache_agent::Progress::hidden())
        .await
        .unwrap();
    let before = rss(pid);

    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let mut client =
            modelcache_proto::v1::model_cache_client::ModelCacheClient::connect(url.clone())
                .await
                .unwrap();
        let stream = client
            .fetch(modelcache_proto::v1::FetchRequest {
                reference: "big".into(),
                file: "weights.bin".into(),
                offset: ((i * 7) % CHUNKS * 2 * MIB) as u64,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        streams.push((client, stream));
    }
    // Let every stream read what it is going to read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled = rss(pid);

    let dir = tempfile::tempdir().unwrap();
    let fetched = cache_agent::Agent::new(vec![url.clone()], dir.path())
        .prefetch(&reference, &cache_agent::Progress::hidden())
        .await
        .expect("a prefetch beside 200 stalled streams completes");
    assert_same_files(&fetched.path, &files);
    let during = rss(pid).max(stalled);
    drop(streams);
    // The node gives freed memory back every few seconds in which streams ended.
    let given_back = wait_for(Duration::from_secs(20), || {
        rss(pid) < before + (before.min(during) / 2).max(64 << 20)
    })
    .await;
    let after = rss(pid);
    let mib = |b: u64| b >> 20;
    eprintln!(
        "node RSS: {} MiB warm, {} MiB with {STREAMS} stalled streams, {} MiB after they closed",
        mib(before),
        mib(during),
        mib(after)
    );
    assert!(
        during.saturating_sub(before) <= 512 << 20,
        "{STREAMS} stalled streams grew the node from {} MiB to {} MiB",
        mib(before),
        mib(during)
    );
    assert!(
        given_back,
        "the node kept {} MiB after the streams closed",
        mib(after)
    );
}

/// A node limited to 256 open files (soft and hard, so it cannot raise them): a 4 GiB tier
/// (256 files of 8-chunk blocks before, 128 now) beside a 64 MiB variant tier starts and
/// serves; a tier larger than the filesystem is refused with the free space, and leaves no
/// tier file behind. The tiers are reserved in full, so they live on a tmpfs: memory for
/// the test's few seconds instead of 4 GiB of the build disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_a_low_open_file_limit_starts_and_refuses_oversized_tiers_cleanly() {
    let origin = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(origin.path().join("m")).unwrap();
    std::fs::write(origin.path().join("m/config.json"), b"{\"a\": 1}").unwrap();
    let limited = |cache: &Path, disk: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("ulimit -n 256 && exec \"$0\" \"$@\"")
            .arg(binary("cache-node"))
            .args(["--listen", "127.0.0.1:0", "--memory-capacity", "64MiB"])
            .args(["--disk-capacity", disk, "--variant-capacity", "64MiB"])
            .arg("--origin")
            .arg(origin.path())
            .arg("--cache-dir")
            .arg(cache);
        cmd
    };
    let count_tier_files = |dir: &Path| {
        ["tiers", "variants"]
            .iter()
            .flat_map(|t| {
                std::fs::read_dir(dir.join(t))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("foyer-storage-")
            })
            .count()
    };

    let cache = Tmpfs::mount(4 * 1024 + 128);
    let (node, url) = start_ready(
        &mut limited(&cache.path().join("node"), "4GiB"),
        cache.path(),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let fetched = cache_agent::Agent::new(vec![url], dir.path())
        .prefetch(
            &modelcache_proto::Reference::parse("m").unwrap(),
            &cache_agent::Progress::hidden(),
        )
        .await
        .unwrap();
    assert_same_files(
        &fetched.path,
        &vec![("config.json".into(), b"{\"a\": 1}".to_vec())],
    );
    let files = count_tier_files(&cache.path().join("node"));
    assert!(files <= 160, "{files} tier files");
    drop(node);
    drop(cache);

    let cache = tempfile::tempdir().unwrap();
    let out = limited(&cache.path().join("node"), "100TiB")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("MiB free") && !stderr.contains("Too many open files"),
        "{stderr}"
    );
    assert_eq!(count_tier_files(&cache.path().join("node")), 0);
}
