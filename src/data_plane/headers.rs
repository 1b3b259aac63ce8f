//! Header rewriting between client and backend. Pure functions.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must
//! not be forwarded: `Connection` and every header it names,
//! `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`;
//! also `HTTP2-Settings`, and an upgrade to HTTP/2 (`h2c`) is never passed
//! on (SPEC §14).
//! hyper re-frames bodies itself, so dropping `Transfer-Encoding` is safe.

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, TE, TRANSFER_ENCODING, UPGRADE,
};

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
                    headers.remove(name);
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
    if !headers.contains_key(&X_FORWARDED_FOR) {
        headers.insert(X_FORWARDED_FOR.clone(), client_ip.clone());
        return;
    }
    let mut v = Vec::new();
    for prev in headers.get_all(&X_FORWARDED_FOR) {
        v.extend_from_slice(prev.as_bytes());
        v.extend_from_slice(b", ");
    }
    v.extend_from_slice(client_ip.as_bytes());
    // Every part was a valid header value, so the join is too.
    if let Ok(joined) = HeaderValue::from_bytes(&v) {
        headers.insert(X_FORWARDED_FOR.clone(), joined);
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

#[cfg(test)]
mod tests {
    use super::*;

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
