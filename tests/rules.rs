//! Targeting rules (SPEC §8, issue 12): each condition form through the
//! proxy, order and first match, the 503 / fallback behaviour with the
//! access log, the admin API (If-Match, history, persistence, restart,
//! reload), bad rules in `check` and the API, the metric, and `ctl rules`.

#[rustfmt::skip] // the shared harness keeps its own layout
mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

/// The pool that served a request (`x-switchyard-pool`).
async fn pool_of(p: &TestProxy, path: &str, headers: &[(&str, &str)]) -> String {
    let (status, h, body) = p.get_with(path, headers).await;
    assert_eq!(status, StatusCode::OK, "{path} {headers:?}: {body}");
    h.get("x-switchyard-pool")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("?")
        .to_string()
}

fn rule(name: &str, conds: &[&str], to: &str) -> String {
    let list: Vec<String> = conds.iter().map(|c| format!("{c:?}")).collect();
    format!(
        "[[service.rule]]\nname = \"{name}\"\nmatch = [{}]\nto = \"{to}\"\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_condition_form_sends_matching_requests_to_its_pool_and_the_rest_by_weights() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let rules = [
        rule("order-first", &["header:x-order=1"], "green"),
        rule("order-second", &["header:x-order"], "blue"),
        rule("hdr-value", &["header:X-Beta=1"], "green"),
        rule("hdr-present", &["header:x-flag"], "green"),
        rule("cookie-value", &["cookie:plan=pro"], "green"),
        rule("cookie-present", &["cookie:beta"], "green"),
        rule("query-value", &["query:tenant=acme"], "green"),
        rule("query-present", &["query:preview"], "green"),
        rule(
            "office",
            &["client:127.0.0.0/8", "path_prefix:/office"],
            "green",
        ),
        rule(
            "elsewhere",
            &["client:10.0.0.0/8", "path_prefix:/elsewhere"],
            "green",
        ),
        rule("path", &["path_prefix:/beta"], "green"),
        rule("all-of", &["header:x-a=1", "cookie:b=2"], "green"),
    ]
    .concat();
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&rules)]).await;

    let green_cases: &[(&str, &[(&str, &str)])] = &[
        ("/", &[("x-beta", "1")]),
        ("/", &[("X-BETA", "1")]),
        ("/", &[("x-flag", "")]),
        ("/", &[("x-flag", "anything")]),
        ("/", &[("cookie", "a=1; plan=pro")]),
        ("/", &[("cookie", "beta=")]),
        ("/", &[("cookie", "x=1; beta=yes")]),
        ("/x?tenant=acme", &[]),
        ("/x?a=1&tenant=acme&b", &[]),
        ("/x?preview", &[]),
        ("/x?preview=1", &[]),
        ("/office", &[]),
        ("/office/room/1", &[]),
        ("/beta", &[]),
        ("/beta/app?x=1", &[]),
        ("/", &[("x-a", "1"), ("cookie", "b=2")]),
        ("/", &[("x-order", "1")]),
    ];
    for (path, headers) in green_cases {
        assert_eq!(
            pool_of(&p, path, headers).await,
            "green",
            "{path} {headers:?}"
        );
    }
    let blue_cases: &[(&str, &[(&str, &str)])] = &[
        ("/", &[]),
        ("/", &[("x-beta", "2")]),
        ("/", &[("cookie", "plan=PRO")]),
        ("/", &[("cookie", "plans=pro")]),
        ("/", &[("x-plan", "pro")]),
        ("/x?tenant=acme2", &[]),
        ("/x?tenant=ACME", &[]),
        ("/x?previews", &[]),
        ("/elsewhere", &[]),
        ("/officer", &[]),
        ("/betamax", &[]),
        ("/", &[("x-a", "1")]),
        ("/", &[("cookie", "b=2")]),
        ("/", &[("x-order", "2")]),
    ];
    for (path, headers) in blue_cases {
        assert_eq!(
            pool_of(&p, path, headers).await,
            "blue",
            "{path} {headers:?}"
        );
    }

    // First full match wins: `x-order: 1` matched both order rules, only the
    // first counted; `x-order: 2` matched only the second.
    let m = p.admin.metrics().await;
    let count = |r: &str| {
        metric(
            &m,
            &format!("switchyard_rule_matches_total{{rule=\"{r}\",service=\"web\"}}"),
        )
    };
    assert_eq!(count("order-first"), Some(1.0), "{m}");
    assert_eq!(count("order-second"), Some(1.0), "{m}");
    assert_eq!(count("hdr-value"), Some(2.0), "{m}");
    assert_eq!(count("elsewhere"), Some(0.0), "{m}");

    // Rules override the weights both ways: all traffic to green now, and
    // the rule that sends to blue still does.
    p.admin
        .ok("/api/v1/services/web/switch", r#"{"to":"green"}"#)
        .await;
    assert_eq!(pool_of(&p, "/", &[("x-order", "2")]).await, "blue");
    assert_eq!(pool_of(&p, "/", &[]).await, "green");
    // During a split, unmatched requests follow the buckets (a sticky
    // cookie pins them), matched ones the rule.
    p.admin
        .ok("/api/v1/services/web/split", r#"{"green":50}"#)
        .await;
    let pinned_blue = [("cookie", "switchyard_bucket=9999")];
    assert_eq!(pool_of(&p, "/", &pinned_blue).await, "blue");
    let pinned_blue_beta = [("cookie", "switchyard_bucket=9999; plan=pro")];
    assert_eq!(pool_of(&p, "/", &pinned_blue_beta).await, "green");
    // The preview header still comes first.
    let preview_blue = [("x-switchyard-pool", "blue"), ("x-beta", "1")];
    assert_eq!(pool_of(&p, "/", &preview_blue).await, "blue");
    p.shutdown().await;
}

async fn spawn(config: &Path) -> ProxyProcess {
    let config = config.to_path_buf();
    tokio::task::spawn_blocking(move || ProxyProcess::spawn(&config, &[]))
        .await
        .unwrap()
        .unwrap()
}

async fn get_status_pool(
    client: &HttpClient,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let (s, h, _) = get(client, url, headers).await;
    let pool = h
        .get("x-switchyard-pool")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    (s, pool)
}

/// Waits until the service object shows green with no healthy backend.
async fn green_unhealthy(admin: &Admin) -> bool {
    eventually(Duration::from_secs(20), || async {
        let v = admin.service("web").await;
        v["pools"]["green"]["backends"][0]["healthy"] == json!(false)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_pool_without_backends_answers_503_or_falls_back_and_the_access_log_says_which() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = TempDir::new("rules-log");
    let svc = Svc::new("web", &[&blue], &[&green])
        .extra(&health_every("100ms"))
        .extra(&rule("strict", &["header:x-strict"], "green"))
        .extra(&(rule("soft", &["header:x-soft"], "green") + "fallback = true\n"));
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, config_text(dir.path(), "", &[svc])).unwrap();
    let p = spawn(&config).await;
    let client = http1_client();
    let url = format!("http://{}/", p.proxy);

    // Healthy: both rules send to green, logged as rule:NAME.
    assert_eq!(
        get_status_pool(&client, &url, &[("x-strict", "1")]).await,
        (StatusCode::OK, "green".into())
    );
    assert_eq!(
        get_status_pool(&client, &url, &[("x-soft", "1")]).await,
        (StatusCode::OK, "green".into())
    );
    // Green down: the strict rule answers 503 (never the live pool), the
    // soft one routes by the weights (blue).
    green.set_healthy(false);
    let admin = Admin::new(p.admin);
    assert!(
        green_unhealthy(&admin).await,
        "green never judged unhealthy"
    );
    let (s, _) = get_status_pool(&client, &url, &[("x-strict", "1")]).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        get_status_pool(&client, &url, &[("x-soft", "1")]).await,
        (StatusCode::OK, "blue".into())
    );
    // The access log reaches the test through the child's stderr pipe:
    // wait for the last request's line before reading the whole log.
    let logged = eventually(Duration::from_secs(10), || async {
        p.log_text().contains("rule_fallback:soft")
    })
    .await;
    assert!(logged, "{}", p.log_text());
    let log = p.log_text();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert!(
        lines("decision=\"rule:strict\"") + lines("decision=rule:strict") >= 2,
        "{log}"
    );
    assert!(
        lines("decision=\"rule:soft\"") + lines("decision=rule:soft") >= 1,
        "{log}"
    );
    assert!(
        lines("decision=\"rule_fallback:soft\"") + lines("decision=rule_fallback:soft") >= 1,
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("rule:strict") && l.contains("status=503")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_change_through_the_api_with_if_match_history_persistence_and_restart() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let dir = TempDir::new("rules-api");
    let config = dir.join("switchyard.toml");
    let svc = Svc::new("web", &[&blue], &[&green]);
    std::fs::write(&config, config_text(dir.path(), "", &[svc])).unwrap();
    let p = spawn(&config).await;
    let admin = Admin::new(p.admin);
    let client = http1_client();
    let url = format!("http://{}/", p.proxy);
    let beta = [("cookie", "plan=pro")];

    let (s, v) = admin.get("/api/v1/services/web/rules").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["rules"], json!([]));
    let generation = v["generation"].as_u64().unwrap();
    assert_eq!(get_status_pool(&client, &url, &beta).await.1, "blue");

    let body = r#"{"rules":[{"name":"beta","match":["cookie:plan=pro"],"to":"green"}],"reason":"beta cohort"}"#;
    // A stale If-Match changes nothing.
    let stale = format!("\"{}\"", generation + 5);
    let (s, v) = admin
        .call(
            "PUT",
            "/api/v1/services/web/rules",
            Some(body),
            &[("if-match", &stale)],
        )
        .await;
    assert_eq!(s, StatusCode::PRECONDITION_FAILED, "{v}");
    assert_eq!(v["error"]["code"], "stale_generation");
    assert_eq!(get_status_pool(&client, &url, &beta).await.1, "blue");

    let current = format!("\"{generation}\"");
    let (s, v) = admin
        .call(
            "PUT",
            "/api/v1/services/web/rules",
            Some(body),
            &[("if-match", &current)],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["generation"].as_u64(), Some(generation + 1));
    assert_eq!(v["rules"][0]["name"], "beta");
    assert_eq!(v["rules"][0]["fallback"], false);
    // Visible to the very next request.
    assert_eq!(get_status_pool(&client, &url, &beta).await.1, "green");
    assert_eq!(get_status_pool(&client, &url, &[]).await.1, "blue");

    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(h[0]["action"], "rules", "{h}");
    assert_eq!(h[0]["reason"], "beta cohort");
    assert_eq!(h[0]["rules"]["to"], json!(["beta"]));
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(
        state["services"]["web"]["rules"]["rules"][0]["name"], "beta",
        "{state}"
    );
    let m = admin.metrics().await;
    assert_eq!(
        metric(
            &m,
            "switchyard_routing_changes_total{action=\"rules\",service=\"web\"}"
        ),
        Some(1.0)
    );

    // A restart keeps them.
    drop(p);
    let p = spawn(&config).await;
    let admin = Admin::new(p.admin);
    let url = format!("http://{}/", p.proxy);
    assert_eq!(admin.service("web").await["rules"][0]["name"], "beta");
    assert_eq!(get_status_pool(&client, &url, &beta).await.1, "green");

    // A reload that does not touch the file's rules keeps the API's; one
    // that changes them makes the file win (as with pool backends).
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(admin.service("web").await["rules"][0]["name"], "beta");
    let svc = Svc::new("web", &[&blue], &[&green]).extra(&rule(
        "office",
        &["client:127.0.0.0/8"],
        "green",
    ));
    std::fs::write(&config, config_text(dir.path(), "", &[svc])).unwrap();
    let (s, v) = admin.post("/api/v1/reload", "").await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let v = admin.service("web").await;
    assert_eq!(v["rules"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["rules"][0]["name"], "office");
    assert_eq!(get_status_pool(&client, &url, &[]).await.1, "green");
    let (_, h) = admin.get("/api/v1/services/web/history").await;
    assert_eq!(
        (&h[0]["action"], &h[0]["actor"]),
        (&json!("rules"), &json!("config"))
    );
    // The removed rule's series is gone, the new one's is there.
    let series = |r: &str| format!("switchyard_rule_matches_total{{rule=\"{r}\",service=\"web\"}}");
    let m = admin.metrics().await;
    assert_eq!(metric(&m, &series("beta")), None, "{m}");
    assert_eq!(metric(&m, &series("office")), Some(1.0), "{m}");

    // An empty list turns them off in one call.
    let (s, v) = admin
        .put("/api/v1/services/web/rules", r#"{"rules":[]}"#)
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(get_status_pool(&client, &url, &[]).await.1, "blue");
    let m = admin.metrics().await;
    assert_eq!(metric(&m, &series("office")), None, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rules_are_refused_naming_rule_and_condition_and_change_nothing() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let svc =
        Svc::new("web", &[&blue], &[&green]).extra(&rule("beta", &["cookie:plan=pro"], "green"));
    let p = TestProxy::start(&[svc]).await;
    let before = p.admin.service("web").await;
    let cases: &[(&str, &str, &[&str])] = &[
        (
            r#"{"rules":[{"name":"ok","match":["header:x"],"to":"green"},{"name":"bad","match":["host:example.com"],"to":"green"}]}"#,
            "invalid_rule",
            &["\"bad\"", "host:example.com", "unknown form"],
        ),
        (
            r#"{"rules":[{"name":"office","match":["client:10.0.0.0/33"],"to":"blue"}]}"#,
            "invalid_rule",
            &["\"office\"", "client:10.0.0.0/33"],
        ),
        (
            r#"{"rules":[{"name":"a","match":["header:x"],"to":"green"},{"name":"a","match":["header:y"],"to":"green"}]}"#,
            "invalid_rule",
            &["\"a\"", "duplicate"],
        ),
        (
            r#"{"rules":[{"name":"p","match":["header:x"],"to":"purple"}]}"#,
            "invalid_field",
            &["\"p\"", "purple"],
        ),
        (
            r#"{"rules":[{"name":"e","match":[],"to":"green"}]}"#,
            "invalid_rule",
            &["\"e\"", "empty"],
        ),
        (
            r#"{"rules":[{"name":"Upper","match":["header:x"],"to":"green"}]}"#,
            "invalid_rule",
            &["[a-z0-9_-]+"],
        ),
        (
            r#"{"rules":[{"name":"u","match":["header:x"],"to":"green","colour":1}]}"#,
            "invalid_field",
            &["\"u\"", "colour"],
        ),
        (r#"{"rule":[]}"#, "unknown_field", &["rule"]),
    ];
    for (body, code, needles) in cases {
        let (s, v) = p.admin.put("/api/v1/services/web/rules", body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["error"]["code"], *code, "{body}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        for n in *needles {
            assert!(msg.contains(n), "{body}: `{msg}` lacks `{n}`");
        }
    }
    let (s, _) = p
        .admin
        .put("/api/v1/services/nope/rules", r#"{"rules":[]}"#)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = p
        .admin
        .post("/api/v1/services/web/rules", r#"{"rules":[]}"#)
        .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    let after = p.admin.service("web").await;
    assert_eq!(after["generation"], before["generation"]);
    assert_eq!(after["rules"], before["rules"]);
    assert_eq!(pool_of(&p, "/", &[("cookie", "plan=pro")]).await, "green");
    p.shutdown().await;
}

#[test]
fn check_lists_every_bad_rule_with_its_line() {
    let dir = TempDir::new("rules-check");
    let text = r#"[[service]]
name = "web"
[service.blue]
backends = ["127.0.0.1:9001"]
[service.green]
backends = ["127.0.0.1:9002"]

[[service.rule]]
name = "beta"
match = ["cookie:plan=pro"]
to = "green"

[[service.rule]]
name = "beta"
match = ["header:x-beta"]
to = "green"

[[service.rule]]
name = "office"
match = [
  "header:x-ok",
  "client:10.0.0.0/33",
]
to = "green"

[[service.rule]]
name = "typo"
match = ["hdr:x"]
to = "green"

[[service.rule]]
name = "nowhere"
match = ["header:x"]
to = "purple"

[[service.rule]]
name = "empty"
match = []
to = "blue"
"#;
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    let (code, _, stderr) = run_binary(&["check", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    let file = path.display().to_string();
    for (line, needle) in [
        (14, "duplicate name"),
        (22, "client:10.0.0.0/33"),
        (28, "unknown form `hdr`"),
        (34, "unknown pool \"purple\""),
        (38, "match must not be empty"),
    ] {
        let prefix = format!("{file}:{line}:");
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&prefix) && l.contains(needle)),
            "no `{prefix} …{needle}…` in:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_rules_shows_and_replaces_them() {
    let blue = Upstream::start("blue").await;
    let green = Upstream::start("green").await;
    let p = TestProxy::start(&[Svc::new("web", &[&blue], &[&green]).extra(&rule(
        "beta",
        &["cookie:plan=pro"],
        "green",
    ))])
    .await;
    let admin_url = p.admin.base.clone();
    let ctl = move |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_binary(&args)
        })
    };
    let base = |rest: &[&str]| {
        let mut v: Vec<String> = ["ctl", "--admin", &admin_url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(rest.iter().map(|s| s.to_string()));
        v
    };
    let (code, out, err) = ctl(base(&["rules", "web"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("beta") && out.contains("cookie:plan=pro") && out.contains("green"),
        "{out}"
    );

    let file = p.dir.join("rules.json");
    std::fs::write(
        &file,
        r#"[{"name":"office","match":["client:127.0.0.0/8","path_prefix:/office"],"to":"green","fallback":true}]"#,
    )
    .unwrap();
    let f = file.to_str().unwrap().to_string();
    let (code, out, err) = ctl(base(&["rules", "web", "--set", &f])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("office"), "{out}");
    assert_eq!(pool_of(&p, "/office", &[]).await, "green");
    assert_eq!(pool_of(&p, "/", &[("cookie", "plan=pro")]).await, "blue");

    // A refused list exits non-zero with the server's error.
    std::fs::write(
        &file,
        r#"{"rules":[{"name":"x","match":["client:nope"],"to":"green"}]}"#,
    )
    .unwrap();
    let (code, out, err) = ctl(base(&["rules", "web", "--set", &f])).await.unwrap();
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("client:nope"), "{err}");
    assert_eq!(pool_of(&p, "/office", &[]).await, "green");
    p.shutdown().await;
}
