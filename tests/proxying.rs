//! Proxying done right (SPEC §3, §5, §6): h2c, hop-by-hop headers both ways,
//! forwarding headers, request ids, pool headers, the proxy's own errors,
//! streaming bodies (and a 1 GiB upload through the real binary with bounded
//! memory), metrics, and routing by host and path prefix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn header<'h>(h: &'h HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The request head the upstream saw (its `/headers` answer).
async fn upstream_view(proxy: &TestProxy, headers: &[(&str, &str)]) -> (HeaderMap, Value) {
    let (s, h, body) = proxy.get_with("/headers", headers).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    (h, serde_json::from_str(&body).unwrap())
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    // Outside the range `bind(0)` draws from: no later listener of this
    // test takes it.
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A minimal HTTP/1.1 server answering every request head with `response`
/// (for response headers the harness upstream cannot send).
async fn raw_upstream(response: &'static [u8]) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    let n = match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&tmp[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends raw bytes, returns what the proxy answered until it closed (or 5 s).
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

// ===== HTTP/2 cleartext =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_clients_are_served() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let h2 = h2_client();

    let resp = h2
        .request(Request::get(proxy.url("/headers")).body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(resp.headers(), "x-switchyard-pool"), "blue");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    // The backend speaks HTTP/1.1 and gets a Host from :authority.
    assert_eq!(v["version"], "HTTP/1.1", "{v}");
    assert_eq!(v["headers"]["host"], proxy.addr.to_string(), "{v}");
    assert_eq!(
        v["headers"]["x-forwarded-host"],
        proxy.addr.to_string(),
        "{v}"
    );

    // Many concurrent streams on the one connection; a body both ways.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let (h2, url) = (h2.clone(), proxy.url("/echo"));
        tasks.push(tokio::spawn(async move {
            let body = format!("stream {i} ").repeat(1000);
            let resp = h2
                .request(Request::post(url).body(full(body.clone())).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let got = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(got, body.as_bytes());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // After a switch the same h2 connection reaches green.
    proxy
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let (s, h, body) = get(&h2, &proxy.url("/"), &[]).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "green"));
    assert_eq!(header(&h, "x-switchyard-pool"), "green");
}

// ===== Headers =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let raw = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Resp-Secret, keep-alive\r\n\
          Keep-Alive: timeout=5\r\nX-Resp-Secret: 1\r\nProxy-Connection: keep-alive\r\n\
          X-Resp-Kept: 1\r\n\r\nok",
    )
    .await;
    let proxy = TestProxy::start(&[
        Svc::new("web", &[&blue], &[&green]),
        Svc::addrs("raw", &[raw], &[raw]).prefix("/raw"),
    ])
    .await;

    // Request: Connection and every header it names, plus the fixed set.
    let (_, v) = upstream_view(
        &proxy,
        &[
            ("connection", "X-Secret, keep-alive"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ],
    )
    .await;
    let h = &v["headers"];
    for gone in ["connection", "x-secret", "keep-alive", "proxy-connection"] {
        assert!(h.get(gone).is_none(), "{gone} reached the backend: {v}");
    }
    assert_eq!(h["x-kept"], "1", "{v}");

    // Response: the same, from the backend to the client.
    for client in [http1_client(), h2_client()] {
        let (s, h, body) = get(&client, &proxy.url("/raw"), &[]).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "ok"));
        for gone in [
            "connection",
            "x-resp-secret",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(h.get(gone).is_none(), "{gone} reached the client: {h:?}");
        }
        assert_eq!(header(&h, "x-resp-kept"), "1");
    }
}

/// The leanest set-up (`request_id`, `forwarded_headers`, `add_pool_header`
/// off, `[service.sticky] cookie = ""`): nothing is added but the backend's
/// pool header, a client's own headers pass untouched, and a split still
/// splits, without a Set-Cookie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extras_can_be_switched_off() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start_with(
        "request_id = false\nforwarded_headers = false\nadd_pool_header = false",
        &[Svc::new("web", &[&blue], &[&green]).extra("[service.sticky]\ncookie = \"\"\n")],
    )
    .await;
    let (h, v) = upstream_view(&proxy, &[("x-switchyard-pool", "green")]).await;
    assert_eq!(
        (blue.hits(), green.hits()),
        (0, 1),
        "the preview header still decides"
    );
    let up = v["headers"].as_object().unwrap();
    for name in [
        "x-request-id",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ] {
        assert!(!up.contains_key(name), "{name} sent upstream: {v}");
    }
    assert_eq!(
        up["x-switchyard-pool"], "green",
        "the backend is told its pool"
    );
    for name in ["x-request-id", "x-switchyard-pool", "set-cookie"] {
        assert!(h.get(name).is_none(), "{name} in the response: {h:?}");
    }
    let (_, v) = upstream_view(&proxy, &[("x-request-id", "client-id-1")]).await;
    assert_eq!(
        v["headers"]["x-request-id"], "client-id-1",
        "passed as sent"
    );

    proxy
        .admin
        .ok("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    let before = green.hits();
    for _ in 0..200 {
        let (s, h, _) = proxy.get_with("/", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(h.get("set-cookie").is_none(), "no bucket cookie: {h:?}");
    }
    let greens = green.hits() - before;
    assert!(
        (40..=160).contains(&greens),
        "a fresh bucket per request: {greens} of 200 to green"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_request_ids_and_pool_headers() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;

    let (h, v) = upstream_view(&proxy, &[("host", "shop.example:8080")]).await;
    let up = &v["headers"];
    assert_eq!(up["host"], "shop.example:8080", "{v}");
    assert_eq!(up["x-forwarded-host"], "shop.example:8080", "{v}");
    assert_eq!(up["x-forwarded-proto"], "http", "{v}");
    assert_eq!(up["x-forwarded-for"], "127.0.0.1", "{v}");
    assert_eq!(up["x-switchyard-pool"], "blue", "{v}");
    assert_eq!(header(&h, "x-switchyard-pool"), "blue");
    // A generated request id: the backend and the client see the same one.
    let id = up["x-request-id"].as_str().unwrap();
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert_eq!(header(&h, "x-request-id"), id);
    let (h2, v2) = upstream_view(&proxy, &[]).await;
    assert_ne!(
        v2["headers"]["x-request-id"], id,
        "ids are fresh per request"
    );
    assert_eq!(
        header(&h2, "x-request-id"),
        v2["headers"]["x-request-id"].as_str().unwrap()
    );

    // A client's id is kept; an earlier X-Forwarded-For is appended to.
    let (h, v) = upstream_view(
        &proxy,
        &[
            ("x-request-id", "req-abc-123"),
            ("x-forwarded-for", "203.0.113.7"),
        ],
    )
    .await;
    assert_eq!(v["headers"]["x-request-id"], "req-abc-123");
    assert_eq!(header(&h, "x-request-id"), "req-abc-123");
    assert_eq!(v["headers"]["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    // Several X-Forwarded-For lines are one list: none is lost.
    let (_, v) = upstream_view(
        &proxy,
        &[
            ("x-forwarded-for", "203.0.113.7, 10.0.0.1"),
            ("x-forwarded-for", "198.51.100.2"),
        ],
    )
    .await;
    assert_eq!(
        v["headers"]["x-forwarded-for"],
        "203.0.113.7, 10.0.0.1, 198.51.100.2, 127.0.0.1"
    );
    // The id is echoed on plain answers too, not just /headers.
    let (_, h, _) = proxy.get_with("/", &[("x-request-id", "plain-1")]).await;
    assert_eq!(header(&h, "x-request-id"), "plain-1");
    // An unusable id (too long) is replaced.
    let long = "x".repeat(200);
    let (h, v) = upstream_view(&proxy, &[("x-request-id", &long)]).await;
    let got = v["headers"]["x-request-id"].as_str().unwrap();
    assert_eq!(got.len(), 32, "{got}");
    assert_eq!(header(&h, "x-request-id"), got);

    // An absolute-form target reaches the backend in origin form.
    let out = raw_exchange(
        proxy.addr,
        b"GET http://shop.example/headers?q=1 HTTP/1.1\r\nHost: shop.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#""uri":"/headers?q=1""#), "{out}");
    assert!(
        out.contains(r#""x-forwarded-host":"shop.example""#),
        "{out}"
    );

    // The backend is told its pool, whatever the client claimed.
    let (_, v) = upstream_view(&proxy, &[("x-switchyard-pool", "purple")]).await;
    assert_eq!(v["headers"]["x-switchyard-pool"], "blue");
    proxy
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let (h, v) = upstream_view(&proxy, &[]).await;
    assert_eq!(v["headers"]["x-switchyard-pool"], "green");
    assert_eq!(header(&h, "x-switchyard-pool"), "green");
    assert_eq!(header(&h, "x-upstream"), "green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_response_header_can_be_turned_off() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start_with(
        "add_pool_header = false",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let (s, h, body) = proxy.get("/headers").await;
    assert_eq!(s, StatusCode::OK);
    assert!(h.get("x-switchyard-pool").is_none(), "{h:?}");
    // The backend is still told.
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["x-switchyard-pool"], "blue");
}

// ===== The proxy's own errors (SPEC §6) =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_its_own_errors_per_spec() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (sick_b, sick_g) = (
        Upstream::start("sick-b").await,
        Upstream::start("sick-g").await,
    );
    sick_b.set_healthy(false);
    sick_g.set_healthy(false);
    let dead = closed_port();
    let proxy = TestProxy::start_with(
        "request_timeout = \"500ms\"\nmax_request_header_bytes = 4096",
        &[
            Svc::new("web", &[&blue], &[&green]).hosts(r#"["web.test"]"#),
            Svc::addrs("dead", &[dead], &[dead]).hosts(r#"["dead.test"]"#),
            Svc::new("sick", &[&sick_b], &[&sick_g])
                .hosts(r#"["sick.test"]"#)
                .extra("[service.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_after = 1\nhealthy_after = 1"),
        ],
    )
    .await;

    // 404: no service for this host.
    let (s, h, body) = proxy.get_with("/", &[("host", "other.test")]).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("no service"), "{body}");
    assert!(h.get("x-request-id").is_some());
    // 502: the backend refused the connection (after trying each backend).
    let (s, h, body) = proxy.get_with("/", &[("host", "dead.test")]).await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("refused"), "{body}");
    assert!(
        ["blue", "green"].contains(&header(&h, "x-switchyard-pool")),
        "{h:?}"
    );
    // 503: no healthy backend in either pool.
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.get_with("/", &[("host", "sick.test")]).await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await
    );
    // Requests sent before the first health check ran may have reached a
    // sick backend; from here on none may.
    let before = (sick_b.hits(), sick_g.hits());
    let (s, _, body) = proxy.get_with("/", &[("host", "sick.test")]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no healthy backend"), "{body}");
    assert_eq!((sick_b.hits(), sick_g.hits()), before);
    // 504: no response head within request_timeout.
    let (s, _, body) = proxy.get_with("/sleep/3000", &[("host", "web.test")]).await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert!(body.contains("timed out"), "{body}");
    // Still serving.
    let (s, _, body) = proxy.get_with("/", &[("host", "web.test")]).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));

    // 400: HTTP/1.1 without Host.
    let out = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("Host"), "{out}");
    // 400: two Host headers.
    let out = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: web.test\r\nHost: dead.test\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // 431: header section above max_request_header_bytes.
    let big = format!(
        "GET / HTTP/1.1\r\nHost: web.test\r\nX-Big: {}\r\n\r\n",
        "b".repeat(8192)
    );
    let out = raw_exchange(proxy.addr, big.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    assert_eq!(blue.hits(), 2, "only the good requests reached web");

    let m = proxy.admin.metrics().await;
    let connect_errors: f64 = ["blue", "green"]
        .iter()
        .map(|pool| {
            metric_with(
                &m,
                "switchyard_upstream_errors_total",
                &[("service", "dead"), ("pool", pool), ("kind", "connect")],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert!(connect_errors >= 1.0, "{connect_errors}");
    let timeouts = metric_with(
        &m,
        "switchyard_upstream_errors_total",
        &[("service", "web"), ("pool", "blue"), ("kind", "timeout")],
    );
    assert_eq!(timeouts, Some(1.0));
    assert_eq!(
        metric_with(
            &m,
            "switchyard_requests_total",
            &[("service", "web"), ("pool", "blue"), ("code", "5xx")]
        ),
        Some(1.0)
    );
}

// ===== Bodies =====

/// A request body fed by the test, chunk by chunk.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, Body) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, hyper::Error>(Frame::data(b))))
    });
    (tx, StreamBody::new(stream).boxed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_through() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let client = http1_client();

    // Full duplex: the echo of the first chunk arrives before the second
    // chunk is sent, so nothing is buffered whole on the way.
    let (tx, body) = channel_body();
    let resp = tokio::spawn({
        let client = client.clone();
        let url = proxy.url("/echo");
        async move {
            client
                .request(Request::post(url).body(body).unwrap())
                .await
                .unwrap()
        }
    });
    tx.send(Bytes::from_static(b"first chunk|")).await.unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("response head before the request body ended")
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    for chunk in [&b"second chunk|"[..], b"third chunk"] {
        while got.len() < b"first chunk|".len() {
            let f = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("echo of the first chunk while the request is still open")
                .unwrap()
                .unwrap();
            got.extend_from_slice(f.data_ref().unwrap());
        }
        tx.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    got.extend_from_slice(&rest);
    assert_eq!(got, b"first chunk|second chunk|third chunk");

    // A large body, byte for byte (not one repeated byte, so order counts).
    let big: Vec<u8> = (0..24u32 << 20).map(|i| (i % 251) as u8).collect();
    let big = Bytes::from(big);
    let chunks: Vec<Bytes> = big.chunks(1 << 20).map(Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|c| Ok::<_, hyper::Error>(Frame::data(c))),
    );
    let resp = client
        .request(
            Request::post(proxy.url("/echo"))
                .body(StreamBody::new(stream).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let echoed = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(echoed == big, "echo differs ({} bytes back)", echoed.len());
    // And a large response body.
    let (s, _, body) = proxy.get("/bytes/5000000").await;
    assert_eq!((s, body.len()), (StatusCode::OK, 5_000_000));
}

/// `VmHWM` (peak resident set) of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_through_the_binary_keeps_memory_bounded() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let dir = TempDir::new("upload");
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]),
    )
    .unwrap();
    let proc = tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, &[]))
        .await
        .unwrap()
        .unwrap();
    let client = http1_client();
    let url = format!("http://{}/count", proc.proxy);
    // Warm up (connections, buffers) so the baseline is a running proxy.
    let resp = client
        .request(Request::post(&url).body(full(vec![0u8; 1 << 20])).unwrap())
        .await
        .unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "1048576"
    );
    let before = peak_rss(proc.child.id());

    const GIB: u64 = 1 << 30;
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    let stream = futures_util::stream::iter(
        (0..GIB >> 20).map(move |_| Ok::<_, hyper::Error>(Frame::data(chunk.clone()))),
    );
    let req = Request::post(&url)
        .header("content-length", GIB.to_string())
        .body(StreamBody::new(stream).boxed())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(120), async {
        let resp = client.request(req).await.unwrap();
        let status = resp.status();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("1 GiB upload finished within 120 s");
    assert_eq!(resp.0, StatusCode::OK);
    assert_eq!(resp.1, GIB.to_string(), "the backend received every byte");

    let after = peak_rss(proc.child.id());
    eprintln!(
        "proxy peak RSS {} MiB before, {} MiB after the 1 GiB upload",
        before >> 20,
        after >> 20
    );
    let growth = after.saturating_sub(before);
    assert!(
        growth < 64 << 20,
        "proxy peak RSS grew by {} MiB (from {} MiB to {} MiB) for a 1 GiB upload",
        growth >> 20,
        before >> 20,
        after >> 20
    );
}

// ===== Metrics =====

/// A sample of `name` whose labels include all of `labels`, in any order.
fn metric_with(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let s = parse_sample(l).ok()?;
        let all = labels
            .iter()
            .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v));
        (s.name == name && all).then_some(s.value)
    })
}

struct ParsedSample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Parses one sample line of the Prometheus text format (0.0.4).
fn parse_sample(line: &str) -> Result<ParsedSample, String> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return Err(format!("no value: {line}")),
    };
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = Vec::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let eq = r.find('=').ok_or(format!("label without = in {line}"))?;
            let key = &r[..eq];
            if !valid_name(key) || key.contains(':') {
                return Err(format!("bad label name {key:?} in {line}"));
            }
            r = r[eq + 1..]
                .strip_prefix('"')
                .ok_or(format!("unquoted label value in {line}"))?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        _ => return Err(format!("bad escape in {line}")),
                    },
                    Some((i, '"')) => break i,
                    Some((_, '\n')) => return Err(format!("newline in label in {line}")),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("unterminated label value in {line}")),
                }
            };
            labels.push((key.to_string(), value));
            r = &r[end + 1..];
            r = r.strip_prefix(',').unwrap_or(r);
        }
    } else {
        rest
    };
    let mut parts = rest.trim_start_matches(' ').split(' ');
    let value = parts.next().ok_or(format!("no value: {line}"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v
            .parse()
            .map_err(|_| format!("bad value {v:?} in {line}"))?,
    };
    if let Some(ts) = parts.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp in {line}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("trailing text in {line}"));
    }
    Ok(ParsedSample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// A histogram series: its family and its labels without `le`.
type Series = (String, Vec<(String, String)>);

/// Checks a whole exposition; returns the TYPE of every family.
fn check_exposition(text: &str) -> HashMap<String, String> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped = HashSet::new();
    // Per histogram series: its buckets as (le, count), and its _count.
    let mut buckets: HashMap<Series, Vec<(f64, f64)>> = HashMap::new();
    let mut counts: HashMap<Series, f64> = HashMap::new();
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP: {line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let (name, ty) = (p.next().unwrap(), p.next().unwrap_or(""));
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), ty.to_string()).is_none(),
                "second TYPE: {line}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unexpected comment: {line}");
        let s = parse_sample(line).unwrap_or_else(|e| panic!("invalid sample: {e}"));
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| {
                s.name
                    .strip_suffix(suf)
                    .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&s.name)
            .to_string();
        let ty = types
            .get(&family)
            .unwrap_or_else(|| panic!("sample before its TYPE line: {line}"));
        if ty == "counter" || s.name.ends_with("_count") || s.name.ends_with("_bucket") {
            assert!(s.value >= 0.0, "negative counter: {line}");
        }
        if ty == "histogram" {
            let mut labels = s.labels.clone();
            let le = labels.iter().position(|(k, _)| k == "le");
            if s.name.ends_with("_bucket") {
                let (_, le) =
                    labels.remove(le.unwrap_or_else(|| panic!("bucket without le: {line}")));
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                buckets
                    .entry((family, labels))
                    .or_default()
                    .push((le, s.value));
            } else if s.name.ends_with("_count") {
                counts.insert((family, labels), s.value);
            }
        }
    }
    for (series, bs) in &buckets {
        for w in bs.windows(2) {
            assert!(w[0].0 < w[1].0, "{series:?}: le not increasing");
            assert!(w[0].1 <= w[1].1, "{series:?}: buckets not cumulative");
        }
        let last = bs.last().unwrap();
        assert!(last.0.is_infinite(), "{series:?}: no +Inf bucket");
        assert_eq!(
            Some(&last.1),
            counts.get(series),
            "{series:?}: +Inf bucket != _count"
        );
    }
    types
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_traffic_in_valid_text_format() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (fo_b, fo_g) = (Upstream::start("fo-b").await, Upstream::start("fo-g").await);
    let proxy = TestProxy::start(&[
        Svc::new("web", &[&blue], &[&green]).hosts(r#"["web.test"]"#),
        Svc::new("fo", &[&fo_b], &[&fo_g])
            .hosts(r#"["fo.test"]"#)
            .extra("[service.health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nunhealthy_after = 1\nhealthy_after = 1"),
    ])
    .await;
    let admin = &proxy.admin;
    let web = |pool: &'static str, code: &'static str| {
        [("service", "web"), ("pool", pool), ("code", code)]
    };
    let m0 = admin.metrics().await;
    let req = |m: &str, pool, code| {
        metric_with(m, "switchyard_requests_total", &web(pool, code)).unwrap_or(0.0)
    };
    let web_host = [("host", "web.test")];

    for _ in 0..10 {
        assert_eq!(proxy.get_with("/", &web_host).await.0, StatusCode::OK);
    }
    assert_eq!(
        proxy.get_with("/status/404", &web_host).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        proxy.get_with("/status/503", &web_host).await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        proxy.get_with("/", &[("host", "nobody.test")]).await.0,
        StatusCode::NOT_FOUND
    );
    admin
        .ok("/api/v1/services/web/split", r#"{"green":30}"#)
        .await;
    let mut greens = 0.0;
    for _ in 0..40 {
        let (_, h, _) = proxy.get_with("/", &web_host).await;
        greens += f64::from(u8::from(header(&h, "x-switchyard-pool") == "green"));
    }
    // Failover: fo's green is unhealthy; a forced split sends its share to blue.
    fo_g.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            admin.service("fo").await["pools"]["green"]["backends"][0]["healthy"] == false
        })
        .await
    );
    admin
        .ok("/api/v1/services/fo/split", r#"{"green":100,"force":true}"#)
        .await;
    for _ in 0..5 {
        let (s, _, body) = proxy.get_with("/", &[("host", "fo.test")]).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "fo-b"));
    }

    // The content type, and a valid exposition.
    let resp = admin
        .client
        .request(
            Request::get(format!("{}/metrics", admin.base))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        header(resp.headers(), "content-type").starts_with("text/plain; version=0.0.4"),
        "{:?}",
        resp.headers()
    );
    let m = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    let types = check_exposition(&m);
    for (name, ty) in [
        ("switchyard_requests_total", "counter"),
        ("switchyard_request_duration_seconds", "histogram"),
        ("switchyard_upstream_errors_total", "counter"),
        ("switchyard_backend_healthy", "gauge"),
        ("switchyard_pool_weight", "gauge"),
        ("switchyard_routing_changes_total", "counter"),
        ("switchyard_failovers_total", "counter"),
        ("switchyard_open_connections", "gauge"),
        ("switchyard_config_reloads_total", "counter"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(ty), "{name}");
    }

    // The numbers moved with the traffic.
    let blue_2xx = req(&m, "blue", "2xx") - req(&m0, "blue", "2xx");
    let green_2xx = req(&m, "green", "2xx") - req(&m0, "green", "2xx");
    assert_eq!(blue_2xx + green_2xx, 50.0);
    assert_eq!(green_2xx, greens);
    assert_eq!(req(&m, "blue", "4xx") - req(&m0, "blue", "4xx"), 1.0);
    assert_eq!(req(&m, "blue", "5xx") - req(&m0, "blue", "5xx"), 1.0);
    assert_eq!(
        metric_with(
            &m,
            "switchyard_requests_total",
            &[("service", ""), ("code", "4xx")]
        ),
        Some(1.0),
        "the unmatched request"
    );
    let count = |pool| {
        metric_with(
            &m,
            "switchyard_request_duration_seconds_count",
            &[("service", "web"), ("pool", pool)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("blue") + count("green"), 52.0);
    assert_eq!(
        metric_with(
            &m,
            "switchyard_pool_weight",
            &[("service", "web"), ("pool", "green")]
        ),
        Some(30.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_pool_weight",
            &[("service", "web"), ("pool", "blue")]
        ),
        Some(70.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_routing_changes_total",
            &[("service", "web"), ("action", "split")]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_backend_healthy",
            &[
                ("service", "web"),
                ("pool", "blue"),
                ("backend", &blue.addr.to_string())
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_backend_healthy",
            &[
                ("service", "fo"),
                ("pool", "green"),
                ("backend", &fo_g.addr.to_string())
            ]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_failovers_total",
            &[("service", "fo"), ("from", "green")]
        ),
        Some(5.0)
    );
    assert!(
        metric_with(&m, "switchyard_open_connections", &[("listener", "http")]).unwrap_or(0.0)
            >= 1.0
    );
    assert!(metric_with(&m, "switchyard_config_reloads_total", &[("result", "ok")]).is_some());
}

// ===== Routing =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_matched_by_host_then_longest_prefix() {
    let names = ["exact", "exact-v2", "wild", "wild-deep", "any-static", "g"];
    let mut ups = HashMap::new();
    for n in names {
        ups.insert(n, Upstream::start(n).await);
    }
    let g = &ups["g"];
    let proxy = TestProxy::start(&[
        Svc::new("exact", &[&ups["exact"]], &[g]).hosts(r#"["api.example.com"]"#),
        Svc::new("exact-v2", &[&ups["exact-v2"]], &[g])
            .hosts(r#"["api.example.com"]"#)
            .prefix("/v2"),
        Svc::new("wild", &[&ups["wild"]], &[g]).hosts(r#"["*.example.com"]"#),
        Svc::new("wild-deep", &[&ups["wild-deep"]], &[g])
            .hosts(r#"["*.deep.example.com"]"#)
            .prefix("/"),
        Svc::new("any-static", &[&ups["any-static"]], &[g])
            .hosts(r#"["*"]"#)
            .prefix("/static/"),
    ])
    .await;
    let cases = [
        ("api.example.com", "/", Some("exact")),
        ("api.example.com", "/v1/users", Some("exact")),
        ("api.example.com", "/v2", Some("exact-v2")),
        ("api.example.com", "/v2/users?x=1", Some("exact-v2")),
        ("api.example.com", "/v2x", Some("exact")),
        ("API.Example.COM:8443", "/v2/a", Some("exact-v2")),
        ("api.example.com.", "/v2/a", Some("exact-v2")),
        // An exact host beats a longer prefix on `*`.
        ("api.example.com", "/static/app.js", Some("exact")),
        ("www.example.com", "/", Some("wild")),
        ("a.b.example.com", "/v2", Some("wild")),
        ("x.deep.example.com", "/", Some("wild-deep")),
        ("www.example.com", "/static/app.js", Some("wild")),
        ("example.com", "/static/app.js", Some("any-static")),
        ("other.org", "/static/", Some("any-static")),
        // No match at all: 404.
        ("example.com", "/", None),
        ("other.org", "/", None),
        ("other.org", "/static", None),
        ("notexample.com", "/", None),
    ];
    for (host, path, want) in cases {
        let (s, h, body) = proxy.get_with(path, &[("host", host)]).await;
        match want {
            Some(name) => {
                assert_eq!(
                    (s, header(&h, "x-upstream")),
                    (StatusCode::OK, name),
                    "{host}{path}: {body}"
                );
            }
            None => {
                assert_eq!(s, StatusCode::NOT_FOUND, "{host}{path}: {body}");
                assert!(h.get("x-upstream").is_none());
            }
        }
    }
    // Over h2c the host comes from :authority (here 127.0.0.1:PORT).
    let h2 = h2_client();
    let (s, h, _) = get(&h2, &proxy.url("/static/x"), &[]).await;
    assert_eq!(
        (s, header(&h, "x-upstream")),
        (StatusCode::OK, "any-static")
    );
    let (s, _, _) = get(&h2, &proxy.url("/"), &[]).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_custom_preview_header_and_its_token_stay_at_the_proxy() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])
        .extra("[service.preview]\nheader = \"x-canary\"\ntoken = \"t0ken-123\"")])
    .await;
    let (h, v) = upstream_view(&p, &[("x-canary", "green;token=t0ken-123")]).await;
    assert_eq!(header(&h, "x-upstream"), "green");
    assert_eq!(v["headers"].get("x-canary"), None, "{v}");
    assert_eq!(v["headers"]["x-switchyard-pool"], "green");
}
