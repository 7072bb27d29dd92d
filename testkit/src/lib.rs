//! The sandbox the end-to-end suite and the benchmark run in: a real S3 server (`s3`),
//! in-process nodes on `127.0.0.1:0` (`TestNode`), temporary directories that live as long
//! as the `Sandbox` that made them, the real binaries, and deterministic test data.
//!
//! A test usually starts with `Sandbox::start`, seeds models through the S3 API, and
//! starts nodes with `Sandbox::node` (or `Sandbox::node_config` to change settings first).

pub mod resnet;
pub mod rng;
pub mod s3;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use cache_node::registry::Registry;
use cache_node::{Config, Node};
use sha2::Digest;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub use s3::S3Server;

/// Bytes that look random and are the same on every run (xorshift64*).
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

pub fn sha256_file(path: &Path) -> String {
    sha256(&std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())))
}

/// A model to seed: relative path → bytes.
pub type ModelFiles = Vec<(String, Vec<u8>)>;

/// Seeds `files` under `models/NAME/` through the S3 API.
pub async fn seed(s3: &S3Server, name: &str, files: &ModelFiles) {
    for (path, bytes) in files {
        s3.put(&format!("{name}/{path}"), bytes).await;
    }
}

/// Checks that `dir` holds exactly `files`, byte for byte (by SHA-256).
pub fn assert_same_files(dir: &Path, files: &ModelFiles) {
    for (path, bytes) in files {
        let local = dir.join(path);
        assert_eq!(
            sha256_file(&local),
            sha256(bytes),
            "{} differs",
            local.display()
        );
    }
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            } else {
                count += 1;
            }
        }
    }
    assert_eq!(
        count,
        files.len(),
        "unexpected extra files in {}",
        dir.display()
    );
}

/// A node's configuration against `s3` (bucket `models`), with its own cache dir.
pub fn node_config(s3: &S3Server, cache_dir: &Path) -> Config {
    let mut config = Config::with_origin(&format!("s3://{}", s3::BUCKET), cache_dir);
    config.s3_endpoint = Some(s3.endpoint());
    config.s3_access_key_id = Some(s3::ACCESS_KEY.into());
    config.s3_secret_access_key = Some(s3::SECRET_KEY.into());
    config.s3_region = Some(s3::REGION.into());
    config.s3_allow_http = Some(true);
    config.memory_capacity = bytesize_mib(256);
    config.disk_capacity = bytesize_mib(1024);
    config.variant_capacity = bytesize_mib(256);
    config
}

/// Checks that the `Range` headers of an object's GETs (`bytes=A-B`, as the tap records
/// them) read each of its `size` bytes exactly once.
pub fn assert_read_once(ranges: &[String], size: u64) {
    let mut spans: Vec<(u64, u64)> = ranges
        .iter()
        .map(|r| {
            let (a, b) = r
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .unwrap_or_else(|| panic!("not a byte range: {r:?}"));
            (a.parse().unwrap(), b.parse::<u64>().unwrap() + 1)
        })
        .collect();
    spans.sort();
    let mut at = 0;
    for (start, end) in &spans {
        assert_eq!(*start, at, "bytes read twice or never: {spans:?}");
        at = *end;
    }
    assert_eq!(at, size, "the reads stop short: {spans:?}");
}

/// A node's configuration against the local-directory origin `origin`, with small tiers.
pub fn local_config(origin: &Path, cache_dir: &Path) -> Config {
    let mut config = Config::with_origin(&origin.display().to_string(), cache_dir);
    config.memory_capacity = bytesize_mib(256);
    config.disk_capacity = bytesize_mib(256);
    config.variant_capacity = bytesize_mib(128);
    config
}

fn bytesize_mib(n: u64) -> bytesize::ByteSize {
    bytesize::ByteSize::mib(n)
}

/// An S3 server with the `models` bucket, and temporary directories removed when the
/// sandbox is dropped.
pub struct Sandbox {
    pub s3: S3Server,
    dirs: Mutex<Vec<tempfile::TempDir>>,
}

impl Sandbox {
    pub async fn start() -> Self {
        Self {
            s3: S3Server::start().await,
            dirs: Mutex::new(Vec::new()),
        }
    }

    /// A sandbox whose origin holds `files` as model `name`.
    pub async fn with_model(name: &str, files: &ModelFiles) -> Self {
        let sandbox = Self::start().await;
        sandbox.seed(name, files).await;
        sandbox
    }

    /// Seeds `files` under `models/NAME/` through the S3 API.
    pub async fn seed(&self, name: &str, files: &ModelFiles) {
        seed(&self.s3, name, files).await;
    }

    /// A new empty directory, kept until the sandbox is dropped.
    pub fn dir(&self) -> PathBuf {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let path = dir.path().to_owned();
        self.dirs.lock().expect("sandbox lock").push(dir);
        path
    }

    /// A node's configuration against this sandbox's S3 server, with a cache dir of its own.
    pub fn node_config(&self) -> Config {
        node_config(&self.s3, &self.dir())
    }

    /// A node's configuration against the local-directory origin `origin`, with a cache
    /// dir of its own.
    pub fn local_config(&self, origin: &Path) -> Config {
        local_config(origin, &self.dir())
    }

    /// A node with `node_config()`, serving in this process.
    pub async fn node(&self) -> TestNode {
        TestNode::start(self.node_config()).await
    }
}

/// A node serving in this process on `127.0.0.1:0`; shut down (and flushed) on `stop`
/// or when dropped.
pub struct TestNode {
    pub url: String,
    pub registry: Arc<Registry>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<cache_node::Result<()>>>,
}

impl TestNode {
    pub async fn start(config: Config) -> Self {
        Self::start_with(Node::open(&config).await.expect("node opens")).await
    }

    pub async fn start_with(node: Node) -> Self {
        let registry = node.registry().clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(node.serve(listener, async {
            let _ = rx.await;
        }));
        Self {
            url,
            registry,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// What the node has counted so far.
    pub fn stats(&self) -> cache_node::Stats {
        self.registry.stats()
    }

    /// Waits until the node's background work (digests, variant builds) is done.
    pub async fn idle(&self) {
        self.registry.wait_idle().await;
    }

    /// Graceful shutdown: stops serving, finishes background work, flushes the disk tier.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Prefetches `reference` through a new agent into a new temporary directory.
    pub async fn prefetch_fresh(
        &self,
        reference: &str,
    ) -> (tempfile::TempDir, cache_agent::Fetched) {
        let dir = tempfile::tempdir().unwrap();
        let reference = modelcache_proto::Reference::parse(reference).unwrap();
        let fetched = self
            .agent(dir.path())
            .prefetch(&reference, &cache_agent::Progress::hidden())
            .await
            .unwrap_or_else(|e| panic!("prefetch {reference}: {e}"));
        (dir, fetched)
    }

    pub fn agent(&self, dir: &Path) -> cache_agent::Agent {
        cache_agent::Agent::new(vec![self.url.clone()], dir)
    }

    pub async fn client(
        &self,
    ) -> modelcache_proto::v1::model_cache_client::ModelCacheClient<tonic::transport::Channel> {
        modelcache_proto::v1::model_cache_client::ModelCacheClient::connect(self.url.clone())
            .await
            .unwrap()
    }

    /// A `Fetch` of the whole of `reference`, over a connection of its own.
    pub async fn fetch_stream(
        &self,
        reference: &str,
    ) -> tonic::Streaming<modelcache_proto::v1::FetchResponse> {
        self.client()
            .await
            .fetch(modelcache_proto::v1::FetchRequest {
                reference: reference.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Path of a workspace binary, built once per test process.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "cache-node",
                "-p",
                "cache-agent",
                "--bins",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
        // target/debug/deps/<test> → target/debug
        let exe = std::env::current_exe().unwrap();
        exe.parent().unwrap().parent().unwrap().to_path_buf()
    });
    dir.join(name)
}

/// A child process killed when dropped.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `cond` holds, up to `timeout`.
pub async fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// The workspace's root folder.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ is inside the workspace")
        .to_path_buf()
}

/// The Python that has onnx, onnxruntime, safetensors and gguf: `target/py-venv`, which
/// `scripts/py-env` installs (`scripts/test` runs it), or `MODELCACHE_PYTHON`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MODELCACHE_PYTHON") {
        return p.into();
    }
    let p = workspace().join("target/py-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/py-env (scripts/test does) to install the Python tools \
         the variant checks use",
        p.display()
    );
    p
}

/// Runs `tests/py/SCRIPT ARGS…` with [`python`]; returns its stdout, and its exit status.
pub fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> (String, std::process::ExitStatus) {
    let out = std::process::Command::new(python())
        .arg(workspace().join("tests/py").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("{script}: {stderr}");
    }
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

/// Every file below `dir`, with `/`-separated paths relative to it.
pub fn read_dir_files(dir: &Path) -> ModelFiles {
    fn walk(root: &Path, dir: &Path, out: &mut ModelFiles) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                let rel: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                out.push((rel.join("/"), std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}
