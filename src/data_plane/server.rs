//! Client connections: accept loop, protocol detection, per-connection
//! timeouts and graceful shutdown.
//!
//! Each connection runs in its own task that polls the hyper connection and,
//! beside it, one lazily re-armed timer that enforces two bounds hyper does
//! not separate: `header_read_timeout` (from the first byte of a request
//! head to its end: slowloris) and `idle_timeout` (keep-alive with no
//! request). [`ConnActivity`] is what the timer reads: the IO wrapper marks
//! when a request head starts arriving, and every request holds an
//! [`ActiveRequest`] until its response body ends.
//!
//! Shutdown follows the dropped-sender pattern: dropping the
//! `watch::Sender` tells every connection to finish gracefully (HTTP/1.1
//! closes after the current response, HTTP/2 sends GOAWAY); every task
//! holds a [`DrainToken`], and shutdown waits until all are gone or
//! `drain_timeout` passes.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::backend::now_ms;
use crate::exchange::ProxyBody;
use crate::h1guard::{Finding, H1Guard};
use crate::metrics::Metrics;
use crate::proxy::{ClientInfo, Proxy};

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Limits of client connections (from `[proxy]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request head must arrive within this from its first byte.
    pub header_read_timeout: Duration,
    /// Keep-alive connections with no request are closed after this (0 = never).
    pub idle_timeout: Duration,
    /// Largest request header section (431 above).
    pub max_request_header_bytes: usize,
    /// Largest number of request headers.
    pub max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
}

/// Keeps shutdown waiting while it lives. Clone it into every task that
/// must finish (or be cut at the deadline) before the process exits.
#[derive(Clone, Debug)]
pub struct DrainToken(#[allow(dead_code)] mpsc::Sender<()>);

/// Tells tasks to stop and waits for them.
pub struct Drain {
    signal: Option<watch::Sender<()>>,
    token: Option<DrainToken>,
    done: mpsc::Receiver<()>,
}

impl Drain {
    /// A drain with no tasks yet.
    pub fn new() -> Drain {
        let (signal, _) = watch::channel(());
        let (tx, done) = mpsc::channel(1);
        Drain {
            signal: Some(signal),
            token: Some(DrainToken(tx)),
            done,
        }
    }

    /// A receiver that fires (with `Err`) when shutdown starts.
    pub fn watcher(&self) -> watch::Receiver<()> {
        match &self.signal {
            Some(s) => s.subscribe(),
            None => watch::channel(()).1,
        }
    }

    /// A token for a task shutdown must wait for.
    pub fn token(&self) -> DrainToken {
        match &self.token {
            Some(t) => t.clone(),
            None => DrainToken(mpsc::channel(1).0),
        }
    }

    /// Signals every task and waits until all tokens are dropped or
    /// `deadline` passes. Returns true if everything finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        drop(self.signal.take());
        drop(self.token.take());
        tokio::time::timeout(deadline, self.done.recv())
            .await
            .is_ok()
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

/// What the per-connection timer reads.
#[derive(Debug)]
pub struct ConnActivity {
    in_flight: AtomicU32,
    /// When the current state began (idle since / head started), in `now_ms`.
    since_ms: AtomicU64,
    reading_head: AtomicBool,
    /// The last write to the client could not complete (the client is not
    /// reading): hyper still holds response bytes.
    write_blocked: AtomicBool,
    /// HTTP/1: requests handed to the service so far.
    requests: AtomicU64,
    /// HTTP/1: index of a request whose body the [`H1Guard`] found
    /// malformed (`u64::MAX`: none).
    bad_body: AtomicU64,
}

impl ConnActivity {
    fn new() -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            in_flight: AtomicU32::new(0),
            since_ms: AtomicU64::new(now_ms()),
            reading_head: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            bad_body: AtomicU64::new(u64::MAX),
            write_blocked: AtomicBool::new(false),
        })
    }

    /// A request started on this connection.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.reading_head.store(false, Ordering::Relaxed);
        ActiveRequest(Arc::clone(self))
    }

    /// Bytes arrived; if the connection was idle, a request head starts.
    #[inline]
    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.reading_head.load(Ordering::Relaxed)
        {
            self.since_ms.store(now_ms(), Ordering::Relaxed);
            self.reading_head.store(true, Ordering::Relaxed);
        }
    }
}

/// Counts an HTTP/1 request handed to the service; true if the guard
/// already found its body malformed.
fn next_request_is_bad(a: &ConnActivity) -> bool {
    let n = a.requests.fetch_add(1, Ordering::Relaxed);
    a.bad_body.load(Ordering::Relaxed) == n
}

/// The answer to a request whose chunked body is malformed: nothing of it
/// is sent upstream.
fn bad_body_response() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(
        &b"400 malformed request body framing\n"[..],
        None,
    ));
    *resp.status_mut() = StatusCode::BAD_REQUEST;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// Holds its connection busy until dropped (end of the response body).
#[derive(Debug)]
pub struct ActiveRequest(Arc<ConnActivity>);

impl ActiveRequest {
    /// A guard on no connection (tests, internal requests).
    pub fn detached() -> ActiveRequest {
        ConnActivity::new().begin()
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// What the timer decides.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Look again at this `now_ms`.
    RecheckAt(u64),
    /// The request head did not arrive in time.
    HeaderTimeout,
    /// Idle too long.
    Idle,
    /// Idle long enough to give hyper's buffers back ([`PARK_AFTER`]).
    Park,
}

/// An HTTP/1 connection idle this long is parked: hyper's connection state
/// (about 16 KiB of buffers) is dropped and the bare socket waits for
/// readability, so thousands of idle keep-alive clients cost little memory
/// (as nginx frees its buffers between keep-alive requests). Short enough
/// that a burst of clients making one request each never holds many
/// buffers at once; long enough that clients sending back to back never
/// park.
const PARK_AFTER: Duration = Duration::from_millis(100);

/// Longest wait between rechecks of a busy connection.
const BUSY_RECHECK: Duration = Duration::from_secs(1);

/// What the timer should do now. `park` when the connection may be parked.
///
/// The timer is re-armed only when it fires, so a deadline can be late by
/// the time between rechecks after the connection changes state (a request
/// ends, bytes arrive). Every recheck is therefore at most `cap` away: the
/// shortest of the bounds that apply.
fn judge(a: &ConnActivity, now: u64, limits: &Limits, track_heads: bool, park: bool) -> Verdict {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 4);
    let mut cap = ms(limits.header_read_timeout);
    if !limits.idle_timeout.is_zero() {
        cap = cap.min(ms(limits.idle_timeout));
    }
    if park {
        cap = cap.min(ms(PARK_AFTER));
    }
    let recheck = |at: u64| Verdict::RecheckAt(at.min(now + cap.max(1)));
    let since = a.since_ms.load(Ordering::Relaxed);
    if a.in_flight.load(Ordering::Relaxed) > 0 {
        // Busy: the bounds restart when it goes idle; look again now and
        // then, not at the (short) park delay.
        let busy_cap = cap
            .max(ms(BUSY_RECHECK))
            .min(ms(limits.header_read_timeout));
        return Verdict::RecheckAt(now + busy_cap.max(1));
    }
    if track_heads && a.reading_head.load(Ordering::Relaxed) {
        let due = since + ms(limits.header_read_timeout);
        return if now >= due {
            Verdict::HeaderTimeout
        } else {
            recheck(due)
        };
    }
    let idle_due = if limits.idle_timeout.is_zero() {
        u64::MAX
    } else {
        since + ms(limits.idle_timeout)
    };
    if now >= idle_due {
        return Verdict::Idle;
    }
    if park {
        let park_due = since + ms(PARK_AFTER);
        if now >= park_due {
            if !a.write_blocked.load(Ordering::Relaxed) {
                return Verdict::Park;
            }
            // Still flushing to a slow reader: look again later.
            return recheck(u64::MAX);
        }
        return recheck(park_due);
    }
    recheck(idle_due)
}

/// The IO of a client connection, reporting reads to its [`ConnActivity`].
struct TrackedIo<T> {
    inner: T,
    activity: Arc<ConnActivity>,
    /// HTTP/1 only: strict framing checks before hyper parses.
    guard: Option<H1Guard>,
    /// Bytes hyper had read but not parsed when the connection was parked;
    /// served first (already scanned by the guard).
    prefix: bytes::Bytes,
}

impl<T> TrackedIo<T> {
    fn note_write<R>(&self, r: &Poll<io::Result<R>>) {
        self.activity
            .write_blocked
            .store(r.is_pending(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.activity.on_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
            if let Some(guard) = &mut this.guard {
                if let Finding::BadBody(n) = guard.scan(&mut buf.filled_mut()[before..]) {
                    this.activity.bad_body.store(n, Ordering::Relaxed);
                }
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.note_write(&r);
        r
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.note_write(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.note_write(&r);
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// HTTP protocol of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (prior knowledge or ALPN `h2`).
    Http2,
}

/// Everything connection tasks share.
pub struct Server {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    limits: Limits,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Server {
    /// A server for `proxy` with `limits`.
    pub fn new(proxy: Arc<Proxy>, metrics: Arc<Metrics>, limits: Limits) -> Server {
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
            http1: h1,
            http2: h2,
        }
    }

    /// Accepts plain connections on `listener` until `drain` signals.
    pub async fn serve_plain(
        self: Arc<Self>,
        listener: TcpListener,
        drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let gauge = self.metrics.open_connections.with_label_values(&["http"]);
        self.accept_loop(listener, drain, token, gauge, None).await;
    }

    /// Accepts TLS connections on `listener` until `drain` signals.
    pub async fn serve_tls(
        self: Arc<Self>,
        listener: TcpListener,
        acceptor: Arc<crate::tls::ServerTls>,
        drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let gauge = self.metrics.open_connections.with_label_values(&["https"]);
        self.accept_loop(listener, drain, token, gauge, Some(acceptor))
            .await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        mut drain: watch::Receiver<()>,
        token: DrainToken,
        gauge: IntGauge,
        tls: Option<Arc<crate::tls::ServerTls>>,
    ) {
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = drain.changed() => break,
            };
            let (stream, peer) = match accepted {
                Ok(x) => {
                    backoff = Duration::from_millis(5);
                    x
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let me = Arc::clone(&self);
            let conn_drain = drain.clone();
            let conn_token = token.clone();
            let gauge = gauge.clone();
            let tls = tls.clone();
            let task = async move {
                gauge.inc();
                match tls {
                    None => {
                        me.serve_plain_conn(stream, peer, conn_drain, conn_token)
                            .await
                    }
                    // Boxed: a TLS connection's future is several times
                    // the size of a plain one's; inline, every plain
                    // connection's task would be that large too.
                    Some(acceptor) => {
                        Box::pin(me.serve_tls_conn(stream, peer, acceptor, conn_drain, conn_token))
                            .await
                    }
                }
                gauge.dec();
            };
            tokio::spawn(task);
        }
        // Dropping the listener here stops the kernel accepting for us.
        drop(listener);
    }

    async fn serve_plain_conn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        mut drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let detected = tokio::select! {
            d = tokio::time::timeout(self.limits.header_read_timeout, detect(&stream)) => d,
            // Shutdown before the first byte: no request to finish.
            _ = drain.changed() => return,
        };
        let proto = match detected {
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
        let client = ClientInfo::new(peer, false, token);
        self.serve_conn(stream, proto, client, drain).await;
    }

    async fn serve_tls_conn(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        acceptor: Arc<crate::tls::ServerTls>,
        mut drain: watch::Receiver<()>,
        token: DrainToken,
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
        let client = ClientInfo::new(peer, true, token);
        self.serve_conn(tls, proto, client, drain).await;
    }

    /// Serves one connection until it ends, times out, or drains.
    async fn serve_conn<T: Transport>(
        &self,
        io: T,
        proto: Protocol,
        client: ClientInfo,
        mut drain: watch::Receiver<()>,
    ) {
        let activity = ConnActivity::new();
        let io = TokioIo::new(TrackedIo {
            inner: io,
            activity: Arc::clone(&activity),
            guard: (proto == Protocol::Http1).then(H1Guard::new),
            prefix: bytes::Bytes::new(),
        });
        let client = Arc::new(client);
        let proxy = Arc::clone(&self.proxy);
        let act = Arc::clone(&activity);
        let http1 = proto == Protocol::Http1;
        let service = service_fn(move |req| {
            let proxy = Arc::clone(&proxy);
            let client = Arc::clone(&client);
            let bad = http1 && next_request_is_bad(&act);
            let active = act.begin();
            async move {
                if bad {
                    drop(active);
                    return Ok::<_, Infallible>(bad_body_response());
                }
                Ok::<_, Infallible>(proxy.handle(req, &client, active).await)
            }
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
                tokio::select! {
                    res = &mut conn => {
                        if let Err(e) = res {
                            tracing::debug!(error = %e, "client connection ended with an error");
                        }
                        return;
                    }
                    _ = drain.changed(), if !draining => {
                        draining = true;
                        Pin::new(&mut conn).graceful_shutdown();
                    }
                    () = &mut timer => match judge(&activity, now_ms(), limits, track_heads, parkable && !draining) {
                        Verdict::RecheckAt(at) => rearm(timer.as_mut(), at),
                        Verdict::HeaderTimeout => {
                            self.metrics.timeouts.with_label_values(&["header_read"]).inc();
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

/// Counts a parked connection while it lives.
struct Parked<'a>(&'a IntGauge);

impl<'a> Parked<'a> {
    fn new(g: &'a IntGauge) -> Parked<'a> {
        g.inc();
        Parked(g)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What the connection loop needs from a client transport beyond IO.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Can an idle HTTP/1 connection on it be parked, that is, does it hold
    /// no buffered state of its own that readiness of the socket would miss?
    fn parkable(&self) -> bool;

    /// Resolves when the socket is readable (data or end of stream).
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_;
}

impl Transport for TcpStream {
    fn parkable(&self) -> bool {
        true
    }

    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        TcpStream::readable(self)
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    /// rustls may hold decrypted bytes the socket no longer shows.
    fn parkable(&self) -> bool {
        false
    }

    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        std::future::pending()
    }
}

/// Tells HTTP/2 prior knowledge from HTTP/1 by peeking at the first bytes.
async fn detect(stream: &TcpStream) -> io::Result<Protocol> {
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if buf[..n] != H2_PREFACE[..n] {
            return Ok(Protocol::Http1);
        }
        if n == H2_PREFACE.len() {
            return Ok(Protocol::Http2);
        }
        // A prefix of the preface so far ("P", "PRI *", ...): wait for more.
        // Rare (a real client sends the preface in one segment), and bounded
        // by the caller's timeout.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            max_request_header_bytes: 65536,
            max_headers: 100,
            max_concurrent_streams: 100,
        }
    }

    #[test]
    fn timer_verdicts() {
        let a = ConnActivity::new();
        let l = limits();
        let t0 = a.since_ms.load(Ordering::Relaxed);
        // Rechecks are at most min(header_read, idle) = 10 s away.
        assert_eq!(
            judge(&a, t0 + 1_000, &l, true, false),
            Verdict::RecheckAt(t0 + 11_000)
        );
        assert_eq!(
            judge(&a, t0 + 85_000, &l, true, false),
            Verdict::RecheckAt(t0 + 90_000)
        );
        assert_eq!(judge(&a, t0 + 90_000, &l, true, false), Verdict::Idle);
        a.reading_head.store(true, Ordering::Relaxed);
        assert_eq!(
            judge(&a, t0 + 10_000, &l, true, false),
            Verdict::HeaderTimeout
        );
        assert_eq!(
            judge(&a, t0 + 10_000, &l, false, false),
            Verdict::RecheckAt(t0 + 20_000)
        );
        let busy = a.begin();
        assert!(matches!(
            judge(&a, t0 + 500_000, &l, true, false),
            Verdict::RecheckAt(_)
        ));
        drop(busy);
        assert!(!a.reading_head.load(Ordering::Relaxed));
        // Parking: after PARK_AFTER idle, unless a write is still blocked.
        let t1 = a.since_ms.load(Ordering::Relaxed);
        assert_eq!(
            judge(&a, t1 + 50, &l, true, true),
            Verdict::RecheckAt(t1 + 100)
        );
        assert_eq!(judge(&a, t1 + 100, &l, true, true), Verdict::Park);
        a.write_blocked.store(true, Ordering::Relaxed);
        assert!(matches!(
            judge(&a, t1 + 100, &l, true, true),
            Verdict::RecheckAt(_)
        ));
        assert_eq!(judge(&a, t1 + 90_000, &l, true, true), Verdict::Idle);
    }
}
