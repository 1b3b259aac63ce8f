//! Client connections: the accept loop, protocol detection (HTTP/1.1,
//! h2c prior knowledge, ALPN after TLS), and the task that runs each hyper
//! connection beside its timer.
//!
//! Each connection runs in its own task that polls the hyper connection and,
//! beside it, one lazily re-armed timer that enforces two bounds hyper does
//! not separate: `header_read_timeout` (from the first byte of a request
//! head to its end: slowloris) and `idle_timeout` (keep-alive with no
//! request). [`ConnActivity`] is what the timer reads: the IO wrapper marks
//! when a request head starts arriving, and every request holds an
//! [`ActiveRequest`](crate::data_plane::conn::ActiveRequest) until its
//! response body ends.
//!
//! At accept, a connection takes its place in the connection limits
//! ([`ConnLimiter`]: `max_connections`, `max_connections_per_client`) or is
//! closed at once; the place is held as long as the connection, upgraded
//! stream included. Accept failures (out of file descriptors) back off
//! ([`AcceptBackoff`]) and are logged at most once per interval
//! ([`AcceptErrors`]).
//!
//! Shutdown follows the dropped-sender pattern: dropping the
//! `watch::Sender` tells every connection to finish gracefully (HTTP/1.1
//! closes after the current response, HTTP/2 sends GOAWAY); every task
//! holds a [`DrainToken`], and shutdown waits until all are gone or
//! `drain_timeout` passes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::data_plane::backend::now_ms;
use crate::data_plane::conn::{
    judge, next_request_is_bad, ClientInfo, ConnActivity, Limits, Parked, TrackedIo, Transport,
    Verdict,
};
use crate::data_plane::conn_limit::{ConnLimiter, ConnSlot, Refused};
use crate::data_plane::drain::DrainToken;
use crate::data_plane::h1guard::{Finding, H1Guard};
use crate::data_plane::proxy::Proxy;
use crate::data_plane::snap_ref::{Downstream, SnapCache};
use crate::data_plane::workers::{Balance, Counted};
use crate::metrics::Metrics;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (prior knowledge or ALPN `h2`).
    Http2,
}

/// Everything connection tasks share.
pub(crate) struct Server {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    limits: Limits,
    /// `max_connections`, `max_connections_per_client` (changed on reload).
    limiter: Arc<ConnLimiter>,
    /// Accept failures, logged at most once per [`ACCEPT_LOG_EVERY`] over
    /// all listeners.
    accept_errors: Arc<AcceptErrors>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    /// With two workers or more: keeps their connection counts even.
    balance: Option<Arc<Balance>>,
}

impl Server {
    /// A server for `proxy` with `limits`.
    pub(crate) fn new(
        proxy: Arc<Proxy>,
        metrics: Arc<Metrics>,
        limits: Limits,
        limiter: Arc<ConnLimiter>,
        accept_errors: Arc<AcceptErrors>,
        workers: &[tokio::runtime::Handle],
    ) -> Server {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // Our own timer enforces the header read bound from the first
            // byte (hyper's would also cut idle keep-alive connections).
            .header_read_timeout(None)
            .max_header_size(limits.max_request_header_bytes)
            .max_headers(limits.max_headers)
            .writev(true)
            .keep_alive(true);
        let mut h2 = http2::Builder::new(TokioExecutor::new());
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.max_concurrent_streams)
            .max_header_list_size(
                u32::try_from(limits.max_request_header_bytes).unwrap_or(u32::MAX),
            )
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Server {
            proxy,
            metrics,
            limits,
            limiter,
            accept_errors,
            http1: h1,
            http2: h2,
            balance: Balance::new(workers),
        }
    }

    /// Accepts plain connections on `listener` until `drain` signals.
    pub(crate) async fn serve_plain(
        self: Arc<Self>,
        listener: TcpListener,
        drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let gauge = self.metrics.open_connections.with_label_values(&["http"]);
        self.accept_loop(listener, drain, token, ("http", gauge), None)
            .await;
    }

    /// Accepts TLS connections on `listener` until `drain` signals.
    pub(crate) async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: Arc<crate::data_plane::tls::ServerTls>,
        drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let gauge = self.metrics.open_connections.with_label_values(&["https"]);
        self.accept_loop(listener, drain, token, ("https", gauge), Some(acceptor))
            .await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        mut drain: watch::Receiver<()>,
        token: DrainToken,
        (name, gauge): (&'static str, IntGauge),
        tls: Option<Arc<crate::data_plane::tls::ServerTls>>,
    ) {
        let mut backoff = AcceptBackoff::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => {
                    backoff.reset();
                    x
                }
                Err(e) => {
                    if self.accept_errors.failed(&e, name) {
                        self.refused(Refused::NoFileDescriptors);
                    }
                    // EMFILE and friends: back off instead of spinning;
                    // established connections are served meanwhile, and the
                    // waiting ones stay in the kernel's backlog.
                    tokio::select! {
                        () = backoff.wait() => continue,
                        _ = drain.changed() => break,
                    }
                }
            };
            let slot = match self.limiter.try_acquire(peer.ip(), &gauge) {
                Ok(slot) => slot,
                Err(reason) => {
                    // Closed at once: nothing read, nothing answered.
                    self.refused(reason);
                    tracing::debug!(client = %peer, reason = reason.label(), "connection refused");
                    drop(stream);
                    continue;
                }
            };
            // No `set_nodelay` here: every listener is made with
            // TCP_NODELAY (app.rs), and Linux copies it to the sockets it
            // accepts; one `setsockopt` less per connection.
            let placed = self.balance.as_ref().and_then(Balance::place);
            let me = Arc::clone(&self);
            let conn_drain = drain.clone();
            let conn_token = token.clone();
            let tls = tls.clone();
            let serve = move |stream: TcpStream, counted: Option<Counted>| async move {
                let hold = (conn_token, slot);
                let _counted = counted;
                match tls {
                    None => me.serve_plain_conn(stream, peer, conn_drain, hold).await,
                    // Boxed: a TLS connection's future is several times
                    // the size of a plain one's; inline, every plain
                    // connection's task would be that large too.
                    Some(acceptor) => {
                        Box::pin(me.serve_tls_conn(stream, peer, acceptor, conn_drain, hold)).await
                    }
                }
            };
            // The connection's future is several KB (hyper's connection
            // state inline): spawned as is, tokio moved it three times
            // (into the task, then its cell, and once more when it ends).
            // Boxed, it is moved once; the task holds a pointer.
            let (move_to, counted) = match placed {
                Some(p) => (p.move_to, Some(p.counted)),
                None => (None, None),
            };
            let Some(handle) = move_to else {
                tokio::spawn(Box::pin(serve(stream, counted)));
                continue;
            };
            // Another worker serves it (see `Balance`): the socket leaves
            // this worker's IO driver for that one's.
            let moved = stream.into_std().map(|std| {
                handle.spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(stream) => Box::pin(serve(stream, counted)).await,
                        Err(e) => tracing::warn!(client = %peer, error = %e, "cannot register a connection moved to another worker"),
                    }
                })
            });
            match moved {
                Ok(_) => self.metrics.connections_moved.inc(),
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "cannot move a connection to another worker")
                }
            }
        }
        // Dropping the listener here stops the kernel accepting for us.
        drop(listener);
    }

    fn refused(&self, reason: Refused) {
        self.metrics
            .connections_refused
            .with_label_values(&[reason.label()])
            .inc();
    }

    async fn serve_plain_conn(
        &self,
        mut stream: TcpStream,
        peer: SocketAddr,
        mut drain: watch::Receiver<()>,
        (token, slot): (DrainToken, ConnSlot),
    ) {
        let detected = tokio::select! {
            d = tokio::time::timeout(self.limits.header_read_timeout, detect(&mut stream)) => d,
            // Shutdown before the first byte: no request to finish.
            _ = drain.changed() => return,
        };
        let (proto, first) = match detected {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return,
            Err(_) => {
                self.metrics
                    .timeouts
                    .with_label_values(&["header_read"])
                    .inc();
                return;
            }
        };
        let client = ClientInfo::new(peer, false, token, slot);
        self.serve_conn(stream, proto, first, client, drain).await;
    }

    async fn serve_tls_conn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        acceptor: Arc<crate::data_plane::tls::ServerTls>,
        mut drain: watch::Receiver<()>,
        (token, slot): (DrainToken, ConnSlot),
    ) {
        let accepted = tokio::select! {
            a = tokio::time::timeout(self.limits.header_read_timeout, acceptor.accept(stream)) => a,
            // Shutdown during the handshake: no request to finish.
            _ = drain.changed() => return,
        };
        let tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.metrics
                    .timeouts
                    .with_label_values(&["header_read"])
                    .inc();
                return;
            }
        };
        let proto = if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            Protocol::Http2
        } else {
            Protocol::Http1
        };
        let client = ClientInfo::new(peer, true, token, slot);
        self.serve_conn(tls, proto, BytesMut::new(), client, drain)
            .await;
    }

    /// Serves one connection until it ends, times out, or drains. `first`:
    /// bytes already read from it (by [`detect`]), served to hyper first.
    async fn serve_conn<T: Transport>(
        &self,
        io: T,
        proto: Protocol,
        mut first: BytesMut,
        client: ClientInfo,
        mut drain: watch::Receiver<()>,
    ) {
        let activity = ConnActivity::new();
        let mut guard = (proto == Protocol::Http1).then(H1Guard::new);
        if let (Some(g), false) = (&mut guard, first.is_empty()) {
            // The guard sees these bytes as it sees every later read.
            if let Finding::BadBody(n) = g.scan(&mut first) {
                activity.bad_body.store(n, Ordering::Relaxed);
            }
        }
        let io = TokioIo::new(TrackedIo {
            inner: io,
            activity: Arc::clone(&activity),
            guard,
            prefix: first.freeze(),
        });
        let conn = Arc::new(Downstream {
            proxy: Arc::clone(&self.proxy),
            client,
        });
        let snaps = SnapCache::default();
        let act = Arc::clone(&activity);
        let http1 = proto == Protocol::Http1;
        let service = service_fn(move |req| {
            // Per request: a count only this worker touches, and one load
            // of the routing table (snap_ref.rs).
            let conn = Arc::clone(&conn);
            let snap = snaps.load(conn.proxy.table());
            let bad = http1 && next_request_is_bad(&act);
            let active = act.begin();
            // The request's future is `handle`'s own, not wrapped in
            // another: hyper moves it into its slot, and a wrapper would
            // have copied it (~3 KB) once more per request.
            Proxy::handle(conn, snap, req, active, bad)
        });
        let track_heads = http1;
        let parkable = http1 && io.inner().inner.parkable();
        let limits = &self.limits;
        // The first request head is bounded from the accept.
        activity.reading_head.store(track_heads, Ordering::Relaxed);

        // Armed at the first real deadline: a zero sleep fired at once and,
        // being earlier than any deadline the timer driver knew, woke the
        // driver (an eventfd write) on every new connection.
        let first = match judge(&activity, now_ms(), limits, track_heads, parkable) {
            Verdict::RecheckAt(at) => at,
            Verdict::HeaderTimeout | Verdict::Idle | Verdict::Park => now_ms(),
        };
        let timer = tokio::time::sleep(Duration::from_millis(first.saturating_sub(now_ms())));
        tokio::pin!(timer);
        let mut draining = false;
        let rearm = |timer: Pin<&mut tokio::time::Sleep>, at: u64| {
            let wait = Duration::from_millis(at.saturating_sub(now_ms()));
            timer.reset(tokio::time::Instant::now() + wait);
        };

        if proto == Protocol::Http2 {
            // Boxed: HTTP/1.1 connection tasks stay small.
            return Box::pin(async {
                let mut conn = std::pin::pin!(self.http2.serve_connection(io, service));
                loop {
                    tokio::select! {
                        res = conn.as_mut() => {
                            if let Err(e) = res {
                                tracing::debug!(error = %e, "client connection ended with an error");
                            }
                            return;
                        }
                        _ = drain.changed(), if !draining => {
                            draining = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        () = &mut timer => match judge(&activity, now_ms(), limits, false, false) {
                            Verdict::RecheckAt(at) => rearm(timer.as_mut(), at),
                            Verdict::HeaderTimeout | Verdict::Park => rearm(timer.as_mut(), now_ms() + 1000),
                            Verdict::Idle => {
                                self.metrics.timeouts.with_label_values(&["idle"]).inc();
                                if draining {
                                    return;
                                }
                                draining = true;
                                conn.as_mut().graceful_shutdown();
                                rearm(timer.as_mut(), now_ms() + 5000);
                            }
                        },
                    }
                }
            })
            .await;
        }

        // HTTP/1: serve until the connection ends or parks; a parked
        // connection waits as a bare socket and is served afresh when the
        // client sends again.
        let mut io = io;
        loop {
            let mut conn = self
                .http1
                .serve_connection(io, service.clone())
                .with_upgrades();
            loop {
                match next_event(&mut conn, &mut drain, draining, timer.as_mut()).await {
                    Event::Ended(res) => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    Event::Drain => {
                        draining = true;
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                    Event::Timer => match judge(
                        &activity,
                        now_ms(),
                        limits,
                        track_heads,
                        parkable && !draining,
                    ) {
                        Verdict::RecheckAt(at) => rearm(timer.as_mut(), at),
                        Verdict::HeaderTimeout => {
                            self.metrics
                                .timeouts
                                .with_label_values(&["header_read"])
                                .inc();
                            return;
                        }
                        Verdict::Idle => {
                            self.metrics.timeouts.with_label_values(&["idle"]).inc();
                            if draining {
                                return;
                            }
                            draining = true;
                            Pin::new(&mut conn).graceful_shutdown();
                            rearm(timer.as_mut(), now_ms() + 5000);
                        }
                        Verdict::Park => break,
                    },
                }
            }
            // Park: take the socket back from hyper (None: it was upgraded).
            let Some(parts) = conn.into_parts() else {
                return;
            };
            io = parts.io;
            if !parts.read_buf.is_empty() {
                io.inner_mut().prefix = parts.read_buf;
            }
            let _parked = Parked::new(&self.metrics.parked);
            loop {
                tokio::select! {
                    ready = io.inner().inner.readable() => {
                        if ready.is_err() {
                            return;
                        }
                        break;
                    }
                    // Nothing in flight: a parked connection just closes.
                    _ = drain.changed() => return,
                    () = &mut timer => match judge(&activity, now_ms(), limits, track_heads, false) {
                        Verdict::Idle => {
                            self.metrics.timeouts.with_label_values(&["idle"]).inc();
                            return;
                        }
                        Verdict::RecheckAt(at) => rearm(timer.as_mut(), at),
                        Verdict::HeaderTimeout | Verdict::Park => rearm(timer.as_mut(), now_ms() + 1000),
                    },
                }
            }
        }
    }
}

/// What ended a wait of an HTTP/1 connection's task.
enum Event {
    /// The connection ended (with hyper's verdict).
    Ended(hyper::Result<()>),
    /// Shutdown began: finish gracefully.
    Drain,
    /// The connection timer fired.
    Timer,
}

/// Waits for the next [`Event`] of an HTTP/1 connection: polls the hyper
/// connection on every wake, and the drain signal and the timer only when
/// they may have fired.
///
/// A `tokio::select!` over the three polled all of them on every wake of
/// the task, twice per proxied request: the timer's poll (the task budget,
/// the waker swap) and the drain signal's (a lock on the watch's waiter
/// list) cost ~450 instructions per request (callgrind, ~2 % of a small
/// keep-alive request). Once polled, both keep this task's waker until they
/// fire; a wake then shows in a plain atomic read (the timer is no longer
/// in the wheel; the channel's version moved), and only then are they
/// polled again.
async fn next_event<C>(
    conn: &mut C,
    drain: &mut watch::Receiver<()>,
    draining: bool,
    mut timer: Pin<&mut tokio::time::Sleep>,
) -> Event
where
    C: Future<Output = hyper::Result<()>> + Unpin,
{
    // A second receiver, to read the version while `changed` borrows the
    // first; it saw what `drain` saw, so a change shows in both.
    let probe = drain.clone();
    let mut changed = std::pin::pin!(drain.changed());
    let (mut drain_armed, mut timer_armed) = (draining, false);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(res) = Pin::new(&mut *conn).poll(cx) {
            return Poll::Ready(Event::Ended(res));
        }
        // `Err`: the sender is gone, which is the drain signal too.
        if !drain_armed || probe.has_changed().unwrap_or(true) {
            drain_armed = true;
            if !draining && changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Drain);
            }
        }
        if !timer_armed || timer.is_elapsed() {
            timer_armed = true;
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
        }
        Poll::Pending
    })
    .await
}

/// How often an accept failure is logged, at most (over all listeners).
pub(crate) const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Accept failures of several listeners, logged at most once per
/// [`ACCEPT_LOG_EVERY`] with the number of failures in between: out of file
/// descriptors, every listener fails on every attempt, and a line per
/// failure would flood the log.
#[derive(Debug, Default)]
pub(crate) struct AcceptErrors {
    /// `now_ms` of the last line (0: none yet).
    logged_at: AtomicU64,
    /// Failures since the last line.
    unlogged: AtomicU64,
}

impl AcceptErrors {
    /// Records a failed accept on the `what` listener; logs it unless a
    /// line was written less than [`ACCEPT_LOG_EVERY`] ago. Returns true if
    /// it failed for lack of file descriptors.
    pub(crate) fn failed(&self, e: &io::Error, what: &str) -> bool {
        // EMFILE (per process) and ENFILE (system-wide): 24 and 23 on
        // Linux, the BSDs and macOS alike.
        let no_fds = matches!(e.raw_os_error(), Some(23 | 24));
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.logged_at.load(Ordering::Relaxed);
        let every = u64::try_from(ACCEPT_LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        let due = last == 0 || now.saturating_sub(last) >= every;
        if due
            && self
                .logged_at
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.unlogged.store(0, Ordering::Relaxed);
            if no_fds {
                tracing::warn!(
                    listener = what,
                    error = %e,
                    failures = unlogged,
                    "cannot accept connections: out of file descriptors; backing off (logged at most every {ACCEPT_LOG_EVERY:?})"
                );
            } else {
                tracing::warn!(
                    listener = what,
                    error = %e,
                    failures = unlogged,
                    "accept failed; backing off (logged at most every {ACCEPT_LOG_EVERY:?})"
                );
            }
        }
        no_fds
    }
}

/// The wait after a failed accept: 5 ms doubling to 1 s, reset by a
/// successful accept. Waiting, established connections are served and the
/// loop costs next to no CPU; at most 1 s after descriptors free up,
/// accepting resumes.
pub(crate) struct AcceptBackoff(Duration);

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    pub(crate) fn new() -> AcceptBackoff {
        AcceptBackoff(Self::FIRST)
    }

    pub(crate) fn reset(&mut self) {
        self.0 = Self::FIRST;
    }

    /// Sleeps the current backoff, then doubles it.
    pub(crate) async fn wait(&mut self) {
        let d = self.0;
        self.0 = (d * 2).min(Self::MAX);
        tokio::time::sleep(d).await;
    }
}

/// Room for a connection's first read: hyper's own first read size, so
/// that a request head hyper would have read in one call still comes in one.
const FIRST_READ: usize = 8192;

/// Reads a connection's first bytes and tells HTTP/2 prior knowledge from
/// HTTP/1 by them. Returns the bytes read, which hyper is served first
/// ([`TrackedIo::prefix`]): one `recvfrom` where a peek and then hyper's
/// read took two on every new connection. The buffer is allocated only once
/// bytes have arrived: a silent connection holds none.
async fn detect(stream: &mut TcpStream) -> io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::new();
    loop {
        stream.readable().await?;
        if buf.len() == buf.capacity() {
            buf.reserve(FIRST_READ);
        }
        // `read_buf` (not `try_read_buf`): after a short read tokio knows
        // the socket is drained, so hyper's next read waits for readiness
        // instead of costing an `EAGAIN` syscall.
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(H2_PREFACE.len());
        if buf[..n] != H2_PREFACE[..n] {
            return Ok((Protocol::Http1, buf));
        }
        if n == H2_PREFACE.len() {
            return Ok((Protocol::Http2, buf));
        }
        // A prefix of the preface so far ("P", "PRI *", ...): read on.
        // Rare (a real client sends the preface in one segment), and bounded
        // by the caller's timeout.
    }
}
