//! `deploy/kubernetes/`: the manifests parse, and every variable and flag they give the
//! binaries is one the binaries read (a typo would be silently ignored by Kubernetes).

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Deserialize;
use serde_yaml::Value;

fn documents() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            docs.push((path.display().to_string(), value));
        }
    }
    docs
}

#[test]
fn every_variable_and_flag_the_manifests_set_is_read() {
    let node_vars: BTreeSet<String> = cache_node::Config::env_vars().into_iter().collect();
    let agent_vars: BTreeSet<String> = cache_agent::cli::Cli::env_vars().into_iter().collect();
    let mut agents = 0;
    let docs = documents();
    let kinds: Vec<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"StatefulSet")
            && kinds.contains(&"DaemonSet")
            && kinds.iter().filter(|k| **k == "Service").count() >= 2
    );
    let mut checked = 0;
    for (file, doc) in &docs {
        let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_sequence() else {
            continue;
        };
        for c in containers {
            let args: Vec<&str> = c["args"]
                .as_sequence()
                .map(|a| a.iter().map(|v| v.as_str().unwrap()).collect())
                .unwrap_or_default();
            if args.first() == Some(&"cache-agent") {
                // The agent's flags as its own parser reads them.
                use clap::Parser;
                cache_agent::cli::Cli::try_parse_from(&args)
                    .unwrap_or_else(|e| panic!("{file}: {args:?}: {e}"));
                for env in c["env"].as_sequence().unwrap() {
                    let name = env["name"].as_str().unwrap();
                    assert!(
                        agent_vars.contains(name),
                        "{file}: cache-agent does not read {name}"
                    );
                    agents += 1;
                }
                continue;
            }
            assert_eq!(args.first(), Some(&"cache-node"), "{file}");
            for arg in &args[1..] {
                let flag = arg.trim_start_matches("--").split('=').next().unwrap();
                let var = format!("CACHE_NODE_{}", flag.replace('-', "_").to_uppercase());
                assert!(
                    node_vars.contains(&var),
                    "{file}: cache-node has no --{flag}"
                );
            }
            for env in c["env"].as_sequence().unwrap() {
                let name = env["name"].as_str().unwrap();
                if name.starts_with("POD_") {
                    continue; // from the downward API, for the values below
                }
                assert!(
                    node_vars.contains(name) || modelcache_testkit::object_store_reads(name),
                    "{file}: cache-node does not read {name}"
                );
                checked += 1;
            }
            // Peers through the headless service, which lists pods before they are ready.
            let peers = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "CACHE_NODE_PEERS")
                .unwrap();
            let service = peers["value"].as_str().unwrap().split(':').next().unwrap();
            let headless = docs
                .iter()
                .find(|(_, d)| d["kind"] == "Service" && d["metadata"]["name"] == service)
                .map(|(_, d)| d)
                .unwrap_or_else(|| panic!("no Service {service}"));
            assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
            assert_eq!(
                headless["spec"]["publishNotReadyAddresses"].as_bool(),
                Some(true)
            );
            // Probes over the plain-HTTP metrics port (the gRPC port may require client
            // certificates): a named port the node listens on.
            let metrics_port = c["ports"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|p| p["name"] == "metrics")
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{file}: cache-node has no metrics port"));
            let metrics_listen = c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"] == "CACHE_NODE_METRICS_LISTEN")
                .and_then(|e| e["value"].as_str())
                .unwrap_or_else(|| panic!("{file}: cache-node serves no metrics"));
            assert!(
                metrics_listen.ends_with(&format!(":{metrics_port}")),
                "{file}: metrics port {metrics_port}, node listens on {metrics_listen}"
            );
            for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
                let get = &c[probe]["httpGet"];
                assert_eq!(get["port"].as_str(), Some("metrics"), "{file}: {probe}");
                assert_eq!(get["path"].as_str(), Some(path), "{file}: {probe}");
            }
        }
    }
    assert!(checked >= 8, "only {checked} variables checked");
    assert!(agents >= 5, "only {agents} agent variables checked");
    assert!(!node_vars.contains("CACHE_NODE_PEER"));
}
