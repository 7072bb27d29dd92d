//! Scraping a `--metrics-listen` endpoint over HTTP and reading it with the Prometheus
//! project's own OpenMetrics parser (`tests/py/metrics.py`).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use crate::{python, workspace};

/// `GET path` on `addr`: the status code and the body.
pub fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// The samples of `/metrics`, as the Prometheus parser reads them.
pub fn scrape(addr: std::net::SocketAddr) -> (BTreeMap<String, f64>, serde_json::Value) {
    let (status, text) = get(addr, "/metrics");
    assert_eq!(status, 200, "{text}");
    let mut child = std::process::Command::new(python())
        .arg(workspace().join("tests/py/metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the parser refused:\n{text}");
    let mut parsed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).unwrap();
    let families = parsed.remove("#families").unwrap();
    let samples = parsed
        .into_iter()
        .map(|(k, v)| (k, v.as_f64().unwrap()))
        .collect();
    (samples, families)
}

/// Asserts that `docs/operations.md` lists every family of `families` (as `scrape` gives
/// them): counters with `_total`, the others by their name (with or without labels).
pub fn assert_documented(families: &serde_json::Value) {
    let doc = std::fs::read_to_string(workspace().join("docs/operations.md")).unwrap();
    for (name, kind) in families.as_object().unwrap() {
        let shown = if kind == "counter" {
            doc.contains(&format!("`{name}_total"))
        } else {
            doc.contains(&format!("`{name}`")) || doc.contains(&format!("`{name}{{"))
        };
        assert!(shown, "docs/operations.md does not list {name} ({kind})");
    }
}
