//! `switchyard ctl status --watch` follows `/api/v1/events`: it prints the
//! state on connect and on every change, and when the admin listener goes
//! away and comes back it says so and picks the stream up again.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

/// Output collected from a child's stream by a thread.
fn collect(r: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let o = Arc::clone(&out);
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut o = o.lock().unwrap();
            o.push_str(&line);
            o.push('\n');
        }
    });
    out
}

async fn wait_for(out: &Arc<Mutex<String>>, what: impl Fn(&str) -> bool, label: &str) {
    let ok = eventually(Duration::from_secs(20), || {
        let text = out.lock().unwrap().clone();
        let found = what(&text);
        async move { found }
    })
    .await;
    assert!(
        ok,
        "ctl --watch never printed {label}:\n{}",
        out.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_prints_every_change_and_survives_a_restart() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let admin_port = free_port();
    let dir = TempDir::new("ctl-watch");
    let text = config_text(dir.path(), "", &[Svc::new("web", &[&blue], &[&green])]).replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!("[admin]\nlisten = \"127.0.0.1:{admin_port}\""),
        1,
    );
    let mut proxy = TestProxy::start_text(dir, &text).await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "ctl",
            "--admin",
            &format!("http://127.0.0.1:{admin_port}"),
            "status",
            "web",
            "--watch",
        ])
        .env_remove("SWITCHYARD_ADMIN")
        .env_remove("SWITCHYARD_TOKEN")
        .env_remove("SWITCHYARD_TOKEN_FILE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());

    wait_for(&stdout, |t| t.contains("web  live=blue"), "the first state").await;
    proxy
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    wait_for(&stdout, |t| t.contains("web  live=green"), "the switch").await;
    wait_for(
        &stdout,
        |t| t.contains("rates (this replica, 10s)"),
        "rates",
    )
    .await;

    // The admin listener goes away: ctl says so and keeps trying; a new
    // process on the same address is picked up with its current state.
    // (The first proxy's directory, with the state file, stays.)
    let running = proxy.running.take().unwrap();
    assert!(running.shutdown().await);
    wait_for(
        &stderr,
        |t| t.contains("event stream lost"),
        "the lost stream",
    )
    .await;
    let again = TestProxy::start_text(TempDir::new("ctl-watch-2"), &text).await;
    again
        .admin
        .ok("/api/v1/services/web/split", r#"{"green":25}"#)
        .await;
    wait_for(
        &stdout,
        |t| t.contains("web  live=split"),
        "the state after reconnecting",
    )
    .await;
    assert_eq!(child.try_wait().unwrap(), None, "ctl --watch exited");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn status_watch_of_an_unknown_service_is_refused_at_once() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let proxy = TestProxy::start(&[Svc::new("web", &[&blue], &[&green])]).await;
    let admin = proxy.running.as_ref().unwrap().admin_addr;
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "ctl",
                "--admin",
                &format!("http://{admin}"),
                "status",
                "nope",
                "--watch",
            ])
            .env_remove("SWITCHYARD_ADMIN")
            .env_remove("SWITCHYARD_TOKEN")
            .env_remove("SWITCHYARD_TOKEN_FILE")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown_service"));
}
