//! modelcache agent: the library inference workers embed, and the `cache-agent` CLI.
//!
//! How a prefetch flows: the agent resolves the reference on a node (`Resolve`), and if the
//! local copy is not already at that revision it streams the model (`Fetch`), checks every
//! chunk's BLAKE3 on all cores while bytes arrive, writes verified chunks into a partial
//! directory (recording progress so an interrupted run resumes), and publishes the complete
//! revision by swapping a symlink: `DIR/NAME/@VARIANT` (see `layout`).

pub mod cli;
pub mod daemon;
pub mod error;
pub mod layout;
pub mod node;
pub mod progress;
pub mod transfer;
pub mod verify;

use std::path::PathBuf;

use modelcache_proto::Reference;
use modelcache_proto::v1::{self, ListRequest};
use tracing::Instrument;

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
    /// Use `nodes` as given, without owner routing.
    direct: bool,
    /// Never ask a node: local copies only.
    offline: bool,
    /// Presented to the nodes: a token, when they require one, and TLS settings.
    credentials: node::Credentials,
}

/// A cluster member as a node reported it, with its place in a model's rank order.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub address: String,
    pub id: String,
    pub healthy: bool,
    /// Why it is unhealthy, when it is.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// 1 for the model's owner, 2 for the next, …; `None` for unhealthy members (and
    /// when no model was asked about).
    pub rank: Option<usize>,
}

impl Agent {
    /// An agent talking to `nodes` (tried in order) and keeping models under `dir`.
    pub fn new(nodes: Vec<String>, dir: impl Into<PathBuf>) -> Self {
        Self {
            nodes,
            layout: Layout::new(dir),
            client: tokio::sync::Mutex::new(None),
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            direct: false,
            offline: false,
            credentials: node::Credentials::default(),
        }
    }

    /// Presents `token` to the nodes (`--token-file`, `CACHE_AGENT_TOKEN`).
    pub fn with_token(mut self, token: &str) -> Result<Self> {
        let header = modelcache_proto::auth::bearer(token)
            .map_err(|message| AgentError::Config { message })?;
        self.credentials.token = Some(header);
        Ok(self)
    }

    /// Calls `https://` nodes with `tls` (`--ca`, `--cert`, `--key`).
    pub fn with_tls(mut self, tls: std::sync::Arc<modelcache_proto::tls::ClientTls>) -> Self {
        self.credentials.tls = Some(tls);
        self
    }

    /// What is presented to the nodes.
    pub fn credentials(&self) -> &node::Credentials {
        &self.credentials
    }

    /// With `offline`, `prefetch` and `get` return local copies (sizes checked) and never
    /// ask a node.
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// With `direct`, transfers go to the first node of the list as given (the others in
    /// order if it is down), without asking who owns the model.
    pub fn with_direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }

    /// The cluster's members as the first node that answers sees them; for `model`, the
    /// healthy ones in its rank order (owner first), then the others.
    pub async fn members(&self, model: Option<&str>) -> Result<Vec<Member>> {
        let mut client = self.client().await?;
        let response = client.members(v1::MembersRequest {}).await?.into_inner();
        let mut members: Vec<Member> = response
            .members
            .into_iter()
            .map(|m| Member {
                address: m.address,
                id: m.id,
                healthy: m.healthy,
                detail: m.detail,
                rank: None,
            })
            .collect();
        if let Some(model) = model {
            let healthy = members.iter().filter(|m| m.healthy).map(|m| m.id.as_str());
            let order: Vec<String> = modelcache_proto::rank::rank(model, healthy)
                .into_iter()
                .map(str::to_owned)
                .collect();
            for m in &mut members {
                m.rank = order.iter().position(|id| *id == m.id).map(|p| p + 1);
            }
            members.sort_by_key(|m| m.rank.unwrap_or(usize::MAX));
        }
        Ok(members)
    }

    /// The nodes to ask for `reference`, in order: its owner and the rest of its rank
    /// order (learned from any node), then the given nodes not among them; the given
    /// nodes alone with `--direct`, or when no node lists its members.
    async fn route(&self, reference: &Reference) -> Vec<String> {
        if self.direct {
            return self.nodes.clone();
        }
        let members = match self.members(Some(reference.name())).await {
            Ok(members) => members,
            Err(e) => {
                tracing::info!(%reference, "no member list ({e}); using the nodes as given");
                return self.nodes.clone();
            }
        };
        let mut route: Vec<String> = members
            .iter()
            .filter(|m| m.rank.is_some() && !m.address.is_empty())
            .map(|m| node::url_of(&m.address, &self.nodes))
            .collect();
        for n in &self.nodes {
            if !route.contains(n) {
                route.push(n.clone());
            }
        }
        tracing::debug!(%reference, ?route, "node order");
        route
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
        let connected = node::connect_from(&self.nodes, 0, &self.credentials).await?;
        *slot = Some(connected.clone());
        Ok(connected)
    }

    /// Fetches one model variant into its local directory, verified; returns where it is.
    /// A model that changes in the origin during the transfer (`ABORTED`) is fetched again
    /// at its new revision, a few times at most.
    ///
    /// The model's owner is asked first; when a node dies, is cut off or stalls in the
    /// middle, the transfer goes on from the bytes it reached on the next node in rank,
    /// in the same run.
    ///
    /// When no node answers (or with `--offline`), a complete local copy is returned as it
    /// is (sizes checked; `Fetched::offline` set): its revision could not be checked.
    pub async fn prefetch(&self, reference: &Reference, progress: &Progress) -> Result<Fetched> {
        // The root of the load's trace, unless the caller's span is (the daemon's Ensure).
        let span = tracing::info_span!(
            "prefetch",
            reference = %reference,
            revision = tracing::field::Empty,
            bytes = tracing::field::Empty,
            offline = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let fetched = self
            .prefetch_traced(reference, progress)
            .instrument(span.clone())
            .await;
        match &fetched {
            Ok(f) => {
                span.record("revision", f.revision.as_str());
                span.record("bytes", f.transferred);
                span.record("offline", f.offline);
                span.record("outcome", "ok")
            }
            Err(e) => span.record("outcome", tracing::field::display(e)),
        };
        fetched
    }

    async fn prefetch_traced(&self, reference: &Reference, progress: &Progress) -> Result<Fetched> {
        let fetched = if self.offline {
            self.local_copy(reference)
                .ok_or_else(|| AgentError::NotPresent {
                    reference: reference.to_string(),
                    dir: self.layout.root().display().to_string(),
                })
        } else {
            match self.prefetch_online(reference, progress).await {
                Err(e @ AgentError::Unreachable { .. }) => {
                    let local = self.local_copy(reference).ok_or(e)?;
                    tracing::warn!(
                        "no node answered; {reference} is the local copy at revision {}, which \
                         could not be checked for a newer revision",
                        local.revision
                    );
                    Ok(local)
                }
                other => other,
            }
        }?;
        self.layout.touch(reference);
        Ok(fetched)
    }

    /// The complete local copy of `reference` (sizes checked, no re-hash), if any.
    fn local_copy(&self, reference: &Reference) -> Option<Fetched> {
        let m = self.layout.complete_current(reference)?;
        Some(Fetched {
            path: self.layout.link(reference),
            total_size: m.total_size(),
            revision: m.revision,
            transferred: 0,
            offline: true,
        })
    }

    async fn prefetch_online(&self, reference: &Reference, progress: &Progress) -> Result<Fetched> {
        let route = self.route(reference).await;
        let (mut client, mut index) = node::connect_from(&route, 0, &self.credentials).await?;
        let mut attempt = 1;
        // Every node once, and a few model changes.
        let max_failovers = route.len() as u32 + 1;
        let mut failovers = 0;
        loop {
            let conn = transfer::Connection {
                client: &mut client,
                node: &route[index],
                idle_timeout: self.idle_timeout,
            };
            let span = tracing::info_span!("transfer", node = %route[index], attempt);
            let transferred = transfer::prefetch(conn, &self.layout, reference, progress)
                .instrument(span)
                .await;
            match transferred {
                Ok(fetched) => {
                    self.layout.check_format(true)?;
                    return Ok(fetched);
                }
                Err(e @ AgentError::Aborted { .. }) if attempt < MAX_ATTEMPTS => {
                    tracing::info!(%reference, "{e}; fetching the new revision");
                }
                Err(e @ (AgentError::Stalled { .. } | AgentError::Unavailable { .. }))
                    if failovers < max_failovers =>
                {
                    failovers += 1;
                    let from = route[index].clone();
                    (client, index) =
                        node::connect_from(&route, index + 1, &self.credentials).await?;
                    tracing::warn!(%reference, "{from}: {e}; going on with {}", route[index]);
                    continue;
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
            let bad: Vec<layout::BadChunk> = checked
                .iter()
                .filter_map(|p| {
                    p.chunk.map(|chunk| layout::BadChunk {
                        path: p.path.clone(),
                        chunk,
                    })
                })
                .collect();
            if !bad.is_empty() {
                // The next prefetch (or the daemon) fetches these chunks again.
                self.layout.mark_damaged(&r, &manifest.revision, &bad)?;
            }
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
                            chunk: None,
                        }),
                        Err(e) => report.problems.push(verify::Problem {
                            path: file.path.clone(),
                            detail: e.to_string(),
                            chunk: None,
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
