//! `cache-agent daemon`: the agent on an inference host. It prefetches a list of models in
//! the background, answers workers over gRPC (`modelcache.v1.Agent`, on a unix socket by
//! default), keeps `DIR` within `--max-size` by evicting the least recently used models
//! (never a leased or in-flight one), and re-checks what is on disk in the background.
//!
//! One fetch per model at a time: concurrent `Ensure` calls for a model share one flight,
//! and other processes on the same `DIR` (CLI runs, another daemon) take turns through the
//! per-model lock files of `Layout`. What a worker waits for starts at once and is never
//! throttled; the prefetch list and `Prefetch` calls are fetched one at a time, at most at
//! `--max-bandwidth`.

pub mod auth;
mod budget;
pub mod client;
pub mod metrics;
pub mod plan;
mod scrub;
mod service;
pub mod socket;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tracing::Instrument;

use modelcache_proto::Reference;
use tokio::sync::{Notify, watch};
use tonic::Status;

use crate::Agent;
use crate::error::AgentError;
use crate::progress::{Counter, Progress, Throttle};
pub use socket::{DEFAULT_LISTEN, Listen};

/// How often the prefetch file is checked for changes (SIGHUP re-reads it at once).
const LIST_POLL: Duration = Duration::from_secs(2);
/// How often the budget is checked besides after each fetch (other processes add models).
const BUDGET_POLL: Duration = Duration::from_secs(30);

/// What `cache-agent daemon` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: Listen,
    /// Permissions of the unix socket (workers need read and write).
    pub socket_mode: u32,
    pub prefetch: Vec<String>,
    pub prefetch_file: Option<PathBuf>,
    /// `--max-size` in bytes.
    pub max_size: Option<u64>,
    /// Bytes per second for background fetches.
    pub max_bandwidth: Option<u64>,
    /// How often the prefetch list is fetched again, to pick up new revisions.
    pub refresh_interval: Option<Duration>,
    /// Bytes per second the background re-hash of local models reads; 0 turns it off.
    pub verify_rate: u64,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The grants workers present one of (`--auth-tokens-file`), and the TLS of a TCP
    /// listener (`--tls-cert`, `--tls-key`, `--tls-client-ca`); `None`: neither.
    pub tokens: Option<Arc<modelcache_proto::auth::Tokens>>,
    pub tls: Option<Arc<modelcache_proto::tls::ServerTls>>,
}

/// A model present and verified locally, as `Ensure` returns it.
#[derive(Clone, Debug)]
pub struct Ensured {
    pub reference: Reference,
    pub path: PathBuf,
    pub revision: String,
    pub size: u64,
    /// Bytes received from a node for this call.
    pub fetched: u64,
    /// No node answered; the local copy's revision could not be checked.
    pub offline: bool,
}

type Outcome = Option<Result<Ensured, Status>>;

/// A fetch in progress, shared by everyone who asks for the model meanwhile.
struct Flight {
    done: watch::Receiver<Outcome>,
    counter: Arc<Counter>,
    /// A worker waits for it: not throttled.
    urgent: Arc<AtomicBool>,
}

struct Lease {
    reference: Reference,
    /// The connection that took it; its close ends the lease.
    conn: Option<u64>,
}

#[derive(Default)]
struct State {
    flights: HashMap<Reference, Flight>,
    leases: HashMap<String, Lease>,
    queue: VecDeque<Reference>,
}

/// A local model as the budget and `Status` see it.
struct OnDisk {
    model: crate::LocalModel,
    bytes: u64,
    last_used: SystemTime,
}

/// A snapshot for `Status`.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub dir: PathBuf,
    pub used_bytes: u64,
    pub max_bytes: Option<u64>,
    pub models: Vec<ModelStatus>,
    pub in_flight: Vec<(Reference, u64, u64)>,
    pub queued: Vec<Reference>,
}

#[derive(Clone, Debug)]
pub struct ModelStatus {
    pub reference: Reference,
    pub revision: String,
    pub path: PathBuf,
    pub size: u64,
    pub last_used: SystemTime,
    pub leases: u32,
}

pub struct Daemon {
    agent: Agent,
    options: Options,
    state: Mutex<State>,
    /// Something was queued.
    queued: Notify,
    /// A flight ended or a lease was released.
    changed: Notify,
    throttle: Option<Arc<Throttle>>,
    next_lease: AtomicU64,
    metrics: metrics::Metrics,
}

impl Daemon {
    pub fn new(agent: Agent, options: Options) -> Arc<Self> {
        let throttle = options
            .max_bandwidth
            .filter(|r| *r > 0)
            .map(|r| Arc::new(Throttle::new(r)));
        Arc::new(Self {
            agent,
            options,
            state: Mutex::new(State::default()),
            queued: Notify::new(),
            changed: Notify::new(),
            throttle,
            next_lease: AtomicU64::new(1),
            metrics: metrics::Metrics::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("daemon state lock poisoned")
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The model's verified local directory: at once when it is present (sizes checked,
    /// no node asked) unless `refresh`, else after fetching it (sharing a fetch already
    /// under way, which stops being throttled).
    pub async fn ensure(self: &Arc<Self>, r: &Reference, refresh: bool) -> Result<Ensured, Status> {
        let started = std::time::Instant::now();
        let present = if refresh { None } else { self.present(r) };
        let ensured = match present {
            Some(present) => {
                self.metrics.local_hits.inc();
                Ok(present)
            }
            None => self.fetch(r, true).await,
        };
        self.metrics
            .ensure_seconds
            .observe(started.elapsed().as_secs_f64());
        ensured
    }

    /// The local copy, if complete (sizes checked) and not known to be damaged.
    fn present(&self, r: &Reference) -> Option<Ensured> {
        let layout = self.agent.layout();
        let m = layout.complete_current(r)?;
        if layout.damaged(r, &m.revision).is_some() {
            return None;
        }
        layout.touch(r);
        Some(Ensured {
            reference: r.clone(),
            path: layout.link(r),
            size: m.total_size(),
            revision: m.revision,
            fetched: 0,
            offline: false,
        })
    }

    /// Fetches `r` (joining a flight already under way); `worker` says someone waits.
    async fn fetch(self: &Arc<Self>, r: &Reference, worker: bool) -> Result<Ensured, Status> {
        let mut done = {
            let mut st = self.state();
            match st.flights.get(r) {
                Some(f) => {
                    if worker {
                        f.urgent.store(true, Ordering::Relaxed);
                    }
                    f.done.clone()
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    let counter = Arc::new(Counter::default());
                    let urgent = Arc::new(AtomicBool::new(worker));
                    st.flights.insert(
                        r.clone(),
                        Flight {
                            done: rx.clone(),
                            counter: counter.clone(),
                            urgent: urgent.clone(),
                        },
                    );
                    let this = self.clone();
                    let r = r.clone();
                    // Runs to the end even when every caller went away, in the trace of
                    // the call that started it.
                    let span = tracing::Span::current();
                    tokio::spawn(
                        async move { this.fly(r, counter, urgent, tx).await }.instrument(span),
                    );
                    rx
                }
            }
        };
        let outcome = done
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Status::internal("the fetch task ended without a result"))?;
        outcome.clone().expect("waited for a result")
    }

    async fn fly(
        self: Arc<Self>,
        r: Reference,
        counter: Arc<Counter>,
        urgent: Arc<AtomicBool>,
        tx: watch::Sender<Outcome>,
    ) {
        let mut progress = Progress::hidden().counting(counter);
        if let Some(throttle) = &self.throttle {
            progress = progress.paced(throttle.clone(), urgent);
        }
        let result = self.agent.prefetch(&r, &progress).await;
        let outcome = match result {
            Ok(f) => {
                self.metrics.fetched_bytes.inc_by(f.transferred);
                tracing::info!(reference = %r, revision = %f.revision, bytes = f.transferred, "ready");
                Ok(Ensured {
                    reference: r.clone(),
                    path: f.path,
                    revision: f.revision,
                    size: f.total_size,
                    fetched: f.transferred,
                    offline: f.offline,
                })
            }
            Err(e) => {
                tracing::warn!(reference = %r, "fetch failed: {e}");
                Err(service::status_of(&e))
            }
        };
        let ok = outcome.is_ok();
        self.metrics.fetch_ended(ok);
        self.state().flights.remove(&r);
        let _ = tx.send(Some(outcome));
        self.changed.notify_waiters();
        if ok {
            self.enforce_budget(Some(&r)).await;
        }
    }

    /// Queues background fetches (those queued or under way already stay where they
    /// are); returns how many were asked for.
    pub fn queue(&self, refs: &[Reference]) -> usize {
        let mut st = self.state();
        for r in refs {
            if !st.queue.contains(r) && !st.flights.contains_key(r) {
                st.queue.push_back(r.clone());
            }
        }
        drop(st);
        self.queued.notify_one();
        refs.len()
    }

    /// Fetches the queue, one model at a time.
    async fn background(self: Arc<Self>) {
        loop {
            let next = self.state().queue.pop_front();
            match next {
                Some(r) => match self.fetch(&r, false).await {
                    Ok(e) => tracing::info!(reference = %r, path = %e.path.display(), "prefetched"),
                    Err(s) => tracing::warn!(reference = %r, "prefetch failed: {}", s.message()),
                },
                None => self.queued.notified().await,
            }
        }
    }

    /// Takes a lease on `r` for the connection `conn`; returns its id.
    pub fn lease(&self, r: &Reference, conn: Option<u64>) -> String {
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let id = format!("{:x}-{n:x}-{nanos:x}", std::process::id());
        self.state().leases.insert(
            id.clone(),
            Lease {
                reference: r.clone(),
                conn,
            },
        );
        id
    }

    pub fn release(&self, id: &str) -> bool {
        let released = self.state().leases.remove(id).is_some();
        self.changed.notify_waiters();
        released
    }

    /// Ends the leases taken on a connection that closed.
    fn connection_closed(&self, conn: u64) {
        let mut st = self.state();
        let before = st.leases.len();
        st.leases.retain(|_, l| l.conn != Some(conn));
        let ended = before - st.leases.len();
        drop(st);
        if ended > 0 {
            tracing::debug!(conn, ended, "connection closed; its leases ended");
            self.changed.notify_waiters();
        }
    }

    fn leases_of(st: &State, r: &Reference) -> usize {
        st.leases.values().filter(|l| l.reference == *r).count()
    }

    /// Removes `r` from `DIR`; `None` when it was not there. Refused while it is leased or
    /// being fetched, unless `force`, which waits for its leases and fetch to end.
    pub async fn evict(&self, r: &Reference, force: bool) -> Result<Option<u64>, Status> {
        let trash = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_detach(r) {
                Ok(trash) => break trash,
                Err(why) if !force => {
                    return Err(Status::failed_precondition(format!(
                        "not evicting {r}: {why} (force waits for them to end)"
                    )));
                }
                Err(_) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
            }
        };
        let Some(trash) = trash.map_err(|e| service::status_of(&e))? else {
            return Ok(None);
        };
        let freed = tokio::task::spawn_blocking(move || {
            let bytes = crate::layout::disk_usage(&trash);
            let _ = std::fs::remove_dir_all(&trash);
            bytes
        })
        .await
        .unwrap_or(0);
        self.metrics.evictions.inc();
        self.metrics.evicted_bytes.inc_by(freed);
        tracing::info!(reference = %r, freed, "evicted");
        Ok(Some(freed))
    }

    /// Takes `r` out of `DIR` unless it is leased or being fetched (then why not).
    /// Renames only, under the state lock: no `Ensure` can slip in between.
    #[allow(clippy::type_complexity)]
    fn try_detach(&self, r: &Reference) -> Result<crate::Result<Option<PathBuf>>, String> {
        let st = self.state();
        let leases = Self::leases_of(&st, r);
        if st.flights.contains_key(r) {
            return Err("it is being fetched".into());
        }
        match leases {
            0 => Ok(self.agent.layout().detach(r)),
            1 => Err("a worker holds a lease on it".into()),
            n => Err(format!("workers hold {n} leases on it")),
        }
    }

    /// Evicts least recently used models until `DIR` fits `--max-size`; `just` (the
    /// model a fetch just brought) is kept like leased and in-flight ones.
    pub async fn enforce_budget(&self, just: Option<&Reference>) {
        let Some(max) = self.options.max_size else {
            return;
        };
        let (used, models) = self.local_models().await;
        let candidates: Vec<budget::Candidate> = {
            let st = self.state();
            models
                .into_iter()
                .map(|m| budget::Candidate {
                    protected: Self::leases_of(&st, &m.model.reference) > 0
                        || st.flights.contains_key(&m.model.reference)
                        || just == Some(&m.model.reference),
                    reference: m.model.reference,
                    bytes: m.bytes,
                    last_used: m.last_used,
                })
                .collect()
        };
        let mut freed = 0;
        for r in budget::choose(used, max, &candidates) {
            match self.evict(&r, false).await {
                Ok(Some(bytes)) => {
                    freed += bytes;
                    tracing::info!(reference = %r, bytes, max, "evicted to stay within --max-size");
                }
                Ok(None) => {}
                Err(s) => tracing::info!(reference = %r, "not evicted: {}", s.message()),
            }
        }
        if used.saturating_sub(freed) > max {
            tracing::warn!(
                used = used - freed,
                max,
                "{} is over --max-size; what is left is leased, being fetched or just fetched",
                self.agent.layout().root().display()
            );
        }
    }

    /// Every local model with what it takes on disk and its last use, and the bytes under
    /// `DIR` in all (one walk of the directory, off the runtime).
    async fn local_models(&self) -> (u64, Vec<OnDisk>) {
        let layout = self.agent.layout().clone();
        tokio::task::spawn_blocking(move || {
            let models = layout
                .list()
                .into_iter()
                .map(|model| OnDisk {
                    bytes: layout.model_disk_usage(&model.reference),
                    last_used: layout.last_used(&model.reference),
                    model,
                })
                .collect();
            (crate::layout::disk_usage(layout.root()), models)
        })
        .await
        .unwrap_or_default()
    }

    pub async fn snapshot(&self) -> Snapshot {
        let (used, models) = self.local_models().await;
        let st = self.state();
        Snapshot {
            dir: self.agent.layout().root().to_owned(),
            used_bytes: used,
            max_bytes: self.options.max_size,
            models: models
                .into_iter()
                .map(
                    |OnDisk {
                         model: m,
                         last_used,
                         ..
                     }| ModelStatus {
                        leases: Self::leases_of(&st, &m.reference) as u32,
                        reference: m.reference,
                        revision: m.revision,
                        path: m.path,
                        size: m.size,
                        last_used,
                    },
                )
                .collect(),
            in_flight: st
                .flights
                .iter()
                .map(|(r, f)| (r.clone(), f.counter.done(), f.counter.total()))
                .collect(),
            queued: st.queue.iter().cloned().collect(),
        }
    }

    /// Progress of a fetch under way: (done, total) bytes.
    pub fn progress_of(&self, r: &Reference) -> Option<(u64, u64)> {
        let st = self.state();
        st.flights
            .get(r)
            .map(|f| (f.counter.done(), f.counter.total()))
    }

    /// Reads the prefetch list again and queues it.
    fn load_list(&self, why: &str) {
        let (refs, problems) = plan::load(
            &self.options.prefetch,
            self.options.prefetch_file.as_deref(),
        );
        for p in &problems {
            tracing::warn!("prefetch list: {p}");
        }
        if !refs.is_empty() {
            tracing::info!(models = refs.len(), "prefetch list {why}");
        }
        self.queue(&refs);
    }

    /// Re-reads the list on SIGHUP, when its file changes, and every refresh interval.
    async fn watch_list(self: Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP: {e}");
                None
            }
        };
        let stamp = |p: &Option<PathBuf>| {
            p.as_ref().and_then(|p| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| (m.modified().ok(), m.len()))
            })
        };
        let mut seen = stamp(&self.options.prefetch_file);
        let mut refreshed = tokio::time::Instant::now();
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = hangup => self.load_list("re-read on SIGHUP"),
                () = tokio::time::sleep(LIST_POLL) => {
                    let now = stamp(&self.options.prefetch_file);
                    if now != seen {
                        seen = now;
                        self.load_list("re-read: the file changed");
                    } else if let Some(every) = self.options.refresh_interval
                        && refreshed.elapsed() >= every
                    {
                        refreshed = tokio::time::Instant::now();
                        self.load_list("fetched again for new revisions");
                    }
                }
            }
        }
    }

    async fn watch_budget(self: Arc<Self>) {
        loop {
            tokio::time::sleep(BUDGET_POLL).await;
            self.enforce_budget(None).await;
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT. `ready` hears the address it listens on.
pub async fn run(
    agent: Agent,
    options: Options,
    ready: impl FnOnce(&str),
) -> Result<(), AgentError> {
    let layout = agent.layout().clone();
    layout.check_format(true)?;
    layout.clean_leftovers();
    let bound = socket::bind(&options.listen, options.socket_mode)
        .await
        .map_err(|message| AgentError::Daemon { message })?;
    let address = bound.address.clone();
    let metrics_listen = options.metrics_listen;
    let daemon = Daemon::new(agent, options);
    let metrics = metrics::serve(metrics_listen, daemon.metrics.registry()).await?;
    // Sizes at once (no re-hash before serving): incomplete copies are fetched again.
    let incomplete: Vec<Reference> = {
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || {
            layout
                .list()
                .into_iter()
                .filter(|m| layout.complete_current(&m.reference).is_none())
                .map(|m| m.reference)
                .collect()
        })
        .await
        .unwrap_or_default()
    };
    for r in &incomplete {
        tracing::warn!(reference = %r, "local copy is incomplete; fetching it again");
    }
    daemon.queue(&incomplete);
    daemon.load_list("loaded");
    let (acceptor, mut closed) = socket::Acceptor::new();
    let tasks = [
        tokio::spawn(daemon.clone().background()),
        tokio::spawn(daemon.clone().watch_list()),
        tokio::spawn(daemon.clone().watch_budget()),
        tokio::spawn(scrub::run(daemon.clone())),
        tokio::spawn({
            let daemon = daemon.clone();
            async move {
                while let Some(conn) = closed.recv().await {
                    daemon.connection_closed(conn);
                }
            }
        }),
        tokio::spawn({
            let daemon = daemon.clone();
            async move { daemon.enforce_budget(None).await }
        }),
    ];
    tracing::info!(%address, dir = %layout.root().display(), "cache-agent daemon serving");
    ready(&address);
    let incoming = acceptor.incoming(bound, daemon.options.tls.clone());
    let served = service::serve(daemon, incoming, service::shutdown_signal()).await;
    // Every task stops and is waited for before the daemon exits.
    for t in tasks.into_iter().chain(metrics) {
        t.abort();
        let _ = t.await;
    }
    served
}
