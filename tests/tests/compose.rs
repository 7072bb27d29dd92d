//! `docker-compose.yml`, checked without a Docker engine: its services, ports, build
//! contexts, and that every environment variable it sets is one the binaries read.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_yaml::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let mut doc: Value = serde_yaml::from_str(&text).unwrap();
    // `<<: *anchor` merges, as Compose applies them.
    doc.apply_merge().unwrap();
    doc
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["services"]
        .get(name)
        .unwrap_or_else(|| panic!("service {name} missing"))
}

fn env_keys(service: &Value) -> BTreeSet<String> {
    service["environment"]
        .as_mapping()
        .map(|m| m.keys().map(|k| k.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

#[test]
fn services_ports_and_images() {
    let doc = compose();
    let names: BTreeSet<_> = doc["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for expected in ["minio", "seed", "sample", "agent"].iter().chain(&NODES) {
        assert!(
            names.contains(expected),
            "{expected} missing from {names:?}"
        );
    }
    let minio = service(&doc, "minio");
    let image = minio["image"].as_str().unwrap();
    assert!(
        image.starts_with("quay.io/minio/minio:RELEASE."),
        "MinIO must be pinned: {image}"
    );
    let mc = service(&doc, "seed")["image"].as_str().unwrap();
    assert!(mc.starts_with("quay.io/minio/mc:RELEASE."), "{mc}");
    let ports: Vec<_> = minio["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(ports.contains(&"9000:9000"));
    assert_eq!(
        service(&doc, "node-a")["ports"][0].as_str(),
        Some("7070:7070")
    );
    // Three nodes peering by service name, each with its own id and address.
    for name in NODES {
        let env = &service(&doc, name)["environment"];
        assert_eq!(
            env["CACHE_NODE_PEERS"].as_str(),
            Some("node-a:7070,node-b:7070,node-c:7070")
        );
        assert_eq!(env["CACHE_NODE_NODE_ID"].as_str(), Some(name));
        assert_eq!(
            env["CACHE_NODE_ADVERTISE"].as_str(),
            Some(format!("{name}:7070").as_str())
        );
        assert_eq!(env["CACHE_NODE_ORIGIN"].as_str(), Some("s3://models"));
    }
    let agent = service(&doc, "agent");
    assert_eq!(
        agent["environment"]["CACHE_AGENT_NODE"].as_str(),
        Some("https://node-a:7070,https://node-b:7070,https://node-c:7070")
    );
    assert!(
        agent["command"][0]
            .as_str()
            .unwrap()
            .contains("prefetch resnet50:int8")
    );
    // The seed job uploads into the bucket the nodes read.
    let seed = service(&doc, "seed")["command"][0].as_str().unwrap();
    assert!(seed.contains("origin/models"), "{seed}");
}

#[test]
fn build_contexts_and_commands_exist() {
    let doc = compose();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(" AS runtime"),
        "Dockerfile has no runtime stage"
    );
    for name in ["sample", "agent"].iter().chain(&NODES) {
        let s = service(&doc, name);
        assert_eq!(s["build"]["context"].as_str(), Some("."), "{name}");
        assert_eq!(s["build"]["target"].as_str(), Some("runtime"), "{name}");
        assert!(
            root()
                .join(s["build"]["dockerfile"].as_str().unwrap())
                .exists()
        );
    }
    // Every binary the services run is one the Dockerfile builds and copies in, stripped,
    // for an unprivileged user, the node listening beyond loopback.
    for binary in [
        "cache-node",
        "cache-agent",
        "modelcache-sample",
        "modelcache-quantize",
    ] {
        assert!(dockerfile.contains(binary), "{binary} not in the image");
    }
    assert!(dockerfile.contains("--strip-all"));
    assert!(dockerfile.contains("USER modelcache"));
    assert!(dockerfile.contains("CACHE_NODE_LISTEN=0.0.0.0:7070"));
    assert!(dockerfile.contains("ARG BASE="));
    for name in NODES {
        assert_eq!(
            service(&doc, name)["command"][0].as_str(),
            Some("cache-node")
        );
    }
    assert_eq!(
        service(&doc, "sample")["command"][0].as_str(),
        Some("modelcache-sample")
    );
}

#[test]
fn every_environment_variable_is_read_by_its_binary() {
    let doc = compose();
    let node_vars: BTreeSet<String> = cache_node::Config::env_vars().into_iter().collect();
    for name in NODES {
        for var in env_keys(service(&doc, name)) {
            assert!(
                node_vars.contains(&var)
                    || modelcache_testkit::object_store_reads(&var)
                    || modelcache_telemetry::VARIABLES.contains(&var.as_str()),
                "cache-node does not read {var}"
            );
        }
    }
    let agent_vars: BTreeSet<String> = cache_agent::cli::Cli::env_vars().into_iter().collect();
    for var in env_keys(service(&doc, "agent")) {
        assert!(
            agent_vars.contains(&var) || modelcache_telemetry::VARIABLES.contains(&var.as_str()),
            "cache-agent does not read {var}"
        );
    }
    // Every call presents a token: the nodes check the demo grants and present the peer
    // token, the agent its own.
    for name in NODES {
        let env = &service(&doc, name)["environment"];
        assert_eq!(
            env["CACHE_NODE_AUTH_TOKENS_FILE"].as_str(),
            Some("/etc/modelcache/tokens/tokens")
        );
        assert_eq!(
            env["CACHE_NODE_PEER_TOKEN_FILE"].as_str(),
            Some("/etc/modelcache/tokens/peer-token")
        );
    }
    assert_eq!(
        service(&doc, "agent")["environment"]["CACHE_AGENT_TOKEN_FILE"].as_str(),
        Some("/etc/modelcache/tokens/agent-token")
    );
    // Every link is mutual TLS: the nodes serve and call each other with the demo
    // certificates, and the agent calls them over https:// with its own.
    for name in NODES {
        let env = &service(&doc, name)["environment"];
        for (var, file) in [
            ("CACHE_NODE_TLS_CERT", "node.pem"),
            ("CACHE_NODE_TLS_KEY", "node-key.pem"),
            ("CACHE_NODE_TLS_CLIENT_CA", "ca.pem"),
        ] {
            assert_eq!(
                env[var].as_str(),
                Some(format!("/etc/modelcache/tls/{file}").as_str())
            );
            assert!(
                root().join("deploy/compose/tls").join(file).is_file(),
                "{file}"
            );
        }
    }
    let agent_env = &service(&doc, "agent")["environment"];
    let nodes = agent_env["CACHE_AGENT_NODE"].as_str().unwrap();
    assert!(
        nodes.split(',').all(|n| n.starts_with("https://")),
        "{nodes}"
    );
    for var in ["CACHE_AGENT_CA", "CACHE_AGENT_CERT", "CACHE_AGENT_KEY"] {
        assert!(agent_env[var].as_str().is_some(), "{var}");
    }
    // Jaeger gets every node's spans and Prometheus scrapes every node.
    for name in NODES {
        let env = &service(&doc, name)["environment"];
        assert_eq!(
            env["OTEL_EXPORTER_OTLP_ENDPOINT"].as_str(),
            Some("http://jaeger:4317")
        );
        assert_eq!(
            env["CACHE_NODE_METRICS_LISTEN"].as_str(),
            Some("0.0.0.0:9090")
        );
    }
    let scrape = std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    for name in NODES {
        assert!(scrape.contains(&format!("{name}:9090")), "{scrape}");
    }
    assert!(service(&doc, "jaeger")["image"].as_str().is_some());
    // And the check itself can fail.
    assert!(
        !node_vars.contains("CACHE_NODE_ORIGN")
            && !modelcache_testkit::object_store_reads("AWS_ENDPOINT_URLL")
    );
}

/// `docker compose` (v2) or `docker-compose` (v1, what Debian ships), whichever runs here.
fn compose_command() -> Vec<&'static str> {
    let v2 = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if v2 {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

fn run(args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(args[0])
        .args(&args[1..])
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    eprintln!(
        "$ {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Stops and removes the test's project (containers, network, volumes) when dropped.
struct Project(Vec<&'static str>);

impl Drop for Project {
    fn drop(&mut self) {
        let mut args = self.0.clone();
        args.extend(["down", "-v", "--remove-orphans"]);
        run(&args);
    }
}

#[test]
fn the_compose_cluster_comes_up_and_the_agent_prefetches_the_int8_sample() {
    // The debug builds the suite has made already (a release build costs CI ten minutes).
    let built = run(&["env", "MODELCACHE_IMAGE_PROFILE=debug", "scripts/images"]);
    assert!(built.status.success(), "scripts/images failed");
    let mut compose = compose_command();
    compose.extend([
        "-p",
        "modelcache-test",
        "-f",
        "docker-compose.yml",
        "-f",
        "docker-compose.local.yml",
    ]);
    let project = Project(compose.clone());
    let mut up = compose.clone();
    // Jaeger and Prometheus are for users (their images are pulled); the cluster alone here.
    up.extend(["up", "-d", "--no-build"]);
    up.extend(["minio", "sample", "seed", "agent"]);
    up.extend(NODES);
    assert!(run(&up).status.success(), "compose up failed");
    // The agent's container ends once it has prefetched and listed.
    let mut ps = compose.clone();
    ps.extend(["ps", "-q", "agent"]);
    let container = String::from_utf8(run(&ps).stdout)
        .unwrap()
        .trim()
        .to_owned();
    assert!(!container.is_empty(), "no agent container");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let code = loop {
        let state = run(&[
            "docker",
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            &container,
        ]);
        let state = String::from_utf8(state.stdout).unwrap();
        if let Some(code) = state.trim().strip_prefix("exited ") {
            break code.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never ended: {state}"
        );
        std::thread::sleep(std::time::Duration::from_secs(2));
    };
    let mut logs = compose.clone();
    logs.extend(["logs", "--no-color", "agent", "node-a", "node-b", "node-c"]);
    let logs = String::from_utf8(run(&logs).stdout).unwrap();
    let agent: Vec<&str> = logs
        .lines()
        .filter(|l| l.starts_with("agent"))
        .map(|l| l.split_once("| ").map_or(l, |(_, rest)| rest))
        .collect();
    // Shown only when the test fails: every service's log, then the agent's lines.
    println!("{logs}\nagent output:\n{}", agent.join("\n"));
    assert_eq!(code, "0", "{logs}");
    assert!(
        agent.contains(&"/models/resnet50/@int8"),
        "{}",
        agent.join("\n")
    );
    // The members in resnet50's rank order, all healthy, the owner first.
    let order = modelcache_proto::rank::rank("resnet50", NODES);
    let members: Vec<&&str> = agent.iter().filter(|l| l.contains(":7070\t")).collect();
    assert_eq!(members.len(), 3, "{agent:?}");
    for (line, id) in members.iter().zip(&order) {
        assert_eq!(**line, format!("{id}:7070\t{id}\thealthy"));
    }
    assert!(
        agent.iter().any(|l| l.starts_with("resnet50:int8\t")),
        "{agent:?}"
    );
    // The nodes let calls in by their tokens: the agent's, and each other's.
    for client in ["client=agents", "client=peers"] {
        assert!(
            logs.lines()
                .any(|l| l.contains("cache_node::access") && l.contains(client)),
            "no access-log line with {client}"
        );
    }
    // Built once in the cluster: by the owner.
    let built: Vec<&str> = logs
        .lines()
        // The event's own fields (the line's prefix names the spans it ran in).
        .filter(|l| l.contains("variant built model=resnet50 variant=int8 "))
        .collect();
    assert_eq!(built.len(), 1, "{built:?}");
    assert!(built[0].starts_with(order[0]), "{built:?}");
    drop(project);
}
