//! Hostile input: raw bytes over TCP, the exact answer, and what reached the
//! upstream (nothing, for everything refused).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What came back on a raw connection.
#[derive(Debug)]
struct Answer {
    text: String,
    /// The server closed the connection (EOF or reset) within the bound.
    closed: bool,
}

impl Answer {
    fn status(&self) -> u16 {
        self.text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

/// Sends `bytes` in one write and reads until the server closes (at most 5 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_to_close(&mut s, Duration::from_secs(5)).await
}

async fn read_to_close(s: &mut TcpStream, bound: Duration) -> Answer {
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + bound;
    let closed = loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    Answer {
        text: String::from_utf8_lossy(&out).into_owned(),
        closed,
    }
}

async fn proxy_for(extra: &str, up: &Upstream) -> TestProxy {
    TestProxy::start_with(extra, &[Svc::new("web", &[up], &[up])]).await
}

/// Each case: name, raw request, status expected. Every one must close
/// the connection and reach no upstream.
async fn refused(proxy: &TestProxy, up: &Upstream, cases: &[(&str, &[u8], u16)]) {
    for (name, bytes, want) in cases {
        let a = raw(proxy.addr, bytes).await;
        assert_eq!(a.status(), *want, "{name}: {a:?}");
        assert!(a.closed, "{name}: connection left open: {a:?}");
        assert_eq!(
            a.text.matches("HTTP/1.1 ").count(),
            1,
            "{name}: exactly one response: {a:?}"
        );
    }
    assert_eq!(up.hits(), 0, "nothing may reach the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_is_refused_and_the_connection_closed() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let cl_te = format!("POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}");
    let te_cl = format!("POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\n{SMUGGLED}");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("CL then TE", cl_te.into_bytes(), 400),
        ("TE then CL", te_cl.into_bytes(), 400),
        ("two differing CL", format!("POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc{SMUGGLED}").into_bytes(), 400),
        ("CL list", b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\nabcd".to_vec(), 400),
        ("CL not a number", b"POST /count HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc".to_vec(), 400),
        ("TE chunked not last", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE identity", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n".to_vec(), 400),
        ("TE xchunked", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE gzip, chunked", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE twice", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("TE in HTTP/1.0", b"POST /count HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n".to_vec(), 400),
        ("obs-fold with tab", b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n\ttwo\r\n\r\n".to_vec(), 400),
        ("chunk size not hex", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk size negative", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk size overflow", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk size empty", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\r\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk size with bare LF", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n".to_vec(), 400),
        ("chunk data too long", b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello, world\r\n0\r\n\r\n".to_vec(), 400),
        ("bare LF line ends", b"GET / HTTP/1.1\nHost: a\n\n".to_vec(), 400),
        ("one bare LF", b"GET / HTTP/1.1\r\nHost: a\nX-A: 1\r\n\r\n".to_vec(), 400),
        ("bare LF ending the head", b"GET / HTTP/1.1\r\nHost: a\r\n\n".to_vec(), 400),
        ("bare CR", b"GET / HTTP/1.1\rHost: a\r\n\r\n".to_vec(), 400),
        ("space before colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n".to_vec(), 400),
        ("space in header name", b"GET / HTTP/1.1\r\nHost: a\r\nX Forwarded: 1\r\n\r\n".to_vec(), 400),
        ("empty header name", b"GET / HTTP/1.1\r\nHost: a\r\n: x\r\n\r\n".to_vec(), 400),
        ("pipelined bare LF after a clean request", b"GET /first HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\nGET /second HTTP/1.1\nHost: a\n\n".to_vec(), 200),
    ];
    for (name, bytes, want) in &cases[..cases.len() - 1] {
        let a = raw(proxy.addr, bytes).await;
        assert_eq!(a.status(), *want, "{name}: {a:?}");
        assert!(a.closed, "{name}: connection left open: {a:?}");
        assert_eq!(
            a.text.matches("HTTP/1.1 ").count(),
            1,
            "{name}: exactly one response: {a:?}"
        );
    }
    assert_eq!(up.hits(), 0, "nothing may reach the upstream");

    // Pipelined: the clean first request is served, the second refused, and
    // the connection closed.
    let (name, bytes, _) = &cases[cases.len() - 1];
    let a = raw(proxy.addr, bytes).await;
    let statuses: Vec<&str> = a
        .text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &a.text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "400"], "{name}: {a:?}");
    assert!(a.closed);
    assert_eq!(up.hits(), 1);

    // A clean chunked request still goes through, re-framed.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n").await.unwrap();
    let a = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert!(a.text.ends_with("\r\n\r\n12"), "{a:?}");
    assert_eq!(up.hits(), 2);
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunk_after_the_head_went_upstream_is_400_not_502() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"POST /count HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    // The head and first chunk are upstream now.
    assert!(eventually(Duration::from_secs(5), || async { up.hits() == 1 }).await);
    s.write_all(b"zz\r\nmore\r\n0\r\n\r\n").await.unwrap();
    let a = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(a.status(), 400, "{a:?}");
    assert!(a.closed);
    // Not the backend's fault: no 5xx, no upstream error counted.
    let m = proxy.admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            "switchyard_requests_total{code=\"5xx\",pool=\"blue\",service=\"web\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "switchyard_upstream_errors_total{kind=\"reset\",pool=\"blue\",service=\"web\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_heads_too_many_headers_and_long_targets() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("max_request_header_bytes = 16384", &up).await;
    let big_header = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(17_000)
    );
    let many: String = (0..130).map(|i| format!("X-H{i}: v\r\n")).collect();
    let too_many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    // 414 is an ordinary answer: ask for the close to see the end.
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "a".repeat(9000)
    );
    let huge_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(20_000));
    let cases: [(&str, &[u8], u16); 4] = [
        (
            "header section over max_request_header_bytes",
            big_header.as_bytes(),
            431,
        ),
        ("130 headers (limit 128)", too_many.as_bytes(), 431),
        (
            "request line over max_request_header_bytes",
            huge_target.as_bytes(),
            431,
        ),
        ("target over 8 KiB", long_target.as_bytes(), 414),
    ];
    for (name, bytes, want) in cases {
        let a = raw(proxy.addr, bytes).await;
        assert_eq!(
            a.status(),
            want,
            "{name}: {}",
            &a.text[..a.text.len().min(300)]
        );
        if want == 431 {
            assert!(a.closed, "{name}");
        }
    }
    assert_eq!(up.hits(), 0);
    // Under the limits is fine (the test upstream, hyper with its default
    // limit of 100 headers, must take it too).
    let ok_many: String = (0..90).map(|i| format!("X-H{i}: v\r\n")).collect();
    let ok = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{ok_many}X-Big: {}\r\n\r\n",
        "x".repeat(12_000)
    );
    assert_eq!(raw(proxy.addr, ok.as_bytes()).await.status(), 200);
    let ok = format!(
        "GET /{} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "a".repeat(8000)
    );
    assert_eq!(raw(proxy.addr, ok.as_bytes()).await.status(), 200);
    // 128 fields, the limit, above hyper's 100 inline parse slots: parsed
    // a second time with 128 (vendor/hyper/VENDORED.md).
    let at_limit: String = (0..126).map(|i| format!("X-H{i}: v\r\n")).collect();
    let ok = format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n{at_limit}\r\n");
    assert_eq!(raw(proxy.addr, ok.as_bytes()).await.status(), 200);
    assert_eq!(up.hits(), 3);
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_host_and_bad_targets_are_400() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let cases: &[(&str, &[u8], u16)] = &[
        ("missing Host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ("empty Host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", 400),
        (
            "Host with a space",
            b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            400,
        ),
        (
            "Host with a path",
            b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
            400,
        ),
        (
            "Host with userinfo",
            b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
            400,
        ),
        (
            "two Hosts",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
        ),
        (
            "absolute-form naming another host",
            b"GET http://evil.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            400,
        ),
        (
            "absolute-form with userinfo",
            b"GET http://a.test@evil.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n",
            400,
        ),
        (
            "NUL in target",
            b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "control char in target",
            b"GET /a\x01b HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "DEL in target",
            b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "tab in target",
            b"GET /a\tb HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "space in target",
            b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
        ),
        (
            "NUL in a header value",
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
            400,
        ),
        (
            "garbage request line",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            400,
        ),
    ];
    refused(&proxy, &up, cases).await;
    // The same host in both places is fine.
    let a = raw(
        proxy.addr,
        b"GET http://a.test/ HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status(), 200, "{a:?}");
    assert_eq!(up.hits(), 1);
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_at_header_read_timeout_while_others_are_served() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("header_read_timeout = \"600ms\"", &up).await;
    let addr = proxy.addr;
    // Ten clients trickle a head, one header line every 100 ms.
    let mut slow = Vec::new();
    for _ in 0..10 {
        slow.push(tokio::spawn(async move {
            // Timed from before the connect: the proxy's deadline runs
            // from its accept.
            let start = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").await.unwrap();
            let mut buf = [0u8; 1024];
            for i in 0..100 {
                tokio::select! {
                    r = s.read(&mut buf) => {
                        // Closed on us (EOF or reset), with no response.
                        assert!(matches!(r, Ok(0) | Err(_)), "got a response: {r:?}");
                        return start.elapsed();
                    }
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if s.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await.is_err() {
                            return start.elapsed();
                        }
                    }
                }
            }
            panic!("a slow client was never cut");
        }));
    }
    // Meanwhile everybody else is served: requests answered while every
    // slow client is still connected (an event, not a wall-clock count).
    let mut served = 0;
    while served < 200 && !slow.iter().any(|s| s.is_finished()) {
        let (status, _, body) = proxy.get("/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "up"));
        served += 1;
    }
    assert!(
        served >= 1,
        "nobody served while slow clients held heads open"
    );
    for s in slow {
        // Never cut early; cut at all (a client never cut panics after
        // 100 lines); the exact deadline is tested on paused time in
        // `conn::tests`.
        let cut_after = s.await.unwrap();
        assert!(cut_after >= Duration::from_millis(500), "{cut_after:?}");
    }
    let m = proxy.admin.metrics().await;
    assert!(
        metric(&m, "switchyard_client_timeouts_total{kind=\"header_read\"}").unwrap_or(0.0) >= 10.0,
        "{m}"
    );
    assert_eq!(up.hits(), served);
    assert!(proxy.shutdown().await);
}

/// An upstream answering `/big` with an endless body, counting the bytes
/// hyper took from it (what backpressure lets through).
async fn endless_upstream() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let produced = Arc::new(AtomicU64::new(0));
    let p = Arc::clone(&produced);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let p = Arc::clone(&p);
            tokio::spawn(async move {
                let svc = service_fn(move |_req| {
                    let p = Arc::clone(&p);
                    async move {
                        // 16 GiB in 64 KiB chunks, made as they are asked for.
                        let chunk = Bytes::from(vec![b'x'; 65536]);
                        let stream = futures_util::stream::iter((0..262_144u64).map(move |_| {
                            p.fetch_add(65536, Ordering::Relaxed);
                            Ok::<_, Infallible>(Frame::data(chunk.clone()))
                        }));
                        Ok::<_, Infallible>(hyper::Response::new(StreamBody::new(stream)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, produced)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_grow_proxy_memory() {
    let (up, produced) = endless_upstream().await;
    let dir = TempDir::new("slow-reader");
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        config_text(
            dir.path(),
            "access_log = false",
            &[Svc::addrs("web", &[up], &[up])],
        ),
    )
    .unwrap();
    let p = tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, &[]))
        .await
        .unwrap()
        .unwrap();
    let pid = p.child.id();
    // Warm up (one small request), then measure.
    let mut s = TcpStream::connect(p.proxy).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let mut got = 0usize;
    while got < 1 << 20 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        got += n;
    }
    let baseline = rss_kib(pid);
    // Stop reading. The upstream may only run ahead by what the socket and
    // proxy buffers hold: wait until it stalls (no progress for 500 ms).
    let mut last = produced.load(Ordering::Relaxed);
    let mut still = 0;
    let mut max_rss = baseline;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        max_rss = max_rss.max(rss_kib(pid));
        let now = produced.load(Ordering::Relaxed);
        if now == last {
            still += 1;
            if still >= 5 {
                break;
            }
        } else {
            still = 0;
            last = now;
        }
    }
    assert!(
        still >= 5,
        "the upstream never stalled: {} MiB produced",
        last >> 20
    );
    assert!(
        last < 128 << 20,
        "the proxy let {} MiB through to a client that reads nothing",
        last >> 20
    );
    assert!(
        max_rss < baseline + 32 * 1024,
        "proxy RSS grew from {baseline} KiB to {max_rss} KiB"
    );
    // And it still serves others.
    let mut c = TcpStream::connect(p.proxy).await.unwrap();
    c.write_all(b"GET /other HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    drop(s);
}

// ===== HTTP/2 by hand =====

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// HPACK integer with an `n`-bit prefix under `first` bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header field without indexing, new name, no Huffman.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value.as_bytes());
}

/// The header block of `GET path` for host `a`, plus `extra` headers.
fn get_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0x82, 0x86]; // :method GET, :scheme http
    b.push(0x04); // :path, literal without indexing, indexed name
    hpack_int(&mut b, 0, 7, path.len());
    b.extend_from_slice(path.as_bytes());
    b.push(0x01); // :authority
    hpack_int(&mut b, 0, 7, 1);
    b.push(b'a');
    for (n, v) in extra {
        hpack_literal(&mut b, n, v);
    }
    b
}

/// A HEADERS frame (and CONTINUATIONs past 16 KiB) ending the stream.
fn headers(out: &mut Vec<u8>, stream: u32, block: &[u8]) {
    let mut pieces = block.chunks(16_384).peekable();
    let mut first = true;
    while let Some(p) = pieces.next() {
        let last = pieces.peek().is_none();
        let kind = if first { HEADERS } else { CONTINUATION };
        let flags = if first { END_STREAM } else { 0 } | if last { END_HEADERS } else { 0 };
        frame(out, kind, flags, stream, p);
        first = false;
    }
}

/// An h2c connection: preface, empty SETTINGS, and an ACK of the server's.
async fn h2_connect(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = PREFACE.to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, SETTINGS, ACK, 0, &[]);
    s.write_all(&out).await.unwrap();
    s
}

/// One frame read: (type, flags, stream, payload); None at EOF or after `bound`.
async fn read_frame(s: &mut TcpStream, bound: Duration) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    tokio::time::timeout(bound, s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tokio::time::timeout(bound, s.read_exact(&mut payload))
        .await
        .ok()?
        .ok()?;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Some((head[3], head[4], stream, payload))
}

/// Reads frames until EOF or `bound`; returns them.
async fn read_frames(
    s: &mut TcpStream,
    bound: Duration,
    stop: impl Fn(&(u8, u8, u32, Vec<u8>)) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + bound;
    let mut frames = Vec::new();
    while let Some(f) = read_frame(
        s,
        deadline.saturating_duration_since(tokio::time::Instant::now()),
    )
    .await
    {
        let done = stop(&f);
        frames.push(f);
        if done || frames.len() > 100_000 {
            break;
        }
    }
    frames
}

async fn others_are_served(proxy: &TestProxy) {
    let h2 = h2_client();
    for _ in 0..5 {
        let (status, _, body) = get(&h2, &proxy.url("/"), &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "up"));
        let (status, _, _) = proxy.get("/").await;
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_is_cut_off() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let mut s = h2_connect(proxy.addr).await;
    let block = get_block("/sleep/50", &[]);
    let mut out = Vec::new();
    const N: u32 = 5000;
    for i in 0..N {
        let id = 2 * i + 1;
        headers(&mut out, id, &block);
        frame(&mut out, RST_STREAM, 0, id, &8u32.to_be_bytes()); // CANCEL
    }
    // The server may stop reading once it has had enough.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.write_all(&out)).await;
    let frames = read_frames(&mut s, Duration::from_secs(5), |f| f.0 == GOAWAY).await;
    let goaway = frames
        .iter()
        .find(|f| f.0 == GOAWAY)
        .unwrap_or_else(|| panic!("no GOAWAY in {} frames", frames.len()));
    let code = u32::from_be_bytes([goaway.3[4], goaway.3[5], goaway.3[6], goaway.3[7]]);
    assert_eq!(code, 0xb, "ENHANCE_YOUR_CALM");
    // Far fewer than N requests were started upstream.
    assert!(
        up.hits() < N as usize / 10,
        "{} upstream requests",
        up.hits()
    );
    drop(s);
    others_are_served(&proxy).await;
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_concurrent_streams_are_bounded() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let mut s = h2_connect(proxy.addr).await;
    let block = get_block("/sleep/1500", &[]);
    let mut out = Vec::new();
    for i in 0..300u32 {
        headers(&mut out, 2 * i + 1, &block);
    }
    s.write_all(&out).await.unwrap();
    // 256 streams are served (after the upstream's 1.5 s); the rest refused.
    // (256 upstream connects at once can take a few seconds on a busy machine.)
    let (mut refused, mut ok, mut frames) = (0, 0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while ok + refused < 300 {
        let Some(f) = read_frame(
            &mut s,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
        else {
            break;
        };
        frames += 1;
        match f.0 {
            RST_STREAM if f.3 == 7u32.to_be_bytes() => refused += 1, // REFUSED_STREAM
            HEADERS => ok += 1,
            _ => {}
        }
    }
    assert_eq!((ok, refused), (256, 44), "{frames} frames");
    assert!(up.hits() <= 256);
    drop(s);
    others_are_served(&proxy).await;
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_oversized_header_list_is_431_and_the_connection_lives_on() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("max_request_header_bytes = 16384", &up).await;
    let mut s = h2_connect(proxy.addr).await;
    let mut out = Vec::new();
    let big = "x".repeat(20_000);
    headers(&mut out, 1, &get_block("/", &[("x-big", &big)]));
    s.write_all(&out).await.unwrap();
    let frames = read_frames(&mut s, Duration::from_secs(5), |f| {
        f.2 == 1 && f.0 == HEADERS
    })
    .await;
    let resp = frames
        .iter()
        .find(|f| f.2 == 1 && f.0 == HEADERS)
        .expect("a response on stream 1");
    // `:status: 431`: literal with incremental indexing of name 8 (0x48),
    // Huffman-coded value of 3 bytes (0x83): "431" = 011010 011001 00001 + EOS padding.
    assert_eq!(resp.3, [0x48, 0x83, 0x69, 0x90, 0xff], "{:x?}", resp.3);
    assert!(resp.1 & END_STREAM != 0);
    // The connection still serves a normal request.
    let mut out = Vec::new();
    headers(&mut out, 3, &get_block("/", &[]));
    s.write_all(&out).await.unwrap();
    let frames = read_frames(&mut s, Duration::from_secs(5), |f| {
        f.2 == 3 && f.0 == DATA && f.1 & END_STREAM != 0
    })
    .await;
    let head = frames
        .iter()
        .find(|f| f.2 == 3 && f.0 == HEADERS)
        .expect("a response on stream 3");
    assert_eq!(head.3.first(), Some(&0x88), ":status 200");
    assert_eq!(up.hits(), 1);
    drop(s);
    assert!(proxy.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_settings_and_ping_floods_do_not_take_the_proxy_down() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let s = h2_connect(proxy.addr).await;
    let mut out = Vec::new();
    for i in 0..50_000u64 {
        frame(&mut out, PING, 0, 0, &i.to_be_bytes());
        if i % 5 == 0 {
            frame(&mut out, SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]); // MAX_CONCURRENT_STREAMS
        }
    }
    const MARK: [u8; 8] = *b"lastping";
    frame(&mut out, PING, 0, 0, &MARK);
    // Write without reading any answer: the server must push back (stop
    // reading) rather than queue 50 000 PING ACKs; others are served meanwhile.
    let writer = tokio::spawn(async move {
        let mut s = s;
        let _ = tokio::time::timeout(Duration::from_secs(10), s.write_all(&out)).await;
        s
    });
    others_are_served(&proxy).await;
    let mut s = writer.await.unwrap();
    // Reading now, every PING is answered, in order, up to the last one.
    let frames = read_frames(&mut s, Duration::from_secs(10), |f| {
        f.0 == GOAWAY || f.3 == MARK
    })
    .await;
    let acks: Vec<&Vec<u8>> = frames
        .iter()
        .filter(|f| f.0 == PING && f.1 & ACK != 0)
        .map(|f| &f.3)
        .collect();
    assert_eq!(
        acks.last().map(|p| p.as_slice()),
        Some(&MARK[..]),
        "{} frames",
        frames.len()
    );
    assert_eq!(acks.len(), 50_001);
    assert!(acks
        .iter()
        .take(50_000)
        .enumerate()
        .all(|(i, p)| p.as_slice() == (i as u64).to_be_bytes()));
    drop(s);
    others_are_served(&proxy).await;
    assert!(proxy.shutdown().await);
}

// ===== The admin API =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_bodies_are_capped_and_unknown_fields_refused() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;
    let big = format!(
        "{{\"to\":\"green\",\"reason\":\"{}\"}}",
        "x".repeat(1 << 20)
    );
    let (s, v) = proxy.admin.post("/api/v1/services/web/switch", &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{v}");
    assert_eq!(v["error"]["code"], "body_too_large");

    // The same without a Content-Length (chunked): cut at 1 MiB too.
    let mut c = TcpStream::connect(proxy.running.as_ref().unwrap().admin_addr)
        .await
        .unwrap();
    c.write_all(b"POST /api/v1/services/web/switch HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").await.unwrap();
    let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
    // 32 × 64 KiB = 2 MiB; the server may stop reading (and close) early.
    for _ in 0..32 {
        if c.write_all(chunk.as_bytes()).await.is_err() {
            break;
        }
    }
    let a = read_to_close(&mut c, Duration::from_secs(5)).await;
    assert_eq!(a.status(), 413, "{a:?}");

    for (path, body, field) in [
        (
            "/api/v1/services/web/switch",
            r#"{"to":"green","colour":"blue"}"#,
            "colour",
        ),
        (
            "/api/v1/services/web/split",
            r#"{"green":10,"Green":20}"#,
            "Green",
        ),
        (
            "/api/v1/services/web/rollback",
            r#"{"generation":1}"#,
            "generation",
        ),
    ] {
        let (s, v) = proxy.admin.post(path, body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
        assert_eq!(v["error"]["code"], "unknown_field", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{v}"
        );
    }
    let (s, v) = proxy
        .admin
        .put(
            "/api/v1/services/web/pools/green",
            r#"{"backends":[],"extra":true}"#,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unknown_field")),
        "{v}"
    );
    // Nothing changed.
    assert_eq!(proxy.admin.service("web").await["generation"], 1);
    assert!(proxy.shutdown().await);
}

#[test]
fn a_public_admin_listener_without_a_token_file_refuses_to_start() {
    let dir = TempDir::new("admin-public");
    let svc = Svc::addrs(
        "web",
        &["127.0.0.1:9".parse().unwrap()],
        &["127.0.0.1:9".parse().unwrap()],
    );
    let text = config_text(dir.path(), "", &[svc]).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"",
    );
    let config = dir.join("public.toml");
    std::fs::write(&config, &text).unwrap();
    let (code, _, err) = run_binary(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("public.toml:") && err.contains("not loopback: set admin.token_file"),
        "{err}"
    );
    let refused = ProxyProcess::spawn(&config, &[])
        .err()
        .expect("refused to start");
    assert!(refused.contains("not loopback"), "{refused}");

    // With a token file it is allowed.
    let token = dir.join("admin.token");
    std::fs::write(&token, "ci:0123456789abcdef\n").unwrap();
    let text = text.replace(
        "listen = \"0.0.0.0:0\"",
        &format!(
            "listen = \"0.0.0.0:0\"\ntoken_file = \"{}\"",
            token.display()
        ),
    );
    std::fs::write(&config, &text).unwrap();
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// SO_REUSEPORT (one listener per worker) would let a second process bind
/// the same port and silently take half the connections. A second
/// switchyard on a port in use must refuse to start, naming the address,
/// and the first must go on serving.
#[test]
fn a_second_instance_on_the_same_port_refuses_to_start() {
    let blue = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = blue.local_addr().unwrap();
    let mk = |tag: &str, listen: &str| {
        let dir = TempDir::new(tag);
        let text = config_text(
            dir.path(),
            "workers = 2",
            &[Svc::addrs("web", &[backend], &[backend])],
        )
        .replace(
            "listen = \"127.0.0.1:0\"\nworkers",
            &format!("listen = \"{listen}\"\nworkers"),
        );
        let config = dir.join("switchyard.toml");
        std::fs::write(&config, text).unwrap();
        (dir, config)
    };
    let (_d1, first_config) = mk("first", "127.0.0.1:0");
    let mut first = ProxyProcess::spawn(&first_config, &[]).expect("first starts");
    let (_d2, second_config) = mk("second", &first.proxy.to_string());
    let refused = ProxyProcess::spawn(&second_config, &[])
        .err()
        .expect("the second instance refuses to start");
    assert!(
        refused.contains(&first.proxy.to_string()) && refused.contains("in use"),
        "{refused}"
    );
    // The first still accepts on its port.
    assert!(std::net::TcpStream::connect(first.proxy).is_ok());
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(10)), Some(0));
}

/// One keep-alive GET on `s`; the answer's status and body.
async fn keep_alive_get(s: &mut TcpStream) -> (u16, String) {
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                return (status, body);
            }
        }
        assert!(Instant::now() < deadline, "no whole answer: {buf:?}");
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(n > 0, "closed before the answer was whole");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// With two workers, a worker that serves more connections than the other
/// hands new ones over (SO_REUSEPORT alone spreads them blind to load):
/// the socket leaves its IO driver for the other worker's. Keep-alive
/// connections opened one after another until `switchyard_connections_moved_total`
/// says one was handed over (at least 16) all answer, then all answer
/// again once every one of them is open: a handed-over socket serves on
/// its new worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_handed_between_workers_keep_serving() {
    let up = Upstream::start("up").await;
    let dir = TempDir::new("balance");
    let text = config_text(
        dir.path(),
        "workers = 2",
        &[Svc::addrs("web", &[up.addr], &[up.addr])],
    );
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, text).unwrap();
    let mut proxy = ProxyProcess::spawn(&config, &[]).expect("the proxy starts");
    let admin = Admin::new(proxy.admin);
    let moved = || async { metric(&admin.metrics().await, "switchyard_connections_moved_total") };
    assert_eq!(moved().await, Some(0.0), "the counter exists at 0");
    // Open connections (each answering once) until the balance has moved
    // some: the kernel's hash makes that certain long before 256.
    let mut conns = Vec::new();
    while conns.len() < 16 || (moved().await == Some(0.0) && conns.len() < 256) {
        let mut s = TcpStream::connect(proxy.proxy).await.unwrap();
        let (status, body) = keep_alive_get(&mut s).await;
        assert_eq!((status, body.as_str()), (200, "up"));
        conns.push(s);
    }
    let n = moved().await.unwrap_or(0.0);
    assert!(
        n >= 1.0,
        "no connection was moved in {} accepts",
        conns.len()
    );
    // Every connection, moved or not, keeps serving.
    for s in &mut conns {
        let (status, body) = keep_alive_get(s).await;
        assert_eq!((status, body.as_str()), (200, "up"));
    }
    drop(conns);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(0));
}

/// The proxy reads a connection's first bytes to tell HTTP/2 prior
/// knowledge from HTTP/1, and serves those bytes to the protocol it picked
/// (no second read). First bytes that come in pieces, and an HTTP/1
/// request whose first byte is also the preface's (`P`OST), still reach
/// the right protocol with nothing lost. (The pause between the pieces
/// only makes it likely that the proxy reads them apart; the answers are
/// the same either way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_in_pieces_reach_the_right_protocol_whole() {
    let up = Upstream::start("up").await;
    let proxy = proxy_for("", &up).await;

    // HTTP/1: "P", then the rest of a POST with a body.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    s.write_all(b"OST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")
        .await
        .unwrap();
    let a = read_to_close(&mut s, Duration::from_secs(5)).await;
    assert_eq!(a.status(), 200, "{}", a.text);
    assert!(a.text.ends_with("up"), "{}", a.text);

    // HTTP/2 prior knowledge: the preface in two pieces, then a GET.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&PREFACE[..5]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut out = PREFACE[5..].to_vec();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    frame(&mut out, SETTINGS, ACK, 0, &[]);
    headers(&mut out, 1, &get_block("/", &[]));
    s.write_all(&out).await.unwrap();
    let frames = read_frames(&mut s, Duration::from_secs(5), |f| {
        f.2 == 1 && f.1 & END_STREAM != 0
    })
    .await;
    let head = frames
        .iter()
        .find(|f| f.0 == HEADERS && f.2 == 1)
        .unwrap_or_else(|| panic!("no response head on stream 1: {frames:?}"));
    // `:status: 200` is HPACK static entry 8: the indexed byte 0x88.
    assert_eq!(head.3.first(), Some(&0x88), "{frames:?}");
    let body: Vec<u8> = frames
        .iter()
        .filter(|f| f.0 == DATA && f.2 == 1)
        .flat_map(|f| f.3.clone())
        .collect();
    assert_eq!(body, b"up");
    assert_eq!(up.hits(), 2);
}
