//! The control plane: the one path every routing change takes.
//!
//! ```text
//! admin API / SIGHUP / (later) controllers
//!        │ Command                     │ reload
//!        ▼                             ▼
//!   state::apply (pure)         config::load + state::reconcile (pure)
//!        │ new state, or refusal (nothing changed)
//!        ▼
//!   prepare (CA files; can fail, no side effect)
//!        ▼
//!   StateStore::save   (durable before anyone is told)
//!        ▼
//!   commit: backends, checkers, metric series → Snapshot
//!        ▼
//!   ArcSwap::store   (next request sees it)
//!        ▼
//!   metrics, log, `changes` tick
//! ```
//!
//! Changes are serialised by one async mutex; the request path never takes
//! it (it only loads the snapshot).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Mutex};

use crate::color::Color;
use crate::config::mirror::MirrorSpec;
use crate::config::rules::RuleSpec;
use crate::config::{BackendAddr, Config, ConfigErrors, FileError, FileErrors, ServiceConfig};
use crate::control_plane::admin::auth::Tokens;
use crate::control_plane::files::{upstream_ca_error, LoadedFiles};
use crate::control_plane::rollout::{self, machine::Rollout, plan::Plan};
use crate::control_plane::state::{
    self, ChangeMeta, Command, CommandError, HealthView, HistoryEntry, Outcome, RoutingState,
};
use crate::control_plane::store::etcd::{EtcdStore, Presence, StoreEvent};
use crate::control_plane::store::{Change, FileStore, Incoming, Rev, StateStore, StoreError};
use crate::data_plane::backend::{now_ms, Backend, Health};
use crate::data_plane::conn_limit::ConnLimiter;
use crate::data_plane::mirror::{Mirror, StatsView};
use crate::data_plane::routing::{Pool, Route, Rule, Service, Settings, Snapshot};
use crate::data_plane::tls::{ServerTls, UpstreamTls};
use crate::metrics::Metrics;
use crate::weights::Weights;

/// Why a change was not made. The running state is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ControlError {
    /// Refused by `apply`.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The routing table could not be built (a CA file went missing).
    #[error("cannot build the routing table: {0}; the change was not applied")]
    Build(String),
    /// The new state could not be persisted; it was not applied.
    #[error("{0}; the change was not applied")]
    Persist(#[from] StoreError),
}

/// Why a reload failed; the old config keeps running.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReloadError {
    /// There is no config file (demo mode).
    #[error("no config file to reload (demo mode)")]
    NoFile,
    /// The config file is invalid.
    #[error("{0}")]
    Config(ConfigErrors),
    /// A certificate, key, CA or token file is unusable.
    #[error("{0}")]
    Files(FileErrors),
    /// The reconciled state could not be persisted.
    #[error("{0}; the reload was not applied")]
    Persist(#[from] StoreError),
}

/// A backend in the admin API's service object.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct BackendView {
    /// `host:port` or `https://host:port`.
    pub(crate) addr: String,
    /// Takes traffic now (healthy and not ejected).
    pub(crate) healthy: bool,
    /// `healthy`, `unhealthy`, `unknown` (not checked yet) or `ejected`.
    pub(crate) state: &'static str,
    /// Requests in flight to it.
    pub(crate) in_flight: usize,
}

/// One pool in the service object.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolView {
    /// Its backends.
    pub(crate) backends: Vec<BackendView>,
}

/// Both pools.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PoolsView {
    /// Blue.
    pub(crate) blue: PoolView,
    /// Green.
    pub(crate) green: PoolView,
}

/// The service object of SPEC §4.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ServiceView {
    /// Name.
    pub(crate) name: String,
    /// `blue`, `green` or `split`.
    pub(crate) live: &'static str,
    /// Current weights.
    pub(crate) weights: Weights,
    /// Current generation.
    pub(crate) generation: u64,
    /// Pools and backends with health.
    pub(crate) pools: PoolsView,
    /// Targeting rules, in order (SPEC §8).
    pub(crate) rules: Vec<RuleSpec>,
    /// Traffic mirroring (SPEC §9); `null` when off.
    pub(crate) mirror: Option<MirrorSpec>,
}

impl ServiceView {
    /// The view of `route` as the table has it now.
    pub(crate) fn of(route: &Route) -> ServiceView {
        let now = now_ms();
        let pool = |c: Color| PoolView {
            backends: route
                .pool(c)
                .backends
                .iter()
                .map(|b| BackendView {
                    addr: b.label.clone(),
                    healthy: b.is_available(now),
                    state: match (b.health(), b.is_ejected()) {
                        (Health::Healthy, true) => "ejected",
                        (Health::Healthy, false) => "healthy",
                        (Health::Unhealthy, _) => "unhealthy",
                        (Health::Unknown, _) => "unknown",
                    },
                    in_flight: b.in_flight(),
                })
                .collect(),
        };
        ServiceView {
            name: route.service.name.to_string(),
            live: route.weights.live().as_str(),
            weights: route.weights,
            generation: route.generation,
            pools: PoolsView {
                blue: pool(Color::Blue),
                green: pool(Color::Green),
            },
            rules: route.rules.iter().map(|r| r.spec.clone()).collect(),
            mirror: route.mirror.as_ref().map(|m| m.spec.clone()),
        }
    }
}

/// `GET /api/v1/services/{name}/mirror`: the mirror (or `null`), the
/// generation, and the live counters of this replica.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MirrorView {
    /// Is a mirror set?
    pub(crate) enabled: bool,
    /// The mirror, when set.
    pub(crate) mirror: Option<MirrorSpec>,
    /// Generation of the routing state shown.
    pub(crate) generation: u64,
    /// Counters since the service was built (start, or a reload that
    /// changed its settings).
    pub(crate) counters: StatsView,
}

/// Runtime objects of one service. Its `Service` is reused while its config
/// (apart from backend lists and health) is unchanged; its backends while
/// their address and TLS settings are.
#[derive(Clone)]
struct ServiceRuntime {
    config: ServiceConfig,
    service: Arc<Service>,
    tls: Option<Arc<UpstreamTls>>,
    backends: HashMap<(Color, BackendAddr), Arc<Backend>>,
}

struct Inner {
    config: Arc<Config>,
    state: RoutingState,
    runtimes: HashMap<String, ServiceRuntime>,
    /// Fleet mode: the store's revision of each service's state as
    /// `state` has it (the base of the next compare-and-swap); absent: the
    /// store does not have it.
    revs: HashMap<String, Rev>,
}

impl Inner {
    fn changes(&self, services: impl IntoIterator<Item = String>) -> Vec<Change> {
        services
            .into_iter()
            .map(|service| Change {
                base: self.revs.get(&service).copied().unwrap_or(0),
                service,
            })
            .collect()
    }

    fn stored(&mut self, changes: &[Change], revs: &[Rev]) {
        for (c, rev) in changes.iter().zip(revs) {
            self.revs.insert(c.service.clone(), *rev);
        }
    }
}

/// Fleet mode (`[state] backend = "etcd"`): the shared store, the
/// last-known-good cache file, and this replica's presence.
pub(crate) struct Fleet {
    /// The etcd store (also `Control::store`).
    pub(crate) store: Arc<EtcdStore>,
    /// `[state] path`: written after every change served.
    pub(crate) cache: FileStore,
    /// What this replica announces.
    pub(crate) presence: watch::Sender<Presence>,
}

/// `/readyz` (SPEC §7, §11).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Readiness {
    /// Single replica: the table is loaded.
    Ready,
    /// Fleet mode, no table yet (no cache, etcd not reached).
    Starting,
    /// Fleet mode, in touch with etcd.
    Synced,
    /// Fleet mode, serving the last table; silent for this long.
    Stale(std::time::Duration),
}

/// The control plane. See the module docs.
pub(crate) struct Control {
    inner: Mutex<Inner>,
    table: Arc<ArcSwap<Snapshot>>,
    changes: watch::Sender<()>,
    store: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    config_path: Option<PathBuf>,
    tls: Option<Arc<ServerTls>>,
    tokens: Arc<ArcSwap<Tokens>>,
    conn_limits: Arc<ConnLimiter>,
    /// The running rollout drivers (SPEC §10).
    drivers: rollout::Drivers,
    fleet: Option<Fleet>,
    /// Fleet mode: the state to write to the cache file, by one task, in
    /// order (a burst of changes writes the last one).
    cache: Option<watch::Sender<RoutingState>>,
    /// Fleet mode: the table serves every configured service.
    has_table: AtomicBool,
}

/// How often a change that lost a compare-and-swap to another replica is
/// tried again on the winner's state before the caller is told.
const CONFLICT_RETRIES: usize = 8;

impl HealthView for Snapshot {
    fn pool_has_healthy(&self, service: &str, color: Color) -> bool {
        self.route(service)
            .is_some_and(|r| r.pool(color).has_available(now_ms()))
    }
}

/// Everything `Control::start` needs.
pub(crate) struct ControlParts {
    /// The validated config.
    pub(crate) config: Config,
    /// Its file (None in demo mode).
    pub(crate) config_path: Option<PathBuf>,
    /// The state loaded from the store (None: start from `initial`).
    pub(crate) stored: Option<RoutingState>,
    /// Where state is persisted.
    pub(crate) store: Arc<dyn StateStore>,
    /// Metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// The TLS acceptor, if a TLS listener is configured.
    pub(crate) tls: Option<Arc<ServerTls>>,
    /// Admin tokens.
    pub(crate) tokens: Arc<ArcSwap<Tokens>>,
    /// Client connection limits (changed on reload).
    pub(crate) conn_limits: Arc<ConnLimiter>,
    /// Fleet mode, with the receiver of the store's events.
    pub(crate) fleet: Option<(Fleet, mpsc::Receiver<StoreEvent>)>,
}

impl Control {
    /// Reconciles the stored state with the config, persists it, and
    /// publishes the first snapshot. Must run inside the runtime (health
    /// checks are spawned).
    pub(crate) async fn start(parts: ControlParts) -> Result<Arc<Control>, String> {
        let ControlParts {
            config,
            config_path,
            stored,
            store,
            metrics,
            tls,
            tokens,
            conn_limits,
            fleet,
        } = parts;
        let (fleet, events) = match fleet {
            Some((f, rx)) => (Some(f), Some(rx)),
            None => (None, None),
        };
        // Fleet mode without a cache file: no table until etcd answers
        // (never route from `initial` while etcd may hold a state).
        let has_table = fleet.is_none() || stored.is_some();
        let state = match (&stored, &fleet) {
            (None, Some(_)) => RoutingState::default(),
            _ => state::reconcile(&stored.unwrap_or_default(), &config, SystemTime::now()),
        };
        let config = Arc::new(config);
        let mut inner = Inner {
            config: Arc::clone(&config),
            state: RoutingState::default(),
            runtimes: HashMap::new(),
            revs: HashMap::new(),
        };
        let config_file = config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("(config)"));
        let prepared = prepare(&config, &config_file, &state, &inner.runtimes)
            .map_err(|e| FileErrors(e).to_string())?;
        if fleet.is_none() {
            let all = inner.changes(state.services.keys().cloned());
            store.save(&state, &all).await.map_err(|e| e.to_string())?;
        }
        // Fleet mode: the cache is served as it is, stale, until etcd
        // answers; nothing is written before that.
        let snapshot = prepared.commit(&config, &state, &mut inner, &metrics);
        inner.state = state;
        let (changes, _) = watch::channel(());
        let control = Control {
            table: Arc::new(ArcSwap::from_pointee(snapshot)),
            inner: Mutex::new(inner),
            changes,
            store,
            metrics,
            config_path,
            tls,
            tokens,
            conn_limits,
            drivers: rollout::Drivers::default(),
            cache: fleet.as_ref().map(|f| cache_writer(f.cache.clone())),
            fleet,
            has_table: AtomicBool::new(has_table),
        };
        {
            let inner = control.inner.lock().await;
            for (name, s) in &inner.state.services {
                control.metrics.set_weights(name, s.weights);
            }
            control.announce(&inner);
        }
        let control = Arc::new(control);
        if let Some(rx) = events {
            tokio::spawn(Arc::clone(&control).follow(rx));
        }
        Ok(control)
    }

    /// `/readyz`.
    pub(crate) fn readiness(&self) -> Readiness {
        let Some(fleet) = &self.fleet else {
            return Readiness::Ready;
        };
        if !self.has_table.load(Ordering::Relaxed) {
            return Readiness::Starting;
        }
        let health = fleet.store.health();
        if health.stale() {
            Readiness::Stale(health.silence())
        } else {
            Readiness::Synced
        }
    }

    /// Fleet mode: the etcd store.
    pub(crate) fn fleet(&self) -> Option<&Arc<EtcdStore>> {
        self.fleet.as_ref().map(|f| &f.store)
    }

    /// Fleet mode: after a change is served, the cache file and the
    /// presence key follow it (both best effort; the cache is written off
    /// the lock, the presence by its own task).
    fn announce(&self, inner: &Inner) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let services = inner
            .state
            .services
            .iter()
            .map(|(n, s)| (n.clone(), s.generation))
            .collect();
        // Only a change wakes the presence task (a rollout's record is
        // saved every few seconds without a new generation).
        fleet.presence.send_if_modified(|p| {
            let changed = p.services != services;
            p.services = services;
            changed
        });
        if let (Some(cache), false) = (&self.cache, inner.state.services.is_empty()) {
            cache.send_replace(inner.state.clone());
        }
    }

    /// Fleet mode: applies what the store delivers, for as long as it runs.
    async fn follow(self: Arc<Self>, mut events: mpsc::Receiver<StoreEvent>) {
        while let Some(ev) = events.recv().await {
            match ev {
                StoreEvent::Snapshot { reason, services } => {
                    {
                        // The snapshot's revisions are the compare-and-swap
                        // bases from now on, also when they went back (etcd
                        // restored). Keys gone from etcd (wiped, restored)
                        // are written again from what this replica serves:
                        // traffic is never routed from nothing.
                        self.inner.lock().await.revs.clear();
                    }
                    self.adopt(services).await;
                    if reason.is_some() {
                        tracing::info!(reason, "state re-read from etcd");
                    }
                    self.sync_config().await;
                }
                StoreEvent::Changes(changes) => {
                    let deleted = changes.iter().any(|c| c.value.is_none());
                    self.adopt(changes).await;
                    if deleted {
                        self.sync_config().await;
                    }
                }
            }
        }
    }

    /// Adopts values read from the store through [`state::apply`]
    /// (`Command::Adopt`), then publishes once. A value older than the one
    /// held is skipped; an invalid one is refused, counted and logged, and
    /// the service keeps its state (its revision is taken, so the next
    /// change here overwrites the bad value).
    async fn adopt(&self, incoming: Vec<Incoming>) {
        let mut inner = self.inner.lock().await;
        let now = SystemTime::now();
        let meta = ChangeMeta {
            actor: "store".into(),
            reason: None,
            at: now,
            if_match: None,
        };
        let mut next = inner.state.clone();
        let mut changed = Vec::new();
        // Services whose rollout record alone changed (its driver saved
        // progress, or a replica claimed it): nothing to rebuild.
        let mut records = 0;
        // Revisions of the values adopted below: recorded only once they
        // are served. A revision recorded for a value this replica does
        // not hold would let its next compare-and-swap overwrite that
        // value, decided on the state it replaced (a lost update).
        let mut adopted_revs = Vec::new();
        for inc in incoming {
            let held = inner.revs.get(&inc.service).copied().unwrap_or(0);
            if inc.rev <= held {
                continue;
            }
            if !inner.config.services.iter().any(|s| s.name == inc.service) {
                tracing::debug!(service = %inc.service, "state in etcd for a service this replica's config does not have");
                continue;
            }
            let Some(value) = inc.value else {
                inner.revs.remove(&inc.service);
                continue;
            };
            let result = value.map_err(|e| e.to_string()).and_then(|st| {
                let cmd = Command::Adopt {
                    state: Box::new(st),
                };
                let snap = self.table.load();
                state::apply(&next, &inc.service, &cmd, &meta, &**snap).map_err(|e| e.to_string())
            });
            match result {
                Ok(Outcome::Changed(st)) => {
                    let record_only = next
                        .services
                        .get(&inc.service)
                        .is_some_and(|cur| state::rollouts_only(cur, &st));
                    next.services.insert(inc.service.clone(), st);
                    adopted_revs.push((inc.service.clone(), inc.rev));
                    if record_only {
                        records += 1;
                    } else {
                        changed.push(inc.service);
                    }
                }
                // The value is the state served: its revision is ours.
                Ok(_) => {
                    inner.revs.insert(inc.service, inc.rev);
                }
                // Refused as invalid: the state served stays, and the next
                // local change may replace the bad value.
                Err(e) => {
                    inner.revs.insert(inc.service.clone(), inc.rev);
                    if let Some(f) = &self.fleet {
                        f.store.rejected(&inc.service);
                    }
                    tracing::error!(service = %inc.service, revision = inc.rev, error = %e, "invalid state in etcd refused; keeping the state served");
                }
            }
        }
        if changed.is_empty() {
            if records > 0 {
                inner.revs.extend(adopted_revs);
                inner.state = next;
                self.settle(&inner);
            }
            return;
        }
        let config = Arc::clone(&inner.config);
        let prepared = match prepare(&config, &self.config_file(), &next, &inner.runtimes) {
            Ok(p) => p,
            Err(errors) => {
                // Nothing adopted and no revision recorded: a local change
                // to these services loses its compare-and-swap (412) rather
                // than overwriting what it never saw.
                tracing::error!(error = %FileErrors(errors), "cannot build the routing table for the state from etcd");
                return;
            }
        };
        let snapshot = prepared.commit(&config, &next, &mut inner, &self.metrics);
        inner.revs.extend(adopted_revs);
        inner.state = next;
        self.publish(snapshot);
        self.settle(&inner);
        for name in &changed {
            if let Some(st) = inner.state.services.get(name) {
                self.metrics.set_weights(name, st.weights);
                tracing::info!(service = %name, generation = st.generation, weights = %st.weights, "routing adopted from etcd");
            }
        }
    }

    /// Fleet mode, after a publish: ready once every configured service is
    /// served; cache and presence follow.
    fn settle(&self, inner: &Inner) {
        if self.fleet.is_none() {
            return;
        }
        let all = inner
            .config
            .services
            .iter()
            .all(|s| inner.state.services.contains_key(&s.name));
        if all {
            self.has_table.store(true, Ordering::Relaxed);
        }
        self.announce(inner);
    }

    /// Fleet mode: brings the shared state in line with this replica's
    /// config (`Command::Reload` through `apply`): services etcd does not
    /// have are written (create-only: the first replica wins, keeping the
    /// generation this one serves), and pool or rules lists changed in the
    /// file are written by compare-and-swap. A lost race leaves the
    /// winner's value, which the watch delivers.
    async fn sync_config(&self) {
        for _ in 0..CONFLICT_RETRIES {
            let mut inner = self.inner.lock().await;
            let config = Arc::clone(&inner.config);
            let next = state::reconcile(&inner.state, &config, SystemTime::now());
            let names: Vec<String> = next
                .services
                .iter()
                .filter(|(n, s)| {
                    !inner.revs.contains_key(*n) || inner.state.services.get(*n) != Some(*s)
                })
                .map(|(n, _)| n.clone())
                .collect();
            if names.is_empty() {
                return;
            }
            let changes = inner.changes(names);
            let prepared = match prepare(&config, &self.config_file(), &next, &inner.runtimes) {
                Ok(p) => p,
                Err(errors) => {
                    tracing::error!(error = %FileErrors(errors), "cannot build the routing table");
                    return;
                }
            };
            match self.store.save(&next, &changes).await {
                Ok(revs) => {
                    inner.stored(&changes, &revs);
                    let snapshot = prepared.commit(&config, &next, &mut inner, &self.metrics);
                    inner.state = next;
                    self.publish(snapshot);
                    for (name, s) in &inner.state.services {
                        self.metrics.set_weights(name, s.weights);
                    }
                    self.settle(&inner);
                    return;
                }
                Err(StoreError::Conflict { .. }) => {
                    drop(inner);
                    self.refresh(&changes).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the config's services to etcd; retried on the next event");
                    return;
                }
            }
        }
    }

    /// Re-reads services that lost a compare-and-swap and adopts them.
    async fn refresh(&self, changes: &[Change]) {
        let mut got = Vec::new();
        for c in changes {
            match self.store.fetch(&c.service).await {
                Ok(Some(i)) => got.push(i),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(service = %c.service, error = %e, "cannot re-read a service")
                }
            }
        }
        self.adopt(got).await;
    }

    /// The routing table the data plane reads.
    pub(crate) fn table(&self) -> Arc<ArcSwap<Snapshot>> {
        Arc::clone(&self.table)
    }

    /// Ticks whenever the table is swapped.
    pub(crate) fn changes(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Admin tokens (swapped on reload).
    pub(crate) fn tokens(&self) -> Arc<Tokens> {
        self.tokens.load_full()
    }

    /// Every service, in config order.
    pub(crate) fn views(&self) -> Vec<ServiceView> {
        self.table
            .load()
            .routes
            .iter()
            .map(ServiceView::of)
            .collect()
    }

    /// One service.
    pub(crate) fn view(&self, name: &str) -> Option<ServiceView> {
        self.table.load().route(name).map(ServiceView::of)
    }

    /// The rules of a service and the generation they belong to.
    pub(crate) fn rules(&self, name: &str) -> Option<(Vec<RuleSpec>, u64)> {
        let snap = self.table.load();
        let route = snap.route(name)?;
        Some((
            route.rules.iter().map(|r| r.spec.clone()).collect(),
            route.generation,
        ))
    }

    /// The mirror of a service with its counters.
    pub(crate) fn mirror(&self, name: &str) -> Option<MirrorView> {
        let snap = self.table.load();
        let route = snap.route(name)?;
        let mirror = route.mirror.as_ref().map(|m| m.spec.clone());
        Some(MirrorView {
            enabled: mirror.is_some(),
            mirror,
            generation: route.generation,
            counters: route.service.mirror.view(),
        })
    }

    /// The outcome counters of mirrored copies sent to `pool` of a service
    /// (for a rollout's mirror step), if the service exists.
    pub(crate) fn mirror_outcomes(
        &self,
        name: &str,
        pool: crate::color::Color,
    ) -> Option<crate::data_plane::mirror::OutcomeCounts> {
        let snap = self.table.load();
        Some(snap.route(name)?.service.mirror.outcomes(pool))
    }

    /// History of a service, newest first.
    pub(crate) async fn history(&self, name: &str) -> Option<Vec<HistoryEntry>> {
        let inner = self.inner.lock().await;
        inner
            .state
            .services
            .get(name)
            .map(|s| s.history.iter().rev().cloned().collect())
    }

    /// Applies a command: decide, persist, publish. Returns the new view.
    /// In fleet mode the service is first read from etcd (this replica's
    /// view may lag its watch), and a change that lost a compare-and-swap
    /// to another replica is decided again on the winner's state (so
    /// `If-Match` then answers 412).
    pub(crate) async fn execute(
        &self,
        service: &str,
        cmd: Command,
        meta: ChangeMeta,
    ) -> Result<ServiceView, ControlError> {
        let mut attempt = 0;
        loop {
            // Fleet mode: decide on etcd's latest value, not on a view that
            // may lag the watch by a few milliseconds (a switch judged
            // "already so", or a 412, against a stale view would be wrong).
            if let Some(f) = &self.fleet {
                f.store
                    .health()
                    .check_fresh()
                    .map_err(ControlError::Persist)?;
                match self.store.fetch(service).await {
                    Ok(Some(latest)) => self.adopt(vec![latest]).await,
                    Ok(None) => {}
                    Err(e) => return Err(ControlError::Persist(e)),
                }
            }
            match self.execute_once(service, &cmd, &meta).await {
                Err(ControlError::Persist(StoreError::Conflict { .. }))
                    if attempt < CONFLICT_RETRIES =>
                {
                    attempt += 1;
                    let changes = [Change {
                        service: service.to_string(),
                        base: 0,
                    }];
                    self.refresh(&changes).await;
                }
                other => return other,
            }
        }
    }

    async fn execute_once(
        &self,
        service: &str,
        cmd: &Command,
        meta: &ChangeMeta,
    ) -> Result<ServiceView, ControlError> {
        let cmd = cmd.clone();
        let mut inner = self.inner.lock().await;
        let outcome = {
            let snap = self.table.load();
            state::apply(&inner.state, service, &cmd, meta, &**snap)?
        };
        let next = match outcome {
            Outcome::Unchanged | Outcome::Removed => {
                drop(inner);
                return self
                    .view(service)
                    .ok_or_else(|| CommandError::UnknownService(service.to_string()).into());
            }
            Outcome::Changed(next) => next,
        };
        if inner
            .state
            .services
            .get(service)
            .is_some_and(|cur| state::rollouts_only(cur, &next))
        {
            // A rollout claim: the record alone, no routing change.
            let new_state = inner.state.with_service(service, next);
            let changes = inner.changes([service.to_string()]);
            let revs = self.store.save(&new_state, &changes).await?;
            inner.stored(&changes, &revs);
            inner.state = new_state;
            self.settle(&inner);
            drop(inner);
            return self
                .view(service)
                .ok_or_else(|| CommandError::UnknownService(service.to_string()).into());
        }
        let (generation, weights) = (next.generation, next.weights);
        let gone_rules: Vec<String> = inner
            .state
            .services
            .get(service)
            .map(|old| {
                old.rules
                    .rules
                    .iter()
                    .filter(|r| !next.rules.rules.iter().any(|n| n.name == r.name))
                    .map(|r| r.name.clone())
                    .collect()
            })
            .unwrap_or_default();
        // The other services as they are, this one as `apply` made it.
        let new_state = inner.state.with_service(service, next);
        // Building fails only if a CA file vanished since it was loaded.
        let prepared = prepare(
            &inner.config,
            &self.config_file(),
            &new_state,
            &inner.runtimes,
        )
        .map_err(|errors| ControlError::Build(FileErrors(errors).to_string()))?;
        let changes = inner.changes([service.to_string()]);
        let revs = self.store.save(&new_state, &changes).await?;
        inner.stored(&changes, &revs);
        let config = Arc::clone(&inner.config);
        let snapshot = prepared.commit(&config, &new_state, &mut inner, &self.metrics);
        inner.state = new_state;
        self.publish(snapshot);
        self.settle(&inner);
        drop(inner);
        self.metrics.set_weights(service, weights);
        self.metrics.routing_change(service, cmd.action().as_str());
        for rule in gone_rules {
            self.metrics.forget_rule(service, &rule);
        }
        tracing::info!(
            service,
            action = cmd.action().as_str(),
            generation,
            weights = %weights,
            actor = %meta.actor,
            reason = meta.reason.as_deref().unwrap_or(""),
            "routing changed"
        );
        self.view(service)
            .ok_or_else(|| CommandError::UnknownService(service.to_string()).into())
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The running rollout drivers.
    pub(crate) fn drivers(&self) -> &rollout::Drivers {
        &self.drivers
    }

    /// Does `service` exist (in the running state)?
    pub(crate) async fn has_service(&self, service: &str) -> bool {
        self.inner.lock().await.state.services.contains_key(service)
    }

    /// The generation of `service`.
    pub(crate) async fn generation(&self, service: &str) -> Option<u64> {
        let inner = self.inner.lock().await;
        inner.state.services.get(service).map(|s| s.generation)
    }

    /// Does `color` of `service` have a backend that takes traffic now?
    pub(crate) fn pool_has_healthy(&self, service: &str, color: Color) -> bool {
        self.table.load().pool_has_healthy(service, color)
    }

    /// Weights, generation and last rollout of `service`.
    pub(crate) async fn rollout_facts(
        &self,
        service: &str,
    ) -> Option<(Weights, u64, Option<Rollout>)> {
        let inner = self.inner.lock().await;
        let s = inner.state.services.get(service)?;
        Some((s.weights, s.generation, s.rollouts.back().cloned()))
    }

    /// Every rollout of `service`, oldest first.
    pub(crate) async fn rollouts(&self, service: &str) -> Option<Vec<Rollout>> {
        let inner = self.inner.lock().await;
        let s = inner.state.services.get(service)?;
        Some(s.rollouts.iter().cloned().collect())
    }

    /// Fleet mode: the replica that drives the rollout `record` now, if
    /// the state names one other than `record`'s (it was taken over).
    pub(crate) async fn driven_elsewhere(&self, record: &Rollout) -> Option<String> {
        let inner = self.inner.lock().await;
        let held = inner
            .state
            .services
            .get(&record.service)?
            .rollouts
            .iter()
            .rev()
            .find(|r| r.id == record.id)?;
        driven_elsewhere(held, record).map(str::to_string)
    }

    /// The rollouts that were running when the state was saved.
    pub(crate) async fn active_rollouts(&self) -> Vec<Rollout> {
        let inner = self.inner.lock().await;
        inner
            .state
            .services
            .values()
            .filter_map(|s| s.active_rollout().cloned())
            .collect()
    }

    /// The `[[rollout_plan]]` called `name`.
    pub(crate) async fn rollout_plan(&self, name: &str) -> Option<Plan> {
        let inner = self.inner.lock().await;
        inner
            .config
            .rollout_plans
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .cloned()
    }

    /// Persists a rollout record of `service` (its driver is the only
    /// caller), with the weights it wants if they differ from the current
    /// ones: then a new generation, recorded in history as a `split` by
    /// `meta.actor` (`rollout:<id>`), and published like any change.
    pub(crate) async fn commit_rollout(
        &self,
        service: &str,
        record: Rollout,
        weights: Option<Weights>,
        meta: &ChangeMeta,
    ) -> Result<(), ControlError> {
        let mut inner = self.inner.lock().await;
        let current = inner
            .state
            .services
            .get(service)
            .ok_or_else(|| CommandError::UnknownService(service.to_string()))?;
        let mut next = current.clone();
        // By id: a driver that ended may still save its final counts after
        // the next rollout started; its record stays where it is.
        match next.rollouts.iter_mut().rev().find(|r| r.id == record.id) {
            Some(slot) => {
                // Fleet mode: another replica took the rollout over (this
                // one was cut off from etcd, or thought dead): its record
                // is the rollout now, and this driver must stop.
                if let Some(other) = driven_elsewhere(slot, &record) {
                    return Err(CommandError::RolloutDrivenElsewhere {
                        id: record.id.clone(),
                        driver: other.to_string(),
                    }
                    .into());
                }
                *slot = record
            }
            None => {
                // Two starts racing: the second finds the first here (the
                // lock serialises them) and is refused.
                if let Some(active) = next.active_rollout() {
                    return Err(CommandError::RolloutActive(active.id.clone()).into());
                }
                next.rollouts.push_back(record);
                while next.rollouts.len() > rollout::ROLLOUTS_LIMIT {
                    next.rollouts.pop_front();
                }
            }
        }
        let new_weights = weights.filter(|w| *w != current.weights);
        if let Some(w) = new_weights {
            if let crate::weights::Live::Full(c) = current.weights.live() {
                next.previous = Some(c);
            }
            next.weights = w;
            next.generation = current.generation + 1;
            let entry = HistoryEntry {
                generation: next.generation,
                at: humantime::format_rfc3339_seconds(meta.at).to_string(),
                action: state::Action::Split,
                from: current.weights,
                to: w,
                reason: meta.reason.clone(),
                actor: meta.actor.clone(),
                pool: None,
                rules: None,
                mirror: None,
            };
            state::push_history(&mut next, entry);
        }
        let generation = next.generation;
        let new_state = inner.state.with_service(service, next);
        let changes = inner.changes([service.to_string()]);
        let prepared = match new_weights {
            None => None,
            Some(_) => Some(
                prepare(
                    &inner.config,
                    &self.config_file(),
                    &new_state,
                    &inner.runtimes,
                )
                .map_err(|errors| ControlError::Build(FileErrors(errors).to_string()))?,
            ),
        };
        let revs = match self.store.save(&new_state, &changes).await {
            Ok(revs) => revs,
            Err(e) => {
                if let StoreError::Conflict { .. } = e {
                    // Another writer changed the service: read it now, so
                    // that the driver's next try (or its ownership check)
                    // sees what won.
                    drop(inner);
                    self.refresh(&changes).await;
                }
                return Err(e.into());
            }
        };
        inner.stored(&changes, &revs);
        let (Some(w), Some(prepared)) = (new_weights, prepared) else {
            inner.state = new_state;
            self.settle(&inner);
            return Ok(());
        };
        let config = Arc::clone(&inner.config);
        let snapshot = prepared.commit(&config, &new_state, &mut inner, &self.metrics);
        inner.state = new_state;
        self.publish(snapshot);
        self.settle(&inner);
        drop(inner);
        self.metrics.set_weights(service, w);
        self.metrics.routing_change(service, "split");
        tracing::info!(
            service,
            action = "split",
            generation,
            weights = %w,
            actor = %meta.actor,
            reason = meta.reason.as_deref().unwrap_or(""),
            "routing changed"
        );
        Ok(())
    }

    /// Re-reads the config file (and certificate and token files). A bad
    /// file keeps everything as it was; the error names it.
    pub(crate) async fn reload(&self) -> Result<(), ReloadError> {
        let result = self.reload_inner().await;
        self.metrics.config_reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("config reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "config reload failed; keeping the running config")
            }
        }
        result
    }

    async fn reload_inner(&self) -> Result<(), ReloadError> {
        let path = self.config_path.as_ref().ok_or(ReloadError::NoFile)?;
        let path2 = path.clone();
        let files_error = |e: Vec<FileError>| ReloadError::Files(FileErrors(e));
        let (config, files) = tokio::task::spawn_blocking(move || {
            let config = crate::config::load(&path2).map_err(ReloadError::Config)?;
            // Every file the config names must load before anything
            // changes: the same loader as `check` and start.
            let files = LoadedFiles::load(&config, &path2).map_err(files_error)?;
            Ok::<_, ReloadError>((config, files))
        })
        .await
        .map_err(|e| files_error(vec![FileError::new(path, 0, e.to_string())]))??;
        let LoadedFiles { server_tls, tokens } = files;
        // A TLS listener added by the reload starts only after a restart
        // (its files were checked all the same).
        let server_tls = server_tls.filter(|_| self.tls.is_some());
        let mut inner = self.inner.lock().await;
        // CA files of services whose TLS settings are kept are re-read too.
        let mut upstream_tls = Vec::new();
        for svc in &config.services {
            let Some(rt) = inner.runtimes.get(&svc.name) else {
                continue;
            };
            if let (Some(tls), true) = (&rt.tls, same_tls(&rt.config, svc)) {
                let fresh = tls
                    .reread()
                    .map_err(|e| files_error(vec![upstream_ca_error(path, svc, &e)]))?;
                upstream_tls.push((Arc::clone(tls), fresh));
            }
        }
        warn_restart_only(&inner.config, &config);
        let new_state = state::reconcile(&inner.state, &config, SystemTime::now());
        let prepared = prepare(&config, path, &new_state, &inner.runtimes).map_err(files_error)?;
        let changes = inner.changes(changed_services(&inner.state, &new_state));
        if !changes.is_empty() || self.fleet.is_none() {
            let revs = self.store.save(&new_state, &changes).await?;
            inner.stored(&changes, &revs);
        }
        let snapshot = prepared.commit(&config, &new_state, &mut inner, &self.metrics);
        let (max_connections, max_per_client) = (
            config.proxy.max_connections,
            config.proxy.max_connections_per_client,
        );
        inner.config = Arc::new(config);
        let removed: Vec<String> = inner
            .state
            .services
            .keys()
            .filter(|k| !new_state.services.contains_key(*k))
            .cloned()
            .collect();
        // Match counters of rules the reload removed (or whose service left).
        let gone_rules: Vec<(String, String)> = inner
            .state
            .services
            .iter()
            .flat_map(|(name, old)| {
                let kept = new_state.services.get(name).map(|s| &s.rules.rules);
                old.rules
                    .rules
                    .iter()
                    .filter(move |r| !kept.is_some_and(|k| k.iter().any(|n| n.name == r.name)))
                    .map(move |r| (name.clone(), r.name.clone()))
            })
            .collect();
        for name in &removed {
            inner.revs.remove(name);
        }
        inner.state = new_state;
        self.publish(snapshot);
        self.settle(&inner);
        for (name, rule) in &gone_rules {
            self.metrics.forget_rule(name, rule);
        }
        for (name, s) in &inner.state.services {
            self.metrics.set_weights(name, s.weights);
        }
        for name in removed {
            self.metrics.forget_service(&name);
        }
        drop(inner);
        for (tls, fresh) in upstream_tls {
            tls.install(fresh);
        }
        if let (Some(acceptor), Some(cfg)) = (&self.tls, server_tls) {
            acceptor.replace(cfg);
        }
        self.tokens.store(Arc::new(tokens));
        // From the next accept on; open connections are left alone.
        self.conn_limits.set_limits(max_connections, max_per_client);
        Ok(())
    }

    /// The config file, for error messages (a placeholder in demo mode).
    fn config_file(&self) -> PathBuf {
        self.config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("(config)"))
    }

    fn publish(&self, snapshot: Snapshot) {
        self.table.store(Arc::new(snapshot));
        self.changes.send_replace(());
    }
}

fn warn_restart_only(old: &Config, new: &Config) {
    let mut changed = Vec::new();
    if old.proxy.listen != new.proxy.listen {
        changed.push("proxy.listen");
    }
    if old.proxy.tls_listen != new.proxy.tls_listen {
        changed.push("proxy.tls_listen");
    }
    if old.proxy.workers != new.proxy.workers {
        changed.push("proxy.workers");
    }
    if old.admin.listen != new.admin.listen {
        changed.push("admin.listen");
    }
    if old.state.path != new.state.path {
        changed.push("state.path");
    }
    if old.proxy.header_read_timeout != new.proxy.header_read_timeout
        || old.proxy.idle_timeout != new.proxy.idle_timeout
        || old.proxy.max_request_header_bytes != new.proxy.max_request_header_bytes
    {
        changed.push("proxy.{header_read_timeout,idle_timeout,max_request_header_bytes}");
    }
    if !changed.is_empty() {
        tracing::warn!(keys = %changed.join(", "), "changed in the config file but take effect only after a restart");
    }
}

/// Fleet mode: one task writes the cache file, the newest state each time
/// (writes never overlap, and a burst of changes is written once).
fn cache_writer(cache: FileStore) -> watch::Sender<RoutingState> {
    let (tx, mut rx) = watch::channel(RoutingState::default());
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let state = rx.borrow_and_update().clone();
            if let Err(e) = cache.save_async(&state).await {
                tracing::warn!(error = %e, "cannot write the state cache file");
            }
        }
    });
    tx
}

/// The driver `held` names, if it is not the one `mine` names: another
/// replica took the rollout over.
fn driven_elsewhere<'a>(held: &'a Rollout, mine: &Rollout) -> Option<&'a str> {
    match (held.driver.as_deref(), mine.driver.as_deref()) {
        (Some(theirs), m) if m != Some(theirs) => Some(theirs),
        _ => None,
    }
}

/// The services that differ between two states (added, changed, removed).
fn changed_services(old: &RoutingState, new: &RoutingState) -> Vec<String> {
    let mut names: Vec<String> = new
        .services
        .iter()
        .filter(|(n, s)| old.services.get(*n) != Some(*s))
        .map(|(n, _)| n.clone())
        .collect();
    names.extend(
        old.services
            .keys()
            .filter(|n| !new.services.contains_key(*n))
            .cloned(),
    );
    names
}

/// Does a service config differ in anything but its backend lists and
/// rules (both routing state) and the health check (which kept backends
/// take over)? Then its `Service` (balance, sticky, preview, retry budget)
/// is rebuilt.
fn same_static_part(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    let strip = |s: &ServiceConfig| {
        let mut s = s.clone();
        s.blue.clear();
        s.green.clear();
        s.health = None;
        s.rules.clear();
        s.line = 0;
        s
    };
    strip(a) == strip(b)
}

/// Do two service configs reach their backends with the same TLS settings?
/// Then the service keeps its `UpstreamTls` (and its `https://` backends).
fn same_tls(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    a.upstream_ca == b.upstream_ca
        && a.upstream_insecure_skip_verify == b.upstream_insecure_skip_verify
}

/// The half of a change that can fail: every service's upstream TLS
/// settings (CA files are read here). It has no side effect: no backend,
/// health checker or metric series exists until [`Prepared::commit`], which
/// runs only once the new state is persisted, so a refused or unsaved change
/// leaves nothing behind.
fn prepare(
    config: &Config,
    config_file: &Path,
    state: &RoutingState,
    runtimes: &HashMap<String, ServiceRuntime>,
) -> Result<Prepared, Vec<FileError>> {
    let mut errors = Vec::new();
    let mut tls = HashMap::new();
    for svc in &config.services {
        let Some(st) = state.services.get(&svc.name) else {
            continue;
        };
        let kept = runtimes
            .get(&svc.name)
            .filter(|rt| same_tls(&rt.config, svc))
            .and_then(|rt| rt.tls.clone());
        let t = match kept {
            Some(t) => Some(t),
            None if needs_tls(svc, st) => match UpstreamTls::new(
                svc.upstream_ca.as_deref(),
                svc.upstream_insecure_skip_verify,
            ) {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    errors.push(upstream_ca_error(config_file, svc, &e));
                    continue;
                }
            },
            None => None,
        };
        tls.insert(svc.name.clone(), t);
    }
    if errors.is_empty() {
        Ok(Prepared { tls })
    } else {
        Err(errors)
    }
}

/// A change that will succeed, not yet in force.
struct Prepared {
    /// Upstream TLS per service (`None`: no `https://` backend, no CA).
    tls: HashMap<String, Option<Arc<UpstreamTls>>>,
}

impl Prepared {
    /// Builds the snapshot for `state` under `config` and makes its runtimes
    /// current: creates new services and backends (with their metric series
    /// and health checkers), retires the backends that left, and returns the
    /// snapshot to publish. Call only after `state` is persisted.
    ///
    /// A backend whose pool and address are unchanged is kept, the same
    /// `Arc<Backend>`, whatever else changed (balance, sticky, preview,
    /// health, hosts): its pooled connections, health, ejection record and
    /// upgraded connections carry on (issue 17 item 5). Only a change of
    /// the service's TLS settings replaces its `https://` backends.
    fn commit(
        self,
        config: &Config,
        state: &RoutingState,
        inner: &mut Inner,
        metrics: &Arc<Metrics>,
    ) -> Snapshot {
        let mut next_runtimes: HashMap<String, ServiceRuntime> = HashMap::new();
        let mut routes = Vec::new();
        for svc in &config.services {
            let (Some(st), Some(tls)) = (state.services.get(&svc.name), self.tls.get(&svc.name))
            else {
                continue;
            };
            let old = inner.runtimes.get(&svc.name);
            let first_build = old.is_none();
            let service = match old {
                Some(rt) if same_static_part(&rt.config, svc) => Arc::clone(&rt.service),
                _ => {
                    if svc.upstream_insecure_skip_verify {
                        tracing::warn!(service = %svc.name, "upstream_insecure_skip_verify is on: backend TLS certificates are NOT verified");
                    }
                    Arc::new(Service::new(
                        &svc.name,
                        svc.balance,
                        svc.sticky.clone(),
                        svc.preview.clone(),
                        [
                            metrics.pool(&svc.name, Color::Blue),
                            metrics.pool(&svc.name, Color::Green),
                        ],
                    ))
                }
            };
            let health_changed = old.is_some_and(|o| o.config.health != svc.health);
            let mut backends = HashMap::new();
            let mut pools = Color::ALL.map(|color| {
                let mut list = Vec::new();
                for addr in &st.pools.get(color).backends {
                    let key = (color, addr.clone());
                    let before = old.and_then(|o| o.backends.get(&key));
                    let reusable = before.filter(|b| {
                        addr.scheme == crate::config::Scheme::Http
                            || same_arc(b.tls(), tls.as_ref())
                    });
                    let backend = match reusable {
                        Some(b) => {
                            if health_changed {
                                b.set_checked(svc.health.is_some());
                                match &svc.health {
                                    Some(h) => crate::data_plane::health::spawn_checker(
                                        b,
                                        h.clone(),
                                        Arc::clone(&service.name),
                                        color.as_str(),
                                    ),
                                    // Stops the checker it had.
                                    None => {
                                        b.claim_checker();
                                    }
                                }
                            }
                            Arc::clone(b)
                        }
                        None => new_backend(
                            svc,
                            color,
                            addr,
                            tls.clone(),
                            before.map(|b| b.health()),
                            first_build,
                            &service,
                            metrics,
                        ),
                    };
                    list.push(Arc::clone(&backend));
                    backends.insert(key, backend);
                }
                Some(Arc::new(Pool::new(list)))
            });
            let (Some(blue), Some(green)) = (pools[0].take(), pools[1].take()) else {
                continue;
            };
            // Rules were validated by the config parser and by `apply`;
            // one that still fails to compile is logged and left out.
            let mut rules = Vec::with_capacity(st.rules.rules.len());
            for spec in &st.rules.rules {
                match Rule::compile(spec, metrics.rule_matches(&svc.name, &spec.name)) {
                    Ok(r) => rules.push(r),
                    Err(e) => tracing::error!(service = %svc.name, "rule left out: {e}"),
                }
            }
            routes.push((
                Route {
                    service: Arc::clone(&service),
                    weights: st.weights,
                    generation: st.generation,
                    pools: [blue, green],
                    rules: rules.into_boxed_slice(),
                    mirror: st.mirror.as_ref().map(|spec| {
                        Box::new(Mirror::new(
                            (**spec).clone(),
                            metrics.mirror(&svc.name, spec.to),
                        ))
                    }),
                },
                svc.hosts.clone(),
                svc.path_prefix.clone(),
            ));
            next_runtimes.insert(
                svc.name.clone(),
                ServiceRuntime {
                    config: svc.clone(),
                    service,
                    tls: tls.clone(),
                    backends,
                },
            );
        }
        for (name, old) in &inner.runtimes {
            let next = next_runtimes.get(name);
            for (key, b) in &old.backends {
                let kept = next
                    .and_then(|n| n.backends.get(key))
                    .is_some_and(|nb| Arc::ptr_eq(nb, b));
                if !kept {
                    b.retire();
                    match next.and_then(|n| n.backends.get(key)) {
                        // The same backend as a new object (its TLS settings
                        // changed): both share one gauge series, which
                        // `retire` just zeroed; give it the new one's value.
                        Some(nb) => {
                            nb.set_health(nb.health());
                        }
                        None => metrics.forget_backend(name, key.0, &key.1.to_string()),
                    }
                }
            }
        }
        inner.runtimes = next_runtimes;
        Snapshot::new(routes, Settings::from_config(&config.proxy))
    }
}

/// A backend new to its pool, with its gauge series and health checker.
#[allow(clippy::too_many_arguments)]
fn new_backend(
    svc: &ServiceConfig,
    color: Color,
    addr: &BackendAddr,
    tls: Option<Arc<UpstreamTls>>,
    before: Option<Health>,
    first_build: bool,
    service: &Service,
    metrics: &Metrics,
) -> Arc<Backend> {
    // Backends present at start (or named in the config) serve at once;
    // ones added later through the API wait for their first passing check
    // (SPEC §3). A backend rebuilt (its TLS settings changed on reload)
    // keeps the health it had.
    let from_config = svc.pool(color).contains(addr);
    let health = match before {
        _ if svc.health.is_none() => Health::Healthy,
        Some(h) => h,
        None if first_build || from_config => Health::Healthy,
        None => Health::Unknown,
    };
    let gauge = metrics.backend_healthy(&svc.name, color, &addr.to_string());
    let b = Arc::new(Backend::new(
        addr.clone(),
        tls,
        health,
        svc.health.is_some(),
        gauge,
    ));
    if let Some(h) = &svc.health {
        crate::data_plane::health::spawn_checker(
            &b,
            h.clone(),
            Arc::clone(&service.name),
            color.as_str(),
        );
    }
    b
}

/// Do two optional `Arc`s point to the same value (or are both `None`)?
fn same_arc<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn needs_tls(svc: &ServiceConfig, st: &state::ServiceState) -> bool {
    svc.upstream_ca.is_some()
        || Color::ALL.iter().any(|c| {
            st.pools
                .get(*c)
                .backends
                .iter()
                .any(|b| b.scheme == crate::config::Scheme::Https)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::store::memory::MemoryStore;

    fn meta(if_match: Option<u64>) -> ChangeMeta {
        ChangeMeta {
            actor: "test".into(),
            reason: None,
            at: SystemTime::UNIX_EPOCH,
            if_match,
        }
    }

    /// The demo config's control plane on an in-memory store (the shared
    /// store's compare-and-swap without etcd).
    async fn on_memory_store() -> (Arc<MemoryStore>, Arc<Control>) {
        let store = Arc::new(MemoryStore::default());
        let config = Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        let control = Control::start(ControlParts {
            config,
            config_path: None,
            stored: None,
            store: Arc::clone(&store) as Arc<dyn StateStore>,
            metrics: Arc::new(Metrics::new()),
            tls: None,
            tokens: Arc::new(ArcSwap::from_pointee(Tokens::none())),
            conn_limits: ConnLimiter::new(100, 0),
            fleet: None,
        })
        .await
        .expect("start");
        (store, control)
    }

    /// The fleet write path on the in-memory store: a change based on a
    /// state another writer has replaced loses the compare-and-swap, is
    /// decided again on the winner's state (adopted through `apply`), and
    /// `If-Match` on the old generation then answers 412.
    #[tokio::test]
    async fn a_lost_compare_and_swap_is_decided_again_on_the_winner() {
        let (store, control) = on_memory_store().await;
        let (first, _) = store.get("demo").expect("stored at start");
        assert_eq!(first.generation, 1);
        // Another replica splits 30 % (generation 2) behind our back.
        let mut theirs = first.clone();
        theirs.generation = 2;
        theirs.weights = Weights::from_green_percent(30.0).expect("weights");
        store.put("demo", theirs);
        // Ours, guarded by the generation we saw: 412, nothing written.
        let switch = Command::Switch {
            to: Color::Green,
            force: true,
        };
        let err = control
            .execute("demo", switch.clone(), meta(Some(1)))
            .await
            .expect_err("stale");
        assert!(matches!(
            err,
            ControlError::Command(CommandError::StaleGeneration {
                expected: 1,
                current: 2
            })
        ));
        let view = control.view("demo").expect("view");
        assert_eq!((view.generation, view.weights.green_bp()), (2, 3000));
        // Unguarded: applied on top of theirs.
        let view = control
            .execute("demo", switch, meta(None))
            .await
            .expect("switch");
        assert_eq!(view.generation, 3);
        let (stored, _) = store.get("demo").expect("stored");
        assert_eq!(stored.generation, 3);
        assert_eq!(stored.weights, Weights::full(Color::Green));
        let gens: Vec<u64> = stored.history.iter().map(|h| h.generation).collect();
        assert_eq!(
            gens,
            vec![1, 3],
            "the history the other writer stored, then ours"
        );
    }
    /// Issue 13 item 8: a driver whose replica was cut off while another
    /// claimed its rollout never writes the record again. Its first write
    /// loses the compare-and-swap (and reads the claim); its next is
    /// refused because the record names the other driver, which is what
    /// stops its task (`Control::driven_elsewhere`).
    #[tokio::test]
    async fn a_stale_driver_loses_to_the_claim_and_learns_of_it() {
        let (store, control) = on_memory_store().await;
        let plan = Plan::from_json(&serde_json::json!({"steps": [
            {"weight": 20, "pause": "1m"}, {"weight": 100}
        ]}))
        .expect("plan");
        let mut mine = Rollout::start("demo-1".into(), "demo".into(), plan, Color::Green, "t0");
        mine.driver = Some("a".into());
        // The store's revision of the service, as the watch gives it.
        let demo = Change {
            service: "demo".into(),
            base: 0,
        };
        control.refresh(std::slice::from_ref(&demo)).await;
        control
            .commit_rollout("demo", mine.clone(), None, &meta(None))
            .await
            .expect("a starts it");
        assert_eq!(control.driven_elsewhere(&mine).await, None);
        // b claims it in the store (a was cut off).
        let (mut held, _) = store.get("demo").expect("stored");
        if let Some(r) = held.rollouts.back_mut() {
            r.take_over("b", "t5");
        }
        store.put("demo", held);
        // a's next save, based on what it knew: lost, and the claim read.
        mine.step_elapsed_ms = 9000;
        let err = control
            .commit_rollout("demo", mine.clone(), None, &meta(None))
            .await
            .expect_err("stale base");
        assert!(
            matches!(err, ControlError::Persist(StoreError::Conflict { .. })),
            "{err}"
        );
        assert_eq!(control.driven_elsewhere(&mine).await.as_deref(), Some("b"));
        // And from then on refused outright: b's record stays.
        let err = control
            .commit_rollout("demo", mine.clone(), None, &meta(None))
            .await
            .expect_err("driven elsewhere");
        assert!(
            matches!(
                err,
                ControlError::Command(CommandError::RolloutDrivenElsewhere { .. })
            ),
            "{err}"
        );
        let (stored, _) = store.get("demo").expect("stored");
        let r = stored.rollouts.back().expect("record");
        assert_eq!((r.driver.as_deref(), r.step_elapsed_ms), (Some("b"), 0));
    }
}
