//! The control plane: the one path every routing change takes.
//!
//! ```text
//! admin API / SIGHUP / (later) controllers
//!        │ Command                     │ reload
//!        ▼                             ▼
//!   state::apply (pure)         config::load + state::reconcile (pure)
//!        │ new state, or refusal (nothing changed)
//!        ▼
//!   StateStore::save   (durable before anyone is told)
//!        ▼
//!   build Snapshot → ArcSwap::store   (next request sees it)
//!        ▼
//!   metrics, log, `changes` tick
//! ```
//!
//! Changes are serialised by one async mutex; the request path never takes
//! it (it only loads the snapshot).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{watch, Mutex};

use crate::color::Color;
use crate::config::{BackendAddr, Config, ConfigErrors, ServiceConfig};
use crate::control_plane::admin::auth::Tokens;
use crate::control_plane::state::{
    self, ChangeMeta, Command, CommandError, HealthView, HistoryEntry, Outcome, RoutingState,
};
use crate::control_plane::store::{StateStore, StoreError};
use crate::data_plane::backend::{now_ms, Backend, Health};
use crate::data_plane::conn_limit::ConnLimiter;
use crate::data_plane::routing::{Pool, Route, Service, Settings, Snapshot};
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
    Files(String),
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
        }
    }
}

/// Runtime objects of one service, reused across snapshots while its
/// config (apart from its backend lists) is unchanged.
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
}

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
        } = parts;
        let state = state::reconcile(&stored.unwrap_or_default(), &config, SystemTime::now());
        let config = Arc::new(config);
        let mut inner = Inner {
            config: Arc::clone(&config),
            state,
            runtimes: HashMap::new(),
        };
        let built =
            build(&config, &inner.state, &inner.runtimes, &metrics).map_err(|e| e.join("; "))?;
        inner.state = save(&store, inner.state).await.map_err(|e| e.to_string())?;
        let snapshot = built.commit(&mut inner, &metrics);
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
        };
        {
            let inner = control.inner.lock().await;
            for (name, s) in &inner.state.services {
                control.metrics.set_weights(name, s.weights);
            }
        }
        Ok(Arc::new(control))
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
    pub(crate) async fn execute(
        &self,
        service: &str,
        cmd: Command,
        meta: ChangeMeta,
    ) -> Result<ServiceView, ControlError> {
        let mut inner = self.inner.lock().await;
        let outcome = {
            let snap = self.table.load();
            state::apply(&inner.state, service, &cmd, &meta, &**snap)?
        };
        let next = match outcome {
            Outcome::Unchanged => {
                drop(inner);
                return self
                    .view(service)
                    .ok_or_else(|| CommandError::UnknownService(service.to_string()).into());
            }
            Outcome::Changed(next) => next,
        };
        let (generation, weights) = (next.generation, next.weights);
        // The other services as they are, this one as `apply` made it (its
        // old history is not copied only to be replaced).
        let mut new_state = RoutingState {
            services: inner
                .state
                .services
                .iter()
                .filter(|(name, _)| name.as_str() != service)
                .map(|(name, s)| (name.clone(), s.clone()))
                .collect(),
        };
        new_state.services.insert(service.to_string(), next);
        // Building fails only if a CA file vanished since it was loaded.
        let built = build(&inner.config, &new_state, &inner.runtimes, &self.metrics)
            .map_err(|errors| ControlError::Build(errors.join("; ")))?;
        let new_state = save(&self.store, new_state).await?;
        let snapshot = built.commit(&mut inner, &self.metrics);
        inner.state = new_state;
        self.publish(snapshot);
        drop(inner);
        self.metrics.set_weights(service, weights);
        self.metrics.routing_change(service, cmd.action().as_str());
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
        let config = tokio::task::spawn_blocking(move || crate::config::load(&path2))
            .await
            .map_err(|e| ReloadError::Files(e.to_string()))?
            .map_err(ReloadError::Config)?;
        // Every file the config names must load before anything changes.
        let server_tls = match (&self.tls, config.proxy.tls_listen) {
            (Some(_), Some(_)) => Some(
                crate::data_plane::tls::server_config(&config.proxy.tls)
                    .map_err(|e| ReloadError::Files(e.join("; ")))?,
            ),
            _ => None,
        };
        let tokens = match &config.admin.token_file {
            Some(f) => Tokens::load(f).map_err(ReloadError::Files)?,
            None => Tokens::none(),
        };
        let mut inner = self.inner.lock().await;
        // CA files of services whose TLS settings are kept are re-read too.
        let mut upstream_tls = Vec::new();
        for svc in &config.services {
            let Some(rt) = inner.runtimes.get(&svc.name) else {
                continue;
            };
            if let (Some(tls), true) = (&rt.tls, same_static_part(&rt.config, svc)) {
                let fresh = tls.reread().map_err(|e| {
                    ReloadError::Files(format!("service \"{}\": upstream_ca: {e}", svc.name))
                })?;
                upstream_tls.push((Arc::clone(tls), fresh));
            }
        }
        warn_restart_only(&inner.config, &config);
        let new_state = state::reconcile(&inner.state, &config, SystemTime::now());
        let built = build(&config, &new_state, &inner.runtimes, &self.metrics)
            .map_err(|errors| ReloadError::Files(errors.join("; ")))?;
        let new_state = save(&self.store, new_state).await?;
        let snapshot = built.commit(&mut inner, &self.metrics);
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
        inner.state = new_state;
        self.publish(snapshot);
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

/// Persists `state` off the runtime threads; hands it back once it is
/// durable (moved there and back: the state, with every service's history,
/// is not copied for it).
async fn save(
    store: &Arc<dyn StateStore>,
    state: RoutingState,
) -> Result<RoutingState, StoreError> {
    let store = Arc::clone(store);
    match tokio::task::spawn_blocking(move || store.save(&state).map(|()| state)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Write {
            path: PathBuf::from("state"),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Does a service config differ in anything but its backend lists?
fn same_static_part(a: &ServiceConfig, b: &ServiceConfig) -> bool {
    let strip = |s: &ServiceConfig| {
        let mut s = s.clone();
        s.blue.clear();
        s.green.clear();
        s.line = 0;
        s
    };
    strip(a) == strip(b)
}

/// Builds the snapshot for `inner.state` under `inner.config`, creating
/// runtime objects for new services and backends. Only when the whole build
/// succeeds are backends that left their pools retired and the runtimes
/// replaced; on error `inner` is untouched.
fn build(
    config: &Config,
    state: &RoutingState,
    runtimes: &HashMap<String, ServiceRuntime>,
    metrics: &Arc<Metrics>,
) -> Result<Built, Vec<String>> {
    let mut errors = Vec::new();
    let mut next_runtimes: HashMap<String, ServiceRuntime> = HashMap::new();
    let mut routes = Vec::new();
    for svc in &config.services {
        let Some(st) = state.services.get(&svc.name) else {
            continue;
        };
        let old = runtimes.get(&svc.name);
        let first_build = old.is_none();
        let mut rt = match old {
            Some(rt) if same_static_part(&rt.config, svc) => rt.clone(),
            _ => {
                if svc.upstream_insecure_skip_verify {
                    tracing::warn!(service = %svc.name, "upstream_insecure_skip_verify is on: backend TLS certificates are NOT verified");
                }
                ServiceRuntime {
                    config: svc.clone(),
                    service: Arc::new(Service::new(
                        &svc.name,
                        svc.balance,
                        svc.sticky.clone(),
                        svc.preview.clone(),
                        [
                            metrics.pool(&svc.name, Color::Blue),
                            metrics.pool(&svc.name, Color::Green),
                        ],
                    )),
                    tls: None,
                    backends: HashMap::new(),
                }
            }
        };
        rt.config = svc.clone();
        if rt.tls.is_none() && needs_tls(svc, st) {
            match UpstreamTls::new(
                svc.upstream_ca.as_deref(),
                svc.upstream_insecure_skip_verify,
            ) {
                Ok(t) => rt.tls = Some(Arc::new(t)),
                Err(e) => {
                    errors.push(format!("service \"{}\": upstream_ca: {e}", svc.name));
                    continue;
                }
            }
        }
        let mut pools = Vec::with_capacity(2);
        let mut keep = HashMap::new();
        for color in Color::ALL {
            let mut list = Vec::new();
            for addr in &st.pools.get(color).backends {
                let key = (color, addr.clone());
                let backend = match rt.backends.get(&key) {
                    Some(b) => Arc::clone(b),
                    None => {
                        // Backends present at start (or named in the config)
                        // serve at once; ones added later through the API
                        // wait for their first passing check (SPEC §3). A
                        // backend rebuilt with its service (its settings
                        // changed on reload) keeps the health it had.
                        let from_config = svc.pool(color).contains(addr);
                        let before = old.and_then(|o| o.backends.get(&key)).map(|b| b.health());
                        let health = match before {
                            _ if svc.health.is_none() => Health::Healthy,
                            Some(h) => h,
                            None if first_build || from_config => Health::Healthy,
                            None => Health::Unknown,
                        };
                        let gauge = metrics.backend_healthy(&svc.name, color, &addr.to_string());
                        let b = Arc::new(Backend::new(
                            addr.clone(),
                            rt.tls.clone(),
                            health,
                            svc.health.is_some(),
                            gauge,
                        ));
                        if let Some(h) = &svc.health {
                            crate::data_plane::health::spawn_checker(
                                &b,
                                h.clone(),
                                Arc::clone(&rt.service.name),
                                color.as_str(),
                            );
                        }
                        b
                    }
                };
                list.push(Arc::clone(&backend));
                keep.insert(key, backend);
            }
            pools.push(Arc::new(Pool::new(list)));
        }
        rt.backends = keep;
        let green = pools.pop();
        let blue = pools.pop();
        let (Some(blue), Some(green)) = (blue, green) else {
            continue;
        };
        routes.push((
            Route {
                service: Arc::clone(&rt.service),
                weights: st.weights,
                generation: st.generation,
                pools: [blue, green],
            },
            svc.hosts.clone(),
            svc.path_prefix.clone(),
        ));
        next_runtimes.insert(svc.name.clone(), rt);
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Built {
        snapshot: Snapshot::new(routes, Settings::from_config(&config.proxy)),
        runtimes: next_runtimes,
    })
}

/// A snapshot and the runtimes behind it, not yet in force.
struct Built {
    snapshot: Snapshot,
    runtimes: HashMap<String, ServiceRuntime>,
}

impl Built {
    /// Makes the new runtimes current, retiring the backends that left, and
    /// returns the snapshot to publish.
    fn commit(self, inner: &mut Inner, metrics: &Metrics) -> Snapshot {
        for (name, old) in &inner.runtimes {
            let next = self.runtimes.get(name);
            for (key, b) in &old.backends {
                let kept = next
                    .and_then(|n| n.backends.get(key))
                    .is_some_and(|nb| Arc::ptr_eq(nb, b));
                if !kept {
                    b.retire();
                    match next.and_then(|n| n.backends.get(key)) {
                        // The same backend as a new object (its service was
                        // rebuilt): both share one gauge series, which
                        // `retire` just zeroed; give it the new one's value.
                        Some(nb) => {
                            nb.set_health(nb.health());
                        }
                        None => metrics.forget_backend(name, key.0, &key.1.to_string()),
                    }
                }
            }
        }
        inner.runtimes = self.runtimes;
        self.snapshot
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
