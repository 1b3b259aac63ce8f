//! Health, failover and connection lifecycle: backends die, hang, flap and
//! get replaced under load; clients see as little of it as possible.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Outcome of a load run.
#[derive(Debug, Default)]
struct Stats {
    ok: usize,
    non_2xx: Vec<u16>,
    errors: Vec<String>,
    by_upstream: std::collections::HashMap<String, usize>,
}

impl Stats {
    fn failures(&self) -> usize {
        self.non_2xx.len() + self.errors.len()
    }
}

/// `clients` keep-alive clients sending GET `path` until stopped (bounded
/// to 60 s and 200 000 requests each).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Stats>>,
}

impl Load {
    fn start(url: String, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let url = url.clone();
                tokio::spawn(async move {
                    let client = http1_client();
                    let mut st = Stats::default();
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) || tokio::time::Instant::now() > deadline {
                            break;
                        }
                        let req = http::Request::get(&url).body(empty()).unwrap();
                        match client.request(req).await {
                            Ok(resp) => {
                                let status = resp.status();
                                let up = resp
                                    .headers()
                                    .get("x-upstream")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("-")
                                    .to_string();
                                let body = http_body_util::BodyExt::collect(resp.into_body()).await;
                                if body.is_err() {
                                    st.errors.push("body".into());
                                } else if status.is_success() {
                                    st.ok += 1;
                                    *st.by_upstream.entry(up).or_default() += 1;
                                } else {
                                    st.non_2xx.push(status.as_u16());
                                }
                            }
                            Err(e) => st.errors.push(format!("{e:?}")),
                        }
                    }
                    st
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Stats::default();
        for t in self.tasks {
            let st = t.await.unwrap();
            all.ok += st.ok;
            all.non_2xx.extend(st.non_2xx);
            all.errors.extend(st.errors);
            for (k, v) in st.by_upstream {
                *all.by_upstream.entry(k).or_default() += v;
            }
        }
        all
    }
}

/// Waits until the load has made `n` more requests through the proxy.
async fn until_served(up: &[&Upstream], n: usize) {
    let start: usize = up.iter().map(|u| u.hits()).sum();
    assert!(
        eventually(Duration::from_secs(10), || async {
            up.iter().map(|u| u.hits()).sum::<usize>() >= start + n
        })
        .await,
        "load did not make progress"
    );
}

const FAST_HEALTH: &str =
    "[service.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nunhealthy_after = 2\nhealthy_after = 1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backend_fails_at_most_its_in_flight_requests() {
    let b1 = Upstream::start("blue1").await;
    let mut b2 = Upstream::start("blue2").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&b1, &b2], &[&green]).extra(FAST_HEALTH)]).await;
    let load = Load::start(p.url("/"), 8);
    until_served(&[&b1, &b2], 500).await;
    b2.kill();
    until_served(&[&b1], 2000).await;
    let st = load.finish().await;
    // GETs broken by the kill are replayed on blue1 and connect failures
    // are retried, so hardly anything fails: at most the 8 requests that
    // were in flight on blue2.
    assert!(
        st.failures() <= 8,
        "{} failures: {:?} {:?}",
        st.failures(),
        st.non_2xx,
        &st.errors[..st.errors.len().min(5)]
    );
    assert!(st.ok > 2000);
    assert_eq!(
        st.by_upstream.get("green"),
        None,
        "no failover while blue1 lives"
    );
    // The dead backend is marked unhealthy by its checks.
    assert!(
        eventually(Duration::from_secs(5), || async {
            let s = p.admin.service("web").await;
            s["pools"]["blue"]["backends"][1]["healthy"] == false
        })
        .await
    );
    let m = p.admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            &format!(
                "switchyard_backend_healthy{{backend=\"{}\",pool=\"blue\",service=\"web\"}}",
                b2.addr
            )
        ),
        Some(0.0),
        "{m}"
    );
}

/// A server that accepts connections and never answers.
async fn hanging_backend() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_backend_gets_504_then_is_ejected() {
    let (hang, _task) = hanging_backend().await;
    let good = Upstream::start("good").await;
    let green = Upstream::start("green").await;
    let blue_addrs = [hang, good.addr];
    let p = TestProxy::start_with(
        "request_timeout = \"200ms\"",
        &[Svc::addrs("web", &blue_addrs, &[green.addr])],
    )
    .await;
    let mut timeouts = 0;
    let mut ok_after = 0;
    for i in 0..40 {
        let started = std::time::Instant::now();
        let (s, _, body) = p.get("/").await;
        match s {
            StatusCode::GATEWAY_TIMEOUT => {
                timeouts += 1;
                assert!(started.elapsed() >= Duration::from_millis(190));
                assert!(body.contains("timed out"), "{body}");
            }
            StatusCode::OK => {
                assert_eq!(body, "good");
                if i >= 20 {
                    ok_after += 1;
                }
            }
            other => panic!("unexpected {other}"),
        }
    }
    // Five consecutive timeouts eject the hanging backend; after that every
    // request goes to the good one.
    assert_eq!(timeouts, 5, "ejected after 5 consecutive failures");
    assert_eq!(ok_after, 20);
    let m = p.admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            "switchyard_upstream_errors_total{kind=\"timeout\",pool=\"blue\",service=\"web\"}"
        ),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &m,
            "switchyard_backend_ejections_total{pool=\"blue\",service=\"web\"}"
        ),
        Some(1.0)
    );
    let s = p.admin.service("web").await;
    assert_eq!(s["pools"]["blue"]["backends"][0]["state"], "ejected", "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_flip_a_backend_and_failover_follows() {
    let b1 = Upstream::start("blue1").await;
    let b2 = Upstream::start("blue2").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&b1, &b2], &[&green]).extra(FAST_HEALTH)]).await;
    let healthy = |i: usize| {
        let admin = &p.admin;
        async move { admin.service("web").await["pools"]["blue"]["backends"][i]["healthy"] == true }
    };

    b1.set_healthy(false);
    assert!(eventually(Duration::from_secs(5), || async { !healthy(0).await }).await);
    let before = b1.hits();
    for _ in 0..20 {
        let (s, _, body) = p.get("/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue2"));
    }
    assert_eq!(b1.hits(), before, "an unhealthy backend gets no traffic");

    b1.set_healthy(true);
    assert!(eventually(Duration::from_secs(5), || healthy(0)).await);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..10 {
        seen.insert(p.get("/").await.2);
    }
    assert!(seen.contains("blue1"), "back in rotation: {seen:?}");

    // Whole pool down: failover to green, counted.
    b1.set_healthy(false);
    b2.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !healthy(0).await && !healthy(1).await
        })
        .await
    );
    let (s, h, body) = p.get("/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "green"));
    assert_eq!(h["x-switchyard-pool"], "green");
    let m = p.admin.metrics().await;
    assert!(
        metric(
            &m,
            "switchyard_failovers_total{from=\"blue\",service=\"web\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );

    // Switching toward a pool with no healthy backend is refused unless forced.
    p.admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let (s, v) = p
        .admin
        .post("/api/v1/services/web/switch", r#"{"to":"blue"}"#)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "no_healthy_backend");
    let (s, v) = p
        .admin
        .post("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    p.admin
        .ok(
            "/api/v1/services/web/switch",
            r#"{"to":"blue","force":true}"#,
        )
        .await;

    // Neither pool healthy: 503 with a clear body.
    green.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            p.admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == false
        })
        .await
    );
    let (s, _, body) = p.get("/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("no healthy backend"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failures_are_retried_on_another_backend_for_any_method() {
    // Outside the range `bind(0)` draws from: no later listener takes it.
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let good = Upstream::start("good").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[closed, good.addr], &[green.addr])]).await;
    for i in 0..10 {
        let req = http::Request::post(p.url("/echo"))
            .body(full(format!("body {i}")))
            .unwrap();
        let resp = p.client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(body, format!("body {i}").as_bytes());
    }
    let m = p.admin.metrics().await;
    assert!(
        metric(
            &m,
            "switchyard_retries_total{pool=\"blue\",service=\"web\"}"
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "switchyard_upstream_errors_total{kind=\"connect\",pool=\"blue\",service=\"web\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    // Only backend refusing and no other: 502 naming the cause.
    let p2 = TestProxy::start(&[Svc::addrs("solo", &[closed], &[green.addr])]).await;
    let (s, _, body) = p2.get("/").await;
    assert_eq!(s, StatusCode::BAD_GATEWAY);
    assert!(body.contains("refused"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_stays_across_a_switch_and_is_drained_after_timeout() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start_with(
        "drain_timeout = \"400ms\"",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", p.addr))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-switchyard-pool"], "blue");
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    // Timed from before the call: the drain starts inside it.
    let switched = std::time::Instant::now();
    p.admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    // Still open and still on blue right after the switch.
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
    let s = p.admin.service("web").await;
    assert_eq!(
        s["pools"]["blue"]["backends"][0]["in_flight"], 1,
        "the upgraded connection counts on blue: {s}"
    );
    // Closed once drain_timeout has passed since its pool stopped taking traffic.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed within 5s");
    assert!(
        matches!(end, None | Some(Err(_)) | Some(Ok(Message::Close(_)))),
        "{end:?}"
    );
    let waited = switched.elapsed();
    assert!(
        waited >= Duration::from_millis(350),
        "closed too early: {waited:?}"
    );
    let m = p.admin.metrics().await;
    assert_eq!(metric(&m, "switchyard_upgrades_drained_total"), Some(1.0));
    // New connections go to green.
    let (mut ws2, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", p.addr))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-switchyard-pool"], "green");
    ws2.send(Message::text("x")).await.unwrap();
    assert_eq!(ws2.next().await.unwrap().unwrap(), Message::text("x"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_live_pool_under_load_fails_nothing_and_closes_old_connections() {
    let old = Upstream::start("old").await;
    let new = Upstream::start("new").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&old], &[&green])]).await;
    let load = Load::start(p.url("/"), 6);
    until_served(&[&old], 300).await;
    assert!(old.open_connections() > 0);
    let body = format!(r#"{{"backends":["{}"],"force":true}}"#, new.addr);
    let (s, v) = p.admin.put("/api/v1/services/web/pools/blue", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let old_hits = old.hits();
    until_served(&[&new], 500).await;
    let st = load.finish().await;
    assert_eq!(st.failures(), 0, "{:?} {:?}", st.non_2xx, st.errors);
    // In-flight requests finished on the old backend, then nothing more.
    assert!(old.hits() <= old_hits + 6);
    // Pooled connections to the removed backend are closed.
    assert!(
        eventually(Duration::from_secs(5), || async {
            old.open_connections() == 0
        })
        .await,
        "old connections still open: {}",
        old.open_connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start_with(
        "drain_timeout = \"5s\"",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let addr = p.addr;
    // Requests in flight when shutdown starts (the upstream takes 2 s, so
    // they still are on a loaded machine; drain_timeout is 5 s).
    let mut slow = Vec::new();
    for _ in 0..10 {
        let url = p.url("/sleep/2000");
        slow.push(tokio::spawn(async move {
            get(&http1_client(), &url, &[]).await
        }));
    }
    // An idle keep-alive connection, open before shutdown.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .starts_with("HTTP/1.1 200"));
    assert!(eventually(Duration::from_secs(5), || async { blue.hits() >= 11 }).await);

    // Waiting for the idle keep-alive connection would outlast
    // drain_timeout and make the shutdown unclean: `clean` proves it was not
    // waited for (no wall-clock bound needed).
    let clean = p.shutdown().await;
    assert!(clean, "drained within drain_timeout");
    for t in slow {
        let (s, h, body) = t.await.unwrap();
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
        assert_eq!(
            h.get("connection").map(|v| v.to_str().unwrap()),
            Some("close")
        );
    }
    // The idle connection was closed cleanly, and nothing new is accepted.
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "idle keep-alive connection closed");
    assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_and_idle_connections_expire() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start_with(
        "header_read_timeout = \"300ms\"\nidle_timeout = \"600ms\"",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    // Trickle a request head one byte every 50 ms: cut at ~300 ms.
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    let started = std::time::Instant::now();
    let head = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for &b in head.iter() {
        if slow.write_all(&[b]).await.is_err() {
            cut = true;
            break;
        }
        // Served meanwhile: a normal client is not held up.
        if started.elapsed() < Duration::from_millis(100) {
            let (s, _, _) = p.get("/").await;
            assert_eq!(s, StatusCode::OK);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    if !cut {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), slow.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "connection closed without an answer");
    }
    // Cut at all (the trickle gives up after 3 s and the read above waits
    // 2 s more); the deadline itself is tested exactly on paused time
    // (`conn::tests::timer_verdicts_on_paused_time`).
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "cut early: {:?}",
        started.elapsed()
    );

    // A silent connection is idle, not slow: it gets idle_timeout... but the
    // first request head is bounded by header_read_timeout from accept.
    // (Counted as a header_read timeout below, not an idle one: that, not
    // a wall-clock bound, shows which deadline closed it.)
    let mut silent = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));

    // After a request, a keep-alive connection lives idle_timeout, not header_read_timeout.
    let mut ka = TcpStream::connect(p.addr).await.unwrap();
    // Timed from before the request: the idle time starts after the
    // response, so this can only overstate it.
    let t = std::time::Instant::now();
    ka.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"blue") {
        let n = ka.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the response ended");
        got.extend_from_slice(&buf[..n]);
    }
    let n = tokio::time::timeout(Duration::from_secs(3), ka.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(500),
        "closed at header_read_timeout, not idle_timeout: {idle:?}"
    );
    let m = p.admin.metrics().await;
    assert!(
        metric(&m, "switchyard_client_timeouts_total{kind=\"header_read\"}").unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert!(metric(&m, "switchyard_client_timeouts_total{kind=\"idle\"}").unwrap_or(0.0) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_added_backends_wait_for_their_first_passing_check() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let new_green = Upstream::start("green2").await;
    new_green.set_healthy(false);
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(FAST_HEALTH)]).await;
    let body = format!(r#"{{"backends":["{}"]}}"#, new_green.addr);
    let (s, v) = p.admin.put("/api/v1/services/web/pools/green", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        v["pools"]["green"]["backends"][0]["state"], "unknown",
        "{v}"
    );
    // Not checked healthy yet: the switch gate refuses.
    let (s, v) = p
        .admin
        .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    new_green.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(5), || async {
            p.admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == true
        })
        .await
    );
    p.admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(p.get("/").await.2, "green2");
    // The replaced green backend's connections are gone.
    assert!(
        eventually(Duration::from_secs(5), || async {
            green.open_connections() == 0
        })
        .await
    );
}

/// Reads one response (with a content-length body) from a raw socket;
/// bytes of later responses stay in `got`.
async fn read_response(s: &mut TcpStream, got: &mut Vec<u8>) -> String {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                let text = String::from_utf8_lossy(&got[..end + 4 + len]).into_owned();
                got.drain(..end + 4 + len);
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before a whole response: {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keep_alive_connections_wake_up_and_still_expire() {
    // Parking (after 100 ms idle) gives hyper's buffers back; the connection
    // must behave exactly as before: served on the next request, pipelined
    // requests answered in order, and still closed at idle_timeout.
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start_with(
        "idle_timeout = \"4s\"",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut got = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s, &mut got).await.ends_with("blue"));
    // Idle past the park delay (100 ms): wait until it is parked.
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&p.admin.metrics().await, "switchyard_parked_connections") == Some(1.0)
        })
        .await,
        "never parked"
    );
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_response(&mut s, &mut got).await;
    let second = read_response(&mut s, &mut got).await;
    assert!(got.is_empty());
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("blue"),
        "{first}"
    );
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("blue"),
        "{second}"
    );
    // Parked again, then closed at idle_timeout (4 s after the last request).
    // (The exact deadline is tested on paused time in conn.rs; here: not
    // before it, and at all.)
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(3500),
        "closed before idle_timeout: {waited:?}"
    );

    // A parked connection is closed at once by a graceful shutdown.
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_response(&mut s, &mut Vec::new()).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(&p.admin.metrics().await, "switchyard_parked_connections") == Some(1.0)
        })
        .await,
        "never parked"
    );
    // A parked connection kept open would hold the shutdown until
    // drain_timeout and make it unclean: `drained` proves it was closed
    // at once (no wall-clock bound needed).
    assert!(p.shutdown().await, "drained");
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
}

/// Issue 17 item 5: a reload that changes only settings other than the
/// backend lists (balance, sticky, preview, health, hosts) keeps the
/// backends whose address did not change, the same objects: an open
/// WebSocket stays open and counted on its backend, and is never drained
/// ("its pool stopped taking traffic" was false).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_survives_a_reload_that_changes_unrelated_settings() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let drain = Duration::from_millis(200);
    let p = TestProxy::start_with(
        "drain_timeout = \"200ms\"",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let (mut ws, resp) = tokio_tungstenite::connect_async(format!("ws://{}/ws", p.addr))
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-switchyard-pool"], "blue");
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    // Every per-service setting but the backend lists changes.
    let text = std::fs::read_to_string(&p.config_path)
        .unwrap()
        .replace("hosts = [\"*\"]\n", "hosts = [\"*\", \"web.example\"]\n")
        .replace(
            "path_prefix = \"/\"\n",
            "path_prefix = \"/\"\nbalance = \"least_request\"\n",
        );
    assert!(text.contains("web.example") && text.contains("least_request"));
    std::fs::write(
        &p.config_path,
        format!(
            "{text}{}\n[service.sticky]\ncookie = \"bucket2\"\n[service.preview]\nheader = \"x-preview-2\"\n",
            health_every("100ms")
        ),
    )
    .unwrap();
    let (s, v) = p.admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    // The backend is the same object: it still counts the WebSocket.
    let s = p.admin.service("web").await;
    assert_eq!(
        s["pools"]["blue"]["backends"][0]["in_flight"], 1,
        "the reload replaced the backend under the WebSocket: {s}"
    );
    // The new health check runs on the kept backend (its checker was
    // replaced, not lost): a failing check is seen, then a passing one.
    let state =
        || async { p.admin.service("web").await["pools"]["blue"]["backends"][0]["state"].clone() };
    blue.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(10), || async {
            state().await == "unhealthy"
        })
        .await,
        "no health check judged the kept backend"
    );
    blue.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(10), || async {
            state().await == "healthy"
        })
        .await
    );
    // Well past drain_timeout (a drain would have closed it by now: this
    // sleep is the subject, not synchronisation), it still echoes.
    tokio::time::sleep(drain * 3).await;
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
    let m = p.admin.metrics().await;
    assert_eq!(metric(&m, "switchyard_upgrades_drained_total"), Some(0.0));
}
