//! Progressive rollouts (SPEC §10, issue 11) against real upstreams on
//! loopback: automatic rollback with the exact user impact, the same bad
//! canary at about 20 requests/s rolled back before its weight passes 5 %
//! (item 2; ~90-120 s, ~110 canary requests), min_requests, a healthy
//! rollout with sticky clients, the operator verbs, both pools
//! failing, the latency rule, and a restart (kill -9) that resumes the
//! same step with the time it had left.
//!
//! Load is driven by bounded loops (a count and a deadline each); waits are
//! on the rollout's own state, never on sleeps, and no assertion bounds a
//! wall-clock duration tightly.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::*;
use tokio::net::TcpListener;

/// An upstream whose faults the test sets: every `fail_every`-th request
/// (0: none) answers 500, and every request waits `delay_ms` first.
struct Faulty {
    addr: SocketAddr,
    fail_every: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Faulty {
    async fn start(name: &'static str) -> Faulty {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail_every = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, d, s, st) = (
            Arc::clone(&fail_every),
            Arc::clone(&delay_ms),
            Arc::clone(&served),
            Arc::clone(&stop),
        );
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let (f, d, s) = (Arc::clone(&f), Arc::clone(&d), Arc::clone(&s));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (f, d, s) = (Arc::clone(&f), Arc::clone(&d), Arc::clone(&s));
                        async move {
                            let mut status = 200;
                            if req.uri().path() != "/healthz" {
                                let n = s.fetch_add(1, Ordering::SeqCst) + 1;
                                let every = f.load(Ordering::SeqCst);
                                if every > 0 && n % every == 0 {
                                    status = 500;
                                }
                                let ms = d.load(Ordering::SeqCst);
                                if ms > 0 {
                                    tokio::time::sleep(Duration::from_millis(ms)).await;
                                }
                            }
                            let mut resp = hyper::Response::new(full(name));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Faulty {
            addr,
            fail_every,
            delay_ms,
            served,
            stop,
        }
    }

    fn fail_every(&self, n: u64) {
        self.fail_every.store(n, Ordering::SeqCst);
    }

    fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
}

impl Drop for Faulty {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// What a load run saw.
#[derive(Default, Debug, Clone)]
struct Seen {
    requests: u64,
    green: u64,
    green_5xx: u64,
    blue_5xx: u64,
    other_errors: u64,
}

/// Sends GETs from `workers` clients, each paced at `per_worker_ms`,
/// until `stop` is set, `max` requests were sent, or `deadline` passed.
/// Fresh buckets on every request (no cookie kept).
async fn load(
    addr: SocketAddr,
    workers: usize,
    per_worker_ms: u64,
    max: u64,
    deadline: Duration,
    stop: Arc<AtomicBool>,
) -> Seen {
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
        tasks.push(tokio::spawn(async move {
            let client = http1_client();
            let url = format!("http://{addr}/");
            let mut seen = Seen::default();
            let mut tick = tokio::time::interval(Duration::from_millis(per_worker_ms));
            let end = tokio::time::Instant::now() + deadline;
            while !stop.load(Ordering::SeqCst)
                && tokio::time::Instant::now() < end
                && sent.fetch_add(1, Ordering::SeqCst) < max
            {
                tick.tick().await;
                let req = Request::get(&url).body(empty()).unwrap();
                match client.request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let pool = resp
                            .headers()
                            .get("x-switchyard-pool")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        let _ = resp.into_body().collect().await;
                        seen.requests += 1;
                        match (pool.as_str(), status.is_server_error()) {
                            ("green", true) => {
                                seen.green += 1;
                                seen.green_5xx += 1
                            }
                            ("green", false) => seen.green += 1,
                            ("blue", true) => seen.blue_5xx += 1,
                            ("blue", false) => {}
                            _ => seen.other_errors += 1,
                        }
                    }
                    Err(_) => seen.other_errors += 1,
                }
            }
            seen
        }));
    }
    let mut total = Seen::default();
    for t in tasks {
        let s = t.await.unwrap();
        total.requests += s.requests;
        total.green += s.green;
        total.green_5xx += s.green_5xx;
        total.blue_5xx += s.blue_5xx;
        total.other_errors += s.other_errors;
    }
    total
}

/// The rollout's impact equals what the clients saw: the canary's user
/// failures are the 5xx from green, its requests every answer from green.
/// Both figures in one poll: the view of the deciding tick misses the
/// canary responses that finished while the rollback was persisted (the
/// driver keeps counting requests in flight at the rollback).
async fn assert_exact_impact(admin: &Admin, seen: &Seen) {
    let (exact, last) = poll(admin, Duration::from_secs(15), |v| {
        v["impact"]["user_failures"].as_u64() == Some(seen.green_5xx)
            && v["impact"]["canary_requests"].as_u64() == Some(seen.green)
    })
    .await;
    assert!(
        exact,
        "impact {} vs clients' {seen:?}: {last:#}",
        last["impact"]
    );
}

async fn rollout(admin: &Admin) -> Value {
    let (s, v) = admin.get("/api/v1/services/web/rollout").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v
}

async fn start(admin: &Admin, plan: &str) -> Value {
    let (s, v) = admin
        .post(
            "/api/v1/services/web/rollout",
            &format!("{{\"plan\":{plan}}}"),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    v
}

/// Polls the rollout object every 50 ms until `pred` holds or `limit`
/// passes; returns whether it held, and the last object.
async fn poll(admin: &Admin, limit: Duration, pred: impl Fn(&Value) -> bool) -> (bool, Value) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let v = rollout(admin).await;
        if pred(&v) {
            return (true, v);
        }
        if tokio::time::Instant::now() >= deadline {
            return (false, v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (bounded) until the rollout's state is one of `states`.
async fn until_state(admin: &Admin, states: &[&str], limit: Duration) -> Value {
    let (ok, last) = poll(admin, limit, |v| {
        states.contains(&v["state"].as_str().unwrap_or(""))
    })
    .await;
    assert!(ok, "rollout never reached {states:?}: {last:#}");
    last
}

fn green_weight(v: &Value) -> f64 {
    v["weights"]["green"].as_f64().unwrap()
}

/// Item 1: a canary at 5 % 5xx against a baseline at 0.1 %, about 500
/// requests/s, is rolled back while still at the first step (1 %), and
/// `impact.user_failures` equals the 5xx from green the clients saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_canary_rolled_back_at_first_step_with_exact_user_impact() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    blue.fail_every(1000);
    green.fail_every(20);
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(load(
        p.addr,
        16,
        32,
        60_000,
        Duration::from_secs(120),
        Arc::clone(&stop),
    ));
    let started = start(
        &p.admin,
        r#"{"steps":[{"weight":1,"pause":"2m"},{"weight":10,"pause":"2m"},{"weight":100}]}"#,
    )
    .await;
    assert_eq!(started["state"], "progressing");
    assert_eq!(green_weight(&started), 1.0);
    let done = until_state(&p.admin, &["rolled_back"], Duration::from_secs(100)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = driver.await.unwrap();
    eprintln!(
        "rolled back: started {} ended {}; clients saw {seen:?}\n{}",
        done["started_at"], done["ended_at"], done["reason"]
    );
    assert_eq!(done["step"], 0, "rolled back at the 1 % step: {done:#}");
    assert_eq!(green_weight(&done), 0.0);
    // Item 5: from the deciding response to the published generation that
    // sets green to 0 %, at 500 requests/s: ≤ 1 s (one batch + one tick +
    // persisting). The figure is an upper bound: it runs from the driver's
    // reading of the counters before the deciding batch began.
    let (timed, v) = poll(&p.admin, Duration::from_secs(10), |v| {
        v["report"]["reaction"]["decision_to_publish_ms"].is_f64()
    })
    .await;
    assert!(timed, "no reaction time in the report: {v:#}");
    let reaction = &v["report"]["reaction"];
    let ms = reaction["decision_to_publish_ms"].as_f64().unwrap();
    eprintln!("reaction: decision to publish {ms:.1} ms; {reaction}");
    // The bound is on the proxy's own reaction; the fsync of the state
    // file inside it (`commit_ms`) is the disk's, and a shared CI disk
    // has taken 225 ms for one: bounded loosely on its own.
    let commit = reaction["commit_ms"].as_f64().unwrap();
    assert!(
        ms - commit <= 1000.0,
        "rollback published {ms} ms after the deciding response: {reaction}"
    );
    assert!(commit <= ms && commit <= 5000.0, "{reaction}");
    assert!(
        done["reason"].as_str().unwrap().contains("error_ratio")
            || done["reason"].as_str().unwrap().contains("error_abs"),
        "{done:#}"
    );
    // The weight never went past 1 %: every generation the rollout made.
    let (_, history) = p.admin.get("/api/v1/services/web/history").await;
    for e in history.as_array().unwrap() {
        assert!(e["to"]["green"].as_f64().unwrap() <= 1.0, "{e}");
    }
    let svc = p.admin.service("web").await;
    assert_eq!(svc["weights"]["green"], 0);
    assert_exact_impact(&p.admin, &seen).await;
    assert!(seen.green_5xx >= 3, "{seen:?}");
    assert_eq!(seen.other_errors, 0, "{seen:?}");
    let m = p.admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchyard_rollouts_total{result="rolled_back",service="web"}"#
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"switchyard_rollout_user_failures_total{service="web"}"#
        ),
        Some(seen.green_5xx as f64)
    );
    assert_eq!(
        metric(
            &m,
            r#"switchyard_rollout_state{service="web",state="rolled_back"}"#
        ),
        Some(1.0)
    );
    // Past rollouts carry the report.
    let (s, list) = p.admin.get("/api/v1/services/web/rollouts").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(list[0]["id"], done["id"]);
    assert_eq!(list[0]["report"]["result"], "rolled_back");
    p.shutdown().await;
}

/// Item 2 (second half): a step that has not seen `min_requests` canary
/// requests never passes, however long its pause has run; it passes once
/// they are in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_without_min_requests_never_passes() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    start(
        &p.admin,
        r#"{"steps":[{"weight":50,"pause":"500ms","min_requests":300},{"weight":100}]}"#,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = load(
        p.addr,
        4,
        1,
        100,
        Duration::from_secs(30),
        Arc::clone(&stop),
    )
    .await;
    assert_eq!(seen.requests, 100);
    // The pause has run out ...
    let (ok, v) = poll(&p.admin, Duration::from_secs(20), |v| {
        v["step_remaining_s"].as_f64() == Some(0.0)
    })
    .await;
    assert!(ok, "{v:#}");
    // ... and for many ticks after it the step still holds.
    for _ in 0..8 {
        let v = rollout(&p.admin).await;
        assert_eq!(
            (v["state"].as_str(), v["step"].as_u64()),
            (Some("progressing"), Some(0)),
            "{v:#}"
        );
        assert!(
            v["analysis"]["rules"][0]["canary"]["requests"]
                .as_u64()
                .unwrap()
                < 300
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Enough canary requests: it passes (and the last step is 100 %).
    let _ = load(
        p.addr,
        8,
        1,
        2_000,
        Duration::from_secs(60),
        Arc::clone(&stop),
    )
    .await;
    let done = until_state(&p.admin, &["succeeded"], Duration::from_secs(30)).await;
    assert_eq!(green_weight(&done), 100.0);
    p.shutdown().await;
}

/// Item 2 (first half), end to end: the fault of item 1 (canary 5 % 5xx,
/// baseline 0.1 %) at about 20 requests/s is rolled back before the
/// canary's weight passes 5 %, by the error rule.
///
/// Why this plan. At 20 requests/s a batch of the error test (200
/// requests, both pools) takes 10 s, and the canary sees 0.2 requests/s at
/// 1 % and 1/s at 5 %. The analysis needs ≥ 3 canary failures in a step,
/// and with α = 0.001 at π = 5 % about 4 failures against no baseline
/// failure, 5 against one or two (each baseline failure divides the
/// evidence). Green fails exactly every 20th request and blue every
/// 1 000th, so green's 5th failure is its 100th request and by then blue
/// has failed at most twice: the rollout is rolled back at the 5 % step
/// after ~100 green requests, ~2 000 requests, ~90-120 s.
/// - 1 %, 10 s, `min_requests` 1: the step a real plan begins with. Its
///   default minimum (100 canary requests) would hold it 500 s at this
///   rate; here it sees a couple of green requests, no failure (green's
///   first is its 20th request), and passes on its pause.
/// - 5 %, 60 s, `min_requests` 200 (the simulation's second variant): the
///   step cannot pass before 200 green requests (~200 s), twice what the
///   deterministic faults need to fail it, so the test is not a race
///   between the analysis and the step's clock.
/// - 25 % and 100 %: what the canary must never reach.
///
/// The weight is watched throughout (the rollout's and the service's,
/// every 100 ms), and afterwards every generation the rollout made, its
/// step reports and its timeline are checked to stay at or below 5 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_at_twenty_requests_per_second_is_rolled_back_before_five_percent() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    blue.fail_every(1000);
    green.fail_every(20);
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let stop = Arc::new(AtomicBool::new(false));
    // One keep-alive client, one request every 50 ms: 20 requests/s,
    // at most 4 000 requests or 200 s.
    let load_began = tokio::time::Instant::now();
    let driver = tokio::spawn(load(
        p.addr,
        1,
        50,
        4_000,
        Duration::from_secs(200),
        Arc::clone(&stop),
    ));
    let started = start(
        &p.admin,
        r#"{"steps":[{"weight":1,"pause":"10s","min_requests":1},{"weight":5,"pause":"60s","min_requests":200},{"weight":25,"pause":"1m"},{"weight":100}]}"#,
    )
    .await;
    let rollout_began = tokio::time::Instant::now();
    assert_eq!(started["state"], "progressing");
    assert_eq!(green_weight(&started), 1.0);
    // Watch the weights until the rollout ends (bounded).
    let limit = rollout_began + Duration::from_secs(180);
    let mut max_green: f64 = 0.0;
    let done = loop {
        let v = rollout(&p.admin).await;
        let svc = p.admin.service("web").await;
        max_green = max_green
            .max(green_weight(&v))
            .max(svc["weights"]["green"].as_f64().unwrap());
        if ["succeeded", "rolled_back", "aborted"].contains(&v["state"].as_str().unwrap_or("")) {
            break v;
        }
        assert!(
            tokio::time::Instant::now() < limit,
            "still running after 180 s: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let to_rollback = rollout_began.elapsed();
    stop.store(true, Ordering::SeqCst);
    let seen = driver.await.unwrap();
    let load_s = load_began.elapsed().as_secs_f64();
    let rate = seen.requests as f64 / load_s;
    let steps = done["report"]["steps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    eprintln!(
        "20 rps: {} after {:.1} s ({} requests in {load_s:.1} s: {rate:.1}/s); max green weight {max_green} %; canary requests {}; clients saw {seen:?}\n{}\nsteps: {:#}",
        done["state"],
        to_rollback.as_secs_f64(),
        seen.requests,
        done["impact"]["canary_requests"],
        done["reason"],
        done["report"]["steps"]
    );
    assert!(
        (10.0..=30.0).contains(&rate),
        "the load was {rate:.1} requests/s, not about 20"
    );
    assert_eq!(done["state"], "rolled_back", "{done:#}");
    assert_eq!(green_weight(&done), 0.0);
    // By the error rule.
    let failed: Vec<&str> = done["analysis"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["verdict"] == "fail")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["error_ratio"], "{done:#}");
    assert!(
        done["reason"].as_str().unwrap().contains(": error_ratio: "),
        "{done:#}"
    );
    // Never past 5 %: as watched, in every generation the rollout made,
    // in the steps it reported and in its timeline.
    assert!(max_green <= 5.0, "green reached {max_green} %");
    let (_, history) = p.admin.get("/api/v1/services/web/history").await;
    for e in history.as_array().unwrap() {
        assert!(e["to"]["green"].as_f64().unwrap() <= 5.0, "{e}");
    }
    assert!(!steps.is_empty(), "{done:#}");
    for s in &steps {
        assert!(s["weight"].as_f64().unwrap() <= 5.0, "{s}");
    }
    let last = steps.last().unwrap();
    assert_eq!(last["outcome"], "rolled_back", "{done:#}");
    assert!(done["step"].as_u64().unwrap() <= 1, "{done:#}");
    for e in done["report"]["timeline"].as_array().unwrap() {
        assert!(e["weight"].as_f64().unwrap() <= 5.0, "{e}");
    }
    // The deciding step had its failures, and was failed by the analysis,
    // not held by its minimum.
    assert!(last["canary"]["failures"].as_u64().unwrap() >= 3, "{last}");
    assert!(last["canary"]["requests"].as_u64().unwrap() < 200, "{last}");
    assert!(seen.green_5xx >= 3, "{seen:?}");
    assert_eq!(seen.other_errors, 0, "{seen:?}");
    assert_exact_impact(&p.admin, &seen).await;
    p.shutdown().await;
}

/// Item 3: a healthy canary goes through a whole plan to `succeeded` with
/// no failed request, and clients holding the sticky cookie only ever move
/// blue → green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_canary_succeeds_and_sticky_clients_only_move_to_green() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    start(
        &p.admin,
        r#"{"steps":[{"weight":5,"pause":"1s","min_requests":10},{"weight":25,"pause":"1s","min_requests":20},{"weight":50,"pause":"1s","min_requests":20},{"weight":100}]}"#,
    )
    .await;
    let done = Arc::new(AtomicBool::new(false));
    // New visitors (no cookie kept) keep arriving, as on a real site: with
    // only 40 returning clients, each drawing its bucket once, none lands
    // under 5 % in 13 % of runs and the first step never sees a canary
    // request.
    let visitors = tokio::spawn(load(
        p.addr,
        4,
        10,
        u64::MAX,
        Duration::from_secs(90),
        Arc::clone(&done),
    ));
    let mut clients = Vec::new();
    for _ in 0..40 {
        let (addr, done) = (p.addr, Arc::clone(&done));
        clients.push(tokio::spawn(async move {
            let client = http1_client();
            let mut cookie: Option<String> = None;
            let mut pools = Vec::new();
            let mut failures = 0;
            let end = tokio::time::Instant::now() + Duration::from_secs(90);
            for _ in 0..5_000 {
                if done.load(Ordering::SeqCst) || tokio::time::Instant::now() > end {
                    break;
                }
                let mut req = Request::get(format!("http://{addr}/"));
                if let Some(c) = &cookie {
                    req = req.header("cookie", c.as_str());
                }
                let resp = client.request(req.body(empty()).unwrap()).await.unwrap();
                if !resp.status().is_success() {
                    failures += 1;
                }
                if let Some(sc) = resp.headers().get("set-cookie") {
                    let c = sc.to_str().unwrap().split(';').next().unwrap().to_string();
                    cookie.get_or_insert(c);
                }
                let pool = resp.headers()["x-switchyard-pool"]
                    .to_str()
                    .unwrap()
                    .to_string();
                let _ = resp.into_body().collect().await;
                if cookie.is_some() {
                    pools.push(pool);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (pools, failures)
        }));
    }
    let v = until_state(
        &p.admin,
        &["succeeded", "rolled_back", "aborted"],
        Duration::from_secs(90),
    )
    .await;
    done.store(true, Ordering::SeqCst);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(green_weight(&v), 100.0);
    assert_eq!(v["impact"]["user_failures"], 0);
    let seen = visitors.await.unwrap();
    assert_eq!(
        (seen.green_5xx, seen.blue_5xx, seen.other_errors),
        (0, 0, 0),
        "{seen:?}"
    );
    let mut sticky = 0;
    for c in clients {
        let (pools, failures) = c.await.unwrap();
        assert_eq!(failures, 0);
        if let Some(first_green) = pools.iter().position(|p| p == "green") {
            assert!(
                pools[first_green..].iter().all(|p| p == "green"),
                "a sticky client went back to blue: {pools:?}"
            );
        }
        sticky += usize::from(!pools.is_empty());
    }
    assert!(sticky >= 20, "only {sticky} clients got a cookie");
    // Every weight change was an ordinary generation by rollout:<id>.
    let (_, history) = p.admin.get("/api/v1/services/web/history").await;
    let by_rollout: Vec<&Value> = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"].as_str().unwrap().starts_with("rollout:"))
        .collect();
    assert_eq!(by_rollout.len(), 4, "{history:#}");
    assert!(by_rollout
        .iter()
        .all(|e| e["actor"] == format!("rollout:{}", v["id"].as_str().unwrap())));
    p.shutdown().await;
}

/// Item 9: the verbs. pause stops progress (analysis keeps running, and a
/// failure while paused still rolls back); promote skips a pause and a
/// gate; full reaches 100 % in one generation; abort returns the canary
/// to 0 % in one call; a manual split during a rollout is refused with 409
/// `rollout_active`, and `force` aborts the rollout first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verbs_pause_promote_full_abort_and_manual_override() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let a = &p.admin;
    let plan = r#"{"steps":[{"weight":10,"pause":"1h"},{"gate":"approve"},{"weight":20,"pause":"1h"},{"weight":100}],"analysis":{"min_requests":20}}"#;
    start(a, plan).await;
    let (s, v) = a
        .post("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("rollout_active")),
        "{v}"
    );
    let (s, v) = a.post("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    let (s, v) = a
        .post(
            "/api/v1/services/web/rollout",
            r#"{"plan":{"steps":[{"weight":100}]}}"#,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("rollout_active"))
    );
    // promote: skips the 1 h pause, then waits at the gate.
    let v = a.ok("/api/v1/services/web/rollout/promote", "{}").await;
    assert_eq!(
        (v["state"].as_str(), v["pause"].as_str(), v["step"].as_u64()),
        (Some("paused"), Some("gate"), Some(1))
    );
    let (s, _) = a.post("/api/v1/services/web/rollout/resume", "{}").await;
    assert_eq!(s, StatusCode::CONFLICT, "a gate needs promote");
    let v = a
        .ok(
            "/api/v1/services/web/rollout/promote",
            r#"{"reason":"QA ok"}"#,
        )
        .await;
    assert_eq!(
        (v["state"].as_str(), green_weight(&v)),
        (Some("progressing"), 20.0)
    );
    // pause: the state says so, and the weight holds.
    let v = a.ok("/api/v1/services/web/rollout/pause", "{}").await;
    assert_eq!(v["state"], "paused");
    assert_eq!(a.service("web").await["weights"]["green"], 20);
    // A failure while paused still rolls back.
    green.fail_every(1);
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(load(
        p.addr,
        4,
        10,
        20_000,
        Duration::from_secs(60),
        Arc::clone(&stop),
    ));
    let v = until_state(a, &["rolled_back"], Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    driver.await.unwrap();
    green.fail_every(0);
    assert_eq!(green_weight(&v), 0.0);
    let (s, v) = a.post("/api/v1/services/web/rollout/pause", "{}").await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");

    // promote full: 100 % in one generation.
    start(a, plan).await;
    let before = a.service("web").await["generation"].as_u64().unwrap();
    let v = a
        .ok("/api/v1/services/web/rollout/promote", r#"{"full":true}"#)
        .await;
    assert_eq!(
        (v["state"].as_str(), green_weight(&v)),
        (Some("succeeded"), 100.0)
    );
    let svc = a.service("web").await;
    assert_eq!(
        (svc["live"].as_str(), svc["generation"].as_u64()),
        (Some("green"), Some(before + 1))
    );

    // abort: the canary (now blue) back to 0 % in one call.
    let v = start(a, plan).await;
    assert_eq!(
        (v["canary"].as_str(), v["weights"]["blue"].as_f64()),
        (Some("blue"), Some(10.0))
    );
    let v = a
        .ok(
            "/api/v1/services/web/rollout/abort",
            r#"{"reason":"bad build"}"#,
        )
        .await;
    assert_eq!(v["state"], "aborted");
    assert_eq!(a.service("web").await["live"], "green");

    // force: aborts the running rollout, then the manual change.
    start(a, plan).await;
    let svc = a
        .ok("/api/v1/services/web/split", r#"{"green":70,"force":true}"#)
        .await;
    assert_eq!(svc["weights"]["green"], 70);
    let v = rollout(a).await;
    assert_eq!(v["state"], "aborted");
    assert!(
        v["reason"].as_str().unwrap().contains("manual_override"),
        "{v:#}"
    );
    let (_, list) = a.get("/api/v1/services/web/rollouts").await;
    let results: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["aborted", "aborted", "succeeded", "rolled_back"]);
    p.shutdown().await;
}

/// Item 10: both pools failing alike (an upstream incident) pause the
/// rollout instead of rolling it back; it resumes when the incident ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_pools_failing_pauses_then_resumes() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    start(
        &p.admin,
        r#"{"steps":[{"weight":50,"pause":"1h"},{"weight":100}]}"#,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(load(
        p.addr,
        8,
        20,
        200_000,
        Duration::from_secs(120),
        Arc::clone(&stop),
    ));
    blue.fail_every(5);
    green.fail_every(5);
    let v = until_state(
        &p.admin,
        &["paused", "rolled_back"],
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        (v["state"].as_str(), v["pause"].as_str()),
        (Some("paused"), Some("baseline_unhealthy")),
        "{v:#}"
    );
    assert_eq!(green_weight(&v), 50.0, "no rollback, no weight change");
    assert!(
        v["reason"].as_str().unwrap().contains("both pools"),
        "{v:#}"
    );
    blue.fail_every(0);
    green.fail_every(0);
    let v = until_state(
        &p.admin,
        &["progressing", "rolled_back"],
        Duration::from_secs(60),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    driver.await.unwrap();
    assert_eq!(
        (v["state"].as_str(), v["step"].as_u64()),
        (Some("progressing"), Some(0)),
        "{v:#}"
    );
    assert_eq!(green_weight(&v), 50.0);
    p.shutdown().await;
}

/// Item 4: a canary 50 ms slower on every request is rolled back by the
/// latency rule at 5 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_canary_rolled_back_by_the_latency_rule() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    green.delay(50);
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    start(
        &p.admin,
        r#"{"steps":[{"weight":5,"pause":"1h"},{"weight":100}],"analysis":{"min_requests":50}}"#,
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(load(
        p.addr,
        8,
        20,
        100_000,
        Duration::from_secs(120),
        Arc::clone(&stop),
    ));
    let v = until_state(&p.admin, &["rolled_back"], Duration::from_secs(100)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = driver.await.unwrap();
    assert!(v["reason"].as_str().unwrap().contains("latency"), "{v:#}");
    assert_eq!(v["impact"]["user_failures"], 0);
    assert_eq!(seen.green_5xx + seen.blue_5xx + seen.other_errors, 0);
    p.shutdown().await;
}

/// Item 4 (second half): a canary uniformly 10 % slower, within
/// `max_latency_ratio` (1.25, slack 5 ms), passes every step and succeeds.
///
/// Delays 40 ms (blue) vs 44 ms (green) rather than 20 vs 22: the canary
/// fails a trial only when it is slower than τ = baseline p99 × 1.25 +
/// 5 ms, and both pools share the machine's scheduling noise, so the
/// margin between the canary's typical latency and τ is 0.15 × baseline
/// + 5 ms plus 1.25 × the baseline's own noise at p99: 11 ms at 40 ms,
/// only 8 ms at 20 ms, where a loaded 2-core machine's hiccups get close.
/// The steps need 100 canary requests each, twice the 50 samples after
/// which the latency rule may fail, so the rule really judges the canary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_ten_percent_slower_passes_the_latency_rule() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    blue.delay(40);
    green.delay(44);
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let stop = Arc::new(AtomicBool::new(false));
    // 12 sequential clients, one request per ≥ 40 ms each (the delay): up
    // to ~270 requests/s, ~27/s to green at 10 %; a few seconds a step.
    let driver = tokio::spawn(load(
        p.addr,
        12,
        40,
        20_000,
        Duration::from_secs(40),
        Arc::clone(&stop),
    ));
    start(
        &p.admin,
        r#"{"steps":[{"weight":10,"pause":"2s"},{"weight":50,"pause":"2s"},{"weight":100}],"analysis":{"min_requests":100}}"#,
    )
    .await;
    let v = until_state(
        &p.admin,
        &["succeeded", "rolled_back"],
        Duration::from_secs(30),
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    let seen = driver.await.unwrap();
    eprintln!(
        "10 % slower canary: {}\n{:#}",
        v["reason"], v["report"]["steps"]
    );
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(green_weight(&v), 100.0);
    // The two observed steps passed; the last (100 %, nothing to observe)
    // is where it succeeded.
    let steps = v["report"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{v:#}");
    assert_eq!(steps[2]["outcome"], "succeeded", "{v:#}");
    for s in &steps[..2] {
        assert_eq!(s["outcome"], "passed", "{s}");
        assert!(s["canary"]["requests"].as_u64().unwrap() >= 100, "{s}");
        // Each pool really answered as slowly as set (p99s are bucket
        // upper bounds): the rule judged a slower canary and let it pass.
        let (c, b) = (
            s["canary_p99_ms"].as_f64().unwrap(),
            s["baseline_p99_ms"].as_f64().unwrap(),
        );
        assert!(c >= 44.0 && b >= 40.0, "{s}");
    }
    assert_eq!(
        seen.green_5xx + seen.blue_5xx + seen.other_errors,
        0,
        "{seen:?}"
    );
    p.shutdown().await;
}

/// Item 6: kill -9 during a pause, then restart: the same rollout resumes
/// at the same step with the time it had left (± 5 s), and none of 1 000
/// cookie-holding clients changes pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_the_same_step_with_the_time_left() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let dir = TempDir::new("rollout-restart");
    let text = format!(
        "{}\n[[rollout_plan]]\nname = \"slow\"\nsteps = [ {{ weight = 25, pause = \"10m\" }}, {{ weight = 100 }} ]\n",
        config_text(dir.path(), "", &[Svc::addrs("web", &[blue.addr], &[green.addr])])
    );
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, text).unwrap();
    let mut first = ProxyProcess::spawn(&config, &[]).unwrap();
    let admin = Admin::new(first.admin);
    let v = start(&admin, "\"slow\"").await;
    let id = v["id"].as_str().unwrap().to_string();
    // 1 000 clients, each pinned by its cookie.
    let client = http1_client();
    let mut pinned = Vec::new();
    for _ in 0..1000 {
        let req = Request::get(format!("http://{}/", first.proxy))
            .body(empty())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        let cookie = resp.headers()["set-cookie"]
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let pool = resp.headers()["x-switchyard-pool"]
            .to_str()
            .unwrap()
            .to_string();
        let _ = resp.into_body().collect().await;
        pinned.push((cookie, pool));
    }
    let greens = pinned.iter().filter(|(_, p)| p == "green").count();
    assert!(
        (150..=350).contains(&greens),
        "{greens} of 1000 green at 25 %"
    );
    // Some observation time has been persisted (every 2 s).
    let (ok, before) = poll(&admin, Duration::from_secs(30), |v| {
        v["step_remaining_s"].as_f64().unwrap() <= 595.0
    })
    .await;
    assert!(ok, "{before:#}");
    let left_before = before["step_remaining_s"].as_f64().unwrap();
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    drop(first);

    let second = ProxyProcess::spawn(&config, &[]).unwrap();
    let admin = Admin::new(second.admin);
    let after = rollout(&admin).await;
    assert_eq!(after["id"], id.as_str());
    assert_eq!(
        (after["state"].as_str(), after["step"].as_u64()),
        (Some("progressing"), Some(0))
    );
    assert_eq!(green_weight(&after), 25.0);
    let left_after = after["step_remaining_s"].as_f64().unwrap();
    assert!(
        (left_after - left_before).abs() <= 5.0,
        "{left_before} s left before the kill, {left_after} s after the restart"
    );
    for (cookie, pool) in &pinned {
        let req = Request::get(format!("http://{}/", second.proxy))
            .header("cookie", cookie.as_str())
            .body(empty())
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(
            resp.headers()["x-switchyard-pool"].to_str().unwrap(),
            pool,
            "{cookie}"
        );
        let _ = resp.into_body().collect().await;
    }
    // And it goes on ticking.
    let (ok, v) = poll(&admin, Duration::from_secs(10), |v| {
        v["step_remaining_s"].as_f64().unwrap() < left_after
    })
    .await;
    assert!(ok, "{v:#}");
    let v = admin.ok("/api/v1/services/web/rollout/abort", "{}").await;
    assert_eq!(v["state"], "aborted");
    let _ = blue.served.load(Ordering::SeqCst);
}

/// `ctl rollout …` as a CI job uses it: start with a plan from the config,
/// `status --wait` exits 0 on success, 4 on rollback or abort, 5 when
/// still running at `--timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_rollout_exit_codes() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let dir = TempDir::new("rollout-ctl");
    let text = format!(
        "{}\n[[rollout_plan]]\nname = \"quick\"\nsteps = [ {{ weight = 10, pause = \"300ms\", min_requests = 0 }}, {{ weight = 100 }} ]\n\n[[rollout_plan]]\nname = \"slow\"\nsteps = [ {{ weight = 10, pause = \"1h\" }}, {{ weight = 100 }} ]\n",
        config_text(dir.path(), "", &[Svc::addrs("web", &[blue.addr], &[green.addr])])
    );
    let p = TestProxy::start_text(dir, &text).await;
    let admin = p.admin.base.clone();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--admin", admin.as_str()];
        all.extend_from_slice(args);
        let owned: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        async move {
            tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
                run_binary(&refs)
            })
            .await
            .unwrap()
        }
    };
    let (code, out, err) = ctl(&["rollout", "start", "web", "--plan", "quick"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&["rollout", "status", "web", "--wait", "--timeout", "60s"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("succeeded"), "{out}");
    // Green is live now: the next canary is blue.
    let (code, out, err) = ctl(&["rollout", "start", "web", "--plan", "slow"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&["rollout", "status", "web", "--wait", "--timeout", "1s"]).await;
    assert_eq!(code, 5, "still running: {out}{err}");
    let (code, out, err) = ctl(&["--reason", "bad build", "rollout", "abort", "web"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(&["rollout", "status", "web", "--wait"]).await;
    assert_eq!(code, 4, "aborted: {out}{err}");
    assert!(out.contains("bad build"), "{out}");
    let (code, _, err) = ctl(&["rollout", "start", "web", "--plan", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("nope"), "{err}");
    let (code, out, _) = ctl(&["--json", "rollout", "history", "web"]).await;
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    p.shutdown().await;
}

/// `switchyard check` names the line of every problem in a
/// `[[rollout_plan]]`.
#[test]
fn check_reports_plan_errors_with_their_lines() {
    let dir = TempDir::new("rollout-check");
    let text = format!(
        "{}\n[[rollout_plan]]\nname = \"bad\"\nsteps = [\n  {{ weight = 10 }},\n  {{ weight = 5, pause = \"1m\" }},\n  {{ mirror = 10, duration = \"1m\" }},\n]\n[rollout_plan.analysis]\nalpha = 2\n",
        config_text(
            dir.path(),
            "",
            &[Svc::addrs("web", &["127.0.0.1:1".parse().unwrap()], &["127.0.0.1:2".parse().unwrap()])]
        )
    );
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, &text).unwrap();
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let (code, out, err) = run_binary(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    for (line, what) in [
        (line_of("weight = 5"), "steps[1].weight"),
        (line_of("mirror = 10"), "steps[2]"),
        (line_of("alpha = 2"), "analysis.alpha"),
    ] {
        assert!(
            all.lines()
                .any(|l| l.contains(&format!(":{line}: ")) && l.contains(what)),
            "no `{what}` at line {line} in:\n{all}"
        );
    }
}

/// A plan's mirror step (SPEC §10 with §9): while it runs the canary gets
/// copies of live requests (marked `x-switchyard-mirror`) and no user
/// traffic, the service shows the mirror set by `rollout:<id>`; promoted
/// past it, the mirror is gone and the weight steps begin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_step_copies_live_traffic_to_the_canary_then_stops() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let a = &p.admin;
    let plan = r#"{"steps":[{"mirror":100,"duration":"1h"},{"weight":10,"pause":"1h"},{"weight":100}],"analysis":{"min_requests":20}}"#;
    let v = start(a, plan).await;
    let id = v["id"].as_str().unwrap().to_string();
    until_state(a, &["mirroring"], Duration::from_secs(10)).await;
    let (ok, m) = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, m) = a.get("/api/v1/services/web/mirror").await;
            if m["mirror"]["to"] == "green" || tokio::time::Instant::now() >= deadline {
                break (m["mirror"]["to"] == "green", m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(ok, "the mirror step sets the mirror: {m}");
    assert_eq!(m["mirror"]["percent"], 100, "{m}");
    let (_, h) = a.get("/api/v1/services/web/history").await;
    let entry = h
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "mirror")
        .cloned()
        .unwrap_or_default();
    assert_eq!(entry["actor"], format!("rollout:{id}"), "{h}");
    // Live requests all go to blue; copies reach green.
    for _ in 0..20 {
        let (s, _, body) = p.get("/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    }
    let copied = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n = green.served.load(Ordering::SeqCst);
            if n >= 20 || tokio::time::Instant::now() >= deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert_eq!(copied, 20, "every live GET copied to the canary");
    assert_eq!(green_weight(&rollout(a).await), 0.0);
    // Past the mirror step: the mirror is off, the canary takes 10 %.
    let v = a.ok("/api/v1/services/web/rollout/promote", "{}").await;
    assert_eq!(green_weight(&v), 10.0, "{v}");
    let (ok, m) = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, m) = a.get("/api/v1/services/web/mirror").await;
            if m["mirror"].is_null() || tokio::time::Instant::now() >= deadline {
                break (m["mirror"].is_null(), m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(ok, "the mirror stops after its step: {m}");
}

/// Item 8: a canary that fails only under mirrored traffic is rolled back
/// during the mirror step, before any user reaches it, and the report says
/// no user request was served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_its_mirrored_copies_is_rolled_back_in_the_mirror_step() {
    let blue = Faulty::start("blue").await;
    let green = Faulty::start("green").await;
    green.fail_every(4);
    let p = TestProxy::start(&[Svc::addrs("web", &[blue.addr], &[green.addr])]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let driver = tokio::spawn(load(
        p.addr,
        8,
        20,
        40_000,
        Duration::from_secs(90),
        Arc::clone(&stop),
    ));
    start(
        &p.admin,
        r#"{"steps":[{"mirror":100,"duration":"10m"},{"weight":10,"pause":"1m"},{"weight":100}]}"#,
    )
    .await;
    let done = until_state(&p.admin, &["rolled_back"], Duration::from_secs(80)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = driver.await.unwrap();
    assert_eq!(done["step"], 0, "rolled back in the mirror step: {done:#}");
    assert_eq!(seen.green, 0, "no user reached the canary: {seen:?}");
    assert_eq!(seen.other_errors + seen.blue_5xx, 0, "{seen:?}");
    assert_eq!(done["impact"]["user_failures"], 0, "{done:#}");
    assert_eq!(done["impact"]["canary_requests"], 0, "{done:#}");
    let reason = done["reason"].as_str().unwrap();
    eprintln!("{reason}; clients saw {seen:?}");
    assert!(reason.contains("0 user requests"), "{reason}");
    // The mirror is removed with the rollback.
    let (ok, m) = {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, m) = p.admin.get("/api/v1/services/web/mirror").await;
            if m["mirror"].is_null() || tokio::time::Instant::now() >= deadline {
                break (m["mirror"].is_null(), m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert!(ok, "{m}");
}
