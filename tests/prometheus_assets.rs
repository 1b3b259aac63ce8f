//! The monitoring assets in `config/prometheus/` against promtool and a
//! live proxy: the alert rules pass `promtool check rules` and their unit
//! tests, the example Prometheus config passes `promtool check config`, a
//! live proxy's `/metrics` passes `promtool check metrics` with no lint
//! output, and the Grafana dashboard is valid JSON whose queries parse as
//! PromQL and name only metrics a live proxy exposes.
//!
//! promtool comes from the Debian package `prometheus` (`.ci/run` installs
//! it). Without it these tests fail, on purpose: they must not pass by
//! checking nothing. `PROMTOOL=/path/to/promtool` picks another binary.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// No promtool call on these small inputs takes more than a second; the
/// bound only keeps a hung one from hanging the suite.
const PROMTOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn asset(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("config/prometheus")
        .join(name)
}

fn read_asset(name: &str) -> String {
    std::fs::read_to_string(asset(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn promtool_path() -> String {
    std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".to_string())
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn text(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs promtool with `args` (and `stdin`), bounded by [`PROMTOOL_TIMEOUT`].
/// Fails the test, saying what to install, when there is no promtool.
fn promtool(args: &[&str], stdin: Option<&[u8]>) -> Outcome {
    let tool = promtool_path();
    let mut child = match Command::new(&tool)
        .args(args)
        .current_dir(asset(""))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot run `{tool}` ({e}). These tests need promtool: install the Debian \
             package `prometheus` (apt-get install --no-install-recommends prometheus, \
             which provides /usr/bin/promtool; .ci/run does this), or set PROMTOOL to \
             a promtool binary."
        ),
    };
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        // A writer thread: promtool may answer before reading everything.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + PROMTOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{tool} {}` did not finish in {PROMTOOL_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The `expr:` of every rule in a rules file, inline or as a block
/// scalar (`expr: |` and the lines indented below it).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || indent(l) > indent(line))
                .copied()
                .collect();
            out.push(block.join("\n"));
        } else {
            out.push(rest.to_string());
        }
    }
    out
}

/// The series names of a rules unit test file's `input_series`.
fn input_series_names(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- series:"))
        .map(|s| {
            let s = s.trim().trim_matches(['\'', '"']);
            s.split('{').next().unwrap_or(s).to_string()
        })
        .collect()
}

/// `/metrics` of a live proxy after some traffic: both pools served,
/// every status class, a split, an unmatched request, and a second
/// service in a rollout's mirror step (the rollout and mirror series exist
/// only for a service that has had a rollout, or has a mirror). Also
/// returns the exposition taken before any routing change.
async fn live_metrics() -> (String, String) {
    let (blue, green) = (
        Upstream::start("blue").await,
        Upstream::start("green").await,
    );
    let (shop_blue, shop_green) = (
        Upstream::start("shop blue").await,
        Upstream::start("shop green").await,
    );
    let proxy = TestProxy::start(&[
        Svc::new("web", &[&blue], &[&green])
            .hosts(r#"["web.test"]"#)
            .extra("[service.health]\npath = \"/healthz\"\ninterval = \"1s\""),
        Svc::new("shop", &[&shop_blue], &[&shop_green]).hosts(r#"["shop.test"]"#),
    ])
    .await;
    let before = proxy.admin.metrics().await;
    let host = [("host", "web.test")];
    for path in [
        "/",
        "/status/204",
        "/status/302",
        "/status/404",
        "/status/503",
    ] {
        proxy.get_with(path, &host).await;
    }
    proxy
        .admin
        .ok("/api/v1/services/web/split", r#"{"green": 50}"#)
        .await;
    for _ in 0..10 {
        proxy.get_with("/", &host).await;
    }
    let (_, _, body) = proxy
        .get_with("/", &[("host", "web.test"), ("x-switchyard-pool", "green")])
        .await;
    assert_eq!(body, "green");
    // No service matches this host: counted with service="".
    let (status, _, _) = proxy.get_with("/", &[("host", "other.test")]).await;
    assert_eq!(status, 404);
    // A rollout of shop, held in its mirror step: live traffic is copied
    // to the canary (green) until the test ends.
    let (code, rollout) = proxy
        .admin
        .post(
            "/api/v1/services/shop/rollout",
            r#"{"plan":{"steps":[{"mirror":100,"duration":"1h"},{"weight":100}]}}"#,
        )
        .await;
    assert_eq!(code, 201, "{rollout}");
    assert_eq!(rollout["state"], "mirroring", "{rollout}");
    // Copies start once the mirror is published: ask until one is counted.
    let mirrored = r#"switchyard_mirror_requests_total{code="2xx",pool="green",service="shop"}"#;
    let p = &proxy;
    let copied = eventually(Duration::from_secs(10), || async move {
        let (_, _, body) = p.get_with("/", &[("host", "shop.test")]).await;
        assert_eq!(body, "shop blue");
        metric(&p.admin.metrics().await, mirrored).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(
        copied,
        "no copy to the canary was counted:\n{}",
        proxy.admin.metrics().await
    );
    let after = proxy.admin.metrics().await;
    for series in [
        r#"switchyard_rollout_state{service="shop",state="mirroring"}"#,
        r#"switchyard_rollout_step{service="shop"}"#,
        r#"switchyard_rollouts_total{result="rolled_back",service="shop"}"#,
        r#"switchyard_rollout_user_failures_total{service="shop"}"#,
        r#"switchyard_mirror_mismatches_total{service="shop"}"#,
    ] {
        let want = if series.contains("mirroring") {
            1.0
        } else {
            0.0
        };
        assert_eq!(metric(&after, series), Some(want), "{series}\n{after}");
    }
    assert!(proxy.shutdown().await);
    (before, after)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let check = promtool(&["check", "rules", "alerts.yml"], None);
    assert_eq!(
        check.code,
        Some(0),
        "promtool check rules:\n{}",
        check.text()
    );
    assert!(
        check.stdout.contains("SUCCESS: 8 rules found"),
        "{}",
        check.text()
    );
    let test = promtool(&["test", "rules", "alerts_test.yml"], None);
    assert_eq!(test.code, Some(0), "promtool test rules:\n{}", test.text());
    assert!(test.stdout.contains("SUCCESS"), "{}", test.text());
}

#[test]
fn example_prometheus_config_passes_promtool_check() {
    // Checked from the file's own directory and from elsewhere: rule_files
    // resolve relative to the config file, not to the working directory.
    let path = asset("prometheus.yml");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "config", path.to_str().unwrap()],
    ] {
        let out = promtool(&args, None);
        assert_eq!(out.code, Some(0), "promtool {args:?}:\n{}", out.text());
        assert!(
            out.stdout.contains("1 rule files found"),
            "alerts.yml not loaded:\n{}",
            out.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool_lint() {
    let (before, after) = live_metrics().await;
    for (when, exposition) in [("at start", &before), ("after traffic", &after)] {
        let out = promtool(&["check", "metrics"], Some(exposition.as_bytes()));
        assert_eq!(
            out.code,
            Some(0),
            "promtool check metrics {when}:\n{}\n--- input\n{exposition}",
            out.text()
        );
        assert_eq!(
            (out.stdout.trim(), out.stderr.trim()),
            ("", ""),
            "promtool check metrics {when} has lint findings:\n{}",
            out.text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_assets_query_is_exposed_by_a_live_proxy() {
    let (before, after) = live_metrics().await;
    let samples = sample_names(&after);
    let families = family_names(&after);
    let missing = |used: &BTreeSet<String>, known: &BTreeSet<String>| -> Vec<String> {
        used.difference(known).cloned().collect()
    };

    // Queries: every name must select series of a live proxy.
    let dashboard: Value = serde_json::from_str(&read_asset("grafana-dashboard.json")).unwrap();
    // The "Fleet" row's series exist only in fleet mode: tests/fleet.rs
    // checks them against a replica on etcd. Here: only there.
    let (single, fleet) = split_fleet_row(&dashboard);
    let mut fleet_queries = Vec::new();
    dashboard_exprs(&Value::Array(fleet), "fleet row", &mut fleet_queries);
    assert!(!fleet_queries.is_empty(), "no Fleet row in the dashboard");
    for (at, q) in &fleet_queries {
        let names = metric_names(q);
        assert!(
            !names.is_empty() && names.iter().all(|n| is_fleet_only(n)),
            "{at}: the Fleet row queries fleet-mode series only: {q}"
        );
    }
    let mut queries = Vec::new();
    dashboard_exprs(&single, "dashboard", &mut queries);
    for v in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"].as_str() {
            queries.push((format!("variable {}", v["name"]), q.to_string()));
        }
    }
    let alerts = rule_exprs(&read_asset("alerts.yml"));
    assert_eq!(alerts.len(), 8, "one expr per alert: {alerts:#?}");
    let test_series = input_series_names(&read_asset("alerts_test.yml"));
    assert!(test_series.len() > 20, "{test_series:?}");
    for (what, text) in [
        (
            "dashboard queries",
            queries
                .iter()
                .map(|(_, q)| q.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
        ("alert expressions", alerts.join("\n")),
        ("alert test series", test_series.join("\n")),
    ] {
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{what} name no switchyard metric");
        let gone = missing(&used, &samples);
        assert!(
            gone.is_empty(),
            "{what} use series a live proxy does not expose: {gone:?}\n{after}"
        );
    }
    // Prose (descriptions, annotations, comments): known metrics only.
    let known: BTreeSet<String> = samples.union(&families).cloned().collect();
    for file in [
        "grafana-dashboard.json",
        "alerts.yml",
        "alerts_test.yml",
        "README.md",
    ] {
        // Fleet-mode names: checked by tests/fleet.rs.
        let mut used = metric_names(&read_asset(file));
        used.retain(|n| !is_fleet_only(n));
        let gone = missing(&used, &known);
        assert!(gone.is_empty(), "{file} names unknown metrics: {gone:?}");
    }

    // The routing-change counters exist at 0 from the start, so that the
    // first change after a start is an increase() (alerts, dashboard
    // annotations); a series born at 1 would show none.
    for action in ["switch", "split", "rollback", "pool"] {
        let series =
            format!("switchyard_routing_changes_total{{action=\"{action}\",service=\"web\"}}");
        assert_eq!(metric(&before, &series), Some(0.0), "{series}\n{before}");
    }
    assert_eq!(
        metric(
            &after,
            "switchyard_routing_changes_total{action=\"split\",service=\"web\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn dashboard_is_valid_and_sensible() {
    let text = read_asset("grafana-dashboard.json");
    let d: Value = serde_json::from_str(&text).expect("grafana-dashboard.json is not JSON");
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()));

    // Template variables: the data source, and the services.
    let vars = d["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(
        var("service")["query"],
        "label_values(switchyard_pool_weight, service)"
    );

    // Panels: unique ids, on the 24-column grid, every one on the
    // templated data source with at least one query.
    let panels = d["panels"].as_array().unwrap();
    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    let mut rows = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate id: {title}"
        );
        let g = &p["gridPos"];
        if p["type"] == "row" {
            // A row header: full width, one unit high, its panels shown
            // below it (not collapsed into it), no query of its own.
            assert_eq!(
                (&g["x"], &g["w"], &g["h"]),
                (&0.into(), &24.into(), &1.into())
            );
            assert_eq!(p["collapsed"], false, "{title}");
            assert!(p.get("targets").is_none(), "{title}");
            rows.push(title.to_string());
            let y = g["y"].as_u64().unwrap();
            for cx in 0..24 {
                assert!(cells.insert((cx, y)), "row {title} overlaps a panel");
            }
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }

    // The panels asked for, found by what they query.
    let all_exprs = {
        let mut v = Vec::new();
        dashboard_exprs(&d["panels"], "panels", &mut v);
        v.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("\n")
    };
    for needle in [
        "rate(switchyard_requests_total",
        "code=\"5xx\"",
        "histogram_quantile(0.5, ",
        "histogram_quantile(0.99, ",
        "switchyard_request_duration_seconds_bucket",
        "switchyard_pool_weight",
        "switchyard_backend_healthy",
        "switchyard_open_connections",
        // The "Rollouts" row (SPEC §10) and mirroring (SPEC §9).
        "switchyard_rollout_state{",
        "state=\"rolled_back\"",
        "switchyard_rollout_step{",
        "sum by (service, result) (increase(switchyard_rollouts_total",
        "switchyard_rollout_user_failures_total",
        "sum by (service, pool, code) (rate(switchyard_mirror_requests_total",
        "switchyard_mirror_mismatches_total",
    ] {
        assert!(all_exprs.contains(needle), "no panel queries {needle}");
    }
    assert_eq!(rows, ["Rollouts", "Fleet"]);
    // The "Fleet" row (SPEC §11): whether each replica is in sync with
    // etcd, and how stale.
    for needle in [
        "min by (instance) (switchyard_state_backend_connected)",
        "switchyard_state_staleness_seconds",
        "increase(switchyard_state_resyncs_total",
    ] {
        assert!(all_exprs.contains(needle), "no panel queries {needle}");
    }
    let (_, fleet) = split_fleet_row(&d);
    assert!(
        fleet.iter().any(|p| p["title"] == "Replica sync"),
        "no replica-sync panel in the Fleet row"
    );

    // Routing changes as annotations, labelled with their action.
    let annotations = d["annotations"]["list"].as_array().unwrap();
    let routing = annotations
        .iter()
        .find(|a| {
            a["expr"]
                .as_str()
                .is_some_and(|e| e.contains("switchyard_routing_changes_total"))
        })
        .expect("no routing-change annotation");
    assert_eq!(routing["datasource"]["uid"], "${datasource}");
    assert!(routing["titleFormat"]
        .as_str()
        .unwrap()
        .contains("{{action}}"));
}

#[test]
fn dashboard_queries_parse_as_promql() {
    let d: Value = serde_json::from_str(&read_asset("grafana-dashboard.json")).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&d, "dashboard", &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    // Grafana's variables as Prometheus would see them, as recording
    // rules for `promtool check rules` to parse.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (at, e)) in exprs.iter().enumerate() {
        let promql = e
            .replace("$__rate_interval", "1m")
            .replace("$service", ".+");
        assert!(!promql.contains('$'), "{at}: unknown variable in {e}");
        rules.push_str(&format!(
            "      # {at}\n      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&promql).unwrap()
        ));
    }
    let dir = TempDir::new("dashboard-promql");
    let file = dir.join("dashboard-rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()], None);
    assert_eq!(
        out.code,
        Some(0),
        "dashboard queries do not parse:\n{}\n--- rules\n{rules}",
        out.text()
    );
}
