//! Wiring: from a validated config to running listeners, and back down.
//!
//! `start` does everything that can fail before any port is bound (state
//! file, certificates, token file), then binds, then spawns. `Running` is a
//! handle tests and `main` use to learn the bound addresses and to shut down.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::mpsc;

use crate::config::EtcdConfig;
use crate::config::{Config, FileErrors};
use crate::control_plane::admin::guard::GuardLayer;
use crate::control_plane::admin::ui::Ui;
use crate::control_plane::admin::{stats, Admin};
use crate::control_plane::control::{Control, ControlParts, Fleet};
use crate::control_plane::files::LoadedFiles;
use crate::control_plane::store::etcd::{EtcdStore, Presence, StoreEvent};
use crate::control_plane::store::{FileStore, StateStore};
use crate::data_plane::conn::Limits;
use crate::data_plane::conn_limit::ConnLimiter;
use crate::data_plane::drain::Drain;
use crate::data_plane::proxy::Proxy;
use crate::data_plane::server::{AcceptBackoff, AcceptErrors, Server};
use crate::data_plane::tls::ServerTls;
use crate::metrics::Metrics;

/// Options beside the config.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// The config file, for reloads (None: demo mode, no reload).
    pub config_path: Option<PathBuf>,
    /// Start from `initial` even if the state file is unreadable (it is
    /// moved aside, not deleted).
    pub ignore_state: bool,
    /// Worker runtimes to serve client connections on, each with its own
    /// `SO_REUSEPORT` listener (`crate::data_plane::workers`). Empty: serve on the
    /// calling runtime.
    pub workers: Vec<tokio::runtime::Handle>,
}

/// Why the proxy did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// State file unreadable or corrupt (SPEC §7).
    #[error(
        "{0} (start with --ignore-state to start from `initial`; the file is then moved aside)"
    )]
    State(#[from] crate::control_plane::store::StoreError),
    /// Certificate, key, token or CA file unusable.
    #[error("{0}")]
    Files(FileErrors),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// A running proxy.
pub struct Running {
    /// Bound address of the plain listener.
    pub proxy_addr: SocketAddr,
    /// Bound address of the TLS listener, if any.
    pub tls_addr: Option<SocketAddr>,
    /// Bound address of the admin listener.
    pub admin_addr: SocketAddr,
    /// The control plane.
    pub(crate) control: Arc<Control>,
    drain: Drain,
    admin_drain: Drain,
    ready: Arc<AtomicBool>,
    drain_timeout: Duration,
}

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    // Inherited by every accepted socket (the accept loop relies on it and
    // does not set it again per connection).
    socket.set_nodelay(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(4096).map_err(err)
}

/// Binds `n` listening sockets to one address with `SO_REUSEPORT`, as
/// std listeners to be registered on the worker runtimes. A plain bind
/// first makes sure nobody else holds the address (SO_REUSEPORT alone would
/// silently share it with another process) and resolves port 0.
async fn bind_shared(
    addr: SocketAddr,
    what: &'static str,
    n: usize,
) -> Result<Vec<std::net::TcpListener>, StartError> {
    let probe = bind(addr, what).await?;
    let resolved = probe
        .local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })?;
    drop(probe);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let err = |source| StartError::Bind {
            what,
            addr: resolved,
            source,
        };
        let socket = if resolved.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(err)?;
        socket.set_reuseaddr(true).map_err(err)?;
        socket.set_reuseport(true).map_err(err)?;
        socket.set_nodelay(true).map_err(err)?;
        socket.bind(resolved).map_err(err)?;
        let listener = socket.listen(4096).map_err(err)?;
        out.push(listener.into_std().map_err(err)?);
    }
    Ok(out)
}

/// Listeners of one address: one on this runtime, or one per worker.
enum Listeners {
    Here(TcpListener),
    PerWorker(Vec<std::net::TcpListener>),
}

impl Listeners {
    async fn bind(
        addr: SocketAddr,
        what: &'static str,
        workers: usize,
    ) -> Result<Listeners, StartError> {
        if workers == 0 {
            Ok(Listeners::Here(bind(addr, what).await?))
        } else {
            Ok(Listeners::PerWorker(
                bind_shared(addr, what, workers).await?,
            ))
        }
    }

    fn local_addr(&self) -> Result<SocketAddr, StartError> {
        let addr = match self {
            Listeners::Here(l) => l.local_addr(),
            Listeners::PerWorker(ls) => ls
                .first()
                .ok_or_else(|| std::io::Error::other("no listener"))
                .and_then(std::net::TcpListener::local_addr),
        };
        addr.map_err(|e| StartError::Other(e.to_string()))
    }

    /// Runs `serve` on each listener, on its worker runtime.
    fn serve<F, Fut>(self, workers: &[tokio::runtime::Handle], serve: F)
    where
        F: Fn(TcpListener) -> Fut + Send + Clone + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match self {
            Listeners::Here(l) => {
                tokio::spawn(serve(l));
            }
            Listeners::PerWorker(ls) => {
                for (l, handle) in ls.into_iter().zip(workers) {
                    let serve = serve.clone();
                    handle.spawn(async move {
                        // Registered with this worker's own IO driver.
                        match TcpListener::from_std(l) {
                            Ok(l) => serve(l).await,
                            Err(e) => tracing::error!(error = %e, "cannot register a listener on a worker"),
                        }
                    });
                }
            }
        }
    }
}

/// Fleet mode: the etcd store (its watch, presence and gauges running)
/// and the receiver of its events.
async fn start_fleet(
    cfg: &EtcdConfig,
    metrics: &Metrics,
    cache: FileStore,
    admin_addr: SocketAddr,
) -> Result<(Fleet, mpsc::Receiver<StoreEvent>), StartError> {
    let replica_id = cfg.replica_id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "switchyard".to_owned());
        format!("{host}:{}", admin_addr.port())
    });
    let store = EtcdStore::new(cfg, replica_id.clone(), metrics.fleet())
        .await
        .map_err(StartError::Other)?;
    let store = Arc::new(store);
    let (tx, rx) = mpsc::channel(64);
    let presence = Presence {
        id: replica_id,
        admin: admin_addr.to_string(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ..Presence::default()
    };
    let (presence, presence_rx) = tokio::sync::watch::channel(presence);
    store.spawn(tx, presence_rx);
    tracing::info!(endpoints = ?cfg.endpoints, prefix = %cfg.prefix, cluster = %cfg.cluster, "routing state in etcd (fleet mode)");
    Ok((
        Fleet {
            store,
            cache,
            presence,
        },
        rx,
    ))
}

/// Starts the proxy described by `config`. Must run inside a tokio runtime.
pub async fn start(config: Config, opts: StartOptions) -> Result<Running, StartError> {
    let metrics = Arc::new(Metrics::new());
    match crate::data_plane::conn_limit::raise_open_files_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(before, after, "open-file limit raised to the hard limit");
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "open-file limit left as it is"),
    }

    // 1. Everything that can fail on a file, before binding anything.
    let store = FileStore::new(config.state.path.clone());
    let fleet_mode = config.state.etcd.is_some();
    let stored = match store.load() {
        Ok(s) => s,
        // Fleet mode: the file is only a cache; etcd has the state.
        Err(e) if opts.ignore_state || fleet_mode => {
            let aside = store.set_aside().ok();
            let moved_to = aside.as_deref().map(|p| p.display().to_string());
            let moved_to = moved_to.unwrap_or_default();
            if fleet_mode {
                tracing::warn!(error = %e, %moved_to, "ignoring the unreadable cache file: waiting for etcd");
            } else {
                tracing::warn!(
                    error = %e,
                    %moved_to,
                    "ignoring the state file (--ignore-state): starting from `initial`"
                );
            }
            None
        }
        Err(e) => return Err(StartError::State(e)),
    };
    // The same loader as `check` and reload.
    let config_file = opts
        .config_path
        .clone()
        .unwrap_or_else(|| PathBuf::from("(config)"));
    let LoadedFiles { server_tls, tokens } =
        LoadedFiles::load(&config, &config_file).map_err(|e| StartError::Files(FileErrors(e)))?;
    let tls = server_tls.map(|c| Arc::new(ServerTls::new(c)));
    if !tokens.required() && !config.admin.listen.ip().is_loopback() {
        return Err(StartError::Other(format!(
            "admin.listen {} is not loopback: set admin.token_file",
            config.admin.listen
        )));
    }

    // 2. Bind.
    let n_workers = opts.workers.len();
    let proxy_listener = Listeners::bind(config.proxy.listen, "proxy.listen", n_workers).await?;
    let tls_listener = match config.proxy.tls_listen {
        Some(a) => Some(Listeners::bind(a, "proxy.tls_listen", n_workers).await?),
        None => None,
    };
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let local = |l: &TcpListener| l.local_addr().map_err(|e| StartError::Other(e.to_string()));
    let proxy_addr = proxy_listener.local_addr()?;
    let tls_addr = match &tls_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let admin_addr = local(&admin_listener)?;

    // 3. Control plane and first routing table.
    let limits = Limits {
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        max_request_header_bytes: config.proxy.max_request_header_bytes,
        max_headers: 128,
        max_concurrent_streams: 256,
    };
    let drain_timeout = config.proxy.drain_timeout;
    let conn_limits = ConnLimiter::new(
        config.proxy.max_connections,
        config.proxy.max_connections_per_client,
    );
    let accept_errors = Arc::new(AcceptErrors::default());
    let guard_hosts = config.admin.allowed_hosts.clone();
    let fleet = match &config.state.etcd {
        Some(cfg) => Some(start_fleet(cfg, &metrics, store.clone(), admin_addr).await?),
        None => None,
    };
    let store: Arc<dyn StateStore> = match &fleet {
        Some((f, _)) => Arc::clone(&f.store) as Arc<dyn StateStore>,
        None => Arc::new(store),
    };
    let control = Control::start(ControlParts {
        config,
        config_path: opts.config_path,
        stored,
        store,
        fleet,
        metrics: Arc::clone(&metrics),
        tls: tls.clone(),
        tokens: Arc::new(ArcSwap::from_pointee(tokens)),
        conn_limits: Arc::clone(&conn_limits),
    })
    .await
    .map_err(StartError::Other)?;
    // Rollouts that were running when the state was saved go on where they were.
    crate::control_plane::rollout::resume_all(&control).await;

    // 4. Serve.
    let drain = Drain::new();
    let proxy = Arc::new(Proxy::new(
        control.table(),
        control.changes(),
        Arc::clone(&metrics),
    ));
    let server = Arc::new(Server::new(
        proxy,
        Arc::clone(&metrics),
        limits,
        conn_limits,
        Arc::clone(&accept_errors),
        &opts.workers,
    ));
    {
        let (server, watcher, token) = (Arc::clone(&server), drain.watcher(), drain.token());
        proxy_listener.serve(&opts.workers, move |l| {
            Arc::clone(&server).serve_plain(l, watcher.clone(), token.clone())
        });
    }
    if let (Some(ls), Some(acceptor)) = (tls_listener, tls) {
        let (server, watcher, token) = (Arc::clone(&server), drain.watcher(), drain.token());
        ls.serve(&opts.workers, move |l| {
            Arc::clone(&server).serve_tls(l, Arc::clone(&acceptor), watcher.clone(), token.clone())
        });
    }
    let ready = Arc::new(AtomicBool::new(true));
    let admin = Arc::new(Admin::new(
        Arc::clone(&control),
        Arc::clone(&metrics),
        Arc::clone(&ready),
    ));
    let admin_drain = Drain::new();
    let ui = Arc::new(Ui::new(
        admin,
        Arc::clone(&control),
        stats::spawn(control.table(), admin_addr.to_string()),
        admin_drain.watcher(),
    ));
    let guard = GuardLayer::new(Arc::clone(&control), &guard_hosts);
    tokio::spawn(serve_admin(
        admin_listener,
        (ui, guard),
        accept_errors,
        admin_drain.watcher(),
        admin_drain.token(),
    ));

    tracing::info!(
        proxy = %proxy_addr,
        tls = %tls_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        admin = %admin_addr,
        "switchyard ready"
    );
    Ok(Running {
        proxy_addr,
        tls_addr,
        admin_addr,
        control,
        drain,
        admin_drain,
        ready,
        drain_timeout,
    })
}

impl Running {
    /// Graceful shutdown (SPEC §7): readiness fails, listeners stop
    /// accepting, connections finish their requests (HTTP/1.1 closes,
    /// HTTP/2 gets GOAWAY), bounded by `drain_timeout`. Returns true if
    /// everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.ready.store(false, Ordering::Relaxed);
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let clean = self.drain.drain(self.drain_timeout).await;
        self.admin_drain.drain(Duration::from_secs(1)).await;
        if clean {
            tracing::info!("drained; exiting");
        } else {
            tracing::warn!("drain_timeout reached with connections still open; exiting");
        }
        clean
    }
}

async fn serve_admin(
    listener: TcpListener,
    (ui, guard): (Arc<Ui>, GuardLayer),
    accept_errors: Arc<AcceptErrors>,
    mut drain: tokio::sync::watch::Receiver<()>,
    token: crate::data_plane::drain::DrainToken,
) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => {
                    backoff.reset();
                    x
                }
                Err(e) => {
                    accept_errors.failed(&e, "admin");
                    tokio::select! {
                        () = backoff.wait() => continue,
                        _ = drain.changed() => return,
                    }
                }
            },
            _ = drain.changed() => return,
        };
        let svc = crate::control_plane::admin::ui::stack(&ui, &guard, peer);
        let mut conn_drain = drain.clone();
        let token = token.clone();
        tokio::spawn(async move {
            let _token = token;
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024);
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = conn_drain.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept loop does not set TCP_NODELAY per connection: accepted
    /// sockets must inherit it from listeners made here, on either path.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let here = bind(any, "test").await.expect("bind");
        let shared = bind_shared(any, "test", 1).await.expect("bind shared");
        let shared =
            TcpListener::from_std(shared.into_iter().next().expect("one")).expect("register");
        for l in [here, shared] {
            let addr = l.local_addr().expect("address");
            let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (accepted, _) = l.accept().await.expect("accept");
            assert!(accepted.nodelay().expect("getsockopt"));
        }
    }
}
