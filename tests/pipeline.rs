//! The release pipeline example (`docs/release.sh`) run end to end against a
//! real proxy and real upstreams, with client traffic flowing: a good
//! release ends live on the new pool with no failed request; a release whose
//! smoke tests fail moves no traffic; one that starts failing during the
//! canary is rolled back. Its rollout variant (`MODE=rollout`) hands the
//! canary to a progressive rollout and reports how it ended: a healthy
//! canary goes live, a failing one is rolled back by the proxy and the job
//! fails with the live pool unchanged.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

/// Runs the script with test-sized pauses; returns (exit code, stderr).
async fn release(p: &TestProxy, extra_env: &[(&str, &str)], args: &[String]) -> (i32, String) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/release.sh");
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(script)
        .args(args)
        .env("SWITCHYARD", env!("CARGO_BIN_EXE_switchyard"))
        .env(
            "SWITCHYARD_ADMIN",
            format!("http://{}", p.running.as_ref().unwrap().admin_addr),
        )
        .env_remove("SWITCHYARD_TOKEN")
        .env_remove("SWITCHYARD_TOKEN_FILE")
        .env("PROXY_URL", format!("http://{}", p.addr))
        .env("HEALTH_TIMEOUT", "10s")
        .env("STEPS", "10 50 100")
        .env("PAUSE", "1")
        .env("CHECK_INTERVAL", "0.1")
        .env("MIN_REQUESTS", "5");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Clients sending requests through the proxy until stopped (at most 60 s);
/// counts answers and failures (transport errors or non-2xx).
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    fn start(p: &TestProxy, clients: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                let client = http1_client();
                let url = p.url("/");
                tokio::spawn(async move {
                    let end = Instant::now() + Duration::from_secs(60);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
                        let req = http::Request::get(&url).body(empty()).unwrap();
                        match client.request(req).await {
                            Ok(r) if r.status().is_success() => {
                                use http_body_util::BodyExt;
                                let _ = r.into_body().collect().await;
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            _ => {
                                failed.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

fn actions(history: &serde_json::Value) -> Vec<String> {
    history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap(),
                e["to"]["green"].as_f64().unwrap()
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_release_goes_live_step_by_step_with_no_failed_request() {
    let blue = Upstream::start("blue v1").await;
    let old_green = Upstream::start("green v0").await;
    let p =
        TestProxy::start(&[Svc::new("web", &[&blue], &[&old_green]).extra(&health_every("50ms"))])
            .await;
    let v2 = Upstream::start("green v2").await;

    let traffic = Traffic::start(&p, 4);
    let (code, log) = release(
        &p,
        &[("SMOKE_EXPECT", "green v2"), ("VERSION", "v2")],
        &["web".into(), v2.addr.to_string()],
    )
    .await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("released v2: green is live"), "{log}");

    let svc = p.admin.service("web").await;
    assert_eq!(svc["live"], "green");
    assert_eq!(
        svc["pools"]["green"]["backends"][0]["addr"],
        v2.addr.to_string()
    );
    let history = p.admin.get("/api/v1/services/web/history").await.1;
    assert_eq!(
        actions(&history)[..4],
        ["switch 100", "split 50", "split 10", "pool 0"],
        "{history}"
    );
    assert_eq!(history[0]["reason"], "release v2: all traffic");
    assert_eq!(old_green.hits(), 0, "the old green version never served");
    assert!(v2.hits() > 0);
    assert_eq!(failed, 0, "no client request failed ({ok} passed)");
    assert!(ok > 50, "traffic flowed during the release: {ok}");
    assert_eq!(p.get("/").await.2, "green v2");

    // The next release goes the other way: green is live, so blue is idle.
    let v3 = Upstream::start("blue v3").await;
    let (code, log) = release(
        &p,
        &[
            ("SMOKE_EXPECT", "blue v3"),
            ("STEPS", "25 100"),
            ("PAUSE", "0"),
        ],
        &["web".into(), v3.addr.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{log}");
    let history = p.admin.get("/api/v1/services/web/history").await.1;
    assert_eq!(
        actions(&history)[..3],
        ["switch 0", "split 75", "pool 100"],
        "25 % to blue is green 75: {history}"
    );
    assert_eq!(p.get("/").await.2, "blue v3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_smoke_tests_move_no_traffic() {
    let blue = Upstream::start("blue v1").await;
    let green = Upstream::start("green v1").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&health_every("50ms"))])
        .await;
    // Healthy by its checks, but answers the wrong thing.
    let wrong = Upstream::start("502 bad gateway page").await;

    let (code, log) = release(
        &p,
        &[("SMOKE_EXPECT", "green v2")],
        &["web".into(), wrong.addr.to_string()],
    )
    .await;
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("smoke tests of green failed; no traffic was moved"),
        "{log}"
    );
    let svc = p.admin.service("web").await;
    assert_eq!(svc["live"], "blue");
    assert_eq!(svc["weights"]["green"], 0);
    let history = p.admin.get("/api/v1/services/web/history").await.1;
    assert_eq!(actions(&history)[0], "pool 0", "only the deploy: {history}");
    assert_eq!(blue.hits(), 0, "smoke requests never reached the live pool");

    // A backend that never becomes healthy: the job stops at wait-healthy.
    let sick = Upstream::start("green v2").await;
    sick.set_healthy(false);
    let (code, log) = release(
        &p,
        &[("HEALTH_TIMEOUT", "500ms")],
        &["web".into(), sick.addr.to_string()],
    )
    .await;
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("did not become healthy"), "{log}");
    assert_eq!(p.admin.service("web").await["live"], "blue");

    // Usage errors stop before anything is touched.
    let generation = p.admin.service("web").await["generation"].clone();
    let (code, log) = release(
        &p,
        &[("STEPS", "10 lots")],
        &["web".into(), sick.addr.to_string()],
    )
    .await;
    assert_eq!(code, 2, "{log}");
    let (code, _) = release(&p, &[], &["web".into()]).await;
    assert_eq!(code, 2);
    assert_eq!(p.admin.service("web").await["generation"], generation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_failing_during_the_canary_is_rolled_back() {
    let blue = Upstream::start("blue v1").await;
    let green = Upstream::start("green v1").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&health_every("50ms"))])
        .await;
    let v2 = Arc::new(Upstream::start("green v2").await);

    // The new version breaks once it takes real traffic.
    let admin = Admin::new(p.running.as_ref().unwrap().admin_addr);
    let breaker = {
        let v2 = Arc::clone(&v2);
        tokio::spawn(async move {
            let admin = &admin;
            let split = eventually(Duration::from_secs(20), move || async move {
                admin.service("web").await["live"] == "split"
            })
            .await;
            v2.set_failing(true);
            split
        })
    };
    let traffic = Traffic::start(&p, 2);
    let (code, log) = release(
        &p,
        &[
            ("SMOKE_EXPECT", "green v2"),
            ("PAUSE", "5"),
            ("VERSION", "green v2"),
        ],
        &["web".into(), v2.addr.to_string()],
    )
    .await;
    let (_, failed) = traffic.stop().await;
    assert!(breaker.await.unwrap(), "the canary started");
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("green misbehaved at 10 %"), "{log}");
    assert!(
        log.contains("rolled back: all traffic on blue again"),
        "{log}"
    );

    let svc = p.admin.service("web").await;
    assert_eq!(svc["live"], "blue");
    let history = p.admin.get("/api/v1/services/web/history").await.1;
    assert_eq!(
        actions(&history)[..3],
        ["rollback 0", "split 10", "pool 0"],
        "{history}"
    );
    assert!(
        history[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("release green v2"),
        "{history}"
    );
    // Clients saw the broken version only while it had its 10 %.
    let _ = failed;
    let before = v2.hits();
    for _ in 0..20 {
        assert_eq!(p.get("/").await.2, "blue v1");
    }
    assert_eq!(
        v2.hits(),
        before,
        "no traffic reaches green after the rollback"
    );
}

/// Rollout plans for `MODE=rollout`: "quick" passes its 10 % step after
/// 1 s and 20 canary requests; "careful" holds it for 30 s, so only the
/// analysis can end it early.
const PLANS: &str = "
[[rollout_plan]]
name = \"quick\"
steps = [ { weight = 10, pause = \"1s\", min_requests = 20 }, { weight = 100 } ]
[rollout_plan.analysis]
min_requests = 20

[[rollout_plan]]
name = \"careful\"
steps = [ { weight = 10, pause = \"30s\", min_requests = 20 }, { weight = 100 } ]
[rollout_plan.analysis]
min_requests = 20
";

async fn proxy_with_plans(blue: &Upstream, green: &Upstream) -> TestProxy {
    let dir = TempDir::new("pipeline-rollout");
    let text = format!(
        "{}\n{PLANS}",
        config_text(
            dir.path(),
            "",
            &[Svc::new("web", &[blue], &[green]).extra(&health_every("50ms"))]
        )
    );
    TestProxy::start_text(dir, &text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_mode_a_healthy_canary_goes_live() {
    let blue = Upstream::start("blue v1").await;
    let old_green = Upstream::start("green v0").await;
    let p = proxy_with_plans(&blue, &old_green).await;
    let v2 = Upstream::start("green v2").await;

    let traffic = Traffic::start(&p, 4);
    let (code, log) = release(
        &p,
        &[
            ("MODE", "rollout"),
            ("PLAN", "quick"),
            ("ROLLOUT_TIMEOUT", "60s"),
            ("SMOKE_EXPECT", "green v2"),
            ("VERSION", "v2"),
        ],
        &["web".into(), v2.addr.to_string()],
    )
    .await;
    let (ok, failed) = traffic.stop().await;
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("released v2: green is live (rollout succeeded"),
        "{log}"
    );

    let svc = p.admin.service("web").await;
    assert_eq!(svc["live"], "green");
    assert_eq!(
        svc["pools"]["green"]["backends"][0]["addr"],
        v2.addr.to_string()
    );
    let (_, rollout) = p.admin.get("/api/v1/services/web/rollout").await;
    assert_eq!(rollout["state"], "succeeded", "{rollout}");
    assert_eq!(rollout["canary"], "green", "{rollout}");
    // The proxy made the steps (10 %, then all) after the script's deploy.
    let history = p.admin.get("/api/v1/services/web/history").await.1;
    assert_eq!(
        actions(&history)[..3],
        ["split 100", "split 10", "pool 0"],
        "{history}"
    );
    let actor = format!("rollout:{}", rollout["id"].as_str().unwrap());
    assert_eq!(history[0]["actor"], actor, "{history}");
    assert_eq!(history[1]["actor"], actor, "{history}");
    assert!(
        history[1]["reason"]
            .as_str()
            .unwrap()
            .ends_with("release v2"),
        "the script's reason is on the rollout's first step: {history}"
    );
    assert_eq!(old_green.hits(), 0, "the old green version never served");
    assert_eq!(failed, 0, "no client request failed ({ok} passed)");
    assert!(ok > 50, "traffic flowed during the release: {ok}");
    assert_eq!(p.get("/").await.2, "green v2");
    let m = p.admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchyard_rollouts_total{result="succeeded",service="web"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_mode_a_failing_canary_is_rolled_back_and_the_job_fails() {
    let blue = Upstream::start("blue v1").await;
    let green = Upstream::start("green v1").await;
    let p = proxy_with_plans(&blue, &green).await;
    let v2 = Arc::new(Upstream::start("green v2").await);

    // Usage errors stop before anything is touched.
    let generation = p.admin.service("web").await["generation"].clone();
    let args = ["web".to_string(), v2.addr.to_string()];
    let (code, log) = release(&p, &[("MODE", "rollout")], &args).await;
    assert_eq!(code, 2, "no PLAN: {log}");
    let (code, log) = release(&p, &[("MODE", "canary")], &args).await;
    assert_eq!(code, 2, "unknown MODE: {log}");
    assert_eq!(p.admin.service("web").await["generation"], generation);

    // The new version passes its smoke tests, then answers 500 once the
    // rollout has started.
    let admin = Admin::new(p.running.as_ref().unwrap().admin_addr);
    let breaker = {
        let v2 = Arc::clone(&v2);
        tokio::spawn(async move {
            let admin = &admin;
            let started = eventually(Duration::from_secs(20), move || async move {
                admin.get("/api/v1/services/web/rollout").await.0 == 200
            })
            .await;
            v2.set_failing(true);
            started
        })
    };
    let traffic = Traffic::start(&p, 4);
    let (code, log) = release(
        &p,
        &[
            ("MODE", "rollout"),
            ("PLAN", "careful"),
            ("ROLLOUT_TIMEOUT", "60s"),
            ("SMOKE_EXPECT", "green v2"),
            ("VERSION", "v2"),
        ],
        &args,
    )
    .await;
    let _ = traffic.stop().await;
    assert!(breaker.await.unwrap(), "the rollout started");
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("FAILED: rollout rolled_back: "), "{log}");
    assert!(log.contains("all traffic on blue again"), "{log}");

    // The live pool is unchanged: blue, its backend, all the traffic.
    let svc = p.admin.service("web").await;
    assert_eq!(svc["live"], "blue", "{svc}");
    assert_eq!(svc["weights"]["green"], 0, "{svc}");
    assert_eq!(
        svc["pools"]["blue"]["backends"][0]["addr"],
        blue.addr.to_string()
    );
    let (_, rollout) = p.admin.get("/api/v1/services/web/rollout").await;
    assert_eq!(rollout["state"], "rolled_back", "{rollout}");
    assert_eq!(
        rollout["step"], 0,
        "rolled back at the 10 % step: {rollout}"
    );
    let before = v2.hits();
    for _ in 0..20 {
        assert_eq!(p.get("/").await.2, "blue v1");
    }
    assert_eq!(
        v2.hits(),
        before,
        "no traffic reaches green after the rollback"
    );
}
