//! Routing changes under real traffic: the no-drop cutover promise, split
//! proportions, sticky canary ramps, preview, rollback and pool replacement.
//! Real upstreams, the real proxy in-process, real HTTP/1.1 and h2c clients.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpInfo;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;

/// Pool of an upstream name (`blue`, `blue-b`, `green2`, ...).
fn color_of(upstream: &str) -> &'static str {
    if upstream.starts_with("blue") {
        "blue"
    } else if upstream.starts_with("green") {
        "green"
    } else {
        "?"
    }
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> &'h str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// The bucket in a `Set-Cookie: switchyard_bucket=N; ...` header, if any.
fn set_cookie_bucket(h: &HeaderMap) -> Option<u16> {
    h.get_all("set-cookie").iter().find_map(|v| {
        let v = v.to_str().ok()?;
        let rest = v.strip_prefix("switchyard_bucket=")?;
        rest.split(';').next()?.trim().parse().ok()
    })
}

fn generation(v: &Value) -> u64 {
    v["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("no generation in {v}"))
}

// ===== 1. The promise =====

/// One answered request as a load client saw it.
struct Sample {
    start: Instant,
    end: Instant,
    pool: &'static str,
}

/// What one load task saw.
#[derive(Default)]
struct TaskReport {
    name: String,
    samples: Vec<Sample>,
    failures: Vec<String>,
    /// Local ports of the client connections the responses came on.
    ports: HashSet<u16>,
}

impl TaskReport {
    /// Checks one response; records it or the failure.
    fn record(&mut self, start: Instant, status: StatusCode, headers: &HeaderMap, body: &[u8]) {
        let end = Instant::now();
        let upstream = header(headers, "x-upstream");
        let pool = color_of(upstream);
        if !status.is_success() {
            self.failures.push(format!(
                "{}: status {status}: {}",
                self.name,
                String::from_utf8_lossy(body)
            ));
            return;
        }
        if pool == "?" || body != upstream.as_bytes() {
            self.failures.push(format!(
                "{}: bad answer: x-upstream {upstream:?}, body {:?}",
                self.name,
                String::from_utf8_lossy(body)
            ));
            return;
        }
        if header(headers, "x-switchyard-pool") != pool {
            self.failures.push(format!(
                "{}: x-switchyard-pool {:?} but served by {upstream}",
                self.name,
                header(headers, "x-switchyard-pool")
            ));
        }
        self.samples.push(Sample { start, end, pool });
    }
}

const MAX_REQUESTS_PER_TASK: usize = 50_000;
const LOAD_DEADLINE: Duration = Duration::from_secs(30);

/// A pooled keep-alive client (HTTP/1.1 or h2c) in a loop until `stop`.
async fn pooled_loop(
    name: String,
    client: HttpClient,
    url: String,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> TaskReport {
    let mut r = TaskReport {
        name,
        ..TaskReport::default()
    };
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst)
        && r.samples.len() + r.failures.len() < MAX_REQUESTS_PER_TASK
        && t0.elapsed() < LOAD_DEADLINE
    {
        let start = Instant::now();
        let req = Request::get(&url).body(empty()).unwrap();
        match client.request(req).await {
            Ok(resp) => {
                if let Some(info) = resp.extensions().get::<HttpInfo>() {
                    r.ports.insert(info.local_addr().port());
                }
                let (parts, body) = resp.into_parts();
                match body.collect().await {
                    Ok(b) => r.record(start, parts.status, &parts.headers, &b.to_bytes()),
                    Err(e) => r.failures.push(format!("{}: body: {e}", r.name)),
                }
            }
            Err(e) => r.failures.push(format!("{}: request: {e:?}", r.name)),
        }
        count.fetch_add(1, Ordering::SeqCst);
    }
    r
}

/// HTTP/1.1 keep-alive on exactly one TCP connection: if the proxy closed
/// it, the next request fails (no reconnecting).
async fn single_connection_loop(
    name: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicUsize>,
) -> TaskReport {
    let mut r = TaskReport {
        name,
        ..TaskReport::default()
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    r.ports.insert(tcp.local_addr().unwrap().port());
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst)
        && r.samples.len() + r.failures.len() < MAX_REQUESTS_PER_TASK
        && t0.elapsed() < LOAD_DEADLINE
    {
        if let Err(e) = sender.ready().await {
            r.failures
                .push(format!("{}: connection closed: {e}", r.name));
            break;
        }
        let start = Instant::now();
        let req = Request::get("/")
            .header("host", addr.to_string())
            .body(Empty::new())
            .unwrap();
        match sender.send_request(req).await {
            Ok(resp) => {
                if resp.headers().contains_key("connection") {
                    r.failures.push(format!(
                        "{}: proxy sent Connection: {:?}",
                        r.name,
                        resp.headers()["connection"]
                    ));
                }
                let (parts, body) = resp.into_parts();
                match body.collect().await {
                    Ok(b) => r.record(start, parts.status, &parts.headers, &b.to_bytes()),
                    Err(e) => r.failures.push(format!("{}: body: {e}", r.name)),
                }
            }
            Err(e) => {
                r.failures
                    .push(format!("{}: request failed: {e:?}", r.name));
                break;
            }
        }
        count.fetch_add(1, Ordering::SeqCst);
    }
    if sender.is_closed() || conn.is_finished() {
        r.failures
            .push(format!("{}: the connection did not stay open", r.name));
    }
    r
}

/// One accepted routing change, as the switcher saw it.
struct Change {
    sent: Instant,
    returned: Instant,
    /// Green share in basis points after the change.
    green_bp: u32,
}

fn allows(green_bp: u32, pool: &str) -> bool {
    match green_bp {
        0 => pool == "blue",
        10_000 => pool == "green",
        _ => true,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promise_no_failed_request_and_no_new_request_on_the_old_pool() {
    let (blue_a, blue_b) = (
        Upstream::start("blue-a").await,
        Upstream::start("blue-b").await,
    );
    let (green_a, green_b) = (
        Upstream::start("green-a").await,
        Upstream::start("green-b").await,
    );
    let proxy =
        TestProxy::start(&[Svc::new("web", &[&blue_a, &blue_b], &[&green_a, &green_b])]).await;
    let url = proxy.url("/");
    let stop = Arc::new(AtomicBool::new(false));

    // 3 pooled HTTP/1.1 clients, 2 single-connection HTTP/1.1 clients, 1 h2c client.
    let mut counts = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let c = Arc::new(AtomicUsize::new(0));
        counts.push(Arc::clone(&c));
        tasks.push(tokio::spawn(pooled_loop(
            format!("h1-pooled-{i}"),
            http1_client(),
            url.clone(),
            Arc::clone(&stop),
            c,
        )));
    }
    for i in 0..2 {
        let c = Arc::new(AtomicUsize::new(0));
        counts.push(Arc::clone(&c));
        tasks.push(tokio::spawn(single_connection_loop(
            format!("h1-single-{i}"),
            proxy.addr,
            Arc::clone(&stop),
            c,
        )));
    }
    let c = Arc::new(AtomicUsize::new(0));
    counts.push(Arc::clone(&c));
    tasks.push(tokio::spawn(pooled_loop(
        "h2c".into(),
        h2_client(),
        url.clone(),
        Arc::clone(&stop),
        c,
    )));
    assert!(
        eventually(Duration::from_secs(10), || {
            let ok = counts.iter().all(|c| c.load(Ordering::SeqCst) >= 3);
            async move { ok }
        })
        .await,
        "every load client got answers before the switching starts"
    );

    // 60 changes: full switches both ways and splits, ~40 ms apart.
    let open =
        |text: &str| metric(text, "switchyard_open_connections{listener=\"http\"}").unwrap_or(-1.0);
    let mut changes = vec![Change {
        sent: Instant::now(),
        returned: Instant::now(),
        green_bp: 0,
    }];
    let mut min_open = f64::MAX;
    for i in 0..60 {
        let (path, body, green_bp) = match i % 6 {
            0 => ("switch", json!({"to": "green"}), 10_000),
            1 => ("switch", json!({"to": "blue"}), 0),
            2 => ("split", json!({"green": 50}), 5_000),
            3 => ("switch", json!({"to": "green"}), 10_000),
            4 => ("split", json!({"green": 12.5}), 1_250),
            _ => ("switch", json!({"to": "blue"}), 0),
        };
        let sent = Instant::now();
        let v = proxy
            .admin
            .ok(&format!("/api/v1/services/web/{path}"), &body.to_string())
            .await;
        let returned = Instant::now();
        assert_eq!(
            v["weights"]["green"].as_f64(),
            Some(f64::from(green_bp) / 100.0),
            "{v}"
        );
        changes.push(Change {
            sent,
            returned,
            green_bp,
        });
        if i % 5 == 0 {
            min_open = min_open.min(open(&proxy.admin.metrics().await));
        }
        // Pacing: time is the subject here (requests between changes).
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    min_open = min_open.min(open(&proxy.admin.metrics().await));
    stop.store(true, Ordering::SeqCst);
    let mut reports = Vec::new();
    for t in tasks {
        reports.push(t.await.unwrap());
    }

    // Zero failures, zero non-2xx, on every client.
    let failures: Vec<&String> = reports.iter().flat_map(|r| &r.failures).collect();
    assert!(
        failures.is_empty(),
        "{} failed requests, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // After a change returned, no new request on a pool it took traffic from.
    let mut decisive = 0;
    let mut violations = Vec::new();
    let mut per_pool = [0usize; 2];
    for r in &reports {
        for s in &r.samples {
            per_pool[usize::from(s.pool == "green")] += 1;
            let k = changes
                .iter()
                .rposition(|c| c.returned <= s.start)
                .unwrap_or(0);
            let candidates: Vec<u32> = changes
                .iter()
                .enumerate()
                .filter(|(j, c)| *j == k || (*j > k && c.sent < s.end))
                .map(|(_, c)| c.green_bp)
                .collect();
            if !candidates.iter().any(|g| allows(*g, s.pool)) {
                violations.push(format!(
                    "{}: request started {:?} after change #{k} (green {} bp) returned, served by {}",
                    r.name,
                    s.start - changes[k].returned,
                    changes[k].green_bp,
                    s.pool
                ));
            }
            if candidates.iter().all(|g| *g == 0) || candidates.iter().all(|g| *g == 10_000) {
                decisive += 1;
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{} requests reached the old pool, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let total: usize = reports.iter().map(|r| r.samples.len()).sum();
    eprintln!(
        "{total} requests (blue {}, green {}), {decisive} in one-live-pool windows",
        per_pool[0], per_pool[1]
    );
    assert!(
        decisive >= 200,
        "only {decisive} of {total} requests fell in a window with one live pool"
    );
    assert!(
        per_pool[0] > 50 && per_pool[1] > 50,
        "blue {} green {}",
        per_pool[0],
        per_pool[1]
    );

    // Connections were not dropped: the single-connection clients (checked
    // in their loop) and the h2c client used exactly one connection each,
    // and the proxy never had fewer open than one per client.
    for r in &reports {
        assert!(
            r.samples.len() >= 20,
            "{} sent only {} requests",
            r.name,
            r.samples.len()
        );
        if r.name.starts_with("h1-single") || r.name == "h2c" {
            assert_eq!(
                r.ports.len(),
                1,
                "{} used connections {:?}",
                r.name,
                r.ports
            );
        }
    }
    assert!(
        min_open >= 6.0,
        "switchyard_open_connections fell to {min_open}"
    );

    // The proxy counted no 5xx for the service.
    let m = proxy.admin.metrics().await;
    for pool in ["blue", "green"] {
        assert_eq!(
            metric_with(
                &m,
                "switchyard_requests_total",
                &[("service", "web"), ("pool", pool), ("code", "5xx")]
            )
            .unwrap_or(0.0),
            0.0
        );
    }
    assert_eq!(
        metric_with(
            &m,
            "switchyard_routing_changes_total",
            &[("service", "web"), ("action", "switch")]
        ),
        Some(40.0)
    );
    assert_eq!(
        metric_with(
            &m,
            "switchyard_routing_changes_total",
            &[("service", "web"), ("action", "split")]
        ),
        Some(20.0)
    );
    assert!(proxy.shutdown().await);
}

/// A sample of `name` whose labels include all of `labels`, in any order.
fn metric_with(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}')?),
            None => (series, ""),
        };
        if n != name {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| rest.split(',').any(|p| p == format!("{k}=\"{v}\"")));
        if all {
            value.parse().ok()
        } else {
            None
        }
    })
}

// ===== 2. Split proportions =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_sends_the_configured_share_to_green() {
    let (blue_up, green_up) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue_up], &[&green_up])]).await;
    let v = proxy
        .admin
        .ok("/api/v1/services/web/split", r#"{"green":20}"#)
        .await;
    assert_eq!(
        (v["live"].as_str(), v["weights"]["blue"].as_f64()),
        (Some("split"), Some(80.0)),
        "{v}"
    );

    // 4 clients x 1000 requests; no client keeps cookies, so every request
    // draws a fresh bucket.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let client = http1_client();
            let (mut green, mut mismatched) = (0usize, Vec::new());
            for _ in 0..1000 {
                let (status, h, body) = get(&client, &url, &[]).await;
                assert_eq!(status, StatusCode::OK);
                let pool = color_of(&body);
                green += usize::from(pool == "green");
                // The bucket in the cookie decides the pool: < 2000 → green.
                match set_cookie_bucket(&h) {
                    Some(b) if (b < 2000) == (pool == "green") => {}
                    other => mismatched.push(format!("bucket {other:?} served by {pool}")),
                }
            }
            (green, mismatched)
        }));
    }
    let mut green = 0;
    for t in tasks {
        let (g, mismatched) = t.await.unwrap();
        assert!(mismatched.is_empty(), "{mismatched:?}");
        green += g;
    }
    let share = green as f64 / 4000.0;
    assert!(
        (0.17..=0.23).contains(&share),
        "green got {:.1} % of 4000 requests",
        share * 100.0
    );
    assert_eq!(
        green_up.hits(),
        green,
        "every green answer came from the green upstream"
    );
    assert_eq!(blue_up.hits(), 4000 - green);
}

// ===== 3. Sticky ramp =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_ramp_only_moves_clients_to_green_and_rollback_brings_all_back() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;

    // No split: no cookie.
    let (s, h, body) = proxy.get("/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    assert!(
        h.get("set-cookie").is_none(),
        "cookie set without a split: {h:?}"
    );

    // 300 clients, each keeping its cookie across the ramp.
    let mut buckets: Vec<Option<u16>> = vec![None; 300];
    let mut was_green = vec![false; 300];
    for pct in [5u16, 25, 50, 100] {
        proxy
            .admin
            .ok(
                "/api/v1/services/web/split",
                &json!({ "green": pct }).to_string(),
            )
            .await;
        let mut greens = 0;
        for (i, bucket) in buckets.iter_mut().enumerate() {
            let cookie = bucket.map(|b| format!("switchyard_bucket={b}"));
            let headers: Vec<(&str, &str)> =
                cookie.iter().map(|c| ("cookie", c.as_str())).collect();
            let (s, h, body) = proxy.get_with("/", &headers).await;
            assert_eq!(s, StatusCode::OK);
            let green_now = color_of(&body) == "green";
            match (*bucket, set_cookie_bucket(&h)) {
                // First request (at 5 %, a split): a fresh bucket, pinned.
                (None, Some(b)) => *bucket = Some(b),
                (None, None) => panic!("client {i}: no cookie during a {pct} % split"),
                (Some(_), Some(b)) => panic!("client {i}: cookie re-set to {b} though it sent one"),
                (Some(_), None) => {}
            }
            let b = bucket.unwrap();
            assert_eq!(
                green_now,
                b < pct * 100,
                "client {i} bucket {b} at {pct} %: served {body}"
            );
            assert!(
                green_now || !was_green[i],
                "client {i} moved back from green to blue at {pct} %"
            );
            was_green[i] = green_now;
            greens += usize::from(green_now);
        }
        if pct == 100 {
            assert_eq!(greens, 300);
        } else {
            // Loose: the exact rule is checked per client above.
            assert!(greens > 0 && greens < 300, "{greens} green at {pct} %");
        }
    }
    // At 100 % green (no split) a new client gets no cookie.
    let (_, h, body) = proxy.get("/").await;
    assert_eq!(body, "green");
    assert!(h.get("set-cookie").is_none(), "cookie set at 100 %: {h:?}");

    // Rollback: every client back to blue, whatever its bucket.
    let v = proxy.admin.ok("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(v["live"], "blue", "{v}");
    for (i, bucket) in buckets.iter().enumerate() {
        let cookie = format!("switchyard_bucket={}", bucket.unwrap());
        let (s, h, body) = proxy.get_with("/", &[("cookie", &cookie)]).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"), "client {i}");
        assert!(h.get("set-cookie").is_none());
    }

    // A cookie that is not a bucket is ignored: a fresh bucket is drawn and set.
    proxy
        .admin
        .ok("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    for bad in [
        "switchyard_bucket=abc",
        "switchyard_bucket=10000",
        "switchyard_bucket=",
    ] {
        let (s, h, _) = proxy.get_with("/", &[("cookie", bad)]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            set_cookie_bucket(&h).is_some_and(|b| b < 10_000),
            "{bad}: {h:?}"
        );
    }
    // The cookie is found among others.
    let (_, h, body) = proxy
        .get_with("/", &[("cookie", "a=1; switchyard_bucket=9999; b=2")])
        .await;
    assert_eq!(body, "blue");
    assert!(h.get("set-cookie").is_none());
    let (_, _, body) = proxy
        .get_with("/", &[("cookie", "a=1; switchyard_bucket=0")])
        .await;
    assert_eq!(body, "green");
}

// ===== 4. Preview =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_header_reaches_green_or_503_never_blue() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy =
        TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&health_every("100ms"))])
            .await;
    let preview = [("x-switchyard-pool", "green")];

    let (s, h, body) = proxy.get_with("/", &preview).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "green"));
    assert_eq!(header(&h, "x-switchyard-pool"), "green");
    assert!(h.get("set-cookie").is_none(), "preview sets no cookie");
    let (_, _, body) = proxy.get("/").await;
    assert_eq!(body, "blue", "without the header, the live pool");
    let (_, _, body) = proxy.get_with("/", &[("x-switchyard-pool", "blue")]).await;
    assert_eq!(body, "blue");
    // Not a pool: ignored.
    let (s, _, body) = proxy
        .get_with("/", &[("x-switchyard-pool", "purple")])
        .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    // The backend learns the pool it serves for.
    let (_, _, body) = proxy.get_with("/headers", &preview).await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["x-switchyard-pool"], "green", "{v}");

    // Green unhealthy: preview answers 503, and blue is never reached.
    green.set_healthy(false);
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == false
        })
        .await,
        "green was not marked unhealthy"
    );
    let blue_hits = blue.hits();
    for _ in 0..20 {
        let (s, h, body) = proxy.get_with("/", &preview).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            body.contains("no healthy backend") && body.contains("green"),
            "{body}"
        );
        assert!(h.get("x-upstream").is_none());
        assert_eq!(header(&h, "x-switchyard-pool"), "green");
    }
    assert_eq!(blue.hits(), blue_hits, "a preview request reached blue");
    // Everyone else is unaffected.
    let (s, _, body) = proxy.get("/").await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    // And the switch gate refuses the unhealthy pool, changing nothing.
    let before = proxy.admin.service("web").await;
    let (s, v) = proxy
        .admin
        .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_healthy_backend")),
        "{v}"
    );
    let after = proxy.admin.service("web").await;
    assert_eq!(
        (generation(&before), &before["weights"]),
        (generation(&after), &after["weights"])
    );

    // Healthy again: preview works again.
    green.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(5), || async {
            proxy.get_with("/", &preview).await.2 == "green"
        })
        .await
    );

    // Green replaced by a backend that never passes a check: the pool has
    // no backend that may take traffic, so preview is 503, never blue.
    let never = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let never = never.local_addr().unwrap();
    let (s, v) = proxy
        .admin
        .put(
            "/api/v1/services/web/pools/green",
            &json!({ "backends": [never.to_string()] }).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let blue_hits = blue.hits();
    for _ in 0..10 {
        let (s, _, body) = proxy.get_with("/", &preview).await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    assert_eq!(blue.hits(), blue_hits, "a preview request reached blue");
    let v = proxy.admin.service("web").await;
    assert_eq!(v["pools"]["green"]["backends"][0]["healthy"], false, "{v}");
    // Nor does it pass the switch gate.
    let (s, v) = proxy
        .admin
        .post("/api/v1/services/web/split", r#"{"green":10}"#)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("no_healthy_backend")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_to_a_dead_green_pool_never_falls_back_to_blue() {
    let blue = Upstream::start("blue").await;
    // A port nothing listens on.
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[dead])]).await;
    let before = blue.hits();
    for _ in 0..12 {
        let (s, h, body) = proxy.get_with("/", &[("x-switchyard-pool", "green")]).await;
        assert!(
            s == StatusCode::BAD_GATEWAY || s == StatusCode::SERVICE_UNAVAILABLE,
            "{s} {body}"
        );
        assert_eq!(header(&h, "x-switchyard-pool"), "green");
    }
    assert_eq!(blue.hits(), before, "a preview request reached blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_with_a_token_ignores_a_wrong_or_missing_token() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[
        Svc::new("web", &[&blue], &[&green]).extra("[service.preview]\ntoken = \"letmein-42\"")
    ])
    .await;
    for (value, want) in [
        ("green", "blue"),
        ("green;token=nope", "blue"),
        ("green;token=letmein-4", "blue"),
        ("green;token=letmein-42x", "blue"),
        ("green;letmein-42", "blue"),
        ("green;token=letmein-42", "green"),
    ] {
        let (s, _, body) = proxy.get_with("/", &[("x-switchyard-pool", value)]).await;
        assert_eq!(
            (s, body.as_str()),
            (StatusCode::OK, want),
            "x-switchyard-pool: {value}"
        );
    }
    // The token does not travel to the backend.
    let (_, _, body) = proxy
        .get_with(
            "/headers",
            &[("x-switchyard-pool", "green;token=letmein-42")],
        )
        .await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["headers"]["x-switchyard-pool"], "green", "{v}");
    assert!(!body.contains("letmein-42"), "{body}");
}

// ===== 5. Rollback and history =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_undoes_cutover_aborts_canary_and_goes_to_a_generation() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;

    // Nothing to roll back to yet.
    let (s, v) = admin.post("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("nothing_to_roll_back")),
        "{v}"
    );
    assert_eq!(generation(&admin.service("web").await), 1);

    // Undo a cutover.
    let (s, v) = admin
        .call(
            "POST",
            "/api/v1/services/web/switch",
            Some(r#"{"to":"green"}"#),
            &[("x-change-reason", "release 42")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((v["live"].as_str(), generation(&v)), (Some("green"), 2));
    assert_eq!(proxy.get("/").await.2, "green");
    let v = admin
        .ok(
            "/api/v1/services/web/rollback",
            r#"{"reason":"bad release"}"#,
        )
        .await;
    assert_eq!(
        (v["live"].as_str(), generation(&v)),
        (Some("blue"), 3),
        "{v}"
    );
    assert_eq!(proxy.get("/").await.2, "blue");

    // Abort a canary: 10 %, 30 %, then rollback: all blue.
    admin
        .ok("/api/v1/services/web/split", r#"{"green":10}"#)
        .await;
    let v = admin
        .ok("/api/v1/services/web/split", r#"{"green":30}"#)
        .await;
    assert_eq!((v["live"].as_str(), generation(&v)), (Some("split"), 5));
    let v = admin.ok("/api/v1/services/web/rollback", "").await;
    assert_eq!(
        (v["live"].as_str(), generation(&v)),
        (Some("blue"), 6),
        "{v}"
    );
    assert_eq!(v["weights"], json!({"blue": 100, "green": 0}));
    for _ in 0..50 {
        // Even with a cookie from the canary that pinned it to green.
        let (_, _, body) = proxy
            .get_with("/", &[("cookie", "switchyard_bucket=0")])
            .await;
        assert_eq!(body, "blue");
    }

    // Back to the weights of generation 5.
    let v = admin
        .ok("/api/v1/services/web/rollback", r#"{"to_generation":5}"#)
        .await;
    assert_eq!(v["weights"], json!({"blue": 70, "green": 30}), "{v}");
    assert_eq!((v["live"].as_str(), generation(&v)), (Some("split"), 7));
    // A generation not in history: refused, nothing changes.
    let (s, v) = admin
        .post("/api/v1/services/web/rollback", r#"{"to_generation":99}"#)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("to_generation"),
        "{v}"
    );
    assert_eq!(generation(&admin.service("web").await), 7);
    // Rolling back the restored canary returns to blue, the last pool at 100 %.
    let v = admin.ok("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(
        (v["live"].as_str(), generation(&v)),
        (Some("blue"), 8),
        "{v}"
    );

    // History: newest first, with action, weights, reason and actor.
    let (s, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(s, StatusCode::OK);
    let h = h.as_array().unwrap();
    let gens: Vec<u64> = h
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .collect();
    assert_eq!(gens, vec![8, 7, 6, 5, 4, 3, 2, 1]);
    let actions: Vec<&str> = h.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        vec!["rollback", "rollback", "rollback", "split", "split", "rollback", "switch", "init"]
    );
    let by_gen = |g: u64| &h[h.len() - g as usize];
    assert_eq!(by_gen(2)["reason"], "release 42");
    assert_eq!(by_gen(2)["from"], json!({"blue": 100, "green": 0}));
    assert_eq!(by_gen(2)["to"], json!({"blue": 0, "green": 100}));
    assert_eq!(by_gen(3)["reason"], "bad release");
    assert_eq!(by_gen(4)["reason"], Value::Null);
    assert_eq!(by_gen(7)["to"], json!({"blue": 70, "green": 30}));
    for e in &h[..h.len() - 1] {
        assert_eq!(
            e["actor"], "127.0.0.1",
            "no token: the client address is the actor: {e}"
        );
        let at = e["at"].as_str().unwrap();
        assert!(
            at.len() >= 20 && at.ends_with('Z') && at.as_bytes()[10] == b'T',
            "at {at}"
        );
    }
    assert_eq!(by_gen(1)["actor"], "config");
}

// ===== 6. Pool replacement =====

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_idle_pool_then_switching_serves_the_new_backends() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let green2 = Upstream::start("green2").await;
    let proxy =
        TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&health_every("100ms"))])
            .await;
    let admin = &proxy.admin;
    let pools = |v: &Value, c: &str| -> Vec<String> {
        v["pools"][c]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["addr"].as_str().unwrap().to_string())
            .collect()
    };

    // Green is idle: replaced.
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/green",
            &json!({"backends": [green2.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(pools(&v, "green"), vec![green2.addr.to_string()]);
    assert_eq!((generation(&v), v["live"].as_str()), (2, Some("blue")));
    // The new backend takes traffic once its first check passed.
    assert!(
        eventually(Duration::from_secs(5), || async {
            admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == true
        })
        .await
    );
    let old_green = green.hits();
    admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    for _ in 0..20 {
        let (s, h, body) = proxy.get("/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "green2"));
        assert_eq!(header(&h, "x-switchyard-pool"), "green");
    }
    assert_eq!(green.hits(), old_green, "the replaced backend got traffic");

    // Green is live now: replacing it without force is refused, nothing changes.
    let before = admin.service("web").await;
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/green",
            &json!({"backends": [green.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"]["code"], "pool_takes_traffic");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("green"),
        "{v}"
    );
    let after = admin.service("web").await;
    assert_eq!(generation(&after), generation(&before));
    assert_eq!(pools(&after, "green"), vec![green2.addr.to_string()]);
    assert_eq!(proxy.get("/").await.2, "green2");
    // A split counts as taking traffic too.
    admin
        .ok("/api/v1/services/web/split", r#"{"green":1}"#)
        .await;
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/blue",
            &json!({"backends": [green.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("pool_takes_traffic"))
    );
    // With force it goes through.
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/green",
            &json!({"backends": [green.addr.to_string()], "force": true, "reason": "hotfix"})
                .to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(pools(&v, "green"), vec![green.addr.to_string()]);
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(h[0]["action"], "pool");
    assert_eq!(h[0]["reason"], "hotfix");

    // Unknown color, unknown service: 404.
    let body = json!({"backends": [green.addr.to_string()]}).to_string();
    let (s, v) = admin.put("/api/v1/services/web/pools/purple", &body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_color")),
        "{v}"
    );
    let (s, v) = admin.put("/api/v1/services/nope/pools/green", &body).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_service")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_finish_on_their_pool_across_switch_and_replacement() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let blue2 = Upstream::start("blue2").await;
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let client = http1_client();

    // A slow answer and a long streamed body, both started on blue.
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), proxy.url("/sleep/600"));
        async move { get(&client, &url, &[]).await }
    });
    let resp = client
        .request(
            Request::get(proxy.url("/bytes/20000000"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(header(resp.headers(), "x-upstream"), "blue");
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    let mut received = first.data_ref().map_or(0, |d| d.len());
    assert!(
        eventually(Duration::from_secs(5), || async { blue.hits() >= 2 }).await,
        "the slow request reached blue"
    );

    // Cut over, then replace blue's backends outright.
    proxy
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(proxy.get("/").await.2, "green");
    let (s, v) = proxy
        .admin
        .put(
            "/api/v1/services/web/pools/blue",
            &json!({"backends": [blue2.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");

    // Both finish, complete, from blue.
    let (s, h, text) = slow.await.unwrap();
    assert_eq!((s, text.as_str()), (StatusCode::OK, "blue"));
    assert_eq!(header(&h, "x-switchyard-pool"), "blue");
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(received, 20_000_000);
    assert_eq!(blue2.hits(), 0);
}
