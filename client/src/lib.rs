//! modelcache agent: the library inference workers embed, and the `cache-agent` CLI.
//!
//! How a prefetch flows: the agent resolves the reference on a node (`Resolve`), and if the
//! local copy is not already at that revision it streams the model (`Fetch`), checks every
//! chunk's BLAKE3 on all cores while bytes arrive, writes verified chunks into a partial
//! directory (recording progress so an interrupted run resumes), and publishes the complete
//! revision by swapping a symlink: `DIR/NAME/@VARIANT` (see `layout`).

pub mod cli;
pub mod error;
pub mod layout;
pub mod node;
pub mod progress;
pub mod transfer;
pub mod verify;

use std::path::PathBuf;

use modelcache_proto::Reference;
use modelcache_proto::v1::{self, ListRequest};

pub use error::{AgentError, Result};
pub use layout::{Layout, LocalManifest, LocalModel};
pub use progress::Progress;
pub use transfer::Fetched;

use crate::node::NodeClient;

/// File name endings of weight files, for `get --weights`.
pub const WEIGHT_EXTENSIONS: &[&str] = &[
    "onnx",
    "safetensors",
    "gguf",
    "bin",
    "pt",
    "pth",
    "ckpt",
    "h5",
    "tflite",
    "msgpack",
];

/// How many times `prefetch` starts over when the model changes during a transfer, or a
/// node stalls in the middle of one.
pub const MAX_ATTEMPTS: u32 = 3;

/// How long a node may send nothing in the middle of a stream before the agent gives up on
/// that attempt (a variant build or a slow origin read happens before the first chunk of
/// a file arrives, so this is generous).
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What `verify` found for one local model.
#[derive(Clone, Debug)]
pub struct VerifyReport {
    pub reference: Reference,
    pub revision: String,
    pub files: usize,
    pub problems: Vec<verify::Problem>,
    /// Files whose SHA-256 was re-checked (with `--sha256`).
    pub sha256_checked: usize,
    /// Files whose SHA-256 neither the local manifest nor the node knows yet.
    pub sha256_unknown: Vec<String>,
}

pub struct Agent {
    nodes: Vec<String>,
    layout: Layout,
    /// The connected node's client and its index in `nodes`.
    client: tokio::sync::Mutex<Option<(NodeClient, usize)>>,
    idle_timeout: std::time::Duration,
}

impl Agent {
    /// An agent talking to `nodes` (tried in order) and keeping models under `dir`.
    pub fn new(nodes: Vec<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            nodes,
            layout: Layout::new(dir),
            client: tokio::sync::Mutex::new(None),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }

    /// How long a node may send nothing mid-stream before the attempt ends and the next
    /// node (or the same, when there is one) is tried; `DEFAULT_IDLE_TIMEOUT` otherwise.
    pub fn with_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.idle_timeout = idle;
        self
    }

    /// The platform cache dir, e.g. `~/.cache/modelcache`.
    pub fn default_dir() -> PathBuf {
        dirs::cache_dir()
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("modelcache")
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    async fn client(&self) -> Result<NodeClient> {
        self.connection().await.map(|(client, _)| client)
    }

    /// The connected node's client and its index in `nodes`, connecting if needed.
    async fn connection(&self) -> Result<(NodeClient, usize)> {
        let mut slot = self.client.lock().await;
        if let Some(connected) = slot.as_ref() {
            return Ok(connected.clone());
        }
        let connected = node::connect_from(&self.nodes, 0).await?;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Leaves node `stalled` for the next one in the list (the same when it is the only
    /// one).
    async fn move_on_from(&self, stalled: usize) -> Result<(NodeClient, usize)> {
        let mut slot = self.client.lock().await;
        let connected = node::connect_from(&self.nodes, stalled + 1).await?;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Fetches one model variant into its local directory, verified; returns where it is.
    /// A model that changes in the origin during the transfer (`ABORTED`) is fetched again
    /// at its new revision, a few times at most.
    pub async fn prefetch(&self, reference: &Reference, progress: &Progress) -> Result<Fetched> {
        let (mut client, mut index) = self.connection().await?;
        let mut attempt = 1;
        loop {
            let conn = transfer::Connection {
                client: &mut client,
                node: &self.nodes[index],
                idle_timeout: self.idle_timeout,
            };
            match transfer::prefetch(conn, &self.layout, reference, progress).await {
                Ok(fetched) => {
                    self.layout.check_format(true)?;
                    return Ok(fetched);
                }
                Err(e @ AgentError::Aborted { .. }) if attempt < MAX_ATTEMPTS => {
                    tracing::info!(%reference, "{e}; fetching the new revision");
                }
                Err(e @ AgentError::Stalled { .. }) if attempt < MAX_ATTEMPTS => {
                    tracing::warn!(%reference, "{e}");
                    (client, index) = self.move_on_from(index).await?;
                }
                other => return other,
            }
            attempt += 1;
        }
    }

    /// Like `prefetch`; with `weights`, the path of the model's only weight file.
    pub async fn get(
        &self,
        reference: &Reference,
        weights: bool,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let fetched = self.prefetch(reference, progress).await?;
        if !weights {
            return Ok(fetched.path);
        }
        let manifest = self
            .layout
            .current(reference)
            .ok_or_else(|| AgentError::NotPresent {
                reference: reference.to_string(),
                dir: self.layout.root().display().to_string(),
            })?;
        let candidates: Vec<&str> = manifest
            .files
            .iter()
            .map(|f| f.path.as_str())
            .filter(|p| {
                p.rsplit_once('.').is_some_and(|(_, ext)| {
                    WEIGHT_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
                })
            })
            .collect();
        match candidates.as_slice() {
            [one] => Ok(fetched.path.join(one)),
            [] => Err(AgentError::WeightFile {
                reference: reference.to_string(),
                detail: "the model has no weight file".into(),
            }),
            many => Err(AgentError::WeightFile {
                reference: reference.to_string(),
                detail: format!(
                    "the model has {} weight files: {}",
                    many.len(),
                    many.join(", ")
                ),
            }),
        }
    }

    /// The node's manifest of a model variant.
    pub async fn stat(&self, reference: &Reference) -> Result<v1::Manifest> {
        let mut client = self.client().await?;
        node::resolve(&mut client, reference).await
    }

    /// What the cluster offers.
    pub async fn models(&self) -> Result<Vec<v1::ModelInfo>> {
        let mut client = self.client().await?;
        Ok(client.list(ListRequest {}).await?.into_inner().models)
    }

    /// Models present locally.
    pub fn ls(&self) -> Vec<LocalModel> {
        self.layout.list()
    }

    /// Removes a local model variant; false if it was not there.
    pub fn rm(&self, reference: &Reference) -> Result<bool> {
        self.layout.check_format(false)?;
        self.layout.remove(reference)
    }

    /// Re-checks local copies (one, or all) against their manifests.
    pub async fn verify(
        &self,
        reference: Option<&Reference>,
        sha256: bool,
    ) -> Result<Vec<VerifyReport>> {
        self.layout.check_format(false)?;
        let targets: Vec<Reference> = match reference {
            Some(r) => vec![r.clone()],
            None => self.ls().into_iter().map(|m| m.reference).collect(),
        };
        let mut reports = Vec::new();
        for r in targets {
            let mut manifest = self
                .layout
                .current(&r)
                .ok_or_else(|| AgentError::NotPresent {
                    reference: r.to_string(),
                    dir: self.layout.root().display().to_string(),
                })?;
            let dir = self.layout.revision_dir(&r, &manifest.revision);
            let checked = {
                let (dir, m) = (dir.clone(), manifest.clone());
                tokio::task::spawn_blocking(move || verify::check_chunks(&dir, &m))
                    .await
                    .map_err(|e| AgentError::io("verify", std::io::Error::other(e)))?
            };
            let mut report = VerifyReport {
                reference: r.clone(),
                revision: manifest.revision.clone(),
                files: manifest.files.len(),
                problems: checked,
                sha256_checked: 0,
                sha256_unknown: Vec::new(),
            };
            if sha256 {
                self.fill_sha256(&r, &mut manifest).await;
                for file in &manifest.files {
                    let Some(expected) = &file.sha256 else {
                        report.sha256_unknown.push(file.path.clone());
                        continue;
                    };
                    let path = dir.join(&file.path);
                    let actual = tokio::task::spawn_blocking(move || verify::sha256_file(&path))
                        .await
                        .map_err(|e| AgentError::io("verify", std::io::Error::other(e)))?;
                    report.sha256_checked += 1;
                    match actual {
                        Ok(actual) if &actual == expected => {}
                        Ok(actual) => report.problems.push(verify::Problem {
                            path: file.path.clone(),
                            detail: format!("SHA-256 is {actual}, expected {expected}"),
                        }),
                        Err(e) => report.problems.push(verify::Problem {
                            path: file.path.clone(),
                            detail: e.to_string(),
                        }),
                    }
                }
            }
            reports.push(report);
        }
        Ok(reports)
    }

    /// Asks the node for SHA-256 digests the local manifest lacks (same revision only).
    async fn fill_sha256(&self, reference: &Reference, manifest: &mut LocalManifest) {
        if manifest.files.iter().all(|f| f.sha256.is_some()) {
            return;
        }
        let Ok(remote) = self.stat(reference).await else {
            return;
        };
        if remote.revision != manifest.revision {
            return;
        }
        let mut changed = false;
        for file in manifest.files.iter_mut().filter(|f| f.sha256.is_none()) {
            if let Some(r) = remote
                .files
                .iter()
                .find(|r| r.path == file.path && !r.sha256.is_empty())
            {
                file.sha256 = Some(r.sha256.clone());
                changed = true;
            }
        }
        if changed {
            let _ = self.layout.write_manifest(reference, manifest);
        }
    }
}
