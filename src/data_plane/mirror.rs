//! Traffic mirroring (SPEC §9): copies of live requests sent to the idle
//! pool, their answers compared with the live ones and then discarded.
//!
//! ```text
//! forward ─ route.mirror? ──no──▶ (nothing: one branch on the route)
//!              │ yes
//!              ▼
//!   Mirror::select: pool choice ≠ `to`, not preview, not an upgrade,
//!   method listed, hash(request id) < percent; then (counted when they
//!   fail) body ≤ max_body_bytes, a slot under max_inflight, a backend of
//!   `to` available now
//!              ▼
//!   Pending::launch: small body already held → cloned; streamed body →
//!   a Tee in the live upload keeps the chunks (≤ max_body_bytes) and
//!   hands them over at the end; tokio::spawn(copy task)
//!              ▼
//!   copy task: wait for the body, one exchange with the chosen backend
//!   under `timeout`, no retry, no failover; response drained (≤ 64 KiB)
//!   and dropped; metrics; pair with the live status → mismatch
//! ```
//!
//! The client never waits for a copy: the tee only clones `Bytes` handles
//! (reference counts, no copy of the data) into a vector that is never
//! full, so nothing in it can push back on the live upload; past
//! `max_body_bytes` it stops keeping chunks and the copy is dropped. The
//! copy task holds its own backend connection, never the client's.
//!
//! Copies never reach [`crate::metrics`]' `switchyard_requests_total`
//! (they have no `Exchange`), never count towards passive ejection (a
//! mirror observes the pool, it does not act on it), and are never sent to
//! the pool the live request used.
//!
//! # What the rollout analysis reads
//!
//! Each `Service` keeps a [`MirrorStats`] for its whole life (it outlives
//! routing snapshots): per pool a [`PoolOutcomes`] of relaxed atomics,
//! read with [`MirrorStats::outcomes`] into a plain [`OutcomeCounts`]:
//! `requests` (copies answered or failed), `failures` (5xx, timeout,
//! connect/reset error), `latency_us_sum` and `latency_buckets`
//! (cumulative-free counts per [`LATENCY_BOUNDS_MS`] bucket, for
//! quantiles), and the paired outcomes of copies whose live answer is
//! known: `pairs`, `mirror_failed_live_ok` and `live_failed_mirror_ok`
//! (the discordant pairs of a McNemar-style test). Counters only grow; a
//! reader takes differences between two reads.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{Method, Request, StatusCode};
use tokio::sync::oneshot;

use crate::color::Color;
use crate::config::mirror::MirrorSpec;
use crate::data_plane::backend::{now_ms, Backend, UpstreamBody};
use crate::data_plane::exchange::pool_header;
use crate::data_plane::headers::X_SWITCHYARD_POOL;
use crate::data_plane::routing::{bucket_of_key, Decision, PoolChoice, Route, Settings};
use crate::metrics::MirrorMetrics;

/// `x-switchyard-mirror: 1` marks a copy, so that applications can skip
/// side effects.
pub(crate) static X_SWITCHYARD_MIRROR: HeaderName = HeaderName::from_static("x-switchyard-mirror");

/// Most of a copy's response body read before the connection is dropped.
const DRAIN_MAX: usize = 64 * 1024;

/// Upper bounds (ms) of the latency buckets in [`PoolOutcomes`]; the last
/// bucket counts everything above the last bound.
pub const LATENCY_BOUNDS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// Why a copy was dropped (`reason` label of
/// `switchyard_mirror_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dropped {
    /// `max_inflight` copies were already in flight.
    MaxInflight,
    /// The request body is over `max_body_bytes`.
    BodyTooLarge,
    /// The mirror pool had no available backend.
    NoHealthyBackend,
    /// The live request body did not complete (client gone, body error,
    /// or the live backend answered before reading it all).
    BodyAborted,
}

impl Dropped {
    /// Every reason, in label order.
    pub(crate) const ALL: [Dropped; 4] = [
        Dropped::MaxInflight,
        Dropped::BodyTooLarge,
        Dropped::NoHealthyBackend,
        Dropped::BodyAborted,
    ];

    /// Label value.
    pub(crate) const fn label(self) -> &'static str {
        match self {
            Dropped::MaxInflight => "max_inflight",
            Dropped::BodyTooLarge => "body_too_large",
            Dropped::NoHealthyBackend => "no_healthy_backend",
            Dropped::BodyAborted => "body_aborted",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// How a copy ended (`code` label of `switchyard_mirror_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyOutcome {
    /// The mirror backend answered with this status.
    Status(u16),
    /// No answer within `timeout`.
    Timeout,
    /// Connect failed, or the connection broke.
    Error,
}

impl CopyOutcome {
    /// Index into [`crate::metrics::MIRROR_CODES`].
    pub(crate) fn code_index(self) -> usize {
        match self {
            CopyOutcome::Status(s) => usize::from((s / 100).clamp(1, 5) - 1),
            CopyOutcome::Timeout => 5,
            CopyOutcome::Error => 6,
        }
    }

    /// A failure as the analysis counts it: 5xx, timeout, error.
    fn failed(self) -> bool {
        !matches!(self, CopyOutcome::Status(s) if s < 500)
    }

    /// The status class compared with the live one (1..=5); a copy with
    /// no answer is compared as a 5xx, what the proxy would have answered.
    fn class(self) -> u32 {
        match self {
            CopyOutcome::Status(s) => u32::from((s / 100).clamp(1, 5)),
            CopyOutcome::Timeout | CopyOutcome::Error => 5,
        }
    }
}

/// Outcome counters of the copies sent to one pool (relaxed atomics).
#[derive(Debug, Default)]
pub struct PoolOutcomes {
    requests: AtomicU64,
    failures: AtomicU64,
    latency_us_sum: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BOUNDS_MS.len() + 1],
    pairs: AtomicU64,
    mirror_failed_live_ok: AtomicU64,
    live_failed_mirror_ok: AtomicU64,
}

/// A read of [`PoolOutcomes`]: plain numbers, all only growing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct OutcomeCounts {
    /// Copies answered or failed.
    pub requests: u64,
    /// Of which failed: 5xx, timeout, connect or reset error.
    pub failures: u64,
    /// Sum of their latencies (send to end of the drained body), µs.
    pub latency_us_sum: u64,
    /// Copies per latency bucket of [`LATENCY_BOUNDS_MS`] (last: above).
    pub latency_buckets: [u64; LATENCY_BOUNDS_MS.len() + 1],
    /// Copies whose live answer is known too.
    pub pairs: u64,
    /// Pairs where the copy failed and the live request did not.
    pub mirror_failed_live_ok: u64,
    /// Pairs where the live request failed (5xx) and the copy did not.
    pub live_failed_mirror_ok: u64,
}

impl PoolOutcomes {
    fn record(&self, outcome: CopyOutcome, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if outcome.failed() {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us_sum.fetch_add(us, Ordering::Relaxed);
        let ms = us / 1000;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms < b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    fn read(&self) -> OutcomeCounts {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut buckets = [0; LATENCY_BOUNDS_MS.len() + 1];
        for (out, a) in buckets.iter_mut().zip(&self.latency_buckets) {
            *out = get(a);
        }
        OutcomeCounts {
            requests: get(&self.requests),
            failures: get(&self.failures),
            latency_us_sum: get(&self.latency_us_sum),
            latency_buckets: buckets,
            pairs: get(&self.pairs),
            mirror_failed_live_ok: get(&self.mirror_failed_live_ok),
            live_failed_mirror_ok: get(&self.live_failed_mirror_ok),
        }
    }
}

/// The mirroring counters of one service, kept for the life of its
/// `Service` (across routing snapshots). The in-flight count is the
/// `max_inflight` cap: an atomic, never a lock.
#[derive(Debug, Default)]
pub struct MirrorStats {
    in_flight: AtomicUsize,
    sent: AtomicU64,
    dropped: [AtomicU64; Dropped::ALL.len()],
    mismatches: AtomicU64,
    pools: [PoolOutcomes; 2],
}

/// A read of [`MirrorStats`] (the `counters` of `GET …/mirror`).
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct StatsView {
    /// Copies in flight now.
    pub(crate) in_flight: usize,
    /// Copies sent to a backend.
    pub(crate) sent: u64,
    /// Copies dropped, by reason.
    pub(crate) dropped: std::collections::BTreeMap<&'static str, u64>,
    /// Pairs whose status classes differed.
    pub(crate) mismatches: u64,
    /// Outcomes per mirror pool.
    pub(crate) pools: std::collections::BTreeMap<&'static str, OutcomeCounts>,
}

impl MirrorStats {
    /// The outcome counters of copies sent to `pool`.
    pub fn outcomes(&self, pool: Color) -> OutcomeCounts {
        self.pools[pool.index()].read()
    }

    /// Copies in flight now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Status-class mismatches so far.
    pub fn mismatches(&self) -> u64 {
        self.mismatches.load(Ordering::Relaxed)
    }

    /// Everything, for the admin API.
    pub(crate) fn view(&self) -> StatsView {
        StatsView {
            in_flight: self.in_flight(),
            sent: self.sent.load(Ordering::Relaxed),
            dropped: Dropped::ALL
                .iter()
                .map(|d| (d.label(), self.dropped[d.index()].load(Ordering::Relaxed)))
                .collect(),
            mismatches: self.mismatches(),
            pools: Color::ALL
                .iter()
                .map(|c| (c.as_str(), self.outcomes(*c)))
                .collect(),
        }
    }

    /// Takes an in-flight slot, unless `max` are taken.
    fn try_slot(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let taken = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        taken.then(|| Slot(Arc::clone(self)))
    }
}

/// One in-flight copy, released on drop.
struct Slot(Arc<MirrorStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A service's mirror, compiled from its checked [`MirrorSpec`] when the
/// routing snapshot is built.
pub struct Mirror {
    /// As written (admin API views).
    pub(crate) spec: MirrorSpec,
    methods: Box<[Method]>,
    metrics: Arc<MirrorMetrics>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror").field("spec", &self.spec).finish()
    }
}

impl Mirror {
    /// Compiles a checked spec; methods that are not valid tokens (the
    /// spec's check refuses them) are left out.
    pub(crate) fn new(spec: MirrorSpec, metrics: MirrorMetrics) -> Mirror {
        let methods = spec
            .methods
            .iter()
            .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
            .collect();
        Mirror {
            spec,
            methods,
            metrics: Arc::new(metrics),
        }
    }

    fn drop_copy(&self, route: &Route, why: Dropped) {
        route.service.mirror.dropped[why.index()].fetch_add(1, Ordering::Relaxed);
        self.metrics.dropped[why.index()].inc();
    }

    /// Decides whether this request is copied and, if it is, reserves an
    /// in-flight slot and a backend of the mirror pool. `parts` is the
    /// upstream head (after rewriting); `body_len` the exact body length if
    /// known; `upgrade` whether it asks for a protocol upgrade.
    pub(crate) fn select(
        &self,
        route: &Route,
        parts: &http::request::Parts,
        choice: &PoolChoice,
        request_id: &HeaderValue,
        body_len: Option<u64>,
        upgrade: bool,
    ) -> Option<Pending> {
        let to = self.spec.to;
        if choice.color == to
            || choice.decision == Decision::Preview
            || upgrade
            || parts.method == Method::CONNECT
            || !self.methods.contains(&parts.method)
            || bucket_of_key(request_id.as_bytes()) >= self.spec.percent_bp
        {
            return None;
        }
        // The live pool has no backend: the request will fail over to the
        // mirror pool (or fail), and a copy would reach the pool serving it.
        if matches!(choice.decision, Decision::Sticky | Decision::Weight)
            && !route.pool(choice.color).has_available(now_ms())
        {
            return None;
        }
        if body_len.is_some_and(|n| n > self.spec.max_body_bytes) {
            self.drop_copy(route, Dropped::BodyTooLarge);
            return None;
        }
        let stats = &route.service.mirror;
        let max = usize::try_from(self.spec.max_inflight).unwrap_or(usize::MAX);
        let Some(slot) = stats.try_slot(max) else {
            self.drop_copy(route, Dropped::MaxInflight);
            return None;
        };
        // Never another pool: no backend there, no copy.
        let Some(backend) = route.pool(to).pick(route.service.balance, now_ms(), &[]) else {
            drop(slot);
            self.drop_copy(route, Dropped::NoHealthyBackend);
            return None;
        };
        let mut headers = parts.headers.clone();
        headers.insert(X_SWITCHYARD_MIRROR.clone(), HeaderValue::from_static("1"));
        headers.insert(X_SWITCHYARD_POOL.clone(), pool_header(to));
        headers.remove(TRANSFER_ENCODING);
        Some(Pending {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers,
            backend: Arc::clone(backend),
            slot,
            stats: Arc::clone(stats),
            metrics: Arc::clone(&self.metrics),
            pool: to,
            max_body: self.spec.max_body_bytes,
            timeout: self.spec.timeout,
        })
    }
}

/// A copy decided and reserved, waiting for the live body to be set up.
pub(crate) struct Pending {
    method: Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    backend: Arc<Backend>,
    slot: Slot,
    stats: Arc<MirrorStats>,
    metrics: Arc<MirrorMetrics>,
    pool: Color,
    max_body: u64,
    timeout: Duration,
}

/// The body of a copy: known now, or coming from the live upload's tee.
enum CopyBody {
    Ready(Option<Bytes>),
    Tee(oneshot::Receiver<Result<Vec<Bytes>, Dropped>>),
}

impl Pending {
    /// Hooks the copy onto the live request's `body` (a tee for a streamed
    /// body) and starts the copy task. The returned [`LiveSide`] takes the
    /// live status for the comparison.
    pub(crate) fn launch(self, body: &mut UpstreamBody, settings: &Settings) -> LiveSide {
        let copy_body = match body.held() {
            Some(held) => CopyBody::Ready(held),
            None => {
                let (tx, rx) = oneshot::channel();
                body.set_tee(Tee {
                    max: self.max_body,
                    len: 0,
                    chunks: Vec::new(),
                    done: Some(tx),
                });
                CopyBody::Tee(rx)
            }
        };
        let pair = Arc::new(Pair::default());
        let live = LiveSide {
            pair: Arc::clone(&pair),
            stats: Arc::clone(&self.stats),
            metrics: Arc::clone(&self.metrics),
            pool: self.pool,
        };
        let limits = (settings.connect_timeout, settings.max_response_headers);
        tokio::spawn(self.run(copy_body, pair, limits));
        live
    }

    /// The copy task.
    async fn run(
        self,
        body: CopyBody,
        pair: Arc<Pair>,
        (connect_timeout, max_headers): (Duration, usize),
    ) {
        let Pending {
            method,
            uri,
            mut headers,
            backend,
            slot,
            stats,
            metrics,
            pool,
            timeout,
            ..
        } = self;
        let body = match body {
            CopyBody::Ready(b) => b,
            CopyBody::Tee(rx) => match rx.await {
                Ok(Ok(chunks)) => Some(concat(chunks)),
                Ok(Err(why)) => return dropped(&stats, &metrics, why),
                Err(_) => return dropped(&stats, &metrics, Dropped::BodyAborted),
            },
        };
        let len = body.as_ref().map_or(0, Bytes::len);
        if len > 0 || headers.contains_key(CONTENT_LENGTH) {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        let mut req = Request::new(UpstreamBody::Full(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let outcome = match tokio::time::timeout(
            timeout,
            exchange(&backend, req, connect_timeout, max_headers),
        )
        .await
        {
            Ok(outcome) => outcome,
            Err(_) => CopyOutcome::Timeout,
        };
        let elapsed = start.elapsed();
        metrics.requests[outcome.code_index()].inc();
        metrics.duration.observe(elapsed.as_secs_f64());
        stats.pools[pool.index()].record(outcome, elapsed);
        pair.mirror(outcome, &stats, &metrics, pool);
        // Freed last: `in_flight` at 0 means every copy's figures are in.
        drop(slot);
        tracing::debug!(backend = %backend.label, ?outcome, "mirror copy done");
    }
}

fn dropped(stats: &MirrorStats, metrics: &MirrorMetrics, why: Dropped) {
    stats.dropped[why.index()].fetch_add(1, Ordering::Relaxed);
    metrics.dropped[why.index()].inc();
}

fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.into_iter().next().unwrap_or_default(),
        _ => {
            let mut b = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for c in chunks {
                b.extend_from_slice(&c);
            }
            b.freeze()
        }
    }
}

/// One exchange with the mirror backend: no retry (a request that a stale
/// pooled connection never sent goes once on a fresh one: it never reached
/// the backend), response body drained up to [`DRAIN_MAX`].
async fn exchange(
    backend: &Arc<Backend>,
    mut req: Request<UpstreamBody>,
    connect_timeout: Duration,
    max_headers: usize,
) -> CopyOutcome {
    let _flight = backend.start_request();
    for _ in 0..2 {
        let Ok((mut conn, reused)) = backend.checkout(connect_timeout, max_headers).await else {
            return CopyOutcome::Error;
        };
        let resp = match conn.send(&mut req).await {
            Ok(resp) => resp,
            Err(failed) if failed.unsent && reused => continue,
            Err(_) => return CopyOutcome::Error,
        };
        let status = resp.status();
        let mut body = resp.into_body();
        let mut read = 0usize;
        let complete = loop {
            match std::future::poll_fn(|cx| conn.poll_body(&mut body, cx)).await {
                None => break true,
                Some(Ok(f)) => {
                    read += f.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_MAX {
                        break false;
                    }
                }
                Some(Err(_)) => break false,
            }
        };
        if complete {
            backend.checkin(conn);
        }
        return CopyOutcome::Status(status.as_u16());
    }
    CopyOutcome::Error
}

/// The live request's side of a copy: gives the live status once it is
/// known. Dropped without one (client gone), no comparison is made.
pub(crate) struct LiveSide {
    pair: Arc<Pair>,
    stats: Arc<MirrorStats>,
    metrics: Arc<MirrorMetrics>,
    pool: Color,
}

impl LiveSide {
    /// The live answer's status.
    pub(crate) fn live(self, status: StatusCode) {
        let class = u32::from((status.as_u16() / 100).clamp(1, 5));
        if let Some(mirror) = self.pair.set(class, LIVE_SHIFT) {
            compare(class, mirror, &self.stats, &self.metrics, self.pool);
        }
    }
}

const LIVE_SHIFT: u32 = 0;
const MIRROR_SHIFT: u32 = 8;

/// The two status classes of one copied request, each set once; whoever
/// sets the second compares (a single `fetch_or`, so exactly one does).
#[derive(Debug, Default)]
struct Pair(AtomicU32);

impl Pair {
    /// Sets this side's class; the other side's if it was already set.
    fn set(&self, class: u32, shift: u32) -> Option<u32> {
        let before = self.0.fetch_or(class << shift, Ordering::AcqRel);
        let other = (before >> (MIRROR_SHIFT - shift)) & 0xff;
        (other != 0).then_some(other)
    }

    fn mirror(&self, outcome: CopyOutcome, stats: &MirrorStats, m: &MirrorMetrics, pool: Color) {
        let class = outcome.class();
        if let Some(live) = self.set(class, MIRROR_SHIFT) {
            compare(live, class, stats, m, pool);
        }
    }
}

/// Both classes known: counts the pair (and a mismatch).
fn compare(live: u32, mirror: u32, stats: &MirrorStats, m: &MirrorMetrics, pool: Color) {
    let p = &stats.pools[pool.index()];
    p.pairs.fetch_add(1, Ordering::Relaxed);
    let (live_failed, mirror_failed) = (live == 5, mirror == 5);
    if mirror_failed && !live_failed {
        p.mirror_failed_live_ok.fetch_add(1, Ordering::Relaxed);
    } else if live_failed && !mirror_failed {
        p.live_failed_mirror_ok.fetch_add(1, Ordering::Relaxed);
    }
    if live != mirror {
        stats.mismatches.fetch_add(1, Ordering::Relaxed);
        m.mismatches.inc();
    }
}

/// Keeps the chunks of a streamed live body for its copy, up to a limit;
/// lives in the live upload (`backend::Upload`). Never blocks and never
/// fails the live body: past the limit it gives up the copy. Dropped
/// before the end, the copy learns the body was aborted.
pub(crate) struct Tee {
    max: u64,
    len: u64,
    chunks: Vec<Bytes>,
    done: Option<oneshot::Sender<Result<Vec<Bytes>, Dropped>>>,
}

impl Tee {
    /// A chunk went to the live backend.
    pub(crate) fn data(&mut self, chunk: &Bytes) {
        if self.done.is_none() {
            return;
        }
        self.len += chunk.len() as u64;
        if self.len > self.max {
            self.chunks = Vec::new();
            if let Some(tx) = self.done.take() {
                let _ = tx.send(Err(Dropped::BodyTooLarge));
            }
            return;
        }
        if !chunk.is_empty() {
            self.chunks.push(chunk.clone());
        }
    }

    /// The live body ended cleanly.
    pub(crate) fn end(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Ok(std::mem::take(&mut self.chunks)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_side_compares() {
        for (live_first, live, mirror) in [(true, 2, 2), (false, 2, 5), (true, 5, 2), (false, 4, 4)]
        {
            let pair = Pair::default();
            let (a, b) = if live_first {
                (pair.set(live, LIVE_SHIFT), pair.set(mirror, MIRROR_SHIFT))
            } else {
                (pair.set(mirror, MIRROR_SHIFT), pair.set(live, LIVE_SHIFT))
            };
            assert!(a.is_none());
            assert_eq!(b, Some(if live_first { live } else { mirror }));
        }
    }

    #[test]
    fn tee_keeps_up_to_the_limit_then_gives_up() {
        let (tx, mut rx) = oneshot::channel();
        let mut tee = Tee {
            max: 10,
            len: 0,
            chunks: Vec::new(),
            done: Some(tx),
        };
        tee.data(&Bytes::from_static(b"12345"));
        tee.data(&Bytes::from_static(b"12345"));
        tee.end();
        assert_eq!(
            rx.try_recv().ok().and_then(Result::ok).map(concat),
            Some(Bytes::from_static(b"1234512345"))
        );
        let (tx, mut rx) = oneshot::channel();
        let mut tee = Tee {
            max: 4,
            len: 0,
            chunks: Vec::new(),
            done: Some(tx),
        };
        tee.data(&Bytes::from_static(b"12345"));
        tee.end();
        assert!(matches!(rx.try_recv(), Ok(Err(Dropped::BodyTooLarge))));
        let (tx, mut rx) = oneshot::channel::<Result<Vec<Bytes>, Dropped>>();
        drop(Tee {
            max: 4,
            len: 0,
            chunks: Vec::new(),
            done: Some(tx),
        });
        assert!(rx.try_recv().is_err(), "dropped before the end: aborted");
    }

    #[test]
    fn outcomes_count_failures_and_buckets() {
        let p = PoolOutcomes::default();
        p.record(CopyOutcome::Status(200), Duration::from_millis(3));
        p.record(CopyOutcome::Status(503), Duration::from_millis(30));
        p.record(CopyOutcome::Timeout, Duration::from_secs(6));
        let c = p.read();
        assert_eq!((c.requests, c.failures), (3, 2));
        assert_eq!(c.latency_buckets[2], 1, "3 ms in the 5 ms bucket");
        assert_eq!(c.latency_buckets[5], 1, "30 ms in the 50 ms bucket");
        assert_eq!(c.latency_buckets[LATENCY_BOUNDS_MS.len()], 1, "6 s above");
        assert_eq!(CopyOutcome::Status(404).code_index(), 3);
        assert_eq!(CopyOutcome::Error.class(), 5);
    }
}
