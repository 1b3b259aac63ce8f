//! The operator web page (SPEC §12) and its two data routes, in front of
//! the JSON API.
//!
//! - `GET /` redirects to `/ui/`; `GET /ui/`, `/ui/app.js`, `/ui/app.css`
//!   serve three hand-written files embedded with `include_str!` (no CDN,
//!   no build step), with a strong ETag and `Cache-Control: no-cache` so an
//!   upgraded binary never runs stale script. They carry no data and need
//!   no token.
//! - `GET /api/v1/stats` and `GET /api/v1/events` ([`super::stats`],
//!   [`super::events`]) need the bearer token like the rest of `/api/v1`.
//! - Everything else goes to [`Admin::handle`].
//!
//! [`stack`] assembles the tower stack of the admin listener: the §13 guard
//! ([`super::guard`]) and the security headers of every response (a strict
//! Content-Security-Policy with no inline script or style,
//! `frame-ancestors 'none'`, `nosniff`, no referrer).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE,
    ETAG, IF_NONE_MATCH, LOCATION, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use tokio::sync::watch;
use tower::ServiceBuilder;
use tower_http::set_header::SetResponseHeaderLayer;

use super::events::{self, Streams};
use super::guard::{AdminBody, GuardLayer};
use super::Admin;
use crate::control_plane::control::Control;

/// The Content-Security-Policy of every admin response.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// One embedded file.
struct Asset {
    body: &'static str,
    content_type: &'static str,
    etag: &'static str,
}

/// FNV-1a, at compile time, for the ETags.
const fn fnv1a(s: &str) -> u64 {
    let b = s.as_bytes();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < b.len() {
        h ^= b[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// `"` + 16 hex digits + `"`.
const fn etag_bytes(s: &str) -> [u8; 18] {
    let h = fnv1a(s);
    let hex = b"0123456789abcdef";
    let mut out = [b'"'; 18];
    let mut i = 0;
    while i < 16 {
        out[1 + i] = hex[((h >> (60 - 4 * i)) & 0xf) as usize];
        i += 1;
    }
    out
}

macro_rules! asset {
    ($file:literal, $type:literal) => {{
        const BODY: &str = include_str!($file);
        const TAG: [u8; 18] = etag_bytes(BODY);
        Asset {
            body: BODY,
            content_type: $type,
            etag: match std::str::from_utf8(&TAG) {
                Ok(s) => s,
                Err(_) => "\"0\"",
            },
        }
    }};
}

static INDEX: Asset = asset!("ui/index.html", "text/html; charset=utf-8");
static APP_JS: Asset = asset!("ui/app.js", "text/javascript; charset=utf-8");
static APP_CSS: Asset = asset!("ui/app.css", "text/css; charset=utf-8");

/// What the page routes need, shared by admin connections.
pub(crate) struct Ui {
    admin: Arc<Admin>,
    control: Arc<Control>,
    stats: watch::Receiver<Bytes>,
    streams: Arc<Streams>,
    drain: watch::Receiver<()>,
}

impl Ui {
    /// The page in front of `admin`; `stats` from [`super::stats::spawn`];
    /// event streams end when `drain` fires.
    pub(crate) fn new(
        admin: Arc<Admin>,
        control: Arc<Control>,
        stats: watch::Receiver<Bytes>,
        drain: watch::Receiver<()>,
    ) -> Ui {
        Ui {
            admin,
            control,
            stats,
            streams: Arc::new(Streams::default()),
            drain,
        }
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<AdminBody>, Infallible> {
        let path = req.uri().path();
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        let resp = match path {
            "/" | "/ui" if get => redirect("/ui/"),
            "/ui/" | "/ui/index.html" if get => asset(&INDEX, &req),
            "/ui/app.js" if get => asset(&APP_JS, &req),
            "/ui/app.css" if get => asset(&APP_CSS, &req),
            "/api/v1/stats" | "/api/v1/events" => self.data(&req, path == "/api/v1/events"),
            _ => {
                let resp = self.admin.handle(req, peer).await?;
                resp.map(|b| b.boxed())
            }
        };
        Ok(resp)
    }

    /// `/api/v1/stats` and `/api/v1/events`.
    fn data(&self, req: &Request<Incoming>, events: bool) -> Response<AdminBody> {
        if !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed here; allowed: GET",
            );
            r.headers_mut()
                .insert(http::header::ALLOW, HeaderValue::from_static("GET"));
            return r;
        }
        let tokens = self.control.tokens();
        if tokens.required()
            && tokens
                .check(req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes))
                .is_none()
        {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid bearer token (Authorization: Bearer TOKEN)",
            );
        }
        if !events {
            let body = self.stats.borrow().clone();
            let mut r = Response::new(Full::new(body).boxed());
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return r;
        }
        let Some(body) = events::open(
            &self.streams,
            Arc::clone(&self.control),
            self.stats.clone(),
            self.drain.clone(),
        ) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_streams",
                format!(
                    "{} event streams are open already; poll /api/v1/stats instead",
                    events::MAX_STREAMS
                ),
            );
        };
        let mut r = Response::new(body.boxed());
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    }
}

fn redirect(to: &'static str) -> Response<AdminBody> {
    let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
    *r.status_mut() = StatusCode::FOUND;
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    r
}

fn asset(a: &'static Asset, req: &Request<Incoming>) -> Response<AdminBody> {
    let fresh = req
        .headers()
        .get(IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == a.etag.as_bytes());
    let mut r = if fresh {
        let mut r = Response::new(Empty::new().map_err(|n| match n {}).boxed());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Full::new(Bytes::from_static(a.body.as_bytes())).boxed())
    };
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(a.content_type));
    h.insert(ETAG, HeaderValue::from_static(a.etag));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<AdminBody> {
    let body = serde_json::json!({ "error": { "code": code, "message": message.into() } });
    let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
    bytes.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(bytes)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The admin listener's service for one connection from `peer`: security
/// headers ∘ §13 guard ∘ page routes ∘ JSON API, as a hyper service.
pub(crate) fn stack(
    ui: &Arc<Ui>,
    guard: &GuardLayer,
    peer: SocketAddr,
) -> hyper_util::service::TowerToHyperService<
    impl tower::Service<
            Request<Incoming>,
            Response = Response<AdminBody>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send,
> {
    let ui = Arc::clone(ui);
    let routes = tower::service_fn(move |req: Request<Incoming>| Arc::clone(&ui).handle(req, peer));
    let header = |name: HeaderName, value: &'static str| {
        SetResponseHeaderLayer::if_not_present(name, HeaderValue::from_static(value))
    };
    let svc = ServiceBuilder::new()
        .layer(header(CONTENT_SECURITY_POLICY, CSP))
        .layer(header(X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .layer(header(X_FRAME_OPTIONS, "DENY"))
        .layer(header(REFERRER_POLICY, "no-referrer"))
        .layer(header(
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ))
        .layer(header(
            HeaderName::from_static("cross-origin-resource-policy"),
            "same-origin",
        ))
        // API answers hold actor names and reasons: never cached. The page
        // assets and the event stream set their own.
        .layer(header(CACHE_CONTROL, "no-store"))
        .layer(guard.clone())
        .service(routes);
    hyper_util::service::TowerToHyperService::new(svc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_are_quoted_hashes_that_follow_the_content() {
        assert_eq!(INDEX.etag.len(), 18);
        assert!(INDEX.etag.starts_with('"') && INDEX.etag.ends_with('"'));
        assert_ne!(INDEX.etag, APP_JS.etag);
        assert_ne!(etag_bytes("a"), etag_bytes("b"));
    }

    #[test]
    fn the_page_has_no_inline_script_or_style() {
        let html = INDEX.body;
        assert!(html.contains(r#"<script src="app.js""#));
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains(" style="), "inline style attribute");
        let handler = html.split(" on").skip(1).any(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_alphabetic).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!handler, "event handler attribute");
        assert!(!APP_JS.body.contains("innerHTML"), "server strings as HTML");
        assert!(!APP_JS.body.contains("localStorage"));
        assert!(!APP_JS.body.contains("document.cookie"));
    }
}
