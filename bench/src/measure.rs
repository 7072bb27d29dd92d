//! The parts of the benchmark: timing, the reference tools, node processes, the table.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use modelcache_tests::{S3Server, s3};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use sha2::Digest;

/// Flushes dirty pages and drops the page cache (root only; a no-op otherwise), so each
/// timed run starts from the same state and does not pay for the previous run's writeback.
pub fn drop_page_cache() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Runs `f` after `drop_page_cache`, and times it.
pub fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Duration)> {
    drop_page_cache();
    let start = Instant::now();
    let out = f()?;
    Ok((out, start.elapsed()))
}

pub async fn timed_async<T>(f: impl Future<Output = Result<T>>) -> Result<(T, Duration)> {
    drop_page_cache();
    let start = Instant::now();
    let out = f.await?;
    Ok((out, start.elapsed()))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn check_sha(path: &Path, expected: &str) -> Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    ensure!(
        hex::encode(hasher.finalize()) == expected,
        "{} differs from the origin",
        path.display()
    );
    Ok(())
}

pub fn sha256sum(path: &Path) -> Result<()> {
    run(Command::new("sha256sum").arg(path))
}

pub fn curl(url: &str, dest: &Path) -> Result<()> {
    run(Command::new("curl")
        .args(["-sS", "--fail", "-o"])
        .arg(dest)
        .arg(url))
}

fn s3_env(cmd: &mut Command) {
    cmd.env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
        .env("AWS_REGION", s3::REGION)
        .env("AWS_DEFAULT_REGION", s3::REGION);
}

pub fn s5cmd_cp(venv_bin: &Path, s3: &S3Server, key: &str, dest: &Path) -> Result<()> {
    let mut cmd = Command::new(venv_bin.join("s5cmd"));
    s3_env(&mut cmd);
    run(cmd
        .args([
            "--endpoint-url",
            &s3.endpoint(),
            "cp",
            &format!("s3://{}/{key}", s3::BUCKET),
        ])
        .arg(dest))
}

pub fn aws_cp(venv_bin: &Path, s3: &S3Server, key: &str, dest: &Path) -> Result<()> {
    let mut cmd = Command::new(venv_bin.join("aws"));
    s3_env(&mut cmd);
    run(cmd
        .args([
            "s3",
            "cp",
            "--only-show-errors",
            "--endpoint-url",
            &s3.endpoint(),
            &format!("s3://{}/{key}", s3::BUCKET),
        ])
        .arg(dest))
}

/// What a user would write against S3 directly: `object_store`, 8 ranged GETs of 8 MiB in
/// flight, each written at its offset; no hashing.
pub async fn direct_ranged_get(s3: &S3Server, key: &str, dest: &Path, size: u64) -> Result<()> {
    const RANGE: u64 = 8 * 1024 * 1024;
    let store: Arc<dyn ObjectStore> = Arc::new(s3.client());
    let path = ObjectPath::from(key);
    let file = Arc::new(std::fs::File::create(dest)?);
    let ranges: Vec<_> = (0..size.div_ceil(RANGE))
        .map(|i| i * RANGE..((i + 1) * RANGE).min(size))
        .collect();
    futures::stream::iter(ranges)
        .map(|range| {
            let (store, path, file) = (store.clone(), path.clone(), file.clone());
            async move {
                let bytes = store.get_range(&path, range.clone()).await?;
                tokio::task::spawn_blocking(move || file.write_all_at(&bytes, range.start))
                    .await??;
                Ok::<_, anyhow::Error>(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

/// A gRPC client that fetches a model from the node and discards the bytes; with `verify`
/// it checks every chunk's BLAKE3 first, as the agent does. Returns the bytes received.
pub async fn fetch_discard(url: &str, reference: &str, verify: bool) -> Result<u64> {
    let mut client = cache_agent::node::connect(&[url.to_owned()]).await?;
    let mut stream = client
        .fetch(modelcache_proto::v1::FetchRequest {
            reference: reference.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut bytes = 0u64;
    while let Some(msg) = stream.message().await? {
        if let Some(modelcache_proto::v1::fetch_response::Item::Chunk(c)) = msg.item {
            bytes += c.data.len() as u64;
            if verify {
                let ok = tokio::task::spawn_blocking(move || {
                    blake3::hash(&c.data).as_bytes().as_slice() == c.blake3.as_slice()
                })
                .await?;
                ensure!(ok, "a chunk failed its BLAKE3");
            }
        }
    }
    Ok(bytes)
}

/// Removes a file or a directory tree, ignoring what is not there.
pub fn remove(path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    let _ = std::fs::remove_file(path);
}

fn agent(bin: &Path, node: &str, dir: &Path, reference: &str) -> Command {
    let mut cmd = Command::new(bin.join("cache-agent"));
    cmd.arg("--node")
        .arg(node)
        .arg("--dir")
        .arg(dir)
        .args(["prefetch", reference]);
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    cmd
}

pub fn agent_prefetch(bin: &Path, node: &str, dir: &Path, reference: &str) -> Result<()> {
    let status = agent(bin, node, dir, reference).status()?;
    ensure!(status.success(), "cache-agent prefetch {reference} failed");
    Ok(())
}

pub fn agent_prefetch_spawn(bin: &Path, node: &str, dir: &Path, reference: &str) -> Result<Child> {
    Ok(agent(bin, node, dir, reference).spawn()?)
}

/// CPU time (user + system) of a process, and of its children that were waited for.
pub fn cpu_time(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<u64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17 of stat; 3 is the first after ')'.
    let ticks = |i: usize| fields.get(i - 3).copied().unwrap_or(0);
    let hz = 100.0; // USER_HZ, fixed at 100 on Linux
    let own = (ticks(14) + ticks(15)) as f64 / hz;
    let children = (ticks(16) + ticks(17)) as f64 / hz;
    Some((
        Duration::from_secs_f64(own),
        Duration::from_secs_f64(children),
    ))
}

/// Peak RSS (VmHWM) of a running process, in bytes.
pub fn peak_rss_of(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs a prefetch and samples the agent's peak RSS until it exits.
pub fn agent_prefetch_peak_rss(bin: &Path, node: &str, dir: &Path, reference: &str) -> Result<u64> {
    let mut child = agent_prefetch_spawn(bin, node, dir, reference)?;
    let mut peak = 0;
    loop {
        if let Some(rss) = peak_rss_of(child.id()) {
            peak = peak.max(rss);
        }
        if let Some(status) = child.try_wait()? {
            ensure!(status.success(), "cache-agent failed");
            return Ok(peak);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion under GNU time; returns its peak RSS in bytes.
pub fn run_peak_rss(program: &Path, args: &[&std::ffi::OsStr]) -> Result<u64> {
    let report = tempfile::NamedTempFile::new()?;
    let status = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(report.path())
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("running /usr/bin/time (Debian package `time`)")?;
    ensure!(status.success(), "{} failed", program.display());
    let kib: u64 = std::fs::read_to_string(report.path())?
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// `onnxruntime.quantization.quantize_dynamic(..., per_channel=True)` on `input`, timed
/// inside Python (interpreter start and imports excluded): the best of `runs` in one process.
pub fn ort_quantize_dynamic(
    python: &Path,
    input: &Path,
    output: &Path,
    runs: usize,
) -> Result<Duration> {
    let script = r#"
import sys, time
from onnxruntime.quantization import QuantType, quantize_dynamic
best = float("inf")
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    quantize_dynamic(sys.argv[1], sys.argv[2], per_channel=True, weight_type=QuantType.QInt8)
    best = min(best, time.perf_counter() - t)
print(best)
"#;
    let out = Command::new(python)
        .args(["-c", script])
        .arg(input)
        .arg(output)
        .arg(runs.to_string())
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    ensure!(out.status.success(), "quantize_dynamic failed");
    let secs: f64 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    Ok(Duration::from_secs_f64(secs))
}

/// Lines of a node's stderr kept for its error message.
const NODE_LOG_LINES: usize = 40;

/// A `cache-node` process against the benchmark's S3 server.
pub struct NodeProcess {
    child: Option<Child>,
    /// The last lines the node wrote to stderr, for the error when it fails.
    log: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    args: Vec<String>,
    bin: PathBuf,
    pub url: String,
}

impl NodeProcess {
    pub fn start(bin: &Path, s3: &S3Server, cache_dir: &Path, memory: &str) -> Result<Self> {
        let args = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--origin".into(),
            format!("s3://{}", s3::BUCKET),
            "--cache-dir".into(),
            cache_dir.display().to_string(),
            "--memory-capacity".into(),
            memory.into(),
            "--disk-capacity".into(),
            "4GiB".into(),
            "--variant-capacity".into(),
            "1GiB".into(),
            "--s3-endpoint".into(),
            s3.endpoint(),
            "--s3-access-key-id".into(),
            s3::ACCESS_KEY.into(),
            "--s3-secret-access-key".into(),
            s3::SECRET_KEY.into(),
            "--s3-region".into(),
            s3::REGION.into(),
            "--s3-allow-http".into(),
            "true".into(),
            // Variants are built only when a scenario asks for one (T7 is measured without).
            "--precompute".into(),
            "none".into(),
        ];
        let mut node = Self {
            child: None,
            log: Default::default(),
            args,
            bin: bin.to_owned(),
            url: String::new(),
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        let mut child = Command::new(self.bin.join("cache-node"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("node stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut tail = log.lock().unwrap_or_else(|e| e.into_inner());
                    if tail.len() == NODE_LOG_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line.clone());
                }
                if let Some(addr) = line.split("addr=").nth(1) {
                    let _ = tx.send(
                        addr.split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .context("cache-node did not start")?;
        self.url = format!("http://{addr}");
        self.child = Some(child);
        Ok(())
    }

    /// CPU time the node has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self.child.as_ref().context("not running")?.id();
        Ok(cpu_time(pid).context("reading the node's CPU time")?.0)
    }

    pub fn peak_rss(&self) -> Result<u64> {
        let pid = self.child.as_ref().context("not running")?.id();
        peak_rss_of(pid).context("no /proc status")
    }

    /// SIGTERM and wait: a graceful shutdown that flushes the disk tier.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let status = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            ensure!(status.success(), "kill failed");
            let status = child.wait()?;
            if !status.success() {
                let tail = self.log.lock().unwrap_or_else(|e| e.into_inner());
                let tail: Vec<&str> = tail.iter().map(String::as_str).collect();
                bail!(
                    "cache-node exited with {status}; its last lines:\n{}",
                    tail.join("\n")
                );
            }
        }
        Ok(())
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// nginx on a free loopback port with its own config, serving `root` with sendfile;
/// stopped by PID.
pub struct Nginx {
    pub port: u16,
    child: Child,
}

impl Nginx {
    pub fn start(dir: &Path, root: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("logs"))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = format!(
            "daemon off;\nworker_processes 2;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n\
             client_body_temp_path {dir}/tmp;\n  proxy_temp_path {dir}/tmp;\n  fastcgi_temp_path {dir}/tmp;\n\
             uwsgi_temp_path {dir}/tmp;\n  scgi_temp_path {dir}/tmp;\n\
             server {{ listen 127.0.0.1:{port}; root {root}; }}\n}}\n",
            dir = dir.display(),
            root = root.display()
        );
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(nginx_binary())
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (scripts/bench installs it)")?;
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { port, child });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "nginx did not start; see {}",
            dir.join("logs/error.log").display()
        )
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

pub fn nginx_version() -> String {
    Command::new(nginx_binary())
        .arg("-v")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: nginx/")
                .to_owned()
        })
        .unwrap_or_default()
}

/// One line of the table.
pub struct Row {
    id: &'static str,
    scenario: String,
    ours: String,
    reference: String,
    theirs: String,
    ratio: f64,
    target: String,
    met: bool,
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

impl Row {
    /// Time ratio ours / theirs, which must be at most `max`.
    pub fn time(
        id: &'static str,
        scenario: &str,
        ours: Duration,
        reference: &str,
        theirs: Duration,
        max: f64,
    ) -> Self {
        let ratio = ours.as_secs_f64() / theirs.as_secs_f64();
        Self {
            id,
            scenario: scenario.into(),
            ours: secs(ours),
            reference: reference.into(),
            theirs: secs(theirs),
            ratio,
            target: format!("≤ {max}× time"),
            met: ratio <= max,
        }
    }

    /// Throughput ratio ours / theirs, which must be at least `min`.
    pub fn throughput(
        id: &'static str,
        scenario: &str,
        bytes: u64,
        ours: Duration,
        reference: &str,
        theirs: Duration,
        min: f64,
    ) -> Self {
        let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
        let ratio = rate(ours) / rate(theirs);
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{:.0} MB/s", rate(ours)),
            reference: reference.into(),
            theirs: format!("{:.0} MB/s", rate(theirs)),
            ratio,
            target: format!("≥ {min}× throughput"),
            met: ratio >= min,
        }
    }

    pub fn ratio(
        id: &'static str,
        scenario: &str,
        ratio: f64,
        reference: &str,
        bound: f64,
        at_least: bool,
    ) -> Self {
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{ratio:.3}"),
            reference: reference.into(),
            theirs: "1".into(),
            ratio,
            target: format!("{} {bound}×", if at_least { "≥" } else { "≤" }),
            met: if at_least {
                ratio >= bound
            } else {
                ratio <= bound
            },
        }
    }

    pub fn memory(id: &'static str, scenario: &str, bytes: u64, limit: u64) -> Self {
        Self {
            id,
            scenario: scenario.into(),
            ours: format!("{} MiB", bytes / (1024 * 1024)),
            reference: "—".into(),
            theirs: "—".into(),
            ratio: bytes as f64 / limit as f64,
            target: format!("≤ {} MiB", limit / (1024 * 1024)),
            met: bytes <= limit,
        }
    }
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Row>,
}

impl Table {
    pub fn push(&mut self, row: Row) {
        eprintln!(
            "    {} {}: {} vs {} {} → {:.3} ({})",
            row.id,
            row.scenario,
            row.ours,
            row.reference,
            row.theirs,
            row.ratio,
            if row.met { "met" } else { "NOT met" }
        );
        self.rows.push(row);
    }

    /// A Markdown table.
    pub fn render(&self, footer: &str) -> String {
        let mut out = String::from(
            "| # | scenario | modelcache | reference | reference value | ratio | target | met |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.3} | {} | {} |\n",
                r.id,
                r.scenario,
                r.ours,
                r.reference,
                r.theirs,
                r.ratio,
                r.target,
                if r.met { "yes" } else { "**no**" }
            ));
        }
        out.push_str(&format!("\n{footer}\n"));
        out
    }
}
