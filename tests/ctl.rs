//! `switchyard ctl`, the pipeline client: each subcommand against a real
//! proxy, and the exit statuses pipelines branch on: 0 done, 1 refused (the
//! server's message printed) or `wait-healthy` timed out, 2 usage error,
//! 3 admin API unreachable.

mod support;

use support::*;

/// Runs `switchyard ctl --admin URL ARGS` off the async runtime.
async fn ctl(admin: std::net::SocketAddr, args: &[&str]) -> (i32, String, String) {
    ctl_env(admin, args, &[]).await
}

/// Same, with extra environment variables.
async fn ctl_env(
    admin: std::net::SocketAddr,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let url = format!("http://{admin}");
    let mut full = vec!["ctl", "--admin", &url];
    full.extend(args);
    switchyard(&full, env).await
}

/// Runs `switchyard ARGS` off the async runtime, with none of ctl's
/// variables from the test's environment, only `env`.
async fn switchyard(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(&full)
            .env_remove("SWITCHYARD_ADMIN")
            .env_remove("SWITCHYARD_TOKEN")
            .env_remove("SWITCHYARD_TOKEN_FILE")
            .envs(env)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drives_a_release() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let green2 = Upstream::start("green2").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = p.running.as_ref().unwrap().admin_addr;

    let (code, out, err) = ctl(admin, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("web  live=blue  blue 100% / green 0%  generation 1"),
        "{out}"
    );

    let addr = green2.addr.to_string();
    let (code, out, err) = ctl(admin, &["set-pool", "web", "green", &addr]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&addr), "{out}");

    let (code, out, err) = ctl(
        admin,
        &[
            "split",
            "web",
            "--green",
            "12.5",
            "--reason",
            "canary step 1",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("live=split  blue 87.5% / green 12.5%"),
        "{out}"
    );

    let (code, out, err) = ctl(admin, &["switch", "web", "green"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("live=green"), "{out}");
    assert_eq!(p.get("/").await.2, "green2");

    let (code, out, err) = ctl(admin, &["rollback", "web"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("live=blue"), "{out}");

    let (code, out, _) = ctl(admin, &["history", "web"]).await;
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("GEN"), "a header: {out}");
    assert!(lines[1].contains("rollback"), "newest first: {out}");
    assert!(out.contains("canary step 1"), "{out}");

    // --json prints the server's object.
    let (code, out, _) = ctl(admin, &["--json", "status", "web"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["live"], "blue");
    let generation = v["generation"].as_u64().unwrap();

    // Refusals: non-zero exit, the server's error printed, nothing changed.
    let (code, _, err) = ctl(admin, &["switch", "web", "purple"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("400") && err.contains("purple"), "{err}");
    let (code, _, err) = ctl(admin, &["status", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
    let stale = (generation - 1).to_string();
    let (code, _, err) = ctl(
        admin,
        &["--if-generation", &stale, "switch", "web", "green"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("412"), "{err}");
    // --json: the server's error object on stdout as well.
    let (code, out, _) = ctl(admin, &["switch", "web", "purple", "--json"]).await;
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("purple"),
        "{out}"
    );
    let (code, _, err) = ctl(admin, &["set-pool", "web", "blue", "127.0.0.1:1"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("409") && err.contains("pool_takes_traffic"),
        "{err}"
    );
    assert_eq!(
        p.admin.service("web").await["generation"].as_u64(),
        Some(generation)
    );

    // Unreachable admin API: non-zero with a clear message.
    drop(p);
    let (code, _, err) = ctl(admin, &["status"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_sends_the_token() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let (p, token_file) = TestProxy::start_with_tokens(
        "ci-pipeline:s3cret-token-1\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let admin = p.running.as_ref().unwrap().admin_addr;
    let (code, _, err) = ctl(admin, &["switch", "web", "green"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
    let tf = token_file.display().to_string();
    let (code, _, err) = ctl(admin, &["--token-file", &tf, "switch", "web", "green"]).await;
    assert_eq!(code, 0, "{err}");
    // On the proxy's host, `--config FILE` supplies the admin address and
    // the token file (a wildcard listen address is reached on loopback).
    let ctl_config = p.dir.join("ctl.toml");
    std::fs::write(
        &ctl_config,
        std::fs::read_to_string(&p.config_path).unwrap().replacen(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"0.0.0.0:{}\"", admin.port()),
            1,
        ),
    )
    .unwrap();
    let cc = ctl_config.display().to_string();
    let (code, out, err) =
        switchyard(&["--config", &cc, "ctl", "switch", "web", "blue"], &[]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("live=blue"), "{out}");
    let (code, _, err) = ctl(admin, &["--token-file", &tf, "switch", "web", "green"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = ctl(admin, &["--token-file", &tf, "history", "web"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().nth(1).unwrap().contains("ci-pipeline"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_token_and_admin_from_the_environment() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let (p, _) = TestProxy::start_with_tokens(
        "deployer:env-token-123\n",
        &[Svc::new("web", &[&blue], &[&green])],
    )
    .await;
    let admin = p.running.as_ref().unwrap().admin_addr;
    // SWITCHYARD_ADMIN stands for --admin (the helper's --admin points at a
    // closed port here, so only the variable can make this succeed).
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let url = format!("http://{admin}");
    let (code, _, err) = ctl_env(
        closed,
        &["status"],
        &[("SWITCHYARD_TOKEN", "env-token-123")],
    )
    .await;
    assert_eq!(code, 3, "--admin wins over the environment: {err}");
    let (code, _, err) = switchyard(
        &["ctl", "switch", "web", "green", "--reason", "from env"],
        &[
            ("SWITCHYARD_ADMIN", &url),
            ("SWITCHYARD_TOKEN", "env-token-123"),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ctl_env(
        admin,
        &["history", "web", "--json"],
        &[("SWITCHYARD_TOKEN", "deployer:env-token-123")],
    )
    .await;
    assert_eq!(code, 0, "a whole token-file line works too: {err}");
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(history[0]["actor"], "deployer", "{history}");
    assert_eq!(history[0]["reason"], "from env", "{history}");
    // A wrong token is a refusal, not a usage error.
    let (code, _, err) =
        ctl_env(admin, &["status"], &[("SWITCHYARD_TOKEN", "wrong-token-1")]).await;
    assert_eq!(code, 1);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_usage_errors_exit_2() {
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    for args in [
        &["switch", "web"][..],
        &["split", "web", "--green", "lots"],
        &["frobnicate"],
        &["wait-healthy", "web", "green", "--timeout", "soon"],
        &["--token-file", "/nonexistent/token", "status"],
        &["--config", "/nonexistent/switchyard.toml", "status"],
    ] {
        let (code, _, err) = ctl(closed, args).await;
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(!err.is_empty(), "{args:?}: says why");
    }
    let (code, _, err) =
        switchyard(&["ctl", "--admin", "https://127.0.0.1:9901", "status"], &[]).await;
    assert_eq!(code, 2);
    assert!(err.contains("plain HTTP"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_unreachable_admin_exits_3() {
    // Nothing listens: refused.
    let closed = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, _, err) = ctl(closed, &["switch", "web", "green"]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("cannot reach the admin API"), "{err}");
    // Something listens but is not an HTTP server: it closes at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closer = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            drop(s);
        }
    });
    let (code, _, err) = ctl(addr, &["status"]).await;
    assert_eq!(code, 3, "{err}");
    closer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_wait_healthy_waits_for_checks_and_times_out() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&health_every("50ms"))])
        .await;
    let admin = p.running.as_ref().unwrap().admin_addr;

    // Deploy to the idle pool: the new backend starts unknown and becomes
    // healthy after its first passing check; wait-healthy sees that.
    let v2 = Upstream::start("green v2").await;
    let addr = v2.addr.to_string();
    let (code, out, err) = ctl(admin, &["set-pool", "web", "green", &addr]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&addr), "{out}");
    let (code, out, err) = ctl(admin, &["wait-healthy", "web", "green", "--timeout", "10s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("all 1 backend(s) healthy"), "{out}");
    assert_eq!(
        p.admin.service("web").await["pools"]["green"]["backends"][0]["healthy"],
        true
    );

    // A backend that fails its checks: exit 1 after the timeout, naming it.
    let sick = Upstream::start("sick").await;
    sick.set_healthy(false);
    let sick_addr = sick.addr.to_string();
    let (code, _, err) = ctl(admin, &["set-pool", "web", "green", &addr, &sick_addr]).await;
    assert_eq!(code, 0, "{err}");
    let started = std::time::Instant::now();
    let (code, _, err) = ctl(
        admin,
        &["wait-healthy", "web", "green", "--timeout", "700ms"],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("timed out") && err.contains(&sick_addr),
        "{err}"
    );
    assert!(
        !err.contains(&format!("{addr} (")),
        "the healthy one is not named: {err}"
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(700));

    // It recovers: the same command now succeeds.
    sick.set_healthy(true);
    let (code, _, err) = ctl(admin, &["wait-healthy", "web", "green", "--timeout", "10s"]).await;
    assert_eq!(code, 0, "{err}");

    // Unknown service: the server's 404, at once.
    let (code, _, err) = ctl(admin, &["wait-healthy", "nope", "green"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("404"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_status_is_a_table_of_pools_and_backends() {
    let blue = Upstream::start("blue").await;
    let blue2 = Upstream::start("blue2").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[
        Svc::new("web", &[&blue, &blue2], &[&green]),
        Svc::new("api", &[&blue], &[&green]).prefix("/api"),
    ])
    .await;
    let admin = p.running.as_ref().unwrap().admin_addr;
    let (code, out, err) = ctl(admin, &["status"]).await;
    assert_eq!(code, 0, "{err}");
    for want in [
        "web  live=blue  blue 100% / green 0%  generation 1",
        "api  live=blue",
        "POOL   WEIGHT  BACKEND",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }
    let row = out
        .lines()
        .find(|l| l.contains(&blue2.addr.to_string()))
        .unwrap();
    assert!(row.contains("healthy"), "{out}");
    let green_row = out
        .lines()
        .find(|l| l.trim_start().starts_with("green"))
        .unwrap();
    assert!(
        green_row.contains("0%") && green_row.contains(&green.addr.to_string()),
        "{out}"
    );
}
