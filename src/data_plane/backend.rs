//! One backend: its health, its passive-ejection record, its in-flight
//! count, and its pool of idle upstream connections.
//!
//! A `Backend` lives as long as some routing snapshot (or in-flight request)
//! holds it; the control plane reuses the same `Arc<Backend>` across
//! snapshots while the backend stays in its pool, so health and pooled
//! connections survive switches and reloads. When a backend leaves its pool
//! it is [`retire`](Backend::retire)d: idle connections are dropped at once,
//! busy ones finish their request and are then closed instead of pooled.
//!
//! The request path touches only atomics and a lock-free queue here.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntGauge;
use tokio::net::TcpStream;

use crate::config::{BackendAddr, Scheme};
use crate::data_plane::h1client::{UpstreamConn, UpstreamIo};
use crate::data_plane::mirror::Tee;
use crate::data_plane::tls::UpstreamTls;

/// Idle upstream connections kept per backend.
const MAX_IDLE_PER_BACKEND: usize = 512;
/// An idle upstream connection older than this is closed rather than reused
/// (backends commonly close idle keep-alive connections after 60-75 s).
const MAX_IDLE_AGE_MS: u64 = 50_000;

/// Milliseconds on a cheap monotonic clock for atomics (connection timers,
/// ejection deadlines, idle ages, connection activity).
///
/// A request reads it about six times (the pick, the pool's checkout and
/// checkin, the connection's activity marks), so it reads the kernel's
/// coarse clock (`CLOCK_MONOTONIC_COARSE`, on Linux): the time of the last
/// timer tick, ~7 ns through the vDSO against ~26 ns for the exact clock
/// that `Instant::now` reads (both measured on the benchmark machine),
/// because no time counter is read. Its step is the kernel's tick (1-4 ms),
/// well below every limit it is compared with (the shortest are header and
/// idle timeouts of a few hundred ms), and it is the same clock on every
/// thread, so values compare across the workers.
///
/// The crate's unit tests read tokio's clock instead, so tests on paused
/// time (`#[tokio::test(start_paused = true)]`) see it advance exactly as
/// the timers do.
///
/// The origin is an hour before the clock's own (boot, for the coarse
/// clock; the first call, for tokio's), so no reading is ever 0 or
/// saturates to it.
pub fn now_ms() -> u64 {
    #[cfg(all(target_os = "linux", not(test)))]
    if let Some(ms) = coarse_ms() {
        return ms + 3_600_000;
    }
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = *START.get_or_init(|| {
        let now = std::time::Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    });
    let now = tokio::time::Instant::now().into_std();
    u64::try_from(now.saturating_duration_since(start).as_millis()).unwrap_or(u64::MAX)
}

/// `CLOCK_MONOTONIC_COARSE` in milliseconds (Linux has had it since 2.6.32).
#[cfg(all(target_os = "linux", not(test)))]
fn coarse_ms() -> Option<u64> {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs * 1000 + nanos / 1_000_000)
}

/// Health as judged by active checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Health {
    /// Added through the API and not checked yet: takes no traffic.
    Unknown = 0,
    /// Takes traffic.
    Healthy = 1,
    /// Failed its checks: takes no traffic.
    Unhealthy = 2,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }
}

/// The body of a request sent upstream: the client's body streamed through,
/// or a small body held in memory (replayable on retry).
pub(crate) enum UpstreamBody {
    /// Streamed from the client.
    Incoming(Box<Upload>),
    /// Held in memory (empty, or small enough to replay).
    Full(Option<Bytes>),
}

impl UpstreamBody {
    /// No body.
    pub(crate) const fn empty() -> UpstreamBody {
        UpstreamBody::Full(None)
    }

    /// The client's body, streamed; a client silent for `client_silence`
    /// mid-body ends it with an error (never blamed on the backend).
    pub(crate) fn streamed(body: Incoming, client_silence: Duration) -> UpstreamBody {
        UpstreamBody::Incoming(Box::new(Upload {
            body,
            waits: Arc::new(ClientWaits::default()),
            limit: client_silence,
            silence: None,
            tee: None,
        }))
    }

    /// The body if it is held in memory (`Some(None)`: no body); `None`
    /// for a streamed one.
    pub(crate) fn held(&self) -> Option<Option<Bytes>> {
        match self {
            UpstreamBody::Full(b) => Some(b.clone()),
            UpstreamBody::Incoming(_) => None,
        }
    }

    /// Copies a streamed body's chunks into `tee` as they go upstream
    /// (traffic mirroring); no effect on a held body.
    pub(crate) fn set_tee(&mut self, tee: Tee) {
        if let UpstreamBody::Incoming(up) = self {
            up.tee = Some(Box::new(tee));
        }
    }

    /// For a streamed body, how long it has waited on the client so far.
    pub(crate) fn client_waits(&self) -> Option<Arc<ClientWaits>> {
        match self {
            UpstreamBody::Incoming(up) => Some(Arc::clone(&up.waits)),
            UpstreamBody::Full(_) => None,
        }
    }
}

/// A client's body streamed upstream, timing the waits on the client.
pub(crate) struct Upload {
    body: Incoming,
    waits: Arc<ClientWaits>,
    limit: Duration,
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Keeps the chunks for a mirror copy (only when one is made).
    tee: Option<Box<Tee>>,
}

/// Time an upload spent waiting on the client (the backend's response
/// time does not include it: a slow client is never the backend's fault).
#[derive(Debug, Default)]
pub(crate) struct ClientWaits {
    /// Milliseconds of finished waits.
    waited_ms: AtomicU64,
    /// Start ([`now_ms`], +1 so that 0 means none) of the wait under way.
    since_ms: AtomicU64,
}

impl ClientWaits {
    /// Time spent waiting on the client so far, the current wait included.
    pub(crate) fn total(&self) -> Duration {
        let since = self.since_ms.load(Ordering::Relaxed);
        let current = match since {
            0 => 0,
            s => (now_ms() + 1).saturating_sub(s),
        };
        Duration::from_millis(self.waited_ms.load(Ordering::Relaxed) + current)
    }

    fn start(&self) -> bool {
        if self.since_ms.load(Ordering::Relaxed) == 0 {
            self.since_ms.store(now_ms() + 1, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn stop(&self) {
        let since = self.since_ms.swap(0, Ordering::Relaxed);
        if since != 0 {
            let d = (now_ms() + 1).saturating_sub(since);
            self.waited_ms.fetch_add(d, Ordering::Relaxed);
        }
    }
}

/// The client sent nothing of its body for the limit.
#[derive(Debug, thiserror::Error)]
#[error("the client sent nothing of the request body for {0:?}")]
pub(crate) struct ClientSilent(Duration);

impl Upload {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(r) => {
                self.waits.stop();
                if let Some(tee) = &mut self.tee {
                    match &r {
                        Some(Ok(frame)) => {
                            if let Some(d) = frame.data_ref() {
                                tee.data(d);
                            }
                            if self.body.is_end_stream() {
                                tee.end();
                            }
                        }
                        None => tee.end(),
                        // Dropped: the copy learns the body was aborted.
                        Some(Err(_)) => self.tee = None,
                    }
                }
                Poll::Ready(r.map(|f| f.map_err(BodyError::from)))
            }
            Poll::Pending => {
                if self.waits.start() {
                    let deadline = tokio::time::Instant::now() + self.limit;
                    match &mut self.silence {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => self.silence = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                }
                let out = self
                    .silence
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if out {
                    self.waits.stop();
                    return Poll::Ready(Some(Err(Box::new(ClientSilent(self.limit)))));
                }
                Poll::Pending
            }
        }
    }
}

/// The error of an upstream request body.
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Incoming(b) => b.poll_frame(cx),
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Incoming(b) => b.body.is_end_stream(),
            UpstreamBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Incoming(b) => b.body.size_hint(),
            UpstreamBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            UpstreamBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// Why a connection to a backend could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// Name resolution failed or gave nothing.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The host.
        host: String,
        /// Why.
        source: io::Error,
    },
    /// TCP connect failed (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Io(io::Error),
    /// TCP connect (or TLS handshake) exceeded `connect_timeout`.
    #[error("connect timed out")]
    Timeout,
    /// TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// One backend of one pool of one service.
pub struct Backend {
    /// Where it is.
    pub(crate) addr: BackendAddr,
    /// `addr` as text (metric label, logs, admin API).
    pub(crate) label: String,
    /// Pre-resolved IP address when `addr.host` is an IP literal.
    ip: Option<SocketAddr>,
    tls: Option<Arc<UpstreamTls>>,
    health: AtomicU8,
    /// Is it actively health-checked? Then an ejected backend returns only
    /// through a passing check after its back-off; otherwise when the
    /// back-off ends. Changes when a reload adds or removes `[health]`.
    checked: AtomicBool,
    /// Which active checker may run for it: a checker stops once this moves
    /// past the number it started with (a reload changed the check).
    checker: AtomicU64,
    /// Until when (in [`now_ms`]) passive ejection keeps it out
    /// (`u64::MAX`: until a passing check after `backoff_until_ms`).
    ejected_until_ms: AtomicU64,
    /// End of the current ejection back-off.
    backoff_until_ms: AtomicU64,
    /// When it was last ejected (to forget old ejections).
    last_ejection_ms: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    in_flight: AtomicUsize,
    retired: AtomicBool,
    /// Idle connections, one queue per thread slot ([`crate::data_plane::workers::slot`]):
    /// a worker reuses only connections it made, registered with its own
    /// thread's IO driver.
    idle: Box<[ArrayQueue<UpstreamConn>]>,
    healthy_gauge: IntGauge,
}

impl Backend {
    /// A backend starting in `health`, reached over TLS when `tls` is set;
    /// `checked` when active health checks run for it.
    pub fn new(
        addr: BackendAddr,
        tls: Option<Arc<UpstreamTls>>,
        health: Health,
        checked: bool,
        healthy_gauge: IntGauge,
    ) -> Backend {
        let ip = addr
            .host
            .parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, addr.port));
        let label = addr.to_string();
        healthy_gauge.set(i64::from(health == Health::Healthy));
        Backend {
            addr,
            label,
            ip,
            tls,
            health: AtomicU8::new(health as u8),
            checked: AtomicBool::new(checked),
            checker: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            backoff_until_ms: AtomicU64::new(0),
            last_ejection_ms: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            idle: {
                let slots = crate::data_plane::workers::slots();
                let per_slot = (MAX_IDLE_PER_BACKEND / slots).max(64);
                (0..slots).map(|_| ArrayQueue::new(per_slot)).collect()
            },
            healthy_gauge,
        }
    }

    /// Can it take a new request now (healthy, not ejected, not retired)?
    #[inline]
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.health.load(Ordering::Relaxed) == Health::Healthy as u8
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// Health as judged by active checks.
    pub(crate) fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Sets health from an active check result. Returns true if it changed.
    /// A passing check also ends a passive ejection whose back-off is over
    /// (the backend "returns through the active check").
    pub(crate) fn set_health(&self, h: Health) -> bool {
        let old = self.health.swap(h as u8, Ordering::Relaxed);
        if h == Health::Healthy
            && self.ejected_until_ms.load(Ordering::Relaxed) != 0
            && now_ms() >= self.backoff_until_ms.load(Ordering::Relaxed)
        {
            self.ejected_until_ms.store(0, Ordering::Relaxed);
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        self.healthy_gauge
            .set(i64::from(h == Health::Healthy && !self.is_ejected()));
        old != h as u8
    }

    /// Sets `switchyard_backend_healthy` from the state now: 1 when it takes
    /// traffic (healthy, not ejected, not retired).
    pub(crate) fn refresh_gauge(&self) {
        let up = self.health() == Health::Healthy && !self.is_ejected() && !self.is_retired();
        self.healthy_gauge.set(i64::from(up));
    }

    /// Does its passive ejection end by itself when the back-off is over
    /// (no active checks), rather than through a passing check?
    pub(crate) fn returns_by_itself(&self) -> bool {
        !self.checked.load(Ordering::Relaxed)
    }

    /// Milliseconds until the current passive ejection ends (0: not ejected).
    pub(crate) fn ejected_for_ms(&self) -> u64 {
        self.ejected_until_ms
            .load(Ordering::Relaxed)
            .saturating_sub(now_ms())
    }

    /// TLS settings for `https://` backends.
    pub(crate) fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// Is it passively ejected right now?
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Requests in flight to it (until their response body ends).
    #[inline]
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard drops.
    #[inline]
    pub(crate) fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    /// A request to it succeeded.
    #[inline]
    pub(crate) fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request to it failed (connect error, reset, timeout, 5xx). After
    /// `threshold` consecutive failures it is ejected for `base * 2^n`
    /// (n = recent ejections, capped at `max`), if `may_eject` allows.
    /// Returns true if this ejected it.
    pub(crate) fn record_failure(
        &self,
        threshold: u32,
        base: Duration,
        max: Duration,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < threshold || self.is_ejected() || !may_eject() {
            return false;
        }
        let now = now_ms();
        self.consecutive_failures.store(0, Ordering::Relaxed);
        // Ejections long past are forgiven: the back-off starts over.
        let forget_after = u64::try_from(max.as_millis()).unwrap_or(u64::MAX / 4) * 2;
        if now.saturating_sub(self.last_ejection_ms.swap(now, Ordering::Relaxed)) > forget_after {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let k = self.ejections.fetch_add(1, Ordering::Relaxed).min(10);
        let dur = base.saturating_mul(1u32 << k).min(max);
        let backoff_until = now + u64::try_from(dur.as_millis()).unwrap_or(u64::MAX / 4);
        self.backoff_until_ms
            .store(backoff_until, Ordering::Relaxed);
        let until = if self.checked.load(Ordering::Relaxed) {
            u64::MAX
        } else {
            backoff_until
        };
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.healthy_gauge.set(0);
        true
    }

    /// A reload added (`true`) or removed its active checks. Without them
    /// an ejection ends with its back-off, and the backend is healthy (as a
    /// backend of a service without `[health]` always is).
    pub(crate) fn set_checked(&self, checked: bool) {
        self.checked.store(checked, Ordering::Relaxed);
        if !checked {
            let backoff = self.backoff_until_ms.load(Ordering::Relaxed);
            let _ = self
                .ejected_until_ms
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                    (u == u64::MAX).then_some(backoff)
                });
            self.set_health(Health::Healthy);
        }
    }

    /// Claims the right to run its active checker; the checker that held
    /// it before stops at its next tick. Returns the claim to compare with
    /// [`current_checker`](Backend::current_checker).
    pub(crate) fn claim_checker(&self) -> u64 {
        self.checker.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The claim of the checker that may run now.
    pub(crate) fn current_checker(&self) -> u64 {
        self.checker.load(Ordering::Relaxed)
    }

    /// Takes the backend out of service: idle connections close now, busy
    /// ones close when their request ends.
    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
        self.healthy_gauge.set(0);
        for q in &*self.idle {
            while q.pop().is_some() {}
        }
    }

    /// Has it left its pool?
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The idle queue of the calling thread.
    #[inline]
    fn idle_here(&self) -> &ArrayQueue<UpstreamConn> {
        let slot = crate::data_plane::workers::slot();
        // Slots are fixed before any backend exists; 0 always exists.
        &self.idle[slot.min(self.idle.len() - 1)]
    }

    /// A ready connection: a pooled one if any is usable, else a new one
    /// accepting response heads of up to `max_headers` fields. The `bool`
    /// says whether it was reused.
    pub(crate) async fn checkout(
        &self,
        connect_timeout: Duration,
        max_headers: usize,
    ) -> Result<(UpstreamConn, bool), ConnectError> {
        let now = now_ms();
        let idle = self.idle_here();
        while let Some(mut conn) = idle.pop() {
            // Nobody read it while it was idle: one read attempt sees the
            // backend's close (EOF or reset) if one came meanwhile. A close
            // racing the request is covered by the retry of an unsent
            // request, or the replay of an idempotent one.
            if now.saturating_sub(conn.idle_since_ms) < MAX_IDLE_AGE_MS && conn.is_open() {
                return Ok((conn, true));
            }
            // Closed by the backend, or too old: drop it.
        }
        // Boxed: the connect future (DNS, TCP, TLS, handshake) is large and
        // rarely polled; inline, it would grow every request's future, and
        // with it the slot hyper keeps per client connection.
        let conn = Box::pin(self.connect(connect_timeout, max_headers)).await?;
        Ok((conn, false))
    }

    /// Returns a connection whose exchange ended cleanly to the pool
    /// (unless the backend left its pool, or the connection cannot carry
    /// another exchange).
    pub(crate) fn checkin(&self, mut conn: UpstreamConn) {
        if self.is_retired() || !conn.is_reusable() {
            return;
        }
        conn.idle_since_ms = now_ms();
        conn.shed();
        let _ = self.idle_here().push(conn);
    }

    async fn connect(
        &self,
        connect_timeout: Duration,
        max_headers: usize,
    ) -> Result<UpstreamConn, ConnectError> {
        let fut = async {
            let tcp = match self.ip {
                Some(ip) => TcpStream::connect(ip).await.map_err(ConnectError::Io)?,
                None => {
                    let addrs = tokio::net::lookup_host((self.addr.host.as_str(), self.addr.port))
                        .await
                        .map_err(|source| ConnectError::Resolve {
                            host: self.addr.host.clone(),
                            source,
                        })?;
                    let mut last = None;
                    let mut stream = None;
                    for a in addrs {
                        match TcpStream::connect(a).await {
                            Ok(s) => {
                                stream = Some(s);
                                break;
                            }
                            Err(e) => last = Some(e),
                        }
                    }
                    match (stream, last) {
                        (Some(s), _) => s,
                        (None, Some(e)) => return Err(ConnectError::Io(e)),
                        (None, None) => {
                            return Err(ConnectError::Resolve {
                                host: self.addr.host.clone(),
                                source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
                            })
                        }
                    }
                }
            };
            let _ = tcp.set_nodelay(true);
            match (&self.tls, self.addr.scheme) {
                (Some(tls), Scheme::Https) => {
                    let stream = tls
                        .connect(&self.addr.host, tcp)
                        .await
                        .map_err(ConnectError::Tls)?;
                    Ok(UpstreamConn::new(
                        UpstreamIo::Tls(Box::new(stream)),
                        max_headers,
                    ))
                }
                _ => Ok(UpstreamConn::new(UpstreamIo::Plain(tcp), max_headers)),
            }
        };
        tokio::time::timeout(connect_timeout, fut)
            .await
            .map_err(|_| ConnectError::Timeout)?
    }
}

/// Counts one request against its backend until dropped (at the end of the
/// response body, or when the exchange is abandoned).
pub(crate) struct InFlight(Arc<Backend>);

impl InFlight {
    /// The backend.
    pub(crate) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("addr", &self.label)
            .field("health", &self.health())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(checked: bool) -> Backend {
        let m = crate::metrics::Metrics::new();
        let addr = BackendAddr::parse("127.0.0.1:9").expect("addr");
        let gauge = m.backend_healthy("t", crate::color::Color::Blue, &addr.to_string());
        Backend::new(addr, None, Health::Healthy, checked, gauge)
    }

    const BASE: Duration = Duration::from_secs(5);
    const MAX: Duration = Duration::from_secs(40);

    /// Three consecutive failures (the threshold); true if they ejected it.
    fn fail3(b: &Backend) -> bool {
        (0..3).any(|_| b.record_failure(3, BASE, MAX, || true))
    }

    async fn advance_ms(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    /// Ejected for exactly `ms`: out one millisecond before, back at it.
    async fn ejected_for(b: &Backend, ms: u64) {
        assert!(fail3(b));
        assert!(!b.is_available(now_ms()) && b.healthy_gauge.get() == 0);
        advance_ms(ms - 1).await;
        assert!(b.is_ejected(), "back before {ms} ms");
        advance_ms(1).await;
        assert!(
            !b.is_ejected() && b.is_available(now_ms()),
            "still out at {ms} ms"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_back_off_doubles_is_capped_and_is_forgiven() {
        let b = backend(false);
        assert!(!b.record_failure(3, BASE, MAX, || true));
        assert!(!b.record_failure(3, BASE, MAX, || true));
        b.record_success();
        assert!(b.is_available(now_ms()), "a success resets the streak");
        // Then 5 s, 10, 20, 40, 40 (capped).
        ejected_for(&b, 5_000).await;
        ejected_for(&b, 10_000).await;
        ejected_for(&b, 20_000).await;
        ejected_for(&b, 40_000).await;
        ejected_for(&b, 40_000).await;
        // Quiet for longer than twice the cap: the back-off starts over.
        advance_ms(80_001).await;
        ejected_for(&b, 5_000).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_checked_backend_returns_only_through_a_passing_check_after_its_back_off() {
        let b = backend(true);
        assert!(fail3(&b));
        advance_ms(4_999).await;
        b.set_health(Health::Healthy);
        assert!(
            b.is_ejected(),
            "a passing check inside the back-off does not end it"
        );
        advance_ms(60_000).await;
        assert!(b.is_ejected(), "the back-off alone does not end it");
        assert_eq!(b.healthy_gauge.get(), 0);
        b.set_health(Health::Healthy);
        assert!(b.is_available(now_ms()));
        assert_eq!(b.healthy_gauge.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn removing_active_checks_ends_an_ejection_with_its_back_off() {
        let b = backend(true);
        assert!(fail3(&b));
        b.set_checked(false);
        assert!(b.is_ejected());
        advance_ms(5_000).await;
        assert!(b.is_available(now_ms()));
    }

    #[test]
    fn the_clock_works_off_a_runtime_and_never_goes_back() {
        let a = now_ms();
        let b = std::thread::spawn(now_ms).join().expect("thread");
        assert!(b >= a);
    }
}
