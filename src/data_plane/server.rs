//! Client connections: accept loop, protocol detection, per-connection
//! timeouts and graceful shutdown.
//!
//! Each connection runs in its own task that polls the hyper connection and,
//! beside it, one lazily re-armed timer that enforces two bounds hyper does
//! not separate: `header_read_timeout` (from the first byte of a request
//! head to its end: slowloris) and `idle_timeout` (keep-alive with no
//! request). [`ConnActivity`] is what the timer reads: the IO wrapper marks
//! when a request head starts arriving, and every request holds an
//! [`ActiveRequest`](crate::data_plane::conn::ActiveRequest) until its response body ends.
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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus::IntGauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::data_plane::backend::now_ms;
use crate::data_plane::conn::{
    judge, next_request_is_bad, ClientInfo, ConnActivity, Limits, Parked, TrackedIo, Transport,
    Verdict,
};
use crate::data_plane::drain::DrainToken;
use crate::data_plane::exchange::ProxyBody;
use crate::data_plane::h1guard::H1Guard;
use crate::data_plane::proxy::Proxy;
use crate::metrics::Metrics;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

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
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl Server {
    /// A server for `proxy` with `limits`.
    pub(crate) fn new(proxy: Arc<Proxy>, metrics: Arc<Metrics>, limits: Limits) -> Server {
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
    pub(crate) async fn serve_plain(
        self: Arc<Self>,
        listener: TcpListener,
        drain: watch::Receiver<()>,
        token: DrainToken,
    ) {
        let gauge = self.metrics.open_connections.with_label_values(&["http"]);
        self.accept_loop(listener, drain, token, gauge, None).await;
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
        self.accept_loop(listener, drain, token, gauge, Some(acceptor))
            .await;
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        mut drain: watch::Receiver<()>,
        token: DrainToken,
        gauge: IntGauge,
        tls: Option<Arc<crate::data_plane::tls::ServerTls>>,
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
        acceptor: Arc<crate::data_plane::tls::ServerTls>,
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
