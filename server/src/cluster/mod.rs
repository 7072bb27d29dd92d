//! The cluster as this node sees it (SPEC §7): who the members are, which are healthy,
//! and who owns which model.
//!
//! Membership is what runs the nodes says it is, nothing home-made: the `--peers` list,
//! each entry `host:port` resolved again every probe round (a DNS name with several
//! addresses, such as a compose service or a Kubernetes headless service, is several
//! peers). Every address is probed with `grpc.health.v1` (a timeout, and backoff while it
//! fails); a peer's id and advertised address are learned from its `Members` RPC. A peer
//! counts as healthy until a probe fails. An address that answers with this node's own id
//! is this node (every node can be given the same list). The node reports ready once every
//! address was probed once, so nodes that start together agree on owners at once.
//!
//! Ownership is rendezvous hashing of the model name over the healthy members' ids
//! (`modelcache_proto::rank`), the same computation agents make.

mod identity;
mod peer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelcache_proto::auth::WithToken;
use modelcache_proto::tls::ClientTls;
use modelcache_proto::v1::model_cache_client::ModelCacheClient;
use modelcache_proto::v1::{MembersRequest, MembersResponse};
use modelcache_proto::wire::{CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

pub use identity::node_id;
pub use peer::GrpcPeer;

use crate::error::{Error, Result};
use crate::peers::{Peer, Route, Routing};

/// How the cluster is configured.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// `host:port` entries; each may resolve to several addresses.
    pub peers: Vec<String>,
    /// The address others reach this node at.
    pub advertise: String,
    /// Time between probe rounds.
    pub probe_interval: Duration,
    /// Longest a probe, or a request to a peer, may take.
    pub peer_timeout: Duration,
    /// The `authorization` header this node presents to its peers (`--peer-token-file`).
    pub token: Option<http::HeaderValue>,
    /// TLS towards peers (this node's certificate, theirs checked against its client CA);
    /// `None`: plaintext.
    pub tls: Option<Arc<ClientTls>>,
}

/// Longest wait between probes of an address that keeps failing.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The host of a `--peers` entry (`host:port`, `[v6]:port`): the name a peer's
/// certificate must carry.
fn host_of(entry: &str) -> String {
    let host = entry.rsplit_once(':').map_or(entry, |(host, _)| host);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned()
}

/// One member as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub id: String,
    pub address: String,
    pub healthy: bool,
    pub local: bool,
    pub detail: String,
}

/// One probed address.
struct Target {
    channel: Channel,
    /// Learned from the peer's `Members`; `None` until it answered once.
    id: Option<String>,
    /// What the peer advertises, or the address probed until it said.
    address: String,
    healthy: bool,
    detail: String,
    failures: u32,
    next_probe: Instant,
    peer: Option<Arc<GrpcPeer>>,
}

pub struct Cluster {
    id: String,
    options: ClusterOptions,
    advertise: Mutex<String>,
    targets: Mutex<HashMap<SocketAddr, Target>>,
    ready: watch::Sender<bool>,
    stop: CancellationToken,
    probing: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Cluster {
    /// A cluster of this node (`id`) and `options.peers`; probing starts with `start`.
    pub fn new(id: String, options: ClusterOptions) -> Arc<Self> {
        let ready = options.peers.is_empty();
        Arc::new(Self {
            id,
            advertise: Mutex::new(options.advertise.clone()),
            options,
            targets: Mutex::new(HashMap::new()),
            ready: watch::channel(ready).0,
            stop: CancellationToken::new(),
            probing: Mutex::new(None),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn advertise(&self) -> String {
        self.advertise
            .lock()
            .expect("cluster lock poisoned")
            .clone()
    }

    /// The address others reach this node at, once it is bound.
    pub fn set_advertise(&self, address: String) {
        *self.advertise.lock().expect("cluster lock poisoned") = address;
    }

    /// Starts probing the peers in the background (until `stop`).
    pub fn start(self: &Arc<Self>) {
        if self.options.peers.is_empty() {
            return;
        }
        let this = self.clone();
        let task = tokio::spawn(async move {
            loop {
                this.probe_round().await;
                this.ready.send_replace(true);
                tokio::select! {
                    () = this.stop.cancelled() => return,
                    () = tokio::time::sleep(this.options.probe_interval) => {}
                }
            }
        });
        *self.probing.lock().expect("cluster lock poisoned") = Some(task);
    }

    /// Stops probing.
    pub async fn stop(&self) {
        self.stop.cancel();
        let task = self.probing.lock().expect("cluster lock poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Whether every peer was probed once.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until every peer was probed once.
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.subscribe();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Every member known, this node first, then by id.
    pub fn members(&self) -> Vec<MemberView> {
        let targets = self.targets.lock().expect("cluster lock poisoned");
        let mut others: Vec<MemberView> = targets
            .values()
            .filter(|t| t.id.as_deref() != Some(self.id.as_str()))
            .map(|t| MemberView {
                id: t.id.clone().unwrap_or_default(),
                address: t.address.clone(),
                healthy: t.healthy && t.id.is_some(),
                local: false,
                detail: t.detail.clone(),
            })
            .collect();
        others.sort_by(|a, b| (&a.id, &a.address).cmp(&(&b.id, &b.address)));
        // One node reached at several addresses is one member: its healthy entry wins.
        others.dedup_by(|later, first| {
            if !first.id.is_empty() && later.id == first.id {
                first.healthy |= later.healthy;
                true
            } else {
                false
            }
        });
        let mut all = vec![MemberView {
            id: self.id.clone(),
            address: self.advertise(),
            healthy: true,
            local: true,
            detail: String::new(),
        }];
        all.extend(others);
        all
    }

    /// One round: resolve every entry, drop addresses gone from DNS, probe those due.
    async fn probe_round(self: &Arc<Self>) {
        let mut seen = Vec::new();
        for entry in &self.options.peers {
            match tokio::net::lookup_host(entry.as_str()).await {
                Ok(addrs) => seen.extend(addrs.map(|addr| (addr, host_of(entry)))),
                Err(e) => tracing::warn!(peer = %entry, "cannot resolve peer: {e}"),
            }
        }
        let due: Vec<SocketAddr> = {
            let mut targets = self.targets.lock().expect("cluster lock poisoned");
            targets.retain(|addr, _| seen.iter().any(|(a, _)| a == addr));
            for (addr, host) in &seen {
                if !targets.contains_key(addr) {
                    match self.target(*addr, host) {
                        Ok(target) => {
                            targets.insert(*addr, target);
                        }
                        Err(e) => tracing::warn!(%addr, "cannot probe peer: {e}"),
                    }
                }
            }
            // New addresses are due at once: a round probes every address it found.
            let now = Instant::now();
            targets
                .iter()
                .filter(|(_, t)| t.next_probe <= now && t.id.as_deref() != Some(&self.id))
                .map(|(addr, _)| *addr)
                .collect()
        };
        let probes = due.into_iter().map(|addr| {
            let this = self.clone();
            async move {
                let channel = {
                    let targets = this.targets.lock().expect("cluster lock poisoned");
                    targets
                        .get(&addr)
                        .map(|t| (t.channel.clone(), t.id.is_none() || !t.healthy))
                };
                let Some((channel, identify)) = channel else {
                    return;
                };
                let outcome = this.probe(channel, identify).await;
                this.record(addr, outcome);
            }
        });
        futures::future::join_all(probes).await;
    }

    /// A peer at `addr`, listed as `host`: over TLS, its certificate must name `host`.
    fn target(&self, addr: SocketAddr, host: &str) -> Result<Target> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Config(format!("peer address {addr}: {e}")))?
            .connect_timeout(self.options.peer_timeout)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .tcp_nodelay(true)
            // A peer that dies under a long request (a variant build) is noticed by a
            // missed ping.
            .http2_keep_alive_interval(self.options.peer_timeout)
            .keep_alive_timeout(self.options.peer_timeout);
        let channel = match &self.options.tls {
            Some(tls) => endpoint.connect_with_connector_lazy(tls.connect(Some(host.to_owned()))),
            None => endpoint.connect_lazy(),
        };
        Ok(Target {
            channel,
            id: None,
            address: addr.to_string(),
            healthy: false,
            detail: "not probed yet".into(),
            failures: 0,
            next_probe: Instant::now(),
            peer: None,
        })
    }

    /// A connection to the member advertising `address` (`host:port`), over TLS when the
    /// node calls its peers so.
    pub async fn dial(&self, address: &str) -> std::result::Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("not an address: {e}"))?
            .connect_timeout(self.options.peer_timeout);
        match &self.options.tls {
            Some(tls) => endpoint.connect_with_connector(tls.connect(None)).await,
            None => endpoint.connect().await,
        }
        .map_err(|e| format!("cannot reach the member: {}", crate::error::error_chain(&e)))
    }

    /// The TLS the node calls its peers with, if any.
    pub fn tls(&self) -> Option<&Arc<ClientTls>> {
        self.options.tls.as_ref()
    }

    /// A health check; and, when `identify`, the peer's own entry of `Members`.
    async fn probe(
        &self,
        channel: Channel,
        identify: bool,
    ) -> std::result::Result<Option<(String, String)>, String> {
        let work = async {
            let health = HealthClient::new(channel.clone())
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|s| format!("health check: {}", s.message()))?
                .into_inner();
            if health.status != ServingStatus::Serving as i32 {
                return Err(format!("health check says {:?}", health.status()));
            }
            if !identify {
                return Ok(None);
            }
            let members: MembersResponse = ModelCacheClient::new(WithToken {
                inner: channel,
                token: self.options.token.clone(),
            })
            .members(MembersRequest {})
            .await
            .map_err(|s| format!("Members: {}", s.message()))?
            .into_inner();
            let own = members.members.iter().find(|m| m.local);
            let address = own.map(|m| m.address.clone()).unwrap_or_default();
            Ok(Some((members.node_id, address)))
        };
        tokio::time::timeout(self.options.peer_timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {} s",
                    self.options.peer_timeout.as_secs_f64()
                ))
            })
    }

    fn record(
        &self,
        addr: SocketAddr,
        outcome: std::result::Result<Option<(String, String)>, String>,
    ) {
        let mut targets = self.targets.lock().expect("cluster lock poisoned");
        let Some(t) = targets.get_mut(&addr) else {
            return;
        };
        match outcome {
            Ok(identity) => {
                if let Some((id, advertised)) = identity {
                    if id == self.id {
                        tracing::debug!(%addr, "this address is this node");
                    } else if t.id.as_deref() != Some(id.as_str()) || !t.healthy {
                        tracing::info!(%addr, peer = %id, "peer is up");
                    }
                    t.address = if advertised.is_empty() {
                        addr.to_string()
                    } else {
                        advertised
                    };
                    t.peer = Some(Arc::new(GrpcPeer::new(
                        id.clone(),
                        t.address.clone(),
                        WithToken {
                            inner: t.channel.clone(),
                            token: self.options.token.clone(),
                        },
                        self.options.peer_timeout,
                    )));
                    t.id = Some(id);
                }
                t.healthy = true;
                t.failures = 0;
                t.detail.clear();
                t.next_probe = Instant::now();
            }
            Err(detail) => {
                if t.healthy {
                    tracing::warn!(%addr, peer = t.id.as_deref().unwrap_or("?"), "peer is down: {detail}");
                }
                t.healthy = false;
                t.failures += 1;
                t.detail = detail;
                let backoff = self
                    .options
                    .probe_interval
                    .saturating_mul(1 << t.failures.min(5))
                    .min(MAX_BACKOFF);
                t.next_probe = Instant::now() + backoff / 2;
            }
        }
    }
}

impl Routing for Cluster {
    /// Marks peer `id` down at once (a request to it failed), until its next probe says
    /// otherwise.
    fn suspect(&self, id: &str, detail: &str) {
        let mut targets = self.targets.lock().expect("cluster lock poisoned");
        for t in targets.values_mut().filter(|t| t.id.as_deref() == Some(id)) {
            if t.healthy {
                tracing::warn!(peer = %id, "peer failed a request: {detail}");
            }
            t.healthy = false;
            t.detail = detail.to_owned();
            t.next_probe = Instant::now();
        }
    }

    fn routes(&self, model: &str) -> Vec<Route> {
        // The healthy peers by id (one node reached at several addresses counts once),
        // and this node.
        let mut peers: HashMap<&str, Arc<GrpcPeer>> = HashMap::new();
        let targets = self.targets.lock().expect("cluster lock poisoned");
        for t in targets.values().filter(|t| t.healthy) {
            if let (Some(id), Some(peer)) = (t.id.as_deref(), &t.peer)
                && id != self.id
            {
                peers.entry(id).or_insert_with(|| peer.clone());
            }
        }
        let ids = peers.keys().copied().chain([self.id.as_str()]);
        modelcache_proto::rank::rank(model, ids)
            .into_iter()
            .map(|id| match peers.get(id) {
                Some(peer) => Route::Peer(peer.clone() as Arc<dyn Peer>),
                None => Route::Local,
            })
            .collect()
    }
}
