//! TLS and mutual TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`; the agent's `--ca`,
//! `--cert`, `--key`): only clients with a certificate the client CA signed get in, an
//! expired or untrusted certificate fails the handshake while the node keeps serving
//! others, `https://` and plaintext never mix silently, certificates rotate without a
//! restart, and peers call each other over mutual TLS.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cache_agent::{AgentError, Progress};
use modelcache_proto::Reference;
use modelcache_proto::tls::{ClientTls, Identity};
use modelcache_testkit::pki::{self, Ca, Issued, Validity};
use modelcache_testkit::*;

const MIB: usize = 1024 * 1024;
/// The names a test node's certificate carries.
const NAMES: &[&str] = &["localhost", "127.0.0.1"];

fn identity(issued: &Issued) -> Identity {
    Identity {
        cert: issued.cert.clone(),
        key: issued.key.clone(),
    }
}

fn client(ca: &Path, cert: Option<&Issued>) -> Arc<ClientTls> {
    ClientTls::load(Some(ca.to_path_buf()), cert.map(identity)).unwrap()
}

/// A prefetch of the model "m" from `url` into a new directory, with `tls`.
async fn prefetch(
    sandbox: &Sandbox,
    url: &str,
    tls: Option<Arc<ClientTls>>,
) -> Result<cache_agent::Fetched, AgentError> {
    let mut agent = cache_agent::Agent::new(vec![url.to_owned()], sandbox.dir()).with_direct(true);
    if let Some(tls) = tls {
        agent = agent.with_tls(tls);
    }
    agent
        .prefetch(&Reference::parse("m").unwrap(), &Progress::hidden())
        .await
}

/// Prefetches "m" and checks every file of it against `files`, byte for byte.
async fn prefetch_intact(
    sandbox: &Sandbox,
    url: &str,
    tls: Option<Arc<ClientTls>>,
    files: &ModelFiles,
) {
    let fetched = prefetch(sandbox, url, tls).await.unwrap();
    assert_same_files(&fetched.path, files);
}

/// The error of a prefetch that must fail to connect, as text.
async fn refused(sandbox: &Sandbox, url: &str, tls: Option<Arc<ClientTls>>) -> String {
    match prefetch(sandbox, url, tls).await {
        Err(e @ (AgentError::Unreachable { .. } | AgentError::Unavailable { .. })) => e.to_string(),
        other => panic!("expected a failed connection to {url}: {other:?}"),
    }
}

fn tls_config(config: &mut cache_node::Config, node: &Issued, client_ca: Option<&Path>) {
    config.tls_cert = Some(node.cert.clone());
    config.tls_key = Some(node.key.clone());
    config.tls_client_ca = client_ca.map(Path::to_path_buf);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_admits_only_current_certificates_the_client_ca_signed() {
    let files: ModelFiles = vec![("model.bin".into(), data(1, 3 * MIB + 5))];
    let sandbox = Sandbox::with_model("m", &files).await;
    let dir = sandbox.dir();
    let ca = Ca::new(&dir, "cluster");
    let other = Ca::new(&dir, "other");
    let node_cert = ca.issue(&dir, "node", NAMES, Validity::Current);
    let good = ca.issue(&dir, "agent", &["agent"], Validity::Current);
    let expired = ca.issue(&dir, "agent-expired", &["agent"], Validity::Expired);
    let untrusted = other.issue(&dir, "agent-other", &["agent"], Validity::Current);
    let mut config = sandbox.node_config();
    tls_config(&mut config, &node_cert, Some(&ca.cert));
    let node = TestNode::start(config).await;
    assert!(node.url.starts_with("https://"), "{}", node.url);

    // The right CA and a current certificate it signed: the model, byte for byte.
    prefetch_intact(
        &sandbox,
        &node.url,
        Some(client(&ca.cert, Some(&good))),
        &files,
    )
    .await;

    // No certificate, one from another CA, an expired one: the node refuses each in the
    // handshake, and the agent says it was refused for its certificate.
    for (what, cert) in [
        ("no certificate", None),
        ("another CA's", Some(&untrusted)),
        ("an expired", Some(&expired)),
    ] {
        let error = refused(&sandbox, &node.url, Some(client(&ca.cert, cert))).await;
        assert!(
            error.contains("certificate"),
            "{what}: the error should say the certificate was refused: {error}"
        );
    }
    // An agent that does not trust the node's CA refuses the node, saying why.
    let error = refused(&sandbox, &node.url, Some(client(&other.cert, Some(&good)))).await;
    assert!(
        error.contains("UnknownIssuer") && error.contains("--ca"),
        "{error}"
    );
    // Plaintext against a TLS node is an error that says so.
    let plain = node.url.replace("https://", "http://");
    let error = refused(&sandbox, &plain, None).await;
    assert!(error.contains("https://"), "{error}");

    // The node kept serving the good client throughout.
    prefetch_intact(
        &sandbox,
        &node.url,
        Some(client(&ca.cert, Some(&good))),
        &files,
    )
    .await;

    // The CLI: global --ca, --cert and --key; without --cert it fails and says why.
    let out_dir = sandbox.dir();
    let mut cmd = agent_command(&node.url, &out_dir);
    cmd.arg("--ca").arg(&ca.cert).arg("--cert").arg(&good.cert);
    cmd.arg("--key").arg(&good.key).args(["get", "m"]);
    let path = run_ok(&mut cmd);
    assert_same_files(Path::new(path.trim()), &files);
    let out = agent_command(&node.url, &sandbox.dir())
        .arg("--ca")
        .arg(&ca.cert)
        .args(["get", "m"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--cert"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_server_certificate_and_https_to_plaintext_are_errors_that_say_so() {
    let files: ModelFiles = vec![("model.bin".into(), data(2, MIB))];
    let sandbox = Sandbox::with_model("m", &files).await;
    let dir = sandbox.dir();
    let ca = Ca::new(&dir, "cluster");
    let stale = ca.issue(&dir, "node-expired", NAMES, Validity::Expired);
    let mut config = sandbox.node_config();
    tls_config(&mut config, &stale, None);
    let expired_node = TestNode::start(config).await;
    let error = refused(&sandbox, &expired_node.url, Some(client(&ca.cert, None))).await;
    assert!(error.contains("expired"), "{error}");

    // TLS without client certificates: any client trusting the CA gets in.
    let fresh = ca.issue(&dir, "node", NAMES, Validity::Current);
    let mut config = sandbox.node_config();
    tls_config(&mut config, &fresh, None);
    let node = TestNode::start(config).await;
    prefetch_intact(&sandbox, &node.url, Some(client(&ca.cert, None)), &files).await;

    // `https://` against a plaintext node: never a downgrade, and the error says so.
    let plain = sandbox.node().await;
    let https = plain.url.replace("http://", "https://");
    let error = refused(&sandbox, &https, Some(client(&ca.cert, None))).await;
    assert!(
        error.contains("TLS handshake") && error.contains("http://"),
        "{error}"
    );
    // The CLI exits 1 with the same message.
    let out = agent_command(&https, &sandbox.dir())
        .arg("--ca")
        .arg(&ca.cert)
        .args(["get", "m"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS handshake"), "{stderr}");
    // A --ca that is not a certificate is a usage error naming the file.
    let junk = dir.join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let out = agent_command(&node.url, &sandbox.dir())
        .arg("--ca")
        .arg(&junk)
        .args(["get", "m"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("junk.pem"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_and_the_client_ca_rotate_without_a_restart() {
    let files: ModelFiles = vec![("model.bin".into(), data(3, MIB + 3))];
    let sandbox = Sandbox::with_model("m", &files).await;
    let dir = sandbox.dir();
    let old_ca = Ca::new(&dir, "old");
    let new_ca = Ca::new(&dir, "new");
    // The files the node reads: the old CA's certificate and key, and the old CA.
    let served = old_ca.issue(&dir, "served", NAMES, Validity::Current);
    let client_ca = dir.join("client-ca.pem");
    pki::write_atomically(&client_ca, &std::fs::read(&old_ca.cert).unwrap());
    let old_agent = old_ca.issue(&dir, "agent-old", &["agent"], Validity::Current);
    let new_agent = new_ca.issue(&dir, "agent-new", &["agent"], Validity::Current);
    let mut config = sandbox.node_config();
    tls_config(&mut config, &served, Some(&client_ca));
    let node = TestNode::start(config).await;
    let old = || Some(client(&old_ca.cert, Some(&old_agent)));
    let new = || Some(client(&new_ca.cert, Some(&new_agent)));
    prefetch_intact(&sandbox, &node.url, old(), &files).await;

    // A certificate file that no longer loads is reported; the node goes on with what it
    // loaded before.
    pki::write_atomically(&served.cert, b"-----BEGIN CERTIFICATE-----\ngarbage\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    prefetch_intact(&sandbox, &node.url, old(), &files).await;

    // Rotation to the new CA: its certificate and key, and the new client CA.
    let renewed = new_ca.issue(&dir, "renewed", NAMES, Validity::Current);
    pki::rotate(&renewed, &served);
    pki::write_atomically(&client_ca, &std::fs::read(&new_ca.cert).unwrap());
    let mut rotated = false;
    for _ in 0..40 {
        if prefetch(&sandbox, &node.url, new()).await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        rotated,
        "the node did not take up the new certificates within 10 s"
    );
    prefetch_intact(&sandbox, &node.url, new(), &files).await;
    // The old CA and its clients are out.
    let error = refused(&sandbox, &node.url, old()).await;
    assert!(error.contains("UnknownIssuer"), "{error}");
    let error = refused(
        &sandbox,
        &node.url,
        Some(client(&new_ca.cert, Some(&old_agent))),
    )
    .await;
    assert!(error.contains("certificate"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_call_each_other_over_mutual_tls_and_an_untrusted_node_is_kept_out() {
    let size = 5 * MIB + 7;
    let files: ModelFiles = vec![("model.bin".into(), data(4, size))];
    let sandbox = Sandbox::with_model("m", &files).await;
    let dir = sandbox.dir();
    let ca = Ca::new(&dir, "cluster");
    let node_cert = ca.issue(&dir, "node", NAMES, Validity::Current);
    let agent_cert = ca.issue(&dir, "agent", &["agent"], Validity::Current);
    // Both nodes see each other healthy: health checks and `Members` over mutual TLS.
    let nodes = sandbox
        .cluster(2, |config| tls_config(config, &node_cert, Some(&ca.cert)))
        .await;
    let owner = modelcache_proto::rank::owner("m", ["node-0", "node-1"]).unwrap();
    let other = usize::from(owner == "node-0");
    let tls = || Some(client(&ca.cert, Some(&agent_cert)));
    // The non-owner fills from the owner over TLS: the origin is read once.
    let fetched = prefetch(&sandbox, &nodes[other].url, tls()).await.unwrap();
    assert_same_files(&fetched.path, &files);
    assert_eq!(
        nodes[other].stats().origin_bytes,
        0,
        "the non-owner read the origin"
    );
    let read = sandbox
        .s3
        .tap
        .get_bytes
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        read as f64 <= size as f64 * 1.05,
        "origin sent {read} bytes"
    );

    // A node whose certificate another CA signed cannot join: it sees the members down,
    // while the cluster goes on serving.
    let intruder_ca = Ca::new(&dir, "intruder");
    let intruder_cert = intruder_ca.issue(&dir, "intruder", NAMES, Validity::Current);
    let mut config = sandbox.node_config();
    config.peers = vec![nodes[0].url.trim_start_matches("https://").to_owned()];
    config.node_id = Some("intruder".into());
    config.probe_interval = Duration::from_millis(200);
    tls_config(&mut config, &intruder_cert, Some(&ca.cert));
    let intruder = TestNode::start(config).await;
    let seen = wait_for(Duration::from_secs(10), || {
        intruder
            .cluster
            .members()
            .iter()
            .any(|m| !m.local && !m.healthy && !m.detail.contains("not probed"))
    })
    .await;
    let members = intruder.cluster.members();
    assert!(seen, "{members:?}");
    assert!(
        members.iter().filter(|m| !m.local).all(|m| !m.healthy),
        "{members:?}"
    );
    assert_eq!(nodes[0].cluster.members().len(), 2);
    let again = prefetch(&sandbox, &nodes[owner_index(owner)].url, tls())
        .await
        .unwrap();
    assert_same_files(&again.path, &files);
}

fn owner_index(id: &str) -> usize {
    usize::from(id == "node-1")
}

/// `cache-agent --node NODE --direct --dir DIR` with none of the agent's variables from
/// the test's environment.
fn agent_command(node: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(binary("cache-agent"));
    for var in cache_agent::cli::Cli::env_vars() {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUST_LOG")
        .args(["--node", node, "--direct", "--dir"])
        .arg(dir);
    cmd
}
