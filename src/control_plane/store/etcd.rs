//! Fleet mode (SPEC §11): routing state in etcd, shared by every replica of
//! a cluster.
//!
//! Keys (`P` = `[state.etcd] prefix`, `C` = `cluster`):
//!
//! ```text
//! P/C/services/<name>    one service's state, JSON (README "Running a fleet")
//! P/C/replicas/<id>      one replica's presence, JSON, on a lease
//! ```
//!
//! - Writes: one transaction per change, comparing each key's
//!   `mod_revision` with the one the change was made from (`create_revision
//!   == 0` for a new key). The loser gets [`StoreError::Conflict`]; the
//!   control plane re-reads, and `If-Match` then answers 412.
//! - Reads: one task ([`supervise`]) reads the prefix once, then watches it
//!   from the next revision. A watch that cannot resume (compacted), or an
//!   etcd whose revision went back or whose cluster changed (restored,
//!   wiped) gets a full re-read. Stream errors and silence (progress
//!   requests every second go unanswered for `stale_after`) reconnect with
//!   backoff and resume from the last revision seen; the start revision is
//!   never moved forward without an event.
//! - Presence: one task keeps a lease and puts this replica's key on it
//!   (the generation it serves per service, whether it is stale). Another
//!   watches the presence keys and wakes [`EtcdStore::departed`] when one
//!   goes (a replica's lease expired: it died or was cut off), so that a
//!   rollout it drove is taken over at once (`rollout::takeover`).
//! - etcd unreachable: nothing is swapped, so the last table keeps serving;
//!   writes are refused at once ([`StoreError::Unavailable`]) once the
//!   store has been silent for `stale_after`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, KeyValue, PutOptions, Txn,
    TxnOp, WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use super::{Change, Incoming, Rev, StateStore, StoreError, StoreFuture};
use crate::config::EtcdConfig;
use crate::control_plane::state::{RoutingState, ServiceState};
use crate::metrics::FleetMetrics;

/// Version of the service value format (`"schema"` in the JSON).
const SCHEMA: u64 = 1;

/// A service value larger than this is refused (etcd's own request limit
/// is 1.5 MiB).
const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// What the watch delivers to the control plane.
#[derive(Debug)]
pub(crate) enum StoreEvent {
    /// Every service under the prefix: the first read, or a re-read after
    /// the watch could not resume (`reason`: `compacted`, `restored`).
    Snapshot {
        /// Why it was re-read (`None`: the first read).
        reason: Option<&'static str>,
        /// Every service key.
        services: Vec<Incoming>,
    },
    /// Keys changed, in etcd's order.
    Changes(Vec<Incoming>),
}

/// One replica's presence key (`GET /api/v1/replicas`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Presence {
    /// `replica_id`.
    pub(crate) id: String,
    /// Its admin listener.
    pub(crate) admin: String,
    /// switchyard version.
    pub(crate) version: String,
    /// When it started, RFC 3339.
    pub(crate) started_at: String,
    /// The generation it serves, per service.
    pub(crate) services: BTreeMap<String, u64>,
    /// It has not heard from etcd for `stale_after`.
    pub(crate) stale: bool,
    /// Seconds since it last heard from etcd (0 while connected).
    pub(crate) staleness_seconds: f64,
    /// When this key was last written, Unix seconds.
    pub(crate) updated_at: u64,
}

/// Whether the replica hears from etcd.
#[derive(Debug)]
pub(crate) struct Health {
    base: Instant,
    /// Milliseconds after `base` of the last answer from etcd.
    last_contact_ms: AtomicU64,
    connected: AtomicBool,
    stale_after: Duration,
}

impl Health {
    fn new(stale_after: Duration) -> Health {
        Health {
            base: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            stale_after,
        }
    }

    fn contact(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_contact_ms.store(ms, Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    fn lost(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    /// Time since the last answer from etcd (since start if none yet).
    pub(crate) fn silence(&self) -> Duration {
        let last = Duration::from_millis(self.last_contact_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    /// Not connected, or silent for longer than `stale_after`.
    pub(crate) fn stale(&self) -> bool {
        !self.connected.load(Ordering::Relaxed) || self.silence() > self.stale_after
    }

    /// Seconds of silence while stale, else 0 (the gauge and `/readyz`).
    fn staleness_seconds(&self) -> f64 {
        if self.stale() {
            self.silence().as_secs_f64()
        } else {
            0.0
        }
    }

    /// The refusal of a write while stale: nothing is queued.
    pub(crate) fn check_fresh(&self) -> Result<(), StoreError> {
        if self.stale() {
            return Err(StoreError::Unavailable(format!(
                "no answer from etcd for {:.1}s",
                self.silence().as_secs_f64()
            )));
        }
        Ok(())
    }
}

/// The etcd store. See the module docs.
pub(crate) struct EtcdStore {
    client: Client,
    services_prefix: String,
    replicas_prefix: String,
    replica_id: String,
    request_timeout: Duration,
    lease_ttl: Duration,
    health: Health,
    metrics: FleetMetrics,
    departed: Notify,
}

impl EtcdStore {
    /// A store on `cfg`'s endpoints. Connecting is lazy: etcd may be down.
    pub(crate) async fn new(
        cfg: &EtcdConfig,
        replica_id: String,
        metrics: FleetMetrics,
    ) -> Result<EtcdStore, String> {
        let options = ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            .with_timeout(cfg.request_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let client = Client::connect(&cfg.endpoints, Some(options))
            .await
            .map_err(|e| format!("state.etcd.endpoints: {e}"))?;
        let base = format!("{}/{}", cfg.prefix, cfg.cluster);
        Ok(EtcdStore {
            client,
            services_prefix: format!("{base}/services/"),
            replicas_prefix: format!("{base}/replicas/"),
            replica_id,
            request_timeout: cfg.request_timeout,
            lease_ttl: cfg.lease_ttl,
            health: Health::new(cfg.stale_after),
            metrics,
            departed: Notify::new(),
        })
    }

    /// Whether the replica hears from etcd.
    pub(crate) fn health(&self) -> &Health {
        &self.health
    }

    /// This replica's id.
    pub(crate) fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// `lease_ttl`: how long a dead replica's presence key outlives it.
    pub(crate) fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    /// Woken when a replica's presence key is deleted (its lease expired
    /// or it shut down). A hint: the watch behind it may miss one while
    /// etcd is unreachable, so callers also look periodically.
    pub(crate) fn departed(&self) -> &Notify {
        &self.departed
    }

    /// Counts a value refused by the control plane.
    pub(crate) fn rejected(&self, service: &str) {
        self.metrics.rejected.with_label_values(&[service]).inc();
    }

    /// Starts the watch, the presence and the gauges; events go to `events`
    /// until it is closed.
    pub(crate) fn spawn(
        self: &Arc<Self>,
        events: mpsc::Sender<StoreEvent>,
        presence: watch::Receiver<Presence>,
    ) {
        tokio::spawn(supervise(Arc::clone(self), events));
        tokio::spawn(announce(Arc::clone(self), presence));
        tokio::spawn(watch_departures(Arc::clone(self)));
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(me) = me.upgrade() else { return };
                let stale = me.health.stale();
                me.metrics.connected.set(if stale { 0.0 } else { 1.0 });
                me.metrics.staleness.set(me.health.staleness_seconds());
            }
        });
    }

    fn key(&self, service: &str) -> String {
        format!("{}{service}", self.services_prefix)
    }

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(Ok(t)) => {
                self.health.contact();
                Ok(t)
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer from etcd within {:?}",
                self.request_timeout
            ))),
        }
    }

    /// Every live replica's presence.
    pub(crate) async fn replicas(&self) -> Result<Vec<Presence>, StoreError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_prefix();
        let resp = self
            .timed(kv.get(self.replicas_prefix.as_bytes(), Some(opts)))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Presence>(kv.value()).ok())
            .collect())
    }

    /// The ids of the replicas whose presence key exists (their lease is
    /// alive), from the key names: a replica whose value cannot be read
    /// is still alive.
    pub(crate) async fn live_replicas(&self) -> Result<Vec<String>, StoreError> {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_prefix().with_keys_only();
        let resp = self
            .timed(kv.get(self.replicas_prefix.as_bytes(), Some(opts)))
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key().strip_prefix(self.replicas_prefix.as_bytes()))
            .filter_map(|id| std::str::from_utf8(id).ok())
            .map(str::to_string)
            .collect())
    }

    /// `ctl state import`: writes `service` unless etcd holds it at the
    /// same or a newer generation (compare-and-swap on what was read, so a
    /// concurrent change wins). Returns whether it was written.
    pub(crate) async fn import(
        &self,
        service: &str,
        state: &ServiceState,
    ) -> Result<bool, StoreError> {
        let key = self.key(service);
        let mut kv = self.client.kv_client();
        let resp = self.timed(kv.get(key.as_str(), None)).await?;
        let compare = match resp.kvs().first() {
            Some(kv) => {
                if let Ok(held) = decode(kv.value()) {
                    if held.generation >= state.generation {
                        return Ok(false);
                    }
                }
                Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
            }
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when([compare]).and_then([TxnOp::put(
            key.as_str(),
            encode(service, state)?,
            None,
        )]);
        let mut kv = self.client.kv_client();
        Ok(self.timed(kv.txn(txn)).await?.succeeded())
    }
}

impl StateStore for EtcdStore {
    fn save<'a>(
        &'a self,
        state: &'a RoutingState,
        changes: &'a [Change],
    ) -> StoreFuture<'a, Vec<Rev>> {
        Box::pin(async move {
            self.health.check_fresh()?;
            let mut compares = Vec::with_capacity(changes.len());
            let mut ops = Vec::with_capacity(changes.len());
            for c in changes {
                let key = self.key(&c.service);
                compares.push(if c.base == 0 {
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, c.base)
                });
                ops.push(match state.services.get(&c.service) {
                    Some(s) => TxnOp::put(key.as_str(), encode(&c.service, s)?, None),
                    None => TxnOp::delete(key.as_str(), None),
                });
            }
            let txn = Txn::new().when(compares).and_then(ops);
            let mut kv = self.client.kv_client();
            let resp = self.timed(kv.txn(txn)).await?;
            if !resp.succeeded() {
                return Err(StoreError::Conflict {
                    service: changes
                        .first()
                        .map(|c| c.service.clone())
                        .unwrap_or_default(),
                });
            }
            let rev = resp.header().map_or(0, |h| h.revision());
            Ok(vec![rev; changes.len()])
        })
    }

    fn fetch<'a>(&'a self, service: &'a str) -> StoreFuture<'a, Option<Incoming>> {
        Box::pin(async move {
            let mut kv = self.client.kv_client();
            let resp = self.timed(kv.get(self.key(service), None)).await?;
            Ok(resp
                .kvs()
                .first()
                .and_then(|kv| incoming(&self.services_prefix, kv, false)))
        })
    }
}

/// The JSON of `service`'s value: the state with `"schema": 1`. Refused
/// above the size every replica's [`decode`] accepts, so that a value one
/// replica wrote is never one the others refuse.
fn encode(service: &str, state: &ServiceState) -> Result<Vec<u8>, StoreError> {
    let mut v = serde_json::to_value(state)
        .map_err(|e| StoreError::Unavailable(format!("cannot encode the state: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("schema".into(), SCHEMA.into());
    }
    let bytes = serde_json::to_vec(&v).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(StoreError::TooLarge {
            service: service.to_string(),
            size: bytes.len(),
            max: MAX_VALUE_BYTES,
        });
    }
    Ok(bytes)
}

/// A service value read from etcd, or why it is not one.
fn decode(bytes: &[u8]) -> Result<ServiceState, String> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(format!("{} bytes (at most {MAX_VALUE_BYTES})", bytes.len()));
    }
    let mut v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let o = v.as_object_mut().ok_or("not a JSON object")?;
    match o.remove("schema").and_then(|s| s.as_u64()) {
        Some(SCHEMA) => {}
        Some(other) => return Err(format!("schema {other} is not supported (expected 1)")),
        None => return Err("missing \"schema\": 1".into()),
    }
    serde_json::from_value(v).map_err(|e| e.to_string())
}

/// The service a key names, with its decoded value.
fn incoming(prefix: &str, kv: &KeyValue, deleted: bool) -> Option<Incoming> {
    let name = kv.key().strip_prefix(prefix.as_bytes())?;
    let service = std::str::from_utf8(name).ok()?.to_owned();
    if service.is_empty() || service.contains('/') {
        return None;
    }
    Some(Incoming {
        service,
        value: (!deleted).then(|| decode(kv.value())),
        rev: kv.mod_revision(),
    })
}

/// Exponential backoff with full jitter, 100 ms to 3 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::from_millis(100))
    }

    fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }

    async fn wait(&mut self) {
        let ms = u64::try_from(self.0.as_millis()).unwrap_or(3000);
        tokio::time::sleep(Duration::from_millis(fastrand::u64(ms / 2..=ms))).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(3));
    }
}

/// How a watch ended.
enum WatchEnd {
    /// The start revision was compacted away.
    Compacted,
    /// etcd's revision went back or its cluster changed.
    Restored,
    /// Stream error, end, or silence.
    Lost(String),
    /// Nobody listens any more.
    Closed,
}

/// Reads, then watches, for as long as the control plane listens.
async fn supervise(store: Arc<EtcdStore>, events: mpsc::Sender<StoreEvent>) {
    let mut backoff = Backoff::new();
    let mut last_rev: i64 = 0;
    let mut cluster_id: u64 = 0;
    let mut read: Option<Option<&'static str>> = Some(None);
    loop {
        if let Some(reason) = read {
            let mut kv = store.client.kv_client();
            let opts = GetOptions::new().with_prefix();
            match store
                .timed(kv.get(store.services_prefix.as_bytes(), Some(opts)))
                .await
            {
                Ok(resp) => {
                    let services = resp
                        .kvs()
                        .iter()
                        .filter_map(|kv| incoming(&store.services_prefix, kv, false))
                        .collect();
                    if let Some(h) = resp.header() {
                        last_rev = h.revision();
                        cluster_id = h.cluster_id();
                    }
                    if let Some(r) = reason {
                        store.metrics.resyncs.with_label_values(&[r]).inc();
                        tracing::warn!(reason = r, revision = last_rev, "state re-read from etcd");
                    }
                    if events
                        .send(StoreEvent::Snapshot { reason, services })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    read = None;
                    backoff.reset();
                }
                Err(e) => {
                    store.health.lost();
                    tracing::debug!(error = %e, "etcd read failed; retrying");
                    backoff.wait().await;
                    continue;
                }
            }
        }
        match watch_once(&store, &events, &mut last_rev, &mut cluster_id).await {
            WatchEnd::Compacted => read = Some(Some("compacted")),
            WatchEnd::Restored => read = Some(Some("restored")),
            WatchEnd::Closed => return,
            WatchEnd::Lost(why) => {
                if !store.health.stale() {
                    tracing::warn!(error = %why, "etcd watch lost; reconnecting");
                }
                store.health.lost();
                backoff.wait().await;
            }
        }
    }
}

/// One watch over the services prefix from `last_rev + 1`.
async fn watch_once(
    store: &EtcdStore,
    events: &mpsc::Sender<StoreEvent>,
    last_rev: &mut i64,
    cluster_id: &mut u64,
) -> WatchEnd {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*last_rev + 1)
        .with_progress_notify();
    let mut client = store.client.watch_client();
    let mut stream = match store
        .timed(client.watch(store.services_prefix.as_bytes(), Some(opts)))
        .await
    {
        Ok(s) => s,
        Err(e) => return WatchEnd::Lost(e.to_string()),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut heard = Instant::now();
    loop {
        tokio::select! {
            m = stream.message() => {
                let resp = match m {
                    Ok(Some(r)) => r,
                    Ok(None) => return WatchEnd::Lost("the watch stream ended".into()),
                    Err(e) => return WatchEnd::Lost(e.to_string()),
                };
                heard = Instant::now();
                store.health.contact();
                tracing::debug!(
                    created = resp.created(),
                    canceled = resp.canceled(),
                    compact_revision = resp.compact_revision(),
                    revision = resp.header().map_or(0, |h| h.revision()),
                    events = resp.events().len(),
                    from = *last_rev + 1,
                    "etcd watch response"
                );
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        return WatchEnd::Compacted;
                    }
                    return WatchEnd::Lost(format!("watch canceled: {}", resp.cancel_reason()));
                }
                if let Some(h) = resp.header() {
                    let moved = *cluster_id != 0 && h.cluster_id() != *cluster_id;
                    if moved || h.revision() < *last_rev {
                        return WatchEnd::Restored;
                    }
                }
                let mut batch = Vec::new();
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    *last_rev = (*last_rev).max(kv.mod_revision());
                    let deleted = ev.event_type() == EventType::Delete;
                    if let Some(i) = incoming(&store.services_prefix, kv, deleted) {
                        batch.push(i);
                    }
                }
                if !batch.is_empty() && events.send(StoreEvent::Changes(batch)).await.is_err() {
                    return WatchEnd::Closed;
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > store.health.stale_after {
                    return WatchEnd::Lost(format!("no answer from etcd for {:?}", heard.elapsed()));
                }
                if events.is_closed() {
                    return WatchEnd::Closed;
                }
                // Liveness only: a progress reply never moves `last_rev`.
                if let Err(e) = stream.request_progress().await {
                    return WatchEnd::Lost(e.to_string());
                }
            }
        }
    }
}

/// Watches the presence keys and wakes [`EtcdStore::departed`] on every
/// deletion, for as long as the process runs. Reconnects with backoff; a
/// deletion missed meanwhile is found by the periodic look.
async fn watch_departures(store: Arc<EtcdStore>) {
    let mut backoff = Backoff::new();
    loop {
        let opts = WatchOptions::new().with_prefix();
        let mut client = store.client.watch_client();
        if let Ok(mut stream) = store
            .timed(client.watch(store.replicas_prefix.as_bytes(), Some(opts)))
            .await
        {
            backoff.reset();
            while let Ok(Some(resp)) = stream.message().await {
                if resp.canceled() {
                    break;
                }
                if resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
                {
                    tracing::debug!("a replica's presence key is gone");
                    store.departed.notify_one();
                }
            }
        }
        backoff.wait().await;
    }
}

/// Keeps this replica's presence key on a lease, rewritten on every change
/// of what it serves and on every keep-alive.
async fn announce(store: Arc<EtcdStore>, mut presence: watch::Receiver<Presence>) {
    let key = format!("{}{}", store.replicas_prefix, store.replica_id);
    let ttl = i64::try_from(store.lease_ttl.as_secs())
        .unwrap_or(10)
        .max(2);
    let mut backoff = Backoff::new();
    loop {
        let mut lease = store.client.lease_client();
        let id = match store.timed(lease.grant(ttl, None)).await {
            Ok(g) => g.id(),
            Err(_) => {
                backoff.wait().await;
                continue;
            }
        };
        let Ok((mut keeper, mut replies)) = store.timed(lease.keep_alive(id)).await else {
            backoff.wait().await;
            continue;
        };
        let mut tick = tokio::time::interval(store.lease_ttl / 3);
        loop {
            let put = tokio::select! {
                _ = tick.tick() => {
                    if keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(store.request_timeout, replies.message()).await {
                        Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                        // Lease not found (expired in an outage), or no reply.
                        _ => break,
                    }
                    true
                }
                r = presence.changed() => {
                    if r.is_err() {
                        let mut lease = store.client.lease_client();
                        let _ = store.timed(lease.revoke(id)).await;
                        return;
                    }
                    true
                }
            };
            if put {
                let mut p = presence.borrow().clone();
                p.stale = store.health.stale();
                p.staleness_seconds = store.health.staleness_seconds();
                p.updated_at = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let Ok(json) = serde_json::to_vec(&p) else {
                    continue;
                };
                let mut kv = store.client.kv_client();
                let opts = PutOptions::new().with_lease(id);
                if store
                    .timed(kv.put(key.as_str(), json, Some(opts)))
                    .await
                    .is_err()
                {
                    break;
                }
                backoff.reset();
            }
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bad_ones_are_named() {
        let cfg = crate::config::Config::demo(
            "127.0.0.1:1".parse().expect("addr"),
            "127.0.0.1:2".parse().expect("addr"),
        );
        let state = crate::control_plane::state::reconcile(
            &RoutingState::default(),
            &cfg,
            SystemTime::UNIX_EPOCH,
        );
        let svc = state.services.values().next().expect("a service");
        let bytes = encode("web", svc).expect("encode");
        assert_eq!(decode(&bytes).as_ref(), Ok(svc));
        // A value the other replicas would refuse is never written.
        let mut big = svc.clone();
        big.pools.blue.backends = vec![svc.pools.blue.backends[0].clone(); 100_000];
        let e = encode("web", &big).expect_err("over 1 MiB");
        assert!(
            matches!(
                e,
                StoreError::TooLarge {
                    max: MAX_VALUE_BYTES,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("service `web`"), "{e}");
        assert!(decode(b"{").is_err());
        assert!(decode(b"[]").expect_err("array").contains("object"));
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        v["schema"] = 2.into();
        let e = decode(&serde_json::to_vec(&v).expect("json")).expect_err("schema 2");
        assert!(e.contains("schema 2"), "{e}");
        v["schema"] = 1.into();
        v["weights"] = serde_json::json!({"blue": 60, "green": 60});
        assert!(decode(&serde_json::to_vec(&v).expect("json")).is_err());
    }
}
