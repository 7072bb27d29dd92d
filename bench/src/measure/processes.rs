//! The processes measured: `cache-node` against the benchmark's S3 server, the agent,
//! and their CPU time and peak memory from /proc.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use modelcache_testkit::{S3Server, s3};

/// Where the measured processes export their spans (`--traced`), when they do.
static SPANS_TO: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every node and agent started from now on export its spans to `endpoint`.
pub fn export_spans_to(endpoint: String) {
    let _ = SPANS_TO.set(endpoint);
}

/// `cmd` exporting spans when `export_spans_to` was called.
fn traced(cmd: &mut Command) -> &mut Command {
    match SPANS_TO.get() {
        Some(endpoint) => cmd.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
        None => cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    }
}

/// The certificates nodes and agents use (`--tls`), when they use TLS.
static TLS: std::sync::OnceLock<Tls> = std::sync::OnceLock::new();

struct Tls {
    ca: PathBuf,
    node: modelcache_testkit::pki::Issued,
    agent: modelcache_testkit::pki::Issued,
}

/// Makes every node started from now on serve mutual TLS, and every agent call it with a
/// client certificate: a CA and certificates made in `dir`.
pub fn use_tls(dir: &Path) -> Result<()> {
    use modelcache_testkit::pki::{Ca, Validity};
    std::fs::create_dir_all(dir)?;
    let ca = Ca::new(dir, "bench");
    let names = ["localhost", "127.0.0.1"];
    let tls = Tls {
        node: ca.issue(dir, "node", &names, Validity::Current),
        agent: ca.issue(dir, "agent", &["agent"], Validity::Current),
        ca: ca.cert,
    };
    let _ = TLS.set(tls);
    Ok(())
}

/// What agents in this process call nodes with: the client certificate under `--tls`.
pub fn credentials() -> cache_agent::node::Credentials {
    let tls = TLS.get().map(|tls| {
        let identity = modelcache_proto::tls::Identity {
            cert: tls.agent.cert.clone(),
            key: tls.agent.key.clone(),
        };
        modelcache_proto::tls::ClientTls::load(Some(tls.ca.clone()), Some(identity))
            .expect("the benchmark's certificates load")
    });
    cache_agent::node::Credentials { token: None, tls }
}

fn path_arg(flag: &str, path: &Path) -> [String; 2] {
    [flag.to_owned(), path.display().to_string()]
}

fn agent(bin: &Path, node: &str, dir: &Path, reference: &str) -> Command {
    let mut cmd = Command::new(bin.join("cache-agent"));
    traced(&mut cmd);
    if let Some(tls) = TLS.get() {
        cmd.args(path_arg("--ca", &tls.ca))
            .args(path_arg("--cert", &tls.agent.cert))
            .args(path_arg("--key", &tls.agent.key));
    }
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

/// Field `i` of `/proc/PID/stat` (numbered from 1 as in proc(5)); the command name, field
/// 2, is in parentheses and may hold spaces, so fields are counted after it.
fn stat_fields(pid: u32) -> Option<impl Fn(usize) -> u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<u64> = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some(move |i: usize| fields.get(i - 3).copied().unwrap_or(0))
}

/// CPU time (user + system) of a process, and of its children that were waited for.
pub fn cpu_time(pid: u32) -> Option<(Duration, Duration)> {
    let field = stat_fields(pid)?;
    // utime, stime, cutime, cstime are fields 14..=17.
    let hz = 100.0; // USER_HZ, fixed at 100 on Linux
    let own = (field(14) + field(15)) as f64 / hz;
    let children = (field(16) + field(17)) as f64 / hz;
    Some((
        Duration::from_secs_f64(own),
        Duration::from_secs_f64(children),
    ))
}

/// Minor page faults of a running process so far (field 10): each is a page of fresh
/// memory touched for the first time.
pub fn minor_faults(pid: u32) -> Option<u64> {
    Some(stat_fields(pid)?(10))
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

/// Lines of a node's stderr kept for its error message.
const NODE_LOG_LINES: usize = 40;

/// A `cache-node` process against the benchmark's S3 server.
pub struct NodeProcess {
    child: Option<Child>,
    /// The last lines the node wrote to stderr, for the error when it fails.
    log: Arc<std::sync::Mutex<std::collections::VecDeque<String>>>,
    args: Vec<String>,
    bin: PathBuf,
    /// Where the node writes its address once it serves (`--ready-file`).
    ready: PathBuf,
    pub url: String,
}

impl NodeProcess {
    pub fn start(bin: &Path, s3: &S3Server, cache_dir: &Path, memory: &str) -> Result<Self> {
        Self::start_with(bin, s3, cache_dir, memory, &[])
    }

    /// Like `start`, with more flags.
    pub fn start_with(
        bin: &Path,
        s3: &S3Server,
        cache_dir: &Path,
        memory: &str,
        extra: &[String],
    ) -> Result<Self> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--ready-file".into(),
            cache_dir.join("node.addr").display().to_string(),
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
        args.extend_from_slice(extra);
        if let Some(tls) = TLS.get() {
            args.extend(path_arg("--tls-cert", &tls.node.cert));
            args.extend(path_arg("--tls-key", &tls.node.key));
            args.extend(path_arg("--tls-client-ca", &tls.ca));
        }
        let mut node = Self {
            child: None,
            log: Default::default(),
            args,
            bin: bin.to_owned(),
            ready: cache_dir.join("node.addr"),
            url: String::new(),
        };
        node.spawn()?;
        Ok(node)
    }

    fn spawn(&mut self) -> Result<()> {
        let _ = std::fs::remove_file(&self.ready);
        let mut child = traced(&mut Command::new(self.bin.join("cache-node")))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("node stderr")?;
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut tail = log.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == NODE_LOG_LINES {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        let started = std::time::Instant::now();
        let addr = loop {
            if let Ok(addr) = std::fs::read_to_string(&self.ready) {
                break addr.trim().to_owned();
            }
            if child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let tail = self.log.lock().unwrap_or_else(|e| e.into_inner());
                let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
                bail!("cache-node did not start:\n{}", lines.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let scheme = if TLS.get().is_some() { "https" } else { "http" };
        self.url = format!("{scheme}://{addr}");
        self.child = Some(child);
        Ok(())
    }

    /// CPU time the node has used so far.
    pub fn cpu_time(&self) -> Result<Duration> {
        let pid = self.child.as_ref().context("not running")?.id();
        Ok(cpu_time(pid).context("reading the node's CPU time")?.0)
    }

    pub fn minor_faults(&self) -> Result<u64> {
        let pid = self.child.as_ref().context("not running")?.id();
        minor_faults(pid).context("reading the node's page faults")
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
