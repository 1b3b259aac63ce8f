//! The request path, top to bottom. Read this first.
//!
//! `handle` loads the routing snapshot once and keeps that `Arc` for the
//! whole exchange, so a switch that lands mid-request cannot change where
//! this request goes; the next request sees the new table. `forward` does
//! the work and returns `Result`; `handle` is the only place an error turns
//! into a response.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{HeaderValue, CONNECTION, EXPECT, HOST, SET_COOKIE, UPGRADE};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use crate::backend::{Backend, UpstreamBody};
use crate::error::ProxyError;
use crate::exchange::{pool_header, Exchange, LogFields, ProxyBody};
use crate::headers::{
    append_forwarded_for, new_request_id, remove_hop_by_hop, valid_request_id, X_FORWARDED_HOST,
    X_FORWARDED_PROTO, X_REQUEST_ID, X_SWITCHYARD_POOL,
};
use crate::metrics::Metrics;
use crate::routing::{choose_pool, pick_backend, Route, Snapshot};
use crate::server::{ActiveRequest, DrainToken};
use crate::upgrade;

/// Attempts per request when connections fail before the request is sent.
const MAX_ATTEMPTS: usize = 3;

/// What the proxy knows about the client connection a request came on.
pub struct ClientInfo {
    /// Peer address.
    pub addr: SocketAddr,
    /// Peer IP as a header value (for `X-Forwarded-For`), made once per connection.
    pub ip: HeaderValue,
    /// Did it come over TLS?
    pub tls: bool,
    /// Keeps shutdown waiting while upgraded connections live.
    pub drain: DrainToken,
}

impl ClientInfo {
    /// Info for a connection from `addr`.
    pub fn new(addr: SocketAddr, tls: bool, drain: DrainToken) -> ClientInfo {
        let ip = HeaderValue::from_str(&addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ClientInfo {
            addr,
            ip,
            tls,
            drain,
        }
    }
}

/// The data plane: the routing table and the metrics.
pub struct Proxy {
    table: Arc<ArcSwap<Snapshot>>,
    changes: tokio::sync::watch::Receiver<()>,
    metrics: Arc<Metrics>,
}

impl Proxy {
    /// A proxy routing by `table`; `changes` ticks whenever it is swapped.
    pub fn new(
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
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        client: &ClientInfo,
        active: ActiveRequest,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
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
        match self.forward(&snap, req, client, &mut ex).await {
            Ok(resp) => resp.map(|body| ProxyBody::upstream(body, ex)),
            Err(err) => self.error_response(&snap, err, ex),
        }
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
        if let (Some(kind), Some(svc), Some(choice)) =
            (err.upstream_kind(), &ex.service, &ex.choice)
        {
            svc.pool_metrics(choice.color).upstream_error(kind);
        }
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
        client: &ClientInfo,
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

        // 4. The upstream request head.
        let client_upgrade = prepare_request(&mut parts, client)?;
        let body = if http_body::Body::is_end_stream(&body) {
            UpstreamBody::empty()
        } else {
            UpstreamBody::Incoming(body)
        };
        let mut req = Request::from_parts(parts, body);

        // 5. Send, retrying on another backend of the pool if the request
        //    could not be sent at all (nothing reached the backend).
        let settings = &snap.settings;
        let mut tried = [0usize; MAX_ATTEMPTS];
        let mut attempt = 0;
        // Why the previous attempt failed: if no untried backend is left,
        // that is the answer (502), not "no healthy backend" (503).
        let mut last_error = None;
        loop {
            let Some(backend) = pick_backend(route, &mut choice, &tried[..attempt]) else {
                return Err(last_error.unwrap_or(ProxyError::NoHealthyBackend(choice.color)));
            };
            ex.choice = Some(choice);
            ex.in_flight = Some(backend.start_request());
            req.headers_mut()
                .insert(X_SWITCHYARD_POOL.clone(), pool_header(choice.color));
            tried[attempt] = Arc::as_ptr(backend) as usize;
            attempt += 1;
            let can_retry = attempt < MAX_ATTEMPTS;

            let mut conn = match backend.checkout(settings.connect_timeout).await {
                Ok((conn, _reused)) => conn,
                Err(source) => {
                    self.upstream_failed(route, backend, choice.color);
                    let err = ProxyError::Connect {
                        backend: backend.label.clone(),
                        source,
                    };
                    if can_retry {
                        route.service.pool_metrics(choice.color).retries.inc();
                        last_error = Some(err);
                        continue;
                    }
                    return Err(err);
                }
            };
            let sent =
                tokio::time::timeout(settings.request_timeout, conn.sender.try_send_request(req))
                    .await;
            let mut resp = match sent {
                Ok(Ok(resp)) => resp,
                Ok(Err(mut err)) => {
                    if let (Some(unsent), true) = (err.take_message(), can_retry) {
                        // The connection died before the request went out:
                        // nothing reached the backend, so any method is safe
                        // to send again.
                        req = unsent;
                        route.service.pool_metrics(choice.color).retries.inc();
                        last_error = Some(ProxyError::Upstream {
                            backend: backend.label.clone(),
                            source: err.into_error(),
                        });
                        continue;
                    }
                    self.upstream_failed(route, backend, choice.color);
                    return Err(ProxyError::Upstream {
                        backend: backend.label.clone(),
                        source: err.into_error(),
                    });
                }
                Err(_elapsed) => {
                    self.upstream_failed(route, backend, choice.color);
                    return Err(ProxyError::Timeout {
                        backend: backend.label.clone(),
                        timeout: settings.request_timeout,
                    });
                }
            };

            // 6. The response head for the client.
            let status = resp.status();
            ex.status = status.as_u16();
            if status.is_server_error() {
                self.upstream_failed(route, backend, choice.color);
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
                                drain: client.drain.clone(),
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
            return Ok(resp);
        }
    }

    /// Records a failed exchange with a backend: metrics and passive ejection.
    fn upstream_failed(&self, route: &Route, backend: &Arc<Backend>, color: crate::color::Color) {
        let pool = route.pool(color);
        let ejected = backend.record_failure(
            crate::health::EJECT_AFTER_FAILURES,
            crate::health::EJECT_BASE,
            crate::health::EJECT_MAX,
            || crate::health::may_eject(pool),
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
