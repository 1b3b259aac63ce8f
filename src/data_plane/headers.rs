//! The request head: checks ([`check_framing`], [`request_host`]) and the
//! rewriting between client and backend ([`prepare_request`],
//! [`remove_hop_by_hop`]). Pure functions, tested without sockets.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must
//! not be forwarded: `Connection` and every header it names,
//! `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`;
//! also `HTTP2-Settings`, and an upgrade to HTTP/2 (`h2c`) is never passed
//! on (SPEC §14).
//! hyper re-frames bodies itself, so dropping `Transfer-Encoding` is safe.

use http::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, EXPECT, HOST, TE, TRANSFER_ENCODING,
    UPGRADE,
};
use http::uri::{PathAndQuery, Uri};
use http::Version;

use crate::data_plane::error::ProxyError;

/// Longest request target (path and query) accepted; 414 above.
pub(crate) const MAX_TARGET_BYTES: usize = 8192;

/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`.
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `x-request-id`.
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-switchyard-pool` (upstream request and client response).
pub(crate) static X_SWITCHYARD_POOL: HeaderName = HeaderName::from_static("x-switchyard-pool");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `http2-settings`: only meaningful with `Upgrade: h2c`, which never goes
/// upstream (SPEC §14), so it is always dropped.
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// `n` in decimal, written into `buf` (no allocation, no formatter): for
/// the lengths and numbers the proxy writes into heads on the request path.
pub(crate) fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Removes hop-by-hop headers, including those named in `Connection`.
/// Returns the `Upgrade` value if the message asked for an upgrade
/// (`Connection: upgrade` + `Upgrade`), so the caller can pass it on.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    // Fast path: one pass over the names (comparisons of standard names are
    // integer compares) instead of six hashed lookups; almost every request
    // and response has none of these.
    if !headers.keys().any(is_hop_by_hop) {
        return None;
    }
    let mut upgrade = None;
    // Fast path: most requests carry no Connection header at all.
    if headers.contains_key(CONNECTION) {
        // Copy the values out (cheap `Bytes` handles; a Vec only in the rare
        // case of several Connection headers) so we can remove what they name.
        let mut values = headers.get_all(CONNECTION).iter();
        let first = values.next().cloned();
        let rest: Vec<HeaderValue> = values.cloned().collect();
        for v in first.iter().chain(rest.iter()) {
            for token in v.as_bytes().split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.is_empty() {
                    continue;
                }
                if token.eq_ignore_ascii_case(b"upgrade") {
                    upgrade = headers.get(UPGRADE).and_then(without_h2c);
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(token) {
                    if !is_protected(&name) {
                        headers.remove(name);
                    }
                }
            }
        }
        headers.remove(CONNECTION);
    }
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &TE,
        &TRANSFER_ENCODING,
        &UPGRADE,
        &HTTP2_SETTINGS,
    ] {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    upgrade
}

/// Headers `Connection` can never remove: `Host` (an HTTP/1.1 request
/// needs it) and the ones the proxy itself sets, so that the backend sees
/// what the proxy promised (the request id the client gets back, the
/// forwarding headers, the pool).
fn is_protected(name: &HeaderName) -> bool {
    name == HOST
        || name == X_REQUEST_ID
        || name == X_FORWARDED_FOR
        || name == X_FORWARDED_HOST
        || name == X_FORWARDED_PROTO
        || name == X_SWITCHYARD_POOL
}

/// Is `name` one of the fixed hop-by-hop headers?
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION
        || name == TE
        || name == TRANSFER_ENCODING
        || name == UPGRADE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
        || name == HTTP2_SETTINGS
}

/// An `Upgrade` value without its HTTP/2 protocols (`h2c`, `h2`,
/// `HTTP/2.0`, in any case, with or without a version), which the proxy
/// never passes on: a backend that accepted one would speak HTTP/2 straight
/// to the client, past routing and every check ("h2c smuggling"). `None`
/// if nothing else is left. Only called for requests that ask to upgrade.
pub(crate) fn without_h2c(value: &HeaderValue) -> Option<HeaderValue> {
    let bytes = value.as_bytes();
    let tokens = || {
        bytes
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.is_empty())
    };
    if !tokens().any(is_http2_protocol) {
        return tokens().next().is_some().then(|| value.clone());
    }
    let mut kept = Vec::with_capacity(bytes.len());
    for t in tokens().filter(|t| !is_http2_protocol(t)) {
        if !kept.is_empty() {
            kept.extend_from_slice(b", ");
        }
        kept.extend_from_slice(t);
    }
    if kept.is_empty() {
        return None;
    }
    // Every byte came from a valid header value.
    HeaderValue::from_bytes(&kept).ok()
}

/// Is this `Upgrade` token (`name[/version]`) an HTTP/2 protocol?
fn is_http2_protocol(token: &[u8]) -> bool {
    let (name, version) = match token.iter().position(|&b| b == b'/') {
        Some(i) => (token[..i].trim_ascii(), Some(token[i + 1..].trim_ascii())),
        None => (token, None),
    };
    name.eq_ignore_ascii_case(b"h2c")
        || name.eq_ignore_ascii_case(b"h2")
        || (name.eq_ignore_ascii_case(b"http") && version.is_some_and(|v| v.starts_with(b"2")))
}

/// Appends the client address to `X-Forwarded-For`. Several header lines
/// are one comma-separated list (RFC 9110 §5.3): all are kept, in order.
pub fn append_forwarded_for(headers: &mut HeaderMap, client_ip: &HeaderValue) {
    // One hashed lookup (`entry`) whether the header is there or not.
    match headers.entry(X_FORWARDED_FOR.clone()) {
        Entry::Vacant(e) => {
            e.insert(client_ip.clone());
        }
        Entry::Occupied(mut e) => {
            let mut v = Vec::new();
            for prev in e.iter() {
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(client_ip.as_bytes());
            // Every part was a valid header value, so the join is too.
            // `insert` replaces every line of the header with the join.
            if let Ok(joined) = HeaderValue::from_bytes(&v) {
                e.insert(joined);
            }
        }
    }
}

/// Is this a usable request id (1..=128 visible ASCII characters)?
pub(crate) fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// A fresh request id: 32 lowercase hex digits.
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, slot) in buf.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        *slot = HEX[((word >> ((i % 16) * 4)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value. `from_owner`: one
    // allocation, and the clones that follow (upstream request, exchange,
    // response) only bump a count; a copied `Bytes` would allocate again on
    // its first clone.
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// Refuses what hyper lets through but a proxy must not pass on: a
/// `Transfer-Encoding` other than exactly `chunked` (hyper already refuses
/// one whose last coding is not `chunked`, and a `Content-Length` beside
/// it: see [`crate::data_plane::h1guard`]), and an over-long target.
pub(crate) fn check_framing(parts: &http::request::Parts) -> Result<(), ProxyError> {
    let target = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if target > MAX_TARGET_BYTES {
        return Err(ProxyError::UriTooLong);
    }
    let mut te = parts.headers.get_all(TRANSFER_ENCODING).iter();
    match (te.next(), te.next()) {
        (None, _) => Ok(()),
        (Some(v), None) if v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(ProxyError::BadRequest(
            "unsupported Transfer-Encoding (only `chunked` is accepted)",
        )),
    }
}

/// The host a request is for, from the absolute-form target or `:authority`
/// (HTTP/2), else the `Host` header. Malformed or conflicting → 400.
pub(crate) fn request_host(parts: &http::request::Parts) -> Result<&str, ProxyError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let header = match header {
        Some(h) => Some(
            h.to_str()
                .ok()
                .filter(|s| valid_host(s))
                .ok_or(ProxyError::BadRequest("invalid Host header"))?,
        ),
        None => None,
    };
    match (parts.uri.authority(), header) {
        (Some(auth), header) => {
            let a = auth.as_str();
            if a.contains('@') || !valid_host(a) {
                return Err(ProxyError::BadRequest("invalid request target authority"));
            }
            if let Some(h) = header {
                if !h.eq_ignore_ascii_case(a) {
                    return Err(ProxyError::BadRequest(
                        "request target names another host than the Host header",
                    ));
                }
            }
            Ok(a)
        }
        (None, Some(h)) => Ok(h),
        (None, None) if parts.version <= Version::HTTP_10 => Ok(""),
        (None, None) => Err(ProxyError::BadRequest("missing Host header")),
    }
}

/// `host`, `host:port`, `[v6]:port`: no spaces, controls, or path.
pub(crate) fn valid_host(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
}

/// Turns the client's request head into the backend's, in place, for a
/// client at `client_ip` (over TLS if `tls`). Returns the client side of an
/// upgrade if one was asked for.
pub(crate) fn prepare_request(
    parts: &mut http::request::Parts,
    forwarded: Option<(&HeaderValue, bool)>,
) -> Option<hyper::upgrade::OnUpgrade> {
    let upgrade = remove_hop_by_hop(&mut parts.headers);
    // The client's Expect was answered by our own server side (hyper sends
    // 100 Continue when the body is first read).
    // (A scan of the few names, with integer compares for standard ones,
    // is cheaper than a hashed lookup for a header almost never there.)
    if parts.headers.keys().any(|k| k == EXPECT) {
        parts.headers.remove(EXPECT);
    }
    // HTTP/2 requests carry the host as :authority; HTTP/1.1 backends need Host.
    let host = match parts.headers.get(HOST) {
        Some(h) => Some(h.clone()),
        None => {
            let v = parts
                .uri
                .authority()
                .and_then(|auth| HeaderValue::from_str(auth.as_str()).ok());
            if let Some(v) = &v {
                parts.headers.insert(HOST, v.clone());
            }
            v
        }
    };
    // `forwarded`: the client's address and whether it came over TLS, or
    // None when the forwarding headers are off (`forwarded_headers = false`).
    if let Some((client_ip, tls)) = forwarded {
        if let Some(h) = host {
            parts.headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        append_forwarded_for(&mut parts.headers, client_ip);
        parts.headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
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
    match upgrade {
        Some(proto) if parts.method != http::Method::CONNECT => {
            // HTTP/2 has no Upgrade (no `OnUpgrade`): the header is just dropped.
            let on = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
            parts
                .headers
                .insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, proto);
            Some(on)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 9999, 604_800, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    fn parts(req: http::Request<()>) -> http::request::Parts {
        req.into_parts().0
    }

    #[test]
    fn framing_accepts_only_plain_chunked() {
        let ok = parts(
            http::Request::post("/")
                .header("transfer-encoding", " Chunked ")
                .body(())
                .unwrap(),
        );
        assert!(check_framing(&ok).is_ok());
        for te in [&["gzip, chunked"][..], &["chunked", "chunked"]] {
            let mut b = http::Request::post("/");
            for v in te {
                b = b.header("transfer-encoding", *v);
            }
            let err = check_framing(&parts(b.body(()).unwrap())).unwrap_err();
            assert_eq!(err.status(), http::StatusCode::BAD_REQUEST, "{te:?}");
            assert!(
                !err.to_string().contains("400"),
                "no status in the text: {err}"
            );
        }
        let long = format!("/{}", "a".repeat(MAX_TARGET_BYTES));
        let err = check_framing(&parts(http::Request::get(long).body(()).unwrap())).unwrap_err();
        assert_eq!(err.status(), http::StatusCode::URI_TOO_LONG);
    }

    #[test]
    fn host_from_target_or_header() {
        let h = |b: http::request::Builder| parts(b.body(()).unwrap());
        let p = h(http::Request::get("/").header("host", "a.example:8080"));
        assert_eq!(request_host(&p).unwrap(), "a.example:8080");
        let p = h(http::Request::get("http://b.example/x"));
        assert_eq!(request_host(&p).unwrap(), "b.example");
        let p = h(http::Request::get("http://b.example/x").header("host", "B.example"));
        assert_eq!(request_host(&p).unwrap(), "b.example");
        let p = h(http::Request::get("/").version(Version::HTTP_10));
        assert_eq!(request_host(&p).unwrap(), "");
        for (b, why) in [
            (http::Request::get("/"), "missing Host header"),
            (
                http::Request::get("/")
                    .header("host", "a")
                    .header("host", "b"),
                "more than one Host header",
            ),
            (
                http::Request::get("/").header("host", "a b"),
                "invalid Host header",
            ),
            (
                http::Request::get("http://u@c.example/"),
                "invalid request target authority",
            ),
            (
                http::Request::get("http://c.example/").header("host", "d.example"),
                "request target names another host than the Host header",
            ),
        ] {
            match request_host(&h(b)) {
                Err(ProxyError::BadRequest(got)) => assert_eq!(got, why),
                other => panic!("{why}: {other:?}"),
            }
        }
        assert!(valid_host("[::1]:80") && !valid_host("") && !valid_host("a/b"));
        assert!(!valid_host(&"a".repeat(256)));
    }

    #[test]
    fn prepared_request_is_origin_form_http11_with_forwarding_headers() {
        let mut p = parts(
            http::Request::get("http://api.example/v1?q=1")
                .version(Version::HTTP_2)
                .header("expect", "100-continue")
                .header("x-forwarded-for", "192.0.2.1")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body(())
                .unwrap(),
        );
        let up = prepare_request(&mut p, Some((&HeaderValue::from_static("10.0.0.9"), true)));
        assert!(
            up.is_none(),
            "no OnUpgrade (HTTP/2): the upgrade is dropped"
        );
        assert_eq!(p.uri, "/v1?q=1");
        assert_eq!(p.version, Version::HTTP_11);
        assert_eq!(p.headers[HOST], "api.example");
        assert_eq!(p.headers[&X_FORWARDED_HOST], "api.example");
        assert_eq!(p.headers[&X_FORWARDED_FOR], "192.0.2.1, 10.0.0.9");
        assert_eq!(p.headers[&X_FORWARDED_PROTO], "https");
        assert!(!p.headers.contains_key(EXPECT));
        assert!(!p.headers.contains_key(UPGRADE) && !p.headers.contains_key(CONNECTION));
    }

    #[test]
    fn hop_by_hop_removed_with_named_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret , close"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(remove_hop_by_hop(&mut h).is_none());
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn connection_cannot_remove_host_or_the_proxys_own_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            HeaderValue::from_static(
                "host, x-request-id, X-Forwarded-Host, x-forwarded-for, x-forwarded-proto, \
                 x-switchyard-pool, x-other",
            ),
        );
        for name in [
            "host",
            "x-request-id",
            "x-forwarded-host",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-switchyard-pool",
            "x-other",
        ] {
            h.insert(name, HeaderValue::from_static("v"));
        }
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 6, "{h:?}");
        assert!(!h.contains_key("x-other") && !h.contains_key(CONNECTION));
    }

    #[test]
    fn upgrade_is_reported() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(
            remove_hop_by_hop(&mut h),
            Some(HeaderValue::from_static("websocket"))
        );
        assert!(h.is_empty());
    }

    #[test]
    fn h2c_never_passes() {
        for (conn, upgrade, kept) in [
            ("Upgrade, HTTP2-Settings", "h2c", None),
            ("upgrade", "H2C", None),
            ("keep-alive, Upgrade", "websocket, h2c", Some("websocket")),
            ("Upgrade", "h2c , WebSocket,h2", Some("WebSocket")),
            ("Upgrade", "HTTP/2.0", None),
            ("Upgrade", "http/1.1, h2c/1", Some("http/1.1")),
            ("Upgrade", " , ", None),
        ] {
            let mut h = HeaderMap::new();
            h.insert(CONNECTION, HeaderValue::from_str(conn).unwrap());
            h.insert(UPGRADE, HeaderValue::from_str(upgrade).unwrap());
            h.insert(
                "http2-settings",
                HeaderValue::from_static("AAMAAABkAAQAAP__"),
            );
            let got = remove_hop_by_hop(&mut h);
            assert_eq!(
                got.as_ref().map(|v| v.to_str().unwrap()),
                kept,
                "{conn} / {upgrade}"
            );
            assert!(h.is_empty(), "{h:?}");
        }
        // Not named in Connection: still dropped.
        let mut h = HeaderMap::new();
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        assert!(remove_hop_by_hop(&mut h).is_none());
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn forwarded_for_appends() {
        let ip = HeaderValue::from_static("10.1.2.3");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3, 10.1.2.3");
        h.append(
            X_FORWARDED_FOR.clone(),
            HeaderValue::from_static("192.0.2.1"),
        );
        append_forwarded_for(&mut h, &ip);
        assert_eq!(
            h[&X_FORWARDED_FOR],
            "10.1.2.3, 10.1.2.3, 192.0.2.1, 10.1.2.3"
        );
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn request_ids() {
        let id = new_request_id();
        assert_eq!(id.len(), 32);
        assert!(valid_request_id(&id));
        assert_ne!(new_request_id(), id);
        assert!(!valid_request_id(&HeaderValue::from_static("")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
    }
}
