//! Per-connection state: what the connection timer reads, what each request
//! holds until its response body ends, and the IO wrapper that reports reads
//! and runs the HTTP/1 framing guard.
//!
//! The timer enforces two bounds hyper does not separate:
//! `header_read_timeout` (from the first byte of a request head to its end:
//! slowloris) and `idle_timeout` (keep-alive with no request).
//! [`ConnActivity`] is what it reads: [`TrackedIo`] marks when a request
//! head starts arriving, and every request holds an [`ActiveRequest`] until
//! its response body ends. [`judge`] is the pure decision.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::data_plane::backend::now_ms;
use crate::data_plane::conn_limit::ConnSlot;
use crate::data_plane::drain::DrainToken;
use crate::data_plane::h1guard::{Finding, H1Guard};

/// Limits of client connections (from `[proxy]`).
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Request head must arrive within this from its first byte.
    pub(crate) header_read_timeout: Duration,
    /// Keep-alive connections with no request are closed after this (0 = never).
    pub(crate) idle_timeout: Duration,
    /// Largest request header section (431 above).
    pub(crate) max_request_header_bytes: usize,
    /// Largest number of request headers.
    pub(crate) max_headers: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub(crate) max_concurrent_streams: u32,
}

/// What the proxy knows about the client connection a request came on.
pub(crate) struct ClientInfo {
    /// Peer address.
    pub(crate) addr: SocketAddr,
    /// Peer IP as a header value (for `X-Forwarded-For`), made once per connection.
    pub(crate) ip: HeaderValue,
    /// Did it come over TLS?
    pub(crate) tls: bool,
    /// Keeps shutdown waiting while the connection (or its upgraded
    /// stream) lives.
    _drain: DrainToken,
    /// Its place in the connection limits and the open-connections gauge,
    /// held as long as the connection or its upgraded stream lives.
    _slot: ConnSlot,
}

impl ClientInfo {
    /// Info for a connection from `addr`.
    pub(crate) fn new(
        addr: SocketAddr,
        tls: bool,
        drain: DrainToken,
        slot: ConnSlot,
    ) -> ClientInfo {
        let ip = ip_header(addr.ip());
        ClientInfo {
            addr,
            ip,
            tls,
            _drain: drain,
            _slot: slot,
        }
    }
}

/// The client's address as a header value (`X-Forwarded-For`). An IPv4
/// address is written digit by digit: `Ipv4Addr`'s `Display` (through
/// `to_string`, with its padding support) cost ~1 500 instructions, about
/// 3 % of a `Connection: close` request.
fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    let v4 = match ip {
        std::net::IpAddr::V4(v4) => v4,
        std::net::IpAddr::V6(v6) => {
            return HeaderValue::from_str(&v6.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("unknown"))
        }
    };
    let mut out = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out[len] = b'.';
            len += 1;
        }
        let mut buf = [0u8; 20];
        let digits = crate::data_plane::headers::decimal(u64::from(octet), &mut buf);
        out[len..len + digits.len()].copy_from_slice(digits);
        len += digits.len();
    }
    HeaderValue::from_bytes(&out[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// What the per-connection timer reads.
#[derive(Debug)]
pub(crate) struct ConnActivity {
    pub(crate) in_flight: AtomicU32,
    /// When the current state began (idle since / head started), in `now_ms`.
    pub(crate) since_ms: AtomicU64,
    pub(crate) reading_head: AtomicBool,
    /// The last write to the client could not complete (the client is not
    /// reading): hyper still holds response bytes.
    pub(crate) write_blocked: AtomicBool,
    /// HTTP/1: requests handed to the service so far.
    pub(crate) requests: AtomicU64,
    /// HTTP/1: index of a request whose body the [`H1Guard`] found
    /// malformed (`u64::MAX`: none).
    pub(crate) bad_body: AtomicU64,
}

impl ConnActivity {
    pub(crate) fn new() -> Arc<ConnActivity> {
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
    pub(crate) fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.reading_head.store(false, Ordering::Relaxed);
        ActiveRequest(Arc::clone(self))
    }

    /// Bytes arrived; if the connection was idle, a request head starts.
    #[inline]
    pub(crate) fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.reading_head.load(Ordering::Relaxed)
        {
            self.since_ms.store(now_ms(), Ordering::Relaxed);
            self.reading_head.store(true, Ordering::Relaxed);
        }
    }
}

/// Counts an HTTP/1 request handed to the service; true if the guard
/// already found its body malformed.
pub(crate) fn next_request_is_bad(a: &ConnActivity) -> bool {
    let n = a.requests.fetch_add(1, Ordering::Relaxed);
    a.bad_body.load(Ordering::Relaxed) == n
}

/// Holds its connection busy until dropped (end of the response body).
#[derive(Debug)]
pub(crate) struct ActiveRequest(Arc<ConnActivity>);

impl ActiveRequest {}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.since_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// What the timer decides.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
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
pub(crate) const PARK_AFTER: Duration = Duration::from_millis(100);

/// Longest wait between rechecks of a busy connection.
pub(crate) const BUSY_RECHECK: Duration = Duration::from_secs(1);

/// What the timer should do now. `park` when the connection may be parked.
///
/// The timer is re-armed only when it fires, so a deadline can be late by
/// the time between rechecks after the connection changes state (a request
/// ends, bytes arrive). Every recheck is therefore at most `cap` away: the
/// shortest of the bounds that apply.
pub(crate) fn judge(
    a: &ConnActivity,
    now: u64,
    limits: &Limits,
    track_heads: bool,
    park: bool,
) -> Verdict {
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
pub(crate) struct TrackedIo<T> {
    pub(crate) inner: T,
    pub(crate) activity: Arc<ConnActivity>,
    /// HTTP/1 only: strict framing checks before hyper parses.
    pub(crate) guard: Option<H1Guard>,
    /// Bytes read before hyper reads: the connection's first read (taken
    /// to tell HTTP/2 from HTTP/1), or what hyper had read but not parsed
    /// when the connection was parked. Served first; already scanned by
    /// the guard.
    pub(crate) prefix: bytes::Bytes,
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

/// Counts a parked connection while it lives.
pub(crate) struct Parked<'a>(&'a IntGauge);

impl<'a> Parked<'a> {
    pub(crate) fn new(g: &'a IntGauge) -> Parked<'a> {
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
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_addresses_as_header_values() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.0.100.9",
            "::1",
            "2001:db8::7",
        ] {
            let parsed: std::net::IpAddr = ip.parse().expect("address");
            assert_eq!(ip_header(parsed), ip);
        }
    }

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

    /// The same verdicts on tokio's paused clock, as the timer sees them:
    /// each deadline falls exactly on its millisecond.
    #[tokio::test(start_paused = true)]
    async fn timer_verdicts_on_paused_time() {
        async fn advance_ms(ms: u64) {
            tokio::time::advance(Duration::from_millis(ms)).await;
        }
        let l = limits();
        let a = ConnActivity::new();
        let t0 = now_ms();
        // Idle: parked exactly PARK_AFTER after the connection went idle.
        advance_ms(99).await;
        assert_eq!(
            judge(&a, now_ms(), &l, true, true),
            Verdict::RecheckAt(t0 + 100)
        );
        advance_ms(1).await;
        assert_eq!(judge(&a, now_ms(), &l, true, true), Verdict::Park);
        // Bytes arrive: a head starts; header_read_timeout counts from here.
        a.on_read();
        let head = now_ms();
        advance_ms(9_999).await;
        assert_eq!(
            judge(&a, now_ms(), &l, true, false),
            Verdict::RecheckAt(head + 10_000)
        );
        advance_ms(1).await;
        assert_eq!(judge(&a, now_ms(), &l, true, false), Verdict::HeaderTimeout);
        // A request in flight is never timed out, however long it takes.
        let busy = a.begin();
        advance_ms(500_000).await;
        assert!(matches!(
            judge(&a, now_ms(), &l, true, true),
            Verdict::RecheckAt(_)
        ));
        // Its end restarts the idle clock: closed exactly idle_timeout later.
        drop(busy);
        let end = now_ms();
        advance_ms(89_999).await;
        assert_eq!(
            judge(&a, now_ms(), &l, true, false),
            Verdict::RecheckAt(end + 90_000)
        );
        advance_ms(1).await;
        assert_eq!(judge(&a, now_ms(), &l, true, false), Verdict::Idle);
    }
}
