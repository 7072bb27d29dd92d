//! The references modelcache is measured against: curl from nginx, a direct parallel
//! ranged GET, s5cmd, aws s3 cp, sha256sum, and onnxruntime's quantizer.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use futures::{StreamExt, TryStreamExt};
use modelcache_testkit::{S3Server, s3};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use super::run;

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

/// Instructions (valgrind's callgrind) of `cmd` run on one core, counted only inside the
/// function `collect` and what it calls: instruction counts do not swing with the
/// machine's load as times do.
pub fn callgrind_instructions(cmd: &Command, collect: Option<&str>) -> Result<u64> {
    let out_file = tempfile::NamedTempFile::new()?;
    let mut valgrind = Command::new("taskset");
    valgrind
        .args(["-c", "0", "valgrind", "--tool=callgrind"])
        .arg(format!(
            "--callgrind-out-file={}",
            out_file.path().display()
        ));
    match collect {
        Some(function) => valgrind.arg(format!("--toggle-collect={function}")),
        // The command switches counting on and off itself (callgrind_control).
        None => valgrind.arg("--instr-atstart=no"),
    };
    valgrind.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => valgrind.env(k, v),
            None => valgrind.env_remove(k),
        };
    }
    let out = valgrind
        .stdout(Stdio::null())
        .output()
        .context("running valgrind (Debian's valgrind package)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "valgrind failed: {stderr}");
    let collected = stderr
        .lines()
        .find_map(|l| {
            l.split_once("Collected :")
                .map(|(_, n)| n.trim().to_owned())
        })
        .context("callgrind printed no instruction count")?;
    Ok(collected.parse()?)
}

/// Instructions of one `quantize_dynamic(..., per_channel=True)` call on `input`
/// (interpreter start and imports not counted).
pub fn ort_quantize_instructions(python: &Path, input: &Path, output: &Path) -> Result<u64> {
    let script = r#"
import os, subprocess, sys
from onnxruntime.quantization import QuantType, quantize_dynamic
pid = str(os.getpid())
subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
quantize_dynamic(sys.argv[1], sys.argv[2], per_channel=True, weight_type=QuantType.QInt8)
subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
"#;
    let mut cmd = Command::new(python);
    cmd.args(["-c", script]).arg(input).arg(output);
    callgrind_instructions(&cmd, None)
}
