//! The sandbox the end-to-end suite and the benchmark run in: a real S3 server (`s3`),
//! in-process nodes on `127.0.0.1:0` (`TestNode`), temporary directories that live as long
//! as the `Sandbox` that made them, the real binaries, and deterministic test data.
//!
//! A test usually starts with `Sandbox::start`, seeds models through the S3 API, and
//! starts nodes with `Sandbox::node` (or `Sandbox::node_config` to change settings first).

/// The sample ResNet-50 (it lives in `modelcache-quant`, beside `modelcache-sample`).
pub use modelcache_quant::sample as resnet;
pub use modelcache_quant::sample::rng;
pub mod metrics;
pub mod otlp;
pub mod pki;
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

/// A safetensors model of one `rows`×`cols` float32 tensor of values in [-0.5, 0.5]
/// (`model.safetensors`), the same for the same seed.
pub fn safetensors_f32(seed: u64, rows: usize, cols: usize) -> ModelFiles {
    let values: Vec<u8> = data(seed, rows * cols)
        .iter()
        .flat_map(|b| (f32::from(*b) / 255.0 - 0.5).to_le_bytes())
        .collect();
    let header = format!(
        r#"{{"layer.weight":{{"dtype":"F32","shape":[{rows},{cols}],"data_offsets":[0,{}]}}}}"#,
        values.len()
    );
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header.as_bytes());
    file.extend(values);
    vec![("model.safetensors".into(), file)]
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

/// Whether the node's S3 client (object_store) reads environment variable `var`: how the
/// deployment files' `AWS_*` variables are checked.
pub fn object_store_reads(var: &str) -> bool {
    var.starts_with("AWS_")
        && var
            .to_ascii_lowercase()
            .parse::<object_store::aws::AmazonS3ConfigKey>()
            .is_ok()
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

    /// `n` nodes peering with one another (ids `node-0`, `node-1`, …; each given the
    /// whole list, itself included), each with `node_config()` changed by `tweak`;
    /// returned once every node sees all `n` healthy.
    pub async fn cluster(&self, n: usize, tweak: impl Fn(&mut Config)) -> Vec<TestNode> {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let peers: Vec<String> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let mut config = self.node_config();
            config.peers = peers.clone();
            config.node_id = Some(format!("node-{i}"));
            config.probe_interval = Duration::from_millis(200);
            config.peer_timeout = Duration::from_secs(3);
            tweak(&mut config);
            let node = Node::open(&config).await.expect("node opens");
            nodes.push(TestNode::start_on(node, listener).await);
        }
        for node in &nodes {
            node.wait_members(n).await;
        }
        nodes
    }
}

/// A node serving in this process on `127.0.0.1:0`; shut down (and flushed) on `stop`
/// or when dropped.
pub struct TestNode {
    pub url: String,
    pub registry: Arc<Registry>,
    pub cluster: Arc<cache_node::cluster::Cluster>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<cache_node::Result<()>>>,
}

impl TestNode {
    pub async fn start(config: Config) -> Self {
        Self::start_with(Node::open(&config).await.expect("node opens")).await
    }

    pub async fn start_with(node: Node) -> Self {
        Self::start_on(node, TcpListener::bind("127.0.0.1:0").await.unwrap()).await
    }

    /// Serves `node` on `listener`.
    pub async fn start_on(node: Node, listener: TcpListener) -> Self {
        let registry = node.registry().clone();
        let cluster = node.cluster().clone();
        let scheme = if node.serves_tls() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(node.serve(listener, async {
            let _ = rx.await;
        }));
        Self {
            url,
            registry,
            cluster,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The node's `Members` answer.
    pub async fn members(&self) -> Result<modelcache_proto::v1::MembersResponse, tonic::Status> {
        self.client()
            .await
            .members(modelcache_proto::v1::MembersRequest {})
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits (up to 30 s) until the node is ready and sees `n` healthy members (as the
    /// node itself sees them: no call, so no token needed).
    pub async fn wait_members(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let members = self.cluster.members();
            if self.cluster.is_ready() && members.iter().filter(|m| m.healthy).count() == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} does not see {n} healthy members: {members:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
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

    /// An agent that asks this node (directly, whoever owns the model).
    pub fn agent(&self, dir: &Path) -> cache_agent::Agent {
        cache_agent::Agent::new(vec![self.url.clone()], dir).with_direct(true)
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
            // The whole workspace, as `scripts/test` builds it: building two packages alone
            // would unify their dependencies' features differently and compile them again.
            .args(["build", "--quiet", "--workspace", "--bins"])
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

impl Child {
    /// Sends SIGTERM and waits for the process to exit; its exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -TERM {} failed", self.0.id());
        self.0.wait().expect("waiting for the process")
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

/// The `cache-node` binary against `s3` (bucket `models`) on `127.0.0.1:0`, with small
/// tiers in `cache`; it writes its address to `ready` once serving. Stderr discarded.
pub fn node_command(s3: &S3Server, cache: &Path, ready: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(binary("cache-node"));
    cmd.env("CACHE_NODE_ORIGIN", format!("s3://{}", s3::BUCKET))
        .env("CACHE_NODE_LISTEN", "127.0.0.1:0")
        .env("CACHE_NODE_READY_FILE", ready)
        .env("CACHE_NODE_CACHE_DIR", cache)
        .env("CACHE_NODE_MEMORY_CAPACITY", "64MiB")
        .env("CACHE_NODE_DISK_CAPACITY", "256MiB")
        .env("CACHE_NODE_VARIANT_CAPACITY", "128MiB")
        .env("AWS_ENDPOINT_URL", s3.endpoint())
        .env("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", s3::SECRET_KEY)
        .env("AWS_REGION", s3::REGION)
        .env("AWS_ALLOW_HTTP", "true")
        .stderr(std::process::Stdio::null());
    cmd
}

/// A port nobody listens on now (for processes that must know each other's addresses
/// before they start).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd`, which must succeed; its stdout.
pub fn run_ok(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Waits until an agent's download into the model store `store` has recorded progress
/// (its transfer is under way).
pub async fn download_started(store: &Path) -> bool {
    wait_for(Duration::from_secs(30), || {
        std::fs::read_dir(store)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".progress.json"))
    })
    .await
}

/// A `grpc.health.v1` check of the whole server at `url`, without a token.
pub async fn health_check(
    url: &str,
) -> Result<tonic_health::pb::HealthCheckResponse, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .map(tonic::Response::into_inner)
}

/// `cache-agent --node NODE admin ARGS…` run to its end, with a directory of its own and
/// no `CACHE_AGENT_NODE` or `RUST_LOG` from the test's environment.
pub fn admin_command(node: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::process::Command::new(binary("cache-agent"))
        .env_remove("CACHE_AGENT_NODE")
        .env_remove("RUST_LOG")
        .args(["--node", node, "--dir"])
        .arg(dir.path())
        .arg("admin")
        .args(args)
        .output()
        .unwrap()
}

/// A tmpfs of `size_mib` MiB mounted for the test's lifetime (needs root and `mount`, which
/// `.ci/run` installs). Tests of full filesystems use small ones; tests that reserve large
/// tiers use one so that they take memory for a moment instead of the build disk's space.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size_mib: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(
            status.success(),
            "this test mounts a tmpfs and needs root (as CI runs)"
        );
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}
