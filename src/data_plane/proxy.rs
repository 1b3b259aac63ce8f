//! The request path, top to bottom. Read this first.
//!
//! `handle` loads the routing snapshot once and keeps that `Arc` for the
//! whole exchange, so a switch that lands mid-request cannot change where
//! this request goes; the next request sees the new table. `forward` does
//! the work and returns `Result`; `handle` is the only place an error turns
//! into a response.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, EXPECT, HOST, SET_COOKIE, TRANSFER_ENCODING, UPGRADE};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::color::Color;
use crate::data_plane::backend::{now_ms, Backend, UpstreamBody, UpstreamConn};
use crate::data_plane::conn::{ActiveRequest, ClientInfo};
use crate::data_plane::error::ProxyError;
use crate::data_plane::exchange::{pool_header, Exchange, LogFields, ProxyBody};
use crate::data_plane::headers::{
    append_forwarded_for, new_request_id, remove_hop_by_hop, valid_request_id, X_FORWARDED_HOST,
    X_FORWARDED_PROTO, X_REQUEST_ID, X_SWITCHYARD_POOL,
};
use crate::data_plane::routing::{
    choose_pool, pick_backend, PoolChoice, Route, Settings, Snapshot,
};
use crate::data_plane::upgrade;
use crate::metrics::Metrics;

/// Attempts per request when connections fail before the request is sent.
const MAX_ATTEMPTS: usize = 3;

/// Longest request target (path and query) accepted; 414 above.
pub(crate) const MAX_TARGET_BYTES: usize = 8192;

/// The data plane: the routing table and the metrics.
pub(crate) struct Proxy {
    table: Arc<ArcSwap<Snapshot>>,
    changes: tokio::sync::watch::Receiver<()>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy routing by `table`; `changes` ticks whenever it is swapped.
    pub(crate) fn new(
        table: Arc<ArcSwap<Snapshot>>,
        changes: tokio::sync::watch::Receiver<()>,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        Proxy {
            table,
            changes,
            metrics,
        }
    }

    /// Serves one request. Never fails: errors become responses here.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        client: &Arc<ClientInfo>,
        active: ActiveRequest,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        // An HTTP/1 request with `Upgrade` stops the framing guard reading
        // the connection (it may leave HTTP). If it does not (the upgrade
        // was refused, or was to h2c, which is never passed on), nothing
        // more is read from it: the connection closes after this response.
        let unguarded = req.version() <= Version::HTTP_11 && req.headers().contains_key(UPGRADE);
        // One load per request; the Arc keeps this table alive (and this
        // request on it) until the exchange ends.
        let snap = self.table.load_full();
        let mut ex = Exchange::new(start, active);
        if snap.settings.access_log {
            ex.log = Some(Box::new(LogFields {
                method: req.method().clone(),
                uri: req.uri().clone(),
                client: client.addr,
                error: None,
            }));
        }
        let mut resp = match self.forward(&snap, req, client, &mut ex).await {
            Ok(resp) => resp.map(|body| ProxyBody::upstream(body, ex)),
            Err(err) => self.error_response(&snap, err, ex),
        };
        if unguarded && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The only place a `ProxyError` becomes a response.
    fn error_response(
        &self,
        snap: &Snapshot,
        err: ProxyError,
        mut ex: Exchange,
    ) -> Response<ProxyBody> {
        let status = err.status();
        ex.status = status.as_u16();
        if ex.service.is_none() {
            ex.count_unmatched(Arc::clone(&self.metrics));
        }
        tracing::debug!(error = %err, status = ex.status, "proxy answered itself");
        let request_id = ex.request_id.clone();
        let pool = ex.choice.map(|c| c.color);
        if let Some(log) = &mut ex.log {
            log.error = Some(err.to_string());
        }
        let mut resp = Response::new(ProxyBody::full(err.body(), Some(ex)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(id) = request_id {
            h.insert(X_REQUEST_ID.clone(), id);
        }
        if let (Some(color), true) = (pool, snap.settings.add_pool_header) {
            h.insert(X_SWITCHYARD_POOL.clone(), pool_header(color));
        }
        if status == StatusCode::BAD_REQUEST {
            // After a malformed request the stream may be out of sync.
            h.insert(CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    async fn forward(
        &self,
        snap: &Snapshot,
        req: Request<Incoming>,
        client: &Arc<ClientInfo>,
        ex: &mut Exchange,
    ) -> Result<Response<Incoming>, ProxyError> {
        let (mut parts, body) = req.into_parts();

        // 1. Request id: keep a sane one, else make one. First, so that the
        //    proxy's own errors (400, 404) carry it too.
        let request_id = match parts.headers.get(&X_REQUEST_ID) {
            Some(v) if valid_request_id(v) => v.clone(),
            _ => {
                let id = new_request_id();
                parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
                id
            }
        };
        ex.request_id = Some(request_id);
        check_framing(&parts)?;

        // 2. Which service: host, then longest path prefix.
        let route = {
            let host = request_host(&parts)?;
            let path = parts.uri.path();
            snap.find(host, path).ok_or(ProxyError::NoRoute)?
        };
        ex.service = Some(Arc::clone(&route.service));

        // 3. Which pool: preview header, sticky bucket, weights.
        let mut choice = choose_pool(route, &parts.headers);
        ex.choice = Some(choice);
        // A custom preview header (and its token) is the proxy's business,
        // not the backend's; the default one is overwritten below anyway.
        if route.service.preview.header != X_SWITCHYARD_POOL {
            parts.headers.remove(&route.service.preview.header);
        }

        // 4. The upstream request head and body.
        let client_upgrade = prepare_request(&mut parts, client)?;
        let (body, replay) = upstream_body(&parts, body).await?;
        let req = Request::from_parts(parts, body);

        // 5. Send, with bounded retries.
        let settings = &snap.settings;
        let (mut resp, conn, backend) = self
            .send(route, settings, &mut choice, req, replay, ex)
            .await?;
        route.service.retry_budget.earn();

        // 6. The response head for the client.
        let status = resp.status();
        ex.status = status.as_u16();
        if status.is_server_error() {
            self.upstream_failed(route, &backend, choice.color);
        } else {
            backend.record_success();
        }
        if status == StatusCode::SWITCHING_PROTOCOLS {
            match client_upgrade {
                Some(client_side) => {
                    upgrade::bridge(
                        client_side,
                        &mut resp,
                        backend.start_request(),
                        upgrade::Watch {
                            table: Arc::clone(&self.table),
                            changes: self.changes.clone(),
                            service: Arc::clone(&route.service.name),
                            color: choice.color,
                            drain_timeout: settings.drain_timeout,
                            metrics: Arc::clone(&self.metrics),
                            _client: Arc::clone(client),
                        },
                    );
                }
                None => {
                    return Err(ProxyError::UnexpectedUpgrade {
                        backend: backend.label.clone(),
                    })
                }
            }
        } else {
            remove_hop_by_hop(resp.headers_mut());
            ex.upstream = Some(conn);
        }
        let h = resp.headers_mut();
        if settings.add_pool_header {
            h.insert(X_SWITCHYARD_POOL.clone(), pool_header(choice.color));
        }
        if let Some(id) = &ex.request_id {
            h.insert(X_REQUEST_ID.clone(), id.clone());
        }
        if let (true, Some(bucket)) = (choice.set_cookie, choice.bucket) {
            h.append(SET_COOKIE, route.service.bucket_cookie(bucket));
        }
        Ok(resp)
    }

    /// Sends `req` to a backend of the chosen pool and waits for the
    /// response head. Retries, within the pool and the service's retry
    /// budget, when nothing reached a backend (connect failed, or the
    /// pooled connection was dead before the request went out: any method),
    /// and once when an idempotent request with a replayable body met a
    /// reset. Timeouts are never retried.
    async fn send(
        &self,
        route: &Route,
        settings: &Settings,
        choice: &mut PoolChoice,
        mut req: Request<UpstreamBody>,
        replay: Option<Replay>,
        ex: &mut Exchange,
    ) -> Result<(Response<Incoming>, UpstreamConn, Arc<Backend>), ProxyError> {
        let svc = &route.service;
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut n_tried = 0;
        let mut attempts = 0;
        let mut replayed = false;
        let mut last_err = None;
        loop {
            let picked = if attempts == 0 {
                pick_backend(route, choice, &[])
            } else {
                // Retries stay in the pool the request was routed to.
                route
                    .pool(choice.color)
                    .pick(svc.balance, now_ms(), &tried[..n_tried])
            };
            let Some(backend) = picked.cloned() else {
                return Err(last_err.unwrap_or(ProxyError::NoHealthyBackend(choice.color)));
            };
            ex.choice = Some(*choice);
            ex.in_flight = Some(backend.start_request());
            req.headers_mut()
                .insert(X_SWITCHYARD_POOL.clone(), pool_header(choice.color));
            attempts += 1;
            let more = attempts < MAX_ATTEMPTS;

            let (mut conn, reused) = match backend.checkout(settings.connect_timeout).await {
                Ok(c) => c,
                Err(source) => {
                    let err = ProxyError::Connect {
                        backend: backend.label.clone(),
                        source,
                    };
                    self.upstream_error(route, &backend, choice.color, &err, true);
                    if more && svc.retry_budget.try_spend() {
                        svc.pool_metrics(choice.color).retries.inc();
                        tried[n_tried] = Arc::as_ptr(&backend) as usize;
                        n_tried += 1;
                        last_err = Some(err);
                        continue;
                    }
                    return Err(err);
                }
            };
            let sent =
                tokio::time::timeout(settings.request_timeout, conn.sender.try_send_request(req))
                    .await;
            let mut failed = match sent {
                Ok(Ok(resp)) => return Ok((resp, conn, backend)),
                Ok(Err(failed)) => failed,
                Err(_elapsed) => {
                    let err = ProxyError::Timeout {
                        backend: backend.label.clone(),
                        timeout: settings.request_timeout,
                    };
                    self.upstream_error(route, &backend, choice.color, &err, true);
                    return Err(err);
                }
            };
            let unsent = failed.take_message();
            let source = failed.into_error();
            if unsent.is_none() && source.is_user() {
                // The client's body broke (malformed chunk, client gone
                // mid-upload): not the backend's fault.
                return Err(ProxyError::BadRequest(
                    "400 malformed or incomplete request body\n",
                ));
            }
            let reset = unsent.is_some() || is_reset(&source);
            let err = ProxyError::Upstream {
                backend: backend.label.clone(),
                source,
            };
            // A pooled connection the backend closed while idle is no fault
            // of the backend; a fresh connection failing is.
            self.upstream_error(route, &backend, choice.color, &err, !(reused && reset));
            if let Some(unsent) = unsent {
                // The connection died before the request went out: nothing
                // reached the backend, so any method may be sent again.
                req = unsent;
                if !reused {
                    tried[n_tried] = Arc::as_ptr(&backend) as usize;
                    n_tried += 1;
                }
                if more {
                    svc.pool_metrics(choice.color).retries.inc();
                    last_err = Some(err);
                    continue;
                }
                return Err(err);
            }
            match &replay {
                Some(r) if reset && !replayed && more && svc.retry_budget.try_spend() => {
                    // Idempotent, and we hold the whole request: send it
                    // once more, elsewhere if the pool has another backend.
                    replayed = true;
                    req = r.rebuild();
                    tried[n_tried] = Arc::as_ptr(&backend) as usize;
                    n_tried += 1;
                    svc.pool_metrics(choice.color).retries.inc();
                    if route
                        .pool(choice.color)
                        .pick(svc.balance, now_ms(), &tried[..n_tried])
                        .is_none()
                    {
                        // No other backend: a fresh connection to this one.
                        n_tried -= 1;
                    }
                    last_err = Some(err);
                }
                _ => return Err(err),
            }
        }
    }

    /// Records an upstream error (`switchyard_upstream_errors_total`), and,
    /// when `blame` says the backend is at fault, a failure towards its
    /// passive ejection.
    fn upstream_error(
        &self,
        route: &Route,
        backend: &Arc<Backend>,
        color: Color,
        err: &ProxyError,
        blame: bool,
    ) {
        if let Some(kind) = err.upstream_kind() {
            route.service.pool_metrics(color).upstream_error(kind);
        }
        if blame {
            self.upstream_failed(route, backend, color);
        }
    }

    /// Records a failed exchange with a backend (error or 5xx) towards its
    /// passive ejection.
    fn upstream_failed(&self, route: &Route, backend: &Arc<Backend>, color: Color) {
        let pool = route.pool(color);
        let ejected = backend.record_failure(
            crate::data_plane::health::EJECT_AFTER_FAILURES,
            crate::data_plane::health::EJECT_BASE,
            crate::data_plane::health::EJECT_MAX,
            || crate::data_plane::health::may_eject(pool, backend),
        );
        if ejected {
            route.service.pool_metrics(color).ejections.inc();
            tracing::warn!(
                service = %route.service.name,
                pool = %color,
                backend = %backend.label,
                "backend ejected after consecutive failures"
            );
        }
    }
}

/// Refuses what hyper lets through but a proxy must not pass on: a
/// `Transfer-Encoding` other than exactly `chunked` (hyper already refuses
/// one whose last coding is not `chunked`, and a `Content-Length` beside
/// it: see [`crate::data_plane::h1guard`]), and an over-long target.
fn check_framing(parts: &http::request::Parts) -> Result<(), ProxyError> {
    let target = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_TARGET_BYTES {
        return Err(ProxyError::UriTooLong);
    }
    let mut te = parts.headers.get_all(TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => Ok(()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::BadRequest(
            "400 unsupported Transfer-Encoding (only `chunked` is accepted)\n",
        )),
    }
}

/// The host a request is for, from the absolute-form target or `:authority`
/// (HTTP/2), else the `Host` header. Malformed or conflicting → 400.
fn request_host(parts: &http::request::Parts) -> Result<&str, ProxyError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("400 more than one Host header\n"));
    }
    let header = match header {
        Some(h) => Some(
            h.to_str()
                .ok()
                .filter(|s| valid_host(s))
                .ok_or(ProxyError::BadRequest("400 invalid Host header\n"))?,
        ),
        None => None,
    };
    match (parts.uri.authority(), header) {
        (Some(auth), header) => {
            let a = auth.as_str();
            if a.contains('@') || !valid_host(a) {
                return Err(ProxyError::BadRequest(
                    "400 invalid request target authority\n",
                ));
            }
            if let Some(h) = header {
                if !h.eq_ignore_ascii_case(a) {
                    return Err(ProxyError::BadRequest(
                        "400 request target names another host than the Host header\n",
                    ));
                }
            }
            Ok(a)
        }
        (None, Some(h)) => Ok(h),
        (None, None) if parts.version <= Version::HTTP_10 => Ok(""),
        (None, None) => Err(ProxyError::BadRequest("400 missing Host header\n")),
    }
}

/// `host`, `host:port`, `[v6]:port`: no spaces, controls, or path.
fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

/// Turns the client's request head into the backend's, in place. Returns the
/// client side of an upgrade if one was asked for.
fn prepare_request(
    parts: &mut http::request::Parts,
    client: &ClientInfo,
) -> Result<Option<hyper::upgrade::OnUpgrade>, ProxyError> {
    let upgrade = remove_hop_by_hop(&mut parts.headers);
    // The client's Expect was answered by our own server side (hyper sends
    // 100 Continue when the body is first read).
    if parts.headers.contains_key(EXPECT) {
        parts.headers.remove(EXPECT);
    }
    // HTTP/2 requests carry the host as :authority; HTTP/1.1 backends need Host.
    if !parts.headers.contains_key(HOST) {
        if let Some(auth) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                parts.headers.insert(HOST, v);
            }
        }
    }
    if let Some(h) = parts.headers.get(HOST).cloned() {
        parts.headers.insert(X_FORWARDED_HOST.clone(), h);
    }
    append_forwarded_for(&mut parts.headers, &client.ip);
    parts.headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if client.tls { "https" } else { "http" }),
    );
    // Origin-form target for the HTTP/1.1 backend.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::from(pq);
    }
    parts.version = Version::HTTP_11;
    let client_upgrade = match upgrade {
        Some(proto) if parts.method != http::Method::CONNECT => {
            let on = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
            match on {
                Some(on) => {
                    parts
                        .headers
                        .insert(CONNECTION, HeaderValue::from_static("upgrade"));
                    parts.headers.insert(UPGRADE, proto);
                    Some(on)
                }
                // HTTP/2 has no Upgrade; the header is just dropped.
                None => None,
            }
        }
        _ => None,
    };
    Ok(client_upgrade)
}

/// Largest request body held in memory so that an idempotent request can
/// be sent again after a reset.
const REPLAY_BODY_MAX: u64 = 64 * 1024;

/// What is needed to send an idempotent request again.
struct Replay {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: Option<Bytes>,
}

impl Replay {
    fn of(parts: &http::request::Parts, body: Option<Bytes>) -> Replay {
        Replay {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body,
        }
    }

    fn rebuild(&self) -> Request<UpstreamBody> {
        let mut req = Request::new(UpstreamBody::Full(self.body.clone()));
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.headers_mut() = self.headers.clone();
        *req.version_mut() = Version::HTTP_11;
        req
    }
}

/// The body to send upstream, and, for idempotent requests whose body is
/// empty or small and of known length, what is needed to send it again.
async fn upstream_body(
    parts: &http::request::Parts,
    body: Incoming,
) -> Result<(UpstreamBody, Option<Replay>), ProxyError> {
    use http_body::Body as _;
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    if body.is_end_stream() {
        return Ok((
            UpstreamBody::empty(),
            idempotent.then(|| Replay::of(parts, None)),
        ));
    }
    if idempotent
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= REPLAY_BODY_MAX)
    {
        let bytes = http_body_util::BodyExt::collect(http_body_util::Limited::new(
            body,
            REPLAY_BODY_MAX as usize,
        ))
        .await
        .map_err(|_| ProxyError::BadRequest("400 could not read the request body\n"))?
        .to_bytes();
        let replay = Replay::of(parts, Some(bytes.clone()));
        return Ok((UpstreamBody::Full(Some(bytes)), Some(replay)));
    }
    Ok((UpstreamBody::Incoming(body), None))
}

/// Did the connection break (reset, closed early), as opposed to time out
/// or answer garbage?
fn is_reset(err: &hyper::Error) -> bool {
    if err.is_incomplete_message() || err.is_closed() || err.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            );
        }
        source = e.source();
    }
    false
}
