//! The cluster in containers, started with testcontainers from the images
//! `scripts/images` builds here (no registry): the project's S3 server, three nodes on a
//! private network, and agents in containers of their own. The owner of the model is cut
//! off the network (`docker network disconnect`) in the middle of the transfers; every
//! agent completes from another node, with the bytes checked on the host.

use std::process::Command;
use std::time::{Duration, Instant};

use modelcache_testkit::{ModelFiles, assert_same_files, data};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use testcontainers::core::{ContainerPort, ExecCommand, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

const IDS: [&str; 3] = ["node-0", "node-1", "node-2"];
const USER: &str = "modelcache";
const SECRET: &str = "modelcache-secret";

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn image() -> GenericImage {
    GenericImage::new("modelcache", "local")
}

/// Removes the test's network when dropped (after the containers, dropped before it).
struct Network(String);

impl Drop for Network {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["network", "rm", &self.0])
            .output();
    }
}

async fn seed(port: u16, name: &str, files: &ModelFiles) {
    let store = AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{port}"))
        .with_bucket_name("models")
        .with_access_key_id(USER)
        .with_secret_access_key(SECRET)
        .with_region("us-east-1")
        .with_allow_http(true)
        .build()
        .unwrap();
    for (path, bytes) in files {
        let upload = store
            .put_multipart(&Path::from(format!("{name}/{path}")))
            .await
            .unwrap();
        let mut writer = WriteMultipart::new_with_chunk_size(upload, 8 << 20);
        writer.write(bytes);
        writer.finish().await.unwrap();
    }
}

/// Bytes under `/models` in a running agent container (0 once it has exited).
async fn landed(agent: &ContainerAsync<GenericImage>) -> u64 {
    let Ok(mut exec) = agent.exec(ExecCommand::new(["du", "-sb", "/models"])).await else {
        return 0;
    };
    let out = exec.stdout_to_vec().await.unwrap_or_default();
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_in_containers_complete_when_the_owner_is_cut_off_mid_transfer() {
    // The debug builds the suite has made already (a release build costs CI ten minutes).
    let built = Command::new("scripts/images")
        .env("MODELCACHE_IMAGE_PROFILE", "debug")
        .current_dir(root())
        .status()
        .unwrap();
    assert!(built.success(), "scripts/images failed");
    let suffix = format!("{}-{}", std::process::id(), rand_suffix());
    let network = Network(format!("modelcache-tc-{suffix}"));
    let created = Command::new("docker")
        .args(["network", "create", &network.0])
        .output()
        .unwrap();
    assert!(created.status.success(), "{created:?}");

    // The origin: slow (4 MiB/s per GET), so that the owner is cut off mid-transfer.
    let s3_name = format!("s3-{suffix}");
    let s3 = image()
        .with_exposed_port(ContainerPort::Tcp(9000))
        .with_wait_for(WaitFor::message_on_stdout("modelcache-s3 serving"))
        .with_cmd(["modelcache-s3", "serve", "0.0.0.0:9000", "/data"])
        .with_user("root")
        .with_env_var("MINIO_ROOT_USER", USER)
        .with_env_var("MINIO_ROOT_PASSWORD", SECRET)
        .with_env_var("MODELCACHE_S3_BYTES_PER_SEC", (4u64 << 20).to_string())
        .with_network(&network.0)
        .with_container_name(&s3_name)
        .start()
        .await
        .unwrap();
    let files: ModelFiles = vec![
        ("weights.bin".into(), data(61, 128 << 20)),
        ("config.json".into(), b"{}".to_vec()),
    ];
    seed(s3.get_host_port_ipv4(9000).await.unwrap(), "big", &files).await;

    let names: Vec<String> = (0..3).map(|i| format!("n{i}-{suffix}")).collect();
    let peers = names
        .iter()
        .map(|n| format!("{n}:7070"))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        nodes.push(
            image()
                .with_wait_for(WaitFor::message_on_stderr("ready"))
                .with_cmd(["cache-node"])
                .with_env_var("CACHE_NODE_ORIGIN", "s3://models")
                .with_env_var("CACHE_NODE_PEERS", &peers)
                .with_env_var("CACHE_NODE_NODE_ID", IDS[i])
                .with_env_var("CACHE_NODE_ADVERTISE", format!("{name}:7070"))
                .with_env_var("CACHE_NODE_PROBE_INTERVAL", "500ms")
                .with_env_var("CACHE_NODE_PEER_TIMEOUT", "3s")
                .with_env_var("CACHE_NODE_MEMORY_CAPACITY", "128MiB")
                .with_env_var("CACHE_NODE_DISK_CAPACITY", "512MiB")
                .with_env_var("CACHE_NODE_VARIANT_CAPACITY", "64MiB")
                .with_env_var("CACHE_NODE_PRECOMPUTE", "none")
                .with_env_var("AWS_ENDPOINT_URL", format!("http://{s3_name}:9000"))
                .with_env_var("AWS_ACCESS_KEY_ID", USER)
                .with_env_var("AWS_SECRET_ACCESS_KEY", SECRET)
                .with_env_var("AWS_REGION", "us-east-1")
                .with_env_var("AWS_ALLOW_HTTP", "true")
                .with_network(&network.0)
                .with_container_name(name)
                .start(),
        );
    }
    let nodes: Vec<ContainerAsync<GenericImage>> = futures::future::join_all(nodes)
        .await
        .into_iter()
        .map(|n| n.unwrap())
        .collect();
    let owner = IDS
        .iter()
        .position(|id| Some(*id) == modelcache_proto::rank::owner("big", IDS))
        .unwrap();

    // Agents in containers, given every node: each asks the owner first.
    let urls = names
        .iter()
        .map(|n| format!("http://{n}:7070"))
        .collect::<Vec<_>>()
        .join(",");
    let mut dirs = Vec::new();
    let mut agents = Vec::new();
    for i in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        // The image's user writes there.
        Command::new("chmod")
            .args(["0777", dir.path().to_str().unwrap()])
            .status()
            .unwrap();
        agents.push(
            image()
                .with_cmd([
                    "cache-agent",
                    "--idle-timeout",
                    "5s",
                    "--node",
                    &urls,
                    "prefetch",
                    "big",
                ])
                .with_mount(Mount::bind_mount(dir.path().to_str().unwrap(), "/models"))
                .with_network(&network.0)
                .with_container_name(format!("agent{i}-{suffix}"))
                .start()
                .await
                .unwrap(),
        );
        dirs.push(dir);
    }
    // Once each agent has 16 MiB, the owner is cut off the network.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut least = u64::MAX;
        for a in &agents {
            least = least.min(landed(a).await);
        }
        if least >= 16 << 20 {
            break;
        }
        assert!(Instant::now() < deadline, "the transfers did not get going");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cut = Command::new("docker")
        .args(["network", "disconnect", &network.0, nodes[owner].id()])
        .output()
        .unwrap();
    assert!(cut.status.success(), "{cut:?}");
    let cut_at = Instant::now();

    let deadline = Instant::now() + Duration::from_secs(300);
    for (i, agent) in agents.iter().enumerate() {
        let code = loop {
            if let Some(code) = agent.exit_code().await.unwrap() {
                break code;
            }
            assert!(Instant::now() < deadline, "agent {i} never ended");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let stdout = String::from_utf8(agent.stdout_to_vec().await.unwrap()).unwrap();
        let stderr = String::from_utf8(agent.stderr_to_vec().await.unwrap()).unwrap();
        assert_eq!(code, 0, "agent {i}: {stderr}");
        assert_eq!(stdout, "/models/big/@original\n", "agent {i}: {stderr}");
        assert!(
            stderr.contains("going on with"),
            "agent {i} never failed over: {stderr}"
        );
        assert_same_files(&dirs[i].path().join("big/@original"), &files);
    }
    eprintln!(
        "every agent done {:.1} s after the owner was cut off",
        cut_at.elapsed().as_secs_f64()
    );
    drop(agents);
    drop(nodes);
    drop(s3);
    drop(network);
}

/// A few random hex digits, so that parallel runs name their containers apart.
fn rand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{nanos:08x}")
}
