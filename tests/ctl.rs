//! `switchyard ctl`, the pipeline client: each subcommand against a real
//! proxy, exit status 0 on success and non-zero with the server's error on
//! refusal.

mod support;

use support::*;

/// Runs `switchyard ctl --admin URL ARGS` off the async runtime.
async fn ctl(admin: std::net::SocketAddr, args: &[&str]) -> (i32, String, String) {
    let mut full = vec![
        "ctl".to_string(),
        "--admin".into(),
        format!("http://{admin}"),
    ];
    full.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        run_binary(&refs)
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
    assert!(lines[0].contains("rollback"), "newest first: {out}");
    assert!(out.contains("reason=canary step 1"), "{out}");

    // --json prints the server's object.
    let (code, out, _) = ctl(admin, &["--json", "status", "web"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["live"], "blue");
    let generation = v["generation"].as_u64().unwrap();

    // Refusals: non-zero exit, the server's error printed, nothing changed.
    let (code, _, err) = ctl(admin, &["switch", "web", "purple"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("400") && err.contains("purple"), "{err}");
    let (code, _, err) = ctl(admin, &["status", "nope"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("404"), "{err}");
    let (code, _, err) = ctl(admin, &["--if-match", "1", "switch", "web", "green"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("412"), "{err}");
    let (code, _, err) = ctl(admin, &["set-pool", "web", "blue", "127.0.0.1:1"]).await;
    assert_ne!(code, 0);
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
    assert_ne!(code, 0);
    assert!(err.contains("cannot reach the admin API"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_sends_the_token() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = TempDir::new("ctl-token");
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, "ci-pipeline:s3cret-token-1\n").unwrap();
    let mut text = config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]);
    text = text.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
            token_file.display()
        ),
        1,
    );
    let p = TestProxy::start_text(dir, &text).await;
    let admin = p.running.as_ref().unwrap().admin_addr;
    let (code, _, err) = ctl(admin, &["switch", "web", "green"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("401"), "{err}");
    let tf = token_file.display().to_string();
    let (code, _, err) = ctl(admin, &["--token-file", &tf, "switch", "web", "green"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = ctl(admin, &["--token-file", &tf, "history", "web"]).await;
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap().contains("actor=ci-pipeline"),
        "{out}"
    );
}
