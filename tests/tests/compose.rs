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
    serde_yaml::from_str(&text).unwrap()
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

/// Variables the node's S3 client (object_store) reads from the environment.
fn read_by_object_store(var: &str) -> bool {
    var.starts_with("AWS_")
        && var
            .to_ascii_lowercase()
            .parse::<object_store::aws::AmazonS3ConfigKey>()
            .is_ok()
}

#[test]
fn services_ports_and_images() {
    let doc = compose();
    let names: BTreeSet<_> = doc["services"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for expected in ["minio", "seed", "sample", "cache-node", "agent"] {
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
    let node = service(&doc, "cache-node");
    assert_eq!(node["ports"][0].as_str(), Some("7070:7070"));
    assert_eq!(
        node["environment"]["CACHE_NODE_LISTEN"].as_str(),
        Some("0.0.0.0:7070")
    );
    assert_eq!(
        service(&doc, "agent")["environment"]["CACHE_AGENT_NODE"].as_str(),
        Some("http://cache-node:7070")
    );
    // The seed job uploads into the bucket the node reads.
    let seed = service(&doc, "seed")["command"][0].as_str().unwrap();
    assert!(seed.contains("origin/models"), "{seed}");
    assert_eq!(
        node["environment"]["CACHE_NODE_ORIGIN"].as_str(),
        Some("s3://models")
    );
}

#[test]
fn build_contexts_and_commands_exist() {
    let doc = compose();
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(" AS runtime"),
        "Dockerfile has no runtime stage"
    );
    for name in ["sample", "cache-node", "agent"] {
        let s = service(&doc, name);
        assert_eq!(s["build"]["context"].as_str(), Some("."), "{name}");
        assert_eq!(s["build"]["target"].as_str(), Some("runtime"), "{name}");
        assert!(
            root()
                .join(s["build"]["dockerfile"].as_str().unwrap())
                .exists()
        );
    }
    // Every binary the services run is one the Dockerfile copies in.
    for binary in ["cache-node", "cache-agent", "modelcache-sample"] {
        assert!(
            dockerfile.contains(&format!("/release/{binary}")),
            "{binary} not in the image"
        );
    }
    assert_eq!(
        service(&doc, "cache-node")["command"][0].as_str(),
        Some("cache-node")
    );
    assert_eq!(
        service(&doc, "sample")["command"][0].as_str(),
        Some("modelcache-sample")
    );
}

#[test]
fn every_environment_variable_is_read_by_its_binary() {
    let doc = compose();
    let node_vars: BTreeSet<String> = cache_node::Config::env_vars().into_iter().collect();
    for var in env_keys(service(&doc, "cache-node")) {
        assert!(
            node_vars.contains(&var) || read_by_object_store(&var),
            "cache-node does not read {var}"
        );
    }
    let agent_vars: BTreeSet<String> = cache_agent::cli::Cli::env_vars().into_iter().collect();
    for var in env_keys(service(&doc, "agent")) {
        assert!(agent_vars.contains(&var), "cache-agent does not read {var}");
    }
    // And the check itself can fail.
    assert!(!node_vars.contains("CACHE_NODE_ORIGN") && !read_by_object_store("AWS_ENDPOINT_URLL"));
}

#[test]
#[ignore = "needs a Docker engine"]
fn compose_up_prefetches_the_sample() {
    let out = std::process::Command::new("docker")
        .args([
            "compose",
            "up",
            "--build",
            "--abort-on-container-exit",
            "--exit-code-from",
            "agent",
        ])
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::process::Command::new("docker")
        .args(["compose", "down", "-v"])
        .current_dir(root())
        .status();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("/models/resnet50/@original"), "{text}");
}
