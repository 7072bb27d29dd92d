//! Which revision of each model a node serves: a model's name resolves to its current
//! revision, re-listed in the origin once the cached one is older than
//! `--revalidate-after` (concurrent revalidations share one listing). When the origin
//! cannot be listed, the cached revision keeps being served (stale-if-error, with the
//! reason). Saved manifests restore the catalog at startup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::{Error, PeerFailure, Result};
use crate::manifest::{ManifestStore, Revision, revision_id};
use crate::origin::{Origin, OriginFile};
use crate::peers::{RemoteManifest, Routing, ask_in_rank};
use crate::stats::NodeStats;
use crate::tasks::Background;

/// A model's files as listed: by the origin, or by the model's owner (whose manifest also
/// brings the digests it knows).
struct Listing {
    files: Vec<OriginFile>,
    remote: Option<RemoteManifest>,
}

/// What a name resolved to.
#[derive(Clone)]
pub struct Resolved {
    pub revision: Arc<Revision>,
    /// Set when the origin could not be re-listed and a cached revision is served.
    pub stale_reason: Option<String>,
}

#[derive(Default)]
struct SlotState {
    current: Option<Arc<Revision>>,
    validated_at: Option<Instant>,
    stale_reason: Option<String>,
}

/// A listing of one model under way, shared by every request that waits for it.
type Refresh = Shared<BoxFuture<'static, std::result::Result<Resolved, Arc<Error>>>>;

/// One model's state; `refreshing` makes concurrent revalidations share one listing.
#[derive(Default)]
struct ModelSlot {
    state: Mutex<SlotState>,
    refreshing: Mutex<Option<Refresh>>,
}

impl ModelSlot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().expect("model slot lock poisoned")
    }
}

/// How long a request for a model the node has waits for its revalidation before it is
/// answered with the cached revision (the listing goes on in the background).
const REVALIDATE_GRACE: Duration = Duration::from_millis(500);
/// Longest a revalidation may take; beyond it the cached revision is served as stale.
const REVALIDATE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long "no such model" is remembered (at most `--revalidate-after`): a name asked for
/// again at once costs no LIST, and a model that appears is found a moment later.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Most names remembered as missing; beyond it, the oldest are forgotten.
const NEGATIVE_CAPACITY: usize = 10_000;

pub struct Catalog {
    origin: Arc<Origin>,
    /// The cluster: a model another node owns is resolved through it.
    routing: Option<Arc<dyn Routing>>,
    /// Counts revalidations and stale serves.
    stats: Arc<NodeStats>,
    background: Background,
    manifests: Arc<ManifestStore>,
    revalidate_after: Duration,
    /// Models this node has a revision of (or is listing now); none for names that do not
    /// exist.
    models: Mutex<HashMap<String, Arc<ModelSlot>>>,
    /// Names the origin just said are no model: when, and the hint it gave.
    missing: Mutex<HashMap<String, (Instant, String)>>,
}

impl Catalog {
    /// A catalog of the originals saved in `manifests`; returns it with the saved variants
    /// whose original it still has (the others' manifests are removed).
    pub fn open(
        origin: Arc<Origin>,
        manifests: Arc<ManifestStore>,
        revalidate_after: Duration,
        background: Background,
        routing: Option<Arc<dyn Routing>>,
        stats: Arc<NodeStats>,
    ) -> (Self, Vec<Revision>) {
        let (originals, built): (Vec<Revision>, Vec<Revision>) = manifests
            .load_all()
            .into_iter()
            .partition(Revision::is_original);
        let variants = built
            .into_iter()
            .filter(|rev| {
                let kept = originals
                    .iter()
                    .any(|o| o.name == rev.name && Some(&o.id) == rev.source.as_ref());
                if !kept {
                    manifests.remove(&rev.name, &rev.variant);
                }
                kept
            })
            .collect();
        let mut models = HashMap::new();
        for rev in originals {
            // A revision the origin confirmed less than `revalidate_after` ago is trusted
            // for the rest of that time: a restarted node serves without asking the origin.
            let validated_at = rev
                .confirmed_ago()
                .filter(|ago| *ago < revalidate_after)
                .and_then(|ago| Instant::now().checked_sub(ago));
            let slot = ModelSlot {
                state: Mutex::new(SlotState {
                    validated_at,
                    ..SlotState::default()
                }),
                ..ModelSlot::default()
            };
            let name = rev.name.clone();
            slot.state().current = Some(Arc::new(rev));
            models.insert(name, Arc::new(slot));
        }
        let catalog = Self {
            stats,
            origin,
            routing,
            background,
            manifests,
            revalidate_after,
            models: Mutex::new(models),
            missing: Mutex::new(HashMap::new()),
        };
        (catalog, variants)
    }

    fn slot(&self, name: &str) -> Arc<ModelSlot> {
        let mut models = self.models.lock().expect("catalog lock poisoned");
        models.entry(name.to_owned()).or_default().clone()
    }

    /// The revision to serve for model `name`. One that is older than
    /// `--revalidate-after` is listed again in the background (one listing per model at a
    /// time); the request waits for it a moment (`REVALIDATE_GRACE`) and is otherwise
    /// answered with the cached revision while the listing goes on (stale-while-
    /// revalidate), so a hung origin never holds up a model the node has.
    pub async fn resolve(self: &Arc<Self>, name: &str) -> Result<Resolved> {
        if let Some(missing) = self.known_missing(name) {
            return Err(missing);
        }
        let slot = self.slot(name);
        if let Some(fresh) = self.fresh(&slot) {
            return Ok(fresh);
        }
        let refresh = self.refresh(name, &slot);
        let cached = {
            let state = slot.state();
            state.current.clone().map(|revision| Resolved {
                revision,
                stale_reason: state.stale_reason.clone(),
            })
        };
        let resolved = match cached {
            None => refresh.await.map_err(Error::Shared),
            Some(cached) => tokio::select! {
                refreshed = refresh => refreshed.map_err(Error::Shared),
                () = tokio::time::sleep(REVALIDATE_GRACE) => {
                    // Served while the origin is still being asked.
                    self.stats.stale_serve();
                    return Ok(cached);
                }
            },
        };
        if resolved.as_ref().is_ok_and(|r| r.stale_reason.is_some()) {
            // Served although the origin could not confirm it.
            self.stats.stale_serve();
        }
        resolved
    }

    /// The listing of `name` under way, or a new one, run as a background task so that
    /// it goes on when the request that started it is answered (or goes away).
    fn refresh(self: &Arc<Self>, name: &str, slot: &Arc<ModelSlot>) -> Refresh {
        let mut running = slot.refreshing.lock().expect("model slot lock poisoned");
        if let Some(refresh) = running.as_ref() {
            return refresh.clone();
        }
        let this = self.clone();
        let task_slot = slot.clone();
        let name = name.to_owned();
        let task = self.background.spawn(async move {
            let bounded = task_slot.state().current.is_some();
            if bounded {
                this.stats.revalidation();
            }
            let listed = if bounded {
                tokio::time::timeout(REVALIDATE_TIMEOUT, this.list(&name))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::OriginUnavailable {
                            origin: this.origin.display().to_owned(),
                            name: name.clone(),
                            detail: format!(
                                "listing the model did not finish within {} s",
                                REVALIDATE_TIMEOUT.as_secs()
                            ),
                        })
                    })
            } else {
                this.list(&name).await
            };
            let result = this.apply(&name, &task_slot, listed).map_err(Arc::new);
            *task_slot
                .refreshing
                .lock()
                .expect("model slot lock poisoned") = None;
            Ok(result)
        });
        let failed_slot = slot.clone();
        let refresh = async move {
            match task.await {
                Ok(Ok(result)) => result,
                // Ended with the node, nothing to undo.
                Ok(Err(e)) => Err(Arc::new(e)),
                // The task never got to let go of the slot itself: do it here, so the next
                // request lists again instead of getting this failure forever.
                Err(e) => {
                    *failed_slot
                        .refreshing
                        .lock()
                        .expect("model slot lock poisoned") = None;
                    Err(Arc::new(Error::task_failed("listing a model", e)))
                }
            }
        }
        .boxed()
        .shared();
        *running = Some(refresh.clone());
        refresh
    }

    /// What a listing of `name` means for its slot: a confirmed or new revision; no model
    /// (nothing kept); or an origin failure, served around with the cached revision.
    fn apply(
        &self,
        name: &str,
        slot: &Arc<ModelSlot>,
        listed: Result<Listing>,
    ) -> Result<Resolved> {
        let mut state = slot.state();
        match listed {
            Ok(Listing { files, remote }) => {
                let revision = match state.current.as_ref() {
                    Some(cur) if cur.id == revision_id(&files) => {
                        cur.confirm();
                        cur.clone()
                    }
                    previous => {
                        let rev = Revision::new(name, files, previous.map(|p| &**p));
                        if let Some(remote) = &remote {
                            adopt_known(&rev, remote)?;
                        }
                        let rev = Arc::new(rev);
                        rev.confirm();
                        if let Err(e) = self.manifests.save(&rev) {
                            tracing::warn!(model = name, "could not save manifest: {e}");
                        }
                        tracing::info!(model = name, revision = %rev.id, "new revision");
                        rev
                    }
                };
                state.current = Some(revision.clone());
                state.validated_at = Some(Instant::now());
                state.stale_reason = None;
                Ok(Resolved {
                    revision,
                    stale_reason: None,
                })
            }
            Err(
                e @ (Error::ModelNotFound { .. }
                | Error::UnsafeModelPath { .. }
                | Error::Peer {
                    failure: PeerFailure::NotFound,
                    ..
                }),
            ) => {
                if state.current.take().is_some() {
                    self.manifests
                        .remove(name, modelcache_proto::reference::ORIGINAL);
                }
                drop(state);
                self.forget(name, slot);
                if let Error::ModelNotFound { hint, .. } = &e {
                    self.remember_missing(name, hint);
                }
                Err(e)
            }
            Err(e) => match state.current.clone() {
                Some(revision) => {
                    let reason = e.stale_reason();
                    tracing::warn!(model = name, "serving cached revision: {reason}");
                    state.validated_at = Some(Instant::now());
                    state.stale_reason = Some(reason.clone());
                    Ok(Resolved {
                        revision,
                        stale_reason: Some(reason),
                    })
                }
                None => Err(e),
            },
        }
    }

    /// No state is kept for a name that is no model (its slot goes once nobody else holds it).
    fn forget(&self, name: &str, slot: &Arc<ModelSlot>) {
        let mut models = self.models.lock().expect("catalog lock poisoned");
        if let Some(kept) = models.get(name)
            && Arc::ptr_eq(kept, slot)
            && kept.state().current.is_none()
        {
            models.remove(name);
        }
    }

    /// How long "no such model" is remembered here.
    fn negative_ttl(&self) -> Duration {
        NEGATIVE_TTL.min(self.revalidate_after)
    }

    fn known_missing(&self, name: &str) -> Option<Error> {
        let ttl = self.negative_ttl();
        let missing = self.missing.lock().expect("catalog lock poisoned");
        let (at, hint) = missing.get(name)?;
        (at.elapsed() < ttl).then(|| Error::ModelNotFound {
            name: name.to_owned(),
            origin: self.origin.display().to_owned(),
            hint: hint.clone(),
        })
    }

    fn remember_missing(&self, name: &str, hint: &str) {
        let ttl = self.negative_ttl();
        if ttl.is_zero() {
            return;
        }
        let mut missing = self.missing.lock().expect("catalog lock poisoned");
        if missing.len() >= NEGATIVE_CAPACITY {
            missing.retain(|_, (at, _)| at.elapsed() < ttl);
            if missing.len() >= NEGATIVE_CAPACITY {
                missing.clear();
            }
        }
        missing.insert(name.to_owned(), (Instant::now(), hint.to_owned()));
    }

    /// How many models the catalog holds state for.
    pub fn model_count(&self) -> usize {
        self.models.lock().expect("catalog lock poisoned").len()
    }

    /// Forgets what `rev` recorded (chunk digests, SHA-256) and lists the model again on the
    /// next `resolve`: its record contradicted the origin.
    pub fn discard(&self, rev: &Arc<Revision>) {
        let models = self.models.lock().expect("catalog lock poisoned");
        let Some(slot) = models.get(&rev.name) else {
            return;
        };
        let mut state = slot.state();
        if state
            .current
            .as_ref()
            .is_some_and(|cur| Arc::ptr_eq(cur, rev))
        {
            tracing::warn!(model = %rev.name, revision = %rev.id, "discarding a record the origin contradicts");
            state.current = None;
            state.validated_at = None;
            self.manifests
                .remove(&rev.name, modelcache_proto::reference::ORIGINAL);
        }
    }

    /// Lists `name` again now (through its owner in a cluster) and waits for the listing:
    /// the revision it found, as the next request will be served.
    pub async fn revalidate(self: &Arc<Self>, name: &str) -> Result<Resolved> {
        let slot = self.slot(name);
        slot.state().validated_at = None;
        self.refresh(name, &slot).await.map_err(Error::Shared)
    }

    /// Makes the next `resolve` of `name` list the origin again: a ranged read saw that a
    /// file changed or went away (or an operator said so), so the revision served may be
    /// out of date.
    pub fn invalidate(&self, name: &str) {
        let models = self.models.lock().expect("catalog lock poisoned");
        if let Some(slot) = models.get(name) {
            slot.state().validated_at = None;
        }
    }

    /// The model's files as its owner lists them: the origin's listing when this node is
    /// the first healthy member in rank, else the manifest of the first peer in rank that
    /// answers (the owner's revision wins); their paths checked.
    async fn list(&self, name: &str) -> Result<Listing> {
        if let Some(routing) = &self.routing {
            let reference = modelcache_proto::Reference::parse(name)?;
            let routes = routing.routes(name);
            let what = format!("resolving {name} through a peer");
            let remote = ask_in_rank(
                &routes,
                routing.as_ref(),
                &what,
                || {},
                |peer| peer.resolve(&reference),
            )
            .await?;
            if let Some(remote) = remote {
                let files = remote.origin_files();
                self.check_paths(name, &files)?;
                return Ok(Listing {
                    files,
                    remote: Some(remote),
                });
            }
        }
        let files = self.origin.list_model(name).await?;
        self.check_paths(name, &files)?;
        Ok(Listing {
            files,
            remote: None,
        })
    }

    fn check_paths(&self, name: &str, files: &[OriginFile]) -> Result<()> {
        modelcache_proto::check_file_paths(files.iter().map(|f| f.path.as_str())).map_err(
            |source| Error::UnsafeModelPath {
                name: name.to_owned(),
                origin: self.origin.display().to_owned(),
                source,
            },
        )
    }

    fn fresh(&self, slot: &ModelSlot) -> Option<Resolved> {
        let state = slot.state();
        let validated = state.validated_at?;
        if validated.elapsed() > self.revalidate_after {
            return None;
        }
        Some(Resolved {
            revision: state.current.clone()?,
            stale_reason: state.stale_reason.clone(),
        })
    }

    /// The current revision of every model the node has.
    pub fn cached(&self) -> Vec<Arc<Revision>> {
        let models = self.models.lock().expect("catalog lock poisoned");
        models
            .values()
            .filter_map(|slot| slot.state().current.clone())
            .collect()
    }

    /// Names of the models in the origin and of those cached, sorted; only the cached ones
    /// when the origin cannot be listed.
    pub async fn names(&self) -> Vec<String> {
        let mut names = match self.origin.list_models().await {
            Ok(names) => names,
            Err(e) => {
                tracing::warn!("listing origin failed, listing cached models only: {e}");
                Vec::new()
            }
        };
        names.extend(self.cached().iter().map(|r| r.name.clone()));
        names.sort();
        names.dedup();
        names
    }
}

/// Takes what the owner knows of a revision this node just made from its manifest: the
/// chunk digests (every chunk filled later is checked against them) and the SHA-256s.
fn adopt_known(rev: &Revision, remote: &RemoteManifest) -> Result<()> {
    if rev.id != remote.revision {
        return Err(Error::Peer {
            peer: remote.peer.clone(),
            failure: PeerFailure::Mismatch,
            message: format!(
                "its manifest of {} says revision {}, its files give {} (nodes of another version?)",
                rev.name, remote.revision, rev.id
            ),
        });
    }
    for (f, file) in remote.files.iter().enumerate() {
        for (i, digest) in file.chunk_blake3.iter().enumerate() {
            rev.record_digest(f, i as u64, *digest);
        }
        if let Some(sha) = &file.sha256 {
            let _ = rev.files[f].sha256.set(sha.clone());
        }
    }
    Ok(())
}
