//! Bearer tokens (`--auth-tokens-file`): only a granted token gets in, every RPC the
//! hand-framed `Fetch` included, health checks excepted; a token's scope limits its
//! actions and models; a token removed from the file is refused while the node runs;
//! peers present their own token, and a peer without one is refused while the node keeps
//! serving everyone else.

use std::process::Command;
use std::time::Duration;

use cache_agent::{AgentError, Progress};
use modelcache_proto::Reference;
use modelcache_testkit::metrics;
use modelcache_testkit::*;
use tonic::Code;

const MIB: usize = 1024 * 1024;
const OPS: &str = "ops-token-0123456789abcdef";
const TEAM: &str = "team-a-token-0123456789abc";
const PEER: &str = "peer-token-0123456789abcde";

fn tokens_file(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

/// A prefetch into a new directory (kept until the sandbox is dropped).
async fn prefetch(
    sandbox: &Sandbox,
    node: &TestNode,
    token: Option<&str>,
    reference: &str,
) -> Result<cache_agent::Fetched, AgentError> {
    let mut agent = node.agent(&sandbox.dir());
    if let Some(token) = token {
        agent = agent.with_token(token).unwrap();
    }
    agent
        .prefetch(&Reference::parse(reference).unwrap(), &Progress::hidden())
        .await
}

fn denied(result: Result<cache_agent::Fetched, AgentError>, code: Code, says: &str) {
    match result {
        Err(AgentError::Denied { code: got, message }) => {
            assert_eq!(got, code, "{message}");
            assert!(message.contains(says), "{message}");
        }
        other => panic!("expected {code:?}: {other:?}"),
    }
}

/// `cache-agent --node NODE --direct --dir DIR` with none of the agent's variables from
/// the test's environment.
fn agent_command(node: &str, dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(binary("cache-agent"));
    cmd.env_remove("CACHE_AGENT_NODE")
        .env_remove("CACHE_AGENT_TOKEN")
        .env_remove("CACHE_AGENT_TOKEN_FILE")
        .env_remove("RUST_LOG")
        .args(["--node", node, "--direct", "--dir"])
        .arg(dir);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_granted_tokens_get_in_within_their_scope_and_a_rewrite_revokes() {
    let bert: ModelFiles = vec![("model.bin".into(), data(1, 3 * MIB + 1))];
    let gpt: ModelFiles = vec![("model.bin".into(), data(2, MIB + 2))];
    let sandbox = Sandbox::with_model("org-a/bert", &bert).await;
    sandbox.seed("org-b/gpt", &gpt).await;
    let dir = sandbox.dir();
    let tokens = tokens_file(
        &dir,
        &format!("# operators\nops:{OPS}\nteam-a:{TEAM}:fetch:org-a/\n"),
    );
    let mut config = sandbox.node_config();
    config.auth_tokens_file = Some(tokens.clone());
    let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.metrics_listen = Some(metrics_addr);
    let node = TestNode::start(config).await;

    // Health checks need no token.
    let health = health_check(&node.url).await;
    assert!(health.is_ok(), "{health:?}");

    // No token, or one no grant holds: UNAUTHENTICATED, saying which.
    denied(
        prefetch(&sandbox, &node, None, "org-a/bert").await,
        Code::Unauthenticated,
        "no bearer token",
    );
    denied(
        prefetch(
            &sandbox,
            &node,
            Some("not-a-granted-token-0123"),
            "org-a/bert",
        )
        .await,
        Code::Unauthenticated,
        "not valid",
    );
    // The operators' token reaches everything; the team's only its prefix, and only to
    // fetch.
    let fetched = prefetch(&sandbox, &node, Some(OPS), "org-b/gpt")
        .await
        .unwrap();
    assert_same_files(&fetched.path, &gpt);
    let fetched = prefetch(&sandbox, &node, Some(TEAM), "org-a/bert")
        .await
        .unwrap();
    assert_same_files(&fetched.path, &bert);
    denied(
        prefetch(&sandbox, &node, Some(TEAM), "org-b/gpt").await,
        Code::PermissionDenied,
        "token \"team-a\" may not reach model \"org-b/gpt\" (it is granted models under: org-a/)",
    );
    let pin = admin_with(&node.url, TEAM, &["pin", "org-a/bert"]);
    assert_eq!(pin.status.code(), Some(1));
    let text = String::from_utf8_lossy(&pin.stderr);
    assert!(text.contains("token \"team-a\" may not admin"), "{text}");
    // `models` shows a scoped token only its models.
    let listed = run_ok(
        agent_command(&node.url, &sandbox.dir())
            .env("CACHE_AGENT_TOKEN", TEAM)
            .arg("models"),
    );
    assert!(
        listed.contains("org-a/bert") && !listed.contains("org-b/gpt"),
        "{listed}"
    );

    // The CLI: a token file works; none is an error saying so; a token file without a
    // token is a usage error.
    let token_file = dir.join("ops-token");
    std::fs::write(&token_file, format!("{OPS}\n")).unwrap();
    let path = run_ok(
        agent_command(&node.url, &sandbox.dir())
            .arg("--token-file")
            .arg(&token_file)
            .args(["prefetch", "org-a/bert"]),
    );
    assert_same_files(std::path::Path::new(path.trim()), &bert);
    let out = agent_command(&node.url, &sandbox.dir())
        .args(["prefetch", "org-a/bert"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no bearer token"));
    std::fs::write(&token_file, "\n").unwrap();
    let out = agent_command(&node.url, &sandbox.dir())
        .arg("--token-file")
        .arg(&token_file)
        .args(["prefetch", "org-a/bert"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must hold one token"));
    // `https://` against this plaintext node: tests/tls.rs.

    // Each call is counted under the name of the token that let it in.
    let (samples, _) = metrics::scrape(metrics_addr);
    let count = |client: &str, code: &str| {
        samples
            .get(&format!(
                "modelcache_client_rpcs_total{{client=\"{client}\",code=\"{code}\"}}"
            ))
            .copied()
            .unwrap_or_default()
    };
    assert!(count("ops", "OK") >= 2.0, "{samples:?}");
    assert!(count("team-a", "PERMISSION_DENIED") >= 2.0, "{samples:?}");

    // The operators' token is removed from the file while the node runs: refused from
    // then on; the team's still works.
    tokens_file(&dir, &format!("team-a:{TEAM}:fetch:org-a/\n"));
    let mut revoked = false;
    for _ in 0..100 {
        if prefetch(&sandbox, &node, Some(OPS), "org-a/bert")
            .await
            .is_err()
        {
            revoked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(revoked, "a removed token was still let in after 10 s");
    denied(
        prefetch(&sandbox, &node, Some(OPS), "org-a/bert").await,
        Code::Unauthenticated,
        "not valid",
    );
    let fetched = prefetch(&sandbox, &node, Some(TEAM), "org-a/bert")
        .await
        .unwrap();
    assert_same_files(&fetched.path, &bert);
}

fn admin_with(node: &str, token: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    agent_command(node, dir.path())
        .env("CACHE_AGENT_TOKEN", token)
        .arg("admin")
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn peers_present_their_own_token_and_one_without_is_refused() {
    let files: ModelFiles = vec![("model.bin".into(), data(3, 5 * MIB + 3))];
    let sandbox = Sandbox::with_model("shared", &files).await;
    let dir = sandbox.dir();
    let tokens = tokens_file(&dir, &format!("ops:{OPS}\npeers:{PEER}\n"));
    let peer_token = dir.join("peer-token");
    std::fs::write(&peer_token, PEER).unwrap();

    // Two nodes that present the peer token to each other: a non-owner fills from the
    // owner, so the origin is read once.
    let nodes = sandbox
        .cluster(2, |c| {
            c.precompute = Default::default();
            c.auth_tokens_file = Some(tokens.clone());
            c.peer_token_file = Some(peer_token.clone());
        })
        .await;
    let ranked = modelcache_proto::rank::rank("shared", ["node-0", "node-1"]);
    let (owner, other) = if ranked[0] == "node-0" {
        (&nodes[0], &nodes[1])
    } else {
        (&nodes[1], &nodes[0])
    };
    let fetched = prefetch(&sandbox, other, Some(OPS), "shared")
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
    assert_eq!(other.stats().origin_bytes, 0);
    assert_eq!(owner.stats().origin_bytes, (5 * MIB + 3) as u64);
    assert!(other.stats().peer_fill_bytes >= (5 * MIB) as u64);
    // Admin calls forwarded to the other member present the caller's token.
    let out = admin_with(&other.url, OPS, &["pins", "--cluster"]);
    assert!(out.status.success(), "{out:?}");

    // A node that presents no peer token: the member that requires one refuses it, so it
    // counts that member as down (saying why) and reads the origin itself.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = sandbox.node_config();
    config.precompute = Default::default();
    config.peers = vec![
        owner.url.trim_start_matches("http://").to_owned(),
        listener.local_addr().unwrap().to_string(),
    ];
    config.node_id = Some("no-token".into());
    config.probe_interval = Duration::from_millis(200);
    let lone = TestNode::start_on(cache_node::Node::open(&config).await.unwrap(), listener).await;
    let mut refused = String::new();
    for _ in 0..100 {
        let members = lone.members().await.unwrap().members;
        if let Some(m) = members.iter().find(|m| m.detail.contains("bearer")) {
            refused = m.detail.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused.contains("no bearer token"), "{refused:?}");
    let fetched = prefetch(&sandbox, &lone, None, "shared").await.unwrap();
    assert_same_files(&fetched.path, &files);
    assert_eq!(lone.stats().origin_bytes, (5 * MIB + 3) as u64);
    // The cluster goes on serving its own callers.
    let fetched = prefetch(&sandbox, owner, Some(OPS), "shared")
        .await
        .unwrap();
    assert_same_files(&fetched.path, &files);
}

/// Quotas per token name: a client with a stream open up to its limit is refused one
/// more with RESOURCE_EXHAUSTED while another client fetches; a client's bytes per
/// second are held to its bandwidth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_over_its_quota_is_refused_while_another_is_not() {
    use modelcache_proto::auth::{WithToken, bearer};
    use modelcache_proto::v1::FetchRequest;
    use modelcache_proto::v1::model_cache_client::ModelCacheClient;

    let files: ModelFiles = vec![("model.bin".into(), data(4, 8 * MIB))];
    let sandbox = Sandbox::with_model("big", &files).await;
    let dir = sandbox.dir();
    let tokens = tokens_file(&dir, &format!("a:{OPS}\nb:{TEAM}\n"));
    let mut config = sandbox.node_config();
    config.precompute = Default::default();
    config.auth_tokens_file = Some(tokens);
    config.client_max_streams = Some(1);
    config.client_max_bandwidth = Some(bytesize::ByteSize::mib(4));
    let node = TestNode::start(config).await;

    let client = |token: &str| {
        let url = node.url.clone();
        let token = bearer(token).unwrap();
        async move {
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            ModelCacheClient::new(WithToken {
                inner: channel,
                token: Some(token),
            })
        }
    };
    let request = || FetchRequest {
        reference: "big".into(),
        ..Default::default()
    };
    // Client a holds one stream open (its first message read, the rest left waiting).
    let mut held = client(OPS)
        .await
        .fetch(request())
        .await
        .unwrap()
        .into_inner();
    assert!(held.message().await.unwrap().is_some());
    let refused = client(OPS).await.fetch(request()).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--client-max-streams 1"),
        "{refused:?}"
    );
    // Client b is not affected.
    let fetched = prefetch(&sandbox, &node, Some(TEAM), "big").await.unwrap();
    assert_same_files(&fetched.path, &files);
    drop(held);

    // Once a's stream has ended, a fetches again, no faster than 4 MiB/s: 8 MiB cannot
    // take less than 1.5 s (all but the first 2 MiB chunk paced).
    let mut again = None;
    for _ in 0..50 {
        let started = std::time::Instant::now();
        match prefetch(&sandbox, &node, Some(OPS), "big").await {
            Ok(fetched) => {
                again = Some((fetched, started.elapsed()));
                break;
            }
            // The held stream's end reaches the node a moment after it is dropped.
            Err(AgentError::Node {
                code: Code::ResourceExhausted,
                ..
            }) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    let (fetched, took) = again.expect("client a was refused for 5 s after its stream ended");
    assert_same_files(&fetched.path, &files);
    assert!(took >= Duration::from_millis(1500), "{took:?}");
}
