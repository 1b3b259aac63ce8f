//! One request/response exchange, from request head to the end of the
//! response body: the body type handed to hyper, and the bookkeeping that
//! runs when the body ends (metrics, access log, returning the upstream
//! connection to its pool, releasing in-flight counts).
//!
//! Everything is settled in `Drop`, so an exchange is accounted for exactly
//! once however it ends: body complete, client gone, or an error response.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Uri};
use http_body::{Body, Frame, SizeHint};

use crate::color::Color;
use crate::data_plane::backend::{Backend, InFlight};
use crate::data_plane::conn::ActiveRequest;
use crate::data_plane::h1client::{ResponseBody, UpstreamConn, UpstreamError};
use crate::data_plane::outcomes::Outcome;
use crate::data_plane::routing::{Decision, PoolChoice, Route};
use crate::data_plane::snap_ref::SnapRef;

/// The error a response body ends with (hyper closes an HTTP/1 connection
/// before the declared end, or resets the HTTP/2 stream).
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// How an upstream response body failed after its head was sent.
#[derive(Debug)]
pub(crate) enum BodyFailure {
    /// It broke off (closed or reset early, bad framing).
    Broke(UpstreamError),
    /// Nothing came for `upstream_read_timeout`.
    Silent(Duration),
}

/// Counts a body failure against the backend (upstream error, passive
/// ejection) and returns the error the client's body ends with. Given by
/// the request path ([`crate::data_plane::upstream::body_failed`]), so the
/// exchange needs no knowledge of the ejection policy.
pub(crate) type OnBodyFailure = fn(&Route, &Arc<Backend>, Color, BodyFailure) -> BodyError;

/// The route a request matched, in the snapshot it was routed on.
pub(crate) struct Routed {
    /// The snapshot, held until the exchange ends.
    pub(crate) snap: SnapRef,
    /// Index in `snap.routes`.
    pub(crate) route: usize,
}

impl Routed {
    /// The route.
    pub(crate) fn route(&self) -> &Route {
        &self.snap.routes[self.route]
    }
}

/// What a streamed response needs to blame its backend if the body fails
/// (with the exchange's [`Routed`]).
pub(crate) struct Streamed {
    /// Counts the failure.
    pub(crate) on_failure: OnBodyFailure,
    /// `upstream_read_timeout` (`Duration::ZERO`: never).
    pub(crate) read_timeout: Duration,
}

/// Fields only the access log needs; allocated only when it is on.
pub(crate) struct LogFields {
    /// Request method.
    pub(crate) method: Method,
    /// Request target.
    pub(crate) uri: Uri,
    /// Client address.
    pub(crate) client: SocketAddr,
    /// Why the proxy answered itself, if it did.
    pub(crate) error: Option<String>,
    /// The targeting rule that matched, if one did.
    pub(crate) rule: Option<Arc<str>>,
}

/// The bookkeeping of one exchange, settled on drop.
pub(crate) struct Exchange {
    start: Instant,
    /// The route (and service) that matched, if any: metrics, access log.
    pub(crate) routed: Option<Routed>,
    /// The pool choice (metrics and access log).
    pub(crate) choice: Option<PoolChoice>,
    /// Response status.
    pub(crate) status: u16,
    /// `x-request-id` of the request.
    pub(crate) request_id: Option<HeaderValue>,
    /// The backend serving it, counted in flight.
    pub(crate) in_flight: Option<InFlight>,
    /// The upstream connection, pooled again if the body ends cleanly.
    pub(crate) upstream: Option<UpstreamConn>,
    /// Access log fields, when the access log is on.
    pub(crate) log: Option<Box<LogFields>>,
    /// Set when the upstream's body is streamed to the client.
    pub(crate) streamed: Option<Streamed>,
    unmatched: Option<Arc<crate::metrics::Metrics>>,
    /// The backend answered (the status is its own, not the proxy's).
    pub(crate) answered: bool,
    /// The upstream body broke off after the head.
    broke: bool,
    bytes: u64,
    eos: bool,
    _active: ActiveRequest,
}

impl Exchange {
    /// Starts the record of a request, holding its connection active.
    pub(crate) fn new(start: Instant, active: ActiveRequest) -> Exchange {
        Exchange {
            start,
            routed: None,
            choice: None,
            status: 0,
            request_id: None,
            in_flight: None,
            upstream: None,
            log: None,
            streamed: None,
            unmatched: None,
            answered: false,
            broke: false,
            bytes: 0,
            eos: false,
            _active: active,
        }
    }

    /// The upstream body failed: count it, blame the backend once, log it.
    fn body_failed(&mut self, failure: BodyFailure) -> BodyError {
        self.broke = true;
        let (Some(streamed), Some(routed), Some(choice), Some(flight)) = (
            self.streamed.take(),
            &self.routed,
            &self.choice,
            &self.in_flight,
        ) else {
            return Box::new(std::io::Error::other(format!("{failure:?}")));
        };
        let route = routed.route();
        let err = (streamed.on_failure)(route, flight.backend(), choice.color, failure);
        if let Some(log) = &mut self.log {
            log.error = Some(err.to_string());
        }
        err
    }

    /// Counts this exchange under the "no service matched" series.
    pub(crate) fn count_unmatched(&mut self, metrics: Arc<crate::metrics::Metrics>) {
        self.unmatched = Some(metrics);
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        match (&self.routed, &self.choice) {
            (Some(routed), Some(choice)) => {
                let svc = &routed.route().service;
                let pool = svc.pool_metrics(choice.color);
                pool.observe(self.status, elapsed.as_secs_f64());
                // Rollout analysis: the final answer the client got from
                // this pool (testers' preview requests left out).
                if choice.decision != Decision::Preview {
                    let outcome = if self.broke || (!self.answered && self.status >= 500) {
                        Outcome::Transport
                    } else if self.status >= 500 {
                        Outcome::Status5xx
                    } else {
                        Outcome::Ok
                    };
                    pool.outcome(outcome, elapsed);
                }
            }
            _ => {
                if let Some(m) = &self.unmatched {
                    m.observe_unmatched(self.status);
                }
            }
        }
        if let (Some(conn), Some(flight)) = (self.upstream.take(), &self.in_flight) {
            if self.eos {
                flight.backend().checkin(conn);
            }
        }
        if let (true, Some(_), Some(flight)) = (self.eos, &self.streamed, &self.in_flight) {
            // A streamed response succeeds when its body ends cleanly (a
            // failed body took `streamed`); 5xx were counted at the head.
            if self.status < 500 {
                flight.backend().record_success();
            }
        }
        if let Some(log) = &self.log {
            let service = self
                .routed
                .as_ref()
                .map_or("-", |r| &r.route().service.name);
            let (pool, decision, bucket) = match &self.choice {
                Some(c) => (
                    c.color.as_str(),
                    // `rule:NAME` when a rule sent it; `rule_fallback:NAME`
                    // when the rule's pool had no backend and the weights did.
                    match (&log.rule, c.decision) {
                        (Some(r), Decision::Rule) => std::borrow::Cow::Owned(format!("rule:{r}")),
                        (Some(r), _) => std::borrow::Cow::Owned(format!("rule_fallback:{r}")),
                        (None, d) => std::borrow::Cow::Borrowed(d.as_str()),
                    },
                    c.bucket.map_or(-1, i32::from),
                ),
                None => ("-", std::borrow::Cow::Borrowed("-"), -1),
            };
            let backend = self
                .in_flight
                .as_ref()
                .map_or("-", |f| f.backend().label.as_str());
            let request_id = self
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            tracing::info!(
                target: "switchyard::access",
                request_id,
                client = %log.client,
                method = %log.method,
                uri = %log.uri,
                service,
                pool,
                decision = &*decision,
                bucket,
                backend,
                // 0: the client left before the head (counted as `499`).
                status = if self.status == 0 { 499 } else { self.status },
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                bytes = self.bytes,
                complete = self.eos,
                error = log.error.as_deref().unwrap_or(""),
            );
        }
    }
}

/// The response body given to hyper: the backend's body streamed through,
/// or a small body the proxy wrote itself.
pub(crate) struct ProxyBody {
    inner: Inner,
    exchange: Option<Exchange>,
    /// The `upstream_read_timeout` timer, made at the first wait (a body
    /// ready at once never allocates one).
    silence: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Was the last poll of the upstream body pending?
    waiting: bool,
    /// The upstream body's error, held back for one poll (see `poll_frame`).
    broke: Option<UpstreamError>,
}

enum Inner {
    Upstream(ResponseBody),
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// Streams the backend's body.
    pub(crate) fn upstream(body: ResponseBody, exchange: Exchange) -> ProxyBody {
        ProxyBody {
            inner: Inner::Upstream(body),
            exchange: Some(exchange),
            silence: None,
            waiting: false,
            broke: None,
        }
    }

    /// A body written by the proxy.
    pub(crate) fn full(bytes: impl Into<Bytes>, exchange: Option<Exchange>) -> ProxyBody {
        ProxyBody {
            inner: Inner::Full(Some(bytes.into())),
            exchange,
            silence: None,
            waiting: false,
            broke: None,
        }
    }

    /// The upstream body failed: settle the exchange as failed (its
    /// connection is not pooled), drop the upstream body, and end the
    /// client's body with the error.
    fn fail(&mut self, failure: BodyFailure) -> BodyError {
        let err = match &mut self.exchange {
            Some(ex) => ex.body_failed(failure),
            None => Box::new(std::io::Error::other(format!("{failure:?}"))),
        };
        self.exchange = None;
        self.inner = Inner::Full(None);
        self.silence = None;
        err
    }

    /// Polls the `upstream_read_timeout` timer while the upstream body is
    /// pending; the limit if it ran out.
    fn silent_too_long(&mut self, cx: &mut Context<'_>) -> Option<Duration> {
        let limit = self
            .exchange
            .as_ref()
            .and_then(|ex| ex.streamed.as_ref())
            .map_or(Duration::ZERO, |s| s.read_timeout);
        if limit.is_zero() {
            return None;
        }
        if !self.waiting {
            self.waiting = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.silence {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.silence = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let sleep = self.silence.as_mut()?;
        sleep.as_mut().poll(cx).is_ready().then_some(limit)
    }

    fn finish(&mut self) {
        if let Some(ex) = &mut self.exchange {
            ex.eos = true;
        }
        // Settle now rather than whenever hyper drops the body.
        self.exchange = None;
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(e) = this.broke.take() {
            return Poll::Ready(Some(Err(this.fail(BodyFailure::Broke(e)))));
        }
        let conn = this.exchange.as_mut().and_then(|ex| ex.upstream.as_mut());
        let polled = match (&mut this.inner, conn) {
            // The upstream connection is driven here, in the client's task
            // (see `UpstreamConn`): it reads what the body then yields.
            (Inner::Upstream(b), Some(conn)) => conn.poll_body(b, cx),
            // No connection (a 101's empty body): nothing more to read.
            (Inner::Upstream(b), None) if b.is_end_stream() => Poll::Ready(None),
            (Inner::Upstream(_), None) => Poll::Ready(Some(Err(UpstreamError::Incomplete))),
            (Inner::Full(b), _) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                if let (Some(data), Some(ex)) = (frame.data_ref(), &mut this.exchange) {
                    ex.bytes += data.len() as u64;
                }
                if this.inner_is_end() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            // hyper aborts the client connection on a body error without
            // flushing what it buffered: the head and the data frames it
            // was given since its last flush. When the error comes in the
            // same round as those (the connection is driven in this task,
            // so a cut read with the last bytes arrives at once), it is
            // held back for one poll: hyper flushes on the `Pending`, and
            // the client sees the head and every byte the backend sent
            // before the cut (a short body it can tell apart), not an
            // empty reply.
            Poll::Ready(Some(Err(e))) if !this.waiting => {
                this.broke = Some(e);
                this.waiting = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(this.fail(BodyFailure::Broke(e))))),
            Poll::Pending => match this.silent_too_long(cx) {
                Some(limit) => Poll::Ready(Some(Err(this.fail(BodyFailure::Silent(limit))))),
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner_is_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Inner::Full(None) => SizeHint::with_exact(0),
        }
    }
}

impl ProxyBody {
    fn inner_is_end(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        // A body hyper never polled (HEAD, 204, 304) but that is complete
        // still counts as cleanly ended: its connection may be reused.
        if self.inner_is_end() {
            if let Some(ex) = &mut self.exchange {
                ex.eos = true;
            }
        }
    }
}

/// Static pool names for headers.
pub(crate) fn pool_header(color: Color) -> HeaderValue {
    HeaderValue::from_static(color.as_str())
}
