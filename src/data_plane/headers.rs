//! Header rewriting between client and backend. Pure functions.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and must
//! not be forwarded: `Connection` and every header it names,
//! `Proxy-Connection`, `Keep-Alive`, `TE`, `Transfer-Encoding`, `Upgrade`.
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
                    upgrade = headers.get(UPGRADE).cloned();
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
