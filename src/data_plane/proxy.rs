//! The request path, top to bottom. Read this first.
//!
//! The connection loads the routing snapshot once per request and the
//! request keeps it (a [`SnapRef`]) for the whole exchange, so a switch
//! that lands mid-request cannot change where this request goes; the next
//! request sees the new table. `forward` does the work and returns
//! `Result`; `handle` is the only place an error turns into a response.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{Entry, HeaderValue, CONNECTION, SET_COOKIE, UPGRADE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::data_plane::backend::UpstreamBody;
use crate::data_plane::conn::{ActiveRequest, ClientInfo};
use crate::data_plane::error::ProxyError;
use crate::data_plane::exchange::{pool_header, Exchange, LogFields, ProxyBody, Routed, Streamed};
use crate::data_plane::h1client::ResponseBody;
use crate::data_plane::headers::{
    check_framing, new_request_id, prepare_request, remove_hop_by_hop, request_host,
    valid_request_id, X_REQUEST_ID, X_SWITCHYARD_POOL,
};
use crate::data_plane::routing::{choose_pool, RequestFacts, Snapshot};
use crate::data_plane::snap_ref::{Downstream, SnapRef};
use crate::data_plane::upstream;
use crate::data_plane::{mirror, upgrade};
use crate::metrics::Metrics;

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

    /// The routing table.
    pub(crate) fn table(&self) -> &ArcSwap<Snapshot> {
        &self.table
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves one request, routed on `snap`, from the client connection
    /// `conn`. Never fails: errors become responses here. `bad_framing`:
    /// the HTTP/1 framing guard found the request's body malformed; it is
    /// refused, and nothing of it is sent upstream.
    ///
    /// Takes what it uses by value, so that this future is the one hyper
    /// holds per request (see `serve_conn`).
    pub(crate) async fn handle(
        conn: Arc<Downstream>,
        snap: SnapRef,
        req: Request<Incoming>,
        active: ActiveRequest,
        bad_framing: bool,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let this = &*conn.proxy;
        if bad_framing {
            // Through the same error site as every other error.
            let err = ProxyError::BadRequest("malformed request body framing");
            let ex = Exchange::new(Instant::now(), active);
            return Ok(err.into_response(ex, &snap.settings, &this.metrics));
        }
        let start = Instant::now();
        // An HTTP/1 request with `Upgrade` stops the framing guard reading
        // the connection (it may leave HTTP). If it does not (the upgrade
        // was refused, or was to h2c, which is never passed on), nothing
        // more is read from it: the connection closes after this response.
        let unguarded = req.version() <= Version::HTTP_11 && req.headers().contains_key(UPGRADE);
        let mut ex = Exchange::new(start, active);
        if snap.settings.access_log {
            ex.log = Some(Box::new(LogFields {
                method: req.method().clone(),
                uri: req.uri().clone(),
                client: conn.client.addr,
                error: None,
                rule: None,
            }));
        }
        let mut copy = None;
        let mut resp = match this.forward(&snap, req, &conn, &mut ex, &mut copy).await {
            Ok(resp) => resp.map(|body| ProxyBody::upstream(body, ex)),
            Err(err) => err.into_response(ex, &snap.settings, &this.metrics),
        };
        if let Some(live) = copy {
            live.live(resp.status());
        }
        if unguarded && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    async fn forward(
        &self,
        snap: &SnapRef,
        req: Request<Incoming>,
        down: &Arc<Downstream>,
        ex: &mut Exchange,
        copy: &mut Option<mirror::LiveSide>,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        let client: &ClientInfo = &down.client;

        // 1. Request id: keep a sane one, else make one. First, so that the
        //    proxy's own errors (400, 404) carry it too.
        //    Off (`request_id = false`): the client's header, if any, goes
        //    upstream untouched and nothing is made or echoed.
        if snap.settings.request_id {
            ex.request_id = Some(ensure_request_id(&mut parts.headers));
        }
        check_framing(&parts)?;

        // 2. Which service: host, then longest path prefix.
        let route_index = {
            let host = request_host(&parts)?;
            let path = parts.uri.path();
            snap.find_index(host, path).ok_or(ProxyError::NoRoute)?
        };
        let route = &snap.routes[route_index];
        ex.routed = Some(Routed {
            snap: snap.clone(),
            route: route_index,
        });

        // 3. Which pool: preview header, targeting rules, sticky bucket,
        //    weights.
        let facts = RequestFacts::new(&parts.headers, &parts.uri, client.addr.ip());
        let mut choice = choose_pool(route, &facts);
        ex.choice = Some(choice);
        if let (Some(log), Some(i)) = (&mut ex.log, choice.rule) {
            log.rule = route.rules.get(usize::from(i)).map(|r| Arc::clone(&r.name));
        }
        // A custom preview header (and its token) is the proxy's business,
        // not the backend's; the default one is overwritten below anyway.
        if route.service.preview.header != X_SWITCHYARD_POOL {
            parts.headers.remove(&route.service.preview.header);
        }

        // 4. The upstream request head and body.
        let forwarded = snap
            .settings
            .forwarded_headers
            .then_some((&client.ip, client.tls));
        let client_upgrade = prepare_request(&mut parts, forwarded);
        // Traffic mirroring (SPEC §9): when off, this one branch.
        let timeout = snap.settings.request_timeout;
        let (body, replayable) = match route.mirror.as_deref() {
            None => upstream_body(&parts, body, timeout).await?,
            Some(m) => {
                // A client's claim to be a copy is not passed on.
                parts.headers.remove(&mirror::X_SWITCHYARD_MIRROR);
                let len = if body.is_end_stream() {
                    Some(0)
                } else {
                    body.size_hint().exact()
                };
                // A copy is chosen by, and carries, the live request's id:
                // with `request_id = false` a mirrored service still gets one.
                if ex.request_id.is_none() {
                    ex.request_id = Some(ensure_request_id(&mut parts.headers));
                }
                let pending = ex.request_id.as_ref().and_then(|id| {
                    m.select(route, &parts, &choice, id, len, client_upgrade.is_some())
                });
                let (mut body, replayable) = upstream_body(&parts, body, timeout).await?;
                if let Some(pending) = pending {
                    *copy = Some(pending.launch(&mut body, &snap.settings));
                }
                (body, replayable)
            }
        };
        let req = Request::from_parts(parts, body);

        // 5. Send, with bounded retries.
        let settings = &snap.settings;
        let (mut resp, conn, backend) =
            upstream::send(route, settings, &mut choice, req, replayable, ex).await?;
        route.service.retry_budget.earn();
        ex.answered = true;

        // 6. The response head for the client.
        let status = resp.status();
        ex.status = status.as_u16();
        if status.is_server_error() {
            upstream::record_failure(route, backend, choice.color);
        } else if status == StatusCode::SWITCHING_PROTOCOLS {
            upstream::record_success(backend);
        }
        // Otherwise the success is recorded when the body ends cleanly
        // (exchange.rs): a body cut short is a failure.
        if status == StatusCode::SWITCHING_PROTOCOLS {
            match client_upgrade {
                Some(client_side) => {
                    upgrade::bridge(
                        client_side,
                        conn.into_upgraded(),
                        backend.start_request(),
                        upgrade::Watch {
                            changes: self.changes.clone(),
                            service: Arc::clone(&route.service.name),
                            color: choice.color,
                            drain_timeout: settings.drain_timeout,
                            conn: Arc::clone(down),
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
            ex.streamed = Some(Streamed {
                on_failure: upstream::body_failed,
                read_timeout: settings.upstream_read_timeout,
            });
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
}

/// The request's `x-request-id`: the client's if sane, else a new one,
/// set in `headers` either way.
fn ensure_request_id(headers: &mut http::HeaderMap) -> HeaderValue {
    // One hashed lookup (`entry`) for the read and the write.
    match headers.entry(X_REQUEST_ID.clone()) {
        Entry::Occupied(o) if valid_request_id(o.get()) => o.get().clone(),
        Entry::Occupied(mut o) => {
            let id = new_request_id();
            o.insert(id.clone());
            id
        }
        Entry::Vacant(v) => v.insert(new_request_id()).clone(),
    }
}

/// Largest request body held in memory so that an idempotent request can
/// be sent again after a reset.
const REPLAY_BODY_MAX: u64 = 64 * 1024;

/// The body to send upstream, and whether the request may be sent again
/// after it went out: idempotent, with a body empty or small and of known
/// length (then read whole and held).
async fn upstream_body(
    parts: &http::request::Parts,
    body: Incoming,
    client_silence: std::time::Duration,
) -> Result<(UpstreamBody, bool), ProxyError> {
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    if body.is_end_stream() {
        return Ok((UpstreamBody::empty(), idempotent));
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
        .map_err(|_| ProxyError::BadRequest("could not read the request body"))?
        .to_bytes();
        return Ok((UpstreamBody::Full(Some(bytes)), true));
    }
    Ok((UpstreamBody::streamed(body, client_silence), false))
}
