//! What mirroring costs the clients (issue 11, item 7): an open-loop load
//! at a fixed rate through the release binary to a fast live pool (blue),
//! once with mirroring off and once with `PUT …/mirror` copying 100 % of
//! the GETs to a canary (green) that takes 2 s and fails half of them.
//! Prints, for every run, the achieved rate, p50/p99 latency and client
//! errors, the ratios (medians over the rounds), and the mirror's counters.
//!
//! ```text
//! cargo bench --bench mirror_impact              # 300 req/s, 10 s a run, 3 rounds
//! RATE=500 SECS=20 ROUNDS=1 MAX_INFLIGHT=1024 cargo bench --bench mirror_impact
//! ```
//!
//! A round is one run with the mirror off, then one with it on (`DELETE`
//! and `PUT …/mirror` between them): on a shared machine a single p99
//! moves by more than the effect looked for, so the rounds alternate and
//! the ratios are medians of the per-round ratios. `MAX_INFLIGHT` is the
//! mirror's in-flight cap (SPEC default 64: with a 2 s canary at most 32
//! copies a second are sent, the rest are dropped and counted).
//!
//! Open loop: request i is sent at t0 + i/RATE whatever the earlier ones
//! are doing, and its latency is measured from that scheduled instant, so
//! a proxy that stalls is charged for the wait (no coordinated omission).
//! Everything is on 127.0.0.1 ephemeral ports; the upstreams run in this
//! process, the proxy is `target/release/switchyard`, killed at the end.
//! Bounded: RATE ≤ 2 000, SECS ≤ 60, ROUNDS ≤ 10, every request has a
//! 10 s timeout.

#[rustfmt::skip] // the shared harness keeps its own layout
#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// An upstream answering `name`: at once, or (`slow_failing`) after 2 s
/// and with a 500 on every second request. `/healthz` always answers 200
/// at once, so the slow pool stays healthy and gets its copies.
async fn upstream(name: &'static str, slow_failing: bool) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&served);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let counter = Arc::clone(&counter);
                    async move {
                        let mut status = StatusCode::OK;
                        if req.uri().path() != "/healthz" {
                            let n = counter.fetch_add(1, Ordering::Relaxed);
                            if slow_failing {
                                tokio::time::sleep(Duration::from_secs(2)).await;
                                if n % 2 == 1 {
                                    status = StatusCode::INTERNAL_SERVER_ERROR;
                                }
                            }
                        }
                        let mut resp = hyper::Response::new(full(name));
                        *resp.status_mut() = status;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, served)
}

/// What one run saw.
struct Run {
    sent: usize,
    ok: usize,
    errors: usize,
    /// Achieved rate: answered requests over the time from the first
    /// scheduled send to the last answer.
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn env_or(name: &str, default: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, max)
}

/// Sends `rate` GETs a second for `secs` seconds, open loop.
async fn drive(client: &HttpClient, addr: SocketAddr, rate: u64, secs: u64) -> Run {
    let total = (rate * secs) as usize;
    let url = format!("http://{addr}/");
    let t0 = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let at = t0 + Duration::from_micros(i as u64 * 1_000_000 / rate);
        tokio::time::sleep_until(at).await;
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let req = Request::get(&url).body(empty()).expect("request");
            let answer = tokio::time::timeout(Duration::from_secs(10), async {
                let resp = client.request(req).await.ok()?;
                let status = resp.status();
                let blue = resp
                    .headers()
                    .get("x-switchyard-pool")
                    .is_some_and(|v| v == "blue");
                resp.into_body().collect().await.ok()?;
                Some(status == StatusCode::OK && blue)
            })
            .await;
            let done = Instant::now();
            (
                done.duration_since(at),
                done,
                matches!(answer, Ok(Some(true))),
            )
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let (mut ok, mut errors) = (0, 0);
    let mut last = t0;
    for t in tasks {
        match t.await {
            Ok((lat, done, true)) => {
                ok += 1;
                latencies.push(lat);
                last = last.max(done);
            }
            _ => errors += 1,
        }
    }
    latencies.sort();
    let q = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Run {
        sent: total,
        ok,
        errors,
        rate: ok as f64 / last.duration_since(t0).as_secs_f64().max(1e-9),
        p50_ms: q(0.50),
        p99_ms: q(0.99),
    }
}

fn print(label: &str, r: &Run) {
    println!(
        "{label:<12} sent {:>6}  ok {:>6}  errors {:>3}  rate {:>8.1}/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
        r.sent, r.ok, r.errors, r.rate, r.p50_ms, r.p99_ms
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(bench());
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn bench() {
    let rate = env_or("RATE", 300, 2_000);
    let secs = env_or("SECS", 10, 60);
    let rounds = env_or("ROUNDS", 3, 10);
    let max_inflight = env_or("MAX_INFLIGHT", 64, 100_000);
    let (blue, _) = upstream("blue", false).await;
    let (green, green_served) = upstream("green", true).await;
    let dir = TempDir::new("mirror-impact");
    let config = dir.join("switchyard.toml");
    let text = config_text(
        dir.path(),
        "access_log = false",
        &[Svc::addrs("web", &[blue], &[green])],
    );
    std::fs::write(&config, text).expect("config");
    let mut proxy = ProxyProcess::spawn(&config, &[]).expect("switchyard starts");
    let admin = Admin::new(proxy.admin);
    let client = http1_client();
    println!(
        "open loop, {rate} GET/s for {secs} s a run, {rounds} rounds (off, on), max_inflight {max_inflight}, through {}\n(blue: instant; green: 2 s, every second one 500)",
        env!("CARGO_BIN_EXE_switchyard")
    );
    // Warm-up: connections to the proxy and from it to blue.
    let warm = drive(&client, proxy.proxy, rate, 1).await;
    assert_eq!(warm.errors, 0, "warm-up failed");

    let mirror =
        format!(r#"{{"to":"green","percent":100,"timeout":"5s","max_inflight":{max_inflight}}}"#);
    let (mut rates, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
    let mut errors = (0, 0);
    let mut counters = serde_json::Value::Null;
    for round in 1..=rounds {
        let off = drive(&client, proxy.proxy, rate, secs).await;
        let (s, v) = admin.put("/api/v1/services/web/mirror", &mirror).await;
        assert_eq!(s, StatusCode::OK, "PUT mirror: {v}");
        let on = drive(&client, proxy.proxy, rate, secs).await;
        let (_, v) = admin.get("/api/v1/services/web/mirror").await;
        counters = v["counters"].clone();
        let (s, v) = admin
            .call("DELETE", "/api/v1/services/web/mirror", None, &[])
            .await;
        assert_eq!(s, StatusCode::OK, "DELETE mirror: {v}");
        // The copies still in flight end within the 5 s timeout; the next
        // run starts without them.
        let _ = eventually(Duration::from_secs(8), || async {
            let (_, v) = admin.get("/api/v1/services/web/mirror").await;
            v["counters"]["in_flight"].as_u64().unwrap_or(0) == 0
        })
        .await;
        print(&format!("{round}: off"), &off);
        print(&format!("{round}: on"), &on);
        rates.push(on.rate / off.rate);
        p50s.push(on.p50_ms / off.p50_ms);
        p99s.push(on.p99_ms / off.p99_ms);
        errors.0 += off.errors;
        errors.1 += on.errors;
    }
    println!(
        "on ÷ off, median of {rounds}: rate {:.3}  p50 {:.3}  p99 {:.3}  (per round p99: {:?}; client errors: {} off, {} on)",
        median(rates),
        median(p50s),
        median(p99s.clone()),
        p99s.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>(),
        errors.0,
        errors.1
    );
    println!(
        "green saw {} copies in all; mirror counters after the last run (cumulative): {counters}",
        green_served.load(Ordering::Relaxed)
    );
    proxy.signal("TERM");
    if proxy.wait_exit(Duration::from_secs(10)).is_none() {
        let _ = proxy.child.kill();
        let _ = proxy.child.wait();
    }
}
