//! The admin API against the browser (SPEC §13), as a tower layer in
//! front of every admin route.
//!
//! - A mutation (any method but GET, HEAD and OPTIONS) whose `Origin` is
//!   present and is not the listener's own origin (`http://` + the request's
//!   `Host`), or whose `Sec-Fetch-Site` is `cross-site` or `same-site`, gets
//!   403 `cross_origin`. A page elsewhere can send a "simple" cross-origin
//!   POST without a preflight (`mode: "no-cors"`); browsers always stamp it
//!   with `Origin` and `Sec-Fetch-Site`, and page script cannot remove them.
//! - While no `token_file` is set, a request whose `Host` is not an IP
//!   literal, `localhost`, or in `[admin] allowed_hosts` gets 403
//!   `forbidden_host`: a DNS-rebound name pointing at 127.0.0.1 cannot read
//!   or drive the API. With a token file the bearer token already stops
//!   that, so any `Host` is served (load balancers, DNS names).
//!
//! Requests with neither header (curl, `switchyard ctl`, pipelines) pass
//! untouched; so do requests without `Host` (HTTP/1.0).

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, HOST, ORIGIN};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use std::convert::Infallible;

use crate::control_plane::control::Control;

/// Body of every admin response.
pub(crate) type AdminBody = BoxBody<Bytes, Infallible>;

/// What the guard needs to decide.
#[derive(Clone)]
pub(crate) struct GuardLayer {
    control: Arc<Control>,
    allowed_hosts: Arc<[String]>,
}

impl GuardLayer {
    /// A guard reading the current tokens from `control`, with the extra
    /// host names of `[admin] allowed_hosts`.
    pub(crate) fn new(control: Arc<Control>, allowed_hosts: &[String]) -> GuardLayer {
        GuardLayer {
            control,
            allowed_hosts: allowed_hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
        }
    }
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`GuardLayer`] wraps around the admin routes.
#[derive(Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    layer: GuardLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> tower::Service<Request<B>> for Guard<S>
where
    S: tower::Service<Request<B>, Response = Response<AdminBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<AdminBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<AdminBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let open = !self.layer.control.tokens().required();
        match check(req.method(), req.headers(), open, &self.layer.allowed_hosts) {
            Ok(()) => Box::pin(self.inner.call(req)),
            Err(refusal) => {
                let resp = refusal.response();
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 403 `cross_origin`.
    CrossOrigin(String),
    /// 403 `forbidden_host`.
    ForbiddenHost(String),
}

impl Refusal {
    fn response(self) -> Response<AdminBody> {
        let (code, message) = match self {
            Refusal::CrossOrigin(m) => ("cross_origin", m),
            Refusal::ForbiddenHost(m) => ("forbidden_host", m),
        };
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut resp = Response::new(Full::new(Bytes::from(bytes)).boxed());
        *resp.status_mut() = StatusCode::FORBIDDEN;
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

/// The §13 decision for one request head. `open`: no token file is set.
pub(crate) fn check(
    method: &Method,
    headers: &HeaderMap,
    open: bool,
    allowed_hosts: &[String],
) -> Result<(), Refusal> {
    let host = headers.get(HOST).map(|h| h.to_str().unwrap_or("\u{fffd}"));
    if open {
        if let Some(h) = host {
            if !host_allowed(h, allowed_hosts) {
                return Err(Refusal::ForbiddenHost(format!(
                    "Host `{}` is not an IP address, localhost or in [admin] allowed_hosts \
                     (a request through a DNS name is refused while no admin.token_file is set)",
                    h.escape_debug()
                )));
            }
        }
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
            return Err(Refusal::CrossOrigin(format!(
                "a {} request from another site (Sec-Fetch-Site: {}) cannot change routing",
                method,
                String::from_utf8_lossy(site)
            )));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("\u{fffd}");
        let own = host.is_some_and(|h| {
            origin
                .strip_prefix("http://")
                .is_some_and(|o| o.eq_ignore_ascii_case(h))
        });
        if !own {
            return Err(Refusal::CrossOrigin(format!(
                "Origin `{}` is not this admin listener's origin (http://{}): \
                 a web page elsewhere cannot change routing",
                origin.escape_debug(),
                host.unwrap_or("?").escape_debug()
            )));
        }
    }
    Ok(())
}

/// `Host` (with or without port) is an IP literal, `localhost`, or listed.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // `[::1]:9901`
        match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.starts_with(':') => {
                return ip.parse::<std::net::Ipv6Addr>().is_ok() && valid_port(port);
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) => {
                if !valid_port(&format!(":{port}")) {
                    return false;
                }
                name
            }
            None => host,
        }
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
}

fn valid_port(p: &str) -> bool {
    match p.strip_prefix(':') {
        None => p.is_empty(),
        Some(digits) => !digits.is_empty() && digits.parse::<u16>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hosts() {
        let allowed = ["switchyard.internal".to_string()];
        for ok in [
            "127.0.0.1:9901",
            "127.0.0.1",
            "[::1]:9901",
            "[::1]",
            "localhost:9901",
            "LOCALHOST",
            "localhost.",
            "10.1.2.3:80",
            "switchyard.internal:9901",
            "Switchyard.Internal",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example:9901",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:9901",
            "[::1]x",
            "[nope]:1",
            "localhost:99999",
            "localhost:",
            "",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
    }

    #[test]
    fn decisions() {
        let post = Method::POST;
        let get = Method::GET;
        // curl / ctl: no Origin, no Sec-Fetch-Site.
        assert_eq!(
            check(&post, &headers(&[("host", "127.0.0.1:9901")]), true, &[]),
            Ok(())
        );
        assert_eq!(check(&post, &headers(&[]), true, &[]), Ok(()));
        // The page itself.
        let same = headers(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:9901"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert_eq!(check(&post, &same, true, &[]), Ok(()));
        // Another origin, with or without fetch metadata.
        let other = headers(&[
            ("host", "127.0.0.1:9901"),
            ("origin", "http://127.0.0.1:5555"),
        ]);
        assert!(matches!(
            check(&post, &other, true, &[]),
            Err(Refusal::CrossOrigin(_))
        ));
        assert!(matches!(
            check(&post, &other, false, &[]),
            Err(Refusal::CrossOrigin(_))
        ));
        let null = headers(&[("host", "127.0.0.1:9901"), ("origin", "null")]);
        assert!(matches!(
            check(&post, &null, true, &[]),
            Err(Refusal::CrossOrigin(_))
        ));
        for site in ["cross-site", "same-site"] {
            let h = headers(&[("host", "127.0.0.1:9901"), ("sec-fetch-site", site)]);
            assert!(matches!(
                check(&post, &h, true, &[]),
                Err(Refusal::CrossOrigin(_))
            ));
        }
        // Reads are not mutations.
        assert_eq!(check(&get, &other, true, &[]), Ok(()));
        // A rebound name, open API: refused even for reads; with a token
        // file it is served.
        let rebound = headers(&[("host", "attacker.example:9901")]);
        assert!(matches!(
            check(&get, &rebound, true, &[]),
            Err(Refusal::ForbiddenHost(_))
        ));
        assert_eq!(check(&get, &rebound, false, &[]), Ok(()));
        assert_eq!(
            check(&get, &rebound, true, &["attacker.example".to_string()]),
            Ok(())
        );
    }
}
