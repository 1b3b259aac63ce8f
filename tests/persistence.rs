//! The real binary (SPEC §7): state survives `kill -9`; a corrupt state file
//! stops the start; `--ignore-state`; SIGHUP and `POST /api/v1/reload`,
//! including a broken config that keeps the old one serving; SIGTERM drains
//! and exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

async fn spawn(config: &Path, args: &'static [&'static str]) -> Result<ProxyProcess, String> {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, args))
        .await
        .unwrap()
}

/// Waits (off the runtime) for the process to exit; its exit code.
async fn wait_exit(mut p: ProxyProcess, timeout: Duration) -> (ProxyProcess, Option<i32>) {
    tokio::task::spawn_blocking(move || {
        let code = p.wait_exit(timeout);
        (p, code)
    })
    .await
    .unwrap()
}

fn proxy_url(p: &ProxyProcess, path: &str) -> String {
    format!("http://{}{path}", p.proxy)
}

/// What must survive a restart.
fn durable(v: &Value) -> Value {
    let addrs = |c: &str| -> Vec<Value> {
        v["pools"][c]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["addr"].clone())
            .collect()
    };
    json!({
        "generation": v["generation"],
        "weights": v["weights"],
        "live": v["live"],
        "blue": addrs("blue"),
        "green": addrs("green"),
    })
}

fn write_config(path: &PathBuf, text: &str) {
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_kill_9_and_a_corrupt_state_file_stops_the_start() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let blue2 = Upstream::start("blue2").await;
    let dir = TempDir::new("persist");
    let config = dir.join("switchyard.toml");
    write_config(
        &config,
        &config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]),
    );
    let state_file = dir.join("state.json");

    let p = spawn(&config, &[]).await.unwrap();
    let admin = Admin::new(p.admin);
    assert_eq!(admin.service("web").await["generation"], 1);
    admin
        .ok(
            "/api/v1/services/web/split",
            r#"{"green":30,"reason":"canary"}"#,
        )
        .await;
    admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/blue",
            &json!({"backends": [blue2.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    admin
        .ok("/api/v1/services/web/split", r#"{"green":87.5}"#)
        .await;
    let before = admin.service("web").await;
    assert_eq!(before["generation"], 5);
    let (_, history_before) = admin.get("/api/v1/services/web/history").await;
    assert!(state_file.exists());

    // kill -9: no chance to write anything on the way out.
    p.signal("KILL");
    let (p, code) = wait_exit(p, Duration::from_secs(10)).await;
    assert_eq!(code, None, "killed by a signal");
    drop(p);

    // Same config, same state.
    let p = spawn(&config, &[]).await.unwrap();
    let admin = Admin::new(p.admin);
    let after = admin.service("web").await;
    assert_eq!(durable(&after), durable(&before), "{after}");
    assert_eq!(after["weights"], json!({"blue": 12.5, "green": 87.5}));
    let (_, history_after) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(history_after, history_before);
    // And it routes by it: bucket 0 is green, bucket 9999 blue (now blue2).
    let client = http1_client();
    let url = proxy_url(&p, "/");
    let (_, _, body) = get(&client, &url, &[("cookie", "switchyard_bucket=0")]).await;
    assert_eq!(body, "green");
    let (_, _, body) = get(&client, &url, &[("cookie", "switchyard_bucket=9999")]).await;
    assert_eq!(body, "blue2");
    // Rollback still knows where to go after the restart: green was the
    // last pool live at 100 % before this split.
    let v = admin.ok("/api/v1/services/web/rollback", "{}").await;
    assert_eq!(v["live"], "green", "{v}");
    assert_eq!(v["generation"], 6);
    let (_, _, body) = get(&client, &url, &[("cookie", "switchyard_bucket=9999")]).await;
    assert_eq!(body, "green");

    // SIGTERM: exit 0.
    p.signal("TERM");
    let (p, code) = wait_exit(p, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", p.log_text());
    drop(p);

    // A corrupt state file: exit 1, naming the file; no silent defaults.
    std::fs::write(&state_file, b"{\"version\":1,\"services\":{\"web\":").unwrap();
    let err = spawn(&config, &[]).await.err().expect("must not start");
    assert!(err.contains("exit status: 1"), "{err}");
    assert!(
        err.contains(&state_file.display().to_string()),
        "error does not name the state file: {err}"
    );
    assert!(err.contains("--ignore-state"), "{err}");
    // Still the same corrupt bytes: nothing overwrote the evidence.
    assert_eq!(
        std::fs::read(&state_file).unwrap(),
        b"{\"version\":1,\"services\":{\"web\":"
    );
    // Valid JSON but not a state: also refused.
    std::fs::write(
        &state_file,
        br#"{"version":1,"services":{"web":{"weights":{"blue":50,"green":10}}}}"#,
    )
    .unwrap();
    let err = spawn(&config, &[]).await.err().expect("must not start");
    assert!(
        err.contains("exit status: 1") && err.contains("state.json"),
        "{err}"
    );

    // --ignore-state: starts from `initial`, the bad file moved aside.
    let p = spawn(&config, &["--ignore-state"]).await.unwrap();
    let admin = Admin::new(p.admin);
    let v = admin.service("web").await;
    assert_eq!(
        (v["live"].as_str(), v["generation"].as_u64()),
        (Some("blue"), Some(1)),
        "{v}"
    );
    assert_eq!(
        v["pools"]["blue"]["backends"][0]["addr"],
        blue.addr.to_string()
    );
    let (_, _, body) = get(&http1_client(), &proxy_url(&p, "/"), &[]).await;
    assert_eq!(body, "blue");
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("state.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    // A fresh, valid state file was written.
    let saved: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert_eq!(saved["services"]["web"]["generation"], 1, "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_reload_apply_a_good_config_and_keep_the_old_one_on_a_bad_one() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (blue2, api) = (Upstream::start("blue2").await, Upstream::start("api").await);
    let dir = TempDir::new("reload");
    let config = dir.join("switchyard.toml");
    write_config(
        &config,
        &config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]),
    );
    let p = spawn(&config, &[]).await.unwrap();
    let admin = Admin::new(p.admin);
    let client = http1_client();
    let get_body = |path: &'static str| {
        let (client, url) = (client.clone(), proxy_url(&p, path));
        async move { get(&client, &url, &[]).await }
    };
    assert_eq!(get_body("/api/x").await.2, "blue");
    let (s, _) = admin.get("/api/v1/services/api").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // SIGHUP: a new service, and web's blue pool changed in the file.
    let good = config_text(
        dir.path(),
        "",
        &[
            Svc::new("web", &[&blue2], &[&green]),
            Svc::new("api", &[&api], &[&green]).prefix("/api"),
        ],
    );
    write_config(&config, &good);
    p.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            admin.get("/api/v1/services/api").await.0 == StatusCode::OK
        })
        .await,
        "SIGHUP did not add the service:\n{}",
        p.log_text()
    );
    assert_eq!(get_body("/api/x").await.2, "api");
    assert_eq!(get_body("/").await.2, "blue2");
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(
        (h[0]["action"].as_str(), h[0]["actor"].as_str()),
        (Some("pool"), Some("config")),
        "{h}"
    );
    let m = admin.metrics().await;
    assert_eq!(
        metric(&m, "switchyard_config_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );

    // A broken file through the API: 400 naming file and line; nothing changes.
    let services_before = admin.get("/api/v1/services").await.1;
    let broken = good.replacen("[proxy]\n", "[proxy]\nbogus_key = 1\n", 1);
    let line = broken
        .lines()
        .position(|l| l.starts_with("bogus_key"))
        .unwrap()
        + 1;
    write_config(&config, &broken.replace("api", "api2"));
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], "invalid_config");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{}:{line}:", config.display())),
        "message does not name {}:{line}: {message}",
        config.display()
    );
    assert!(message.contains("bogus_key"), "{message}");
    assert_eq!(admin.get("/api/v1/services").await.1, services_before);
    assert_eq!(get_body("/api/x").await.2, "api");
    assert_eq!(get_body("/").await.2, "blue2");
    // The same file by SIGHUP: logged, counted, old config still serving.
    p.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            metric(
                &admin.metrics().await,
                "switchyard_config_reloads_total{result=\"error\"}",
            ) == Some(2.0)
        })
        .await
    );
    assert_eq!(get_body("/api/x").await.2, "api");
    assert_eq!(admin.get("/api/v1/services").await.1, services_before);
    assert!(
        p.log_text().contains("bogus_key"),
        "the log does not say why:\n{}",
        p.log_text()
    );

    // Fixed again: the API reload works and answers the services.
    write_config(&config, &good.replace("/api", "/v2"));
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(get_body("/v2/x").await.2, "api");
    assert_eq!(get_body("/api/x").await.2, "blue2");

    // SIGTERM with a request in flight: it finishes, then exit 0.
    let hits = blue2.hits();
    let slow = tokio::spawn(get_body("/sleep/700"));
    assert!(
        eventually(Duration::from_secs(5), || async { blue2.hits() > hits }).await,
        "the slow request did not reach the backend"
    );
    p.signal("TERM");
    let (status, _, body) = slow.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "blue2"));
    let (p, code) = wait_exit(p, Duration::from_secs(10)).await;
    assert_eq!(code, Some(0), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_cannot_be_persisted_is_not_applied() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    let state = proxy.dir.join("state.json");
    assert!(state.is_file(), "the first state is written at start");
    // A non-empty directory where the state file goes: the rename fails
    // (even for root, unlike permissions).
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("keep"), "x").unwrap();

    let before = admin.service("web").await;
    let (s, v) = admin
        .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "persist_failed");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&state.display().to_string()),
        "{v}"
    );
    // Not applied: not routed, not in history, not counted.
    assert_eq!(durable(&admin.service("web").await), durable(&before));
    for _ in 0..10 {
        assert_eq!(proxy.get("/").await.2, "blue");
    }
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(h.as_array().unwrap().len(), 1, "{h}");
    assert_eq!(
        metric(
            &admin.metrics().await,
            "switchyard_routing_changes_total{action=\"switch\",service=\"web\"}"
        ),
        Some(0.0)
    );

    // Once the file can be written again, the same change goes through.
    std::fs::remove_dir_all(&state).unwrap();
    let v = admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(
        (v["live"].as_str(), v["generation"].as_u64()),
        (Some("green"), Some(2))
    );
    assert_eq!(proxy.get("/").await.2, "green");
    assert_eq!(
        metric(
            &admin.metrics().await,
            "switchyard_routing_changes_total{action=\"switch\",service=\"web\"}"
        ),
        Some(1.0)
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(saved["services"]["web"]["generation"], 2, "{saved}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_service_settings_keeps_backend_health_gauges() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    let gauge = |m: &str, pool: &str, u: &Upstream| {
        metric(
            m,
            &format!(
                "switchyard_backend_healthy{{backend=\"{}\",pool=\"{pool}\",service=\"web\"}}",
                u.addr
            ),
        )
    };
    let m = admin.metrics().await;
    assert_eq!(
        (gauge(&m, "blue", &blue), gauge(&m, "green", &green)),
        (Some(1.0), Some(1.0))
    );

    // Same backends, other settings (balance, sticky cookie): the service is rebuilt.
    let text = std::fs::read_to_string(&proxy.config_path)
        .unwrap()
        .replace(
            "path_prefix = \"/\"\n",
            "path_prefix = \"/\"\nbalance = \"least_request\"\n",
        );
    std::fs::write(
        &proxy.config_path,
        format!("{text}[service.sticky]\ncookie = \"bucket2\"\n"),
    )
    .unwrap();
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    admin
        .ok("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    let (_, h, _) = proxy.get("/").await;
    assert!(
        h.get("set-cookie")
            .is_some_and(|c| c.to_str().unwrap().starts_with("bucket2=")),
        "the new settings are in force: {h:?}"
    );
    let v = admin.service("web").await;
    assert_eq!(v["pools"]["blue"]["backends"][0]["healthy"], true, "{v}");
    let m = admin.metrics().await;
    assert_eq!(
        (gauge(&m, "blue", &blue), gauge(&m, "green", &green)),
        (Some(1.0), Some(1.0)),
        "healthy backends reported as unhealthy after the reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_rebuilds_a_service_keeps_api_backends_serving() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let green2 = Upstream::start("green2").await;
    // Checks take 300 ms, so a backend waiting for its first check is seen.
    let health = "[service.health]\npath = \"/sleep/300\"\ninterval = \"5s\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1";
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(health)]).await;
    let admin = &proxy.admin;
    let (s, v) = admin
        .put(
            "/api/v1/services/web/pools/green",
            &json!({"backends": [green2.addr.to_string()]}).to_string(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            admin.service("web").await["pools"]["green"]["backends"][0]["healthy"] == true
        })
        .await
    );
    admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(proxy.get("/").await.2, "green2");

    // A reload that changes only a setting of the service (here the sticky
    // cookie): the backend the API put in the live pool keeps serving; the
    // old pool gets nothing.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        format!("{text}[service.sticky]\ncookie = \"bucket2\"\n"),
    )
    .unwrap();
    // (Not counted by blue's hits: its health checks hit /sleep too.)
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    for _ in 0..10 {
        let (s, h, body) = proxy.get("/").await;
        assert_eq!(
            (s, body.as_str()),
            (StatusCode::OK, "green2"),
            "live traffic fell back to the old pool: {h:?}"
        );
    }
    let v = admin.service("web").await;
    assert_eq!(v["pools"]["green"]["backends"][0]["healthy"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_does_not_wait_for_idle_or_silent_connections() {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let dir = TempDir::new("term-idle");
    let config = dir.join("switchyard.toml");
    // Long bounds, so that waiting for any of them would show.
    write_config(
        &config,
        &config_text(
            dir.path(),
            "header_read_timeout = \"30s\"\nidle_timeout = \"60s\"\ndrain_timeout = \"60s\"",
            &[Svc::new("web", &[&blue], &[&green])],
        ),
    );
    let p = spawn(&config, &[]).await.unwrap();
    // An idle HTTP/1.1 keep-alive connection, an idle h2c connection, and a
    // connection that never sent a byte.
    let (h1, h2) = (http1_client(), h2_client());
    assert_eq!(get(&h1, &proxy_url(&p, "/"), &[]).await.2, "blue");
    assert_eq!(get(&h2, &proxy_url(&p, "/"), &[]).await.2, "blue");
    let _silent = tokio::net::TcpStream::connect(p.proxy).await.unwrap();
    let admin = Admin::new(p.admin);
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                &admin.metrics().await,
                "switchyard_open_connections{listener=\"http\"}",
            ) == Some(3.0)
        })
        .await
    );

    // Waiting for any of them would take 30 s (header_read_timeout) or
    // more: an exit within wait_exit's 20 s proves none was waited for,
    // without a bound a loaded machine could miss.
    p.signal("TERM");
    let (p, code) = wait_exit(p, Duration::from_secs(20)).await;
    assert_eq!(
        code,
        Some(0),
        "shutdown waited for connections with no request:\n{}",
        p.log_text()
    );
}

/// Issue 17 item 6 (and the layout issue's "side effects only after the
/// save"): a pool change or a reload whose new state cannot be persisted
/// answers an error, keeps the old state, and leaves no metric series (nor
/// health checker) behind for backends or services that were never applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_cannot_be_persisted_leaves_no_metric_series() {
    let (blue, green, green2) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
        Upstream::start("green2").await,
    );
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = &proxy.admin;
    let before = admin.service("web").await;
    // The state file replaced by a directory: the atomic rename over it
    // fails, for root too (chmod would not stop root).
    let state = proxy.dir.join("state.json");
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();

    let body = json!({"backends": [green2.addr.to_string()]}).to_string();
    let (s, v) = admin.put("/api/v1/services/web/pools/green", &body).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{v}");
    assert_eq!(v["error"]["code"], "persist_failed", "{v}");
    assert_eq!(admin.service("web").await, before, "the old state is kept");
    let m = admin.metrics().await;
    let new_backend = format!("backend=\"{}\"", green2.addr);
    assert!(
        !m.lines()
            .any(|l| l.starts_with("switchyard_backend_healthy") && l.contains(&new_backend)),
        "a series for a backend that was never applied:\n{m}"
    );
    // The old backend's series is still there and still reads 1.
    assert_eq!(
        metric(
            &m,
            &format!(
                "switchyard_backend_healthy{{backend=\"{}\",pool=\"green\",service=\"web\"}}",
                green.addr
            )
        ),
        Some(1.0)
    );

    // A reload that adds a service and cannot be saved: no series for it.
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let api = Svc::new("api", &[&green2], &[&green2])
        .hosts("[\"api.example\"]")
        .toml();
    std::fs::write(&proxy.config_path, format!("{text}{api}")).unwrap();
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_ne!(s, StatusCode::OK, "{v}");
    let m = admin.metrics().await;
    assert!(
        !m.lines().any(|l| l.contains("service=\"api\"")),
        "series for a service that was never applied:\n{m}"
    );
    assert!(!m
        .lines()
        .any(|l| l.starts_with("switchyard_backend_healthy") && l.contains(&new_backend)));
    // Nothing connected to the never-applied backend (no health checker,
    // no traffic).
    assert_eq!(green2.hits(), 0);

    // Once the state can be written again, the same change is applied and
    // its series appears.
    std::fs::remove_dir(&state).unwrap();
    std::fs::write(&proxy.config_path, &text).unwrap();
    let (s, v) = admin.put("/api/v1/services/web/pools/green", &body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let m = admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            &format!(
                "switchyard_backend_healthy{{backend=\"{}\",pool=\"green\",service=\"web\"}}",
                green2.addr
            )
        ),
        Some(1.0),
        "{m}"
    );
}
