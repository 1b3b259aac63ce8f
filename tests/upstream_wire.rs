//! The proxy's own HTTP/1.1 client (`data_plane/h1client.rs`) against a
//! backend that writes its responses byte for byte: every response framing
//! RFC 9112 allows (length, chunked with extensions and trailers, until
//! close, HTTP/1.0, 1xx before the answer, `Transfer-Encoding` over
//! `Content-Length`, HEAD), heads and bodies in pieces, keep-alive kept
//! where the backend allows it and dropped where it does not, and the
//! malformed answers refused with a 502 instead of passed on.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the scripted backend answers to `METHOD /path`, and whether it
/// closes the connection after.
fn script(method: &str, path: &str) -> (&'static [u8], bool) {
    match (method, path) {
        ("GET", "/length") => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Up: a\r\n\r\nhello", false),
        ("GET", "/chunked") => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
            false,
        ),
        ("GET", "/until-close") => (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the backend closes",
            true,
        ),
        ("GET", "/http10") => (b"HTTP/1.0 200 OK\r\n\r\nan HTTP/1.0 body", true),
        ("GET", "/hints") => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        ("GET", "/te-and-cl") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            false,
        ),
        ("GET", "/close") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nclosed",
            true,
        ),
        ("GET", "/dated") => (
            b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        ("HEAD", "/length") => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
        ("GET", "/no-content") => (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        ("GET", "/two-lengths") => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
            true,
        ),
        ("GET", "/bad-chunk") => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            true,
        ),
        ("GET", "/cut") => (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", true),
        ("GET", "/cut-head") => (b"HTTP/1.1 200 OK\r\nContent-Le", true),
        _ => (b"HTTX/9 what\r\n\r\n", true),
    }
}

/// A backend answering [`script`], each response written in `piece`-byte
/// writes (1: byte by byte). Counts the connections it accepted.
async fn scripted_backend(piece: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve(s, piece));
        }
    });
    (addr, accepted)
}

async fn serve(mut s: TcpStream, piece: usize) {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::new();
    loop {
        // One request head (these requests have no body).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let (resp, close) = script(method, path);
        for part in resp.chunks(piece) {
            if s.write_all(part).await.is_err() {
                return;
            }
            if piece < resp.len() {
                // Traffic shaping, not synchronisation: the pieces reach
                // the proxy as separate reads.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        if close {
            return;
        }
    }
}

async fn request(
    client: &HttpClient,
    proxy: &TestProxy,
    method: Method,
    path: &str,
) -> (StatusCode, http::HeaderMap, Result<Bytes, String>) {
    let req = Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .body(empty())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("a response head in time")
        .unwrap_or_else(|e| panic!("{path}: {e:?}"));
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("the body ends in time")
        .map(|c| c.to_bytes())
        .map_err(|e| format!("{e:?}"));
    (status, headers, body)
}

async fn every_framing_arrives_whole(piece: usize) {
    let (addr, accepted) = scripted_backend(piece).await;
    let proxy = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    let client = http1_client();
    let ok = |path: &'static str, want: &'static [u8]| (path, want);
    for (path, want) in [
        ok("/length", b"hello"),
        ok("/chunked", b"hello world"),
        ok("/hints", b"ok"),
        ok("/te-and-cl", b"abc"),
        ok("/until-close", b"until the backend closes"),
        ok("/http10", b"an HTTP/1.0 body"),
        ok("/close", b"closed"),
        ok("/no-content", b""),
    ] {
        let (status, headers, body) = request(&client, &proxy, Method::GET, path).await;
        let want_status = if path == "/no-content" {
            StatusCode::NO_CONTENT
        } else {
            StatusCode::OK
        };
        assert_eq!(status, want_status, "{path} (pieces of {piece})");
        assert_eq!(body.as_deref(), Ok(want), "{path} (pieces of {piece})");
        if path == "/te-and-cl" {
            assert!(
                headers.get("content-length").is_none(),
                "Transfer-Encoding wins; the stale Content-Length must not reach the client"
            );
        }
        if path == "/length" {
            assert_eq!(headers["x-up"], "a");
        }
    }
    let (status, headers, body) = request(&client, &proxy, Method::HEAD, "/length").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "5", "HEAD keeps the length");
    assert_eq!(body.as_deref(), Ok(&b""[..]));

    // Keep-alive where the backend allows it: the framings above that end
    // on their own leave the connection pooled, the others close it. A new
    // connection for: until-close, http10, close (3), plus the first.
    // Sequential requests on one client connection stay on one worker.
    let before = accepted.load(Ordering::SeqCst);
    assert_eq!(before, 4, "connections: the first + one after each close");
    for path in ["/length", "/chunked", "/hints", "/te-and-cl", "/no-content"] {
        let (status, _, body) = request(&client, &proxy, Method::GET, path).await;
        assert!(
            status.is_success() && body.is_ok(),
            "{path}: {status} {body:?}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        before,
        "responses that end on their own keep the connection"
    );
}

#[tokio::test]
async fn every_response_framing_arrives_whole_in_one_piece() {
    every_framing_arrives_whole(usize::MAX).await;
}

#[tokio::test]
async fn every_response_framing_arrives_whole_byte_by_byte() {
    every_framing_arrives_whole(1).await;
}

/// The `Date` header (RFC 9110 §6.6.1): the backend's is passed on as it
/// is; a response without one gets the proxy's, current, and moving on as
/// the seconds do (the vendored hyper reads its cached date's clock only
/// when it writes one: vendor/hyper/VENDORED.md, sixth change).
#[tokio::test]
async fn a_response_carries_the_backends_date_or_a_current_one() {
    let (addr, _) = scripted_backend(usize::MAX).await;
    let proxy = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    let client = http1_client();
    let (status, headers, _) = request(&client, &proxy, Method::GET, "/dated").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["date"], "Sun, 06 Nov 1994 08:49:37 GMT");

    let date_of = |headers: &http::HeaderMap| {
        let text = headers["date"].to_str().expect("an ASCII date").to_owned();
        let when = httpdate::parse_http_date(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        (text, when)
    };
    let (status, headers, _) = request(&client, &proxy, Method::GET, "/length").await;
    assert_eq!(status, StatusCode::OK);
    let (first, when) = date_of(&headers);
    let now = std::time::SystemTime::now();
    let skew = now.duration_since(when).unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(3),
        "{first} is {skew:?} off the clock"
    );
    // The next second's responses carry the next second's date (bounded:
    // at most ~1 s of requests on one keep-alive connection).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, headers, _) = request(&client, &proxy, Method::GET, "/length").await;
        let (text, later) = date_of(&headers);
        if text != first {
            assert!(later > when, "{text} follows {first}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the date stayed {first}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn malformed_or_cut_responses_are_refused_or_cut_not_passed_on() {
    let (addr, _) = scripted_backend(usize::MAX).await;
    let proxy = TestProxy::start(&[Svc::addrs("web", &[addr], &[addr])]).await;
    let client = http1_client();
    for path in ["/two-lengths", "/garbage", "/cut-head"] {
        let (status, _, body) = request(&client, &proxy, Method::GET, path).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{path}: {body:?}");
    }
    // A body cut after its head went out: the client sees the cut (an
    // error, not a short body passed off as whole).
    for path in ["/cut", "/bad-chunk"] {
        let (status, _, body) = request(&client, &proxy, Method::GET, path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(body.is_err(), "{path}: {body:?}");
    }
    // And the proxy is fine after all of it.
    let (status, _, body) = request(&client, &proxy, Method::GET, "/length").await;
    assert_eq!(
        (status, body.as_deref()),
        (StatusCode::OK, Ok(&b"hello"[..]))
    );
    let m = proxy.admin.metrics().await;
    // Garbage and cut heads count as `reset` (the exchange broke), cut
    // bodies as `truncated`.
    for kind in ["truncated", "reset"] {
        let series = format!(
            r#"switchyard_upstream_errors_total{{kind="{kind}",pool="blue",service="web"}}"#
        );
        assert!(metric(&m, &series).is_some(), "{series} in\n{m}");
    }
}
