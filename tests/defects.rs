//! Regression tests for issue 17 (items 1, 2, 3, 4, 8, 9 and the upstream
//! body read timeout): each misbehaving upstream or client is real, on a
//! loopback socket, and each test failed on the code before its fix.

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Generous bound for "this eventually happens" on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// An upstream that runs `script` on every accepted connection.
async fn raw_upstream<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(script(stream));
        }
    });
    addr
}

/// Reads a request head (up to the blank line).
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap_or(0) == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Sends `req` raw and reads until the proxy closes the connection:
/// (response head, body bytes). `None` if it did not close within PATIENCE.
async fn raw_exchange(addr: SocketAddr, req: &[u8]) -> Option<(String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(req).await.unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    Some((head, all[split..].to_vec()))
}

async fn metric_now(p: &TestProxy, name: &str) -> f64 {
    metric(&p.admin.metrics().await, name).unwrap_or(0.0)
}

async fn metric_reaches(p: &TestProxy, name: &str, want: f64) -> bool {
    eventually(PATIENCE, || async { metric_now(p, name).await == want }).await
}

// Item 1: without `[service.health]`, the gauge came back only through
// `set_health`, which nothing calls: it stayed 0 after the ejection ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_gauge_returns_when_a_passive_ejection_ends() {
    let g = Upstream::start("green").await;
    let good = Upstream::start("good").await;
    let bad = Upstream::start("bad").await;
    let p = TestProxy::start(&[Svc::new("web", &[&good, &bad], &[&g])]).await;
    let gauge = format!(
        "switchyard_backend_healthy{{backend=\"{}\",pool=\"blue\",service=\"web\"}}",
        bad.addr
    );
    assert_eq!(metric_now(&p, &gauge).await, 1.0);
    bad.set_failing(true);
    let mut ejected = false;
    for _ in 0..40 {
        p.get("/").await;
        if metric_now(&p, &gauge).await == 0.0 {
            ejected = true;
            break;
        }
    }
    assert!(ejected, "5 failures in a row eject the backend (gauge 0)");
    bad.set_failing(false);
    // The first ejection lasts 5 s; then the backend serves again and the
    // gauge must say so.
    assert!(
        metric_reaches(&p, &gauge, 1.0).await,
        "gauge stayed 0 after the ejection ended"
    );
    let (_, v) = p.admin.get("/api/v1/services/web").await;
    assert!(v.to_string().contains(&bad.addr.to_string()), "{v}");
}

// Item 2: a slow upload counted against `request_timeout`: 504 and a
// healthy backend blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upload_is_not_an_upstream_timeout() {
    let g = Upstream::start("green").await;
    let up = Upstream::start("counter").await;
    let p = TestProxy::start_with(
        "request_timeout = \"1s\"",
        &[Svc::new("web", &[&up], &[&g])],
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(
        b"POST /count HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    // Pacing, not synchronisation: the upload takes longer than
    // request_timeout, by the client's doing.
    for part in [b"a", b"b", b"c"] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        s.write_all(part).await.unwrap();
    }
    let mut resp = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut resp))
        .await
        .expect("response")
        .unwrap();
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("\r\n\r\n3"), "{text}");
    let timeouts =
        "switchyard_upstream_errors_total{kind=\"timeout\",pool=\"blue\",service=\"web\"}";
    assert_eq!(metric_now(&p, timeouts).await, 0.0);
}

// Item 2, the other side: a backend that takes longer than request_timeout
// after the upload ended still times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_after_the_upload_still_times_out() {
    let g = Upstream::start("green").await;
    let up = Upstream::start("sleepy").await;
    let p = TestProxy::start_with(
        "request_timeout = \"300ms\"",
        &[Svc::new("web", &[&up], &[&g])],
    )
    .await;
    let (head, _) = raw_exchange(
        p.addr,
        b"POST /sleep/3000 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\na",
    )
    .await
    .expect("answered");
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
}

// The timer bounding the wait for a response head belongs to the upstream
// connection and is re-armed for each exchange on it: moved forward after
// quick answers, set again after it fired while the connection sat idle in
// the pool. Either way it must bound the next exchange on that connection,
// and no earlier than `request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_upstream_connection_still_times_out_its_next_request() {
    let g = Upstream::start("green").await;
    let up = Upstream::start("sleepy").await;
    let p = TestProxy::start_with(
        "request_timeout = \"500ms\"",
        &[Svc::new("web", &[&up], &[&g])],
    )
    .await;
    // Quick answers: the timer is moved forward each time.
    for _ in 0..5 {
        assert_eq!(p.get("/").await.0, StatusCode::OK);
    }
    assert_eq!(up.open_connections(), 1, "one pooled connection");
    // Slower than the last quick answer, faster than the limit: not cut.
    assert_eq!(p.get("/sleep/100").await.0, StatusCode::OK);
    cut_at_the_limit(&p).await;

    // Again after the timer fired on the idle connection: the test's
    // subject is that time passes, so this waits.
    assert_eq!(p.get("/").await.0, StatusCode::OK);
    let pooled = up.open_connections();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(p.get("/sleep/100").await.0, StatusCode::OK);
    assert!(
        up.open_connections() <= pooled,
        "the pooled connection served it"
    );
    cut_at_the_limit(&p).await;
}

/// A 3 s answer is cut with a 504 at `request_timeout` (500 ms): not
/// before it, and not much after.
async fn cut_at_the_limit(p: &TestProxy) {
    let started = std::time::Instant::now();
    let (s, _, body) = p.get("/sleep/3000").await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{body}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(490) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

// Item 3: a body cut off mid-way counted as a 2xx success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_body_is_an_upstream_error_and_counts_towards_ejection() {
    let g = Upstream::start("green").await;
    let cut = raw_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            .await;
        // Dropped: the connection closes 90 bytes early.
    })
    .await;
    let good = Upstream::start("good").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[cut, good.addr], &[g.addr])]).await;
    let (head, body) = raw_exchange(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("the proxy closes the connection");
    // Either backend may have served this first request.
    if head.contains("content-length: 100") {
        assert!(body.len() < 100, "the client sees the cut");
    }
    let truncated =
        "switchyard_upstream_errors_total{kind=\"truncated\",pool=\"blue\",service=\"web\"}";
    for _ in 0..20 {
        raw_exchange(
            p.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if metric_now(
            &p,
            "switchyard_backend_ejections_total{pool=\"blue\",service=\"web\"}",
        )
        .await
            >= 1.0
        {
            break;
        }
    }
    assert!(metric_now(&p, truncated).await >= 5.0, "each cut counted");
    assert_eq!(
        metric_now(
            &p,
            "switchyard_backend_ejections_total{pool=\"blue\",service=\"web\"}"
        )
        .await,
        1.0,
        "5 cut bodies in a row eject the backend"
    );
    let gauge =
        format!("switchyard_backend_healthy{{backend=\"{cut}\",pool=\"blue\",service=\"web\"}}");
    assert_eq!(metric_now(&p, &gauge).await, 0.0);
}

// Item 4: requests the client abandoned were counted as code="1xx".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_count_as_499_not_1xx() {
    let g = Upstream::start("green").await;
    let up = Upstream::start("slow").await;
    let p = TestProxy::start(&[Svc::new("web", &[&up], &[&g])]).await;
    // HTTP/1: close the connection while the backend works.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /sleep/20000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(eventually(PATIENCE, || async { up.hits() == 1 }).await);
    drop(s);
    let aborted = "switchyard_requests_total{code=\"499\",pool=\"blue\",service=\"web\"}";
    assert!(
        metric_reaches(&p, aborted, 1.0).await,
        "HTTP/1 abort counted as 499"
    );
    // HTTP/2: reset the stream.
    let h2 = h2_client();
    let url = p.url("/sleep/20000");
    let task = tokio::spawn(async move { get(&h2, &url, &[]).await });
    assert!(eventually(PATIENCE, || async { up.hits() == 2 }).await);
    task.abort();
    assert!(
        metric_reaches(&p, aborted, 2.0).await,
        "HTTP/2 reset counted as 499"
    );
    let one_xx = "switchyard_requests_total{code=\"1xx\",pool=\"blue\",service=\"web\"}";
    assert_eq!(metric_now(&p, one_xx).await, 0.0);
}

/// An upstream answering 200 with `n` Set-Cookie lines.
async fn cookie_monster(n: usize) -> SocketAddr {
    raw_upstream(move |mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let mut resp = String::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
            for i in 0..n {
                resp.push_str(&format!("Set-Cookie: c{i}=v{i}; Path=/\r\n"));
            }
            resp.push_str("\r\nok");
            if s.write_all(resp.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await
}

// Item 8: more than 100 header fields became a 502 `reset` and a failure
// towards ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_response_headers_pass_and_past_the_limit_say_why_without_ejecting() {
    let g = Upstream::start("green").await;
    let many = cookie_monster(150).await;
    let p = TestProxy::start(&[Svc::addrs("web", &[many], &[g.addr])]).await;
    // Raw: hyper's own client would refuse more than 100 fields.
    let (head, body) = raw_exchange(
        p.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("answered");
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "150 fields are within the default (500): {head}"
    );
    assert_eq!(head.matches("set-cookie: ").count(), 150);
    assert_eq!(body, b"ok");

    let (a, b) = (cookie_monster(150).await, cookie_monster(150).await);
    let p = TestProxy::start_with(
        "max_response_headers = 100",
        &[Svc::addrs("web", &[a, b], &[g.addr])],
    )
    .await;
    for _ in 0..12 {
        let (status, _, body) = p.get("/").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(body, "502 upstream response head too large\n");
    }
    let m = p.admin.metrics().await;
    let kind = |k: &str| {
        metric(
            &m,
            &format!(
                "switchyard_upstream_errors_total{{kind=\"{k}\",pool=\"blue\",service=\"web\"}}"
            ),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(kind("head_too_large"), 12.0);
    assert_eq!(kind("reset"), 0.0);
    assert_eq!(
        metric(
            &m,
            "switchyard_backend_ejections_total{pool=\"blue\",service=\"web\"}"
        ),
        Some(0.0),
        "not the backend's health"
    );
}

// Item 9: `Connection` could strip Host, X-Request-Id and X-Forwarded-Host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_host_or_the_proxys_headers() {
    let g = Upstream::start("green").await;
    let up = Upstream::start("echo").await;
    let p = TestProxy::start(&[Svc::new("web", &[&up], &[&g])]).await;
    let (head, body) = raw_exchange(
        p.addr,
        b"GET /headers HTTP/1.1\r\nHost: app.example\r\nX-Request-Id: req-42\r\n\
          Connection: close, Host, X-Request-Id, X-Forwarded-Host, X-Forwarded-For\r\n\r\n",
    )
    .await
    .expect("answered");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let h = &seen["headers"];
    assert_eq!(h["host"], "app.example", "{seen}");
    assert_eq!(h["x-request-id"], "req-42", "{seen}");
    assert_eq!(h["x-forwarded-host"], "app.example", "{seen}");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{seen}");
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: req-42"),
        "{head}"
    );
}

// The gap: a body that stalls mid-way hung the client indefinitely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_body_ends_after_upstream_read_timeout() {
    let g = Upstream::start("green").await;
    let (hold_tx, hold_rx) = tokio::sync::watch::channel(());
    let stall = raw_upstream(move |mut s| {
        let mut hold = hold_rx.clone();
        async move {
            read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
                .await;
            // Silence, with the connection open, until the test ends.
            let _ = hold.changed().await;
        }
    })
    .await;
    let good = Upstream::start("good").await;
    let p = TestProxy::start_with(
        "upstream_read_timeout = \"500ms\"",
        &[Svc::addrs("web", &[stall, good.addr], &[g.addr])],
    )
    .await;
    let timeouts =
        "switchyard_upstream_errors_total{kind=\"timeout\",pool=\"blue\",service=\"web\"}";
    let mut stalled = 0;
    for _ in 0..4 {
        let (head, body) = raw_exchange(
            p.addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("the proxy ends a stalled response instead of hanging");
        if head.contains("content-length: 1000") {
            stalled += 1;
            assert_eq!(
                body, b"0123456789",
                "the connection closes before the declared end"
            );
        }
    }
    assert_eq!(stalled, 2, "round robin over the two backends");
    assert!(metric_reaches(&p, timeouts, 2.0).await, "counted once each");
    drop(hold_tx);
}

// `"0"` means never, as for the other timeouts; bad values are refused.
#[test]
fn upstream_read_timeout_and_max_response_headers_are_checked() {
    let base = "[[service]]\nname = \"w\"\nhosts = [\"*\"]\n[service.blue]\nbackends = [\"127.0.0.1:1\"]\n[service.green]\nbackends = [\"127.0.0.1:2\"]\n";
    let ok = format!("[proxy]\nupstream_read_timeout = \"0\"\nmax_response_headers = 2000\n{base}");
    assert!(switchyard::testing::config::parse(&ok).is_ok());
    for bad in [
        "upstream_read_timeout = \"soon\"",
        "max_response_headers = 0",
        "max_response_headers = 100000",
    ] {
        let text = format!("[proxy]\n{bad}\n{base}");
        let errs = switchyard::testing::config::parse(&text).unwrap_err();
        let key = bad.split(' ').next().unwrap();
        assert!(
            errs.iter()
                .any(|e| e.message.contains(&format!("proxy.{key}"))),
            "{bad}: {errs:?}"
        );
    }
}
