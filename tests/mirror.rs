//! Traffic mirroring (SPEC §9, issue 11 items 7 and 8): copies reach the
//! idle pool marked and with the live request id, sampled per request id;
//! bodies are copied only for listed methods and up to the limit, and the
//! live request gets its body intact either way; a slow failing canary
//! costs clients nothing and never sees more copies at once than the cap;
//! a canary with no healthy backend gets nothing and nothing is re-sent to
//! the live pool; the mismatch counter; the admin API with its refusals,
//! If-Match, history, persistence and restart.

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use support::*;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One request as the mirror pool's backend saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    mirror: Option<String>,
    request_id: Option<String>,
    pool: Option<String>,
    body: Bytes,
}

/// A backend for the mirror pool that records every request (but
/// `/healthz`), counts those in progress (and the most at once), and can
/// hold them until released and fail every other one.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    open: watch::Sender<bool>,
}

impl Recorder {
    /// `hold`: requests wait until [`Recorder::release`] (at most 60 s);
    /// `fail_half`: every other request answers 500.
    async fn start(hold: bool, fail_half: bool) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let active = Arc::new(AtomicUsize::new(0));
        let max_active = Arc::new(AtomicUsize::new(0));
        let (open, open_rx) = watch::channel(!hold);
        let served = Arc::new(AtomicUsize::new(0));
        let (s, a, m) = (seen.clone(), active.clone(), max_active.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (s, a, m, rx, served) = (
                    s.clone(),
                    a.clone(),
                    m.clone(),
                    open_rx.clone(),
                    served.clone(),
                );
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (s, a, m, mut rx, served) =
                            (s.clone(), a.clone(), m.clone(), rx.clone(), served.clone());
                        async move {
                            if req.uri().path() == "/healthz" {
                                return Ok::<_, Infallible>(Response::new(full("ok")));
                            }
                            let now = a.fetch_add(1, Ordering::SeqCst) + 1;
                            m.fetch_max(now, Ordering::SeqCst);
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let mut seen = Seen {
                                method: req.method().to_string(),
                                path: req.uri().to_string(),
                                mirror: h("x-switchyard-mirror"),
                                request_id: h("x-request-id"),
                                pool: h("x-switchyard-pool"),
                                body: Bytes::new(),
                            };
                            seen.body = req.into_body().collect().await.unwrap().to_bytes();
                            s.lock().unwrap().push(seen);
                            let _ = tokio::time::timeout(
                                Duration::from_secs(60),
                                rx.wait_for(|open| *open),
                            )
                            .await;
                            a.fetch_sub(1, Ordering::SeqCst);
                            let n = served.fetch_add(1, Ordering::SeqCst);
                            let mut r = Response::new(full("green"));
                            if fail_half && n % 2 == 1 {
                                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                            }
                            Ok(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Recorder {
            addr,
            seen,
            active,
            max_active,
            open,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn release(&self) {
        let _ = self.open.send(true);
    }
}

fn svc(blue: &Upstream, green: SocketAddr) -> Svc {
    Svc::addrs("web", &[blue.addr], &[green])
}

async fn put_mirror(admin: &Admin, body: Value) -> Value {
    let (s, v) = admin
        .put("/api/v1/services/web/mirror", &body.to_string())
        .await;
    assert_eq!(s, StatusCode::OK, "PUT mirror {body}: {v}");
    v
}

async fn counters(admin: &Admin) -> Value {
    let (s, v) = admin.get("/api/v1/services/web/mirror").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["counters"].clone()
}

/// Waits until no copy is in flight and `sent` copies were sent.
async fn settled(admin: &Admin, sent: u64) -> Value {
    let last = Arc::new(Mutex::new(Value::Null));
    let ok = eventually(Duration::from_secs(30), || {
        let last = Arc::clone(&last);
        async move {
            let c = counters(admin).await;
            let done = c["in_flight"] == 0 && c["sent"] == sent;
            *last.lock().unwrap() = c;
            done
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    assert!(ok, "copies did not settle at {sent} sent: {last}");
    last
}

/// Waits until no copy is in flight, whatever the number sent: a copy
/// holds its in-flight slot from its selection (before the live response
/// returns) until its outcome is recorded, so `sent` read with
/// `in_flight == 0` is final. (`sent` read right after the last live
/// response may miss a copy whose task has not run yet.)
async fn quiet(admin: &Admin) -> Value {
    let last = Arc::new(Mutex::new(Value::Null));
    let ok = eventually(Duration::from_secs(30), || {
        let last = Arc::clone(&last);
        async move {
            let c = counters(admin).await;
            let done = c["in_flight"] == 0;
            *last.lock().unwrap() = c;
            done
        }
    })
    .await;
    let last = last.lock().unwrap().clone();
    assert!(ok, "copies still in flight: {last}");
    last
}

fn sample(m: &str, series: &str) -> f64 {
    metric(m, series).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_arrive_marked_with_the_live_request_id_sampled_per_request_id() {
    let blue = Upstream::start("blue").await;
    let green = Recorder::start(false, false).await;
    let p = TestProxy::start(&[svc(&blue, green.addr)]).await;
    put_mirror(&p.admin, json!({"to": "green", "percent": 100})).await;

    // Every copy: same method, target and request id, marked, and sent
    // to the mirror pool; every client answer from the live pool.
    for i in 0..20 {
        let id = format!("req-{i}");
        let (s, h, body) = p
            .get_with(&format!("/page?i={i}"), &[("x-request-id", &id)])
            .await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
        assert_eq!(h["x-request-id"], id.as_str());
    }
    // A client's claim to be a copy never reaches the live pool; a request
    // without an id is copied with the id the proxy gave it.
    let (s, h, live_head) = p
        .get_with("/headers", &[("x-switchyard-mirror", "1")])
        .await;
    assert_eq!(s, StatusCode::OK);
    let live_head: Value = serde_json::from_str(&live_head).unwrap();
    assert!(
        live_head["headers"].get("x-switchyard-mirror").is_none(),
        "{live_head}"
    );
    let generated = h["x-request-id"].to_str().unwrap().to_string();
    settled(&p.admin, 21).await;
    let seen = green.seen();
    assert_eq!(seen.len(), 21, "{seen:?}");
    // Copies run detached: they may arrive in any order.
    let by_id: HashMap<String, &Seen> = seen
        .iter()
        .map(|c| (c.request_id.clone().unwrap_or_default(), c))
        .collect();
    for i in 0..20 {
        let copy = by_id[&format!("req-{i}")];
        assert_eq!(copy.method, "GET");
        assert_eq!(copy.path, format!("/page?i={i}"));
        assert_eq!(copy.mirror.as_deref(), Some("1"));
        assert_eq!(copy.pool.as_deref(), Some("green"));
    }
    assert_eq!(by_id[&generated].path, "/headers");
    assert_eq!(by_id[&generated].mirror.as_deref(), Some("1"));
    assert_eq!(blue.hits(), 21, "the live pool got each request once");

    // Copies count in the mirror series only, never as requests.
    let m = p.admin.metrics().await;
    let mirror_2xx = r#"switchyard_mirror_requests_total{code="2xx",pool="green",service="web"}"#;
    assert_eq!(sample(&m, mirror_2xx), 21.0, "{m}");
    assert_eq!(
        sample(
            &m,
            r#"switchyard_requests_total{code="2xx",pool="blue",service="web"}"#
        ),
        21.0
    );
    for code in ["2xx", "4xx", "5xx"] {
        let s = format!(r#"switchyard_requests_total{{code="{code}",pool="green",service="web"}}"#);
        assert_eq!(sample(&m, &s), 0.0, "{s}");
    }
    assert!(
        sample(
            &m,
            r#"switchyard_mirror_duration_seconds_count{pool="green",service="web"}"#
        ) == 21.0,
        "{m}"
    );

    // 30 %: roughly 30 % of 400 distinct ids, and the same ids again
    // are copied again (the choice is a function of the request id).
    put_mirror(&p.admin, json!({"to": "green", "percent": 30})).await;
    for round in 0..2 {
        for i in 0..400 {
            let id = format!("sample-{i}");
            let (s, _, _) = p.get_with("/", &[("x-request-id", &id)]).await;
            assert_eq!(s, StatusCode::OK, "round {round} {id}");
        }
    }
    let c = quiet(&p.admin).await;
    let sent = c["sent"].as_u64().unwrap();
    assert_eq!(green.seen().len() as u64, sent, "every copy sent arrived");
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for copy in green.seen().iter().skip(21) {
        *per_id.entry(copy.request_id.clone().unwrap()).or_default() += 1;
    }
    let copied = per_id.len();
    assert!(
        (80..=160).contains(&copied),
        "{copied} of 400 ids copied at 30 %"
    );
    assert!(
        per_id.values().all(|&n| n == 2),
        "an id copied once but not twice: {per_id:?}"
    );
    assert_eq!(c["dropped"]["max_inflight"], 0, "{c}");
    p.shutdown().await;
}

fn streamed(chunks: Vec<Bytes>) -> Body {
    let frames = chunks
        .into_iter()
        .map(|c| Ok::<_, hyper::Error>(Frame::data(c)));
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Sends `method /count` with `body`; returns the live pool's count.
async fn count(p: &TestProxy, method: &str, id: &str, body: Body) -> String {
    let req = Request::builder()
        .method(method)
        .uri(p.url("/count"))
        .header("x-request-id", id)
        .body(body)
        .unwrap();
    let resp = p.client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{method} {id}");
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&b).into_owned()
}

fn pattern(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_copied_only_for_listed_methods_and_up_to_the_limit_and_live_bodies_stay_intact()
{
    let blue = Upstream::start("blue").await;
    let green = Recorder::start(false, false).await;
    let p = TestProxy::start(&[svc(&blue, green.addr)]).await;
    put_mirror(&p.admin, json!({"to": "green", "percent": 100})).await;

    // Default methods: a POST is served, not copied.
    assert_eq!(
        count(&p, "POST", "post-default", full(pattern(1000))).await,
        "1000"
    );
    p.get_with("/", &[("x-request-id", "get-after")]).await;
    settled(&p.admin, 1).await;
    let ids: Vec<_> = green.seen().into_iter().map(|s| s.request_id).collect();
    assert_eq!(ids, [Some("get-after".to_string())]);

    // Listed: known length, streamed (chunked) and held (small idempotent
    // PUT) bodies are copied whole.
    put_mirror(
        &p.admin,
        json!({"to": "green", "percent": 100, "methods": ["GET", "POST", "PUT"], "max_body_bytes": 1024}),
    )
    .await;
    assert_eq!(
        count(&p, "POST", "post-known", full(pattern(1000))).await,
        "1000"
    );
    let chunks: Vec<Bytes> = (0..5).map(|_| pattern(100)).collect();
    assert_eq!(
        count(&p, "POST", "post-chunked", streamed(chunks)).await,
        "500"
    );
    assert_eq!(
        count(&p, "PUT", "put-held", full(pattern(100))).await,
        "100"
    );
    // Over the limit: the live pool gets every byte, the copy is dropped.
    assert_eq!(
        count(&p, "POST", "post-big", full(pattern(5000))).await,
        "5000"
    );
    let big: Vec<Bytes> = (0..50).map(|_| pattern(4096)).collect();
    assert_eq!(
        count(&p, "POST", "post-big-chunked", streamed(big)).await,
        "204800"
    );
    let c = settled(&p.admin, 4).await;
    assert_eq!(c["dropped"]["body_too_large"], 2, "{c}");
    let seen: HashMap<String, Seen> = green
        .seen()
        .into_iter()
        .map(|s| (s.request_id.clone().unwrap(), s))
        .collect();
    assert_eq!(seen.len(), 4, "{seen:?}");
    assert_eq!(seen["post-known"].body, pattern(1000));
    assert_eq!(seen["post-known"].method, "POST");
    let mut five = Vec::new();
    for _ in 0..5 {
        five.extend_from_slice(&pattern(100));
    }
    assert_eq!(seen["post-chunked"].body, Bytes::from(five));
    assert_eq!(seen["put-held"].body, pattern(100));
    assert_eq!(seen["put-held"].method, "PUT");
    assert!(!seen.contains_key("post-big") && !seen.contains_key("post-big-chunked"));
    let m = p.admin.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_mirror_dropped_total{reason="body_too_large",service="web"}"#
        ),
        2.0,
        "{m}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_failing_canary_costs_clients_nothing_and_never_sees_more_copies_than_the_cap() {
    let blue = Upstream::start("blue").await;
    // Holds every copy until released, then fails every other one.
    let green = Recorder::start(true, true).await;
    let p = TestProxy::start(&[svc(&blue, green.addr)]).await;
    put_mirror(
        &p.admin,
        json!({"to": "green", "percent": 100, "max_inflight": 4, "timeout": "90s"}),
    )
    .await;

    // 4 clients × 50 requests, all answered while the canary holds every
    // copy it got: no client waits for a copy.
    let mut tasks = Vec::new();
    for c in 0..4 {
        let client = http1_client();
        let url = p.url("/");
        tasks.push(tokio::spawn(async move {
            let mut bad = 0;
            for i in 0..50 {
                let id = format!("c{c}-{i}");
                let (s, _, body) = get(&client, &url, &[("x-request-id", &id)]).await;
                if s != StatusCode::OK || body != "blue" {
                    bad += 1;
                }
            }
            bad
        }));
    }
    let mut client_errors = 0;
    for t in tasks {
        client_errors += t.await.unwrap();
    }
    assert_eq!(client_errors, 0);
    assert_eq!(blue.hits(), 200);
    let c = counters(&p.admin).await;
    assert_eq!(
        c["in_flight"], 4,
        "the cap is full while the canary holds: {c}"
    );
    assert_eq!(c["dropped"]["max_inflight"], 196, "{c}");
    let held = eventually(Duration::from_secs(20), || async {
        green.active.load(Ordering::SeqCst) == 4
    })
    .await;
    assert!(held, "the canary holds the 4 copies");

    // Released, the canary answers; then more traffic with it answering.
    green.release();
    settled(&p.admin, 4).await;
    for i in 0..40 {
        let (s, _, _) = p
            .get_with("/", &[("x-request-id", &format!("late-{i}"))])
            .await;
        assert_eq!(s, StatusCode::OK);
    }
    let c = quiet(&p.admin).await;
    let sent = c["sent"].as_u64().unwrap();
    assert!(
        green.max_active.load(Ordering::SeqCst) <= 4,
        "the canary saw {} copies at once",
        green.max_active.load(Ordering::SeqCst)
    );
    assert_eq!(green.seen().len() as u64, sent, "no retries");
    assert_eq!(blue.hits(), 240, "nothing re-sent to the live pool");

    // Every copy was compared with its 2xx live answer: the 5xx ones
    // mismatch, the others match.
    let m = p.admin.metrics().await;
    let ok = sample(
        &m,
        r#"switchyard_mirror_requests_total{code="2xx",pool="green",service="web"}"#,
    );
    let failed = sample(
        &m,
        r#"switchyard_mirror_requests_total{code="5xx",pool="green",service="web"}"#,
    );
    assert_eq!(ok + failed, sent as f64, "{m}");
    assert!(
        failed >= 2.0 && ok >= 2.0,
        "half fail: {ok} ok, {failed} failed"
    );
    assert_eq!(
        sample(&m, r#"switchyard_mirror_mismatches_total{service="web"}"#),
        failed,
        "{m}"
    );
    assert_eq!(c["mismatches"].as_f64(), Some(failed), "{c}");
    let g = &c["pools"]["green"];
    assert_eq!(g["requests"].as_f64(), Some(ok + failed), "{c}");
    assert_eq!(g["failures"].as_f64(), Some(failed), "{c}");
    assert_eq!(g["mirror_failed_live_ok"].as_f64(), Some(failed), "{c}");
    assert_eq!(
        sample(
            &m,
            r#"switchyard_requests_total{code="5xx",pool="blue",service="web"}"#
        ),
        0.0
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_without_a_healthy_backend_gets_no_copies_and_nothing_is_resent_to_the_live_pool()
{
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    green.set_healthy(false);
    let svc = Svc::new("web", &[&blue], &[&green]).extra(&health_every("100ms"));
    let p = TestProxy::start(&[svc]).await;
    let down = eventually(Duration::from_secs(20), || async {
        p.admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == json!(false)
    })
    .await;
    assert!(down, "green never turned unhealthy");
    put_mirror(&p.admin, json!({"to": "green", "percent": 100})).await;
    for i in 0..30 {
        let (s, h, body) = p.get_with("/", &[("x-request-id", &format!("r{i}"))]).await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
        assert_eq!(h["x-switchyard-pool"], "blue");
    }
    let c = counters(&p.admin).await;
    assert_eq!(c["dropped"]["no_healthy_backend"], 30, "{c}");
    assert_eq!(
        (c["sent"].clone(), c["in_flight"].clone()),
        (json!(0), json!(0))
    );
    assert_eq!(green.hits(), 0, "no copy reached the canary");
    assert_eq!(
        blue.hits(),
        30,
        "the live pool got each request exactly once"
    );
    let m = p.admin.metrics().await;
    assert_eq!(
        sample(
            &m,
            r#"switchyard_mirror_dropped_total{reason="no_healthy_backend",service="web"}"#
        ),
        30.0,
        "{m}"
    );
    p.shutdown().await;
}

async fn spawn(config: &Path) -> ProxyProcess {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, &[]))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mirror_api_refuses_bad_input_guards_with_if_match_records_history_and_survives_restart(
) {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = TempDir::new("mirror-api");
    let config = dir.join("switchyard.toml");
    let text = config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]);
    std::fs::write(&config, text).unwrap();
    let p = spawn(&config).await;
    let admin = Admin::new(p.admin);
    let client = http1_client();
    let url = format!("http://{}/", p.proxy);

    let (s, v) = admin.get("/api/v1/services/web/mirror").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!((&v["enabled"], &v["mirror"]), (&json!(false), &Value::Null));
    let generation = v["generation"].as_u64().unwrap();
    assert_eq!(admin.service("web").await["mirror"], Value::Null);

    // Refusals name the field and change nothing.
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"percent":10}"#, "invalid_field", "to"),
        (r#"{"to":"purple","percent":10}"#, "invalid_field", "to"),
        (r#"{"to":"blue","percent":10}"#, "invalid_field", "to"),
        (r#"{"to":"green"}"#, "invalid_field", "percent"),
        (r#"{"to":"green","percent":0}"#, "invalid_field", "percent"),
        (
            r#"{"to":"green","percent":150}"#,
            "invalid_field",
            "percent",
        ),
        (
            r#"{"to":"green","percent":"10"}"#,
            "invalid_field",
            "percent",
        ),
        (
            r#"{"to":"green","percent":10,"methods":["get"]}"#,
            "invalid_field",
            "methods",
        ),
        (
            r#"{"to":"green","percent":10,"methods":[]}"#,
            "invalid_field",
            "methods",
        ),
        (
            r#"{"to":"green","percent":10,"max_body_bytes":-5}"#,
            "invalid_field",
            "max_body_bytes",
        ),
        (
            r#"{"to":"green","percent":10,"max_inflight":0}"#,
            "invalid_field",
            "max_inflight",
        ),
        (
            r#"{"to":"green","percent":10,"timeout":"forever"}"#,
            "invalid_field",
            "timeout",
        ),
        (
            r#"{"to":"green","percent":10,"timeout":"0s"}"#,
            "invalid_field",
            "timeout",
        ),
        (
            r#"{"to":"green","percent":10,"colour":1}"#,
            "unknown_field",
            "colour",
        ),
        (r#"[1]"#, "invalid_json", ""),
        (r#"{"to":"#, "invalid_json", ""),
    ];
    for (body, code, field) in cases {
        let (s, v) = admin.put("/api/v1/services/web/mirror", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], *code, "{body}: {v}");
        let named = v["error"]["field"].as_str().unwrap_or_default() == *field
            || v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(field);
        assert!(named, "{body}: {v} does not name `{field}`");
    }
    let (s, _) = admin
        .put(
            "/api/v1/services/nope/mirror",
            r#"{"to":"green","percent":10}"#,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = admin
        .post(
            "/api/v1/services/web/mirror",
            r#"{"to":"green","percent":10}"#,
        )
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let body = r#"{"to":"green","percent":100,"timeout":"2s","reason":"shadow v2"}"#;
    let stale = format!("\"{}\"", generation + 3);
    let (s, v) = admin
        .call(
            "PUT",
            "/api/v1/services/web/mirror",
            Some(body),
            &[("if-match", &stale)],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{v}");
    let (_, v) = admin.get("/api/v1/services/web/mirror").await;
    assert_eq!(
        (&v["enabled"], v["generation"].as_u64()),
        (&json!(false), Some(generation))
    );
    get(&client, &url, &[]).await;
    assert_eq!(green.hits(), 0);

    // Accepted: a new generation, in history, in the service object, on
    // disk, and in force for the next request.
    let current = format!("\"{generation}\"");
    let (s, v) = admin
        .call(
            "PUT",
            "/api/v1/services/web/mirror",
            Some(body),
            &[("if-match", &current)],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["generation"].as_u64(), Some(generation + 1));
    assert_eq!(
        v["mirror"],
        json!({"to": "green", "percent": 100, "methods": ["GET", "HEAD"],
               "max_body_bytes": 65536, "max_inflight": 64, "timeout": "2s"})
    );
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(h[0]["action"], "mirror", "{h}");
    assert_eq!(h[0]["reason"], "shadow v2");
    assert_eq!(h[0]["mirror"]["from"], Value::Null);
    assert_eq!(h[0]["mirror"]["to"]["to"], "green");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["services"]["web"]["mirror"]["percent"], 100,
        "{state}"
    );
    let m = admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchyard_routing_changes_total{action="mirror",service="web"}"#
        ),
        Some(1.0)
    );
    get(&client, &url, &[]).await;
    assert!(
        eventually(Duration::from_secs(10), || async { green.hits() == 1 }).await,
        "the next request was copied"
    );

    // A restart keeps it, and copies flow again.
    drop(p);
    let p = spawn(&config).await;
    let admin = Admin::new(p.admin);
    let url = format!("http://{}/", p.proxy);
    let (_, v) = admin.get("/api/v1/services/web/mirror").await;
    assert_eq!(
        (&v["enabled"], &v["mirror"]["timeout"]),
        (&json!(true), &json!("2s")),
        "{v}"
    );
    let (s, _, body) = get(&client, &url, &[]).await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    assert!(
        eventually(Duration::from_secs(10), || async { green.hits() == 2 }).await,
        "copied after the restart"
    );
    // A reload keeps it too (the file does not own it).
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(admin.service("web").await["mirror"]["to"], "green");

    // DELETE stops it, recorded like any change.
    let (s, v) = admin
        .call(
            "DELETE",
            "/api/v1/services/web/mirror",
            None,
            &[("x-change-reason", "done")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["mirror"], Value::Null);
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(
        (&h[0]["action"], &h[0]["reason"]),
        (&json!("mirror"), &json!("done"))
    );
    assert_eq!(h[0]["mirror"]["to"], Value::Null);
    get(&client, &url, &[]).await;
    let m = admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchyard_mirror_requests_total{code="2xx",pool="green",service="web"}"#
        ),
        Some(1.0),
        "one copy since the restart, none after DELETE: {m}"
    );
    assert_eq!(green.hits(), 2);

    // `ctl mirror`: set, show, stop; a half-given mirror is a usage error.
    let admin_url = format!("http://{}", p.admin);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--admin", admin_url.as_str()];
        all.extend_from_slice(args);
        run_binary(&all)
    };
    let (code, out, err) = ctl(&[
        "mirror",
        "web",
        "--to",
        "green",
        "--percent",
        "50",
        "--reason",
        "ctl",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("mirror: 50% to green (GET,HEAD"), "{out}");
    let (code, out, err) = ctl(&["mirror", "web"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sent ") && out.contains("max_inflight=0"),
        "{out}"
    );
    let (code, out, err) = ctl(&["mirror", "web", "--off"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("mirror:"), "{out}");
    let (code, _, err) = ctl(&["mirror", "web", "--to", "green"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = ctl(&["mirror", "web", "--to", "blue", "--percent", "10"]);
    assert_eq!(code, 1, "blue is live: {err}");
    assert!(err.contains("to:"), "{err}");
}
