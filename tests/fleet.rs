//! Fleet mode (SPEC §11, issue 13): three real replicas sharing their
//! routing state through a real etcd that each test starts on free ports in
//! a temporary directory (and kills by pid). Without `etcd` installed the
//! tests say they skipped and pass, unless `SWITCHYARD_REQUIRE_ALL_TESTS=1`
//! (set by `.ci/run`, which installs Debian's `etcd-server`).
//!
//! The tests take one lock so that only one etcd and its replicas run at a
//! time on a 2-core machine. Time bounds are loose (seconds where the
//! contract says one second): they catch a replica that never converges,
//! not a slow machine; the measured latencies are printed.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

/// One fleet test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Loose bound for "within 1 s" on a loaded 2-core machine.
const CONVERGE: Duration = Duration::from_secs(10);

/// `etcd` and `etcdctl`, or why the test skips (or fails in CI).
fn etcd_installed(test: &str) -> bool {
    let ok = [("etcd", "--version"), ("etcdctl", "version")]
        .iter()
        .all(|(b, arg)| {
            Command::new(b)
                .arg(arg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
    if !ok {
        assert!(
            std::env::var("SWITCHYARD_REQUIRE_ALL_TESTS").as_deref() != Ok("1"),
            "SWITCHYARD_REQUIRE_ALL_TESTS=1 but etcd is missing \
             (apt-get install etcd-server etcd-client)"
        );
        eprintln!("SKIPPED fleet::{test}: no etcd (apt-get install etcd-server etcd-client)");
    }
    ok
}

/// A single-member etcd on free loopback ports.
struct Etcd {
    child: Option<Child>,
    data: TempDir,
    client_port: u16,
    peer_port: u16,
}

impl Etcd {
    fn start() -> Etcd {
        let mut e = Etcd {
            child: None,
            data: TempDir::new("etcd"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        e.restart();
        e
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts (again) on the same ports and data directory; returns once
    /// it answers.
    fn restart(&mut self) {
        assert!(self.child.is_none(), "etcd already running");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.data.join("data"))
            .args(["--listen-client-urls", &self.endpoint()])
            .args(["--advertise-client-urls", &self.endpoint()])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .args(["--unsafe-no-fsync", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.ctl(&["endpoint", "health"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("etcd did not become healthy");
    }

    /// SIGKILL, by pid.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(["--command-timeout=3s", "--dial-timeout=1s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    fn get(&self, key: &str) -> String {
        let out = self.ctl(&["get", "--print-value-only", key]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn put(&self, key: &str, value: &str) {
        let out = self.ctl(&["put", key, value]);
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Config text for one replica of cluster `c` on `etcd`.
fn replica_config(dir: &TempDir, etcd: &str, id: &str, services: &[Svc]) -> String {
    let text = config_text(dir.path(), "", services);
    let state = format!("[state]\npath = \"{}\"\n", dir.join("state.json").display());
    assert!(text.contains(&state));
    text.replacen(
        &state,
        &format!(
            "{state}backend = \"etcd\"\n[state.etcd]\nendpoints = [\"{etcd}\"]\n\
             prefix = \"/switchyard-test\"\ncluster = \"c\"\nreplica_id = \"{id}\"\n\
             stale_after = \"2s\"\nrequest_timeout = \"2s\"\ndial_timeout = \"1s\"\n\
             lease_ttl = \"3s\"\n"
        ),
        1,
    )
}

async fn start_replica(dir: TempDir, etcd: &str, id: &str, services: &[Svc]) -> TestProxy {
    let text = replica_config(&dir, etcd, id, services);
    TestProxy::start_text(dir, &text).await
}

async fn generation(p: &TestProxy) -> u64 {
    let (s, v) = p.admin.get("/api/v1/services/web").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["generation"].as_u64().unwrap()
}

async fn readyz(p: &TestProxy) -> (StatusCode, Value) {
    p.admin.get("/readyz").await
}

/// Is `/readyz` 200 with this `state` (`synced`, `stale`)?
async fn ready_as(p: &TestProxy, state: &str) -> bool {
    let (s, v) = readyz(p).await;
    s == StatusCode::OK && v["state"] == state
}

/// Waits until every replica serves `web` at generation `g` or newer.
async fn converged(replicas: &[TestProxy], g: u64) -> bool {
    eventually(CONVERGE, || async {
        for r in replicas {
            if generation(r).await < g {
                return false;
            }
        }
        true
    })
    .await
}

struct Fleet {
    etcd: Etcd,
    replicas: Vec<TestProxy>,
    _blue: Upstream,
    _green: Upstream,
}

async fn fleet(n: usize) -> Fleet {
    let etcd = Etcd::start();
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let svc = [Svc::new("web", &[&blue], &[&green])];
    let mut replicas = Vec::new();
    for i in 0..n {
        let r = start_replica(
            TempDir::new("replica"),
            &etcd.endpoint(),
            &format!("r{i}"),
            &svc,
        )
        .await;
        replicas.push(r);
    }
    for r in &replicas {
        let ok = eventually(CONVERGE, || ready_as(r, "synced")).await;
        assert!(ok, "replica not synced: {:?}", readyz(r).await);
    }
    Fleet {
        etcd,
        replicas,
        _blue: blue,
        _green: green,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Issue 13 item 1 (and 7: `/api/v1/replicas`): switches sent round-robin
/// through 3 replicas; after each 200 every replica serves the new
/// generation, and what they serve is what was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switches_through_any_replica_converge_on_all() {
    if !etcd_installed("convergence") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(3).await;
    let mut took = Vec::new();
    for i in 0..200usize {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        let via = &f.replicas[i % 3];
        let sent = Instant::now();
        let v = via
            .admin
            .ok(
                "/api/v1/services/web/switch",
                &json!({ "to": to }).to_string(),
            )
            .await;
        let g = v["generation"].as_u64().unwrap();
        assert!(
            converged(&f.replicas, g).await,
            "switch {i} to {to} (generation {g}) did not reach every replica"
        );
        took.push(sent.elapsed());
        for r in &f.replicas {
            let s = r.admin.service("web").await;
            assert_eq!(s["live"], to, "replica serves what was written");
            assert_eq!(s["generation"].as_u64(), Some(g));
        }
    }
    took.sort();
    eprintln!(
        "convergence over {} switches: p50 {:?}, p99 {:?}, max {:?}",
        took.len(),
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        took[took.len() - 1]
    );
    // The goal is p50 < 100 ms and p99 < 1 s (a few ms here); asserted
    // loosely, five times over, for a loaded CI machine.
    assert!(
        percentile(&took, 0.5) < Duration::from_millis(500),
        "{took:?}"
    );
    assert!(percentile(&took, 0.99) < Duration::from_secs(5), "{took:?}");
    // Traffic follows on every replica.
    for r in &f.replicas {
        let (s, _, body) = r.get("/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "blue"));
    }
    // Every replica is listed, synced, with the generation it serves.
    let top = generation(&f.replicas[0]).await;
    let ok = eventually(CONVERGE, || async {
        let (s, v) = f.replicas[1].admin.get("/api/v1/replicas").await;
        s == StatusCode::OK
            && v["replicas"].as_array().is_some_and(|l| {
                l.len() == 3
                    && l.iter().all(|r| {
                        r["state"] == "synced" && r["services"]["web"]["generation"] == top
                    })
            })
    })
    .await;
    assert!(
        ok,
        "{:?}",
        f.replicas[1].admin.get("/api/v1/replicas").await
    );
    // The key is in etcd in the documented format.
    let stored: Value =
        serde_json::from_str(&f.etcd.get("/switchyard-test/c/services/web")).unwrap();
    assert_eq!(stored["schema"], 1);
    assert_eq!(stored["generation"].as_u64(), Some(top));
}

/// Issue 13 item 2: 3 replicas × 4 clients run compare-and-swap loops
/// (`If-Match`) until 300 changes won: every change is kept, every loser
/// got 412, nothing else was answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_holds_across_replicas() {
    if !etcd_installed("cas") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = Arc::new(fleet(3).await);
    let g0 = generation(&f.replicas[0]).await;
    const WINS: usize = 300;
    let won = Arc::new(AtomicUsize::new(0));
    let lost = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..12usize {
        let (f, won, lost) = (Arc::clone(&f), Arc::clone(&won), Arc::clone(&lost));
        tasks.push(tokio::spawn(async move {
            let admin = &f.replicas[c % 3].admin;
            let deadline = Instant::now() + Duration::from_secs(240);
            while won.load(Ordering::SeqCst) < WINS {
                assert!(Instant::now() < deadline, "CAS loop did not finish");
                let g = generation(&f.replicas[c % 3]).await;
                let body =
                    json!({"green": 1 + (g % 98), "force": true, "reason": format!("client {c}")});
                let (s, v) = admin
                    .call(
                        "POST",
                        "/api/v1/services/web/split",
                        Some(&body.to_string()),
                        &[("if-match", &format!("\"{g}\""))],
                    )
                    .await;
                match s {
                    StatusCode::OK => {
                        won.fetch_add(1, Ordering::SeqCst);
                    }
                    StatusCode::PRECONDITION_FAILED => {
                        lost.fetch_add(1, Ordering::SeqCst);
                    }
                    other => panic!("client {c}: {other} {v}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let wins = won.load(Ordering::SeqCst) as u64;
    assert!(wins >= WINS as u64);
    assert!(converged(&f.replicas, g0 + wins).await);
    for r in &f.replicas {
        assert_eq!(
            generation(r).await,
            g0 + wins,
            "every won change is one generation, none lost"
        );
    }
    let (_, history) = f.replicas[2]
        .admin
        .get("/api/v1/services/web/history")
        .await;
    let gens: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["generation"].as_u64().unwrap())
        .filter(|g| *g > g0)
        .collect();
    let expected: Vec<u64> = (g0 + 1..=g0 + wins).rev().collect();
    assert_eq!(gens, expected, "history is contiguous");
    eprintln!(
        "CAS: {wins} won, {} lost with 412",
        lost.load(Ordering::SeqCst)
    );
}

/// Issue 13 item 3: etcd killed under load: no proxied request fails,
/// `/readyz` stays 200 and says stale, writes answer 503
/// `state_backend_unavailable`; etcd back: every replica reconnects and
/// the next switch converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_traffic_and_refuses_writes() {
    if !etcd_installed("outage") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut f = fleet(3).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let urls: Vec<String> = f.replicas.iter().map(|r| r.url("/")).collect();
    let load = {
        let (stop, failures, served) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&served),
        );
        tokio::spawn(async move {
            let client = http1_client();
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline && i < 200_000 {
                let (s, _, _) = get(&client, &urls[i % urls.len()], &[]).await;
                if s == StatusCode::OK {
                    served.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    f.etcd.kill();
    for r in &f.replicas {
        let ok = eventually(CONVERGE, || ready_as(r, "stale")).await;
        assert!(ok, "readyz while etcd is down: {:?}", readyz(r).await);
        let (s, v) = r
            .admin
            .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
        assert_eq!(v["error"]["code"], "state_backend_unavailable");
        // The gauges are sampled every 500 ms.
        let ok = eventually(CONVERGE, || async {
            let m = r.admin.metrics().await;
            metric(&m, "switchyard_state_backend_connected") == Some(0.0)
                && metric(&m, "switchyard_state_staleness_seconds").unwrap_or(0.0) > 0.0
        })
        .await;
        assert!(ok, "{}", r.admin.metrics().await);
    }
    let during = served.load(Ordering::SeqCst);
    f.etcd.restart();
    for r in &f.replicas {
        let ok = eventually(CONVERGE, || ready_as(r, "synced")).await;
        assert!(ok, "replica did not reconnect: {:?}", readyz(r).await);
    }
    let v = f.replicas[1]
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let g = v["generation"].as_u64().unwrap();
    assert!(converged(&f.replicas, g).await);
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    assert!(
        during > 0 && served.load(Ordering::SeqCst) > during,
        "load ran"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "proxied requests failed"
    );
    for r in &f.replicas {
        let (_, _, body) = r.get("/").await;
        assert_eq!(body, "green");
    }
}

/// Issue 13 item 5: a replica starting while etcd is down serves its cache
/// file at once (stale); without one it is not ready until etcd answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_with_etcd_down() {
    if !etcd_installed("startup") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut etcd = Etcd::start();
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let svc = [Svc::new("web", &[&blue], &[&green])];
    let dir = TempDir::new("replica");
    let dir_path = dir.0.clone();
    let r = start_replica(dir, &etcd.endpoint(), "a", &svc).await;
    assert!(eventually(CONVERGE, || async { readyz(&r).await.0 == StatusCode::OK }).await);
    let v = r
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    let g = v["generation"].as_u64().unwrap();
    // The cache file follows what is served.
    let cache = dir_path.join("state.json");
    assert!(
        eventually(CONVERGE, || async {
            std::fs::read_to_string(&cache)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|v| v["services"]["web"]["generation"].as_u64() == Some(g))
        })
        .await
    );
    let text = std::fs::read_to_string(dir_path.join("switchyard.toml")).unwrap();
    // (The replica's directory goes with it: keep the cache.)
    let keep = TempDir::new("replica-restart");
    std::fs::copy(&cache, keep.join("state.json")).unwrap();
    r.shutdown().await;
    etcd.kill();

    // With the cache: serves it at once.
    let text2 = text.replace(
        &dir_path.display().to_string(),
        &keep.0.display().to_string(),
    );
    let r = TestProxy::start_text(keep, &text2).await;
    assert_eq!(generation(&r).await, g, "the cached generation is served");
    let (_, _, body) = r.get("/").await;
    assert_eq!(body, "green");
    let ok = eventually(CONVERGE, || ready_as(&r, "stale")).await;
    assert!(ok, "{:?}", readyz(&r).await);

    // Without a cache: not ready until etcd is up.
    let r2 = start_replica(TempDir::new("replica-nocache"), &etcd.endpoint(), "b", &svc).await;
    let (s, v) = readyz(&r2).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["state"], "starting");
    etcd.restart();
    for p in [&r, &r2] {
        let ok = eventually(CONVERGE, || ready_as(p, "synced")).await;
        assert!(ok, "{:?}", readyz(p).await);
    }
    assert_eq!(generation(&r2).await, g, "etcd's state, not `initial`");
    let (_, _, body) = r2.get("/").await;
    assert_eq!(body, "green");
    r.shutdown().await;
    r2.shutdown().await;
}

/// Issue 13 item 6: a value written with etcdctl in the documented format
/// reaches every replica; an invalid one is refused and counted, and the
/// previous state kept; a deleted key is written again from what the
/// replicas serve (a wiped etcd never black-holes traffic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_written_with_etcdctl() {
    if !etcd_installed("etcdctl") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(3).await;
    let key = "/switchyard-test/c/services/web";
    let mut v: Value = serde_json::from_str(&f.etcd.get(key)).unwrap();
    let g = v["generation"].as_u64().unwrap();
    v["generation"] = json!(g + 1);
    v["weights"] = json!({"blue": 75, "green": 25});
    v.as_object_mut().unwrap().remove("history");
    f.etcd.put(key, &v.to_string());
    assert!(
        converged(&f.replicas, g + 1).await,
        "etcdctl put reached every replica"
    );
    for r in &f.replicas {
        let s = r.admin.service("web").await;
        assert_eq!(s["weights"]["green"], 25.0);
        let (_, h) = r.admin.get("/api/v1/services/web/history").await;
        assert_eq!(h[0]["generation"].as_u64(), Some(g + 1));
        assert_eq!(h[0]["actor"], "store");
    }
    // Invalid: weights that do not add up; and not JSON at all.
    let mut bad = v.clone();
    bad["generation"] = json!(g + 2);
    bad["weights"] = json!({"blue": 70, "green": 70});
    f.etcd.put(key, &bad.to_string());
    f.etcd.put(key, "not json");
    for r in &f.replicas {
        let ok = eventually(CONVERGE, || async {
            metric(
                &r.admin.metrics().await,
                "switchyard_state_rejected_values_total{service=\"web\"}",
            ) == Some(2.0)
        })
        .await;
        assert!(ok, "rejections counted: {}", r.admin.metrics().await);
        let s = r.admin.service("web").await;
        assert_eq!(s["generation"].as_u64(), Some(g + 1), "previous state kept");
        assert_eq!(s["weights"]["green"], 25.0);
    }
    // The next change through the API overwrites the bad value.
    let out = f.replicas[0]
        .admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(out["generation"].as_u64(), Some(g + 2));
    assert!(converged(&f.replicas, g + 2).await);
    // Deleted by hand: written back from what the replicas serve.
    let out = f.etcd.ctl(&["del", key]);
    assert!(out.status.success());
    let ok = eventually(CONVERGE, || async {
        let out = f.etcd.ctl(&["get", "--print-value-only", key]);
        serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .is_some_and(|v| v["generation"].as_u64() == Some(g + 2))
    })
    .await;
    assert!(ok, "deleted key written back");
    for r in &f.replicas {
        let (_, _, body) = r.get("/").await;
        assert_eq!(body, "green", "traffic unchanged");
    }
}

/// A TCP relay between one replica and etcd: `cut()` closes its open
/// connections and closes new ones at once (a partition, without root);
/// `heal()` lets them through again. Each connection ends when the cut
/// epoch moves past the one it was accepted in, so none slips through.
struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    epoch: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(AtomicBool::new(true));
        let (epoch, epochs) = tokio::sync::watch::channel(0u64);
        let accept = {
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    let mut epochs = epochs.clone();
                    let accepted_in = *epochs.borrow_and_update();
                    if !open.load(Ordering::SeqCst) {
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(mut up) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = epochs.wait_for(|e| *e != accepted_in) => {}
                        }
                    });
                }
            })
        };
        Relay {
            port,
            open,
            epoch,
            accept,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    fn heal(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Issue 13 item 4: one replica cut off from etcd while the others switch
/// 20 times and etcd compacts its history: it keeps serving its last table
/// and refuses writes; healed, it catches up (its watch cannot resume from
/// a compacted revision, so it re-reads, and counts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_replica_catches_up_after_compaction() {
    if !etcd_installed("partition") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(2).await;
    let relay = Relay::start(f.etcd.client_port).await;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    // Same service name and pools as the fleet's: the state in etcd names
    // the fleet's backends, so this replica's config must too.
    let (_, svc0) = f.replicas[0].admin.get("/api/v1/services/web").await;
    let addr = |c: &str| {
        svc0["pools"][c]["backends"][0]["addr"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    let svc = [Svc::addrs("web", &[addr("blue")], &[addr("green")])];
    drop((blue, green));
    let cut_off = start_replica(TempDir::new("replica"), &relay.endpoint(), "cut", &svc).await;
    assert!(eventually(CONVERGE, || ready_as(&cut_off, "synced")).await);
    let g0 = generation(&f.replicas[0]).await;
    assert!(converged(std::slice::from_ref(&cut_off), g0).await);
    let (_, _, before) = cut_off.get("/").await;

    relay.cut();
    assert!(
        eventually(CONVERGE, || ready_as(&cut_off, "stale")).await,
        "{:?}",
        readyz(&cut_off).await
    );
    let mut last = g0;
    for i in 0..20 {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        let v = f.replicas[i % 2]
            .admin
            .ok(
                "/api/v1/services/web/switch",
                &json!({ "to": to }).to_string(),
            )
            .await;
        last = v["generation"].as_u64().unwrap();
    }
    let status: Value =
        serde_json::from_slice(&f.etcd.ctl(&["endpoint", "status", "-w", "json"]).stdout).unwrap();
    let rev = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
    let out = f.etcd.ctl(&["compaction", &rev.to_string()]);
    assert!(out.status.success(), "{out:?}");
    // Cut off: the last table, and writes refused.
    assert_eq!(generation(&cut_off).await, g0);
    let (_, _, body) = cut_off.get("/").await;
    assert_eq!(body, before, "keeps serving its last table");
    let (s, v) = cut_off
        .admin
        .post("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");

    relay.heal();
    assert!(
        converged(std::slice::from_ref(&cut_off), last).await,
        "caught up"
    );
    assert_eq!(generation(&cut_off).await, last);
    assert_eq!(last, g0 + 20, "20 changes while it was cut off");
    // Its watch could not resume from a compacted revision: it re-read
    // everything, and counted it.
    let m = cut_off.admin.metrics().await;
    assert_eq!(
        metric(&m, "switchyard_state_resyncs_total{reason=\"compacted\"}"),
        Some(1.0),
        "compacted at {rev}; {}",
        m.lines()
            .filter(|l| l.starts_with("switchyard_state"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(eventually(CONVERGE, || ready_as(&cut_off, "synced")).await);
}

/// The rollout of `web` as `admin`'s replica shows it: the rollout
/// object, or the error (404 until the record has reached the replica).
async fn rollout_of(admin: &Admin) -> Value {
    let (s, v) = admin.get("/api/v1/services/web/rollout").await;
    assert!(s == StatusCode::OK || s == StatusCode::NOT_FOUND, "{s} {v}");
    v
}

/// Polls the rollout of `web` on `admin`'s replica until `pred` holds or
/// `timeout` passes; returns whether it held, and the last object seen.
async fn poll_rollout(
    admin: &Admin,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (bool, Value) {
    let deadline = Instant::now() + timeout;
    loop {
        let v = rollout_of(admin).await;
        if pred(&v) || Instant::now() >= deadline {
            return (pred(&v), v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `web` service's configuration as the fleet `f` has it (the same
/// backends, so that another replica can join it).
async fn same_service(f: &Fleet) -> [Svc; 1] {
    let (_, svc0) = f.replicas[0].admin.get("/api/v1/services/web").await;
    let addr = |c: &str| {
        svc0["pools"][c]["backends"][0]["addr"]
            .as_str()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap()
    };
    [Svc::addrs("web", &[addr("blue")], &[addr("green")])]
}

/// 20 % green for `pause`, then 100 %; no request minimum (the tests send
/// no traffic: the step passes on time alone).
fn timed_plan(pause: &str) -> String {
    json!({"plan": {
        "steps": [{"weight": 20, "pause": pause}, {"weight": 100}],
        "analysis": {"min_requests": 0}
    }})
    .to_string()
}

/// How many timeline entries of `v` (a rollout object with its report)
/// have `event`.
fn events(v: &Value, event: &str) -> Vec<Value> {
    v["report"]["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == event)
        .cloned()
        .collect()
}

/// After a takeover: the rollout ends `succeeded` as every replica in
/// `replicas` sees it, each serving green at 100 %, and the canary's
/// weight was set once per step by the rollout (no second driver wrote).
async fn finishes_everywhere(replicas: &[&TestProxy], id: &str) {
    for r in replicas {
        let ok = eventually(Duration::from_secs(60), || async {
            let v = rollout_of(&r.admin).await;
            v["id"] == id && v["state"] == "succeeded"
        })
        .await;
        assert!(ok, "{:#}", rollout_of(&r.admin).await);
        let ok = eventually(CONVERGE, || async {
            r.admin.service("web").await["weights"]["green"] == 100.0
        })
        .await;
        assert!(ok, "{:#}", r.admin.service("web").await);
        let (s, _, body) = r.get("/").await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, "green"));
        let (_, h) = r.admin.get("/api/v1/services/web/history").await;
        let by_rollout: Vec<f64> = h
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["actor"] == format!("rollout:{id}"))
            .map(|e| e["to"]["green"].as_f64().unwrap())
            .collect();
        assert_eq!(by_rollout, vec![100.0, 20.0], "{h:#}");
    }
}

/// Issue 13 item 8: a rollout survives the death of the replica driving
/// it. Three replicas; the one that starts the rollout runs as a child
/// process and is killed with SIGKILL during the first step's pause. Its
/// presence key expires with its lease (`lease_ttl` 3 s), exactly one
/// survivor claims the rollout and drives it on: the same id, the same
/// step with the time it had left (not restarted), its own name in
/// `driver` and in the report's timeline; the step then ends on time and
/// the rollout succeeds, and both survivors serve the final weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_continues_on_another_replica() {
    if !etcd_installed("takeover") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(2).await;
    let svc = same_service(&f).await;
    let dir = TempDir::new("doomed");
    let config = dir.join("switchyard.toml");
    std::fs::write(
        &config,
        replica_config(&dir, &f.etcd.endpoint(), "doomed", &svc),
    )
    .unwrap();
    let mut doomed = ProxyProcess::spawn(&config, &[]).unwrap();
    let admin = Admin::new(doomed.admin);
    let ok = eventually(CONVERGE, || async {
        let (s, v) = admin.get("/readyz").await;
        s == StatusCode::OK && v["state"] == "synced"
    })
    .await;
    assert!(ok, "{}", doomed.log_text());

    let (code, v) = admin
        .post("/api/v1/services/web/rollout", &timed_plan("12s"))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["driver"], "doomed");
    // The survivors see the record its driver saves every 2 s.
    let (ok, before) = poll_rollout(&f.replicas[1].admin, CONVERGE, |v| {
        v["id"] == id.as_str() && v["step_remaining_s"].as_f64().unwrap() <= 9.5
    })
    .await;
    assert!(ok, "{before:#}");
    let left_before = before["step_remaining_s"].as_f64().unwrap();
    doomed.child.kill().unwrap();
    doomed.child.wait().unwrap();

    // One survivor claims it; both agree which.
    let ok = eventually(Duration::from_secs(30), || async {
        let a = rollout_of(&f.replicas[0].admin).await;
        let b = rollout_of(&f.replicas[1].admin).await;
        a["id"] == id.as_str()
            && b["id"] == id.as_str()
            && a["driver"].is_string()
            && a["driver"] != "doomed"
            && a["driver"] == b["driver"]
    })
    .await;
    let after = rollout_of(&f.replicas[0].admin).await;
    assert!(
        ok,
        "{after:#}\n{:#}",
        rollout_of(&f.replicas[1].admin).await
    );
    let driver = after["driver"].as_str().unwrap().to_string();
    assert!(driver == "r0" || driver == "r1", "{driver}");
    assert_eq!(after["id"], id.as_str(), "the same rollout");
    if after["step"] == 0 {
        let left = after["step_remaining_s"].as_f64().unwrap();
        assert!(
            left <= left_before + 0.5,
            "{left_before} s left before the kill, {left} s after the takeover: the step was restarted"
        );
    }
    let taken = events(&after, "taken_over");
    assert_eq!(taken.len(), 1, "{after:#}");
    assert_eq!(taken[0]["step"], 0, "taken over in the step it was in");
    let detail = taken[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&driver) && detail.contains("doomed"),
        "{detail}"
    );
    assert_eq!(events(&after, "started").len(), 1, "not started again");
    let step0 = events(&after, "step")
        .iter()
        .filter(|e| e["step"] == 0)
        .count();
    assert_eq!(step0, 1, "step 0 not entered again: {after:#}");

    finishes_everywhere(&[&f.replicas[0], &f.replicas[1]], &id).await;
    let end = rollout_of(&f.replicas[0].admin).await;
    assert_eq!(end["driver"], driver.as_str(), "{end:#}");
    assert_eq!(events(&end, "taken_over").len(), 1, "{end:#}");
    assert_eq!(events(&end, "step_passed").len(), 1, "{end:#}");
    // Whose traffic the analysis judged, and from when.
    let judged: Vec<(&str, u64)> = end["report"]["judged_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["replica"].as_str().unwrap(), d["step"].as_u64().unwrap()))
        .collect();
    assert_eq!(judged, [("doomed", 0), (driver.as_str(), 0)], "{end:#}");
}

/// Issue 13 item 8, the other half: a driver replica that is only cut off
/// from etcd (its lease expires, but it keeps running) loses the rollout
/// to a live replica, and once it hears from etcd again it stops driving
/// without writing: the record in etcd keeps naming the new driver, the
/// cut-off replica's own API shows the record as etcd has it (no driver
/// runs there any more), and the rollout finishes under the new driver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_driver_stops_when_another_replica_took_over() {
    if !etcd_installed("stale_driver") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(1).await;
    let svc = same_service(&f).await;
    let relay = Relay::start(f.etcd.client_port).await;
    let cut_off = start_replica(TempDir::new("replica"), &relay.endpoint(), "cut", &svc).await;
    assert!(eventually(CONVERGE, || ready_as(&cut_off, "synced")).await);

    let (code, v) = cut_off
        .admin
        .post("/api/v1/services/web/rollout", &timed_plan("20s"))
        .await;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    let id = v["id"].as_str().unwrap().to_string();
    assert_eq!(v["driver"], "cut");
    let ok = eventually(CONVERGE, || async {
        let v = rollout_of(&f.replicas[0].admin).await;
        v["id"] == id.as_str() && v["step_remaining_s"].as_f64().unwrap() <= 18.5
    })
    .await;
    assert!(ok, "{:#}", rollout_of(&f.replicas[0].admin).await);

    relay.cut();
    let ok = eventually(Duration::from_secs(30), || async {
        rollout_of(&f.replicas[0].admin).await["driver"] == "r0"
    })
    .await;
    assert!(ok, "{:#}", rollout_of(&f.replicas[0].admin).await);
    // Still cut off, it still shows its own driver's view.
    assert_eq!(rollout_of(&cut_off.admin).await["driver"], "cut");

    relay.heal();
    let ok = eventually(Duration::from_secs(30), || async {
        rollout_of(&cut_off.admin).await["driver"] == "r0"
    })
    .await;
    assert!(ok, "{:#}", rollout_of(&cut_off.admin).await);
    finishes_everywhere(&[&f.replicas[0], &cut_off], &id).await;
    let stored: Value =
        serde_json::from_str(&f.etcd.get("/switchyard-test/c/services/web")).unwrap();
    let last = stored["rollouts"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(last["id"], id.as_str());
    assert_eq!(last["driver"], "r0", "the cut-off driver never wrote again");
    let takeovers = last["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "taken_over")
        .count();
    assert_eq!(takeovers, 1, "{last:#}");
}

/// Issue 13 item 10: the Grafana dashboard's "Fleet" row queries only
/// series a fleet replica exposes (they do not exist on a single replica,
/// so tests/prometheus_assets.rs leaves them to this test), and every
/// fleet metric its descriptions or the assets' README name is one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_fleet_row_queries_what_a_replica_exposes() {
    if !etcd_installed("dashboard") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let f = fleet(1).await;
    let r = &f.replicas[0];
    // A refused value, so that the per-service counter has its series.
    f.etcd.put("/switchyard-test/c/services/web", "not json");
    let rejected = "switchyard_state_rejected_values_total{service=\"web\"}";
    let ok = eventually(CONVERGE, || async {
        metric(&r.admin.metrics().await, rejected) == Some(1.0)
    })
    .await;
    assert!(ok, "{}", r.admin.metrics().await);
    let exposition = r.admin.metrics().await;
    let samples = sample_names(&exposition);
    let (_, panels) = split_fleet_row(&grafana_dashboard());
    assert!(
        panels.iter().any(|p| p["title"] == "Replica sync"),
        "{panels:#?}"
    );
    let mut queries = Vec::new();
    dashboard_exprs(&Value::Array(panels), "fleet row", &mut queries);
    assert!(queries.len() >= 3, "{queries:?}");
    for (at, q) in &queries {
        let used = metric_names(q);
        assert!(!used.is_empty(), "{at}: {q}");
        let gone: Vec<_> = used.difference(&samples).collect();
        assert!(
            gone.is_empty(),
            "{at} queries series a fleet replica does not expose: {gone:?}\n{exposition}"
        );
    }
    let known: std::collections::BTreeSet<String> =
        samples.union(&family_names(&exposition)).cloned().collect();
    let assets = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/prometheus");
    for file in ["grafana-dashboard.json", "README.md"] {
        let text = std::fs::read_to_string(assets.join(file)).unwrap();
        let mut used = metric_names(&text);
        used.retain(|n| is_fleet_only(n));
        let gone: Vec<_> = used.difference(&known).collect();
        assert!(
            gone.is_empty(),
            "{file} names unknown fleet metrics: {gone:?}"
        );
    }
}

/// `ctl state import --from FILE` moves a single-replica state file into
/// etcd, keeping generations and history (issue 13 item 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_import_keeps_generations_and_history() {
    if !etcd_installed("import") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let svc = [Svc::new("web", &[&blue], &[&green])];
    // A single replica makes some history.
    let single = TestProxy::start(&svc).await;
    for to in ["green", "blue", "green"] {
        single
            .admin
            .ok(
                "/api/v1/services/web/switch",
                &json!({ "to": to }).to_string(),
            )
            .await;
    }
    let g = generation(&single).await;
    let file: PathBuf = single.dir.join("state.json");
    let saved = single.dir.join("exported.json");
    std::fs::copy(&file, &saved).unwrap();
    let etcd = Etcd::start();
    // A fleet replica on the same config: it writes `web` from `initial`
    // (generation 1) into the empty etcd; the import then replaces it.
    let r = start_replica(TempDir::new("replica"), &etcd.endpoint(), "a", &svc).await;
    assert!(eventually(CONVERGE, || async { readyz(&r).await.0 == StatusCode::OK }).await);
    assert!(generation(&r).await < g);
    let import = |path: &std::path::Path| {
        ctl_bin(&[
            "--admin",
            &r.admin.base,
            "state",
            "import",
            "--from",
            path.to_str().unwrap(),
        ])
    };
    let out = import(&saved);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("web generation {g}: imported")),
        "{stdout}"
    );
    assert!(converged(std::slice::from_ref(&r), g).await);
    let (_, mine) = single.admin.get("/api/v1/services/web/history").await;
    let (_, theirs) = r.admin.get("/api/v1/services/web/history").await;
    assert_eq!(mine, theirs, "history kept");
    let (_, _, body) = r.get("/").await;
    assert_eq!(body, "green");
    // Again: etcd has it at that generation, so it is left alone.
    let out = import(&saved);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(stdout.contains("left alone"), "{stdout}");
    // A file naming a service that no config could (an etcd key the watch
    // would ignore) is refused before anything is written.
    let mut bad: Value = serde_json::from_slice(&std::fs::read(&saved).unwrap()).unwrap();
    let mut web = bad["services"]["web"].clone();
    web["generation"] = (g + 5).into();
    bad["services"]["web"] = web.clone();
    bad["services"]["a/b"] = web;
    let bad_file = single.dir.join("bad.json");
    std::fs::write(&bad_file, serde_json::to_vec(&bad).unwrap()).unwrap();
    let out = import(&bad_file);
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        stderr.contains("invalid_field") && stderr.contains("a/b"),
        "{stderr}"
    );
    assert_eq!(generation(&r).await, g, "nothing was written");
    // `ctl status` shows the replica and that it is synced.
    let out = ctl_bin(&["--admin", &r.admin.base, "status"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("replicas (this one: a)"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" SYNCED ") && l.contains("web") && l.contains(&g.to_string())),
        "{stdout}"
    );
    // A single replica has no replicas to show and refuses an import.
    let out = ctl_bin(&[
        "--admin",
        &single.admin.base,
        "state",
        "import",
        "--from",
        saved.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not_fleet_mode"),
        "{out:?}"
    );
}

fn ctl_bin(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("ctl")
        .args(args)
        .output()
        .expect("run switchyard ctl")
}
